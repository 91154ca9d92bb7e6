"""Short end-to-end runs of train.py and probe.py on a tiny synthetic set."""
import copy
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import augment
import datasets
import losses
import probe
import safety
import synthetic
import train
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", "8000", "--batch-size", "8",
        "--workers", "0", "--log-every", "1", "--val-every", "0", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    return synthetic.make_synthetic_set(str(folder), num_files=40, seconds=1.2, sample_rate=8000, seed=1)


def run(tmp_path, name, manifest, *extra, steps=6):
    out = str(tmp_path / name)
    return train.main(TINY + ["--train-csv", manifest, "--out", out, "--steps", str(steps)] + list(extra))


def test_short_run_lowers_the_loss_and_probe_loads_the_checkpoint(tiny_set, tmp_path, monkeypatch):
    result = run(tmp_path, "run", tiny_set, "--augment", "none", "--save-every", "100", steps=25)
    values = [loss for _, loss in result["losses"]]
    assert len(values) == 25 and all(np.isfinite(values))
    assert np.mean(values[-5:]) < np.mean(values[:5]) - 0.1
    checkpoint = safety.list_checkpoints(result["out"])[-1]
    state = safety.load_model_file(checkpoint)
    assert state["step"] == 25
    with open(os.path.join(result["out"], "args.json")) as f:
        assert json.load(f)["clip_samples"] == 4000
    used = []
    load_encoder = probe.load_encoder

    def keep_model(*args):
        model, settings = load_encoder(*args)
        used.append(model)
        return model, settings

    monkeypatch.setattr(probe, "load_encoder", keep_model)
    results = probe.main(["--checkpoint", result["out"], "--csv", tiny_set, "--label-column", "timbre",
                          "--max-epochs", "5", "--cache-dir", str(tmp_path / "cache"), "--out",
                          str(tmp_path / "probe.json")])
    # Accuracy is a share of the 6 test tracks (not of their clips): k / 6 for a whole k.
    accuracy = results[0]["test"]["accuracy"]
    assert results[0]["tracks"]["test"] == 6 and 0 <= accuracy <= 1 and abs(accuracy * 6 - round(accuracy * 6)) < 1e-9
    # The model the probe embedded with, after probing, still holds the checkpoint's weights.
    assert used
    for name, value in used[-1].state_dict().items():
        assert torch.equal(value, state["model"][name]), f"probing changed {name}"


def test_grad_accum_averages_the_gradients_of_separate_batches(tiny_set, tmp_path, monkeypatch):
    # --grad-accum 3: the gradient the optimizer steps with is the mean of the 3 micro-batches'
    # gradients, each computed alone (its own contrastive batch) from the same weights, in
    # three separate backward passes.
    batches, start, accumulated = [], [], []
    real_step, real_optimizer_step = train.contrastive_step, train.optimizer_step

    def recording_step(model, views, clip_ids, signals, *rest):
        if not start:
            start.append(copy.deepcopy(model))
        batches.append((views.clone(), clip_ids.clone(), signals, rest))
        return real_step(model, views, clip_ids, signals, *rest)

    def recording_optimizer_step(run, loss_sum):
        accumulated.append({n: p.grad.clone() for n, p in run.bare_model.named_parameters() if p.grad is not None})
        return real_optimizer_step(run, loss_sum)

    monkeypatch.setattr(train, "contrastive_step", recording_step)
    monkeypatch.setattr(train, "optimizer_step", recording_optimizer_step)
    run(tmp_path, "accum", tiny_set, "--grad-accum", "3", "--label-column", "pitch_class", "--save-every", "100",
        steps=1)
    assert len(batches) == 3 and len(accumulated) == 1
    model = start[0]
    separate = []
    for views, clip_ids, signals, rest in batches:
        model.zero_grad()
        loss, _ = real_step(model, views, clip_ids, signals, *rest)
        loss.backward()
        separate.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(separate[0]) == set(accumulated[0])
    names = sorted(accumulated[0])
    flat = lambda grads: torch.cat([grads[n].flatten() for n in names])  # noqa: E731
    grad, parts = flat(accumulated[0]), [flat(g) for g in separate]
    mean = sum(parts) / 3
    # float32 through a deep encoder: the loss scaled by 1/3 before backward rounds differently.
    assert (grad - mean).norm() <= 1e-4 * mean.norm()
    # ... and far from what a wrong accumulation would give: the sum, or one batch alone.
    assert (grad - 3 * mean).norm() > 0.5 * mean.norm()
    assert all((grad - part).norm() > 1e-2 * mean.norm() for part in parts)


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
    ["--label-column", "key", "--label-kind", "key", "--class-similarity", "key"],
    ["--label-column", "pitch", "--label-kind", "pitch", "--class-similarity", "pitch-octave",
     "--label-column", "timbre", "--label-kind", "generic", "--class-similarity", "none",
     "--labeled-fraction", "0.5"],
])
def test_every_supervision_signal_trains(tiny_set, tmp_path, signal):
    result = run(tmp_path, "signal", tiny_set, *signal, "--labeled-per-batch", "0.75", steps=3)
    assert len(result["losses"]) == 3 and all(np.isfinite([loss for _, loss in result["losses"]]))


