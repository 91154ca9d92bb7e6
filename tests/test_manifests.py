"""Tests for manifests.py: each builder on tiny fabricated copies of the official files.

Annotation files are written in the official formats (a few rows each); audio files are
tiny generated WAVs, or a few placeholder bytes where a builder only checks that the
file exists (MP3 paths). Every test asserts exact paths, splits and labels.
"""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

import manifests
import utils

MANIFESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "manifests.py")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def write_wav(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, np.random.default_rng(0).uniform(-0.1, 0.1, 80).astype(np.float32), 8000)
    return str(path)


def write_placeholder(path):
    # The builders never decode audio; a non-empty file stands for an MP3.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(b"ID3\x03\x00")
    return str(path)


def write_text(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return str(path)


def sha1_int(text):
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest(), 16)


def as_lists(frame):
    return frame.to_dict("list")


# ---------------------------------------------------------------- key spelling

def test_canonical_key_spellings():
    assert manifests.canonical_key("Bb major") == "A# major"
    assert manifests.canonical_key("c# minor") == "C# minor"
    assert manifests.canonical_key("Db Minor") == "C# minor"
    assert manifests.canonical_key("Cb major") == "B major"
    assert manifests.canonical_key("E# min") == "F minor"
    assert manifests.canonical_key(" B major ") == "B major"
    assert manifests.note_name(60) == "C4" and manifests.note_name(21) == "A0" and manifests.note_name(73) == "C#5"
    with pytest.raises(ValueError, match="cannot read a key"):
        manifests.canonical_key("C minor / F# minor")


# ---------------------------------------------------------------- MagnaTagATune

def make_magnatagatune(root, extra_line=None):
    """52 tags: t00..t49 appear in several clips, t50 and t51 once (in clip 4 only)."""
    tags = [f"t{i:02d}" for i in range(52)]
    clips = [  # (clip_id, folder, tags set)
        (2, "0", set(tags[:30])),
        (6, "b", set(tags[10:50])),
        (10, "c", set(tags[:50])),
        (11, "d", {"t50", "t51"}),
        (12, "f", {"t00"}),
        (13, "e", {"t01"}),
    ]
    lines = ["\t".join(f'"{name}"' for name in ["clip_id", *tags, "mp3_path"])]
    for clip_id, folder, present in clips:
        mp3_path = f"{folder}/artist-album-{clip_id:02d}-track-0-29.mp3"
        lines.append("\t".join(f'"{v}"' for v in [clip_id, *(int(t in present) for t in tags), mp3_path]))
        if clip_id != 13:  # clip 13's audio is absent
            write_placeholder(os.path.join(root, mp3_path))
    if extra_line is not None:
        lines.append(extra_line)
    # As the official file: every field quoted, tab-separated, Windows line ends.
    write_text(os.path.join(root, "annotations_final.csv"), "\r\n".join(lines) + "\r\n")
    return tags


def test_magnatagatune_top50_and_all(tmp_path, capsys):
    tags = make_magnatagatune(tmp_path)
    top = manifests.build_manifest("magnatagatune", str(tmp_path))
    assert "dropped 1 of 6 rows whose audio is absent" in capsys.readouterr().out
    expected_paths = [str(tmp_path / f"{folder}/artist-album-{i:02d}-track-0-29.mp3")
                      for folder, i in (("0", 2), ("b", 6), ("c", 10), ("d", 11), ("f", 12))]
    assert as_lists(top) == {
        "path": expected_paths,
        "split": ["train", "train", "val", "test", "test"],
        "tags": [";".join(tags[:30]), ";".join(tags[10:50]), ";".join(tags[:50]), "", "t00"],
    }
    every = manifests.build_manifest("magnatagatune-all", str(tmp_path))
    assert every["tags"].tolist()[3] == "t50;t51"
    assert every["path"].tolist() == expected_paths


def test_magnatagatune_audio_under_mp3_folder_and_converted_wav(tmp_path):
    make_magnatagatune(tmp_path / "elsewhere")
    os.replace(tmp_path / "elsewhere" / "annotations_final.csv", tmp_path / "annotations_final.csv")
    os.replace(tmp_path / "elsewhere", tmp_path / "mp3")
    converted = tmp_path / "mp3" / "0" / "artist-album-02-track-0-29.mp3"
    os.remove(converted)
    write_wav(str(converted)[:-4] + ".wav")
    top = manifests.build_manifest("magnatagatune", str(tmp_path))
    assert top["path"].tolist()[0] == str(converted)[:-4] + ".wav"
    assert top["path"].tolist()[1] == str(tmp_path / "mp3" / "b" / "artist-album-06-track-0-29.mp3")


def test_magnatagatune_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotations_final.csv"):
        manifests.build_manifest("magnatagatune", str(tmp_path))
    make_magnatagatune(tmp_path, extra_line='"14"\t"0"\t"a/x.mp3"')
    with pytest.raises(ValueError, match=r"annotations_final.csv, line 8: 3 fields"):
        manifests.build_manifest("magnatagatune", str(tmp_path))
    make_magnatagatune(tmp_path, extra_line="\t".join(['"14"', *['"2"'] * 52, '"a/x.mp3"']))
    with pytest.raises(ValueError, match=r"line 8: tag 't00' is '2'"):
        manifests.build_manifest("magnatagatune", str(tmp_path))


def test_all_audio_absent_names_an_expected_file(tmp_path):
    make_magnatagatune(tmp_path)
    for folder in "0bcdf":
        for name in os.listdir(tmp_path / folder):
            os.remove(tmp_path / folder / name)
    with pytest.raises(FileNotFoundError, match="none of the 6 referenced audio files exists"):
        manifests.build_manifest("magnatagatune", str(tmp_path))


def test_empty_audio_file_is_dropped_and_reported(tmp_path, capsys):
    make_magnatagatune(tmp_path)
    open(tmp_path / "0" / "artist-album-02-track-0-29.mp3", "wb").close()
    top = manifests.build_manifest("magnatagatune", str(tmp_path))
    assert "dropped 1 of 6 rows whose audio file is empty" in capsys.readouterr().out
    assert len(top) == 4


# ---------------------------------------------------------------- MTG-Jamendo

JAMENDO_HEADER = "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\n"


