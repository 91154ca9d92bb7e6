"""Run safety, one mechanism each, used by every command: the safe loader of model files,
the one way to write a file, the folder lock, the stop path, and the checks of a resume
point. train.py, probe.py, export.py, datasets.py and manifests.py call these by name;
none opens a model file, writes an output or locks a folder by hand.

- load_model_file / find_checkpoint: torch.load with weights_only=True, always; a file
  that needs more (a pickled object) is refused in one line and runs nothing.
- write_file (write_bytes, write_text, write_json, write_csv, save_torch): a temporary
  file with a per-process unique name in the target's folder, fsync, rename. A crash at
  any point leaves the previous file whole; a failed write is one line saying why.
- FolderLock: one process per output folder; the holder is named, a dead one taken over.
- StopSignal: SIGTERM, SIGUSR1 and Ctrl-C ask the run to save and stop after this step.
"""
import atexit
import errno
import fcntl
import glob
import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time

import pandas as pd
import torch
from tqdm import tqdm

import utils
from utils import UserError

# ---------------------------------------------------------------- one way to write a file

TEMPORARY = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}$")  # the suffix write_file gives a file being written


class CountingWriter(io.RawIOBase):
    """A write-only sink that counts bytes: the size a write needs, without a disk."""

    def __init__(self):
        super().__init__()
        self.size = 0

    def writable(self):
        return True

    def write(self, data):
        self.size += len(data)
        return len(data)


class RecordingWriter:
    """A file's write() that keeps the OSError of a failed write (torch.save hides its cause)."""

    def __init__(self, f):
        self.f = f
        self.error = None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self):
        self.f.flush()


def write_file(path, write, then="rerun the same command"):
    """The one way a command writes a file: `write(f)` into a temporary, fsync, rename to `path`.

    write: a function taking a binary file object. The temporary name is unique to this
    process and call (PATH.tmp-PID-TOKEN), so two processes never share one; a reader
    sees the old file or the new one, never a part. A failed write (disk full, quota,
    permissions, file-size limit) removes the temporary and raises UserError naming the
    file, the cause, the bytes needed and free; `then` says what to do after the remedy.
    Returns `path`.
    """
    temporary = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    recorder = None
    try:
        with open(temporary, "wb") as f:
            recorder = RecordingWriter(f)
            write(recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        # torch.save turns the OSError of a failed write into a RuntimeError of its zip writer.
        raise write_error(write, path, (recorder and recorder.error) or error, then) from error
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power loss
    finally:
        os.close(directory)
    return path


def write_error(write, path, error, then):
    """The UserError for a failed write to `path`: file, cause, bytes needed and free, remedy."""
    folder = os.path.dirname(os.path.abspath(path))
    sink = CountingWriter()
    try:
        write(sink)
    except Exception:  # the size is a hint only; a writer that needs a real file gives none
        sink.size = 0
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, OSError) and error.errno:
        reason = os.strerror(error.errno)
    if sink.size > free and "space" not in reason:
        reason = f"the disk is full ({reason})"
    remedy = {errno.EFBIG: "raise the file-size limit (ulimit -f)", errno.EDQUOT: "raise the quota or free space",
              errno.EACCES: "make the folder writable", errno.EROFS: "choose a writable folder",
              errno.ENOENT: "create the folder"}.get(getattr(error, "errno", None), "free space")
    return UserError(f"cannot write {os.path.basename(path)} in {folder}: {reason}; it needs {sink.size:,} bytes "
                     f"and {free:,} bytes are free there. {remedy[0].upper() + remedy[1:]}, then {then}")


def write_bytes(path, data, then="rerun the same command"):
    """write_file for bytes."""
    return write_file(path, lambda f: f.write(data), then)


def write_text(path, text, then="rerun the same command"):
    """write_file for text (UTF-8)."""
    return write_bytes(path, text.encode("utf-8"), then)


def write_json(path, value, then="rerun the same command"):
    """write_file for a JSON value (indented, UTF-8)."""
    return write_text(path, json.dumps(value, indent=2) + "\n", then)


def write_csv(path, frame, then="rerun the same command"):
    """write_file for a pandas DataFrame as CSV without its index."""
    return write_text(path, frame.to_csv(index=False), then)


def save_torch(path, state, then="rerun the same command"):
    """write_file for torch.save(state): tensors and plain types, loadable with weights_only=True."""
    return write_file(path, lambda f: torch.save(state, f), then)


