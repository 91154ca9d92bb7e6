"""SemiSupCon pretraining: one contrastive loss over views and labels, mixed batches.

CPU, on the built-in synthetic music set (no data arguments):
    python train.py --steps 200 --batch-size 32 --width 0.25 --clip-seconds 1 --sample-rate 16000
CPU or one GPU, on your manifests (labeled and unlabeled):
    python train.py --train-csv mtat.csv --label-column tags --task multilabel \
        --train-csv fma.csv --out runs/semisupcon
Several GPUs (the batch size is global; projections are gathered across processes):
    torchrun --nproc_per_node=4 train.py --train-csv mtat.csv --label-column tags --task multilabel
Elastic restarts after a process dies: torchrun --standalone --nproc_per_node=4 --max-restarts 3 train.py ...
Resume: run the same command again (or after Ctrl-C, SIGTERM, a full disk); --out's newest
checkpoint that loads is picked up, after checking that the model flags and settings match
(docs/training.md: faults and what happens). A finished run also writes OUT/model.pt, the
file to share (weights and settings, no optimizer state).

Reading order: build_parser, main and pretrain (the set-up phases by name), train_loop,
train_step (one step, top to bottom) and the step's functions, then validation, saving and
the set-up phases. Run safety (the out-folder lock, the resume point, the data check, the
stop path) lives in safety.py; what a run logs, in monitor.py.
"""
import argparse
import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import augment
import datasets
import losses
import models
import monitor
import safety
import synthetic
import utils


