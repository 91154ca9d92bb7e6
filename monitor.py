"""What a pretraining run shows while it trains: the step's scalars and images, and a k-NN monitor.

log_scalars and log_images write the step's losses (the objective and its views and labels
parts, read from the step, never recomputed), lr, speed, failed files and skipped steps, and
the batch's target and similarity matrices, to TensorBoard.

The k-NN monitor is a downstream score of the frozen encoder on a labeled set. Every
--monitor-every steps train.py calls KnnMonitor.evaluate: the current encoder, in eval
mode and without gradients, embeds fixed clips of the monitor manifest's train and
test tracks (the same clips at every step, so values compare over time); each test track
(the mean of its clip embeddings) takes the labels of its k nearest train tracks by cosine
similarity, weighted by exp(similarity / 0.07) as in DINO's k-NN evaluation. Scores:
accuracy for classes, mAP (PR-AUC, macro) for tags, R² for regression (metrics.score).

    python train.py ... --monitor-csv data/gtzan.csv --monitor-column genre --monitor-every 1000

Under torchrun every process embeds its share of the clips. The values go to TensorBoard
(`monitor/<column>/<metric>`), to the log line and into each checkpoint.
"""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

import datasets
import losses
import metrics
import utils

K = 20  # neighbours, as DINO's k-NN evaluation (it reports 10 and 20)
TEMPERATURE = 0.07  # weight exp(similarity / T) of each neighbour's vote, as DINO
REPORTED = {"multiclass": "accuracy", "multilabel": "pr_auc", "regression": "r2"}


def add_flags(parser):
    """train.py's monitor flags, in a group of their own."""
    group = parser.add_argument_group("monitor (k-NN scores of the frozen encoder on a labeled set during training)")
    group.add_argument("--monitor-csv", default=None, help="manifest whose train tracks are the k-NN's reference "
                                                           "and test tracks its queries (off without it)")
    group.add_argument("--monitor-column", action="append", default=[], help="label column scored (repeatable)")
    group.add_argument("--monitor-task", action="append", default=[], choices=datasets.TASKS,
                       help="how each --monitor-column is read (one, or one per column; default multiclass)")
    group.add_argument("--monitor-every", type=int, default=0, help="steps between scores (default: --val-every)")
    group.add_argument("--monitor-clips", type=int, default=4, help="fixed clips per track (spread over the track)")


def from_flags(args, state=None):
    """The run's KnnMonitor from train.py's flags (None without --monitor-csv), its scores so far
    taken from the checkpoint `state` when resuming."""
    if not args.monitor_csv:
        return None
    knn = KnnMonitor(args.monitor_csv, args.monitor_column, args.monitor_task, args.clip_samples, args.sample_rate,
                     args.monitor_clips)
    knn.history = list(state.get("monitor", [])) if state is not None else []
    return knn


def knn_outputs(query, reference, labels, task, num_classes, k=K, temperature=TEMPERATURE):
    """Weighted k-NN outputs of `query` tracks among `reference` tracks, by cosine similarity.

    query: `[Q, E]`, reference: `[R, E]` embeddings (normalized here); labels: the
    reference's class indices `[R]`, multi-hot tags `[R, C]` or values `[R, K]`.
    Returns `[Q, C]`: summed vote weights per class (multiclass; argmax = prediction), or
    the vote-weighted mean of the neighbours' tags or values.
    """
    similarity = F.normalize(query, dim=1) @ F.normalize(reference, dim=1).T  # [Q, R]
    top, index = similarity.topk(min(k, len(reference)), dim=1)  # [Q, k]
    weights = (top / temperature).exp()  # [Q, k]
    if task == "multiclass":
        return torch.zeros(len(query), num_classes).scatter_add_(1, labels[index], weights)  # [Q, C]
    votes = labels.float()[index]  # [Q, k, C]
    return (weights[:, :, None] * votes).sum(1) / weights.sum(1, keepdim=True)  # [Q, C]


