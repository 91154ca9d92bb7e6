"""similar.py: the exact search in blocks and the retrieval metrics against brute-force Python
references, and "more like this" on a synthesised library, as a command."""
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import export
import similar
import train
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATE = 8000


def cosine(a, b):
    """Cosine similarity of two lists of floats, in plain Python."""
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def ranked(query, rows, skip=None):
    """Indices of `rows` by decreasing cosine similarity to `query` (ties by index), without `skip`."""
    return sorted((j for j in range(len(rows)) if j != skip), key=lambda j: (-cosine(query, rows[j]), j))


# ---------------------------------------------------------------- against brute force

@pytest.mark.parametrize("block", [1, 4, 1000])
def test_nearest_in_blocks_equals_a_full_sort(block):
    rng = np.random.default_rng(block)
    library = rng.standard_normal((37, 5)).astype(np.float32)
    queries = library[[3, 8, 20, 36]] + 0.3 * rng.standard_normal((4, 5)).astype(np.float32)
    similarity, index = similar.nearest(torch.from_numpy(queries), torch.from_numpy(library), 6, block)
    rows = library.tolist()
    for q, query in enumerate(queries.tolist()):
        expected = ranked(query, rows)[:6]
        assert index[q].tolist() == expected
        assert similarity[q].tolist() == pytest.approx([cosine(query, rows[j]) for j in expected], abs=1e-5)
    similarity, index = similar.nearest(torch.from_numpy(library), torch.from_numpy(library), 50, block,
                                        exclude=np.arange(37))
    assert index.shape == (37, 36)  # k is capped at the other rows
    for q in range(37):
        assert index[q].tolist() == ranked(rows[q], rows, skip=q)