def build_parser():
    # No abbreviations: --label-col must not silently become --label-column.
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    data = parser.add_argument_group("data")
    data.add_argument("--train-csv", action="append", default=[],
                      help="manifest CSV (repeatable: e.g. a labeled and an unlabeled set); "
                           "without it, the built-in synthetic music set is used")
    data.add_argument("--synthetic-dir", default=".cache/synthetic",
                      help="folder where the built-in synthetic set is written once")
    datasets.add_label_flags(
        data, column_help="label column(s) of one supervision signal; repeat for several signals; "
                          "comma-separated columns form one regression signal (default: 'label' if present)",
        task_help="how each --label-column is read (one value, or one per column; default multiclass)",
        kind_help="what each label means (one value, or one per column; default generic)")
    data.add_argument("--clip-seconds", type=float, default=2.7, help="crop length in seconds (paper: 2.7)")
    data.add_argument("--sample-rate", type=int, default=22050, help="audio is resampled to this rate (Hz)")
    data.add_argument("--views", type=int, default=2, help="crops per clip (paper: 2)")
    data.add_argument("--labeled-fraction", type=float, default=1.0,
                      help="p_s: share of the labeled train rows kept as labeled (rest join the unlabeled pool)")
    data.add_argument("--labeled-per-batch", type=float, default=None,
                      help="b_s: share of each batch drawn from the labeled pool (default 0.5 with labels, else 0)")
    data.add_argument("--workers", type=int, default=2, help="data-loading processes")
    data.add_argument("--resample-on", default="auto", choices=("auto", "device", "workers"),
                      help="where crops are resampled to --sample-rate: on the training device (batched by "
                           "source rate) or in the workers; auto: device on GPU, workers on CPU")
    model = parser.add_argument_group("model")
    model.add_argument("--encoder", default="samplecnn", choices=sorted(models.ENCODERS), help="encoder name")
    model.add_argument("--width", type=float, default=1.0, help="channel-width multiplier (1 = paper)")
    model.add_argument("--hidden-dim", type=int, default=512, help="projection head hidden size")
    model.add_argument("--projection-dim", type=int, default=128, help="projection size D")
    loss = parser.add_argument_group("loss")
    loss.add_argument("--temperature", type=float, default=0.1, help="tau")
    # Each setting of a signal takes one value (for every --label-column) or one per column.
    loss.add_argument("--positive-threshold", action="append", default=[],
                      help="multilabel: shared tags needed for a positive (T), or 'weighted' for the soft target "
                           "(one, or one per column; default 1)")
    loss.add_argument("--target-kernel", action="append", default=[], choices=losses.KERNELS,
                      help="regression: how target distance becomes a target value (one, or one per column; "
                           "default gaussian)")
    loss.add_argument("--target-sigma", action="append", type=float, default=[],
                      help="regression, gaussian kernel: sigma in --target-units (one, or one per column; "
                           "default 0.5)")
    loss.add_argument("--target-radius", action="append", type=float, default=[],
                      help="regression, threshold kernel: radius in --target-units (one, or one per column; "
                           "default 0.5)")
    loss.add_argument("--target-units", action="append", default=[], choices=("standardized", "raw"),
                      help="regression: sigma and radius in standard deviations of the labeled train values, or "
                           "in the labels' own units (one, or one per column; default standardized)")
    loss.add_argument("--class-similarity", action="append", default=[],
                      help="multiclass: 'key', 'pitch', 'pitch-octave' or a C x C CSV (one, or one per column; "
                           "'none' to skip a column)")
    aug = parser.add_argument_group("augmentation")
    aug.add_argument("--augment", default=",".join(augment.DEFAULT_AUGMENT),
                     help="transforms for the views, comma-separated, or 'none'")
    aug.add_argument("--augment-labeled", default=None,
                     help="transforms for labeled clips (default: same as --augment; 'none' allowed)")
    aug.add_argument("--severity", type=float, default=1.0, help="augmentation strength: 0 none, 1 paper, up to 2.5")
    aug.add_argument("--pitch-shifts", default="fast", choices=augment.PITCH_SHIFT_SETS,
                     help="pitch shifts drawn: 'fast' the few ratios the authors' chain applies (torch-pitch-shift's "
                          "fast set for the sample rate), 'continuous' uniform in +-4*severity semitones (the paper's text)")
    aug.add_argument("--augment-on", default="device", choices=("device", "workers"),
                     help="augment batches on the training device, or clip by clip in the data workers")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=int, default=96, help="clips per step, global over processes (paper: 96)")
    optim.add_argument("--steps", type=int, default=50000, help="optimizer steps in total")
    optim.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="Adam weight decay")
    optim.add_argument("--schedule", default="constant", choices=("constant", "cosine"), help="lr schedule")
    optim.add_argument("--warmup-steps", type=int, default=0, help="linear lr warmup steps")
    optim.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: off)")
    optim.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                       help="autocast precision (auto: bf16 on GPU, fp32 on CPU)")
    optim.add_argument("--grad-accum", type=int, default=1,
                       help="batches per optimizer step; each is its own contrastive batch (negatives do not "
                            "cross batches), so this does not enlarge the negative set")
    optim.add_argument("--compile", action="store_true", help="torch.compile the model")
    optim.add_argument("--sync-bn", action="store_true", help="batch-norm statistics over the global batch")
    optim.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute encoder activations in backward: less memory, more compute")
    run = parser.add_argument_group("run")
    run.add_argument("--out", default="runs/semisupcon", help="folder for checkpoints, logs and args.json")
    run.add_argument("--seed", type=int, default=0, help="base seed (each process adds its rank)")
    run.add_argument("--resume", default="auto",
                     help="'auto': newest checkpoint in --out that loads, if any; a checkpoint file or folder; "
                          "or 'none' to start afresh")
    run.add_argument("--allow-changed-settings", action="store_true",
                     help="resume although data, sampler or optimizer settings (manifest rows, seed, batch, b_s, "
                          "p_s, lr, ...) differ from the checkpoint's; the differences are printed")
    run.add_argument("--log-every", type=int, default=10, help="steps between TensorBoard scalars")
    run.add_argument("--image-every", type=int, default=0, help="steps between target/similarity images (0: off)")
    run.add_argument("--val-every", type=int, default=500, help="steps between validation losses (0: off)")
    run.add_argument("--val-batches", type=int, default=10, help="batches per validation (at most the val split)")
    run.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    run.add_argument("--keep", type=int, default=3, help="latest checkpoints kept (plus best.pt, by val loss)")
    run.add_argument("--check-data", action="store_true", help="only check every audio file, report, and exit")
    run.add_argument("--skip-check", action="store_true", help="skip the audio check before training")
    run.add_argument("--max-bad-fraction", type=float, default=0.01,
                     help="refuse to train if more than this share of files is bad")
    run.add_argument("--max-bad-steps", type=int, default=5,
                     help="stop after this many consecutive steps with non-finite loss or gradients")
    monitor.add_flags(parser)
    return parser


