"""PASCAL VOC average precision, computed exactly as the reference ``voc_eval.py`` does.

The reference is ``lib/datasets/voc_eval.py`` of py-faster-rcnn (also in ruotianluo/pytorch-faster-rcnn).
This is the same arithmetic (float64 numpy) without its annotation pickle cache or detection text files.

Boxes are ``(x1, y1, x2, y2)`` **0-based inclusive** pixels of the original image (the +1 convention:
width = x2 - x1 + 1), for detections and ground truth alike. IoU is translation-invariant, so 1-based
boxes give the same answers as long as both sides use the same base.

Differences from the reference, all deliberate:

* Detections are sorted by score with a **stable** sort (the reference's ``np.argsort(-confidence)`` is a
  quicksort, so the order of tied scores is unspecified there; here ties keep input order).
* Scores and boxes are used at full precision; the reference first writes them to text files with
  ``{:.3f}`` scores and ``{:.1f}`` coordinates, which can create ties and shift IoUs by rounding.
* A class with no non-difficult ground truth (``npos == 0``) has ``ap = nan`` here (the reference divides
  by zero); :func:`evaluate_voc` reports it as ``None`` and leaves it out of the mean.
* A detection in an image absent from ``gts`` counts as a false positive (that image has no ground truth
  of the class); the reference would raise ``KeyError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["eval_class", "evaluate_voc", "voc_ap"]

# (image_ids, scores (N,), boxes (N, 4)); scores/boxes may be numpy arrays, torch tensors or lists.
ClassDetections = tuple[Sequence[str], Any, Any]
# image_id -> (boxes (M, 4), difficult (M,) bool)
ClassGroundTruth = Mapping[str, tuple[Any, Any]]


def _np(x: Any, dtype: type, shape_tail: tuple[int, ...] = ()) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=dtype)
    if arr.size == 0:
        return arr.reshape((0, *shape_tail))
    return arr


def voc_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool = False) -> float:
    """AP from recall and precision arrays (cumulative, in score order), as the reference ``voc_ap``.

    ``use_07_metric``: the VOC2007 11-point metric (mean of the max precision at recall >= t for
    ``t = 0, 0.1, ..., 1``, with the reference's ``np.arange(0., 1.1, 0.1)`` float thresholds).
    Otherwise the VOC2010+ area under the precision envelope at each recall change.
    """
    rec = np.asarray(rec, dtype=np.float64)
    prec = np.asarray(prec, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = 0.0 if np.sum(rec >= t) == 0 else np.max(prec[rec >= t])
            ap = ap + p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(mpre.size - 1, 0, -1):  # precision envelope: make it monotonically decreasing
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]  # points where recall changes
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _overlaps(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU (+1 convention) of one box with each row of ``gts``, in the reference's float64 arithmetic."""
    ixmin = np.maximum(gts[:, 0], box[0])
    iymin = np.maximum(gts[:, 1], box[1])
    ixmax = np.minimum(gts[:, 2], box[2])
    iymax = np.minimum(gts[:, 3], box[3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inters = iw * ih
    uni = (
        (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
        + (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0)
        - inters
    )
    return inters / uni


def eval_class(
    detections: ClassDetections,
    gts: ClassGroundTruth,
    iou_thresh: float = 0.5,
    use_07_metric: bool = True,
) -> dict[str, Any]:
    """AP of one class.

    ``detections = (image_ids, scores, boxes)``: one entry per detection of this class, over all images;
    ``image_ids`` a sequence of N strings, ``scores`` (N,), ``boxes`` (N, 4) 0-based.
    ``gts``: ``image_id -> (boxes (M, 4) 0-based, difficult (M,) bool)``, the ground truth of this class
    (images without any may be absent or have M = 0).

    Detections are taken by descending score; each is a true positive if its best-overlapping gt box
    (IoU strictly ``> iou_thresh``) is non-difficult and not yet matched, a false positive if that gt was
    already matched or if no gt overlaps enough, and neither if that gt is difficult.

    Returns ``{"ap", "rec", "prec", "npos", "tp", "fp"}``: ``rec``/``prec`` per detection in score order
    (cumulative, as the reference), ``tp``/``fp`` the per-detection 0/1 flags in the same order (their
    cumulative sums give ``rec * npos`` and the precision denominators), ``npos`` the number of
    non-difficult gt boxes. ``ap`` is ``nan`` when ``npos == 0``.
    """
    image_ids, scores, boxes = detections
    image_ids = list(image_ids)
    confidence = _np(scores, np.float64).reshape(-1)
    bb_all = _np(boxes, np.float64, (4,))
    nd = len(image_ids)
    if confidence.shape != (nd,) or bb_all.shape != (nd, 4):
        raise ValueError(
            f"detections disagree in length: {nd} image ids, scores {confidence.shape}, boxes {bb_all.shape}"
        )

    class_recs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    npos = 0
    for image_id, (gt_boxes, gt_difficult) in gts.items():
        bbgt = _np(gt_boxes, np.float64, (4,))
        difficult = _np(gt_difficult, bool).reshape(-1)
        if bbgt.shape != (difficult.shape[0], 4):
            raise ValueError(f"{image_id}: gt boxes {bbgt.shape} and difficult {difficult.shape} disagree")
        npos += int((~difficult).sum())
        class_recs[image_id] = (bbgt, difficult, np.zeros(len(difficult), dtype=bool))

    no_gt = (np.zeros((0, 4)), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool))
    order = np.argsort(-confidence, kind="stable")
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d, k in enumerate(order):
        bbgt, difficult, matched = class_recs.get(image_ids[k], no_gt)
        ovmax, jmax = -np.inf, -1
        if bbgt.size > 0:
            overlaps = _overlaps(bb_all[k], bbgt)
            jmax = int(np.argmax(overlaps))
            ovmax = overlaps[jmax]
        if ovmax > iou_thresh:
            if not difficult[jmax]:
                if not matched[jmax]:
                    tp[d] = 1.0
                    matched[jmax] = True
                else:
                    fp[d] = 1.0  # duplicate detection of an already matched object
        else:
            fp[d] = 1.0

    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    rec = ctp / float(npos) if npos > 0 else np.full(nd, np.nan)
    prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    ap = voc_ap(rec, prec, use_07_metric) if npos > 0 else math.nan
    return {"ap": ap, "rec": rec, "prec": prec, "npos": npos, "tp": tp, "fp": fp}


def evaluate_voc(
    detections_per_class: Mapping[str, ClassDetections],
    gts_per_class: Mapping[str, ClassGroundTruth],
    class_names: Sequence[str],
    use_07_metric: bool = True,
    iou_thresh: float = 0.5,
) -> dict[str, Any]:
    """Per-class AP and their mean, for every name in ``class_names``.

    ``detections_per_class[name]`` is that class's ``(image_ids, scores, boxes)`` (see :func:`eval_class`;
    a missing name means no detections); ``gts_per_class[name]`` its ``image_id -> (boxes, difficult)``
    (missing name: no ground truth).

    Returns ``{"map", "metric", "per_class", "npos"}``: ``metric`` is ``"voc07"`` (11-point) or ``"voc2010"``
    (area); ``per_class[name]`` is the AP, or ``None`` for a class without non-difficult ground truth,
    which is left out of ``map`` (``map`` is 0.0 if no class has ground truth); ``npos[name]`` counts the
    non-difficult gt boxes.
    """
    empty: ClassDetections = ([], np.zeros(0), np.zeros((0, 4)))
    per_class: dict[str, float | None] = {}
    npos: dict[str, int] = {}
    for name in class_names:
        res = eval_class(
            detections_per_class.get(name, empty), gts_per_class.get(name, {}), iou_thresh, use_07_metric
        )
        npos[name] = res["npos"]
        per_class[name] = None if res["npos"] == 0 else res["ap"]
    valid = [ap for ap in per_class.values() if ap is not None]
    return {
        "map": float(np.mean(valid)) if valid else 0.0,
        "metric": "voc07" if use_07_metric else "voc2010",
        "per_class": per_class,
        "npos": npos,
    }
