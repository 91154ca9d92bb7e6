"""The target-matrix loss against slow loops and the supervised-contrastive form."""
import math

import pytest
import torch
import torch.nn.functional as F

import losses


def loop_loss(z, target, temperature):
    """Obviously correct reference: one anchor at a time, plain Python sums, float64."""
    z = F.normalize(z.double(), dim=1)
    n = len(z)
    total, rows = 0.0, 0
    for i in range(n):
        weights = [float(target[i, j]) if j != i else 0.0 for j in range(n)]
        if sum(weights) == 0:
            continue
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(n) if k != i)
        row = 0.0
        for j in range(n):
            if weights[j]:
                row -= weights[j] * math.log(math.exp(float(z[i] @ z[j]) / temperature) / denominator)
        total += row / sum(weights)
        rows += 1
    return total / rows


def loop_labels_target(labels, labeled, spec):
    """Reference target of one label column, pair by pair."""
    n = len(labels)
    target = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            if not (labeled[i] and labeled[j]):
                continue
            if spec.task == "multiclass":
                a, b = int(labels[i]), int(labels[j])
                target[i, j] = float(a == b) if spec.similarity is None else spec.similarity[a, b]
            elif spec.task == "multilabel":
                shared = sum(1 for c in range(labels.shape[1]) if labels[i, c] and labels[j, c])
                if spec.threshold is None:
                    count = labels[i].sum() + labels[j].sum()
                    target[i, j] = 2 * shared / count if count else 0.0
                else:
                    target[i, j] = float(shared >= spec.threshold)
            else:
                distance = float((labels[i] - labels[j]).norm())
                target[i, j] = math.exp(-distance ** 2 / (2 * spec.sigma ** 2)) if spec.kernel == "gaussian" \
                    else float(distance <= spec.radius)
    return target


def target_parts(clip_ids, columns):
    """The two sources of build_target apart (views part, labels part), each with a zero diagonal."""
    views_part = losses.views_target(clip_ids).fill_diagonal_(0)
    labels_part = torch.zeros_like(views_part)
    for labels, labeled, spec in columns:
        labels_part = torch.maximum(labels_part, losses.labels_target(labels, labeled, spec))
    return views_part, labels_part.fill_diagonal_(0)


def random_batch(seed, clips=6, views=2, classes=5, tags=7):
    generator = torch.Generator().manual_seed(seed)
    clip_ids = torch.arange(clips).repeat_interleave(views)
    labeled = (torch.rand(clips, generator=generator) < 0.6).repeat_interleave(views)
    classes_ = torch.randint(0, classes, (clips,), generator=generator).repeat_interleave(views)
    multi_hot = (torch.rand(clips, tags, generator=generator) < 0.35).float().repeat_interleave(views, 0)
    values = torch.randn(clips, 2, generator=generator).repeat_interleave(views, 0)
    z = torch.randn(clips * views, 8, generator=generator)
    return z, clip_ids, labeled, classes_, multi_hot, values


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["ssl", "multiclass", "threshold2", "weighted", "regression", "similarity"])
def test_loss_matches_loop_reference(seed, mode):
    z, clip_ids, labeled, classes, multi_hot, values = random_batch(seed)
    columns = []
    if mode == "multiclass":
        columns = [(classes, labeled, losses.TargetSpec("multiclass"))]
    elif mode == "threshold2":
        columns = [(multi_hot, labeled, losses.TargetSpec("multilabel", threshold=2))]
    elif mode == "weighted":
        columns = [(multi_hot, labeled, losses.TargetSpec("multilabel", threshold=None))]
    elif mode == "regression":
        columns = [(values, labeled, losses.TargetSpec("regression", kernel="gaussian", sigma=0.7))]
    elif mode == "similarity":
        similarity = torch.rand(5, 5, generator=torch.Generator().manual_seed(seed))
        similarity = (similarity + similarity.T) / 2
        similarity.fill_diagonal_(1.0)
        columns = [(classes, labeled, losses.TargetSpec("multiclass", similarity=similarity))]
    target = losses.build_target(clip_ids, columns)
    views_part, labels_part = target_parts(clip_ids, columns)
    expected_labels = torch.zeros_like(target)
    for labels, mask, spec in columns:
        expected_labels = torch.maximum(expected_labels, loop_labels_target(labels, mask, spec))
    expected_labels.fill_diagonal_(0)
    torch.testing.assert_close(labels_part, expected_labels)
    assert torch.equal(target, torch.maximum(views_part, labels_part))
    for temperature in (0.1, 0.5):
        expected = loop_loss(z, target, temperature)
        assert losses.contrastive_loss(z, target, temperature).item() == pytest.approx(expected, rel=1e-5)
        # The training objective and its logged parts come from one pass; each equals the loop
        # reference with its own target.
        row_loss, has_positive, parts = losses.semisupcon_loss(z, clip_ids, [losses.Signal(*c) for c in columns],
                                                               temperature)
        assert (parts.loss_sum / parts.count).item() == pytest.approx(expected, rel=1e-5)
        assert (parts.views_sum / parts.views_count).item() == pytest.approx(
            loop_loss(z, views_part, temperature), rel=1e-5)
        if labels_part.sum() > 0:
            assert (parts.labels_sum / parts.labels_count).item() == pytest.approx(
                loop_loss(z, labels_part, temperature), rel=1e-5)
        else:
            assert parts.labels_count.item() == 0
        # Bit for bit the loss of build_target's rows, as the step computed it before the parts joined.
        reference, reference_positive = losses.row_losses(z, target, temperature, has_zero_self_pairs=True)
        assert torch.equal(row_loss, reference) and torch.equal(has_positive, reference_positive)
        # Anchors in two shares (two processes) sum to the whole.
        halves = [losses.semisupcon_loss(z, clip_ids, [losses.Signal(*c) for c in columns], temperature,
                                         torch.arange(len(z))[share])[2] for share in (slice(0, 5), slice(5, None))]
        for k, whole in enumerate(parts):
            torch.testing.assert_close((halves[0][k] + halves[1][k]).double(), whole.double(), rtol=1e-5, atol=1e-6)


