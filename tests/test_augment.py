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


# ---------------------------------------------------------------------------------------
# What each transform does, called with known parameters
# ---------------------------------------------------------------------------------------
def level_db(x):
    """RMS level of each example in dB: `[B, T]` -> `[B]`."""
    return 20 * torch.log10(augment.rms(x))


def peak_frequency(x):
    """Frequency (Hz) of the strongest spectral peak of each example, 0.1 Hz resolution."""
    length = x.shape[-1]
    spectrum = torch.fft.rfft(x * torch.hann_window(length), n=SAMPLE_RATE * 10).abs()
    return spectrum.argmax(-1).float() / 10


def test_gain_changes_rms_by_the_drawn_decibels():
    x = music_like()
    setting = augment.SEVERITY_TABLE["gain"](1.0)
    params = augment.sample_gain(4, LENGTH, setting, augment.Draw(torch.Generator().manual_seed(0), "cpu"), SAMPLE_RATE)
    low, high = setting["gain_db"]
    assert ((params["gain_db"] >= low) & (params["gain_db"] <= high)).all()
    y = augment.gain(x, **params)
    assert torch.allclose(level_db(y) - level_db(x), params["gain_db"], atol=1e-3)


def test_polarity_negates():
    x = music_like()
    assert torch.equal(augment.polarity(x), -x)


