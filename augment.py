"""Batched audio augmentations on `[B, T]` waveforms, on whatever device the batch lives on.

Every transform is a plain function of the audio and explicit per-example parameter
tensors (so tests can call it with known values), paired with a sampler that draws those
parameters. `build_chain(names, severity)` turns a list of transform names into a `Chain`.

The chain samples what the authors' chain samples (torch-audiomentations 0.12 plus their
own Delay, called once per clip on its views; docs/augmentations.md, "What the chain
samples"): whether to augment at all is decided once per clip (probability min(1, 0.8·s)),
so a clip's views are augmented together or both left clean; the filter type is drawn once
per clip; each transform's own probability and parameters are drawn per view. The caller
says which rows are views of one clip (`views`: rows [k·V, (k+1)·V) are clip k). A final
peak guard scales down any example whose peak exceeds 1.

Severity s scales every range and probability in one place only: `SEVERITY_TABLE` below.
s = 0 is no augmentation, s = 1 the paper's normal strength (docs/paper.md), up to 2.5 the
strongest. The six transforms of the paper's chain use the paper's values. For the nine
extra transforms of the robustness study, the strong end of each range at s = 1 is the
study's setting, ranges widen with s, and each applies with probability min(1, s) (the
study applies them with p = 1).

No host-device synchronisation happens inside a chain call: every decision and small
parameter is drawn on the host (a CPU generator derived from the caller's), so the chain
knows which rows each transform touches without reading the device; only the noise
tensors are drawn on the batch's device. docs/augmentations.md compares the chain with the
authors' side by side.

Usage:
    chain = build_chain(parse_augment("gain,noise,pitch"), severity=1.0, sample_rate=22050)
    views = chain(views, generator, views=2)   # [B, T] -> [B, T], same dtype and device
"""

import bisect
import contextlib
import hashlib
import math
from fractions import Fraction
from functools import lru_cache

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------
# The severity table: transform name -> function of s giving its probability `p` and the
# (low, high) range of each parameter. This is the only place where severity acts.
# Frequencies in Hz, times in ms unless named otherwise.
# ---------------------------------------------------------------------------------------
SEVERITY_TABLE = {
    # The paper's chain (docs/paper.md), as the authors' configuration builds it.
    "gain": lambda s: {"p": min(0.7, 0.4 * s), "gain_db": (-15 * s, 5 * s)},
    "polarity": lambda s: {"p": min(0.8, 0.6 * s)},
    "noise": lambda s: {"p": min(0.8, 0.6 * s), "snr_db": (3 / s, 30 / s), "decay": (-2 * s, 2 * s)},
    "filter": lambda s: {
        "p": min(0.6, 0.3 * s),
        "band_centre_hz": (200.0, 4000.0),
        "band_fraction": (min(0.5 * s, 1.99), 1.99),
        "high_pass_hz": (200 * s, 2400 * s),  # the top is also capped at half the sample rate
        "low_pass_hz": (min(max(75, 150 / s), 7500 / max(1, s)), 7500 / max(1, s)),
    },
    "pitch": lambda s: {"p": min(0.75, 0.6 * s), "semitones": (-4 * s, 4 * s)},
    # Volume, repeats and attenuation are centres: each view draws centre - step or
    # centre + step with equal chance (DELAY_STEPS), as the authors' Delay does.
    "delay": lambda s: {
        "p": min(0.6, 0.6 * s),
        "delay_ms": (min(100 / s, 500.0), 500.0),
        "volume": 0.5 * s,
        "repeats": int(2 * s),
        "attenuation": min(1.0, 0.5 * s),
    },
    # The robustness study's extra transforms (study setting = strong end at s = 1).
    "stretch": lambda s: {"p": min(1.0, s), "rate": (0.7**s, 1.3**s)},
    "splice": lambda s: {"p": min(1.0, s), "gaps": (1, max(1, round(6 * s))), "gap_ms": (min(10.0, 100 * s), 100 * s)},
    "reverb": lambda s: {"p": min(1.0, s), "rt60_s": (0.4 * s, 2.0 * s), "wet": (0.5 * min(1.0, s), min(1.0, s))},
    "chorus": lambda s: {
        "p": min(1.0, s),
        "rate_hz": (min(1.0, 5 * s), 5 * s),
        "depth": (0.5 * min(1.0, s), min(1.0, s)),
        "mix": (0.5 * min(1.0, s), min(1.0, s)),
    },
    "distortion": lambda s: {"p": min(1.0, s), "drive_db": (3 * s, 9 * s)},
    "compress": lambda s: {
        "p": min(1.0, s),
        "threshold_db": (-30 * s, -10 * s),
        "ratio": (1 + 2 * s, 1 + 4 * s),
        "attack_ms": 5.0,
        "release_ms": 50.0,
    },
    "reverse": lambda s: {"p": min(1.0, s)},
    "bitcrush": lambda s: {"p": min(1.0, s), "bits": (max(2, round(12 - 8 * s)), max(2, round(16 - 8 * s)))},
    "codec": lambda s: {"p": min(1.0, s), "cutoff_hz": (4000 / s, 8000 / s), "snr_db": (6 / s, 18 / s)},
}

TRANSFORM_NAMES = tuple(SEVERITY_TABLE)
DEFAULT_AUGMENT = ("gain", "polarity", "noise", "filter", "pitch", "delay")

# Which kinds of label a transform changes: a chain applied to labeled clips must not
# contain a transform that changes the label being supervised (docs/paper.md, the last lesson).
LABEL_CHANGES = {name: set() for name in TRANSFORM_NAMES}
LABEL_CHANGES["pitch"] = {"pitch", "pitch_class", "key"}
LABEL_CHANGES["stretch"] = {"tempo"}

CHAIN_PROBABILITY_SLOPE = 0.8  # the whole chain applies with probability min(1, 0.8·s), per clip
DELAY_STEPS = {"volume": 0.2, "repeats": 1, "attenuation": 0.2}  # each view: centre ± step

# Pitch-shift sets: "fast" (default) draws uniformly among the ratios torch-pitch-shift
# calls fast for the sample rate (what the authors' chain applied, so what the paper's
# numbers come from); "continuous" draws semitones uniformly in the range (the paper's
# description), quantized to PITCH_STEP so that examples can be resampled in groups.
PITCH_SHIFT_SETS = ("fast", "continuous")
PITCH_STEP = 0.25  # semitones

# WSOLA time scaling (pitch shift and time stretch): 93 ms grains at 22.05 kHz overlapping
# by half (long grains mean few sequential alignment steps); each grain may move up to
# 256 samples (one period of an 86 Hz tone) to line up with its predecessor.
WSOLA_GRAIN = 2048
WSOLA_SEARCH = 256