# ---------------------------------------------------------------- main: set-up phases, then the loop

def main(argv=None):
    """Train from the command line `argv`; returns {"out", "losses", "failed_files", "skipped_steps", "step"}."""
    args = build_parser().parse_args(argv)
    safety.check_flags(args)
    # However the run ends, what it took is given back: the TensorBoard writer, the --out lock and
    # the signal handlers (a notebook that calls main gets its Ctrl-C back), then, on a normal end,
    # the process group.
    with contextlib.ExitStack() as taken:
        result = pretrain(args, taken)
    utils.cleanup_process()
    return result


def pretrain(args, taken):
    """The set-up phases by name, then the loop; `taken` (an ExitStack) gives back the handlers, the
    lock and the TensorBoard writer."""
    # ---- process; from here a signal during set-up saves after the first step
    stop = taken.enter_context(safety.StopSignal())
    rank, world_size, local_rank, device = utils.setup_process()
    is_main = rank == 0
    # The label flags as the user gave them, before the data fills in defaults (build_pools checks them).
    given_columns, given_share = list(args.label_column), args.labeled_per_batch
    derive_args(args, world_size, device)
    utils.seed_everything(args.seed + rank)
    if is_main:
        taken.enter_context(safety.claim_out_folder(args.out))
    utils.barrier()

    # ---- resume point: the newest checkpoint that loads, checked against these flags
    resume_path, state = (None, None) if args.check_data else safety.find_resume(args, device, is_main)
    if state is not None:
        safety.check_model_flags(state["args"], args, resume_path)
        if state["step"] >= args.steps:
            if is_main:
                print(f"{args.out} is finished: {resume_path} is at step {state['step']} and --steps is "
                      f"{args.steps}; nothing to do (raise --steps to train on, or use another --out)")
            return {"out": args.out, "losses": [], "failed_files": 0, "skipped_steps": 0, "step": state["step"]}

    # ---- data: manifests, the file check, label columns, pools, augmentation
    manifest, columns, specs = load_data(args, is_main)
    if args.check_data or not args.skip_check:
        manifest = safety.check_data(manifest, args, is_main, datasets.check_files)
        if args.check_data:
            return {"out": args.out, "files": len(manifest)}
        # Label columns hold one entry per manifest row: the check dropped rows, so read them again.
        columns, specs = parse_columns(manifest, args)
    any_labeled, labeled_rows, unlabeled_rows = datasets.build_pools(manifest, columns, given_columns, given_share,
                                                                     args, is_main)
    for warning in augment.label_warnings(args.augment_labeled, columns) if is_main else []:
        print(warning)
    if state is not None:
        safety.check_settings(state["args"], saved_args(args), flag_defaults(), resume_path, is_main)
    worker_chains, device_chains = augment.build_chains(args.augment, args.augment_labeled, args.severity,
                                                        args.sample_rate, args.pitch_shifts,
                                                        on_workers=args.augment_on == "workers")

    # ---- model, optimizer, resume
    bare_model = build_model(args, device)
    optimizer, scheduler, scaler = build_optimizer(bare_model, args, device)
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)  # device augmentation's draws
    step, best_val = (0, float("inf")) if state is None else \
        safety.restore(state, resume_path, bare_model, optimizer, scheduler, scaler, generator, rank, is_main)
    model = wrap_model(bare_model, args, world_size, local_rank, device)

    # ---- loaders and logging
    loader, val_loader, status_dir = datasets.build_loaders(manifest, columns, any_labeled, labeled_rows,
                                                            unlabeled_rows, worker_chains, step, args, device, rank)
    writer = start_logging(args, bare_model, device, is_main)
    if writer:
        taken.callback(safety.close_writer, writer)  # flushed and closed however the run ends
    knn = monitor.from_flags(args, state)
    run = Run(args, model, bare_model, optimizer, scheduler, scaler, generator, columns, specs, device_chains,
              status_dir, device, rank, is_main, writer, knn, best_val)

    # ---- training loop
    start_step, started = step, time.perf_counter()
    step, history, failed_files, skipped_steps, val_loss = train_loop(run, loader, val_loader, step, stop)
    if is_main:
        safety.print_summary(args, start_step, step, time.perf_counter() - started, val_loss, run.best_val)
    return {"out": args.out, "losses": history, "failed_files": failed_files, "skipped_steps": skipped_steps,
            "step": step}


