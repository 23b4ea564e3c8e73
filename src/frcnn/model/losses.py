"""RPN loss and classification loss: cross entropy plus smooth L1 with sigma.

``smooth_l1(x, sigma) = 0.5 * (sigma * x)^2`` if ``|x| < 1 / sigma^2`` else ``|x| - 0.5 / sigma^2``
(sigma = 3 for the RPN, 1 for the classification layer, as in the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from frcnn.boxes import upcast


def smooth_l1(x: Tensor, sigma: float) -> Tensor:
    s2 = sigma * sigma
    ax = x.abs()
    return torch.where(ax < 1.0 / s2, 0.5 * s2 * x * x, ax - 0.5 / s2)


def rpn_loss(
    logits: Tensor, deltas: Tensor, labels: Tensor, targets: Tensor, sigma: float = 3.0
) -> tuple[Tensor, Tensor]:
    """RPN loss over the anchors the anchor target layer sampled.

    ``logits`` (N, M, 2), ``deltas`` and ``targets`` (N, M, 4), ``labels`` (N, M) in {-1, 0, 1}.
    Classification: mean cross entropy over sampled anchors. Box: smooth L1 summed over fg anchors and
    divided by each image's number of sampled anchors (the reference's ``bbox_outside_weights``), averaged
    over images.
    """
    logits, deltas, targets = upcast(logits), upcast(deltas), upcast(targets)  # float32 under autocast
    valid = labels >= 0
    if valid.any():
        loss_cls = F.cross_entropy(logits[valid], labels[valid])
    else:
        loss_cls = logits.sum() * 0.0
    weights = valid.float() / valid.sum(dim=1, keepdim=True).clamp(min=1)
    per_anchor = smooth_l1(deltas - targets, sigma).sum(-1) * (labels == 1).float() * weights
    loss_box = per_anchor.sum() / labels.shape[0]
    return loss_cls, loss_box


def fast_rcnn_loss(
    cls_logits: Tensor, bbox_pred: Tensor, labels: Tensor, targets: Tensor, sigma: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Classification loss: cross entropy over all sampled RoIs, smooth L1 on the true class's 4 coefficients.

    ``bbox_pred`` (R, 4 * (K + 1)), ``targets`` (R, 4) normalised targets for each RoI's own class,
    ``labels`` (R,) with 0 = background. Background RoIs contribute no box loss; the sum is divided by R
    (the reference's inside-weights mask and mean over RoIs).
    """
    cls_logits, bbox_pred, targets = upcast(cls_logits), upcast(bbox_pred), upcast(targets)  # float32 (autocast)
    loss_cls = F.cross_entropy(cls_logits, labels)
    r = labels.shape[0]
    pred = bbox_pred.view(r, -1, 4)[torch.arange(r, device=labels.device), labels]
    per_roi = smooth_l1(pred - targets, sigma).sum(-1) * (labels > 0).float()
    return loss_cls, per_roi.sum() / max(r, 1)