def make_jamendo(root, subset):
    folder = os.path.join(root, "data", "splits", "split-0")
    rows = {
        "train": ["track_0000214\tartist_000014\talbum_000031\t14/214.mp3\t124.6\tgenre---punkrock\n",
                  "track_0000215\tartist_000014\talbum_000031\t15/215.mp3\t98.0\tgenre---rock\t"
                  "instrument---piano\tmood/theme---happy\n"],
        "validation": ["track_0917538\tartist_378901\talbum_108650\t38/917538.mp3\t126.5\tgenre---easylistening\t"
                       "instrument---piano\n"],
        "test": ["track_1310775\tartist_352184\talbum_155700\t75/1310775.mp3\t283.0\tgenre---rock\n",
                 "track_1310777\tartist_352184\talbum_155700\t77/1310777.mp3\t100.0\tgenre---soundtrack\n"],
    }
    for split, lines in rows.items():
        write_text(os.path.join(folder, f"autotagging_{subset}-{split}.tsv"), JAMENDO_HEADER + "".join(lines))
    for relpath in ("14/214.mp3", "15/215.mp3", "75/1310775.mp3", "77/1310777.mp3"):
        write_placeholder(os.path.join(root, "audio", relpath))
    # The low-quality release names the file NN/ID.low.mp3.
    write_placeholder(os.path.join(root, "audio", "38/917538.low.mp3"))
    os.remove(os.path.join(root, "audio", "77/1310777.mp3"))


@pytest.mark.parametrize("name, subset", [("mtg-jamendo-top50", "top50tags"), ("mtg-jamendo-genre", "genre"),
                                          ("mtg-jamendo-instrument", "instrument"),
                                          ("mtg-jamendo-moodtheme", "moodtheme")])
def test_mtg_jamendo(tmp_path, capsys, name, subset):
    make_jamendo(tmp_path, subset)
    frame = manifests.build_manifest(name, str(tmp_path))
    assert "dropped 1 of 5 rows whose audio is absent" in capsys.readouterr().out
    audio = tmp_path / "audio"
    assert as_lists(frame) == {
        "path": [str(audio / "14/214.mp3"), str(audio / "15/215.mp3"), str(audio / "38/917538.low.mp3"),
                 str(audio / "75/1310775.mp3")],
        "split": ["train", "train", "val", "test"],
        "tags": ["genre---punkrock", "genre---rock;instrument---piano;mood/theme---happy",
                 "genre---easylistening;instrument---piano", "genre---rock"],
    }


def test_mtg_jamendo_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="autotagging_genre-train.tsv"):
        manifests.build_manifest("mtg-jamendo-genre", str(tmp_path))
    make_jamendo(tmp_path, "genre")
    test_file = tmp_path / "data/splits/split-0/autotagging_genre-test.tsv"
    with open(test_file, "a", encoding="utf-8") as handle:
        handle.write("track_0000001\tartist_1\talbum_1\t01/1.mp3\t12.0\n")
    with pytest.raises(ValueError, match=r"autotagging_genre-test.tsv, line 4: .*at least one tag"):
        manifests.build_manifest("mtg-jamendo-genre", str(tmp_path))


# ---------------------------------------------------------------- GTZAN

def make_gtzan(root, audio_folder="genres", naming="dnn-mgr"):
    """The five-entry split lists and their audio.

    naming: "dnn-mgr" writes ROOT/{train,valid,test}_filtered.txt (coreyker/dnn-mgr);
    "semisupcon" writes ROOT/data/gtzan/{train,val,test}_filtered.txt as the SemiSupCon
    repository ships them, the last line without a line break.
    """
    lists = {"train": ["blues/blues.00000.wav", "rock/rock.00003.wav"],
             "val": ["jazz/jazz.00054.wav", "blues/blues.00001.wav"],
             "test": ["classical/classical.00007.wav"]}
    for split, lines in lists.items():
        if naming == "dnn-mgr":
            write_text(os.path.join(root, f"{'valid' if split == 'val' else split}_filtered.txt"),
                       "\n".join(lines) + "\n")
        else:
            write_text(os.path.join(root, "data", "gtzan", f"{split}_filtered.txt"), "\n".join(lines))
    for relpath in ("blues/blues.00000.wav", "rock/rock.00003.wav", "blues/blues.00001.wav"):
        write_wav(os.path.join(root, audio_folder, relpath))
    # The original archive holds .au files.
    write_wav(os.path.join(root, audio_folder, "classical/classical.00007.au"))


def gtzan_expected(audio):
    """The manifest both GTZAN list namings give for make_gtzan's files under `audio`."""
    return {
        "path": [str(audio / "blues/blues.00000.wav"), str(audio / "rock/rock.00003.wav"),
                 str(audio / "blues/blues.00001.wav"), str(audio / "classical/classical.00007.au")],
        "split": ["train", "train", "val", "test"],
        "genre": ["blues", "rock", "blues", "classical"],
    }


def test_gtzan(tmp_path, capsys):
    make_gtzan(tmp_path, "genres_original")
    frame = manifests.build_manifest("gtzan", str(tmp_path))
    assert "dropped 1 of 5 rows whose audio is absent, e.g. " in capsys.readouterr().out
    audio = tmp_path / "genres_original"
    assert as_lists(frame) == gtzan_expected(audio)


def test_gtzan_reads_the_lists_of_the_semisupcon_repository(tmp_path):
    make_gtzan(tmp_path, naming="semisupcon")
    frame = manifests.build_manifest("gtzan", str(tmp_path))
    audio = tmp_path / "genres"
    assert as_lists(frame) == gtzan_expected(audio)
    # val_ next to valid_ with the same entries is the same split; different entries are refused.
    lists = tmp_path / "data" / "gtzan"
    write_text(str(lists / "valid_filtered.txt"), "jazz/jazz.00054.wav\r\nblues/blues.00001.wav\r\n")
    assert manifests.build_manifest("gtzan", str(tmp_path))["split"].tolist() == ["train", "train", "val", "test"]
    write_text(str(lists / "valid_filtered.txt"), "jazz/jazz.00054.wav\n")
    with pytest.raises(manifests.FormatError, match="list different files"):
        manifests.build_manifest("gtzan", str(tmp_path))