def manifest_with_bad_files(tiny_set, tmp_path):
    """4 good train files plus one file of every bad or unusual kind."""
    manifest = pd.read_csv(tiny_set)
    folder = os.path.dirname(tiny_set)
    manifest["path"] = [os.path.join(folder, p) for p in manifest["path"]]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVE but not really")
    empty = str(tmp_path / "empty.wav")
    sf.write(empty, np.zeros(0, dtype=np.float32), 8000)
    short = str(tmp_path / "short.wav")
    sf.write(short, np.zeros(100, dtype=np.float32) + 0.1, 8000)
    nan = str(tmp_path / "nan.wav")
    sf.write(nan, np.full(16000, np.nan, dtype=np.float32), 8000, subtype="FLOAT")
    silent = str(tmp_path / "silent.wav")
    sf.write(silent, np.zeros(16000, dtype=np.float32), 8000)
    odd = str(tmp_path / "odd.flac")
    sf.write(odd, 0.1 * np.random.default_rng(0).standard_normal((11025, 3)).astype(np.float32), 11025)
    extra = pd.DataFrame({"path": [str(broken), empty, short, nan, silent, odd], "split": ["train"] * 6})
    csv = str(tmp_path / "with_bad.csv")
    pd.concat([manifest[manifest["split"] == "train"].head(4), extra]).to_csv(csv, index=False)
    return csv


def test_bad_files_met_in_training_are_skipped_and_counted(tiny_set, tmp_path):
    csv = manifest_with_bad_files(tiny_set, tmp_path)
    result = run(tmp_path, "bad", csv, "--skip-check", steps=4)
    assert len(result["losses"]) == 4 and all(np.isfinite([loss for _, loss in result["losses"]]))
    assert result["failed_files"] > 0


def test_data_check_reports_every_kind_and_excludes_bad_files(tiny_set, tmp_path):
    csv = manifest_with_bad_files(tiny_set, tmp_path)
    with pytest.raises(utils.UserError, match="4 of 10 files are bad"):
        run(tmp_path, "refused", csv, steps=2)
    result = run(tmp_path, "checked", csv, "--max-bad-fraction", "0.5", steps=2)
    assert result["failed_files"] == 0  # the bad files never reach training
    report = pd.read_csv(os.path.join(result["out"], "data-check.csv"), keep_default_na=False)
    problems = dict(zip([os.path.basename(p) for p in report["path"]], report["problems"]))
    status = dict(zip([os.path.basename(p) for p in report["path"]], report["status"]))
    assert status["broken.wav"] == "bad" and problems["broken.wav"].startswith("cannot be decoded (")
    assert status["empty.wav"] == "bad" and problems["empty.wav"] == "empty"
    assert status["short.wav"] == "bad" and problems["short.wav"].startswith("too short")
    assert status["nan.wav"] == "bad" and "NaN/Inf" in problems["nan.wav"]
    assert status["silent.wav"] == "ok" and problems["silent.wav"] == "silent"
    assert status["odd.flac"] == "ok" and "3 channels" in problems["odd.flac"] and "11025 Hz (resampled to 8000 Hz)" in problems["odd.flac"]
    bad = pd.read_csv(os.path.join(result["out"], "bad-files.csv"))
    assert sorted(os.path.basename(p) for p in bad["path"]) == ["broken.wav", "empty.wav", "nan.wav", "short.wav"]
    only_check = train.main(TINY + ["--train-csv", csv, "--out", str(tmp_path / "only"), "--check-data",
                                    "--max-bad-fraction", "0.5"])
    assert only_check["files"] == 6


def test_bad_flags_and_labels_fail_before_training(tiny_set, tmp_path):
    with pytest.raises(utils.UserError, match="--task was given 2 times for 1 label columns"):
        run(tmp_path, "flags", tiny_set, "--label-column", "timbre", "--task", "multiclass", "--task", "regression")
    with pytest.raises(datasets.ManifestError, match="not a number"):
        run(tmp_path, "flags", tiny_set, "--label-column", "timbre", "--task", "regression")