def test_hard_labels_equal_supcon_form():
    """With 0/1 targets the loss is the familiar SupCon 'L_out' (mean log-prob of positives)."""
    z, clip_ids, labeled, classes, _, _ = random_batch(11, clips=8)
    target = losses.build_target(clip_ids, [(classes, torch.ones_like(labeled), losses.TargetSpec())])
    zn = F.normalize(z, dim=1)
    logits = zn @ zn.T / 0.1
    eye = torch.eye(len(z), dtype=torch.bool)
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, -1e9), dim=1, keepdim=True)
    positives = target.bool() & ~eye
    supcon = -(log_prob * positives).sum(1) / positives.sum(1)
    assert losses.contrastive_loss(z, target, 0.1).item() == pytest.approx(supcon.mean().item(), rel=1e-5)


def test_low_temperature_stays_finite_with_identical_vectors():
    z = torch.ones(6, 4) + 1e-7 * torch.randn(6, 4)
    z.requires_grad_(True)
    target = losses.build_target(torch.tensor([0, 0, 1, 1, 2, 2]))
    loss = losses.contrastive_loss(z, target, temperature=0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert loss.item() == pytest.approx(math.log(5), rel=1e-3)  # all similarities equal: uniform over 5


def test_rows_without_positive_are_left_out():
    z = torch.randn(4, 3)
    target = torch.zeros(4, 4)
    target[0, 1] = target[1, 0] = 1.0
    full = losses.contrastive_loss(z, target)
    two_rows = losses.contrastive_loss(z[:2], target[:2, :2])
    losses_, has_positive = losses.row_losses(z, target)
    assert has_positive.tolist() == [True, True, False, False]
    assert losses_[2:].eq(0).all()
    # Rows 2 and 3 still serve as negatives, so the full loss differs from the 2-view one.
    assert full.item() != pytest.approx(two_rows.item())
    assert full.item() == pytest.approx(losses_[:2].mean().item())


def test_anchor_rows_equal_full_rows():
    z = torch.randn(10, 5)
    target = losses.build_target(torch.arange(5).repeat_interleave(2))
    anchors = torch.tensor([4, 5, 6])
    part, _ = losses.row_losses(z, target[anchors], 0.1, anchors)
    full, _ = losses.row_losses(z, target, 0.1)
    torch.testing.assert_close(part, full[anchors])


def test_hand_computed_targets():
    clip_ids = torch.tensor([0, 0, 1, 2])
    labeled = torch.tensor([True, True, True, False])
    classes = torch.tensor([3, 3, 3, 1])
    columns = [(classes, labeled, losses.TargetSpec())]
    target = losses.build_target(clip_ids, columns)
    views_part, labels_part = target_parts(clip_ids, columns)
    assert views_part.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    assert labels_part.tolist() == [[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    assert torch.equal(target, torch.maximum(views_part, labels_part))  # the target is the larger part
    tags = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 1], [1, 1, 1]]).float()
    weighted = losses.labels_target(tags, torch.ones(4, dtype=torch.bool), losses.TargetSpec("multilabel", None))
    assert weighted[0, 1].item() == pytest.approx(2 * 1 / 4)
    assert weighted[0, 2].item() == 0.0
    assert weighted[0, 3].item() == pytest.approx(2 * 2 / 5)
    two = losses.labels_target(tags, torch.ones(4, dtype=torch.bool), losses.TargetSpec("multilabel", 2))
    assert two[0].tolist() == [1, 0, 0, 1]
    values = torch.tensor([[0.0], [0.3], [1.0], [0.0]])
    radius = losses.labels_target(values, labeled, losses.TargetSpec("regression", kernel="threshold", radius=0.5))
    assert radius.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    gaussian = losses.labels_target(values, labeled, losses.TargetSpec("regression", sigma=1.0))
    assert gaussian[0, 2].item() == pytest.approx(math.exp(-0.5))


