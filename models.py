"""Encoders and the projection head.

Every encoder maps a batch of raw mono waveforms `x` `[B, T]` (T == the `num_samples` it
was built for) to embeddings `h` `[B, embed_dim]`; the projection head maps `h` to the
projections `z` `[B, 128]` that the contrastive loss compares. Encoders are chosen by
name through the plain dict `ENCODERS` (name -> constructor(num_samples, sample_rate,
width)); `build_encoder` looks a name up and gives a readable error.

Encoders:
- `samplecnn`: SampleCNN (Lee et al. 2017, as used by CLMR and the paper), 512-d.

`width` multiplies every channel count (0.25 trains at about 1 s per step on a 2-core
CPU); the embedding size is `embed_width(512, width)`.

`python models.py` prints parameters and multiply-accumulates per clip for each encoder.
"""

import argparse
from contextlib import nullcontext
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

EMBED_DIM = 512  # paper: 512-d SampleCNN embedding at full width
MIN_CHANNELS = 8  # narrowest layer any width may produce
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def embed_width(channels: int, width: float) -> int:
    """Scale a full-width channel count by `width`.

    Args:
        channels: channel count at width 1.
        width: multiplier (e.g. 0.25 for CPU runs).
    Returns:
        int(channels * width), but at least MIN_CHANNELS.
    """
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    return max(MIN_CHANNELS, int(channels * width))


class ProjectionHead(nn.Module):
    """MLP from embeddings to the projections the loss compares.

    Paper: 512 -> 512 (ReLU) -> 128, both linear layers without bias.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512, out_dim: int = 128):
        """Args:
            in_dim: embedding size (the encoder's `embed_dim`).
            hidden_dim: hidden layer size.
            out_dim: projection size.
        """
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Args:
            h: embeddings `[B, in_dim]`.
        Returns:
            projections `[B, out_dim]` (not normalised; the loss normalises).
        """
        return self.net(h)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, is_checkpointed: bool) -> torch.Tensor:
    """Apply `blocks` in order, optionally with activation checkpointing.

    With checkpointing, each block keeps only its input for backward and recomputes its
    activations then; the recomputation runs with batch-norm running statistics frozen,
    so a checkpointed training step updates them exactly once, as an ordinary step does.

    Args:
        blocks: modules applied one after another.
        x: input of the first block.
        is_checkpointed: recompute activations in backward instead of storing them.
    Returns:
        output of the last block.
    """
    for block in blocks:
        if is_checkpointed and torch.is_grad_enabled():
            x = checkpoint(
                block,
                x,
                use_reentrant=False,
                context_fn=lambda block=block: (nullcontext(), FrozenBatchNormStats(block)),
            )
        else:
            x = block(x)
    return x


