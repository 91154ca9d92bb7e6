"""Batched audio augmentations on `[B, T]` waveforms, on whatever device the batch lives on.

Every transform is a plain function of the audio and explicit per-example parameter
tensors (so tests can call it with known values), paired with a sampler that draws those
parameters. `build_chain(names, severity)` turns a list of transform names into a `Chain`
that, for each example of a batch, decides whether to augment it at all (probability
min(1, 0.8·s)), then whether to apply each transform (its own probability), draws the
parameters per example and applies the transform to the chosen examples together.

Severity s scales every range and probability in one place only: `SEVERITY_TABLE` below.
s = 0 is no augmentation, s = 1 the paper's normal strength (METHOD.md), up to 2.5 the
strongest. The six transforms of the paper's chain use the paper's values; for the nine
extra transforms of the robustness study, the strong end of each range at s = 1 is the
study's setting and every transform applies with probability min(1, s).

Usage:
    chain = build_chain(parse_augment("gain,noise,pitch"), severity=1.0, sample_rate=22050)
    views = chain(views, generator)          # [B, T] -> [B, T], same dtype and device
"""

import math
from functools import lru_cache

import torch

# ---------------------------------------------------------------------------------------
# The severity table: transform name -> function of s giving its probability `p` and the
# (low, high) range of each parameter. This is the only place where severity acts.
# ---------------------------------------------------------------------------------------
SEVERITY_TABLE = {
    # METHOD.md, the paper's chain.
    "gain": lambda s: {"p": min(0.7, 0.4 * s), "gain_db": (-15 * s, 5 * s)},
    "polarity": lambda s: {"p": min(0.8, 0.6 * s)},
    "noise": lambda s: {
        "p": min(0.8, 0.6 * s),
        "snr_db": (3 / s, 30 / s),
        "decay": (-2 * s, 2 * s),
    },
    "filter": lambda s: {
        "p": min(0.6, 0.3 * s),
        "band_centre_hz": (200.0, 4000.0),
        "band_fraction": (min(0.5 * s, 1.99), 1.99),
        "high_pass_hz": (200 * s, 2400 * s),
        "low_pass_hz": (min(max(75, 150 / s), 7500 / max(1, s)), 7500 / max(1, s)),
    },
    "pitch": lambda s: {"p": min(0.75, 0.6 * s), "semitones": (-4 * s, 4 * s)},
    "delay": lambda s: {
        "p": min(0.6, 0.6 * s),
        "delay_ms": (min(100 / s, 500.0), 500.0),
        "volume": 0.5 * s,
        "repeats": max(1, round(2 * s)),
        "attenuation": min(1.0, 0.5 * s),
    },
}

TRANSFORM_NAMES = (
    "gain",
    "polarity",
    "noise",
    "filter",
    "pitch",
    "delay",
)
DEFAULT_AUGMENT = ("gain", "polarity", "noise", "filter", "pitch", "delay")

# Which kinds of label a transform changes: a chain applied to labeled clips must not
# contain a transform that changes the label being supervised (METHOD.md, last note).
LABEL_CHANGES = {name: set() for name in TRANSFORM_NAMES}
LABEL_CHANGES["pitch"] = {"pitch", "pitch_class", "key"}

CHAIN_PROBABILITY_SLOPE = 0.8  # the whole chain applies with probability min(1, 0.8·s)

# Short-time Fourier transform used by pitch shift: 46 ms frames at 22.05 kHz resolve
# 21.5 Hz bins, fine enough for the phase vocoder to track partials of low notes.
STFT_SIZE = 1024
STFT_HOP = 256
PITCH_STEP = 0.25  # semitones; pitch shifts are quantized so examples can be grouped


