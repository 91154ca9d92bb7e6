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
    --plot                              figures (PNG + TensorBoard): confusion matrix, few-label and
                                        robustness curves; test embeddings in the projector
One GPU: the same commands (the GPU is used when present). The tables print; the full
results (JSON) go to --out, with the tables next to it as .md and .csv.
Embeddings for your own use, no probe (--csv a manifest or a folder; docs/own-music.md):
    python probe.py --checkpoint runs/semisupcon --csv "My Music" --export-embeddings runs/embeddings

Protocol, by default the authors' (docs/probing.md): every file is cut into consecutive
clips (--max-clips of them, evenly spread); each epoch the head trains on one randomly
drawn clip per train track, early-stops on the clip-level val loss (one fixed clip per
val track), and scores a test track by applying the head to the mean of its clip
embeddings. Frozen embeddings are extracted once per (checkpoint, manifest, layer,
corruption) and cached on disk under the checkpoint's SHA-256.
"""
import argparse
import copy
import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm


import augment
import datasets
import models
import synthetic
import safety
import utils


HEADS = ("linear", "mlp")


def build_parser():
    """The command-line flags, in groups: data, model, head, robustness, run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--csv", default=None, help="manifest with a split column (default: the synthetic set)")
    data.add_argument("--synthetic-dir", default=".cache/synthetic", help="folder of the built-in synthetic set")
    datasets.add_label_flags(
        data, column_help="label column(s) to probe, repeatable (one probe each); comma-separated columns "
                          "form one regression target (default: label)",
        task_help="how each label is read (one value, or one per --label-column; default multiclass)",
        kind_help="what each label means (one value, or one per --label-column; default generic); "
                        "key adds the MIREX key score")
    data.add_argument("--tasks", default=None,
                      help="CSV of probes to run (columns csv, label_column, task; optional label_kind, name, "
                           "head (linear or mlp) and patience; an empty cell means the flag); replaces "
                           "--csv/--label-column")
    data.add_argument("--max-clips", type=int, default=16,
                      help="consecutive clips kept per file, evenly spread: a test track's clips, and the "
                           "candidates its random train crop is drawn from (default %(default)s)")
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
    model.add_argument("--hidden-dim", type=int, default=512,
                       help="random only: projection head hidden size (default %(default)s)")
    model.add_argument("--projection-dim", type=int, default=128,
                       help="random only: projection size D (default %(default)s)")
    head = parser.add_argument_group("head")
    head.add_argument("--head", default="mlp", choices=HEADS,
                      help="probe head where the tasks file has no head cell (default %(default)s; the paper: mlp, "
                           "and linear for GiantSteps, EmoMusic, MedleyDB and VocalSet)")
    head.add_argument("--head-hidden", type=int, default=512,
                      help="hidden units of the MLP head, ReLU (default %(default)s, the paper's)")
    head.add_argument("--aggregate", default="embeddings", choices=("embeddings", "outputs"),
                      help="a track's prediction: the head applied to the mean of its clip embeddings (default, "
                           "the authors'), or the mean of the head's outputs on each clip")
    head.add_argument("--train-clips", default="random", choices=("random", "all"),
                      help="random (default, the authors'): each epoch one clip per train track, drawn among its "
                           "--max-clips clips, and the val loss on one fixed clip per val track; all: every clip")
    head.add_argument("--early-stop", default="loss", choices=("loss", "metric"),
                      help="what early stopping watches on val: the clip-level loss (default, the authors') or "
                           "the track-level main metric (accuracy, ROC-AUC, R2)")
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
                      help="epochs without val improvement before stopping, where the tasks file has no "
                           "patience cell (default %(default)s; the authors: MTAT 15, MTG 7, GTZAN / GiantSteps / "
                           "VocalSet 50, NSynth 2, MedleyDB 10, EmoMusic 200)")
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
                     help="JSON results file; the tables go next to it as .md and .csv (default: print the "
                          "tables only)")
    run.add_argument("--plot", action="store_true",
                     help="figures as PNG files in --plot-dir, also shown in TensorBoard: per probe a confusion "
                          "matrix (multiclass) and the test embeddings in the projector (path, label, predicted); "
                          "the few-label curve (several --label-fraction) and the robustness curve "
                          "(--severity-sweep), one line per checkpoint")
    run.add_argument("--plot-dir", default=None,
                     help="TensorBoard folder for --plot (default: next to --out as NAME-plots, else "
                          "runs/probe-plots)")
    run.add_argument("--cache-dir", default=".cache/embeddings",
                     help="embedding cache folder, 'none' disables (default %(default)s)")
    run.add_argument("--workers", type=int, default=2, help="--finetune: data-loading processes (default %(default)s)")
    run.add_argument("--seed", type=int, default=0,
                     help="seed for the head, the label subset and the random encoder (default %(default)s)")
    export = parser.add_argument_group("export")
    export.add_argument("--export-embeddings", default=None, metavar="OUT",
                        help="no probe: write the embeddings of every file of --csv (a manifest or a folder) to "
                             "OUT.npy (float32, one row per clip, --layer) and OUT.csv (row i: path, clip, "
                             "start_seconds and the manifest's columns); resumable (parts in OUT.parts)")
    export.add_argument("--per-track", action="store_true",
                        help="--export-embeddings: one row per file, the mean of its clips' embeddings")
    export.add_argument("--export-part-files", type=int, default=256,
                        help="--export-embeddings: files per part written to OUT.parts, the unit a rerun "
                             "skips when it is done (default %(default)s)")
    return parser


def finish_args(args):
    """Check flag combinations and compute the values derived from flags, once."""
    fractions = []
    for value in args.label_fraction or ["1"]:
        for part in value.split(","):
            fraction = float(part)
            if not 0 < fraction <= 1:
                raise utils.UserError(f"--label-fraction {part}: must be in (0, 1]")
            fractions.append(fraction)
    args.label_fractions = list(dict.fromkeys(fractions))
    if args.seeds < 1:
        raise utils.UserError(f"--seeds {args.seeds}: must be at least 1")
    names = list(augment.DEFAULT_AUGMENT) if args.corrupt.strip() == "default" else None
    try:
        args.corrupt_names = names if names is not None else augment.parse_augment(args.corrupt)
    except ValueError as error:
        raise utils.UserError(f"--corrupt: {error}") from None
    args.severities = [float(s) for s in args.severity_sweep.split(",")] if args.severity_sweep else []
    if args.severities and not args.corrupt_names:
        raise utils.UserError("--severity-sweep needs --corrupt (transform names, or 'default' for the paper's chain)")
    if min(args.severities + [args.severity]) < 0:
        raise utils.UserError("severities must be >= 0")
    if args.prototypes and args.finetune:
        raise utils.UserError("--prototypes has no head to fine-tune with; use one of --prototypes, --finetune")
    if args.plot_dir is None:
        args.plot_dir = os.path.splitext(args.out)[0] + "-plots" if args.out else os.path.join("runs", "probe-plots")
    return args