def test_gtzan_errors(tmp_path):
    make_gtzan(tmp_path)
    os.remove(tmp_path / "valid_filtered.txt")
    with pytest.raises(FileNotFoundError, match=r"valid_filtered.txt \(or val_filtered.txt\)"):
        manifests.build_manifest("gtzan", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"data/gtzan/train_filtered.txt"):
        manifests.build_manifest("gtzan", str(tmp_path / "genres"))
    write_text(os.path.join(tmp_path, "valid_filtered.txt"), "jazz/jazz.00054.wav\njazz.00055.wav\n")
    with pytest.raises(ValueError, match=r"valid_filtered.txt, line 2: expected one '<genre>/<file>'"):
        manifests.build_manifest("gtzan", str(tmp_path))


# ---------------------------------------------------------------- NSynth

NSYNTH_FAMILIES = ("bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string",
                   "synth_lead", "vocal")
NSYNTH_SOURCES = ("acoustic", "electronic", "synthetic")
NSYNTH_QUALITIES = ("bright", "dark", "distortion", "fast_decay", "long_release", "multiphonic",
                    "nonlinear_env", "percussive", "reverb", "tempo-synced")


def nsynth_note(note_str, pitch, family):
    """One entry of examples.json with every field of the official files, derived from note_str."""
    instrument_str, _, velocity = note_str.rsplit("-", 2)
    source = instrument_str.split("_")[-2]
    qualities = [int(i in (1, 7)) for i in range(10)]
    return note_str, {"note": sha1_int(note_str) % 300000, "sample_rate": 16000, "pitch": pitch,
                      "instrument_source": NSYNTH_SOURCES.index(source), "instrument_family_str": family,
                      "instrument_str": instrument_str, "note_str": note_str,
                      "instrument_family": NSYNTH_FAMILIES.index(family), "qualities": qualities,
                      "velocity": int(velocity), "instrument": sha1_int(instrument_str) % 1006,
                      "instrument_source_str": source,
                      "qualities_str": [name for name, flag in zip(NSYNTH_QUALITIES, qualities) if flag]}


def make_nsynth(root):
    notes = {"train": [nsynth_note("bass_synthetic_068-049-025", 49, "bass"),
                       nsynth_note("keyboard_acoustic_004-060-100", 60, "keyboard")],
             "valid": [nsynth_note("guitar_acoustic_010-021-075", 21, "guitar")],
             "test": [nsynth_note("mallet_acoustic_062-073-050", 73, "mallet"),
                      nsynth_note("flute_acoustic_002-108-127", 108, "flute")]}
    for split, entries in notes.items():
        folder = os.path.join(root, f"nsynth-{split}")
        # The official files hold one JSON object on one line.
        write_text(os.path.join(folder, "examples.json"), json.dumps(dict(entries)))
        for note_str, _ in entries:
            if note_str != "flute_acoustic_002-108-127":
                write_wav(os.path.join(folder, "audio", f"{note_str}.wav"))


def test_nsynth(tmp_path, capsys):
    make_nsynth(tmp_path)
    frame = manifests.build_manifest("nsynth", str(tmp_path))
    assert "dropped 1 of 5 rows" in capsys.readouterr().out
    assert as_lists(frame) == {
        "path": [str(tmp_path / "nsynth-train/audio/bass_synthetic_068-049-025.wav"),
                 str(tmp_path / "nsynth-train/audio/keyboard_acoustic_004-060-100.wav"),
                 str(tmp_path / "nsynth-valid/audio/guitar_acoustic_010-021-075.wav"),
                 str(tmp_path / "nsynth-test/audio/mallet_acoustic_062-073-050.wav")],
        "split": ["train", "train", "val", "test"],
        "pitch": ["C#3", "C4", "A0", "C#5"],
        "pitch_class": ["C#", "C", "A", "C#"],
        "instrument_family": ["bass", "keyboard", "guitar", "mallet"],
    }


def test_nsynth_errors(tmp_path):
    make_nsynth(tmp_path)
    os.remove(tmp_path / "nsynth-test" / "examples.json")
    with pytest.raises(FileNotFoundError, match="nsynth-test/examples.json"):
        manifests.build_manifest("nsynth", str(tmp_path))
    write_text(os.path.join(tmp_path, "nsynth-test", "examples.json"), '{"a": {"pitch": 60,\n "x": }')
    with pytest.raises(ValueError, match=r"nsynth-test/examples.json, line 2: not valid JSON"):
        manifests.build_manifest("nsynth", str(tmp_path))
    write_text(os.path.join(tmp_path, "nsynth-test", "examples.json"), '{"a": {"instrument_family_str": "bass"}}')
    with pytest.raises(ValueError, match=r"note 'a' lacks an integer 'pitch'"):
        manifests.build_manifest("nsynth", str(tmp_path))


# ---------------------------------------------------------------- GiantSteps key

def artist_in_bucket(is_val, skip=()):
    """An artist name whose SHA-1 puts it in val (bucket >= 100 of 116) or train, per JukeMIR."""
    for index in range(10000):
        name = f"Artist {index}"
        if name not in skip and (sha1_int(name.lower()) % 116 >= 100) == is_val:
            return name
    raise AssertionError("no artist found")