# ---------------------------------------------------------------------------------------
# Random draws
# ---------------------------------------------------------------------------------------
class Draw:
    """Random draws for one chain call, reproducible under a `torch.Generator`.

    Small per-example parameters are drawn on the generator's own device (CPU or the
    batch's device) and then moved to the batch's device. Large noise tensors are drawn
    directly on the batch's device, from a generator seeded once from the given one when
    the two devices differ, so no large tensor crosses devices.
    """

    def __init__(self, generator, device):
        self.generator = generator
        self.device = torch.device(device)
        self.draw_device = generator.device if generator is not None else self.device
        self.noise_generator = None

    def uniform(self, low, high, n):
        """`[n]` floats uniform in [low, high] on the batch's device."""
        u = torch.rand(n, generator=self.generator, device=self.draw_device)
        return (low + (high - low) * u).to(self.device)

    def log_uniform(self, low, high, n):
        """`[n]` floats whose logarithm is uniform between log(low) and log(high)."""
        return torch.exp(self.uniform(math.log(low), math.log(high), n))

    def integers(self, low, high, n):
        """`[n]` int64 uniform in [low, high] inclusive."""
        values = torch.randint(low, high + 1, (n,), generator=self.generator, device=self.draw_device)
        return values.to(self.device)

    def chance(self, p, n):
        """`[n]` booleans, each True with probability p."""
        return self.uniform(0.0, 1.0, n) < p

    def normal(self, shape):
        """Standard normal float32 tensor of `shape` drawn on the batch's device."""
        if self.generator is None or self.generator.device == self.device:
            return torch.randn(shape, generator=self.generator, device=self.device)
        if self.noise_generator is None:
            seed = torch.randint(2**62, (1,), generator=self.generator, device=self.draw_device)
            self.noise_generator = torch.Generator(device=self.device)
            self.noise_generator.manual_seed(int(seed))
        return torch.randn(shape, generator=self.noise_generator, device=self.device)


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def fast_length(n):
    """Smallest integer >= n whose only prime factors are 2, 3 and 5 (fast FFT sizes)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def rms(x):
    """Root mean square of each example: `[B, T]` -> `[B]`."""
    return x.pow(2).mean(-1).sqrt()


@lru_cache(maxsize=None)
def hann_window(size, device):
    """Cached periodic Hann window `[size]` for the STFT on `device`."""
    return torch.hann_window(size, device=device)


def stft(x):
    """Complex STFT `[B, T]` -> `[B, F, N]` with F = STFT_SIZE // 2 + 1 bins."""
    return torch.stft(x, STFT_SIZE, STFT_HOP, window=hann_window(STFT_SIZE, x.device), return_complex=True)


def istft(spec, length):
    """Inverse of `stft`: `[B, F, N]` complex -> `[B, length]`."""
    window = hann_window(STFT_SIZE, spec.device)
    return torch.istft(spec, STFT_SIZE, STFT_HOP, window=window, length=length)


def phase_vocoder(spec, rate, frames):
    """Time-scale a spectrogram by a per-example rate, keeping its frequencies.

    Output frame m reads input position m·rate (linear interpolation of magnitudes); its
    phase accumulates the measured phase advance of the input frames it reads, so each
    partial keeps its frequency. Positions past the input's end are silent.

    Args:
        spec: `[B, F, N]` complex STFT.
        rate: `[B]` input frames consumed per output frame (> 1 shortens).
        frames: number of output frames M.
    Returns:
        `[B, F, M]` complex STFT.
    """
    n_frames = spec.shape[-1]
    bins = spec.shape[1]
    position = torch.arange(frames, device=spec.device) * rate[:, None]  # [B, M]
    left = position.floor().long().clamp(max=n_frames - 1)
    alpha = (position - left).unsqueeze(1)  # [B, 1, M]
    magnitude = torch.nn.functional.pad(spec.abs(), (0, 1))  # [B, F, N + 1]; the extra frame is silence
    phase = spec.angle()  # [B, F, N]
    expected = 2 * math.pi * STFT_HOP * torch.arange(bins, device=spec.device) / STFT_SIZE  # [F]
    advance = phase[..., 1:] - phase[..., :-1] - expected[:, None]
    advance = torch.remainder(advance + math.pi, 2 * math.pi) - math.pi  # deviation, wrapped to [-pi, pi)
    advance = torch.nn.functional.pad(advance, (0, 1))  # [B, F, N]; no deviation after the last frame
    index = left.unsqueeze(1).expand(-1, bins, -1)  # [B, F, M]
    out_magnitude = (1 - alpha) * magnitude.gather(2, index) + alpha * magnitude.gather(2, index + 1)
    out_magnitude = out_magnitude * (position <= n_frames - 1).unsqueeze(1)
    # Sum wrapped deviations, add the expected advance in closed form: the running phase
    # stays small, so float32 keeps its precision over long clips.
    step = advance.gather(2, index)  # [B, F, M]
    out_phase = phase[..., :1] + torch.cumsum(step, -1) - step
    # The expected advance of bin f after m frames, reduced modulo 2*pi in exact integer
    # arithmetic (the unreduced value reaches 1e5 radians, beyond float32's precision).
    turns = (STFT_HOP * torch.arange(bins, device=spec.device)[:, None] * torch.arange(frames, device=spec.device)) % STFT_SIZE  # [F, M]
    out_phase = out_phase + (2 * math.pi / STFT_SIZE) * turns
    return torch.polar(out_magnitude, out_phase)