# ---------------------------------------------------------------- metrics

def accuracy(logits, labels):
    """Share of rows whose argmax equals the class index. logits `[M, C]`, labels `[M]`."""
    return float((logits.argmax(1) == labels).double().mean())


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
    """Coefficient of determination per output `[K]` (1 - SSE / SST), on `[M, K]` arrays.

    A constant target (SST = 0) scores 1 when predicted exactly and 0 otherwise, as
    scikit-learn's r2_score (force_finite), instead of a huge negative number.
    """
    predictions, targets = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
    residual = ((targets - predictions) ** 2).sum(0)
    total = ((targets - targets.mean(0)) ** 2).sum(0)
    constant = total == 0
    score = 1 - residual / np.where(constant, 1.0, total)
    return np.where(constant, np.where(residual == 0, 1.0, 0.0), score)


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
        # Rank the logits themselves: float32 sigmoids of logits above ~17 all round to 1.0
        # and would tie (the ranking, hence ROC-AUC and PR-AUC, is the same otherwise).
        scores, tags = outputs.double().numpy(), labels.numpy()
        aucs = [roc_auc(scores[:, c], tags[:, c]) for c in range(tags.shape[1])]
        aps = [average_precision(scores[:, c], tags[:, c]) for c in range(tags.shape[1])]
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
    settings holding encoder, width, sample_rate, clip_samples, hidden_dim, projection_dim,
    a cache key (the checkpoint file's SHA-256; for 'random', the flags and seed that
    build it) and what results record: file (the checkpoint file read, None for
    'random'), step (training steps, 0 for 'random') and sha256 (its first 12 hex digits).
    """
    if checkpoint == "random":
        settings = {"encoder": args.encoder, "width": args.width, "sample_rate": args.sample_rate,
                    "clip_samples": int(round(args.clip_seconds * args.sample_rate)),
                    "hidden_dim": args.hidden_dim, "projection_dim": args.projection_dim}
        key = "random-" + hashlib.sha256(f"{sorted(settings.items())}-{args.seed}".encode()).hexdigest()
        state, path = None, None
    else:
        # A folder gives its newest checkpoint that loads; a broken file is one line naming it.
        path, state = safety.find_checkpoint(checkpoint)
        if state is None:
            raise utils.UserError(f"{checkpoint}: no loadable checkpoint-*.pt in this folder; give a checkpoint "
                                  f"file, a run folder of train.py, or 'random'")
        saved = state["args"]
        settings = {k: saved[k] for k in ("encoder", "width", "sample_rate", "clip_samples",
                                          "hidden_dim", "projection_dim")}
        key = file_digest(path)
    # A private RNG stream: building the random encoder leaves the caller's seed state alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        encoder = models.build_encoder(settings["encoder"], settings["clip_samples"], settings["sample_rate"],
                                       settings["width"])
        model = models.ContrastiveModel(encoder, settings["hidden_dim"], settings["projection_dim"])
    if state is not None:
        safety.load_weights(model, state["model"], path)
    settings.update(key=key, file=path, step=0 if state is None else int(state["step"]),
                    sha256=None if state is None else key[:12])
    return model.to(device).eval(), settings


def file_digest(path):
    """SHA-256 of a file's bytes, as 64 hex digits (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        raise utils.UserError(f"none of the {len(paths)} files could be read, e.g. {failed[0] if failed else ''}; "
                              f"check them with `python train.py --check-data`")
    return torch.cat(chunks).numpy(), np.array(owners), failed


def open_export_parts(parts, job):
    """Make the parts folder of an export; empty it first if its parts are of another job.

    job: the inputs that decide the parts' contents (checkpoint, files, flags), kept in
    PARTS/job.json so that a rerun with the same inputs continues.
    """
    job_file = os.path.join(parts, "job.json")
    if os.path.isfile(job_file):
        with open(job_file) as f:
            if json.load(f) != job:
                print(f"export: {parts} holds parts of other inputs (checkpoint, files or flags); starting over")
                for name in os.listdir(parts):
                    os.remove(os.path.join(parts, name))
    os.makedirs(parts, exist_ok=True)
    with open(job_file, "w") as f:
        json.dump(job, f)


def embed_part(model, paths, rows, settings, args, device, bar):
    """Embeddings of the files at `rows`, in batches of about --batch-size clips.

    Returns (x `[clips, E]` float32, or `[tracks, E]` with --per-track; table with
    row and clip / start_seconds, or row and clips; messages of the unreadable files).
    """
    chunks, records, pending, pending_records, skipped = [], [], [], [], []
    for row in rows:
        try:
            clips = datasets.read_clips(paths[row], settings["clip_samples"], settings["sample_rate"])
        except datasets.AudioError as error:
            skipped.append(str(error))
            bar.update(1)
            continue
        kept = torch.arange(len(clips))
        if args.max_clips is not None and len(clips) > args.max_clips:
            # The same evenly spread clips as datasets.read_clips(..., max_clips).
            kept = torch.linspace(0, len(clips) - 1, args.max_clips).round().long()
        pending.append(clips[kept])  # [K, T]
        pending_records.extend((row, int(c)) for c in kept)
        if sum(len(p) for p in pending) >= args.batch_size or row == rows[-1]:
            with torch.no_grad():
                chunks.append(embed(model, torch.cat(pending).to(device), args.layer).float().cpu())
            records.extend(pending_records)
            pending, pending_records = [], []
        bar.update(1)
    if pending:
        with torch.no_grad():
            chunks.append(embed(model, torch.cat(pending).to(device), args.layer).float().cpu())
        records.extend(pending_records)
    x = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), np.float32)  # [rows, E]
    table = pd.DataFrame(records, columns=["row", "clip"])
    if args.per_track and len(table):
        owners = table["row"].to_numpy()
        tracks = np.unique(owners)
        x = track_embeddings(x, owners, tracks).numpy()  # [tracks, E]
        table = pd.DataFrame({"row": tracks, "clips": np.bincount(owners)[tracks]})
    else:
        clip_seconds = settings["clip_samples"] / settings["sample_rate"]
        table["start_seconds"] = (table["clip"] * clip_seconds).round(6)
    return x, table, skipped


def write_part(part, x, table, skipped):
    """Save one finished part (PART.npy, PART.csv, PART.skipped.json), each renamed into place."""
    np.save(part + ".tmp.npy", x.astype(np.float32))
    os.replace(part + ".tmp.npy", part + ".npy")
    with open(part + ".skipped.json", "w") as f:
        json.dump(skipped, f)
    table.to_csv(part + ".tmp.csv", index=False)
    os.replace(part + ".tmp.csv", part + ".csv")


