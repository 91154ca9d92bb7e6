"""Encoders and the projection head.

The encoder contract. An encoder is an `nn.Module` made by a constructor
`(num_samples, sample_rate, width) -> module`, registered under its name in the plain dict
`ENCODERS`: the one place a new encoder is added (--encoder NAME then trains, probes and
exports it). It must
  1. map raw mono waveforms x `[B, num_samples]` at `sample_rate` to embeddings h
     `[B, embed_dim]`, in train and eval mode;
  2. have an int attribute `embed_dim` (the projection head's input size);
  3. have a bool attribute `is_checkpointed` (False when built) and run each of its blocks
     as `apply_block(block, x, is_checkpointed=self.is_checkpointed)`, so that
     --activation-checkpointing recomputes them in backward;
  4. use nn.BatchNorm1d/2d for batch norm, if any, so that --sync-bn can swap it.
`check_encoder` checks 1-3 on a built encoder; `build_encoder` looks a name up (a readable
error for an unknown one) and checks 2-3. The projection head maps h to the projections
`z` `[B, 128]` that the contrastive loss compares.

Encoders (all 512-d at full width):
- `samplecnn`: SampleCNN (Lee et al. 2017, as in CLMR and the paper), depth set by the
  clip length;
- `samplecnn-xl`: the same with channels growing to 2048, projected to 512;
- `tuneplus`: TUNe+, a U-Net on the waveform with a deep tail (the paper's other encoder);
- `melcnn`: log-mel spectrogram and a short-chunk ResNet, the spectrogram baseline.

`load_pretrained(path)` gives a trained encoder for one's own code (the only file access
in this module): `load_pretrained("runs/x").embed(waveform, sample_rate)` -> `[clips, D]`.

`width` multiplies every channel count (0.25 trains at about 1 s per step on a 2-core
CPU); the embedding size is `scaled_channels(512, width)`. `set_activation_checkpointing`
trades compute for memory without changing gradients.

Size table (parameters, multiply-accumulates per clip, embedding size):
    python models.py                                   # paper's clip: 2.7 s at 22,050 Hz
    python models.py --clip-seconds 1.23 --sample-rate 16000 --width 0.25
"""

import argparse
import math
from contextlib import nullcontext
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio
from torch.utils.checkpoint import checkpoint

import datasets
import safety

EMBED_DIM = 512  # paper: 512-d SampleCNN embedding at full width
MIN_CHANNELS = 8  # narrowest layer any width may produce
# SyncBatchNorm too: --sync-bn swaps it in on GPUs, and checkpointing must keep its statistics.
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)


def scaled_channels(channels: int, width: float) -> int:
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


class ContrastiveModel(nn.Module):
    """Encoder plus projection head: waveform `[n, T]` -> projection `[n, D]`."""

    def __init__(self, encoder, hidden_dim=512, projection_dim=128):
        super().__init__()
        self.encoder = encoder
        self.head = ProjectionHead(encoder.embed_dim, hidden_dim, projection_dim)

    def forward(self, views):
        return self.head(self.encoder(views))


def apply_block(block: nn.Module, *inputs: torch.Tensor, is_checkpointed: bool) -> torch.Tensor:
    """Run one block, optionally with activation checkpointing.

    With checkpointing the block keeps only its inputs for backward and recomputes its
    activations then (non-reentrant `torch.utils.checkpoint`). The recomputation sees the
    same batch, so batch norm uses the same batch statistics and the gradients are
    unchanged; its running statistics are restored afterwards, so a checkpointed step
    updates them exactly once, like an ordinary step.

    Args:
        block: the module to run.
        inputs: its input tensors.
        is_checkpointed: recompute activations in backward instead of storing them.
    Returns:
        the block's output.
    """
    if not (is_checkpointed and torch.is_grad_enabled()):
        return block(*inputs)
    if torch.compiler.is_compiling():
        # compiled graphs recompute the functional forward only and apply the buffer
        # updates once, so no restoring is needed (and dynamo rejects a context_fn)
        return checkpoint(block, *inputs, use_reentrant=False)
    return checkpoint(
        block,
        *inputs,
        use_reentrant=False,
        context_fn=lambda: (nullcontext(), KeptBatchNormStats(block)),
    )


