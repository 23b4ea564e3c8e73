"""RPN loss and classification loss: cross entropy plus smooth L1 with sigma.

``smooth_l1(x, sigma) = 0.5 * (sigma * x)^2`` if ``|x| < 1 / sigma^2`` else ``|x| - 0.5 / sigma^2``
(sigma: TRAIN.RPN_SIGMA, 3 as in the reference, and TRAIN.RCNN_SIGMA, 1; beta = 1 / sigma^2 in torch's terms).

Every loss is a mean over images of each image's own mean (over its sampled anchors or RoIs). With one
image per batch, as in the reference, that is the plain mean; with several it makes the loss of a batch
the mean of its images' losses, so that processes which each train on a part of a batch and average their
gradients (DistributedDataParallel) compute exactly the gradient of the whole batch.
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
    Each image's sampled anchors weigh ``1 / its number of sampled anchors`` (the reference's
    ``bbox_outside_weights``), and images are averaged. Classification: cross entropy of the sampled
    anchors; box: smooth L1 of the fg anchors' deltas.
    """
    logits, deltas, targets = upcast(logits), upcast(deltas), upcast(targets)  # float32 under autocast
    valid = labels >= 0
    weights = valid.float() / valid.sum(dim=1, keepdim=True).clamp(min=1) / labels.shape[0]
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten().clamp(min=0), reduction="none")
    loss_cls = (ce * weights.flatten()).sum()
    per_anchor = smooth_l1(deltas - targets, sigma).sum(-1) * (labels == 1).float() * weights
    return loss_cls, per_anchor.sum()


def fast_rcnn_loss(
    cls_logits: Tensor, bbox_pred: Tensor, labels: Tensor, targets: Tensor, sigma: float = 1.0,
    image_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Classification loss: cross entropy of the sampled RoIs, smooth L1 on the true class's 4 coefficients.

    ``bbox_pred`` (R, 4 * (K + 1)), ``targets`` (R, 4) normalised targets for each RoI's own class,
    ``labels`` (R,) with 0 = background, ``image_index`` (R,) the image of each RoI (default: one image).
    Background RoIs contribute no box loss (the reference's inside-weights mask). Each image's RoIs are
    averaged, then the images.
    """
    cls_logits, bbox_pred, targets = upcast(cls_logits), upcast(bbox_pred), upcast(targets)  # float32 (autocast)
    r = labels.shape[0]
    if image_index is None:
        image_index = labels.new_zeros(r)
    counts = torch.bincount(image_index)
    weights = 1.0 / (counts[image_index] * int((counts > 0).sum())).to(cls_logits.dtype)
    loss_cls = (F.cross_entropy(cls_logits, labels, reduction="none") * weights).sum()
    pred = bbox_pred.view(r, -1, 4)[torch.arange(r, device=labels.device), labels]
    per_roi = smooth_l1(pred - targets, sigma).sum(-1) * (labels > 0).float() * weights
    return loss_cls, per_roi.sum()
