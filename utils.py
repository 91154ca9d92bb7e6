"""What train.py, probe.py and bench.py share: processes, gathering, cross-process batch norm,
seeds, checkpoints, the run lock."""
import atexit
import difflib
import errno
import fcntl
import glob
import io
import json
import os
import random
import re
import shutil
import socket
import sys
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A mistake in the user's input (a flag, a manifest, a file): one line, exit status 2.

    The message says what is wrong and what to do; `run_cli` prints it as
    `PROG: error: MESSAGE` with no traceback. A traceback means a bug in our code.
    """


def run_cli(main, argv=None):
    """Run a script's `main(argv)`; a UserError becomes one line on stderr and exit status 2.

    Set SEMISUPCON_DEBUG=1 to see the traceback of a UserError too.
    """
    prog = os.path.basename(sys.argv[0]) or "semisupcon"
    try:
        return main(argv)
    except UserError as error:
        # Under torchrun every process meets the same mistake: the first one says it.
        if os.environ.get("RANK", "0") == "0":
            if os.environ.get("SEMISUPCON_DEBUG"):
                traceback.print_exc()
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def setup_process():
    """Join torchrun's process group if its environment is set, else run alone.

    Returns (rank, world_size, local_rank, device). Under torchrun the backend is NCCL
    when CUDA is available and gloo otherwise; each process uses GPU `local_rank`.
    Restarted workers (torchrun --max-restarts) rendezvous under a key prefix of their own.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        store, rank, world_size = next(dist.rendezvous("env://"))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        # torchrun --max-restarts keeps its store across restarts: without a fresh key prefix per
        # restart, the new workers read the dead ones' gloo addresses and fail in connectFullMesh.
        store = dist.PrefixStore(f"restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size,
                                    device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    else:
        rank, world_size, local_rank = 0, 1, 0
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return rank, world_size, local_rank, device


def cleanup_process():
    """Leave the process group, if one was joined, once every process has got here."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns, to each process, the gradient of its own slice.

    Every process's loss depends on every slice, so the gradient that reaches slice r
    is the sum over processes of d(loss_p)/d(slice r): an all-reduce of the incoming
    gradient, of which process r keeps its own rows.
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = len(grad) // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n:(rank + 1) * n]


def gather_with_grad(x):
    """Concatenate `x` `[n, ...]` from every process in rank order -> `[world * n, ...]`.

    Gradients flow back through the gather (see GatherWithGrad). Every process must
    pass the same n. Alone, returns x unchanged.
    """
    if not dist.is_initialized():
        return x
    return GatherWithGrad.apply(x)


class AllReduceWithGrad(torch.autograd.Function):
    """Sum over processes whose backward sums the incoming gradients over processes too."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(torch.nn.BatchNorm1d):
    """Batch norm whose statistics cover the batch of every process, on any device.

    torch's SyncBatchNorm runs on GPUs only; this one all-reduces the per-channel sums
    (with gradients) through the default process group, so it also works with gloo on
    CPUs. Alone, it is plain batch norm. Input `[B, C, ...]` of any rank (forward is
    replaced; BatchNorm1d only lends the parameters and buffers).
    """

    def forward(self, x):
        if not self.training:
            return torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                                  self.bias, False, 0.0, self.eps)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        sums = torch.stack([x.sum(dims), x.square().sum(dims)])  # [2, C]
        if dist.is_initialized():
            sums = AllReduceWithGrad.apply(sums)
            count = all_reduce_sum(count)
        mean = sums[0] / count
        variance = sums[1] / count - mean.square()
        with torch.no_grad():
            momentum = self.momentum if self.momentum is not None else 0.1
            self.running_mean.lerp_(mean.detach(), momentum)
            self.running_var.lerp_(variance.detach() * count / (count - 1).clamp(min=1), momentum)
            self.num_batches_tracked += 1
        x = (x - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape) if self.affine else x


