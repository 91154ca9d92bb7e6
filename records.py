"""The probe's records: one results dict per (checkpoint, probe, label fraction), and the results
file that lets a killed probe resume.

probe.py claims its outputs before any work (claim_outputs: folders checked writable,
--out locked), writes --out as each probe finishes, and on a rerun with the same --out
reuses the records whose task_key (the checkpoint's SHA-256, the probe, its manifest's
bytes and every flag that changes results) matches (finished_results).
"""
import contextlib
import dataclasses
import hashlib
import json
import os

import numpy as np

import safety
import utils

# Flags that do not change a probe's results (or are in its Probe).
RESUME_IGNORES = ("checkpoint", "out", "plot", "plot_dir", "cache_dir", "workers", "tasks", "csv", "synthetic_dir",
                  "label_column", "task", "label_kind", "head", "patience", "export_embeddings", "per_track",
                  "export_part_files", "allow_leaks")


def mean_and_std(runs):
    """Mean and sample standard deviation (ddof 1; 0 for a single run) of metric dicts.

    runs: list of dicts with the same keys; list values are averaged element-wise.
    Returns (mean dict, std dict).
    """
    mean, std = {}, {}
    for key in runs[0]:
        values = np.array([r[key] for r in runs], dtype=np.float64)  # [runs] or [runs, K]
        spread = values.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(values[0])
        mean[key], std[key] = values.mean(0).tolist(), spread.tolist()
    return mean, std


def checkpoint_record(checkpoint, settings):
    """What each result says of its checkpoint: as typed, the file read, its step and SHA-256
    (first 12 hex digits; None for 'random')."""
    return {"checkpoint": checkpoint, "checkpoint_file": settings["file"], "checkpoint_step": settings["step"],
            "checkpoint_sha256": settings["sha256"]}


def summarize_runs(args, source, data, fraction, runs, main_condition, retrieval=None):
    """One results dict from the runs (seeds) of one label fraction: mean and std over runs.

    source: checkpoint_record; data: the probe's splits.ProbeData; runs: one dict per seed
    (seed, train_tracks, val, epochs, test {condition: metrics}); retrieval: the
    similarity metrics of the frozen test embeddings (probe.retrieval_metrics), or None.
    """
    test, test_std = mean_and_std([r["test"][main_condition] for r in runs])
    val, _ = mean_and_std([r["val"] for r in runs])
    csv = data.probe.csv
    result = {**source, "probe": data.probe.name, "csv": csv,
              "manifest_sha256": utils.file_digest(csv)[:12] if os.path.isfile(csv) else None,
              "label_column": data.column.name, "task": data.probe.task,
              "head": "prototypes" if args.prototypes else data.probe.head, "layer": args.layer,
              "finetune": args.finetune,
              "aggregate": args.aggregate, "train_clips": "audio" if args.finetune else args.train_clips,
              "early_stop": None if args.prototypes else args.early_stop, "patience": data.probe.patience,
              "label_fraction": fraction, "seeds": [r["seed"] for r in runs], "val": val,
              "epochs": [r["epochs"] for r in runs], "test": test, "test_std": test_std,
              "corrupt": None if main_condition == "clean" else {"names": args.corrupt_names,
                                                                  "severity": args.severity},
              "tracks": {"train": runs[0]["train_tracks"], "val": int((data.split == "val").sum()),
                         "test": int((data.split == "test").sum())},
              "skipped_files": len(data.failed), "runs": runs}
    if retrieval is not None:
        result["retrieval"] = retrieval
    if data.leaks:
        result["leaks"] = data.leaks
    if args.severities:
        sweep = {f"{s:g}": mean_and_std([r["test"][f"{s:g}"] for r in runs]) for s in args.severities}
        result["sweep"] = {s: m for s, (m, _) in sweep.items()}
        result["sweep_std"] = {s: d for s, (_, d) in sweep.items()}
    return result


def task_key(args, settings, probe):
    """What decides one (checkpoint, probe)'s results: the checkpoint's SHA-256, the probe, its
    manifest's bytes and every flag that changes results, as 16 hex digits."""
    flags = {k: v for k, v in vars(args).items() if k not in RESUME_IGNORES}
    manifest = utils.file_digest(probe.csv) if os.path.isfile(probe.csv) else None
    text = json.dumps([settings["key"], dataclasses.asdict(probe), manifest, flags], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def claim_outputs(args):
    """Before any work: every output folder checked writable (--cache-dir, --plot-dir, --out's
    folder), and --out locked (one probe per results file). Returns the lock (a context manager
    that releases it), or a null context without --out."""
    if args.cache_dir != "none":
        safety.check_writable(args.cache_dir, f"--cache-dir {args.cache_dir}")
    if args.plot:
        safety.check_writable(args.plot_dir, f"--plot-dir {args.plot_dir}")
    if not args.out:
        return contextlib.nullcontext()
    folder = os.path.dirname(os.path.abspath(args.out))
    safety.check_writable(folder, f"--out {args.out}")
    return safety.FolderLock(folder, f"--out {args.out}", name=os.path.basename(args.out) + ".lock").acquire()


def finished_results(out):
    """The results a previous run with this --out wrote (it writes them as each probe finishes);
    [] without --out or file, and for a damaged file (said so: its probes run again)."""
    if not out or not os.path.isfile(out):
        return []
    try:
        return load_results(out)
    except (OSError, ValueError) as error:
        print(f"results: {out} is damaged ({str(error).splitlines()[0][:120]}); its probes run again")
        return []


def load_results(path):
    """The results dicts of a probe's --out file; OSError or ValueError where it is not one."""
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    if not isinstance(results, list) or not all(isinstance(r, dict) and "checkpoint" in r for r in results):
        raise ValueError("not a list of probe results")
    return results