def remove_temporaries(folder):
    """Delete the temporaries that killed writes left in `folder`; returns their paths.

    A temporary whose process still runs on this machine is another command's write in
    progress and stays. Call while holding the folder's FolderLock.
    """
    stale = []
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "*.tmp-*"))):
        found = TEMPORARY.search(path)
        if found and not process_alive(int(found.group(1))):
            os.remove(path)
            stale.append(path)
    return stale


def process_alive(pid):
    """Whether process `pid` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def check_writable(folder, flag, needed_bytes=0):
    """Fail now, not after the work, if `folder` cannot take the outputs (unwritable or full).

    Creates the folder. flag: how the user named it (e.g. "--out runs/x"), for the message.
    """
    probe_path = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe_path, "wb") as f:
            f.write(b"\0" * min(needed_bytes, 1 << 20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise UserError(f"{flag} is not writable: {error.strerror or error}; choose a folder you can write") \
            from None
    finally:
        if os.path.exists(probe_path):
            os.remove(probe_path)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise UserError(f"{flag} has {free / 2**20:.0f} MiB free; the outputs need about "
                        f"{needed_bytes / 2**20:.0f} MiB")


# ---------------------------------------------------------------- one lock

class FolderLock:
    """One process per output folder: a POSIX lock on FOLDER/NAME holding the holder's PID and host.

    The kernel drops the lock when its process dies (kill -9, node loss on NFS once the
    lease expires), so a dead holder never blocks a restart: the next process takes the
    lock over and says whose it was. A live holder makes acquire() raise UserError naming
    it. POSIX locks belong to the process, not to forked children, so DataLoader workers
    left over from a killed run do not keep it.
    folder: the folder (created if needed); flag: how the user named it, e.g. "--out runs/x".
    """

    def __init__(self, folder, flag, name="run.lock"):
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, name)
        self.flag = flag
        self.handle = None

    def holder(self):
        """The recorded holder as a dict (pid, host, started), or None if none is recorded."""
        try:
            with open(self.path) as f:
                text = f.read().strip()
            return json.loads(text) if text else None
        except (OSError, ValueError):
            return None

    def acquire(self, log=print):
        """Take the lock or raise UserError naming its live holder; returns self."""
        handle = open(self.path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.close()
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                if log:
                    log(f"warning: {self.path}: this file system cannot lock files ({error.strerror}); "
                        f"nothing stops a second process on {self.flag}")
                return self
            holder = self.holder() or {}
            raise UserError(f"{self.flag} is in use by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                            f"(started {holder.get('started', '?')}; lock {self.path}); wait for it to end, stop "
                            f"it, or choose another {self.flag.split()[0]}") from None
        handle.seek(0)
        text = handle.read().strip()
        try:
            previous = json.loads(text) if text else None
        except ValueError:
            # A record cut off mid-write by a killed process: still a takeover, said as such.
            previous = {"pid": "?", "host": "?", "started": "? (its record was unreadable)"}
        if previous and previous.get("pid") != os.getpid() and log:
            log(f"took over {self.path} from process {previous.get('pid')} on {previous.get('host')} "
                f"(started {previous.get('started')}), which is no longer running")
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        handle.flush()
        self.handle = handle
        # A process that stops on an error releases the lock too; only a killed one leaves it recorded.
        atexit.register(self.release)
        for path in remove_temporaries(os.path.dirname(self.path)):
            if log:
                log(f"removed {path}: the partial file of a write that was killed")
        return self

    def release(self):
        """Empty the lock file and drop the lock (the file stays: removing it would race)."""
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.flush()
            self.handle.close()
            self.handle = None

    def __enter__(self):
        return self.acquire() if self.handle is None else self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------- the safe loader

CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "args", "rng", "labels", "best_val")
MODEL_FILE_KEYS = ("model", "args", "labels", "format")
FORMAT = 2  # the model-file and checkpoint format; 1 was pickled (before weights_only loading)


class CheckpointError(UserError):
    """A model file that cannot be loaded (truncated, empty, pickled code, another format)."""


def load_model_file(path, map_location="cpu", keys=MODEL_FILE_KEYS):
    """Load a checkpoint or model file with weights_only=True: nothing in it can run.

    keys: the keys the caller needs (CHECKPOINT_KEYS to resume; the default is enough to
    embed). Raises CheckpointError naming the file and the cause when it is missing,
    empty, truncated, holds anything but tensors and plain types, is of another format,
    or lacks a needed key.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged file; all mean the same here
        text = str(error)
        if "Weights only load failed" in text or "Unsupported global" in text or "Unsupported operand" in text:
            found = re.search(r"GLOBAL ([\w.]+ ?[\w.]*)|global[s]? ([\w.]+)", text)
            what = (found.group(1) or found.group(2)).strip() if found else "a pickled object"
            raise CheckpointError(f"{path}: refused: it holds {what}, which only code can rebuild, and a model "
                                  f"file must hold tensors and plain values only (nothing in it was run); ask "
                                  f"for a file written by `python train.py` or `python export.py model`") from None
        # The first sentence says what broke; torch appends generic advice after it.
        reason = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
        raise CheckpointError(f"{path}: cannot be loaded ({size:,} bytes; truncated or damaged: {reason})") \
            from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a SemiSupCon checkpoint (it holds a {type(state).__name__}, not a dict)")
    if state.get("format", 1) != FORMAT:
        raise CheckpointError(f"{path}: format {state.get('format', 1)}, this code reads format {FORMAT}; "
                              f"load it with the version of this code that wrote it")
    missing = [k for k in keys if k not in state]
    if missing:
        if set(missing) - set(MODEL_FILE_KEYS) and not set(MODEL_FILE_KEYS) - set(state):
            raise CheckpointError(f"{path}: a model file for sharing (no optimizer state), which embeds and "
                                  f"probes but cannot resume training; resume from a checkpoint-*.pt of its run")
        raise CheckpointError(f"{path}: not a complete checkpoint, missing {missing}")
    return state


