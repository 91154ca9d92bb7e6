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
    --retrieval                         similarity metrics beside the head's: same-track top-1 and MRR,
                                        label P@10 and mAP (similar.py computes them)
A test track that repeats a train or val track's audio (same path or bytes) is refused
before any embedding (splits.py), unless --allow-leaks.
One GPU: the same commands (the GPU is used when present). The tables print; the full
results (JSON) go to --out as each probe finishes (a rerun with the same --out skips the
finished ones), with the tables next to it as .md and .csv at the end (reports.py).
Embeddings for your own use, no probe (export.py; --csv a manifest or a folder; docs/own-music.md):
    python probe.py --checkpoint runs/semisupcon --csv "My Music" --export-embeddings runs/embeddings

Protocol, by default the authors' (docs/probing.md): every file is cut into consecutive
clips (--max-clips of them, evenly spread); each epoch the head trains on one randomly
drawn clip per train track, early-stops on the clip-level val loss (one fixed clip per
val track), and scores a test track by applying the head to the mean of its clip
embeddings. Frozen embeddings are extracted once per (checkpoint, manifest, layer,
corruption) and cached on disk under the checkpoint's SHA-256 (export.cached_embeddings).
"""
import argparse
import copy
import dataclasses
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import augment
import datasets
import export
import metrics
import models
import records
import reports
import safety
import similar
import splits
import synthetic
import utils
from export import load_encoder  # a name of this module too, so that callers can swap the loader

HEADS = ("linear", "mlp")
MAIN_METRIC = reports.MAIN_METRIC


def build_parser():
    """The command-line flags, in groups: data, model, head, robustness, run."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
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
    run.add_argument("--retrieval", action="store_true",
                     help="similarity metrics of the frozen test embeddings (cosine), no head: same-track top-1 and "
                          "MRR (first-half clips query the second-half clips of every test track) and label P@10 "
                          "and mAP (each track, the mean of its clips, queries the others; relevant: same class, "
                          "or a shared tag); shown beside the head's metrics")
    run.add_argument("--allow-leaks", action="store_true",
                     help="score a test split whose audio also appears in train or val (same path or same bytes), "
                          "which the probe otherwise refuses")
    run.add_argument("--cache-dir", default=".cache/embeddings",
                     help="embedding cache folder, 'none' disables (default %(default)s)")
    run.add_argument("--workers", type=int, default=2, help="--finetune: data-loading processes (default %(default)s)")
    run.add_argument("--seed", type=int, default=0,
                     help="seed for the head, the label subset and the random encoder (default %(default)s)")
    group = parser.add_argument_group("export (export.py)")
    group.add_argument("--export-embeddings", default=None, metavar="OUT",
                       help="no probe: write the embeddings of every file of --csv (a manifest or a folder) to "
                            "OUT.npy (float32, one row per clip, --layer) and OUT.csv (row i: path, clip, "
                            "start_seconds and the manifest's columns); resumable (parts in OUT.parts); the same "
                            "as python export.py embeddings")
    export.add_export_flags(group)
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
        mean, std = data.train_statistics()
        head = make_head(data.probe.head, len(mean), data.out_dim, args.head_hidden)
        return torch.nn.Sequential(Standardize(mean, std), head).to(device)


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
        return predictor(export.track_embeddings(x, clips.owners, clips.tracks)).float().cpu()
    return export.track_embeddings(predictor(x).float(), clips.owners, clips.tracks).cpu()


@torch.no_grad()
def val_scores(predictor, data, val, val_crops, aggregate, device=None):
    """What early stopping reads: {"loss": clip-level loss on val_crops, main metric: on val tracks}.

    val: every val clip (the track-level metric, aggregated as `aggregate`); val_crops: the
    clips the loss is taken on, or None for the metric alone (prototype scores are not
    logits, so they have no loss).
    """
    metric = MAIN_METRIC[data.probe.task]
    outputs = track_outputs(predictor, val, aggregate, device)
    scores = {metric: metrics.score(data.probe.task, outputs, data.labels[val.tracks], data.column)[metric]}
    if val_crops is not None:
        outputs = predictor(val_crops.x.to(device) if device is not None else val_crops.x).float()  # [m, C]
        scores["loss"] = float(head_loss(data.probe.task, outputs, data.labels[val_crops.owners].to(outputs.device)))
    return scores


