"""Gaussian soft-NMS (Bodla et al., "Soft-NMS: Improving Object Detection With One Line of Code", ICCV 2017).

Greedy NMS (``TEST.NMS_METHOD: hard``) deletes every box of a class that overlaps a better one of that class by
more than ``TEST.NMS``. When two objects of one class overlap (a red cell on a red cell, a small star inside a
large one), the second is lost at any score, and with it the recall a precision/recall curve needs to reach
its end (VOC07's last point, at recall 1, is 0 while one box is missing). Soft-NMS keeps such a box with a
lower score instead: each time the best remaining box of a class is taken, every other box of that class has
its score multiplied by ``exp(-IoU^2 / sigma)`` (IoU with the box taken). At ``sigma`` 0.5 a duplicate at IoU
0.9 keeps 0.20 of its score, a neighbour at IoU 0.5 keeps 0.61, at 0.3 0.84; boxes are then ranked again.

Input is the detector's dense layout: R boxes (one per RoI), each with a box and a score per class. Boxes use
the +1 pixel convention (:func:`frcnn.boxes.box_iou`'s IoU). Only boxes of the same class affect each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from frcnn.boxes import box_iou

__all__ = ["soft_nms"]


#: up to this many (class, box, box) pairs the decay factors are computed once, in one go; above, one row at a time
#: for the box just kept (at most MAX_PER_IMAGE rows). Each way is a dozen tensor ops: in one go on K x R x R
#: elements, or per kept box on R. 100 RoIs x 4 classes, 100 kept, 1 thread: 3.1 ms in one go against 15.0 a row at
#: a time; 300 RoIs x 20 classes: 59.9 ms against 16.3 (benchmarks/bench_soft_nms.py, results/soft_nms.md).
PRECOMPUTE_LIMIT = 1 << 17


def _decay(boxes: Tensor, others: Tensor, sigma: float) -> Tensor:
    """``exp(-IoU^2 / sigma)`` of each of ``boxes`` (..., N, 4) against each of ``others`` (..., M, 4)."""
    iou = box_iou(boxes, others)
    return torch.exp(iou * iou / -sigma)


def soft_nms(boxes: Tensor, scores: Tensor, sigma: float, score_thresh: float, max_keep: int
             ) -> tuple[Tensor, Tensor, Tensor]:
    """Gaussian soft-NMS of ``boxes`` (R, K, 4) with ``scores`` (R, K): R RoIs, K classes.

    Boxes start in the running if they score above ``score_thresh`` and leave it when their decayed score no
    longer does. Returns ``(rows, classes, scores)``: the RoI index, the class index (0-based, into K) and the
    decayed score of each kept box, in the order taken (scores non-increasing; a tie goes to the lower class,
    then the lower RoI), at most ``max_keep``.
    """
    r, k = scores.shape
    corners = boxes.transpose(0, 1).float()  # (K, R, 4)
    table = _decay(corners, corners, sigma) if k * r * r <= PRECOMPUTE_LIMIT else None  # (K, R, R)
    gone = -1.0  # scores are probabilities: a kept box sits below every threshold (and stays there when decayed)
    live = scores.t().float().clone(memory_format=torch.contiguous_format)  # (K, R), a copy
    live[live <= score_thresh] = gone
    flat = live.view(-1)
    taken: list[int] = []
    kept_scores: list[Tensor] = []
    for _ in range(min(max_keep, r * k)):
        best, index = flat.max(0)
        if not best.item() > score_thresh:  # the best is at or under the threshold: so is every other
            break
        i = int(index)
        c, j = divmod(i, r)
        taken.append(i)
        kept_scores.append(best)
        row = live[c]
        row.mul_(table[c, j] if table is not None else _decay(corners[c, j:j + 1], corners[c], sigma)[0])
        row[j] = gone
    index = torch.tensor(taken, dtype=torch.long, device=scores.device)
    kept = torch.stack(kept_scores) if kept_scores else scores.new_zeros(0, dtype=torch.float32)
    return index % r, torch.div(index, r, rounding_mode="floor"), kept.to(scores.dtype)