class KnnMonitor:
    """The monitor of one run: fixed clips of a manifest's train and test tracks, labels per
    column, and the scores so far ({"step", column: {metric: value}} per evaluation)."""

    def __init__(self, csv, columns, tasks, clip_samples, sample_rate, clips_per_track):
        manifest = datasets.read_manifest([csv])
        split = manifest["split"].to_numpy()
        rows = np.flatnonzero(np.isin(split, ("train", "test")))
        self.signals = []  # (column name, task, labeled [tracks] bool, labels, number of classes)
        for name, task in zip(columns, utils.per_column(tasks or ["multiclass"], len(columns), "monitor-task")):
            column = datasets.parse_labels(manifest, name, task)
            values = torch.as_tensor(column.values[rows])
            self.signals.append((name, task, column.labeled[rows], values, len(column.classes)))
        clips, owners = [], []
        for track, row in enumerate(rows):
            cut = datasets.read_clips(manifest["path"][row], clip_samples, sample_rate, clips_per_track)  # [c, T]
            clips.append(cut)
            owners += [track] * len(cut)
        self.clips = torch.cat(clips)  # [M, T]: the same clips at every evaluation
        self.owners = torch.tensor(owners)  # [M]
        self.is_test = torch.as_tensor(split[rows] == "test")  # [tracks]
        self.history, self.seconds = [], 0.0
        print(f"monitor: {len(rows)} tracks of {csv} ({int(self.is_test.sum())} test), {len(self.clips)} clips; "
              f"k-NN (k={K}) on {', '.join(columns)}")

    @torch.no_grad()
    def embed(self, encoder, device, rank=0, world_size=1, batch_size=64):
        """Track embeddings `[tracks, E]` (mean over each track's clips); each process embeds its share."""
        was_training = encoder.training
        encoder.eval()
        share = -(-len(self.clips) // world_size)  # ceil: every process embeds as many clips
        mine = torch.arange(rank * share, (rank + 1) * share).clamp(max=len(self.clips) - 1)
        h = torch.cat([encoder(self.clips[batch].to(device)).float() for batch in mine.split(batch_size)])
        h = utils.gather(h)[:len(self.clips)].cpu()  # [M, E] in clip order
        encoder.train(was_training)
        sums = torch.zeros(int(self.owners.max()) + 1, h.shape[1]).index_add_(0, self.owners, h)
        return sums / torch.bincount(self.owners)[:, None]  # [tracks, E]

    def scores(self, tracks):
        """{column: {metric: value}} of the k-NN outputs of track embeddings `[tracks, E]`."""
        result = {}
        for name, task, labeled, labels, classes in self.signals:
            reference, query = labeled & ~self.is_test.numpy(), labeled & self.is_test.numpy()
            outputs = knn_outputs(tracks[query], tracks[reference], labels[reference], task, classes)
            result[name] = {REPORTED[task]: metrics.score(task, outputs, labels[query])[REPORTED[task]]}
        return result

    def evaluate(self, encoder, step, device, rank, world_size, writer, run_seconds):
        """Score the encoder now; log to TensorBoard and the log line (main process); returns the scores.

        run_seconds: the run's time so far, for the monitor's share of it.
        """
        started = time.perf_counter()
        scores = self.scores(self.embed(encoder, device, rank, world_size))
        self.seconds += time.perf_counter() - started
        self.history.append({"step": step, **scores})
        if writer is not None:
            for name, values in scores.items():
                for metric, value in values.items():
                    writer.add_scalar(f"monitor/{name}/{metric}", value, step)
            writer.add_scalar("monitor/time_share", self.seconds / max(run_seconds, 1e-9), step)
            text = ", ".join(f"{name} {metric} {value:.3f}" for name, values in scores.items()
                             for metric, value in values.items())
            print(f"\nmonitor at step {step}: {text} (k-NN, k={K}; {self.seconds / max(run_seconds, 1e-9):.1%} of "
                  f"the run's time so far)", flush=True)
        return scores


# ---------------------------------------------------------------- the step's scalars and images

@torch.no_grad()
def log_scalars(writer, stats, step, lr, failed_files, skipped_steps, speed, progress):
    """Scalars of the last step: the loss and its views and labels parts (read, never recomputed),
    lr, failed files, skipped steps, and speed: (clips per second, share of the time the host
    waited on the data workers). Returns the global-batch loss of the step (every process gets it)."""
    parts = utils.all_reduce_sum(torch.stack([part.float() for part in stats["parts"]]))  # [6]
    total = (utils.all_reduce_sum(stats["loss_sum"]) / stats["count"].clamp(min=1)).item()
    failed = int(utils.all_reduce_sum(torch.tensor(float(failed_files), device=parts.device)).item())
    if writer is None:
        return total
    means = losses.part_means(parts)
    writer.add_scalar("loss/total", total, step)
    for name in ("views", "labels"):
        if not math.isnan(means[name]):
            writer.add_scalar(f"loss/{name}", means[name], step)
    writer.add_scalar("lr", lr, step)
    writer.add_scalar("speed/clips_per_s", speed[0], step)
    writer.add_scalar("speed/data_wait_share", speed[1], step)
    if parts.device.type == "cuda":
        writer.add_scalar("memory/peak_mib", torch.cuda.max_memory_allocated(parts.device) / 2**20, step)
    writer.add_scalar("data/failed_files", failed, step)
    writer.add_scalar("train/skipped_steps", skipped_steps, step)
    progress.set_postfix(loss=f"{total:.3f}", failed=failed)
    return total


@torch.no_grad()
def log_images(writer, stats, step):
    """The batch's target matrix, its density, and the cosine-similarity matrix (a diagnostic: image steps only)."""
    target = losses.build_target(stats["clip_all"], stats["signals_all"])  # [N, N]
    z = F.normalize(stats["z_all"].float(), dim=1)
    writer.add_scalar("target/density", (target.sum() / (len(target) * (len(target) - 1))).item(), step)
    writer.add_image("batch/target", target[None].float().cpu(), step)
    writer.add_image("batch/similarity", ((z @ z.T + 1) / 2)[None].cpu(), step)
