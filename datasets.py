"""CSV manifests, audio crops and the sampler that mixes labeled and unlabeled clips.

Manifest contract (one row per audio file):
    path    required; relative to the CSV's own folder, or absolute
    split   optional; train, val or test (without the column every row is train)
    labels  any column(s) named with --label-column and read as --task:
            multiclass = one class name; multilabel = tags joined by ";";
            regression = a number (several columns: --label-column valence,arousal).
            An empty cell means the row is unlabeled for that column.

Audio is read with soundfile by seeking (a 3 s crop of a 10 min MP3 decodes 3 s), mixed
to mono and resampled with torchaudio. (The built-in synthetic music set, used when no
manifest is given, is written by synthetic.py.)
`python datasets.py cache --train-csv M.csv --out DIR --sample-rate 22050` pre-decodes
a corpus once (recommended for multi-epoch training on MP3s): then train on DIR/manifest.csv.
A folder of audio files becomes a manifest (docs/own-music.md):
    python datasets.py scan "My Music" --out my-music.csv --label-from-folder artist=1 --split 0.8,0.1,0.1
"""
import argparse
import hashlib
import io
import json
import math
import os
import re
import stat
import sys
import tempfile
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio
from tqdm import tqdm

import losses
import safety
import utils

SPLITS = ("train", "val", "test")
TASKS = losses.TASKS
LABEL_KINDS = ("generic", "pitch_class", "pitch", "key", "tempo")
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
KEY_NAMES = tuple(f"{note} {mode}" for mode in ("major", "minor") for note in NOTE_NAMES)
# MIREX key-relation weights, reused as the built-in key similarity (README documents them).
KEY_WEIGHTS = {"same": 1.0, "fifth": 0.5, "relative": 0.3, "parallel": 0.2}
MAX_REPLACEMENTS = 10


def add_label_flags(group, column_help, task_help, kind_help):
    """Add --label-column, --task and --label-kind to an argparse group: one flag name per
    idea in train.py and probe.py, each script giving its own help texts."""
    group.add_argument("--label-column", action="append", default=[], help=column_help)
    group.add_argument("--task", action="append", default=[], choices=TASKS, help=task_help)
    group.add_argument("--label-kind", action="append", default=[], choices=LABEL_KINDS, help=kind_help)


class ManifestError(utils.UserError, ValueError):
    """A manifest or label problem, found before training; the message names the place."""


# ---------------------------------------------------------------- label parsing

_NOTE_RE = re.compile(r"^\s*([A-Ga-g])\s*([#♯b♭]?)")
_MODE_WORDS = {"major": 0, "maj": 0, "": 0, "minor": 1, "min": 1, "m": 1}


def _note_index(letter, accidental):
    index = NOTE_NAMES.index(letter.upper())
    index += {"#": 1, "♯": 1, "b": -1, "♭": -1}.get(accidental, 0)
    return index % 12


def parse_key(text):
    """Key name -> class index in KEY_NAMES (0-11 major, 12-23 minor).

    Accepts the common spellings: "C major", "A minor", "c#:min", "Bb maj", "F# minor",
    "Am", "Ebm". Raises ValueError for anything else.
    """
    match = _NOTE_RE.match(text)
    if not match:
        raise ValueError(f"cannot read a key from {text!r}")
    rest = text[match.end():].strip().lstrip(":").strip()
    if rest == "M":
        mode = 0
    elif rest.lower() in _MODE_WORDS and rest != "M":
        mode = _MODE_WORDS[rest.lower()]
    else:
        raise ValueError(f"cannot read a key mode from {text!r} (expected major/minor)")
    return _note_index(match.group(1), match.group(2)) + 12 * mode


def parse_pitch_class(text):
    """Pitch class name ("C#", "Db") or number 0-11 -> 0..11; ValueError otherwise."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        value = int(text)
        if value > 11:
            raise ValueError(f"pitch class {value} is outside 0-11")
        return value
    match = _NOTE_RE.match(text)
    if not match or text[match.end():].strip():
        raise ValueError(f"cannot read a pitch class from {text!r}")
    return _note_index(match.group(1), match.group(2))


def parse_pitch(text):
    """MIDI note number ("60") or note name with octave ("C4" = 60, "A#3") -> int."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.0+)?", text):
        return int(float(text))
    match = re.fullmatch(r"([A-Ga-g])([#♯b♭]?)(-?\d+)", text)
    if not match:
        raise ValueError(f"cannot read a pitch from {text!r} (MIDI number or e.g. C#4)")
    return 12 * (int(match.group(3)) + 1) + _note_index(match.group(1), match.group(2))


def key_similarity():
    """Built-in `[24, 24]` similarity between the keys of KEY_NAMES (MIREX weights).

    same key 1; a perfect fifth apart in the same mode (dominant or subdominant) 0.5;
    relative major/minor 0.3; parallel major/minor 0.2; anything else 0.
    """
    similarity = torch.zeros(24, 24)
    for a in range(24):
        for b in range(24):
            tonic_a, mode_a, tonic_b, mode_b = a % 12, a // 12, b % 12, b // 12
            if a == b:
                value = KEY_WEIGHTS["same"]
            elif mode_a == mode_b and (tonic_b - tonic_a) % 12 in (5, 7):
                value = KEY_WEIGHTS["fifth"]
            elif mode_a != mode_b and (tonic_a + (9 if mode_a == 0 else 3)) % 12 == tonic_b:
                value = KEY_WEIGHTS["relative"]
            elif mode_a != mode_b and tonic_a == tonic_b:
                value = KEY_WEIGHTS["parallel"]
            else:
                value = 0.0
            similarity[a, b] = value
    return similarity


def pitch_similarity(pitches, octave_aware=False):
    """Similarity between MIDI pitches that halves with every semitone of distance.

    pitches: sequence of C MIDI numbers. With octave_aware, notes whose pitch classes
    agree keep half the similarity they would have at the same octave (0.5 * 2^-d with
    d the circular pitch-class distance), so C4 and C5 are close but not equal.
    Returns `[C, C]` in [0, 1] with ones on the diagonal.
    """
    midi = torch.tensor([float(p) for p in pitches])
    distance = (midi[:, None] - midi[None, :]).abs()
    similarity = torch.pow(2.0, -distance)
    if octave_aware:
        class_distance = distance % 12
        class_distance = torch.minimum(class_distance, 12 - class_distance)
        similarity = torch.maximum(similarity, 0.5 * torch.pow(2.0, -class_distance))
    return similarity


# ---------------------------------------------------------------- manifests

