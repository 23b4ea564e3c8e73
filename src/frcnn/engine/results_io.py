"""Detections to and from the files other systems and evaluation servers use.

* COCO results JSON: a list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``. Boxes are
  converted from the +1 convention as py-faster-rcnn does (``w = x2 - x1 + 1``). On COCO data ``image_id``
  is the integer COCO id and ``category_id`` the COCO category; on other data (VOC) ``image_id`` is the
  image id string and ``category_id`` the label (1..K, in the order of ``classes``).
* The reference VOC results files ``comp4_det_<split>_<class>.txt`` (one per class, as py-faster-rcnn's
  ``_write_voc_results_file``): a line ``image_id score x1 y1 x2 y2`` per detection with **1-based** VOC
  pixel coordinates (0-based + 1). The reference writes ``{:.3f}`` scores and ``{:.1f}`` coordinates; here
  numbers are written at full precision (``repr``) so reading the files back gives the same AP as the
  detections in memory. Readers accept any precision; on COCO data an image is named by its COCO id or by
  its file name without extension (the VOC id of the same image).

Readers return one :class:`~frcnn.model.detector.Detections` per image of the data set, in data set
order, boxes 0-based (+1 convention), and refuse (one-line :class:`~frcnn.errors.DataError`) unknown
images, unknown categories and malformed entries.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from frcnn.data.coco import boxes_to_coco, is_finite_number, read_json
from frcnn.data.voc import is_dir, is_file, shown
from frcnn.errors import DataError
from frcnn.model.detector import Detections

__all__ = ["comp4_name", "read_coco_results", "read_comp4", "read_detections", "write_coco_results",
           "write_comp4"]


def _is_coco(dataset) -> bool:
    return hasattr(dataset, "coco_image_ids") and hasattr(dataset, "label_to_category")


def _index(dataset, stems: bool = False) -> dict[str, int]:
    """image id -> data set row; with ``stems``, also each image file's name without extension where that is
    unique and not another image's id (so comp4 files written against the VOC ids of the same images read on
    COCO data)."""
    row = {dataset[i].image_id: i for i in range(len(dataset))}
    if stems:
        names: dict[str, list[int]] = {}
        for i in range(len(dataset)):
            names.setdefault(Path(dataset[i].path).stem, []).append(i)
        row.update({stem: rows[0] for stem, rows in names.items() if len(rows) == 1 and stem not in row})
    return row


def _detections(boxes: list[list[list[float]]], scores: list[list[float]], labels: list[list[int]]) -> list[Detections]:
    return [Detections(torch.tensor(b, dtype=torch.float32).reshape(-1, 4), torch.tensor(s, dtype=torch.float32),
                       torch.tensor(lb, dtype=torch.int64)) for b, s, lb in zip(boxes, scores, labels)]


# ---------------------------------------------------------------------------------------------- COCO JSON


def write_coco_results(path: str | os.PathLike, dataset, detections: Sequence[Detections]) -> Path:
    """Write ``detections`` (one per image of ``dataset``) as a COCO results JSON; returns the path."""
    if len(detections) != len(dataset):
        raise ValueError(f"{len(detections)} detection sets for {len(dataset)} images")
    coco = _is_coco(dataset)
    entries = []
    for i, d in enumerate(detections):
        image_id: int | str = dataset.coco_image_ids[i] if coco else dataset[i].image_id
        for box, score, label in zip(boxes_to_coco(d.boxes), d.scores.tolist(), d.labels.tolist()):
            category = dataset.label_to_category[int(label)] if coco else int(label)
            entries.append({"image_id": image_id, "category_id": category, "bbox": box, "score": float(score)})
    path = Path(path)
    path.write_text(json.dumps(entries))
    return path


def read_coco_results(path: str | os.PathLike, dataset) -> list[Detections]:
    """Read a COCO results JSON into one :class:`Detections` per image of ``dataset``.

    Categories not among the data set's classes are refused, as are images it does not hold."""
    path = Path(path)
    entries = read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: a COCO results file is a JSON list of detections")
    coco = _is_coco(dataset)
    if coco:
        row = {str(cid): i for i, cid in enumerate(dataset.coco_image_ids)}
        to_label = dataset.category_to_label
    else:
        row = _index(dataset)
        to_label = {k: k for k in range(1, len(dataset.classes) + 1)}
    n = len(dataset)
    boxes: list[list] = [[] for _ in range(n)]
    scores: list[list] = [[] for _ in range(n)]
    labels: list[list] = [[] for _ in range(n)]
    for j, e in enumerate(entries):
        where = f"{path}: entry {j}"
        if not isinstance(e, dict) or not all(k in e for k in ("image_id", "category_id", "bbox", "score")):
            raise DataError(f"{where}: needs image_id, category_id, bbox and score")
        i = row.get(str(e["image_id"]))
        if i is None:
            raise DataError(f"{where}: image_id {e['image_id']!r} is not in the data")
        category = e["category_id"]
        label = to_label.get(category) if isinstance(category, int) and not isinstance(category, bool) else None
        if label is None:
            raise DataError(f"{where}: category_id {e['category_id']!r} is not one of the data's classes")
        bb = e["bbox"]
        if not isinstance(bb, list) or len(bb) != 4 or not all(is_finite_number(v) for v in bb) \
                or not is_finite_number(e["score"]):
            raise DataError(f"{where}: bbox must be 4 finite numbers [x, y, w, h] and score a finite number")
        x, y, w, h = (float(v) for v in bb)
        boxes[i].append([x, y, x + w - 1.0, y + h - 1.0])
        scores[i].append(float(e["score"]))
        labels[i].append(label)
    return _detections(boxes, scores, labels)