def make_giantsteps(root):
    test_repo = os.path.join(root, "giantsteps-key-dataset-master")
    for track, text in (("10089", "Bb major"), ("61415", "e minor\n"), ("209206", "F# minor")):
        write_text(os.path.join(test_repo, "annotations", "key", f"{track}.LOFI.key"), text)
        if track != "209206":
            write_placeholder(os.path.join(test_repo, "audio", f"{track}.LOFI.mp3"))
    train_repo = os.path.join(root, "giantsteps-mtg-key-dataset")
    val_artist, train_artist = artist_in_bucket(True), artist_in_bucket(False)
    other = artist_in_bucket(False, skip={train_artist})
    write_text(os.path.join(train_repo, "annotations", "annotations.txt"),
               "ID\tMANUAL KEY\tC\n"
               "5061\tD# minor\t2\n"          # val artist
               "5881\tA major\t2\n"           # train artist
               "7217\tF minor\t1\n"           # low confidence: left out
               "10981\t-\t0\n"                # no key: left out
               "61578\tC minor / F# minor\t2\n"  # two keys: left out
               "4970565\tB major \t2\n"       # train artist collaborating with the val artist -> val
               "5000001\tDb minor\t2\n"       # another train artist, alone
               "5000002\tG minor\t2\n")       # train artist, but audio absent
    write_text(os.path.join(train_repo, "annotations", "beatport_metadata.txt"),
               "ID\tARTIST\tSONG TITLE\tMIX\tLABEL\tBP GENRE\tBP BPM\tBP KEY\n"
               f"5061\t{val_artist}\t\"Quoted\" Title\tOriginal Mix\tL\tTechno\t128\tD# minor\n"
               f"5881\t{train_artist}\tT\tOriginal Mix\tL\tHouse\t124\tA major\n"
               f"7217\t{train_artist}\tT\tOriginal Mix\tL\tHouse\t124\tF minor\n"
               f"10981\t{train_artist}\tT\tOriginal Mix\tL\tHouse\t124\tC major\n"
               f"61578\t{train_artist}\tT\tOriginal Mix\tL\tHouse\t124\tC minor\n"
               f"4970565\t{train_artist}, {val_artist}\tT\tOriginal Mix\tL\tHouse\t124\tB major\n"
               f"5000001\t{other}\tT\tOriginal Mix\tL\tHouse\t124\tC# minor\n"
               f"5000002\t{other}\tT\tOriginal Mix\tL\tHouse\t124\tG minor\n")
    for track in ("5061", "5881", "4970565", "5000001"):
        write_placeholder(os.path.join(train_repo, "audio", f"{track}.LOFI.mp3"))
    return test_repo, train_repo


def test_giantsteps_key(tmp_path, capsys):
    test_repo, train_repo = make_giantsteps(tmp_path)
    frame = manifests.build_manifest("giantsteps-key", str(tmp_path))
    out = capsys.readouterr().out
    assert "left out 2 MTG tracks with confidence below 2 and 1 with no single key" in out
    assert "dropped 2 of 8 rows whose audio is absent" in out
    assert as_lists(frame) == {
        "path": [os.path.join(test_repo, "audio", "10089.LOFI.mp3"), os.path.join(test_repo, "audio", "61415.LOFI.mp3"),
                 *(os.path.join(train_repo, "audio", f"{t}.LOFI.mp3") for t in ("5061", "5881", "4970565", "5000001"))],
        # The train artist of 5881 collaborated with a val artist on 4970565, so both are val.
        "split": ["test", "test", "val", "val", "val", "train"],
        "key": ["A# major", "E minor", "D# minor", "A major", "B major", "C# minor"],
    }


def test_giantsteps_key_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="giantsteps-key-dataset"):
        manifests.build_manifest("giantsteps-key", str(tmp_path))
    test_repo, train_repo = make_giantsteps(tmp_path)
    write_text(os.path.join(test_repo, "annotations", "key", "99.LOFI.key"), "H major")
    with pytest.raises(ValueError, match=r"99.LOFI.key, line 1: cannot read a key"):
        manifests.build_manifest("giantsteps-key", str(tmp_path))
    os.remove(os.path.join(test_repo, "annotations", "key", "99.LOFI.key"))
    with open(os.path.join(train_repo, "annotations", "annotations.txt"), "a", encoding="utf-8") as handle:
        handle.write("777\tA minor\thigh\n")
    with pytest.raises(ValueError, match=r"annotations.txt, line 10: expected ID, MANUAL KEY, C"):
        manifests.build_manifest("giantsteps-key", str(tmp_path))
    os.remove(os.path.join(train_repo, "annotations", "beatport_metadata.txt"))
    with pytest.raises(FileNotFoundError, match="beatport_metadata.txt"):
        manifests.build_manifest("giantsteps-key", str(tmp_path))


# ---------------------------------------------------------------- VocalSet

def make_vocalset(root, release="1.1"):
    """female1 and male1 (train singers) with 10 belt files each; female2 (a test singer).

    release "1.1" lays the recordings out in ROOT/FULL/; "1.2" as the 1.2 archive unpacks:
    ROOT/VocalSet1-2/data_by_singer/, with the same files again in data_by_technique/
    (which must not be read) and the singer lists beside them.
    """
    if release == "1.1":
        full = os.path.join(root, "FULL")
    else:
        full = os.path.join(root, "VocalSet1-2", "data_by_singer")
        for relpath in ("belt/f1_arpeggios_belt_0.wav", "spoken/f2_caro_spoken.wav"):
            write_wav(os.path.join(root, "VocalSet1-2", "data_by_technique", relpath))
        write_text(os.path.join(root, "VocalSet1-2", "train_singers_technique.txt"), "female1\r\nmale1\r\n")
        write_text(os.path.join(root, "VocalSet1-2", "test_singers_technique.txt"), "female2\r\n")
    paths = {}
    for singer, short in (("female1", "f1"), ("male1", "m1")):
        for index in range(10):
            relpath = f"{singer}/arpeggios/belt/{short}_arpeggios_belt_{index}.wav"
            paths[relpath] = write_wav(os.path.join(full, relpath))
    for relpath in ("female2/long_tones/messa/f2_long_messa_a.wav", "female2/excerpts/spoken/f2_caro_spoken.wav"):
        paths[relpath] = write_wav(os.path.join(full, relpath))
    write_wav(os.path.join(full, "female1", "stray.wav"))
    write_placeholder(os.path.join(full, "female1", "arpeggios", "belt", ".DS_Store"))
    return full, paths


def smallest_hashes(keys, count):
    return set(sorted(keys, key=lambda key: (sha1_int(key), key))[:count])


def test_vocalset_technique_split_is_singer_disjoint(tmp_path, capsys):
    full, paths = make_vocalset(tmp_path)
    frame = manifests.build_manifest("vocalset-technique", str(tmp_path))
    out = capsys.readouterr().out
    assert "skipped 1 .wav files outside" in out and "published" in out
    assert list(frame.columns) == ["path", "split", "technique", "singer"]
    by_key = {os.path.relpath(p, full): row for p, row in zip(frame["path"], frame.to_dict("records"))}
    assert set(by_key) == set(paths)
    # val: the 10 % of the train singers' belt recordings (2 of 20) with the smallest SHA-1.
    belt = [key for key in paths if "/belt/" in key]
    val = smallest_hashes(belt, 2)
    for key, row in by_key.items():
        expected = "test" if key.startswith("female2/") else "val" if key in val else "train"
        assert row["split"] == expected, key
        assert row["singer"] == key.split("/")[0] and row["technique"] == key.split("/")[2]
        assert row["path"] == paths[key]


