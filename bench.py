"""Benchmarks, one section per part of the training step; each prints a markdown table.

Sections live in the SECTIONS dict at the bottom: a section is a function taking the
parsed arguments. `all` runs every section in turn.

Usage:
    python bench.py augment                        # CPU, 2 threads, batches of 192 views
    python bench.py augment --device cuda          # on a GPU
    python bench.py loss                           # target + loss, ours vs the reference formulation
    python bench.py train                          # data reading and the whole training step
    python bench.py all                            # every section but gpu
    python bench.py gpu                            # make gpu-check: the CUDA path checked and timed
    python bench.py gpu --tiny                     # the same on a CPU at a tiny size (CI)
    python bench.py all --report docs/bench-results.md   # make bench: the tables, dated, to a file
    python bench.py compare-augment --reference-path DIR   # our chain next to the authors' (below)

The loss section times building the target matrix plus the loss forward and backward
(multilabel, half of each batch labeled) for N = 192 ... 16384 views and C = 50, 188,
next to a re-implementation of the reference formulation (pairwise N x N x C label
comparison through index grids, exp without max-subtraction, 1e-6 inside the log), each
case in a fresh process whose address space is capped, so that an out-of-memory case is
reported as such instead of swapping.

The train section measures crops/s from WAV, FLAC, MP3 and the pre-decoded cache for a
30 s and a 10 min file, then the whole training step of train.py (its logged clips/s)
next to the encoder's forward and backward alone, with 1 and 2 gloo processes.

The augment section compares, in the same run, the batched chain with the same chain
applied one clip at a time (as a data-loader worker does) and with the reference chain
built from torch-audiomentations 0.12 (gain, polarity inversion, colored noise, one of
four filters, pitch shift), when that package is importable. It is not a dependency of
this project; to install it for the comparison without touching torch:
    .venv/bin/pip install --no-deps torch-audiomentations==0.12.0 julius torch-pitch-shift primePy

The compare-augment section runs the authors' chain (torch-audiomentations 0.12 with their
configuration's formulas, called once per clip on [2, 1, T], plus a re-implementation of
their Delay) and ours on the same inputs, each transform alone at severities 0.5, 1 and 2
and then the whole chain, and prints the drawn parameters and statistics of the outputs
side by side (docs/augmentations.md). It reads torch-audiomentations from a separate folder:
    .venv/bin/pip install --target /tmp/ta --no-deps torch-audiomentations==0.12.0 julius torch-pitch-shift primePy
    .venv/bin/python bench.py compare-augment --reference-path /tmp/ta
"""

import argparse
import contextlib
import json
import math
import multiprocessing
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy
import pandas
import soundfile
import torch

import augment
import datasets
import losses
import models
import safety
import synthetic


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
    parser.add_argument("--sizes", default="", help="loss: N views to time, comma-separated (192,1024,4096,16384)")
    parser.add_argument("--memory-cap-gb", type=float, default=LOSS_MEMORY_CAP_GB,
                        help="loss: address-space cap per measured case, GiB")
    parser.add_argument("--train-encoder", default="samplecnn", help="train: encoder")
    parser.add_argument("--train-width", type=float, default=0.25, help="train: width multiplier")
    parser.add_argument("--train-clip-seconds", type=float, default=1.23, help="train: clip length in seconds")
    parser.add_argument("--train-sample-rate", type=int, default=16000, help="train: sample rate in Hz")
    parser.add_argument("--train-batch", type=int, default=64, help="train: clips per step (global)")
    parser.add_argument("--train-steps", type=int, default=30, help="train: steps per configuration")
    parser.add_argument("--tiny", action="store_true",
                        help="gpu: a small model on short clips instead of the paper's settings (the CPU variant)")
    parser.add_argument("--gpu-steps", type=int, default=200, help="gpu: training steps of the timed run")
    parser.add_argument("--gpu-batch-cap", type=int, default=8192, help="gpu: largest batch (clips) tried")
    parser.add_argument("--report", default="",
                        help="also write what the section(s) print to this file, under a header line (date, "
                             "machine: CPU count and GPU, torch version, load average)")
    parser.add_argument("--compare-clips", type=int, default=300, help="compare-augment: clips (2 views each) per case")
    parser.add_argument("--compare-transforms", default=",".join(COMPARE_NAMES),
                        help="compare-augment: transforms to compare alone, comma-separated (default: the paper's six, "
                             "then the whole chain; a subset leaves the whole chain out)")
    parser.add_argument("--reference-path", default=os.environ.get("SEMISUPCON_REFERENCE_PATH", ""),
                        help="compare-augment: folder holding torch-audiomentations 0.12 and its dependencies "
                             "(pip install --target DIR --no-deps ...), put on sys.path for this section only "
                             "(default: $SEMISUPCON_REFERENCE_PATH)")
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


# ---------------------------------------------------------------- loss

LOSS_SIZES = (192, 1024, 4096, 16384)
LOSS_CLASSES = (50, 188)
LOSS_MEMORY_CAP_GB = 16


def reference_loss(z, clip_ids, tags, labeled, temperature=0.1, threshold=1):
    """The reference formulation, re-implemented for comparison (not used in training).

    Labels are compared pair by pair through index grids, which materializes an
    N x N x C tensor; the softmax uses exp without subtracting the row maximum and
    adds 1e-6 inside the log.
    """
    n = len(z)
    z = torch.nn.functional.normalize(z, dim=1)
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    pair_tags = tags[rows] * tags[cols]  # [N, N, C]
    shared = pair_tags.sum(-1)
    both = (labeled[rows] & labeled[cols]).float()
    same_clip = (clip_ids[rows] == clip_ids[cols]).float()
    eye = torch.eye(n)
    target = torch.maximum(same_clip, (shared >= threshold).float() * both) * (1 - eye)
    similarity = z @ z.T / temperature
    exp_similarity = torch.exp(similarity) * (1 - eye)
    log_prob = similarity - torch.log(exp_similarity.sum(1, keepdim=True) + 1e-6)
    has_positive = target.sum(1) > 0
    row_loss = -(target * log_prob).sum(1)[has_positive] / target.sum(1)[has_positive]
    return row_loss.mean()


def ours_loss(z, clip_ids, tags, labeled, temperature=0.1, threshold=1):
    """This project's loss on the same inputs."""
    spec = losses.TargetSpec("multilabel", threshold=threshold)
    target = losses.build_target(clip_ids, [losses.Signal(tags, labeled, spec)])
    return losses.contrastive_loss(z, target, temperature, has_zero_self_pairs=True)


def loss_inputs(n, classes, seed=0):
    """N views of N/2 clips, half the clips labeled, ~3 tags each; projections `[N, 128]`."""
    generator = torch.Generator().manual_seed(seed)
    clips = n // 2
    clip_ids = torch.arange(clips).repeat_interleave(2)
    labeled = (torch.arange(clips) % 2 == 0).repeat_interleave(2)
    tags = (torch.rand(clips, classes, generator=generator) < 3 / classes).float().repeat_interleave(2, 0)
    z = torch.randn(n, 128, generator=generator)
    return z, clip_ids, tags, labeled


