"""Tests for models.py: output shapes, a few training steps per encoder, activation
checkpointing, the projection head and the multiply-accumulate counter."""

import pytest
import torch
import torch.nn.functional as F

import models

PAPER_SAMPLES = 59_535  # 2.7 s at 22,050 Hz
SHORT_SAMPLES = 8_000
ENCODER_NAMES = sorted(models.ENCODERS)


@pytest.mark.parametrize("num_samples", [PAPER_SAMPLES, SHORT_SAMPLES])
@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_encoder_output_matches_embed_dim_and_head(name, num_samples):
    torch.manual_seed(0)
    encoder = models.build_encoder(name, num_samples, 22_050, width=0.125)
    head = models.ProjectionHead(in_dim=encoder.embed_dim)
    x = torch.randn(2, num_samples)
    h = encoder(x)
    assert isinstance(encoder.embed_dim, int)
    assert encoder.embed_dim == 64  # 512 * 0.125
    assert h.shape == (2, encoder.embed_dim)
    assert head(h).shape == (2, 128)
    assert torch.isfinite(h).all()


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_full_width_embedding_is_512(name):
    encoder = models.build_encoder(name, SHORT_SAMPLES, 16_000)
    assert encoder.embed_dim == 512


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_encoder_trains_a_few_steps_and_every_parameter_learns(name):
    # a tiny regression of the projections of 4 short clips onto fixed targets: the
    # loss on the batch must fall, and every encoder parameter must receive a gradient
    torch.manual_seed(0)
    encoder = models.build_encoder(name, 4_000, 16_000, width=0.0625)
    head = models.ProjectionHead(encoder.embed_dim, hidden_dim=32, out_dim=8)
    x = torch.randn(4, 4_000)
    target = torch.randn(4, 8)
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = F.mse_loss(head(encoder(x)), target)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            silent = [n for n, p in encoder.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
            assert silent == []
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_activation_checkpointing_leaves_gradients_and_statistics_unchanged(name):
    torch.manual_seed(0)
    encoder = models.build_encoder(name, 3_000, 16_000, width=0.0625).double()
    x = torch.randn(3, 3_000, dtype=torch.float64)
    initial_state = {k: v.clone() for k, v in encoder.state_dict().items()}

    def step(is_checkpointed):
        # same weights, same batch, training mode: batch norm sees identical statistics
        encoder.load_state_dict(initial_state)
        encoder.zero_grad()
        models.set_activation_checkpointing(encoder, is_checkpointed)
        calls = []  # calls of any submodule: the encoder contract names no attribute of its blocks
        handles = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in encoder.modules() if m is not encoder]
        encoder(x).pow(2).sum().backward()
        for handle in handles:
            handle.remove()
        grads = {n: p.grad.clone() for n, p in encoder.named_parameters()}
        buffers = {k: v.clone() for k, v in encoder.state_dict().items()}
        return grads, buffers, len(calls)

    plain_grads, plain_buffers, plain_calls = step(False)
    checkpointed_grads, checkpointed_buffers, checkpointed_calls = step(True)
    # the checkpointed blocks really ran a second time (recomputation in backward)
    assert checkpointed_calls > plain_calls
    for n in plain_grads:
        torch.testing.assert_close(checkpointed_grads[n], plain_grads[n], rtol=1e-12, atol=1e-12)
    # running statistics moved once, as in an ordinary step
    for k in plain_buffers:
        torch.testing.assert_close(checkpointed_buffers[k], plain_buffers[k], rtol=1e-12, atol=1e-12)
    assert any(not torch.equal(plain_buffers[k], initial_state[k]) for k in plain_buffers if "running_mean" in k)


def test_set_activation_checkpointing_rejects_modules_without_blocks():
    with pytest.raises(TypeError):
        models.set_activation_checkpointing(torch.nn.Linear(2, 2), True)


def test_samplecnn_depth_matches_paper_design():
    # 59,535 samples: the stem leaves 19,845 frames, nine pools of 3 bring them to 1
    assert models.sample_cnn_depth(PAPER_SAMPLES) == 9
    assert models.sample_cnn_depth(3**10) == 9
    assert models.sample_cnn_depth(19_680) == 7
    with pytest.raises(ValueError):
        models.sample_cnn_depth(5)


