"""Probe a pretrained encoder: frozen embeddings, a linear or MLP head, test metrics.

CPU, a checkpoint from train.py (a run folder means its latest checkpoint):
    python probe.py --checkpoint runs/semisupcon --csv manifest.csv --label-column genre --task multiclass
A random-init baseline, built from the same model flags as train.py:
    python probe.py --checkpoint random --width 0.25 --clip-seconds 1 --sample-rate 16000 --csv manifest.csv
One GPU: the same commands (the GPU is used when present). Results print as JSON and go to --out.

Protocol (METHOD.md): every file is cut into consecutive clips; the head trains on
clip embeddings of the train split, early-stops on the val split's track-level metric,
and the test metric averages clip logits per track.
"""
import argparse
import hashlib
import json
import os

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import datasets
import models
import train
import utils


def build_parser():
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
                      help="what each label means (one value, or one per --label-column; default generic)")
    data.add_argument("--tasks", default=None,
                      help="CSV of probes to run (columns csv, label_column, task, optional label_kind and name); "
                           "replaces --csv/--label-column")
    data.add_argument("--max-clips", type=int, default=16, help="consecutive clips kept per file (evenly spread)")
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", action="append", required=True,
                       help="checkpoint file, run folder (latest checkpoint), or 'random' for a random-init "
                            "encoder; repeatable (one table row each)")
    model.add_argument("--layer", default="encoder", choices=("encoder", "projection"),
                       help="embeddings from the encoder output or the projection head")
    model.add_argument("--encoder", default="samplecnn", choices=sorted(models.ENCODERS), help="random only")
    model.add_argument("--width", type=float, default=1.0, help="random only: channel-width multiplier")
    model.add_argument("--clip-seconds", type=float, default=2.7, help="random only: clip length in seconds")
    model.add_argument("--sample-rate", type=int, default=22050, help="random only: sample rate in Hz")
    head = parser.add_argument_group("head")
    head.add_argument("--head", default="mlp", choices=("linear", "mlp"), help="probe head (MLP: 512 hidden, ReLU)")
    head.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    head.add_argument("--weight-decay", type=float, default=1e-6, help="Adam weight decay")
    head.add_argument("--batch-size", type=int, default=64, help="clips per head step")
    head.add_argument("--max-epochs", type=int, default=200, help="head training epochs at most")
    head.add_argument("--patience", type=int, default=15, help="epochs without val improvement before stopping")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=None, help="JSON results file (default: print only)")
    run.add_argument("--cache-dir", default=".cache/embeddings", help="embedding cache folder ('none' disables)")
    run.add_argument("--seed", type=int, default=0, help="seed for the head and the random encoder")
    return parser


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

    Tied scores are ranked together (precision taken at the end of the tie group).
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


def metrics(task, outputs, labels, column=None):
    """The task's metrics on track-level outputs.

    multiclass: accuracy, macro_f1 (and mirex for key labels); multilabel: roc_auc,
    pr_auc (macro over classes with both outcomes); regression: r2 and r2 per output.
    """
    if task == "multiclass":
        result = {"accuracy": accuracy(outputs, labels),
                  "macro_f1": macro_f1(outputs, labels, outputs.shape[1])}
        if column is not None and column.kind == "key":
            weights = datasets.key_similarity()
            result["mirex"] = float(weights[outputs.argmax(1), labels].mean())
        return result
    if task == "multilabel":
        probabilities, tags = torch.sigmoid(outputs).numpy(), labels.numpy()
        aucs = [roc_auc(probabilities[:, c], tags[:, c]) for c in range(tags.shape[1])]
        aps = [average_precision(probabilities[:, c], tags[:, c]) for c in range(tags.shape[1])]
        return {"roc_auc": float(np.nanmean(aucs)), "pr_auc": float(np.nanmean(aps))}
    per_output = r2_score(outputs.numpy(), labels.numpy())
    return {"r2": float(per_output.mean()), "r2_per_output": per_output.tolist()}


MAIN_METRIC = {"multiclass": "accuracy", "multilabel": "roc_auc", "regression": "r2"}


# ---------------------------------------------------------------- embeddings