def current_rss():
    """Resident memory of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss():
    """Start the high-water mark of resident memory again from now (Linux: clear_refs 5),
    so that a peak reached while importing is not taken for the measured case's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss():
    """High-water resident memory of this process in bytes since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    return int(kib) * 1024


def loss_worker(formulation, n, classes, repeats, cap_gb, queue):
    """Subprocess body: time forward + backward of one formulation under a memory cap."""
    torch.set_num_threads(2)
    function = {"reference": reference_loss, "ours": ours_loss}[formulation]
    z, clip_ids, tags, labeled = loss_inputs(n, classes)
    with open("/proc/self/statm") as f:
        virtual = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    # Cap the address space just above what is mapped now: an allocation past the cap
    # fails with an error instead of driving the machine into swap.
    limit = virtual + int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    baseline = current_rss()
    reset_peak_rss()
    times, value = [], None
    try:
        for _ in range(repeats):
            leaf = z.clone().requires_grad_(True)
            start = time.perf_counter()
            loss = function(leaf, clip_ids, tags, labeled)
            loss.backward()
            times.append(time.perf_counter() - start)
            value = loss.item()
        queue.put({"ok": True, "seconds": statistics.median(times), "loss": value,
                   "peak_mb": max(0, peak_rss() - baseline) / 2**20})
    except (RuntimeError, MemoryError) as error:
        queue.put({"ok": False, "error": str(error).splitlines()[0][:80]})


def run_loss_case(formulation, n, classes, repeats, cap_gb):
    """One (formulation, N, C) measurement in a fresh process; the result dict."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=loss_worker, args=(formulation, n, classes, repeats, cap_gb, queue))
    process.start()
    process.join()
    if not queue.empty():
        return queue.get()
    return {"ok": False, "error": f"killed (exit code {process.exitcode})"}


