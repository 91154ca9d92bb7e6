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

import torch
import torch.nn.functional as F

TASKS = ("multiclass", "multilabel", "regression")
KERNELS = ("gaussian", "threshold")


@dataclass
class TargetSpec:
    """How one label column turns into target values between labeled views.

    task: "multiclass" (labels are class indices `[N]`), "multilabel" (multi-hot `[N, C]`)
        or "regression" (standardized values `[N, K]`).
    threshold: multilabel only; views sharing at least this many tags are positives.
        None means the soft "weighted" target 2|y_i & y_j| / (|y_i| + |y_j|).
    kernel, sigma, radius: regression only; "gaussian" gives exp(-d^2 / 2 sigma^2) and
        "threshold" gives 1 where d <= radius, d the Euclidean distance of the targets.
    similarity: multiclass only, optional `[C, C]` class similarity in [0, 1] (domain
        knowledge such as key relations); without it, same class -> 1, else 0.
    """
    task: str = "multiclass"
    threshold: int | None = 1
    kernel: str = "gaussian"
    sigma: float = 0.5
    radius: float = 0.5
    similarity: torch.Tensor | None = None


def views_target(clip_ids):
    """Self-supervised target: 1 between views of the same clip.

    clip_ids: `[N]` integer id of the clip each view was cut from.
    Returns `[N, N]` float, diagonal included (the loss ignores it).
    """
    return (clip_ids[:, None] == clip_ids[None, :]).float()


def labels_target(labels, labeled, spec):
    """Supervised target of one label column: agreement between labeled views.

    labels: class indices `[N]` (multiclass), multi-hot `[N, C]` (multilabel) or values
        `[N, K]` (regression); rows of unlabeled views are ignored.
    labeled: `[N]` bool, whether the view's clip carries this label.
    spec: a TargetSpec.
    Returns `[N, N]` float in [0, 1], zero in every row or column of an unlabeled view.
    """
    if spec.task == "multiclass":
        labels = labels.long().clamp(min=0)  # unlabeled rows hold -1; masked below
        if spec.similarity is None:
            target = (labels[:, None] == labels[None, :]).float()
        else:
            similarity = spec.similarity.to(device=labels.device, dtype=torch.float32)
            target = similarity[labels][:, labels]  # [N, N] by lookup, no [N, N, C]
    elif spec.task == "multilabel":
        tags = labels.float()
        shared = tags @ tags.T  # [N, N] number of shared tags
        if spec.threshold is None:
            counts = tags.sum(1)
            total = counts[:, None] + counts[None, :]
            target = torch.where(total > 0, 2 * shared / total.clamp(min=1), 0.0)
        else:
            target = (shared >= spec.threshold).float()
    elif spec.task == "regression":
        values = labels.float().reshape(len(labels), -1)  # [N, K]
        distance = torch.cdist(values, values)  # [N, N]
        if spec.kernel == "gaussian":
            target = torch.exp(-distance.square() / (2 * spec.sigma ** 2))
        elif spec.kernel == "threshold":
            target = (distance <= spec.radius).float()
        else:
            raise ValueError(f"unknown target kernel {spec.kernel!r}; choose from {KERNELS}")
    else:
        raise ValueError(f"unknown task {spec.task!r}; choose from {TASKS}")
    pair_labeled = labeled[:, None] & labeled[None, :]
    return target * pair_labeled


def build_target(clip_ids, columns=()):
    """The SemiSupCon target: element-wise max of the views part and every label part.

    clip_ids: `[N]` clip id of each view.
    columns: sequence of (labels, labeled, spec) triples, one per label column (see
        labels_target). Several columns combine by element-wise max: a pair is as
        positive as the label on which it agrees most.
    Returns (target, views_part, labels_part), each `[N, N]` with a zero diagonal;
    labels_part is all zeros when no column is given.
    """
    views_part = views_target(clip_ids)
    labels_part = torch.zeros_like(views_part)
    for labels, labeled, spec in columns:
        labels_part = torch.maximum(labels_part, labels_target(labels, labeled, spec))
    no_self = ~torch.eye(len(clip_ids), dtype=torch.bool, device=clip_ids.device)
    views_part = views_part * no_self
    labels_part = labels_part * no_self
    return torch.maximum(views_part, labels_part), views_part, labels_part


def row_losses(z, target, temperature=0.1, anchors=None):
    """Per-anchor contrastive losses against every other view.

    With s_ij the cosine similarity and tau the temperature, for anchor i

        l_i = - sum_{j != i} t_ij * log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) )
              / sum_{j != i} t_ij

    The diagonal (a view against itself) is excluded from numerator, denominator and
    target. Log-softmax keeps this finite at tau = 0.01 with near-identical vectors.

    z: `[N, D]` projections of all views (normalized here).
    target: `[A, N]` target rows of the anchors, values in [0, 1].
    anchors: `[A]` indices into z of the anchor views, or None for all N (A = N).
    Returns (losses `[A]`, has_positive `[A]` bool); losses are 0 where an anchor has
    no positive (zero off-diagonal target sum), and such rows must be left out.
    """
    # At least float32 (bf16 projections under autocast), float64 kept for exact tests.
    z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
    if anchors is None:
        anchors = torch.arange(len(z), device=z.device)
    logits = z[anchors] @ z.T / temperature  # [A, N]
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(len(anchors), device=z.device), anchors] = True
    log_prob = F.log_softmax(logits.masked_fill(is_self, float("-inf")), dim=1)
    target = target.to(logits.dtype).masked_fill(is_self, 0.0)
    # 0 * -inf is NaN: zero the excluded self terms before weighting.
    weighted = (target * log_prob.masked_fill(is_self, 0.0)).sum(1)
    positives = target.sum(1)
    has_positive = positives > 0
    losses = torch.where(has_positive, -weighted / positives.clamp(min=1e-12), 0.0)
    return losses, has_positive


def contrastive_loss(z, target, temperature=0.1):
    """Mean of row_losses over the views that have at least one positive.

    z: `[N, D]` projections; target: `[N, N]` in [0, 1] (diagonal ignored).
    Returns a scalar; 0 (with a gradient path) when no row has a positive.
    """
    losses, has_positive = row_losses(z, target, temperature)
    return losses.sum() / has_positive.sum().clamp(min=1)
