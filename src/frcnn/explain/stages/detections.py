"""Stages 8 and 9: per-class NMS and the final detections (the inference end of :mod:`frcnn.model.detector`,
NMS from :mod:`frcnn.ops.nms` or :mod:`frcnn.ops.soft_nms`), matched against the ground truth as VOC does."""

from __future__ import annotations

from typing import Any

import torch
from PIL import ImageDraw
from torch import Tensor

from frcnn.boxes import box_iou
from frcnn.explain.run import ExplainRun
from frcnn.explain.stages.canvas import Stage, _class_legend, _class_name, _line, _ms, _tag, draw_boxes, make_canvas
from frcnn.viz import charts
from frcnn.viz.draw import GT_COLOR, class_color, draw_detections

TP_COLOR, FP_COLOR, MISS_COLOR = (0, 200, 0), (255, 0, 0), (255, 200, 0)
MAX_DRAWN = 30  # final detections drawn at most


def _present_classes(run: ExplainRun, threshold: float) -> list[int]:
    final = run.trace["detections"]["final"][0]
    labels = final["labels"][final["scores"] >= threshold].tolist()
    if not labels and len(final["scores"]):
        labels = [int(final["labels"][int(final["scores"].argmax())])]
    return sorted(set(int(k) for k in labels))


def class_nms_stage(run: ExplainRun, threshold: float) -> Stage:
    rec = run.trace["detections"]
    pre, final = rec["pre_nms"][0], rec["final"][0]
    classes = _present_classes(run, threshold)
    canvas = make_canvas(run)
    line = _line(canvas.image.width)
    rows, per_class = [], {}
    for k in classes[:4]:
        def pick(d: dict, k: int = k) -> tuple[Tensor, Tensor]:
            sel = d["labels"].cpu() == k
            b, s = d["boxes"].cpu()[sel], d["scores"].cpu()[sel]
            shown = s >= threshold
            if not bool(shown.any()):  # nothing above the threshold: the best ten, so the picture says something
                shown = torch.argsort(s, descending=True)[:10]
            return b[shown], s[shown]
        pictures = []
        for name, d in (("before", pre), ("after", final)):
            b, s = pick(d)
            order = torch.argsort(s, stable=True)
            img = draw_boxes(canvas.image, canvas.from_original(run.to_original(b[order])),
                             [class_color(k)] * len(b), width=line)
            plural = "es" if len(b) != 1 else ""
            pictures.append(charts.label_above(img, f"{_class_name(run, k)}: {len(b)} box{plural} drawn, {name} NMS"))
        rows.append(charts.hstack(pictures))
        per_class[_class_name(run, k)] = {
            "before_nms": int((pre["labels"] == k).sum()), "after_nms": int((final["labels"] == k).sum()),
            "before_nms_above_threshold": int(((pre["labels"] == k) & (pre["scores"] >= threshold)).sum()),
            "after_nms_above_threshold": int(((final["labels"] == k) & (final["scores"] >= threshold)).sum()),
        }
    picture = charts.vstack(rows, gap=10) if rows else charts.label_above(canvas.image, "no detections")
    soft = rec["nms_method"] == "soft"
    numbers = {
        "TEST.NMS_METHOD": rec["nms_method"],
        **({"TEST.SOFT_NMS_SIGMA": rec["soft_nms_sigma"]} if soft else {"TEST.NMS": rec["nms_thresh"]}),
        "TEST.SCORE_THRESH": rec["score_thresh"],
        "TEST.MAX_PER_IMAGE": rec["max_per_image"],
        "boxes_before_nms": int(len(pre["scores"])),
        "detections_after_nms": int(len(final["scores"])),
        "display_threshold": threshold,
        "per_class": per_class,
        "time_ms": _ms(run, "detections"),
    }
    if soft:
        how = (f"go through Gaussian soft-NMS (TEST.NMS_METHOD soft): the best box is kept and every box of its class "
               f"keeps its score times exp(-IoU^2 / {rec['soft_nms_sigma']:g}) (TEST.SOFT_NMS_SIGMA), IoU with the box "
               f"kept, then the next best is kept, and so on, so a duplicate falls far down the ranking but an "
               f"object overlapping another of its class stays with a lower score")
    else:
        how = (f"go through non-maximum suppression at IoU {rec['nms_thresh']:g} (TEST.NMS): a box overlapping a "
               f"better one of the same class by more is dropped")
    text = (f"Every RoI now has a refined box and a probability for each class. Per class, boxes scoring above "
            f"TEST.SCORE_THRESH ({rec['score_thresh']:g}) {how}; at most TEST.MAX_PER_IMAGE "
            f"({rec['max_per_image']}) survive over all classes. Shown: the "
            f"classes detected with a score of at least {threshold:g}, boxes scoring at least that.")
    return Stage("08_class_nms", "8. Per-class non-maximum suppression", text, numbers, picture)


