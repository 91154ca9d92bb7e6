"""The scores of a task's predictions against its labels, as probe.py and the k-NN monitor report them.

    score(task, outputs, labels, column)   # {"accuracy", "macro_f1"} | {"roc_auc", "pr_auc"} | {"r2", ...}

Each metric is checked against a hand computation or a reference implementation's values
in tests/test_probe.py (ROC-AUC and PR-AUC with ties as scikit-learn ranks them, R² with
scikit-learn's force_finite, the MIREX key score as mir_eval's weighted_score).
"""
import numpy as np

import datasets


def accuracy(logits, labels):
    """Share of rows whose argmax equals the class index. logits `[M, C]`, labels `[M]`."""
    return float((logits.argmax(1) == labels).double().mean())


def macro_f1(logits, labels, num_classes):
    """Unweighted mean over classes present in labels or predictions of per-class F1."""
    predictions = logits.argmax(1)
    scores = []
    for c in range(num_classes):
        true_positive = ((predictions == c) & (labels == c)).sum().item()
        predicted, actual = (predictions == c).sum().item(), (labels == c).sum().item()
        if predicted + actual:
            scores.append(2 * true_positive / (predicted + actual))
    return float(np.mean(scores)) if scores else 0.0


def roc_auc(scores, targets):
    """Area under the ROC curve of one class (ties share ranks); nan if one class is absent.

    scores, targets: `[M]`; targets in {0, 1}. Computed as the Mann-Whitney statistic.
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    positives, negatives = targets.sum(), (~targets).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1  # average rank of a tie group
        start = end + 1
    return float((ranks[targets].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_precision(scores, targets):
    """Average precision (PR-AUC) of one class: mean precision at each positive's rank.

    Tied scores are ranked together (precision taken at the end of the tie group), which
    equals the step-wise sum over thresholds of (recall gain) x precision.
    Returns nan when there is no positive.
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets) > 0.5
    if targets.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_targets = scores[order], targets[order]
    hits = np.cumsum(sorted_targets)
    # Precision at the last index of each tie group, shared by the group.
    last = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), len(scores) - 1]
    group_end = np.repeat(last, np.diff(np.r_[-1, last]))
    precision = hits[group_end] / (group_end + 1)
    return float(precision[sorted_targets].mean())


def r2_score(predictions, targets):
    """Coefficient of determination per output `[K]` (1 - SSE / SST), on `[M, K]` arrays.

    A constant target (SST = 0) scores 1 when predicted exactly and 0 otherwise, as
    scikit-learn's r2_score (force_finite), instead of a huge negative number.
    """
    predictions, targets = np.asarray(predictions, np.float64), np.asarray(targets, np.float64)
    residual = ((targets - predictions) ** 2).sum(0)
    total = ((targets - targets.mean(0)) ** 2).sum(0)
    constant = total == 0
    score = 1 - residual / np.where(constant, 1.0, total)
    return np.where(constant, np.where(residual == 0, 1.0, 0.0), score)


def mirex_key_score(predicted, labels):
    """MIREX weighted key score averaged over tracks; classes indexed as datasets.KEY_NAMES.

    predicted, labels: `[M]` key indices (0-11 major C … B, 12-23 minor). Per track: 1 the
    same key; 0.5 the estimate a perfect fifth above the reference in the same mode; 0.3
    the relative key (estimate = relative minor of a major reference, or relative major
    of a minor one); 0.2 the parallel key (same tonic, other mode); 0 anything else. As
    mir_eval.key.weighted_score by default, a fifth below scores 0 (unlike the symmetric
    datasets.key_similarity used for training targets).
    """
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    tonic, mode = predicted % 12, predicted // 12
    reference_tonic, reference_mode = labels % 12, labels // 12
    interval = (tonic - reference_tonic) % 12  # semitones from the reference tonic up to the estimate's
    same_mode = mode == reference_mode
    relative = ~same_mode & (((reference_mode == 0) & (interval == 9)) | ((reference_mode == 1) & (interval == 3)))
    score = np.select([same_mode & (interval == 0), same_mode & (interval == 7), relative,
                       ~same_mode & (interval == 0)],
                      [datasets.KEY_WEIGHTS["same"], datasets.KEY_WEIGHTS["fifth"], datasets.KEY_WEIGHTS["relative"],
                       datasets.KEY_WEIGHTS["parallel"]], 0.0)
    return float(score.mean())


def confusion_matrix(predicted, labels, num_classes):
    """Counts `[C, C]` int64: row = true class, column = predicted class."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predicted)), 1)
    return counts


def score(task, outputs, labels, column=None):
    """The task's metrics on track-level outputs `[M, C]` against labels.

    multiclass: accuracy, macro_f1 (and mirex for key labels); multilabel: roc_auc,
    pr_auc (macro over classes with both outcomes); regression: r2 (mean over outputs)
    and r2 per output.
    """
    if task == "multiclass":
        result = {"accuracy": accuracy(outputs, labels),
                  "macro_f1": macro_f1(outputs, labels, outputs.shape[1])}
        if column is not None and column.kind == "key":
            result["mirex"] = mirex_key_score(outputs.argmax(1).numpy(), labels.numpy())
        return result
    if task == "multilabel":
        # Rank the logits themselves: float32 sigmoids of logits above ~17 all round to 1.0
        # and would tie (the ranking, hence ROC-AUC and PR-AUC, is the same otherwise).
        scores, tags = outputs.double().numpy(), labels.numpy()
        aucs = [roc_auc(scores[:, c], tags[:, c]) for c in range(tags.shape[1])]
        aps = [average_precision(scores[:, c], tags[:, c]) for c in range(tags.shape[1])]
        return {"roc_auc": float(np.nanmean(aucs)), "pr_auc": float(np.nanmean(aps))}
    per_output = r2_score(outputs.numpy(), labels.numpy())
    return {"r2": float(per_output.mean()), "r2_per_output": per_output.tolist()}
