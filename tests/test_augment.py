"""Tests for augment.py: the chain's contract and what each transform does to audio."""

import math
from fractions import Fraction

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
        ("band_pass", 1000.0, 1.0, [1000.0], [150.0, 6000.0]),  # edges 500 and 1,500 Hz
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
    y = augment.delay(x, lag, volume=torch.full((2,), 0.5), repeats=2, attenuation=torch.ones(2))
    echo = y - 0.75 * x  # (x + 0.5·(x + x(t - lag))) / 2: the direct path is 0.75·x
    correlation = torch.fft.irfft(torch.fft.rfft(echo, n=2 * LENGTH) * torch.fft.rfft(x, n=2 * LENGTH).conj())
    assert torch.equal(correlation[:, :LENGTH].argmax(-1), lag)


def authors_delay(x, lag, volume, repeats, attenuation):
    """The authors' Delay written as they wrote it, one example at a time: copies of the
    clip delayed by i·lag, i = 0 .. repeats - 1, attenuated by attenuation^i, summed,
    scaled by volume and added to the clip, all halved."""
    out = torch.empty_like(x)
    for b in range(len(x)):
        length, d, r = x.shape[-1], int(lag[b]), int(repeats[b])
        delayed = torch.zeros(length + max(r, 0) * d)
        for i in range(r):
            delayed[i * d : i * d + length] += x[b] * float(attenuation[b]) ** i
        out[b] = (x[b] + float(volume[b]) * delayed[:length]) / 2
    return out


def test_delay_matches_the_authors_formula():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3000, generator=generator)
    lag = torch.tensor([1, 700, 1500, 2999, 3000, 5000])  # the last two: every delayed copy falls outside
    repeats = torch.tensor([3, 0, 1, 2, 3, 5])
    volume = torch.tensor([0.7, 0.3, 0.3, 1.2, 0.7, 0.5])
    attenuation = torch.tensor([0.7, 0.3, 0.7, 1.2, 0.3, 0.5])
    expected = authors_delay(x, lag, volume, repeats, attenuation)
    assert torch.allclose(augment.delay(x, lag, volume, repeats, attenuation), expected, atol=1e-5)
    # One repeat is only a gain of (1 + v) / 2; no repeat halves the clip.
    assert torch.allclose(expected[2], 0.65 * x[2]) and torch.allclose(expected[1], 0.5 * x[1])


def test_delay_output_is_the_authors_bit_for_bit():
    # Equal parameters give equal float32 outputs: same weights (a^i rounded once), same
    # order of sums, so exact-valued measurements (an echo's level) match the authors'.
    x = torch.randn(64, 4000, generator=torch.Generator().manual_seed(2))
    for severity in (0.5, 1.0, 2.0):
        draw = augment.Draw(torch.Generator().manual_seed(3), "cpu")
        params = augment.sample_delay(64, 4000, augment.SEVERITY_TABLE["delay"](severity), draw, 8000)
        assert torch.equal(augment.delay(x, **params), authors_delay(x, **params)), severity


@pytest.mark.parametrize("severity", [0.5, 1.0, 2.0])
def test_delay_parameters_are_the_authors_draws(severity):
    n = 4000
    setting = augment.SEVERITY_TABLE["delay"](severity)
    params = augment.sample_delay(n, LENGTH, setting, augment.Draw(torch.Generator().manual_seed(1), "cpu"), SAMPLE_RATE)
    centres = {"volume": 0.5 * severity, "repeats": int(2 * severity), "attenuation": min(1.0, 0.5 * severity)}
    steps = {"volume": 0.2, "repeats": 1, "attenuation": 0.2}
    for name, centre in centres.items():
        values = params[name].double()
        low, high = centre - steps[name], centre + steps[name]
        assert bool(((values - low).abs() < 1e-6).logical_or((values - high).abs() < 1e-6).all()), name
        assert set(params[name].tolist()) == {low, high}, name  # exactly the authors' Python values
        assert abs(float((values > centre).double().mean()) - 0.5) < 0.03, name  # each side half the time
    lag = params["lag"]
    low, high = int(100 / severity * SAMPLE_RATE / 1000), int(500 * SAMPLE_RATE / 1000)  # whole samples, inclusive
    assert lag.dtype == torch.int64 and int(lag.min()) >= low and int(lag.max()) <= high
    assert abs(float(lag.double().mean()) - (low + high) / 2) < 0.02 * (high - low)


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