def load_encoder(checkpoint, args, device):
    """The frozen model and its settings (from the checkpoint, or the flags for 'random').

    Returns (model, settings) with model a train.ContrastiveModel in eval mode and
    settings holding encoder, width, sample_rate, clip_samples and a cache key.
    """
    if checkpoint == "random":
        settings = {"encoder": args.encoder, "width": args.width, "sample_rate": args.sample_rate,
                    "clip_samples": int(round(args.clip_seconds * args.sample_rate)),
                    "hidden_dim": 512, "projection_dim": 128}
        torch.manual_seed(args.seed)
        key = f"random-{settings}-{args.seed}"
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
    encoder = models.build_encoder(settings["encoder"], settings["clip_samples"], settings["sample_rate"],
                                   settings["width"])
    model = train.ContrastiveModel(encoder, settings["hidden_dim"], settings["projection_dim"])
    if state is not None:
        model.load_state_dict(state["model"])
    settings["key"] = key
    return model.to(device).eval(), settings


@torch.no_grad()
def embed_files(model, paths, settings, layer, device, max_clips, batch_size=64):
    """Embeddings of every file's consecutive clips.

    Returns (embeddings `[M, E]` float32, track index `[M]` into paths, failed paths).
    A file that cannot be read is left out and listed.
    """
    chunks, owners, failed, pending, pending_owners = [], [], [], [], []

    def flush():
        audio = torch.cat(pending).to(device)  # [m, T]
        h = model.encoder(audio)
        chunks.append((model.head(h) if layer == "projection" else h).float().cpu())
        owners.extend(pending_owners)
        pending.clear()
        pending_owners.clear()

    for index, path in enumerate(paths):
        try:
            clips = datasets.read_clips(path, settings["clip_samples"], settings["sample_rate"], max_clips)
        except datasets.AudioError as error:
            failed.append(str(error))
            continue
        pending.append(clips)
        pending_owners.extend([index] * len(clips))
        if sum(len(p) for p in pending) >= batch_size:
            flush()
    if pending:
        flush()
    return torch.cat(chunks).numpy(), np.array(owners), failed


def cached_embeddings(model, manifest, settings, args, device):
    """embed_files over the manifest, cached on disk by (checkpoint hash, files, settings)."""
    paths = list(manifest["path"])
    fingerprint = json.dumps([settings["key"], args.layer, args.max_clips, settings["sample_rate"],
                              settings["clip_samples"], paths, [os.path.getmtime(p) if os.path.exists(p) else 0
                                                                for p in paths]])
    digest = hashlib.sha1(fingerprint.encode()).hexdigest()[:16]
    cache = None if args.cache_dir == "none" else os.path.join(args.cache_dir, digest)
    if cache and os.path.isfile(cache + ".npz"):
        saved = np.load(cache + ".npz", allow_pickle=False)
        return saved["embeddings"], saved["owners"], list(saved["failed"])
    embeddings, owners, failed = embed_files(model, paths, settings, args.layer, device, args.max_clips)
    if cache:
        os.makedirs(args.cache_dir, exist_ok=True)
        np.savez(cache + ".tmp.npz", embeddings=embeddings, owners=owners, failed=np.array(failed, dtype=str))
        os.replace(cache + ".tmp.npz", cache + ".npz")
    return embeddings, owners, failed


# ---------------------------------------------------------------- head

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


def track_outputs(head, x, owners, tracks):
    """Head outputs averaged per track -> `[len(tracks), C]` (logits averaged, METHOD.md)."""
    with torch.no_grad():
        outputs = head(x)
    index = torch.as_tensor(np.searchsorted(tracks, owners))
    summed = torch.zeros(len(tracks), outputs.shape[1]).index_add_(0, index, outputs)
    counts = torch.zeros(len(tracks)).index_add_(0, index, torch.ones(len(owners)))
    return summed / counts[:, None]


