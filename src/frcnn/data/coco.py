"""COCO annotation files (``instances_*.json``): read them into :class:`~frcnn.data.sample.Sample` records.

The JSON is checked here (one-line :class:`~frcnn.errors.DataError` naming the file and the record) and then
indexed with pycocotools (``COCODataset.coco``), which the COCO evaluation uses as its ground truth.

Coordinates: a COCO ``bbox`` is ``[x, y, w, h]`` in continuous pixels. Samples get the +1 convention of
:class:`~frcnn.data.sample.Sample` as py-faster-rcnn's ``coco.py`` converts them, ``x1 = x``,
``x2 = x1 + max(0, w - 1)`` (likewise for y), but **not clipped** to the image: a box that crosses the border
is kept as written, and the repairs every command applies (:func:`frcnn.data.open_repaired`,
:mod:`frcnn.data.repair`) clip it and say so, as they do for VOC data. :func:`boxes_to_coco` is the inverse
(``[x1, y1, x2 - x1 + 1, y2 - y1 + 1]``), used to write detections for pycocotools.

Policy choices:

* Classes: by default every entry of ``categories``, in increasing category id (unused ids included: they are
  classes with no ground truth). ``classes[i]`` is label ``i + 1``; ``category_ids[i]`` its COCO id, so a
  category id 0 never collides with the background label 0. Ids may be non-contiguous. An explicit
  ``classes`` list (category names) fixes the order; annotations of categories not in it are dropped (or,
  with ``drop_other_classes=False``, refused).
* ``iscrowd`` boxes are kept in the Sample with ``difficult = True``: training skips them and the VOC
  metrics ignore detections matching them; the COCO metric uses pycocotools' own crowd handling.
* Images without annotations are kept (background examples).
* ``file_name`` is resolved under the images folder (the JSON's folder unless ``images`` is given); a name
  that is absolute or leaves that folder is refused.
* Refused: JSON that does not parse, missing or mistyped fields, duplicate image/annotation/category ids,
  duplicate category names, annotations of unknown images or categories, non-finite or negative box sizes,
  boxes entirely outside their image.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from frcnn.data.images import PathOutside, open_image, path_inside
from frcnn.data.sample import Sample
from frcnn.data.voc import is_dir, is_file, shown
from frcnn.errors import DataError

__all__ = ["COCODataset", "boxes_to_coco", "is_coco_json", "read_json", "write_coco_json"]


def is_coco_json(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that looks like a COCO annotation JSON (a ``.json`` name or a leading ``{``)."""
    path = Path(path)
    if not is_file(path):
        return False
    if path.suffix.lower() == ".json":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(64).lstrip()
    except OSError:
        return False
    return head.startswith(b"{")


def boxes_to_coco(boxes: Any) -> list[list[float]]:
    """0-based inclusive ``(x1, y1, x2, y2)`` boxes (+1 convention) as COCO ``[x, y, w, h]`` lists."""
    if hasattr(boxes, "detach"):
        boxes = boxes.detach().cpu().double().tolist()
    return [[float(x1), float(y1), float(x2) - float(x1) + 1.0, float(y2) - float(y1) + 1.0]
            for x1, y1, x2, y2 in boxes]


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_finite_number(x: Any) -> bool:
    """An int or float (not a bool) that is finite as a float (an int of 400 digits is not)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


def _resolve_image(images_dir: Path, file_name: str, where: str) -> Path:
    """The absolute ``images_dir / file_name``, refusing names that leave ``images_dir``, lexically or through a
    symbolic link (:func:`frcnn.data.images.path_inside`)."""
    try:
        return path_inside(os.path.abspath(images_dir), file_name)
    except PathOutside as e:
        raise DataError(f"{where}: file_name {file_name!r} {e.says(images_dir)}") from None


def read_json(path: str | os.PathLike) -> Any:
    """The parsed JSON file, or a one-line :class:`DataError` naming it (unreadable, not JSON)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise DataError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(f"{path}: refused: JSON nested too deeply") from None


def _load_json(json_path: Path) -> dict:
    data = read_json(json_path)
    if not isinstance(data, dict):
        raise DataError(f"{json_path}: a COCO annotation file is a JSON object, got {type(data).__name__}")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{json_path}: missing list {key!r} (is this a COCO annotation file?)")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"{json_path}: 'annotations' is not a list")
    return data