# Parameters a transform needs on the host (loop bounds, FFT sizes, groups); the chain
# passes them as CPU tensors and the transform moves what it computes with itself.
HOST_PARAMETERS = {"pitch": {"semitones"}, "delay": {"lag", "repeats", "volume", "attenuation"},
                   "stretch": {"rate"}}


# ---------------------------------------------------------------------------------------
# Random draws
# ---------------------------------------------------------------------------------------
def host_generator(generator):
    """A CPU generator for the host-side draws of one chain call.

    A CPU generator is used as it is. A device generator seeds a fresh CPU generator from
    its state (which torch keeps on the host: reading it does not synchronise) and is
    then advanced by one draw, so that the next call gets another seed and a restored
    generator state replays the same draws. None means torch's global CPU generator.
    """
    if generator is None or generator.device.type == "cpu":
        return generator
    digest = hashlib.sha256(generator.get_state().numpy().tobytes()).digest()
    torch.rand(1, generator=generator, device=generator.device)  # advance: the next call differs
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class Draw:
    """Random draws for one chain call, reproducible under a `torch.Generator`.

    Decisions and per-example parameters are small: they are drawn on the host, from
    `host_generator(generator)`, and returned as CPU tensors, so that choosing rows and
    sizing loops never reads the device. Large noise tensors are drawn directly on the
    batch's device: from the given generator when it lives there, otherwise from a
    generator seeded once from the host draws, so that no large tensor crosses devices.
    """

    def __init__(self, generator, device):
        self.generator = generator
        self.device = torch.device(device)
        self.host = host_generator(generator)
        self.noise_generator = None

    def uniform(self, low, high, n):
        """`[n]` floats uniform in [low, high], on the host."""
        return low + (high - low) * torch.rand(n, generator=self.host)

    def log_uniform(self, low, high, n):
        """`[n]` floats whose logarithm is uniform between log(low) and log(high)."""
        return torch.exp(self.uniform(math.log(low), math.log(high), n))

    def mel_uniform(self, low, high, n):
        """`[n]` frequencies (Hz) uniform on the mel scale between low and high Hz, as
        torch-audiomentations draws filter frequencies."""
        return mels_to_hz(self.uniform(hz_to_mels(low), hz_to_mels(high), n))

    def integers(self, low, high, n):
        """`[n]` int64 uniform in [low, high] inclusive, on the host."""
        return torch.randint(low, high + 1, (n,), generator=self.host)

    def choice(self, values, n):
        """`[n]` elements of the sequence `values`, each uniformly chosen, on the host.

        Python floats stay float64, so the drawn values are exactly the listed ones (the
        authors' draws are Python floats; float32 would move each by up to 3e-8)."""
        dtype = torch.float64 if any(isinstance(v, float) for v in values) else None
        return torch.tensor(values, dtype=dtype)[self.integers(0, len(values) - 1, n)]

    def chance(self, p, n):
        """`[n]` booleans, each True with probability p, on the host."""
        return torch.rand(n, generator=self.host) < p

    def normal(self, shape):
        """Standard normal float32 tensor of `shape` drawn on the batch's device."""
        if self.generator is not None and self.generator.device == self.device:
            return torch.randn(shape, generator=self.generator, device=self.device)
        if self.generator is None:
            return torch.randn(shape, device=self.device)
        if self.noise_generator is None:
            seed = int(torch.randint(2**62, (1,), generator=self.host))
            self.noise_generator = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(shape, generator=self.noise_generator, device=self.device)


def hz_to_mels(f):
    """Hz to mels (the HTK formula torch-audiomentations uses); float or tensor."""
    return 2595.0 * (torch.log10(1.0 + f / 700.0) if torch.is_tensor(f) else math.log10(1.0 + f / 700.0))


def mels_to_hz(m):
    """Mels to Hz, the inverse of `hz_to_mels`."""
    return 700.0 * (10 ** (m / 2595.0) - 1.0)


def to_device(value, device):
    """Move a tensor to `device` without blocking the host (a host-to-device copy needs
    no synchronisation); other values pass through."""
    if not torch.is_tensor(value):
        return value
    return value.to(device, non_blocking=torch.device(device).type == "cuda")


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
    return torch.linalg.vector_norm(x, dim=-1) / math.sqrt(x.shape[-1])


@lru_cache(maxsize=None)
def hann_window(size, device):
    """Cached periodic Hann window `[size]` on `device`."""
    return torch.hann_window(size, device=device)