def test_vocalset_release_1_2_reads_data_by_singer_only(tmp_path, capsys):
    full, paths = make_vocalset(tmp_path, release="1.2")
    frame = manifests.build_manifest("vocalset-technique", str(tmp_path))
    out = capsys.readouterr().out
    assert f"recordings from {full}" in out and "test singers from" in out
    assert sorted(frame["path"]) == sorted(paths.values())
    assert set(frame.loc[frame["split"] == "test", "singer"]) == {"female2"}
    singer = manifests.build_manifest("vocalset-singer", str(tmp_path / "VocalSet1-2"))
    assert sorted(singer["path"]) == sorted(paths.values())
    make_vocalset(tmp_path / "VocalSet1-2")  # a 1.1 FULL/ beside data_by_singer/
    with pytest.raises(manifests.FormatError, match="keep one release"):
        manifests.build_manifest("vocalset-singer", str(tmp_path / "VocalSet1-2"))


def test_vocalset_technique_reads_the_archive_singer_list(tmp_path, capsys):
    full, paths = make_vocalset(tmp_path)
    write_text(os.path.join(tmp_path, "test_singers_technique.txt"), "m1\n")
    frame = manifests.build_manifest("vocalset-technique", str(tmp_path))
    assert "test singers from" in capsys.readouterr().out
    assert set(frame.loc[frame["split"] == "test", "singer"]) == {"male1"}
    write_text(os.path.join(tmp_path, "test_singers_technique.txt"), "male1\nfemale7\n")
    with pytest.raises(ValueError, match=r"test_singers_technique.txt, line 2: singer 'female7' has no folder"):
        manifests.build_manifest("vocalset-technique", str(tmp_path))


def test_vocalset_singer_split_keeps_every_singer_in_every_split(tmp_path):
    full, paths = make_vocalset(tmp_path)
    frame = manifests.build_manifest("vocalset-singer", str(tmp_path))
    assert list(frame.columns) == ["path", "split", "singer", "technique"]
    for singer in ("female1", "male1"):
        keys = [key for key in paths if key.startswith(singer + "/")]
        ordered = sorted(keys, key=lambda key: (sha1_int(key), key))
        rows = frame[frame["singer"] == singer]
        split_of = {os.path.relpath(p, full): s for p, s in zip(rows["path"], rows["split"])}
        assert split_of == {key: "test" if i == 0 else "val" if i == 1 else "train" for i, key in enumerate(ordered)}
    # female2 has 2 recordings: round(0.2) = 0 held out, both train.
    assert frame.loc[frame["singer"] == "female2", "split"].tolist() == ["train", "train"]


def test_vocalset_without_audio(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"<singer>/<context>/<technique>/\*.wav"):
        manifests.build_manifest("vocalset-singer", str(tmp_path))


# ---------------------------------------------------------------- EmoMusic

def emomusic_split(artist):
    letters = "".join(c for c in artist.lower() if c.isascii() and (c.isalpha() or c.isspace()))
    return "val" if sha1_int(" ".join(letters.split())) % 10 >= 8 else "train"


def make_emomusic(root, in_annotations_folder=True):
    artists = [f"The Band {chr(65 + i)}" for i in range(26)]
    val_artist = next(a for a in artists if emomusic_split(a) == "val")
    # Song 2's artist field holds a quoted comma; both spellings must hash to train.
    train_artist = next(a for a in artists if emomusic_split(a) == emomusic_split(f"{a}, feat. X") == "train")
    folder = os.path.join(root, "annotations") if in_annotations_folder else root
    # Text fields padded with tabs, as in the official songs_info.csv (JukeMIR's and
    # SemiSupCon's readers strip every field), a byte-order mark and Windows line ends.
    write_text(os.path.join(folder, "songs_info.csv"),
               "\ufeffsong_id,file_name,Artist,Song title,start of the segment (min.sec),end of the segment (min.sec),"
               "Genre,Mediaeval 2013 set\n"
               f"2,2.mp3,\"{train_artist}, feat. X\",Song,0.00,0.45,Blues,development\n"
               f"3,3.mp3,{val_artist}\t,Song,0.00,0.45,Blues,development\t\n"
               f"4,4.mp3\t,{train_artist}\t,Song\t,0.00,0.45,Rock\t,evaluation\n"
               f"5,5.mp3,{train_artist},Song,0.00,0.45,Rock,development\n")
    write_text(os.path.join(folder, "static_annotations.csv"),
               "song_id, mean_arousal, std_arousal, mean_valence, std_valence\r\n"
               "2,3.1,0.94,3,0.63\r\n"
               "3,4.5,1.2,7.25,1.1\r\n"
               "4,6,1,5.5,1\r\n"
               "5,5,1,5,1\r\n")
    for song in (2, 3, 4):
        write_placeholder(os.path.join(root, "clips_45seconds", f"{song}.mp3"))
    return train_artist, val_artist


def test_emomusic(tmp_path, capsys):
    train_artist, val_artist = make_emomusic(tmp_path)
    frame = manifests.build_manifest("emomusic", str(tmp_path))
    assert "dropped 1 of 4 rows" in capsys.readouterr().out
    assert as_lists(frame) == {
        "path": [str(tmp_path / "clips_45seconds" / f"{song}.mp3") for song in (2, 3, 4)],
        "split": ["train", "val", "test"],
        "arousal": [3.1, 4.5, 6.0],
        "valence": [3.0, 7.25, 5.5],
    }


def test_emomusic_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="static_annotations.csv"):
        manifests.build_manifest("emomusic", str(tmp_path))
    make_emomusic(tmp_path, in_annotations_folder=False)
    with open(tmp_path / "static_annotations.csv", "a", encoding="utf-8") as handle:
        handle.write("9,5,1,5,1\n")
    with pytest.raises(ValueError, match=r"static_annotations.csv, line 6: song 9 has no row in"):
        manifests.build_manifest("emomusic", str(tmp_path))
    with open(tmp_path / "static_annotations.csv", "a", encoding="utf-8") as handle:
        handle.write("x,high\n")
    with open(tmp_path / "songs_info.csv", "a", encoding="utf-8") as handle:
        handle.write("9,9.mp3,Someone,Song,0.00,0.45,Pop,training\n")
    with pytest.raises(ValueError, match=r"songs_info.csv, line 6: expected a numeric song_id and a Mediaeval"):
        manifests.build_manifest("emomusic", str(tmp_path))