# ---------------------------------------------------------------------------------------
# Distributions against the authors' chain (torch-audiomentations 0.12 and their Delay)
# ---------------------------------------------------------------------------------------
def authors_colored_noise(x, snr_db, decay, white):
    """torch-audiomentations 0.12's colored noise, one example at a time: a second of
    white noise, spectrum divided by linspace(1, sqrt(sr / 2))^decay, unit RMS, tiled."""
    out = torch.empty_like(x)
    for b in range(len(x)):
        spectrum = torch.fft.rfft(white[b])
        spectrum = spectrum / torch.linspace(1, (white.shape[-1] / 2) ** 0.5, len(spectrum)) ** float(decay[b])
        noise = torch.fft.irfft(spectrum)
        noise = noise / (noise.square().mean().sqrt() + 1e-8)
        noise = torch.cat([noise] * math.ceil(x.shape[-1] / len(noise)))[: x.shape[-1]]
        level = x[b].square().mean().sqrt() / 10 ** (float(snr_db[b]) / 20)
        out[b] = x[b] + level * noise
    return out


def octave_slope_db(x, low_hz=125.0, high_hz=8000.0):
    """Least-squares slope (dB per octave) of each row's power spectral density, averaged
    in third-octave bands (white noise: 0)."""
    power = torch.fft.rfft(x.double()).abs().pow(2)
    frequency = torch.fft.rfftfreq(x.shape[-1], 1 / SAMPLE_RATE)
    edges = low_hz * 2 ** (torch.arange(3 * 6 + 1) / 3)  # 125 Hz ... 8 kHz
    centres = torch.log2(torch.sqrt(edges[:-1] * edges[1:]))
    levels = torch.stack([10 * torch.log10(power[:, (frequency >= a) & (frequency < b)].mean(-1))
                          for a, b in zip(edges[:-1], edges[1:])], -1)
    c = centres - centres.mean()
    return ((levels - levels.mean(-1, keepdim=True)) * c).sum(-1) / c.pow(2).sum()


