"""Probe a pretrained encoder: embeddings, a linear or MLP head (or class prototypes), test metrics.

CPU, a checkpoint from train.py (a run folder means its latest checkpoint):
    python probe.py --checkpoint runs/semisupcon --csv manifest.csv --label-column genre --task multiclass
A random-init baseline, built from the same model flags as train.py:
    python probe.py --checkpoint random --width 0.25 --clip-seconds 1 --sample-rate 16000 --csv manifest.csv
Several probes in one call, one summary table (rows checkpoints, columns probes):
    python probe.py --checkpoint runs/semisupcon --checkpoint random --tasks tasks.csv --out runs/table.json
The experiments of the paper's evaluation:
    --finetune                          train the encoder together with the head
    --label-fraction 0.01,0.1 --seeds 5 few labels: stratified train subsets, mean ± std
    --corrupt noise,reverb --severity-sweep 0,1,2   robustness to corrupted test audio
    --prototypes                        no head: cosine similarity to class-mean embeddings
    --plot                              TensorBoard embedding projector and confusion matrix
One GPU: the same commands (the GPU is used when present). Results print as JSON and go to --out.

Protocol (METHOD.md): every file is cut into consecutive clips; the head trains on clip
embeddings of the train split, early-stops on the val split's track-level metric, and the
test metric averages clip outputs per track. Frozen embeddings are extracted once per
(checkpoint, manifest, layer, corruption) and cached on disk under the checkpoint's SHA-1.
"""
import argparse
import copy
import hashlib
import json
import os
import re

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

import augment
import datasets
import models
import utils