def test_non_finite_steps_are_skipped_then_stop_the_run(tiny_set, tmp_path, monkeypatch):
    real_step = train.contrastive_step
    calls = []

    def poisoned_step(*args, **kwargs):
        loss, stats = real_step(*args, **kwargs)
        calls.append(1)
        if len(calls) in (2, 4, 5, 6):
            loss = loss * float("nan")
            stats["loss_sum"] = stats["loss_sum"] * float("nan")
        return loss, stats

    monkeypatch.setattr(train, "contrastive_step", poisoned_step)
    with pytest.raises(utils.UserError, match="3 steps in a row"):
        run(tmp_path, "nan", tiny_set, "--max-bad-steps", "3", "--save-every", "100", steps=10)
    state = safety.load_model_file(safety.list_checkpoints(str(tmp_path / "nan"))[-1])
    assert state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_sigterm_saves_and_resume_continues(tiny_set, tmp_path):
    out = str(tmp_path / "signal")
    command = [sys.executable, "train.py", *TINY, "--train-csv", tiny_set, "--out", out, "--steps", "100000",
               "--save-every", "100000", "--skip-check"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not glob.glob(os.path.join(out, "events.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "resume with the same command" in output
    saved = safety.load_model_file(safety.list_checkpoints(out)[-1])
    assert 0 < saved["step"] < 100000
    resumed = train.main(TINY + ["--train-csv", tiny_set, "--out", out, "--steps", str(saved["step"] + 2),
                                 "--skip-check"])
    assert [s for s, _ in resumed["losses"]] == [saved["step"] + 1, saved["step"] + 2]


def test_killed_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    first = safety.save_checkpoint({k: 0 for k in safety.CHECKPOINT_KEYS} | {"model": {"w": torch.ones(3)}},
                                  str(tmp_path), 1)
    # The writer stalls halfway through its file, so the kill lands mid-write every time.
    writer = (f"import sys, time, torch; sys.path.insert(0, {ROOT!r}); import safety\n"
              f"def stalled_save(state, f):\n"
              f"    f.write(b'half a checkpoint'); f.flush(); print('writing', flush=True); time.sleep(120)\n"
              f"safety.torch.save = stalled_save\n"
              f"safety.save_checkpoint({{k: 0 for k in safety.CHECKPOINT_KEYS}}, {str(tmp_path)!r}, 2)\n")
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "writing"
    assert glob.glob(str(tmp_path / "checkpoint-00000002.pt.tmp*")), "the write is under way"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert safety.list_checkpoints(str(tmp_path)) == [first]
    assert torch.equal(safety.load_model_file(first)["model"]["w"], torch.ones(3))


@pytest.mark.parametrize("encoder", ["samplecnn", "samplecnn-xl", "tuneplus", "melcnn"])
def test_every_encoder_trains_through_train_py(tiny_set, tmp_path, encoder):
    result = run(tmp_path, encoder, tiny_set, "--encoder", encoder, "--augment", "none", "--skip-check", steps=2)
    assert len(result["losses"]) == 2 and all(np.isfinite([loss for _, loss in result["losses"]]))


def test_gradient_accumulation_and_cosine_schedule_run(tiny_set, tmp_path):
    result = run(tmp_path, "accum", tiny_set, "--grad-accum", "2", "--schedule", "cosine", "--warmup-steps", "1",
                 "--clip-grad", "1.0", "--skip-check", steps=3)
    assert [s for s, _ in result["losses"]] == [1, 2, 3]
    state = safety.load_model_file(safety.list_checkpoints(result["out"])[-1])
    assert state["scheduler"]["last_epoch"] == 3


def test_label_changing_transform_on_labeled_clips_warns(tiny_set, tmp_path, capsys):
    run(tmp_path, "warn", tiny_set, "--label-column", "pitch_class", "--label-kind", "pitch_class",
        "--augment", "gain,pitch", "--skip-check", steps=1)
    assert "transform 'pitch' changes pitch_class labels" in capsys.readouterr().out
    run(tmp_path, "quiet", tiny_set, "--label-column", "pitch_class", "--label-kind", "pitch_class",
        "--augment", "gain,pitch", "--augment-labeled", "gain", "--skip-check", steps=1)
    assert "changes pitch_class labels" not in capsys.readouterr().out


def test_unwritable_out_fails_at_start(tiny_set, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(utils.UserError, match="is not writable"):
        run(tmp_path, "a-file/run", tiny_set, steps=1)


def test_augmentation_in_workers_uses_the_labeled_chain_for_labeled_clips(tiny_set, tmp_path, monkeypatch):
    seen = []
    real_call = augment.Chain.__call__

    def recording_call(chain, x, generator=None, **options):
        seen.append(tuple(chain.names))
        return real_call(chain, x, generator, **options)

    monkeypatch.setattr(augment.Chain, "__call__", recording_call)
    result = run(tmp_path, "workers", tiny_set, "--augment-on", "workers", "--augment", "gain,noise",
                 "--augment-labeled", "gain", "--label-column", "timbre", "--skip-check", steps=2)
    assert len(result["losses"]) == 2
    # Per clip in the dataset (workers=0 here): 8 clips a step, 4 labeled, 4 not.
    assert seen.count(("gain",)) == 8 and seen.count(("gain", "noise")) == 8


def test_a_dead_worker_is_reported_with_its_file(tiny_set, tmp_path, monkeypatch):
    manifest = pd.read_csv(tiny_set)
    folder = os.path.dirname(tiny_set)
    manifest["path"] = [os.path.join(folder, p) for p in manifest["path"]]
    poison = str(tmp_path / "poison.wav")
    sf.write(poison, np.zeros(8000, dtype=np.float32) + 0.1, 8000)
    csv = str(tmp_path / "poisoned.csv")
    pd.concat([manifest[manifest["split"] == "train"].head(3),
               pd.DataFrame({"path": [poison], "split": ["train"]})]).to_csv(csv, index=False)
    real_read = datasets.read_source_crops

    def crashing_read(path, *args, **kwargs):
        if path == poison:  # a decoder crash takes the whole worker process down
            os.kill(os.getpid(), signal.SIGKILL)
        return real_read(path, *args, **kwargs)

    # DataLoader workers are forked, so they inherit the patched reader.
    monkeypatch.setattr(datasets, "read_source_crops", crashing_read)
    with pytest.raises(utils.UserError, match="poison.wav"):
        # A later flag wins in argparse: one worker instead of TINY's none.
        train.main(TINY + ["--workers", "1", "--train-csv", csv, "--out", str(tmp_path / "dead"), "--steps", "3",
                           "--skip-check"])


def test_resampling_on_the_device_trains(tiny_set, tmp_path):
    folder = os.path.dirname(tiny_set)
    manifest = pd.read_csv(tiny_set)
    for index, path in enumerate(manifest["path"][:6]):  # a few files at another rate
        audio, rate = sf.read(os.path.join(folder, path))
        sf.write(str(tmp_path / f"{index}.flac"), np.repeat(audio, 2), 2 * rate)
        manifest.loc[index, "path"] = str(tmp_path / f"{index}.flac")
    manifest["path"] = [p if os.path.isabs(p) else os.path.join(folder, p) for p in manifest["path"]]
    csv = str(tmp_path / "rates.csv")
    manifest.to_csv(csv, index=False)
    on_device = run(tmp_path, "device", csv, "--resample-on", "device", "--augment", "none", "--skip-check", steps=3)
    in_workers = run(tmp_path, "workers", csv, "--resample-on", "workers", "--augment", "none", "--skip-check",
                     steps=3)
    assert [loss for _, loss in on_device["losses"]] == pytest.approx([loss for _, loss in in_workers["losses"]],
                                                                       rel=1e-4)


def test_activation_checkpointing_and_bf16_flags(tiny_set, tmp_path):
    plain = run(tmp_path, "plain", tiny_set, "--augment", "none", "--skip-check", steps=3)
    checkpointed = run(tmp_path, "checkpointed", tiny_set, "--augment", "none", "--skip-check",
                       "--activation-checkpointing", steps=3)
    # Recomputing activations in backward changes memory, not the arithmetic.
    assert [loss for _, loss in checkpointed["losses"]] == pytest.approx([loss for _, loss in plain["losses"]],
                                                                          rel=1e-5)
    bf16 = run(tmp_path, "bf16", tiny_set, "--augment", "none", "--skip-check", "--precision", "bf16", steps=3)
    assert np.allclose([loss for _, loss in bf16["losses"]], [loss for _, loss in plain["losses"]], rtol=0.05)


def test_each_regression_signal_has_its_own_units_and_kernel(tiny_set):
    # brightness in standard deviations, pitch in semitones (raw MIDI values) with its own sigma.
    args = train.build_parser().parse_args(
        ["--label-column", "brightness", "--label-column", "pitch", "--task", "regression",
         "--target-units", "standardized", "--target-units", "raw", "--target-sigma", "0.5", "--target-sigma", "2"])
    train.derive_args(args, 1, torch.device("cpu"))
    columns, specs = train.parse_columns(datasets.read_manifest([tiny_set]), args)
    assert specs[0].std == columns[0].std and specs[0].sigma == 0.5
    assert specs[1].std is None and specs[1].sigma == 2.0
    assert columns[1].values[columns[1].labeled].max() > 40  # MIDI numbers, not standardized
    pitches = torch.tensor([[60.0], [62.0], [72.0]])
    target = losses.labels_target(pitches, torch.ones(3, dtype=torch.bool), specs[1])
    assert target[0, 1].item() == pytest.approx(math.exp(-4 / 8))  # 2 semitones at sigma 2 semitones
    assert target[0, 2].item() == pytest.approx(math.exp(-144 / 8))
