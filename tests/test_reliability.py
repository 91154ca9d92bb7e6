"""Faults a cluster inflicts and mistakes a user makes: each gives one line, and no run is lost.

Real files (truncated and empty checkpoints, undecodable audio, binary manifests), real
processes (a second run on the same --out, kill -9, torchrun restarts) and real file
systems (a file-size limit, a full tmpfs where one can be mounted).
"""
import argparse
import glob
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

import datasets
import probe
import safety
import synthetic
import train
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", "8000", "--batch-size", "8",
        "--workers", "0", "--log-every", "1", "--val-every", "0", "--lr", "1e-3", "--skip-check"]
ENVIRONMENT = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    return synthetic.make_synthetic_set(str(folder), num_files=40, seconds=1.2, sample_rate=8000, seed=1)


def train_args(manifest, out, steps, *extra):
    return TINY + ["--train-csv", manifest, "--out", str(out), "--steps", str(steps)] + list(extra)


def cli_error(capsys, argv):
    """The message of the one `PROG: error: MESSAGE` line a failing train.py run prints (exit 2)."""
    with pytest.raises(SystemExit) as stopped:
        utils.run_cli(train.main, argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0].split(": error: ", 1)[1]


def train_py(argv, limit_bytes=None, timeout=120):
    """train.py as a real process (optionally under a file-size limit) -> CompletedProcess."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=ENVIRONMENT, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit if limit_bytes else None)


def error_line(result):
    """The single `train.py: error: ...` of a real process's stderr (no traceback)."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    found = [line.split("train.py: error: ", 1)[1] for line in result.stderr.replace("\r", "\n").splitlines()
             if "train.py: error: " in line]
    assert len(found) == 1, result.stderr[-2000:]
    return found[0]


def copy_manifest(tiny_set, tmp_path, name="copy.csv"):
    """The tiny set's manifest as a DataFrame with absolute paths, and where to write it."""
    manifest = pd.read_csv(tiny_set, dtype=str, keep_default_na=False)
    manifest["path"] = [os.path.join(os.path.dirname(tiny_set), p) for p in manifest["path"]]
    return manifest, str(tmp_path / name)


# ---------------------------------------------------------------- resume that never crash-loops