def convert_batch_norm(module):
    """Replace every BatchNorm1d/2d in `module` by GlobalBatchNorm, keeping weights and statistics."""
    for name, child in module.named_children():
        if isinstance(child, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            like = next(t for t in child.state_dict().values() if t.is_floating_point())
            replacement = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats).to(like)
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement)
        else:
            convert_batch_norm(child)
    return module


def gather(x):
    """Concatenate `x` `[n, ...]` from every process in rank order, without gradients."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(x):
    """Sum a tensor over processes (no gradient); alone, returns it unchanged."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
    return x


def gather_objects(obj):
    """List of one picklable object per process, in rank order ([obj] when alone)."""
    if not dist.is_initialized():
        return [obj]
    objects = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def barrier():
    """Wait for every process (no-op when alone)."""
    if dist.is_initialized():
        dist.barrier()


def per_column(values, count, name):
    """One flag value per label column: a single value is repeated; else counts must match."""
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise UserError(f"--{name} was given {len(values)} times for {count} label columns; give it once "
                        f"(used for every column) or once per --label-column")
    return values


def seed_everything(seed):
    """Seed Python, NumPy and torch (all devices) with one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states():
    """The global RNG states of Python, NumPy, torch and CUDA, for a checkpoint."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    """Restore what rng_states returned."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "args", "rng", "labels", "best_val")


def close_match(name, choices):
    """' (did you mean 'X'?)' for the closest of `choices` to `name`, ignoring case; else ''."""
    lowered = {str(c).lower(): c for c in choices}
    found = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[found[0]]!r}?)" if found else ""


def save_checkpoint(state, folder, step, keep=3):
    """Write `state` atomically as folder/checkpoint-STEP.pt and keep the newest `keep`.

    The file is written to a temporary name, flushed to disk and renamed, so a crash
    (even kill -9) mid-write leaves the previous checkpoints loadable. Pruning never
    removes the file just written, so the last good checkpoint survives even when
    files of higher steps (broken, or from an older run) sit in the folder.
    Returns the path written.
    """
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise KeyError(f"checkpoint state lacks {missing}")
    path = os.path.join(folder, f"checkpoint-{step:08d}.pt")
    write_atomic(state, path)
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        if old != path:
            os.remove(old)
    return path


class CountingWriter(io.RawIOBase):
    """A write-only sink that counts bytes: the size torch.save needs, without a disk."""

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


def write_atomic(state, path):
    """torch.save to `path` through a temporary file, fsync and rename.

    A failed write (disk full, quota, permissions, file-size limit) removes the temporary
    file and raises UserError naming the folder, the bytes needed and the bytes free; the
    file at `path`, if any, is untouched.
    """
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            recorder = RecordingWriter(f)
            torch.save(state, recorder)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:
        if os.path.exists(temporary):
            os.remove(temporary)
        # torch.save turns the OSError of a failed write into a RuntimeError of its zip writer.
        raise save_error(state, path, recorder.error or error) from error
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_error(state, path, error):
    """The UserError for a failed write of `state` to `path`: folder, bytes needed and free."""
    folder = os.path.dirname(os.path.abspath(path))
    sink = CountingWriter()
    torch.save(state, sink)
    free = shutil.disk_usage(folder).free
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, OSError) and error.errno:
        reason = os.strerror(error.errno)
    if sink.size > free and "space" not in reason:
        reason = f"the disk is full ({reason})"
    remedy = {errno.EFBIG: "raise the file-size limit (ulimit -f)", errno.EDQUOT: "raise the quota or free space",
              errno.EACCES: "make the folder writable", errno.EROFS: "choose a writable --out"}.get(
        getattr(error, "errno", None), "free space")
    return UserError(f"cannot write {os.path.basename(path)} in {folder}: {reason}; it needs {sink.size:,} bytes "
                     f"and {free:,} bytes are free there. {remedy[0].upper() + remedy[1:]}, then rerun the same "
                     f"command: it resumes from the last checkpoint, which is intact")


def list_checkpoints(folder):
    """Checkpoint paths in `folder`, oldest step first (temporary files excluded)."""
    paths = glob.glob(os.path.join(folder, "checkpoint-*.pt"))
    return sorted(p for p in paths if re.fullmatch(r"checkpoint-\d+\.pt", os.path.basename(p)))


