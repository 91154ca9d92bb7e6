"""Your own music in, embeddings out: a folder laid out like a real library, scanned into a
manifest, pretrained on, and embedded three ways (export, the probe's function, load_pretrained)."""
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import datasets
import export
import models
import probe
import safety
import similar
import train
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--encoder", "samplecnn", "--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", "8000",
        "--batch-size", "8", "--workers", "0", "--log-every", "1", "--val-every", "0", "--augment", "none",
        "--max-bad-fraction", "0.2"]
# (artist, album, format, rate, channels, genre or "") per album; two tracks each.
ALBUMS = [
    ("Ånglar Trio", "First Light (2019)", "WAV", 22050, 1, "jazz"),
    ("Ånglar Trio", "Nattsång (2021)", "FLAC", 44100, 2, "jazz"),
    ("Ånglar Trio", "Live at Fasching (2022)", "OGG", 48000, 2, ""),
    ("The Low Hum", "Static Bloom (2015)", "MP3", 44100, 2, "rock"),
    ("The Low Hum", "Greatest Hits (2018)", "FLAC", 22050, 1, "rock"),
    ("Café Orchestra", "Best Of (2018)", "WAV", 48000, 2, ""),
    ("Café Orchestra", "Été (2020)", "MP3", 22050, 1, "pop"),
    ("Müller & Söhne", "Zwei (2017)", "OGG", 44100, 1, ""),
]
SUBTYPES = {"WAV": "PCM_16", "FLAC": "PCM_16", "OGG": "VORBIS", "MP3": "MPEG_LAYER_III"}


