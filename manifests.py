"""Turn the official annotation files of the paper's public data sets into CSV manifests.

One job: read a data set's official files as they are published, apply its standard
split, write the project's manifest (the format datasets.py reads): `path` (absolute
audio path), `split` (train, val or test) and label columns; an empty label cell means
unlabeled. Audio that the annotations reference but that is absent (or empty) is
dropped, and the count printed.

    python manifests.py magnatagatune --root data/magnatagatune --out manifests/mtat.csv
    python manifests.py giantsteps-key --root data/giantsteps --out manifests/gs_key.csv

Every data set found under one data root, plus the probe table with the authors'
per-task head and patience (tasks.csv, the format of `probe.py --tasks`):

    python manifests.py all --root data --out manifests/
    python probe.py --checkpoint runs/semisupcon --tasks manifests/tasks.csv --out runs/table.json

It reads text files only (no GPU), so there is no one-GPU or torchrun form. Per data
set: the files it reads and their layout under --root are in BUILDERS' functions and
docs/datasets.md; the label columns and tasks are in LABELS (and `--help`). A missing
or malformed official file is a user error: `manifests.py: error: ...`, exit status 2.
"""
import argparse
import csv
import functools
import hashlib
import json
import os
import re
import sys

import pandas as pd
import yaml

import safety
import utils

SPLITS = ("train", "val", "test")
NOTE_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
# Tried, in this order, when the referenced file is absent: people often convert a whole
# data set to WAV or FLAC and keep the names.
AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".au")
# Share of each class (or singer) held out for test and for val where a data set has no
# official val or test split, as the paper's evaluation code does (10 %, 10 %).
HOLDOUT_FRACTION = 0.1
MTAT_TOP_TAGS = 50
MEDLEYDB_TOP_INSTRUMENTS = 20
# Stems that are not one instrument; the paper's MedleyDB task leaves them out.
MEDLEYDB_EXCLUDED = ("Main System", "Unlabeled", "fx/processed sound", "auxiliary percussion")
# Test singers of VocalSet's technique split (Wilkins et al., ISMIR 2018), used when the
# archive's test_singers_technique.txt is not under --root.
VOCALSET_TEST_SINGERS = ("female2", "female8", "male3", "male5", "male10")
# GiantSteps MTG key train/val split by artist as in JukeMIR and MARBLE: an artist goes to
# val when SHA-1(artist lower-cased) mod 116 >= 100, about 14 % of artists.
GIANTSTEPS_ARTIST_BUCKETS = (100, 16)
# EmoMusic development songs: val when SHA-1(normalized artist) mod 10 >= 8 (JukeMIR, MARBLE).
EMOMUSIC_ARTIST_BUCKETS = (8, 2)

# Label columns each manifest carries: (--label-column, --task, --label-kind) for probe.py
# and train.py; the kind tells datasets.py to read the cell as a key, a pitch or a pitch class.
LABELS = {
    "magnatagatune": [("tags", "multilabel", "generic")],
    "magnatagatune-all": [("tags", "multilabel", "generic")],
    "mtg-jamendo-top50": [("tags", "multilabel", "generic")],
    "mtg-jamendo-genre": [("tags", "multilabel", "generic")],
    "mtg-jamendo-instrument": [("tags", "multilabel", "generic")],
    "mtg-jamendo-moodtheme": [("tags", "multilabel", "generic")],
    "gtzan": [("genre", "multiclass", "generic")],
    "nsynth": [("pitch", "multiclass", "pitch"), ("pitch_class", "multiclass", "pitch_class"),
               ("instrument_family", "multiclass", "generic")],
    "giantsteps-key": [("key", "multiclass", "key")],
    "vocalset-singer": [("singer", "multiclass", "generic"), ("technique", "multiclass", "generic")],
    "vocalset-technique": [("technique", "multiclass", "generic"), ("singer", "multiclass", "generic")],
    "emomusic": [("arousal,valence", "regression", "generic"), ("arousal", "regression", "generic"),
                 ("valence", "regression", "generic")],
    "medleydb": [("instrument", "multiclass", "generic")],
}


# Folder of each data set under the root of `manifests.py all` (and the default --root,
# data/FOLDER); data sets that share official files share a folder.
DATA_FOLDERS = {
    "magnatagatune": "magnatagatune", "magnatagatune-all": "magnatagatune",
    "mtg-jamendo-top50": "mtg-jamendo", "mtg-jamendo-genre": "mtg-jamendo",
    "mtg-jamendo-instrument": "mtg-jamendo", "mtg-jamendo-moodtheme": "mtg-jamendo",
    "gtzan": "gtzan", "nsynth": "nsynth", "giantsteps-key": "giantsteps",
    "vocalset-singer": "vocalset", "vocalset-technique": "vocalset",
    "emomusic": "emomusic", "medleydb": "medleydb",
}
# The paper's downstream table, one probe per row: (manifest, --label-column, probe name,
# head, patience in epochs). Head and patience are the authors' per-task settings (their
# config/finetuning/cross-dataset/*.yaml): a linear head for GiantSteps, EmoMusic, MedleyDB
# and VocalSet, an MLP otherwise; patience MTAT 15, MTG 7, GTZAN / GiantSteps / VocalSet 50,
# NSynth 2, MedleyDB 10, EmoMusic 200. Task and label kind come from LABELS.
PAPER_PROBES = [
    ("magnatagatune", "tags", "mtat-top50", "mlp", 15),
    ("magnatagatune-all", "tags", "mtat-all", "mlp", 15),
    ("mtg-jamendo-top50", "tags", "mtg-top50", "mlp", 7),
    ("mtg-jamendo-genre", "tags", "mtg-genre", "mlp", 7),
    ("mtg-jamendo-instrument", "tags", "mtg-instrument", "mlp", 7),
    ("mtg-jamendo-moodtheme", "tags", "mtg-moodtheme", "mlp", 7),
    ("gtzan", "genre", "gtzan", "mlp", 50),
    ("giantsteps-key", "key", "giantsteps-key", "linear", 50),
    ("nsynth", "pitch", "nsynth-pitch", "mlp", 2),
    ("nsynth", "instrument_family", "nsynth-instrument-family", "mlp", 2),
    ("vocalset-singer", "singer", "vocalset-singer", "linear", 50),
    ("vocalset-technique", "technique", "vocalset-technique", "linear", 50),
    ("medleydb", "instrument", "medleydb", "linear", 10),
    ("emomusic", "arousal,valence", "emomusic", "linear", 200),
]
TASKS_COLUMNS = ["name", "csv", "label_column", "task", "label_kind", "head", "patience"]