def bench_loss(args):
    """Target + loss forward/backward: ours vs the reference formulation, side by side."""
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else LOSS_SIZES
    print(f"loss: multilabel, half of each batch labeled, D=128, 2 threads, memory cap "
          f"{args.memory_cap_gb} GiB per case, median of {args.repeats}")
    print("| N views | C | ours time (s) | ours peak (MiB) | reference time (s) | reference peak (MiB) "
          "| time ratio | memory ratio | loss (ours / reference) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for classes in LOSS_CLASSES:
        for n in sizes:
            ours = run_loss_case("ours", n, classes, args.repeats, args.memory_cap_gb)
            reference = run_loss_case("reference", n, classes, args.repeats, args.memory_cap_gb)
            ours_cells = [f"{ours['seconds']:.4f}", f"{ours['peak_mb']:.0f}"] if ours["ok"] else \
                ["out of memory", "-"]
            if reference["ok"]:
                ref_cells = [f"{reference['seconds']:.4f}", f"{reference['peak_mb']:.0f}"]
            else:
                ref_cells = ["out of memory" if "alloc" in reference["error"] or "memory" in reference["error"]
                             else reference["error"], "-"]
            both = ours["ok"] and reference["ok"]
            ratios = [f"{reference['seconds'] / ours['seconds']:.1f}x",
                      f"{reference['peak_mb'] / max(ours['peak_mb'], 1):.0f}x"] if both else ["-", "-"]
            values = f"{ours['loss']:.5f} / {reference['loss']:.5f}" if both else \
                (f"{ours['loss']:.5f} / -" if ours["ok"] else "-")
            print(f"| {n} | {classes} | " + " | ".join(ours_cells + ref_cells + ratios + [values]) + " |",
                  flush=True)


# ---------------------------------------------------------------- train

ROOT = os.path.dirname(os.path.abspath(__file__))


def write_test_audio(folder, seconds, sample_rate=44100):
    """A stereo tone-and-noise file of `seconds` in WAV, FLAC and MP3; returns {format: path}."""
    generator = torch.Generator().manual_seed(0)
    views = synthetic_views(2, int(seconds * sample_rate), sample_rate, generator).T.numpy()  # [T, 2]
    paths = {}
    for fmt, subtype in (("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("MP3", None)):
        path = os.path.join(folder, f"{int(seconds)}s.{fmt.lower()}")
        soundfile.write(path, views, sample_rate, format=fmt, subtype=subtype)
        paths[fmt] = path
    return paths


def crops_per_second(path, clip_samples, sample_rate, repeats):
    """read_crops calls of 2 views on one file; crops per second (median of rounds of 8 calls)."""
    rng = numpy.random.default_rng(0)

    def eight_calls():
        for _ in range(8):
            datasets.read_crops(path, 2, clip_samples, sample_rate, rng)

    seconds = median_seconds([eight_calls], repeats, torch.device("cpu"))[0]
    return 16 / seconds


def run_measured(command, environment=None):
    """Run a command; returns (completed process, peak resident MiB of its process tree)."""
    launcher = ("import resource, subprocess, sys\n"
                "code = subprocess.run(sys.argv[1:]).returncode\n"
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
                "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", launcher, *command], cwd=ROOT, env=environment,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result, int(result.stderr.strip().splitlines()[-1]) / 1024


def logged_speed(folder):
    """Median clips/s that train.py logged, leaving out the first interval (warm-up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(folder)
    events.Reload()
    values = [e.value for e in events.Scalars("speed/clips_per_s")]
    return statistics.median(values[1:] if len(values) > 1 else values)


ENCODER_ALONE = """
import sys, time, statistics, torch, models
encoder, width, samples, rate, clips, repeats, threads = sys.argv[1:]
torch.set_num_threads(int(threads))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model = models.ContrastiveModel(models.build_encoder(encoder, int(samples), int(rate), float(width))).to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
views = torch.randn(2 * int(clips), int(samples), device=device) * 0.3
times = []
for index in range(int(repeats) + 1):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    # The same precision as train.py's default: bf16 autocast on a GPU, fp32 on a CPU.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = model(views).float().square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
print(int(clips) / statistics.median(times[1:]))
"""


def matmul_peak(threads, repeats):
    """Measured dense matmul throughput in FLOP/s: fp32 on the CPU, bf16 on a GPU."""
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = 4096 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = median_seconds([lambda: a @ b], repeats, device)[0]
    return 2 * size ** 3 / seconds


def step_flops_per_clip(args, clip_samples):
    """Model FLOPs of one training clip: 2 views x (forward + backward = 3 forwards) x 2 FLOPs/MAC."""
    encoder = models.build_encoder(args.train_encoder, clip_samples, args.train_sample_rate, args.train_width)
    model = models.ContrastiveModel(encoder)
    return 2 * 3 * 2 * models.count_macs(model, torch.zeros(2, clip_samples))


def bench_train(args):
    """Data reading, then the whole training step next to the encoder alone, side by side."""
    sample_rate = args.train_sample_rate
    clip_samples = int(round(args.train_clip_seconds * sample_rate))
    folder = tempfile.mkdtemp(prefix="bench-train-")
    print(f"\ntrain: data reading, 2-view crops of {args.train_clip_seconds} s resampled to {sample_rate} Hz "
          f"from 44.1 kHz stereo files; median of {args.repeats} rounds of 8 calls, one process")
    print("| source | crops/s, 30 s file | crops/s, 10 min file | 10 min cost / 30 s cost |")
    print("|---|---:|---:|---:|")
    files = {seconds: write_test_audio(folder, seconds) for seconds in (30, 600)}
    rows = {}
    for fmt in ("WAV", "FLAC", "MP3"):
        rows[fmt] = [crops_per_second(files[s][fmt], clip_samples, sample_rate, args.repeats) for s in (30, 600)]
    manifest = os.path.join(folder, "files.csv")
    pandas.DataFrame({"path": [files[30]["WAV"], files[600]["WAV"]]}).to_csv(manifest, index=False)
    cached = pandas.read_csv(datasets.write_cache(manifest, os.path.join(folder, "cache"), sample_rate, workers=1))
    cache_paths = [os.path.join(folder, "cache", p) for p in cached["path"]]
    rows["cache (int16 .npy)"] = [crops_per_second(p, clip_samples, sample_rate, args.repeats) for p in cache_paths]
    for name, (short, long) in rows.items():
        print(f"| {name} | {short:,.0f} | {long:,.0f} | {short / long:.2f}x |")

    # The training step: a synthetic corpus, pre-decoded, read by 2 workers.
    corpus = synthetic.make_synthetic_set(os.path.join(folder, "corpus"), num_files=256, seconds=3.0,
                                         sample_rate=sample_rate)
    corpus_cache = datasets.write_cache(corpus, os.path.join(folder, "corpus-cache"), sample_rate, workers=2)
    model_flags = ["--encoder", args.train_encoder, "--width", str(args.train_width), "--clip-seconds",
                   str(args.train_clip_seconds), "--sample-rate", str(sample_rate)]
    loop_flags = model_flags + ["--batch-size", str(args.train_batch), "--steps", str(args.train_steps),
                                "--log-every", str(max(1, args.train_steps // 6)), "--val-every", "0",
                                "--save-every", str(10 * args.train_steps), "--skip-check", "--resume", "none"]
    environment = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    alone, alone_peak = run_measured([sys.executable, "-c", ENCODER_ALONE, args.train_encoder,
                                      str(args.train_width), str(clip_samples), str(sample_rate),
                                      str(args.train_batch), str(args.repeats), str(args.threads)], environment)
    alone_rate = float(alone.stdout.strip().splitlines()[-1])
    table = [("encoder + head forward, backward, Adam (random batch, no data)", alone_rate, alone_peak)]
    cases = [("full step, 1 process, pre-decoded cache, 2 workers",
              [sys.executable, "train.py", "--train-csv", corpus_cache, "--workers", "2"]),
             ("full step, 1 process, WAV decoded in 2 workers",
              [sys.executable, "train.py", "--train-csv", corpus, "--workers", "2"]),
             ("full step, 2 gloo processes (same global batch), cache, 1 worker each",
              [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               "--train-csv", corpus_cache, "--workers", "1"])]
    for index, (name, command) in enumerate(cases):
        out = os.path.join(folder, f"run{index}")
        threads = args.threads if "nproc" not in " ".join(command) else max(1, args.threads // 2)
        _, peak = run_measured(command + loop_flags + ["--out", out], dict(environment, OMP_NUM_THREADS=str(threads)))
        table.append((name, logged_speed(out), peak))
    print(f"\ntrain: {args.train_encoder} width {args.train_width}, {args.train_batch} clips x 2 views of "
          f"{args.train_clip_seconds} s at {sample_rate} Hz, default augmentation chain on the device; "
          f"{args.train_steps} steps, clips/s is the median logged rate after the first interval; "
          f"{args.threads} threads; machine load average {os.getloadavg()[0]:.1f}")
    peak_flops = matmul_peak(args.threads, args.repeats)
    flops_per_clip = step_flops_per_clip(args, clip_samples)
    print(f"model FLOPs per clip (2 views, forward + backward): {flops_per_clip / 1e9:.2f} G; measured matmul "
          f"peak {peak_flops / 1e9:,.1f} GFLOP/s")
    print("| configuration | clips/s | steps/s | time vs encoder alone | model GFLOP/s | share of matmul peak "
          "| peak memory (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, rate, peak in table:
        achieved = rate * flops_per_clip
        print(f"| {name} | {rate:,.1f} | {rate / args.train_batch:.3f} | {alone_rate / rate:.2f}x | "
              f"{achieved / 1e9:,.1f} | {achieved / peak_flops:.0%} | {peak:,.0f} |")
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------- compare-augment

COMPARE_SEVERITIES = (0.5, 1.0, 2.0)
COMPARE_NAMES = ("gain", "polarity", "noise", "filter", "pitch", "delay")


def import_reference(path):
    """torch-audiomentations 0.12 (the authors' chain), imported from `path` when given
    (a `pip install --target` folder, put on sys.path only here), else from the
    environment; None when it is not importable."""
    if path:
        sys.path.insert(0, path)
    try:
        import torch_audiomentations
    except ImportError:
        return None
    return torch_audiomentations


def authors_delay_class(ta):
    """The authors' Delay (SemiSupCon, dataloading/custom_augmentations/delay.py),
    re-implemented from reading it, as a torch-audiomentations transform (per-example mode).

    Per selected view: lag uniform among whole samples int(min_ms·sr/1000) ...
    int(max_ms·sr/1000); volume v0 ± 0.2, repeats r0 ± 1 (r0 = int(repeats)),
    attenuation a0 ± 0.2, each side with equal chance; output
    (x + v · sum_{i<repeats} a^i · x[t - i·lag]) / 2, the i = 0 copy undelayed.
    """
    from torch_audiomentations.core.transforms_interface import BaseWaveformTransform
    from torch_audiomentations.utils.object_dict import ObjectDict

    class AuthorsDelay(BaseWaveformTransform):
        supported_modes = {"per_example"}

        def __init__(self, min_delay_ms, max_delay_ms, volume_factor, repeats, attenuation, p, sample_rate):
            super().__init__(mode="per_example", p=p, sample_rate=sample_rate, output_type="dict")
            self.lags = range(int(min_delay_ms * sample_rate / 1000), int(max_delay_ms * sample_rate / 1000) + 1)
            self.centres = (volume_factor, int(repeats), attenuation)

        def randomize_parameters(self, samples=None, sample_rate=None, targets=None, target_rate=None):
            n = samples.shape[0]
            volume, repeats, attenuation = self.centres
            self.transform_parameters.update(
                lag=random.choices(self.lags, k=n),
                volume=random.choices([volume - 0.2, volume + 0.2], k=n),
                repeats=random.choices([repeats - 1, repeats + 1], k=n),
                attenuation=random.choices([attenuation - 0.2, attenuation + 0.2], k=n),
            )

        def apply_transform(self, samples=None, sample_rate=None, targets=None, target_rate=None):
            drawn = self.transform_parameters
            length = samples.shape[-1]
            for i in range(samples.shape[0]):
                lag, repeats = drawn["lag"][i], max(0, drawn["repeats"][i])
                delayed = torch.zeros(samples.shape[1], length + repeats * lag)
                for k in range(repeats):
                    delayed[:, k * lag : k * lag + length] += samples[i] * drawn["attenuation"][i] ** k
                samples[i] = (samples[i] + drawn["volume"][i] * delayed[:, :length]) / 2
            return ObjectDict(samples=samples, sample_rate=sample_rate, targets=targets, target_rate=target_rate)

    return AuthorsDelay


def authors_transform(ta, name, s, sample_rate):
    """One transform of the authors' chain at severity s, with their configuration's
    formulas (SemiSupCon datamodules.get_aug_chain, severity_modifier = s)."""
    common = {"sample_rate": sample_rate, "output_type": "dict"}
    if name == "gain":
        return ta.Gain(min_gain_in_db=-15.0 * s, max_gain_in_db=5.0 * s, p=min(0.7, 0.4 * s), **common)
    if name == "polarity":
        return ta.PolarityInversion(p=min(0.8, 0.6 * s), **common)
    if name == "noise":
        return ta.AddColoredNoise(p=min(0.8, 0.6 * s), min_snr_in_db=3 / s, max_snr_in_db=30 / s,
                                  min_f_decay=-2 * s, max_f_decay=2 * s, **common)
    if name == "filter":
        p = min(0.6, 0.3 * s)
        return ta.OneOf([
            ta.BandPassFilter(p=p, min_center_frequency=200, max_center_frequency=4000,
                              min_bandwidth_fraction=0.5 * s, max_bandwidth_fraction=1.99, **common),
            ta.BandStopFilter(p=p, min_center_frequency=200, max_center_frequency=4000,
                              min_bandwidth_fraction=0.5 * s, max_bandwidth_fraction=1.99, **common),
            ta.HighPassFilter(p=p, min_cutoff_freq=200 * s, max_cutoff_freq=min(0.5 * sample_rate, 2400 * s), **common),
            ta.LowPassFilter(p=p, min_cutoff_freq=max(75, 150 / s), max_cutoff_freq=7500 / max(1, s), **common),
        ], output_type="dict")
    if name == "pitch":
        return ta.PitchShift(p=min(0.75, 0.6 * s), min_transpose_semitones=-4 * s, max_transpose_semitones=4 * s,
                             **common)
    if name == "delay":
        return authors_delay_class(ta)(100 / s, 500, 0.5 * s, 2 * s, min(1, 0.5 * s), min(0.6, 0.6 * s), sample_rate)
    raise ValueError(name)


def run_authors_chain(ta, names, s, clips, sample_rate):
    """The authors' Compose called once per clip on `[2, 1, T]`, as their datasets do.

    Returns (outputs `[N, 2, T]`, filter kind per view `[N, 2]`: the index into
    augment.FILTER_KINDS of the filter that changed the view, -1 for none; the drawn
    parameters of the applied views, {name: `[K]`})."""
    transforms = [authors_transform(ta, name, s, sample_rate) for name in names]
    chain = ta.Compose(transforms, p=min(1.0, 0.8 * s), output_type="dict")
    one_of = transforms[names.index("filter")] if "filter" in names else None
    leaves = [t for transform in transforms for t in getattr(transform, "transforms", [transform])]
    outputs, kinds, drawn = [], torch.full(clips.shape[:2], -1), {}
    for k, clip in enumerate(clips):
        for transform in leaves:  # parameters left from an earlier call would read as drawn now
            transform.transform_parameters = {}
        if one_of is not None:
            one_of.transform_indexes = []
        outputs.append(chain(clip[:, None].clone()).samples[:, 0])
        if one_of is not None and one_of.transform_indexes:
            kind = one_of.transform_indexes[0]
            applied = one_of.transforms[kind].transform_parameters.get("should_apply")
            if applied is not None:
                kinds[k][applied.cpu()] = kind
        for transform in leaves:
            parameters = transform.transform_parameters
            if parameters.get("should_apply") is not None and bool(parameters["should_apply"].any()):
                for key, value in authors_parameters(transform, parameters).items():
                    drawn.setdefault(key, []).extend(value)
    return torch.stack(outputs), kinds, {key: torch.tensor(value, dtype=torch.float64) for key, value in drawn.items()}


def authors_parameters(transform, parameters):
    """The parameters one torch-audiomentations transform drew for its applied views, under
    the names our samplers use ({name: list of floats})."""
    kind = type(transform).__name__
    if kind == "Gain":
        return {"gain_db": (20 * torch.log10(parameters["gain_factors"].flatten())).tolist()}
    if kind == "AddColoredNoise":
        return {"snr_db": parameters["snr_in_db"].tolist(), "decay": parameters["f_decay"].tolist()}
    if kind in ("BandPassFilter", "BandStopFilter"):
        return {f"{kind} centre Hz": parameters["center_freq"].tolist(), "bandwidth": parameters["bandwidth"].tolist()}
    if kind in ("HighPassFilter", "LowPassFilter"):
        return {f"{kind} cut-off Hz": parameters["cutoff_freq"].tolist()}
    if kind == "PitchShift":
        return {"semitones": [12 * math.log2(ratio) for ratio in parameters["transpositions"]]}
    if kind == "AuthorsDelay":
        return {name: [float(v) for v in parameters[name]] for name in ("lag", "volume", "repeats", "attenuation")}
    return {}


def our_parameters(record):
    """Our chain's recorded draws under the same names as `authors_parameters`."""
    drawn = {}
    for name, values in record.items():
        if name == "filter":
            for k, label in enumerate(("BandPassFilter centre Hz", "BandStopFilter centre Hz",
                                       "HighPassFilter cut-off Hz", "LowPassFilter cut-off Hz")):
                drawn[label] = values["frequency_hz"][values["kind"] == k]
            drawn["bandwidth"] = values["bandwidth"][values["kind"] < 2]
        else:
            drawn.update({key: value.double() for key, value in values.items()
                          if key not in ("index", "white", "sample_rate") and torch.is_tensor(value)})
    return drawn


def parameter_statistics(drawn, sample_rate):
    """{statistic: text} of drawn parameters (see `authors_parameters`)."""
    stats = {}
    for key, values in sorted(drawn.items()):
        values = values.double()
        if key in ("volume", "repeats", "attenuation"):
            stats[f"drawn {key} (shares)"] = shares(values)
        elif key == "semitones":
            stats["drawn shifts, absolute semitones"] = str(sorted({round(abs(v), 2) for v in values.tolist()}))
        elif key == "lag":
            stats["drawn lag ms"] = summary(1000 * values / sample_rate, digits=0)
        elif key.endswith("Hz"):
            stats[f"drawn {key[:-3]}, log2 kHz"] = summary(torch.log2(values / 1000))
        else:
            stats[f"drawn {key}"] = summary(values)
    return stats


def compare_side(name, x, y, kinds, drawn, sample_rate):
    """One side of a comparison: ({statistic: text}, {check: per-view values}) from the
    drawn parameters and the outputs."""
    stats, samples = transform_statistics(name, x, y, kinds, sample_rate)
    drawn_samples = {f"drawn {key}": values.double() for key, values in sorted(drawn.items())}
    return {**parameter_statistics(drawn, sample_rate), **stats}, {**drawn_samples, **samples}


def run_our_chain(names, s, clips, sample_rate, seed):
    """Our chain on all clips at once, views of a clip in adjacent rows: (outputs `[N, 2, T]`,
    filter kind per view `[N, 2]` (-1 for none), drawn parameters)."""
    chain = augment.build_chain(list(names), s, sample_rate)
    record = {}
    outputs = chain(clips.reshape(-1, clips.shape[-1]), torch.Generator().manual_seed(seed), views=2, record=record)
    kinds = torch.full((clips.shape[0] * 2,), -1)
    if "filter" in record:
        kinds[record["filter"]["index"]] = record["filter"]["kind"]
    return outputs.reshape(clips.shape), kinds.reshape(clips.shape[:2]), our_parameters(record)


def octave_bands(x, sample_rate, low_hz, high_hz, per_octave):
    """Mean power per FFT bin of each row in bands `per_octave` to the octave:
    (centres Hz `[K]`, power `[..., K]`)."""
    power = torch.fft.rfft(x.double()).abs().pow(2)  # [..., F]
    frequency = torch.fft.rfftfreq(x.shape[-1], 1 / sample_rate)
    edges = low_hz * 2 ** (torch.arange(round(per_octave * math.log2(high_hz / low_hz)) + 1) / per_octave)
    band = torch.bucketize(frequency, edges) - 1  # [F], -1 or K outside
    inside = (band >= 0) & (band < len(edges) - 1)
    totals = torch.zeros(*power.shape[:-1], len(edges) - 1, dtype=power.dtype)
    totals.index_add_(-1, band[inside], power[..., inside])
    counts = torch.bincount(band[inside], minlength=len(edges) - 1).clamp(min=1)
    return torch.sqrt(edges[:-1] * edges[1:]), totals / counts  # power per bin: a density, flat for white noise


def level_db(x):
    """RMS level of each row in dB: `[..., T]` -> `[...]`."""
    return 20 * torch.log10(x.double().pow(2).mean(-1).sqrt().clamp(min=1e-12))


def summary(values, digits=2):
    """'median (10th-90th percentile)' of a 1-D tensor, or '-' when empty."""
    if values.numel() == 0:
        return "-"
    q = torch.quantile(values.double(), torch.tensor([0.5, 0.1, 0.9], dtype=torch.float64)).tolist()
    return f"{q[0]:.{digits}f} ({q[1]:.{digits}f} to {q[2]:.{digits}f})"


def shares(values, digits=2):
    """'value: share' of each distinct value of a 1-D tensor, most frequent first."""
    distinct, counts = torch.unique(values, return_counts=True)
    ranked = sorted(zip(counts.tolist(), distinct.tolist()), reverse=True)
    return ", ".join(f"{value:.{digits}f}: {count / len(values):.2f}" for count, value in ranked)


def transform_statistics(name, x, y, kinds, sample_rate):
    """Output statistics of one transform alone, from inputs and outputs `[N, 2, T]` (and
    the filter kind per view): ({statistic: text}, {check: `[M]` per-view values for a KS
    test}), the checks over changed views."""
    is_changed = (y != x).flatten(2).any(-1)  # [N, 2]
    stats = {"views changed": f"{is_changed.float().mean():.3f}"}
    x, y = x[is_changed], y[is_changed]  # [M, T]
    samples = {}
    if name == "gain":
        samples["gain dB"] = level_db(y) - level_db(x)
        stats["gain dB"] = summary(samples["gain dB"])
    elif name == "polarity":
        stats["inverted share"] = f"{((y * x).sum(-1) < 0).double().mean():.3f}"
    elif name == "noise":
        residual = y - x
        samples["SNR dB"] = level_db(x) - level_db(residual)
        stats["SNR dB"] = summary(samples["SNR dB"])
        centres, power = octave_bands(residual, sample_rate, 125.0, 8000.0, 3)
        octaves = torch.log2(centres / 1000)
        level = 10 * torch.log10(power.clamp(min=1e-30))  # [M, K]
        slope = ((level - level.mean(-1, keepdim=True)) * (octaves - octaves.mean())).sum(-1) / (octaves - octaves.mean()).pow(2).sum()
        samples["slope, dB/octave"] = slope
        stats["slope magnitude, dB/octave, 125 Hz-8 kHz"] = summary(slope.abs())
    elif name == "filter":
        kinds = kinds[is_changed]
        stats["kind shares (bp, bs, hp, lp)"] = ", ".join(f"{(kinds == k).double().mean():.2f}" for k in range(4))
        centres, power_out = octave_bands(y, sample_rate, 10.0, 0.95 * sample_rate / 2, 12)
        _, power_in = octave_bands(x, sample_rate, 10.0, 0.95 * sample_rate / 2, 12)
        response = (power_out / power_in.clamp(min=1e-30)).sqrt()  # [M, K] magnitude
        octaves = torch.log2(centres)
        for k, kind in enumerate(augment.FILTER_KINDS):
            rows = response[kinds == k]
            if kind in ("band_pass", "band_stop"):
                inside = rows >= 0.5 if kind == "band_pass" else rows < 0.5  # -6 dB
                stats[f"{kind} width, octaves"] = summary(inside.double().sum(-1) / 12)
            else:
                passed = rows >= 0.5
                first = passed.double().argmax(-1) if kind == "high_pass" else passed.double().cumsum(-1).argmax(-1)
                stats[f"{kind} cut-off, log2 kHz"] = summary(octaves[first] - math.log2(1000))
    elif name == "pitch":
        spectrum = torch.fft.rfft(y.double() * torch.hann_window(y.shape[-1], dtype=torch.float64), n=10 * sample_rate)
        peak = spectrum.abs().argmax(-1).double() / 10
        shift = 12 * torch.log2(peak / PITCH_TONE_HZ)  # [M], on a 0.1 Hz grid: 0.004 semitone at 440 Hz
        samples["measured shift, semitones"] = torch.round(shift * 100) / 100
        samples["measured |shift|, semitones"] = samples["measured shift, semitones"].abs()
        semitones = torch.round(shift * 20) / 20
        stats["measured shifts, absolute semitones (0.05 steps)"] = f"{torch.unique(semitones.abs()).tolist()}"
        stats["distinct shifts"] = f"{torch.unique(semitones).numel()}"
        stats["share of shifts beyond ±3.25 semitones"] = f"{(semitones.abs() > 3.25).double().mean():.3f}"
        stats["level change dB"] = summary(level_db(y) - level_db(x))
        # Artefacts: energy more than 3% away from the shifted tone, relative to the whole.
        power = spectrum.abs().pow(2)
        frequency = torch.arange(power.shape[-1]) / 10
        target = PITCH_TONE_HZ * 2 ** (semitones / 12)
        is_near = (frequency[None, :] - target[:, None]).abs() < 0.03 * target[:, None]
        stats["energy off the tone dB"] = summary(10 * torch.log10((power * ~is_near).sum(-1) / power.sum(-1)), digits=1)
    elif name == "delay":
        # The input is a click at t = 0 (compare_inputs), so y(k) / x(0) is the gain of x(t - k), exactly.
        correlation = y.double() / x.double()[:, :1]  # [M, T]
        direct = correlation[:, 0]
        samples["direct-path gain dB"] = 20 * torch.log10(direct.abs())
        stats["direct-path gain dB"] = summary(samples["direct-path gain dB"])
        # The second echo relative to the first (attenuation a): the first delayed copy is
        # the first non-zero gain after t = 0, the second sits at twice its lag.
        is_delayed = correlation[:, 1:] != 0
        lag1 = is_delayed.double().argmax(-1) + 1  # [M]
        doubled = (2 * lag1).clamp(max=x.shape[-1] - 1)
        second, first = correlation.gather(1, doubled[:, None])[:, 0], correlation.gather(1, lag1[:, None])[:, 0]
        has_two = is_delayed.any(-1) & (2 * lag1 < x.shape[-1]) & (second != 0)
        samples["second echo / first echo"] = second[has_two] / first[has_two]
        # The first echo is the strongest delayed copy; later ones sit at multiples of its lag.
        first = correlation[:, 1:].abs().max(-1)
        lag = first.indices + 1  # [M]
        multiples = torch.arange(1, x.shape[-1])[None, :] * lag[:, None]  # [M, T - 1]
        at_multiples = correlation.gather(1, multiples.clamp(max=x.shape[-1] - 1)).abs() * (multiples < x.shape[-1])
        has_echo = first.values > ECHO_THRESHOLD
        stats["first echo dB below direct"] = summary(20 * torch.log10(direct[has_echo].abs() / first.values[has_echo]))
        stats[f"echoes above {ECHO_THRESHOLD} of the clip (shares)"] = shares(
            (at_multiples > ECHO_THRESHOLD).sum(-1).double(), digits=0)
    return stats, samples


PITCH_TONE_HZ = 440.0
ECHO_THRESHOLD = 0.02  # echo gain counted as an echo: 34 dB below the clip
KS_AGREE = 0.001  # a check agrees when its two-sample KS p-value is at least this (about 90 checks per run)


def compare_inputs(name, clips, length, sample_rate, generator):
    """`[clips, 2, T]` inputs: a 440 Hz tone for pitch, a click at t = 0 (0.1) for delay, so
    that each echo's gain reads off one sample; quiet white noise otherwise (peak about 0.1,
    so that no gain reaches our chain's peak guard)."""
    if name == "pitch":
        t = torch.arange(length) / sample_rate
        return (0.3 * torch.sin(2 * math.pi * PITCH_TONE_HZ * t)).repeat(clips, 2, 1)
    if name == "delay":
        click = torch.zeros(clips, 2, length)
        click[..., 0] = 0.1
        return click
    return 0.02 * torch.randn(clips, 2, length, generator=generator)


def ks_test(a, b):
    """Two-sample Kolmogorov-Smirnov test of 1-D samples a and b: (D, p).

    D is the largest gap between the two empirical distribution functions, evaluated at
    every observed value (ties included, so discrete samples are compared exactly); p is
    the asymptotic two-sided p-value with Stephens' small-sample correction,
    Q(λ) = 2·Σ_{k>=1} (-1)^(k-1)·exp(-2k²λ²), λ = (√n + 0.12 + 0.11/√n)·D, n = |a||b| / (|a| + |b|).
    Conservative for discrete samples. Returns (nan, nan) when either sample is empty.
    """
    if a.numel() == 0 or b.numel() == 0:
        return math.nan, math.nan
    a, b = torch.sort(a.double().flatten()).values, torch.sort(b.double().flatten()).values
    points = torch.cat([a, b])
    gap = torch.searchsorted(a, points, right=True) / len(a) - torch.searchsorted(b, points, right=True) / len(b)
    d = float(gap.abs().max())
    n = len(a) * len(b) / (len(a) + len(b))
    lam = (math.sqrt(n) + 0.12 + 0.11 / math.sqrt(n)) * d
    if lam < 0.2:  # the series converges slowly there, and Q is 1 to 6 digits
        return d, 1.0
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(1.0, max(0.0, p))


def bench_compare_augment(args):
    """Each transform of the paper's chain alone, ours next to the authors' (torch-audiomentations
    0.12 plus a re-implementation of their Delay), at severities 0.5, 1 and 2: output
    statistics on the same inputs, then the whole chain's untouched-view shares."""
    ta = import_reference(args.reference_path)
    if ta is None:
        print("compare-augment: torch-audiomentations 0.12 is not importable; install it apart from the project's "
              "environment with\n  .venv/bin/pip install --target DIR --no-deps torch-audiomentations==0.12.0 "
              "julius torch-pitch-shift primePy\nand pass --reference-path DIR")
        return
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    length = round(args.clip_seconds * args.sample_rate)
    generator = torch.Generator().manual_seed(args.seed)
    clips = args.compare_clips
    print(f"\ncompare-augment: {clips} clips x 2 views of {length} samples ({args.clip_seconds} s at "
          f"{args.sample_rate} Hz), each transform alone (its own probability, inside the chain's per-clip "
          f"probability); the authors' Compose called once per clip on [2, 1, T]; statistics over changed views, "
          f"median (10th to 90th percentile)\n")
    print("| transform | s | statistic | authors (torch-audiomentations 0.12) | ours |")
    print("|---|---:|---|---|---|")
    names = [name.strip() for name in args.compare_transforms.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMPARE_NAMES]
    if unknown:
        print(f"bench.py: error: --compare-transforms {','.join(unknown)}: not in the paper's chain; use some of "
              f"{','.join(COMPARE_NAMES)}", file=sys.stderr)
        sys.exit(2)
    checks = []
    for name in names:
        for s in COMPARE_SEVERITIES:
            x = compare_inputs(name, clips, length, args.sample_rate, generator)
            (theirs, their_samples), (ours, our_samples) = (
                compare_side(name, x, y, kinds, drawn, args.sample_rate)
                for y, kinds, drawn in (run_authors_chain(ta, [name], s, x, args.sample_rate),
                                        run_our_chain([name], s, x, args.sample_rate, args.seed)))
            for statistic in theirs:
                print(f"| {name} | {s:g} | {statistic} | {theirs[statistic]} | {ours.get(statistic, '-')} |", flush=True)
            checks.extend((name, s, check, their_samples[check], our_samples.get(check, torch.zeros(0)))
                          for check in their_samples)
    chain_names = list(augment.DEFAULT_AUGMENT)
    for s in COMPARE_SEVERITIES if set(names) == set(COMPARE_NAMES) else ():  # the whole chain: with all six only
        x = 0.5 * compare_inputs("pitch", clips, length, args.sample_rate, generator) + \
            0.5 * compare_inputs("gain", clips, length, args.sample_rate, generator)
        rows = {}
        for who, (y, kinds, _) in (("authors", run_authors_chain(ta, chain_names, s, x, args.sample_rate)),
                                   ("ours", run_our_chain(chain_names, s, x, args.sample_rate, args.seed))):
            untouched = (y == x).flatten(2).all(-1)  # [N, 2]
            both_filtered = (kinds >= 0).all(-1)
            rows[who] = {
                "both views untouched": f"{untouched.all(-1).double().mean():.3f}",
                "exactly one view untouched": f"{(untouched.sum(-1) == 1).double().mean():.3f}",
                "same filter kind, of clips with both views filtered":
                    f"{(kinds[:, 0] == kinds[:, 1])[both_filtered].double().mean():.2f}" if both_filtered.any() else "-",
            }
        for statistic in rows["ours"]:
            print(f"| chain | {s:g} | {statistic} | {rows['authors'][statistic]} | {rows['ours'][statistic]} |",
                  flush=True)
    print(f"\nTwo-sample KS test per check, over the changed views of each side (a check agrees when "
          f"p >= {KS_AGREE:g}; drawn values compared exactly, measured shifts on a 0.01-semitone grid; a check "
          f"with no view on a side is left out)\n")
    print("| transform | s | check | views (authors / ours) | D | p | agrees |")
    print("|---|---:|---|---|---:|---:|---|")
    agreed, tested = 0, 0
    for name, s, check, theirs, ours in checks:
        if theirs.numel() == 0 or ours.numel() == 0:
            continue
        d, p = ks_test(theirs, ours)
        agreed, tested = agreed + (p >= KS_AGREE), tested + 1
        print(f"| {name} | {s:g} | {check} | {theirs.numel()} / {ours.numel()} | {d:.3f} | {p:.2g} | "
              f"{'yes' if p >= KS_AGREE else 'NO'} |", flush=True)
    print(f"\n{agreed} of {tested} checks agree")


# ---------------------------------------------------------------- gpu (make gpu-check)

SYNC_COUNTER = """
import sys, warnings, torch, train
torch.cuda.set_sync_debug_mode("warn")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train.main(sys.argv[1:])
torch.cuda.set_sync_debug_mode("default")
print(sum("synchroniz" in str(w.message) for w in caught))
"""

LARGEST_BATCH = """
import sys, torch, models
encoder, width, samples, rate, checkpointing, cap = sys.argv[1:]
device = torch.device("cuda")
model = models.ContrastiveModel(models.build_encoder(encoder, int(samples), int(rate), float(width))).to(device)
models.set_activation_checkpointing(model.encoder, checkpointing == "1")
best, clips = 0, 96
while clips <= int(cap):
    try:
        views = torch.randn(2 * clips, int(samples), device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(views).float().square().mean().backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        best, clips = clips, clips * 2
    except torch.OutOfMemoryError:
        break
    finally:
        views = None
        torch.cuda.empty_cache()
print(best)
"""


def logged_scalars(folder):
    """{tag: [(step, value)]} of the TensorBoard scalars train.py wrote in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(folder)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def run_checked(command, environment):
    """Run a command in the repository; its stdout, or SystemExit with its last lines."""
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"gpu-check: {' '.join(command)} failed (exit {result.returncode}):\n"
                         f"{(result.stdout + result.stderr)[-4000:]}")
    return result.stdout


def gpu_settings(args):
    """The check's sizes: paper settings, or --tiny ones (CI on a CPU). Returns a Namespace."""
    if args.tiny:
        model_flags = ["--encoder", "samplecnn", "--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", "8000"]
        batch, steps, files, seconds, source_rate = 8, 20, 64, 1.2, 16000
    else:
        model_flags = ["--encoder", "samplecnn", "--width", "1", "--clip-seconds", "2.7", "--sample-rate", "22050"]
        batch, steps, files, seconds, source_rate = 96, args.gpu_steps, 384, 6.0, 16000
    sample_rate, clip_seconds = int(model_flags[-1]), float(model_flags[5])
    return argparse.Namespace(model_flags=model_flags, batch=batch, steps=steps, files=files, seconds=seconds,
                              source_rate=source_rate, sample_rate=sample_rate,
                              clip_samples=int(round(clip_seconds * sample_rate)))


def run_cuda_tests(environment):
    """tests/test_cuda.py in a subprocess (its tests skip on a CPU, with the reason); prints the summary."""
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                            "tests/test_cuda.py"], cwd=ROOT, env=environment, capture_output=True, text=True)
    summary = (tests.stdout.strip().splitlines() or ["no output"])[-1]
    print(f"CUDA tests: {summary}")
    if tests.returncode not in (0, 5):
        raise SystemExit(f"gpu-check: CUDA tests failed:\n{tests.stdout[-4000:]}{tests.stderr[-2000:]}")


def check_resume(loop, folder, steps, environment, on_gpu):
    """A run, and a run stopped halfway then resumed: the resumed steps must continue it.

    Returns the whole run's folder and its figures: loss first/last, resume gap and
    tolerance, median clips/s, data wait share, peak memory (MiB).
    """
    whole, half = os.path.join(folder, "whole"), os.path.join(folder, "half")
    run_checked(loop + ["--steps", str(steps), "--save-every", str(steps // 2), "--out", whole], environment)
    run_checked(loop + ["--steps", str(steps // 2), "--save-every", str(steps // 2), "--out", half], environment)
    run_checked(loop + ["--steps", str(steps), "--save-every", str(steps // 2), "--out", half], environment)
    whole_log, half_log = logged_scalars(whole), logged_scalars(half)
    whole_loss, resumed_loss = dict(whole_log["loss/total"]), dict(half_log["loss/total"])
    after = [s for s in whole_loss if s > steps // 2 and s in resumed_loss]
    wait, peak = whole_log.get("speed/data_wait_share"), whole_log.get("memory/peak_mib")
    return argparse.Namespace(
        folder=whole, first=whole_log["loss/total"][0][1], last=whole_log["loss/total"][-1][1],
        resume_gap=max(abs(whole_loss[s] - resumed_loss[s]) for s in after),
        # bf16 sums in another order after a restart (autotuned kernels): equal to its rounding.
        tolerance=0.0 if not on_gpu else 5e-2,
        speed=statistics.median(v for _, v in whole_log["speed/clips_per_s"][1:] or whole_log["speed/clips_per_s"]),
        wait_share=statistics.median(v for _, v in wait[1:] or wait) if wait else float("nan"),
        peak_mib=max(v for _, v in peak) if peak else float("nan"))


def compiled_speed(loop, folder, steps, environment):
    """Median clips/s of a --compile run (its first logged steps include compiling)."""
    compiled = os.path.join(folder, "compiled")
    run_checked(loop + ["--steps", str(steps), "--save-every", str(10 * steps), "--compile", "--out", compiled],
                environment)
    compiled_log = logged_scalars(compiled)
    return statistics.median(v for _, v in compiled_log["speed/clips_per_s"][2:] or compiled_log["speed/clips_per_s"])


def syncs_per_step(loop, folder, steps, environment, on_gpu):
    """Host-device syncs per non-logging step: two run lengths, the difference per step."""
    if not on_gpu:
        return "n/a (CPU)"
    counts = []
    for length in (steps // 4, steps // 2):
        out = os.path.join(folder, f"syncs-{length}")
        flags = loop[2:] + ["--steps", str(length), "--log-every", str(10 * steps), "--save-every",
                            str(10 * steps), "--out", out]
        counts.append(int(run_checked([sys.executable, "-c", SYNC_COUNTER, *flags], environment).split()[-1]))
    return f"{(counts[1] - counts[0]) / (steps // 2 - steps // 4):.2f}"


def time_parts(settings, speed, args, device, environment, on_gpu):
    """The encoder alone, the augmentation alone, FLOP/s against the matmul peak, the largest batch."""
    batch, sample_rate, clip_samples = settings.batch, settings.sample_rate, settings.clip_samples
    encoder_args = ["samplecnn", settings.model_flags[3], str(clip_samples), str(sample_rate)]
    alone = float(run_checked([sys.executable, "-c", ENCODER_ALONE, *encoder_args, str(batch), "5",
                               str(args.threads)], environment).split()[-1])
    chain = augment.build_chain(augment.DEFAULT_AUGMENT, 1.0, sample_rate)
    views = torch.randn(2 * batch, clip_samples, device=device) * 0.3
    generator = torch.Generator(device=device).manual_seed(0)
    (augment_seconds,) = median_seconds([lambda: chain(views, generator)], 5, device)
    flags = argparse.Namespace(train_encoder="samplecnn", train_sample_rate=sample_rate,
                               train_width=float(settings.model_flags[3]))
    largest = {}
    for checkpointing in ("0", "1"):
        largest[checkpointing] = int(run_checked([sys.executable, "-c", LARGEST_BATCH, *encoder_args, checkpointing,
                                                  str(args.gpu_batch_cap)], environment).split()[-1]) \
            if on_gpu else "n/a (CPU)"
    return argparse.Namespace(alone=alone, augment_seconds=augment_seconds,
                              flops=step_flops_per_clip(flags, clip_samples) * speed,
                              peak_flops=matmul_peak(args.threads, 5), largest=largest)


def probe_accuracy(checkpoint, corpus, folder, environment):
    """Test accuracy of a linear probe (timbre) of `checkpoint`, run by probe.py on the device."""
    probe_out = os.path.join(folder, "probe.json")
    run_checked([sys.executable, "probe.py", "--checkpoint", checkpoint, "--csv", corpus, "--label-column", "timbre",
                 "--max-epochs", "20", "--cache-dir", os.path.join(folder, "probe-cache"), "--out", probe_out],
                environment)
    with open(probe_out) as f:
        accuracy = json.load(f)[0]["test"]["accuracy"]
    return accuracy.get("mean") if isinstance(accuracy, dict) else accuracy


def gpu_table(name, settings, on_gpu, run, compiled, syncs, parts, accuracy, started):
    """The check's markdown table: one row per measure."""
    batch, steps = settings.batch, settings.steps
    step_seconds = batch / run.speed
    rows = [
        ("device", name),
        ("settings", f"{' '.join(settings.model_flags)} --batch-size {batch}; {steps} steps, "
                     f"{'bf16' if on_gpu else 'fp32'}, augmentation and resampling ({settings.source_rate} Hz "
                     f"cache) on the device"),
        ("loss, first -> last logged step", f"{run.first:.3f} -> {run.last:.3f}"),
        ("resume at step %d: largest loss difference after it" % (steps // 2), f"{run.resume_gap:.2g} "
         f"({'ok' if run.resume_gap <= run.tolerance else 'FAILED'}, tolerance {run.tolerance:g})"),
        ("full step (ms)", f"{1000 * step_seconds:.1f}"),
        ("encoder + head forward and backward alone (ms)", f"{1000 * batch / parts.alone:.1f}"),
        ("full step / encoder alone", f"{parts.alone / run.speed:.2f}x"),
        ("--compile: full step (ms)", f"{1000 * batch / compiled:.1f}"),
        ("augmentation alone, share of a step", f"{parts.augment_seconds / step_seconds:.1%}"),
        ("data wait, share of a step", f"{run.wait_share:.1%}"),
        ("model FLOP/s, share of the measured matmul peak",
         f"{parts.flops / 1e12:.2f} TFLOP/s of {parts.peak_flops / 1e12:.1f} ({parts.flops / parts.peak_flops:.1%})"),
        ("peak memory (MiB)", f"{run.peak_mib:,.0f}"),
        ("host-device syncs per non-logging step", syncs),
        ("largest batch that fits (clips), without / with activation checkpointing",
         f"{parts.largest['0']} / {parts.largest['1']}"),
        ("probe (timbre, linear head): test accuracy", f"{accuracy:.3f}"),
        ("wall time of the check (s)", f"{time.time() - started:.0f}"),
    ]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def bench_gpu(args):
    """The real training path on this machine's device, checked and timed: `make gpu-check`.

    At the paper's settings (SampleCNN full width, 96 clips x 2 views of 2.7 s at 22,050 Hz;
    --tiny: a small model on short clips, the variant CI runs on a CPU) from the
    pre-decoded cache of a synthetic set written at another rate, so resampling runs on
    the device too: the CUDA tests, a run with device augmentation (bf16 on a GPU), a
    resume that must continue it, the same with --compile, the probe, then one table.
    """
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    settings = gpu_settings(args)
    environment = dict(os.environ, OMP_NUM_THREADS=str(args.threads), CUDA_VISIBLE_DEVICES=os.environ.get(
        "CUDA_VISIBLE_DEVICES", "0"))
    started = time.time()
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({os.cpu_count()} cores)"
    print(f"gpu-check {time.strftime('%Y-%m-%d')}: {name}; torch {torch.__version__}, "
          f"{'tiny settings' if args.tiny else 'paper settings'}")
    run_cuda_tests(environment)

    # ---- data: a synthetic set, pre-decoded at another rate than the training rate
    folder = tempfile.mkdtemp(prefix="gpu-check-")
    corpus = synthetic.make_synthetic_set(os.path.join(folder, "corpus"), num_files=settings.files,
                                          seconds=settings.seconds, sample_rate=settings.source_rate)
    cache = datasets.write_cache(corpus, os.path.join(folder, "cache"), settings.source_rate,
                                 workers=min(8, os.cpu_count()))
    loop = [sys.executable, "train.py", "--train-csv", cache, *settings.model_flags, "--batch-size",
            str(settings.batch), "--log-every", str(max(1, settings.steps // 10)), "--val-every", "0", "--skip-check",
            "--augment-on", "device", "--resample-on", "device", "--workers", str(min(8, max(1, os.cpu_count() - 2)))]

    # ---- the runs, the parts timed alone, the probe, the table
    run = check_resume(loop, folder, settings.steps, environment, on_gpu)
    compiled = compiled_speed(loop, folder, settings.steps, environment)
    syncs = syncs_per_step(loop, folder, settings.steps, environment, on_gpu)
    parts = time_parts(settings, run.speed, args, device, environment, on_gpu)
    accuracy = probe_accuracy(run.folder, corpus, folder, environment)
    print(gpu_table(name, settings, on_gpu, run, compiled, syncs, parts, accuracy, started))
    shutil.rmtree(folder, ignore_errors=True)
    if run.resume_gap > run.tolerance:
        raise SystemExit(f"gpu-check: the resumed run differs from the uninterrupted one by {run.resume_gap:.3g}")


SECTIONS = {"augment": bench_augment, "loss": bench_loss, "train": bench_train,
            "compare-augment": bench_compare_augment, "gpu": bench_gpu}


class Tee:
    """A stdout that also keeps what it is given, for --report."""

    def __init__(self, stream):
        self.stream, self.kept = stream, []

    def write(self, text):
        self.kept.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()


def report_header(section):
    """The --report file's first line: what ran, when, on which machine, under what load."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"bench.py {section}, {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {os.cpu_count()} CPUs, {gpu}; "
            f"torch {torch.__version__}; load average (1, 5, 15 min) {load}")


def main():
    args = build_parser().parse_args()
    # The header is taken before the sections run, so the load average is the machine's, not ours.
    header = report_header(args.section) if args.report else None
    tee = Tee(sys.stdout)
    with contextlib.redirect_stdout(tee if args.report else sys.stdout):
        for name, section in SECTIONS.items():
            if args.section == name or (args.section == "all" and name != "gpu"):
                section(args)
    if args.report:
        safety.write_text(args.report, f"{header}\n\n{''.join(tee.kept).strip()}\n")
        print(f"written to {args.report}")


if __name__ == "__main__":
    main()
