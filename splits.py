"""A probe's data: the probes of a tasks file, each probe's labeled train, val and test
tracks, read and checked once, and the few-label train subsets.

probe.py reads every probe's data with read_labels before it embeds anything: the labels
must fit the task, every split needs labeled rows, test classes need train rows, and no
test track may repeat the audio of a train or val track (the same path, or the same
bytes under another name) unless --allow-leaks. label_subset draws the train tracks a
probe may learn from under a label budget (--label-fraction), stratified.
"""
import dataclasses
import os

import numpy as np
import pandas as pd
import torch

import datasets
import utils


@dataclasses.dataclass(frozen=True)
class Probe:
    """One probe of the list (--tasks rows, or one per --label-column): its manifest, label
    column(s), task and label kind, display name, head ("linear" or "mlp") and patience."""
    csv: str
    label_column: str
    task: str
    label_kind: str
    name: str
    head: str
    patience: int


@dataclasses.dataclass
class ClipSet:
    """Clip embeddings of some tracks: x `[M, E]` float32, owners `[M]` their track indices,
    each track's clips in their order in time."""
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
    """One probe's labeled tracks, read and checked once, and their frozen clip embeddings.

    rows: the labeled manifest rows `[N]` (path, split, labels); column: their
    datasets.LabelColumn; split `[N]`; labels `[N]` class indices or `[N, C]` float targets;
    clips: every readable track's clips (None until embedded, see probe.probe_data); failed:
    messages of files that could not be read; leaks: find_leaks' text when --allow-leaks
    let a leaking test split through, else "".
    """
    probe: Probe
    rows: pd.DataFrame
    column: datasets.LabelColumn
    split: np.ndarray
    labels: torch.Tensor
    clips: ClipSet = None
    failed: tuple = ()
    leaks: str = ""

    @property
    def paths(self):
        return list(self.rows["path"])

    @property
    def out_dim(self):
        """Classes, or regression outputs, C."""
        return len(self.column.columns) if self.probe.task == "regression" else len(self.column.classes)

    def split_clips(self, name):
        """The clips of the split called `name` (train, val or test)."""
        return self.clips.subset(self.split[self.clips.owners] == name)

    def train_statistics(self):
        """Mean and std `[E]` of the train clips' embeddings, which the head standardizes with."""
        train = self.clips.x.numpy()[self.split[self.clips.owners] == "train"]  # [M_train, E]
        return torch.from_numpy(train.mean(0)), torch.from_numpy(train.std(0) + 1e-6)


def read_tasks(path, head, patience, heads):
    """The probes of a tasks file (probe.py --tasks), as Probe records.

    path: a CSV with columns csv, label_column, task (optional: label_kind, name, head,
    patience), read by datasets.read_table, so a quote never closed, a header without
    rows or another separator is one line. Relative csv paths are read from the tasks
    file's folder; an empty head or patience cell (or a missing column) means `head` or
    `patience` (the flags). heads: the head kinds a cell may name. Raises
    utils.UserError naming the file, line and column of a bad cell.
    """
    table = datasets.read_table(path, required=("csv", "label_column", "task"), needs_rows=True)
    folder = os.path.dirname(os.path.abspath(path))
    probes = []
    for row, entry in table.iterrows():
        where = f"{path}, line {row + 2}"
        if entry["task"] not in datasets.TASKS:
            raise utils.UserError(f"{where}, column 'task': {entry['task']!r} is not one of {datasets.TASKS}")
        kind = entry.get("head", "").strip() or head
        if kind not in heads:
            raise utils.UserError(f"{where}, column 'head': {kind!r} is not one of {heads}")
        epochs = entry.get("patience", "").strip() or str(patience)
        if not epochs.isdigit():
            raise utils.UserError(f"{where}, column 'patience': {epochs!r} is not a whole number of epochs")
        csv = entry["csv"] if os.path.isabs(entry["csv"]) else os.path.join(folder, entry["csv"])
        probes.append(Probe(csv, entry["label_column"], entry["task"], entry.get("label_kind", "") or "generic",
                            entry.get("name", "") or f"{os.path.basename(csv)}:{entry['label_column']}", kind,
                            int(epochs)))
    return probes


def read_labels(probe, prototypes=False, allow_leaks=False):
    """Read a probe's manifest and labels and check that they suit probing (once per probe).

    Returns its ProbeData without embeddings (probe.probe_data adds them). Raises
    datasets.ManifestError for labels that do not fit the task (naming file, line and
    column) and utils.UserError for a split without labeled rows, test or val classes
    absent from train, prototypes (--prototypes) on regression, or test tracks whose audio
    is also a train or val track's (check_leaks).
    """
    csv, task = probe.csv, probe.task
    if prototypes and task == "regression":
        raise utils.UserError(f"{probe.name}: --prototypes needs class labels (multiclass or multilabel), "
                              f"not a regression task; drop --prototypes for this probe")
    manifest = datasets.read_manifest(csv)
    column = datasets.parse_labels(manifest, probe.label_column, task, probe.label_kind)
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
    rows = manifest.iloc[labeled].reset_index(drop=True)
    leaks = check_leaks(probe, rows, allow_leaks)
    # Regression heads learn standardized targets (the train statistics), so one lr suits every scale.
    column.values, column.labeled = column.standardized()[labeled], column.labeled[labeled]
    labels = torch.as_tensor(column.values, dtype=torch.long if task == "multiclass" else torch.float32)
    return ProbeData(probe, rows, column, split, labels, leaks=leaks)


def check_leaks(probe, rows, allow_leaks):
    """Refuse a test split that repeats train or val audio (datasets.find_leaks on the labeled rows).

    A test track with the same path or bytes as a train or val track scores what the head
    has seen, so the probe stops in one line unless allow_leaks; a leak between train and
    val only is said and the probe goes on. Returns the leak text ("" when none).
    """
    leaks = datasets.find_leaks(rows)
    if not leaks:
        return ""
    splits = rows["split"].to_numpy()
    if not allow_leaks and any("test" in set(splits[group]) for group in leaks.groups):
        raise utils.UserError(f"{leaks.text}; remove the copies, or pass --allow-leaks to score anyway")
    print(f"leaks: {probe.name}: {leaks.text}")
    return leaks.text


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