class MissingFileError(utils.UserError, FileNotFoundError):
    """An official file or folder is not where the data set's layout puts it."""


class FormatError(utils.UserError, ValueError):
    """An official file that cannot be read as its format; the message names file and line."""


def _label_flags(column, task, kind):
    flags = f"--label-column {column} --task {task}"
    return flags + (f" --label-kind {kind}" if kind != "generic" else "")


# ---------------------------------------------------------------- small readers

def _require(path, name):
    """Return `path` if it is a file, else raise MissingFileError naming it."""
    if not os.path.isfile(path):
        raise MissingFileError(f"{name}: expected the official file {path}")
    return path


def _read_rows(path, delimiter, quoted=False):
    """Yield (line number, fields) for each non-blank row of a delimited text file.

    quoted: fields may be quoted (csv rules); off for the tab-separated files, whose song
    titles may begin with a quote character. Line numbers count from 1 as an editor shows
    them, so error messages can point at the row.
    """
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE)
        for fields in reader:
            if any(field.strip() for field in fields):
                yield reader.line_num, fields


def _read_table(path, delimiter, required, quoted=False):
    """Read a delimited file with a header -> [(line, {column: stripped value})].

    required: column names that must be in the header (compared after stripping, since
    several official files pad their header with spaces). A row must reach the last
    required column; missing trailing fields read as "".
    """
    rows = list(_read_rows(path, delimiter, quoted))
    if not rows:
        raise FormatError(f"{path}: the file is empty")
    header = [name.strip() for name in rows[0][1]]
    missing = [name for name in required if name not in header]
    if missing:
        raise FormatError(f"{path}, line {rows[0][0]}: header lacks column(s) {missing}; it has {header}")
    width = 1 + max(header.index(name) for name in required)
    table = []
    for line, fields in rows[1:]:
        if len(fields) < width:
            raise FormatError(f"{path}, line {line}: {len(fields)} fields, expected at least {width} "
                             f"(up to column {header[width - 1]!r})")
        fields = fields + [""] * (len(header) - len(fields))
        table.append((line, {name: value.strip() for name, value in zip(header, fields)}))
    return table


def _sha1_int(text):
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def _hash_split(keys, test_fraction, val_fraction):
    """Deterministic split of one group of items: {key: split}.

    keys: strings that identify the items (paths relative to the data root, so the split
    does not depend on where the data lives). Items are ordered by the SHA-1 of their key;
    the first test_fraction * n (rounded half up) go to test, the next val_fraction * n to
    val, the rest to train.
    """
    ordered = sorted(keys, key=lambda key: (_sha1_int(key), key))
    num_test = int(test_fraction * len(ordered) + 0.5)
    num_val = int(val_fraction * len(ordered) + 0.5)
    splits = {}
    for index, key in enumerate(ordered):
        splits[key] = "test" if index < num_test else "val" if index < num_test + num_val else "train"
    return splits


def canonical_key(text):
    """Key name in any common spelling -> canonical "C# minor" form (sharps).

    Accepts a tonic letter, any number of accidentals (#, b, ♯, ♭) and major/minor/maj/min,
    e.g. "Bb major" -> "A# major", "c# minor" -> "C# minor". Raises ValueError otherwise.
    """
    match = re.fullmatch(r"\s*([A-Ga-g])([#♯b♭]*)\s*((?i:major|minor|maj|min))\s*", text)
    if not match:
        raise ValueError(f"cannot read a key from {text!r} (expected e.g. 'C# minor')")
    letter, accidentals, mode = match.groups()
    pitch_class = NOTE_NAMES.index(letter.upper())
    pitch_class += sum(1 if sign in "#♯" else -1 for sign in accidentals)
    mode = "major" if mode.lower().startswith("maj") else "minor"
    return f"{NOTE_NAMES[pitch_class % 12]} {mode}"


def note_name(midi):
    """MIDI note number -> note name with octave in scientific pitch notation (60 -> "C4")."""
    return f"{NOTE_NAMES[midi % 12]}{midi // 12 - 1}"


# ---------------------------------------------------------------- audio checks

def _find_audio(path, extra=()):
    """First non-empty file among `path`, `extra` and `path` under other audio extensions."""
    stem = os.path.splitext(path)[0]
    for candidate in (path, *extra, *(stem + ext for ext in AUDIO_EXTENSIONS)):
        if os.path.isfile(candidate) and os.path.getsize(candidate) > 0:
            return candidate
    return None