def test_colored_noise_is_torch_audiomentations_noise():
    x = music_like(batch=4, length=3 * SAMPLE_RATE // 2)  # 1.5 s: the noise second repeats
    draw = augment.Draw(torch.Generator().manual_seed(0), "cpu")
    params = augment.sample_noise(4, x.shape[-1], augment.SEVERITY_TABLE["noise"](1.0), draw, SAMPLE_RATE)
    assert params["white"].shape == (4, SAMPLE_RATE)
    expected = authors_colored_noise(x, params["snr_db"], params["decay"], params["white"])
    assert torch.allclose(augment.noise(x, **params), expected, atol=1e-5)


def test_colored_noise_slope_is_about_minus_5_2_db_per_octave_per_unit_decay():
    white = torch.randn(8, SAMPLE_RATE, generator=torch.Generator().manual_seed(0))
    quiet = torch.full((8, 4 * SAMPLE_RATE), 0.1)
    decay = torch.tensor([1.0] * 4 + [-1.0] * 4)
    slope = octave_slope_db(augment.noise(quiet, torch.zeros(8), decay, white) - quiet)  # [8]
    assert ((slope[:4] + 5.2).abs() < 0.4).all() and ((slope[4:] - 5.2).abs() < 0.4).all()
    # The old 1/f^decay power law would give -3.0 dB per octave per unit decay.


def test_filter_frequencies_are_uniform_on_the_mel_scale():
    n = 20000
    setting = augment.SEVERITY_TABLE["filter"](1.0)
    draw = augment.Draw(torch.Generator().manual_seed(0), "cpu")
    quantiles = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    for kind, band in ((0, "band_centre_hz"), (2, "high_pass_hz"), (3, "low_pass_hz")):
        params = augment.sample_filter(n, LENGTH, setting, draw, SAMPLE_RATE, kind=torch.full((n,), kind))
        low, high = augment.hz_to_mels(setting[band][0]), augment.hz_to_mels(setting[band][1])
        mels = (augment.hz_to_mels(params["frequency_hz"].double()) - low) / (high - low)  # uniform on [0, 1]
        assert ((torch.quantile(mels, quantiles) - quantiles).abs() < 0.015).all(), band
    fraction = (params["bandwidth"].double() - 0.5) / (1.99 - 0.5)
    assert ((torch.quantile(fraction, quantiles) - quantiles).abs() < 0.015).all()


def test_band_edges_are_at_f0_times_one_minus_and_plus_half_the_bandwidth():
    sample_rate, bins = 16000, 8001  # 1 Hz grid
    f0, bandwidth = torch.tensor([1000.0, 1000.0, 1000.0, 1000.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])
    response = augment.filter_response(torch.arange(4), f0, bandwidth, bins, sample_rate)
    assert torch.allclose(response[0, [500, 1500]], torch.tensor(0.5), atol=0.01)  # band-pass, -6 dB edges
    assert torch.allclose(response[1, [500, 1500]], torch.tensor(0.5), atol=0.01)  # band-stop
    assert torch.allclose(response[2:, 1000], torch.tensor(0.5))  # high- and low-pass cut-offs
    assert float(response[0, 1000]) > 0.95 and float(response[1, 1000]) < 0.05
    assert torch.allclose(response[0] + response[1], torch.ones(bins)) and torch.allclose(response[2] + response[3], torch.ones(bins))


def test_fast_pitch_shifts_are_torch_pitch_shifts():
    shifts = augment.fast_pitch_shifts(22050, -4.0, 4.0)
    magnitudes = [0.35, 1.19, 1.47, 1.82, 2.67, 3.02, 3.16]  # torch-pitch-shift 1.2.5 at 22,050 Hz
    assert [round(s, 2) for s in shifts] == [-m for m in reversed(magnitudes)] + magnitudes
    assert [round(s, 3) for s in augment.fast_pitch_shifts(16000, -4.0, 4.0)] == [-3.863, -0.411, 0.411, 3.863]
    # Each is a ratio of two divisors of the rate.
    for s in shifts:
        ratio = Fraction(2 ** (s / 12)).limit_denominator(22050)
        assert 22050 % ratio.numerator == 0 and 22050 % ratio.denominator == 0


def test_pitch_shifts_are_drawn_uniformly_among_the_fast_set_or_continuously():
    n = 14000
    setting = dict(augment.SEVERITY_TABLE["pitch"](1.0))
    draw = augment.Draw(torch.Generator().manual_seed(0), "cpu")
    fast = augment.sample_pitch(n, LENGTH, setting, draw, SAMPLE_RATE)["semitones"]
    values, counts = torch.unique(fast, return_counts=True)
    assert values.numel() == 14 and (counts.double() / n - 1 / 14).abs().max() < 0.012
    setting["shifts"] = "continuous"
    continuous = augment.sample_pitch(n, LENGTH, setting, draw, SAMPLE_RATE)["semitones"]
    assert torch.equal(continuous, torch.round(continuous * 4) / 4) and continuous.abs().max() <= 4
    assert abs(float((continuous.abs() > 3.25).double().mean()) - 0.625 / 4) < 0.02  # raw draws beyond 3.375; none in the fast set
    with pytest.raises(ValueError, match="pitch_shifts"):
        augment.build_chain(["pitch"], pitch_shifts="semitones")


def test_fast_pitch_shift_moves_the_peak_by_the_drawn_ratio():
    semitones = torch.tensor(augment.fast_pitch_shifts(SAMPLE_RATE, -4.0, 4.0)[::3])
    x = sine(440.0, length=2 * LENGTH, batch=len(semitones))
    y = augment.pitch(x, semitones)
    assert ((peak_frequency(y) / (440.0 * torch.pow(2.0, semitones / 12)) - 1).abs() < 0.005).all()


def test_the_chain_is_decided_once_per_clip_and_each_transform_per_view():
    clips = 2000
    x = music_like(batch=2 * clips, length=256)
    chain = augment.build_chain(["polarity"], severity=1.0, sample_rate=SAMPLE_RATE)
    chain.settings["polarity"]["p"] = 1.0
    y = chain(x, torch.Generator().manual_seed(0), views=2)
    changed = (y != x).any(-1).view(clips, 2)
    assert torch.equal(changed[:, 0], changed[:, 1])  # both views of a clip, or neither
    assert abs(float(changed[:, 0].double().mean()) - 0.8) < 0.03
    chain.probability, chain.settings["polarity"]["p"] = 1.0, 0.5
    changed = (chain(x, torch.Generator().manual_seed(1), views=2) != x).any(-1).view(clips, 2)
    assert abs(float((changed.sum(-1) == 1).double().mean()) - 0.5) < 0.03  # independent per view
    with pytest.raises(ValueError, match="views"):
        chain(x[:3], views=2)
    # The same clips given by id, views of a clip far apart: the same per-clip decision.
    chain.probability, chain.settings["polarity"]["p"] = 0.5, 1.0
    order = torch.randperm(2 * clips, generator=torch.Generator().manual_seed(2))
    clip_ids = (torch.arange(2 * clips) // 2)[order]
    changed = (chain(x[order], torch.Generator().manual_seed(3), clip_ids=clip_ids) != x[order]).any(-1)
    per_clip = torch.zeros(clips, 2, dtype=torch.long).index_add_(0, clip_ids, torch.stack([changed, ~changed], 1).long())
    assert bool((per_clip.max(-1).values == 2).all()) and abs(float(per_clip[:, 0].eq(2).double().mean()) - 0.5) < 0.03


def test_default_chain_untouched_views_per_clip_are_the_authors():
    clips = 3000
    x = music_like(batch=2 * clips, length=64, seed=1)
    # A low rate keeps the noise transform's second of white noise small; 2 kHz has fast pitch shifts (±3.86).
    chain = augment.build_chain(list(augment.DEFAULT_AUGMENT), severity=1.0, sample_rate=2000)
    untouched = (chain(x, torch.Generator().manual_seed(0), views=2) == x).all(-1).view(clips, 2)
    # Untouched views: the chain off for the clip (0.2), or on and every transform skipped.
    skipped = 0.6 * 0.4 * 0.4 * 0.7 * 0.4 * 0.4
    both = 0.2 + 0.8 * skipped**2
    one = 0.8 * 2 * skipped * (1 - skipped)
    assert abs(float(untouched.all(-1).double().mean()) - both) < 0.025
    assert abs(float((untouched.sum(-1) == 1).double().mean()) - one) < 0.01


def test_the_filter_type_is_drawn_once_per_clip():
    clips = 2000
    x = music_like(batch=2 * clips, length=256)
    chain = augment.build_chain(["filter"], severity=1.0, sample_rate=2000)  # small FFTs
    chain.probability, chain.settings["filter"]["p"] = 1.0, 1.0
    record = {}
    chain(x, torch.Generator().manual_seed(0), views=2, record=record)
    kind = torch.full((2 * clips,), -1)
    kind[record["filter"]["index"]] = record["filter"]["kind"]
    kind = kind.view(clips, 2)
    assert torch.equal(kind[:, 0], kind[:, 1])
    shares = torch.bincount(kind[:, 0], minlength=4).double() / clips
    assert (shares - 0.25).abs().max() < 0.03


def test_chain_applies_each_transform_to_its_recorded_rows():
    x = music_like(batch=12, length=4000)
    chain = augment.build_chain(list(augment.DEFAULT_AUGMENT), severity=1.5, sample_rate=SAMPLE_RATE)
    record = {}
    y = chain(x, torch.Generator().manual_seed(2), views=2, record=record)
    expected = x.clone()
    for name in chain.names:
        if name in record:
            params = {k: v for k, v in record[name].items() if k != "index"}
            rows = record[name]["index"]
            transform = augment.TRANSFORMS[name][0]
            expected[rows] = transform(expected[rows], **params)
    assert len(record) >= 4 and torch.allclose(y, augment.peak_guard(expected), atol=1e-6)


def test_a_device_generator_gives_a_new_host_seed_each_call():
    generator = torch.Generator().manual_seed(0)
    # A CPU generator is used directly; a state restored replays the same draws.
    state = generator.get_state()
    first = augment.Draw(generator, "cpu").uniform(0, 1, 4)
    generator.set_state(state)
    assert torch.equal(augment.Draw(generator, "cpu").uniform(0, 1, 4), first)
    if torch.cuda.is_available():
        device_generator = torch.Generator(device="cuda").manual_seed(0)
        state = device_generator.get_state()
        a = augment.Draw(device_generator, "cuda").uniform(0, 1, 4)
        b = augment.Draw(device_generator, "cuda").uniform(0, 1, 4)
        device_generator.set_state(state)
        assert not torch.equal(a, b) and torch.equal(augment.Draw(device_generator, "cuda").uniform(0, 1, 4), a)


@pytest.mark.parametrize("names", [list(augment.DEFAULT_AUGMENT)] + [[name] for name in augment.TRANSFORM_NAMES if name != "codec"])
def test_the_chain_never_reads_values_from_the_device(names):
    # A meta tensor has a shape but no values: any host read of device data (.item(),
    # nonzero, .tolist(), a data-dependent size), i.e. any host-device sync on a GPU,
    # raises here. codec is left out: torch.istft checks its window's overlap on the host.
    x = torch.zeros(8, 4000, device="meta")
    chain = augment.build_chain(names, severity=2.0, sample_rate=SAMPLE_RATE)
    chain.probability = 1.0
    for name in names:
        chain.settings[name]["p"] = 1.0
    y = chain(x, None, views=2)
    assert y.shape == x.shape and y.device.type == "meta"


@pytest.mark.parametrize("severity", [0.5, 1.0, 2.0])
def test_gain_and_noise_parameters_are_uniform_in_the_authors_ranges(severity):
    n = 8000
    draw = augment.Draw(torch.Generator().manual_seed(3), "cpu")
    quantiles = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    gain = augment.sample_gain(n, 64, augment.SEVERITY_TABLE["gain"](severity), draw, 1000)["gain_db"]
    noise = augment.sample_noise(n, 64, augment.SEVERITY_TABLE["noise"](severity), draw, 1000)
    for values, low, high in ((gain, -15 * severity, 5 * severity), (noise["snr_db"], 3 / severity, 30 / severity),
                              (noise["decay"], -2 * severity, 2 * severity)):
        unit = (values.double() - low) / (high - low)
        assert ((torch.quantile(unit, quantiles) - quantiles).abs() < 0.02).all()
    setting = augment.SEVERITY_TABLE
    assert setting["gain"](severity)["p"] == min(0.7, 0.4 * severity) and setting["polarity"](severity)["p"] == min(0.8, 0.6 * severity)
    assert setting["noise"](severity)["p"] == min(0.8, 0.6 * severity) and setting["filter"](severity)["p"] == min(0.6, 0.3 * severity)
    assert setting["pitch"](severity)["p"] == min(0.75, 0.6 * severity) and setting["delay"](severity)["p"] == min(0.6, 0.6 * severity)


# ---------------------------------------------------------------------------------------
# The issue-20 checks: two-sample KS tests of our draws and outputs against the authors'
# sampling re-implemented here from torch-audiomentations 0.12 and torch-pitch-shift 1.2.5
# as documented and published (not imported: neither is a dependency). bench.py
# compare-augment runs the same checks against the installed libraries.
# ---------------------------------------------------------------------------------------
def ks_p_value(a, b):
    """Two-sample KS p-value (asymptotic, with Stephens' correction), ties compared exactly."""
    a, b = torch.sort(a.double()).values, torch.sort(b.double()).values
    points = torch.cat([a, b])
    d = float((torch.searchsorted(a, points, right=True) / len(a)
               - torch.searchsorted(b, points, right=True) / len(b)).abs().max())
    n = len(a) * len(b) / (len(a) + len(b))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 0.2:
        return 1.0
    return min(1.0, max(0.0, 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))))