def join_parts(parts, count, csv, paths):
    """The `count` parts in order: (x `[rows, E]` float32, table with row, skipped messages)."""
    arrays = [np.load(os.path.join(parts, f"part-{k:05d}.npy")) for k in range(count)]
    skipped = []
    for k in range(count):
        with open(os.path.join(parts, f"part-{k:05d}.skipped.json")) as f:
            skipped.extend(json.load(f))
    tables = [pd.read_csv(os.path.join(parts, f"part-{k:05d}.csv")) for k in range(count)]
    arrays = [a for a in arrays if a.size]
    if not arrays:
        raise utils.UserError(f"none of the {len(paths)} files of {csv} could be read, e.g. "
                              f"{skipped[0] if skipped else ''}")
    return np.concatenate(arrays).astype(np.float32), pd.concat(tables, ignore_index=True), skipped


def export_embeddings(args, device):
    """--export-embeddings: frozen embeddings of every file of --csv, written for one's own use.

    Writes OUT.npy (float32 `[rows, E]`) and OUT.csv, whose row i describes row i: path
    (relative to OUT.csv's folder, so OUT.csv reads as a manifest), clip (its index among
    the file's consecutive clips), start_seconds, then the manifest's own columns; with
    --per-track one row per file (the mean of its clips; columns path, clips, ...). The
    clips and values are those of embed_files (the probe's). Files are embedded in parts
    of --export-part-files, each saved in OUT.parts/ as it finishes, so a rerun with the
    same inputs skips finished parts; the parts are removed once OUT is complete.
    Returns {"npy", "csv", "rows", "dim", "skipped"}.
    """
    if len(args.checkpoint) != 1:
        raise utils.UserError(f"--export-embeddings takes one --checkpoint, got {len(args.checkpoint)}")
    if args.export_part_files < 1:
        raise utils.UserError(f"--export-part-files {args.export_part_files}: must be at least 1")
    model, settings = load_encoder(args.checkpoint[0], args, device)
    csv = datasets.manifest_or_scan(args.csv, datasets.SCAN_CACHE) if args.csv else \
        synthetic.make_synthetic_set(args.synthetic_dir)
    manifest = datasets.read_manifest(csv)
    out = args.export_embeddings[:-4] if args.export_embeddings.endswith((".npy", ".csv")) else args.export_embeddings
    out_folder = os.path.dirname(os.path.abspath(out))
    parts = out + ".parts"
    paths = list(manifest["path"])
    open_export_parts(parts, {"checkpoint": settings["key"], "layer": args.layer, "max_clips": args.max_clips,
                              "per_track": args.per_track, "part_files": args.export_part_files,
                              "files": hashlib.sha256(json.dumps(paths).encode()).hexdigest()})
    starts = range(0, len(paths), args.export_part_files)
    done = [k for k in range(len(starts)) if os.path.isfile(os.path.join(parts, f"part-{k:05d}.csv"))]
    if done:
        print(f"export: {len(done)} of {len(starts)} parts already in {parts}; continuing")
    with tqdm(total=len(paths), initial=min(len(paths), len(done) * args.export_part_files), desc="embed",
              unit="file") as bar:
        for k, start in enumerate(starts):
            if k not in done:
                rows = list(range(start, min(start + args.export_part_files, len(paths))))
                write_part(os.path.join(parts, f"part-{k:05d}"), *embed_part(model, paths, rows, settings, args,
                                                                             device, bar))
    x, table, skipped = join_parts(parts, len(starts), csv, paths)  # x [rows, E]
    owners = table.pop("row").to_numpy()
    table.insert(0, "path", [os.path.relpath(paths[r], out_folder).replace(os.sep, "/") for r in owners])
    for column in [c for c in manifest.columns if c not in ("path", "source", "source_row")]:
        table[column] = manifest[column].to_numpy()[owners]
    os.makedirs(out_folder, exist_ok=True)
    np.save(out + ".tmp.npy", x)
    os.replace(out + ".tmp.npy", out + ".npy")
    table.to_csv(out + ".tmp.csv", index=False)
    os.replace(out + ".tmp.csv", out + ".csv")
    for name in os.listdir(parts):
        os.remove(os.path.join(parts, name))
    os.rmdir(parts)
    unit = "track" if args.per_track else "clip"
    step = f", step {settings['step']}" if "step" in settings else ""
    warned = sum(p in datasets.DECODER_WARNINGS for p in paths)
    print(f"embeddings: {x.shape[0]} {unit}s x {x.shape[1]} ({args.layer}, {args.checkpoint[0]}{step}) -> {out}.npy, "
          f"row i described by row i of {out}.csv; {len(skipped)} unreadable file(s) skipped"
          + (f"; {warned} file(s) with decoder warnings (caught)" if warned else ""))
    for message in skipped[:10]:
        print(f"  skipped: {message}")
    return {"npy": out + ".npy", "csv": out + ".csv", "rows": int(x.shape[0]), "dim": int(x.shape[1]),
            "skipped": skipped}


def corruption_name(corruption):
    """'clean', or the transforms and severity, e.g. 'noise,reverb@1.5'."""
    return "clean" if corruption is None else f"{','.join(corruption['names'])}@{corruption['severity']:g}"


def cached_embeddings(model, paths, settings, args, device, corruption=None):
    """embed_files over `paths`, cached in --cache-dir as DIGEST.npy plus a DIGEST.json index.

    The digest covers the checkpoint's SHA-256 (settings["key"]), the files and their
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
    print(f"embedding cache: extracting {len(paths)} files with checkpoint {settings['key'][:12]} "
          f"({corruption_name(corruption)}) into {base}.npy")
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





def track_embeddings(embeddings, owners, tracks):
    """Track-level embeddings: the mean of each track's clip embeddings -> `[len(tracks), E]`.

    embeddings `[M, E]` (on any device; the result stays there), owners `[M]` track
    indices, tracks: the sorted distinct owners.
    """
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    index = torch.as_tensor(np.searchsorted(tracks, owners), device=x.device)
    summed = torch.zeros(len(tracks), x.shape[1], device=x.device).index_add_(0, index, x)
    counts = torch.zeros(len(tracks), device=x.device).index_add_(0, index, torch.ones(len(owners), device=x.device))
    return summed / counts[:, None]


@dataclasses.dataclass
class ClipSet:
    """Clip embeddings of some tracks: x `[M, E]` float32, owners `[M]` their track indices."""
    x: torch.Tensor
    owners: np.ndarray

    @property
    def tracks(self):
        """The distinct track indices, sorted `[n]`."""
        return np.unique(self.owners)

    def subset(self, rows):
        """The clips at `rows` (indices `[m]` or a boolean mask `[M]`)."""
        return ClipSet(self.x[torch.as_tensor(rows)], self.owners[rows])

    def one_per_track(self, rng):
        """Row indices `[n]` of one clip per track, each drawn uniformly among the track's clips."""
        order = np.argsort(self.owners, kind="stable")
        _, first, counts = np.unique(self.owners[order], return_index=True, return_counts=True)
        return order[first + (rng.random(len(counts)) * counts).astype(np.int64)]


