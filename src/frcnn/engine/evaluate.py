"""Run a predictor over a data set and score it with the reference VOC AP (see :mod:`frcnn.engine.voc_eval`).

Detections are kept down to ``TEST.SCORE_THRESH`` (0 in the reference), at most ``TEST.MAX_PER_IMAGE``
per image, as the reference ``test_net`` does before ``voc_eval``.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from frcnn.engine.batches import DetectionDataset
from frcnn.engine.inference import Predictor
from frcnn.engine.voc_eval import eval_class
from frcnn.model.detector import Detections

METRICS = {"voc07": True, "voc2010": False}  # name -> use_07_metric


def collect_detections(predictor: Predictor, dataset: DetectionDataset, progress: bool = True) -> list[Detections]:
    """Detections of every image of ``dataset``, in original image pixels, in dataset order."""
    out = []
    for i in tqdm(range(len(dataset)), desc="detect", unit="img", disable=not progress, dynamic_ncols=True):
        sample = dataset[i]
        out.append(predictor.predict([dataset.load_image(sample)])[0])
    return out


def score_detections(
    dataset: DetectionDataset, detections: list[Detections], metric: str = "voc07"
) -> dict:
    """Per-class AP and their mean over classes that have at least one non-difficult gt box."""
    use_07 = METRICS[metric]
    samples = [dataset[i] for i in range(len(dataset))]
    per_class: dict[str, float | None] = {}
    for k, name in enumerate(dataset.classes, start=1):
        gts = {s.image_id: (s.boxes[s.labels == k], s.difficult[s.labels == k]) for s in samples}
        ids, scores, boxes = [], [], []
        for s, d in zip(samples, detections):
            sel = d.labels == k
            ids += [s.image_id] * int(sel.sum())
            scores.append(d.scores[sel])
            boxes.append(d.boxes[sel])
        res = eval_class((ids, torch.cat(scores), torch.cat(boxes)), gts, iou_thresh=0.5, use_07_metric=use_07)
        per_class[name] = None if res["npos"] == 0 else float(res["ap"])
    valid = [ap for ap in per_class.values() if ap is not None and not math.isnan(ap)]
    return {"map": sum(valid) / len(valid) if valid else 0.0, "metric": metric, "per_class": per_class,
            "num_images": len(samples)}


def evaluate(predictor: Predictor, dataset: DetectionDataset, metric: str = "voc07", progress: bool = True) -> dict:
    return score_detections(dataset, collect_detections(predictor, dataset, progress), metric)


def format_table(result: dict) -> str:
    names = list(result["per_class"])
    width = max([len(n) for n in names] + [5])
    lines = [f"{'class':<{width}}  AP ({result['metric']})", "-" * (width + 12)]
    for name, ap in result["per_class"].items():
        lines.append(f"{name:<{width}}  {'n/a (no gt)' if ap is None else f'{ap:.4f}'}")
    lines += ["-" * (width + 12), f"{'mAP':<{width}}  {result['map']:.4f}"]
    return "\n".join(lines)