class EarlyStopping:
    """Keeps the best epoch's scores and state; says when to stop.

    monitor: "loss" (lower is better) or a metric name (higher is better). A non-finite
    value never counts as an improvement, except on the first epoch.
    """

    def __init__(self, patience, monitor):
        self.patience, self.monitor = patience, monitor
        self.best, self.best_state, self.waited = None, None, 0

    def update(self, scores, state):
        """Record one epoch's val `scores` (a dict holding the monitored key); `state()` makes
        a copy of what to keep if this epoch is the best so far. Returns True to stop."""
        value, best = scores[self.monitor], None if self.best is None else self.best[self.monitor]
        improved = best is None or (value < best if self.monitor == "loss" else value > best)
        if improved:
            self.best, self.best_state, self.waited = dict(scores), state(), 0
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


@dataclasses.dataclass
class Fit:
    """A fitted predictor: embeddings `[m, E]` -> outputs `[m, C]` on the CPU, the val scores
    of the kept epoch, epochs run, and unreadable crops replaced (--finetune only)."""
    predictor: object
    val: dict
    epochs: int
    replaced: int = 0


def fit_head(args, data, chosen, seed, device):
    """Train data.probe.head on frozen embeddings of the `chosen` train tracks; Adam, early stopping on val.

    --train-clips random (the authors'): each epoch one clip per chosen track, drawn anew
    among its cached clips; all: every cached clip. The monitored val score (--early-stop)
    is checked after every epoch; the head of the best epoch is kept. Training runs on
    `device` (the embeddings are moved there once).
    Returns a Fit (the head on the CPU in eval mode).
    """
    train = data.clips.subset(np.isin(data.clips.owners, chosen))
    val = data.split_clips("val")
    val_crops = val.subset(val_crop_rows(args, val, seed))
    x, labels = train.x.to(device), data.labels[train.owners].to(device)  # [M, E], [M] or [M, C]
    head = new_head(args, data, seed, device)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    rng, order = np.random.default_rng([seed, 1]), torch.Generator().manual_seed(seed)
    stopper = EarlyStopping(data.probe.patience, monitor_name(args, data.probe.task))
    for epoch in range(1, args.max_epochs + 1):
        rows = torch.as_tensor(train.one_per_track(rng) if args.train_clips == "random" else np.arange(len(x)))
        head.train()
        for batch in rows[torch.randperm(len(rows), generator=order)].split(args.batch_size):
            batch = batch.to(device)
            loss = head_loss(data.probe.task, head(x[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        scores = val_scores(head, data, val, val_crops, args.aggregate, device)
        if stopper.update(scores, lambda: copy.deepcopy(head.state_dict())):
            break
    head.load_state_dict(stopper.best_state)
    return Fit(head.cpu().eval(), stopper.best, epoch)


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
    Returns a Fit (the head on the CPU, with the unreadable crops replaced).
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
    stopper = EarlyStopping(data.probe.patience, monitor_name(args, data.probe.task))
    predictor = lambda x: head(x.to(device))  # noqa: E731 (val clips stay on the CPU)
    progress = tqdm(range(1, args.max_epochs + 1), desc=f"fine-tune {data.probe.name} seed {seed}", unit="epoch",
                    dynamic_ncols=True)
    replaced, val_rows, epoch, train_loss = 0, None, 0, float("nan")
    for epoch in progress:
        order = rng.permutation(chosen)
        crop_seeds = rng.integers(0, 2**62, size=len(order))
        draws = [datasets.ClipDraw(int(t), int(s), 0) for t, s in zip(order, crop_seeds)]
        # Batch norm needs two clips to train on, so a final batch of one is left out.
        batches = [b for b in (draws[i:i + args.batch_size] for i in range(0, len(draws), args.batch_size))
                   if len(b) > 1]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                             collate_fn=collate_crops)
        model.train()
        head.train()
        for audio, rows, failed in loader:
            replaced += failed
            outputs = head(models.embed(model, audio.to(device), args.layer))  # [B, C]
            loss = head_loss(data.probe.task, outputs, data.labels[rows].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            train_loss = loss.item()
        model.eval()
        head.eval()
        embedded = export.embed_files(model, val_paths, settings, args.layer, device, args.max_clips)
        val = splits.ClipSet(torch.from_numpy(embedded.x), val_tracks[embedded.owners])
        val_rows = val_crop_rows(args, val, seed) if val_rows is None else val_rows
        scores = val_scores(predictor, data, val, val.subset(val_rows), args.aggregate)
        progress.set_postfix({"train loss": f"{train_loss:.3f}", **{f"val {k}": f"{v:.3f}" for k, v in scores.items()}})
        if stopper.update(scores, lambda: (copy.deepcopy(head.state_dict()), copy.deepcopy(model.state_dict()))):
            break
    progress.close()
    head.load_state_dict(stopper.best_state[0])
    model.load_state_dict(stopper.best_state[1])
    return Fit(head.cpu().eval(), stopper.best, epoch, replaced)


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


# ---------------------------------------------------------------- one probe

def probe_list(args):
    """The probes to run, as splits.Probe records: the rows of --tasks (splits.read_tasks), or
    one probe per --label-column of --csv (a folder is scanned), with --head and --patience."""
    if args.tasks:
        return splits.read_tasks(args.tasks, args.head, args.patience, HEADS)
    columns = args.label_column or ["label"]
    tasks = utils.per_column(args.task or ["multiclass"], len(columns), "task")
    kinds = utils.per_column(args.label_kind or ["generic"], len(columns), "label-kind")
    csv = datasets.manifest_or_scan(args.csv, datasets.SCAN_CACHE) if args.csv else \
        synthetic.make_synthetic_set(args.synthetic_dir)
    return [splits.Probe(csv, c, t, k, c, args.head, args.patience) for c, t, k in zip(columns, tasks, kinds)]


def test_conditions(args):
    """The test audio each probe is scored on: {name: corruption or None}, main one first.

    Without --corrupt: {"clean": None}. With it: --severity first (the reported "test"),
    then each --severity-sweep value, named by severity ("0", "1.5").
    """
    severities = ([args.severity] if args.corrupt_names else []) + args.severities
    conditions = {f"{s:g}": {"names": args.corrupt_names, "severity": s, "seed": args.corrupt_seed}
                  for s in severities}
    return conditions or {"clean": None}


def probe_data(args, model, settings, data, device):
    """`data` (from splits.read_labels) with the frozen (cached) clip embeddings of its files."""
    embedded = export.cached_embeddings(model, data.paths, settings, args, device)
    for message in embedded.failed:
        print(f"skipped: {message}")
    return dataclasses.replace(data, clips=splits.ClipSet(torch.from_numpy(embedded.x), embedded.owners),
                               failed=tuple(embedded.failed))


def fit_predictor(args, model, settings, data, chosen, seed, device, initial_state=None):
    """Fit one predictor on the `chosen` train tracks: a head on frozen embeddings (default),
    class prototypes (--prototypes), or a head with the encoder (--finetune, starting
    from initial_state). Returns a Fit."""
    if args.finetune:
        model.load_state_dict(initial_state)
        return finetune(args, model, settings, data, chosen, seed, device)
    if args.prototypes:
        train = data.clips.subset(np.isin(data.clips.owners, chosen))
        prototypes = class_prototypes(train.x, data.column.values[train.owners], data.probe.task, data.out_dim)
        predictor = lambda x: prototype_scores(prototypes, x)  # noqa: E731
        return Fit(predictor, val_scores(predictor, data, data.split_clips("val"), None, args.aggregate), 0)
    return fit_head(args, data, chosen, seed, device)


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
        embedded = export.cached_embeddings(model, test_paths, settings, args, device, corruption)
    else:
        embedded = export.embed_files(model, test_paths, settings, args.layer, device, args.max_clips, corruption)
    return splits.ClipSet(torch.from_numpy(embedded.x), test_rows[embedded.owners])


def score_run(predictor, data, tests, aggregate, main_condition):
    """Score one predictor on every test condition.

    Returns (test metrics {condition: dict}, confusion matrix `[C, C]` of the main condition
    (multiclass, else None), (track embeddings, tracks, outputs) of the main condition).
    """
    scores, confusion, shown = {}, None, None
    for condition, clips in tests.items():
        outputs = track_outputs(predictor, clips, aggregate)  # [tracks, C]
        labels = data.labels[clips.tracks]
        scores[condition] = metrics.score(data.probe.task, outputs, labels, data.column)
        if condition == main_condition:
            if data.probe.task == "multiclass":
                confusion = metrics.confusion_matrix(outputs.argmax(1).numpy(), labels.numpy(), data.out_dim)
            shown = (export.track_embeddings(clips.x, clips.owners, clips.tracks), clips.tracks, outputs)
    return scores, confusion, shown


def run_probe(args, model, settings, source, data, device, initial_state=None):
    """Evaluate one (checkpoint, probe): one results dict per label fraction.

    source: what results record of the checkpoint (records.checkpoint_record). Frozen (default)
    and --prototypes runs share cached embeddings; --finetune starts each run from
    initial_state (the checkpoint's weights) and re-embeds val and test. Every run is
    scored on each test condition: clean, or --corrupt at --severity, and each
    --severity-sweep value. --retrieval adds the similarity metrics of the checkpoint's
    frozen, clean test embeddings (similar.retrieval_metrics), the same for every run.
    data: the probe's labels (splits.read_labels).
    """
    if initial_state is not None:
        model.load_state_dict(initial_state)
    data = probe_data(args, model, settings, data, device)
    conditions = test_conditions(args)
    main_condition = next(iter(conditions))
    frozen_tests = None if args.finetune else {
        name: test_clips(args, model, settings, data, corruption, True, device) for name, corruption in conditions.items()}
    train_tracks = np.flatnonzero(data.split == "train")
    test = data.split_clips("test")
    retrieval = similar.retrieval_metrics(test.x, test.owners, data.labels[test.tracks], data.probe.task) \
        if args.retrieval else None
    results = []
    for fraction in args.label_fractions:
        runs, shown = [], None
        for seed in range(args.seed, args.seed + args.seeds):
            chosen = splits.label_subset(train_tracks, data.column.values[train_tracks], data.probe.task, fraction,
                                         seed)
            fit = fit_predictor(args, model, settings, data, chosen, seed, device, initial_state)
            tests = frozen_tests or {name: test_clips(args, model, settings, data, corruption, False, device)
                                     for name, corruption in conditions.items()}
            test, confusion, run_shown = score_run(fit.predictor, data, tests, args.aggregate, main_condition)
            run = {"seed": seed, "train_tracks": len(chosen), "val": fit.val, "epochs": fit.epochs,
                   "replaced_crops": fit.replaced, "test": test}
            if confusion is not None:
                run["confusion_matrix"] = confusion.tolist()
            shown = shown or run_shown
            runs.append(run)
        results.append(records.summarize_runs(args, source, data, fraction, runs, main_condition,
                                               retrieval))
        if args.plot:
            reports.plot_run(args, results[-1], data, shown)
    return results


def probe_checkpoints(args, labeled, finished, device):
    """Every probe on every checkpoint, --out rewritten after each; `finished`: results to reuse."""
    # Checkpoint by checkpoint: each encoder is loaded once.
    results, keys = [], set()
    for checkpoint in args.checkpoint:
        model, settings = load_encoder(checkpoint, args, device)
        initial_state = copy.deepcopy(model.state_dict()) if args.finetune else None
        source = records.checkpoint_record(checkpoint, settings)
        for data in labeled:
            key = records.task_key(args, settings, data.probe)
            done = [dict(r, **source) for r in finished if r.get("task_key") == key]
            if done:
                print(f"results: {data.probe.name} with {checkpoint} reused from {args.out} (finished before)")
            keys.add(key)
            results.extend(done or [dict(r, task_key=key) for r in run_probe(args, model, settings, source, data,
                                                                              device, initial_state)])
            if args.out and not done:
                safety.write_json(args.out, results + [r for r in finished if r.get("task_key") not in keys])
    return results


def main(argv=None):
    """Run every (checkpoint, probe, label fraction); print the tables; returns the list of results dicts."""
    args = finish_args(build_parser().parse_args(argv))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.export_embeddings:
        if len(args.checkpoint) != 1:
            raise utils.UserError(f"--export-embeddings takes one --checkpoint, got {len(args.checkpoint)}")
        return export.export_embeddings(args, args.checkpoint[0], args.export_embeddings, device,
                                        "--export-embeddings")
    # ---- every probe's manifest and labels, read and checked once (leaks too), before any embedding or training
    labeled = [splits.read_labels(probe, args.prototypes, args.allow_leaks) for probe in probe_list(args)]
    # ---- outputs writable and --out locked (until main ends, however); the probes a killed run finished
    with records.claim_outputs(args):
        results = probe_checkpoints(args, labeled, records.finished_results(args.out), device)

        # ---- report: the tables on stdout, the full results in --out, the figures in --plot-dir
        report = "\n\n".join(t for t in (reports.summary_table(results), reports.robustness_table(results)) if t)
        print("\n" + report)
        if args.out:
            print("results: " + ", ".join(reports.write_summary(args.out, results, report)))
        if args.plot:
            figures = reports.plot_curves(args, results)
            if figures:
                print(f"figures: {', '.join(figures)} (tensorboard --logdir {args.plot_dir})")
    return results


if __name__ == "__main__":
    utils.run_cli(main)