def fft_resample(x, length):
    """Band-limited resampling of each row to `length` samples by truncating or
    zero-padding its spectrum (exact for periodic signals): `[B, L]` -> `[B, length]`."""
    spectrum = torch.fft.rfft(x)  # [B, L // 2 + 1]
    bins = length // 2 + 1
    if spectrum.shape[-1] >= bins:
        spectrum = spectrum[:, :bins]
    else:
        spectrum = torch.nn.functional.pad(spectrum, (0, bins - spectrum.shape[-1]))
    return torch.fft.irfft(spectrum, n=length) * (length / x.shape[-1])


# ---------------------------------------------------------------------------------------
# The transforms. Each takes x `[B, T]` float32 and `[B]` parameter tensors, returns `[B, T]`.
# ---------------------------------------------------------------------------------------
def gain(x, gain_db):
    """Scale each example by `gain_db` `[B]` decibels."""
    return x * torch.pow(10.0, gain_db / 20)[:, None]


def sample_gain(n, length, setting, draw, sample_rate):
    return {"gain_db": draw.uniform(*setting["gain_db"], n)}


def polarity(x):
    """Invert the sign of every sample."""
    return -x


def sample_polarity(n, length, setting, draw, sample_rate):
    return {}


def noise(x, snr_db, decay, white):
    """Add colored noise at a given signal-to-noise ratio.

    The noise power spectrum falls as 1/f^decay: decay -2 violet, -1 blue, 0 white,
    1 pink, 2 brown. The noise is shaped from `white` in the frequency domain (one inverse
    FFT for the batch), then scaled so that rms(x) / rms(noise) = 10^(snr_db / 20).

    Args:
        x: `[B, T]` audio; snr_db, decay: `[B]`.
        white: `[B, T // 2 + 1, 2]` standard normal (real and imaginary parts).
    """
    length = x.shape[-1]
    frequency = torch.arange(1, white.shape[1], device=x.device, dtype=x.dtype)  # [F - 1], bin index
    shape = torch.exp(-0.5 * decay[:, None] * torch.log(frequency))  # [B, F - 1] amplitude ~ f^(-decay/2)
    spectrum = torch.view_as_complex(white[:, 1:].contiguous()) * shape
    spectrum = torch.nn.functional.pad(spectrum, (1, 0))  # [B, F]; no DC
    colored = torch.fft.irfft(spectrum, n=length)  # [B, T]
    scale = rms(x) / (rms(colored) * torch.pow(10.0, snr_db / 20)).clamp(min=1e-12)
    return x + colored * scale[:, None]


