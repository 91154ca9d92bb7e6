"""Benchmarks, one section per part of the training step; each prints a markdown table.

Sections live in the SECTIONS dict at the bottom: a section is a function taking the
parsed arguments. `all` runs every section in turn.

Usage:
    python bench.py augment                        # CPU, 2 threads, batches of 192 views
    python bench.py augment --device cuda          # on a GPU
    python bench.py loss                           # target + loss, ours vs the reference formulation
    python bench.py train                          # data reading and the whole training step
    python bench.py all

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
"""

import argparse
import math
import multiprocessing
import os
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
    target = losses.build_target(clip_ids, [(tags, labeled, spec)])
    return losses.contrastive_loss(z, target, temperature)


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


def peak_rss():
    """High-water resident memory of this process in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
    corpus = datasets.make_synthetic_set(os.path.join(folder, "corpus"), num_files=256, seconds=3.0,
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


SECTIONS = {"augment": bench_augment, "loss": bench_loss, "train": bench_train}


def main():
    args = build_parser().parse_args()
    for name, section in SECTIONS.items():
        if args.section in (name, "all"):
            section(args)


if __name__ == "__main__":
    main()