def list_checkpoints(folder):
    """Checkpoint paths in `folder`, oldest step first (temporaries excluded)."""
    paths = glob.glob(os.path.join(glob.escape(folder), "checkpoint-*.pt"))
    return sorted(p for p in paths if re.fullmatch(r"checkpoint-\d+\.pt", os.path.basename(p)))


def find_checkpoint(path, map_location="cpu", log=utils.print_to_stderr, keys=MODEL_FILE_KEYS):
    """The file to resume or embed from: a file, or the newest loadable checkpoint in a folder.

    path: a checkpoint or model file (loaded strictly: a broken file is a CheckpointError
    naming it) or a run folder (its checkpoint-*.pt are tried newest first, then its
    model.pt; each broken one is skipped with a line through `log` saying why, so a torn
    newest file never stops a restart while an older one is intact). Returns
    (path, state), or (None, None) for a folder without a loadable file.
    """
    if not os.path.isdir(path):
        return path, load_model_file(path, map_location, keys)
    candidates = list(reversed(list_checkpoints(path)))
    if keys is MODEL_FILE_KEYS and os.path.isfile(os.path.join(path, "model.pt")):
        candidates.append(os.path.join(path, "model.pt"))
    for candidate in candidates:
        try:
            return candidate, load_model_file(candidate, map_location, keys)
        except CheckpointError as error:
            if log:
                log(f"skipped {error}; trying the previous checkpoint")
    return None, None


def save_checkpoint(state, folder, step, keep=3):
    """Write `state` as folder/checkpoint-STEP.pt (write_file) and keep the newest `keep`.

    Pruning never removes the file just written, so the last good checkpoint survives
    even when files of higher steps (broken, or from an older run) sit in the folder.
    Returns the path written.
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise KeyError(f"checkpoint state lacks {missing}")
    path = os.path.join(folder, f"checkpoint-{step:08d}.pt")
    save_torch(path, {"format": FORMAT} | state, "rerun the same command: it resumes from the last checkpoint, "
                                                 "which is intact")
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        if old != path:
            os.remove(old)
    return path


def model_file(state):
    """The part of a checkpoint that is shared: weights, settings to embed, labels, format."""
    return {"format": FORMAT, "model": state["model"], "args": state["args"], "labels": state["labels"],
            "step": state["step"]}


def load_weights(model, weights, path):
    """model.load_state_dict(weights), strict; a mismatch is one UserError naming `path`."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise UserError(f"{path}: its weights do not fit this model ({detail[:300]}); it comes from another "
                        f"architecture or version: use the model flags it was trained with") from None