def test_combined_columns_take_the_max():
    clip_ids = torch.arange(3)
    labeled = torch.ones(3, dtype=torch.bool)
    genre = torch.tensor([0, 0, 1])
    similarity = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    key = torch.tensor([0, 1, 1])
    target = losses.build_target(clip_ids, [
        (genre, labeled, losses.TargetSpec()),
        (key, torch.tensor([True, True, False]), losses.TargetSpec(similarity=similarity))])
    assert target.tolist() == [[0, 1, 0], [1, 0, 0], [0, 0, 0]]
    target = losses.build_target(clip_ids, [(key, labeled, losses.TargetSpec(similarity=similarity))])
    assert target.tolist() == [[0, 0.5, 0.5], [0.5, 0, 1], [0.5, 1, 0]]


def test_a_loss_variant_changes_the_logged_parts_alike(monkeypatch):
    # A fork's loss variant (here: hard negatives weighted up in the log-probabilities) changes
    # the objective and both logged parts, because all three read the same pass.
    z, clip_ids, labeled, classes, _, _ = random_batch(3)
    signals = [losses.Signal(classes, labeled, losses.TargetSpec())]
    plain = losses.semisupcon_loss(z, clip_ids, signals, 0.1)[2]
    real = losses.log_probabilities

    def hard_negatives(z, temperature=0.1, anchors=None):
        # Sharper over the negatives; the self-pair's large negative value stays finite (clamped).
        return torch.log_softmax(real(z, temperature, anchors).clamp(min=-1e4) * 1.5, dim=1)

    monkeypatch.setattr(losses, "log_probabilities", hard_negatives)
    variant = losses.semisupcon_loss(z, clip_ids, signals, 0.1)[2]
    for name in ("loss_sum", "views_sum", "labels_sum"):
        assert math.isfinite(getattr(variant, name).item())
        assert getattr(variant, name).item() != pytest.approx(getattr(plain, name).item(), rel=1e-3), name


def test_a_target_known_to_have_zero_self_pairs_gives_the_same_loss_without_the_copy():
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(12, 8, generator=generator, dtype=torch.float64)
    target = losses.build_target(torch.arange(12) // 2)
    with_copy = losses.row_losses(z, target, 0.1)
    without = losses.row_losses(z, target, 0.1, has_zero_self_pairs=True)
    assert torch.equal(with_copy[0], without[0]) and torch.equal(with_copy[1], without[1])
    with_self_pairs = target.clone().fill_diagonal_(1.0)
    assert torch.equal(losses.row_losses(z, with_self_pairs, 0.1)[0], with_copy[0])  # self-pairs ignored
