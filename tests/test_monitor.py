"""The k-NN monitor during pretraining against an offline k-NN on the saved checkpoints."""
import math

import numpy as np
import pytest
import torch

import datasets
import models
import monitor
import safety
import train
from test_reliability import tiny_set, train_args  # noqa: F401
from test_validation import scalars

MONITORED = ["--monitor-column", "timbre", "--monitor-column", "pitch_class", "--monitor-clips", "2"]


def reference_knn(query, reference, labels, task, classes, k=monitor.K, temperature=monitor.TEMPERATURE):
    """One query at a time in float64: cosine similarities, the k largest, weighted votes or means."""
    out = []
    for q in query.double():
        sims = [float(q @ r / (q.norm() * r.norm())) for r in reference.double()]
        order = sorted(range(len(sims)), key=lambda j: -sims[j])[:k]
        weights = [math.exp(sims[j] / temperature) for j in order]
        if task == "multiclass":
            votes = [0.0] * classes
            for w, j in zip(weights, order):
                votes[int(labels[j])] += w
            out.append(votes)
        else:
            out.append([sum(w * float(labels[j][c]) for w, j in zip(weights, order)) / sum(weights)
                        for c in range(labels.shape[1])])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("task", ["multiclass", "multilabel", "regression"])
def test_knn_outputs_equal_a_brute_force_reference(task):
    generator = torch.Generator().manual_seed(4)
    query, reference = torch.randn(7, 5, generator=generator), torch.randn(30, 5, generator=generator)
    labels = {"multiclass": torch.randint(0, 4, (30,), generator=generator),
              "multilabel": (torch.rand(30, 3, generator=generator) < 0.4).float(),
              "regression": torch.randn(30, 2, generator=generator)}[task]
    torch.testing.assert_close(monitor.knn_outputs(query, reference, labels, task, 4).double(),
                               reference_knn(query, reference, labels, task, 4), rtol=1e-4, atol=1e-4)


def test_the_monitor_at_a_step_equals_an_offline_knn_on_that_steps_checkpoint(tiny_set, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 4, "--save-every", "2", "--keep", "5", "--monitor-csv", tiny_set,
                          "--monitor-every", "2", *MONITORED))
    logged = scalars(str(out))
    manifest = datasets.read_manifest([tiny_set])
    rows = np.flatnonzero(manifest["split"].isin(["train", "test"]))
    is_test = (manifest["split"].to_numpy()[rows] == "test")
    for step, index in ((2, 0), (4, 1)):
        pretrained = models.load_pretrained(str(out / f"checkpoint-{step:08d}.pt"), device="cpu")
        tracks = []
        with torch.no_grad():
            for row in rows:
                clips = datasets.read_clips(manifest["path"][row], pretrained.clip_samples, pretrained.sample_rate, 2)
                tracks.append(pretrained(clips).mean(0))
        tracks = torch.stack(tracks)  # [tracks, E]
        for name in ("timbre", "pitch_class"):
            column = datasets.parse_labels(manifest, name, "multiclass")
            labels = torch.as_tensor(column.values[rows])
            votes = reference_knn(tracks[is_test], tracks[~is_test], labels[~is_test], "multiclass",
                                  len(column.classes))
            accuracy = float((votes.argmax(1) == labels[is_test]).double().mean())
            assert logged[f"monitor/{name}/accuracy"][index] == pytest.approx(accuracy, abs=1e-6), (step, name)
    state = safety.load_model_file(str(out / "checkpoint-00000004.pt"), keys=safety.CHECKPOINT_KEYS)
    assert [entry["step"] for entry in state["monitor"]] == [2, 4]
    assert state["monitor"][1]["timbre"]["accuracy"] == pytest.approx(logged["monitor/timbre/accuracy"][1])
    assert 0 < logged["monitor/time_share"][-1] < 1


def test_the_monitor_leaves_training_unchanged(tiny_set, tmp_path):
    plain = train.main(train_args(tiny_set, tmp_path / "plain", 3))
    watched = train.main(train_args(tiny_set, tmp_path / "watched", 3, "--monitor-csv", tiny_set,
                                    "--monitor-every", "1", *MONITORED))
    assert watched["losses"] == plain["losses"]


def test_a_monitor_column_is_required(tiny_set, tmp_path, capsys):
    from test_reliability import cli_error
    message = cli_error(capsys, train_args(tiny_set, tmp_path / "run", 2, "--monitor-csv", tiny_set))
    assert message == f"--monitor-csv {tiny_set} needs --monitor-column: the label column to score"