def train_loop(run, loader, val_loader, step, stop):
    """The training loop, from global step `step` up to --steps: each step (train_step), then
    what runs every so many steps (logging, validation, the monitor, saving, stopping).

    A failed write or a dead data worker ends the loop through safety.stopped, which
    saves the last step. Returns (step reached, history [(step, global-batch loss)] of the
    logging steps, files that failed to load, skipped non-finite steps, last validation loss).
    """
    args, device = run.args, run.device
    # Files that failed to load; clips seen and host seconds blocked on the data workers since the last log.
    counts = {"failed_files": 0, "clips": 0, "data_wait": 0.0}
    history, started = [], time.perf_counter()
    tick = started  # the last logging step's time
    # Non-finite steps in a row and in all, counted on the device and read on logging steps only.
    bad_steps = torch.zeros((), dtype=torch.long, device=device)
    skipped_steps = torch.zeros((), dtype=torch.long, device=device)
    val_loss = float("nan")
    progress = tqdm(total=args.steps, initial=step, disable=not run.is_main, desc="train")
    try:
        while step < args.steps:
            # ---- 1.-6. one step: batches, augmentation, loss, backward, the optimizer (train_step)
            stats, is_bad = train_step(run, loader, counts)
            bad_steps = torch.where(is_bad, bad_steps + 1, 0)
            skipped_steps += is_bad
            step += 1
            progress.update(1)

            # ---- 7. log every --log-every steps (the one host-device sync of a step, on these steps only)
            is_logging = step % args.log_every == 0 or step == args.steps
            if is_logging:
                elapsed = time.perf_counter() - tick
                speed = (counts["clips"] / elapsed, counts["data_wait"] / elapsed)
                total = monitor.log_scalars(run.writer, stats, step, run.scheduler.get_last_lr()[0],
                                            counts["failed_files"], int(skipped_steps), speed, progress)
                history.append((step, total))
                counts.update(clips=0, data_wait=0.0)
                tick = time.perf_counter()
            if run.writer and args.image_every and step % args.image_every == 0:
                monitor.log_images(run.writer, stats, step)
            # ---- 7. validate every --val-every steps (and at the end); best.pt on a new best
            if val_loader is not None and args.val_every and (step % args.val_every == 0 or step == args.steps):
                val_loss = validate_and_keep_best(run, val_loader, step)
            # ---- 7. k-NN scores of the frozen encoder every --monitor-every steps (and at the end)
            if run.knn is not None and (step % args.monitor_every == 0 or step == args.steps):
                run.knn.evaluate(run.bare_model.encoder, step, device, run.rank, args.world_size, run.writer,
                                 time.perf_counter() - started)
            # ---- stop on --max-bad-steps non-finite steps in a row (read on logging steps: a sync)
            if is_logging and int(bad_steps) >= args.max_bad_steps:
                save(run, step)  # skipped steps left the weights untouched: the last good weights
                raise utils.UserError(f"{int(bad_steps)} steps in a row had a non-finite loss or gradient; stopped "
                                      f"and saved the last good weights at step {step} in {args.out}. Lower --lr, "
                                      f"set --clip-grad, or check the data.")
            # ---- 7. save every --save-every steps, at the end, and on a stop signal (SIGTERM, Ctrl-C).
            # Several processes agree on a signal through an all-reduce: on logging steps only.
            stopping = stop.any_process(device, args.world_size) if args.world_size == 1 or is_logging else False
            if step % args.save_every == 0 or step == args.steps or stopping:
                save(run, step)
            if stopping:
                if run.is_main:
                    print(f"stopped by {stop.requested or 'a signal'} at step {step}; resume with the same command "
                          f"(--resume auto) to continue from {args.out}", flush=True)
                break
    except (OSError, RuntimeError) as error:  # a failed write, a dead data worker, vanished audio: else a bug
        raise safety.stopped(error, lambda: save(run, step), step, args.out, run.status_dir) from error
    finally:
        progress.close()
    return step, history, counts["failed_files"], int(skipped_steps), val_loss


