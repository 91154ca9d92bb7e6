"""Target matrices and the target-matrix contrastive loss of SemiSupCon.

A batch of N views gets an N x N *target* with values in [0, 1]: 1 where two views come
from the same clip (self-supervision), and, between labeled clips, a value given by how
much their labels agree (supervision). The loss asks each view's similarity
distribution over the other views to put its mass where the target does.

Everything here is a function of tensors: no I/O, no logging, no process groups. Under
torchrun the caller gathers projections and labels first and passes only its own rows
as anchors (`anchors=`), so the loss is tested in one process.

Memory is O(N^2 + N*C): labels are compared with matrix products or index lookups,
never with an N x N x C tensor.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

TASKS = ("multiclass", "multilabel", "regression")
KERNELS = ("gaussian", "threshold")


@dataclass
class TargetSpec:
    """How one label column turns into target values between labeled views.

    task: "multiclass" (labels are class indices `[N]`), "multilabel" (multi-hot `[N, C]`)
        or "regression" (values `[N, K]`, standardized here when mean and std are set).
    threshold: multilabel only; views sharing at least this many tags are positives.
        None means the soft "weighted" target 2|y_i & y_j| / (|y_i| + |y_j|).
    kernel, sigma, radius: regression only; "gaussian" gives exp(-d^2 / 2 sigma^2) and
        "threshold" gives 1 where d <= radius, d the Euclidean distance of the targets.
    mean, std: regression only, `[K]` each or None; with them the values become
        (value - mean) / std before distances, so sigma and radius are in standard
        deviations; without them sigma and radius are in the labels' own units.
    similarity: multiclass only, optional `[C, C]` class similarity in [0, 1] (domain
        knowledge such as key relations); without it, same class -> 1, else 0.
    """
    task: str = "multiclass"
    threshold: int | None = 1
    kernel: str = "gaussian"
    sigma: float = 0.5
    radius: float = 0.5
    similarity: torch.Tensor | None = None
    mean: list | None = None
    std: list | None = None


class Signal(NamedTuple):
    """One supervision signal of a batch: what labels_target reads for one label column.

    labels: `[N]` class indices, `[N, C]` multi-hot tags or `[N, K]` values;
    labeled: `[N]` bool, False where the view's clip carries no label for this signal;
    spec: the TargetSpec saying how the labels become target values.
    """
    labels: torch.Tensor
    labeled: torch.Tensor
    spec: TargetSpec


def views_target(clip_ids):
    """Self-supervised target: 1 between views of the same clip.

    clip_ids: `[N]` integer id of the clip each view was cut from.
    Returns `[N, N]` float, diagonal included (the loss ignores it).
    """
    return (clip_ids[:, None] == clip_ids[None, :]).float()


def labels_target(labels, labeled, spec, anchors=None):
    """Supervised target of one label column: agreement between labeled views.

    labels: class indices `[N]` (multiclass), multi-hot `[N, C]` (multilabel) or values
        `[N, K]` (regression); rows of unlabeled views are ignored.
    labeled: `[N]` bool, whether the view's clip carries this label.
    spec: a TargetSpec.
    anchors: `[A]` indices of the rows wanted (None: all N, A = N).
    Returns `[A, N]` float in [0, 1], zero in every row or column of an unlabeled view.
    Each A x N intermediate is updated in place, so a call holds about one float matrix.
    """
    if anchors is None:
        anchors = torch.arange(len(labels), device=labels.device)
    if spec.task == "multiclass":
        labels = labels.long().clamp(min=0)  # unlabeled rows hold -1; masked below
        if spec.similarity is None:
            target = (labels[anchors][:, None] == labels[None, :]).float()
        else:
            similarity = spec.similarity.to(device=labels.device, dtype=torch.float32)
            target = similarity[labels[anchors]][:, labels]  # [A, N] by lookup, no [A, N, C]
    elif spec.task == "multilabel":
        tags = labels.float()
        target = tags[anchors] @ tags.T  # [A, N] number of shared tags
        if spec.threshold is None:
            counts = tags.sum(1)
            total = (counts[anchors][:, None] + counts[None, :]).clamp_(min=1)  # [A, N]
            target.mul_(2).div_(total)  # 2 shared / (tags_i + tags_j); 0 when both have no tag
            del total
        else:
            target = target.ge_(spec.threshold)  # in place: 1.0 where enough tags are shared
    elif spec.task == "regression":
        values = labels.float().reshape(len(labels), -1)  # [N, K]
        if spec.std is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32, device=values.device) for v in (spec.mean, spec.std))
            values = (values - mean) / std  # [N, K] in standard deviations: the unit of sigma and radius
        target = torch.cdist(values[anchors], values)  # [A, N] distances
        if spec.kernel == "gaussian":
            target.square_().div_(-2 * spec.sigma ** 2).exp_()
        elif spec.kernel == "threshold":
            target = target.le_(spec.radius)
        else:
            raise ValueError(f"unknown target kernel {spec.kernel!r}; choose from {KERNELS}")
    else:
        raise ValueError(f"unknown task {spec.task!r}; choose from {TASKS}")
    mask = labeled.to(target.dtype)
    return target.mul_(mask[anchors][:, None]).mul_(mask[None, :])


def build_target(clip_ids, signals=()):
    """The SemiSupCon target: element-wise max of the views part and every label part.

    clip_ids: `[N]` clip id of each view.
    signals: sequence of Signals, one per label column (see labels_target). Several
        signals combine by element-wise max: a pair is as positive as the label on
        which it agrees most.
    Returns target `[N, N]` with a zero diagonal (self-pairs are never targets).
    """
    target = views_target(clip_ids)
    for labels, labeled, spec in signals:
        torch.maximum(target, labels_target(labels, labeled, spec), out=target)
    return target.fill_diagonal_(0)


def log_probabilities(z, temperature=0.1, anchors=None):
    """Each anchor's log-softmax over the other views: log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) ).

    z: `[N, D]` projections of all views (normalized here); anchors: `[A]` indices into z
    (None: all N). Returns `[A, N]`; the self-pair holds a large negative value whose
    weight in every target is 0. Log-softmax keeps this finite at tau = 0.01 with
    near-identical vectors.
    """
    # At least float32 (bf16 projections under autocast), float64 kept for exact tests.
    z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
    if anchors is None:
        anchors = torch.arange(len(z), device=z.device)
    rows = torch.arange(len(anchors), device=z.device)
    # In place: the product is not kept for backward, so scaling and masking it costs no copy.
    logits = (z[anchors] @ z.T).div_(temperature)  # [A, N]
    # The lowest finite value rather than -inf: exp() gives exactly 0 in the softmax, and
    # the excluded term's weight (0) times its log-probability stays 0 instead of NaN.
    lowest = torch.tensor(torch.finfo(logits.dtype).min, device=z.device, dtype=logits.dtype)
    logits.index_put_((rows, anchors), lowest)
    return F.log_softmax(logits, dim=1)  # [A, N]


def weighted_rows(log_prob, target):
    """Per-anchor loss -sum_j t_ij log p_ij / sum_j t_ij of target rows `[A, N]` (self-pairs 0).

    Returns (losses `[A]`, has_positive `[A]` bool); a row without positive has loss 0.
    """
    target = target.to(log_prob.dtype)
    weighted = (target[:, None, :] @ log_prob[:, :, None]).reshape(-1)  # [A] row-wise dot, no [A, N] product
    positives = target.sum(1)
    has_positive = positives > 0
    return torch.where(has_positive, -weighted / positives.clamp(min=1e-12), 0.0), has_positive


def row_losses(z, target, temperature=0.1, anchors=None, has_zero_self_pairs=False):
    """Per-anchor contrastive losses against every other view.

    With s_ij the cosine similarity and tau the temperature, for anchor i

        l_i = - sum_{j != i} t_ij * log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) )
              / sum_{j != i} t_ij

    The diagonal (a view against itself) is excluded from numerator, denominator and
    target (log_probabilities, weighted_rows).

    z: `[N, D]` projections of all views (normalized here).
    target: `[A, N]` target rows of the anchors, values in [0, 1].
    anchors: `[A]` indices into z of the anchor views, or None for all N (A = N).
    has_zero_self_pairs: the caller guarantees target[i, anchors[i]] == 0 (as
        build_target gives), so the self-pairs need no zeroing.
    Returns (losses `[A]`, has_positive `[A]` bool); losses are 0 where an anchor has
    no positive (zero off-diagonal target sum), and such rows must be left out.
    """
    log_prob = log_probabilities(z, temperature, anchors)  # [A, N]
    if not has_zero_self_pairs:
        # A copy with the self-pairs zeroed, rather than a check whether any is set: the
        # check would read a device value on the host (a sync).
        anchors = torch.arange(len(z), device=z.device) if anchors is None else anchors
        target = target.to(log_prob.dtype).index_put((torch.arange(len(anchors), device=z.device), anchors),
                                                     log_prob.new_zeros(()))
    return weighted_rows(log_prob, target)


class LossParts(NamedTuple):
    """Detached sums over the anchors of one pass (add them over processes, then divide).

    loss_sum, count: the objective's row losses and the rows with a positive;
    views_sum, views_count: the same with the views part of the target alone;
    labels_sum, labels_count: the same with the labels part alone (0 without signals).
    """
    loss_sum: torch.Tensor
    count: torch.Tensor
    views_sum: torch.Tensor
    views_count: torch.Tensor
    labels_sum: torch.Tensor
    labels_count: torch.Tensor


def part_means(sums):
    """Means of the objective and its views and labels parts from summed losses.LossParts `[6]`.

    Returns {"loss", "views", "labels"}; a part without any row with a positive is nan.
    """
    sums = sums.tolist()  # a host-device sync: on logging and validation steps only
    return {name: sums[2 * k] / sums[2 * k + 1] if sums[2 * k + 1] > 0 else float("nan")
            for k, name in enumerate(("loss", "views", "labels"))}


def semisupcon_loss(z, clip_ids, signals=(), temperature=0.1, anchors=None):
    """The SemiSupCon objective of the anchors and its views and labels parts, from one pass.

    The target is build_target's (views part max labels part); its rows are built for
    the anchors only, and the parts are read from the same log-probabilities, so a change
    to the loss (log_probabilities, weighted_rows) changes the logged parts alike.
    z: `[N, D]` projections of all views; clip_ids: `[N]`; signals: Signals of all N
    views; temperature: tau; anchors: `[A]` indices into z (None: all N).
    Returns (losses `[A]`, has_positive `[A]` bool, LossParts).
    """
    anchors = torch.arange(len(z), device=z.device) if anchors is None else anchors
    self_pairs = (torch.arange(len(anchors), device=z.device), anchors)
    log_prob = log_probabilities(z, temperature, anchors)  # [A, N]
    target = (clip_ids[anchors][:, None] == clip_ids[None, :]).float()  # [A, N]: the views part
    target.index_put_(self_pairs, target.new_zeros(()))
    detached = log_prob.detach()
    views = weighted_rows(detached, target)
    labels_part = None
    for labels, labeled, spec in signals:
        part = labels_target(labels, labeled, spec, anchors)  # [A, N]
        labels_part = part if labels_part is None else torch.maximum(labels_part, part, out=labels_part)
    if labels_part is None:
        labels = (detached.new_zeros(len(anchors)), torch.zeros(len(anchors), dtype=torch.bool, device=z.device))
    else:
        labels_part.index_put_(self_pairs, labels_part.new_zeros(()))
        labels = weighted_rows(detached, labels_part)
        torch.maximum(target, labels_part, out=target)  # [A, N]: build_target's rows
        del labels_part
    losses, has_positive = weighted_rows(log_prob, target)
    parts = LossParts(losses.detach().sum(), has_positive.sum(), views[0].sum(), views[1].sum(),
                      labels[0].sum(), labels[1].sum())
    return losses, has_positive, parts


def contrastive_loss(z, target, temperature=0.1, has_zero_self_pairs=False):
    """Mean of row_losses over the views that have at least one positive.

    z: `[N, D]` projections; target: `[N, N]` in [0, 1] (diagonal ignored).
    Returns a scalar; 0 (with a gradient path) when no row has a positive.
    """
    losses, has_positive = row_losses(z, target, temperature, has_zero_self_pairs=has_zero_self_pairs)
    return losses.sum() / has_positive.sum().clamp(min=1)