# ---------------------------------------------------------------- MedleyDB

# Two templates copying the official files' structure (marl/medleydb,
# medleydb/data/Metadata/*.yaml, as yaml.safe_dump writes them): 122 of the 330 files have
# top-level block lists at column 0 (composer, producer, website), as A; the others
# have empty quoted fields, "None", "[]" or null, and double-quoted names with escapes, as B.
METADATA_LISTS = """album: Shaking Through Volume 2
artist: ArtistA
composer:
- A Classic Education
- Someone Else
excerpt: 'no'
genre: Singer/Songwriter
has_bleed: 'no'
instrumental: 'no'
mix_filename: {track}_MIX.wav
origin: Weathervane Music
producer:
- Andy Williams
raw_dir: {track}_RAW
stem_dir: {track}_STEMS
stems:
{stems}title: A very long title that a YAML dumper wraps onto a second line because it is
  longer than eighty characters
version: 1.2
website:
- www.shakingthrough.com/{track}
"""

METADATA_QUOTED = """album: None
artist: "Hops \\u2019n Vinyl"
composer: ''
excerpt: 'no'
genre: Jazz
has_bleed: 'yes'
instrumental: 'yes'
mix_filename: {track}_MIX.wav
origin: Dolan Studio
producer: ''
raw_dir: {track}_RAW
stem_dir: {track}_STEMS
stems:
{stems}title: "You\\u2019re a Mystery"
version: 1.2
website: []
"""


def stem_block(index, track, instrument_lines, raw_instrument="something else"):
    return (f"  S{index:02d}:\n"
            f"    component: ''\n"
            f"    filename: {track}_STEM_{index:02d}.wav\n"
            + instrument_lines +
            f"    raw:\n"
            f"      R01:\n"
            f"        filename: {track}_RAW_{index:02d}_01.wav\n"
            f"        instrument: {raw_instrument}\n")


def make_medleydb(root):
    """Two tracks; track A has 10 violin stems, track B one stem per other instrument.

    22 instruments in all with enough stems: violin (10), then 'flute' and 21 others with
    one stem each, so the top 20 keeps violin and the 19 alphabetically first singletons.
    Track B's file starts with a byte-order mark and a comment and has Windows line ends.
    """
    singletons = [f"instrument {chr(97 + i)}" for i in range(21)]
    track_a, track_b = "ArtistA_SongA", "ArtistB_SongB"
    stems_a = "".join(stem_block(i + 1, track_a, "    instrument: violin\n") for i in range(10))
    stems_a += stem_block(11, track_a, "    instrument: Main System\n")
    stems_b = "".join(stem_block(i + 1, track_b, f"    instrument: '{name}'\n") for i, name in enumerate(singletons))
    # As Adele_SomeoneLikeYou S02: "instrument: " (a trailing space), an indented list.
    stems_b += stem_block(22, track_b, "    instrument: \n      - electric bass\n      - synthesizer\n",
                          raw_instrument="\n          - electric bass\n          - synthesizer")
    # As AHa_TakeOnMe S02: a list at the key's own indentation.
    stems_b += stem_block(23, track_b, "    instrument:\n    - clarinet\n")
    stems_b += stem_block(24, track_b, '    instrument: "clarinet"\n')
    audio = os.path.join(root, "Audio")
    write_text(os.path.join(audio, track_a, f"{track_a}_METADATA.yaml"),
               METADATA_LISTS.format(track=track_a, stems=stems_a))
    # Track B's metadata sits in the repository's Metadata folder, apart from the audio.
    text_b = "\ufeff# MedleyDB 1.2 metadata\n" + METADATA_QUOTED.format(track=track_b, stems=stems_b)
    path_b = os.path.join(root, "medleydb", "data", "Metadata", f"{track_b}_METADATA.yaml")
    os.makedirs(os.path.dirname(path_b), exist_ok=True)
    with open(path_b, "w", encoding="utf-8", newline="\r\n") as handle:
        handle.write(text_b)
    paths = {}
    for track, count in ((track_a, 11), (track_b, 24)):
        for index in range(1, count + 1):
            if (track, index) != (track_b, 21):  # 'instrument u' has no audio
                paths[(track, index)] = write_wav(os.path.join(audio, track, f"{track}_STEMS",
                                                               f"{track}_STEM_{index:02d}.wav"))
    return track_a, track_b, singletons, paths


def test_medleydb(tmp_path, capsys):
    track_a, track_b, singletons, paths = make_medleydb(tmp_path)
    frame = manifests.build_manifest("medleydb", str(tmp_path))
    out = capsys.readouterr().out
    assert "left out 1 stems of" in out and "1 stems with several instruments" in out
    assert "dropped 1 of 33 rows whose audio is absent" in out
    # clarinet (2 stems) and violin (10) lead; 18 of the 20 remaining singletons fit.
    assert "left out 2 stems of 2 instruments outside the 20 most frequent" in out
    kept_singletons = singletons[:18]
    assert sorted(set(frame["instrument"])) == sorted(["violin", "clarinet", *kept_singletons])
    violin = frame[frame["instrument"] == "violin"]
    keys = [f"{track_a}/{track_a}_STEM_{i:02d}.wav" for i in range(1, 11)]
    ordered = sorted(keys, key=lambda key: (sha1_int(key), key))
    expected = {paths[(track_a, int(key[-6:-4]))]: "test" if i == 0 else "val" if i == 1 else "train"
                for i, key in enumerate(ordered)}
    assert dict(zip(violin["path"], violin["split"])) == expected
    clarinet = frame[frame["instrument"] == "clarinet"]
    assert clarinet["path"].tolist() == [paths[(track_b, 23)], paths[(track_b, 24)]]
    assert clarinet["split"].tolist() == ["train", "train"]
    first = frame[frame["instrument"] == "instrument a"]
    assert first["path"].tolist() == [paths[(track_b, 1)]]


