"""Short end-to-end runs of train.py and probe.py on a tiny synthetic set."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import datasets
import probe
import train
import utils

TINY = ["--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", "8000", "--batch-size", "8",
        "--workers", "0", "--log-every", "1", "--val-every", "0", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    return datasets.make_synthetic_set(str(folder), num_files=40, seconds=1.2, sample_rate=8000, seed=1)


def run(tmp_path, name, manifest, *extra, steps=6):
    out = str(tmp_path / name)
    return train.main(TINY + ["--train-csv", manifest, "--out", out, "--steps", str(steps)] + list(extra))


def test_short_run_lowers_the_loss_and_probe_loads_the_checkpoint(tiny_set, tmp_path):
    result = run(tmp_path, "run", tiny_set, "--augment", "none", "--save-every", "100", steps=25)
    values = [loss for _, loss in result["losses"]]
    assert len(values) == 25 and all(np.isfinite(values))
    assert np.mean(values[-5:]) < np.mean(values[:5]) - 0.1
    checkpoint = utils.list_checkpoints(result["out"])[-1]
    state = utils.load_checkpoint(checkpoint)
    assert state["step"] == 25
    with open(os.path.join(result["out"], "args.json")) as f:
        assert json.load(f)["clip_samples"] == 4000
    results = probe.main(["--checkpoint", result["out"], "--csv", tiny_set, "--label-column", "timbre",
                          "--max-epochs", "5", "--cache-dir", str(tmp_path / "cache"), "--out",
                          str(tmp_path / "probe.json")])
    assert results[0]["test"]["accuracy"] >= 0.0 and results[0]["tracks"]["test"] == 6
    reloaded = utils.load_checkpoint(checkpoint)
    model, _ = probe.load_encoder(checkpoint, None, torch.device("cpu"))
    for name, value in model.state_dict().items():
        assert torch.equal(value, reloaded["model"][name]), f"probing changed {name}"


def test_resume_reproduces_the_uninterrupted_run(tiny_set, tmp_path):
    common = ["--label-column", "pitch_class", "--label-kind", "pitch_class", "--save-every", "3",
              "--augment", "gain,noise,filter"]
    whole = run(tmp_path, "whole", tiny_set, *common, steps=6)
    first = run(tmp_path, "parts", tiny_set, *common, steps=3)
    second = run(tmp_path, "parts", tiny_set, *common, steps=6)
    assert [s for s, _ in first["losses"]] == [1, 2, 3] and [s for s, _ in second["losses"]] == [4, 5, 6]
    assert [loss for _, loss in first["losses"] + second["losses"]] == [loss for _, loss in whole["losses"]]


@pytest.mark.parametrize("signal", [
    ["--label-column", "pitch_class", "--label-kind", "pitch_class", "--class-similarity", "pitch"],
    ["--label-column", "tags", "--task", "multilabel", "--positive-threshold", "weighted"],
    ["--label-column", "brightness", "--task", "regression", "--target-kernel", "threshold"],
    ["--label-column", "pitch", "--label-kind", "pitch", "--class-similarity", "pitch-octave",
     "--label-column", "timbre", "--label-kind", "generic", "--class-similarity", "none",
     "--labeled-fraction", "0.5"],
])
def test_every_supervision_signal_trains(tiny_set, tmp_path, signal):
    result = run(tmp_path, "signal", tiny_set, *signal, "--labeled-per-batch", "0.75", steps=3)
    assert len(result["losses"]) == 3 and all(np.isfinite([loss for _, loss in result["losses"]]))


def test_bad_files_are_skipped_and_counted(tiny_set, tmp_path):
    manifest = pd.read_csv(tiny_set)
    folder = os.path.dirname(tiny_set)
    manifest["path"] = [os.path.join(folder, p) for p in manifest["path"]]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio")
    short = str(tmp_path / "short.wav")
    sf.write(short, np.zeros(100, dtype=np.float32), 8000)
    extra = pd.DataFrame({"path": [str(broken), short], "split": ["train", "train"]})
    csv = str(tmp_path / "with_bad.csv")
    pd.concat([manifest[manifest["split"] == "train"].head(4), extra]).to_csv(csv, index=False)
    result = run(tmp_path, "bad", csv, steps=4)
    assert len(result["losses"]) == 4
    assert result["failed_files"] > 0


def test_bad_flags_and_labels_fail_before_training(tiny_set, tmp_path):
    with pytest.raises(SystemExit):
        run(tmp_path, "flags", tiny_set, "--label-column", "timbre", "--task", "multiclass", "--task", "regression")
    with pytest.raises(datasets.ManifestError, match="not a number"):
        run(tmp_path, "flags", tiny_set, "--label-column", "timbre", "--task", "regression")