# ---------------------------------------------------------------------------------------------- comp4 files


def comp4_name(split: str, class_name: str, comp_id: str = "comp4") -> str:
    """The reference's file name of one class's results: ``comp4_det_<split>_<class>.txt``."""
    return f"{comp_id}_det_{split}_{class_name}.txt"


def write_comp4(folder: str | os.PathLike, split: str, dataset, detections: Sequence[Detections]) -> list[Path]:
    """Write one ``comp4_det_<split>_<class>.txt`` per class of ``dataset`` into ``folder`` (created), lines
    ``image_id score x1 y1 x2 y2`` with 1-based coordinates; returns the paths."""
    if len(detections) != len(dataset):
        raise ValueError(f"{len(detections)} detection sets for {len(dataset)} images")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines: dict[int, list[str]] = {k: [] for k in range(1, len(dataset.classes) + 1)}
    for i, d in enumerate(detections):
        image_id = dataset[i].image_id
        for box, score, label in zip(d.boxes.double().tolist(), d.scores.tolist(), d.labels.tolist()):
            coords = " ".join(repr(v + 1.0) for v in box)
            lines[int(label)].append(f"{image_id} {float(score)!r} {coords}\n")
    paths = []
    for k, name in enumerate(dataset.classes, start=1):
        path = folder / comp4_name(split, name)
        path.write_text("".join(lines[k]))
        paths.append(path)
    return paths


def _comp4_files(folder: Path, classes: Sequence[str]) -> dict[str, Path]:
    """Each class's results file in ``folder``: ``comp4*_det_<split>_<class>.txt`` (the reference may add a
    salt: ``comp4_<salt>_det_test_<class>.txt``). The longest matching class name wins."""
    found: dict[str, Path] = {}
    pattern = re.compile(r"^comp\d*(?:_[^_]+)?_det_.+\.txt$")
    by_length = sorted(classes, key=len, reverse=True)
    for path in sorted(folder.iterdir()):
        if not pattern.match(path.name):
            continue
        for name in by_length:
            if path.name.endswith(f"_{name}.txt"):
                if name in found:
                    raise DataError(f"{folder}: two results files for class {name!r}: {found[name].name!r}, "
                                    f"{path.name!r}")
                found[name] = path
                break
    return found


def read_comp4(folder_or_file: str | os.PathLike, dataset) -> list[Detections]:
    """Read the reference's per-class results files (a folder holding them, or one of them: its folder is
    read) into one :class:`Detections` per image of ``dataset``. A class without a file has no detections;
    a folder with no results file at all is refused."""
    path = Path(folder_or_file)
    folder = path.parent if is_file(path) else path
    if not is_dir(folder):
        raise DataError(f"{path}: no such results file or folder")
    files = _comp4_files(folder, dataset.classes)
    if not files:
        raise DataError(f"{folder}: no results files comp4_det_<split>_<class>.txt for classes "
                        f"{', '.join(dataset.classes)}")
    row = _index(dataset, stems=_is_coco(dataset))
    n = len(dataset)
    boxes: list[list] = [[] for _ in range(n)]
    scores: list[list] = [[] for _ in range(n)]
    labels: list[list] = [[] for _ in range(n)]
    for k, name in enumerate(dataset.classes, start=1):
        if name not in files:
            continue
        file = files[name]
        where = shown(file)  # a file name may hold a line break
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: cannot read ({e})") from None
        for line_no, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 6:
                raise DataError(f"{where}: line {line_no}: expected 'image_id score x1 y1 x2 y2', got {line!r}")
            i = row.get(fields[0])
            if i is None:
                raise DataError(f"{where}: line {line_no}: image {fields[0]!r} is not in the data")
            try:
                numbers = [float(v) for v in fields[1:]]
            except ValueError:
                raise DataError(f"{where}: line {line_no}: non-numeric score or coordinate in {line!r}") from None
            if not all(math.isfinite(v) for v in numbers):
                raise DataError(f"{where}: line {line_no}: non-finite score or coordinate in {line!r}")
            scores[i].append(numbers[0])
            boxes[i].append([v - 1.0 for v in numbers[1:]])
            labels[i].append(k)
    return _detections(boxes, scores, labels)


def read_detections(path: str | os.PathLike, dataset) -> list[Detections]:
    """``--detections``: a COCO results JSON (a file whose name ends in ``.json``), else comp4 files."""
    path = Path(path)
    if not (is_file(path) or is_dir(path)):
        raise DataError(f"{path}: no such detections file or folder")
    if is_file(path) and path.suffix.lower() == ".json":
        return read_coco_results(path, dataset)
    return read_comp4(path, dataset)