def test_noise_meets_the_drawn_snr_and_colour():
    x = music_like()
    draw = augment.Draw(torch.Generator().manual_seed(0), "cpu")
    params = augment.sample_noise(4, LENGTH, augment.SEVERITY_TABLE["noise"](1.0), draw, SAMPLE_RATE)
    y = augment.noise(x, **params)
    snr = level_db(x) - level_db(y - x)
    assert (snr - params["snr_db"]).abs().max() < 0.5
    # Brown noise (decay 2) puts more energy below 500 Hz than violet noise (decay -2).
    silence_free = torch.ones(2, LENGTH) * 0.1
    colored = augment.noise(silence_free, torch.zeros(2), torch.tensor([2.0, -2.0]), params["white"][:2]) - 0.1
    spectrum = torch.fft.rfft(colored).abs().pow(2)
    low_share = spectrum[:, : 500 * LENGTH // SAMPLE_RATE].sum(-1) / spectrum.sum(-1)
    assert low_share[0] > 0.5 > low_share[1]


@pytest.mark.parametrize(
    "kind, frequency, bandwidth, passed, stopped",
    [
        ("low_pass", 1000.0, 1.0, [250.0], [4000.0]),
        ("high_pass", 1000.0, 1.0, [4000.0], [250.0]),
        ("band_pass", 1000.0, 0.5, [1000.0], [150.0, 6000.0]),
        ("band_stop", 1000.0, 1.0, [150.0, 6000.0], [1000.0]),
    ],
)
def test_filters_pass_and_stop(kind, frequency, bandwidth, passed, stopped):
    def gain_for(tone):
        x = sine(tone)
        y = augment.band_filter(
            x,
            torch.tensor([augment.FILTER_KINDS.index(kind)]),
            torch.tensor([frequency]),
            torch.tensor([bandwidth]),
            SAMPLE_RATE,
        )
        middle = slice(LENGTH // 4, 3 * LENGTH // 4)  # away from the clip's abrupt ends
        return float(level_db(y[:, middle]) - level_db(x[:, middle]))

    for tone in passed:
        assert abs(gain_for(tone)) < 1.0, tone
    for tone in stopped:
        assert gain_for(tone) < -20.0, tone


def test_pitch_shift_moves_the_peak_and_keeps_length():
    semitones = torch.tensor([-4.0, -1.0, 2.0, 4.0])
    x = sine(440.0, length=2 * LENGTH, batch=4)
    y = augment.pitch(x, semitones)
    assert y.shape == x.shape
    expected = 440.0 * torch.pow(2.0, semitones / 12)
    assert ((peak_frequency(y) / expected - 1).abs() < 0.01).all()
    assert ((level_db(y) - level_db(x)).abs() < 1.0).all()  # grains add in phase


def test_time_stretch_keeps_pitch_and_length_and_moves_onsets():
    rate = torch.tensor([0.8, 1.25])
    length = 2 * LENGTH
    x = sine(440.0, length=length, batch=2)
    onset = length // 2
    x[:, :onset] = 0  # the tone starts halfway through
    y = augment.stretch(x, rate)
    assert y.shape == x.shape
    # rate 0.8: the onset moves beyond the end; rate 1.25: it comes earlier.
    assert ((peak_frequency(y[1:]) / 440.0 - 1).abs() < 0.01).all()
    loud = y[1].abs() > 0.1
    first_loud = int(torch.nonzero(loud)[0])
    assert abs(first_loud - onset / 1.25) < augment.WSOLA_GRAIN
    z = augment.stretch(sine(440.0, length=length, batch=2), rate)
    assert ((peak_frequency(z[:, : length // 2]) / 440.0 - 1).abs() < 0.01).all()


def test_delay_puts_an_echo_at_the_lag():
    x = 0.3 * torch.randn(2, LENGTH, generator=torch.Generator().manual_seed(0))
    lag = torch.tensor([1500, 4000])
    y = augment.delay(x, lag, volume=torch.full((2,), 0.5), repeats=1, attenuation=torch.ones(2))
    echo = y - x
    correlation = torch.fft.irfft(torch.fft.rfft(echo, n=2 * LENGTH) * torch.fft.rfft(x, n=2 * LENGTH).conj())
    assert torch.equal(correlation[:, :LENGTH].argmax(-1), lag)


def test_reverse_reverses():
    x = music_like()
    assert torch.equal(augment.reverse(x), x.flip(-1))


def test_bitcrush_has_at_most_two_to_the_bits_levels():
    x = music_like(batch=3) * 2  # some samples clip at full scale
    bits = torch.tensor([2, 4, 6])
    y = augment.bitcrush(x, bits)
    for row, b in zip(y, bits.tolist()):
        assert 1 < torch.unique(row).numel() <= 2**b
    assert y.abs().max() <= 1


def test_splice_removes_the_gaps_and_pads_silence():
    x = 0.5 + 0.1 * torch.rand(1, LENGTH, generator=torch.Generator().manual_seed(0))  # never silent
    gap_start = torch.tensor([[1000, 5000]])
    gap_length = torch.tensor([[300, 700]])
    y = augment.splice(x, gap_start, gap_length, fade=50)
    silent = (y[0] == 0).nonzero().squeeze(1)
    assert silent.numel() >= 1000 and bool((y[0, LENGTH - 1000 :] == 0).all())
    assert bool((y[0, : LENGTH - 1000] != 0).sum() >= LENGTH - 1000 - 4)
    # Samples after the first gap moved 300 earlier (away from fades).
    assert torch.equal(y[0, 2000:3000], x[0, 2300:3300])


def test_reverb_adds_a_decaying_tail():
    x = torch.zeros(1, 2 * LENGTH)
    x[0, 100] = 1.0
    draw = augment.Draw(torch.Generator().manual_seed(0), "cpu")
    setting = {"rt60_s": (1.0, 1.0), "wet": (1.0, 1.0)}
    y = augment.reverb(x, **augment.sample_reverb(1, 2 * LENGTH, setting, draw, SAMPLE_RATE))
    early = level_db(y[:, 2000:4000])
    late = level_db(y[:, 2000 + SAMPLE_RATE // 2 : 4000 + SAMPLE_RATE // 2])
    assert torch.isfinite(early).all() and (early - late > 15).all()  # decays, over half an RT60


def test_chorus_without_swing_is_a_seven_millisecond_voice():
    x = 0.3 * torch.randn(1, LENGTH, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(1)
    rate = 20000  # 7 ms is a whole number of samples at this rate
    y = augment.chorus(x, rate_hz=ones, depth=torch.zeros(1), mix=ones, phase=torch.zeros(1), sample_rate=rate)
    lag = round(augment.CHORUS_CENTRE_MS * rate / 1000)
    assert torch.allclose(y[:, lag:], 0.5 * x[:, lag:] + 0.5 * x[:, :-lag], atol=1e-5)
    swinging = augment.chorus(x, rate_hz=5 * ones, depth=ones, mix=ones, phase=torch.zeros(1), sample_rate=rate)
    assert not torch.allclose(swinging, y, atol=0.02)


def test_distortion_adds_odd_harmonics():
    x = sine(441.0, length=SAMPLE_RATE)
    y = augment.distortion(x, torch.tensor([9.0]))
    spectrum = torch.fft.rfft(y).abs()
    assert spectrum[0, 3 * 441] > 0.05 * spectrum[0, 441]
    assert spectrum[0, 2 * 441] < 1e-3 * spectrum[0, 441]
    assert y.abs().max() <= 1


def test_compressor_reduces_loud_parts_by_the_ratio():
    x = torch.cat([sine(440.0, amplitude=0.005), sine(440.0, amplitude=0.5)], dim=1)  # -49 dB then -9 dB RMS
    y = augment.compress(x, torch.tensor([-30.0]), torch.tensor([4.0]), 5.0, 50.0, SAMPLE_RATE)
    quiet, loud = slice(2000, 9000), slice(LENGTH + 4000, 2 * LENGTH - 2000)
    assert abs(float(level_db(y[:, quiet]) - level_db(x[:, quiet]))) < 0.5
    expected = (-30.0 - float(level_db(x[:, loud]))) * (1 - 1 / 4)
    assert abs(float(level_db(y[:, loud]) - level_db(x[:, loud])) - expected) < 1.0


def test_codec_band_limits_and_quantizes():
    x = 0.3 * torch.randn(2, LENGTH, generator=torch.Generator().manual_seed(0))
    y = augment.codec(x, torch.tensor([4000.0, 4000.0]), torch.tensor([30.0, 6.0]), SAMPLE_RATE)
    spectrum = torch.fft.rfft(y).abs().pow(2)
    edge = 4000 * LENGTH // SAMPLE_RATE
    above = spectrum[:, edge + 60 :].mean(-1) / spectrum[:, : edge - 60].mean(-1)
    assert (above < 1e-3).all()
    # Error in the kept band, relative to the band: about the asked SNR.
    band_limited = augment.codec(x, torch.tensor([4000.0, 4000.0]), torch.tensor([200.0, 200.0]), SAMPLE_RATE)
    snr = level_db(band_limited) - level_db(y - band_limited)
    assert abs(float(snr[0]) - 30.0) < 3.0 and abs(float(snr[1]) - 6.0) < 3.0


# ---------------------------------------------------------------------------------------
# Through the chain, every transform
# ---------------------------------------------------------------------------------------
def single_chain(name, p, severity=1.0):
    """A chain of one transform that always reaches it and applies it with probability p."""
    chain = augment.build_chain([name], severity=severity, sample_rate=SAMPLE_RATE)
    chain.probability = 1.0
    chain.settings[name]["p"] = p
    return chain


@pytest.mark.parametrize("name", augment.TRANSFORM_NAMES)
def test_probability_zero_is_identity_and_one_always_changes(name):
    x = music_like(batch=4, length=8000)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(single_chain(name, 0.0)(x, generator), x)
    y = single_chain(name, 1.0)(x, generator)
    assert all(not torch.equal(a, b) for a, b in zip(y, x))


@pytest.mark.parametrize("name", augment.TRANSFORM_NAMES)
def test_silence_and_full_scale_noise_stay_finite_and_bounded(name):
    generator = torch.Generator().manual_seed(0)
    silence = torch.zeros(2, 8000)
    loud = (2 * torch.rand(2, 8000, generator=generator) - 1).sign()  # full-scale noise
    chain = single_chain(name, 1.0, severity=2.5)
    for x in (silence, loud):
        y = chain(x, generator)
        assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_transform_keeps_shape_and_dtype(dtype):
    x = music_like(batch=2, length=8000).to(dtype)
    for name in augment.TRANSFORM_NAMES:
        y = single_chain(name, 1.0)(x, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and y.dtype == dtype, name


def test_generator_on_another_device_than_the_batch_is_reproducible():
    x = music_like(batch=4)
    chain = augment.build_chain(list(augment.TRANSFORM_NAMES), severity=1.0, sample_rate=SAMPLE_RATE)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    first = chain(x.to(device), torch.Generator().manual_seed(5)).cpu()
    second = chain(x.to(device), torch.Generator().manual_seed(5)).cpu()
    assert torch.equal(first, second)


def test_chain_applies_with_the_severity_probability():
    x = music_like(batch=400, length=2000)
    chain = augment.build_chain(["polarity"], severity=0.5, sample_rate=SAMPLE_RATE)
    y = chain(x, torch.Generator().manual_seed(0))
    changed = (y != x).any(-1).float().mean()
    expected = min(1, 0.8 * 0.5) * min(0.8, 0.6 * 0.5)  # chain probability times transform probability
    assert abs(float(changed) - expected) < 0.06


@pytest.mark.parametrize("length", [1, 64, 1000])
def test_every_transform_handles_clips_shorter_than_its_frames(length):
    x = 0.5 * torch.rand(3, length, generator=torch.Generator().manual_seed(0)) - 0.25
    for name in augment.TRANSFORM_NAMES:
        y = single_chain(name, 1.0, severity=2.5)(x, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and torch.isfinite(y).all() and y.abs().max() <= 1, name