# ---------------------------------------------------------------- the stop path

class StopSignal:
    """SIGTERM, SIGUSR1 (SLURM preemption) and Ctrl-C: finish the step, save, exit; twice: exit now."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.requested = None  # the name of the signal that asked to stop
        self.previous = {}
        for name in self.SIGNALS:
            if hasattr(signal, name):
                self.previous[name] = signal.signal(getattr(signal, name), self.handle)

    def close(self):
        """Give the signals back to the handlers they had before."""
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)
        self.previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def handle(self, number, frame):
        name = signal.Signals(number).name
        if self.requested:
            print(f"\nsecond signal {name}: exiting now without saving", flush=True)
            os._exit(130 if number == signal.SIGINT else 1)
        self.requested = name
        print(f"\nsignal {name}: saving after this step (send it again to exit at once)", flush=True)

    def any_process(self, device, world_size):
        """True if any process got a signal (all processes must stop at the same step)."""
        if world_size == 1:
            return bool(self.requested)  # no tensor, so no host-device sync
        flag = torch.tensor(float(bool(self.requested)), device=device)
        return bool(utils.all_reduce_sum(flag).item() > 0)


def ignore_interrupts(worker_id=None):
    """DataLoader worker_init_fn: Ctrl-C reaches the whole process group; only the main process acts on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_died(text, status_dir):
    """The cause of a DataLoader worker's death in its error `text`, naming the file it read.

    A worker that died without a Python error of its own was killed by a signal: SIGKILL
    from the kernel's out-of-memory killer (torch names it when it sees it first), or a
    crash in a decoder. The line names both, the file and the settings to lower.
    """
    pids = [int(pid) for pid in re.findall(r"\d+", text.split("pid")[-1])] if "pid" in text else []
    reading = ", ".join(worker_paths(status_dir, pids)) or "an unknown file"
    signal_name = re.search(r"killed by signal: (\w+)", text)
    if signal_name and signal_name.group(1) == "Killed":
        how = "was killed by signal SIGKILL, most likely by the kernel for lack of memory"
    elif signal_name:
        how = f"was killed by signal {signal_name.group(1)} (a crash, likely in the audio decoder)"
    else:
        how = ("ended without an error of its own: it was killed by a signal, most likely by the kernel for lack "
               "of memory (SIGKILL), or crashed in the audio decoder")
    return (f"a data-loading worker (pid {', '.join(map(str, pids)) or '?'}) {how}; it was reading {reading}. "
            f"Lower --workers (or --batch-size) if memory is short, or check that file; then rerun the same "
            f"command: it resumes")


def worker_paths(status_dir, pids):
    """The files that the DataLoader workers `pids` were reading when they died."""
    found = []
    for pid in pids:
        path = os.path.join(status_dir, f"worker-{pid}.txt")
        if os.path.isfile(path):
            with open(path) as f:
                found.append(f.read().strip())
    return found


def close_writer(writer):
    """Flush and close a TensorBoard writer (or None). A failing event file gets a warning line,
    not a traceback: what it holds up to there stays readable, and checkpoints do not need it."""
    try:
        if writer is not None:
            writer.close()
    except OSError as error:
        print(f"warning: the TensorBoard event file could not be written to the end ({error.strerror or error}); "
              f"what it logged before stays readable, and the checkpoints are unaffected", file=sys.stderr)


def stopped(error, save, step, out, status_dir=None):
    """The stop path of a run after a failed write, a dead data worker or data that vanished.

    Saves what can be saved (save: writes the checkpoint of `step`) and returns the one-line
    UserError to raise. Any other error is re-raised as it is: a bug.
    """
    text = " ".join(str(error).split())
    if isinstance(error, OSError):
        reason = os.strerror(error.errno) if error.errno else text
        where = f" ({error.filename})" if error.filename else ""
        cause = f"a write failed{where}: {reason}"
        then = ". Free space or fix the folder, then rerun the same command: it resumes"
    elif "DataLoader worker" in text:
        cause, then = worker_died(text, status_dir), ""
    elif type(error).__name__ == "AudioError":
        # A worker's exception arrives with its traceback in the text: its last line is the cause.
        cause, then = [line for line in str(error).splitlines() if line.strip()][-1].strip(), ""
    else:
        raise error
    try:
        save()
        kept = f"saved step {step} in {out}"
    except UserError as save_error:
        kept = f"could not save step {step} either ({save_error}); the last checkpoint in {out} is intact"
    return UserError(f"stopped at step {step}: {cause}; {kept}{then}")


