"""``frcnn check-data`` on a COCO annotation JSON: the raw file read leniently, every problem listed.

The strict reader (:class:`frcnn.data.coco.COCODataset`) refuses a file at its first problem; here each
image and annotation record is checked on its own: a ``file_name`` that leaves the images folder, a
missing or unreadable image, a ``bbox`` that is not four finite numbers, a negative width or height
(``inverted-box``), a zero width or height (``zero-area-box``, dropped for training), a box crossing or
outside its image, a duplicate, an annotation of an unknown image or category. Boxes are read as the strict
reader does (``x2 = x + max(0, w - 1)``, +1 convention) but without clipping, so that crossing boxes show.
Each image becomes a :class:`~frcnn.data.check_core.Record` for the format-neutral checks of
:mod:`frcnn.data.check_core` (images opened once, sizes, boxes); this module never imports
:mod:`frcnn.data.check`, which picks it for a JSON.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from frcnn.data.check_core import Counts, DataReport, Record, check_records, sorted_unique
from frcnn.data.images import PathOutside, path_inside
from frcnn.data.problems import Problem
from frcnn.data.sample import Sample
from frcnn.errors import DataError

__all__ = ["check_coco"]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _coco_box(box: Sequence[float]) -> str:
    x1, y1, x2, y2 = box
    return f"[{x1:g}, {y1:g}, {x2 - x1 + 1:g}, {y2 - y1 + 1:g}]"


def _load(json_path: Path) -> tuple[dict | None, list[Problem]]:
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise DataError(f"{json_path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        return None, [Problem(str(json_path), "unparsable-annotation", f"not valid JSON ({e})")]
    except RecursionError:
        return None, [Problem(str(json_path), "unparsable-annotation", "JSON nested too deeply")]
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list) or not isinstance(data.get("annotations", []), list):
        message = "not a COCO annotation file (an object with lists 'images', 'categories', 'annotations')"
        return None, [Problem(str(json_path), "unparsable-annotation", message)]
    return data, []


def _images(data: dict, json_path: Path, images_dir: Path, problems: list[Problem]) -> dict[int, dict]:
    """Image records by id, each with its resolved ``path`` (records that cannot be used are problems)."""
    base = os.path.abspath(images_dir)
    out: dict[int, dict] = {}
    for i, img in enumerate(data["images"]):
        def bad(kind: str, message: str, i=i) -> None:
            problems.append(Problem(str(json_path), kind, f"images[{i}]: {message}"))

        if not isinstance(img, dict) or not _is_int(img.get("id")) or img["id"] in out:
            bad("bad-annotation", "needs a unique integer 'id'")
            continue
        name = img.get("file_name")
        if not isinstance(name, str) or not name:
            bad("bad-annotation", f"image id {img['id']} needs a 'file_name'")
            continue
        try:
            target = path_inside(base, name)
        except PathOutside as e:
            bad("path-outside-data", f"file_name {name!r} {e.says(images_dir)}")
            continue
        size = [img.get(k) for k in ("width", "height")]
        if not all(_is_int(v) and v >= 1 for v in size):
            bad("size-missing", f"image id {img['id']} ({name}) has width, height {size[0]!r}, {size[1]!r}")
            size = [0, 0]
        out[img["id"]] = {"path": target, "width": size[0], "height": size[1], "id": img["id"]}
    return out


def _box(ann: dict, where: str, json_path: Path, problems: list[Problem]) -> tuple[float, ...] | None:
    """The 0-based +1 box of an annotation, or None (a problem recorded) when it has none usable."""
    bbox = ann.get("bbox")
    if (not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        problems.append(Problem(str(json_path), "bad-annotation", f"{where}: 'bbox' must be [x, y, w, h] finite "
                                                                  f"numbers, got {bbox!r}"))
        return None
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        problems.append(Problem(str(json_path), "inverted-box", f"{where}: 'bbox' {bbox!r} has a negative width "
                                                                f"or height"))
        return None
    if w == 0 or h == 0:
        problems.append(Problem(str(json_path), "zero-area-box", f"{where}: 'bbox' {bbox!r} has zero area"))
        return None
    return x, y, x + max(0.0, w - 1.0), y + max(0.0, h - 1.0)


def check_coco(
    json_path: str | os.PathLike,
    images: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    max_pixels: int | None = None,
    progress: bool = False,
) -> DataReport:
    """Check a COCO annotation JSON and its images (``images`` folder, default the JSON's folder)."""
    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError(f"{json_path}: no such COCO annotation file")
    images_dir = Path(images) if images is not None else json_path.parent
    data, problems = _load(json_path)
    if data is None:
        return DataReport(json_path, "coco", (), {}, Counts(), problems, [], {})
    cats = {c["id"]: str(c["name"]).strip() for c in data["categories"]
            if isinstance(c, dict) and _is_int(c.get("id")) and isinstance(c.get("name"), str)}
    classes = tuple(classes) if classes is not None else tuple(cats[k] for k in sorted(cats))
    label_of = {cid: classes.index(name) + 1 for cid, name in cats.items() if name in classes}
    records = _images(data, json_path, images_dir, problems)
    per_image: dict[int, list] = {i: [] for i in records}
    for k, ann in enumerate(data.get("annotations", [])):
        where = f"annotation id {ann.get('id')!r}" if isinstance(ann, dict) else f"annotations[{k}]"
        if not isinstance(ann, dict) or ann.get("image_id") not in per_image:
            image_id = ann.get("image_id") if isinstance(ann, dict) else None
            problems.append(Problem(str(json_path), "bad-annotation", f"{where}: image_id {image_id!r} is not a "
                                                                      f"usable entry of 'images'"))
            continue
        if ann.get("category_id") not in cats:
            message = f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'"
            problems.append(Problem(str(json_path), "unknown-class", message))
            continue
        box = _box(ann, where, json_path, problems)
        if box is not None and ann["category_id"] in label_of:
            per_image[ann["image_id"]].append((where, box, label_of[ann["category_id"]], ann.get("iscrowd") == 1))
    samples, names = [], []
    for image_id, img in records.items():
        anns = per_image[image_id]
        n = len(anns)
        samples.append(Sample(str(image_id), img["path"], img["width"], img["height"],
                              torch.tensor([a[1] for a in anns], dtype=torch.float32).reshape(n, 4),
                              torch.tensor([a[2] for a in anns], dtype=torch.int64).reshape(n),
                              torch.tensor([a[3] for a in anns], dtype=torch.bool).reshape(n)))
        names.append([a[0] for a in anns])
    counts = Counts()
    for s in samples:
        counts.add(s, classes)
    records = [Record(s, str(json_path), classes, _coco_box, box_names) for s, box_names in zip(samples, names)]
    sizes, found = check_records(records, max_pixels, progress)
    problems += found
    return DataReport(json_path, "coco", classes, {json_path.stem: counts}, counts, sorted_unique(problems), samples,
                      sizes)