@pytest.mark.parametrize("damage", ["truncated", "zero bytes"])
def test_auto_resume_skips_a_broken_newest_checkpoint_and_stays_exact(tiny_set, tmp_path, capsys, damage):
    whole = train.main(train_args(tiny_set, tmp_path / "whole", 6, "--save-every", "2"))
    out = tmp_path / "parts"
    train.main(train_args(tiny_set, out, 4, "--save-every", "2"))
    newest = safety.list_checkpoints(str(out))[-1]
    assert newest.endswith("checkpoint-00000004.pt")
    with open(newest, "r+b") as f:  # a torn write: the file stops partway (or never got bytes)
        f.truncate(0 if damage == "zero bytes" else os.path.getsize(newest) // 2)
    capsys.readouterr()
    resumed = train.main(train_args(tiny_set, out, 6, "--save-every", "2"))
    printed = capsys.readouterr().out
    assert f"skipped {newest}: " in printed and "resumed from" in printed and "checkpoint-00000002.pt" in printed
    assert ("empty file (0 bytes)" if damage == "zero bytes" else "cannot be loaded") in printed
    # Resumed from step 2: steps 3-6 repeat the uninterrupted run to the last bit.
    assert resumed["losses"] == whole["losses"][2:]


def test_broken_resume_path_is_one_line_naming_it(tiny_set, tmp_path, capsys):
    broken = tmp_path / "checkpoint-00000007.pt"
    broken.write_bytes(b"PK\x03\x04 half a zip archive")
    message = cli_error(capsys, train_args(tiny_set, tmp_path / "run", 3, "--resume", str(broken)))
    assert message.startswith(f"{broken}: cannot be loaded (23 bytes; truncated or damaged: ")
    broken.write_bytes(b"")
    message = cli_error(capsys, train_args(tiny_set, tmp_path / "run", 3, "--resume", str(broken)))
    assert message == f"{broken}: empty file (0 bytes), not a checkpoint"


def test_every_checkpoint_broken_is_one_line(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-00000002.pt").write_bytes(b"")
    message = cli_error(capsys, train_args(tiny_set, out, 3))
    assert message.startswith(f"no checkpoint in {out} loads") and "--resume none" in message


def test_probe_names_a_broken_checkpoint_and_falls_back_in_a_folder(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 4, "--save-every", "2"))
    older, newest = safety.list_checkpoints(str(out))
    with open(newest, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(safety.CheckpointError, match=f"{newest}: cannot be loaded"):
        probe.load_encoder(newest, None, torch.device("cpu"))
    capsys.readouterr()
    model, settings = probe.load_encoder(str(out), argparse.Namespace(seed=0), torch.device("cpu"))
    assert settings["file"] == older and f"skipped {newest}" in capsys.readouterr().err
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(safety.CheckpointError, match=f"{empty}: empty file"):
        probe.load_encoder(str(empty), None, torch.device("cpu"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        utils.run_cli(probe.main, ["--checkpoint", newest, "--csv", tiny_set, "--label-column", "timbre",
                                   "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "probe.json")])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err
    assert f": error: {newest}: cannot be loaded (1,000 bytes; truncated or damaged: " in err


# ---------------------------------------------------------------- saves that fail cleanly

def test_full_file_size_limit_fails_cleanly_and_keeps_the_last_checkpoint(tiny_set, tmp_path):
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 2, "--save-every", "2"))
    first = safety.list_checkpoints(str(out))[-1]
    size = os.path.getsize(first)
    # The start-up write test (1 MiB) passes; the next checkpoint does not fit.
    result = train_py(train_args(tiny_set, out, 4, "--save-every", "2"), limit_bytes=(1 << 20) + size // 4)
    message = error_line(result)
    assert message.startswith(f"cannot write checkpoint-00000004.pt in {out}: File too large; it needs ")
    needed = int(message.split("it needs ")[1].split(" bytes")[0].replace(",", ""))
    assert abs(needed - size) < 1000 and "bytes are free there" in message and "ulimit -f" in message
    assert not glob.glob(str(out / "*.tmp*")), "the partial file is removed"
    assert safety.list_checkpoints(str(out)) == [first] and safety.load_model_file(first)["step"] == 2


def mount_tmpfs(folder, megabytes):
    """Mount a real tmpfs at `folder` (needs root); False where that is not allowed."""
    folder.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_disk_that_fills_during_the_run_fails_cleanly(tiny_set, tmp_path):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, 70):
        pytest.skip("mounting a tmpfs needs root (the file-size-limit test covers the same path)")
    try:
        out = disk / "run"
        process = subprocess.Popen([sys.executable, "train.py", *train_args(tiny_set, out, 100000, "--save-every",
                                                                            "30")],
                                   cwd=ROOT, env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not (out / "checkpoint-00000030.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        # Another job fills the disk: 200 kB stay free, too few for the next checkpoint.
        with open(disk / "filler", "wb") as f:
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(disk).free - 200_000)
        _, err = process.communicate(timeout=60)
        message = error_line(subprocess.CompletedProcess(process.args, process.returncode, "", err))
        assert "No space left on device; it needs " in message and f" in {out}: " in message
        assert not glob.glob(str(out / "*.tmp*"))
        assert safety.load_model_file(safety.list_checkpoints(str(out))[-1])["step"] >= 30
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_a_killed_save_leaves_nothing_behind_at_the_next_start(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 2, "--save-every", "2"))
    # A real save killed mid-write (kill -9): its half-written temporary file stays.
    writer = (f"import sys, time; sys.path.insert(0, {ROOT!r}); import safety\n"
              f"def stalled_save(state, f):\n"
              f"    f.write(b'half a checkpoint'); print('writing', flush=True); time.sleep(120)\n"
              f"safety.torch.save = stalled_save\n"
              f"safety.save_checkpoint({{k: 0 for k in safety.CHECKPOINT_KEYS}}, {str(out)!r}, 3)\n")
    process = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE, text=True, env=ENVIRONMENT)
    assert process.stdout.readline().strip() == "writing"
    process.send_signal(signal.SIGKILL)
    process.wait()
    stale = glob.glob(str(out / "checkpoint-00000003.pt.tmp*"))
    assert len(stale) == 1
    capsys.readouterr()
    train.main(train_args(tiny_set, out, 3, "--save-every", "2"))
    assert f"removed {stale[0]}: the partial file of a write that was killed" in capsys.readouterr().out
    assert not glob.glob(str(out / "*.tmp*"))


def test_pruning_keeps_the_checkpoint_just_written(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 2, "--save-every", "2", "--keep", "1"))
    # A broken file of a later step (a copy cut off): resume skips it, and --keep 1 must not
    # delete the only good checkpoint in its favour.
    (out / "checkpoint-00000100.pt").write_bytes(b"cut off")
    train.main(train_args(tiny_set, out, 3, "--save-every", "2", "--keep", "1"))
    names = [os.path.basename(p) for p in safety.list_checkpoints(str(out))]
    assert names == ["checkpoint-00000003.pt", "checkpoint-00000100.pt"]
    assert safety.load_model_file(str(out / "checkpoint-00000003.pt"))["step"] == 3


# ---------------------------------------------------------------- one run per folder

def test_a_second_run_on_the_same_out_refuses_and_a_dead_holders_lock_is_taken_over(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "train.py", *train_args(tiny_set, out, 100000, "--save-every",
                                                                      "100000")],
                             cwd=ROOT, env=ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not glob.glob(str(out / "events.*")) and time.time() < deadline:
            time.sleep(0.1)
        message = cli_error(capsys, train_args(tiny_set, out, 3))
        assert message.startswith(f"--out {out} is in use by process {first.pid} on {socket.gethostname()}")
        assert "choose another --out" in message
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not safety.list_checkpoints(str(out)), "the refused run wrote no checkpoint"
    train.main(train_args(tiny_set, out, 2))
    assert f"took over {out / 'run.lock'} from process {first.pid}" in capsys.readouterr().out


# ---------------------------------------------------------------- nothing changes silently on resume

def test_a_changed_model_flag_is_one_line_naming_flag_and_both_values(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 2, "--save-every", "2"))
    checkpoint = safety.list_checkpoints(str(out))[-1]
    message = cli_error(capsys, train_args(tiny_set, out, 4, "--width", "0.25"))
    assert message.startswith(f"{checkpoint} holds another model (--width 0.125 in the checkpoint, 0.25 given)")
    message = cli_error(capsys, train_args(tiny_set, tmp_path / "other", 4, "--encoder", "tuneplus", "--resume",
                                           checkpoint))
    assert "--encoder samplecnn in the checkpoint, tuneplus given" in message


def test_changed_settings_are_refused_listed_and_allowed_on_request(tiny_set, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(train_args(tiny_set, out, 2, "--save-every", "2"))
    message = cli_error(capsys, train_args(tiny_set, out, 4, "--seed", "1", "--lr", "0.01"))
    assert "--lr 0.001 -> 0.01; --seed 0 -> 1" in message and "--allow-changed-settings" in message
    manifest, grown = copy_manifest(tiny_set, tmp_path)
    pd.concat([manifest, manifest.head(1)]).to_csv(grown, index=False)
    message = cli_error(capsys, train_args(grown, out, 4))
    assert "manifest rows 40 (digest " in message and ") -> 41 (digest " in message
    resumed = train.main(train_args(grown, out, 3, "--seed", "1", "--allow-changed-settings"))
    printed = capsys.readouterr().out
    assert "with changed settings (--allow-changed-settings): manifest rows 40" in printed and "--seed 0 -> 1" in printed
    assert [s for s, _ in resumed["losses"]] == [3]
    # Length, logging, saving and worker settings are a normal resume.
    resumed = train.main(train_args(grown, out, 5, "--seed", "1", "--log-every", "2", "--save-every", "5",
                                    "--workers", "1", "--keep", "2"))
    assert "changed settings" not in capsys.readouterr().out and resumed["step"] == 5


def test_steps_zero_and_a_finished_run_say_so_and_write_nothing(tiny_set, tmp_path, capsys):
    out = tmp_path / "zero"
    message = cli_error(capsys, train_args(tiny_set, out, 0))
    assert message.startswith("--steps 0: nothing to train") and not out.exists()
    done = tmp_path / "done"
    train.main(train_args(tiny_set, done, 2, "--save-every", "2", "--label-column", "tags", "--task", "multilabel"))
    before = sorted(os.listdir(done))
    summary = capsys.readouterr().out
    assert "done: steps 0 -> 2 in " in summary and "clips/s); no validation" in summary
    assert f"checkpoint {done / 'checkpoint-00000002.pt'}" in summary
    assert (f"python probe.py --checkpoint {done} --csv {tiny_set} --label-column tags --task multilabel"
            in summary)
    result = train.main(train_args(tiny_set, done, 2, "--label-column", "tags", "--task", "multilabel"))
    assert result["step"] == 2 and result["losses"] == []
    assert "is finished: " in capsys.readouterr().out
    assert sorted(os.listdir(done)) == before, "no new events file, args.json or checkpoint"


# ---------------------------------------------------------------- elastic restarts

RESTARTED_WORKER = f"""
import os, sys
sys.path.insert(0, {ROOT!r})
import train
calls = []
real_step = train.contrastive_step
def dying_step(*args, **kwargs):
    calls.append(1)
    # First attempt, rank 1: the worker dies at its 4th step (after the checkpoint of step 2).
    if len(calls) == 4 and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os._exit(1)
    return real_step(*args, **kwargs)
train.contrastive_step = dying_step
train.main(sys.argv[1:])
"""


def test_torchrun_max_restarts_resumes_after_a_worker_dies(tiny_set, tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(RESTARTED_WORKER)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "--max-restarts", "1", "--monitor-interval", "0.2", str(worker),
                             *train_args(tiny_set, out, 4, "--save-every", "2")],
                            cwd=ROOT, env=ENVIRONMENT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "connectFullMesh" not in result.stderr
    assert f"resumed from {out / 'checkpoint-00000002.pt'} at step 2" in result.stdout
    assert safety.load_model_file(safety.list_checkpoints(str(out))[-1])["step"] == 4


# ---------------------------------------------------------------- one line for every user error

def test_a_user_error_is_one_line_from_a_real_process(tiny_set, tmp_path):
    message = error_line(train_py(train_args(tiny_set, tmp_path / "run", 3, "--label-column", "Timbre")))
    assert message.startswith(f"label column 'Timbre' is not in {tiny_set} (did you mean 'timbre'?)")
    assert "source_row" not in message and "'source'" not in message


def test_argparse_abbreviations_are_refused(tiny_set, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.main(train_args(tiny_set, tmp_path / "run", 3, "--label-col", "timbre"))
    assert stopped.value.code == 2
    assert "unrecognized arguments: --label-col timbre" in capsys.readouterr().err


def test_a_folder_an_audio_file_or_a_binary_file_given_as_a_manifest(tiny_set, tmp_path, capsys):
    with pytest.raises(datasets.ManifestError, match="is a folder, not a manifest; .*datasets.py scan"):
        datasets.read_manifest(str(tmp_path))
    song = tmp_path / "song.mp3"
    sf.write(str(song), 0.1 * np.sin(np.arange(8000) / 5.0).astype(np.float32), 8000, format="MP3")
    message = cli_error(capsys, train_args(str(song), tmp_path / "run", 3))
    assert message.startswith(f"{song} is an audio file, not a manifest; give a CSV with a 'path' column")
    binary = tmp_path / "export.csv"
    binary.write_bytes(bytes(range(256)) * 8)
    message = cli_error(capsys, train_args(str(binary), tmp_path / "run", 3))
    assert message.startswith(f"{binary} is not a text CSV")


def test_separator_backslashes_path_column_and_split_have_their_own_messages(tiny_set, tmp_path, capsys):
    manifest, csv = copy_manifest(tiny_set, tmp_path)
    manifest[["path", "split"]].to_csv(csv, sep=";", index=False)
    assert "separated by semicolons" in cli_error(capsys, train_args(csv, tmp_path / "run", 3))
    windows = manifest.copy()
    windows["path"] = [os.path.relpath(p, tmp_path).replace("/", "\\") for p in manifest["path"]]
    windows.to_csv(csv, index=False)
    message = cli_error(capsys, train_args(csv, tmp_path / "run", 3))
    assert f"{csv}, line 2, column 'path': " in message and "uses Windows backslashes; write paths with '/'" in message
    manifest.rename(columns={"path": "Path"}).to_csv(csv, index=False)
    assert "no 'path' column (did you mean 'Path'?)" in cli_error(capsys, train_args(csv, tmp_path / "run", 3))
    held_out = manifest.copy()
    held_out.loc[3, "split"] = "holdout"
    held_out.to_csv(csv, index=False)
    message = cli_error(capsys, train_args(csv, tmp_path / "run", 3))
    assert message.startswith(f"{csv}, line 5, column 'split': unknown split 'holdout'")


def test_paths_relative_to_the_current_folder_name_the_rule(tiny_set, tmp_path, capsys, monkeypatch):
    manifest, _ = copy_manifest(tiny_set, tmp_path)
    (tmp_path / "lists").mkdir()
    csv = str(tmp_path / "lists" / "train.csv")
    manifest["path"] = [os.path.relpath(p, tmp_path) for p in manifest["path"]]  # from tmp_path, not lists/
    manifest.to_csv(csv, index=False)
    monkeypatch.chdir(tmp_path)
    message = cli_error(capsys, [a for a in train_args(csv, tmp_path / "run", 3) if a != "--skip-check"])
    assert message.startswith("40 of 40 files are bad (100.0% > --max-bad-fraction 1.0%): 40 does not exist")
    assert "40 of 40 missing files exist relative to the current folder but not to the CSV's" in message
    assert "read relative to the folder of the CSV itself" in message


def test_the_check_tells_missing_from_undecodable_with_the_whole_reason(tmp_path):
    deep = tmp_path / ("a-long-folder-name-" * 6) / ("another-long-folder-" * 6)
    deep.mkdir(parents=True)
    broken = deep / "broken.wav"
    broken.write_bytes(b"RIFF....WAVE but not really")
    missing = datasets.check_file(str(deep / "gone.wav"), 0.25, 8000)
    assert missing["status"] == "bad" and missing["problems"] == "does not exist"
    report = datasets.check_file(str(broken), 0.25, 8000)
    assert report["status"] == "bad" and report["problems"].startswith(f"cannot be decoded (Error opening '{broken}'")
    # The decoder's reason follows the (long) path in full, not cut at a fixed width.
    assert report["problems"].endswith(".)") and len(report["problems"]) > len(str(broken)) + 40


def test_a_label_column_without_labeled_train_rows_names_file_column_and_b_s_0(tiny_set, tmp_path, capsys):
    manifest, csv = copy_manifest(tiny_set, tmp_path)
    manifest["genre"] = ["rock" if split != "train" else "" for split in manifest["split"]]
    manifest.to_csv(csv, index=False)
    message = cli_error(capsys, train_args(csv, tmp_path / "run", 1, "--label-column", "genre"))
    assert message.startswith(f"{csv}: label column 'genre' has no label on any of the 28 train rows (12 labeled "
                              f"rows are in val/test)")
    assert message.endswith("train self-supervised with --labeled-per-batch 0")
    result = train.main(train_args(csv, tmp_path / "run", 1, "--label-column", "genre", "--labeled-per-batch", "0"))
    assert result["step"] == 1
    manifest["genre"] = ""
    manifest.to_csv(csv, index=False)
    message = cli_error(capsys, train_args(csv, tmp_path / "empty", 1, "--label-column", "genre"))
    assert "label column 'genre' has no label on any of the 28 train rows (every cell is empty)" in message


def test_a_batch_without_negatives_is_refused(tiny_set, tmp_path, capsys):
    message = cli_error(capsys, train_args(tiny_set, tmp_path / "run", 3, "--batch-size", "1"))
    assert message.startswith("--batch-size 1: a clip's negatives are the other clips of its batch")


def test_an_all_silent_data_set_is_refused_by_the_check(tmp_path, capsys):
    for index in range(6):
        sf.write(str(tmp_path / f"{index}.wav"), np.zeros(8000, dtype=np.float32), 8000)
    csv = str(tmp_path / "silent.csv")
    pd.DataFrame({"path": [f"{index}.wav" for index in range(6)]}).to_csv(csv, index=False)
    argv = [a for a in train_args(csv, tmp_path / "run", 3) if a != "--skip-check"]
    message = cli_error(capsys, argv)
    assert message.startswith("every usable file is silent (all 6 hold only zeros")
    report = pd.read_csv(tmp_path / "run" / "data-check.csv", keep_default_na=False)
    assert list(report["problems"]) == ["silent"] * 6
