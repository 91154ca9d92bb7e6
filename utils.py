"""What train.py, probe.py and bench.py share: user errors, processes, gathering, cross-process
batch norm, seeds."""
import difflib
import hashlib
import os
import random
import sys
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
    # Plain types and tensors only, so that a checkpoint loads with weights_only=True.
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state(),
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    """Restore what rng_states returned."""
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def close_match(name, choices):
    """' (did you mean 'X'?)' for the closest of `choices` to `name`, ignoring case; else ''."""
    lowered = {str(c).lower(): c for c in choices}
    found = difflib.get_close_matches(str(name).lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[found[0]]!r}?)" if found else ""


def print_to_stderr(message):
    """print() to stderr, flushed: notes that must not mix with a script's results on stdout."""
    print(message, file=sys.stderr, flush=True)


def count_parameters(module):
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def file_digest(path, block=1 << 20):
    """SHA-256 of a file's bytes, as 64 hex digits (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