def _check_categories(data: dict, json_path: Path) -> dict[int, str]:
    cats: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        where = f"{json_path}: categories[{i}]"
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise DataError(f"{where}: needs an integer 'id'")
        name = cat.get("name")
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: needs a non-empty 'name'")
        if cat["id"] in cats:
            raise DataError(f"{where}: category id {cat['id']} appears twice")
        if name.strip() in cats.values():
            raise DataError(f"{where}: category name {name.strip()!r} appears twice")
        cats[cat["id"]] = name.strip()
    return cats


def _check_images(data: dict, json_path: Path, images_dir: Path) -> dict[int, Path]:
    paths: dict[int, Path] = {}
    for i, img in enumerate(data["images"]):
        where = f"{json_path}: images[{i}]"
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise DataError(f"{where}: needs an integer 'id'")
        if img["id"] in paths:
            raise DataError(f"{where}: image id {img['id']} appears twice")
        file_name = img.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise DataError(f"{where}: needs a 'file_name'")
        for key in ("width", "height"):
            if not _is_int(img.get(key)) or img[key] < 1 or not is_finite_number(img[key]):
                raise DataError(f"{where}: '{key}' must be a positive integer, got {img.get(key)!r}")
        paths[img["id"]] = _resolve_image(images_dir, file_name, where)
    return paths