def sample_noise(n, length, setting, draw, sample_rate):
    return {
        "snr_db": draw.uniform(*setting["snr_db"], n),
        "decay": draw.uniform(*setting["decay"], n),
        "white": draw.normal((n, length // 2 + 1, 2)),
    }


FILTER_KINDS = ("band_pass", "band_stop", "high_pass", "low_pass")
FILTER_ORDER = 4  # Butterworth order: 24 dB per octave beyond a low- or high-pass cutoff


def filter_response(kind, frequency_hz, bandwidth, bins, sample_rate):
    """Butterworth magnitude responses evaluated on a frequency grid.

    Band-pass and band-stop use the analog band transform of a low-pass prototype:
    u = (f² - f0²) / (f·B), so the -3 dB edges sit where |f² - f0²| = f·B with
    B = bandwidth · f0.

    Args:
        kind: `[B]` int64 index into FILTER_KINDS.
        frequency_hz: `[B]` centre (band) or cutoff (high/low-pass) frequency.
        bandwidth: `[B]` bandwidth as a fraction of the centre (band filters only).
        bins: number of frequency bins from 0 to sample_rate / 2.
    Returns:
        `[B, bins]` magnitudes in [0, 1].
    """
    f = torch.linspace(0, sample_rate / 2, bins, device=frequency_hz.device)[None, :]  # [1, F]
    f0 = frequency_hz[:, None]  # [B, 1]
    band = (f.pow(2) - f0.pow(2)) / (f * bandwidth[:, None] * f0)  # [B, F]
    u = torch.stack([band, 1 / band, f0 / f, f / f0], dim=1)  # [B, 4, F]
    u = u.gather(1, kind[:, None, None].expand(-1, 1, bins)).squeeze(1)  # [B, F]
    # Large |u| overflows to inf, which correctly gives a magnitude of 0.
    return torch.rsqrt(1 + u.abs().pow(2 * FILTER_ORDER))


def band_filter(x, kind, frequency_hz, bandwidth, sample_rate):
    """One of band-pass, band-stop, high-pass or low-pass per example.

    Applied as a zero-phase mask on the FFT of the zero-padded clip. Why FFT masks rather
    than biquads: one FFT pair filters the whole batch whatever kind and cutoff each example
    has, the magnitude response is exact (biquad cascades need per-example coefficient
    design and a sequential recursion over time, slow on GPUs), and the padding keeps the
    filter's ringing from wrapping around the clip.

    Args:
        x: `[B, T]`; kind, frequency_hz, bandwidth: `[B]` (see `filter_response`).
    """
    length = x.shape[-1]
    size = fast_length(length + sample_rate // 4)  # >= 250 ms of padding absorbs the ringing
    spectrum = torch.fft.rfft(x, n=size)  # [B, size // 2 + 1]
    response = filter_response(kind, frequency_hz, bandwidth, spectrum.shape[-1], sample_rate)
    return torch.fft.irfft(spectrum * response, n=size)[:, :length]


def sample_filter(n, length, setting, draw, sample_rate):
    kind = draw.integers(0, len(FILTER_KINDS) - 1, n)
    nyquist = sample_rate / 2
    centre = draw.log_uniform(*setting["band_centre_hz"], n).clamp(max=0.9 * nyquist)
    high_low, high_high = setting["high_pass_hz"]
    high_pass = draw.log_uniform(high_low, min(high_high, 0.9 * nyquist), n)
    low_pass = draw.log_uniform(*setting["low_pass_hz"], n).clamp(max=0.9 * nyquist)
    frequency = torch.where(kind < 2, centre, torch.where(kind == 2, high_pass, low_pass))
    return {
        "kind": kind,
        "frequency_hz": frequency,
        "bandwidth": draw.uniform(*setting["band_fraction"], n),
        "sample_rate": sample_rate,
    }


def pitch(x, semitones):
    """Shift pitch by `semitones` `[B]`, keeping tempo and length.

    A phase vocoder first stretches every example in time by its ratio r = 2^(k/12)
    (one batched pass, pitch kept), then each stretched example is resampled back to the
    original length, which multiplies its frequencies by r. Resampling is done by
    spectrum truncation or zero-padding on the FFT (exact band-limited resampling, no
    filter kernel to build), on groups of examples sharing the same shift: the shift is
    quantized to PITCH_STEP semitones so that groups form.
    """
    length = x.shape[-1]
    steps = torch.round(semitones / PITCH_STEP)  # [B] quantized shift
    ratio = torch.pow(2.0, steps * PITCH_STEP / 12)  # [B]
    spec = stft(x)  # [B, F, N]
    stretched_frames = int(math.ceil(spec.shape[-1] * float(ratio.max())))
    stretched = phase_vocoder(spec, 1 / ratio, stretched_frames)  # [B, F, M]
    max_length = int(round(length * float(ratio.max())))
    stretched = istft(stretched, max_length)  # [B, L_max]
    out = torch.empty_like(x)
    # One group per distinct quantized shift; the host sync from .tolist() is deliberate.
    for step in torch.unique(steps).tolist():
        members = torch.nonzero(steps == step).squeeze(1)
        if step == 0:
            out[members] = x[members]
            continue
        stretched_length = int(round(length * 2 ** (step * PITCH_STEP / 12)))
        out[members] = fft_resample(stretched[members, :stretched_length], length)
    return out


def sample_pitch(n, length, setting, draw, sample_rate):
    return {"semitones": draw.uniform(*setting["semitones"], n)}


def delay(x, lag, volume, repeats, attenuation):
    """Echoes: y[t] = x[t] + volume · sum_{i=1..repeats} attenuation^(i-1) · x[t - i·lag].

    Args:
        x: `[B, T]`; lag: `[B]` int64 delay in samples (>= 1).
        volume, attenuation: `[B]` floats; repeats: python int, echoes per example.
    """
    length = x.shape[-1]
    time = torch.arange(length, device=x.device)
    out = x.clone()
    for i in range(1, repeats + 1):
        source = time[None, :] - i * lag[:, None]  # [B, T]
        echo = x.gather(1, source.clamp(min=0)) * (source >= 0)
        out = out + (volume * attenuation.pow(i - 1))[:, None] * echo
    return out


def sample_delay(n, length, setting, draw, sample_rate):
    delay_ms = draw.uniform(*setting["delay_ms"], n)
    return {
        "lag": (delay_ms * sample_rate / 1000).round().long().clamp(min=1),
        "volume": torch.full((n,), setting["volume"], device=draw.device),
        "repeats": setting["repeats"],
        "attenuation": torch.full((n,), setting["attenuation"], device=draw.device),
    }


# name -> (transform, sampler). A sampler takes (n, T, setting, draw, sample_rate) and
# returns the transform's keyword arguments for n examples.
TRANSFORMS = {
    "gain": (gain, sample_gain),
    "polarity": (polarity, sample_polarity),
    "noise": (noise, sample_noise),
    "filter": (band_filter, sample_filter),
    "pitch": (pitch, sample_pitch),
    "delay": (delay, sample_delay),
}


# ---------------------------------------------------------------------------------------
# The chain
# ---------------------------------------------------------------------------------------
def parse_augment(spec):
    """Parse a comma-separated list of transform names: "gain,noise" -> ["gain", "noise"].

    "none" or "" gives []. An unknown name raises ValueError listing the valid names.
    """
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in TRANSFORM_NAMES]
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; valid names: {', '.join(TRANSFORM_NAMES)}, or none")
    return names


def peak_guard(x):
    """Scale down only the examples whose peak exceeds 1, so output stays in [-1, 1]."""
    peak = x.abs().amax(-1, keepdim=True)  # [B, 1]
    return x / peak.clamp(min=1.0)


class Chain:
    """A sequence of transforms applied per example, with per-example probabilities.

    Attributes:
        names: transform names in application order.
        severity: s, scales ranges and probabilities through SEVERITY_TABLE.
        sample_rate: Hz, for transforms with parameters in Hz or milliseconds.
    """

    def __init__(self, names, severity=1.0, sample_rate=22050):
        unknown = [name for name in names if name not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; valid names: {', '.join(TRANSFORM_NAMES)}")
        if severity < 0:
            raise ValueError(f"severity must be >= 0, got {severity}")
        self.names = list(names)
        self.severity = float(severity)
        self.sample_rate = int(sample_rate)
        self.settings = {name: SEVERITY_TABLE[name](self.severity) for name in self.names} if severity > 0 else {}

    def __repr__(self):
        return f"Chain(names={self.names}, severity={self.severity}, sample_rate={self.sample_rate})"

    def __call__(self, x, generator=None):
        """Augment a batch.

        Args:
            x: `[B, T]` float32, bfloat16 or float16 audio on any device.
            generator: optional torch.Generator (on CPU or on x's device) making the
                draws reproducible; None uses the global RNG.
        Returns:
            `[B, T]` tensor of x's dtype and device; x itself when severity is 0 or the
            chain is empty.
        """
        if self.severity == 0 or not self.names:
            return x
        batch, length = x.shape
        draw = Draw(generator, x.device)
        out = x.to(torch.float32, copy=True)  # transforms compute in float32 whatever the input
        is_augmented = draw.chance(min(1.0, CHAIN_PROBABILITY_SLOPE * self.severity), batch)  # [B]
        for name in self.names:
            setting = self.settings[name]
            is_chosen = is_augmented & draw.chance(setting["p"], batch)  # [B]
            # nonzero() syncs with the device once per transform, so that only the chosen
            # examples pay for an expensive transform such as pitch shift.
            index = torch.nonzero(is_chosen).squeeze(1)  # [K]
            if index.numel() == 0:
                continue
            transform, sampler = TRANSFORMS[name]
            params = sampler(index.numel(), length, setting, draw, self.sample_rate)
            out[index] = transform(out[index], **params)
        return peak_guard(out).to(x.dtype)


def build_chain(names, severity=1.0, sample_rate=22050):
    """Build a `Chain` from transform names (see TRANSFORM_NAMES) at severity s."""
    return Chain(names, severity=severity, sample_rate=sample_rate)