def moving_average(x, size):
    """Centred moving average over `size` samples along the last axis: `[B, N]` -> `[B, N]`.

    A cumulative sum makes it O(N) whatever the size (pooling would cost O(N·size)).
    """
    padded = F.pad(x, (size // 2 + 1, size - size // 2 - 1), mode="replicate")  # [B, N + size]
    total = torch.cumsum(padded, -1)
    return (total[:, size:] - total[:, :-size]) / size


@contextlib.contextmanager
def one_cpu_thread(device):
    """Run a block of many small CPU operations on one thread, then restore the count.

    Each multi-threaded operation synchronises its threads; on small tensors that costs
    more than it saves, and on a busy machine a thread that waits for a core can stall
    every operation (measured: a WSOLA loop ran 7x slower on 2 threads than on 1 while
    other processes competed for the 2 cores). The thread count is process-wide, so
    torch work in other Python threads of the process also runs on one thread meanwhile.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def time_scale(x, rate, length):
    """Change tempo without changing pitch, by WSOLA (waveform-similarity overlap-add).

    Output grain k (Hann window, 50% overlap) is read from the input near position
    k·hop·rate; within ±WSOLA_SEARCH samples it takes the position whose first half best
    matches the natural continuation of grain k-1 (largest cross-correlation), so
    overlapping grains add in phase. The search runs for all examples at once, one grain
    at a time (each grain depends on the previous choice), as an FFT cross-correlation
    against candidate regions transformed all together beforehand; the loop body is a
    handful of operations, run on one CPU thread, because its cost is per operation,
    not per sample.
    Input past its end reads as silence.

    Args:
        x: `[B, L]` input.
        rate: `[B]` input samples consumed per output sample (> 1 faster, < 1 slower), on
            the host: the padding depends on it (a device tensor is copied to the host,
            which synchronises).
        length: output length T.
    Returns:
        `[B, T]`.
    """
    batch, input_length = x.shape
    device = x.device
    grain, search = WSOLA_GRAIN, WSOLA_SEARCH
    hop = overlap = grain // 2
    grains = math.ceil(length / hop) + 1
    base = torch.round(torch.arange(grains) * hop * rate.cpu().double()[:, None]).long()  # [B, G] ideal reads
    left = grain // 2 + search  # padding so that grain 0 is centred on sample 0
    padded_length = int(base.max()) + 2 * search + grain
    base = to_device(base, device)
    padded = F.pad(x, (left, max(0, padded_length - left - input_length)))  # [B, >= P]
    row_index = torch.arange(batch, device=device)
    rows = row_index[:, None]
    # Candidate regions (all shifts of grain k's first half) do not depend on earlier
    # choices: gather and transform them all at once, grain-major so that the loop
    # below reads contiguous rows.
    region = 2 * search + overlap
    regions = padded.unfold(1, region, 1)[rows, base]  # [B, G, region]
    region_spectra = torch.fft.rfft(regions.transpose(0, 1), dim=-1)  # [G, B, region // 2 + 1]
    lags = 2 * search + 1
    # A tiny preference for the unshifted read decides ties, e.g. in silence.
    tie_break = -1e-12 * (torch.arange(lags, device=device) - search).abs()  # [lags]
    # The continuation of grain k-1 is read backwards, from a flipped copy of the input,
    # so that correlating becomes a circular convolution of size `region`: index
    # j + overlap - 1 holds sum_i continuation[i] * region[i + j], with no wrap-around
    # for j in [0, lags). Only [B]-sized index arithmetic happens per step.
    flipped_windows = padded.flip(-1).unfold(1, overlap, 1)  # [B, P - overlap + 1, overlap]
    flipped_base = (padded.shape[-1] - hop - overlap - base).T.contiguous()  # [G, B]
    shifts = torch.empty(grains, batch, dtype=torch.long, device=device)  # [G, B] chosen lag j per grain
    shifts[0] = search
    with one_cpu_thread(device):
        for k in range(1, grains):
            continuation = flipped_windows[row_index, flipped_base[k - 1] - shifts[k - 1]]  # [B, overlap], reversed
            spectrum = torch.fft.rfft(continuation, n=region) * region_spectra[k]
            product = torch.fft.irfft(spectrum, n=region)  # [B, region]
            torch.argmax(product[:, overlap - 1 :] + tie_break, dim=-1, out=shifts[k])
    starts = base + shifts.T  # [B, G] chosen reads
    # Overlap-add at 50%: output block j (hop samples) is the rising half of grain j
    # plus the falling half of grain j - 1 (periodic Hann halves sum to one). Block 0
    # falls before the first output sample.
    window = hann_window(grain, device)
    halves = padded.unfold(1, hop, 1)  # [B, P - hop + 1, hop], a view
    rising = halves[rows, starts[:, 1:]]  # [B, G - 1, hop]
    falling = halves[rows, starts[:, :-1] + hop]  # [B, G - 1, hop]
    blocks = torch.addcmul(rising * window[:hop], falling, window[hop:])  # [B, G - 1, hop]
    return blocks.reshape(batch, -1)[:, :length]


# ---------------------------------------------------------------------------------------
# The transforms. Each takes x `[B, T]` float32 and per-example parameters `[B]` (or a
# python number shared by the batch), and returns `[B, T]`. Each `sample_*` function
# draws the parameters for n examples from a SEVERITY_TABLE setting.
# ---------------------------------------------------------------------------------------
def gain(x, gain_db):
    """Scale each example by `gain_db` `[B]` decibels."""
    return x * torch.pow(10.0, gain_db / 20)[:, None]


def sample_gain(n, length, setting, draw, sample_rate):
    """Draw `gain` parameters for n examples of length T: gain_db uniform in the setting's range."""
    return {"gain_db": draw.uniform(*setting["gain_db"], n)}


def polarity(x):
    """Invert the sign of every sample."""
    return -x


def sample_polarity(n, length, setting, draw, sample_rate):
    """Draw `polarity` parameters for n examples of length T: Nothing to draw."""
    return {}


def noise(x, snr_db, decay, white):
    """Add colored noise at a given signal-to-noise ratio, shaped as torch-audiomentations 0.12 shapes it.

    One second of white noise (`white`, S samples at the sample rate, so FFT bin k is
    k Hz) is multiplied in the frequency domain by the amplitude mask m^(-decay), with m
    rising linearly from 1 at DC to sqrt(S / 2) at the Nyquist frequency; it is brought
    to unit RMS over that second, repeated to the clip's length, and scaled so that
    rms(x) / rms(noise) = 10^(snr_db / 20). Well above sqrt(S / 2) Hz (105 Hz at
    22.05 kHz) the power falls by 6.02·decay dB per octave and it flattens below, about
    5.2·decay dB per octave over 125 Hz - 8 kHz: decay -2 violet, 0 white, 2 brown.
    Silence stays silent.

    Args:
        x: `[B, T]` audio; snr_db, decay: `[B]`.
        white: `[B, S]` standard normal, one second at the sample rate.
    """
    length, second = x.shape[-1], white.shape[-1]
    spectrum = torch.fft.rfft(white)  # [B, S // 2 + 1]
    bins = spectrum.shape[-1]
    log_m = torch.linspace(1, math.sqrt(second / 2), bins, device=x.device).log()  # [F]
    mask = torch.exp(-decay[:, None] * log_m)  # [B, F]
    shaped = torch.fft.irfft(spectrum * mask, n=2 * (bins - 1))  # [B, S] (S - 1 for odd S)
    shaped = shaped / (rms(shaped)[:, None] + 1e-8)
    colored = shaped.repeat(1, math.ceil(length / shaped.shape[-1]))[:, :length]  # [B, T]
    scale = rms(x) / torch.pow(10.0, snr_db / 20)
    return torch.addcmul(x, colored, scale[:, None])


def sample_noise(n, length, setting, draw, sample_rate):
    """Draw `noise` parameters for n examples of length T.

    SNR and spectral decay uniform in their ranges, plus a second of white noise to shape.
    """
    return {
        "snr_db": draw.uniform(*setting["snr_db"], n),
        "decay": draw.uniform(*setting["decay"], n),
        "white": draw.normal((n, sample_rate)),
    }


FILTER_KINDS = ("band_pass", "band_stop", "high_pass", "low_pass")
# Low-pass 1 / (1 + (f / f_c)^16): from 0.85 to 0.16 between 0.9 and 1.1 f_c, as julius's
# windowed sinc; the power is taken as four squarings, cheaper than a general power.
FILTER_SQUARINGS = 4  # (f / f_c)^(2^4)


def low_pass_response(f, cutoff):
    """Low-pass magnitude 1 / (1 + (f / cutoff)^16) at frequencies `f` (16 = 2^FILTER_SQUARINGS).

    0.5 (-6 dB) at the cut-off and 0.85 / 0.16 at 0.9 / 1.1 times it, as the windowed-sinc
    low-pass of julius (which torch-audiomentations uses), and amplitude complementary:
    1 minus it is the matching high-pass, as x minus the low-passed x is there. julius's
    stop band levels off near -25 dB; this one keeps falling.
    """
    ratio = f / cutoff
    for _ in range(FILTER_SQUARINGS):
        ratio = ratio.square()
    return torch.reciprocal(1 + ratio)


def filter_response(kind, frequency_hz, bandwidth, bins, sample_rate):
    """Zero-phase magnitude responses on a grid of `bins` frequencies from 0 to sr / 2.

    Built from low-passes L_c as torch-audiomentations builds its four filters: low-pass
    L_c, high-pass 1 - L_c, band-pass L_hi - L_lo with edges lo, hi = f0·(1 ∓ bandwidth / 2),
    band-stop 1 - (L_hi - L_lo). Every edge is at -6 dB.

    Args:
        kind: `[B]` int64 index into FILTER_KINDS.
        frequency_hz: `[B]` centre f0 (band filters) or cut-off (high/low-pass).
        bandwidth: `[B]` band width as a fraction of the centre (band filters only).
    Returns:
        `[B, bins]` magnitudes in [0, 1].
    """
    f = torch.linspace(0, sample_rate / 2, bins, device=frequency_hz.device)  # [F]
    f0, half = frequency_hz[:, None], 0.5 * bandwidth[:, None]  # [B, 1]
    is_band = (kind < 2)[:, None]
    upper = low_pass_response(f, torch.where(is_band, f0 * (1 + half), f0))  # [B, F]
    # A lower edge at (or below) 0 Hz passes nothing below it: its low-pass is 0 (inf power).
    lower = low_pass_response(f, (f0 * (1 - half)).clamp(min=1e-3))
    response = torch.where(is_band, upper - lower, upper)  # band-pass or low-pass
    is_complement = ((kind == 1) | (kind == 2))[:, None]  # band-stop and high-pass
    return torch.where(is_complement, 1 - response, response)


def band_filter(x, kind, frequency_hz, bandwidth, sample_rate):
    """One of band-pass, band-stop, high-pass or low-pass per example.

    Applied as a zero-phase magnitude mask on the FFT of the zero-padded clip rather than
    as time-domain filters: one FFT pair filters the whole batch whatever kind and
    frequency each example has, and nothing runs sequentially over time. The padding
    (>= 250 ms) keeps the filter's ringing from wrapping around the clip.

    Args:
        x: `[B, T]`; kind, frequency_hz, bandwidth: `[B]` (see `filter_response`).
    """
    length = x.shape[-1]
    size = fast_length(length + sample_rate // 4)
    spectrum = torch.fft.rfft(x, n=size)  # [B, size // 2 + 1]
    response = filter_response(kind, frequency_hz, bandwidth, spectrum.shape[-1], sample_rate)
    filtered = torch.view_as_complex(torch.view_as_real(spectrum) * response[..., None])  # real mask, no complex copy
    return torch.fft.irfft(filtered, n=size)[:, :length]


def sample_filter(n, length, setting, draw, sample_rate, kind=None):
    """Draw `band_filter` parameters for n examples of length T.

    Kind as given (the chain draws it once per clip) or uniform among FILTER_KINDS;
    centre and cut-off frequencies uniform on the mel scale, cut-offs at most half the
    sample rate; band width fraction uniform.
    """
    if kind is None:
        kind = draw.integers(0, len(FILTER_KINDS) - 1, n)
    nyquist = sample_rate / 2
    centre = draw.mel_uniform(*setting["band_centre_hz"], n)
    high_pass = draw.mel_uniform(*(min(f, nyquist) for f in setting["high_pass_hz"]), n)
    low_pass = draw.mel_uniform(*(min(f, nyquist) for f in setting["low_pass_hz"]), n)
    return {
        "kind": kind,
        "frequency_hz": torch.where(kind < 2, centre, torch.where(kind == 2, high_pass, low_pass)),
        "bandwidth": draw.uniform(*setting["band_fraction"], n),
        "sample_rate": sample_rate,
    }


@lru_cache(maxsize=None)
def smooth_lengths(limit):
    """Sorted integers up to `limit` with no prime factor above 11: FFT sizes that
    pocketfft and cuFFT transform fast (other sizes fall back to much slower algorithms)."""
    lengths = [1]
    for prime in (2, 3, 5, 7, 11):
        powers = [prime**e for e in range(int(math.log(limit, prime)) + 1)]
        lengths = [n * power for n in lengths for power in powers if n * power <= limit]
    return sorted(lengths)


@lru_cache(maxsize=None)
def resampling_sizes(length, semitones):
    """FFT sizes (n_in, n_out) for shifting a `length`-sample clip by `semitones`.

    The clip is zero-padded to n_in and resampled to n_out samples: both are fast FFT
    sizes, n_in is at most 6% above `length`, and n_out / n_in matches 2^(-semitones/12)
    to better than 0.1% (0.02 semitone) for clips of a few thousand samples or more.
    """
    ratio = 2 ** (-semitones / 12)
    sizes = smooth_lengths(int(2 * length * max(1.0, ratio)) + 64)
    best = None
    for n_in in sizes[bisect.bisect_left(sizes, length) :]:
        if n_in > 1.06 * length and best is not None:
            break
        i = bisect.bisect_left(sizes, n_in * ratio)
        for n_out in sizes[max(0, i - 1) : i + 1]:
            error = abs(n_out / (n_in * ratio) - 1)
            if best is None or error < best[0]:
                best = (error, n_in, n_out)
    return best[1], best[2]


@lru_cache(maxsize=None)
def fast_pitch_shifts(sample_rate, low_semitones, high_semitones):
    """The pitch shifts (semitones, ascending) that torch-pitch-shift calls fast for a
    sample rate, between low and high semitones.

    torch-pitch-shift lists every ratio d / e of two divisors d, e > 1 of the sample rate
    (resampling by such a ratio works with small integers); torch-audiomentations'
    PitchShift keeps those from 2^(low/12) to 2^(high/12) other than 1 and draws one
    uniformly per example. At 22,050 Hz within ±4 semitones: 14 shifts, ±0.35, 1.19,
    1.47, 1.82, 2.67, 3.02 and 3.16; at 16,000 Hz: 4, ±0.41 and 3.86.
    """
    divisors = [d for d in range(2, sample_rate + 1) if sample_rate % d == 0]
    low, high = Fraction(2.0 ** (low_semitones / 12)), Fraction(2.0 ** (high_semitones / 12))
    ratios = {Fraction(d, e) for d in divisors for e in divisors}
    return tuple(sorted(12 * math.log2(r) for r in ratios if low <= r <= high and r != 1))


def pitch(x, semitones):
    """Shift pitch by `semitones` `[B]`, keeping tempo and length.

    Each example is first resampled by 1 / r, r = 2^(k/12), which multiplies its
    frequencies by r; WSOLA (`time_scale`) then restores the length T without touching
    pitch, all examples in one pass. Resampling truncates or zero-pads the spectrum of the
    zero-padded clip (exact band-limited resampling, no filter kernel to build or cache),
    one FFT pair per group of examples sharing a shift (the samplers draw from a few
    values so that groups form); examples are sorted by shift so that each group is a
    contiguous slice. The FFT sizes come from `resampling_sizes`.

    Args:
        x: `[B, T]`.
        semitones: `[B]` on the host: the groups and FFT sizes are decided there (a
            device tensor is copied to the host, which synchronises).
    """
    batch, length = x.shape
    semitones = semitones.cpu()
    order = torch.argsort(semitones, stable=True)  # [B] host
    values, counts = torch.unique_consecutive(semitones[order], return_counts=True)
    values, counts = values.tolist(), counts.tolist()
    sizes = [resampling_sizes(length, value) for value in values]
    kept = [math.ceil(length * n_out / n_in) for n_in, n_out in sizes]  # resampled clip, without the padding
    order_on_device = to_device(order, x.device)
    x_sorted = x[order_on_device]  # [B, T], sorted by shift
    resampled = x.new_zeros(batch, max(kept))  # [B, L_max]
    first = 0
    with one_cpu_thread(x.device):  # many groups of a few examples each: see one_cpu_thread
        for count, (n_in, n_out), n_kept in zip(counts, sizes, kept):
            group = slice(first, first + count)
            # irfft trims or zero-pads the spectrum to n_out // 2 + 1 bins; "forward"
            # normalisation on both sides gives the 1 / n_in scale that keeps the amplitude.
            spectrum = torch.fft.rfft(x_sorted[group], n=n_in, norm="forward")  # [count, n_in // 2 + 1]
            resampled[group, :n_kept] = torch.fft.irfft(spectrum, n=n_out, norm="forward")[:, :n_kept]
            first += count
    rate = torch.tensor([n_out / n_in for n_in, n_out in sizes]).repeat_interleave(torch.tensor(counts))  # [B] host
    out = torch.empty_like(x)
    out[order_on_device] = time_scale(resampled, rate, length)
    is_unshifted = to_device(semitones == 0, x.device)  # a zero shift leaves the example as it is
    return torch.where(is_unshifted[:, None], x, out)


def sample_pitch(n, length, setting, draw, sample_rate):
    """Draw `pitch` parameters for n examples of length T.

    setting["shifts"] "fast" (the default): uniform among `fast_pitch_shifts` of the
    sample rate within the range, as the authors' chain (no shift when the range holds
    none); "continuous": uniform in the range, rounded to PITCH_STEP semitones.
    """
    low, high = setting["semitones"]
    if setting.get("shifts", "fast") == "continuous":
        return {"semitones": torch.round(draw.uniform(low, high, n) / PITCH_STEP) * PITCH_STEP}
    shifts = fast_pitch_shifts(sample_rate, low, high)
    return {"semitones": draw.choice(shifts, n) if shifts else torch.zeros(n)}


def delay(x, lag, volume, repeats, attenuation):
    """The authors' Delay: y[t] = (x[t] + volume · sum_{i=0}^{repeats-1} attenuation^i · x[t - i·lag]) / 2.

    The i = 0 copy is not delayed, so one repeat only scales the clip by (1 + volume) / 2,
    three repeats give two echoes, and zero repeats halve the clip. Copies delayed beyond
    the clip's end vanish. Computed in the authors' order and precision, so that equal
    parameters give equal float32 outputs: the weights attenuation^i are taken in float64
    and rounded once to float32, the delayed sum is accumulated copy by copy (i = 0
    first), then scaled by the volume, added to the clip and halved.

    Args:
        x: `[B, T]`.
        lag: `[B]` int64 delay in samples (>= 1), and repeats: `[B]` int64 (a negative
            count counts as 0), on the host (they size the loop); python ints also work.
        volume, attenuation: `[B]` (float64 keeps the drawn values exact), on the host:
            the weights are computed there (a device tensor is copied, which synchronises).
    """
    batch, length = x.shape
    lag = torch.as_tensor(lag).cpu().expand(batch)
    repeats = torch.as_tensor(repeats).cpu().expand(batch).clamp(min=0)
    attenuation = torch.as_tensor(attenuation).cpu().double().expand(batch).tolist()
    volume = to_device(torch.as_tensor(volume).cpu().float().expand(batch), x.device)
    copies = max(1, int(repeats.max()))
    shifts = torch.arange(copies)[:, None] * lag  # [copies, B] host: copy i of example b is delayed by i·lag_b
    is_copy = torch.arange(copies)[:, None] < repeats  # [copies, B] host
    max_shift = min(length, int((shifts * is_copy).max()))
    windows = F.pad(x, (max_shift, 0)).unfold(1, length, 1)  # [B, max_shift + 1, T], a view
    # A copy delayed by T or more reads window 0, which is all padding when max_shift = T.
    starts = to_device(max_shift - shifts.clamp(max=max_shift), x.device)  # [copies, B]
    # attenuation^i as python floats (as the authors' `attenuation ** i`), 0 past the repeats.
    weights = torch.tensor([[a**i for a in attenuation] for i in range(copies)]) * is_copy  # [copies, B] float32
    weights = to_device(weights, x.device)
    rows = torch.arange(batch, device=x.device)
    delayed = x * weights[0][:, None]  # the undelayed copy; a plain multiply-then-add below, no fused addcmul
    for i in range(1, copies):
        delayed += windows[rows, starts[i]] * weights[i][:, None]
    return (x + volume[:, None] * delayed) / 2


def sample_delay(n, length, setting, draw, sample_rate):
    """Draw `delay` parameters for n examples of length T, as the authors' Delay.

    Lag uniform among whole samples from int(min_ms·sr/1000) to int(max_ms·sr/1000);
    volume, repeats and attenuation each centre - step or centre + step with equal
    chance (DELAY_STEPS), computed as Python floats as the authors' are (float64, so
    0.5 - 0.2 is the authors' 0.3, not float32's 0.30000001): at s = 1, volume 0.3 or 0.7,
    repeats 1 or 3, attenuation 0.3 or 0.7.
    """
    low_ms, high_ms = setting["delay_ms"]

    def either(name):
        return draw.choice((setting[name] - DELAY_STEPS[name], setting[name] + DELAY_STEPS[name]), n)  # [n]

    return {
        "lag": draw.integers(max(1, int(low_ms * sample_rate / 1000)), max(1, int(high_ms * sample_rate / 1000)), n),
        "volume": either("volume"),
        "repeats": either("repeats"),
        "attenuation": either("attenuation"),
    }


def stretch(x, rate):
    """Change tempo by `rate` `[B]` (> 1 faster), keeping pitch and length.

    WSOLA (`time_scale`); a faster example ends in silence, a slower one is cut at T.
    """
    return time_scale(x, rate, x.shape[-1])


def sample_stretch(n, length, setting, draw, sample_rate):
    """Draw `stretch` parameters for n examples of length T.

    Rate log-uniform, so that slowing down and speeding up are equally likely.
    """
    return {"rate": draw.log_uniform(*setting["rate"], n)}


def splice(x, gap_start, gap_length, fade):
    """Splice-out: remove several short segments and join the rest, silence at the end.

    Before joining, the audio fades out linearly over `fade` samples up to each gap and in
    after it, so that the joins do not click.

    Args:
        x: `[B, T]`; gap_start, gap_length: `[B, G]` int64 samples (length 0 = no gap).
        fade: python int, fade length in samples.
    """
    batch, length = x.shape
    # Mark gap starts with +1 and ends with -1; a running sum > 0 means "inside a gap".
    marks = torch.zeros(batch, length + 1, device=x.device)
    gap_end = (gap_start + gap_length).clamp(max=length)
    marks.scatter_add_(1, gap_start.clamp(max=length), torch.ones_like(gap_start, dtype=marks.dtype))
    marks.scatter_add_(1, gap_end, -torch.ones_like(gap_end, dtype=marks.dtype))
    is_kept = torch.cumsum(marks, -1)[:, :length] <= 0  # [B, T]
    # Fade envelope: 0 in and within `fade` samples of a gap, rising linearly away from it.
    is_near_gap = F.max_pool1d((~is_kept).float()[:, None], 2 * fade + 1, 1, fade)[:, 0] > 0  # [B, T]
    envelope = moving_average((~is_near_gap).float(), 2 * fade + 1).clamp(0, 1) * is_kept  # [B, T]
    # Each kept sample moves to its rank among kept samples; removed ones go to a spare column.
    target = torch.where(is_kept, torch.cumsum(is_kept, -1) - 1, length)  # [B, T]
    out = torch.zeros(batch, length + 1, device=x.device)
    out.scatter_(1, target, x * envelope)
    return out[:, :length]


def sample_splice(n, length, setting, draw, sample_rate):
    """Draw `splice` parameters for n examples of length T.

    A uniform number of gaps, each with a uniform start and length.
    """
    low, high = setting["gaps"]
    count = draw.integers(low, high, n)  # [n]
    gap_ms = torch.stack([draw.uniform(*setting["gap_ms"], n) for _ in range(high)], 1)  # [n, G]
    gap_length = (gap_ms * sample_rate / 1000).round().long()
    gap_length = gap_length * (torch.arange(high) < count[:, None])  # unused gaps get length 0
    starts = torch.stack([draw.uniform(0, 1, n) for _ in range(high)], 1)  # [n, G]
    return {
        "gap_start": (starts * length).long().clamp(max=length - 1),
        "gap_length": gap_length,
        "fade": max(1, round(0.005 * sample_rate)),
    }


def reverb(x, impulse, wet):
    """Convolution reverb: y = x + wet · (x * impulse), full dry signal kept.

    Args:
        x: `[B, T]`; impulse: `[B, L]` impulse responses (see `sample_reverb`);
        wet: `[B]` level of the reverberated signal.
    """
    length = x.shape[-1]
    size = fast_length(length + impulse.shape[-1])
    reverberated = torch.fft.irfft(torch.fft.rfft(x, n=size) * torch.fft.rfft(impulse, n=size), n=size)
    return x + wet[:, None] * reverberated[:, :length]


def sample_reverb(n, length, setting, draw, sample_rate):
    """Synthetic room: Gaussian noise decaying by 60 dB over RT60 seconds, with a high
    band that dies out faster (air and wall absorption), unit energy."""
    rt60 = to_device(draw.uniform(*setting["rt60_s"], n), draw.device)  # [n] seconds
    impulse_length = max(1, min(length, round(setting["rt60_s"][1] * sample_rate)))
    t = torch.arange(impulse_length, device=draw.device) / sample_rate
    envelope = torch.exp(-6.91 * t / rt60[:, None])  # [n, L]; exp(-6.91) = -60 dB
    white = draw.normal((n, impulse_length))
    smooth = F.avg_pool1d(white[:, None], 3, 1, 1, count_include_pad=False)[:, 0]  # low band of the noise
    envelope_high = torch.exp(-2 * 6.91 * t / rt60[:, None])  # high band decays twice as fast
    impulse = smooth * envelope + (white - smooth) * envelope_high
    impulse = impulse / impulse.pow(2).sum(-1, keepdim=True).sqrt().clamp(min=1e-12)
    return {"impulse": impulse, "wet": draw.uniform(*setting["wet"], n)}


CHORUS_CENTRE_MS = 7.0  # delay around which the chorus voice moves
CHORUS_DEPTH_MS = 5.0  # largest excursion, at depth 1


def chorus(x, rate_hz, depth, mix, phase, sample_rate):
    """Chorus: a second voice read through a delay swinging sinusoidally around 7 ms.

    y = (1 - mix/2)·x + (mix/2)·x(t - d(t)), d(t) = 7 ms + depth · 5 ms · sin(2π·rate·t + phase),
    with linear interpolation between samples.

    Args:
        x: `[B, T]`; rate_hz, depth (0..1), mix (0..1), phase (radians): `[B]`.
    """
    batch, length = x.shape
    t = torch.arange(length, device=x.device)
    swing = torch.sin(2 * math.pi * rate_hz[:, None] * t / sample_rate + phase[:, None])  # [B, T]
    delay_samples = (CHORUS_CENTRE_MS + CHORUS_DEPTH_MS * depth[:, None] * swing) * sample_rate / 1000
    position = (t - delay_samples).clamp(min=0)  # [B, T]
    before = position.floor().long()
    fraction = position - before
    after = (before + 1).clamp(max=length - 1)
    voice = (1 - fraction) * x.gather(1, before) + fraction * x.gather(1, after)
    return (1 - mix / 2)[:, None] * x + (mix / 2)[:, None] * voice


def sample_chorus(n, length, setting, draw, sample_rate):
    """Draw `chorus` parameters for n examples of length T.

    Rate, depth and mix uniform in their ranges, starting phase uniform.
    """
    return {
        "rate_hz": draw.uniform(*setting["rate_hz"], n),
        "depth": draw.uniform(*setting["depth"], n),
        "mix": draw.uniform(*setting["mix"], n),
        "phase": draw.uniform(0, 2 * math.pi, n),
        "sample_rate": sample_rate,
    }


def distortion(x, drive_db):
    """Soft clipping: y = tanh(10^(drive_db / 20) · x), `drive_db` `[B]`."""
    return torch.tanh(x * torch.pow(10.0, drive_db / 20)[:, None])


def sample_distortion(n, length, setting, draw, sample_rate):
    """Draw `distortion` parameters for n examples of length T: Drive uniform in dB."""
    return {"drive_db": draw.uniform(*setting["drive_db"], n)}


COMPRESS_FRAME = 64  # samples per level measurement (2.9 ms at 22.05 kHz)


def compress(x, threshold_db, ratio, attack_ms, release_ms, sample_rate):
    """Downward dynamic-range compression, without make-up gain.

    The level is the RMS over `attack_ms`, measured every COMPRESS_FRAME samples; above
    the threshold the gain falls by (level - threshold)·(1 - 1/ratio) dB. The gain holds
    its deepest reduction for `release_ms` and is then smoothed over `release_ms`, so it
    drops within the attack time and recovers within about twice the release time.
    Working on frames keeps every step a cheap batched pooling.

    Args:
        x: `[B, T]`; threshold_db, ratio: `[B]`; attack_ms, release_ms: python floats.
    """
    batch, length = x.shape
    frames = math.ceil(length / COMPRESS_FRAME)
    power = F.pad(x, (0, frames * COMPRESS_FRAME - length)).pow(2).view(batch, frames, COMPRESS_FRAME).mean(-1)
    frame_ms = 1000 * COMPRESS_FRAME / sample_rate
    attack = max(1, round(attack_ms / frame_ms))
    release = max(1, round(release_ms / frame_ms))
    level_db = 10 * torch.log10(moving_average(power, attack) + 1e-10)  # [B, frames]
    gain_db = ((threshold_db[:, None] - level_db) * (1 - 1 / ratio[:, None])).clamp(max=0)
    gain_db = -F.max_pool1d(-gain_db[:, None], 2 * release + 1, 1, release)[:, 0]  # hold
    gain_db = moving_average(gain_db, 2 * release + 1)  # [B, frames]
    gain_per_sample = F.interpolate(gain_db[:, None], size=length, mode="linear", align_corners=False)[:, 0]
    return x * torch.pow(10.0, gain_per_sample / 20)


def sample_compress(n, length, setting, draw, sample_rate):
    """Draw `compress` parameters for n examples of length T.

    Threshold and ratio uniform; attack and release fixed by severity.
    """
    return {
        "threshold_db": draw.uniform(*setting["threshold_db"], n),
        "ratio": draw.uniform(*setting["ratio"], n),
        "attack_ms": setting["attack_ms"],
        "release_ms": setting["release_ms"],
        "sample_rate": sample_rate,
    }


def reverse(x):
    """Play each example backwards."""
    return x.flip(-1)


def sample_reverse(n, length, setting, draw, sample_rate):
    """Draw `reverse` parameters for n examples of length T: Nothing to draw."""
    return {}


def bitcrush(x, bits):
    """Quantize to `bits` `[B]` int64 bits: at most 2^bits levels, spaced 2^(1 - bits) in [-1, 1)."""
    levels = torch.pow(2.0, bits.to(x.dtype) - 1)[:, None]  # [B, 1] levels per unit
    return (x * levels).round().clamp(-levels, levels - 1) / levels


def sample_bitcrush(n, length, setting, draw, sample_rate):
    """Draw `bitcrush` parameters for n examples of length T.

    Bit depth uniform among the integers of the range.
    """
    return {"bits": draw.integers(*setting["bits"], n)}


CODEC_FRAME = 1152  # samples per frame, as in MP3 (two 576-line granules)
CODEC_BANDS = 32  # equal-width sub-bands, as MP3's polyphase filter bank


def codec(x, cutoff_hz, snr_db, sample_rate):
    """Lossy-codec simulation: band-limiting plus sub-band quantization in an STFT domain.

    Simulated, not a real MP3 round trip: this runs batched on the batch's device inside
    the training loop and is deterministic, while an encode/decode through soundfile
    (libsndfile's LAME) would need a per-clip loop on CPU with file I/O and depends on how
    the installed libsndfile was built. What it keeps of an MP3 coder at its lowest
    quality: the encoder's low-pass (everything above `cutoff_hz` is removed) and coarse
    quantization of each of 32 sub-bands per frame, with a step set so that quantization
    noise sits `snr_db` below that band's energy; coefficients below half a step vanish,
    giving the holes and "birdies" typical of low bit rates.

    Args:
        x: `[B, T]`; cutoff_hz, snr_db: `[B]`.
    """
    batch, length = x.shape
    hop = CODEC_FRAME // 2
    window = hann_window(CODEC_FRAME, x.device)
    # Zero padding at the ends (not reflection) works for clips shorter than a frame.
    spec = torch.stft(x, CODEC_FRAME, hop, window=window, pad_mode="constant", return_complex=True)  # [B, F, N]
    bins = spec.shape[1]
    frequency = torch.linspace(0, sample_rate / 2, bins, device=x.device)
    spec = spec * (frequency[None, :] <= cutoff_hz[:, None])[:, :, None]
    parts = torch.view_as_real(spec)  # [B, F, N, 2]
    band_of_bin = torch.div(torch.arange(bins) * CODEC_BANDS, bins, rounding_mode="floor")  # [F] host
    # Counted on the host: bincount on a device sizes its output from the data (a sync).
    band_size = to_device(torch.bincount(band_of_bin, minlength=CODEC_BANDS).to(x.dtype), x.device)  # [CODEC_BANDS]
    band_of_bin = to_device(band_of_bin, x.device)
    energy = parts.pow(2).sum(-1)  # [B, F, N]
    band_energy = torch.zeros(batch, CODEC_BANDS, energy.shape[-1], device=x.device)
    band_energy.index_add_(1, band_of_bin, energy)
    # Uniform quantization with step s adds noise of power s²/12 per real value.
    mean_power = band_energy / (2 * band_size[None, :, None])  # [B, bands, N] per real value
    step = torch.sqrt(12 * mean_power * torch.pow(10.0, -snr_db / 10)[:, None, None])
    step = step.index_select(1, band_of_bin).clamp(min=1e-12)[..., None]  # [B, F, N, 1]
    quantized = torch.round(parts / step) * step
    return torch.istft(torch.view_as_complex(quantized.contiguous()), CODEC_FRAME, hop, window=window, length=length)


def sample_codec(n, length, setting, draw, sample_rate):
    """Draw `codec` parameters for n examples of length T.

    Cutoff (at most Nyquist) and SNR uniform in their ranges.
    """
    low, high = setting["cutoff_hz"]
    top = sample_rate / 2
    return {
        "cutoff_hz": draw.uniform(min(low, top), min(high, top), n),
        "snr_db": draw.uniform(*setting["snr_db"], n),
        "sample_rate": sample_rate,
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
    "stretch": (stretch, sample_stretch),
    "splice": (splice, sample_splice),
    "reverb": (reverb, sample_reverb),
    "chorus": (chorus, sample_chorus),
    "distortion": (distortion, sample_distortion),
    "compress": (compress, sample_compress),
    "reverse": (reverse, sample_reverse),
    "bitcrush": (bitcrush, sample_bitcrush),
    "codec": (codec, sample_codec),
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
    peak = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True)  # [B, 1]
    return x / peak.clamp(min=1.0)


class Chain:
    """A sequence of transforms applied per example, decided per clip as the authors' chain.

    Attributes:
        names: transform names in application order.
        severity: s, scales ranges and probabilities through SEVERITY_TABLE.
        sample_rate: Hz, for parameters given in Hz or milliseconds.
        pitch_shifts: "fast" or "continuous" (see PITCH_SHIFT_SETS).
        probability: chance that a clip is augmented at all, min(1, 0.8·s).
        settings: name -> that transform's row of SEVERITY_TABLE at s (its "p" included).
    """

    def __init__(self, names, severity=1.0, sample_rate=22050, pitch_shifts="fast"):
        unknown = [name for name in names if name not in TRANSFORMS]
        if unknown:
            raise ValueError(f"unknown augmentation(s) {unknown}; valid names: {', '.join(TRANSFORM_NAMES)}")
        if severity < 0:
            raise ValueError(f"severity must be >= 0, got {severity}")
        if pitch_shifts not in PITCH_SHIFT_SETS:
            raise ValueError(f"pitch_shifts must be one of {', '.join(PITCH_SHIFT_SETS)}, got {pitch_shifts!r}")
        self.names = list(names)
        self.severity = float(severity)
        self.sample_rate = int(sample_rate)
        self.pitch_shifts = pitch_shifts
        self.probability = min(1.0, CHAIN_PROBABILITY_SLOPE * self.severity)
        self.settings = {name: SEVERITY_TABLE[name](self.severity) for name in self.names} if severity > 0 else {}
        if "pitch" in self.settings:
            self.settings["pitch"]["shifts"] = pitch_shifts

    def __repr__(self):
        return (f"Chain(names={self.names}, severity={self.severity}, sample_rate={self.sample_rate}, "
                f"pitch_shifts={self.pitch_shifts!r})")

    def __call__(self, x, generator=None, views=1, clip_ids=None, record=None):
        """Augment a batch whose rows [k·views, (k+1)·views) are the views of clip k.

        As the authors' chain, called once per clip on its views: whether the chain runs
        at all, and which filter type it uses, is drawn once per clip; each transform's
        probability and parameters are drawn per view. The decisions are drawn on the
        host, so choosing the rows a transform touches never waits for the device.

        Args:
            x: `[B, T]` float32, bfloat16 or float16 audio on any device.
            generator: optional torch.Generator (on CPU or on x's device) making the
                draws reproducible; None uses the global RNGs.
            views: views per clip; B must be a multiple of it (1: every row its own clip).
            clip_ids: optional `[B]` clip id of each row, instead of `views`: rows with
                the same id are views of one clip, wherever they are. Read on the host:
                pass a CPU tensor (a device tensor is copied, which synchronises).
            record: optional dict; when given, each applied transform's name maps to
                {"index": its rows `[K]`, and its drawn parameters} (for tests and
                `bench.py compare-augment`).
        Returns:
            `[B, T]` tensor of x's dtype and device; x itself when severity is 0 or the
            chain is empty.
        """
        if self.severity == 0 or not self.names:
            return x
        batch, length = x.shape
        if clip_ids is not None:
            if len(clip_ids) != batch:
                raise ValueError(f"clip_ids has {len(clip_ids)} entries for a batch of {batch} rows")
            _, clip_of_row = torch.unique(torch.as_tensor(clip_ids).cpu(), return_inverse=True)  # [B] host
        elif views < 1 or batch % views:
            raise ValueError(f"a batch of {batch} rows is not a whole number of clips of {views} views")
        else:
            clip_of_row = torch.arange(batch) // views  # [B] host
        clips = int(clip_of_row.max()) + 1 if batch else 0
        draw = Draw(generator, x.device)
        out = x.to(torch.float32, copy=True)  # transforms compute in float32 whatever the input
        is_augmented = draw.chance(self.probability, clips)[clip_of_row]  # [B] host, per clip
        if "filter" in self.names:  # the authors' OneOf picks one filter type per call, i.e. per clip
            filter_kind = draw.integers(0, len(FILTER_KINDS) - 1, clips)[clip_of_row]  # [B] host
        for name in self.names:
            setting = self.settings[name]
            is_chosen = is_augmented & draw.chance(setting["p"], batch)  # [B] host, per view
            index = torch.nonzero(is_chosen).squeeze(1)  # [K] host: no device sync
            if index.numel() == 0:
                continue
            transform, sampler = TRANSFORMS[name]
            extra = {"kind": filter_kind[index]} if name == "filter" else {}
            params = sampler(index.numel(), length, setting, draw, self.sample_rate, **extra)
            if record is not None:
                record[name] = {"index": index, **params}
            on_host = HOST_PARAMETERS.get(name, set())
            params = {key: value if key in on_host else to_device(value, x.device) for key, value in params.items()}
            rows = to_device(index, x.device)
            out.index_copy_(0, rows, transform(out.index_select(0, rows), **params))
        return peak_guard(out).to(x.dtype)


def build_chain(names, severity=1.0, sample_rate=22050, pitch_shifts="fast"):
    """Build a `Chain` from transform names (see TRANSFORM_NAMES) at severity s.

    pitch_shifts: "fast" (default, what the authors' chain applies: the few ratios
    torch-pitch-shift calls fast for the sample rate) or "continuous" (uniform in
    ±4·s semitones, as the paper describes).
    """
    return Chain(names, severity=severity, sample_rate=sample_rate, pitch_shifts=pitch_shifts)


def build_chains(names, labeled_names, severity, sample_rate, pitch_shifts="fast", on_workers=False):
    """The augmentation switch of a run, decided once: (worker_chains, device_chains).

    names, labeled_names: transform lists (parse_augment's spelling) for all views and for
    labeled clips. Each result is {"labeled": chain, "unlabeled": chain}. on_workers: the
    data workers augment each clip (worker_chains) and the device chains are the identity;
    otherwise worker_chains is None and the training step augments whole batches. Training
    and validation take this one pair, so no clip is augmented twice.
    """
    chains = {"unlabeled": build_chain(parse_augment(names), severity, sample_rate, pitch_shifts)}
    # One chain object for both when the lists agree: the step then makes one call, no split.
    chains["labeled"] = chains["unlabeled"] if labeled_names == names else \
        build_chain(parse_augment(labeled_names), severity, sample_rate, pitch_shifts)
    identity = build_chain([], 0.0, sample_rate)
    return (chains, {"labeled": identity, "unlabeled": identity}) if on_workers else (None, chains)


def label_warnings(labeled_names, columns):
    """Warnings for labeled-clip transforms that change the declared kind of a label column.

    columns: objects with `kind` and `name` (datasets.LabelColumn). Returns lines of text.
    """
    return [f"warning: transform {name!r} changes {column.kind} labels of column {column.name!r} but runs on "
            f"labeled clips; set --augment-labeled without it"
            for column in columns for name in parse_augment(labeled_names)
            if column.kind in LABEL_CHANGES.get(name, ())]