# ---------------------------------------------------------------- one training step, in the order it calls its parts

def train_step(run, loader, counts):
    """One optimizer step over --grad-accum batches: steps 1-6 of the loop, top to bottom.

    counts: train_loop's failed files, clips (all processes) and data wait, added to here.
    Returns (the last batch's detached stats (contrastive_step), is_bad: a 0-d bool on the
    device, true where the update was skipped as not finite)."""
    args, device = run.args, run.device
    for _ in range(args.grad_accum):
        # ---- 1. the next batch, to the device
        waited = time.perf_counter()
        batch = next(loader)
        counts["data_wait"] += time.perf_counter() - waited
        views, clip_ids, labeled = prepare_batch(batch, args, device)  # [n, T], [n], [n] (host)
        # ---- 2. augment on the device (the identity when the workers augmented)
        views = augment_batch(views, labeled, run.device_chains, run.generator, args.views)
        signals = batch_signals(batch, run.specs, args.views, device)
        # ---- 3.-5. encode, project, gather, target and loss
        with torch.autocast(device.type, dtype=args.autocast_dtype, enabled=args.autocast_dtype is not None):
            loss, stats = contrastive_step(run.model, views, clip_ids, signals, args.temperature, args.world_size,
                                           run.rank)
        # ---- 6. backward; accumulation averages k separate contrastive batches (negatives
        # never cross micro-batches). No host-device sync: failed counts live on the host.
        run.scaler.scale(loss / args.grad_accum).backward()
        counts["failed_files"] += int(batch["failed"].sum())
        counts["clips"] += len(batch["clip"]) * args.world_size
    # ---- 6. clip, optimizer step (skipped on the device if not finite), zero the gradients
    return stats, optimizer_step(run, stats["loss_sum"])


def prepare_batch(batch, args, device):
    """Move a batch to the device -> views `[b*V, T]`, clip ids `[b*V]`, labeled `[b*V]` (on the host)."""
    audio = batch["audio"].to(device, non_blocking=True)  # [b, V, T] or [b, V, L_max] at source rates
    if audio.shape[-1] != args.clip_samples or (batch["rate"] != args.sample_rate).any():
        audio = datasets.resample_batch(audio, batch["rate"], args.clip_samples, args.sample_rate)  # [b, V, T]
    views = audio.reshape(-1, audio.shape[-1])  # [b*V, T]
    clip_ids = batch["clip"].to(device).repeat_interleave(args.views)  # [b*V]
    # Kept on the host: which rows take which chain is decided without reading the device.
    any_labeled = torch.stack(batch["labeled"]).any(0) if batch["labeled"] else \
        torch.zeros(len(audio), dtype=torch.bool)
    return views, clip_ids, any_labeled.repeat_interleave(args.views)


def augment_batch(audio, labeled, chains, generator, views=1):
    """Augment `[n, T]` views: labeled ones with chains['labeled'], others with chains['unlabeled'].
    labeled: `[n]` bool on the host.
    Rows [k·views, (k+1)·views) are the views of one clip (the chain decides per clip)."""
    if chains["labeled"] is chains["unlabeled"]:
        return chains["unlabeled"](audio, generator, views=views)
    out = audio.clone()
    for mask, chain in ((labeled, chains["labeled"]), (~labeled, chains["unlabeled"])):
        if mask.any():  # a host tensor: no sync
            rows = mask.nonzero().squeeze(1).to(audio.device, non_blocking=True)  # whole clips, views kept together
            out[rows] = chain(audio[rows], generator, views=views)
    return out


def batch_signals(batch, specs, num_views, device):
    """Per-view losses.Signals of this process's batch, one per label column."""
    signals = []
    for k, spec in enumerate(specs):
        labels = batch["labels"][k].to(device).repeat_interleave(num_views, dim=0)  # [b*V, ...]
        labeled = batch["labeled"][k].to(device).repeat_interleave(num_views)  # [b*V]
        signals.append(losses.Signal(labels, labeled, spec))
    return signals


