"""probe.py: metrics against hand-computed values, and every option on a tiny synthetic set."""
import glob
import json
import os

import matplotlib.pyplot
import numpy as np
import pandas as pd
import pytest
import torch

import datasets
import export
import metrics
import probe
import records
import reports
import safety
import similar
import splits
import synthetic
import train
import utils

MODEL = ["--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", "8000"]
FAST = ["--max-epochs", "3", "--patience", "3", "--batch-size", "16"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    # 40 files: 28 train, 6 val, 6 test; timbre cycles through 4 classes (7 train tracks each).
    folder = tmp_path_factory.mktemp("synthetic")
    return synthetic.make_synthetic_set(str(folder), num_files=40, seconds=1.2, sample_rate=8000)


@pytest.fixture(scope="module")
def checkpoint(tiny_set, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    train.main(MODEL + ["--train-csv", tiny_set, "--out", out, "--steps", "3", "--batch-size", "8", "--workers", "0",
                        "--log-every", "1", "--val-every", "0", "--save-every", "3", "--augment", "none"])
    return safety.list_checkpoints(out)[-1]


def run_probe(tiny_set, tmp_path, *extra, checkpoint="random"):
    argv = ["--checkpoint", checkpoint, *MODEL, *FAST, "--csv", tiny_set, "--cache-dir", str(tmp_path / "cache"),
            *extra]
    return probe.main(argv)


# ---------------------------------------------------------------- metrics by hand

def test_roc_auc_and_average_precision_match_hand_computed_values():
    # Positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of 4 pairs ordered right.
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # Tie: positive 0.5 vs negative 0.5 counts one half -> (0.5 + 1 + 1 + 1) / 4.
    assert metrics.roc_auc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert np.isnan(metrics.roc_auc([0.1, 0.2], [1, 1]))
    # Ranked 1 0 1 0: precision 1/1 at the first positive, 2/3 at the second.
    assert metrics.average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    # Tie group {0.5 positive, 0.5 negative} after a negative: precision 1/3 at the group's end,
    # then 2/4 at the last positive (the same as the step-wise recall x precision sum).
    assert metrics.average_precision([0.9, 0.5, 0.5, 0.1], [0, 1, 0, 1]) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert np.isnan(metrics.average_precision([0.3, 0.4], [0, 0]))
    # Macro over tags: tag 0 as above (0.75 / 0.8333), tag 1 perfect, tag 2 has no positive (left out).
    scores = torch.logit(torch.tensor([[0.1, 0.9, 0.5], [0.4, 0.8, 0.5], [0.35, 0.2, 0.5], [0.8, 0.1, 0.5]]))
    tags = torch.tensor([[0, 1, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.float32)
    result = metrics.score("multilabel", scores, tags)
    assert result["roc_auc"] == pytest.approx((0.75 + 1) / 2)
    assert result["pr_auc"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)


def test_roc_auc_ranks_logits_that_saturate_float32_sigmoids():
    # sigmoid(30) and sigmoid(20) are both 1.0 in float32: ranking the sigmoids would tie the
    # positive (30) with a negative (20) and give (0.5 + 1) / 2 = 0.75.
    logits = torch.tensor([[30.0], [20.0], [0.0]])
    tags = torch.tensor([[1.0], [0.0], [0.0]])
    assert torch.sigmoid(logits[0]) == torch.sigmoid(logits[1])
    result = metrics.score("multilabel", logits, tags)
    assert result["roc_auc"] == 1.0 and result["pr_auc"] == 1.0


def test_r2_of_a_constant_target_is_zero_as_scikit_learn():
    targets = np.array([[3.0, 1.0], [3.0, 2.0], [3.0, 4.0]])
    predictions = np.array([[2.5, 1.0], [3.5, 2.0], [3.0, 3.0]])
    # Output 0: constant target, imperfect prediction -> 0 (scikit-learn), not -SSE / 1e-12.
    # Output 1: targets 1, 2, 4 (SST 14/3), SSE 1 -> 1 - 3/14.
    assert metrics.r2_score(predictions, targets) == pytest.approx([0.0, 11 / 14])
    # A constant target predicted exactly scores 1 (scikit-learn too).
    assert metrics.r2_score(targets[:, :1], targets[:, :1]).tolist() == [1.0]


def test_accuracy_f1_r2_and_confusion_match_hand_computed_values():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    predicted = torch.tensor([0, 1, 1, 1, 0, 2])
    logits = torch.nn.functional.one_hot(predicted, 4).float()
    # Class 0: tp 1, 2 predicted, 2 actual -> F1 1/2; class 1: tp 2, 3 predicted, 2 actual -> 4/5;
    # class 2: tp 1, 1 predicted, 2 actual -> 2/3; class 3: never seen, left out.
    result = metrics.score("multiclass", logits, labels)
    assert result == {"accuracy": pytest.approx(4 / 6), "macro_f1": pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)}
    counts = metrics.confusion_matrix(predicted.numpy(), labels.numpy(), 3)
    assert counts.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # Targets 1, 2, 4 (mean 7/3, SST 14/3) predicted 1, 2, 3 (SSE 1): R2 = 1 - 3/14.
    # Second output predicted perfectly: R2 = 1.
    targets = torch.tensor([[1.0, 0.0], [2.0, 5.0], [4.0, 1.0]])
    predictions = torch.tensor([[1.0, 0.0], [2.0, 5.0], [3.0, 1.0]])
    result = metrics.score("regression", predictions, targets)
    assert result["r2_per_output"] == pytest.approx([11 / 14, 1.0])
    assert result["r2"] == pytest.approx((11 / 14 + 1) / 2)


def test_mirex_key_score_matches_hand_computed_values():
    key = {name: index for index, name in enumerate(datasets.KEY_NAMES)}
    cases = [("C major", "C major", 1.0), ("C major", "G major", 0.5), ("C major", "F major", 0.0),
             ("C major", "A minor", 0.3), ("C major", "C minor", 0.2), ("C major", "C# major", 0.0),
             ("A minor", "E minor", 0.5), ("A minor", "C major", 0.3), ("A minor", "A major", 0.2),
             ("A minor", "D minor", 0.0), ("B major", "F# major", 0.5), ("C major", "E minor", 0.0)]
    for reference, estimate, expected in cases:
        assert metrics.mirex_key_score([key[estimate]], [key[reference]]) == pytest.approx(expected), (reference,
                                                                                                  estimate)
    labels = [key[r] for r, _, _ in cases]
    estimates = [key[e] for _, e, _ in cases]
    assert metrics.mirex_key_score(estimates, labels) == pytest.approx(sum(v for _, _, v in cases) / len(cases))
    logits = torch.nn.functional.one_hot(torch.tensor(estimates), 24).float()
    column = datasets.LabelColumn(columns=["key"], task="multiclass", kind="key", classes=list(datasets.KEY_NAMES))
    result = metrics.score("multiclass", logits, torch.tensor(labels), column)
    assert result["mirex"] == pytest.approx(sum(v for _, _, v in cases) / len(cases))
    assert result["accuracy"] == pytest.approx(1 / len(cases))


def test_mean_and_std_over_seeds():
    mean, std = records.mean_and_std([{"a": 1.0, "b": [0.0, 2.0]}, {"a": 3.0, "b": [2.0, 2.0]}])
    assert mean == {"a": 2.0, "b": [1.0, 2.0]}
    assert std["a"] == pytest.approx(np.sqrt(2)) and std["b"] == pytest.approx([np.sqrt(2), 0.0])
    assert records.mean_and_std([{"a": 0.5}])[1] == {"a": 0.0}


# ---------------------------------------------------------------- prototypes

def test_prototypes_are_perfect_on_separable_embeddings():
    rng = np.random.default_rng(0)
    # Multiclass: class c points along axis c, on top of a shared offset, with noise.
    classes = rng.integers(0, 3, size=60)
    x = 3 * np.eye(5)[classes] + 1.0 + 0.3 * rng.standard_normal((60, 5))
    prototypes = probe.class_prototypes(x[:30], classes[:30], "multiclass", 4)
    assert prototypes.shape == (4, 5) and torch.all(prototypes[3] == 0)  # no example of class 3
    assert torch.allclose(prototypes[:3].norm(dim=1), torch.ones(3))
    scores = probe.prototype_scores(prototypes, x[30:])
    assert metrics.accuracy(scores, torch.as_tensor(classes[30:])) == 1.0
    # Multilabel: axis 2t is on when tag t is present, axis 2t + 1 when it is absent. Train on every
    # combination of 3 tags, so a tag's positive and negative means differ only on its own two axes:
    # the score is positive exactly for the clips that carry the tag.
    combinations = np.array([[(k >> t) & 1 for t in range(3)] for k in range(8)] * 4, dtype=np.float32)
    test_tags = (rng.random((40, 3)) < 0.5).astype(np.float32)

    def features(tags):
        return np.stack([tags, 1 - tags], 2).reshape(len(tags), 6) + 0.05 * rng.standard_normal((len(tags), 6))

    prototypes = probe.class_prototypes(features(combinations), combinations, "multilabel", 3)
    assert prototypes.shape == (2, 3, 6)
    scores = probe.prototype_scores(prototypes, features(test_tags))
    assert torch.equal(scores > 0, torch.as_tensor(test_tags) > 0)
    result = metrics.score("multilabel", scores, torch.as_tensor(test_tags))
    assert result["roc_auc"] == 1.0 and result["pr_auc"] == 1.0


def test_prototypes_option_scores_the_test_tracks_against_class_means_without_a_head(tiny_set, tmp_path):
    results = run_probe(tiny_set, tmp_path, "--prototypes", "--layer", "projection", "--label-column", "timbre",
                        "--label-column", "tags", "--task", "multiclass", "--task", "multilabel")
    assert [r["head"] for r in results] == ["prototypes", "prototypes"]
    assert [r["epochs"] for r in results] == [[0], [0]]
    # The same scores by hand: unit-length class means of the train clips, cosine to each test
    # track's mean embedding.
    for result, column, task in zip(results, ["timbre", "tags"], ["multiclass", "multilabel"]):
        args, data = probe_setup(tiny_set, "--layer", "projection", "--label-column", column, "--task", task)
        train, test = data.split_clips("train"), data.split_clips("test")
        prototypes = probe.class_prototypes(train.x, data.column.values[train.owners], task, data.out_dim)
        tracks = export.track_embeddings(test.x, test.owners, test.tracks)
        expected = metrics.score(task, probe.prototype_scores(prototypes, tracks), data.labels[test.tracks])
        assert result["test"] == pytest.approx(expected), column
    with pytest.raises(utils.UserError, match="--prototypes needs class labels"):
        run_probe(tiny_set, tmp_path, "--prototypes", "--label-column", "brightness", "--task", "regression")


# ---------------------------------------------------------------- few labels

def test_label_subset_is_stratified_per_class():
    tracks = np.arange(100, 116)
    labels = np.array([0] * 10 + [1] * 5 + [2])
    chosen = splits.label_subset(tracks, labels, "multiclass", 0.2, seed=0)
    chosen_labels = labels[np.searchsorted(tracks, chosen)]
    # round(0.2 * 10) = 2, round(0.2 * 5) = 1, and the single class-2 track is kept (at least one).
    assert np.bincount(chosen_labels).tolist() == [2, 1, 1]
    assert set(chosen) <= set(tracks) and list(chosen) == sorted(chosen)
    assert np.array_equal(chosen, splits.label_subset(tracks, labels, "multiclass", 0.2, seed=0))
    draws = {tuple(splits.label_subset(tracks, labels, "multiclass", 0.2, seed=s)) for s in range(5)}
    assert len(draws) > 1
    assert np.array_equal(splits.label_subset(tracks, labels, "multiclass", 1.0, seed=3), tracks)


def test_label_subset_is_stratified_per_tag_and_across_the_target_range():
    tracks = np.arange(40)
    tags = np.zeros((40, 3))
    tags[:20, 0] = 1  # common tag: 20 tracks
    tags[20:24, 1] = 1  # rare tag: 4 tracks
    tags[24:25, 2] = 1  # one track
    for seed in range(5):
        chosen = splits.label_subset(tracks, tags, "multilabel", 0.25, seed=seed)
        counts = tags[chosen].sum(0)
        # round(0.25 * 20) = 5, round(0.25 * 4) = 1, and the single tag-2 track (at least one).
        assert counts.tolist() == [5, 1, 1] and len(chosen) == 10  # topped up to round(0.25 * 40)
    values = np.linspace(-2, 2, 40)[:, None]
    chosen = splits.label_subset(tracks, values, "regression", 0.1, seed=0)
    assert len(chosen) == 4
    # One track from each quarter of the sorted targets.
    assert sorted(np.digitize(values[chosen, 0], [-1, 0, 1]).tolist()) == [0, 1, 2, 3]


def test_label_fraction_with_seeds_reports_mean_and_std(tiny_set, tmp_path):
    results = run_probe(tiny_set, tmp_path, "--label-column", "timbre", "--label-fraction", "0.3",
                        "--label-fraction", "1", "--seeds", "3", "--head", "linear", "--out", str(tmp_path / "r.json"))
    few, full = results
    # 7 train tracks per timbre: round(0.3 * 7) = 2 per class.
    assert few["label_fraction"] == 0.3 and few["tracks"]["train"] == 8 and full["tracks"]["train"] == 28
    assert few["seeds"] == [0, 1, 2] and len(few["runs"]) == 3
    accuracies = [run["test"]["clean"]["accuracy"] for run in few["runs"]]
    assert few["test"]["accuracy"] == pytest.approx(np.mean(accuracies))
    assert few["test_std"]["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
    table = (tmp_path / "r.md").read_text()
    assert "timbre @0.3 (accuracy)" in table and "±" in table


# ---------------------------------------------------------------- fine-tuning

def test_finetune_changes_the_encoder_and_frozen_probing_does_not(tiny_set, checkpoint, tmp_path, monkeypatch,
                                                                 capsys):
    loaded = []
    load_encoder = probe.load_encoder

    def keep_loaded(*args):
        model, settings = load_encoder(*args)
        loaded.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model, settings

    crops = []
    read_source_crops = datasets.read_source_crops

    def count_crops(*args):
        crops.append(args[0])
        return read_source_crops(*args)

    monkeypatch.setattr(probe, "load_encoder", keep_loaded)
    monkeypatch.setattr(datasets, "read_source_crops", count_crops)
    run_probe(tiny_set, tmp_path, "--label-column", "timbre", checkpoint=checkpoint)
    model, before = loaded[-1]
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"frozen probing changed {name}"
    assert not crops
    results = run_probe(tiny_set, tmp_path, "--label-column", "timbre", "--finetune", "--finetune-lr", "1e-3",
                        "--max-epochs", "2", "--workers", "0", checkpoint=checkpoint)
    model, before = loaded[-1]
    changed = [n for n, v in model.encoder.state_dict().items() if not torch.equal(v, before[f"encoder.{n}"])]
    assert any(n.endswith("weight") for n in changed), "fine-tuning left the encoder weights unchanged"
    # Two epochs of one crop per train track, read from the audio, not from the cache.
    assert len(crops) == 2 * 28
    assert results[0]["finetune"] and results[0]["tracks"]["test"] == 6
    assert set(results[0]["val"]) == {"loss", "accuracy"}
    # Progress: a bar over epochs with the val scores.
    progress = capsys.readouterr().err
    assert "fine-tune timbre seed 0" in progress and "2/2" in progress and "val loss=" in progress


# ---------------------------------------------------------------- robustness

def test_corruption_at_severity_zero_equals_clean_and_noise_changes_embeddings(tiny_set, tmp_path, capsys):
    clean = run_probe(tiny_set, tmp_path, "--label-column", "timbre")[0]
    swept = run_probe(tiny_set, tmp_path, "--label-column", "timbre", "--corrupt", "noise", "--severity", "2",
                      "--severity-sweep", "0,2")[0]
    assert swept["sweep"]["0"] == clean["test"]
    assert swept["test"] == swept["sweep"]["2"] and swept["corrupt"] == {"names": ["noise"], "severity": 2.0}
    printed = capsys.readouterr().out
    # Each caption sits right above its table.
    assert ("severity 2.\n\n| checkpoint | timbre (accuracy) |" in printed
            and "Test audio corrupted by noise at severity 2." in printed)
    assert "per severity s (s=0: clean audio).\n\n| checkpoint | probe (noise) | s=0 | s=2 |" in printed
    # The cache holds the clean set plus the test files at each severity (keys include the corruption).
    assert len(glob.glob(str(tmp_path / "cache" / "*.npy"))) == 3
    model, settings = probe.load_encoder("random", probe.finish_args(probe.build_parser().parse_args(
        ["--checkpoint", "random", *MODEL])), torch.device("cpu"))
    paths = list(pd.read_csv(tiny_set)["path"].map(lambda p: os.path.join(os.path.dirname(tiny_set), p))[17:20])

    def embeddings(severity):
        corruption = {"names": ["noise"], "severity": severity, "seed": 0}
        return export.embed_files(model, paths, settings, "encoder", torch.device("cpu"), 16, corruption)[0]

    plain = export.embed_files(model, paths, settings, "encoder", torch.device("cpu"), 16)[0]
    assert np.array_equal(embeddings(0.0), plain)
    noisy = embeddings(2.0)
    assert np.array_equal(noisy, embeddings(2.0)), "the corruption is not fixed by its seed"
    assert np.linalg.norm(noisy - plain) > 0.05 * np.linalg.norm(plain)


def test_severity_sweep_needs_a_corruption(tiny_set, tmp_path):
    with pytest.raises(utils.UserError, match="needs --corrupt"):
        run_probe(tiny_set, tmp_path, "--severity-sweep", "0,1")
    with pytest.raises(utils.UserError, match="unknown augmentation"):
        run_probe(tiny_set, tmp_path, "--corrupt", "thunder")


# ---------------------------------------------------------------- plots

def test_plot_writes_projector_and_confusion_matrix(tiny_set, tmp_path):
    plots = tmp_path / "plots"
    result = run_probe(tiny_set, tmp_path, "--label-column", "timbre", "--plot", "--plot-dir", str(plots))[0]
    folder = result["plot_dir"]
    assert os.path.dirname(folder) == str(plots)
    assert os.path.isfile(os.path.join(folder, "projector_config.pbtxt"))
    tensors = np.loadtxt(glob.glob(os.path.join(folder, "*", "test", "tensors.tsv"))[0], delimiter="\t")
    assert tensors.shape[0] == 6
    metadata = pd.read_csv(glob.glob(os.path.join(folder, "*", "test", "metadata.tsv"))[0], sep="\t")
    assert list(metadata.columns) == ["path", "label", "predicted"]
    manifest = pd.read_csv(tiny_set)
    test_rows = manifest[manifest["split"] == "test"]
    test_timbres = test_rows["timbre"]
    # Each track's file, as the manifest names it, next to its label.
    assert sorted(zip(metadata["path"], metadata["label"])) == sorted(zip(test_rows["path"], test_timbres))
    events = glob.glob(os.path.join(folder, "events.out.tfevents.*"))
    assert events and any(b"confusion_matrix" in open(e, "rb").read() for e in events)
    # Confusion counts: rows are the test tracks of each true class, columns their predictions.
    counts = pd.read_csv(os.path.join(folder, "confusion_matrix.csv"), index_col=0)
    assert counts.to_numpy().tolist() == result["runs"][0]["confusion_matrix"]
    assert counts.sum(axis=1).to_dict() == test_timbres.value_counts().reindex(counts.index, fill_value=0).to_dict()
    expected = pd.crosstab(metadata["label"], metadata["predicted"]).reindex(
        index=counts.index, columns=counts.columns, fill_value=0)
    assert np.array_equal(counts.to_numpy(), expected.to_numpy())
    assert np.trace(counts.to_numpy()) / 6 == pytest.approx(result["test"]["accuracy"])
    # The same matrix as a picture: a PNG next to the CSV, and a TensorBoard image.
    png = os.path.join(folder, "confusion_matrix.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 5000


def test_confusion_figure_names_classes_and_writes_counts():
    figure = reports.confusion_figure(np.array([[3, 1, 0], [0, 2, 0], [1, 0, 4]]), ["bass", "bell", "pluck"], "t")
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["bass", "bell", "pluck"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["bass", "bell", "pluck"]
    assert axes.get_xlabel() == "predicted class" and axes.get_ylabel() == "true class"
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in axes.texts}
    assert cells[(0, 0)] == "3" and cells[(0, 1)] == "1" and cells[(2, 2)] == "4" and cells[(1, 0)] == "0"
    # Shading is the row share: row 0 is 3/4, 1/4, 0.
    assert np.allclose(axes.images[0].get_array()[0], [0.75, 0.25, 0.0])
    matplotlib.pyplot.close(figure)


def test_curve_figure_draws_one_line_per_checkpoint():
    lines = {"random": ([0.1, 0.5, 1.0], [0.3, 0.4, 0.5], [0.05, 0.02, 0.0]),
             "runs/x (step 9)": ([0.1, 0.5, 1.0], [0.5, 0.7, 0.8], [0.0, 0.0, 0.0])}
    figure = reports.curve_figure(lines, "share of labeled train tracks", "test accuracy", "t", log_x=True)
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["random", "runs/x (step 9)"]
    drawn = [container.lines[0] for container in axes.containers]  # each errorbar's data line
    assert len(drawn) == 2 and np.allclose(drawn[1].get_ydata(), [0.5, 0.7, 0.8])
    assert [container.get_label() for container in axes.containers] == ["random", "runs/x (step 9)"]
    assert axes.get_xscale() == "log"
    matplotlib.pyplot.close(figure)


def test_plot_writes_few_label_and_robustness_curves(tiny_set, checkpoint, tmp_path, capsys):
    plots = tmp_path / "plots"
    results = probe.main(["--checkpoint", "random", "--checkpoint", checkpoint, *MODEL, *FAST, "--csv", tiny_set,
                          "--cache-dir", str(tmp_path / "cache"), "--label-column", "timbre", "--label-fraction",
                          "0.3,1", "--corrupt", "noise", "--severity-sweep", "0,2", "--plot", "--plot-dir",
                          str(plots)])
    assert len(results) == 4
    for name in ("few-labels__timbre.png", "robustness__timbre.png", "robustness__timbre_0.3.png"):
        png = plots / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
    events = b"".join(open(e, "rb").read() for e in glob.glob(str(plots / "events.out.tfevents.*")))
    assert b"few-labels/timbre" in events and b"robustness/timbre" in events
    printed = capsys.readouterr().out
    assert f"figures: {plots / 'few-labels__timbre.png'}" in printed


# ---------------------------------------------------------------- tasks file and summary

def test_tasks_file_writes_the_summary_as_markdown_and_csv(tiny_set, checkpoint, tmp_path, capsys):
    tasks = tmp_path / "tasks.csv"
    pd.DataFrame({"csv": [tiny_set, tiny_set], "label_column": ["timbre", "tags"], "task": ["multiclass", "multilabel"],
                  "name": ["timbre", "tags"], "head": ["linear", ""], "patience": ["1", ""]}).to_csv(tasks, index=False)
    out = tmp_path / "table.json"
    results = probe.main(["--checkpoint", "random", "--checkpoint", checkpoint, *MODEL, *FAST, "--tasks", str(tasks),
                          "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    assert [(r["checkpoint"], r["probe"]) for r in results] == [("random", "timbre"), ("random", "tags"),
                                                                (checkpoint, "timbre"), (checkpoint, "tags")]
    assert [r["patience"] for r in results] == [1, 3, 1, 3]  # the tasks file's cell, else --patience
    assert [r["head"] for r in results] == ["linear", "mlp", "linear", "mlp"]  # the cell, else --head
    # Stdout holds the tables, not the JSON results.
    printed = capsys.readouterr().out
    assert '"runs"' not in printed and "| checkpoint | timbre (accuracy) |" in printed
    # The paper's table shape: one row per checkpoint; tagging shows ROC-AUC and PR-AUC.
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table.columns) == ["checkpoint", "timbre (accuracy)", "tags (roc_auc)", "tags (pr_auc)"]
    assert list(table["checkpoint"]) == ["random", checkpoint]
    assert table.loc[1, "tags (pr_auc)"] == pytest.approx(results[3]["test"]["pr_auc"])
    assert table.loc[0, "timbre (accuracy)"] == pytest.approx(results[0]["test"]["accuracy"])
    assert not os.path.exists(tmp_path / "table.summary.json")
    # Caption, blank line, table, blank line, one line per checkpoint naming file, step and hash.
    markdown = (tmp_path / "table.md").read_text().splitlines()
    assert markdown[0].startswith("Test results: rows are checkpoints") and markdown[1] == ""
    assert markdown[2] == "| checkpoint | timbre (accuracy) | tags (roc_auc) | tags (pr_auc) |"
    assert markdown[5].startswith(f"| {checkpoint} | {results[2]['test']['accuracy']:.3f} |")
    digest = utils.file_digest(checkpoint)[:12]
    assert markdown[7:] == ["- random: random-init encoder", f"- {checkpoint}: {checkpoint}, step 3, sha256 {digest}"]
    assert json.loads(out.read_text())[2]["test"] == results[2]["test"]
    tasks.write_text("csv,label_column,task\nmanifest.csv,timbre,classification\n")
    with pytest.raises(utils.UserError, match=r"tasks.csv, line 2, column 'task'"):
        probe.main(["--checkpoint", "random", *MODEL, "--tasks", str(tasks)])
    tasks.write_text(f"csv,label_column,task,head\n{tiny_set},timbre,multiclass,transformer\n")
    with pytest.raises(utils.UserError, match=r"tasks.csv, line 2, column 'head': 'transformer' is not one of"):
        probe.main(["--checkpoint", "random", *MODEL, "--tasks", str(tasks)])


# ---------------------------------------------------------------- bad input

def test_test_classes_unseen_in_train_are_refused(tiny_set, tmp_path):
    manifest = pd.read_csv(tiny_set)
    manifest["path"] = [os.path.join(os.path.dirname(tiny_set), p) for p in manifest["path"]]
    manifest.loc[manifest.index[manifest["split"] == "test"][0], "timbre"] = "theremin"
    csv = tmp_path / "unseen.csv"
    manifest.to_csv(csv, index=False)
    with pytest.raises(utils.UserError, match=r"classes \['theremin'\] of column 'timbre' appear in val or test"):
        run_probe(str(csv), tmp_path, "--label-column", "timbre")


def test_labels_that_do_not_fit_the_task_name_file_line_and_column(tiny_set, tmp_path):
    with pytest.raises(datasets.ManifestError, match=r"manifest.csv, line 2, column 'timbre': 'pluck' is not a number"):
        run_probe(tiny_set, tmp_path, "--label-column", "timbre", "--task", "regression")
    with pytest.raises(datasets.ManifestError, match=r"manifest.csv, line 2, column 'timbre': cannot read a key"):
        run_probe(tiny_set, tmp_path, "--label-column", "timbre", "--label-kind", "key")


def test_cache_from_another_checkpoint_is_never_reused(tiny_set, checkpoint, tmp_path, capsys):
    path = str(tmp_path / "model.pt")
    state = safety.load_model_file(checkpoint)
    safety.save_torch(path, state)
    first = run_probe(tiny_set, tmp_path, "--label-column", "timbre", checkpoint=path)[0]
    assert "extracting 40 files" in capsys.readouterr().out
    # Another checkpoint under the same file name: new weights, same path.
    for value in state["model"].values():
        if value.is_floating_point():
            value.add_(0.05 * torch.randn_like(value))
    safety.save_torch(path, state)
    run_probe(tiny_set, tmp_path, "--label-column", "timbre", checkpoint=path)
    printed = capsys.readouterr().out
    assert "extracting 40 files" in printed
    entries = sorted(glob.glob(str(tmp_path / "cache" / "*.npy")))
    assert len(entries) == 2
    first_embeddings, second_embeddings = (np.load(e) for e in entries)
    assert first_embeddings.shape == second_embeddings.shape
    assert not np.allclose(first_embeddings, second_embeddings)
    owners = {json.load(open(e[:-4] + ".json"))["checkpoint"] for e in entries}
    assert len(owners) == 2
    run_probe(tiny_set, tmp_path, "--label-column", "timbre", checkpoint=path)
    assert "reusing" in capsys.readouterr().out
    assert first["tracks"] == {"train": 28, "val": 6, "test": 6}


def test_key_and_multi_output_regression_probes_report_the_papers_metrics(tiny_set, tmp_path):
    manifest = pd.read_csv(tiny_set)
    manifest["path"] = [os.path.join(os.path.dirname(tiny_set), p) for p in manifest["path"]]
    manifest["key"] = [("C major", "A minor", "G major")[i % 3] for i in range(len(manifest))]
    csv = tmp_path / "keys.csv"
    manifest.to_csv(csv, index=False)
    results = run_probe(str(csv), tmp_path, "--label-column", "key", "--label-kind", "key", "--label-column",
                        "brightness,pitch", "--task", "multiclass", "--task", "regression", "--label-kind", "generic",
                        "--out", str(tmp_path / "r.json"))
    key, regression = results
    assert 0 <= key["test"]["mirex"] <= 1 and key["test"]["mirex"] >= key["test"]["accuracy"]
    assert len(regression["test"]["r2_per_output"]) == 2
    assert regression["test"]["r2"] == pytest.approx(np.mean(regression["test"]["r2_per_output"]))
    table = pd.read_csv(tmp_path / "r.csv")
    assert list(table.columns) == ["checkpoint", "key (accuracy)", "key (mirex)", "brightness,pitch (r2)",
                                   "brightness,pitch (r2 brightness)", "brightness,pitch (r2 pitch)"]
    assert table.loc[0, "brightness,pitch (r2 pitch)"] == pytest.approx(regression["test"]["r2_per_output"][1])


def test_every_probe_is_checked_before_any_embedding(tiny_set, tmp_path):
    with pytest.raises(datasets.ManifestError, match="column 'tags'"):
        run_probe(tiny_set, tmp_path, "--label-column", "timbre", "--label-column", "tags", "--task",
                  "multiclass", "--task", "regression")
    assert not os.path.exists(tmp_path / "cache"), "the first probe ran before the second was checked"


# ---------------------------------------------------------------- the authors' protocol

def test_track_outputs_aggregate_embeddings_before_the_head_or_outputs_after():
    # Track 4: clips 1 and -1; track 7: clip 2. A non-linear predictor (squares) tells the two apart.
    clips = splits.ClipSet(torch.tensor([[1.0], [-1.0], [2.0]]), np.array([4, 4, 7]))
    square = lambda x: x ** 2  # noqa: E731
    assert probe.track_outputs(square, clips, "embeddings").tolist() == [[0.0], [4.0]]  # head(mean of embeddings)
    assert probe.track_outputs(square, clips, "outputs").tolist() == [[1.0], [4.0]]  # mean of head outputs


def test_one_clip_per_track_is_drawn_among_all_its_clips():
    owners = np.array([0, 0, 0, 5, 2, 2])
    clips = splits.ClipSet(torch.arange(6.0)[:, None], owners)
    rng = np.random.default_rng(0)
    draws = [clips.one_per_track(rng) for _ in range(200)]
    assert all(sorted(owners[d].tolist()) == [0, 2, 5] for d in draws)
    assert set(np.concatenate(draws).tolist()) == set(range(6))  # every clip is a candidate


def test_early_stopping_watches_val_loss_or_the_metric():
    stopper = probe.EarlyStopping(patience=2, monitor="loss")
    losses = [1.0, 0.8, 0.9, 0.85]  # lower is better: best at epoch 2, then two epochs without improvement
    stops = [stopper.update({"loss": v, "accuracy": 0.1 * e}, lambda e=e: e) for e, v in enumerate(losses, 1)]
    assert stops == [False, False, False, True]
    assert stopper.best_state == 2 and stopper.best["loss"] == 0.8  # the state kept is epoch 2's
    stopper = probe.EarlyStopping(patience=2, monitor="accuracy")
    for epoch, value in enumerate([0.2, 0.5, 0.4, 0.6], 1):
        assert not stopper.update({"loss": 1.0, "accuracy": value}, lambda e=epoch: e)
    assert stopper.best_state == 4 and stopper.best == {"loss": 1.0, "accuracy": 0.6}


def probe_setup(tiny_set, *extra):
    args = probe.finish_args(probe.build_parser().parse_args(["--checkpoint", "random", *MODEL, *FAST, "--cache-dir",
                                                              "none", "--csv", tiny_set, *extra]))
    model, settings = probe.load_encoder("random", args, torch.device("cpu"))
    labeled = splits.read_labels(probe.probe_list(args)[0])
    data = probe.probe_data(args, model, settings, labeled, torch.device("cpu"))
    return args, data


def test_head_trains_on_one_random_clip_per_track_and_stops_on_val_loss(tiny_set, monkeypatch):
    # 1.2 s files cut into 0.5 s clips: 2 clips each; 28 train tracks, 6 val tracks.
    args, data = probe_setup(tiny_set, "--label-column", "timbre", "--max-epochs", "6", "--patience", "6")
    assert len(data.split_clips("train").owners) == 56
    seen, scores = [], []
    head_loss, val_scores = probe.head_loss, probe.val_scores

    def count_rows(task, outputs, labels):
        seen.append(len(labels))
        return head_loss(task, outputs, labels)

    def keep_scores(*a, **k):
        scores.append(val_scores(*a, **k))
        return scores[-1]

    monkeypatch.setattr(probe, "head_loss", count_rows)
    monkeypatch.setattr(probe, "val_scores", keep_scores)
    train_tracks = np.flatnonzero(data.split == "train")
    fit = probe.fit_head(args, data, train_tracks, 0, torch.device("cpu"))
    best, epochs = fit.val, fit.epochs
    # Per epoch: 28 train clips (one per track, batches of 16 and 12), then the val loss on 6 clips.
    assert epochs == 6 and seen == [16, 12, 6] * 6
    assert best["loss"] == min(s["loss"] for s in scores)
    assert best == next(s for s in scores if s["loss"] == best["loss"])
    seen.clear()
    args.train_clips, args.early_stop = "all", "metric"
    best = probe.fit_head(args, data, train_tracks, 0, torch.device("cpu")).val
    # Every clip: 56 train clips (16, 16, 16, 8), the val loss on all 12 val clips.
    assert seen[:5] == [16, 16, 16, 8, 12]
    assert best["accuracy"] == max(s["accuracy"] for s in scores[6:])


def test_per_task_head_is_built_and_results_name_their_inputs(tiny_set, checkpoint, tmp_path, monkeypatch):
    built = []
    make_head = probe.make_head

    def record(kind, *args):
        built.append(kind)
        return make_head(kind, *args)

    monkeypatch.setattr(probe, "make_head", record)
    patiences = []

    class RecordedStopping(probe.EarlyStopping):
        def __init__(self, patience, monitor):
            patiences.append((patience, monitor))
            super().__init__(patience, monitor)

    monkeypatch.setattr(probe, "EarlyStopping", RecordedStopping)
    tasks = tmp_path / "tasks.csv"
    pd.DataFrame({"csv": [tiny_set, tiny_set], "label_column": ["timbre", "tags"], "task": ["multiclass", "multilabel"],
                  "head": ["linear", "mlp"], "patience": ["2", "1"]}).to_csv(tasks, index=False)
    results = probe.main(["--checkpoint", checkpoint, *MODEL, *FAST, "--tasks", str(tasks), "--head", "mlp",
                          "--cache-dir", str(tmp_path / "cache")])
    assert built == ["linear", "mlp"] and patiences == [(2, "loss"), (1, "loss")]
    assert [r["patience"] for r in results] == [2, 1] and [r["head"] for r in results] == ["linear", "mlp"]
    for r in results:
        assert r["checkpoint_file"] == checkpoint and r["checkpoint_step"] == 3
        assert r["checkpoint_sha256"] == utils.file_digest(checkpoint)[:12]
        assert r["manifest_sha256"] == utils.file_digest(tiny_set)[:12]
        assert (r["aggregate"], r["train_clips"], r["early_stop"]) == ("embeddings", "random", "loss")
        assert set(r["val"]) == {"loss", probe.MAIN_METRIC[r["task"]]}


def test_user_mistakes_are_one_line_with_exit_status_2(tiny_set, tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "probe.py"), "--checkpoint", "random", "--csv", tiny_set,
                           "--label-fraction", "2"], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "probe.py: error: --label-fraction 2: must be in (0, 1]\n"


# ---------------------------------------------------------------- leaks, tasks files, retrieval

def one_line_error(argv, capsys):
    """What probe.py prints for a user's mistake: exit status 2 and one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_status:
        utils.run_cli(probe.main, argv)
    err = capsys.readouterr().err
    assert exit_status.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_a_test_split_copied_from_train_is_refused_before_any_embedding(tiny_set, tmp_path, capsys):
    import shutil
    manifest = pd.read_csv(tiny_set)
    manifest["path"] = [os.path.join(os.path.dirname(tiny_set), p) for p in manifest["path"]]
    train_rows, test_rows = manifest.index[manifest["split"] == "train"], manifest.index[manifest["split"] == "test"]
    for k, (source, row) in enumerate(zip(train_rows, test_rows)):  # each test file: a train file under a new name
        copy = str(tmp_path / f"renamed-{k}.wav")
        shutil.copy(manifest.at[source, "path"], copy)
        manifest.loc[row] = manifest.loc[source]
        manifest.at[row, "path"], manifest.at[row, "split"] = copy, "test"
    csv = tmp_path / "leaky.csv"
    manifest.to_csv(csv, index=False)
    argv = ["--checkpoint", "random", *MODEL, *FAST, "--csv", str(csv), "--label-column", "timbre",
            "--cache-dir", str(tmp_path / "cache"), "--retrieval"]
    err = one_line_error(argv, capsys)
    assert "error: 6 audio files appear in more than one split (0 under the same path, 6 as a byte copy" in err
    assert "renamed-0.wav (test)" in err and err.endswith("; remove the copies, or pass --allow-leaks to score "
                                                          "anyway\n")
    assert not os.path.exists(tmp_path / "cache"), "embedded before the leak was refused"
    result = probe.main(argv + ["--allow-leaks"])[0]
    assert result["leaks"].startswith("6 audio files appear in more than one split")
    assert "leaks: timbre: 6 audio files" in capsys.readouterr().out
    assert result["tracks"]["test"] == 6 and "accuracy" in result["test"]  # scored, the leak kept in its record
    manifest.loc[test_rows, "path"] = [manifest.at[s, "path"] for s in train_rows[:len(test_rows)]]  # same paths
    manifest.to_csv(csv, index=False)
    assert "(6 under the same path, 0 as a byte copy" in one_line_error(argv, capsys)


def test_a_tasks_file_that_is_not_a_plain_csv_is_one_line(tiny_set, tmp_path, capsys):
    tasks = tmp_path / "tasks.csv"
    argv = ["--checkpoint", "random", *MODEL, "--tasks", str(tasks)]
    tasks.write_text(f'csv,label_column,task\n{tiny_set},"timbre,multiclass\n')
    assert "line 2: a quote (\") opens a field that is never closed" in one_line_error(argv, capsys)
    tasks.write_text("csv,label_column,task\n")
    assert "a header (csv,label_column,task) but no rows" in one_line_error(argv, capsys)
    tasks.write_text(f"csv;label_column;task\n{tiny_set};timbre;multiclass\n")
    assert "its columns are separated by semicolons" in one_line_error(argv, capsys)
    tasks.write_text(f"csv,label,task\n{tiny_set},timbre,multiclass\n")
    assert "no 'label_column' column" in one_line_error(argv, capsys)


def test_retrieval_is_stored_and_shown_beside_the_head_metrics(tiny_set, tmp_path, monkeypatch):
    calls = []
    real = similar.retrieval_metrics

    def record(x, owners, labels, task):
        calls.append((x.clone(), owners.copy(), labels.clone(), task))
        return real(x, owners, labels, task)

    monkeypatch.setattr(similar, "retrieval_metrics", record)
    results = run_probe(tiny_set, tmp_path, "--label-column", "timbre", "--label-column", "tags", "--task",
                        "multiclass", "--task", "multilabel", "--retrieval", "--out", str(tmp_path / "r.json"))
    args, data = probe_setup(tiny_set, "--label-column", "timbre")
    test = data.split_clips("test")
    x, owners, labels, task = calls[0]
    assert torch.equal(x, test.x) and np.array_equal(owners, test.owners) and task == "multiclass"
    assert torch.equal(labels, data.labels[test.tracks])  # one label per test track, in track order
    expected = real(test.x, test.owners, data.labels[test.tracks], "multiclass")
    assert results[0]["retrieval"] == expected and set(results[1]["retrieval"]) == set(expected)
    table = pd.read_csv(tmp_path / "r.csv")
    assert list(table.columns) == ["checkpoint", "timbre (accuracy)", "timbre (track top-1)", "timbre (track MRR)",
                                   "timbre (label P@10)", "timbre (label mAP)", "tags (roc_auc)", "tags (pr_auc)",
                                   "tags (track top-1)", "tags (track MRR)", "tags (label P@10)", "tags (label mAP)"]
    assert table.loc[0, "timbre (label mAP)"] == pytest.approx(expected["label_map"])
    assert json.loads((tmp_path / "r.json").read_text())[0]["retrieval"] == expected


def test_retrieval_cells_show_no_spread_over_seeds():
    result = {"checkpoint": "random", "checkpoint_file": None, "probe": "timbre", "label_fraction": 1.0,
              "task": "multiclass", "label_column": "timbre", "seeds": [0, 1], "corrupt": None,
              "test": {"accuracy": 0.5}, "test_std": {"accuracy": 0.1},
              "retrieval": {"track_top1": 0.25, "track_mrr": 0.5, "label_p10": 0.125, "label_map": 0.75}}
    table = reports.summary_table([result]).splitlines()
    assert table[2] == ("| checkpoint | timbre (accuracy) | timbre (track top-1) | timbre (track MRR) | "
                        "timbre (label P@10) | timbre (label mAP) |")
    assert table[4] == "| random | 0.500 ± 0.100 | 0.250 | 0.500 | 0.125 | 0.750 |"
    assert list(reports.summary_frame([result]).columns) == [
        "checkpoint", "timbre (accuracy)", "timbre (accuracy) std", "timbre (track top-1)", "timbre (track MRR)",
        "timbre (label P@10)", "timbre (label mAP)"]
