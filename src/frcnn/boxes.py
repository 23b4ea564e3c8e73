"""Box math: the only place in frcnn that knows how boxes are measured.

Boxes are ``(x1, y1, x2, y2)`` float tensors with the reference's *+1 pixel convention*: a box covers
pixels ``x1..x2`` inclusive, so its width is ``x2 - x1 + 1``. Every function here is pure, batched over
leading dimensions where that makes sense, and works on whatever device its inputs live on.

Which coordinate space a box is in (original image pixels, network-input pixels after the resize,
or feature-map cells) is the caller's business; the helpers at the bottom convert between them.

Precision: box coding, IoU and clipping compute in (at least) float32, also under ``torch.autocast``: a
half-precision input (bfloat16/float16 deltas from an autocast conv) is upcast first (:func:`upcast`), and
none of their ops is one autocast lowers, so their outputs are float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# exp() of a predicted log-size change is clamped here so that a wild prediction early in training
# gives a huge box instead of inf/NaN (the same guard torchvision uses).
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32 if it is half precision (bfloat16 or float16, as conv outputs under autocast), else ``t``.

    bfloat16 keeps 8 significant bits: a coordinate near 300 would be off by up to a pixel and ``exp`` of a
    log-size change by 0.4%, so the float32 layers (box math, losses, post-processing) call this on entry.
    """
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def box_area(boxes: Tensor) -> Tensor:
    """Area in pixels under the +1 convention, shape ``boxes.shape[:-1]``."""
    return (boxes[..., 2] - boxes[..., 0] + 1) * (boxes[..., 3] - boxes[..., 1] + 1)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every box in ``a`` (..., N, 4) with every box in ``b`` (..., M, 4): an (..., N, M) matrix (leading
    dimensions broadcast, e.g. one matrix per class).

    Under the +1 convention a box ``[0, 0, 9, 9]`` is 10x10 pixels, so
    ``box_iou([0,0,9,9], [5,0,14,9]) == 1/3``. This is the reference's ``bbox_overlaps``.
    """
    a, b = upcast(a), upcast(b)
    area_a = box_area(a)
    area_b = box_area(b)
    lt = torch.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[..., 2] - boxes[..., 0] + 1.0
    h = boxes[..., 3] - boxes[..., 1] + 1.0
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def bbox_transform(ex_rois: Tensor, gt_rois: Tensor) -> Tensor:
    """Regression coefficients ``(dx, dy, dw, dh)`` that turn each ``ex_rois`` box into its ``gt_rois`` box.

    ``dx = (gx - px) / pw``, ``dy = (gy - py) / ph``, ``dw = log(gw / pw)``, ``dh = log(gh / ph)``
    with ``w = x2 - x1 + 1`` and centre ``x1 + 0.5 w`` (the reference's formulas, R-CNN appendix C).
    """
    ex_rois, gt_rois = upcast(ex_rois), upcast(gt_rois)
    ex_cx, ex_cy, ex_w, ex_h = _centre_size(ex_rois)
    gt_cx, gt_cy, gt_w, gt_h = _centre_size(gt_rois)
    return torch.stack(
        ((gt_cx - ex_cx) / ex_w, (gt_cy - ex_cy) / ex_h, torch.log(gt_w / ex_w), torch.log(gt_h / ex_h)),
        dim=-1,
    )


def bbox_transform_inv(boxes: Tensor, deltas: Tensor) -> Tensor:
    """Apply regression coefficients to boxes: the exact inverse of :func:`bbox_transform`.

    ``boxes`` is (..., 4) and ``deltas`` is (..., 4k) (class-specific coefficients allowed); the result
    has the shape of ``deltas``. Note: the reference's ``bbox_transform_inv`` returns
    ``x2 = cx + 0.5 w``, one pixel more than the box it encoded (it gives ``(0, 0, 16, 16)`` for
    ``(0, 0, 15, 15)`` with zero deltas). Here ``x2 = cx + 0.5 w - 1``, so decoding an encoding gives
    back the same box, to the pixel.
    """
    boxes, deltas = upcast(boxes), upcast(deltas)
    cx, cy, w, h = (t.unsqueeze(-1) for t in _centre_size(boxes))
    dx, dy = deltas[..., 0::4], deltas[..., 1::4]
    dw = deltas[..., 2::4].clamp(max=BBOX_XFORM_CLIP)
    dh = deltas[..., 3::4].clamp(max=BBOX_XFORM_CLIP)
    pcx, pcy = dx * w + cx, dy * h + cy
    pw, ph = torch.exp(dw) * w, torch.exp(dh) * h
    out = torch.stack((pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw - 1.0, pcy + 0.5 * ph - 1.0), dim=-1)
    return out.flatten(-2)


def clip_boxes(boxes: Tensor, height: float | Tensor, width: float | Tensor) -> Tensor:
    """Clip (..., 4k) boxes to an image of ``height`` x ``width`` pixels: ``0 <= x <= width - 1``."""
    boxes = upcast(boxes)
    x = boxes[..., 0::2].clamp(min=0)
    y = boxes[..., 1::2].clamp(min=0)
    x = torch.minimum(x, torch.as_tensor(width, dtype=boxes.dtype, device=boxes.device) - 1)
    y = torch.minimum(y, torch.as_tensor(height, dtype=boxes.dtype, device=boxes.device) - 1)
    return torch.stack((x, y), dim=-1).flatten(-2)


def to_exclusive(boxes: Tensor) -> Tensor:
    """``(x1, y1, x2 + 1, y2 + 1)``: the same box for libraries without the +1 convention.

    torchvision's ``nms`` and ``box_iou`` measure ``w = x2 - x1``; feeding them exclusive corners makes
    their IoU equal :func:`box_iou`, so NMS here suppresses exactly what the reference suppresses.
    """
    return torch.cat((boxes[..., :2], boxes[..., 2:] + 1), dim=-1)


def nms_threshold(thresh: float, dtype: torch.dtype) -> float:
    """``thresh`` rounded to ``dtype``, for torchvision's ``nms``.

    torchvision compares the IoU (computed in the boxes' dtype) with a double threshold, so a float32 IoU
    of exactly 0.7 (0.69999999) or 0.8 (0.80000001) lands on the wrong side of 0.7 or 0.8. The reference
    compares in float32 and keeps a box whose IoU equals the threshold; rounding the threshold to the
    boxes' dtype does the same.
    """
    return float(torch.tensor(thresh, dtype=dtype))


def scale_boxes(boxes: Tensor, factor: float | Tensor) -> Tensor:
    """Map boxes between original-image and network-input pixels (``factor`` = the resize scale).

    Pixel ``x`` covers ``[x, x + 1)``; scaling that interval keeps the +1 convention consistent:
    ``x1' = x1 * f`` and ``x2' = (x2 + 1) * f - 1``.
    """
    out = boxes.clone()
    out[..., 0::4] = boxes[..., 0::4] * factor
    out[..., 1::4] = boxes[..., 1::4] * factor
    out[..., 2::4] = (boxes[..., 2::4] + 1) * factor - 1
    out[..., 3::4] = (boxes[..., 3::4] + 1) * factor - 1
    return out


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Mirror boxes horizontally in an image ``width`` pixels wide (reference: ``x1' = W - x2 - 1``)."""
    out = boxes.clone()
    out[..., 0] = width - boxes[..., 2] - 1
    out[..., 2] = width - boxes[..., 0] - 1
    return out