def contrastive_step(model, views, clip_ids, signals, temperature, world_size, rank):
    """Encode, project, gather and compute the global-batch loss for this process's rows.

    views: `[n, T]` augmented audio of this process; clip_ids `[n]`; signals from
    batch_signals; temperature: tau. Returns (loss to backpropagate, detached stats
    dict: loss_sum and count of the objective, parts (losses.LossParts of this
    process's rows), z_all, clip_all, signals_all). The loss is scaled so that, after DDP
    averages gradients over processes, they equal those of one process holding the
    whole global batch.
    """
    z = model(views)  # [n, D]
    z_all = utils.gather_with_grad(z)  # [N, D], N = world * n
    clip_all = utils.gather(clip_ids)  # [N]
    signals_all = [losses.Signal(utils.gather(labels), utils.gather(labeled), spec)
                   for labels, labeled, spec in signals]
    anchors = rank * len(z) + torch.arange(len(z), device=z.device)  # [n]: this process's rows of z_all
    row_loss, has_positive, parts = losses.semisupcon_loss(z_all, clip_all, signals_all, temperature, anchors)
    # Rows without a positive carry no loss: the mean is over the rows with one, in all processes.
    count = utils.all_reduce_sum(has_positive.sum().float())
    loss = row_loss.sum() / count.clamp(min=1) * world_size
    stats = {"loss_sum": parts.loss_sum, "count": count, "parts": parts, "z_all": z_all.detach(),
             "clip_all": clip_all, "signals_all": signals_all}
    return loss, stats


def optimizer_step(run, loss_sum):
    """Unscale, clip, step (or skip), zero the gradients, advance the schedule.

    loss_sum: the last micro-batch's detached loss sum. Returns is_bad, a 0-d bool
    tensor on the device: the loss or the gradient norm was not finite and the update
    was skipped. Nothing here reads a device value on the host.
    """
    run.scaler.unscale_(run.optimizer)
    # With --clip-grad 0 the max norm is infinite: nothing is clipped, but the norm still
    # comes back, and it is what tells a non-finite gradient.
    norm = torch.nn.utils.clip_grad_norm_(run.bare_model.parameters(), run.args.clip_grad or float("inf"))
    # Gradients are identical on every process after DDP, so every process skips together.
    is_bad = ~(torch.isfinite(norm) & torch.isfinite(loss_sum))  # on the device, never read here
    if not run.scaler.is_enabled():
        run.optimizer.found_inf = is_bad.float()  # fp16's scaler sets it itself
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return is_bad


# ---------------------------------------------------------------- validation, saving

@torch.no_grad()
def validate(model, loader, specs, chains, args, device, rank):
    """The training objective on the validation batches (fixed crops and augmentation).

    chains: the augmentation the training step applies on the device (identity when the
    workers augment: their clips arrive augmented). Returns losses.part_means: {"loss": the
    objective, "views": its views part alone, "labels": its labels part alone (nan
    without labels)}, each a mean over the views with a positive.
    """
    model.eval()
    generator = torch.Generator(device=device).manual_seed(args.seed + 10_000 + rank)
    sums = torch.zeros(6, device=device)  # losses.LossParts summed over the batches
    for batch in loader:
        views, clip_ids, labeled = prepare_batch(batch, args, device)
        views = augment_batch(views, labeled, chains, generator, args.views)
        signals = batch_signals(batch, specs, args.views, device)
        with torch.autocast(device.type, dtype=args.autocast_dtype, enabled=args.autocast_dtype is not None):
            _, stats = contrastive_step(model, views, clip_ids, signals, args.temperature, args.world_size, rank)
        sums += torch.stack([part.float() for part in stats["parts"]])
    model.train()
    return losses.part_means(utils.all_reduce_sum(sums))


def validate_and_keep_best(run, val_loader, step):
    """Validate, log the three validation losses, save best.pt on a new best; returns the val loss."""
    # device_chains, as the step: clips the workers augmented are not augmented twice.
    val = validate(run.model, val_loader, run.specs, run.device_chains, run.args, run.device, run.rank)
    if run.writer:
        run.writer.add_scalar("val/loss", val["loss"], step)
        run.writer.add_scalar("val/loss_views", val["views"], step)
        if not math.isnan(val["labels"]):
            run.writer.add_scalar("val/loss_labels", val["labels"], step)
    if val["loss"] < run.best_val:
        run.best_val = val["loss"]
        save(run, step, is_best=True)
    return val["loss"]