def test_medleydb_metadata_reads_top_level_lists_quoting_bom_and_crlf(tmp_path):
    track_a, track_b, singletons, paths = make_medleydb(tmp_path)
    metadata_a = os.path.join(tmp_path, "Audio", track_a, f"{track_a}_METADATA.yaml")
    stem_dir, stems = manifests.parse_medleydb_metadata(metadata_a)
    assert stem_dir == f"{track_a}_STEMS"
    assert [stem_id for stem_id, _, _ in stems] == [f"S{i:02d}" for i in range(1, 12)]
    assert stems[0] == ("S01", f"{track_a}_STEM_01.wav", ["violin"])
    assert stems[10] == ("S11", f"{track_a}_STEM_11.wav", ["Main System"])
    metadata_b = os.path.join(tmp_path, "medleydb", "data", "Metadata", f"{track_b}_METADATA.yaml")
    with open(metadata_b, "rb") as handle:
        raw = handle.read()
    assert raw.startswith(b"\xef\xbb\xbf#") and b"composer: ''\r\n" in raw
    stem_dir, stems = manifests.parse_medleydb_metadata(metadata_b)
    assert stem_dir == f"{track_b}_STEMS"
    assert stems[0] == ("S01", f"{track_b}_STEM_01.wav", ["instrument a"])
    assert stems[21:] == [("S22", f"{track_b}_STEM_22.wav", ["electric bass", "synthesizer"]),
                          ("S23", f"{track_b}_STEM_23.wav", ["clarinet"]),
                          ("S24", f"{track_b}_STEM_24.wav", ["clarinet"])]


def test_medleydb_reads_each_track_once_preferring_the_repository_copy(tmp_path, capsys):
    track_a, track_b, singletons, paths = make_medleydb(tmp_path)
    # The repository's copy of track A relabels its first stem; the audio release's copy stays.
    with open(os.path.join(tmp_path, "Audio", track_a, f"{track_a}_METADATA.yaml"), encoding="utf-8") as handle:
        text = handle.read()
    write_text(os.path.join(tmp_path, "medleydb", "data", "Metadata", f"{track_a}_METADATA.yaml"),
               text.replace("    instrument: violin\n", "    instrument: clarinet\n", 1))
    frame = manifests.build_manifest("medleydb", str(tmp_path))
    assert "1 tracks have metadata in two or more places" in capsys.readouterr().out
    assert frame["path"].is_unique
    assert frame.loc[frame["path"] == paths[(track_a, 1)], "instrument"].tolist() == ["clarinet"]
    assert (frame["instrument"] == "violin").sum() == 9


def test_medleydb_metadata_errors(tmp_path):
    track_a, track_b, singletons, paths = make_medleydb(tmp_path)
    metadata = os.path.join(tmp_path, "Audio", track_a, f"{track_a}_METADATA.yaml")
    with open(metadata, encoding="utf-8") as handle:
        text = handle.read()
    lines = text.splitlines()
    write_text(metadata, text.replace("    filename: ArtistA_SongA_STEM_03.wav\n", ""))
    with pytest.raises(ValueError, match=rf"ArtistA_SongA_METADATA.yaml, line {lines.index('  S03:') + 1}: "
                                         rf"stem S03 lacks 'filename'"):
        manifests.build_manifest("medleydb", str(tmp_path))
    write_text(metadata, text.replace("    instrument: violin\n", "    instrument: ''\n", 1))
    with pytest.raises(ValueError, match=rf"line {lines.index('  S01:') + 1}: stem S01 lacks 'instrument'"):
        manifests.build_manifest("medleydb", str(tmp_path))
    # A tab where the file indents with spaces is not YAML; the parser names the line.
    tabbed = lines.index("    filename: ArtistA_SongA_STEM_02.wav") + 1
    write_text(metadata, text.replace("    filename: ArtistA_SongA_STEM_02.wav",
                                      "\tfilename: ArtistA_SongA_STEM_02.wav"))
    with pytest.raises(manifests.FormatError, match=rf"ArtistA_SongA_METADATA.yaml, line {tabbed}: not valid YAML"):
        manifests.build_manifest("medleydb", str(tmp_path))
    write_text(metadata, text.replace(f"stem_dir: {track_a}_STEMS\n", ""))
    with pytest.raises(ValueError, match=r"no top-level 'stem_dir' field"):
        manifests.build_manifest("medleydb", str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="_METADATA.yaml"):
        manifests.build_manifest("medleydb", str(empty))


def test_medleydb_reads_the_official_metadata_files_when_a_copy_is_at_hand():
    """Runs on the 330 official files when MEDLEYDB_METADATA names their folder; skipped otherwise."""
    folder = os.environ.get("MEDLEYDB_METADATA")
    if not folder:
        pytest.skip("set MEDLEYDB_METADATA to a copy of medleydb/data/Metadata to run this")
    files = sorted(name for name in os.listdir(folder) if name.endswith("_METADATA.yaml"))
    stems = [stem for name in files for stem in manifests.parse_medleydb_metadata(os.path.join(folder, name))[1]]
    assert len(files) == 330 and len(stems) == 2014
    assert sum(len(instruments) > 1 for _, _, instruments in stems) == 106


# ---------------------------------------------------------------- registry and command line

@pytest.mark.parametrize("name", sorted(manifests.BUILDERS))
def test_a_missing_root_is_a_user_error_for_every_builder(tmp_path, name):
    with pytest.raises(manifests.MissingFileError, match="is not a folder; pass --root"):
        manifests.build_manifest(name, str(tmp_path / "absent"))


def test_builders_cover_the_documented_names():
    assert set(manifests.BUILDERS) == set(manifests.LABELS) == set(manifests.DATA_FOLDERS)
    assert {data_set for data_set, *_ in manifests.PAPER_PROBES} <= set(manifests.BUILDERS)
    with pytest.raises(ValueError, match="unknown data set 'fma'"):
        manifests.build_manifest("fma", "anywhere")


