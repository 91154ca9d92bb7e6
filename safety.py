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
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import time

import torch

import utils
from utils import UserError

# ---------------------------------------------------------------- one way to write a file

TEMPORARY = re.compile(r"\.tmp-\d+-[0-9a-f]{8}$")  # the suffix write_file gives a file being written


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

    Call only while holding the folder's FolderLock: then no write of another process is
    under way there.
    """
    stale = sorted(p for p in glob.glob(os.path.join(glob.escape(folder), "*.tmp-*")) if TEMPORARY.search(p))
    for path in stale:
        os.remove(path)
    return stale


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
