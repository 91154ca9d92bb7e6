"""Benchmarks, one section per part of the training step; each prints a markdown table.

Sections live in the SECTIONS dict at the bottom: a section is a function taking the
parsed arguments. `all` runs every section in turn.

Usage:
    python bench.py augment                        # CPU, 2 threads, batches of 192 views
    python bench.py augment --device cuda          # on a GPU
    python bench.py all

The augment section compares, in the same run, the batched chain with the same chain
applied one clip at a time (as a data-loader worker does) and with the reference chain
built from torch-audiomentations 0.12 (gain, polarity inversion, colored noise, one of
four filters, pitch shift), when that package is importable. It is not a dependency of
this project; to install it for the comparison without touching torch:
    .venv/bin/pip install --no-deps torch-audiomentations==0.12.0 julius torch-pitch-shift primePy
"""

import argparse
import math
import os
import statistics
import time

import torch

import augment


def build_parser():
    """Command-line flags shared by all sections."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("section", choices=[*SECTIONS, "all"], help="which benchmark to run")
    parser.add_argument("--batch", type=int, default=192, help="views per batch (the paper: 96 clips x 2 views = 192)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats per row, after one warm-up; the median is shown")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (torch.set_num_threads)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to run on")
    parser.add_argument("--sample-rate", type=int, default=22050, help="audio sample rate in Hz")
    parser.add_argument("--clip-seconds", type=float, default=2.7, help="length of one view in seconds")
    parser.add_argument("--clips", type=int, default=48, help="clips timed in the one-clip-at-a-time rows")
    parser.add_argument("--seed", type=int, default=0, help="seed for the synthetic audio and the draws")
    return parser


def median_seconds(runs, repeats, device):
    """Median wall time in seconds of each function in `runs`, over `repeats` rounds after
    one warm-up round. Rounds interleave the functions, so that a change in machine load
    during the benchmark affects all of them alike."""
    times = [[] for _ in runs]
    for round_index in range(repeats + 1):
        for run, run_times in zip(runs, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_index > 0:
                run_times.append(time.perf_counter() - start)
    return [statistics.median(run_times) for run_times in times]


def synthetic_views(batch, length, sample_rate, generator):
    """`[batch, length]` harmonic tones with vibrato and a little noise, peak 0.5."""
    t = torch.arange(length) / sample_rate
    f0 = 55 * 2 ** (torch.randint(0, 48, (batch, 1), generator=generator) / 12)  # [B, 1]
    phase = 2 * math.pi * torch.cumsum(f0 * (1 + 0.005 * torch.sin(2 * math.pi * 5 * t)) / sample_rate, -1)  # [B, T]
    x = sum(torch.sin(k * phase) / k for k in range(1, 8)) + 0.05 * torch.randn(batch, length, generator=generator)
    return 0.5 * x / x.abs().amax(-1, keepdim=True)


def reference_chain(sample_rate):
    """The reference implementation's chain, built from torch-audiomentations 0.12."""
    import torch_audiomentations as ta

    tensor = {"output_type": "tensor"}
    filters = [
        ta.BandPassFilter(200, 4000, 0.5, 1.99, p=0.3, sample_rate=sample_rate, **tensor),
        ta.BandStopFilter(200, 4000, 0.5, 1.99, p=0.3, sample_rate=sample_rate, **tensor),
        ta.HighPassFilter(200, 2400, p=0.3, sample_rate=sample_rate, **tensor),
        ta.LowPassFilter(150, 7500, p=0.3, sample_rate=sample_rate, **tensor),
    ]
    return ta.Compose(
        [
            ta.Gain(-15.0, 5.0, p=0.4, **tensor),
            ta.PolarityInversion(p=0.6, **tensor),
            ta.AddColoredNoise(3.0, 30.0, -2.0, 2.0, p=0.6, sample_rate=sample_rate, **tensor),
            ta.OneOf(filters, **tensor),
            ta.PitchShift(-4.0, 4.0, p=0.6, sample_rate=sample_rate, **tensor),
        ],
        p=0.8,
        **tensor,
    )


def bench_augment(args):
    """Views per second of each transform alone, the default chain batched and per clip,
    and the torch-audiomentations reference chain per clip."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    length = round(args.clip_seconds * args.sample_rate)
    generator = torch.Generator().manual_seed(args.seed)
    views = synthetic_views(args.batch, length, args.sample_rate, generator).to(device)
    clips = views[: min(args.clips, args.batch)]
    rows = []  # (what, views per second)

    def batched(chain):
        return lambda: chain(views, generator)

    def per_clip(apply):
        return lambda: [apply(clip[None]) for clip in clips]

    for name in augment.TRANSFORM_NAMES:
        chain = augment.build_chain([name], severity=1.0, sample_rate=args.sample_rate)
        chain.probability = 1.0  # every view, so the row measures the transform itself
        chain.settings[name]["p"] = 1.0
        (seconds,) = median_seconds([batched(chain)], args.repeats, device)
        rows.append((f"{name} alone (p = 1), batched", args.batch / seconds))
    chain = augment.build_chain(list(augment.DEFAULT_AUGMENT), severity=1.0, sample_rate=args.sample_rate)
    runs = [batched(chain), per_clip(lambda clip: chain(clip, generator))]
    try:
        reference = reference_chain(args.sample_rate)
    except ImportError:
        reference = None
    else:
        runs.append(per_clip(lambda clip: reference(clip[:, None])))  # [1, 1, T]: batch, channel, time
    seconds = median_seconds(runs, args.repeats, device)
    batched_rate = args.batch / seconds[0]
    rows.append(("default chain (s = 1), batched", batched_rate))
    rows.append(("default chain (s = 1), one clip at a time", len(clips) / seconds[1]))
    if reference is None:
        rows.append(("reference chain: torch-audiomentations not installed (see `python bench.py --help`)", None))
    else:
        reference_rate = len(clips) / seconds[2]
        rows.append(("reference chain (torch-audiomentations 0.12), one clip at a time", reference_rate))
        rows.append((f"batched default chain / reference: {batched_rate / reference_rate:.1f}x", None))

    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"\naugment: {args.batch} views of {length} samples ({args.clip_seconds} s at {args.sample_rate} Hz), "
          f"device {device}, {torch.get_num_threads()} threads, median of {args.repeats}; "
          f"per-clip rows time {len(clips)} clips; machine load average {load}\n")
    print("| what | views/s |")
    print("|---|---:|")
    for what, rate in rows:
        print(f"| {what} | {'' if rate is None else f'{rate:,.0f}'} |")


SECTIONS = {"augment": bench_augment}


def main():
    args = build_parser().parse_args()
    for name, section in SECTIONS.items():
        if args.section in (name, "all"):
            section(args)


if __name__ == "__main__":
    main()
