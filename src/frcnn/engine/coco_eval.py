"""COCO box AP: pycocotools' ``COCOeval`` itself, run on a :class:`~frcnn.data.coco.COCODataset`'s ground truth.

Detections (0-based inclusive boxes, +1 convention) become COCO results ``{"image_id", "category_id",
"bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1], "score"}`` (py-faster-rcnn's conversion) and are scored by
``COCOeval(gt, dt, "bbox")`` with its default parameters (IoU 0.50:0.95, area ranges, maxDets 1/10/100), over
every image of the data set and the categories of its ``classes``. The numbers are pycocotools' own:
``stats`` in the order of ``COCOeval.summarize`` and per-class AP as Detectron computes it from
``eval["precision"]`` (mean over IoU thresholds and recall points of the entries that are not -1).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from frcnn.data.coco import boxes_to_coco
from frcnn.errors import DataError
from frcnn.model.detector import Detections

__all__ = ["STAT_NAMES", "coco_evaluate", "coco_results", "run_cocoeval"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_results(dataset, detections: Sequence[Detections]) -> list[dict[str, Any]]:
    """COCO results entries for ``detections[i]`` of image ``dataset[i]`` (labels mapped to category ids)."""
    if len(detections) != len(dataset):
        raise ValueError(f"{len(detections)} detection sets for {len(dataset)} images")
    out = []
    for i, d in enumerate(detections):
        image_id = dataset.coco_image_ids[i]
        for box, score, label in zip(boxes_to_coco(d.boxes), d.scores.tolist(), d.labels.tolist()):
            out.append({"image_id": image_id, "category_id": dataset.label_to_category[int(label)],
                        "bbox": box, "score": float(score)})
    return out


def run_cocoeval(coco_gt, results: list[dict[str, Any]], image_ids: Sequence[int] | None = None,
                 category_ids: Sequence[int] | None = None):
    """``COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")`` evaluated, accumulated and summarized (its
    printing swallowed); ``image_ids``/``category_ids`` restrict ``params`` as given. Returns the COCOeval."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            known = set(coco_gt.getImgIds())
            unknown = sorted({r["image_id"] for r in results} - known, key=str)
            if unknown:
                raise DataError(f"detections name images that are not in the data: {unknown[:5]}")
            coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys to what it gets
        else:  # loadRes cannot take an empty list
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(coco_gt.dataset["images"]),
                               "categories": list(coco_gt.dataset["categories"]), "annotations": []}
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = list(image_ids)
        if category_ids is not None:
            ev.params.catIds = list(category_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _class_ap(precision: np.ndarray) -> float | None:
    valid = precision[precision > -1]
    return float(np.mean(valid)) if valid.size else None


def coco_evaluate(dataset, detections: Sequence[Detections]) -> dict[str, Any]:
    """pycocotools' box metrics of ``detections`` (one :class:`Detections` per image of ``dataset``, in
    original image pixels) on a COCO data set.

    Returns ``{"map", "metric": "coco", "per_class", "per_class_ap50", "stats"}``: ``map`` is AP@[.50:.95]
    (``stats["AP"]``), ``stats`` the twelve numbers of ``COCOeval.summarize`` by :data:`STAT_NAMES`
    (-1 where pycocotools has nothing to average), ``per_class[name]`` a class's AP@[.50:.95] and
    ``per_class_ap50[name]`` its AP@.50 (``None`` for a class without ground truth).
    """
    if not hasattr(dataset, "coco"):
        raise DataError("the coco metric needs COCO data (an annotation JSON); use voc07 or voc2010 here")
    ev = run_cocoeval(dataset.coco, coco_results(dataset, detections), dataset.coco_image_ids,
                      dataset.category_ids)
    precision = ev.eval["precision"]  # [T, R, K, A, M]; K in the order of params.catIds (sorted by evaluate)
    t50 = int(np.argmin(np.abs(ev.params.iouThrs - 0.5)))
    column = {int(cid): k for k, cid in enumerate(ev.params.catIds)}
    per_class, per_class_50 = {}, {}
    for name, cid in zip(dataset.classes, dataset.category_ids):
        k = column[cid]
        per_class[name] = _class_ap(precision[:, :, k, 0, -1])
        per_class_50[name] = _class_ap(precision[t50, :, k, 0, -1])
    stats = {name: float(v) for name, v in zip(STAT_NAMES, ev.stats)}
    return {"map": max(stats["AP"], 0.0), "metric": "coco", "per_class": per_class,
            "per_class_ap50": per_class_50, "stats": stats}