def _check_annotations(data: dict, json_path: Path, cats: dict[int, str]) -> None:
    """Validate annotations and fill the fields pycocotools needs (``area``, ``iscrowd``) in place."""
    images = {img["id"]: img for img in data["images"]}
    seen: set[int] = set()
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"{json_path}: annotations[{i}]"
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise DataError(f"{where}: needs an integer 'id'")
        where = f"{json_path}: annotation id {ann['id']}"
        if ann["id"] in seen:
            raise DataError(f"{where}: appears twice")
        seen.add(ann["id"])
        if not _is_int(ann.get("image_id")) or ann["image_id"] not in images:
            raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if not _is_int(ann.get("category_id")) or ann["category_id"] not in cats:
            raise DataError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            raise DataError(f"{where}: 'bbox' must be [x, y, w, h] numbers, got {bbox!r}")
        if not all(is_finite_number(v) for v in bbox):
            raise DataError(f"{where}: 'bbox' has a non-finite number {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise DataError(f"{where}: 'bbox' has a negative width or height {bbox!r}")
        img = images[ann["image_id"]]
        if bbox[0] >= img["width"] or bbox[1] >= img["height"] or bbox[0] + bbox[2] <= 0 or bbox[1] + bbox[3] <= 0:
            raise DataError(f"{where}: 'bbox' {bbox!r} lies outside the {img['width']}x{img['height']} image "
                            f"{img['file_name']!r}")
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise DataError(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        ann["iscrowd"] = int(crowd)
        area = ann.get("area")
        if not is_finite_number(area):
            ann["area"] = float(bbox[2] * bbox[3])


def _to_xyxy(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """The box as written (+1 convention), not clipped: clipping is a repair, counted where it is done."""
    x, y, w, h = (float(v) for v in bbox)
    return x, y, x + max(0.0, w - 1.0), y + max(0.0, h - 1.0)


class COCODataset:
    """The images of one COCO annotation JSON, annotations checked and converted once in ``__init__``.

    ``classes[i]`` is label ``i + 1`` and COCO category ``category_ids[i]`` (see the module docstring);
    ``label_to_category`` / ``category_to_label`` map between them. ``image_id`` of a Sample is the COCO image
    id as a string; ``coco_image_ids[i]`` is the integer id of sample ``i``. ``coco`` is the pycocotools
    ``COCO`` index of the whole file (ground truth for :mod:`frcnn.engine.coco_eval`).
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        images: str | os.PathLike | None = None,
        classes: Sequence[str] | None = None,
        drop_other_classes: bool = True,
    ) -> None:
        from pycocotools.coco import COCO

        self.json_path = Path(json_path)
        if not is_file(self.json_path):
            raise DataError(f"{self.json_path}: no such COCO annotation file")
        self.images_dir = Path(images) if images is not None else self.json_path.parent
        if not is_dir(self.images_dir):
            raise DataError(f"{self.images_dir}: no such images folder")
        data = _load_json(self.json_path)
        cats = _check_categories(data, self.json_path)
        paths = _check_images(data, self.json_path, self.images_dir)
        _check_annotations(data, self.json_path, cats)
        data.setdefault("annotations", [])

        by_name = {name: cid for cid, name in cats.items()}
        if classes is None:
            classes = [cats[cid] for cid in sorted(cats)]
            if not classes:
                raise DataError(f"{self.json_path}: 'categories' is empty, so there are no classes")
        self.classes: tuple[str, ...] = tuple(classes)
        if len(set(self.classes)) != len(self.classes) or not all(self.classes):
            raise DataError(f"{self.json_path}: class names must be unique and non-empty, got {list(self.classes)}")
        missing = [name for name in self.classes if name not in by_name]
        if missing:
            raise DataError(f"{self.json_path}: classes {missing} are not among its categories "
                            f"({', '.join(cats[c] for c in sorted(cats))})")
        self.category_ids: tuple[int, ...] = tuple(by_name[name] for name in self.classes)
        self.label_to_category = {i: cid for i, cid in enumerate(self.category_ids, start=1)}
        self.category_to_label = {cid: i for i, cid in self.label_to_category.items()}

        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
            coco = COCO()
            coco.dataset = data
            coco.createIndex()
        self.coco = coco

        samples = []
        for img in data["images"]:
            boxes, labels, crowd = [], [], []
            for ann in coco.imgToAnns.get(img["id"], []):
                label = self.category_to_label.get(ann["category_id"])
                if label is None:  # a category left out of ``classes``
                    if drop_other_classes:
                        continue
                    raise DataError(f"{self.json_path}: annotation id {ann['id']} has class "
                                    f"{cats[ann['category_id']]!r}, not one of {', '.join(self.classes)}")
                boxes.append(_to_xyxy(ann["bbox"]))
                labels.append(label)
                crowd.append(bool(ann["iscrowd"]))
            n = len(boxes)
            samples.append(Sample(
                image_id=str(img["id"]),
                path=paths[img["id"]],
                width=img["width"],
                height=img["height"],
                boxes=torch.tensor(boxes, dtype=torch.float32).reshape(n, 4),
                labels=torch.tensor(labels, dtype=torch.int64).reshape(n),
                difficult=torch.tensor(crowd, dtype=torch.bool).reshape(n),
            ))
        self._samples = tuple(samples)
        self.coco_image_ids: tuple[int, ...] = tuple(img["id"] for img in data["images"])
        self.ids: tuple[str, ...] = tuple(s.image_id for s in samples)
        for s in samples:
            if not is_file(s.path):
                raise DataError(f"{self.json_path}: image {s.image_id}: {shown(s.path)} does not exist")

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> Sample:
        return self._samples[i]

    def __repr__(self) -> str:
        return f"COCODataset({str(self.json_path)!r}, {len(self)} images, classes={self.classes})"

    def load_image(self, sample: Sample) -> Image.Image:
        """The sample's image in RGB; a one-line :class:`DataError` naming the file if it is unreadable, over
        the pixel limit of :mod:`frcnn.data.images`, or its size disagrees with the annotation."""
        image = open_image(sample.path)
        if image.size != (sample.width, sample.height):
            raise DataError(f"{sample.path}: image is {image.width}x{image.height} but {self.json_path.name} "
                            f"says {sample.width}x{sample.height}")
        return image


def write_coco_json(path: str | os.PathLike, dataset, images_dir: str | os.PathLike | None = None,
                    category_ids: Sequence[int] | None = None) -> Path:
    """Write ``dataset`` (any data set: classes, samples) as a COCO annotation JSON at ``path``.

    ``file_name`` is each image's path relative to ``images_dir`` (default: the JSON's folder; an image outside
    it is refused); image ids are 1, 2, ... in data set order; ``category_ids[i]`` is class ``i``'s id
    (default 1..K); a difficult box is written with ``iscrowd: 1``. Boxes go from the +1 convention to
    ``[x, y, w, h]`` (:func:`boxes_to_coco`), so reading the file back gives the same boxes."""
    path = Path(path)
    base = Path(os.path.abspath(images_dir if images_dir is not None else path.parent))
    ids = list(category_ids) if category_ids is not None else list(range(1, len(dataset.classes) + 1))
    images, annotations = [], []
    for i in range(len(dataset)):
        s = dataset[i]
        try:
            file_name = Path(os.path.abspath(s.path)).relative_to(base).as_posix()
        except ValueError:
            raise DataError(f"{s.path}: image is not inside {base}") from None
        images.append({"id": i + 1, "file_name": file_name, "width": s.width, "height": s.height})
        for box, label, crowd in zip(boxes_to_coco(s.boxes), s.labels.tolist(), s.difficult.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": ids[label - 1],
                                "bbox": box, "area": box[2] * box[3], "iscrowd": int(crowd)})
    categories = [{"id": cid, "name": name} for cid, name in zip(ids, dataset.classes)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path