def authors_pitch_draws(sample_rate, semitones, n, seed):
    """torch-audiomentations 0.12 PitchShift: torch-pitch-shift's get_fast_shifts (ratios
    i / j of products of the rate's prime factors, kept between 2^(-s/12) and 2^(s/12),
    1 excluded), one picked per example with random.choices; semitones = 12·log2(ratio)."""
    import random
    from itertools import combinations
    factors, m, p = [], sample_rate, 2
    while m > 1:
        while m % p == 0:
            factors.append(p)
            m //= p
        p += 1
    products = {math.prod(c) for r in range(1, len(factors) + 1) for c in combinations(factors, r)}
    low, high = Fraction(2.0 ** (-semitones / 12)), Fraction(2.0 ** (semitones / 12))
    ratios = list({Fraction(i, j) for i in products for j in products if low <= Fraction(i, j) <= high and i != j})
    return torch.tensor([12 * math.log2(r) for r in random.Random(seed).choices(ratios, k=n)], dtype=torch.float64)


def test_pitch_shift_draws_match_the_authors_signed_and_absolute():
    n = 3000
    ours = augment.sample_pitch(n, LENGTH, augment.SEVERITY_TABLE["pitch"](1.0) | {"shifts": "fast"},
                                augment.Draw(torch.Generator().manual_seed(5), "cpu"), SAMPLE_RATE)["semitones"]
    theirs = authors_pitch_draws(SAMPLE_RATE, 4.0, n, seed=5)
    assert ours.dtype == torch.float64 and set(ours.tolist()) == set(theirs.tolist())  # the same 14 values, exactly
    assert ks_p_value(ours, theirs) > 0.001  # signed shift
    assert ks_p_value(ours.abs(), theirs.abs()) > 0.001  # |shift|
    assert abs(float(ours.mean())) < 0.15 and abs(float(theirs.mean())) < 0.15  # no skew: sd 2.1 / sqrt(3000) = 0.04


