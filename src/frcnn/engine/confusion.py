"""Why an AP is low: every detection sorted into one kind of outcome, and the classes mistaken for each other.

For each class, its detections with ``score >= score_thresh`` are taken by descending score (stable) and
matched as the VOC evaluation does (IoU strictly above ``iou_thresh`` with the best-overlapping gt box of the
*same* class; +1 pixel convention). Each detection is then exactly one of:

* ``correct``: it matched a not yet matched, non-difficult gt box of its class;
* ``duplicate``: its best gt box of its class was already matched;
* ``ignored``: its best gt box of its class is difficult (VOC) or crowd (COCO): neither right nor wrong;
* ``confused``: no match in its class, but it overlaps a gt box of *another* class with IoU > ``iou_thresh``
  (the most-overlapping one is counted in ``confused_with``);
* ``localization``: no match, but IoU in ``[0.1, iou_thresh]`` with a gt box of its class;
* ``background``: IoU below 0.1 with every gt box of its class and at most ``iou_thresh`` with all others.

``missed`` counts the non-difficult gt boxes of a class no detection matched, and ``missed_objects`` names
them (image, class, box, and the best IoU any detection of that class with ``score >= score_thresh`` reaches:
0 when nothing was found there, near ``iou_thresh`` when the box was found but not tightly enough, above it
when the detection there matched a neighbouring box it overlaps more). ``found_below_threshold`` says whether
the same matching over *every* detection, at any score, matches it: those that no detection matches
(``never_found`` in the totals) keep their class's recall under 1 at every threshold, so the class's VOC07
11-point AP is at most 10/11 (its precision at recall 1 is 0) whatever the ranking.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from frcnn.engine.voc_eval import _overlaps
from frcnn.model.detector import Detections

__all__ = ["KINDS", "confusion_summary", "format_confusion"]

KINDS = ("correct", "duplicate", "ignored", "confused", "localization", "background")
LOCALIZATION_IOU = 0.1


def confusion_summary(
    dataset, detections: Sequence[Detections], score_thresh: float = 0.5, iou_thresh: float = 0.5
) -> dict[str, Any]:
    """Outcome counts of ``detections`` (one per image of ``dataset``, original image pixels).

    Returns ``{"score_thresh", "iou_thresh", "per_class": {name: {"detections", "gt", "missed", <KINDS>,
    "confused_with": {other name: n}}}, "totals": {<KINDS>, "detections", "gt", "missed", "never_found"},
    "matrix": {"rows": gt class names + ["background"], "cols": detected class names, "counts": [[n]]},
    "missed_objects": [{"image", "class", "box", "best_iou", "found_below_threshold"}]}``, the boxes in original
    image pixels, 0-based inclusive, by class then dataset order: ``matrix`` counts each detection under the gt
    class it covers (its own when correct/duplicate/localization, the other one when confused, ``background``
    when background; ignored detections are left out).
    """
    if len(detections) != len(dataset):
        raise ValueError(f"{len(detections)} detection sets for {len(dataset)} images")
    classes = tuple(dataset.classes)
    k_count = len(classes)
    per_class = {name: {"detections": 0, "gt": 0, "missed": 0, **{kind: 0 for kind in KINDS}, "confused_with": {}}
                 for name in classes}
    matrix = np.zeros((k_count + 1, k_count), dtype=np.int64)
    missed_objects: list[dict[str, Any]] = []
    samples = [dataset[i] for i in range(len(dataset))]
    for k, name in enumerate(classes, start=1):
        row = per_class[name]
        gts = {}
        for s in samples:
            sel = (s.labels == k).numpy()
            gts[s.image_id] = (s.boxes.numpy()[sel].astype(np.float64), s.difficult.numpy()[sel])
            row["gt"] += int((~s.difficult.numpy()[sel]).sum())
        matched = {img: np.zeros(len(d), bool) for img, (_, d) in gts.items()}
        every = []  # (score, image index, box) of the class, at any score
        for idx, d in enumerate(detections):
            sel = d.labels == k
            every += [(score, idx, box) for score, box in zip(d.scores[sel].tolist(), d.boxes[sel].double().numpy())]
        every.sort(key=lambda e: -e[0])  # stable: ties keep image order
        entries = [e for e in every if e[0] >= score_thresh]
        for _, idx, box in entries:
            s = samples[idx]
            bbgt, difficult = gts[s.image_id]
            row["detections"] += 1
            kind, covered = _classify(box, bbgt, difficult, matched[s.image_id], s, k, iou_thresh)
            row[kind] += 1
            if kind == "confused":
                other = classes[covered - 1]
                row["confused_with"][other] = row["confused_with"].get(other, 0) + 1
            if kind != "ignored":
                matrix[k_count if covered == 0 else covered - 1, k - 1] += 1
        row["missed"] = row["gt"] - row["correct"]
        # the same matching at any score: the kept detections come first in ``every`` and have matched what
        # ``matched`` holds, so it goes on from there with the rest
        matched_any = {img: m.copy() for img, m in matched.items()}
        for _, idx, box in every[len(entries):]:
            s = samples[idx]
            _classify(box, *gts[s.image_id], matched_any[s.image_id], s, k, iou_thresh)
        missed_objects += _missed(samples, gts, matched, matched_any, entries, name)
    totals = {key: sum(r[key] for r in per_class.values()) for key in ("detections", "gt", "missed", *KINDS)}
    totals["never_found"] = sum(not m["found_below_threshold"] for m in missed_objects)
    return {"score_thresh": score_thresh, "iou_thresh": iou_thresh, "per_class": per_class, "totals": totals,
            "matrix": {"rows": [*classes, "background"], "cols": list(classes), "counts": matrix.tolist()},
            "missed_objects": missed_objects}


def _missed(samples, gts, matched, matched_any, entries, name) -> list[dict[str, Any]]:
    """The class's non-difficult gt boxes left unmatched, with the best IoU of the class's kept detections and
    whether a detection under the threshold matches them (``matched_any``: the matching at any score)."""
    found: dict[int, list] = {}
    for _, idx, box in entries:
        found.setdefault(idx, []).append(box)
    out = []
    for idx, s in enumerate(samples):
        bbgt, difficult = gts[s.image_id]
        for j in np.flatnonzero(~matched[s.image_id] & ~difficult):
            best = float(_overlaps(bbgt[j], np.array(found[idx])).max()) if idx in found else 0.0
            out.append({"image": s.image_id, "class": name, "box": [round(float(v), 2) for v in bbgt[j]],
                        "best_iou": round(best, 4), "found_below_threshold": bool(matched_any[s.image_id][j])})
    return out


def _classify(box, bbgt, difficult, matched, sample, k, iou_thresh) -> tuple[str, int]:
    """(kind, label of the gt class the detection covers; 0 for background)."""
    if bbgt.shape[0] > 0:
        overlaps = _overlaps(box, bbgt)
        j = int(np.argmax(overlaps))
        if overlaps[j] > iou_thresh:
            if difficult[j]:
                return "ignored", k
            if not matched[j]:
                matched[j] = True
                return "correct", k
            return "duplicate", k
        own_best = float(overlaps[j])
    else:
        own_best = 0.0
    others = (sample.labels != k).numpy()
    if others.any():
        overlaps = _overlaps(box, sample.boxes.numpy()[others].astype(np.float64))
        j = int(np.argmax(overlaps))
        if overlaps[j] > iou_thresh:
            return "confused", int(sample.labels.numpy()[others][j])
    if own_best >= LOCALIZATION_IOU:
        return "localization", k
    return "background", 0


def format_confusion(summary: dict[str, Any]) -> str:
    """A plain-text table of :func:`confusion_summary`: one row per class, then the most frequent confusions."""
    names = list(summary["per_class"])
    width = max([len(n) for n in names] + [5])
    cols = ("detections", *KINDS, "gt", "missed")
    head = f"{'class':<{width}}  " + "  ".join(f"{c:>12}" for c in cols)
    lines = [f"detections with score >= {summary['score_thresh']:g}, IoU > {summary['iou_thresh']:g}", head,
             "-" * len(head)]
    for name, row in summary["per_class"].items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{row[c]:>12}" for c in cols))
    lines += ["-" * len(head), f"{'total':<{width}}  " + "  ".join(f"{summary['totals'][c]:>12}" for c in cols)]
    pairs = sorted(((n, det, gt) for det, row in summary["per_class"].items()
                    for gt, n in row["confused_with"].items()), key=lambda p: (-p[0], p[1], p[2]))
    if pairs:
        lines.append("")
        lines.append("mistaken classes (detected as <- actually):")
        lines += [f"  {det} <- {gt}: {n}" for n, det, gt in pairs[:20]]
    missed = summary.get("missed_objects", [])
    if missed:
        lines += ["", f"missed objects: {len(missed)} (no detection of their class with score >= "
                      f"{summary['score_thresh']:g} matched them; boxes 0-based inclusive; best IoU: the closest of "
                      f"those detections){'; the first 20' if len(missed) > 20 else ''}:"]
        lines += [f"  {m['image']}  {m['class']}  [{', '.join(f'{v:g}' for v in m['box'])}]  best IoU "
                  f"{m['best_iou']:.2f}{'' if m['found_below_threshold'] else '  never found'}" for m in missed[:20]]
        never = summary["totals"].get("never_found", 0)
        lines.append(f"never found: {never} (no detection matches them at any score: their class's recall stays "
                     "under 1, its VOC07 AP at most 10/11)" if never else
                     "never found: none (a detection under the threshold matches every missed object)")
    return "\n".join(lines)
