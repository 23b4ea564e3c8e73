"""Run a predictor over a data set and score it: the reference VOC AP (:mod:`frcnn.engine.voc_eval`, 11-point
and area) on any data, and pycocotools' box metrics (:mod:`frcnn.engine.coco_eval`) on COCO data.

Detections are kept down to ``TEST.SCORE_THRESH`` (0 in the reference), at most ``TEST.MAX_PER_IMAGE``
per image, as the reference ``test_net`` does before ``voc_eval``.

The result of :func:`score_detections` (printed by ``frcnn eval --json``, written as ``metrics.json`` by
:func:`write_eval_outputs`, and as ``<run>/eval/metrics.json`` by evaluation during training) is one JSON
object::

    {
      "map": float,                  # the selected metric's mean AP (COCO: AP@[.50:.95])
      "metric": "voc07" | "voc2010" | "coco",   # the selected metric ("all" selects coco on COCO data,
                                                #  else voc07)
      "per_class": {name: float | null},        # the selected metric's AP per class; null: no gt of the class
      "num_images": int,
      "npos": {name: int},           # gt boxes per class that count (not difficult / not crowd)
      "repaired": {"clipped": int, "dropped": int} | null,   # gt boxes the data's repairs clipped to their
                                     #  image or dropped (degenerate, duplicate), as training does
                                     #  (frcnn.data.open_repaired); null: data not read through it
      "metrics": {                   # every metric that applies to the data, selected or not
        "voc07":   {"map": float, "per_class": {name: float | null}},   # 11-point AP, IoU > 0.5
        "voc2010": {"map": float, "per_class": {name: float | null}},   # area AP, IoU > 0.5
        "coco": {                                                       # COCO data only
          "map": float, "per_class": {name: float | null}, "per_class_ap50": {name: float | null},
          "stats": {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"}
        }                                                               # stats: -1 where undefined
      }
    }

Evaluation during training adds ``"iteration": int`` and ``"split": str``. VOC means are over classes with
ground truth; COCO numbers are pycocotools' own, on the repaired ground truth. :func:`write_eval_outputs` also
writes ``pr_curves.png`` and ``pr_curves.json`` (precision-recall per class at IoU > ``iou``, default 0.5:
:func:`pr_curves`) and ``confusion.json`` / ``confusion.txt`` (:mod:`frcnn.engine.confusion`).

Precision-recall curves are computed the same way on VOC and COCO data: the reference ``voc_eval`` matching
(:func:`~frcnn.engine.voc_eval.eval_class`: detections by descending score, each a true positive when its
best-overlapping gt box has IoU > ``iou`` (+1 convention) and is not yet matched; difficult and COCO crowd
boxes neither matched nor missed), at any ``iou`` in (0, 1). ``pr_curves.json``::

    {"iou": float, "per_class": {name: {"ap": float | null,    # area under the curve (VOC2010+ rule)
                                        "npos": int, "score": [...], "tp": [0|1, ...],
                                        "recall": [...], "precision": [...]}}}   # one entry per detection,
                                                                                  #  by descending score
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from frcnn.engine import distributed as dist
from frcnn.engine.batches import DetectionDataset
from frcnn.engine.distributed import World
from frcnn.engine.inference import Predictor
from frcnn.engine.voc_eval import eval_class, voc_ap
from frcnn.errors import DataError
from frcnn.model.detector import Detections

METRICS = {"voc07": True, "voc2010": False}  # name -> use_07_metric
METRIC_CHOICES = ("voc07", "voc2010", "coco", "all")
OUTPUT_FILES = ("metrics.json", "pr_curves.png", "pr_curves.json", "confusion.json", "confusion.txt")


def is_coco(dataset: DetectionDataset) -> bool:
    return hasattr(dataset, "coco") and hasattr(dataset, "category_ids")


def default_metric(dataset: DetectionDataset) -> str:
    """``coco`` on COCO data, else ``voc07``."""
    return "coco" if is_coco(dataset) else "voc07"


def collect_detections(predictor: Predictor, dataset: DetectionDataset, progress: bool = True,
                       world: World | None = None) -> list[Detections] | None:
    """Detections of every image of ``dataset``, in original image pixels, in dataset order.

    With a distributed ``world`` each process detects every ``world.size``-th image and process 0 gathers
    them into dataset order (the same list one process makes); the other processes get ``None``."""
    world = world or World()
    indices = dist.shard(world, len(dataset))
    out = []
    for i in tqdm(indices, desc="detect", unit="img", disable=not (progress and world.is_main), dynamic_ncols=True):
        sample = dataset[i]
        out.append(predictor.predict([dataset.load_image(sample)])[0])
    if not world.distributed:
        return out
    parts = dist.gather(world, out, "gathering the detections")
    if parts is None:
        return None
    ordered: list[Detections] = [None] * len(dataset)  # type: ignore[list-item]
    for rank, part in enumerate(parts):
        ordered[rank::world.size] = part
    return ordered


def voc_class_results(dataset: DetectionDataset, detections: list[Detections],
                      iou: float = 0.5) -> dict[str, dict[str, Any]]:
    """:func:`~frcnn.engine.voc_eval.eval_class` (11-point, IoU > ``iou``) of every class: ``{name: {"ap",
    "rec", "prec", "npos", "tp", "fp", "score"}}`` (``score``: the class's detection scores in the order of
    ``rec``/``prec``). Difficult boxes (crowd boxes on COCO data) are neither matched nor missed."""
    if len(detections) != len(dataset):
        raise ValueError(f"{len(detections)} detection sets for {len(dataset)} images")
    samples = [dataset[i] for i in range(len(dataset))]
    out = {}
    for k, name in enumerate(dataset.classes, start=1):
        gts = {s.image_id: (s.boxes[s.labels == k], s.difficult[s.labels == k]) for s in samples}
        ids, scores, boxes = [], [torch.zeros(0)], [torch.zeros(0, 4)]
        for s, d in zip(samples, detections):
            sel = d.labels == k
            ids += [s.image_id] * int(sel.sum())
            scores.append(d.scores[sel].float())
            boxes.append(d.boxes[sel].float())
        scores_k = torch.cat(scores)
        out[name] = eval_class((ids, scores_k, torch.cat(boxes)), gts, iou_thresh=iou, use_07_metric=True)
        confidence = scores_k.double().numpy()  # in eval_class's order: descending, ties in input order
        out[name]["score"] = confidence[np.argsort(-confidence, kind="stable")]
    return out


def check_iou(iou: float, what: str = "--iou") -> float:
    """``iou`` if it lies in (0, 1), else a one-line :class:`DataError` (at 1 no detection could match)."""
    if not (isinstance(iou, (int, float)) and 0.0 < iou < 1.0):
        raise DataError(f"{what} {iou}: the IoU a detection must exceed to match must lie in (0, 1)")
    return float(iou)


def pr_curves(dataset: DetectionDataset, detections: list[Detections], iou: float = 0.5) -> dict[str, dict]:
    """Precision-recall per class at IoU > ``iou`` (see the module docstring; VOC and COCO data alike):
    ``{name: {"rec", "prec", "score", "tp", "npos", "ap"}}``, ``ap`` the area under the curve (VOC2010+) or
    None for a class without ground truth."""
    curves = voc_class_results(dataset, detections, check_iou(iou, "iou"))
    for r in curves.values():
        r["ap"] = None if r["npos"] == 0 else voc_ap(r["rec"], r["prec"], False)
    return curves


def pr_curves_json(curves: dict[str, dict], iou: float) -> dict:
    """:func:`pr_curves` as the JSON-clean object of ``pr_curves.json`` (module docstring)."""
    def floats(values) -> list[float | None]:
        return [None if math.isnan(v) else float(v) for v in np.asarray(values, dtype=np.float64).tolist()]

    return {"iou": iou, "per_class": {
        name: {"ap": r["ap"], "npos": int(r["npos"]), "score": floats(r["score"]),
               "tp": [int(v) for v in np.asarray(r["tp"]).tolist()], "recall": floats(r["rec"]),
               "precision": floats(r["prec"])} for name, r in curves.items()}}


def repairs(dataset: DetectionDataset) -> dict[str, int] | None:
    """The gt boxes the data's repairs clipped or dropped (``{"clipped", "dropped"}``), None when ``dataset``
    was not read through :func:`frcnn.data.open_repaired`."""
    done = getattr(dataset, "repairs", None)
    return {"clipped": int(done["clipped"]), "dropped": int(done["dropped"])} if isinstance(done, dict) else None


def _mean(per_class: dict[str, float | None]) -> float:
    valid = [ap for ap in per_class.values() if ap is not None and not math.isnan(ap)]
    return sum(valid) / len(valid) if valid else 0.0


def score_detections(dataset: DetectionDataset, detections: list[Detections], metric: str | None = "voc07") -> dict:
    """Every metric that applies to ``dataset`` (see the module docstring for the result), ``metric``
    (``voc07``, ``voc2010``, ``coco``, ``all``; None: :func:`default_metric`) selecting ``map``/``per_class``."""
    metric = default_metric(dataset) if metric in (None, "all") else metric
    if metric not in METRICS and metric != "coco":
        raise DataError(f"unknown metric {metric!r} (choose from {', '.join(METRIC_CHOICES)})")
    if metric == "coco" and not is_coco(dataset):
        raise DataError("the coco metric needs COCO data (an annotation JSON); use voc07 or voc2010 here")
    results = voc_class_results(dataset, detections)
    metrics: dict[str, dict] = {}
    for name, use_07 in METRICS.items():
        per_class = {c: None if r["npos"] == 0 else voc_ap(r["rec"], r["prec"], use_07) for c, r in results.items()}
        metrics[name] = {"map": _mean(per_class), "per_class": per_class}
    if is_coco(dataset):
        from frcnn.engine.coco_eval import coco_evaluate

        coco = coco_evaluate(dataset, detections)
        coco.pop("metric")
        metrics["coco"] = coco
    selected = metrics[metric]
    return {"map": selected["map"], "metric": metric, "per_class": selected["per_class"],
            "num_images": len(dataset), "npos": {c: r["npos"] for c, r in results.items()},
            "repaired": repairs(dataset), "metrics": metrics}


def evaluate(predictor: Predictor, dataset: DetectionDataset, metric: str | None = "voc07",
             progress: bool = True) -> dict:
    return score_detections(dataset, collect_detections(predictor, dataset, progress), metric)


def write_eval_outputs(folder: str | Path, dataset: DetectionDataset, detections: list[Detections], result: dict,
                       score_thresh: float = 0.5, iou: float = 0.5) -> list[Path]:
    """Write :data:`OUTPUT_FILES` into ``folder`` (created; existing files replaced): ``metrics.json`` (the
    result), ``pr_curves.png`` and ``pr_curves.json`` (:func:`pr_curves` at IoU > ``iou``), ``confusion.json``
    and ``confusion.txt`` (detections with score >= ``score_thresh``). Returns the paths written."""
    from frcnn.engine.confusion import confusion_summary, format_confusion
    from frcnn.viz.pr_curves import save_pr_curves

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in OUTPUT_FILES]
    _write_text(paths[0], json.dumps(result, indent=2) + "\n")
    curves = pr_curves(dataset, detections, iou)
    tmp = paths[1].with_name(paths[1].name + ".tmp")
    crowd = ", crowd boxes ignored" if is_coco(dataset) else ""
    save_pr_curves(tmp, curves, iou=iou, title=f"precision-recall, IoU > {iou:g} (voc_eval matching{crowd}), "
                                               f"AP = area (VOC2010+), {len(dataset)} images")
    tmp.replace(paths[1])
    _write_text(paths[2], json.dumps(pr_curves_json(curves, iou)) + "\n")
    summary = confusion_summary(dataset, detections, score_thresh=score_thresh)
    _write_text(paths[3], json.dumps(summary, indent=2) + "\n")
    _write_text(paths[4], format_confusion(summary) + "\n")
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def format_table(result: dict, all_metrics: bool = False) -> str:
    """The selected metric per class and its mean (COCO: then pycocotools' twelve numbers); with
    ``all_metrics``, one column per metric in ``result["metrics"]`` (COCO: AP@[.50:.95] and AP50)."""
    if all_metrics and result.get("metrics"):
        return _format_all(result)
    names = list(result["per_class"])
    width = max([len(n) for n in names] + [5])
    label = {"coco": "AP@[.50:.95] (coco)"}.get(result["metric"], f"AP ({result['metric']})")
    lines = [f"{'class':<{width}}  {label}", "-" * (width + 22)]
    for name, ap in result["per_class"].items():
        lines.append(f"{name:<{width}}  {'n/a (no gt)' if ap is None else f'{ap:.4f}'}")
    lines += ["-" * (width + 22), f"{'mAP':<{width}}  {result['map']:.4f}"]
    stats = result.get("metrics", {}).get("coco", {}).get("stats")
    if result["metric"] == "coco" and stats:
        lines.append("")
        lines += [f"{name:<6} {value:.4f}" if value >= 0 else f"{name:<6} n/a" for name, value in stats.items()]
    return "\n".join(lines + _repaired_lines(result))


def _repaired_lines(result: dict) -> list[str]:
    """The line of the table that says how many gt boxes the repairs changed (none if unknown)."""
    done = result.get("repaired")
    if not done:
        return []
    return ["", f"ground truth as training reads it: {done['clipped']} boxes clipped to their image, "
                f"{done['dropped']} dropped (degenerate or duplicate)"]


def _format_all(result: dict) -> str:
    metrics = result["metrics"]
    columns = [(name, metrics[name]["per_class"], metrics[name]["map"]) for name in METRICS if name in metrics]
    if "coco" in metrics:
        coco = metrics["coco"]
        columns += [("coco AP", coco["per_class"], coco["map"]),
                    ("coco AP50", coco["per_class_ap50"], max(coco["stats"]["AP50"], 0.0))]
    names = list(result["per_class"])
    width = max([len(n) for n in names] + [5])

    def cell(v: float | None) -> str:
        return f"{'n/a':>10}" if v is None else f"{v:>10.4f}"

    head = f"{'class':<{width}}" + "".join(f"{c[0]:>10}" for c in columns)
    lines = [head, "-" * len(head)]
    lines += [f"{n:<{width}}" + "".join(cell(c[1][n]) for c in columns) for n in names]
    lines += ["-" * len(head), f"{'mean':<{width}}" + "".join(cell(c[2]) for c in columns)]
    if "coco" in metrics:
        stats = metrics["coco"]["stats"]
        lines += ["", "  ".join(f"{k} {v:.4f}" if v >= 0 else f"{k} n/a" for k, v in stats.items())]
    return "\n".join(lines + _repaired_lines(result))