def build_parser():
    """The command-line flags, in groups: data, model, head, robustness, run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--csv", default=None, help="manifest with a split column (default: the synthetic set)")
    data.add_argument("--synthetic-dir", default=".cache/synthetic", help="folder of the built-in synthetic set")
    data.add_argument("--label-column", action="append", default=[],
                      help="label column(s) to probe, repeatable (one probe each); comma-separated columns "
                           "form one regression target (default: label)")
    data.add_argument("--task", action="append", default=[], choices=datasets.TASKS,
                      help="how each label is read (one value, or one per --label-column; default multiclass)")
    data.add_argument("--label-kind", action="append", default=[], choices=datasets.LABEL_KINDS,
                      help="what each label means (one value, or one per --label-column; default generic); "
                           "key adds the MIREX key score")
    data.add_argument("--tasks", default=None,
                      help="CSV of probes to run (columns csv, label_column, task; optional label_kind, name and "
                           "patience); replaces --csv/--label-column")
    data.add_argument("--max-clips", type=int, default=16,
                      help="consecutive clips kept per file, evenly spread (default %(default)s)")
    data.add_argument("--label-fraction", action="append", default=[],
                      help="share of the labeled train tracks the probe learns from, in (0, 1]; repeatable or "
                           "comma-separated (one result each); stratified: per class, per tag (iterative "
                           "stratification) or across the target range (default 1)")
    data.add_argument("--seeds", type=int, default=1,
                      help="runs per label fraction, seeds --seed … --seed+N-1 (subset and head); "
                           "results report mean ± sample std (default %(default)s)")
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", action="append", required=True,
                       help="checkpoint file, run folder (latest checkpoint), or 'random' for a random-init "
                            "encoder; repeatable (one table row each)")
    model.add_argument("--layer", default="encoder", choices=("encoder", "projection"),
                       help="embeddings from the encoder output h or the projection head z")
    model.add_argument("--encoder", default="samplecnn", choices=sorted(models.ENCODERS), help="random only")
    model.add_argument("--width", type=float, default=1.0,
                       help="random only: channel-width multiplier (default %(default)s)")
    model.add_argument("--clip-seconds", type=float, default=2.7,
                       help="random only: clip length in seconds (default %(default)s)")
    model.add_argument("--sample-rate", type=int, default=22050,
                       help="random only: sample rate in Hz (default %(default)s)")
    head = parser.add_argument_group("head")
    head.add_argument("--head", default="mlp", choices=("linear", "mlp"), help="probe head (MLP: 512 hidden, ReLU)")
    head.add_argument("--prototypes", action="store_true",
                      help="no head: score each class by cosine similarity to its mean train embedding "
                           "(multilabel: mean of a tag's positives minus mean of its negatives)")
    head.add_argument("--finetune", action="store_true",
                      help="train the encoder (and the projection head for --layer projection) with the probe "
                           "head, on one random crop per train track and epoch read from the audio")
    head.add_argument("--lr", type=float, default=3e-4,
                      help="Adam learning rate of the probe head (default %(default)s)")
    head.add_argument("--finetune-lr", type=float, default=1e-5,
                      help="--finetune: Adam learning rate of the encoder (default %(default)s)")
    head.add_argument("--weight-decay", type=float, default=1e-6, help="Adam weight decay (default %(default)s)")
    head.add_argument("--batch-size", type=int, default=64,
                      help="clips per step (crops with --finetune) (default %(default)s)")
    head.add_argument("--max-epochs", type=int, default=200, help="training epochs at most (default %(default)s)")
    head.add_argument("--patience", type=int, default=15,
                      help="epochs without val improvement before stopping (default %(default)s; the paper: "
                           "15, and 50 for small sets)")
    robust = parser.add_argument_group("robustness")
    robust.add_argument("--corrupt", default="none",
                        help="transforms of augment.py applied to the test audio, comma-separated (e.g. "
                             "noise,reverb), 'default' for the paper's pretraining chain, or none")
    robust.add_argument("--severity", type=float, default=1.0,
                        help="strength of --corrupt, s: 0 none, 1 the paper's chain strength, up to 2.5 (default "
                             "%(default)s)")
    robust.add_argument("--severity-sweep", default=None,
                        help="comma-separated severities (e.g. 0,1,2) each evaluated with the same probe; a "
                             "table of the main metric per severity is printed (needs --corrupt)")
    robust.add_argument("--corrupt-seed", type=int, default=0,
                        help="seed of the corruption draws, fixed so every checkpoint hears the same audio (default "
                             "%(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=None,
                     help="JSON results file; the summary goes next to it as .md, .csv and .summary.json "
                          "(default: print only)")
    run.add_argument("--plot", action="store_true",
                     help="write test embeddings with labels to TensorBoard's projector and, for multiclass, "
                          "a confusion-matrix image")
    run.add_argument("--plot-dir", default=None,
                     help="TensorBoard folder for --plot (default: next to --out as NAME-plots, else "
                          "runs/probe-plots)")
    run.add_argument("--cache-dir", default=".cache/embeddings",
                     help="embedding cache folder, 'none' disables (default %(default)s)")
    run.add_argument("--workers", type=int, default=2, help="--finetune: data-loading processes (default %(default)s)")
    run.add_argument("--seed", type=int, default=0,
                     help="seed for the head, the label subset and the random encoder (default %(default)s)")
    return parser


def finish_args(args):
    """Check flag combinations and compute the values derived from flags, once."""
    fractions = []
    for value in args.label_fraction or ["1"]:
        for part in value.split(","):
            fraction = float(part)
            if not 0 < fraction <= 1:
                raise SystemExit(f"--label-fraction {part}: must be in (0, 1]")
            fractions.append(fraction)
    args.label_fractions = list(dict.fromkeys(fractions))
    if args.seeds < 1:
        raise SystemExit(f"--seeds {args.seeds}: must be at least 1")
    names = list(augment.DEFAULT_AUGMENT) if args.corrupt.strip() == "default" else None
    try:
        args.corrupt_names = names if names is not None else augment.parse_augment(args.corrupt)
    except ValueError as error:
        raise SystemExit(f"--corrupt: {error}") from None
    args.severities = [float(s) for s in args.severity_sweep.split(",")] if args.severity_sweep else []
    if args.severities and not args.corrupt_names:
        raise SystemExit("--severity-sweep needs --corrupt (transform names, or 'default' for the paper's chain)")
    if min(args.severities + [args.severity]) < 0:
        raise SystemExit("severities must be >= 0")
    if args.prototypes and args.finetune:
        raise SystemExit("--prototypes has no head to fine-tune with; use one of --prototypes, --finetune")
    if args.plot_dir is None:
        args.plot_dir = os.path.splitext(args.out)[0] + "-plots" if args.out else os.path.join("runs", "probe-plots")
    return args


# ---------------------------------------------------------------- metrics

def accuracy(logits, labels):
    """Share of rows whose argmax equals the class index. logits `[M, C]`, labels `[M]`."""
    return float((logits.argmax(1) == labels).float().mean())


def macro_f1(logits, labels, num_classes):
    """Unweighted mean over classes present in labels or predictions of per-class F1."""
    predictions = logits.argmax(1)
    scores = []
    for c in range(num_classes):
        true_positive = ((predictions == c) & (labels == c)).sum().item()
        predicted, actual = (predictions == c).sum().item(), (labels == c).sum().item()
        if predicted + actual:
            scores.append(2 * true_positive / (predicted + actual))
    return float(np.mean(scores)) if scores else 0.0


def roc_auc(scores, targets):
    """Area under the ROC curve of one class (ties share ranks); nan if one class is absent.

    scores, targets: `[M]`; targets in {0, 1}. Computed as the Mann-Whitney statistic.
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    positives, negatives = targets.sum(), (~targets).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1  # average rank of a tie group
        start = end + 1
    return float((ranks[targets].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_precision(scores, targets):
    """Average precision (PR-AUC) of one class: mean precision at each positive's rank.

    Tied scores are ranked together (precision taken at the end of the tie group), which
    equals the step-wise sum over thresholds of (recall gain) x precision.
    Returns nan when there is no positive.
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    if targets.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_targets = scores[order], targets[order]
    hits = np.cumsum(sorted_targets)
    # Precision at the last index of each tie group, shared by the group.
    last = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), len(scores) - 1]
    group_end = np.repeat(last, np.diff(np.r_[-1, last]))
    precision = hits[group_end] / (group_end + 1)
    return float(precision[sorted_targets].mean())


def r2_score(predictions, targets):
    """Coefficient of determination per output `[K]` (1 - SSE / SST), on `[M, K]` arrays."""
    predictions, targets = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
    residual = ((targets - predictions) ** 2).sum(0)
    total = ((targets - targets.mean(0)) ** 2).sum(0)
    return 1 - residual / np.maximum(total, 1e-12)


def mirex_key_score(predicted, labels):
    """MIREX weighted key score averaged over tracks; classes indexed as datasets.KEY_NAMES.

    predicted, labels: `[M]` key indices (0-11 major C … B, 12-23 minor). Per track: 1 the
    same key; 0.5 the estimate a perfect fifth above the reference in the same mode; 0.3
    the relative key (estimate = relative minor of a major reference, or relative major
    of a minor one); 0.2 the parallel key (same tonic, other mode); 0 anything else. As
    mir_eval.key.weighted_score by default, a fifth below scores 0 (unlike the symmetric
    datasets.key_similarity used for training targets).
    """
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    tonic, mode = predicted % 12, predicted // 12
    reference_tonic, reference_mode = labels % 12, labels // 12
    interval = (tonic - reference_tonic) % 12  # semitones from the reference tonic up to the estimate's
    same_mode = mode == reference_mode
    relative = ~same_mode & (((reference_mode == 0) & (interval == 9)) | ((reference_mode == 1) & (interval == 3)))
    score = np.select([same_mode & (interval == 0), same_mode & (interval == 7), relative,
                       ~same_mode & (interval == 0)],
                      [datasets.KEY_WEIGHTS["same"], datasets.KEY_WEIGHTS["fifth"], datasets.KEY_WEIGHTS["relative"],
                       datasets.KEY_WEIGHTS["parallel"]], 0.0)
    return float(score.mean())


def confusion_matrix(predicted, labels, num_classes):
    """Counts `[C, C]` int64: row = true class, column = predicted class."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predicted)), 1)
    return counts


def metrics(task, outputs, labels, column=None):
    """The task's metrics on track-level outputs `[M, C]` against labels.

    multiclass: accuracy, macro_f1 (and mirex for key labels); multilabel: roc_auc,
    pr_auc (macro over classes with both outcomes); regression: r2 (mean over outputs)
    and r2 per output.
    """
    if task == "multiclass":
        result = {"accuracy": accuracy(outputs, labels),
                  "macro_f1": macro_f1(outputs, labels, outputs.shape[1])}
        if column is not None and column.kind == "key":
            result["mirex"] = mirex_key_score(outputs.argmax(1).numpy(), labels.numpy())
        return result
    if task == "multilabel":
        probabilities, tags = torch.sigmoid(outputs).numpy(), labels.numpy()
        aucs = [roc_auc(probabilities[:, c], tags[:, c]) for c in range(tags.shape[1])]
        aps = [average_precision(probabilities[:, c], tags[:, c]) for c in range(tags.shape[1])]
        return {"roc_auc": float(np.nanmean(aucs)), "pr_auc": float(np.nanmean(aps))}
    per_output = r2_score(outputs.numpy(), labels.numpy())
    return {"r2": float(per_output.mean()), "r2_per_output": per_output.tolist()}


MAIN_METRIC = {"multiclass": "accuracy", "multilabel": "roc_auc", "regression": "r2"}


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


# ---------------------------------------------------------------- embeddings

def load_encoder(checkpoint, args, device):
    """The model and its settings (from the checkpoint, or the flags for 'random').

    Returns (model, settings) with model a models.ContrastiveModel in eval mode and
    settings holding encoder, width, sample_rate, clip_samples and a cache key (the
    checkpoint file's SHA-1; for 'random', the flags and seed that build it).
    """
    if checkpoint == "random":
        settings = {"encoder": args.encoder, "width": args.width, "sample_rate": args.sample_rate,
                    "clip_samples": int(round(args.clip_seconds * args.sample_rate)),
                    "hidden_dim": 512, "projection_dim": 128}
        key = "random-" + hashlib.sha1(f"{sorted(settings.items())}-{args.seed}".encode()).hexdigest()
        state = None
    else:
        path = checkpoint
        if os.path.isdir(path):
            found = utils.list_checkpoints(path)
            if not found:
                raise SystemExit(f"{path}: no checkpoint-*.pt in this folder")
            path = found[-1]
        state = utils.load_checkpoint(path)
        saved = state["args"]
        settings = {k: saved[k] for k in ("encoder", "width", "sample_rate", "clip_samples",
                                          "hidden_dim", "projection_dim")}
        with open(path, "rb") as f:
            key = hashlib.sha1(f.read()).hexdigest()
    # A private RNG stream: building the random encoder leaves the caller's seed state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed if args is not None else 0)
        encoder = models.build_encoder(settings["encoder"], settings["clip_samples"], settings["sample_rate"],
                                       settings["width"])
        model = models.ContrastiveModel(encoder, settings["hidden_dim"], settings["projection_dim"])
    if state is not None:
        model.load_state_dict(state["model"])
    settings["key"] = key
    return model.to(device).eval(), settings


def embed(model, audio, layer):
    """Embeddings of waveforms `[B, T]` -> `[B, E]`: encoder output h, or projection z."""
    h = model.encoder(audio)
    return model.head(h) if layer == "projection" else h


def corruption_generator(path, seed):
    """A CPU generator for one file's corruption draws, fixed by the seed and the file name.

    The file's base name (not its folder or manifest position) sets the stream, so the
    same file is corrupted the same way on every machine, for every checkpoint.
    """
    digest = hashlib.sha1(f"{seed}:{os.path.basename(path)}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


@torch.no_grad()
def embed_files(model, paths, settings, layer, device, max_clips, corruption=None, batch_size=64):
    """Embeddings of every file's consecutive clips, optionally of corrupted audio.

    corruption: None, or {"names": transform names, "severity": s, "seed": int}; each
    file's clips `[K, T]` go through augment's chain with corruption_generator(path).
    Returns (embeddings `[M, E]` float32, track index `[M]` into paths, failed messages).
    A file that cannot be read is left out and listed.
    """
    chain = None
    if corruption is not None:
        chain = augment.build_chain(corruption["names"], corruption["severity"], settings["sample_rate"])
    chunks, owners, failed, pending, pending_owners = [], [], [], [], []

    def flush():
        audio = torch.cat(pending).to(device)  # [m, T]
        chunks.append(embed(model, audio, layer).float().cpu())
        owners.extend(pending_owners)
        pending.clear()
        pending_owners.clear()

    for index, path in enumerate(paths):
        try:
            clips = datasets.read_clips(path, settings["clip_samples"], settings["sample_rate"], max_clips)
        except datasets.AudioError as error:
            failed.append(str(error))
            continue
        if chain is not None:
            clips = chain(clips.to(device), corruption_generator(path, corruption["seed"]))  # [K, T]
        pending.append(clips)
        pending_owners.extend([index] * len(clips))
        if sum(len(p) for p in pending) >= batch_size:
            flush()
    if pending:
        flush()
    if not chunks:
        raise SystemExit(f"none of the {len(paths)} files could be read, e.g. {failed[0] if failed else ''}")
    return torch.cat(chunks).numpy(), np.array(owners), failed


def corruption_name(corruption):
    """'clean', or the transforms and severity, e.g. 'noise,reverb@1.5'."""
    return "clean" if corruption is None else f"{','.join(corruption['names'])}@{corruption['severity']:g}"


def cached_embeddings(model, paths, settings, args, device, corruption=None):
    """embed_files over `paths`, cached in --cache-dir as DIGEST.npy plus a DIGEST.json index.

    The digest covers the checkpoint's SHA-1 (settings["key"]), the files and their
    modification times, the layer, the clip settings and the corruption, so embeddings of
    another checkpoint (even one saved under the same file name) are never reused: a new
    checkpoint gets its own entry, and the message says so. The index records these
    inputs and is checked on load. Returns what embed_files returns.
    """
    paths = list(paths)
    files = json.dumps([paths, [os.path.getmtime(p) if os.path.exists(p) else 0 for p in paths]])
    files_digest = hashlib.sha1(files.encode()).hexdigest()
    index = {"checkpoint": settings["key"], "files": files_digest, "num_files": len(paths), "layer": args.layer,
             "max_clips": args.max_clips, "sample_rate": settings["sample_rate"],
             "clip_samples": settings["clip_samples"], "corruption": corruption}
    digest = hashlib.sha1(json.dumps(index, sort_keys=True).encode()).hexdigest()[:20]
    if args.cache_dir == "none":
        return embed_files(model, paths, settings, args.layer, device, args.max_clips, corruption)
    base = os.path.join(args.cache_dir, digest)
    if os.path.isfile(base + ".npy") and os.path.isfile(base + ".json"):
        with open(base + ".json") as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in index} == index:
            print(f"embedding cache: reusing {base}.npy (checkpoint {settings['key'][:12]}, "
                  f"{corruption_name(corruption)})")
            owners = np.repeat(np.arange(len(paths)), saved["clips"])
            return np.load(base + ".npy"), owners, saved["failed"]
        print(f"embedding cache: {base}.json was written for other inputs; rebuilding it")
    others = other_checkpoint_entries(args.cache_dir, index)
    note = (f"; {others} entr{'y' if others == 1 else 'ies'} of other checkpoints for these files left alone"
            if others else "")
    print(f"embedding cache: extracting {len(paths)} files with checkpoint {settings['key'][:12]} "
          f"({corruption_name(corruption)}) into {base}.npy{note}")
    embeddings, owners, failed = embed_files(model, paths, settings, args.layer, device, args.max_clips, corruption)
    os.makedirs(args.cache_dir, exist_ok=True)
    index["clips"] = np.bincount(owners, minlength=len(paths)).tolist()
    index["failed"] = failed
    np.save(base + ".tmp.npy", embeddings)
    with open(base + ".tmp.json", "w") as f:
        json.dump(index, f)
    os.replace(base + ".tmp.npy", base + ".npy")
    os.replace(base + ".tmp.json", base + ".json")
    return embeddings, owners, failed


def other_checkpoint_entries(folder, index):
    """Count cache entries for the same files and settings made with another checkpoint."""
    if not os.path.isdir(folder):
        return 0
    count = 0
    for name in os.listdir(folder):
        if not name.endswith(".json") or name.endswith(".tmp.json"):
            continue
        with open(os.path.join(folder, name)) as f:
            saved = json.load(f)
        same_inputs = all(saved.get(k) == v for k, v in index.items() if k != "checkpoint")
        count += same_inputs and saved.get("checkpoint") != index["checkpoint"]
    return count


def track_embeddings(embeddings, owners, tracks):
    """Track-level embeddings: the mean of each track's clip embeddings -> `[len(tracks), E]`."""
    index = torch.as_tensor(np.searchsorted(tracks, owners))
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    summed = torch.zeros(len(tracks), x.shape[1]).index_add_(0, index, x)
    counts = torch.zeros(len(tracks)).index_add_(0, index, torch.ones(len(owners)))
    return summed / counts[:, None]


# ---------------------------------------------------------------- heads and prototypes

class Standardize(torch.nn.Module):
    """(x - mean) / std with fixed train-split statistics `[E]`, so one lr suits every encoder."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x):
        return (x - self.mean) / self.std


def make_head(kind, in_dim, out_dim):
    """Linear head, or the paper's MLP: in_dim -> 512 (ReLU) -> out_dim."""
    if kind == "linear":
        return torch.nn.Linear(in_dim, out_dim)
    return torch.nn.Sequential(torch.nn.Linear(in_dim, 512), torch.nn.ReLU(), torch.nn.Linear(512, out_dim))


def head_loss(task, outputs, labels):
    """Cross-entropy (multiclass), binary cross-entropy (multilabel) or MSE (regression)."""
    if task == "multiclass":
        return F.cross_entropy(outputs, labels)
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(outputs, labels)
    return F.mse_loss(outputs, labels)


@torch.no_grad()
def track_outputs(predictor, x, owners, tracks):
    """Predictor outputs of clips `[m, E]`, averaged per track -> `[len(tracks), C]` (METHOD.md)."""
    return track_embeddings(predictor(torch.as_tensor(x)).cpu(), owners, tracks)


def fit_head(args, task, train_set, val_set, out_dim, seed, mean, std, device):
    """Train a head on frozen clip embeddings, Adam with early stopping on val.

    train_set: (x `[M, E]` raw embeddings, y `[M, ...]`) clip-level; val_set: (x,
    owners, tracks, y_tracks). The head standardizes its input with mean, std `[E]`.
    Training runs on `device` (the embeddings are moved there once).
    Returns (best head on CPU, best val main metric, epochs run).
    """
    x, y = train_set[0].to(device), train_set[1].to(device)
    val_x = val_set[0].to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Sequential(Standardize(mean, std), make_head(args.head, x.shape[1], out_dim)).to(device)
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    best, best_state, waited, epoch = -float("inf"), None, 0, 0
    for epoch in range(1, args.max_epochs + 1):
        head.train()
        for batch in torch.randperm(len(x), generator=order).split(args.batch_size):
            batch = batch.to(device)
            loss = head_loss(task, head(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        score = metrics(task, track_outputs(head, val_x, *val_set[1:3]), val_set[3])[MAIN_METRIC[task]]
        if best_state is None or score > best:
            best, best_state, waited = score, copy.deepcopy(head.state_dict()), 0
        else:
            waited += 1
            if waited >= args.patience:
                break
    head.load_state_dict(best_state)
    return head.cpu().eval(), best, epoch


def collate_crops(items):
    """ClipDataset items -> (audio `[B, T]`, rows used `[B]`, failed file count)."""
    audio = torch.cat([item["audio"] for item in items])  # [B, T] (one view per item)
    return audio, torch.tensor([item["clip"] for item in items]), sum(item["failed"] for item in items)


def finetune(args, model, settings, task, paths, y_tracks, train_tracks, val_tracks, out_dim, seed, mean, std,
             device):
    """Fine-tune the model's encoder together with a new head, Adam with early stopping on val.

    Every epoch reads one random crop (datasets.read_source_crops) of each train track in
    `train_tracks` (indices into paths and y_tracks `[N, ...]`); the encoder runs in train
    mode (batch-norm statistics update). Val: the track-level main metric over all
    consecutive clips of `val_tracks`, re-embedded each epoch. The encoder learns at
    --finetune-lr, the head at --lr; with --layer projection the projection head is
    trained too. On return, model holds the weights of the best val epoch.
    Returns (best head on CPU, best val main metric, epochs run, unreadable crops replaced).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Sequential(Standardize(mean, std), make_head(args.head, len(mean), out_dim)).to(device)
    tuned = [model.encoder] + ([model.head] if args.layer == "projection" else [])
    optimizer = torch.optim.Adam([{"params": head.parameters(), "lr": args.lr},
                                  {"params": [p for m in tuned for p in m.parameters()], "lr": args.finetune_lr}],
                                 weight_decay=args.weight_decay)
    dataset = datasets.ClipDataset(paths, [], {0: np.asarray(train_tracks)}, 1, settings["clip_samples"],
                                   settings["sample_rate"])
    rng = np.random.default_rng(seed)
    val_paths = [paths[t] for t in val_tracks]
    best, best_state, waited, epoch, replaced = -float("inf"), None, 0, 0, 0
    for epoch in range(1, args.max_epochs + 1):
        order = rng.permutation(train_tracks)
        crop_seeds = rng.integers(0, 2**62, size=len(order))
        draws = [(int(t), int(s), 0, True) for t, s in zip(order, crop_seeds)]
        # Batch norm needs two clips to train on, so a final batch of one is left out.
        batches = [b for b in (draws[i:i + args.batch_size] for i in range(0, len(draws), args.batch_size))
                   if len(b) > 1]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                             collate_fn=collate_crops)
        model.train()
        head.train()
        for audio, rows, failed in loader:
            replaced += failed
            loss = head_loss(task, head(embed(model, audio.to(device), args.layer)), y_tracks[rows].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        head.eval()
        embeddings, owners, _ = embed_files(model, val_paths, settings, args.layer, device, args.max_clips)
        owners = np.asarray(val_tracks)[owners]
        tracks = np.unique(owners)
        outputs = track_outputs(lambda x: head(x.to(device)), embeddings, owners, tracks)
        score = metrics(task, outputs, y_tracks[tracks])[MAIN_METRIC[task]]
        if best_state is None or score > best:
            best, waited = score, 0
            best_state = (copy.deepcopy(head.state_dict()), copy.deepcopy(model.state_dict()))
        else:
            waited += 1
            if waited >= args.patience:
                break
    head.load_state_dict(best_state[0])
    model.load_state_dict(best_state[1])
    return head.cpu().eval(), best, epoch, replaced


def class_prototypes(x, y, task, num_classes):
    """Unit-length class prototypes from train clip embeddings.

    x: `[M, E]` embeddings; y: `[M]` class indices (multiclass) or `[M, C]` multi-hot
    (multilabel). Each embedding is scaled to unit length, then averaged per class.
    Returns `[C, E]` (multiclass) or `[2, C, E]` (multilabel: the mean of each tag's
    positives, then of its negatives). A class without examples gets a zero prototype.
    """
    x = F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)
    if task == "multiclass":
        members = F.one_hot(torch.as_tensor(y), num_classes).float().T  # [C, M]
        return F.normalize(members @ x, dim=1)  # [C, E]
    positives = torch.as_tensor(y, dtype=torch.float32).T  # [C, M]
    return F.normalize(torch.stack([positives @ x, (1 - positives) @ x]), dim=2)  # [2, C, E]


def prototype_scores(prototypes, x):
    """Scores `[M, C]` of embeddings x `[M, E]` against class_prototypes' output.

    multiclass (`[C, E]`): the cosine similarity to each class prototype (argmax =
    prediction). multilabel (`[2, C, E]`): cosine to the tag's positive prototype minus
    cosine to its negative one, in [-2, 2] (ranked for ROC-AUC and PR-AUC).
    """
    x = F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1)
    if prototypes.dim() == 2:
        return x @ prototypes.T  # [M, C]
    return x @ prototypes[0].T - x @ prototypes[1].T  # [M, C]


def label_subset(tracks, labels, task, fraction, seed):
    """The train tracks whose labels a probe may use under a label budget, stratified.

    tracks: `[N]` train track indices; labels: their labels (`[N]` class indices,
    `[N, C]` multi-hot tags or `[N, K]` regression values).
    multiclass: round(fraction * n_c) tracks of each class c, at least one, so every class
        stays in train.
    multilabel: iterative stratification (Sechidis et al., 2011): tags are served from the
        rarest up, each taking tracks that carry it until it has its share round(fraction
        * n_c) (at least one); tracks picked for one tag count for all their tags. Then
        tracks with the fewest tags fill up to round(fraction * N).
    regression: tracks sorted by their mean target, cut into round(fraction * N) equal
        bins, one random track per bin, so the subset spans the range of targets.
    Returns sorted track indices.
    """
    tracks = np.asarray(tracks)
    if fraction >= 1:
        return np.sort(tracks)
    rng = np.random.default_rng([seed, 31337])
    labels = np.asarray(labels)
    size = max(1, round(fraction * len(tracks)))
    if task == "multiclass":
        kept = [rng.permutation(tracks[labels == c])[:max(1, round(fraction * (labels == c).sum()))]
                for c in np.unique(labels)]
        return np.sort(np.concatenate(kept))
    if task == "regression":
        order = np.argsort(labels.reshape(len(tracks), -1).mean(1), kind="stable")
        bins = np.array_split(order, size)
        return np.sort(tracks[[int(rng.choice(b)) for b in bins if len(b)]])
    tags = labels > 0.5  # [N, C]
    counts = tags.sum(0)
    needed = np.where(counts > 0, np.maximum(1, np.round(fraction * counts)), 0)
    chosen = np.zeros(len(tracks), dtype=bool)
    for tag in np.argsort(counts, kind="stable"):
        for index in rng.permutation(np.flatnonzero(tags[:, tag] & ~chosen)):
            if needed[tag] <= 0:
                break
            chosen[index] = True
            needed -= tags[index]
    missing = size - chosen.sum()
    if missing > 0:
        # Top up with the tracks carrying the fewest tags, so tag shares stay near fraction.
        rest = rng.permutation(np.flatnonzero(~chosen))
        rest = rest[np.argsort(tags[rest].sum(1), kind="stable")]
        chosen[rest[:missing]] = True
    return np.sort(tracks[chosen])


# ---------------------------------------------------------------- plots

def confusion_image(counts, cell=None):
    """Confusion-matrix heatmap `[3, H, W]` in [0, 1] (CHW, for SummaryWriter.add_image).

    counts: `[C, C]` (row = true, column = predicted). Each row is divided by its total,
    then shaded from white (0) to dark blue (1); each class pair is a square of `cell`
    pixels (default: 512 // C, kept between 4 and 32).
    """
    counts = torch.as_tensor(counts, dtype=torch.float32)
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)  # [C, C]
    cell = cell or max(4, min(32, 512 // len(counts)))
    white, blue = torch.ones(3), torch.tensor([0.03, 0.19, 0.42])
    image = white[:, None, None] + (blue - white)[:, None, None] * rates[None]  # [3, C, C]
    return image.repeat_interleave(cell, 1).repeat_interleave(cell, 2)  # [3, C * cell, C * cell]


def write_plots(folder, embeddings, metadata, header, counts=None, class_names=None):
    """Write one run's test set to TensorBoard in `folder`.

    embeddings: `[N, E]` track-level test embeddings; metadata: N rows of label text
    (lists when header names several columns); counts: optional `[C, C]` confusion matrix,
    written as the image 'confusion_matrix' and as confusion_matrix.csv (class names
    as header and index). Open with `tensorboard --logdir FOLDER` (Projector and Images tabs).
    """
    writer = SummaryWriter(log_dir=folder)
    writer.add_embedding(torch.as_tensor(embeddings), metadata=metadata, metadata_header=header, tag="test")
    if counts is not None:
        writer.add_image("confusion_matrix", confusion_image(counts), dataformats="CHW")
        pd.DataFrame(counts, index=class_names, columns=class_names).to_csv(
            os.path.join(folder, "confusion_matrix.csv"), index_label="true \\ predicted")
    writer.close()


def safe_name(text):
    """A folder name from free text: runs of other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "probe"


# ---------------------------------------------------------------- one probe

def probe_list(args):
    """The probes to run: dicts with csv, label_column, task, label_kind, name and patience.

    From --tasks, relative csv paths are read from the tasks file's folder and an empty
    patience cell means --patience; otherwise one probe per --label-column.
    """
    if args.tasks:
        table = pd.read_csv(args.tasks, dtype=str, keep_default_na=False)
        missing = {"csv", "label_column", "task"} - set(table.columns)
        if missing:
            raise SystemExit(f"{args.tasks}: missing column(s) {sorted(missing)}")
        folder = os.path.dirname(os.path.abspath(args.tasks))
        probes = []
        for row, entry in table.iterrows():
            if entry["task"] not in datasets.TASKS:
                raise SystemExit(f"{args.tasks}, line {row + 2}, column 'task': {entry['task']!r} is not one of "
                                 f"{datasets.TASKS}")
            patience = entry.get("patience", "").strip() or str(args.patience)
            if not patience.isdigit():
                raise SystemExit(f"{args.tasks}, line {row + 2}, column 'patience': {patience!r} is not a "
                                 f"whole number of epochs")
            csv = entry["csv"] if os.path.isabs(entry["csv"]) else os.path.join(folder, entry["csv"])
            probes.append({"csv": csv, "label_column": entry["label_column"], "task": entry["task"],
                           "label_kind": entry.get("label_kind", "") or "generic", "patience": int(patience),
                           "name": entry.get("name", "") or f"{os.path.basename(csv)}:{entry['label_column']}"})
        return probes
    columns = args.label_column or ["label"]
    tasks = utils.per_column(args.task or ["multiclass"], len(columns), "task")
    kinds = utils.per_column(args.label_kind or ["generic"], len(columns), "label-kind")
    csv = args.csv or datasets.make_synthetic_set(args.synthetic_dir)
    return [{"csv": csv, "label_column": c, "task": t, "label_kind": k, "name": c, "patience": args.patience}
            for c, t, k in zip(columns, tasks, kinds)]


def read_labels(args, probe):
    """Read a probe's manifest and labels and check that they suit probing.

    Returns (rows: the labeled rows of the manifest, column: datasets.LabelColumn,
    split `[N]` per row). Raises datasets.ManifestError for labels that do not fit the
    task (naming file, line and column) and SystemExit for a split without labeled
    rows, test or val classes absent from train, or --prototypes on regression.
    """
    csv, task = probe["csv"], probe["task"]
    if args.prototypes and task == "regression":
        raise SystemExit(f"{probe['name']}: --prototypes needs class labels (multiclass or multilabel), "
                         f"not a regression task")
    manifest = datasets.read_manifest(csv)
    column = datasets.parse_labels(manifest, probe["label_column"], task, probe["label_kind"])
    labeled = manifest.index[column.labeled].to_numpy()
    split = manifest["split"].to_numpy()[labeled]
    for name in ("train", "val", "test"):
        if not (split == name).any():
            raise SystemExit(f"{csv}: no labeled {name} rows for column {column.name!r}")
    if task == "multiclass":
        values = column.values[labeled]
        seen = set(values[split == "train"].tolist())
        unseen = sorted({column.classes[c] for c in values} - {column.classes[c] for c in seen})
        if unseen:
            raise SystemExit(f"{csv}: classes {unseen} of column {column.name!r} appear in val or test "
                             f"but have no train rows")
    column.values, column.labeled = column.values[labeled], column.labeled[labeled]
    return manifest.iloc[labeled].reset_index(drop=True), column, split


def test_conditions(args):
    """The test audio each probe is scored on: {name: corruption or None}, main one first.

    Without --corrupt: {"clean": None}. With it: --severity first (the reported "test"),
    then each --severity-sweep value, named by severity ("0", "1.5").
    """
    severities = ([args.severity] if args.corrupt_names else []) + args.severities
    conditions = {f"{s:g}": {"names": args.corrupt_names, "severity": s, "seed": args.corrupt_seed}
                  for s in severities}
    return conditions or {"clean": None}


def run_probe(args, model, settings, checkpoint, probe, device, initial_state=None):
    """Evaluate one (checkpoint, probe): one results dict per label fraction.

    Frozen (default) and --prototypes runs share cached embeddings; --finetune starts
    each run from initial_state (the checkpoint's weights) and re-embeds val and test.
    Every run is scored on each test condition: clean, or --corrupt at --severity, and
    each --severity-sweep value.
    """
    task = probe["task"]
    args = argparse.Namespace(**{**vars(args), "patience": probe["patience"]})
    rows, column, split = read_labels(args, probe)
    paths = list(rows["path"])
    label_dtype = torch.long if task == "multiclass" else torch.float32
    y_tracks = torch.as_tensor(column.values, dtype=label_dtype)  # [N] or [N, C]
    out_dim = len(column.classes) if task != "regression" else len(column.columns)
    if initial_state is not None:
        model.load_state_dict(initial_state)

    # ---- frozen embeddings of every labeled file, and the train statistics
    embeddings, owners, failed = cached_embeddings(model, paths, settings, args, device)
    for message in failed:
        print(f"skipped: {message}")
    is_train = split[owners] == "train"
    mean, std = embeddings[is_train].mean(0), embeddings[is_train].std(0) + 1e-6
    x_all = torch.from_numpy(embeddings)

    def clip_set(name):
        mask = split[owners] == name
        return x_all[mask], owners[mask], np.unique(owners[mask])

    val_x, val_owners, val_tracks = clip_set("val")
    val_set = (val_x, val_owners, val_tracks, y_tracks[val_tracks])
    train_tracks = np.flatnonzero(split == "train")
    test_rows = np.flatnonzero(split == "test")

    corruptions = test_conditions(args)
    main_condition = next(iter(corruptions))

    def test_embeddings(corruption, cache):
        if corruption is None and cache:
            x, test_owners, _ = clip_set("test")
            return x.numpy(), test_owners
        test_paths = [paths[t] for t in test_rows]
        if cache:
            x, test_owners, _ = cached_embeddings(model, test_paths, settings, args, device, corruption)
        else:
            x, test_owners, _ = embed_files(model, test_paths, settings, args.layer, device, args.max_clips,
                                            corruption)
        return x, test_rows[test_owners]

    frozen_tests = {} if args.finetune else {k: test_embeddings(c, True) for k, c in corruptions.items()}

    results = []
    for fraction in args.label_fractions:
        runs, plotted = [], None
        for seed in range(args.seed, args.seed + args.seeds):
            chosen = label_subset(train_tracks, column.values[train_tracks], task, fraction, seed)
            replaced = 0
            if args.finetune:
                model.load_state_dict(initial_state)
                predictor, best_val, epochs, replaced = finetune(
                    args, model, settings, task, paths, y_tracks, chosen, val_tracks, out_dim, seed, mean, std,
                    device)
                tests = {k: test_embeddings(c, False) for k, c in corruptions.items()}
            else:
                is_chosen = np.isin(owners, chosen)
                if args.prototypes:
                    prototypes = class_prototypes(x_all[is_chosen], column.values[owners[is_chosen]], task, out_dim)
                    predictor, epochs = (lambda x, p=prototypes: prototype_scores(p, x)), 0
                    best_val = metrics(task, track_outputs(predictor, *val_set[:3]), val_set[3])[MAIN_METRIC[task]]
                else:
                    train_set = (x_all[is_chosen], y_tracks[owners[is_chosen]])
                    predictor, best_val, epochs = fit_head(args, task, train_set, val_set, out_dim, seed, mean, std,
                                                           device)
                tests = frozen_tests
            run = {"seed": seed, "train_tracks": len(chosen), "val": {MAIN_METRIC[task]: best_val}, "epochs": epochs,
                   "replaced_crops": replaced, "test": {}}
            for condition, (x, test_owners) in tests.items():
                tracks = np.unique(test_owners)
                outputs = track_outputs(predictor, x, test_owners, tracks)  # [tracks, C]
                run["test"][condition] = metrics(task, outputs, y_tracks[tracks], column)
                if condition == main_condition and task == "multiclass":
                    run["confusion_matrix"] = confusion_matrix(outputs.argmax(1).numpy(), y_tracks[tracks].numpy(),
                                                               out_dim).tolist()
                if condition == main_condition and plotted is None:
                    plotted = (track_embeddings(x, test_owners, tracks), tracks, outputs)
            runs.append(run)
        results.append(summarize_runs(args, checkpoint, probe, column, split, fraction, runs, main_condition,
                                      len(failed)))
        if args.plot:
            plot_run(args, results[-1], rows, column, plotted)
    return results


def summarize_runs(args, checkpoint, probe, column, split, fraction, runs, main_condition, skipped):
    """One results dict from the runs (seeds) of one label fraction: mean and std over runs."""
    task = probe["task"]
    test, test_std = mean_and_std([r["test"][main_condition] for r in runs])
    val, _ = mean_and_std([r["val"] for r in runs])
    result = {"checkpoint": checkpoint, "probe": probe["name"], "csv": probe["csv"], "label_column": column.name,
              "task": task, "head": "prototypes" if args.prototypes else args.head, "layer": args.layer,
              "finetune": args.finetune, "patience": args.patience, "label_fraction": fraction,
              "seeds": [r["seed"] for r in runs], "val": val, "epochs": [r["epochs"] for r in runs], "test": test,
              "test_std": test_std,
              "corrupt": None if main_condition == "clean" else {"names": args.corrupt_names,
                                                                  "severity": args.severity},
              "tracks": {"train": runs[0]["train_tracks"], "val": int((split == "val").sum()),
                         "test": int((split == "test").sum())},
              "skipped_files": skipped, "runs": runs}
    if args.severities:
        sweep = {f"{s:g}": mean_and_std([r["test"][f"{s:g}"] for r in runs]) for s in args.severities}
        result["sweep"] = {s: m for s, (m, _) in sweep.items()}
        result["sweep_std"] = {s: d for s, (_, d) in sweep.items()}
    return result


def plot_run(args, result, rows, column, plotted):
    """--plot for one results dict: its first run's test embeddings and confusion matrix."""
    embeddings, tracks, outputs = plotted
    labels = [",".join(rows[c].iat[t] for c in column.columns) for t in tracks]
    folder = [safe_name(result["checkpoint"]), safe_name(result["probe"])]
    if len(args.label_fractions) > 1 or result["label_fraction"] < 1:
        folder.append(f"fraction{result['label_fraction']:g}")
    folder = os.path.join(args.plot_dir, "__".join(folder))
    if column.task == "multiclass":
        predicted = [column.classes[c] for c in outputs.argmax(1).tolist()]
        write_plots(folder, embeddings, [list(pair) for pair in zip(labels, predicted)], ["label", "predicted"],
                    result["runs"][0]["confusion_matrix"], column.classes)
    else:
        write_plots(folder, embeddings, labels, None)
    result["plot_dir"] = folder
    print(f"plots: tensorboard --logdir {folder}")


# ---------------------------------------------------------------- summary

def column_name(result, results):
    """Summary column of a result: the probe name, with the label fraction when it varies."""
    fractions = {r["label_fraction"] for r in results}
    if fractions == {1.0}:
        return result["probe"]
    return f"{result['probe']} @{result['label_fraction']:g}"


def cell_text(mean, std, seeds):
    """'0.812' for one seed, '0.812 ± 0.013' for several."""
    return f"{mean:.3f}" if seeds == 1 else f"{mean:.3f} ± {std:.3f}"


def table_metrics(result):
    """The test metrics a result shows in the summary, as the paper's table reports them.

    multiclass: accuracy (and mirex for keys); multilabel: roc_auc and pr_auc;
    regression: r2, and r2 of each output when there are several (e.g. "r2 arousal").
    Returns a list of (metric name, mean, std).
    """
    test, spread = result["test"], result["test_std"]
    names = {"multiclass": ["accuracy", "mirex"], "multilabel": ["roc_auc", "pr_auc"], "regression": ["r2"]}
    cells = [(name, test[name], spread[name]) for name in names[result["task"]] if name in test]
    if result["task"] == "regression" and len(test["r2_per_output"]) > 1:
        outputs = result["label_column"].split(",")
        cells += [(f"r2 {name}", m, s) for name, m, s in zip(outputs, test["r2_per_output"], spread["r2_per_output"])]
    return cells


def summary_records(results):
    """One flat record per (result, table metric), with mean and std over seeds."""
    records = []
    for r in results:
        for metric, mean, std in table_metrics(r):
            column = column_name(r, results)
            records.append({"checkpoint": r["checkpoint"], "probe": r["probe"], "column": column,
                            "header": f"{column} ({metric})", "task": r["task"], "label_fraction": r["label_fraction"],
                            "seeds": len(r["seeds"]), "metric": metric, "mean": mean, "std": std,
                            "corrupt": r["corrupt"]})
    return records


def summary_table(results):
    """Markdown table: one row per checkpoint, one column per (probe, metric) on test."""
    records = summary_records(results)
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in records))
    columns = list(dict.fromkeys(r["header"] for r in records))
    cells = {(r["checkpoint"], r["header"]): r for r in records}
    lines = ["| checkpoint | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for checkpoint in checkpoints:
        values = []
        for c in columns:
            r = cells.get((checkpoint, c))
            values.append(cell_text(r["mean"], r["std"], r["seeds"]) if r else "-")
        lines.append(f"| {checkpoint} | " + " | ".join(values) + " |")
    corrupted = next((r["corrupt"] for r in records if r["corrupt"]), None)
    if corrupted:
        lines.append(f"\nTest audio corrupted by {','.join(corrupted['names'])} at severity {corrupted['severity']:g}.")
    return "\n".join(lines)


def summary_frame(results):
    """The summary table as a DataFrame for CSV: mean per column, plus 'COLUMN std' with seeds."""
    records = summary_records(results)
    frame = {}
    for r in records:
        row = frame.setdefault(r["checkpoint"], {"checkpoint": r["checkpoint"]})
        row[r["header"]] = r["mean"]
        if r["seeds"] > 1:
            row[f"{r['header']} std"] = r["std"]
    return pd.DataFrame(list(frame.values()))


def robustness_table(results):
    """Markdown table of the main test metric per sweep severity: rows (checkpoint, probe)."""
    swept = [r for r in results if "sweep" in r]
    if not swept:
        return ""
    severities = list(swept[0]["sweep"])
    names = ",".join(swept[0]["corrupt"]["names"])
    lines = [f"| checkpoint | probe ({names}) | " + " | ".join(f"s={s}" for s in severities) + " |",
             "|---" * (len(severities) + 2) + "|"]
    for r in swept:
        metric = MAIN_METRIC[r["task"]]
        values = [cell_text(r["sweep"][s][metric], r["sweep_std"][s][metric], len(r["seeds"])) for s in severities]
        lines.append(f"| {r['checkpoint']} | {column_name(r, results)} ({metric}) | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_summary(out, results, table, robustness):
    """Write results JSON to `out` and the summary next to it: .md, .csv and .summary.json."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = os.path.splitext(out)[0]
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n" + (f"\n{robustness}\n" if robustness else ""))
    summary_frame(results).to_csv(stem + ".csv", index=False)
    summary = {"table": summary_records(results),
               "robustness": [{"checkpoint": r["checkpoint"], "probe": r["probe"], "column": column_name(r, results),
                               "metric": MAIN_METRIC[r["task"]], "corrupt": r["corrupt"]["names"],
                               "mean": {s: m[MAIN_METRIC[r["task"]]] for s, m in r["sweep"].items()},
                               "std": {s: m[MAIN_METRIC[r["task"]]] for s, m in r["sweep_std"].items()}}
                              for r in results if "sweep" in r]}
    with open(stem + ".summary.json", "w") as f:
        json.dump(summary, f, indent=2)


def main(argv=None):
    """Run every (checkpoint, probe, label fraction); returns the list of results dicts."""
    args = finish_args(build_parser().parse_args(argv))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probes = probe_list(args)
    # ---- check every probe's manifest and labels before any embedding or training
    for probe in probes:
        read_labels(args, probe)

    # ---- probes, checkpoint by checkpoint (each encoder loaded once)
    results = []
    for checkpoint in args.checkpoint:
        model, settings = load_encoder(checkpoint, args, device)
        initial_state = copy.deepcopy(model.state_dict()) if args.finetune else None
        for probe in probes:
            results.extend(run_probe(args, model, settings, checkpoint, probe, device, initial_state))

    # ---- report
    print(json.dumps(results, indent=2))
    table = summary_table(results)
    print(table)
    robustness = robustness_table(results)
    if robustness:
        print(robustness)
    if args.out:
        write_summary(args.out, results, table, robustness)
    return results


if __name__ == "__main__":
    try:
        main()
    except datasets.ManifestError as error:
        raise SystemExit(f"error: {error}") from None