# ---------------------------------------------------------------- flags and the out folder

def check_flags(args):
    """train.py: refuse flag values that cannot train, before anything is written."""
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: nothing to train; --steps is the total number of optimizer "
                              f"steps (a resumed run continues up to it), give at least 1")
    if args.batch_size < 2:
        raise UserError(f"--batch-size {args.batch_size}: a clip's negatives are the other clips of its "
                              f"batch, so one clip has none and the loss is 0 from the first step; give at least "
                              f"2 (the paper uses 96)")
    for name in ("views", "log_every", "save_every", "grad_accum"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: give at least 1")
    for name in ("labeled_fraction", "labeled_per_batch"):
        value = getattr(args, name)
        if value is not None and not 0 <= value <= 1:
            raise UserError(f"--{name.replace('_', '-')} {value}: a share between 0 and 1")


def claim_out_folder(out):
    """Main process: check that --out takes checkpoints, lock it to this run, remove partial saves.

    Returns the FolderLock, released when the run ends.
    """
    check_writable(out, f"--out {out}", 64 << 20)  # 64 MiB: a few checkpoints of the small encoders
    # One run per folder: a second one would resume from this run's checkpoints and prune them.
    return FolderLock(out, f"--out {out}").acquire()


# ---------------------------------------------------------------- the resume point

# Flags that define the network: resuming with another value cannot load the weights.
MODEL_FLAGS = ("encoder", "width", "clip_seconds", "sample_rate", "views", "hidden_dim", "projection_dim")
# Flags a resume may change freely: length, logging, saving, validation, processes, speed knobs.
RESUME_FREE_FLAGS = ("steps", "log_every", "image_every", "val_every", "val_batches", "save_every", "keep",
                     "workers", "world_size", "resume", "out", "check_data", "skip_check", "max_bad_fraction",
                     "max_bad_steps", "allow_changed_settings", "synthetic_dir", "train_csv", "compile",
                     "activation_checkpointing", "resample_on", "precision_name", "monitor_csv", "monitor_column",
                     "monitor_task", "monitor_every", "monitor_clips")


def find_resume(args, device, is_main):
    """(path, state) of the checkpoint to continue from, or (None, None) to start afresh.

    --resume auto takes the newest checkpoint in --out that loads, naming each newer
    file it skips and why; a path (file or folder) that gives no loadable checkpoint is
    a UserError naming it.
    """
    if args.resume == "none" or (args.resume == "auto" and not list_checkpoints(args.out)):
        return None, None
    folder = args.out if args.resume == "auto" else args.resume
    path, state = find_checkpoint(folder, device, print if is_main else None, CHECKPOINT_KEYS)
    if state is None:
        raise UserError(f"no checkpoint in {folder} loads (each is named above); move the broken files "
                              f"away to start afresh, or pass --resume none")
    return path, state


def check_model_flags(saved, args, path):
    """UserError naming every model flag whose value differs from the checkpoint's."""
    differences = [f"--{flag.replace('_', '-')} {saved[flag]} in the checkpoint, {getattr(args, flag)} given"
                   for flag in MODEL_FLAGS if flag in saved and saved[flag] != getattr(args, flag)]
    if differences:
        raise UserError(f"{path} holds another model ({'; '.join(differences)}); resume with the "
                              f"checkpoint's values, or start afresh with another --out or --resume none")


def check_settings(saved, current, defaults, path, is_main):
    """Refuse a resume whose data, sampler or optimizer settings differ, unless allowed.

    saved, current: the checkpoint's arguments and this run's (plain values); defaults:
    every flag's default. Compares every argument but the model flags (check_model_flags)
    and those a resume may change (RESUME_FREE_FLAGS); the manifest rows by digest. A
    flag the checkpoint lacks (it predates the flag) must be at its default: those runs
    had no other value.
    """
    differences = [f"--{name.replace('_', '-')} {current[name]} (the checkpoint predates this flag: it trained as "
                   f"with the default, {defaults[name]})"
                   for name in sorted(set(defaults) - set(saved) - set(RESUME_FREE_FLAGS))
                   if current[name] != defaults[name]]
    for name in sorted(set(saved) & set(current) - set(MODEL_FLAGS) - set(RESUME_FREE_FLAGS)):
        if name == "manifest_rows" or saved[name] == current[name]:
            continue
        if name == "manifest_digest":
            differences.append(f"manifest rows {saved.get('manifest_rows')} (digest {saved[name]}) -> "
                               f"{current['manifest_rows']} (digest {current[name]})")
        else:
            differences.append(f"--{name.replace('_', '-')} {saved[name]} -> {current[name]}")
    if not differences:
        return
    if not current["allow_changed_settings"]:
        raise UserError(f"{path} was trained with other settings: {'; '.join(differences)}; resuming would "
                              f"continue on another sample stream or optimizer. Use the checkpoint's values, pass "
                              f"--allow-changed-settings to resume anyway, or start afresh with another --out")
    if is_main:
        print(f"resuming {path} with changed settings (--allow-changed-settings): {'; '.join(differences)}")


def restore(state, path, model, optimizer, scheduler, scaler, generator, rank, is_main):
    """Load a checkpoint's state into the run's objects; returns (step, best_val)."""
    load_weights(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    for group in optimizer.param_groups:
        group.update(fused=True, foreach=None)  # a checkpoint of an unfused optimizer keeps the fused step
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    # With another process count than the saved run, process r takes saved state r mod count.
    utils.set_rng_states(state["rng"][rank % len(state["rng"])])
    generator.set_state(state["generator"][rank % len(state["generator"])].cpu())
    if is_main:
        print(f"resumed from {path} at step {state['step']}")
    return state["step"], state["best_val"]


# ---------------------------------------------------------------- the data check

def check_data(manifest, args, is_main, check_files):
    """Open every file once (cached in --out), drop unusable ones, refuse a broken data set.

    check_files: datasets.check_files (paths, min_seconds, sample_rate, workers, progress)
    -> report frame. Returns the manifest without the bad rows. Writes data-check.csv (every file) and
    bad-files.csv (the excluded ones) to --out.
    """
    report_path = os.path.join(args.out, "data-check.csv")
    if is_main:
        stats = [(p, os.path.getsize(p) if os.path.exists(p) else -1,
                  os.path.getmtime(p) if os.path.exists(p) else -1) for p in manifest["path"]]
        previous = read_report(report_path)
        # The verdict depends on the crop length and rate too: a changed flag re-checks.
        key = [f"{p}|{size}|{mtime}|{args.clip_seconds}|{args.sample_rate}" for p, size, mtime in stats]
        if previous is not None and "key" in previous.columns and list(previous["key"]) == key:
            report = previous
        else:
            print(f"checking {len(manifest)} audio files (--skip-check to skip; cached in {report_path})")
            with tqdm(total=len(manifest), desc="check") as bar:
                report = check_files(list(manifest["path"]), args.clip_seconds / 2, args.sample_rate,
                                              max(1, args.workers), bar.update)
            report["key"] = key
            write_csv(report_path, report)
        bad = report[report["status"] == "bad"]
        write_csv(os.path.join(args.out, "bad-files.csv"), bad)
        notes = report[(report["status"] == "ok") & (report["problems"] != "")]
        print(f"data check: {len(report)} files, {len(bad)} excluded as bad, {len(notes)} with notes "
              f"(see {report_path})")
        for _, row in bad.head(5).iterrows():
            print(f"  bad: {row['path']}: {row['problems']}")
    utils.barrier()
    report = read_report(report_path)
    is_bad = (report["status"] == "bad").to_numpy()
    wrong_folder = resolved_from_current_folder(manifest, report)
    if is_main and wrong_folder and is_bad.mean() <= args.max_bad_fraction:
        print(f"warning: {wrong_folder}")
    if is_bad.mean() > args.max_bad_fraction:
        kinds = report.loc[is_bad, "problems"].str.split(r" \(|;").str[0].value_counts()
        first = report[is_bad].iloc[0]
        raise UserError(
            f"{is_bad.sum()} of {len(is_bad)} files are bad ({is_bad.mean():.1%} > --max-bad-fraction "
            f"{args.max_bad_fraction:.1%}): {', '.join(f'{n} {kind}' for kind, n in kinds.items())}; first "
            f"{first['path']}: {first['problems']}. " + (wrong_folder or f"See {args.out}/bad-files.csv"))
    silent = report["problems"].str.split(";").apply(lambda problems: "silent" in problems).to_numpy()
    if silent.any() and (silent | is_bad).all():
        raise UserError(f"every usable file is silent (all {int(silent.sum())} hold only zeros, e.g. "
                              f"{report['path'][silent].iloc[0]}): nothing to learn from; check the export or "
                              f"conversion that wrote them ({report_path} lists every file)")
    return manifest[~is_bad].reset_index(drop=True)


def read_report(path):
    """A data-check report, or None when it is missing or damaged (then the check runs again)."""
    if not os.path.isfile(path):
        return None
    try:
        report = pd.read_csv(path, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        return None
    return report if {"path", "status", "problems"} <= set(report.columns) else None


def resolved_from_current_folder(manifest, report):
    """The hint for files missing under the CSV's folder but present under the current one, or None.

    Manifest paths are relative to the CSV's own folder; paths written relative to the
    folder the command runs in are the common mistake, and this names it.
    """
    missing = report["problems"].to_numpy() == "does not exist"
    found, example = 0, None
    for path, source in zip(manifest["path"][missing], manifest["source"][missing]):
        written = os.path.relpath(path, os.path.dirname(os.path.abspath(source)))
        if os.path.exists(written):
            found, example = found + 1, (source, written, path)
    if not found:
        return None
    source, written, path = example
    return (f"{found} of {int(missing.sum())} missing files exist relative to the current folder but not to the "
            f"CSV's: manifest paths are read relative to the folder of the CSV itself ({source}: {written!r} is "
            f"read as {path}); write them relative to that folder, or absolute")


def check_labeled_pool(manifest, columns, named_columns, explicit_share, labeled_rows, args):
    """Refuse labels that cannot fill the labeled share b_s of each batch, naming file and column.

    named_columns: the --label-column values the user gave; explicit_share: the
    --labeled-per-batch the user gave (None if not). A named column without any labeled
    train row is refused unless b_s = 0 was asked for: that run is self-supervised.
    """
    if explicit_share == 0:
        return
    is_train = manifest["split"].to_numpy() == "train"
    sources = ", ".join(sorted(set(manifest["source"])))
    for column in columns:
        if (column.labeled & is_train).any() or (column.name not in named_columns and args.labeled_per_batch == 0):
            continue
        elsewhere = int(column.labeled.sum())
        raise UserError(f"{sources}: label column {column.name!r} has no label on any of the "
                              f"{int(is_train.sum())} train rows" + (f" ({elsewhere} labeled rows are in val/test)"
                                                                     if elsewhere else " (every cell is empty)") +
                              "; fill it in, or train self-supervised with --labeled-per-batch 0")
    if args.labeled_per_batch > 0 and not len(labeled_rows):
        raise UserError(f"--labeled-fraction {args.labeled_fraction} keeps none of the labeled train rows; "
                              f"raise it, or train self-supervised with --labeled-per-batch 0")


def manifest_digest(manifest, columns):
    """SHA-256 (16 hex digits) of the manifest rows a run trains on: path, split and label cells."""
    names = ["path", "split"] + [name for column in columns for name in column.columns]
    return hashlib.sha256(manifest[names].to_csv(index=False).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- the end

def print_summary(args, start_step, step, seconds, val_loss, best_val):
    """The run's closing lines: steps, time (monotonic clock), speed, validation, checkpoint, model file, the
    probe to run next."""
    clips = (step - start_step) * args.batch_size * args.grad_accum
    val = f"val loss last {val_loss:.4f}, best {best_val:.4f} (best.pt)" if math.isfinite(best_val) else \
        "no validation (no val rows or --val-every 0)"
    checkpoints = list_checkpoints(args.out)
    print(f"done: steps {start_step} -> {step} in {seconds:.1f} s ({clips / max(seconds, 1e-9):.1f} clips/s); {val}; "
          f"checkpoint {checkpoints[-1] if checkpoints else 'none'}; model file for sharing "
          f"{os.path.join(args.out, 'model.pt')}")
    labels = "".join(f" --label-column {name}" for name in args.label_column[:1]) or \
        " --label-column COLUMN (a labeled column of the manifest)"
    labels += f" --task {args.task[0]}" if args.task and args.label_column else ""
    print(f"next, a linear probe of the encoder: python probe.py --checkpoint {args.out} --csv {args.train_csv[0]}"
          f"{labels}")