def _pick_base(bases, relpaths, extra=None):
    """The first folder in `bases` under which some of the referenced audio exists.

    relpaths: audio paths relative to the base, as the annotations give them; about 50
    spread over the list are probed. extra: optional function path -> more candidates.
    Falls back to bases[0], the documented layout, so that error messages name it.
    """
    sample = relpaths[:: max(1, len(relpaths) // 50)]
    for base in bases:
        for relpath in sample:
            path = os.path.join(base, relpath)
            if _find_audio(path, extra(path) if extra else ()):
                return base
    return bases[0]


def _keep_present(name, rows, extra=None):
    """Drop rows whose audio is absent or empty, print the counts; return the kept rows.

    rows: dicts with an absolute "path"; a row whose file exists only under another audio
    extension (or a name from `extra(path)`) gets that path. Raises FileNotFoundError when
    no referenced file exists at all, which means --root points at the wrong folder.
    """
    kept, absent, empty, substituted = [], [], [], 0
    for row in rows:
        found = _find_audio(row["path"], extra(row["path"]) if extra else ())
        if found is None:
            (empty if os.path.isfile(row["path"]) else absent).append(row["path"])
            continue
        substituted += found != row["path"]
        kept.append({**row, "path": found})
    if rows and not kept:
        raise MissingFileError(f"{name}: none of the {len(rows)} referenced audio files exists, "
                                f"e.g. {rows[0]['path']}; check --root and the layout in docs/datasets.md")
    if absent:
        print(f"{name}: dropped {len(absent)} of {len(rows)} rows whose audio is absent, e.g. {absent[0]}")
    if empty:
        print(f"{name}: dropped {len(empty)} of {len(rows)} rows whose audio file is empty, e.g. {empty[0]}")
    if substituted:
        print(f"{name}: {substituted} audio files found under another name or extension than the annotations give")
    return kept


def _frame(rows, label_columns):
    """Rows (dicts) -> manifest DataFrame with columns path, split, *label_columns."""
    return pd.DataFrame([{column: row[column] for column in ("path", "split", *label_columns)} for row in rows],
                        columns=["path", "split", *label_columns])


# ---------------------------------------------------------------- MagnaTagATune

def build_magnatagatune(root, top_tags=MTAT_TOP_TAGS):
    """MagnaTagATune tags with the common 12/1/3 folder split.

    Reads ROOT/annotations_final.csv (tab-separated, quoted: clip_id, 188 tag columns of
    0/1, mp3_path) and audio ROOT/<mp3_path> (or ROOT/mp3/<mp3_path>). Split by the
    mp3 folder: 0-b train, c val, d-f test. top_tags: keep the most frequent tags over the
    whole file (ties by column order), or None for all tags. Clips with none of the kept
    tags stay, with an empty `tags` cell (unlabeled).
    Returns columns path, split, tags (";"-joined, in the file's column order).
    """
    name = "magnatagatune" if top_tags else "magnatagatune-all"
    root = os.path.abspath(root)
    csv_path = _require(os.path.join(root, "annotations_final.csv"), name)
    rows = list(_read_rows(csv_path, "\t", quoted=True))
    if not rows:
        raise FormatError(f"{csv_path}: the file is empty")
    header_line, header = rows[0]
    if header[0].strip() != "clip_id" or header[-1].strip() != "mp3_path":
        raise FormatError(f"{csv_path}, line {header_line}: expected a header clip_id, <tags>, mp3_path")
    tag_names = [tag.strip() for tag in header[1:-1]]
    clips, counts = [], [0] * len(tag_names)
    for line, fields in rows[1:]:
        if len(fields) != len(header):
            raise FormatError(f"{csv_path}, line {line}: {len(fields)} fields, the header has {len(header)}")
        values = [value.strip() for value in fields[1:-1]]
        for tag, value in zip(tag_names, values):
            if value not in ("0", "1"):
                raise FormatError(f"{csv_path}, line {line}: tag {tag!r} is {value!r}, expected 0 or 1")
        mp3_path = fields[-1].strip()
        folder = mp3_path.split("/")[0]
        if len(folder) != 1 or folder not in "0123456789abcdef":
            raise FormatError(f"{csv_path}, line {line}: mp3_path {mp3_path!r} is not in a folder 0-f")
        flags = [value == "1" for value in values]
        counts = [count + flag for count, flag in zip(counts, flags)]
        split = "train" if folder in "0123456789ab" else "val" if folder == "c" else "test"
        clips.append({"mp3_path": mp3_path, "split": split, "flags": flags})
    if top_tags:
        ranked = sorted(range(len(tag_names)), key=lambda index: (-counts[index], index))
        kept_tags = set(ranked[:top_tags])
    else:
        kept_tags = set(range(len(tag_names)))
    base = _pick_base([root, os.path.join(root, "mp3")], [clip["mp3_path"] for clip in clips])
    records = [{"path": os.path.join(base, clip["mp3_path"]), "split": clip["split"],
                "tags": ";".join(tag_names[i] for i, flag in enumerate(clip["flags"]) if flag and i in kept_tags)}
               for clip in clips]
    records = _keep_present(name, records)
    untagged = sum(not record["tags"] for record in records)
    if untagged:
        print(f"{name}: {untagged} clips have none of the {len(kept_tags)} tags and are left unlabeled")
    return _frame(records, ["tags"])


# ---------------------------------------------------------------- MTG-Jamendo

MTG_JAMENDO_HEADER = ["TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS"]


def _jamendo_low_quality(path):
    # The low-quality audio release names the same track NN/ID.low.mp3.
    return [path[:-len(".mp3")] + ".low.mp3"] if path.endswith(".mp3") else []


def build_mtg_jamendo(root, subset):
    """MTG-Jamendo auto-tagging subsets with the official split-0.

    Reads ROOT/data/splits/split-0/autotagging_<subset>-{train,validation,test}.tsv (the
    repository's files: TRACK_ID, ARTIST_ID, ALBUM_ID, PATH, DURATION, then one tab-separated
    field per tag) and audio ROOT/audio/<PATH> (also tried: ROOT/mp3, ROOT; the low-quality
    NN/ID.low.mp3 when NN/ID.mp3 is absent). subset: top50tags, genre, instrument or
    moodtheme. Tags keep their category prefix (genre---rock, mood/theme---happy) in every
    subset, so tag names never collide between categories.
    Returns columns path, split, tags (";"-joined, in the file's order).
    """
    name = f"mtg-jamendo-{subset.replace('tags', '')}"
    root = os.path.abspath(root)
    folder = os.path.join(root, "data", "splits", "split-0")
    files = {split: _require(os.path.join(folder, f"autotagging_{subset}-{official}.tsv"), name)
             for split, official in (("train", "train"), ("val", "validation"), ("test", "test"))}
    tracks = []
    for split, tsv_path in files.items():
        rows = list(_read_rows(tsv_path, "\t"))
        if not rows or [field.strip() for field in rows[0][1][:6]] != MTG_JAMENDO_HEADER:
            raise FormatError(f"{tsv_path}, line 1: expected the header {MTG_JAMENDO_HEADER}")
        for line, fields in rows[1:]:
            tags = [tag.strip() for tag in fields[5:] if tag.strip()]
            if len(fields) < 6 or not tags or not fields[3].strip():
                raise FormatError(f"{tsv_path}, line {line}: expected TRACK_ID, ARTIST_ID, ALBUM_ID, PATH, "
                                 f"DURATION and at least one tag")
            tracks.append({"relpath": fields[3].strip(), "split": split, "tags": ";".join(tags)})
    bases = [os.path.join(root, "audio"), os.path.join(root, "mp3"), root]
    base = _pick_base(bases, [track["relpath"] for track in tracks], _jamendo_low_quality)
    records = [{"path": os.path.join(base, track["relpath"]), "split": track["split"], "tags": track["tags"]}
               for track in tracks]
    return _frame(_keep_present(name, records, _jamendo_low_quality), ["tags"])


# ---------------------------------------------------------------- GTZAN

# Where the fault-filtered split lists are found, in this order: ROOT itself (the names of
# coreyker/dnn-mgr and jongpillee/music_dataset_split) or a copy of the SemiSupCon
# repository's data/gtzan/ folder; the val list is valid_filtered.txt or val_filtered.txt.
GTZAN_LIST_FOLDERS = ("", os.path.join("data", "gtzan"))
GTZAN_VAL_NAMES = ("valid", "val")


def _gtzan_lists(root):
    """{split: path of its list} for the first folder of GTZAN_LIST_FOLDERS holding the lists."""
    for folder in GTZAN_LIST_FOLDERS:
        folder = os.path.join(root, folder)
        if not os.path.isfile(os.path.join(folder, "train_filtered.txt")):
            continue
        val_lists = [os.path.join(folder, f"{name}_filtered.txt") for name in GTZAN_VAL_NAMES]
        val_lists = [path for path in val_lists if os.path.isfile(path)]
        if not val_lists:
            raise MissingFileError(f"gtzan: expected the official file {folder}/valid_filtered.txt "
                                   f"(or val_filtered.txt) next to train_filtered.txt")
        if len(val_lists) == 2:
            with open(val_lists[0], "rb") as first, open(val_lists[1], "rb") as second:
                if first.read().split() != second.read().split():
                    raise FormatError(f"gtzan: {val_lists[0]} and {val_lists[1]} list different files; "
                                      f"keep the one of the split you want")
        return {"train": os.path.join(folder, "train_filtered.txt"), "val": val_lists[0],
                "test": _require(os.path.join(folder, "test_filtered.txt"), "gtzan")}
    raise MissingFileError(f"gtzan: expected the official file {root}/train_filtered.txt (or "
                           f"{root}/data/gtzan/train_filtered.txt, as the SemiSupCon repository ships it)")


def build_gtzan(root):
    """GTZAN genres with the fault-filtered split of Kereliuk et al. (2015).

    Reads the split lists {train,valid,test}_filtered.txt from ROOT (as in
    coreyker/dnn-mgr and jongpillee/music_dataset_split) or {train,val,test}_filtered.txt
    from ROOT/data/gtzan/ (as the SemiSupCon repository ships them); one
    "blues/blues.00000.wav" per line. Audio under ROOT/genres/, ROOT/genres_original/,
    ROOT/Data/genres_original/ (the Kaggle copy) or ROOT/ (the .au of the original
    archive is found as well).
    Returns columns path, split, genre (the listed file's folder).
    """
    root = os.path.abspath(root)
    entries = []
    for split, list_path in _gtzan_lists(root).items():
        for line, fields in _read_rows(list_path, "\t"):
            relpath = fields[0].strip()
            parts = relpath.split("/")
            if len(fields) != 1 or len(parts) != 2 or not all(parts):
                raise FormatError(f"{list_path}, line {line}: expected one '<genre>/<file>' per line, got {fields}")
            entries.append({"relpath": relpath, "split": split, "genre": parts[0]})
    bases = [os.path.join(root, "genres"), os.path.join(root, "genres_original"),
             os.path.join(root, "Data", "genres_original"), root]
    base = _pick_base(bases, [entry["relpath"] for entry in entries])
    records = [{"path": os.path.join(base, entry["relpath"]), "split": entry["split"], "genre": entry["genre"]}
               for entry in entries]
    return _frame(_keep_present("gtzan", records), ["genre"])


# ---------------------------------------------------------------- NSynth

def build_nsynth(root):
    """NSynth notes with the official train/valid/test split.

    Reads ROOT/nsynth-{train,valid,test}/examples.json (note_str -> {pitch,
    instrument_family_str, ...}) and audio ROOT/nsynth-<split>/audio/<note_str>.wav.
    Returns columns path, split, pitch (note name with octave, MIDI 60 = "C4"),
    pitch_class ("C".."B", sharps) and instrument_family (e.g. "bass").
    """
    root = os.path.abspath(root)
    records = []
    for split, official in (("train", "train"), ("val", "valid"), ("test", "test")):
        folder = os.path.join(root, f"nsynth-{official}")
        json_path = _require(os.path.join(folder, "examples.json"), "nsynth")
        with open(json_path, encoding="utf-8-sig") as handle:
            try:
                examples = json.load(handle)
            except json.JSONDecodeError as error:
                raise FormatError(f"{json_path}, line {error.lineno}: not valid JSON ({error.msg})") from None
        if not isinstance(examples, dict):
            raise FormatError(f"{json_path}: expected an object from note_str to note attributes")
        for note_str, note in examples.items():
            pitch = note.get("pitch") if isinstance(note, dict) else None
            family = note.get("instrument_family_str") if isinstance(note, dict) else None
            if not isinstance(pitch, int) or not 0 <= pitch <= 127 or not isinstance(family, str) or not family:
                raise FormatError(f"{json_path}: note {note_str!r} lacks an integer 'pitch' (0-127) or "
                                 f"an 'instrument_family_str'")
            records.append({"path": os.path.join(folder, "audio", f"{note_str}.wav"), "split": split,
                            "pitch": note_name(pitch), "pitch_class": NOTE_NAMES[pitch % 12],
                            "instrument_family": family})
    return _frame(_keep_present("nsynth", records), ["pitch", "pitch_class", "instrument_family"])


# ---------------------------------------------------------------- GiantSteps key

def _find_repository(root, repository, name):
    """The folder under root named `repository` (or `repository-<suffix>`, as archives unpack)."""
    matches = sorted(entry for entry in os.listdir(root)
                     if os.path.isdir(os.path.join(root, entry))
                     and (entry == repository or entry.startswith(repository + "-")))
    if not matches:
        raise MissingFileError(f"{name}: expected the folder {os.path.join(root, repository)} "
                                f"(a copy of https://github.com/GiantSteps/{repository} with its audio/)")
    if len(matches) > 1:
        raise FormatError(f"{name}: several copies of {repository} under {root}: {matches}; keep one")
    return os.path.join(root, matches[0])


def _giantsteps_artist_splits(metadata):
    """Track id -> split for the GiantSteps MTG key set, by artist.

    metadata: {track id: [artists]} for every track of beatport_metadata.txt. An artist is
    val when SHA-1 of its lower-cased name falls in the last GIANTSTEPS_ARTIST_BUCKETS;
    then every collaborator of a val artist becomes val, until nothing changes, so no
    artist has tracks on both sides.
    """
    train_buckets, val_buckets = GIANTSTEPS_ARTIST_BUCKETS
    artist_split = {}
    for artists in metadata.values():
        for artist in artists:
            bucket = _sha1_int(artist.lower()) % (train_buckets + val_buckets)
            artist_split[artist] = "val" if bucket >= train_buckets else "train"
    changed = True
    while changed:
        changed = False
        for artists in metadata.values():
            if any(artist_split[a] == "val" for a in artists) and any(artist_split[a] == "train" for a in artists):
                artist_split.update({artist: "val" for artist in artists})
                changed = True
    return {track: artist_split[artists[0]] for track, artists in metadata.items()}


def build_giantsteps_key(root):
    """GiantSteps key: the MTG key set for train/val, the GiantSteps key set for test (MARBLE).

    Reads, under ROOT:
      giantsteps-key-dataset/annotations/key/<ID>.LOFI.key  (e.g. "Bb minor"), audio
        giantsteps-key-dataset/audio/<ID>.LOFI.mp3 -> test;
      giantsteps-mtg-key-dataset/annotations/annotations.txt (ID, MANUAL KEY, C) and
        annotations/beatport_metadata.txt (ID, ARTIST, ...), audio
        giantsteps-mtg-key-dataset/audio/<ID>.LOFI.mp3 -> train and val.
    MTG tracks are kept when the confidence C is 2 and the key is a single key (as in
    Korzeniowski and Widmer 2018); they split by artist (_giantsteps_artist_splits).
    Repository folders may carry a suffix (giantsteps-key-dataset-master).
    Returns columns path, split, key ("A# minor": canonical spelling, sharps).
    """
    name = "giantsteps-key"
    root = os.path.abspath(root)
    test_repository = _find_repository(root, "giantsteps-key-dataset", name)
    train_repository = _find_repository(root, "giantsteps-mtg-key-dataset", name)
    key_folder = os.path.join(test_repository, "annotations", "key")
    key_files = sorted(entry for entry in os.listdir(key_folder) if entry.endswith(".key")) \
        if os.path.isdir(key_folder) else []
    if not key_files:
        raise MissingFileError(f"{name}: expected the official files {key_folder}/<ID>.LOFI.key")
    records = []
    for entry in key_files:
        key_path = os.path.join(key_folder, entry)
        with open(key_path, encoding="utf-8-sig") as handle:
            text = handle.read().strip()
        try:
            key = canonical_key(text)
        except ValueError as error:
            raise FormatError(f"{key_path}, line 1: {error}") from None
        audio_name = entry[:-len(".key")] + ".mp3"
        records.append({"path": os.path.join(test_repository, "audio", audio_name), "split": "test", "key": key})

    annotations_path = _require(os.path.join(train_repository, "annotations", "annotations.txt"), name)
    metadata_path = _require(os.path.join(train_repository, "annotations", "beatport_metadata.txt"), name)
    metadata_rows = _read_table(metadata_path, "\t", ["ID", "ARTIST"])
    metadata = {row["ID"]: [artist.strip() for artist in row["ARTIST"].split(",")] for _, row in metadata_rows}
    track_split = _giantsteps_artist_splits(metadata)
    rows = list(_read_rows(annotations_path, "\t"))
    if not rows or [field.strip() for field in rows[0][1][:3]] != ["ID", "MANUAL KEY", "C"]:
        raise FormatError(f"{annotations_path}, line 1: expected the header ID, MANUAL KEY, C")
    low_confidence = ambiguous = 0
    for line, fields in rows[1:]:
        if len(fields) < 3 or not fields[0].strip().isdigit() or fields[2].strip() not in ("0", "1", "2"):
            raise FormatError(f"{annotations_path}, line {line}: expected ID, MANUAL KEY, C (0, 1 or 2), got {fields}")
        track, text, confidence = fields[0].strip(), fields[1].strip(), fields[2].strip()
        if confidence != "2":
            low_confidence += 1
            continue
        if "/" in text or text in ("", "-"):
            ambiguous += 1
            continue
        try:
            key = canonical_key(text)
        except ValueError as error:
            raise FormatError(f"{annotations_path}, line {line}: {error}") from None
        if track not in track_split:
            raise FormatError(f"{annotations_path}, line {line}: track {track} has no row in {metadata_path}")
        records.append({"path": os.path.join(train_repository, "audio", f"{track}.LOFI.mp3"),
                        "split": track_split[track], "key": key})
    print(f"{name}: left out {low_confidence} MTG tracks with confidence below 2 and {ambiguous} "
          f"with no single key")
    return _frame(_keep_present(name, records), ["key"])


# ---------------------------------------------------------------- VocalSet

def _read_singer_list(path, singers):
    """Singer names from test_singers_technique.txt ("female2" or "f2" per line)."""
    names = []
    for line, fields in _read_rows(path, "\t"):
        text = fields[0].strip().lower()
        match = re.fullmatch(r"(female|male|f|m)(\d+)", text)
        if not match:
            raise FormatError(f"{path}, line {line}: expected a singer such as 'female2', got {text!r}")
        singer = {"f": "female", "m": "male"}.get(match.group(1), match.group(1)) + match.group(2)
        if singer not in singers:
            raise FormatError(f"{path}, line {line}: singer {singer!r} has no folder; singers: {sorted(singers)}")
        names.append(singer)
    return names


# VocalSet's singer-ordered audio folder: FULL/ in release 1.1, data_by_singer/ in 1.2
# (whose data_by_technique/ and data_by_vowel/ hold the same recordings again, so they are
# not read). Either may sit in ROOT or in one folder below it (the archive's VocalSet1-2/).
VOCALSET_FOLDERS = ("FULL", "data_by_singer")


def _vocalset_folder(root):
    """The singer-ordered audio folder under root (VOCALSET_FOLDERS), else root itself."""
    below = sorted(entry for entry in os.listdir(root) if os.path.isdir(os.path.join(root, entry))) \
        if os.path.isdir(root) else []
    for parent in (root, *(os.path.join(root, entry) for entry in below)):
        found = [os.path.join(parent, name) for name in VOCALSET_FOLDERS if os.path.isdir(os.path.join(parent, name))]
        if len(found) > 1:
            raise FormatError(f"vocalset: both {found[0]} and {found[1]} exist; keep one release")
        if found:
            return found[0]
    return root


def build_vocalset(root, task):
    """VocalSet singer and technique labels from the singer-ordered folder structure.

    Reads ROOT/FULL/<singer>/<context>/<technique>/*.wav (release 1.1) or
    ROOT/data_by_singer/<singer>/<context>/<technique>/*.wav (release 1.2), either of them
    possibly one folder down (ROOT/VocalSet1-2/data_by_singer/), or ROOT itself laid out
    as <singer>/<context>/<technique>/; and test_singers_technique.txt when present, next
    to that folder or in ROOT. Labels: singer = the singer folder (female1 ... male11,
    20 classes), technique = the technique folder (17 classes, all of VocalSet's). task
    picks the split:
      technique: singer-disjoint; test = the singers of test_singers_technique.txt, else
        VOCALSET_TEST_SINGERS (the published split); val = 10 % of the other singers'
        recordings per technique, by hash (_hash_split).
      singer: every singer in every split; per singer 10 % test, 10 % val, 80 % train by
        hash (a singer-disjoint split cannot test singer identification).
    Returns columns path, split, then the task's label column and the other one.
    """
    name = f"vocalset-{task}"
    root = os.path.abspath(root)
    full = _vocalset_folder(root)
    if full != root:
        print(f"{name}: recordings from {full}")
    records, outside = [], 0
    for folder, subfolders, files in os.walk(full):
        subfolders[:] = sorted(sub for sub in subfolders if not sub.startswith((".", "__MACOSX")))
        parts = os.path.relpath(folder, full).split(os.sep)
        for file in sorted(files):
            if file.startswith(".") or not file.lower().endswith(".wav"):
                continue
            if len(parts) != 3:
                outside += 1
                continue
            records.append({"path": os.path.join(folder, file), "singer": parts[0], "technique": parts[2],
                            "key": "/".join([*parts, file])})
    if not records:
        raise MissingFileError(f"{name}: expected the official files {root}/FULL/<singer>/<context>/<technique>/*.wav "
                               f"(VocalSet 1.1) or {root}/data_by_singer/<singer>/<context>/<technique>/*.wav (1.2)")
    if outside:
        print(f"{name}: skipped {outside} .wav files outside <singer>/<context>/<technique>/")
    singers = {record["singer"] for record in records}
    groups = {}
    if task == "technique":
        beside = os.path.dirname(full) if full != root else root
        candidates = [os.path.join(folder, "test_singers_technique.txt") for folder in (beside, root)]
        list_path = next((path for path in candidates if os.path.isfile(path)), candidates[-1])
        if os.path.isfile(list_path):
            test_singers = _read_singer_list(list_path, singers)
            print(f"{name}: test singers from {list_path}: {test_singers}")
        else:
            test_singers = [singer for singer in VOCALSET_TEST_SINGERS if singer in singers]
            print(f"{name}: {list_path} is absent; test singers are the published {test_singers}")
        for record in records:
            if record["singer"] in test_singers:
                record["split"] = "test"
            else:
                groups.setdefault(record["technique"], []).append(record)
        test_fraction = 0.0
    else:
        for record in records:
            groups.setdefault(record["singer"], []).append(record)
        test_fraction = HOLDOUT_FRACTION
    for group in groups.values():
        splits = _hash_split([record["key"] for record in group], test_fraction, HOLDOUT_FRACTION)
        for record in group:
            record["split"] = splits[record["key"]]
    columns = ["singer", "technique"] if task == "singer" else ["technique", "singer"]
    return _frame(_keep_present(name, records), columns)


# ---------------------------------------------------------------- EmoMusic

def _emomusic_artist_split(artist):
    # JukeMIR's normalization: lower case, ASCII letters and spaces only, single spaces.
    letters = "".join(c for c in artist.lower() if ord(c) < 128 and (c.isalpha() or c.isspace()))
    train_buckets, val_buckets = EMOMUSIC_ARTIST_BUCKETS
    bucket = _sha1_int(" ".join(letters.split())) % (train_buckets + val_buckets)
    return "val" if bucket >= train_buckets else "train"


def build_emomusic(root):
    """EmoMusic (1000 songs, 744 after de-duplication): static arousal and valence.

    Reads static_annotations.csv (song_id, mean_arousal, std_arousal, mean_valence,
    std_valence) and songs_info.csv (song_id, Artist, ..., Mediaeval 2013 set) from ROOT
    or ROOT/annotations, and audio ROOT/clips_45seconds/<song_id>.mp3. Split as in JukeMIR
    and MARBLE: the MediaEval 2013 evaluation set is test; development songs go to val
    when their artist hashes into the last EMOMUSIC_ARTIST_BUCKETS, else train.
    Returns columns path, split, arousal, valence (the raw means, 1-9 scale; datasets.py
    standardizes regression targets on the train split).
    """
    name = "emomusic"
    root = os.path.abspath(root)
    folder = os.path.join(root, "annotations")
    if not os.path.isfile(os.path.join(folder, "static_annotations.csv")):
        folder = root
    static_path = _require(os.path.join(folder, "static_annotations.csv"), name)
    info_path = _require(os.path.join(folder, "songs_info.csv"), name)
    info_rows = _read_table(info_path, ",", ["song_id", "Artist", "Mediaeval 2013 set"], quoted=True)
    split_of = {}
    for line, row in info_rows:
        subset = row["Mediaeval 2013 set"].lower()
        if not row["song_id"].isdigit() or subset not in ("development", "evaluation"):
            raise FormatError(f"{info_path}, line {line}: expected a numeric song_id and a Mediaeval 2013 set "
                             f"'development' or 'evaluation', got {row['song_id']!r}, {row['Mediaeval 2013 set']!r}")
        split_of[int(row["song_id"])] = "test" if subset == "evaluation" else _emomusic_artist_split(row["Artist"])
    static_rows = _read_table(static_path, ",", ["song_id", "mean_arousal", "mean_valence"], quoted=True)
    records = []
    for line, row in static_rows:
        try:
            song, arousal, valence = int(row["song_id"]), float(row["mean_arousal"]), float(row["mean_valence"])
        except ValueError:
            raise FormatError(f"{static_path}, line {line}: expected a numeric song_id, mean_arousal and "
                             f"mean_valence") from None
        if song not in split_of:
            raise FormatError(f"{static_path}, line {line}: song {song} has no row in {info_path}")
        records.append({"path": os.path.join(root, "clips_45seconds", f"{song}.mp3"), "split": split_of[song],
                        "arousal": arousal, "valence": valence})
    return _frame(_keep_present(name, records), ["arousal", "valence"])


# ---------------------------------------------------------------- MedleyDB

# libyaml's parser when PyYAML was built with it (about 10x faster on MedleyDB's 330 files),
# else PyYAML's own; both read YAML 1.1 the same way.
YAML_LOADER = getattr(yaml, "CBaseLoader", yaml.BaseLoader)


def _yaml_document(path):
    """Read a YAML file -> (its data, its node tree) with every scalar kept as text.

    PyYAML's base loader resolves no implicit types, so the official files' values stay as
    written: `excerpt: no` is "no" (not False), `version: 1.2` is "1.2", `album: None` and
    an empty field are strings. The node tree gives line numbers for messages. A UTF-8
    byte-order mark is dropped. Raises FormatError naming the file and line.
    """
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        text = handle.read()
    loader = YAML_LOADER(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f", line {mark.line + 1}" if mark else ""
        raise FormatError(f"{path}{where}: not valid YAML ({error.problem or error.context})") from None
    except yaml.YAMLError as error:
        raise FormatError(f"{path}: not valid YAML ({error})") from None
    finally:
        loader.dispose()
    return data, node


def _yaml_key_lines(node):
    """Key text -> line number (from 1) of each key of a YAML mapping node."""
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def parse_medleydb_metadata(path):
    """Read the fields this project needs from a MedleyDB <Track>_METADATA.yaml.

    The files are read with a YAML parser as they are published: top-level block lists
    (`composer:` followed by `- name` lines at column 0), block lists under a stem's
    `instrument:`, flow lists (`website: []`), quoted and double-quoted scalars with
    escapes, empty fields, comments and a byte-order mark. Only the top-level `stem_dir`
    and, under `stems:`, each stem's `filename` and `instrument` (one name or a list of
    names) are used; the raw tracks and the other fields are ignored.
    Returns (stem_dir, [(stem id, filename, [instruments])]). Raises FormatError naming
    the file and line when the YAML is invalid or a stem lacks a field.
    """
    data, node = _yaml_document(path)
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a mapping of fields (album, artist, ..., stem_dir, stems)")
    stem_dir = data.get("stem_dir")
    if not isinstance(stem_dir, str) or not stem_dir.strip():
        raise FormatError(f"{path}: no top-level 'stem_dir' field")
    stems_node = next((value for key, value in node.value if key.value == "stems"), None)
    line_of = _yaml_key_lines(stems_node)
    stems = data.get("stems")
    if stems in (None, ""):
        return stem_dir.strip(), []
    if not isinstance(stems, dict):
        raise FormatError(f"{path}, line {stems_node.start_mark.line + 1}: 'stems' is not a mapping of stem ids")
    parsed = []
    for stem_id, stem in stems.items():
        where = f"{path}, line {line_of.get(stem_id, '?')}: stem {stem_id}"
        stem = stem if isinstance(stem, dict) else {}
        filename = stem.get("filename")
        instruments = stem.get("instrument")
        instruments = [instruments] if isinstance(instruments, str) else instruments
        if not isinstance(filename, str) or not filename.strip():
            raise FormatError(f"{where} lacks 'filename'")
        if not isinstance(instruments, list) or not all(isinstance(name, str) for name in instruments) \
                or not any(name.strip() for name in instruments):
            raise FormatError(f"{where} lacks 'instrument' (a name or a list of names)")
        parsed.append((stem_id, filename.strip(), [name.strip() for name in instruments if name.strip()]))
    return stem_dir.strip(), parsed


def build_medleydb(root):
    """MedleyDB stems labeled with their instrument, the 20 most frequent instruments.

    Reads every <Track>_METADATA.yaml under ROOT (the audio release keeps it in
    Audio/<Track>/; the medleydb repository in medleydb/data/Metadata/, which wins when a
    track has both) with a YAML parser (parse_medleydb_metadata) and the stems
    <Track>/<stem_dir>/<filename>, wherever a folder <Track> holding <stem_dir> is under
    ROOT (V1 and V2 may sit side by side). As in the paper's code: stems of
    MEDLEYDB_EXCLUDED are left out, then the MEDLEYDB_TOP_INSTRUMENTS instruments with the
    most stems are kept (ties by name); stems with several instruments are left out, so
    each path has one class. Split per instrument by hash of <Track>/<filename>: 10 %
    test, 10 % val, 80 % train (stems of one song may fall in different splits, as in
    the paper's stem-level split).
    Returns columns path, split, instrument.
    """
    name = "medleydb"
    root = os.path.abspath(root)
    metadata_files, track_folders = [], {}
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        metadata_files += [os.path.join(folder, f) for f in sorted(files) if f.endswith("_METADATA.yaml")]
        if any(sub.endswith("_STEMS") for sub in subfolders):
            track_folders.setdefault(os.path.basename(folder), folder)
    if not metadata_files:
        raise MissingFileError(f"{name}: expected the official files {root}/Audio/<Track>/<Track>_METADATA.yaml")
    by_track = {}
    for path in metadata_files:
        by_track.setdefault(os.path.basename(path)[:-len("_METADATA.yaml")], []).append(path)
    twice = sorted(track for track, paths in by_track.items() if len(paths) > 1)
    if twice:
        print(f"{name}: {len(twice)} tracks have metadata in two or more places (e.g. {by_track[twice[0]]}); "
              f"each is read once, from the medleydb repository's Metadata/ folder where it is there")
    records, several, excluded = [], 0, 0
    for track in sorted(by_track):
        # The repository's copy is the maintained one (label fixes after the audio releases).
        metadata_path = min(by_track[track], key=lambda path: (os.path.basename(os.path.dirname(path)) != "Metadata",
                                                               path))
        stem_dir, stems = parse_medleydb_metadata(metadata_path)
        folder = track_folders.get(track, os.path.join(root, "Audio", track))
        for _, filename, instruments in stems:
            if len(instruments) != 1:
                several += 1
            elif instruments[0] in MEDLEYDB_EXCLUDED:
                excluded += 1
            else:
                records.append({"path": os.path.join(folder, stem_dir, filename), "instrument": instruments[0],
                                "key": f"{track}/{filename}"})
    print(f"{name}: left out {excluded} stems of {list(MEDLEYDB_EXCLUDED)} and {several} stems with "
          f"several instruments")
    records = _keep_present(name, records)
    counts = {}
    for record in records:
        counts[record["instrument"]] = counts.get(record["instrument"], 0) + 1
    kept = sorted(counts, key=lambda instrument: (-counts[instrument], instrument))[:MEDLEYDB_TOP_INSTRUMENTS]
    rare = sum(count for instrument, count in counts.items() if instrument not in kept)
    if rare:
        print(f"{name}: left out {rare} stems of {len(counts) - len(kept)} instruments outside the "
              f"{MEDLEYDB_TOP_INSTRUMENTS} most frequent")
    records = [record for record in records if record["instrument"] in kept]
    for instrument in kept:
        group = [record for record in records if record["instrument"] == instrument]
        splits = _hash_split([record["key"] for record in group], HOLDOUT_FRACTION, HOLDOUT_FRACTION)
        for record in group:
            record["split"] = splits[record["key"]]
    return _frame(records, ["instrument"])


# ---------------------------------------------------------------- registry and command line

BUILDERS = {
    "magnatagatune": functools.partial(build_magnatagatune, top_tags=MTAT_TOP_TAGS),
    "magnatagatune-all": functools.partial(build_magnatagatune, top_tags=None),
    "mtg-jamendo-top50": functools.partial(build_mtg_jamendo, subset="top50tags"),
    "mtg-jamendo-genre": functools.partial(build_mtg_jamendo, subset="genre"),
    "mtg-jamendo-instrument": functools.partial(build_mtg_jamendo, subset="instrument"),
    "mtg-jamendo-moodtheme": functools.partial(build_mtg_jamendo, subset="moodtheme"),
    "gtzan": build_gtzan,
    "nsynth": build_nsynth,
    "giantsteps-key": build_giantsteps_key,
    "vocalset-singer": functools.partial(build_vocalset, task="singer"),
    "vocalset-technique": functools.partial(build_vocalset, task="technique"),
    "emomusic": build_emomusic,
    "medleydb": build_medleydb,
}


def build_manifest(name, root):
    """Build the manifest of data set `name` (a key of BUILDERS) from its files under `root`.

    Returns a DataFrame with columns path (absolute), split (train/val/test) and the label
    columns listed in LABELS[name]; "" (text) or NaN (numbers) marks an unlabeled cell.
    Raises MissingFileError (a FileNotFoundError) for a missing official file and
    FormatError (a ValueError) for a malformed one, naming file and line; both are
    utils.UserError.
    """
    if name not in BUILDERS:
        raise FormatError(f"unknown data set {name!r}; choose one of {sorted(BUILDERS)}")
    if not os.path.isdir(root):
        raise MissingFileError(f"{name}: {root} is not a folder; pass --root, the folder holding the data set's "
                               f"official files (docs/datasets.md)")
    return BUILDERS[name](root)


def write_manifest(name, manifest, out):
    """Write a manifest to the CSV file `out` (whole: safety.write_csv); print its split counts and flags."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    safety.write_csv(out, manifest)
    counts = manifest["split"].value_counts()
    print(f"{name}: wrote {len(manifest)} rows to {out} ("
          + ", ".join(f"{split} {counts.get(split, 0)}" for split in SPLITS) + ")")
    for label in LABELS[name]:
        print(f"  {_label_flags(*label)}")


def paper_tasks(built):
    """Rows of the tasks file (TASKS_COLUMNS) for the paper's probes whose manifest was built.

    built: {data set name: manifest file name, relative to the tasks file's folder}.
    Returns a DataFrame in PAPER_PROBES' order; task and label kind come from LABELS.
    """
    rows = []
    for data_set, column, probe_name, head, patience in PAPER_PROBES:
        if data_set not in built:
            continue
        task, kind = next((task, kind) for label, task, kind in LABELS[data_set] if label == column)
        rows.append({"name": probe_name, "csv": built[data_set], "label_column": column, "task": task,
                     "label_kind": kind, "head": head, "patience": patience})
    return pd.DataFrame(rows, columns=TASKS_COLUMNS)


def build_all(root, out_folder):
    """Build every data set found under `root` into `out_folder`, plus out_folder/tasks.csv.

    A data set is looked for in root/DATA_FOLDERS[name]; an absent folder is skipped with
    one line. A data set whose folder exists but whose files cannot be built prints its
    error and the others go on. tasks.csv lists the paper's probes (PAPER_PROBES) over
    the manifests written, with the authors' head and patience per task, in the format
    `probe.py --tasks` reads. Returns ({name: manifest path}, {name: error message}).
    Raises MissingFileError when no data set folder exists under root.
    """
    root, out_folder = os.path.abspath(root), os.path.abspath(out_folder)
    if os.path.isfile(out_folder):
        raise utils.UserError(f"--out {out_folder} is a file; for all, give the folder for the manifests "
                              f"and tasks.csv")
    absent = {}
    for name, folder in DATA_FOLDERS.items():
        if not os.path.isdir(os.path.join(root, folder)):
            absent.setdefault(folder, []).append(name)
    if len(absent) == len(set(DATA_FOLDERS.values())):
        raise MissingFileError(f"no data set under {root}: expected one or more of the folders "
                               f"{sorted(set(DATA_FOLDERS.values()))} (see docs/datasets.md)")
    safety.check_writable(out_folder, f"--out {out_folder}")
    for folder, names in absent.items():
        print(f"{', '.join(names)}: skipped, {os.path.join(root, folder)} is absent")
    written, failed = {}, {}
    for name in BUILDERS:
        folder = os.path.join(root, DATA_FOLDERS[name])
        if not os.path.isdir(folder):
            continue
        try:
            manifest = build_manifest(name, folder)
        except utils.UserError as error:
            print(f"{name}: error: {error}", file=sys.stderr, flush=True)
            failed[name] = str(error)
            continue
        written[name] = os.path.join(out_folder, f"{name}.csv")
        write_manifest(name, manifest, written[name])
    tasks = paper_tasks({name: os.path.basename(path) for name, path in written.items()})
    tasks_path = safety.write_csv(os.path.join(out_folder, "tasks.csv"), tasks)
    print(f"wrote {len(tasks)} probes of the paper's table to {tasks_path}; run them with\n"
          f"  python probe.py --checkpoint CHECKPOINT --tasks {tasks_path} --out table.json")
    return written, failed


def build_parser():
    """The command line: a data set name (or all), where its files are, where to write."""
    epilog = "label columns per data set (flags for probe.py and train.py):\n" + "\n".join(
        f"  {name:24s} " + ("\n" + " " * 27).join(_label_flags(*label) for label in labels)
        for name, labels in LABELS.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    data = parser.add_argument_group("data")
    data.add_argument("name", choices=[*BUILDERS, "all"], metavar="NAME",
                      help=f"data set, one of: {', '.join(BUILDERS)}; or all: every data set found under "
                           f"--root, each in its folder ({', '.join(sorted(set(DATA_FOLDERS.values())))})")
    data.add_argument("--root", default=None,
                      help="folder holding the data set's official files and audio, laid out as "
                           "docs/datasets.md says (default: data/FOLDER; for all: data)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default=None,
                        help="CSV file to write, its paths absolute, or a folder for NAME.csv (default: "
                             "manifests/NAME.csv); for all: the folder for NAME.csv of each data set and tasks.csv "
                             "(default: manifests)")
    return parser


def main(argv=None):
    """Build one manifest (or all of them) and write it; returns the exit status 0.

    Raises utils.UserError for a missing or malformed official file (run_cli turns it
    into one line on stderr and exit status 2).
    """
    args = build_parser().parse_args(argv)
    if args.name == "all":
        written, failed = build_all(args.root or "data", args.out or "manifests")
        if failed:
            raise utils.UserError(f"{len(failed)} data set(s) could not be built ({', '.join(failed)}; errors "
                                  f"above); the {len(written)} others and tasks.csv are written")
        return 0
    root = args.root or os.path.join("data", DATA_FOLDERS[args.name])
    out = args.out or os.path.join("manifests", f"{args.name}.csv")
    if os.path.isdir(out) or out.endswith(("/", os.sep)):
        out = os.path.join(out, f"{args.name}.csv")
    safety.check_writable(os.path.dirname(os.path.abspath(out)), f"--out {out}")
    write_manifest(args.name, build_manifest(args.name, root), out)
    return 0


if __name__ == "__main__":
    sys.exit(utils.run_cli(main))
