"""Files as they are: FIFOs, devices, links, vanishing files, empty and unreadable files, URLs,
CSVs that are not UTF-8, NFD names, a cache tied to its sources, audio leaking across splits,
read-only and full folders. Every case uses real files, real processes and, as root, real mounts."""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import unicodedata

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

import datasets
import manifests
import synthetic
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = os.geteuid() == 0


def write_tone(path, seconds=1.0, sample_rate=8000, frequency=440.0):
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    sf.write(str(path), (0.5 * np.sin(2 * np.pi * frequency * t)).astype(np.float32), sample_rate)
    return str(path)


def run_script(*args, timeout=60):
    """`python ARGS` in the repository; a hang is a TimeoutExpired, so the test fails instead of waiting."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def one_error_line(result, program):
    """The message of the single `PROGRAM: error: ...` line of a run that failed with status 2."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), result.stderr
    return lines[0].split(": error: ", 1)[1]


@contextlib.contextmanager
def mounted(folder, options):
    """A tmpfs mounted at `folder` with `options` (root only; skipped where mounting is not allowed)."""
    if not IS_ROOT:
        pytest.skip("mounting a read-only or full tmpfs needs root (chmod does not bind root)")
    os.makedirs(folder, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if result.returncode:
        pytest.skip(f"mount -t tmpfs failed: {result.stderr.decode().strip()}")
    try:
        yield str(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


# ---------------------------------------------------------------- only regular files are opened

def test_a_fifo_named_wav_is_skipped_by_scan_check_and_reading_never_opened(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    write_tone(music / "good.wav")
    os.mkfifo(music / "pipe.wav")
    result = run_script("datasets.py", "scan", str(music), "--out", str(tmp_path / "m.csv"))
    assert result.returncode == 0, result.stderr
    skipped = pd.read_csv(tmp_path / "m.skipped.csv")
    assert skipped["reason"].tolist() == ["named pipe (FIFO), not a regular file (never opened)"]
    assert "1 named pipe" in result.stdout
    assert pd.read_csv(tmp_path / "m.csv")["path"].tolist() == ["music/good.wav"]
    # The data check and the reader (a training worker) refuse it from os.stat alone.
    script = (f"import datasets, numpy\n"
              f"report = datasets.check_files([{str(music / 'pipe.wav')!r}], 0.1, 8000, workers=1)\n"
              f"print(report['status'][0], report['problems'][0])\n"
              f"try:\n"
              f"    datasets.read_crops({str(music / 'pipe.wav')!r}, 2, 4000, 8000, numpy.random.default_rng(0))\n"
              f"except datasets.AudioError as error:\n"
              f"    print(error)\n")
    result = run_script("-c", script)
    assert result.stdout.splitlines() == ["bad named pipe (FIFO), not a regular file (never opened)",
                                          f"{music / 'pipe.wav'}: named pipe (FIFO), not a regular file (never opened)"]


def test_train_py_with_a_fifo_in_the_manifest_excludes_it_and_ends(tmp_path):
    for k in range(4):
        write_tone(tmp_path / f"{k}.wav", 1.0, 8000, 200 + 100 * k)
    os.mkfifo(tmp_path / "pipe.wav")
    paths = [f"{k}.wav" for k in range(4)] + ["pipe.wav"]
    pd.DataFrame({"path": paths, "split": ["train"] * 5}).to_csv(tmp_path / "m.csv", index=False)
    tiny = ["--encoder", "samplecnn", "--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", "8000",
            "--batch-size", "4", "--workers", "0", "--val-every", "0", "--augment", "none", "--steps", "1"]
    result = run_script("train.py", "--train-csv", str(tmp_path / "m.csv"), "--out", str(tmp_path / "run"), *tiny,
                        timeout=240)
    report = pd.read_csv(tmp_path / "run" / "data-check.csv", keep_default_na=False)
    problems = dict(zip(report["path"].map(os.path.basename), report["problems"]))
    assert problems["pipe.wav"] == "named pipe (FIFO), not a regular file (never opened)"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if ": error: " in line]  # below the progress bar
    assert len(errors) == 1 and errors[0].startswith("train.py: error: 1 of 5 files are bad (20.0% > "
                                                     "--max-bad-fraction 1.0%): 1 named pipe; first ")


def test_a_device_linked_as_wav_is_skipped_never_opened(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.wav")  # read, it would stream zeros for ever
    write_tone(tmp_path / "good.wav")
    report = datasets.scan_folder(str(tmp_path), str(tmp_path / "m.csv"), log=lambda line: None)
    assert report["rows"] == 1 and report["skipped"] == {"device, not a regular file": 1}
    assert datasets.check_file(str(tmp_path / "zero.wav"), 0.1, 8000)["problems"] == \
        "device, not a regular file (never opened)"


# ---------------------------------------------------------------- folders and files as they change

def test_scan_follows_a_linked_folder_once_and_cuts_a_loop(tmp_path):
    music, nas = tmp_path / "music", tmp_path / "nas" / "jazz"
    music.mkdir()
    nas.mkdir(parents=True)
    write_tone(music / "a.wav")
    write_tone(nas / "b.wav", frequency=330)
    os.symlink(nas, music / "Jazz")  # Jazz -> /nas/jazz
    os.symlink(nas, music / "Also Jazz")  # a second link to the same folder
    os.symlink("..", nas / "up")  # jazz/up -> nas, which holds jazz again: a loop
    lines = []
    report = datasets.scan_folder(str(music), str(tmp_path / "m.csv"), log=lines.append)
    paths = pd.read_csv(tmp_path / "m.csv")["path"].tolist()
    assert sorted(paths) == ["music/Also Jazz/b.wav", "music/a.wav"]
    assert report["linked_folders"] == 2  # Also Jazz, and up (nas) below it
    skipped = pd.read_csv(tmp_path / "m.skipped.csv")
    assert sorted(skipped["path"]) == ["Also Jazz/up/jazz", "Jazz"]
    assert set(skipped["reason"].str.split(" \\(").str[0]) == {"linked folder scanned already"}
    assert "(2 linked folders followed)" in lines[0]


def test_files_deleted_during_a_scan_are_skipped_not_a_traceback(tmp_path, monkeypatch):
    for name in ("a.wav", "b.wav", "c.wav", "d.wav"):
        write_tone(tmp_path / name)  # a, b, c: the same bytes, so the duplicate search reads them again
    write_tone(tmp_path / "d.wav", frequency=550)
    probe_audio = datasets.probe_audio

    def probe_then_delete(path, min_seconds):
        found = probe_audio(path, min_seconds)
        if path.endswith("b.wav"):
            os.remove(tmp_path / "a.wav")  # probed already: gone before the duplicate search
            os.remove(tmp_path / "c.wav")  # listed, not probed yet
        return found

    monkeypatch.setattr(datasets, "probe_audio", probe_then_delete)
    lines = []
    report = datasets.scan_folder(str(tmp_path), str(tmp_path / "m.csv"), log=lines.append)
    assert sorted(pd.read_csv(tmp_path / "m.csv")["path"]) == ["b.wav", "d.wav"]
    skipped = pd.read_csv(tmp_path / "m.skipped.csv")
    assert dict(zip(skipped["path"], skipped["reason"])) == {"a.wav": "vanished during the scan",
                                                             "c.wav": "vanished during the scan"}
    assert report["skipped"] == {"vanished during the scan": 2} and "2 vanished during the scan" in lines[0]


# ---------------------------------------------------------------- failures named for what they are

def test_empty_unreadable_linked_and_url_files_are_named_for_what_they_are(tmp_path):
    (tmp_path / "empty.mp3").write_bytes(b"")
    os.symlink(tmp_path / "gone.wav", tmp_path / "dangling.wav")
    write_tone(tmp_path / "good.wav")
    pd.DataFrame({"path": ["empty.mp3", "dangling.wav", "https://example.org/song.mp3", "good.wav"]}).to_csv(
        tmp_path / "m.csv", index=False)
    manifest = datasets.read_manifest(str(tmp_path / "m.csv"))
    assert manifest["path"][2] == "https://example.org/song.mp3"
    report = datasets.check_files(list(manifest["path"]), 0.1, 8000, workers=1)
    assert report["problems"].tolist()[:3] == [
        "empty file (0 bytes)", f"broken link (to {tmp_path / 'gone.wav'}, which does not exist)",
        "URL not supported: download the file first"]
    assert report["status"].tolist() == ["bad", "bad", "bad", "ok"]
    scan = datasets.scan_folder(str(tmp_path), str(tmp_path / "scan.csv"), log=lambda line: None)
    assert scan["skipped"] == {"empty file": 1, "broken link": 1, "not audio": 1}  # m.csv is not audio


def check_as_nobody(path):
    """check_file(path) run by a process without root's right to read anything (fork, setuid)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.setuid(65534)
            os.write(write, json.dumps(datasets.check_file(path, 0.1, 8000)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text)


def test_an_unreadable_file_is_permission_denied_not_a_system_error(tmp_path):
    folder = tempfile.mkdtemp(dir="/tmp") if IS_ROOT else str(tmp_path)
    try:
        os.chmod(folder, 0o755)
        path = write_tone(os.path.join(folder, "locked.wav"))
        os.chmod(path, 0)
        report = check_as_nobody(path) if IS_ROOT else datasets.check_file(path, 0.1, 8000)
        assert (report["status"], report["problems"]) == ("bad", "permission denied")
    finally:
        if IS_ROOT:
            subprocess.run(["rm", "-rf", folder], check=True)


def test_a_csv_that_is_not_utf8_says_so(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    write_tone(music / "Café.wav")
    (tmp_path / "m.csv").write_bytes("path,genre\nmusic/Café.wav,jazz\n".encode("latin-1"))
    with pytest.raises(datasets.ManifestError) as error:
        datasets.read_manifest(str(tmp_path / "m.csv"))
    assert str(error.value).startswith(f"{tmp_path / 'm.csv'} is not UTF-8: byte 0xe9 on line 2 ")
    assert "re-save it as UTF-8" in str(error.value)
    (tmp_path / "labels.csv").write_bytes("file,genre\nCafé,jazz\n".encode("cp1252"))
    with pytest.raises(datasets.ManifestError, match="labels.csv is not UTF-8: byte 0xe9 on line 2"):
        datasets.scan_folder(str(music), str(tmp_path / "s.csv"), labels_csv=str(tmp_path / "labels.csv"))


def test_a_tasks_file_with_an_open_quote_no_rows_or_semicolons_gets_one_line(tmp_path):
    required = ("csv", "label_column", "task")
    cases = {"quote.csv": ('csv,label_column,task\na.csv,genre,multiclass\n"b.csv,genre,multiclass\n',
                           "quote.csv, line 3: a quote (\") opens a field that is never closed"),
             "header.csv": ("csv,label_column,task\n", "header.csv: a header (csv,label_column,task) but no rows"),
             "semicolons.csv": ("csv;label_column;task\na.csv;genre;multiclass\n",
                                "semicolons.csv: its columns are separated by semicolons")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(datasets.ManifestError) as error:
            datasets.read_table(str(tmp_path / name), required, needs_rows=True)
        assert str(error.value).startswith(f"{tmp_path}/{message}"), str(error.value)
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------- names compared in NFC

def test_nfd_file_names_match_nfc_label_rows_and_manifest_paths(tmp_path):
    music = tmp_path / "music"
    album = music / unicodedata.normalize("NFD", "Été")
    album.mkdir(parents=True)
    write_tone(album / unicodedata.normalize("NFD", "Café Noir.wav"))  # as macOS writes it
    write_tone(music / "plain.wav", frequency=330)
    pd.DataFrame({"file": ["Café Noir"], "genre": ["jazz"]}).to_csv(tmp_path / "labels.csv", index=False)
    report = datasets.scan_folder(str(music), str(tmp_path / "s.csv"), labels_csv=str(tmp_path / "labels.csv"),
                                  log=lambda line: None)
    scanned = pd.read_csv(tmp_path / "s.csv", keep_default_na=False)
    assert report["unmatched_labels"] == 0 and sorted(scanned["genre"]) == ["", "jazz"]
    pd.DataFrame({"path": ["music/Été/Café Noir.wav"]}).to_csv(tmp_path / "m.csv", index=False)  # NFC
    path = datasets.read_manifest(str(tmp_path / "m.csv"))["path"][0]
    assert os.path.isfile(path) and path == str(album / unicodedata.normalize("NFD", "Café Noir.wav"))


# ---------------------------------------------------------------- the cache tied to its sources

def test_cache_follows_its_source_rebuilds_damage_and_never_relabels_its_rate(tmp_path):
    source = write_tone(tmp_path / "a.wav", 1.0, 16000, 440)
    pd.DataFrame({"path": ["a.wav"]}).to_csv(tmp_path / "m.csv", index=False)
    cache = str(tmp_path / "cache")
    quiet = {"workers": 1, "log": lambda line: None}
    first = datasets.read_manifest(datasets.write_cache(str(tmp_path / "m.csv"), cache, 16000, **quiet))["path"][0]
    before = datasets.read_clips(first, 8000, 16000)
    # The source replaced by other audio of the same length: decoded again, the old entry removed.
    write_tone(source, 1.0, 16000, 880)
    os.utime(source, ns=(os.stat(source).st_atime_ns, os.stat(source).st_mtime_ns + 10**9))
    second = datasets.read_manifest(datasets.write_cache(str(tmp_path / "m.csv"), cache, 16000, **quiet))["path"][0]
    assert second != first and not os.path.exists(first)
    assert (datasets.read_clips(second, 8000, 16000) - datasets.read_clips(source, 8000, 16000)).abs().max() < 1e-4
    assert (datasets.read_clips(second, 8000, 16000) - before).abs().max() > 0.1
    # A truncated cache file is rebuilt by the rerun.
    with open(second, "r+b") as f:
        f.truncate(os.path.getsize(second) // 2)
    with pytest.raises(datasets.AudioError, match="cannot read cached audio"):
        datasets.read_clips(second, 8000, 16000)
    datasets.write_cache(str(tmp_path / "m.csv"), cache, 16000, **quiet)
    assert datasets.read_clips(second, 8000, 16000).shape == (2, 8000)
    # cache.json deleted, rerun at another rate: refused, and each file still says its own rate.
    os.remove(os.path.join(cache, "cache.json"))
    with pytest.raises(utils.UserError, match=f"--out {cache} holds audio at 16000 Hz, not --sample-rate 22050"):
        datasets.write_cache(str(tmp_path / "m.csv"), cache, 22050, **quiet)
    with datasets.open_audio(second) as f:
        assert f.samplerate == 16000 and f.frames == 16000


def test_the_cache_folder_is_locked_while_written(tmp_path):
    write_tone(tmp_path / "a.wav")
    pd.DataFrame({"path": ["a.wav"]}).to_csv(tmp_path / "m.csv", index=False)
    cache = str(tmp_path / "cache")
    holder = subprocess.Popen([sys.executable, "-c", f"import safety, time\n"
                               f"safety.FolderLock({cache!r}, 'x', 'cache.lock').acquire(log=None)\n"
                               f"print('held', flush=True)\ntime.sleep(60)\n"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(utils.UserError, match=f"--out {cache} is in use by process {holder.pid}"):
            datasets.write_cache(str(tmp_path / "m.csv"), cache, 8000, workers=1, log=lambda line: None)
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------- the same audio in two splits

def test_find_leaks_names_the_same_path_and_byte_copies_across_splits(tmp_path):
    write_tone(tmp_path / "a.wav", frequency=440)
    write_tone(tmp_path / "b.wav", frequency=550)  # the same size as a.wav, other bytes: no leak
    write_tone(tmp_path / "c.wav", frequency=660)
    (tmp_path / "copy of c.wav").write_bytes((tmp_path / "c.wav").read_bytes())
    pd.DataFrame({"path": ["a.wav", "b.wav", "c.wav", "a.wav", "copy of c.wav", "b.wav"],
                  "split": ["train", "train", "train", "test", "val", "train"]}).to_csv(tmp_path / "m.csv",
                                                                                         index=False)
    manifest = datasets.read_manifest(str(tmp_path / "m.csv"))
    leaks = datasets.find_leaks(manifest)
    assert leaks and sorted(map(sorted, leaks.groups)) == [[0, 3], [2, 4]]
    assert (leaks.same_path, leaks.same_bytes, leaks.rows) == (1, 1, [0, 2, 3, 4])
    assert leaks.text.startswith("2 audio files appear in more than one split (1 under the same path, 1 as a byte "
                                 "copy under another name; 4 rows; train/test 1, train/val 1): ")
    assert f"{tmp_path / 'a.wav'} (train) = {tmp_path / 'a.wav'} (test)" in leaks.text
    assert f"{tmp_path / 'c.wav'} (train) = {tmp_path / 'copy of c.wav'} (val)" in leaks.text
    clean = datasets.find_leaks(manifest.iloc[[0, 1, 2]].reset_index(drop=True))
    assert not clean and clean.text == "" and clean.rows == []


# ---------------------------------------------------------------- outputs: checked first, written whole

def test_scan_and_manifests_to_a_read_only_folder_fail_at_once_in_one_line(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    write_tone(music / "a.wav")
    with mounted(tmp_path / "ro", "ro,size=1m") as read_only:
        out = os.path.join(read_only, "m.csv")
        message = one_error_line(run_script("datasets.py", "scan", str(music), "--out", out), "datasets.py")
        assert message == f"--out {out} is not writable: Read-only file system; choose a folder you can write"
        (tmp_path / "gtzan").mkdir()
        message = one_error_line(run_script("manifests.py", "gtzan", "--root", str(tmp_path / "gtzan"), "--out", out),
                                 "manifests.py")
        assert message.startswith(f"--out {out} is not writable: Read-only file system")
        pd.DataFrame({"path": [str(music / "a.wav")]}).to_csv(tmp_path / "m.csv", index=False)
        message = one_error_line(run_script("datasets.py", "cache", "--train-csv", str(tmp_path / "m.csv"), "--out",
                                            os.path.join(read_only, "cache")), "datasets.py")
        assert "is not writable: Read-only file system" in message


def test_a_scan_on_a_full_disk_keeps_the_previous_manifest_whole(tmp_path):
    music = tmp_path / "music"
    music.mkdir()
    for k in range(30):
        write_tone(music / f"{k:02d} - a rather long file name to make the manifest large.wav", 0.2,
                   frequency=200 + 10 * k)
    with mounted(tmp_path / "full", "size=64k") as full:
        out = os.path.join(full, "m.csv")
        with open(out, "w") as f:
            f.write("path\nprevious.wav\n")
        filler = os.path.join(full, "filler")
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=4k", "count=1000"], capture_output=True)
        message = one_error_line(run_script("datasets.py", "scan", str(music), "--out", out), "datasets.py")
        assert message.startswith(f"cannot write m.csv in {full}: No space left on device")
        with open(out) as f:
            assert f.read() == "path\nprevious.wav\n"
        assert not [name for name in os.listdir(full) if ".tmp-" in name]


def test_a_damaged_synthetic_manifest_is_written_again(tmp_path):
    manifest = synthetic.make_synthetic_set(str(tmp_path), num_files=4, seconds=0.2, sample_rate=8000)
    expected = pd.read_csv(manifest)
    with open(manifest, "w"):
        pass  # a killed write of an older version: 0 bytes
    assert pd.read_csv(synthetic.make_synthetic_set(str(tmp_path), num_files=4, seconds=0.2,
                                                    sample_rate=8000)).equals(expected)


def test_flags_are_never_abbreviated(tmp_path, capsys):
    write_tone(tmp_path / "a.wav")
    for main, argv in ((datasets.main, ["scan", str(tmp_path), "--out", str(tmp_path / "m.csv"), "--min-sec", "1"]),
                       (manifests.main, ["gtzan", "--ro", str(tmp_path)]),
                       (synthetic.main, ["--out", str(tmp_path / "s"), "--num", "2"])):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err