def save(run, step, is_best=False):
    """Checkpoint everything needed to continue exactly (main process writes; all wait).

    is_best: write best.pt instead of the numbered checkpoint (which keeps the --keep
    newest). At the last step, model.pt (weights and settings, no optimizer) is written too.
    """
    # Every process's RNG states are saved, so each continues its own stream on resume.
    rngs, generators = utils.gather_objects(utils.rng_states()), utils.gather_objects(run.generator.get_state())
    if run.is_main:
        state = {"model": run.bare_model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "step": step,
                 "args": saved_args(run.args), "rng": rngs, "generator": generators, "best_val": run.best_val,
                 "labels": [c.describe() for c in run.columns], "monitor": run.knn.history if run.knn else []}
        if is_best:
            safety.save_torch(os.path.join(run.args.out, "best.pt"), {"format": safety.FORMAT} | state)
        else:
            safety.save_checkpoint(state, run.args.out, step, run.args.keep)
        if step == run.args.steps and not is_best:
            safety.save_torch(os.path.join(run.args.out, "model.pt"), safety.model_file(state))
    utils.barrier()


# ---------------------------------------------------------------- set-up phases, in the order main runs them

# One value per label column (or one for all); the flag's default where it is not given.
SIGNAL_DEFAULTS = {"task": "multiclass", "label_kind": "generic", "class_similarity": "none",
                   "positive_threshold": "1", "target_kernel": "gaussian", "target_sigma": 0.5,
                   "target_radius": 0.5, "target_units": "standardized"}


def derive_args(args, world_size, device):
    """Every value that follows from the flags alone, computed once, right after parsing.

    The results join the flags in args.json and in every checkpoint. Three values need
    the data and are set by build_pools, the one other place that adds to `args`:
    labeled_per_batch's default, manifest_rows and manifest_digest (load_data also
    fills in train_csv and label_column when they were left out).
    """
    args.world_size = world_size
    if args.batch_size % world_size:
        raise utils.UserError(f"--batch-size {args.batch_size} is global and must divide by {world_size} "
                              f"processes; give a multiple of {world_size}")
    args.clip_samples = int(round(args.clip_seconds * args.sample_rate))  # T, the crop length in samples
    if args.resample_on == "auto":
        # A GPU resamples a whole batch at once; on a CPU the workers resample in parallel.
        args.resample_on = "device" if device.type == "cuda" else "workers"
    args.augment_labeled = args.augment if args.augment_labeled is None else args.augment_labeled
    if args.monitor_csv and not args.monitor_column:
        raise utils.UserError(f"--monitor-csv {args.monitor_csv} needs --monitor-column: the label column to score")
    args.monitor_every = args.monitor_every or args.val_every or 500
    for name, default in SIGNAL_DEFAULTS.items():
        setattr(args, name, getattr(args, name) or [default])
    # bf16 on a GPU needs no loss scaling; on a CPU, autocast gains nothing, so fp32.
    args.precision_name = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    args.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision_name)


def flag_defaults():
    """Every flag's default, as saved_args would hold it (resume compares against these)."""
    defaults = vars(build_parser().parse_args([]))
    return defaults | {name: [default] for name, default in SIGNAL_DEFAULTS.items()}


def saved_args(args):
    """The arguments as plain JSON-friendly values (for args.json and checkpoints)."""
    return {k: v for k, v in vars(args).items() if k != "autocast_dtype"}


def load_data(args, is_main):
    """Read the manifests and label columns; returns (manifest, columns, target specs)."""
    if not args.train_csv:
        args.train_csv = [synthetic.make_synthetic_set(args.synthetic_dir)] if is_main else []
        utils.barrier()
        args.train_csv = args.train_csv or [os.path.join(os.path.abspath(args.synthetic_dir), "manifest.csv")]
    if any(os.path.isdir(p) for p in args.train_csv):
        # A folder becomes a manifest in --out (the main process scans; the others wait for it).
        args.train_csv = [datasets.manifest_or_scan(p, args.out, write=is_main) for p in args.train_csv]
        utils.barrier()
    manifest = datasets.read_manifest(args.train_csv)
    if not args.label_column and "label" in manifest.columns:
        args.label_column = ["label"]
    return (manifest, *parse_columns(manifest, args))


