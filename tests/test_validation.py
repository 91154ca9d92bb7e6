"""Validation measures the objective the run trains on, with each clip augmented once."""
import glob
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import augment
import synthetic
import train

TINY = ["--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", "8000", "--batch-size", "8",
        "--workers", "0", "--log-every", "1", "--lr", "3e-3", "--skip-check"]
TRAINED = TINY + ["--steps", "20", "--val-every", "20", "--augment", "none", "--encoder", "melcnn"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    return synthetic.make_synthetic_set(str(folder), num_files=40, seconds=1.2, sample_rate=8000, seed=1)


def scalars(out):
    events = EventAccumulator(glob.glob(f"{out}/events.out.tfevents.*")[0])
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_self_supervised_validation_ignores_labels(tiny_set, tmp_path):
    out = str(tmp_path / "selfsup")
    train.main(TRAINED + ["--train-csv", tiny_set, "--out", out, "--label-column", "pitch_class",
                          "--labeled-per-batch", "0"])
    logged = scalars(out)
    assert logged["val/loss"] == pytest.approx(logged["val/loss_views"], rel=1e-6)
    assert "val/loss_labels" not in logged


def test_semi_supervised_validation_logs_both_parts(tiny_set, tmp_path):
    out = str(tmp_path / "semisup")
    train.main(TRAINED + ["--train-csv", tiny_set, "--out", out, "--label-column", "pitch_class"])
    logged = scalars(out)
    assert all(math.isfinite(v) for v in logged["val/loss_labels"] + logged["val/loss_views"])
    # The objective's target is the max of both parts: its loss is neither part's alone.
    assert logged["val/loss"] != pytest.approx(logged["val/loss_views"], rel=1e-3)


def test_validation_augments_each_clip_once_when_workers_augment(tiny_set, tmp_path, monkeypatch):
    calls, in_validation = [], [False]
    real_call, real_validate = augment.Chain.__call__, train.validate

    def recording_call(chain, x, *args, **kwargs):
        if in_validation[0] and chain.names:
            calls.append(len(x))
        return real_call(chain, x, *args, **kwargs)

    def flagged_validate(*args, **kwargs):
        in_validation[0] = True
        try:
            return real_validate(*args, **kwargs)
        finally:
            in_validation[0] = False

    monkeypatch.setattr(augment.Chain, "__call__", recording_call)
    monkeypatch.setattr(train, "validate", flagged_validate)
    train.main(TINY + ["--steps", "2", "--val-every", "2", "--train-csv", tiny_set, "--out", str(tmp_path / "workers"), "--augment-on", "workers",
                       "--augment", "gain,noise"])
    assert calls and set(calls) == {2}  # once per clip (its 2 views) in the workers, never again on the device