@dataclasses.dataclass
class ProbeData:
    """One probe's labeled tracks, their settings and frozen clip embeddings.

    name, csv, task, column (datasets.LabelColumn), head ("linear" or "mlp") and patience as
    the probe list gives them; rows: the labeled manifest rows `[N]`, with paths and split `[N]`;
    labels `[N]` class indices or `[N, C]` float targets; out_dim: classes or outputs C;
    clips: every readable track's clips; mean, std `[E]`: train-clip statistics the head
    standardizes with; manifest_digest: the manifest file's SHA-256 (12 hex digits);
    failed: messages of files that could not be read.
    """
    name: str
    csv: str
    task: str
    column: datasets.LabelColumn
    head: str
    patience: int
    rows: pd.DataFrame
    paths: list
    split: np.ndarray
    labels: torch.Tensor
    out_dim: int
    clips: ClipSet
    mean: torch.Tensor
    std: torch.Tensor
    manifest_digest: str
    failed: list

    def split_clips(self, name):
        """The clips of the split called `name` (train, val or test)."""
        return self.clips.subset(self.split[self.clips.owners] == name)


# ---------------------------------------------------------------- heads and prototypes

class Standardize(torch.nn.Module):
    """(x - mean) / std with fixed train-split statistics `[E]`, so one lr suits every encoder."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x):
        return (x - self.mean) / self.std


def make_head(kind, in_dim, out_dim, hidden):
    """Linear head, or the paper's MLP: in_dim -> hidden (ReLU) -> out_dim."""
    if kind == "linear":
        return torch.nn.Linear(in_dim, out_dim)
    return torch.nn.Sequential(torch.nn.Linear(in_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, out_dim))


def new_head(args, data, seed, device):
    """A fresh head for `data` (its head kind, standardizing with its train statistics), seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = make_head(data.head, len(data.mean), data.out_dim, args.head_hidden)
        return torch.nn.Sequential(Standardize(data.mean, data.std), head).to(device)


def head_loss(task, outputs, labels):
    """Cross-entropy (multiclass), binary cross-entropy (multilabel) or MSE (regression)."""
    if task == "multiclass":
        return F.cross_entropy(outputs, labels)
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(outputs, labels)
    return F.mse_loss(outputs, labels)


@torch.no_grad()
def track_outputs(predictor, clips, aggregate, device=None):
    """Track-level outputs `[len(clips.tracks), C]` on the CPU, one row per track of `clips`.

    aggregate "embeddings": the predictor applied to each track's mean clip embedding (the
    authors' protocol); "outputs": the predictor's clip outputs averaged per track.
    """
    x = clips.x.to(device) if device is not None else clips.x
    if aggregate == "embeddings":
        return predictor(track_embeddings(x, clips.owners, clips.tracks)).float().cpu()
    return track_embeddings(predictor(x).float(), clips.owners, clips.tracks).cpu()


@torch.no_grad()
def val_scores(predictor, data, val, val_crops, aggregate, device=None):
    """What early stopping reads: {"loss": clip-level loss on val_crops, main metric: on val tracks}.

    val: every val clip (the track-level metric, aggregated as `aggregate`); val_crops: the
    clips the loss is taken on, or None for the metric alone (prototype scores are not
    logits, so they have no loss).
    """
    metric = MAIN_METRIC[data.task]
    scores = {metric: metrics(data.task, track_outputs(predictor, val, aggregate, device), data.labels[val.tracks],
                              data.column)[metric]}
    if val_crops is not None:
        outputs = predictor(val_crops.x.to(device) if device is not None else val_crops.x).float()  # [m, C]
        scores["loss"] = float(head_loss(data.task, outputs, data.labels[val_crops.owners].to(outputs.device)))
    return scores


class EarlyStopping:
    """Keeps the best epoch's scores and state; says when to stop.

    monitor: "loss" (lower is better) or a metric name (higher is better). A non-finite
    value never counts as an improvement, except on the first epoch.
    """

    def __init__(self, patience, monitor):
        self.patience, self.monitor = patience, monitor
        self.best, self.best_state, self.best_epoch, self.waited = None, None, 0, 0

    def update(self, epoch, scores, state):
        """Record one epoch's val `scores` (a dict holding the monitored key); `state()` makes
        a copy of what to keep if this epoch is the best so far. Returns True to stop."""
        value, best = scores[self.monitor], None if self.best is None else self.best[self.monitor]
        improved = best is None or (value < best if self.monitor == "loss" else value > best)
        if improved:
            self.best, self.best_state, self.best_epoch, self.waited = dict(scores), state(), epoch, 0
            return False
        self.waited += 1
        return self.waited >= self.patience


def monitor_name(args, task):
    """The val score early stopping watches: "loss", or the task's main metric."""
    return "loss" if args.early_stop == "loss" else MAIN_METRIC[task]


def val_crop_rows(args, val, seed):
    """The val clips the loss is taken on: one per track drawn once with `seed`
    (--train-clips random), or every clip (all). Row indices into `val`."""
    if args.train_clips == "all":
        return np.arange(len(val.owners))
    return val.one_per_track(np.random.default_rng([seed, 2]))