@dataclass
class LabelColumn:
    """One supervision signal read from the manifest.

    columns: CSV column names (several only for regression).
    task: multiclass, multilabel or regression; kind: what the label means (LABEL_KINDS).
    classes: class or tag names (multiclass, multilabel), index = position.
    mean, std: regression statistics per output, fitted on the labeled train rows.
    values: per-row encoded labels (class index, multi-hot, or values in their own units;
        0 where unlabeled).
    labeled: per-row bool.
    similarity: optional `[C, C]` class similarity (multiclass).
    """
    columns: list
    task: str
    kind: str = "generic"
    classes: list = field(default_factory=list)
    mean: list = field(default_factory=list)
    std: list = field(default_factory=list)
    values: np.ndarray = None
    labeled: np.ndarray = None
    similarity: torch.Tensor = None

    @property
    def name(self):
        return ",".join(self.columns)

    def standardized(self):
        """values, with regression outputs as (value - mean) / std (0 where unlabeled)."""
        if self.task != "regression":
            return self.values
        standardized = (self.values - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        standardized[~self.labeled] = 0.0
        return standardized

    def describe(self):
        """Everything but the per-row arrays, for checkpoints and probing."""
        return {"columns": self.columns, "task": self.task, "kind": self.kind,
                "classes": self.classes, "mean": self.mean, "std": self.std}


def _where(csv_path, row, column):
    # Line numbers count the header as line 1, as a text editor shows them.
    return f"{csv_path}, line {row + 2}, column {column!r}"


# Columns read_manifest adds for its own bookkeeping (never a user's label column).
INTERNAL_COLUMNS = ("source", "source_row")
# Audio file names: a manifest given by mistake as one is named as such.
AUDIO_NAME = re.compile(r"\.(wav|wave|flac|mp3|ogg|oga|opus|aif|aiff|aifc|au|caf|w64|rf64|m4a|aac|wma|npy)$", re.I)
URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


# The first bytes of files that are often given by mistake for a CSV: they are binary, not text.
BINARY_STARTS = (b"PK\x03\x04", b"RIFF", b"ID3", b"fLaC", b"OggS", b"\xd0\xcf\x11\xe0", b"%PDF", b"\xff\xfb")
SEPARATORS = ((";", "semicolons"), ("\t", "tabs"), ("|", "bars"))


def read_table(path, required=(), needs_rows=False):
    """A user's CSV file (a manifest, a labels CSV, a tasks file) as a DataFrame of text cells.

    path: the CSV file; only a regular file is opened. required: column names it must
    have (a header separated by semicolons, tabs or bars instead of commas is named as
    such). needs_rows: a header without rows is an error. Raises ManifestError in one
    line naming the file and saying what it is instead: not a regular file, binary, not
    UTF-8 (the byte and line, and to re-save it as UTF-8), empty, a header without rows,
    a quote that is never closed, a line with too many fields, other separators.
    """
    problem = file_problem(path)
    if problem:
        raise ManifestError(f"{path}: {problem}")
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ManifestError(f"{path} is UTF-16 text, not UTF-8; re-save it as UTF-8 (in a spreadsheet: CSV UTF-8)")
    if b"\0" in data[:1 << 16] or data.startswith(BINARY_STARTS):
        raise ManifestError(f"{path} is not a text CSV (it holds binary data, maybe audio or a spreadsheet); "
                            f"a CSV is UTF-8 text with a header line (export a spreadsheet as CSV UTF-8)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ManifestError(f"{path} is not UTF-8: byte 0x{data[error.start]:02x} on line {line} is not valid "
                            f"UTF-8 (the file is likely Latin-1 or Windows-1252); re-save it as UTF-8 (in a "
                            f"spreadsheet: CSV UTF-8; or `iconv -f latin1 -t utf-8`)") from None
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{path}: empty file; a CSV needs a header line naming its columns") from None
    except pd.errors.ParserError as error:
        reason = " ".join(str(error).split())
        quote = re.search(r"EOF inside string starting at row (\d+)", reason)
        if quote:
            raise ManifestError(f"{path}, line {int(quote.group(1)) + 1}: a quote (\") opens a field that is never "
                                f"closed; close the quote or remove it") from None
        raise ManifestError(f"{path} cannot be read as CSV ({reason.split('C error: ')[-1]}); check its quoting "
                            f"and that every line has as many commas as the header") from None
    for name in required:
        if name in frame.columns:
            continue
        header = ",".join(frame.columns)
        for separator, separator_name in SEPARATORS:
            if name in [part.strip().lower() for part in header.split(separator)]:
                raise ManifestError(f"{path}: its columns are separated by {separator_name} ({header!r}); save it "
                                    f"as CSV with ',' between columns (';' stays the tag separator inside a "
                                    f"multilabel cell)")
        raise ManifestError(f"{path}: no {name!r} column{utils.close_match(name, frame.columns)}; its columns: "
                            f"{list(frame.columns)}; it needs {list(required)}")
    if needs_rows and not len(frame):
        raise ManifestError(f"{path}: a header ({','.join(frame.columns)}) but no rows; add one row per entry")
    return frame


def _read_csv(csv_path):
    """One manifest file as text cells, or ManifestError saying why it is not a CSV manifest."""
    if os.path.isdir(csv_path):
        raise ManifestError(f"{csv_path} is a folder, not a manifest; give a CSV with a 'path' column (one row "
                            f"per audio file), or write one with `python datasets.py scan {csv_path} --out "
                            f"manifest.csv`")
    if not os.path.lexists(csv_path):
        raise ManifestError(f"{csv_path}: manifest not found")
    if AUDIO_NAME.search(csv_path):
        raise ManifestError(f"{csv_path} is an audio file, not a manifest; give a CSV with a 'path' column that "
                            f"lists your audio files (relative to the CSV's folder, or absolute)")
    return read_table(csv_path)


def _check_path_column(csv_path, frame):
    """ManifestError unless `frame` has a 'path' column, naming a wrong separator or a near miss."""
    if "path" in frame.columns:
        return
    header = ",".join(frame.columns)
    for separator, name in SEPARATORS:
        if "path" in [part.strip().lower() for part in header.split(separator)]:
            raise ManifestError(f"{csv_path}: its columns are separated by {name} ({header!r}); a manifest is "
                                f"comma-separated: save it as CSV with ',' between columns (';' stays the tag "
                                f"separator inside a multilabel cell)")
    raise ManifestError(f"{csv_path}: no 'path' column{utils.close_match('path', frame.columns)}; columns: "
                        f"{list(frame.columns)}. The first line must name the columns, one of them 'path'")


def _resolve_path(csv_path, folder, row, path, listings):
    """A manifest cell as an absolute path: relative paths start at the CSV's own folder.

    A URL stays as written (the data check reports it: download the file first). A name
    that exists on disk in another Unicode form (NFD from macOS, NFC in the CSV) resolves
    to the file on disk. listings: a dict caching folder listings across rows.
    """
    if URL.match(path):
        return path
    if "\\" in path and os.sep == "/" and not os.path.exists(path if os.path.isabs(path) else
                                                            os.path.join(folder, path)):
        raise ManifestError(f"{_where(csv_path, row, 'path')}: {path!r} uses Windows backslashes; write paths "
                            f"with '/' (e.g. {path.replace(chr(92), '/')!r}), which every system reads")
    resolved = path if os.path.isabs(path) else os.path.normpath(os.path.join(folder, path))
    return match_unicode_form(resolved, listings)


def nfc(text):
    """`text` in Unicode NFC: how names are compared (macOS writes file names in NFD)."""
    return unicodedata.normalize("NFC", text)


def match_unicode_form(path, listings=None):
    """`path` as it is spelled on disk when it exists there in another Unicode form; else `path`.

    Each missing part of the path is looked up in its parent folder's listing by its NFC
    form. listings: optional dict {folder: {NFC name: name on disk}} reused across calls.
    """
    if path.isascii() or os.path.lexists(path):
        return path
    listings = {} if listings is None else listings
    parts = path.split(os.sep)
    current = parts[0] or os.sep
    for part in parts[1:]:
        candidate = os.path.join(current, part)
        if not os.path.lexists(candidate):
            if current not in listings:
                try:
                    listings[current] = {nfc(name): name for name in os.listdir(current)}
                except OSError:
                    listings[current] = {}
            found = listings[current].get(nfc(part))
            if found is None:
                return path
            candidate = os.path.join(current, found)
        current = candidate
    return current


def read_manifest(csv_paths):
    """Read and concatenate manifests, resolving paths and checking `path` and `split`.

    csv_paths: one path or a list. Returns a DataFrame with absolute `path`, `split`,
    `source` (the CSV) and `source_row` (its line number), plus every other column as
    text ("" for empty cells). Relative paths are read from the CSV's own folder; a name
    spelled in another Unicode form than on disk (NFC against NFD) finds its file.
    Raises ManifestError naming file, line and column, and saying what a folder, an
    audio file, a binary file, another separator or a Windows path given by mistake is.
    """
    if isinstance(csv_paths, (str, os.PathLike)):
        csv_paths = [csv_paths]
    frames = []
    for csv_path in csv_paths:
        csv_path = str(csv_path)
        frame = _read_csv(csv_path)
        _check_path_column(csv_path, frame)
        if "split" not in frame.columns:
            frame["split"] = "train"
        frame["split"] = frame["split"].str.strip().str.lower().replace({"valid": "val", "validation": "val"})
        for row, (path, split) in enumerate(zip(frame["path"], frame["split"])):
            if not path.strip():
                raise ManifestError(f"{_where(csv_path, row, 'path')}: empty path")
            if split not in SPLITS:
                raise ManifestError(f"{_where(csv_path, row, 'split')}: unknown split {split!r}"
                                    f"{utils.close_match(split, SPLITS)}; use one of {SPLITS} (an empty "
                                    f"column or none at all means train)")
        folder, listings = os.path.dirname(os.path.abspath(csv_path)), {}
        frame["path"] = [_resolve_path(csv_path, folder, row, p, listings)
                         for row, p in enumerate(frame["path"].str.strip())]
        frame["source"] = csv_path
        frame["source_row"] = np.arange(len(frame)) + 2
        frames.append(frame)
    manifest = pd.concat(frames, ignore_index=True).fillna("")
    return manifest


@dataclass
class Leaks:
    """Audio that appears in more than one split of a manifest (find_leaks' result).

    groups: one list of manifest row indices per leaked audio (its rows span 2+ splits).
    same_path: how many groups hold one path; same_bytes: how many join different paths
    whose bytes are identical. text: one line for a report ("" when there is no leak).
    """
    groups: list
    same_path: int
    same_bytes: int
    text: str

    @property
    def rows(self):
        """Every row index in a group, sorted."""
        return sorted(row for group in self.groups for row in group)

    def __bool__(self):
        return bool(self.groups)


def _head_digest(path, size=1 << 16):
    """SHA-256 of a file's first `size` bytes: a cheap first test before utils.file_digest."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def find_leaks(manifest, examples=3):
    """The rows whose audio appears in more than one split: the same path, or the same bytes.

    manifest: a DataFrame with absolute `path` and `split` (read_manifest). Paths are
    compared in Unicode NFC; files are compared by content only where two regular files
    of different splits have the same size, first by their first 64 KiB, then by
    utils.file_digest (SHA-256), so a large corpus costs one os.stat per file. Missing
    files and URLs are compared by path only. examples: how many groups the text shows.
    Returns Leaks; its text reads e.g. "2 audio files appear in more than one split
    (1 under the same path, 1 as a byte copy under another name; 4 rows; train/test 2):
    a.wav (train) = copy.wav (test); ...".
    """
    paths = [nfc(os.path.normpath(p)) if not URL.match(p) else p for p in manifest["path"]]
    splits = manifest["split"].tolist()
    parent = list(range(len(paths)))

    def root(row):
        while parent[row] != row:
            parent[row] = parent[parent[row]]
            row = parent[row]
        return row

    first_row = {}
    for row, path in enumerate(paths):
        parent[root(row)] = root(first_row.setdefault(path, row))
    by_size = {}
    for path, row in first_row.items():
        try:
            info = os.stat(path)
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(info.st_mode) and info.st_size:
            by_size.setdefault(info.st_size, []).append(path)
    path_splits = {}
    for row, path in enumerate(paths):
        path_splits.setdefault(path, set()).add(splits[row])
    for same_size in by_size.values():
        if len(same_size) < 2 or len(set().union(*(path_splits[p] for p in same_size))) < 2:
            continue
        for digest in (_head_digest, utils.file_digest):
            groups = {}
            for path in same_size:
                try:
                    groups.setdefault(digest(path), []).append(path)
                except OSError:
                    continue
            same_size = [p for group in groups.values() if len(group) > 1 for p in group]
        for group in groups.values():
            for path in group[1:]:
                parent[root(first_row[path])] = root(first_row[group[0]])
    members = {}
    for row in range(len(paths)):
        members.setdefault(root(row), []).append(row)
    leaked = [rows for rows in members.values() if len({splits[r] for r in rows}) > 1]
    same_path = sum(len({paths[r] for r in rows}) == 1 for rows in leaked)
    if not leaked:
        return Leaks([], 0, 0, "")
    pairs = {}
    for rows in leaked:
        pair = "/".join(s for s in SPLITS if s in {splits[r] for r in rows})
        pairs[pair] = pairs.get(pair, 0) + 1
    shown = []
    for rows in leaked[:examples]:
        seen = {}
        for r in rows:
            seen.setdefault((manifest["path"].iat[r], splits[r]), r)
        shown.append(" = ".join(f"{path} ({split})" for path, split in seen))
    text = (f"{len(leaked)} audio file{'s' * (len(leaked) != 1)} appear in more than one split ({same_path} under "
            f"the same path, {len(leaked) - same_path} as a byte copy under another name; "
            f"{sum(map(len, leaked))} rows; " + ", ".join(f"{pair} {n}" for pair, n in sorted(pairs.items()))
            + "): " + "; ".join(shown) + (f"; ... {len(leaked) - examples} more" if len(leaked) > examples else ""))
    return Leaks(leaked, same_path, len(leaked) - same_path, text)


def _cell_error(manifest, row, column, message):
    source, line = manifest["source"].iat[row], manifest["source_row"].iat[row]
    return ManifestError(f"{source}, line {line}, column {column!r}: {message}")


def _regression_values(manifest, names, cells, labeled):
    """`[rows, len(names)]` float32 values of regression columns (0 where unlabeled), or ManifestError."""
    values = np.zeros((len(manifest), len(names)), dtype=np.float32)
    for k, name in enumerate(names):
        for row in np.flatnonzero(labeled):
            try:
                values[row, k] = float(cells[k][row])
            except ValueError:
                raise _cell_error(manifest, row, name, f"{cells[k][row]!r} is not a number") from None
            if not math.isfinite(values[row, k]):
                raise _cell_error(manifest, row, name, f"{cells[k][row]!r} is not finite")
    return values


def parse_labels(manifest, columns, task, kind="generic", similarity=None):
    """Encode one label column of a manifest (see the module docstring for the format).

    manifest: from read_manifest. columns: a column name, or comma-separated names for
    several regression outputs. task: multiclass, multilabel or regression. kind: one of
    LABEL_KINDS; pitch_class, pitch and key labels are parsed as such (e.g. "Bb maj").
    similarity: None, "key", "pitch", "pitch-octave", or a CSV path holding a C x C
    class similarity with class names as header and index.
    Returns a LabelColumn. Raises ManifestError naming file, line and column.
    """
    names = [c.strip() for c in columns.split(",")] if isinstance(columns, str) else list(columns)
    if task not in TASKS:
        raise ManifestError(f"unknown task {task!r}; use one of {TASKS}")
    if kind not in LABEL_KINDS:
        raise ManifestError(f"unknown label kind {kind!r}; use one of {LABEL_KINDS}")
    for name in names:
        if name not in manifest.columns or name in INTERNAL_COLUMNS:
            own = [c for c in manifest.columns if c not in INTERNAL_COLUMNS + ("path", "split")]
            raise ManifestError(f"label column {name!r} is not in {', '.join(sorted(set(manifest['source'])))}"
                                f"{utils.close_match(name, own)}; its label columns: {own or 'none'}")
    if len(names) > 1 and task != "regression":
        raise ManifestError(f"several label columns {names} in one signal need --task regression")
    column = LabelColumn(columns=names, task=task, kind=kind)
    cells = [[str(v).strip() for v in manifest[name]] for name in names]
    labeled = np.array([all(c[row] for c in cells) for row in range(len(manifest))])
    column.labeled = labeled
    if task == "regression":
        column.values = _regression_values(manifest, names, cells, labeled)
        # The statistics travel with the column; the values stay in their own units (the target
        # builder, losses.TargetSpec, decides whether distances are in standard deviations).
        fit = labeled & (manifest["split"].to_numpy() == "train")
        if not fit.any():
            raise ManifestError(f"regression column(s) {names}: no labeled train row to standardize on")
        column.mean = column.values[fit].mean(0).tolist()
        column.std = np.maximum(column.values[fit].std(0), 1e-8).tolist()
        return column
    raw = cells[0]
    name = names[0]
    if task == "multilabel":
        tag_lists = [[t.strip() for t in raw[row].split(";") if t.strip()] if labeled[row] else []
                     for row in range(len(manifest))]
        column.classes = sorted({t for tags in tag_lists for t in tags})
        index = {t: i for i, t in enumerate(column.classes)}
        column.values = np.zeros((len(manifest), len(column.classes)), dtype=np.float32)
        for row, tags in enumerate(tag_lists):
            column.values[row, [index[t] for t in tags]] = 1.0
        return column
    parsers = {"key": parse_key, "pitch_class": parse_pitch_class, "pitch": parse_pitch}
    if kind in parsers:
        codes = np.full(len(manifest), -1, dtype=np.int64)
        for row in np.flatnonzero(labeled):
            try:
                codes[row] = parsers[kind](raw[row])
            except ValueError as error:
                raise _cell_error(manifest, row, name, str(error)) from None
        if kind == "key":
            column.classes = list(KEY_NAMES)
        elif kind == "pitch_class":
            column.classes = list(NOTE_NAMES)
        else:
            column.classes = [str(p) for p in sorted(set(codes[labeled].tolist()))]
            lookup = {int(p): i for i, p in enumerate(column.classes)}
            codes = np.array([lookup[c] if c >= 0 else -1 for c in codes], dtype=np.int64)
    else:
        column.classes = sorted({raw[row] for row in np.flatnonzero(labeled)})
        lookup = {c: i for i, c in enumerate(column.classes)}
        codes = np.array([lookup[raw[row]] if labeled[row] else -1 for row in range(len(manifest))],
                         dtype=np.int64)
    column.values = codes
    if similarity is not None:
        column.similarity = class_similarity(similarity, column)
    return column


def class_similarity(spec, column):
    """Resolve a --class-similarity value for a multiclass LabelColumn -> `[C, C]`.

    spec: "key" (needs kind key), "pitch" or "pitch-octave" (kind pitch: MIDI distance;
    kind pitch_class: circular distance), or a CSV file with class names as header and
    first column, values in [0, 1], covering exactly the column's classes.
    """
    if spec == "key":
        if column.kind != "key":
            raise ManifestError(f"--class-similarity key needs --label-kind key for column {column.name!r}")
        return key_similarity()
    if spec in ("pitch", "pitch-octave"):
        if column.kind == "pitch":
            return pitch_similarity([int(c) for c in column.classes], octave_aware=spec == "pitch-octave")
        if column.kind == "pitch_class":
            # Pitch classes live on a circle: distance is the shorter way round.
            steps = torch.arange(12.0)
            distance = (steps[:, None] - steps[None, :]).abs()
            return torch.pow(2.0, -torch.minimum(distance, 12 - distance))
        raise ManifestError(f"--class-similarity {spec} needs --label-kind pitch or pitch_class "
                            f"for column {column.name!r}")
    if not os.path.isfile(spec):
        raise ManifestError(f"--class-similarity {spec!r}: not a built-in (key, pitch, pitch-octave) "
                            f"and no such file")
    table = pd.read_csv(spec, index_col=0)
    table.index = table.index.astype(str).str.strip()
    table.columns = table.columns.astype(str).str.strip()
    if table.shape[0] != table.shape[1] or list(table.index) != list(table.columns):
        raise ManifestError(f"{spec}: class similarity must be square with the same class names as "
                            f"header and index (got {table.shape[0]} rows, {table.shape[1]} columns)")
    try:
        matrix = table.to_numpy(dtype=np.float64)
    except ValueError:
        raise ManifestError(f"{spec}: class similarity holds a value that is not a number") from None
    bad = np.argwhere(~((matrix >= 0) & (matrix <= 1)))
    if len(bad):
        r, c = bad[0]
        raise ManifestError(f"{spec}: entry ({table.index[r]!r}, {table.columns[c]!r}) = {matrix[r, c]} "
                            f"is outside [0, 1]")
    missing = sorted(set(column.classes) - set(table.index))
    if missing:
        raise ManifestError(f"{spec}: classes of column {column.name!r} missing from the similarity: {missing}")
    absent = sorted(set(table.index) - set(column.classes))
    if absent:
        raise ManifestError(f"{spec}: names classes absent from column {column.name!r}: {absent}")
    order = [list(table.index).index(c) for c in column.classes]
    return torch.tensor(matrix[np.ix_(order, order)], dtype=torch.float32)


# ---------------------------------------------------------------- audio

class AudioError(RuntimeError):
    """A file that cannot give the requested audio (unreadable, empty or too short)."""


def file_problem(path):
    """Why `path` cannot be opened as a file, found without opening it; None for a readable regular file.

    Only regular files are opened: a named pipe (FIFO) blocks its reader for ever and a
    device streams without end, so both are refused from os.stat alone. The reason names
    the fault, where a decoder would say "System error": "URL not supported: download
    the file first", "does not exist", "broken link (to TARGET, which does not exist)",
    "permission denied", "named pipe (FIFO), not a regular file (never opened)",
    "device, not a regular file (never opened)", "folder, not a file",
    "empty file (0 bytes)".
    """
    path = str(path)
    if URL.match(path):
        return "URL not supported: download the file first"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"broken link (to {os.readlink(path)}, which does not exist)"
        return "does not exist"
    except PermissionError:
        return "permission denied"
    except OSError as error:
        return (error.strerror or type(error).__name__).lower()
    if stat.S_ISDIR(info.st_mode):
        return "folder, not a file"
    if stat.S_ISFIFO(info.st_mode):
        return "named pipe (FIFO), not a regular file (never opened)"
    if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
        return "device, not a regular file (never opened)"
    if not stat.S_ISREG(info.st_mode):
        return "socket or other special file, not a regular file (never opened)"
    if not os.access(path, os.R_OK):
        return "permission denied"
    if info.st_size == 0:
        return "empty file (0 bytes)"
    return None


_RESAMPLERS = {}


def _resampler(source_rate, sample_rate, device):
    """torchaudio Resample for a rate pair on a device, built once per process.

    Building the sinc kernel costs more than applying it to a crop, so kernels are kept.
    """
    key = (source_rate, sample_rate, str(device))
    if key not in _RESAMPLERS:
        _RESAMPLERS[key] = torchaudio.transforms.Resample(source_rate, sample_rate).to(device)
    return _RESAMPLERS[key]


def _resample(audio, source_rate, sample_rate):
    """`[C, T]` numpy -> float32 tensor at sample_rate."""
    wave = torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32))
    return _resampler(source_rate, sample_rate, wave.device)(wave) if source_rate != sample_rate else wave


def _fit_length(wave, length):
    """Cut or zero-pad the last axis to exactly `length` samples."""
    if wave.shape[-1] >= length:
        return wave[..., :length]
    return torch.nn.functional.pad(wave, (0, length - wave.shape[-1]))


DECODER_WARNINGS = {}  # path -> lines the C decoder printed while this process read the file
_DECODER_LOG = []  # one temporary file per process that fd 2 points at while decoding


@contextmanager
def decoder_messages(path):
    """Catch what the C decoder (libsndfile, libmpg123) prints on fd 2 while reading `path`.

    libmpg123 writes notes such as "part2_3_length (192) too large for available bit
    count" straight to the process's stderr, below Python, where they break progress
    bars. Inside this block fd 2 points at a temporary file instead (two dup2 calls, a
    few microseconds); afterwards the lines are counted in DECODER_WARNINGS[path] and
    the first time a file warns in this process, one line says so through tqdm.write,
    which keeps the progress bar intact (each data worker counts and reports its own).
    """
    if not _DECODER_LOG:
        _DECODER_LOG.append(tempfile.TemporaryFile())
    log = _DECODER_LOG[0].fileno()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(log, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        size = os.lseek(log, 0, os.SEEK_CUR)
        if size:
            os.lseek(log, 0, os.SEEK_SET)
            lines = os.read(log, size).decode("utf-8", "replace").splitlines()
            os.lseek(log, 0, os.SEEK_SET)
            os.ftruncate(log, 0)
            lines = [line for line in lines if line.strip()]
            if lines:
                is_new = path not in DECODER_WARNINGS
                DECODER_WARNINGS[path] = DECODER_WARNINGS.get(path, 0) + len(lines)
                if is_new:
                    # A data worker holds no bar of its own: start a new line so as not to write over the
                    # main process's bar (tqdm.write clears and redraws it where the bar lives).
                    start = "\n" if torch.utils.data.get_worker_info() is not None else ""
                    tqdm.write(f"{start}decoder warnings: {path}: {len(lines)} line(s), e.g. {lines[0].strip()[:160]} "
                               f"(further ones for this file in this process are counted, not shown)",
                               file=sys.stderr)


CACHE_INFO = "cache.json"
CACHE_NAME = re.compile(r"-(\d+)hz\.npy$")  # a cache file's name ends with its sample rate


class CachedAudio:
    """A pre-decoded file (see write_cache): int16 mono `.npy`, memory-mapped.

    Reads like an sf.SoundFile (samplerate, frames, channels, seek, read) so that crops
    come from the same code, with no decoding: a crop is a slice of the mapped array.
    The sample rate is part of the file's own name (HASH-RATEhz.npy), so it travels with
    the data and is never taken from another file. Raises AudioError for a file without
    it (an older cache) or whose contents are not int16 mono audio.
    """

    def __init__(self, path):
        rate = CACHE_NAME.search(os.path.basename(path))
        if not rate:
            raise AudioError(f"{path}: a cache file without its sample rate in its name (an older cache); "
                             f"rebuild it with `python datasets.py cache`")
        self.samplerate = int(rate.group(1))
        self.data = np.load(path, mmap_mode="r")
        if self.data.dtype != np.int16 or self.data.ndim != 1:
            raise AudioError(f"{path}: not a cache file ({self.data.dtype} {list(self.data.shape)}, not int16 "
                             f"mono); rebuild it with `python datasets.py cache`")
        self.frames, self.channels, self.position = len(self.data), 1, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.data = None

    def seek(self, frame):
        self.position = frame

    def read(self, frames=-1, dtype="float32", always_2d=True):
        end = self.frames if frames < 0 else min(self.frames, self.position + frames)
        out = self.data[self.position:end].astype(np.float32) / 32768.0  # [T]
        self.position = end
        return out[:, None]  # [T, 1]


def open_audio(path):
    """An open audio file: CachedAudio for `.npy` cache files, else an sf.SoundFile.

    Only a regular file is opened (file_problem); anything else is an AudioError naming
    the fault.
    """
    problem = file_problem(path)
    if problem:
        raise AudioError(f"{path}: {problem}")
    if str(path).endswith(".npy"):
        try:
            return CachedAudio(path)
        except (OSError, ValueError) as error:
            raise AudioError(f"{path}: cannot read cached audio ({error}); rerun `python datasets.py cache`, "
                             f"which rebuilds damaged files") from error
    return sf.SoundFile(path)


# libsndfile 1.2's MP3 decoder gets the first frames of a read wrong unless the read starts at
# the file's beginning: after a seek, and in every read after the first one (up to 0.36 off on
# a 0.3 sine, in tonal audio whose frames use the bit reservoir). Measured at 8 to 48 kHz, a
# read that begins 3,456 frames early is exact from there on; read_span begins 9,216 early.
MP3_PREROLL = 9216  # frames: 8 MPEG-1 frames of 1,152 samples


def read_span(f, start, count):
    """Frames [start, start + count) of an open audio file: float32 `[n, channels]`, n <= count.

    One seek and one read; an MP3 read begins up to MP3_PREROLL frames early and drops them.
    """
    preroll = min(start, MP3_PREROLL) if getattr(f, "format", None) in ("MP3", "MPEG") else 0
    f.seek(start - preroll)
    return f.read(preroll + count, dtype="float32", always_2d=True)[preroll:]


def read_source_crops(path, num_views, clip_samples, sample_rate, rng):
    """Read `num_views` random crops of one file, mono, at the file's own sample rate.

    Each crop holds the source frames that resample to `clip_samples` at `sample_rate`
    (plus one frame for rounding). Crops do not overlap when the file holds num_views
    crops; otherwise they are drawn independently (and may overlap). A file shorter than
    one crop is zero-padded if it is at least half a crop long, else AudioError. Only the
    cropped frames are decoded. rng: numpy Generator.
    Returns (crops `[num_views, L]` float32, source rate in Hz).
    """
    try:
        with decoder_messages(path), open_audio(path) as f:
            source_rate, frames = f.samplerate, f.frames
            # One extra source frame absorbs rounding of the resampled length.
            crop = math.ceil(clip_samples * source_rate / sample_rate) + 1
            if frames <= 0:
                raise AudioError(f"{path}: empty audio")
            if frames < crop:
                if frames < crop // 2:
                    raise AudioError(f"{path}: {frames / source_rate:.2f} s is shorter than half a "
                                     f"{clip_samples / sample_rate:.2f} s crop")
                starts = [0] * num_views
            elif frames >= num_views * crop:
                # Non-overlapping: place num_views crops and share the slack randomly.
                slack = np.sort(rng.integers(0, frames - num_views * crop + 1, size=num_views))
                starts = [int(s) + k * crop for k, s in enumerate(slack)]
                starts = [starts[k] for k in rng.permutation(num_views)]
            else:
                starts = rng.integers(0, frames - crop + 1, size=num_views).tolist()
            crops = []
            for start in starts:
                audio = read_span(f, int(start), min(crop, frames - int(start)))  # [n, channels]
                crops.append(_fit_length(torch.from_numpy(audio.mean(1)), crop))  # [L] mono, padded
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        if isinstance(error, AudioError):
            raise
        raise AudioError(f"{path}: cannot read audio ({error})") from error
    out = torch.stack(crops)  # [V, L]
    if not torch.isfinite(out).all():
        raise AudioError(f"{path}: audio holds NaN or Inf samples")
    return out, source_rate


def resample_views(audio, source_rate, clip_samples, sample_rate):
    """Resample crops `[..., L]` from `source_rate` to exactly `clip_samples` at `sample_rate`.

    Works on any device (one cached kernel per rate pair and device).
    """
    if source_rate != sample_rate:
        audio = _resampler(source_rate, sample_rate, audio.device)(audio)
    return _fit_length(audio, clip_samples)


def read_crops(path, num_views, clip_samples, sample_rate, rng):
    """read_source_crops resampled: `[num_views, clip_samples]` float32 at `sample_rate`."""
    crops, source_rate = read_source_crops(path, num_views, clip_samples, sample_rate, rng)
    return resample_views(crops, source_rate, clip_samples, sample_rate)


def collate_clips(items):
    """Batch ClipDataset items whose audio lengths differ (crops left at their source rate).

    Audio is zero-padded to the longest crop -> `[b, V, L_max]`; `rate` `[b]` says each
    item's rate, so that resample_batch can resample on the training device, one group of
    equal rates at a time. Everything else is collated as usual.
    """
    longest = max(item["audio"].shape[-1] for item in items)
    padded = [dict(item, audio=_fit_length(item["audio"], longest)) for item in items]
    return torch.utils.data.default_collate(padded)


def resample_batch(audio, rates, clip_samples, sample_rate):
    """Resample a collate_clips batch on its device, grouped by source rate.

    audio: `[b, V, L_max]`; rates: `[b]` source rates. Returns `[b, V, clip_samples]`.
    """
    out = audio.new_empty(audio.shape[0], audio.shape[1], clip_samples)
    for rate in rates.unique().tolist():
        group = (rates == rate).nonzero().squeeze(1).to(audio.device)  # [b_r]
        length = math.ceil(clip_samples * rate / sample_rate) + 1  # the source crop length
        out[group] = resample_views(audio[group, :, :length], int(rate), clip_samples, sample_rate)
    return out


def cut_clips(read, frames, source_rate, clip_samples, sample_rate, max_clips=None):
    """The one way a recording is cut into consecutive clips (probing, export, load_pretrained).

    The recording, `frames` samples at `source_rate` resampled to `sample_rate`, is cut into
    consecutive clips of clip_samples; the last partial clip is kept (zero-padded) when it
    is at least half a clip long, and a recording shorter than that gives one padded clip.
    max_clips keeps that many clips, spread evenly (None: all). Only the kept clips are
    read: read(start, count) returns the mono source frames [start, start + count) as a
    float32 tensor `[n]` (fewer at the end). Each clip is resampled from its own frames
    plus the resampler's reach on both sides, from a multiple of its input period, so its
    samples equal those of resampling the whole recording at once.
    Returns (clips `[K, clip_samples]` float32, kept `[K]` their indices among all clips).
    """
    period_in, period_out, reach, length = 1, 1, 0, frames
    resampler = _resampler(source_rate, sample_rate, "cpu") if source_rate != sample_rate else None
    if resampler is not None:
        period_in, period_out = source_rate // resampler.gcd, sample_rate // resampler.gcd
        reach = math.ceil(resampler.width / period_in) * period_in
        # The resampled length exactly as torchaudio computes it (a float32 ceil).
        length = int(torch.ceil(torch.as_tensor(period_out * frames / period_in)))
    count = max(1, int(length / clip_samples + 0.5))
    kept = torch.arange(count)
    if max_clips is not None and count > max_clips:
        kept = torch.linspace(0, count - 1, max_clips).round().long()
    clips = torch.zeros(len(kept), clip_samples)  # [K, clip_samples]
    for k, clip in enumerate(kept.tolist()):
        first, last = clip * clip_samples, min(length, (clip + 1) * clip_samples)  # resampled samples
        start = max(0, first // period_out * period_in - reach)
        stop = min(frames, math.ceil(last / period_out) * period_in + reach)
        wave = read(start, stop - start)  # [n] source frames
        if resampler is not None:
            wave = resampler(wave[None])[0]  # [m]
        offset = first - start // period_in * period_out
        piece = wave[offset:offset + last - first]
        clips[k, :len(piece)] = piece
    return clips, kept


def frame_reader(f, block=1 << 16):
    """read(start, count) -> mono frames `[n]` float32 of an open audio file, for cut_clips.

    Where the format seeks exactly (WAV, FLAC, AIFF, MP3 through read_span, the cache's
    .npy), each read seeks. libsndfile's Ogg seeks can land a few hundred frames off the
    frame asked for (1.2.x), so Ogg files are read forward in blocks instead, keeping only
    the frames asked for and the last range read (the reaches of consecutive clips overlap);
    memory stays flat, the decoding time is the file's. Starts must then not decrease.
    """
    if getattr(f, "format", None) != "OGG":
        return lambda start, count: torch.from_numpy(read_span(f, start, count).mean(1))  # [n] mono
    state = {"start": 0, "last": torch.zeros(0)}  # the frames [start, position) read last

    def read_forward(start, count):
        first, last = state["start"], state["last"]
        position = first + len(last)
        if start < position:
            first, last = start, last[start - first:]
        else:
            while position < start:
                skipped = len(f.read(min(block, start - position), dtype="float32", always_2d=True))
                if not skipped:
                    break  # the end of the file
                position += skipped
            first, last = position, torch.zeros(0)
        wanted = start + count - (first + len(last))
        if wanted > 0:
            read = torch.from_numpy(f.read(wanted, dtype="float32", always_2d=True).mean(1))  # [n] mono
            last = torch.cat([last, read])
        state.update(start=first, last=last)
        return last[start - first:start - first + count]

    return read_forward


def read_clips(path, clip_samples, sample_rate, max_clips=None):
    """A file as consecutive clips (test time), mono at `sample_rate`: read_kept_clips' clips."""
    return read_kept_clips(path, clip_samples, sample_rate, max_clips)[0]


def read_kept_clips(path, clip_samples, sample_rate, max_clips=None):
    """A file cut by cut_clips, decoding only the kept clips (seek, read), so memory stays flat.

    The last partial clip is kept (zero-padded) when it is at least half a clip long; a
    file shorter than that gives one padded clip. max_clips caps the count (taken evenly
    spread over the file). Returns (clips `[K, clip_samples]` float32, kept `[K]` indices
    among the file's consecutive clips).
    """
    try:
        with decoder_messages(path), open_audio(path) as f:
            if f.frames <= 0:
                raise AudioError(f"{path}: empty audio")
            clips, kept = cut_clips(frame_reader(f), f.frames, f.samplerate, clip_samples, sample_rate, max_clips)
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        if isinstance(error, AudioError):
            raise
        raise AudioError(f"{path}: cannot read audio ({error})") from error
    if not torch.isfinite(clips).all():
        raise AudioError(f"{path}: audio holds NaN or Inf samples")
    return clips, kept


# ---------------------------------------------------------------- checking files

CHECK_COLUMNS = ("path", "status", "problems", "seconds", "sample_rate", "channels")


def check_file(path, min_seconds, sample_rate, block_seconds=30.0):
    """Open one audio file completely and report what is wrong with it.

    min_seconds: shortest usable length (half a crop: shorter files cannot be padded).
    sample_rate: the training rate; other rates are noted (they are resampled).
    Returns a dict with CHECK_COLUMNS: status "ok" (usable, maybe with notes), or "bad"
    (what file_problem names: "does not exist", "empty file (0 bytes)", a FIFO or device
    never opened, a broken link, "permission denied", a URL; "cannot be decoded
    (decoder's reason)", empty audio, too short, NaN/Inf samples: excluded from
    training); problems
    is a ";"-joined list such as "silent" or "sample rate 8000 Hz (resampled)".
    The file is decoded block by block, so memory stays small for long files.
    """
    report = {"path": path, "status": "ok", "problems": "", "seconds": 0.0, "sample_rate": 0, "channels": 0}
    problems, bad = [], False
    problem = file_problem(path)
    if problem:
        report.update(status="bad", problems=problem)
        return report
    try:
        with decoder_messages(path), open_audio(path) as f:
            report.update(sample_rate=f.samplerate, channels=f.channels)
            frames, peak, finite = 0, 0.0, True
            block = max(1, int(block_seconds * f.samplerate))
            while True:
                data = f.read(block, dtype="float32", always_2d=True)
                if not len(data):
                    break
                frames += len(data)
                if not np.isfinite(data).all():
                    finite = False
                    data = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
                peak = max(peak, float(np.abs(data).max()))
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        # The decoder's whole reason, on one line (it would break the CSV report otherwise).
        reason = " ".join(str(error).split()) or type(error).__name__
        report.update(status="bad", problems=f"cannot be decoded ({reason})")
        return report
    report["seconds"] = frames / report["sample_rate"] if report["sample_rate"] else 0.0
    if frames == 0:
        problems, bad = problems + ["empty"], True
    elif report["seconds"] < min_seconds:
        problems, bad = problems + [f"too short ({report['seconds']:.2f} s < {min_seconds:.2f} s)"], True
    if not finite:
        problems, bad = problems + ["NaN/Inf samples"], True
    if frames and peak == 0.0:
        problems.append("silent")
    if report["channels"] > 2:
        problems.append(f"{report['channels']} channels (mixed to mono)")
    if report["sample_rate"] and report["sample_rate"] != sample_rate:
        problems.append(f"sample rate {report['sample_rate']} Hz (resampled to {sample_rate} Hz)")
    report.update(status="bad" if bad else "ok", problems=";".join(problems))
    return report


def _check_task(task):
    return check_file(*task)


def check_files(paths, min_seconds, sample_rate, workers=2, progress=None):
    """check_file over many paths in `workers` processes -> DataFrame with CHECK_COLUMNS.

    progress: optional callable taking the number of files done, for a progress bar.
    """
    tasks = [(p, min_seconds, sample_rate) for p in paths]
    if workers > 1 and len(tasks) > 1:
        context = torch.multiprocessing.get_context("spawn")
        with context.Pool(workers) as pool:
            reports = []
            for report in pool.imap(_check_task, tasks, chunksize=8):
                reports.append(report)
                if progress:
                    progress(1)
    else:
        reports = []
        for task in tasks:
            reports.append(_check_task(task))
            if progress:
                progress(1)
    return pd.DataFrame(reports, columns=list(CHECK_COLUMNS))


# ---------------------------------------------------------------- datasets and sampling

class ClipDraw(NamedTuple):
    """One clip of a batch as the sampler draws it; the dataset's index.

    row: manifest row; seed: fixes the crop positions (and worker augmentation);
    pool: 1 the labeled pool, 0 the unlabeled one (a labeled-pool clip keeps its labels).
    """
    row: int
    seed: int
    pool: int


class ClipDataset(torch.utils.data.Dataset):
    """Map-style dataset of multi-view crops, indexed by draws from MixedBatchSampler.

    Each index is a ClipDraw `(row, seed, pool)`: the crop positions come from
    `seed`, so a run is reproducible with any number of workers. A file that fails to
    load is replaced by a random row of the same pool (at most MAX_REPLACEMENTS tries)
    and counted in the item's `failed` field, so the batch keeps its size and mix.

    paths: per-row file paths; columns: LabelColumns; pools: {pool id: row array}.
    worker_chains: optional {"labeled": chain, "unlabeled": chain} of callables `[V, T] -> [V, T]`
        applied here (augmentation in the data workers; augment.build_chains decides), chosen
        by the draw's pool.
    resample_here: resample to sample_rate in the dataset (the workers); if False, crops
        keep their source rate and length (batch them with collate_clips, then
        resample_batch on the device).
    status_dir: optional folder where each worker process writes the path it is reading,
        so that a worker killed by a crashing decoder can be reported with its file.
    Items are dicts: audio `[V, clip_samples]` (or `[V, L]` at the source rate), rate (Hz),
    clip (row), labels (one tensor per column), labeled (one bool per column), failed
    (int), failed_paths (";"-joined).
    """

    def __init__(self, paths, columns, pools, num_views, clip_samples, sample_rate, worker_chains=None, status_dir=None,
                 resample_here=True):
        self.paths = list(paths)
        self.columns = columns
        self.pools = pools
        self.num_views = num_views
        self.clip_samples = clip_samples
        self.sample_rate = sample_rate
        self.worker_chains = worker_chains
        self.status_dir = status_dir
        self.resample_here = resample_here

    def _note_reading(self, path):
        if self.status_dir is not None:
            os.makedirs(self.status_dir, exist_ok=True)
            with open(os.path.join(self.status_dir, f"worker-{os.getpid()}.txt"), "w") as f:
                f.write(path)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, draw):
        row, seed, pool = draw
        is_labeled = pool == 1
        rng = np.random.default_rng(seed)
        failed = []
        for _ in range(MAX_REPLACEMENTS + 1):
            try:
                self._note_reading(self.paths[row])
                audio, rate = read_source_crops(self.paths[row], self.num_views, self.clip_samples,
                                                self.sample_rate, rng)
                break
            except AudioError:
                failed.append(self.paths[row])
                row = int(rng.choice(self.pools[pool]))
        else:
            raise AudioError(f"{MAX_REPLACEMENTS + 1} files in a row failed to load, last {failed[-1]}; "
                             f"run `python train.py --check-data` on the manifest")
        if self.resample_here:
            audio, rate = resample_views(audio, rate, self.clip_samples, self.sample_rate), self.sample_rate
        if self.worker_chains is not None:
            chain = self.worker_chains["labeled" if is_labeled else "unlabeled"]
            audio = chain(audio, torch.Generator().manual_seed(seed % 2**63), views=len(audio))  # [V, T]: one clip
        labels = [torch.as_tensor(c.values[row]) for c in self.columns]
        labeled = [bool(is_labeled and c.labeled[row]) for c in self.columns]
        return {"audio": audio, "rate": rate, "clip": row, "labels": labels, "labeled": labeled,
                "failed": len(failed), "failed_paths": ";".join(failed)}


