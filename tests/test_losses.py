"""Losses (frcnn.model.losses): smooth L1 with sigma, the RPN loss and the classification loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from frcnn.model.losses import fast_rcnn_loss, rpn_loss, smooth_l1


@pytest.mark.parametrize(
    ("x", "sigma", "expected"),
    [(0.05, 3.0, 0.01125), (0.5, 3.0, 0.444444), (2.0, 3.0, 1.944444), (0.5, 1.0, 0.125), (2.0, 1.0, 1.5),
     (-0.5, 1.0, 0.125), (-2.0, 3.0, 1.944444), (0.0, 3.0, 0.0)],
)
def test_smooth_l1_known_answers(x, sigma, expected):
    torch.testing.assert_close(smooth_l1(torch.tensor([x]), sigma), torch.tensor([expected]), rtol=0, atol=1e-5)


def test_smooth_l1_continuous_at_the_switch_point():
    for sigma in (1.0, 3.0):
        knot = 1.0 / sigma**2
        below = smooth_l1(torch.tensor([knot - 1e-6], dtype=torch.float64), sigma)
        above = smooth_l1(torch.tensor([knot + 1e-6], dtype=torch.float64), sigma)
        assert abs(float(below - above)) < 1e-5


def _rpn_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 6, 2, generator=g)
    deltas = torch.randn(1, 6, 4, generator=g)
    targets = torch.randn(1, 6, 4, generator=g)
    labels = torch.tensor([[1, 0, -1, 1, -1, 0]])
    return logits, deltas, labels, targets


def test_rpn_loss_known_value():
    logits, deltas, labels, targets = _rpn_inputs()
    loss_cls, loss_box = rpn_loss(logits, deltas, labels, targets, sigma=3.0)
    sampled = torch.tensor([0, 1, 3, 5])
    torch.testing.assert_close(loss_cls, F.cross_entropy(logits[0, sampled], labels[0, sampled]))
    fg = torch.tensor([0, 3])
    expected_box = smooth_l1(deltas[0, fg] - targets[0, fg], 3.0).sum() / 4  # / number of sampled anchors
    torch.testing.assert_close(loss_box, expected_box)


def test_rpn_loss_ignores_dont_care_anchors():
    logits, deltas, labels, targets = _rpn_inputs()
    base = rpn_loss(logits, deltas, labels, targets)
    ignored = labels[0] == -1
    logits2, deltas2, targets2 = logits.clone(), deltas.clone(), targets.clone()
    logits2[0, ignored] = torch.tensor([100.0, -100.0])
    deltas2[0, ignored] += 50
    targets2[0, ignored] -= 50
    for a, b in zip(base, rpn_loss(logits2, deltas2, labels, targets2)):
        torch.testing.assert_close(a, b)


def test_rpn_box_loss_only_over_foreground():
    logits, deltas, labels, targets = _rpn_inputs()
    base_box = rpn_loss(logits, deltas, labels, targets)[1]
    deltas2 = deltas.clone()
    deltas2[0, labels[0] == 0] += 10.0  # background anchors: their box predictions do not matter
    torch.testing.assert_close(rpn_loss(logits, deltas2, labels, targets)[1], base_box)
    deltas3 = deltas.clone()
    deltas3[0, 0] += 10.0  # a foreground anchor: it does
    assert rpn_loss(logits, deltas3, labels, targets)[1] > base_box


def test_rpn_box_loss_zero_when_deltas_equal_targets():
    logits, _, labels, targets = _rpn_inputs()
    assert rpn_loss(logits, targets.clone(), labels, targets)[1] == 0


def test_rpn_loss_normalises_per_image_over_a_batch():
    logits, deltas, labels, targets = _rpn_inputs()
    single = rpn_loss(logits, deltas, labels, targets)
    two = rpn_loss(logits.repeat(2, 1, 1), deltas.repeat(2, 1, 1), labels.repeat(2, 1), targets.repeat(2, 1, 1))
    for a, b in zip(single, two):
        torch.testing.assert_close(a, b)


def test_rpn_loss_without_sampled_anchors_is_zero_and_differentiable():
    logits, deltas, _, targets = _rpn_inputs()
    logits.requires_grad_(True)
    labels = torch.full((1, 6), -1)
    loss_cls, loss_box = rpn_loss(logits, deltas, labels, targets)
    assert loss_cls.item() == 0 and loss_box.item() == 0
    (loss_cls + loss_box).backward()
    assert logits.grad is not None


def _rcnn_inputs(num_classes: int = 3):
    g = torch.Generator().manual_seed(1)
    r = 5
    cls_logits = torch.randn(r, num_classes + 1, generator=g)
    bbox_pred = torch.randn(r, 4 * (num_classes + 1), generator=g)
    labels = torch.tensor([2, 0, 1, 3, 0])
    targets = torch.randn(r, 4, generator=g)
    targets[labels == 0] = 0
    return cls_logits, bbox_pred, labels, targets


def test_fast_rcnn_loss_known_value():
    cls_logits, bbox_pred, labels, targets = _rcnn_inputs()
    loss_cls, loss_box = fast_rcnn_loss(cls_logits, bbox_pred, labels, targets)
    torch.testing.assert_close(loss_cls, F.cross_entropy(cls_logits, labels))
    expected = sum(
        smooth_l1(bbox_pred[i, 4 * c : 4 * c + 4] - targets[i], 1.0).sum() for i, c in enumerate(labels.tolist()) if c
    ) / 5
    torch.testing.assert_close(loss_box, expected)


def test_fast_rcnn_box_loss_uses_only_the_true_class_columns():
    cls_logits, bbox_pred, labels, targets = _rcnn_inputs()
    base = fast_rcnn_loss(cls_logits, bbox_pred, labels, targets)[1]
    other = bbox_pred.clone()
    for i, c in enumerate(labels.tolist()):
        cols = torch.ones(other.shape[1], dtype=torch.bool)
        if c > 0:
            cols[4 * c : 4 * c + 4] = False
        other[i, cols] += 7.0  # every other class's coefficients, and all of a background RoI's
    torch.testing.assert_close(fast_rcnn_loss(cls_logits, other, labels, targets)[1], base)
    true_col = bbox_pred.clone()
    true_col[0, 8:12] += 7.0  # RoI 0 is class 2
    assert fast_rcnn_loss(cls_logits, true_col, labels, targets)[1] > base


def test_fast_rcnn_background_rois_contribute_no_box_loss():
    cls_logits, bbox_pred, _, targets = _rcnn_inputs()
    labels = torch.zeros(5, dtype=torch.long)
    assert fast_rcnn_loss(cls_logits, bbox_pred, labels, targets + 3.0)[1] == 0


def test_fast_rcnn_box_loss_gradient_only_on_true_class():
    cls_logits, bbox_pred, labels, targets = _rcnn_inputs()
    bbox_pred.requires_grad_(True)
    fast_rcnn_loss(cls_logits, bbox_pred, labels, targets)[1].backward()
    nonzero = bbox_pred.grad.view(5, -1, 4).abs().sum(-1) > 0
    expected = torch.zeros_like(nonzero)
    for i, c in enumerate(labels.tolist()):
        if c:
            expected[i, c] = True
    assert torch.equal(nonzero, expected)