def authors_echo_ratios(severity, n, sample_rate, seed):
    """The authors' Delay (SemiSupCon delay.py) on a click: the second echo's level over
    the first's, for draws made as theirs (random.choices of centre ± step, int(2·s) repeats)."""
    import random
    rng = random.Random(seed)
    volume, repeats, attenuation = 0.5 * severity, int(2 * severity), min(1, 0.5 * severity)
    lags = range(int(100 / severity * sample_rate / 1000), int(500 * sample_rate / 1000) + 1)
    params = {"lag": torch.tensor(rng.choices(lags, k=n)),
              "volume": torch.tensor(rng.choices([volume - 0.2, volume + 0.2], k=n), dtype=torch.float64),
              "repeats": torch.tensor(rng.choices([repeats - 1, repeats + 1], k=n)),
              "attenuation": torch.tensor(rng.choices([attenuation - 0.2, attenuation + 0.2], k=n), dtype=torch.float64)}
    return params


def echo_ratios(y, lag):
    """y(2·lag) / y(lag) of clicks at t = 0, for rows with a second echo."""
    rows = torch.arange(len(y))
    first, second = y[rows, lag], y[rows, 2 * lag]
    return (second / first)[second != 0]


@pytest.mark.parametrize("severity", [1.0, 2.0])
def test_second_echo_over_first_matches_the_authors_delay(severity):
    n, sample_rate = 600, 8000
    length = int(1.1 * sample_rate)  # room for two echoes of the longest lag (500 ms)
    click = torch.zeros(n, length)
    click[:, 0] = 0.1
    theirs = authors_echo_ratios(severity, n, sample_rate, seed=7)
    ours = augment.sample_delay(n, length, augment.SEVERITY_TABLE["delay"](severity),
                                augment.Draw(torch.Generator().manual_seed(7), "cpu"), sample_rate)
    ratio_theirs = echo_ratios(authors_delay(click, **theirs), theirs["lag"])
    ratio_ours = echo_ratios(augment.delay(click, **ours), ours["lag"])
    assert set(ratio_ours.tolist()) == set(ratio_theirs.tolist())  # the same float32 levels, exactly
    assert ks_p_value(ratio_ours, ratio_theirs) > 0.001