def split_pools(labeled, train_rows, labeled_fraction, seed):
    """Split train rows into the labeled pool (a p_s share of labeled rows) and the rest.

    labeled: per-row bool (labeled in at least one column); train_rows: row indices.
    labeled_fraction: p_s in [0, 1]; the kept subset is fixed by `seed`.
    Returns (labeled_rows, unlabeled_rows) as sorted int arrays.
    """
    train_rows = np.asarray(train_rows)
    candidates = train_rows[labeled[train_rows]]
    keep = int(round(labeled_fraction * len(candidates)))
    chosen = np.sort(np.random.default_rng(seed).permutation(candidates)[:keep])
    rest = np.setdiff1d(train_rows, chosen)
    return chosen, rest


def build_pools(manifest, columns, given_columns, given_share, args, is_main):
    """train.py: the labeled and unlabeled pools of train rows, checked; fills in what the data decides.

    given_columns, given_share: --label-column and --labeled-per-batch as the user gave
    them. Sets args.labeled_per_batch (when not given), args.manifest_rows and
    args.manifest_digest. Returns (any_labeled `[rows]` bool, labeled_rows, unlabeled_rows).
    """
    has_labels = any(c.labeled.any() for c in columns)
    if args.labeled_per_batch is None:
        args.labeled_per_batch = 0.5 if has_labels else 0.0  # b_s = 0.5: half of each batch labeled
    any_labeled = np.zeros(len(manifest), dtype=bool)
    for column in columns:
        any_labeled |= column.labeled
    train_rows = np.flatnonzero(manifest["split"].to_numpy() == "train")
    labeled_rows, unlabeled_rows = split_pools(any_labeled, train_rows, args.labeled_fraction, args.seed)
    safety.check_labeled_pool(manifest, columns, given_columns, given_share, labeled_rows, args)
    args.manifest_rows, args.manifest_digest = len(manifest), safety.manifest_digest(manifest, columns)
    if args.labeled_per_batch < 1 and not len(unlabeled_rows):
        # Every train row is labeled: the unlabeled share of each batch hides the labels of train rows.
        unlabeled_rows = train_rows
        if is_main:
            print("no unlabeled rows: the unlabeled share of each batch draws from all train rows, labels hidden")
    if is_main:
        print(f"train rows {len(train_rows)}: labeled pool {len(labeled_rows)}, unlabeled pool "
              f"{len(unlabeled_rows)}; b_s={args.labeled_per_batch} p_s={args.labeled_fraction}; "
              f"signals: {[c.name + ':' + c.task for c in columns] or 'none (self-supervised)'}")
        leaks = find_leaks(manifest)
        if leaks:
            # Training itself is not wrong; the validation loss (and any probe on these splits) would be.
            print(f"warning: {leaks.text}; the val loss measures clips seen in training")
    return any_labeled, labeled_rows, unlabeled_rows