def remove_stale_temporaries(folder):
    """Delete temporary files that a killed save left in `folder`; returns their paths.

    Call only while holding the folder's RunLock: then no other save is under way.
    """
    stale = [p for p in glob.glob(os.path.join(folder, "*.pt.tmp*")) if re.search(r"\.pt\.tmp\d+$", p)]
    for path in stale:
        os.remove(path)
    return stale


class CheckpointError(UserError):
    """A checkpoint file that cannot be loaded (truncated, empty, not a checkpoint)."""


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint written by save_checkpoint.

    Raises CheckpointError naming the file and the cause when it is missing, empty,
    truncated or not a complete checkpoint (a missing key is named).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch.load raises many types for a damaged file; all mean the same here
        # The first sentence says what broke; torch appends generic advice after it.
        reason = str(error).splitlines()[0].split(". ")[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: cannot be loaded ({size:,} bytes; truncated or damaged: {reason})") \
            from error
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(f"{path}: not a complete checkpoint, missing {missing}")
    return state


def print_to_stderr(message):
    """print() to stderr, flushed: notes that must not mix with a script's results on stdout."""
    print(message, file=sys.stderr, flush=True)


def find_checkpoint(path, map_location="cpu", log=print_to_stderr):
    """The checkpoint to resume or probe from: a file, or the newest loadable one in a folder.

    path: a checkpoint file (loaded strictly: a broken file is a CheckpointError naming
    it) or a folder (its checkpoint-*.pt are tried newest first; each broken one is
    skipped with a line through `log` saying why, so a torn newest file never stops a
    restart while an older one is intact). Returns (path, state), or (None, None) for a
    folder without a loadable checkpoint (when it holds broken ones only, they are named).
    """
    if not os.path.isdir(path):
        return path, load_checkpoint(path, map_location)
    for candidate in reversed(list_checkpoints(path)):
        try:
            return candidate, load_checkpoint(candidate, map_location)
        except CheckpointError as error:
            if log:
                log(f"skipped {error}; trying the previous checkpoint")
    return None, None


def load_weights(model, weights, path):
    """model.load_state_dict(weights), strict; a mismatch is one UserError naming `path`."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise UserError(f"{path}: its weights do not fit this model ({detail[:300]}); it comes from another "
                        f"architecture or version: use the model flags it was trained with") from None


class RunLock:
    """One run per folder: a POSIX lock on FOLDER/run.lock holding the holder's PID and host.

    The kernel drops the lock when its process dies (kill -9, node loss on NFS once the
    lease expires), so a dead holder never blocks a restart: the next run takes the lock
    over and says whose it was. A live holder makes acquire() raise UserError naming it.
    POSIX locks belong to the process, not to forked children, so DataLoader workers
    left over from a killed run do not keep it.
    """

    def __init__(self, folder):
        self.path = os.path.join(folder, "run.lock")
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
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                handle.close()
                if log:
                    log(f"warning: {self.path}: this file system cannot lock files ({error.strerror}); "
                        f"nothing stops a second run on the same --out")
                return self
            handle.close()
            holder = self.holder() or {}
            raise UserError(f"--out {os.path.dirname(self.path)} is in use by process {holder.get('pid', '?')} "
                            f"on {holder.get('host', '?')} (started {holder.get('started', '?')}; lock "
                            f"{self.path}); wait for that run to end, stop it, or choose another --out") from None
        handle.seek(0)
        text = handle.read().strip()
        previous = None
        try:
            previous = json.loads(text) if text else None
        except ValueError:
            # A record cut off mid-write by a killed run: still a takeover, said as such.
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
        # A run that stops on an error releases the lock too; only a killed one leaves it recorded.
        atexit.register(self.release)
        return self

    def release(self):
        """Empty the lock file and drop the lock (the file stays: removing it would race)."""
        if self.handle is not None:
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.flush()
            self.handle.close()
            self.handle = None


def count_parameters(module):
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