def fit_head(args, data, chosen, seed, device):
    """Train data.head on frozen embeddings of the `chosen` train tracks; Adam, early stopping on val.

    --train-clips random (the authors'): each epoch one clip per chosen track, drawn anew
    among its cached clips; all: every cached clip. The monitored val score (--early-stop)
    is checked after every epoch; the head of the best epoch is kept. Training runs on
    `device` (the embeddings are moved there once).
    Returns (head on CPU in eval mode, val scores of the best epoch, epochs run).
    """
    train = data.clips.subset(np.isin(data.clips.owners, chosen))
    val = data.split_clips("val")
    val_crops = val.subset(val_crop_rows(args, val, seed))
    x, labels = train.x.to(device), data.labels[train.owners].to(device)  # [M, E], [M] or [M, C]
    head = new_head(args, data, seed, device)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng, order = np.random.default_rng([seed, 1]), torch.Generator().manual_seed(seed)
    stopper = EarlyStopping(data.patience, monitor_name(args, data.task))
    for epoch in range(1, args.max_epochs + 1):
        rows = torch.as_tensor(train.one_per_track(rng) if args.train_clips == "random" else np.arange(len(x)))
        head.train()
        for batch in rows[torch.randperm(len(rows), generator=order)].split(args.batch_size):
            batch = batch.to(device)
            loss = head_loss(data.task, head(x[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        scores = val_scores(head, data, val, val_crops, args.aggregate, device)
        if stopper.update(epoch, scores, lambda: copy.deepcopy(head.state_dict())):
            break
    head.load_state_dict(stopper.best_state)
    return head.cpu().eval(), stopper.best, epoch


def collate_crops(items):
    """ClipDataset items -> (audio `[B, T]`, rows used `[B]`, failed file count)."""
    audio = torch.cat([item["audio"] for item in items])  # [B, T] (one view per item)
    return audio, torch.tensor([item["clip"] for item in items]), sum(item["failed"] for item in items)


def finetune(args, model, settings, data, chosen, seed, device):
    """Fine-tune the model's encoder together with a new head, Adam with early stopping on val.

    Every epoch reads one random crop (datasets.read_source_crops) of each `chosen` train
    track from the audio; the encoder runs in train mode (batch-norm statistics update).
    Val: every val track's consecutive clips, re-embedded each epoch, scored as in
    fit_head (loss on one fixed clip per track, or on all with --train-clips all; the
    track metric). The encoder learns at --finetune-lr, the head at --lr; with --layer
    projection the projection head is trained too. A progress bar shows the epochs, the
    last train loss and the val scores. On return, model holds the best epoch's weights.
    Returns (head on CPU, val scores of the best epoch, epochs run, unreadable crops replaced).
    """
    head = new_head(args, data, seed, device)
    tuned = [model.encoder] + ([model.head] if args.layer == "projection" else [])
    optimizer = torch.optim.Adam([{"params": head.parameters(), "lr": args.lr},
                                  {"params": [p for m in tuned for p in m.parameters()], "lr": args.finetune_lr}],
                                 weight_decay=args.weight_decay)
    dataset = datasets.ClipDataset(data.paths, [], {0: np.asarray(chosen)}, 1, settings["clip_samples"],
                                   settings["sample_rate"])
    rng = np.random.default_rng(seed)
    val_tracks = np.flatnonzero(data.split == "val")
    val_paths = [data.paths[t] for t in val_tracks]
    stopper = EarlyStopping(data.patience, monitor_name(args, data.task))
    predictor = lambda x: head(x.to(device))  # noqa: E731 (val clips stay on the CPU)
    progress = tqdm(range(1, args.max_epochs + 1), desc=f"fine-tune {data.name} seed {seed}", unit="epoch",
                    dynamic_ncols=True)
    replaced, val_rows, epoch, train_loss = 0, None, 0, float("nan")
    for epoch in progress:
        order = rng.permutation(chosen)
        crop_seeds = rng.integers(0, 2**62, size=len(order))
        draws = [datasets.Draw(int(t), int(s), 0) for t, s in zip(order, crop_seeds)]
        # Batch norm needs two clips to train on, so a final batch of one is left out.
        batches = [b for b in (draws[i:i + args.batch_size] for i in range(0, len(draws), args.batch_size))
                   if len(b) > 1]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                             collate_fn=collate_crops)
        model.train()
        head.train()
        for audio, rows, failed in loader:
            replaced += failed
            loss = head_loss(data.task, head(embed(model, audio.to(device), args.layer)), data.labels[rows].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            train_loss = loss.item()
        model.eval()
        head.eval()
        embeddings, owners, _ = embed_files(model, val_paths, settings, args.layer, device, args.max_clips)
        val = ClipSet(torch.from_numpy(embeddings), val_tracks[owners])
        val_rows = val_crop_rows(args, val, seed) if val_rows is None else val_rows
        scores = val_scores(predictor, data, val, val.subset(val_rows), args.aggregate)
        progress.set_postfix({"train loss": f"{train_loss:.3f}", **{f"val {k}": f"{v:.3f}" for k, v in scores.items()}})
        if stopper.update(epoch, scores, lambda: (copy.deepcopy(head.state_dict()),
                                                 copy.deepcopy(model.state_dict()))):
            break
    progress.close()
    head.load_state_dict(stopper.best_state[0])
    model.load_state_dict(stopper.best_state[1])
    return head.cpu().eval(), stopper.best, epoch, replaced


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

def new_figure(**kwargs):
    """plt.subplots(**kwargs) drawn off screen (files only, no display).

    matplotlib is imported on the first figure, not with the module: probing without
    --plot then runs where matplotlib is absent (the GPU check's machine has none).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(**kwargs)


def confusion_figure(counts, class_names, title):
    """A confusion matrix as a matplotlib Figure: true class down, predicted class across.

    counts `[C, C]` (row = true, column = predicted); each cell is shaded by its share of
    the row (white 0 to dark blue 1, colour bar at the side) and shows its count (every
    cell up to 15 classes, the non-zero ones beyond). class_names label both axes.
    """
    counts = np.asarray(counts)
    n = len(counts)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # [C, C]
    side = min(24.0, max(4.5, 0.32 * n + 2.5))  # inches: room for the names as classes grow
    figure, axes = new_figure(figsize=(side + 1.2, side), dpi=120)
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(n), labels=class_names, rotation=90 if n > 5 else 45, ha="center" if n > 5 else "right",
                    rotation_mode="anchor" if n <= 5 else "default")
    axes.set_yticks(range(n), labels=class_names)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title)
    font = max(4.0, min(10.0, 160 / n))
    for i in range(n):
        for j in range(n):
            if counts[i, j] or n <= 15:
                axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=font,
                          color="white" if rates[i, j] > 0.5 else "black")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class's test tracks")
    figure.tight_layout()
    return figure


def curve_figure(lines, xlabel, ylabel, title, log_x=False):
    """Metric curves as a Figure: lines {label: (x `[n]`, mean `[n]`, std `[n]`)}, one line each,
    with ± std error bars and a shaded band where std is non-zero."""
    figure, axes = new_figure(figsize=(6.4, 4.4), dpi=120)
    for label, (x, mean, std) in lines.items():
        x, mean, std = (np.asarray(v, dtype=np.float64) for v in (x, mean, std))
        axes.errorbar(x, mean, yerr=std if std.any() else None, marker="o", capsize=3, label=label)
        if std.any():
            axes.fill_between(x, mean - std, mean + std, alpha=0.15)
    if log_x:
        axes.set_xscale("log")
        ticks = sorted({float(v) for x, _, _ in lines.values() for v in x})
        axes.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])
        axes.minorticks_off()
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def save_figure(figure, path, writer, tag):
    """Write `figure` as a PNG at `path` and as image `tag` to a TensorBoard writer, then close it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)
    writer.add_figure(tag, figure, close=True)


def write_projector(folder, embeddings, metadata, header):
    """Test embeddings `[N, E]` for TensorBoard's projector in `folder`, one metadata row
    (a list of header's columns) per embedding. Open with `tensorboard --logdir FOLDER`."""
    writer = SummaryWriter(log_dir=folder)
    writer.add_embedding(torch.as_tensor(embeddings), metadata=metadata, metadata_header=header, tag="test")
    writer.close()


def safe_name(text):
    """A folder name from free text: runs of other characters become '_'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "probe"


def checkpoint_label(result):
    """How figures name a result's checkpoint: as typed, with its step when it has one."""
    step = result.get("checkpoint_step")
    return result["checkpoint"] if not result.get("checkpoint_file") else f"{result['checkpoint']} (step {step})"


def plot_curves(args, results):
    """--plot after every probe: per probe, the few-label curve (with several label fractions)
    and the robustness curve (with --severity-sweep; one per label fraction), one line per
    checkpoint, as PNGs in --plot-dir and in its TensorBoard log. Returns the PNG paths."""
    if len(args.label_fractions) < 2 and not args.severities:
        return []
    written = []
    writer = SummaryWriter(log_dir=args.plot_dir)
    for probe in dict.fromkeys(r["probe"] for r in results):
        mine = [r for r in results if r["probe"] == probe]
        metric = MAIN_METRIC[mine[0]["task"]]
        seeds = len(mine[0]["seeds"])
        spread = f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""
        if len({r["label_fraction"] for r in mine}) > 1:
            lines = {}
            for checkpoint in dict.fromkeys(r["checkpoint"] for r in mine):
                ordered = sorted((r for r in mine if r["checkpoint"] == checkpoint), key=lambda r: r["label_fraction"])
                lines[checkpoint_label(ordered[0])] = ([r["label_fraction"] for r in ordered],
                                                       [r["test"][metric] for r in ordered],
                                                       [r["test_std"][metric] for r in ordered])
            corrupt = mine[0]["corrupt"]
            audio = f"\ntest audio corrupted by {','.join(corrupt['names'])} at s={corrupt['severity']:g}" \
                if corrupt else ""
            path = os.path.join(args.plot_dir, f"few-labels__{safe_name(probe)}.png")
            save_figure(curve_figure(lines, "share of labeled train tracks", f"test {metric}",
                                     f"{probe}: test {metric} against label fraction{spread}{audio}", log_x=True),
                        path, writer, f"few-labels/{probe}")
            written.append(path)
        for fraction in dict.fromkeys(r["label_fraction"] for r in mine if "sweep" in r):
            swept = [r for r in mine if "sweep" in r and r["label_fraction"] == fraction]
            names = ",".join(swept[0]["corrupt"]["names"])
            lines = {checkpoint_label(r): ([float(s) for s in r["sweep"]], [m[metric] for m in r["sweep"].values()],
                                           [d[metric] for d in r["sweep_std"].values()]) for r in swept}
            suffix = "" if fraction == 1 else f"@{fraction:g}"
            path = os.path.join(args.plot_dir, f"robustness__{safe_name(probe + suffix)}.png")
            save_figure(curve_figure(lines, f"severity s of the test corruption ({names})", f"test {metric}",
                                     f"{probe}{' ' + suffix if suffix else ''}: robustness{spread}"),
                        path, writer, f"robustness/{probe}{suffix}")
            written.append(path)
    writer.close()
    return written


# ---------------------------------------------------------------- one probe

def probe_list(args):
    """The probes to run: dicts with csv, label_column, task, label_kind, name, head and patience.

    From --tasks, relative csv paths are read from the tasks file's folder, and an empty
    head or patience cell (or a missing column) means --head or --patience; otherwise one
    probe per --label-column, with --head and --patience.
    """
    if args.tasks:
        table = pd.read_csv(args.tasks, dtype=str, keep_default_na=False)
        missing = {"csv", "label_column", "task"} - set(table.columns)
        if missing:
            raise utils.UserError(f"{args.tasks}: missing column(s) {sorted(missing)}; a tasks file has the columns "
                                  f"csv, label_column, task (optional: label_kind, name, head, patience)")
        folder = os.path.dirname(os.path.abspath(args.tasks))
        probes = []
        for row, entry in table.iterrows():
            where = f"{args.tasks}, line {row + 2}"
            if entry["task"] not in datasets.TASKS:
                raise utils.UserError(f"{where}, column 'task': {entry['task']!r} is not one of {datasets.TASKS}")
            head = entry.get("head", "").strip() or args.head
            if head not in HEADS:
                raise utils.UserError(f"{where}, column 'head': {head!r} is not one of {HEADS}")
            patience = entry.get("patience", "").strip() or str(args.patience)
            if not patience.isdigit():
                raise utils.UserError(f"{where}, column 'patience': {patience!r} is not a whole number of epochs")
            csv = entry["csv"] if os.path.isabs(entry["csv"]) else os.path.join(folder, entry["csv"])
            probes.append({"csv": csv, "label_column": entry["label_column"], "task": entry["task"],
                           "label_kind": entry.get("label_kind", "") or "generic", "head": head,
                           "patience": int(patience),
                           "name": entry.get("name", "") or f"{os.path.basename(csv)}:{entry['label_column']}"})
        return probes
    columns = args.label_column or ["label"]
    tasks = utils.per_column(args.task or ["multiclass"], len(columns), "task")
    kinds = utils.per_column(args.label_kind or ["generic"], len(columns), "label-kind")
    csv = datasets.manifest_or_scan(args.csv, datasets.SCAN_CACHE) if args.csv else \
        synthetic.make_synthetic_set(args.synthetic_dir)
    return [{"csv": csv, "label_column": c, "task": t, "label_kind": k, "name": c, "head": args.head,
             "patience": args.patience} for c, t, k in zip(columns, tasks, kinds)]


def read_labels(args, probe):
    """Read a probe's manifest and labels and check that they suit probing.

    Returns (rows: the labeled rows of the manifest, column: datasets.LabelColumn,
    split `[N]` per row). Raises datasets.ManifestError for labels that do not fit the
    task (naming file, line and column) and utils.UserError for a split without labeled
    rows, test or val classes absent from train, or --prototypes on regression.
    """
    csv, task = probe["csv"], probe["task"]
    if args.prototypes and task == "regression":
        raise utils.UserError(f"{probe['name']}: --prototypes needs class labels (multiclass or multilabel), "
                              f"not a regression task; drop --prototypes for this probe")
    manifest = datasets.read_manifest(csv)
    column = datasets.parse_labels(manifest, probe["label_column"], task, probe["label_kind"])
    labeled = manifest.index[column.labeled].to_numpy()
    split = manifest["split"].to_numpy()[labeled]
    for name in ("train", "val", "test"):
        if not (split == name).any():
            raise utils.UserError(f"{csv}: no labeled {name} rows for column {column.name!r}; a probe needs "
                                  f"labeled train, val and test rows (split column)")
    if task == "multiclass":
        values = column.values[labeled]
        seen = set(values[split == "train"].tolist())
        unseen = sorted({column.classes[c] for c in values} - {column.classes[c] for c in seen})
        if unseen:
            raise utils.UserError(f"{csv}: classes {unseen} of column {column.name!r} appear in val or test "
                                  f"but have no train rows; move some of their rows to train")
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


def probe_data(args, model, settings, probe, device):
    """A probe's ProbeData: its labels and the frozen (cached) clip embeddings of its files."""
    rows, column, split = read_labels(args, probe)
    task = probe["task"]
    labels = torch.as_tensor(column.values, dtype=torch.long if task == "multiclass" else torch.float32)
    embeddings, owners, failed = cached_embeddings(model, list(rows["path"]), settings, args, device)
    for message in failed:
        print(f"skipped: {message}")
    train = embeddings[split[owners] == "train"]  # [M_train, E]
    csv = probe["csv"]
    return ProbeData(name=probe["name"], csv=csv, task=task, column=column, head=probe["head"], patience=probe["patience"],
                     rows=rows, paths=list(rows["path"]), split=split, labels=labels,
                     out_dim=len(column.columns) if task == "regression" else len(column.classes),
                     clips=ClipSet(torch.from_numpy(embeddings), owners), mean=torch.from_numpy(train.mean(0)),
                     std=torch.from_numpy(train.std(0) + 1e-6),
                     manifest_digest=file_digest(csv)[:12] if os.path.isfile(csv) else None, failed=failed)


def fit_predictor(args, model, settings, data, chosen, seed, device, initial_state=None):
    """Fit one predictor on the `chosen` train tracks: a head on frozen embeddings (default),
    class prototypes (--prototypes), or a head with the encoder (--finetune, starting
    from initial_state). Returns (predictor: embeddings `[m, E]` -> outputs `[m, C]` on
    the CPU, val scores of the kept epoch, epochs run, unreadable crops replaced)."""
    if args.finetune:
        model.load_state_dict(initial_state)
        return finetune(args, model, settings, data, chosen, seed, device)
    if args.prototypes:
        train = data.clips.subset(np.isin(data.clips.owners, chosen))
        prototypes = class_prototypes(train.x, data.column.values[train.owners], data.task, data.out_dim)
        predictor = lambda x: prototype_scores(prototypes, x)  # noqa: E731
        return predictor, val_scores(predictor, data, data.split_clips("val"), None, args.aggregate), 0, 0
    head, val, epochs = fit_head(args, data, chosen, seed, device)
    return head, val, epochs, 0


def test_clips(args, model, settings, data, corruption, cache, device):
    """The test tracks' clip embeddings under one test condition -> ClipSet (owners index data's rows).

    Clean and cached: taken from data.clips. Otherwise the test files are embedded again,
    through the cache (frozen encoder) or not (after fine-tuning).
    """
    if corruption is None and cache:
        return data.split_clips("test")
    test_rows = np.flatnonzero(data.split == "test")
    test_paths = [data.paths[t] for t in test_rows]
    if cache:
        x, owners, _ = cached_embeddings(model, test_paths, settings, args, device, corruption)
    else:
        x, owners, _ = embed_files(model, test_paths, settings, args.layer, device, args.max_clips, corruption)
    return ClipSet(torch.from_numpy(x), test_rows[owners])


def score_run(predictor, data, tests, aggregate, main_condition):
    """Score one predictor on every test condition.

    Returns (test metrics {condition: dict}, confusion matrix `[C, C]` of the main condition
    (multiclass, else None), (track embeddings, tracks, outputs) of the main condition).
    """
    scores, confusion, shown = {}, None, None
    for condition, clips in tests.items():
        outputs = track_outputs(predictor, clips, aggregate)  # [tracks, C]
        labels = data.labels[clips.tracks]
        scores[condition] = metrics(data.task, outputs, labels, data.column)
        if condition == main_condition:
            if data.task == "multiclass":
                confusion = confusion_matrix(outputs.argmax(1).numpy(), labels.numpy(), data.out_dim)
            shown = (track_embeddings(clips.x, clips.owners, clips.tracks), clips.tracks, outputs)
    return scores, confusion, shown


def run_probe(args, model, settings, source, probe, device, initial_state=None):
    """Evaluate one (checkpoint, probe): one results dict per label fraction.

    source: what results record of the checkpoint (checkpoint_record). Frozen (default)
    and --prototypes runs share cached embeddings; --finetune starts each run from
    initial_state (the checkpoint's weights) and re-embeds val and test. Every run is
    scored on each test condition: clean, or --corrupt at --severity, and each
    --severity-sweep value.
    """
    if initial_state is not None:
        model.load_state_dict(initial_state)
    data = probe_data(args, model, settings, probe, device)
    conditions = test_conditions(args)
    main_condition = next(iter(conditions))
    frozen_tests = None if args.finetune else {
        name: test_clips(args, model, settings, data, corruption, True, device) for name, corruption in conditions.items()}
    train_tracks = np.flatnonzero(data.split == "train")
    results = []
    for fraction in args.label_fractions:
        runs, shown = [], None
        for seed in range(args.seed, args.seed + args.seeds):
            chosen = label_subset(train_tracks, data.column.values[train_tracks], data.task, fraction, seed)
            predictor, val, epochs, replaced = fit_predictor(args, model, settings, data, chosen, seed, device,
                                                             initial_state)
            tests = frozen_tests or {name: test_clips(args, model, settings, data, corruption, False, device)
                                     for name, corruption in conditions.items()}
            test, confusion, run_shown = score_run(predictor, data, tests, args.aggregate, main_condition)
            run = {"seed": seed, "train_tracks": len(chosen), "val": val, "epochs": epochs,
                   "replaced_crops": replaced, "test": test}
            if confusion is not None:
                run["confusion_matrix"] = confusion.tolist()
            shown = shown or run_shown
            runs.append(run)
        results.append(summarize_runs(args, source, data, fraction, runs, main_condition))
        if args.plot:
            plot_run(args, results[-1], data, shown)
    return results


def checkpoint_record(checkpoint, settings):
    """What each result says of its checkpoint: as typed, the file read, its step and SHA-256
    (first 12 hex digits; None for 'random')."""
    return {"checkpoint": checkpoint, "checkpoint_file": settings["file"], "checkpoint_step": settings["step"],
            "checkpoint_sha256": settings["sha256"]}


def summarize_runs(args, source, data, fraction, runs, main_condition):
    """One results dict from the runs (seeds) of one label fraction: mean and std over runs."""
    test, test_std = mean_and_std([r["test"][main_condition] for r in runs])
    val, _ = mean_and_std([r["val"] for r in runs])
    result = {**source, "probe": data.name, "csv": data.csv,
              "manifest_sha256": data.manifest_digest, "label_column": data.column.name, "task": data.task,
              "head": "prototypes" if args.prototypes else data.head, "layer": args.layer, "finetune": args.finetune,
              "aggregate": args.aggregate, "train_clips": "audio" if args.finetune else args.train_clips,
              "early_stop": None if args.prototypes else args.early_stop, "patience": data.patience,
              "label_fraction": fraction, "seeds": [r["seed"] for r in runs], "val": val,
              "epochs": [r["epochs"] for r in runs], "test": test, "test_std": test_std,
              "corrupt": None if main_condition == "clean" else {"names": args.corrupt_names,
                                                                  "severity": args.severity},
              "tracks": {"train": runs[0]["train_tracks"], "val": int((data.split == "val").sum()),
                         "test": int((data.split == "test").sum())},
              "skipped_files": len(data.failed), "runs": runs}
    if args.severities:
        sweep = {f"{s:g}": mean_and_std([r["test"][f"{s:g}"] for r in runs]) for s in args.severities}
        result["sweep"] = {s: m for s, (m, _) in sweep.items()}
        result["sweep_std"] = {s: d for s, (_, d) in sweep.items()}
    return result


def plot_run(args, result, data, shown):
    """--plot for one results dict: its first run's test embeddings in the projector (path,
    label and, for multiclass, predicted class) and, for multiclass, the confusion matrix
    as confusion_matrix.png, .csv and a TensorBoard image, in its own folder of --plot-dir."""
    embeddings, tracks, outputs = shown
    column = data.column
    labels = [",".join(data.rows[c].iat[t] for c in column.columns) for t in tracks]
    paths = [display_path(data.paths[t], result["csv"]) for t in tracks]
    folder = [safe_name(result["checkpoint"]), safe_name(result["probe"])]
    if len(args.label_fractions) > 1 or result["label_fraction"] < 1:
        folder.append(f"fraction{result['label_fraction']:g}")
    folder = os.path.join(args.plot_dir, "__".join(folder))
    if column.task == "multiclass":
        predicted = [column.classes[c] for c in outputs.argmax(1).tolist()]
        write_projector(folder, embeddings, [list(row) for row in zip(paths, labels, predicted)],
                        ["path", "label", "predicted"])
        counts = np.asarray(result["runs"][0]["confusion_matrix"])
        pd.DataFrame(counts, index=column.classes, columns=column.classes).to_csv(
            os.path.join(folder, "confusion_matrix.csv"), index_label="true \\ predicted")
        title = (f"{checkpoint_label(result)} · {result['probe']}\ntest accuracy "
                 f"{np.trace(counts) / max(counts.sum(), 1):.3f} on {counts.sum()} tracks")
        writer = SummaryWriter(log_dir=folder)
        save_figure(confusion_figure(counts, column.classes, title), os.path.join(folder, "confusion_matrix.png"),
                    writer, "confusion_matrix")
        writer.close()
    else:
        write_projector(folder, embeddings, [list(row) for row in zip(paths, labels)], ["path", "label"])
    result["plot_dir"] = folder
    print(f"plots: {folder} (tensorboard --logdir {folder})")


def display_path(path, csv):
    """A file's path as the projector shows it: relative to its manifest's folder when inside it."""
    folder = csv if os.path.isdir(csv) else os.path.dirname(os.path.abspath(csv))
    relative = os.path.relpath(os.path.abspath(path), folder)
    shown = path if relative.startswith("..") else relative
    return shown.replace("\t", " ").replace("\n", " ")


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
    """The main table as Markdown, caption first: one row per checkpoint, one column per
    (probe, metric) on test; below it, the file, step and SHA-256 of each checkpoint."""
    records = summary_records(results)
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in records))
    columns = list(dict.fromkeys(r["header"] for r in records))
    cells = {(r["checkpoint"], r["header"]): r for r in records}
    caption = ("Test results: rows are checkpoints, columns probe (metric); mean ± sample std over seeds where "
               "there are several.")
    corrupted = next((r["corrupt"] for r in records if r["corrupt"]), None)
    if corrupted:
        caption += f" Test audio corrupted by {','.join(corrupted['names'])} at severity {corrupted['severity']:g}."
    lines = [caption, "", "| checkpoint | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for checkpoint in checkpoints:
        values = []
        for c in columns:
            r = cells.get((checkpoint, c))
            values.append(cell_text(r["mean"], r["std"], r["seeds"]) if r else "-")
        lines.append(f"| {checkpoint} | " + " | ".join(values) + " |")
    lines.append("")
    for checkpoint in checkpoints:
        r = next(r for r in results if r["checkpoint"] == checkpoint)
        lines.append(f"- {checkpoint}: " + (f"{r['checkpoint_file']}, step {r['checkpoint_step']}, sha256 "
                                            f"{r['checkpoint_sha256']}" if r["checkpoint_file"] else
                                            "random-init encoder"))
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
    """Markdown table of the main test metric per sweep severity, caption first: rows (checkpoint, probe)."""
    swept = [r for r in results if "sweep" in r]
    if not swept:
        return ""
    severities = list(swept[0]["sweep"])
    names = ",".join(swept[0]["corrupt"]["names"])
    lines = [f"Robustness: the main test metric with the test audio corrupted by {names}, per severity s "
             f"(s=0: clean audio).", "",
             f"| checkpoint | probe ({names}) | " + " | ".join(f"s={s}" for s in severities) + " |",
             "|---" * (len(severities) + 2) + "|"]
    for r in swept:
        metric = MAIN_METRIC[r["task"]]
        values = [cell_text(r["sweep"][s][metric], r["sweep_std"][s][metric], len(r["seeds"])) for s in severities]
        lines.append(f"| {r['checkpoint']} | {column_name(r, results)} ({metric}) | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_summary(out, results, report):
    """Write the full results (JSON) to `out`, the tables (`report`, Markdown) next to it as
    .md and the main table as .csv. Returns the paths written."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = os.path.splitext(out)[0]
    with open(out, "w") as f:
        json.dump(results, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(report + "\n")
    summary_frame(results).to_csv(stem + ".csv", index=False)
    return [out, stem + ".md", stem + ".csv"]


def main(argv=None):
    """Run every (checkpoint, probe, label fraction); print the tables; returns the list of results dicts."""
    args = finish_args(build_parser().parse_args(argv))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.export_embeddings:
        return export_embeddings(args, device)
    probes = probe_list(args)
    # ---- check every probe's manifest and labels before any embedding or training
    for probe in probes:
        read_labels(args, probe)

    # ---- probes, checkpoint by checkpoint (each encoder loaded once)
    results = []
    for checkpoint in args.checkpoint:
        model, settings = load_encoder(checkpoint, args, device)
        initial_state = copy.deepcopy(model.state_dict()) if args.finetune else None
        source = checkpoint_record(checkpoint, settings)
        for probe in probes:
            results.extend(run_probe(args, model, settings, source, probe, device, initial_state))

    # ---- report: the tables on stdout, the full results in --out, the figures in --plot-dir
    report = "\n\n".join(t for t in (summary_table(results), robustness_table(results)) if t)
    print("\n" + report)
    if args.out:
        print("results: " + ", ".join(write_summary(args.out, results, report)))
    if args.plot:
        figures = plot_curves(args, results)
        if figures:
            print(f"figures: {', '.join(figures)} (tensorboard --logdir {args.plot_dir})")
    return results


if __name__ == "__main__":
    utils.run_cli(main)

