"""export.py and the probe's outputs under faults, with real files and real processes: two
exports to one OUT, damaged parts and cache entries, read-only folders, a long file read
clip by clip, a killed probe resumed, model files for sharing, a pickled payload refused."""
import json
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
import torchaudio

import datasets
import export
import models
import probe
import safety
import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"encoder": "samplecnn", "width": 0.125, "sample_rate": 8000, "clip_samples": 4000, "hidden_dim": 32,
            "projection_dim": 16}
FAST = ["--max-epochs", "3", "--patience", "3", "--batch-size", "16"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    return synthetic.make_synthetic_set(str(folder), num_files=40, seconds=1.2, sample_rate=8000)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A full checkpoint (optimizer state and all) of a small encoder, written as train.py writes one."""
    torch.manual_seed(0)
    model = models.build_model(SETTINGS)
    path = str(tmp_path_factory.mktemp("run") / "checkpoint-00000003.pt")
    safety.save_torch(path, {"format": safety.FORMAT, "model": model.state_dict(), "optimizer": {"state": {}},
                             "scheduler": {}, "scaler": {}, "step": 3, "args": dict(SETTINGS), "rng": {},
                             "labels": None, "best_val": None})
    return path


def run(*args, cwd, wait=True):
    command = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def slowed(script, stage, argv):
    """python -c source that runs `script`'s main on argv with `stage` (module.function) sleeping first."""
    module, function = stage.split(".")
    return (f"import sys, time; sys.path.insert(0, {ROOT!r}); import utils, {module}, {script}\n"
            f"original = {module}.{function}\n"
            f"def slow(*a, **k):\n    time.sleep(0.3)\n    return original(*a, **k)\n"
            f"{module}.{function} = slow\n"
            f"utils.run_cli({script}.main, {argv!r})")


def wait_for(condition, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


# ---------------------------------------------------------------- locks

def test_a_second_export_to_the_same_out_stops_in_one_line_naming_the_first(tiny_set, checkpoint, tmp_path):
    out = str(tmp_path / "emb")
    argv = ["embeddings", "--checkpoint", checkpoint, "--csv", tiny_set, "--out", out, "--export-part-files", "4"]
    first = run("-c", slowed("export", "datasets.read_kept_clips", argv), cwd=tmp_path, wait=False)
    try:
        wait_for(lambda: os.path.isfile(os.path.join(out + ".parts", "part-00000.npz")))
        second = run(os.path.join(ROOT, "export.py"), *argv, cwd=tmp_path)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(f"export.py: error: --out {out} is in use by process {first.pid} on ")
        assert first.poll() is None  # the first export goes on, its parts untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The first was killed: its lock is taken over, its parts reused, and the result is whole.
    third = run(os.path.join(ROOT, "export.py"), *argv, cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert "took over" in third.stdout and "parts already in" in third.stdout
    assert len(np.load(out + ".npy")) == len(pd.read_csv(out + ".csv")) > 0


def test_a_second_probe_with_the_same_out_stops_and_a_killed_probe_keeps_its_finished_tasks(tiny_set, tmp_path):
    tasks = tmp_path / "tasks.csv"
    pd.DataFrame({"csv": [tiny_set, tiny_set], "label_column": ["timbre", "tags"], "task": ["multiclass", "multilabel"],
                  "name": ["timbre", "tags"]}).to_csv(tasks, index=False)
    out = str(tmp_path / "results.json")
    argv = ["--checkpoint", "random", "--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", "8000", *FAST,
            "--tasks", str(tasks), "--cache-dir", str(tmp_path / "cache"), "--out", out]
    # The first probe: its second task (tags) sleeps in every epoch, so it is killed in the middle of it.
    source = slowed("probe", "probe.val_scores", argv).replace(
        "time.sleep(0.3)", "time.sleep(0.3 if a[1].probe.name == 'timbre' else 30)")
    first = run("-c", source, cwd=tmp_path, wait=False)
    try:
        wait_for(lambda: os.path.isfile(out))
        with open(out) as f:
            written = json.load(f)
        assert [r["probe"] for r in written] == ["timbre"]
        second = run(os.path.join(ROOT, "probe.py"), *argv, cwd=tmp_path)
        assert second.returncode == 2 and second.stderr.count("\n") == 1
        assert second.stderr.startswith(f"probe.py: error: --out {out} is in use by process {first.pid} on ")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    rerun = run(os.path.join(ROOT, "probe.py"), *argv, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert f"results: timbre with random reused from {out} (finished before)" in rerun.stdout
    assert "results: tags" not in rerun.stdout
    with open(out) as f:
        results = json.load(f)
    assert [r["probe"] for r in results] == ["timbre", "tags"] and results[0] == written[0]


# ---------------------------------------------------------------- damaged derived files are rebuilt

def test_a_damaged_export_part_is_embedded_again(tiny_set, checkpoint, tmp_path, monkeypatch, capsys):
    flags = ["embeddings", "--checkpoint", checkpoint, "--csv", tiny_set, "--export-part-files", "10"]
    export.main(flags + ["--out", str(tmp_path / "whole")])
    original, reads = datasets.read_kept_clips, []

    def interrupted(path, *args, **kwargs):
        reads.append(path)
        if len(reads) == 25:
            raise KeyboardInterrupt
        return original(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "read_kept_clips", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.main(flags + ["--out", str(tmp_path / "resumed")])
    part = tmp_path / "resumed.parts" / "part-00001.npz"
    part.write_bytes(part.read_bytes()[:200])  # torn, as a full disk or a crash of another tool leaves it
    monkeypatch.setattr(datasets, "read_kept_clips", original)
    capsys.readouterr()
    export.main(flags + ["--out", str(tmp_path / "resumed")])
    printed = capsys.readouterr().out
    assert f"export: {part} is damaged" in printed and "1 of 4 parts already in" in printed
    assert np.array_equal(np.load(tmp_path / "whole.npy"), np.load(tmp_path / "resumed.npy"))
    assert pd.read_csv(tmp_path / "whole.csv").equals(pd.read_csv(tmp_path / "resumed.csv"))


def test_a_damaged_cache_entry_is_rebuilt(tiny_set, checkpoint, tmp_path, capsys):
    argv = ["--checkpoint", checkpoint, *FAST, "--csv", tiny_set, "--label-column", "timbre", "--cache-dir",
            str(tmp_path / "cache")]
    first = probe.main(argv)
    entries = list((tmp_path / "cache").glob("*.npy"))
    assert len(entries) == 1
    entries[0].write_bytes(entries[0].read_bytes()[:300])
    capsys.readouterr()
    again = probe.main(argv)
    printed = capsys.readouterr().out
    assert f"embedding cache: {str(entries[0])[:-4]} is damaged" in printed and "rebuilding it" in printed
    assert again[0]["test"] == first[0]["test"]
    (tmp_path / "cache" / (entries[0].stem + ".json")).write_text("{not json")
    probe.main(argv)
    assert "is damaged" in capsys.readouterr().out
    probe.main(argv)
    assert "reusing" in capsys.readouterr().out


# ---------------------------------------------------------------- read-only folders

@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:  # root writes through chmod: mount a read-only file system instead
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                                 capture_output=True)
        if mounted.returncode != 0:
            pytest.skip("running as root without the right to mount a read-only tmpfs, and chmod does not stop "
                        "root's writes")
        yield folder
        subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_read_only_outputs_fail_at_once_in_one_line(tiny_set, checkpoint, read_only_folder, tmp_path):
    out = str(read_only_folder / "results.json")
    done = run(os.path.join(ROOT, "probe.py"), "--checkpoint", checkpoint, "--csv", tiny_set, "--label-column",
               "timbre", "--cache-dir", str(tmp_path / "cache"), "--out", out, cwd=tmp_path)
    assert done.returncode == 2 and "embedding cache" not in done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"probe.py: error: --out {out} is not writable: ")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.npy"))
    emb = str(read_only_folder / "emb")
    for script, argv in (("export.py", ["embeddings", "--checkpoint", checkpoint, "--csv", tiny_set, "--out", emb]),
                         ("probe.py", ["--checkpoint", checkpoint, "--csv", tiny_set, "--export-embeddings", emb])):
        done = run(os.path.join(ROOT, script), *argv, cwd=tmp_path)
        flag = "--out" if script == "export.py" else "--export-embeddings"
        assert done.returncode == 2 and done.stderr.count("\n") == 1
        assert done.stderr.startswith(f"{script}: error: {flag} {emb} is not writable: "), done.stderr
    done = run(os.path.join(ROOT, "export.py"), "model", checkpoint, "--out", str(read_only_folder / "m.pt"),
               cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.startswith(f"export.py: error: --out {read_only_folder / 'm.pt'} is")


# ---------------------------------------------------------------- a long file, clip by clip

def test_a_long_file_is_read_clip_by_clip_with_the_embeddings_of_the_whole_file(checkpoint, tmp_path, monkeypatch):
    rate, seconds = 16000, 600  # ten minutes at twice the model's rate: 9.6 M frames
    rng = np.random.default_rng(0)
    path = str(tmp_path / "long.wav")
    sf.write(path, (0.1 * rng.standard_normal((rate * seconds, 2))).astype(np.float32), rate, subtype="FLOAT")
    pd.DataFrame({"path": [path], "split": ["test"]}).to_csv(tmp_path / "long.csv", index=False)
    frames, read = [], sf.SoundFile.read

    def counted(self, count=-1, *args, **kwargs):
        data = read(self, count, *args, **kwargs)
        frames.append(len(data))
        return data

    monkeypatch.setattr(sf.SoundFile, "read", counted)
    written = export.main(["embeddings", "--checkpoint", checkpoint, "--csv", str(tmp_path / "long.csv"), "--out",
                           str(tmp_path / "long"), "--max-clips", "8"])
    # 8 clips of 0.5 s at the file's rate (8000 frames each) and the resampler's reach on each side.
    assert written["rows"] == 8 and sum(frames) <= 8 * (8000 + 2 * 100)  # of 9.6 M
    monkeypatch.setattr(sf.SoundFile, "read", read)
    # The reference, decoded and resampled whole as before: the same clips of the same values.
    audio, _ = sf.read(path, dtype="float32", always_2d=True)
    wave = torchaudio.functional.resample(torch.from_numpy(audio.mean(1))[None], rate, 8000)[0]  # [T]
    count = int(len(wave) / 4000 + 0.5)
    kept = torch.linspace(0, count - 1, 8).round().long()
    clips = torch.nn.functional.pad(wave, (0, count * 4000 - len(wave)))[:count * 4000].reshape(count, 4000)[kept]
    model = models.load_pretrained(checkpoint, device="cpu")
    with torch.no_grad():
        expected = model(clips).numpy()
    assert np.allclose(np.load(tmp_path / "long.npy"), expected, atol=1e-5)
    assert pd.read_csv(tmp_path / "long.csv")["clip"].tolist() == kept.tolist()


# ---------------------------------------------------------------- model files

def test_model_file_for_sharing_loads_everywhere_and_holds_no_optimizer(tiny_set, checkpoint, tmp_path):
    shared = str(tmp_path / "model.pt")
    done = run(os.path.join(ROOT, "export.py"), "model", os.path.dirname(checkpoint), "--out", shared, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"model file: {shared} (") and "step 3" in done.stdout
    state = torch.load(shared, weights_only=True)
    assert set(state) == {"format", "model", "args", "labels", "step"}
    wave = torch.randn(12345)
    direct, from_file = models.load_pretrained(checkpoint, device="cpu"), models.load_pretrained(shared, device="cpu")
    assert torch.equal(direct.embed(wave, 8000), from_file.embed(wave, 8000))
    hub = torch.hub.load(ROOT, "semisupcon", source="local", checkpoint=shared, device="cpu")
    assert torch.equal(hub.embed(wave, 8000), direct.embed(wave, 8000))
    argv = [*FAST, "--csv", tiny_set, "--label-column", "timbre", "--cache-dir", "none"]
    assert probe.main(["--checkpoint", shared, *argv])[0]["test"] == probe.main(["--checkpoint", checkpoint,
                                                                                  *argv])[0]["test"]


class Payload:
    """Unpickling this writes a marker file: the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_carrying_a_pickled_payload_is_refused_and_runs_nothing(tiny_set, checkpoint, tmp_path):
    state = torch.load(checkpoint, weights_only=True)
    marker = tmp_path / "ran"
    state["labels"] = Payload(str(marker))
    evil = str(tmp_path / "evil.pt")
    torch.save(state, evil)
    for load in (lambda: models.load_pretrained(evil, device="cpu"),
                 lambda: torch.hub.load(ROOT, "semisupcon", source="local", checkpoint=evil, device="cpu"),
                 lambda: probe.main(["--checkpoint", evil, "--csv", tiny_set, "--label-column", "timbre",
                                     "--cache-dir", "none"]),
                 lambda: export.main(["model", evil, "--out", str(tmp_path / "m.pt")])):
        with pytest.raises(safety.CheckpointError, match="refused"):
            load()
    assert not marker.exists()