def fit_head(args, task, train_set, val_set, out_dim):
    """Train a head with Adam and early stopping on the val track-level main metric.

    train_set: (x `[M, E]`, y `[M, ...]`) clip-level; val_set: (x, owners, tracks,
    y_tracks). Returns (best head, best val metric, epochs run).
    """
    torch.manual_seed(args.seed)
    x, y = train_set
    head = make_head(args.head, x.shape[1], out_dim)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    best, best_state, waited, epoch = -float("inf"), None, 0, 0
    for epoch in range(1, args.max_epochs + 1):
        head.train()
        for batch in torch.randperm(len(x)).split(args.batch_size):
            loss = head_loss(task, head(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        head.eval()
        score = metrics(task, track_outputs(head, *val_set[:3]), val_set[3])[MAIN_METRIC[task]]
        if score > best:
            best, best_state, waited = score, {k: v.clone() for k, v in head.state_dict().items()}, 0
        else:
            waited += 1
            if waited >= args.patience:
                break
    head.load_state_dict(best_state)
    return head.eval(), best, epoch


def probe_list(args):
    """The probes to run: dicts with csv, label_column, task, label_kind and name."""
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
            csv = entry["csv"] if os.path.isabs(entry["csv"]) else os.path.join(folder, entry["csv"])
            probes.append({"csv": csv, "label_column": entry["label_column"], "task": entry["task"],
                           "label_kind": entry.get("label_kind", "") or "generic",
                           "name": entry.get("name", "") or f"{os.path.basename(csv)}:{entry['label_column']}"})
        return probes
    columns = args.label_column or ["label"]
    tasks = train.broadcast(args.task or ["multiclass"], len(columns), "task")
    kinds = train.broadcast(args.label_kind or ["generic"], len(columns), "label-kind")
    csv = args.csv or datasets.make_synthetic_set(args.synthetic_dir)
    return [{"csv": csv, "label_column": c, "task": t, "label_kind": k, "name": c}
            for c, t, k in zip(columns, tasks, kinds)]


def run_probe(args, checkpoint, probe):
    """Extract embeddings, fit the head, evaluate one probe; returns the results dict."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    csv, task = probe["csv"], probe["task"]
    manifest = datasets.read_manifest(csv)
    column = datasets.parse_labels(manifest, probe["label_column"], task, probe["label_kind"])
    labeled = manifest.index[column.labeled].to_numpy()
    split = manifest["split"].to_numpy()
    for name in ("train", "val", "test"):
        if not (split[labeled] == name).any():
            raise SystemExit(f"{csv}: no labeled {name} rows for column {column.name!r}")
    if task == "multiclass":
        seen = set(column.values[labeled[split[labeled] == "train"]].tolist())
        unseen = sorted({column.classes[c] for c in column.values[labeled]} - {column.classes[c] for c in seen})
        if unseen:
            raise SystemExit(f"{csv}: classes {unseen} of column {column.name!r} have no train rows")
    model, settings = load_encoder(checkpoint, args, device)
    rows = manifest.iloc[labeled].reset_index(drop=True)
    embeddings, owners, failed = cached_embeddings(model, rows, settings, args, device)
    for message in failed:
        print(f"skipped: {message}")
    # Standardize with train statistics so one lr suits every encoder's embedding scale.
    is_train = split[labeled][owners] == "train"
    mean, std = embeddings[is_train].mean(0), embeddings[is_train].std(0) + 1e-6
    x_all = torch.from_numpy((embeddings - mean) / std)
    values = column.values[labeled]
    label_dtype = torch.long if task == "multiclass" else torch.float32
    y_all = torch.as_tensor(values, dtype=label_dtype)

    def track_set(name):
        mask = split[labeled][owners] == name
        tracks = np.unique(owners[mask])
        return x_all[mask], owners[mask], tracks, y_all[tracks]

    out_dim = len(column.classes) if task != "regression" else len(column.columns)
    train_set = (x_all[is_train], y_all[owners[is_train]])
    head, best_val, epochs = fit_head(args, task, train_set, track_set("val"), out_dim)
    test = track_set("test")
    result = {"checkpoint": checkpoint, "probe": probe["name"], "csv": csv, "label_column": column.name,
              "task": task, "head": args.head, "layer": args.layer, "val": {MAIN_METRIC[task]: best_val},
              "epochs": epochs, "test": metrics(task, track_outputs(head, *test[:3]), test[3], column),
              "tracks": {name: int((split[labeled] == name).sum()) for name in ("train", "val", "test")},
              "skipped_files": len(failed)}
    return result


def summary_table(results):
    """Markdown table: one row per checkpoint, one column per probe (main test metric)."""
    checkpoints = list(dict.fromkeys(r["checkpoint"] for r in results))
    probes = list(dict.fromkeys(r["probe"] for r in results))
    cells = {(r["checkpoint"], r["probe"]): r for r in results}
    header = [f"{p} ({MAIN_METRIC[next(r['task'] for r in results if r['probe'] == p)]})" for p in probes]
    lines = ["| checkpoint | " + " | ".join(header) + " |", "|---" * (len(probes) + 1) + "|"]
    for checkpoint in checkpoints:
        values = []
        for p in probes:
            r = cells.get((checkpoint, p))
            values.append(f"{r['test'][MAIN_METRIC[r['task']]]:.3f}" if r else "-")
        lines.append(f"| {checkpoint} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = build_parser().parse_args(argv)
    results = [run_probe(args, checkpoint, probe) for checkpoint in args.checkpoint for probe in probe_list(args)]
    print(json.dumps(results, indent=2))
    table = summary_table(results)
    print(table)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table + "\n")
    return results


if __name__ == "__main__":
    main()