class KeptBatchNormStats:
    """Context manager: batch-norm running statistics inside `module` are restored on exit.

    Wraps the recomputation of a checkpointed block during backward, whose forward pass
    would otherwise update the running mean, variance and batch count a second time.
    """

    def __init__(self, module: nn.Module):
        """Args:
            module: the block whose batch norms to protect.
        """
        self.norms = [m for m in module.modules() if isinstance(m, BATCH_NORMS) and m.track_running_stats]
        self.saved = []

    def __enter__(self):
        self.saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in self.norms]
        return self

    def __exit__(self, *exc):
        for m, saved in zip(self.norms, self.saved):
            for buffer, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved):
                buffer.copy_(value)
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


def sample_cnn_channels(depth: int, middle_cap: int, top_channels: int) -> list[int]:
    """Full-width output channels of each pooled SampleCNN block.

    Block i (from 0) has min(middle_cap, 128 * 2^(i // 2)) channels and the last block
    has `top_channels`. At the paper's 9 blocks this gives SampleCNN's
    128, 128, 256 x 6, 512 (cap 256, top 512) and the wide variant's
    128, 128, 256, 256, 512, 512, 1024, 1024, 2048 (cap 1024, top 2048); shorter clips
    drop blocks before the last, longer clips repeat the capped width.

    Args:
        depth: number of pooled blocks (from `sample_cnn_depth`).
        middle_cap: largest width of the blocks before the last.
        top_channels: channels of the last block.
    Returns:
        `depth` channel counts at width 1.
    """
    channels = [min(middle_cap, 128 * 2 ** (i // 2)) for i in range(depth)]
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
        for block in self.blocks:
            x = apply_block(block, x, is_checkpointed=self.is_checkpointed)
        # x: [B, C, 1 or 2]
        h = x.mean(dim=2)  # [B, C]
        return self.projection(h)


def samplecnn(num_samples: int, sample_rate: int, width: float = 1.0) -> SampleCNN:
    """The paper's encoder: SampleCNN with channels growing to 512 (times `width`).

    Args:
        num_samples: clip length in samples.
        sample_rate: unused (SampleCNN's receptive field is set in samples).
        width: channel multiplier.
    Returns:
        SampleCNN with `embed_dim` = scaled_channels(512, width).
    """
    depth = sample_cnn_depth(num_samples)
    channels = [scaled_channels(c, width) for c in sample_cnn_channels(depth, 256, EMBED_DIM)]
    return SampleCNN(num_samples, channels, scaled_channels(128, width), scaled_channels(EMBED_DIM, width))


def samplecnn_xl(num_samples: int, sample_rate: int, width: float = 1.0) -> SampleCNN:
    """Wide SampleCNN: channels growing to 2048 (times `width`), projected to 512.

    Same depth rule as `samplecnn`; the blocks double every two layers up to 2048, and a
    linear layer maps the 2048-channel output to the embedding.

    Args:
        num_samples: clip length in samples.
        sample_rate: unused.
        width: channel multiplier.
    Returns:
        SampleCNN with `embed_dim` = scaled_channels(512, width).
    """
    depth = sample_cnn_depth(num_samples)
    channels = [scaled_channels(c, width) for c in sample_cnn_channels(depth, 1024, 2048)]
    return SampleCNN(num_samples, channels, scaled_channels(128, width), scaled_channels(EMBED_DIM, width))


# ---------------------------------------------------------------- TUNe+


def pool_if_possible(x: torch.Tensor) -> torch.Tensor:
    """Max-pool by 3 along time when at least 3 frames remain, else return `x`.

    Args:
        x: `[B, C, L]`.
    Returns:
        `[B, C, L // 3]`, or `x` when L < 3.
    """
    return F.max_pool1d(x, 3) if x.shape[-1] >= 3 else x


class UpBlock(nn.Module):
    """Expanding-path step of TUNe+: upsample by 3 with a transposed conv, concatenate
    the contracting-path features of that resolution, conv + BN + ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        """Args:
            in_channels: channels of the coarser input.
            skip_channels: channels of the skip connection.
            out_channels: channels after the block (the upsampled part also has these).
        """
        super().__init__()
        self.upsample = nn.ConvTranspose1d(in_channels, out_channels, kernel_size=3, stride=3)
        self.conv = conv_bn_relu_1d(out_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Args:
            x: `[B, C_in, L]`.
            skip: `[B, C_skip, L_skip]` with 3L <= L_skip <= 3L + 2 (pooling floors).
        Returns:
            `[B, C_out, L_skip]`.
        """
        u = self.upsample(x)  # [B, C_out, 3L]
        # the contracting path floored L_skip / 3, so pad the 0-2 missing frames at the end
        u = F.pad(u, (0, skip.shape[-1] - u.shape[-1]))  # [B, C_out, L_skip]
        return self.conv(torch.cat([u, skip], dim=1))


class TailBlock(nn.Module):
    """Tail step of TUNe+: pool by 3, concatenate the expanding-path features of that
    resolution (TUNe's extra skip links), conv + BN + ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        """Args:
            in_channels: channels of the finer input.
            skip_channels: channels of the skip connection.
            out_channels: channels after the block.
        """
        super().__init__()
        self.conv = conv_bn_relu_1d(in_channels + skip_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Args:
            x: `[B, C_in, L]`.
            skip: `[B, C_skip, L // 3]`.
        Returns:
            `[B, C_out, L // 3]`.
        """
        p = F.max_pool1d(x, 3)  # [B, C_in, L // 3]
        return self.conv(torch.cat([p, skip], dim=1))


class PoolConv(nn.Module):
    """Pool by 3 (when at least 3 frames remain), then conv + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        """Args:
            in_channels: input channels.
            out_channels: output channels.
        """
        super().__init__()
        self.conv = conv_bn_relu_1d(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: `[B, C_in, L]`.
        Returns:
            `[B, C_out, L // 3]` (or `[B, C_out, L]` when L < 3).
        """
        return self.conv(pool_if_possible(x))


class TUNePlus(nn.Module):
    """TUNe+ (Tailed U-Net, Velez Vasquez & Burgoyne, ISMIR 2022), the paper's second
    waveform encoder.

    Base width c (11 in the paper). All convs have kernel 3, stride 1, and are followed
    by BN + ReLU; all resampling is by 3.
    - Contracting path at the sample rate: conv 1 -> c, then four times pool + conv,
      doubling channels: lengths T, T/3, T/9, T/27, T/81; channels c ... 16c.
    - Expanding path: four `UpBlock`s (transposed conv x3, concatenate the contracting
      features of that length, conv) back to length T, channels 8c ... c.
    - Tail: four `TailBlock`s pool the expanding output back down, concatenating the
      expanding features of each length (channels 2c ... 16c, length T/81), then five
      `PoolConv` blocks (32c x 4, then 512) and a mean over the frames left. At the
      paper's 59,535 samples this leaves 3 frames, which the original averages.
    `UpBlock` pads by up to 2 frames, so any length of at least 81 samples works; the
    last tail blocks skip pooling once fewer than 3 frames remain.
    """

    def __init__(self, num_samples: int, level_channels: Sequence[int], tail_channels: int, embed_dim: int):
        """Args:
            num_samples: clip length T, at least 81.
            level_channels: 5 contracting-path widths (c, 2c, 4c, 8c, 16c).
            tail_channels: width of the deep tail (32c).
            embed_dim: embedding size (last tail block's channels).
        """
        super().__init__()
        if num_samples < 3**4:
            raise ValueError(f"TUNe+ needs clips of at least 81 samples, got {num_samples}")
        if len(level_channels) != 5:
            raise ValueError(f"TUNe+ has 5 levels, got {len(level_channels)} widths")
        self.num_samples = num_samples
        self.embed_dim = embed_dim
        self.is_checkpointed = False
        c = list(level_channels)
        self.down = nn.ModuleList([conv_bn_relu_1d(1, c[0])] + [PoolConv(c[i - 1], c[i]) for i in range(1, 5)])
        # level 4 -> 3, 3 -> 2, 2 -> 1, 1 -> 0
        self.up = nn.ModuleList([UpBlock(c[i + 1], c[i], c[i]) for i in (3, 2, 1, 0)])
        # pool the level-0 output and meet level 1 of the expanding path, ..., then level 4
        self.tail_merge = nn.ModuleList([TailBlock(c[i - 1], c[i], c[i]) for i in (1, 2, 3, 4)])
        tail_widths = [c[4], tail_channels, tail_channels, tail_channels, tail_channels, embed_dim]
        self.tail = nn.ModuleList([PoolConv(tail_widths[i], tail_widths[i + 1]) for i in range(5)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: waveforms `[B, T]`.
        Returns:
            embeddings `[B, embed_dim]`.
        """
        x = x.unsqueeze(1)  # [B, 1, T]
        contracting = []
        for block in self.down:
            x = apply_block(block, x, is_checkpointed=self.is_checkpointed)
            contracting.append(x)
        # contracting[k]: [B, c_k, ~T / 3^k]; x is the bottom, level 4
        expanding = []
        for block, skip in zip(self.up, contracting[3::-1]):
            x = apply_block(block, x, skip, is_checkpointed=self.is_checkpointed)
            expanding.append(x)
        # expanding: levels 3, 2, 1, 0; x: [B, c_0, T]
        for block, skip in zip(self.tail_merge, expanding[2::-1] + [contracting[4]]):
            x = apply_block(block, x, skip, is_checkpointed=self.is_checkpointed)
        # x: [B, 16c, T // 81]
        for block in self.tail:
            x = apply_block(block, x, is_checkpointed=self.is_checkpointed)
        # x: [B, embed_dim, L] with L = 3 at the paper's clip length
        return x.mean(dim=2)  # [B, embed_dim]


def tuneplus(num_samples: int, sample_rate: int, width: float = 1.0) -> TUNePlus:
    """TUNe+ with base width 11 (times `width`) and a 512-d embedding (times `width`).

    Args:
        num_samples: clip length in samples, at least 81.
        sample_rate: unused.
        width: channel multiplier.
    Returns:
        TUNePlus with `embed_dim` = scaled_channels(512, width).
    """
    levels = [scaled_channels(11 * 2**k, width) for k in range(5)]
    return TUNePlus(num_samples, levels, scaled_channels(11 * 32, width), scaled_channels(EMBED_DIM, width))


# ---------------------------------------------------------------- log-mel CNN


def mel_settings(sample_rate: int) -> tuple[int, int, int]:
    """Short-time Fourier and mel settings for `sample_rate`.

    The window is the smallest power of two covering 46 ms (1024 at 22,050 and
    16,000 Hz), the hop a quarter of it, and the number of mel bands min(128, n_fft / 8):
    128 at 22.05 kHz as in the short-chunk CNNs, fewer at low rates where 128 bands would
    leave some of them without an FFT bin.

    Args:
        sample_rate: audio sample rate in Hz.
    Returns:
        (n_fft, hop_length, n_mels).
    """
    n_fft = 2 ** math.ceil(math.log2(0.046 * sample_rate))
    return n_fft, n_fft // 4, min(128, n_fft // 8)


class ResidualBlock2d(nn.Module):
    """Max-pool 2x2, then conv + BN + ReLU + conv + BN, plus a shortcut (1x1 conv + BN
    when the channel count changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        """Args:
            in_channels: input channels.
            out_channels: output channels.
        """
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Identity()
        if in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: `[B, C_in, F, N]` (mel bands, frames).
        Returns:
            `[B, C_out, F // 2, N // 2]`.
        """
        x = F.max_pool2d(x, 2)  # [B, C_in, F // 2, N // 2]
        return F.relu(self.body(x) + self.shortcut(x))


class MelCNN(nn.Module):
    """Log-mel spectrogram and a short-chunk ResNet-style 2-D CNN (after Won et al. 2020,
    "Evaluation of CNN-based automatic music tagging models"), the usual spectrogram
    baseline in music tagging.

    Front end: torchaudio mel power spectrogram (`mel_settings`), log(mel + 1e-6) (the
    epsilon keeps digital silence finite), batch norm over the single input channel. Then conv + BN + ReLU, and residual blocks that
    each halve both axes, as many as keep both at least 1 (at most 7; 7 at the paper's
    clip: 128 x 233 -> 1 x 1), with channels 128, 128, 256 ..., 512 (the SampleCNN rule),
    then a max over the remaining bands and frames.
    """

    def __init__(self, num_samples: int, sample_rate: int, stem_channels: int, block_channels: Sequence[int]):
        """Args:
            num_samples: clip length T in samples.
            sample_rate: audio sample rate in Hz.
            stem_channels: channels of the first conv.
            block_channels: output channels of each residual block; the last is `embed_dim`.
        """
        super().__init__()
        n_fft, hop_length, n_mels = mel_settings(sample_rate)
        self.num_samples = num_samples
        self.embed_dim = block_channels[-1]
        self.is_checkpointed = False
        self.melspectrogram = torchaudio.transforms.MelSpectrogram(
            sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels
        )
        self.input_norm = nn.BatchNorm2d(1)
        layers = [
            nn.Sequential(
                nn.Conv2d(1, stem_channels, 3, padding=1, bias=False),
                nn.BatchNorm2d(stem_channels),
                nn.ReLU(),
            )
        ]
        in_channels = stem_channels
        for out_channels in block_channels:
            layers.append(ResidualBlock2d(in_channels, out_channels))
            in_channels = out_channels
        self.blocks = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args:
            x: waveforms `[B, T]`.
        Returns:
            embeddings `[B, embed_dim]`.
        """
        # the spectrogram and its log stay in the input precision under autocast:
        # half-precision mel energies would lose the quiet bands to rounding
        with torch.autocast(x.device.type, enabled=False):
            mel = self.melspectrogram(x)  # [B, n_mels, frames]
            x = torch.log(mel + 1e-6).unsqueeze(1)  # [B, 1, n_mels, frames]
        x = self.input_norm(x)
        for block in self.blocks:
            x = apply_block(block, x, is_checkpointed=self.is_checkpointed)
        # x: [B, embed_dim, F', N']
        return x.amax(dim=(2, 3))  # [B, embed_dim]


def mel_cnn_depth(num_samples: int, sample_rate: int) -> int:
    """Number of residual blocks for `MelCNN`: halve the (mel bands, frames) grid while
    both stay at least 1, at most 7 times.

    Args:
        num_samples: clip length in samples.
        sample_rate: audio sample rate in Hz.
    Returns:
        number of blocks, at least 1.
    """
    n_fft, hop_length, n_mels = mel_settings(sample_rate)
    # centred STFT: one frame per hop plus one
    frames = num_samples // hop_length + 1
    if frames < 2:
        raise ValueError(f"MelCNN needs clips of at least {hop_length} samples at {sample_rate} Hz, got {num_samples}")
    depth = 0
    while min(n_mels, frames) >= 2 and depth < 7:
        n_mels, frames = n_mels // 2, frames // 2
        depth += 1
    return depth


def melcnn(num_samples: int, sample_rate: int, width: float = 1.0) -> MelCNN:
    """Log-mel short-chunk ResNet with a 512-d embedding (times `width`).

    Args:
        num_samples: clip length in samples.
        sample_rate: audio sample rate in Hz (sets the mel front end).
        width: channel multiplier.
    Returns:
        MelCNN with `embed_dim` = scaled_channels(512, width).
    """
    depth = mel_cnn_depth(num_samples, sample_rate)
    channels = [scaled_channels(c, width) for c in sample_cnn_channels(depth, 256, EMBED_DIM)]
    return MelCNN(num_samples, sample_rate, scaled_channels(128, width), channels)


ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "samplecnn": samplecnn,
    "samplecnn-xl": samplecnn_xl,
    "tuneplus": tuneplus,
    "melcnn": melcnn,
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
    encoder = ENCODERS[name](num_samples, sample_rate, width)
    if not isinstance(getattr(encoder, "embed_dim", None), int) or \
            not isinstance(getattr(encoder, "is_checkpointed", None), bool):
        raise TypeError(f"encoder {name!r} breaks the encoder contract (models.py, top): it needs an int "
                        f"`embed_dim` and a bool `is_checkpointed`")
    return encoder


def check_encoder(encoder: nn.Module, num_samples: int) -> list[str]:
    """What a built encoder breaks of the encoder contract (points 1-3), as sentences; [] if nothing.

    Runs one small batch forward in train and eval mode, and one backward with
    checkpointing, which must call blocks again (the recomputation of apply_block).
    """
    broken, state = [], {k: v.clone() for k, v in encoder.state_dict().items()}  # batch norm's statistics move
    embed_dim = getattr(encoder, "embed_dim", None)
    if not isinstance(embed_dim, int):
        broken.append("no int attribute embed_dim")
    if getattr(encoder, "is_checkpointed", None) is not False:
        broken.append("no bool attribute is_checkpointed, False when built")
    was_training, x = encoder.training, torch.randn(2, num_samples)
    for training in (True, False):
        encoder.train(training)
        with torch.no_grad():
            shape = tuple(encoder(x).shape)
        if shape != (2, embed_dim):
            broken.append(f"output {shape} in {'train' if training else 'eval'} mode, not (2, embed_dim)")
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in encoder.modules() if m is not encoder]
    encoder.train()
    counts = []
    for enabled in (False, True):
        calls.clear()
        set_activation_checkpointing(encoder, enabled)
        encoder(x).sum().backward()
        counts.append(len(calls))
    set_activation_checkpointing(encoder, False)
    encoder.zero_grad(set_to_none=True)
    encoder.load_state_dict(state)
    for hook in hooks:
        hook.remove()
    encoder.train(was_training)
    if counts[1] <= counts[0]:
        broken.append("checkpointing recomputes nothing: run blocks through apply_block(..., "
                      "is_checkpointed=self.is_checkpointed)")
    return broken


# ---------------------------------------------------------------- a trained encoder in one's own code

SETTINGS = ("encoder", "width", "sample_rate", "clip_samples", "hidden_dim", "projection_dim")  # what builds a model


def build_model(settings: dict) -> ContrastiveModel:
    """A ContrastiveModel (encoder and projection head) from the SETTINGS a checkpoint keeps."""
    encoder = build_encoder(settings["encoder"], settings["clip_samples"], settings["sample_rate"], settings["width"])
    return ContrastiveModel(encoder, settings["hidden_dim"], settings["projection_dim"])


def embed(model: ContrastiveModel, clips: torch.Tensor, layer: str = "encoder") -> torch.Tensor:
    """Embeddings of clips `[B, T]` -> `[B, D]`: the encoder output h, or the projection z."""
    h = model.encoder(clips)  # [B, embed_dim]
    return model.head(h) if layer == "projection" else h


class Pretrained(nn.Module):
    """A trained encoder for one's own code: any waveform in, clip embeddings out.

    Holds the ContrastiveModel of a checkpoint and the SETTINGS it was trained with
    (sample_rate in Hz, clip_samples, ...); `layer` picks the encoder output h (default) or
    the projection z; `file` and `step` say which file was read and its training step.
    Built by load_pretrained, in eval mode.
    """

    def __init__(self, model: ContrastiveModel, settings: dict, layer: str = "encoder", file: str | None = None,
                 step: int = 0):
        super().__init__()
        if layer not in ("encoder", "projection"):
            raise ValueError(f"layer must be 'encoder' or 'projection', got {layer!r}")
        self.model = model
        self.settings = {k: settings[k] for k in SETTINGS}
        self.sample_rate = settings["sample_rate"]
        self.clip_samples = settings["clip_samples"]
        self.layer = layer
        self.file = file
        self.step = step

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Args:
            clips: `[B, clip_samples]` mono waveforms at `sample_rate`.
        Returns:
            `[B, D]` embeddings h (or projections z with layer "projection").
        """
        return embed(self.model, clips, self.layer)

    @torch.no_grad()
    def embed(self, waveform, sample_rate: int, max_clips: int | None = None, batch_size: int = 64) -> torch.Tensor:
        """Embeddings of a whole recording's consecutive clips (the clips probe.py uses).

        The audio is mixed to mono, then cut and resampled to the model's rate by
        datasets.cut_clips, the function that cuts files for probing and export.
        Args:
            waveform: float tensor or numpy array, `[T]` or `[channels, T]`, any rate.
            sample_rate: its rate in Hz.
            max_clips: keep this many clips spread over the recording (None: all).
            batch_size: clips per forward pass.
        Returns:
            `[clips, D]` float32 on the CPU.
        """
        wave = torch.as_tensor(waveform).detach().to("cpu", torch.float32)
        if wave.dim() == 1:
            wave = wave[None]  # [1, T]
        if wave.dim() != 2 or wave.shape[1] == 0:
            raise ValueError(f"waveform must be [T] or [channels, T] with T > 0, got shape {tuple(wave.shape)}")
        if wave.shape[0] > wave.shape[1]:
            raise ValueError(f"waveform of shape {tuple(wave.shape)} looks like [T, channels] (as sf.read returns "
                             f"it); pass its transpose, [channels, T]")
        mono = wave.mean(0)  # [T]
        clips, _ = datasets.cut_clips(lambda start, count: mono[start:start + count], len(mono), int(sample_rate),
                                      self.clip_samples, self.sample_rate, max_clips)  # [K, clip_samples]
        device = next(self.parameters()).device
        out = [self(batch.to(device)).float().cpu() for batch in clips.split(batch_size)]
        return torch.cat(out)  # [K, D]


def load_pretrained(path: str, layer: str = "encoder", device: str | torch.device | None = None) -> Pretrained:
    """Load a checkpoint or a model file for embedding: the only file access in this module.

    Reads with weights_only=True (safety.find_checkpoint: nothing in the file can run),
    builds the encoder and projection head from the SETTINGS saved in it and loads the
    weights strictly. A model file for sharing (no optimizer state; `python export.py
    model`, or OUT/model.pt of a run) and a full checkpoint both work.
    Args:
        path: a checkpoint-STEP.pt or model file, or a run folder (its latest loadable file).
        layer: "encoder" (h, the default) or "projection" (z).
        device: where the model runs (default: the GPU when there is one, else the CPU).
    Returns:
        a Pretrained in eval mode; `model.embed(waveform, sample_rate)` -> `[clips, D]`.
    """
    # A folder's newest loadable checkpoint; a broken file is a safety.CheckpointError naming it.
    found, state = safety.find_checkpoint(path)
    if state is None:
        raise safety.CheckpointError(f"{path}: no checkpoint or model file in this folder loads; give a "
                                     f"checkpoint-*.pt or model file, or a run folder of train.py")
    model = build_model(state["args"])
    safety.load_weights(model, state["model"], found)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    return Pretrained(model, state["args"], layer, found, int(state["step"])).to(device).eval()


# ---------------------------------------------------------------- size and cost

COUNTED_LAYERS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.Linear)


def layer_macs(layer: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a conv, transposed conv or linear layer.

    A convolution does (C_in / groups) * prod(kernel) per output element; a transposed
    convolution scatters each input element into (C_out / groups) * prod(kernel)
    outputs; a linear layer does in_features per output element. Biases, batch norm,
    activations and pooling are not counted.

    Args:
        layer: the layer.
        inputs: its input `[B, ...]`.
        output: its output `[B, ...]`.
    Returns:
        MACs for the whole batch.
    """
    if isinstance(layer, nn.ConvTranspose1d):
        return inputs.numel() * (layer.out_channels // layer.groups) * math.prod(layer.kernel_size)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return output.numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
    if isinstance(layer, nn.Linear):
        return output.numel() * layer.in_features
    raise TypeError(f"no MAC rule for {type(layer).__name__}")


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates per example of `model(x)`, counted with forward hooks on
    every Conv1d, Conv2d, ConvTranspose1d and Linear layer.

    Runs one forward pass in eval mode without gradients (so batch norm accepts a batch
    of one and no running statistics change), then restores the training flag. A mel
    front end's FFT is not counted.

    Args:
        model: the model.
        x: an input batch `[B, ...]`.
    Returns:
        total MACs divided by B.
    """
    total = 0

    def hook(layer, inputs, output):
        nonlocal total
        total += layer_macs(layer, inputs[0], output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, COUNTED_LAYERS)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total // x.shape[0]


def parse_args() -> argparse.Namespace:
    """Flags of the size table."""
    parser = argparse.ArgumentParser(description="Parameters and multiply-accumulates per clip of each encoder.",
                                     allow_abbrev=False)
    parser.add_argument("--clip-seconds", type=float, default=2.7, help="clip length in seconds (paper: 2.7)")
    parser.add_argument("--sample-rate", type=int, default=22_050, help="sample rate in Hz (paper: 22050)")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (1 = the paper's size)")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse_args()
    num_samples = round(args.clip_seconds * args.sample_rate)
    print(f"clip: {num_samples} samples at {args.sample_rate} Hz, width {args.width}\n")
    print("| encoder | parameters | MACs per clip | embedding |")
    print("|---|---:|---:|---:|")
    for name in ENCODERS:
        encoder = build_encoder(name, num_samples, args.sample_rate, args.width)
        parameters = sum(p.numel() for p in encoder.parameters())
        macs = count_macs(encoder, torch.zeros(1, num_samples))
        print(f"| {name} | {parameters:,} | {macs / 1e6:,.1f} M | {encoder.embed_dim} |")
    print("\nMACs count Conv1d, Conv2d, ConvTranspose1d and Linear layers only (not batch norm, pooling or the mel FFT).")