def tone(seconds, rate, channels, seed):
    """A decaying chord with a little noise, `[T, channels]` float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(110, 880, size=3)) * np.exp(-t)
    wave = 0.25 * wave + 0.01 * rng.standard_normal(len(t))
    stereo = np.stack([wave, np.roll(wave, 40)], 1)[:, :channels]
    return stereo.astype(np.float32)


def build_library(root):
    """My Music/<Artist>/<Album (year)>/NN - Track … .ext plus a non-audio file, an
    unreadable file, a too-short file and a duplicate. Returns (folder, labels CSV)."""
    music = os.path.join(root, "My Music")
    labels = []
    for a, (artist, album, fmt, rate, channels, genre) in enumerate(ALBUMS):
        folder = os.path.join(music, artist, album)
        os.makedirs(folder, exist_ok=True)
        for n in (1, 2):
            name = f"{n:02d} - Track {n} … {album.split(' (')[0]}.{fmt.lower()}"
            sf.write(os.path.join(folder, name), tone(1.2 + 0.3 * n, rate, channels, 10 * a + n), rate,
                     format=fmt, subtype=SUBTYPES[fmt])
            if genre:
                labels.append({"file": name, "genre": genre})
    with open(os.path.join(music, "Ånglar Trio", "First Light (2019)", "cover.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a picture" * 10)
    with open(os.path.join(music, "The Low Hum", "Static Bloom (2015)", "03 - Broken.flac"), "wb") as f:
        f.write(b"fLaC" + bytes(range(256)) * 4)
    sf.write(os.path.join(music, "Café Orchestra", "Été (2020)", "04 - Blip.wav"), tone(0.1, 22050, 1, 99), 22050)
    original = os.path.join(music, "Ånglar Trio", "First Light (2019)", "01 - Track 1 … First Light.wav")
    shutil.copy(original, os.path.join(music, "Müller & Söhne", "Zwei (2017)", "09 - Same Song.wav"))
    labels_csv = os.path.join(root, "genres.csv")
    pd.DataFrame(labels).to_csv(labels_csv, index=False)
    return music, labels_csv


def run_script(*args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("library"))
    return (root, *build_library(root))


def test_scan_skips_with_reasons_joins_labels_and_never_splits_an_album(library, capsys):
    root, music, labels_csv = library
    command = ["datasets.py", "scan", music, "--out", os.path.join(root, "music.csv"), "--label-from-folder",
               "artist=1", "--labels", labels_csv, "--split", "0.5,0.25,0.25", "--group-by", "-1"]
    result = run_script(*command, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    manifest = datasets.read_manifest(os.path.join(root, "music.csv"))
    skipped = pd.read_csv(os.path.join(root, "music.skipped.csv"))
    reasons = dict(zip(skipped["path"].map(os.path.basename), skipped["reason"]))
    assert reasons["cover.jpg"] == "not audio"
    assert reasons["03 - Broken.flac"].startswith("unreadable (")
    assert reasons["01 - Track 1 … First Light.wav"] == "duplicate of Müller & Söhne/Zwei (2017)/09 - Same Song.wav"
    assert len(manifest) == 2 * len(ALBUMS) - 1 + 2  # the too-short file is kept without --min-seconds
    assert all(os.path.isfile(p) for p in manifest["path"])
    assert set(manifest["sample_rate"]) == {"22050", "44100", "48000"} and set(manifest["channels"]) == {"1", "2"}
    albums = manifest["path"].map(lambda p: os.path.dirname(p))
    assert (manifest.groupby(albums)["split"].nunique() == 1).all()
    assert set(manifest["split"]) == {"train", "val", "test"}
    genres = dict(zip(manifest["path"].map(os.path.basename), manifest["genre"]))
    assert genres["01 - Track 1 … Static Bloom.mp3"] == "rock" and genres["01 - Track 1 … Zwei.ogg"] == ""
    assert manifest["artist"].iloc[0] in {a for a, *_ in ALBUMS}
    first = pd.read_csv(os.path.join(root, "music.csv"))
    capsys.readouterr()
    datasets.main(command[1:4] + [os.path.join(root, "again.csv")] + command[5:] + ["--min-seconds", "0.5"])
    again = capsys.readouterr().out
    assert "1 too short" in again and "04 - Blip.wav: too short (0.10 s" in again
    assert "e.g. '01 - Track 1 … First Light' (a duplicate left out)" in again  # its label row found no file
    second = pd.read_csv(os.path.join(root, "again.csv"))
    kept = first[~first["path"].str.endswith("04 - Blip.wav")].reset_index(drop=True)
    assert kept["split"].tolist() == second["split"].tolist()  # deterministic: same groups, same splits
    with pytest.raises(SystemExit) as exit_status:
        utils.run_cli(datasets.main, ["scan", music, "--out", os.path.join(root, "x.csv"), "--split", "0.9,0.2,0"])
    assert exit_status.value.code == 2 and "error: --split '0.9,0.2,0': give three shares" in capsys.readouterr().err


def test_assign_splits_keeps_groups_whole_and_shares_close():
    groups = [f"artist{g % 7}/album{g}" for g in range(60) for _ in range(g % 5 + 1)]
    splits = datasets.assign_splits(groups, (0.8, 0.1, 0.1), seed=3)
    by_group = pd.Series(splits).groupby(pd.Series(groups)).nunique()
    assert (by_group == 1).all()
    shares = pd.Series(splits).value_counts(normalize=True)
    assert abs(shares["train"] - 0.8) < 0.05 and abs(shares["val"] - 0.1) < 0.05
    assert datasets.assign_splits(groups, (0.8, 0.1, 0.1), seed=3) == splits
    assert datasets.assign_splits(groups, (0.8, 0.1, 0.1), seed=4) != splits


def test_folder_to_pretraining_to_embeddings_three_ways_agree(library, tmp_path, capsys, monkeypatch):
    root, music, _ = library
    monkeypatch.chdir(tmp_path)  # the scans of --csv FOLDER go to ./.cache/scans
    out = str(tmp_path / "run")
    result = train.main(TINY + ["--train-csv", music, "--out", out, "--steps", "2"])
    log = capsys.readouterr().out
    assert f"{music} is a folder: scanning it into {out}" in log
    assert result["out"] == out
    probed = probe.main(["--checkpoint", out, "--csv", music, "--label-column", "folder1", "--max-epochs", "2",
                         "--cache-dir", "none"])
    assert f"{music} is a folder: scanning it into .cache/scans" in capsys.readouterr().out
    assert probed[0]["tracks"]["test"] >= 1 and probed[0]["label_column"] == "folder1"
    exported = str(tmp_path / "emb")
    written = probe.main(["--checkpoint", out, "--csv", music, "--export-embeddings", exported, "--max-clips", "100",
                          "--export-part-files", "4"])
    x, table = np.load(exported + ".npy"), pd.read_csv(exported + ".csv", keep_default_na=False)
    assert x.dtype == np.float32 and x.shape == (len(table), written["dim"]) and not os.path.exists(exported + ".parts")
    assert list(table.columns[:3]) == ["path", "clip", "start_seconds"] and "folder1" in table.columns
    paths = [os.path.normpath(os.path.join(str(tmp_path), p)) for p in table["path"]]
    assert table.loc[table["clip"] == 1, "start_seconds"].eq(0.5).all()
    model, settings = probe.load_encoder(out, probe.finish_args(probe.build_parser().parse_args(
        ["--checkpoint", out])), torch.device("cpu"))
    files = list(dict.fromkeys(paths))
    reference, owners, _, failed = export.embed_files(model, files, settings, "encoder", torch.device("cpu"), 100)
    assert not failed and len(reference) == len(x)
    assert np.allclose(x, reference, atol=1e-5)
    pretrained = models.load_pretrained(out)
    assert not pretrained.training
    for k, path in enumerate(files):
        audio, rate = sf.read(path, dtype="float32", always_2d=True)  # [T, channels]
        h = pretrained.embed(audio.T, rate)  # [clips, D]
        assert torch.allclose(h, torch.from_numpy(x[owners == k]), atol=1e-5), path
    tracks = probe.main(["--checkpoint", out, "--csv", music, "--export-embeddings", str(tmp_path / "tracks"),
                         "--per-track", "--layer", "projection"])
    per_track = np.load(str(tmp_path / "tracks.npy"))
    assert per_track.shape == (len(files), 128) and tracks["rows"] == len(files)
    projection = models.load_pretrained(out, layer="projection")
    audio, rate = sf.read(files[0], dtype="float32", always_2d=True)
    assert torch.allclose(projection.embed(audio.T, rate, max_clips=16).mean(0), torch.from_numpy(per_track[0]),
                          atol=1e-5)


def test_export_resumes_from_finished_parts(library, tmp_path, monkeypatch):
    root, music, _ = library
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "run")
    train.main(TINY + ["--train-csv", music, "--out", out, "--steps", "1"])
    flags = ["--checkpoint", out, "--csv", music, "--export-part-files", "5"]
    probe.main(flags + ["--export-embeddings", str(tmp_path / "whole")])
    original, reads = datasets.read_kept_clips, []

    def failing_read(path, *args, **kwargs):
        reads.append(path)
        if len(reads) == 8:
            raise KeyboardInterrupt
        return original(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "read_kept_clips", failing_read)
    with pytest.raises(KeyboardInterrupt):
        probe.main(flags + ["--export-embeddings", str(tmp_path / "resumed")])
    assert sorted(os.listdir(tmp_path / "resumed.parts")) == ["export.lock", "job.json", "part-00000.npz"]
    reads.clear()
    monkeypatch.setattr(datasets, "read_kept_clips", lambda *a, **k: reads.append(a[0]) or original(*a, **k))
    probe.main(flags + ["--export-embeddings", str(tmp_path / "resumed")])
    total = len(pd.read_csv(str(tmp_path / "whole.csv"))["path"].unique())
    assert len(reads) == total - 5  # the first part was not read again
    assert np.array_equal(np.load(str(tmp_path / "whole.npy")), np.load(str(tmp_path / "resumed.npy")))
    assert pd.read_csv(str(tmp_path / "whole.csv")).equals(pd.read_csv(str(tmp_path / "resumed.csv")))


def test_torch_hub_loads_the_checkpoint_from_the_local_repository(library, tmp_path, monkeypatch):
    root, music, _ = library
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "run")
    train.main(TINY + ["--train-csv", music, "--out", out, "--steps", "1"])
    hub = torch.hub.load(ROOT, "semisupcon", source="local", checkpoint=out)
    direct = models.load_pretrained(out)
    wave = torch.randn(2, 12345)
    assert torch.equal(hub.embed(wave, 16000), direct.embed(wave, 16000))
    assert hub.embed(wave, 16000).shape == (int(12345 / 16000 * 8000 / 4000 + 0.5), direct.model.encoder.embed_dim)


def test_decoder_warnings_are_caught_counted_and_shown_once_per_file(tmp_path, capfd):
    rate = 44100
    path = str(tmp_path / "damaged.mp3")
    sf.write(path, tone(3.0, rate, 2, 1), rate, format="MP3")
    data = bytearray(open(path, "rb").read())
    rng = np.random.default_rng(0)
    for position in rng.integers(500, len(data) // 2, size=40):  # damaged frames in the first second too
        data[position:position + 8] = rng.integers(0, 256, size=8).astype(np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(bytes(data))
    capfd.readouterr()
    datasets.DECODER_WARNINGS.clear()
    clips = datasets.read_clips(path, 4000, 8000)
    first = datasets.DECODER_WARNINGS[path]
    datasets.read_clips(path, 4000, 8000)
    captured = capfd.readouterr()
    assert clips.shape[1] == 4000 and first >= 1 and datasets.DECODER_WARNINGS[path] == 2 * first
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"decoder warnings: {path}: ")
    assert "mpg123" in lines[0] or "Note:" in lines[0] or "error" in lines[0]
    datasets.DECODER_WARNINGS.clear()
    report = datasets.scan_folder(str(tmp_path), str(tmp_path / "scan.csv"))
    captured = capfd.readouterr()
    assert report["rows"] == 1 and report["decoder_warnings"] == 1
    assert [line.split(":")[0] for line in captured.err.splitlines() if line.strip()] == ["decoder warnings"]
    assert "1 kept file(s) made the decoder print warnings" in captured.out
    # Each redirect gives fd 2 back and closes what it opened: no descriptor leaks over many reads.
    descriptors = len(os.listdir("/proc/self/fd"))
    target = os.readlink("/proc/self/fd/2")
    for _ in range(200):
        with datasets.decoder_messages(path):
            pass
    assert len(os.listdir("/proc/self/fd")) == descriptors and os.readlink("/proc/self/fd/2") == target


def doc_blocks(language):
    with open(os.path.join(ROOT, "docs", "own-music.md"), encoding="utf-8") as f:
        text = f.read()
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


# Added to the docs' commands to keep the test to seconds: a tiny model, two steps, and
# album shares that give this small library labeled files in every split.
SMALL = {"datasets.py": ["--split", "0.5,0.25,0.25"], "train.py": TINY + ["--steps", "2"],
         "probe.py": ["--max-epochs", "2"], "similar.py": []}
SONG = os.path.join("My Music", "Ånglar Trio", "Nattsång (2021)", "01 - Track 1 … Nattsång.flac")


def test_the_docs_commands_and_python_snippet_run_as_written(library, tmp_path, monkeypatch, capsys):
    root, music, labels_csv = library
    shutil.copytree(music, tmp_path / "My Music")
    shutil.copy(labels_csv, tmp_path / "genres.csv")
    shutil.copy(tmp_path / SONG, tmp_path / "song.flac")  # a song of the library under another name
    monkeypatch.chdir(tmp_path)
    commands = [line for line in doc_blocks("bash")[0].splitlines() if line.startswith("python ")]
    scripts = {"datasets.py": datasets.main, "train.py": train.main, "probe.py": probe.main, "similar.py": similar.main}
    assert [c.split()[1] for c in commands] == ["datasets.py", "train.py", "probe.py", "probe.py", "similar.py",
                                                "similar.py"]
    for command in commands:  # in this process: `python X.py ARGS` is X.main(ARGS)
        words = shlex.split(command)[1:]
        scripts[words[0]](words[1:] + SMALL[words[0]])
    printed = capsys.readouterr().out
    assert "| checkpoint |" in printed and os.path.isfile(tmp_path / "runs" / "my-music-probe.json")
    assert glob.glob(str(tmp_path / "runs" / "my-music-probe-plots" / "*" / "*.png"))
    x = np.load(tmp_path / "runs" / "my-music-embeddings.npy")
    table = pd.read_csv(tmp_path / "runs" / "my-music-embeddings.csv")
    assert len(x) == len(table) and table["path"].map(lambda p: os.path.isfile(tmp_path / "runs" / p)).all()
    song = next(p for p in table["path"] if p.endswith(os.path.basename(SONG)))
    lines = printed.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("nearest 10 of "))) + 1
    nearest = [line.split(None, 2) for line in lines[first:first + 10]]  # [rank, similarity, path]
    # The copy finds its original at similarity 1. The docs' model trains 2 steps here, so other
    # tracks may tie with it at 4 decimals and come first by float rounding: the original is
    # among the top's ties (tests/test_similar.py checks the order with a trained encoder).
    assert nearest[0][1] == "1.0000" and SONG in [path for _, similarity, path in nearest if similarity == "1.0000"]
    neighbours = pd.read_csv(tmp_path / "runs" / "my-music-neighbours.csv")
    assert set(neighbours["path"]) == set(table["path"]) and (neighbours["path"] != neighbours["neighbour"]).all()
    result = subprocess.run([sys.executable, "-c", doc_blocks("python")[0]], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}, timeout=120)
    assert result.returncode == 0, result.stderr
    clips = int((table["path"] == song).sum())
    assert result.stdout.strip() == f"torch.Size([{clips}, {x.shape[1]}])"


def test_scan_joins_by_path_groups_by_artist_and_names_bad_label_files(library, tmp_path, capsys):
    root, music, _ = library
    labels = tmp_path / "by-path.csv"
    pd.DataFrame({"where": ["Ånglar Trio/Nattsång (2021)/01 - Track 1 … Nattsång.flac", "Nowhere/x.wav"],
                  "mood": ["calm", "lost"]}).to_csv(labels, index=False)
    out = str(tmp_path / "m.csv")
    report = datasets.scan_folder(music, out, folder_labels=[("artist", 1), ("album", -1)], labels_csv=str(labels),
                                  join_on="path", split=(0.5, 0.25, 0.25), group_by=1)
    manifest = pd.read_csv(out, keep_default_na=False)
    assert (manifest["mood"] == "calm").sum() == 1 and report["unmatched_labels"] == 1
    assert (manifest.groupby("artist")["split"].nunique() == 1).all()
    assert manifest["album"].str.match(r".+ \(\d{4}\)$").all()
    assert "1 row(s) of" in capsys.readouterr().out
    pd.DataFrame({"file": ["a", "a"], "genre": ["x", "y"]}).to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(utils.UserError, match="appear on several rows, e.g. 'a'"):
        datasets.scan_folder(music, out, labels_csv=str(tmp_path / "twice.csv"))
    with pytest.raises(utils.UserError, match="--join-column 'name' is not a column"):
        datasets.scan_folder(music, out, labels_csv=str(labels), join_column="name")
    with pytest.raises(utils.UserError, match="not a folder"):
        datasets.scan_folder(str(tmp_path / "missing"), out)


def test_load_pretrained_names_a_broken_checkpoint(tmp_path):
    broken = tmp_path / "checkpoint-00000004.pt"
    broken.write_bytes(b"PK\x03\x04 torn in the middle")
    with pytest.raises(safety.CheckpointError, match="checkpoint-00000004.pt.*(truncated|damaged|cannot)"):
        models.load_pretrained(str(broken))
    (tmp_path / "empty-run").mkdir()
    with pytest.raises(safety.CheckpointError, match="no checkpoint"):
        models.load_pretrained(str(tmp_path / "empty-run"))