def parse_columns(manifest, args):
    """LabelColumns and their losses.TargetSpecs from the label flags, each flag per column."""
    count = len(args.label_column)
    flags = {name: utils.per_column(getattr(args, name), count, name.replace("_", "-")) for name in SIGNAL_DEFAULTS}
    columns, specs = [], []
    for k, name in enumerate(args.label_column):
        setting = {flag: values[k] for flag, values in flags.items()}
        similarity = None if setting["class_similarity"] == "none" else setting["class_similarity"]
        column = datasets.parse_labels(manifest, name, setting["task"], setting["label_kind"], similarity)
        threshold = setting["positive_threshold"]
        is_standardized = column.task == "regression" and setting["target_units"] == "standardized"
        columns.append(column)
        specs.append(losses.TargetSpec(
            task=setting["task"], threshold=None if threshold == "weighted" else int(threshold),
            kernel=setting["target_kernel"], sigma=setting["target_sigma"], radius=setting["target_radius"],
            similarity=column.similarity, mean=column.mean if is_standardized else None,
            std=column.std if is_standardized else None))
    return columns, specs


# ---------------------------------------------------------------- set-up: model, optimizer, logging

def build_model(args, device):
    """Encoder and projection head on `device`: the bare model, before any compile or DDP wrapper."""
    encoder = models.build_encoder(args.encoder, args.clip_samples, args.sample_rate, args.width)
    model = models.ContrastiveModel(encoder, args.hidden_dim, args.projection_dim)
    models.set_activation_checkpointing(model.encoder, args.activation_checkpointing)
    if args.sync_bn:
        # torch's SyncBatchNorm is GPU-only; the project's GlobalBatchNorm covers gloo on CPUs.
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else \
            utils.convert_batch_norm(model)
    return model.to(device)


def build_optimizer(model, args, device):
    """Adam with its lr schedule and the fp16 grad scaler: (optimizer, scheduler, scaler)."""
    # Fused Adam takes `found_inf` from the device and skips the update there: a step with a
    # non-finite loss or gradient is dropped without the host reading any value.
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(args, step))
    # Only fp16 needs loss scaling (its range is narrow); disabled, the scaler passes values through.
    scaler = torch.amp.GradScaler(device.type, enabled=args.autocast_dtype == torch.float16)
    return optimizer, scheduler, scaler


def lr_factor(args, step):
    """Learning-rate multiplier at `step`: linear warmup, then constant or cosine to 0."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    if args.schedule == "cosine":
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return 1.0


def wrap_model(model, args, world_size, local_rank, device):
    """The model the step calls: compiled if asked, under DDP with several processes."""
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        # DDP broadcasts rank 0's weights at construction and averages gradients after backward.
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    return model


def start_logging(args, bare_model, device, is_main):
    """Main process: write args.json, open TensorBoard, print the run's set-up; returns the writer or None."""
    if not is_main:
        return None
    safety.write_json(os.path.join(args.out, "args.json"), saved_args(args))
    print(f"{args.encoder}: {utils.count_parameters(bare_model.encoder):,} parameters; "
          f"{args.world_size} process(es) on {device}, {torch.get_num_threads()} threads and {args.workers} data "
          f"workers each, precision {args.precision_name}; out {args.out}")
    return SummaryWriter(args.out)


@dataclass
class Run:
    """What the training loop uses besides the batches: built by main's set-up phases."""
    args: argparse.Namespace
    model: torch.nn.Module  # what the step calls: compiled and/or under DDP
    bare_model: torch.nn.Module  # the same weights unwrapped: what checkpoints hold
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the device augmentation's random draws
    columns: list  # LabelColumns, described in each checkpoint
    specs: list  # one losses.TargetSpec per column
    device_chains: dict  # {"labeled", "unlabeled"}: what the step applies on the device
    status_dir: str  # where the data workers note the file they read
    device: torch.device
    rank: int
    is_main: bool
    writer: SummaryWriter | None  # TensorBoard, main process only
    knn: monitor.KnnMonitor | None  # --monitor-csv's k-NN scores
    best_val: float = float("inf")  # the lowest validation loss so far (best.pt)


if __name__ == "__main__":
    utils.run_cli(main)
