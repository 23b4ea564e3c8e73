"""``frcnn check-data``: every problem of a data set, found before training, in one report.

Three layers, each importing only the ones below it (no module imports one beside it or above it):

- :mod:`frcnn.data.check_core`: the format-neutral checks (every image opened once, its real size, every
  box) on the :class:`~frcnn.data.check_core.Record` s a front end read, and the :class:`DataReport`;
- :mod:`frcnn.data.check_voc` (a VOC folder) and :mod:`frcnn.data.check_coco` (a COCO annotation JSON): the
  format-specific front ends, reading their files leniently into records;
- this module: :func:`check_data` picks the front end for ``--data``, :func:`training_set` is what
  ``frcnn train`` trains on, and the text tables ``frcnn check-data`` prints. The names callers use
  (:class:`DataReport`, :func:`check_voc`, ...) are importable from here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from frcnn.data.check_coco import check_coco
from frcnn.data.check_core import Counts, DataReport
from frcnn.data.check_voc import check_voc, voc_splits
from frcnn.data.problems import KINDS, Problem
from frcnn.data.repair import RepairedDataset, inverted, repair_sample
from frcnn.data.sample import Sample
from frcnn.errors import DataError

__all__ = ["Counts", "DataReport", "check_coco", "check_data", "check_voc", "fit_samples", "format_counts",
           "format_problems", "table_lines", "training_set", "voc_splits"]


# ---------------------------------------------------------------------------------------------- entry points


def check_data(
    path: str | os.PathLike,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    images: str | os.PathLike | None = None,
    max_pixels: int | None = None,
    progress: bool = False,
) -> DataReport:
    """Check ``--data``: a VOC root (one split, or all of them) or a COCO annotation JSON (``split`` may name
    another JSON next to it, as in :func:`frcnn.data.open_dataset`)."""
    path = Path(path)
    if path.is_dir() and (path / "Annotations").is_dir():
        if images is not None:
            raise DataError(f"--images is for COCO data; {path} is a VOC root (its images are in JPEGImages/)")
        return check_voc(path, split, classes, max_pixels, progress)
    if path.is_file():
        if split is not None and split != path.stem:
            path = Path(split) if split.endswith(".json") else path.parent / f"{split}.json"
        return check_coco(path, images, classes, max_pixels, progress)
    if path.is_dir():
        raise DataError(f"{path}: neither a VOC root (no Annotations/ folder) nor a COCO annotation JSON")
    raise DataError(f"{path}: no such data folder or file")


def training_set(
    path: str | os.PathLike,
    split: str | None,
    classes: Sequence[str] | None = None,
    images: str | os.PathLike | None = None,
    progress: bool = False,
):
    """What ``frcnn train`` trains on: the data checked first (:func:`check_data`); a problem that cannot be
    repaired is a one-line :class:`DataError` before anything is written; the safe repairs are applied.
    Returns ``(dataset, summary)``, ``summary`` one line saying what was repaired ("" if nothing)."""
    from frcnn.data import ClassSubset, open_dataset

    report = check_data(path, split, None, images, progress=progress)
    report.raise_if_unrepairable()
    if not report.classes:
        raise DataError(f"{path}: no objects in any annotation of split {split}, so no classes to train")
    if report.format == "voc":
        dataset = report.repaired(split)
    else:
        strict = open_dataset(path, split, None, images)
        dataset = RepairedDataset(strict, report.sizes, [p for p in report.problems if p.repairable])
    summary = dataset.summary
    return (ClassSubset(dataset, classes) if classes is not None else dataset), summary


# ---------------------------------------------------------------------------------------------- the table


def table_lines(rows: list[list[str]]) -> list[str]:
    """Rows of cells as aligned text lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]


def format_counts(report: DataReport) -> list[str]:
    classes = list(report.classes) or sorted(report.total.boxes)
    rows = [["split", "images", "no boxes", *classes, "boxes"]]
    named = list(report.splits.items()) + ([("all", report.total)] if len(report.splits) > 1 else [])
    for name, c in named:
        rows.append([name, str(c.images), str(c.without_boxes), *(str(c.boxes[k]) for k in classes),
                     str(sum(c.boxes.values()))])
    return [f"data: {report.source} ({report.format.upper()})", *table_lines(rows)]


def format_problems(report: DataReport, limit: int = 20) -> list[str]:
    if not report.problems:
        return ["problems: none"]
    bad = len(report.unrepairable)
    lines = [f"problems: {len(report.problems)} ({bad} cannot be repaired"
             + ("; training stops on them)" if bad else "; training repairs them all)")]
    by_kind: dict[str, list[Problem]] = {}
    for p in report.problems:
        by_kind.setdefault(p.kind, []).append(p)
    for kind, found in sorted(by_kind.items(), key=lambda kv: (KINDS[kv[0]][0], kv[0])):
        fix = f"repairable: {KINDS[kind][1]}" if KINDS[kind][0] else "NOT repairable"
        lines.append(f"  {kind}: {len(found)} ({fix})")
        lines += [f"    {p.line}" for p in found[:limit]]
        if len(found) > limit:
            lines.append(f"    ... and {len(found) - limit} more (--json lists them all)")
    return lines


def fit_samples(report: DataReport) -> list[Sample]:
    """The samples as training sees them (repaired, real sizes), readable images only, inverted boxes left
    out: what the anchor fit is measured on."""
    out = []
    for s in report.samples:
        size = report.sizes.get(str(s.path))
        if size is not None:
            repaired, _ = repair_sample(s, *size)
            keep = inverted(repaired.boxes).logical_not()
            out.append(Sample(repaired.image_id, repaired.path, repaired.width, repaired.height,
                              repaired.boxes[keep], repaired.labels[keep], repaired.difficult[keep]))
    return out