def test_track_retrieval_equals_a_brute_force_reference():
    rng = np.random.default_rng(0)
    counts = [4, 1, 5, 2, 3, 6, 2]  # a one-clip track only adds a candidate
    owners = np.repeat(np.array([10, 11, 12, 13, 14, 15, 16]), counts)
    centres = rng.standard_normal((len(counts), 8))
    x = np.repeat(centres, counts, 0) + 1.2 * rng.standard_normal((len(owners), 8))
    position = np.concatenate([np.arange(c) for c in counts])
    order = np.lexsort((owners, position))  # interleaved: a track's clips need not be adjacent, only in time order
    x, owners = x[order], owners[order]
    rows = x.tolist()
    queries, candidates = [], []
    for track in np.unique(owners):
        mine = [i for i in range(len(owners)) if owners[i] == track]
        queries += mine[:len(mine) // 2]
        candidates += mine[len(mine) // 2:]
    top1, reciprocal = [], []
    for q in queries:
        similarities = {c: cosine(rows[q], rows[c]) for c in candidates}
        best_own = max(s for c, s in similarities.items() if owners[c] == owners[q])
        rank = 1 + sum(1 for c, s in similarities.items() if owners[c] != owners[q] and s >= best_own)
        top1.append(rank == 1)
        reciprocal.append(1 / rank)
    result = similar.track_retrieval(torch.tensor(x, dtype=torch.float32), owners)
    assert 0 < np.mean(top1) < 1  # the data are hard enough to tell a wrong rank from a right one
    assert result["track_top1"] == pytest.approx(np.mean(top1))
    assert result["track_mrr"] == pytest.approx(np.mean(reciprocal))


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_label_retrieval_equals_a_brute_force_reference(task):
    rng = np.random.default_rng(1)
    n = 23
    if task == "multiclass":
        labels = np.array([0] * 7 + [1] * 6 + [2] * 9 + [3])  # class 3 has one track: no relevant, left out
        is_relevant = lambda i, j: labels[i] == labels[j]  # noqa: E731
    else:
        labels = (rng.random((n, 4)) < 0.25).astype(np.float32)
        labels[5] = 0  # no tag: no relevant track
        is_relevant = lambda i, j: bool((labels[i] * labels[j]).sum() > 0)  # noqa: E731
    x = rng.standard_normal((n, 6)) + 0.8 * np.eye(n, 6)[np.asarray(labels if task == "multiclass" else
                                                                   labels.argmax(1), dtype=int)]
    rows = x.tolist()
    precisions, averages = [], []
    for i in range(n):
        order = ranked(rows[i], rows, skip=i)
        hits = [is_relevant(i, j) for j in order]
        if not any(hits):
            continue
        precisions.append(sum(hits[:10]) / 10)
        found, total = 0, 0.0
        for rank, hit in enumerate(hits, 1):
            if hit:
                found += 1
                total += found / rank
        averages.append(total / sum(hits))
    result = similar.label_retrieval(torch.tensor(x, dtype=torch.float32), torch.as_tensor(labels), task)
    assert 0 < len(averages) < n  # some queries have no relevant track: they are left out
    assert result["label_p10"] == pytest.approx(np.mean(precisions))
    assert result["label_map"] == pytest.approx(np.mean(averages))


def test_retrieval_metrics_use_track_means_and_skip_labels_for_regression():
    rng = np.random.default_rng(2)
    owners = np.repeat(np.arange(6), 4)
    x = torch.tensor(rng.standard_normal((24, 5)), dtype=torch.float32)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    result = similar.retrieval_metrics(x, owners, labels, "multiclass")
    means = export.track_embeddings(x, owners, np.arange(6))
    assert result == similar.track_retrieval(x, owners) | similar.label_retrieval(means, labels, "multiclass")
    assert set(similar.retrieval_metrics(x, owners, torch.zeros(6, 2), "regression")) == {"track_top1", "track_mrr"}


# ---------------------------------------------------------------- more like this on a library

def track_audio(index, seconds=2.0):
    """Track `index`, steady in time, unlike the others: a sine, square, sawtooth or band of
    noise (index % 4) at a pitch of its own (index), at a level of its own `[T]`."""
    rng = np.random.default_rng(index)
    t = np.arange(int(seconds * RATE)) / RATE
    phase = (100 * 1.5 ** index * t) % 1.0
    kind = index % 4
    if kind == 0:
        wave = np.sin(2 * np.pi * phase)
    elif kind == 1:
        wave = np.sign(np.sin(2 * np.pi * phase))
    elif kind == 2:
        wave = 2 * phase - 1
    else:
        noise = np.fft.rfft(rng.standard_normal(len(t)))
        frequencies = np.fft.rfftfreq(len(t), 1 / RATE)
        wave = np.fft.irfft(noise * (np.abs(frequencies - 100 * 1.5 ** index) < 200), len(t))
        wave /= np.abs(wave).max()
    return ((0.1 + 0.04 * index) * wave).astype(np.float32)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A folder of 8 synthesised tracks (Artist/Album/NN.wav) and a checkpoint trained on it for 2 steps."""
    root = tmp_path_factory.mktemp("similar")
    for index in range(8):
        folder = root / "Library" / f"Artist {index % 2}" / f"Album {index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        sf.write(str(folder / f"{index:02d} - Tone.wav"), track_audio(index), RATE)
    out = str(root / "run")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        train.main(["--encoder", "samplecnn", "--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", str(RATE),
                    "--train-csv", str(root / "Library"), "--out", out, "--steps", "2", "--batch-size", "4",
                    "--workers", "0", "--val-every", "0", "--augment", "none"])
    finally:
        os.chdir(cwd)
    return root, out


def run_script(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "similar.py"), *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_a_tracks_other_clips_are_nearer_than_any_other_track(library):
    root, checkpoint = library
    paths = sorted(str(p) for p in (root / "Library").rglob("*.wav"))
    model, settings = export.load_encoder(checkpoint, None, torch.device("cpu"))
    embedded = export.embed_files(model, paths, settings, "encoder", torch.device("cpu"), 16)
    x = torch.from_numpy(embedded.x)  # [32, E]: 4 clips of 0.5 s per track
    assert np.bincount(embedded.owners).tolist() == [4] * 8
    for track in range(8):
        mine = np.flatnonzero(embedded.owners == track)
        query, others = mine[:1], np.setdiff1d(np.arange(len(x)), mine[:1])
        rest = similar.tracks_of([paths[o] for o in embedded.owners[others]], x[others])
        assert rest.paths[track] == paths[track]  # this track's entry is the mean of its other clips
        _, index = similar.nearest(x[query], rest.x, 8, block=3)
        assert rest.paths[index[0, 0]] == paths[track]


def test_more_like_this_runs_from_a_folder_and_from_an_export(library, tmp_path):
    root, checkpoint = library
    source = sorted((root / "Library").rglob("*.wav"))[5]
    sf.write(str(tmp_path / "excerpt.wav"), track_audio(5)[RATE // 2:], RATE)  # the last 1.5 s of track 5
    done = run_script("--checkpoint", checkpoint, "--csv", str(root / "Library"), "--query", "excerpt.wav", "-k", "3",
                      "--cache-dir", "none", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("nearest 3 of 8 tracks to excerpt.wav"))
    shown = [line.split(None, 2) for line in lines[header + 1:header + 4]]
    assert [rank for rank, _, _ in shown] == ["1", "2", "3"]
    assert os.path.abspath(os.path.join(tmp_path, shown[0][2])) == str(source)
    assert float(shown[0][1]) >= float(shown[1][1]) >= float(shown[2][1])
    stem = str(tmp_path / "emb")
    export.main(["embeddings", "--checkpoint", checkpoint, "--csv", str(root / "Library"), "--out", stem])
    table = pd.read_csv(stem + ".csv")
    row = int(np.flatnonzero(table["path"].str.endswith("05 - Tone.wav"))[2])  # a clip of track 5: its track
    found = similar.main(["--embeddings", stem, "--query", str(row), "-k", "7"])
    assert len(found) == 7 and str(source) not in [p for p, _ in found]  # the query's own track is left out
    assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
    assert similar.main(["--embeddings", stem, "--query", str(source), "-k", "7"]) == found
    written = similar.main(["--embeddings", stem, "-k", "2", "--block-size", "3"])
    assert written == stem + "-neighbours.csv"
    neighbours = pd.read_csv(written)
    assert list(neighbours.columns) == ["path", "rank", "neighbour", "similarity"] and len(neighbours) == 16
    assert (neighbours["path"] != neighbours["neighbour"]).all()
    fifth = neighbours[neighbours["path"].str.endswith("05 - Tone.wav")]
    assert [os.path.normpath(os.path.join(tmp_path, p)) for p in fifth["neighbour"]] == [p for p, _ in found[:2]]
    assert np.allclose(fifth["similarity"], [s for _, s in found[:2]], atol=1e-5)


def test_more_like_this_mistakes_are_one_line(library, tmp_path, capsys):
    root, checkpoint = library
    stem = str(tmp_path / "emb")
    export.main(["embeddings", "--checkpoint", checkpoint, "--csv", str(root / "Library"), "--out", stem,
                 "--per-track"])
    capsys.readouterr()
    for argv, message in [([], "give --embeddings OUT (an export), or --checkpoint C with --csv FOLDER"),
                          (["--embeddings", stem, "--query", "8"], "--query 8: not a row of --embeddings (rows 0 to 7"),
                          (["--embeddings", stem, "--query", "nowhere.wav"], "not a row number, a path of the library"),
                          (["--embeddings", str(tmp_path / "missing")], "missing.npy not found"),
                          (["--checkpoint", checkpoint, "--csv", str(root / "Library"), "--cache-dir",
                            stem + ".npy"], f"--cache-dir {stem}.npy is not writable"),
                          (["--embeddings", stem, "--out", stem + ".npy/table.csv"], "is not writable")]:
        with pytest.raises(SystemExit) as exit_status:
            utils.run_cli(similar.main, argv)
        err = capsys.readouterr().err
        assert exit_status.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    sf.write(str(tmp_path / "new.wav"), track_audio(2), RATE)
    with pytest.raises(SystemExit):
        utils.run_cli(similar.main, ["--embeddings", stem, "--query", str(tmp_path / "new.wav")])
    assert "this file is not in --embeddings; give --checkpoint" in capsys.readouterr().err
    found = similar.main(["--embeddings", stem, "--checkpoint", checkpoint, "--query", str(tmp_path / "new.wav"),
                          "-k", "1"])
    assert found[0][0].endswith("02 - Tone.wav") and found[0][1] == pytest.approx(1.0, abs=1e-5)  # the same audio