def test_samplecnn_channels_match_reference_designs():
    assert models.sample_cnn_channels(9, 256, 512) == [128, 128, 256, 256, 256, 256, 256, 256, 512]
    assert models.sample_cnn_channels(9, 1024, 2048) == [128, 128, 256, 256, 512, 512, 1024, 1024, 2048]
    encoder = models.build_encoder("samplecnn", PAPER_SAMPLES, 22_050)
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv1d)]
    # stem, 9 pooled blocks, final block
    assert [m.out_channels for m in convs] == [128, 128, 128, 256, 256, 256, 256, 256, 256, 512, 512]


def test_tuneplus_handles_lengths_that_do_not_divide_by_three():
    torch.manual_seed(0)
    for num_samples in (1_000, 1_001, 1_002):
        encoder = models.build_encoder("tuneplus", num_samples, 16_000, width=0.0625)
        assert encoder(torch.randn(2, num_samples)).shape == (2, encoder.embed_dim)


def test_melcnn_depth_and_mel_settings():
    assert models.mel_settings(22_050) == (1024, 256, 128)
    assert models.mel_settings(8_000) == (512, 128, 64)
    # 128 bands x 233 frames at the paper's clip: 7 halvings reach 1 x 1
    assert models.mel_cnn_depth(PAPER_SAMPLES, 22_050) == 7


def test_projection_head_has_no_bias_and_paper_shapes():
    head = models.ProjectionHead(in_dim=512)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 128)]
    assert all(m.bias is None for m in linears)
    assert all(n.endswith("weight") for n, _ in head.named_parameters())
    # ReLU between the layers: a negative hidden unit contributes nothing
    x = torch.randn(5, 512)
    hidden = F.relu(x @ linears[0].weight.T)
    torch.testing.assert_close(head(x), hidden @ linears[1].weight.T)


def test_mac_counter_matches_hand_count_for_single_layers():
    linear = torch.nn.Linear(10, 7)
    assert models.count_macs(linear, torch.randn(3, 10)) == 10 * 7
    conv = torch.nn.Conv1d(4, 6, kernel_size=3, padding=1)
    assert models.count_macs(conv, torch.randn(2, 4, 20)) == 6 * 20 * 4 * 3
    strided = torch.nn.Conv1d(1, 5, kernel_size=3, stride=3)
    assert models.count_macs(strided, torch.randn(2, 1, 30)) == 5 * 10 * 1 * 3
    transposed = torch.nn.ConvTranspose1d(4, 2, kernel_size=3, stride=3)
    assert models.count_macs(transposed, torch.randn(2, 4, 10)) == 4 * 10 * 2 * 3
    conv2d = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    assert models.count_macs(conv2d, torch.randn(1, 3, 5, 6)) == 8 * 5 * 6 * 3 * 9


def test_mac_counter_leaves_training_mode_and_statistics_alone():
    encoder = models.build_encoder("samplecnn", SHORT_SAMPLES, 16_000, width=0.125)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert models.count_macs(encoder, torch.randn(1, SHORT_SAMPLES)) > 0
    assert encoder.training
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())


def test_unknown_encoder_names_the_choices():
    with pytest.raises(ValueError, match="samplecnn"):
        models.build_encoder("resnet-1000", 8000, 16_000)


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_every_encoder_keeps_the_contract(name):
    encoder = models.build_encoder(name, 3_000, 16_000, width=0.0625)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    assert models.check_encoder(encoder, 3_000) == []
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # the check changes nothing


class Unchecked(torch.nn.Module):
    """Maps [B, T] to [B, 8] but runs its block directly, not through apply_block."""

    def __init__(self, num_samples, sample_rate, width=1.0):
        super().__init__()
        self.embed_dim, self.is_checkpointed = 8, False
        self.block = torch.nn.Sequential(torch.nn.Linear(num_samples, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))

    def forward(self, x):
        return self.block(x)


def test_a_broken_contract_is_named():
    assert models.check_encoder(Unchecked(100, 8000), 100) == [
        "checkpointing recomputes nothing: run blocks through apply_block(..., is_checkpointed=self.is_checkpointed)"]
    no_dim = Unchecked(100, 8000)
    del no_dim.embed_dim
    with pytest.raises(TypeError, match="breaks the encoder contract"):
        models.ENCODERS["no-dim"] = lambda *args: no_dim
        try:
            models.build_encoder("no-dim", 100, 8000)
        finally:
            del models.ENCODERS["no-dim"]
