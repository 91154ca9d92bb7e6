"""The shared safety mechanisms (safety.py) under faults the first fault list did not name.

A model file that carries code, a write that fails mid-run, Ctrl-C, a data worker killed
by the kernel, a damaged data check, a checkpoint older than a flag: each through real
files and real processes, each ending in one line with nothing lost.
"""
import glob
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import models
import safety
import train
import utils
from test_reliability import ENVIRONMENT, ROOT, cli_error, error_line, tiny_set, train_args, train_py  # noqa: F401


# ---------------------------------------------------------------- the safe loader

class Payload:
    """A pickled object whose unpickling runs code: it creates the file `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def checkpoint_with_payload(source, path, marker):
    """A copy of the checkpoint `source` that also carries a Payload (written the way an attacker would)."""
    state = torch.load(source, weights_only=True)
    state["note"] = Payload(str(marker))
    with open(path, "wb") as f:
        torch.save(state, f, pickle_module=pickle)


def test_no_path_runs_the_code_a_checkpoint_carries(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 2, "--save-every", "2"))
    marker = tmp_path / "code-ran"
    evil = tmp_path / "shared" / "checkpoint-00000002.pt"
    evil.parent.mkdir()
    checkpoint_with_payload(str(out / "checkpoint-00000002.pt"), evil, marker)
    with pytest.raises(safety.CheckpointError, match="refused: it holds .*nothing in it was run"):
        models.load_pretrained(str(evil))
    with pytest.raises(safety.CheckpointError, match="refused"):
        torch.hub.load(ROOT, "semisupcon", source="local", checkpoint=str(evil))
    probe = subprocess.run([sys.executable, "probe.py", "--checkpoint", str(evil), "--csv", tiny_set,
                            "--label-column", "pitch_class"], cwd=ROOT, env=ENVIRONMENT, capture_output=True,
                           text=True, timeout=120)
    assert probe.returncode == 2 and "Traceback" not in probe.stderr and "refused" in probe.stderr
    message = cli_error(capsys, train_args(tiny_set, tmp_path / "resumed", 4, "--resume", str(evil)))
    assert message.startswith(f"{evil}: refused")
    assert not marker.exists(), "loading the checkpoint ran the code it carries"


def test_model_files_of_another_format_or_kind_are_one_line(tiny_set, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 2, "--save-every", "2"))
    state = safety.load_model_file(str(out / "checkpoint-00000002.pt"), keys=safety.CHECKPOINT_KEYS)
    old = tmp_path / "old.pt"
    torch.save({k: v for k, v in state.items() if k != "format"}, old)  # as written before format 2
    with pytest.raises(safety.CheckpointError, match="format 1, this code reads format 2"):
        models.load_pretrained(str(old))
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(safety.CheckpointError, match="not a SemiSupCon checkpoint"):
        models.load_pretrained(str(listed))


def test_a_run_ends_with_a_model_file_that_embeds_but_does_not_resume(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 2, "--save-every", "2"))
    shared = safety.load_model_file(str(out / "model.pt"))
    assert "optimizer" not in shared and "rng" not in shared
    assert os.path.getsize(out / "model.pt") < os.path.getsize(out / "checkpoint-00000002.pt")
    wave = torch.randn(8000)
    assert torch.equal(models.load_pretrained(str(out / "model.pt")).embed(wave, 8000),
                       models.load_pretrained(str(out / "checkpoint-00000002.pt")).embed(wave, 8000))
    message = cli_error(capsys, train_args(tiny_set, tmp_path / "again", 4, "--resume", str(out / "model.pt")))
    assert "a model file for sharing (no optimizer state)" in message and "cannot resume" in message


# ---------------------------------------------------------------- the stop path

def test_a_failed_tensorboard_write_saves_and_ends_in_one_line(tiny_set, tmp_path, capsys, monkeypatch):
    real = train.SummaryWriter.add_scalar

    def add_scalar(writer, tag, value, step, *rest, **kwargs):
        if step == 3:
            raise OSError(28, "No space left on device")  # what the event file's write raised on a full disk
        return real(writer, tag, value, step, *rest, **kwargs)

    monkeypatch.setattr(train.SummaryWriter, "add_scalar", add_scalar)
    out = tmp_path / "run"
    message = cli_error(capsys, train_args(tiny_set, out, 10, "--save-every", "100"))
    assert message.startswith("stopped at step 3: a write failed: No space left on device; saved step 3 in ")
    assert safety.load_model_file(safety.list_checkpoints(str(out))[-1], keys=safety.CHECKPOINT_KEYS)["step"] == 3


def test_an_event_file_that_fails_at_the_end_is_a_warning_and_the_run_keeps_its_result(tiny_set, tmp_path, capsys,
                                                                                      monkeypatch):
    closed = []

    def close(writer):
        closed.append(writer.log_dir)
        raise OSError(28, "No space left on device")  # the last flush of the event file, on a full disk

    monkeypatch.setattr(train.SummaryWriter, "close", close)
    out = tmp_path / "run"
    result = train.main(train_args(tiny_set, out, 2))
    err = capsys.readouterr().err
    assert result["step"] == 2 and closed == [str(out)] and (out / "model.pt").is_file()
    assert "warning: the TensorBoard event file could not be written to the end (No space left on device)" in err
    assert "Traceback" not in err


def test_ctrl_c_saves_and_the_same_command_resumes(tiny_set, tmp_path):
    out = tmp_path / "run"
    argv = train_args(tiny_set, out, 100000, "--save-every", "100000", "--workers", "1")
    # Its own process group, as a shell gives a foreground job: Ctrl-C reaches it and its data worker.
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENVIRONMENT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not glob.glob(str(out / "events.*")) and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    stopped = [line for line in stdout.splitlines() if line.startswith("stopped by SIGINT at step ")]
    assert stopped, stdout[-2000:]
    step = int(stopped[0].split("at step ")[1].split(";")[0])
    assert safety.list_checkpoints(str(out))[-1].endswith(f"checkpoint-{step:08d}.pt")
    resumed = train_py(train_args(tiny_set, out, step + 2))
    assert resumed.returncode == 0 and f"at step {step}" in resumed.stdout


def test_a_run_that_fails_in_python_gives_back_ctrl_c_and_its_lock(tiny_set, tmp_path, capsys):
    """train.main called from Python (a notebook): an error leaves no signal handler or lock behind."""
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 2, "--save-every", "2"))
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in safety.StopSignal.SIGNALS}
    # Refused after the lock is taken and the handlers are set: another --width than the checkpoint's.
    assert "holds another model" in cli_error(capsys, train_args(tiny_set, out, 4, "--width", "0.25"))
    assert {name: signal.getsignal(getattr(signal, name)) for name in safety.StopSignal.SIGNALS} == handlers
    assert (out / "run.lock").read_text() == ""  # released: the record is emptied
    # Another process takes the folder at once, without a takeover message.
    resumed = train_py(train_args(tiny_set, out, 3))
    assert resumed.returncode == 0 and "took over" not in resumed.stdout and "at step 2" in resumed.stdout


def test_a_worker_killed_by_the_kernel_is_named_and_the_run_saved(tiny_set, tmp_path):
    out = tmp_path / "run"
    argv = train_args(tiny_set, out, 100000, "--save-every", "100000", "--workers", "1")
    process = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=ENVIRONMENT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not glob.glob(str(out / "events.*")) and time.time() < deadline:
        time.sleep(0.1)
    status = glob.glob(str(out / "workers" / "0" / "worker-*.txt"))
    assert status
    os.kill(int(os.path.basename(status[0])[len("worker-"):-len(".txt")]), signal.SIGKILL)  # as the OOM killer does
    stdout, stderr = process.communicate(timeout=120)
    message = error_line(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    assert "a data-loading worker (pid " in message and "killed by" in message
    assert "most likely by the kernel for lack of memory" in message and "Lower --workers" in message
    step = int(message.split("stopped at step ")[1].split(":")[0])
    assert f"saved step {step}" in message and safety.list_checkpoints(str(out))


def test_a_clock_step_back_gives_no_negative_speed(tiny_set, tmp_path, monkeypatch):
    real, calls = time.time, []

    def stepping_clock():
        calls.append(1)
        return real() - (3600 if len(calls) > 3 else 0)  # NTP steps the wall clock back an hour

    monkeypatch.setattr(time, "time", stepping_clock)
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 4))
    from test_validation import scalars
    assert all(speed > 0 for speed in scalars(str(out))["speed/clips_per_s"])


# ---------------------------------------------------------------- derived files and the resume point

@pytest.mark.parametrize("damage", [b"", b"path,status,prob"])
def test_a_damaged_data_check_is_rebuilt(tiny_set, tmp_path, damage):
    out = tmp_path / "run"
    out.mkdir()
    (out / "data-check.csv").write_bytes(damage)  # what kill -9 mid-write left before writes were atomic
    result = train_py([a for a in train_args(tiny_set, out, 2) if a != "--skip-check"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checking 40 audio files" in result.stdout
    assert len((out / "data-check.csv").read_text().splitlines()) == 41


def test_resume_refuses_a_flag_the_checkpoint_predates(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 2, "--save-every", "2"))
    path = str(out / "checkpoint-00000002.pt")
    state = safety.load_model_file(path, keys=safety.CHECKPOINT_KEYS)
    del state["args"]["target_sigma"]  # as a checkpoint saved before --target-sigma existed
    safety.save_torch(path, state)
    message = cli_error(capsys, train_args(tiny_set, out, 4, "--target-sigma", "0.7"))
    assert "--target-sigma [0.7] (the checkpoint predates this flag: it trained as with the default, [0.5])" \
        in message
    result = train.main(train_args(tiny_set, out, 4))  # at its default: resumes
    assert result["step"] == 4


def test_all_audio_vanishing_mid_run_saves_and_ends_in_one_line(tiny_set, tmp_path, capsys, monkeypatch):
    import datasets
    real, calls = datasets.read_source_crops, []

    def vanishing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 8 * 3:  # after 3 steps of batch 8 the disk holding the audio is gone
            raise datasets.AudioError(f"{args[0]}: does not exist")
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "read_source_crops", vanishing)
    out = tmp_path / "run"
    message = cli_error(capsys, train_args(tiny_set, out, 10, "--save-every", "100"))
    assert message.startswith("stopped at step 3: ") and "failed to load" in message and "saved step 3" in message


def test_writes_are_whole_or_absent_and_name_a_full_disk(tmp_path):
    path = tmp_path / "results.json"
    safety.write_json(str(path), {"a": 1})
    before = path.read_bytes()

    def failing(f):
        f.write(b"{\"a\": 2, ")
        raise OSError(28, "No space left on device")

    with pytest.raises(utils.UserError, match="cannot write results.json in .*No space left on device"):
        safety.write_file(str(path), failing)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["results.json"]


def test_train_warns_of_audio_in_two_splits(tiny_set, tmp_path, capsys):
    import shutil

    from test_reliability import copy_manifest
    manifest, csv = copy_manifest(tiny_set, tmp_path)
    train_row = manifest.index[manifest["split"] == "train"][0]
    copy = str(tmp_path / "copy-of-a-train-file.wav")
    shutil.copy(manifest.loc[train_row, "path"], copy)  # the same bytes under another name
    test_row = manifest.index[manifest["split"] == "test"][0]
    manifest.loc[test_row, "path"] = copy
    manifest.to_csv(csv, index=False)
    train.main(train_args(str(csv), tmp_path / "run", 1))
    warning = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: 1 audio file")]
    assert warning and "byte copy under another name" in warning[0] and "train/test 1" in warning[0]
