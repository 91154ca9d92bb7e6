"""Tests for augment.py: the chain's contract and what each transform does to audio."""

import math

import pytest
import torch

import augment

SAMPLE_RATE = 22050
LENGTH = 11025


def sine(frequency, length=LENGTH, amplitude=0.5, batch=1):
    """`[batch, length]` sine at `frequency` Hz."""
    t = torch.arange(length) / SAMPLE_RATE
    return (amplitude * torch.sin(2 * math.pi * frequency * t)).repeat(batch, 1)


def music_like(batch=4, length=LENGTH, seed=0):
    """`[batch, length]` harmonic tones plus a little noise, peak below 1."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(length) / SAMPLE_RATE
    f0 = 110 * 2 ** (torch.randint(0, 24, (batch, 1), generator=generator) / 12)
    x = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 6))
    x = x + 0.05 * torch.randn(batch, length, generator=generator)
    return 0.5 * x / x.abs().amax(-1, keepdim=True)


def test_parse_augment():
    assert augment.parse_augment("gain,noise") == ["gain", "noise"]
    assert augment.parse_augment("none") == []
    assert augment.parse_augment("") == []
    with pytest.raises(ValueError, match="gain"):
        augment.parse_augment("gain,wobble")


def test_default_chain_is_the_papers():
    assert augment.DEFAULT_AUGMENT == ("gain", "polarity", "noise", "filter", "pitch", "delay")
    assert set(augment.DEFAULT_AUGMENT) <= set(augment.TRANSFORM_NAMES)
    assert augment.LABEL_CHANGES["pitch"] == {"pitch", "pitch_class", "key"}
    assert set(augment.SEVERITY_TABLE) == set(augment.TRANSFORM_NAMES)


def test_severity_zero_and_empty_chain_are_identity():
    x = music_like()
    assert augment.build_chain(list(augment.DEFAULT_AUGMENT), severity=0.0)(x) is x
    assert augment.build_chain([], severity=1.0)(x) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chain_keeps_shape_and_dtype_and_bounds(dtype):
    x = music_like(batch=6).to(dtype)
    chain = augment.build_chain(list(augment.DEFAULT_AUGMENT), severity=2.5, sample_rate=SAMPLE_RATE)
    y = chain(x, torch.Generator().manual_seed(1))
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y.float()).all() and y.float().abs().max() <= 1
    assert not torch.equal(y, x)


def test_same_seed_same_output():
    x = music_like(batch=6)
    chain = augment.build_chain(list(augment.DEFAULT_AUGMENT), severity=1.0, sample_rate=SAMPLE_RATE)
    first = chain(x, torch.Generator().manual_seed(3))
    second = chain(x, torch.Generator().manual_seed(3))
    third = chain(x, torch.Generator().manual_seed(4))
    assert torch.equal(first, second)
    assert not torch.equal(first, third)