class MixedBatchSampler:
    """Endless batches with an exact labeled share b_s, reproducible from (seed, step).

    Each global batch holds int(b_s * batch_size) draws from the labeled pool (as the
    authors' sampler counts them) and the rest from the unlabeled pool. Each pool is read
    as an endless series of shuffled passes, so the smaller pool is cycled, every row
    comes once per pass and the composition stays exact. A batch that straddles two
    passes would otherwise be able to hold a row twice (its views would all become
    positives of one another): the next pass is reordered so that its first rows avoid
    the previous pass's last rows in that batch. A pool smaller than its share of a
    batch cannot avoid repeats; train.py warns about it.

    A draw is a ClipDraw `(row, seed, pool)`. Rank r of world_size
    takes draws r, r + world_size, ... of the global batch, so ranks get disjoint shares
    whose union is the global batch. Batch k depends on (seed, k) only: starting at
    `start_step` continues the same stream as an uninterrupted run.
    """

    def __init__(self, labeled_rows, unlabeled_rows, batch_size, labeled_per_batch, seed,
                 rank=0, world_size=1, start_step=0):
        # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 at 29.
        self.num_labeled = int(math.floor(labeled_per_batch * batch_size + 1e-9))
        self.pools = {1: np.asarray(labeled_rows), 0: np.asarray(unlabeled_rows)}
        self.counts = {1: self.num_labeled, 0: batch_size - self.num_labeled}
        for pool, name in ((1, "labeled"), (0, "unlabeled")):
            if self.counts[pool] and not len(self.pools[pool]):
                raise ManifestError(f"b_s={labeled_per_batch} asks for {self.counts[pool]} {name} clips per "
                                    f"batch but the {name} pool is empty")
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.step = start_step
        self.passes = {}

    def _shuffled(self, pool, index):
        """Pass `index` of `pool` as drawn, before any reordering."""
        rng = np.random.default_rng([self.seed, pool, index])
        return self.pools[pool][rng.permutation(len(self.pools[pool]))]

    def _pass(self, pool, index):
        """Pass `index` of `pool`: a permutation of its rows, reordered at its head so that
        the batch it shares with pass index - 1 holds no row twice."""
        key = (pool, index)
        if key not in self.passes:
            count, size = self.counts[pool], len(self.pools[pool])
            if size < count or size >= 2 * count - 1:
                # The reordering moves rows among the first `count` positions only, so a
                # pass of at least 2 * count - 1 rows keeps its tail as drawn: the previous
                # pass need not be rebuilt, and resuming costs one shuffle.
                previous = self._shuffled(pool, index - 1) if index > 0 and size >= count else None
                rows = self._reorder(pool, index, previous)
            else:
                # A short pass's tail depends on its own reordering: rebuild the chain of
                # passes from the newest one kept (from pass 0 after a resume).
                start, previous = max(((i, r) for (p, i), r in self.passes.items() if p == pool and i < index),
                                      default=(-1, None), key=lambda item: item[0])
                for i in range(start + 1, index + 1):
                    previous = self._reorder(pool, i, previous)
                rows = previous
            if len(self.passes) > 8:
                # Keep each pool's newest pass: a short pool's next pass is built from it.
                newest = {p: max(i for q, i in self.passes if q == p) for p, _ in self.passes}
                self.passes = {(p, i): self.passes[(p, i)] for p, i in newest.items()}
            self.passes[key] = rows
        return self.passes[key]

    def _reorder(self, pool, index, previous):
        """Shuffled pass `index`, its first rows moved past those `previous` puts in their batch."""
        count, size = self.counts[pool], len(self.pools[pool])
        rows = self._shuffled(pool, index)
        tail = index * size % count  # rows of the previous pass in the batch that straddles both
        if previous is None or not tail:
            return rows
        taken = set(previous[size - tail:].tolist())
        is_free = np.array([row not in taken for row in rows[:count].tolist()])
        first = np.flatnonzero(is_free)[:count - tail]
        rest = np.setdiff1d(np.arange(size), first, assume_unique=True)
        return rows[np.concatenate([first, rest])]

    def batch(self, step):
        """The draws of this rank for global step `step`."""
        draws = []
        for pool in (1, 0):
            count, size = self.counts[pool], len(self.pools[pool])
            for k in range(step * count, (step + 1) * count):
                row = int(self._pass(pool, k // size)[k % size])
                draws.append((row, pool))
        seeds = np.random.default_rng([self.seed, 7919, step]).integers(0, 2**62, size=len(draws))
        draws = [ClipDraw(row, int(s), pool) for (row, pool), s in zip(draws, seeds)]
        return draws[self.rank::self.world_size]

    def __iter__(self):
        while True:
            yield self.batch(self.step)
            self.step += 1


def fixed_batches(rows, labeled, batch_size, seed, rank=0, world_size=1):
    """Deterministic batches over `rows` (validation): every row once, crops fixed by seed.

    labeled: per-row bool. Returns a list of per-rank draw lists (see MixedBatchSampler).
    """
    rows = np.asarray(rows)
    seeds = np.random.default_rng([seed, 104729]).integers(0, 2**62, size=len(rows))
    draws = [ClipDraw(int(r), int(s), int(labeled[r])) for r, s in zip(rows, seeds)]
    batches = [draws[i:i + batch_size] for i in range(0, len(draws), batch_size)]
    # Every process must hold the same number of views for the gather: trim the remainder.
    batches = [b[:len(b) - len(b) % world_size] for b in batches]
    return [b[rank::world_size] for b in batches if len(b) >= 2 * world_size]


def build_loaders(manifest, columns, any_labeled, labeled_rows, unlabeled_rows, worker_chains, step, args, device,
                  rank):
    """The run's data: an endless iterator of mixed training batches from global step `step`,
    the validation loader (None without val rows), and the folder where workers note their file.

    worker_chains: augmentation applied in the workers (None: on the device). args: the
    run's flags (views, clip_samples, sample_rate, resample_on, workers, batch_size,
    labeled_per_batch, seed, world_size, grad_accum, val_batches, out).
    Returns (loader, val_loader, status_dir).
    """
    status_dir = os.path.join(args.out, "workers", str(rank))
    # Worker-side augmentation needs audio at the training rate, so the workers resample too.
    resample_in_workers = args.resample_on == "workers" or worker_chains is not None
    dataset = ClipDataset(manifest["path"], columns, {1: labeled_rows, 0: unlabeled_rows}, args.views,
                          args.clip_samples, args.sample_rate, worker_chains, status_dir if args.workers else None,
                          resample_in_workers)

    def make_loader(batches):
        return torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=args.workers, pin_memory=device.type == "cuda",
            collate_fn=collate_clips, worker_init_fn=safety.ignore_interrupts,
            persistent_workers=args.workers > 0 and not isinstance(batches, list),
            prefetch_factor=4 if args.workers else None)

    # One sampler step per micro-batch: --grad-accum k reads k batches per optimizer step.
    sampler = MixedBatchSampler(labeled_rows, unlabeled_rows, args.batch_size, args.labeled_per_batch, args.seed,
                                rank, args.world_size, start_step=step * args.grad_accum)
    val_rows = np.flatnonzero(manifest["split"].to_numpy() == "val")
    # Validation measures the objective the run trains on: labels only where batches hold them (b_s > 0).
    val_labeled = any_labeled if args.labeled_per_batch > 0 else np.zeros_like(any_labeled)
    val_batches = fixed_batches(val_rows, val_labeled, args.batch_size, args.seed, rank, args.world_size)
    val_loader = make_loader(val_batches[:args.val_batches]) if val_batches else None
    return iter(make_loader(sampler)), val_loader, status_dir


# ---------------------------------------------------------------- pre-decoded cache
# The writer of the cache format sits here, beside CachedAudio and open_audio that read it:
# one file defines the format, and `python datasets.py cache` is its command.

def cache_name(source, size, mtime_ns, sample_rate):
    """The cache file name of one version of a source: HASH-RATEhz.npy.

    HASH is a SHA-256 of the source's path, size, modification time and the rate, so a
    changed source gets a new file and is decoded again; the rate ends the name, where
    CachedAudio reads it.
    """
    key = f"{source}\0{size}\0{mtime_ns}\0{sample_rate}"
    return f"{hashlib.sha256(key.encode('utf-8')).hexdigest()[:20]}-{sample_rate}hz.npy"


def cache_file_is_whole(path, samples=None):
    """Whether `path` is a readable int16 mono .npy (of `samples` samples, when given)."""
    try:
        data = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False  # missing, truncated (shorter than its header says) or not a .npy at all
    return data.dtype == np.int16 and data.ndim == 1 and (samples is None or len(data) == samples)


def _cache_one(task):
    """Decode, mix to mono, resample and store one file as int16 .npy: (row, error or None, samples)."""
    row, source, target, sample_rate = task
    try:
        with decoder_messages(source), open_audio(source) as f:
            audio, source_rate = f.read(-1, dtype="float32", always_2d=True), f.samplerate
        if not len(audio):
            raise AudioError(f"{source}: empty audio")
        wave = _resample(audio.mean(1, keepdims=True).T, source_rate, sample_rate)[0]  # [T]
        if not torch.isfinite(wave).all():
            raise AudioError(f"{source}: audio holds NaN or Inf samples")
        pcm = (wave.clamp(-1, 32767 / 32768) * 32768).round().to(torch.int16).numpy()
    except (AudioError, sf.LibsndfileError, RuntimeError, OSError) as error:
        return row, str(error).splitlines()[0], 0
    safety.write_file(target, lambda f: np.save(f, pcm), "rerun the same command: it continues")
    return row, None, len(pcm)


def read_cache_info(path):
    """cache.json as a dict ({} when absent or damaged: every entry is then checked on its file)."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def write_cache(csv_paths, folder, sample_rate, workers=2, log=print):
    """Pre-decode every file of the manifests once, for crops with no decoding at all.

    Each file becomes folder/audio/HASH-RATEhz.npy (cache_name: int16, mono, at
    `sample_rate`; int16 keeps the error under 2e-5), and folder/manifest.csv repeats the
    manifests' rows with `path` pointing at the cache (`source_path` keeps the original).
    An entry is tied to its source's path, size and modification time and carries its
    rate in its name: a changed source is decoded again (its old file removed), a damaged
    or truncated file is rebuilt, and whole entries are kept, so an interrupted run
    continues. folder/cache.json records the rate and the entries; a folder holding
    another rate is refused. The folder is locked (safety.FolderLock) while written.
    Unreadable files are left out and listed. Returns the new manifest's path.
    """
    manifest = read_manifest(csv_paths)
    flag = f"--out {folder}"
    safety.check_writable(folder, flag)
    with safety.FolderLock(folder, flag, "cache.lock"):
        audio = os.path.join(folder, "audio")
        os.makedirs(audio, exist_ok=True)
        safety.remove_temporaries(audio)
        info_path = os.path.join(folder, CACHE_INFO)
        info = read_cache_info(info_path)
        rates = {int(m.group(1)) for m in map(CACHE_NAME.search, os.listdir(audio)) if m}
        held = info.get("sample_rate") or (rates.pop() if len(rates) == 1 else None)
        if held is not None and held != sample_rate:
            raise utils.UserError(f"{flag} holds audio at {held} Hz, not --sample-rate {sample_rate} Hz; give "
                                  f"--sample-rate {held} or another --out")
        entries = info.get("entries", {}) if held == sample_rate else {}
        safety.write_json(info_path, {"sample_rate": sample_rate, "entries": entries})
        targets, stats, tasks, failed, stale, rebuilt = [], {}, [], {}, set(), 0
        for row, source in enumerate(manifest["path"]):
            problem = file_problem(source)
            if problem:
                failed[row] = f"{source}: {problem}"
                targets.append(None)
                continue
            stats[row] = source_stat = os.stat(source)  # the version decoded, recorded below
            name = cache_name(source, source_stat.st_size, source_stat.st_mtime_ns, sample_rate)
            targets.append(os.path.join(audio, name))
            entry = entries.get(source, {})
            if entry.get("file") not in (None, name):
                stale.add(entry["file"])
            if not cache_file_is_whole(targets[-1], entry.get("samples") if entry.get("file") == name else None):
                rebuilt += os.path.exists(targets[-1]) or entry.get("file") not in (None, name)
                tasks.append((row, source, targets[-1], sample_rate))
        if workers > 1 and len(tasks) > 1:
            with torch.multiprocessing.get_context("spawn").Pool(workers) as pool:
                results = list(pool.imap_unordered(_cache_one, tasks, chunksize=4))
        else:
            results = [_cache_one(task) for task in tasks]
        samples = {}
        for row, error, count in results:
            if error is None:
                samples[row] = count
            else:
                failed[row] = error
        for row, (source, target) in enumerate(zip(manifest["path"], targets)):
            if row in failed:
                continue
            entry, name = entries.get(source, {}), os.path.basename(target)
            if row not in samples:
                samples[row] = entry["samples"] if entry.get("file") == name and "samples" in entry else \
                    len(np.load(target, mmap_mode="r"))
            entries[source] = {"file": name, "size": stats[row].st_size, "mtime_ns": stats[row].st_mtime_ns,
                               "samples": samples[row]}
        for name in stale - {os.path.basename(t) for t in targets if t}:
            if os.path.exists(os.path.join(audio, name)):
                os.remove(os.path.join(audio, name))
        safety.write_json(info_path, {"sample_rate": sample_rate, "entries": entries})
        out = manifest.drop(columns=["source", "source_row"]).rename(columns={"path": "source_path"})
        out.insert(0, "path", [os.path.relpath(t, folder) if t else "" for t in targets])
        keep = [row for row in range(len(out)) if row not in failed]
        out_csv = safety.write_csv(os.path.join(folder, "manifest.csv"), out.iloc[keep])
    log(f"cached {len(tasks) - len(failed.keys() & {t[0] for t in tasks})} new files ({len(manifest) - len(tasks)} "
        f"already there; {rebuilt} of the new ones rebuilt: damaged, or their source changed) at {sample_rate} Hz in "
        f"{folder}; {len(failed)} unreadable left out")
    for error in list(failed.values())[:10]:
        log(f"  {error}")
    return out_csv


# ---------------------------------------------------------------- folders to manifests

SCAN_CACHE = os.path.join(".cache", "scans")
# The settings a folder given as --train-csv / --csv is scanned with (see manifest_or_scan).
AUTO_SPLIT = (0.8, 0.1, 0.1)
GROUP_BY_FILE = "file"  # scan --group-by file: every file its own group
AUTO_LABEL_PREFIX = "folder"


def folder_parts(relative):
    """The folder names of a path relative to the scanned folder, without the file name."""
    return relative.replace(os.sep, "/").split("/")[:-1]


def folder_level(relative, level):
    """Folder `level` of a relative path: 1 the first folder below the scanned one, -1 the
    file's own folder, -2 the one above it. Returns "" when the path is not that deep."""
    parts = folder_parts(relative)
    index = level - 1 if level > 0 else len(parts) + level
    return parts[index] if 0 <= index < len(parts) else ""


def group_key(relative, level):
    """The folder path down to `level` (folder_level's numbering): files of one album under
    two artists stay two groups. Files not that deep group by the folders they have.
    level "file" (GROUP_BY_FILE): the file's own path, so that every file is its own group."""
    if level == GROUP_BY_FILE:
        return relative.replace(os.sep, "/")
    parts = folder_parts(relative)
    end = level if level > 0 else len(parts) + level + 1
    return "/".join(parts[:max(0, min(end, len(parts)))])


def parse_folder_labels(specs):
    """["genre=1", "album=-1"] -> [("genre", 1), ("album", -1)]; UserError on a bad spec."""
    pairs = []
    for spec in specs:
        name, _, level = spec.partition("=")
        if not name.strip() or not re.fullmatch(r"-?[1-9]\d*", level.strip()):
            raise utils.UserError(f"--label-from-folder {spec!r}: write COLUMN=LEVEL, e.g. genre=1 (the first "
                                  f"folder below DIR) or album=-1 (the file's own folder)")
        pairs.append((name.strip(), int(level)))
    return pairs


def parse_fractions(text):
    """"0.8,0.1,0.1" -> (0.8, 0.1, 0.1) for train, val, test; UserError unless they sum to 1."""
    try:
        fractions = tuple(float(part) for part in text.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise utils.UserError(f"--split {text!r}: give three shares for train,val,test that sum to 1, "
                              f"e.g. 0.8,0.1,0.1")
    return fractions


def assign_splits(groups, fractions, seed=0, strata=None):
    """A split per file from its group, so that no group straddles train/val/test.

    groups: per-file group keys; fractions: shares of train, val, test. Groups are taken
    in the order of a hash of (seed, key), and each goes to the split furthest below
    its share of the files assigned so far (its own files included): the result depends
    only on the keys, their sizes and the seed, and the shares hold to within about one
    group.
    strata: optional per-file labels (`scan --stratify`): each label's groups are split
    on their own, in the same shares, and the first of them goes to train, so that every
    label is in train and in val and test as far as its groups allow. A group holding
    files of several labels counts under its most frequent one (the first in sorted
    order on a tie), as a group is never split.
    Returns a list of split names, one per file.
    """
    sizes, label_counts = {}, {}
    for index, key in enumerate(groups):
        sizes[key] = sizes.get(key, 0) + 1
        if strata is not None:
            counts = label_counts.setdefault(key, {})
            counts[strata[index]] = counts.get(strata[index], 0) + 1
    stratum = {key: min(label_counts[key], key=lambda label: (-label_counts[key][label], label))
               if strata is not None else "" for key in sizes}
    order = sorted(sizes, key=lambda k: hashlib.sha1(f"{seed}:{k}".encode()).hexdigest())
    chosen = {}
    for label in sorted(set(stratum.values())):
        counts, total = [0, 0, 0], 0
        for rank, key in enumerate(key for key in order if stratum[key] == label):
            total += sizes[key]
            deficits = [fraction * total - count for fraction, count in zip(fractions, counts)]
            best = max((s for s in range(3) if fractions[s] > 0), key=lambda s: deficits[s])
            if strata is not None and rank == 0:
                best = 0  # every label in train
            counts[best] += sizes[key]
            chosen[key] = SPLITS[best]
    return [chosen[key] for key in groups]


def parse_group_by(text):
    """--group-by: "file" (GROUP_BY_FILE) or a folder level as --label-from-folder numbers
    them ("1", "-1"); UserError otherwise."""
    if text.strip().lower() == GROUP_BY_FILE:
        return GROUP_BY_FILE
    if not re.fullmatch(r"-?[1-9]\d*", text.strip()):
        raise utils.UserError(f"--group-by {text!r}: give a folder level (1 the first folder below DIR, -1 the "
                              f"file's own folder) or file (every file its own group)")
    return int(text)


VANISHED = "vanished during the scan"


def probe_audio(path, min_seconds):
    """Open one file as scan does: (info dict, None) if usable, else (None, reason).

    Only a regular file is opened (file_problem names the rest); a file listed by the
    walk and gone since is "vanished during the scan". Reads the header and decodes the
    first second, so a file with a valid header but undecodable data is caught too, at
    little cost. info: seconds, sample_rate, channels and size (bytes).
    """
    is_audio_name = AUDIO_NAME.search(path) is not None  # an audio file name: a failure is "unreadable"
    problem = file_problem(path)
    if problem:
        return None, VANISHED if problem == "does not exist" else problem
    try:
        with decoder_messages(path), sf.SoundFile(path) as f:
            rate, frames, channels = f.samplerate, f.frames, f.channels
            f.read(min(max(frames, 0), rate), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as error:
        if not os.path.lexists(path):
            return None, VANISHED
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        return None, f"unreadable ({reason})" if is_audio_name else "not audio"
    seconds = frames / rate if rate else 0.0
    if frames <= 0:
        return None, "empty"
    if seconds < min_seconds:
        return None, f"too short ({seconds:.2f} s < --min-seconds {min_seconds:g})"
    return {"seconds": round(seconds, 3), "sample_rate": rate, "channels": channels,
            "size": os.stat(path).st_size}, None


def join_key(value, join_on):
    """What --join-on compares: a file's stem, name, or path below the scanned folder, in NFC."""
    value = nfc(value.strip().replace("\\", "/"))
    if join_on == "path":
        return os.path.normpath(value).replace(os.sep, "/")
    name = os.path.basename(value)
    return name if join_on == "name" else os.path.splitext(name)[0]


def join_labels(frame, relatives, labels_csv, join_on, join_column):
    """Add the columns of the user's CSV to a scan's frame, matched by file name or stem.

    relatives: per-row paths relative to the scanned folder. labels_csv: a CSV whose
    `join_column` (default: its first column) names each labeled file; join_on: "stem"
    (file name without extension), "name" (with it) or "path" (relative to the scanned
    folder) says how both sides are compared, in Unicode NFC (a macOS file name in NFD
    matches its row). Files without a row stay unlabeled (empty cells). Returns (frame,
    the keys of CSV rows that matched no file, the number of files sharing a key with
    another).
    """
    if not os.path.lexists(labels_csv):
        raise utils.UserError(f"--labels {labels_csv}: file not found")
    table = read_table(labels_csv)
    join_column = join_column or table.columns[0]
    if join_column not in table.columns:
        raise utils.UserError(f"--join-column {join_column!r} is not a column of {labels_csv} "
                              f"(columns: {list(table.columns)})")
    clash = sorted({"path", "split"} & (set(table.columns) - {join_column}))
    if clash:
        raise utils.UserError(f"{labels_csv}: columns {clash} would overwrite the scan's own; rename them")

    keys = table[join_column].map(lambda value: join_key(value, join_on))
    repeated = sorted(keys[keys.duplicated()].unique())
    if repeated:
        raise utils.UserError(f"{labels_csv}: {len(repeated)} {join_on}(s) appear on several rows, e.g. "
                              f"{repeated[0]!r}; keep one row per file")
    table = table.drop(columns=[join_column]).set_index(keys)
    file_keys = pd.Series([join_key(r, join_on) for r in relatives])
    for column in table.columns:
        frame[column] = [table[column].get(k, "") for k in file_keys]
    unmatched = keys[~keys.isin(set(file_keys))].tolist()
    shared = int((file_keys.duplicated(keep=False) & file_keys.isin(set(table.index))).sum())
    return frame, unmatched, shared


def walk_folder(folder, own_files=()):
    """Every file below `folder`, following linked folders once each.

    Hidden folders (".name") are left out. A folder reached a second time (a link loop,
    or two links to one folder) is compared by (st_dev, st_ino) and not entered again;
    an unreadable folder, or one that vanishes, is listed instead of entered.
    own_files: absolute paths to leave out (the scan's own outputs).
    Returns (names: file paths relative to `folder`, each folder's files in sorted order,
    folders before their subfolders; folders: the relative paths entered; skipped:
    {"path", "reason"} of the folders not entered; linked: the number of linked folders
    entered).
    """
    names, folders, skipped, linked = [], [], [], 0
    seen = {}  # (st_dev, st_ino) -> the relative path it was first entered by
    stack = [("", False)]
    while stack:
        relative, is_link = stack.pop()
        path = os.path.join(folder, relative) if relative else folder
        try:
            info = os.stat(path)
            identity = (info.st_dev, info.st_ino)
            if identity in seen:
                skipped.append({"path": relative, "reason": f"linked folder scanned already (as "
                                                            f"{seen[identity] or '.'}; not entered twice)"})
                continue
            with os.scandir(path) as entries:
                entries = sorted(entries, key=lambda entry: entry.name)
        except FileNotFoundError:
            skipped.append({"path": relative, "reason": f"folder {VANISHED}"})
            continue
        except OSError as error:
            skipped.append({"path": relative, "reason": f"folder not readable ({(error.strerror or '').lower()})"})
            continue
        seen[identity] = relative
        folders.append(relative)
        linked += is_link
        subfolders = []
        for entry in entries:
            child = os.path.join(relative, entry.name) if relative else entry.name
            try:
                is_folder = entry.is_dir()  # follows a link
            except OSError:
                is_folder = False
            if is_folder:
                if not entry.name.startswith("."):
                    subfolders.append((child, entry.is_symlink()))
            elif os.path.join(folder, child) not in own_files:
                names.append(child)
        stack.extend(reversed(subfolders))
    return names, folders, skipped, linked


def find_audio(folder, own_files, min_seconds):
    """Every file below `folder` (walk_folder; hidden ones and `own_files` left out), probed.

    Returns (names: every path relative to folder; rows: {"relative", seconds,
    sample_rate, channels, size} of the readable files; skipped: {"path", "reason"} of
    the rest, the folders not entered included; linked: linked folders followed).
    """
    names, _, skipped, linked = walk_folder(folder, own_files)
    rows = []
    for relative in tqdm(names, desc="scan", unit="file", disable=len(names) < 50):
        if os.path.basename(relative).startswith("."):
            skipped.append({"path": relative, "reason": "hidden file"})
            continue
        info, reason = probe_audio(os.path.join(folder, relative), min_seconds)
        if reason:
            skipped.append({"path": relative, "reason": reason})
        else:
            rows.append({"relative": relative, **info})
    return names, rows, skipped, linked


def find_duplicates(folder, rows, skipped, keep_duplicates):
    """Relative paths of the rows whose bytes equal an earlier row's; each is added to `skipped`.

    A row whose file vanished since it was probed is passed over.
    """
    # Only files of equal size can be equal: hash those alone.
    sizes = {}
    for row in rows:
        sizes.setdefault(row["size"], []).append(row)
    first_of, duplicates = {}, set()
    for same_size in (group for group in sizes.values() if len(group) > 1):
        for row in same_size:
            try:
                digest = utils.file_digest(os.path.join(folder, row["relative"]))
            except FileNotFoundError:
                continue  # vanished since it was probed: scan_folder lists it
            if digest in first_of:
                duplicates.add(row["relative"])
                skipped.append({"path": row["relative"], "reason": f"duplicate of {first_of[digest]}"
                                + (" (kept: --keep-duplicates)" if keep_duplicates else "")})
            else:
                first_of[digest] = row["relative"]
    return duplicates


def scan_folder(folder, out_csv, folder_labels=(), labels_csv=None, join_on="stem", join_column=None, split=None,
                group_by=-1, split_seed=0, min_seconds=0.0, keep_duplicates=False, log=print, stratify=None):
    """Walk `folder` for every file soundfile can read and write a manifest to `out_csv`.

    folder_labels: (column, level) pairs, each folder level (folder_level's numbering)
    becoming a label column. labels_csv, join_on, join_column: see join_labels.
    split: None (no split column) or (train, val, test) shares, assigned per group
    (the folder at `group_by`, by default the file's own folder; "file": each file its
    own group) by assign_splits. stratify: None or a label column; with it each of the
    column's labels is split on its own in the shares, every label in train.
    min_seconds: shorter files are skipped. Exact duplicates (same bytes) keep the first
    path in sorted order unless keep_duplicates. Hidden files and folders (".name") are
    left out; linked folders are followed once each (walk_folder). Only regular files are
    opened (a FIFO or device is skipped with its reason); a file that vanishes during the
    scan is skipped as such. `out_csv`'s folder is checked writable before the walk, and
    both outputs are written whole (safety.write_csv). The manifest has path (relative to
    out_csv's folder), split, the label columns, seconds, sample_rate and channels;
    skipped files go to OUT.skipped.csv (path, reason). Returns a dict with the counts
    that the report prints (linked_folders: the linked folders followed).
    """
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise utils.UserError(f"{folder}: not a folder; give the folder that holds your audio files")
    out_folder = os.path.dirname(os.path.abspath(out_csv))
    safety.check_writable(out_folder, f"--out {out_csv}")
    skipped_csv = os.path.splitext(out_csv)[0] + ".skipped.csv"
    own_files = {os.path.abspath(out_csv), os.path.abspath(skipped_csv)}  # a manifest written inside DIR
    names, rows, skipped, linked = find_audio(folder, own_files, min_seconds)
    duplicates = find_duplicates(folder, rows, skipped, keep_duplicates)
    if not keep_duplicates:
        rows = [row for row in rows if row["relative"] not in duplicates]
    vanished = {row["relative"] for row in rows if not os.path.lexists(os.path.join(folder, row["relative"]))}
    skipped.extend({"path": relative, "reason": VANISHED} for relative in sorted(vanished))
    rows = [row for row in rows if row["relative"] not in vanished]
    if not rows:
        raise utils.UserError(f"{folder}: no readable audio file among {len(names)} files")
    frame = pd.DataFrame({"path": [os.path.relpath(os.path.join(folder, r["relative"]), out_folder).replace(os.sep, "/")
                                   for r in rows]})
    relatives = [r["relative"] for r in rows]
    for column, level in folder_labels:
        frame[column] = [folder_level(r, level) for r in relatives]
    unmatched, shared = [], 0
    if labels_csv:
        frame, unmatched, shared = join_labels(frame, relatives, labels_csv, join_on, join_column)
    if stratify is not None and stratify not in frame.columns:
        raise utils.UserError(f"--stratify {stratify!r}: no such label column; name one given by "
                              f"--label-from-folder or --labels ({', '.join(map(repr, frame.columns[1:])) or 'none'})")
    if stratify is not None and split is None:
        raise utils.UserError(f"--stratify {stratify!r} needs --split TRAIN,VAL,TEST shares")
    if split is not None:
        strata = frame[stratify].astype(str).tolist() if stratify is not None else None
        frame.insert(1, "split", assign_splits([group_key(r, group_by) for r in relatives], split, split_seed, strata))
    for column in ("seconds", "sample_rate", "channels"):
        frame[column] = [r[column] for r in rows]
    safety.write_csv(out_csv, frame)
    safety.write_csv(skipped_csv, pd.DataFrame(skipped, columns=["path", "reason"]))
    return scan_report(folder, out_csv, skipped_csv, len(names), frame, relatives, skipped, linked, unmatched, shared,
                       labels_csv, join_on, split, group_by, stratify, log)


def scan_report(folder, out_csv, skipped_csv, files, frame, relatives, skipped, linked, unmatched, shared, labels_csv,
                join_on, split, group_by, stratify, log):
    """scan_folder's counts as a dict, and its report through `log`: rows, splits, skipped files
    by reason, decoder warnings, labeled rows per column, unmatched label rows, strata."""
    reasons = {}
    for entry in skipped:
        kind = entry["reason"].split(" (")[0].split(" of ")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    splits = frame["split"].value_counts().to_dict() if split is not None else {}
    report = {"manifest": out_csv, "files": files, "rows": len(frame), "skipped": reasons,
              "linked_folders": linked,
              "skipped_csv": skipped_csv, "splits": {s: int(splits.get(s, 0)) for s in SPLITS} if splits else {},
              "unmatched_labels": len(unmatched), "shared_keys": shared,
              "labeled": {c: int((frame[c] != "").sum()) for c in frame.columns
                          if c not in ("path", "split", "seconds", "sample_rate", "channels")}}
    split_text = (" (" + ", ".join(f"{s} {n}" for s, n in report["splits"].items()) + ")") if splits else ""
    skip_text = ", ".join(f"{n} {kind}" for kind, n in sorted(reasons.items())) or "none"
    link_text = f" ({linked} linked folder{'s' * (linked != 1)} followed)" if linked else ""
    log(f"scanned {folder}{link_text}: {files} files, {len(frame)} rows in {out_csv}{split_text}; skipped: "
        f"{skip_text}" + (f" (listed in {skipped_csv})" if skipped else ""))
    for entry in skipped[:10]:
        log(f"  skipped {entry['path']}: {entry['reason']}")
    if len(skipped) > 10:
        log(f"  ... {len(skipped) - 10} more in {skipped_csv}")
    warned = [r for r in relatives if os.path.join(folder, r) in DECODER_WARNINGS]
    report["decoder_warnings"] = len(warned)
    if warned:
        log(f"  {len(warned)} kept file(s) made the decoder print warnings (caught; the audio was decoded), "
            f"e.g. {warned[0]}")
    for column, count in report["labeled"].items():
        log(f"  column {column!r}: {count} of {len(frame)} rows labeled")
    if unmatched:
        dropped = {join_key(entry["path"], join_on) for entry in skipped if entry["reason"].startswith("duplicate")}
        examples = ", ".join(repr(k) + (" (a duplicate left out)" if k in dropped else "") for k in unmatched[:3])
        log(f"  {len(unmatched)} row(s) of {labels_csv} matched no file (compared by {join_on}), e.g. {examples}")
    if shared:
        log(f"  {shared} files share their {join_on} with another file, so one --labels row labels each of them; "
            f"use --join-on path to tell them apart")
    for name, count in report["splits"].items():
        if split[SPLITS.index(name)] > 0 and count == 0:
            log(f"  split {name} got no file: too few groups (folders at level {group_by}) for the shares "
                f"{','.join(f'{f:g}' for f in split)}; try --group-by with a deeper level, or --group-by file")
    if stratify is not None:
        per_label = frame.groupby(frame[stratify].astype(str))["split"].agg(set)
        report["stratified"] = {s: int(sum(s in found for found in per_label)) for s in SPLITS}
        log(f"  stratified by {stratify!r}: {len(per_label)} labels; in train {report['stratified']['train']}, "
            f"val {report['stratified']['val']}, test {report['stratified']['test']}")
        missing = [label for label, found in per_label.items()
                   if any(split[SPLITS.index(s)] > 0 and s not in found for s in SPLITS)]
        if missing:
            log(f"  {len(missing)} label(s) have too few groups to reach every split, e.g. {missing[0]!r}; "
                f"they are in train" + ("" if group_by == GROUP_BY_FILE else "; --group-by file splits by file"))
    return report


def manifest_or_scan(path, out_dir, write=True, log=print):
    """A manifest path as it is, or a folder scanned into a manifest inside `out_dir`.

    A folder is scanned as `python datasets.py scan` does with AUTO_SPLIT shares grouped
    by the file's own folder and each folder level as a column (folder1 the first
    folder below it, folder2 the next, ...). write: False returns the manifest's path
    without scanning (the other processes under torchrun, after the main one wrote it).
    """
    if not os.path.isdir(path):
        return path
    folder = os.path.abspath(path)
    name = re.sub(r"[^\w.-]+", "_", os.path.basename(folder)) or "folder"
    out_csv = os.path.join(out_dir, f"scan-{name}-{hashlib.sha1(folder.encode()).hexdigest()[:8]}.csv")
    if write:
        depth = max(len(relative.split(os.sep)) if relative else 0 for relative in walk_folder(folder)[1])
        levels = [(f"{AUTO_LABEL_PREFIX}{k}", k) for k in range(1, depth + 1)]
        log(f"{path} is a folder: scanning it into {out_csv} (split {','.join(f'{f:g}' for f in AUTO_SPLIT)} by "
            f"the file's folder; columns {', '.join(c for c, _ in levels) or 'none'} from the folder levels); "
            f"run `python datasets.py scan` to choose labels and splits yourself")
        scan_folder(folder, out_csv, folder_labels=levels, split=AUTO_SPLIT, log=log)
    return out_csv


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    scan = commands.add_parser("scan", help="walk a folder of audio files and write a manifest", allow_abbrev=False,
                               description="Walk DIR for every file soundfile can read and write a manifest with "
                                           "paths relative to the CSV; skipped files and duplicates are reported "
                                           "and listed in OUT.skipped.csv.")
    scan.add_argument("folder", metavar="DIR", help="folder of audio files, searched with its subfolders")
    scan.add_argument("--out", required=True, help="manifest to write (CSV); paths are relative to its folder")
    scan.add_argument("--label-from-folder", action="append", default=[], metavar="COLUMN=LEVEL",
                      help="a label column from a folder level, repeatable: 1 the first folder below DIR (e.g. "
                           "artist=1 album=2), -1 the file's own folder, -2 the one above")
    scan.add_argument("--labels", default=None, help="your CSV of labels, joined to the files by --join-on")
    scan.add_argument("--join-on", default="stem", choices=("stem", "name", "path"),
                      help="compare files and --labels rows by file name without extension (stem), with it "
                           "(name), or by the path below DIR (path) (default %(default)s)")
    scan.add_argument("--join-column", default=None,
                      help="column of --labels holding the file name, stem or path (default: its first column)")
    scan.add_argument("--split", default=None, metavar="TRAIN,VAL,TEST",
                      help="shares of files for train, val and test, e.g. 0.8,0.1,0.1 (default: no split column, "
                           "every file train)")
    scan.add_argument("--group-by", default="-1", metavar="LEVEL",
                      help="folder level whose files share a split (numbered as --label-from-folder; default -1, "
                           "the file's own folder, e.g. the album: no album effect across splits), or file (every "
                           "file its own group: to classify tracks by a folder label, e.g. which soundtrack)")
    scan.add_argument("--stratify", default=None, metavar="COLUMN",
                      help="split each label of this label column on its own in the --split shares, every label "
                           "in train (default: no stratification)")
    scan.add_argument("--split-seed", type=int, default=0, help="seed of the split's group order (default 0)")
    scan.add_argument("--min-seconds", type=float, default=0.0,
                      help="skip files shorter than this many seconds (default %(default)s)")
    scan.add_argument("--keep-duplicates", action="store_true",
                      help="keep files whose bytes equal an earlier file's (default: keep the first only)")
    cache = commands.add_parser("cache", help="pre-decode manifests to memory-mapped int16 audio", allow_abbrev=False)
    cache.add_argument("--train-csv", action="append", required=True, help="manifest(s) to cache, repeatable")
    cache.add_argument("--out", required=True, help="cache folder (gets audio/, manifest.csv, cache.json)")
    cache.add_argument("--sample-rate", type=int, default=22050, help="rate to store, the training rate (Hz)")
    cache.add_argument("--workers", type=int, default=2, help="decoding processes")
    args = parser.parse_args(argv)
    if args.command == "scan":
        split = parse_fractions(args.split) if args.split else None
        scan_folder(args.folder, args.out, parse_folder_labels(args.label_from_folder), args.labels, args.join_on,
                    args.join_column, split, parse_group_by(args.group_by), args.split_seed, args.min_seconds,
                    args.keep_duplicates, stratify=args.stratify)
    elif args.command == "cache":
        print(write_cache(args.train_csv, args.out, args.sample_rate, args.workers))


if __name__ == "__main__":
    utils.run_cli(main)