class FrozenBatchNormStats:
    """Context manager: batch norms inside `module` leave their running statistics alone.

    Used while a checkpointed block recomputes its forward pass during backward: the
    batch statistics (and so the gradients) are the same, but the running mean, variance
    and batch count were already updated by the original forward pass.
    """

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, BATCH_NORMS)]
        self.saved = []

    def __enter__(self):
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.norms]
        for m in self.norms:
            # momentum 0 turns the running-average update into the identity
            m.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for m, (momentum, count) in zip(self.norms, self.saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        return False


def set_activation_checkpointing(encoder: nn.Module, enabled: bool) -> None:
    """Switch activation checkpointing of an encoder's blocks on or off.

    Trades compute for memory (`--activation-checkpointing`): activations inside each
    block are recomputed in backward instead of being kept, so larger contrastive batches
    fit on one GPU. Gradients are unchanged.

    Args:
        encoder: a module built by `build_encoder`.
        enabled: whether to checkpoint.
    """
    if not hasattr(encoder, "is_checkpointed"):
        raise TypeError(f"{type(encoder).__name__} does not support activation checkpointing")
    encoder.is_checkpointed = enabled


# ---------------------------------------------------------------- SampleCNN


def sample_cnn_depth(num_samples: int) -> int:
    """Number of pooled SampleCNN blocks for clips of `num_samples`.

    The strided first conv (kernel 3, stride 3) leaves floor(num_samples / 3) frames;
    each block then divides the length by 3 (max-pool 3, floor). Blocks are added while
    the length entering a block is at least 3, so the last block leaves 1 or 2 frames,
    which a global pooling turns into one vector. For the paper's clips
    (59,535 = 3^5 * 245 samples): 19,845 -> 6,615 -> ... -> 3 -> 1, i.e. 9 blocks,
    exactly SampleCNN's 3^10-sample design; 1.23 s at 16 kHz (19,680 samples) gives 7.

    Args:
        num_samples: clip length in samples, at least 9.
    Returns:
        number of pooled blocks, at least 1.
    """
    length = num_samples // 3
    if length < 3:
        raise ValueError(f"SampleCNN needs clips of at least 9 samples, got {num_samples}")
    depth = 0
    while length >= 3:
        length //= 3
        depth += 1
    return depth


def sample_cnn_channels(depth: int, top_channels: int) -> list[int]:
    """Full-width output channels of each pooled SampleCNN block.

    SampleCNN at 9 blocks uses 128, 128, 256 x 6, 512: the first two blocks stay at 128,
    the last reaches `top_channels`, the blocks in between use 256. Other depths keep
    that rule, so shorter clips drop 256-channel blocks first.

    Args:
        depth: number of pooled blocks (from `sample_cnn_depth`).
        top_channels: channels of the last block (512; 2048 for the wide variant).
    Returns:
        `depth` channel counts at width 1.
    """
    channels = [128 if i < 2 else 256 for i in range(depth)]
    channels[-1] = top_channels
    return channels


def conv_bn_relu_1d(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv1d without bias (batch norm follows), batch norm, ReLU. Length kept when stride is 1."""
    padding = (kernel_size - 1) // 2 if stride == 1 else 0
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False),
        nn.BatchNorm1d(out_channels),
        nn.ReLU(),
    )


class SampleCNN(nn.Module):
    """SampleCNN on raw waveforms.

    Stem: conv (kernel 3, stride 3) + BN + ReLU. Then pooled blocks of conv (kernel 3) +
    BN + ReLU + max-pool 3, as many as the clip length allows (`sample_cnn_depth`), then
    one more conv + BN + ReLU block without pooling (CLMR's final layer), then a mean over
    the 1 or 2 frames left. When the last block is wider than the embedding (the wide
    variant), a linear layer projects it to `embed_dim`.
    """

    def __init__(self, num_samples: int, block_channels: Sequence[int], stem_channels: int, embed_dim: int):
        """Args:
            num_samples: clip length T the encoder is built for.
            block_channels: output channels of each pooled block (its length is the depth).
            stem_channels: output channels of the strided first conv.
            embed_dim: embedding size.
        """
        super().__init__()
        self.num_samples = num_samples
        self.embed_dim = embed_dim
        self.is_checkpointed = False
        top_channels = block_channels[-1]
        layers = [conv_bn_relu_1d(1, stem_channels, kernel_size=3, stride=3)]
        in_channels = stem_channels
        for out_channels in block_channels:
            layers.append(nn.Sequential(conv_bn_relu_1d(in_channels, out_channels), nn.MaxPool1d(3)))
            in_channels = out_channels
        layers.append(conv_bn_relu_1d(top_channels, top_channels))
        self.blocks = nn.ModuleList(layers)
        self.projection = nn.Linear(top_channels, embed_dim) if top_channels != embed_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: waveforms `[B, T]`.
        Returns:
            embeddings `[B, embed_dim]`.
        """
        x = x.unsqueeze(1)  # [B, 1, T]
        x = run_blocks(self.blocks, x, self.is_checkpointed)  # [B, C, 1 or 2]
        h = x.mean(dim=2)  # [B, C]
        return self.projection(h)


def samplecnn(num_samples: int, sample_rate: int, width: float = 1.0) -> SampleCNN:
    """The paper's encoder: SampleCNN with channels growing to 512 (times `width`).

    Args:
        num_samples: clip length in samples.
        sample_rate: unused (SampleCNN's receptive field is set in samples).
        width: channel multiplier.
    Returns:
        SampleCNN with `embed_dim` = embed_width(512, width).
    """
    depth = sample_cnn_depth(num_samples)
    channels = [embed_width(c, width) for c in sample_cnn_channels(depth, EMBED_DIM)]
    return SampleCNN(num_samples, channels, embed_width(128, width), embed_width(EMBED_DIM, width))


ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "samplecnn": samplecnn,
}


def build_encoder(name: str, num_samples: int, sample_rate: int, width: float = 1.0) -> nn.Module:
    """Build the encoder called `name`.

    Args:
        name: a key of `ENCODERS`.
        num_samples: clip length T in samples.
        sample_rate: audio sample rate in Hz.
        width: channel multiplier (1 = the paper's size).
    Returns:
        module mapping `[B, T]` waveforms to `[B, embed_dim]`; has int `embed_dim`.
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {sorted(ENCODERS)}")
    return ENCODERS[name](num_samples, sample_rate, width)