def test_command_line_writes_a_manifest_that_reads_back(tmp_path, capsys):
    make_gtzan(tmp_path / "gtzan")
    out = tmp_path / "manifests" / "gtzan.csv"
    assert manifests.main(["gtzan", "--root", str(tmp_path / "gtzan"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 4 rows" in printed and "--label-column genre --task multiclass" in printed
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(frame.columns) == ["path", "split", "genre"]
    assert all(os.path.isabs(path) and os.path.isfile(path) for path in frame["path"])
    assert frame["split"].tolist() == ["train", "train", "val", "test"]


def test_command_line_out_folder_takes_the_data_set_name(tmp_path, capsys):
    make_gtzan(tmp_path / "gtzan")
    assert manifests.main(["gtzan", "--root", str(tmp_path / "gtzan"), "--out", str(tmp_path / "out") + "/"]) == 0
    assert (tmp_path / "out" / "gtzan.csv").is_file()
    with pytest.raises(utils.UserError, match="is a file; for all, give the folder"):
        manifests.main(["all", "--root", str(tmp_path), "--out", str(tmp_path / "out" / "gtzan.csv")])


def test_command_line_keeps_empty_label_cells_empty(tmp_path):
    make_magnatagatune(tmp_path / "mtat")
    out = tmp_path / "mtat.csv"
    assert manifests.main(["magnatagatune", "--root", str(tmp_path / "mtat"), "--out", str(out)]) == 0
    with open(out, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert lines[0] == "path,split,tags"
    assert lines[4] == f"{tmp_path / 'mtat' / 'd' / 'artist-album-11-track-0-29.mp3'},test,"


def test_command_line_reports_bad_input_as_one_line_and_exit_status_2(tmp_path):
    # The behaviour utils.run_cli gives every script: no traceback, exit status 2.
    result = subprocess.run([sys.executable, MANIFESTS, "nsynth", "--root", str(tmp_path), "--out",
                             str(tmp_path / "x.csv")], capture_output=True, text=True, env=SUBPROCESS_ENV)
    assert result.returncode == 2
    assert result.stderr.startswith("manifests.py: error: nsynth: expected the official file ")
    assert "nsynth-train/examples.json" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.csv").exists()
    with pytest.raises(manifests.MissingFileError):
        manifests.main(["nsynth", "--root", str(tmp_path), "--out", str(tmp_path / "x.csv")])


def make_data_root(root):
    """A data root with GTZAN, NSynth, VocalSet (1.2), MedleyDB and EmoMusic in their folders."""
    make_gtzan(os.path.join(root, "gtzan"), naming="semisupcon")
    make_nsynth(os.path.join(root, "nsynth"))
    make_vocalset(os.path.join(root, "vocalset"), release="1.2")
    make_medleydb(os.path.join(root, "medleydb"))
    make_emomusic(os.path.join(root, "emomusic"), in_annotations_folder=False)


def test_all_builds_every_data_set_found_and_the_paper_tasks_file(tmp_path, capsys):
    make_data_root(tmp_path / "data")
    out = tmp_path / "manifests"
    assert manifests.main(["all", "--root", str(tmp_path / "data"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for folder in ("magnatagatune", "mtg-jamendo", "giantsteps"):
        assert f"skipped, {tmp_path / 'data' / folder} is absent" in printed
    assert "magnatagatune, magnatagatune-all: skipped" in printed
    built = ["gtzan", "nsynth", "vocalset-singer", "vocalset-technique", "emomusic", "medleydb"]
    assert sorted(os.listdir(out)) == sorted([f"{name}.csv" for name in built] + ["tasks.csv"])
    for name in built:
        expected = manifests.build_manifest(name, str(tmp_path / "data" / manifests.DATA_FOLDERS[name]))
        written = pd.read_csv(out / f"{name}.csv", dtype=str, keep_default_na=False)
        assert written["path"].tolist() == expected["path"].tolist() and len(written) > 0
    with open(out / "tasks.csv", encoding="utf-8") as handle:
        assert handle.read().splitlines() == [
            "name,csv,label_column,task,label_kind,head,patience",
            "gtzan,gtzan.csv,genre,multiclass,generic,mlp,50",
            "nsynth-pitch,nsynth.csv,pitch,multiclass,pitch,mlp,2",
            "nsynth-instrument-family,nsynth.csv,instrument_family,multiclass,generic,mlp,2",
            "vocalset-singer,vocalset-singer.csv,singer,multiclass,generic,linear,50",
            "vocalset-technique,vocalset-technique.csv,technique,multiclass,generic,linear,50",
            "medleydb,medleydb.csv,instrument,multiclass,generic,linear,10",
            'emomusic,emomusic.csv,"arousal,valence",regression,generic,linear,200',
        ]


def test_all_tasks_file_reads_back_through_probe_and_datasets(tmp_path):
    make_data_root(tmp_path / "data")
    out = tmp_path / "manifests"
    manifests.build_all(str(tmp_path / "data"), str(out))
    import datasets
    import probe
    args = probe.build_parser().parse_args(["--checkpoint", "random", "--tasks", str(out / "tasks.csv")])
    probes = probe.probe_list(args)
    assert [entry.name for entry in probes] == ["gtzan", "nsynth-pitch", "nsynth-instrument-family",
                                                "vocalset-singer", "vocalset-technique", "medleydb", "emomusic"]
    assert [entry.patience for entry in probes] == [50, 2, 2, 50, 50, 10, 200]
    for entry in probes:
        assert entry.csv == str(out / os.path.basename(entry.csv))
        is_mlp = entry.name in ("gtzan", "nsynth-pitch", "nsynth-instrument-family")
        assert entry.head == ("mlp" if is_mlp else "linear")
        manifest = datasets.read_manifest(entry.csv)
        datasets.parse_labels(manifest, entry.label_column, entry.task, entry.label_kind)


def test_all_goes_on_past_a_broken_data_set_and_exits_2(tmp_path, capsys):
    make_data_root(tmp_path / "data")
    os.remove(tmp_path / "data" / "nsynth" / "nsynth-valid" / "examples.json")
    out = tmp_path / "manifests"
    with pytest.raises(utils.UserError, match=r"1 data set\(s\) could not be built \(nsynth;"):
        manifests.main(["all", "--root", str(tmp_path / "data"), "--out", str(out)])
    captured = capsys.readouterr()
    assert "nsynth: error: nsynth: expected the official file" in captured.err
    with open(out / "tasks.csv", encoding="utf-8") as handle:
        assert "nsynth" not in handle.read()
    assert (out / "gtzan.csv").is_file() and not (out / "nsynth.csv").exists()
    with pytest.raises(manifests.MissingFileError, match="no data set under"):
        manifests.main(["all", "--root", str(tmp_path / "nothing"), "--out", str(out)])