def match_detections(boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                     iou: float = 0.5) -> tuple[Tensor, Tensor]:
    """VOC matching in one image: by descending score, a detection is a true positive if its best gt box of
    the same class overlaps it by more than ``iou`` and is not yet taken. Returns (tp flags (D,), matched (G,))."""
    tp = torch.zeros(len(scores), dtype=torch.bool)
    matched = torch.zeros(len(gt_boxes), dtype=torch.bool)
    if len(gt_boxes) == 0 or len(scores) == 0:
        return tp, matched
    overlaps = box_iou(boxes.float(), gt_boxes.float())
    overlaps[labels.view(-1, 1) != gt_labels.view(1, -1)] = -1
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        best, j = overlaps[i].max(dim=0)
        if best > iou and not matched[j]:
            tp[i] = True
            matched[j] = True
    return tp, matched


def final_stage(run: ExplainRun, threshold: float) -> Stage:
    det = run.detections
    above = torch.argsort(det.scores, descending=True, stable=True)
    above = above[det.scores[above] >= threshold]
    boxes, scores, labels = det.boxes[above], det.scores[above], det.labels[above]
    n = len(scores)
    drawn = slice(0, MAX_DRAWN)  # the best ones; all of them count
    canvas = make_canvas(run)
    line = _line(canvas.image.width)
    shown = draw_detections(canvas.image, canvas.from_original(boxes[drawn]), labels[drawn], scores[drawn],
                            run.class_names, gt_boxes=None if run.gt is None else canvas.from_original(run.gt.boxes))
    caption = f"{n} detections with score >= {threshold:g}" + (f" (best {MAX_DRAWN} drawn)" if n > MAX_DRAWN else "")
    extra = [("gt", GT_COLOR)] if run.gt is not None else []
    pictures = [charts.vstack([charts.label_above(shown, caption),
                               _class_legend(run, labels[drawn].tolist(), shown.width, extra)])]
    numbers: dict[str, Any] = {
        "threshold": threshold, "detections": n,
        "per_class": {_class_name(run, k): int((labels == k).sum()) for k in sorted(set(labels.tolist()))},
        "boxes": [{"class": _class_name(run, int(lb)), "score": round(float(s), 4),
                   "box": [round(float(v), 2) for v in b]} for b, s, lb in zip(boxes, scores, labels)],
    }
    if run.gt is not None:
        tp, matched = match_detections(boxes, scores, labels, run.gt.boxes, run.gt.labels)
        missed = ~matched
        img = draw_boxes(canvas.image, canvas.from_original(run.gt.boxes[missed]), [MISS_COLOR] * int(missed.sum()),
                         width=line + 2)
        flags = tp[drawn].tolist()
        img = draw_boxes(img, canvas.from_original(boxes[drawn]), [TP_COLOR if t else FP_COLOR for t in flags],
                         width=line)
        d = ImageDraw.Draw(img)
        for b, s, lb, t in reversed(list(zip(canvas.from_original(boxes[drawn]).tolist(), scores[drawn].tolist(),
                                             labels[drawn].tolist(), flags))):  # the best tag on top
            _tag(d, (b[0], b[1]), f"{'TP' if t else 'FP'} {_class_name(run, lb)} {s:.2f}", TP_COLOR if t else FP_COLOR)
        for b, lb in zip(canvas.from_original(run.gt.boxes[missed]).tolist(), run.gt.labels[missed].tolist()):
            _tag(d, (b[0], b[3] + 18), f"missed {_class_name(run, lb)}", MISS_COLOR)
        legend = charts.legend([("true positive", TP_COLOR), ("false positive", FP_COLOR), ("missed gt", MISS_COLOR)],
                               img.width, title="legend:")
        pictures.append(charts.vstack([charts.label_above(img, "against the ground truth (IoU > 0.5, same class)"),
                                       legend]))
        numbers.update(true_positives=int(tp.sum()), false_positives=int((~tp).sum()), missed=int(missed.sum()),
                       gt_boxes=int(len(matched)))
    text = (f"The detections that survive per-class NMS, with a score of at least {threshold:g}, drawn on the "
            "original image: their boxes were divided by the pre-processing scale factor, so they line up with "
            "the objects at the original resolution. Each class has its own colour in every picture.")
    if run.gt is not None:
        text += (" Against the ground truth, a detection is a true positive if it overlaps a not yet matched gt "
                 "box of its class by IoU > 0.5 (VOC's rule), else a false positive; unmatched gt boxes are misses.")
    return Stage("09_detections", "9. Final detections", text, numbers, charts.hstack(pictures))
