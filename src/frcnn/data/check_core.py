"""The format-neutral core of ``frcnn check-data``: the checks every data format shares, and the report.

A format's front end (:mod:`frcnn.data.check_voc`, :mod:`frcnn.data.check_coco`) reads its files leniently
into :class:`Record` s, one per distinct image: the :class:`~frcnn.data.sample.Sample` as annotated, the file
problems name, and how that file writes a box. :func:`check_records` then opens every image once with
:func:`frcnn.data.images.inspect_image` (pixel limit, real format, mode, frames, truncation) and checks every
box against the image's real size: its upright size, EXIF orientation applied, as every command reads it. An
annotation whose size is the sideways size of the pixels as stored (``exif-rotated-size``: the annotation tool
ignored the EXIF orientation, so its boxes were probably drawn on the sideways image) is not repaired: see
:func:`size_problems`. The :class:`DataReport` holds the counts (images, boxes per class per
split, images without boxes), the :class:`~frcnn.data.problems.Problem` list (file, kind, exact value,
repairable or not) and what training needs: the real image sizes and the lenient data sets, which
:class:`frcnn.data.repair.RepairedDataset` repairs.

This module imports no front end: the front ends import it, and :mod:`frcnn.data.check` imports them all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from frcnn.data.images import ImageInfo, inspect_image
from frcnn.data.problems import KINDS, Problem
from frcnn.data.repair import RepairedDataset, degenerate, duplicates, inverted
from frcnn.data.sample import Sample
from frcnn.errors import DataError

__all__ = ["Counts", "DataReport", "Record", "box_problems", "check_records", "inspect_images", "real_sizes",
           "size_problems", "sorted_unique"]


@dataclass
class Counts:
    images: int = 0
    without_boxes: int = 0
    boxes: Counter = field(default_factory=Counter)  # class name -> boxes, as annotated (before repairs)

    def add(self, sample: Sample, classes: Sequence[str]) -> None:
        self.images += 1
        self.without_boxes += int(sample.boxes.shape[0] == 0)
        self.boxes.update(classes[k - 1] for k in sample.labels.tolist())

    def to_json(self) -> dict:
        return {"images": self.images, "images_without_boxes": self.without_boxes,
                "boxes": sum(self.boxes.values()), "boxes_per_class": dict(sorted(self.boxes.items()))}


@dataclass
class DataReport:
    source: Path
    format: str  # "voc" | "coco"
    classes: tuple[str, ...]
    splits: dict[str, Counts]
    total: Counts  # over the distinct images of all checked splits
    problems: list[Problem]
    samples: list[Sample]  # distinct images, boxes as annotated
    sizes: dict[str, tuple[int, int]]  # real (width, height) of every readable image, by path
    datasets: dict = field(default_factory=dict)  # split -> the leniently read data set

    @property
    def unrepairable(self) -> list[Problem]:
        return [p for p in self.problems if not p.repairable]

    def raise_if_unrepairable(self) -> None:
        """A one-line :class:`DataError`: the first problem that cannot be repaired and how many there are."""
        bad = self.unrepairable
        if bad:
            more = f" (and {len(bad) - 1} more that cannot be repaired)" if len(bad) > 1 else ""
            raise DataError(f"{bad[0].line}{more}; run `frcnn check-data --data {self.source}` for the full list")

    def repaired(self, split: str) -> RepairedDataset:
        """The split ready for training: safe repairs applied (``.summary`` says which); refuses when a
        problem cannot be repaired."""
        self.raise_if_unrepairable()
        return RepairedDataset(self.datasets[split], self.sizes, [p for p in self.problems if p.repairable])

    def to_json(self) -> dict:
        kinds = Counter(p.kind for p in self.problems)
        return {
            "source": str(self.source), "format": self.format, "classes": list(self.classes),
            "splits": {name: c.to_json() for name, c in self.splits.items()}, "total": self.total.to_json(),
            "problem_counts": {k: {"count": n, "repairable": KINDS[k][0], "repair": KINDS[k][1]}
                               for k, n in sorted(kinds.items())},
            "unrepairable": len(self.unrepairable),
            "problems": [p.to_json() for p in self.problems],
        }


@dataclass
class Record:
    """One image as a front end read it, for :func:`check_records`: the sample (0-based boxes, as annotated),
    the annotation ``file`` its problems name, the class names its labels index (label ``k`` is
    ``classes[k - 1]``), ``show`` writing a 0-based box as the file has it, and ``names`` saying which record
    of the file each box is (None: ``box 1``, ``box 2``, ... in file order)."""

    sample: Sample
    file: str
    classes: Sequence[str]
    show: Callable[[Sequence[float]], str]
    names: Sequence[str] | None = None


def check_records(
    records: Sequence[Record], max_pixels: int | None = None, progress: bool = False
) -> tuple[dict[str, tuple[int, int]], list[Problem]]:
    """The checks every format shares, on the distinct images a front end read: each image opened once
    (:func:`inspect_images`), its annotated size against the real one (:func:`size_problems`) and every box
    (:func:`box_problems`). Returns the real ``(width, height)`` by path and the problems, in that order."""
    infos, problems = inspect_images([r.sample for r in records], max_pixels, progress)
    sizes = real_sizes(infos)
    for r in records:
        problems += size_problems(r.sample, infos.get(str(r.sample.path)), r.file)
        problems += box_problems(r.sample, sizes.get(str(r.sample.path)), r.file, r.classes, r.show, r.names)
    return sizes, problems


def sorted_unique(problems: list[Problem]) -> list[Problem]:
    """Each problem once (an image in two splits is checked once, but its annotation is read twice), sorted by
    file and box."""
    return sorted(dict.fromkeys(problems), key=lambda p: (p.file, p.box or 0, p.kind))


def inspect_images(
    samples: Sequence[Sample], max_pixels: int | None = None, progress: bool = False
) -> tuple[dict[str, ImageInfo], list[Problem]]:
    """Open every distinct image once: the :class:`ImageInfo` by path of the readable ones, and problems."""
    infos: dict[str, ImageInfo] = {}
    problems: list[Problem] = []
    paths = list(dict.fromkeys(str(s.path) for s in samples))
    for path in tqdm(paths, desc="check images", unit="img", disable=None if progress else True, dynamic_ncols=True):
        info, found = inspect_image(path, max_pixels)
        problems += found
        if info is not None:
            infos[path] = info
    return infos, problems


def real_sizes(infos: dict[str, ImageInfo]) -> dict[str, tuple[int, int]]:
    """The upright ``(width, height)`` by path: the size training, evaluation and detection read."""
    return {path: (info.width, info.height) for path, info in infos.items()}


_TURNS = {5: "transposed", 6: "rotated 90 degrees clockwise", 7: "transversed",
          8: "rotated 90 degrees counter-clockwise"}


def size_problems(sample: Sample, info: ImageInfo | None, file: str) -> list[Problem]:
    """The annotation's image size disagrees with the real (upright) one; a missing size is the reader's problem.

    When the annotated size is the size of the pixels as stored and the EXIF orientation turns the image
    (tags 5..8 swap width and height), the kind is ``exif-rotated-size``, not ``size-mismatch``: the boxes were
    probably drawn by a tool that ignored EXIF, on the sideways image, but they may as well have been drawn
    upright with only the size written wrong, so nothing is repaired; the message names both sizes. (Tags 2..4
    mirror or turn by 180 degrees without changing the size, and a square image keeps its size: those cannot be
    told apart from the size alone.)"""
    if info is None or sample.width == 0:
        return []
    annotated, upright = (sample.width, sample.height), (info.width, info.height)
    if annotated == upright:
        return []
    said = f"annotation says the image is {sample.width}x{sample.height}"
    if info.orientation >= 5 and annotated == info.stored_size:
        stored = "x".join(map(str, info.stored_size))
        return [Problem(file, "exif-rotated-size", (
            f"{said}, the size of {sample.path} as stored ({stored}), but its EXIF orientation {info.orientation} "
            f"({_TURNS[info.orientation]}) makes it {upright[0]}x{upright[1]} upright, as frcnn reads it: the "
            "annotation tool probably ignored EXIF and the boxes are on the sideways image; re-annotate upright, or "
            "save the pixels upright without the tag if the boxes match the stored pixels"),
            image_id=sample.image_id)]
    return [Problem(file, "size-mismatch", f"{said} but {sample.path} is {upright[0]}x{upright[1]}",
                    image_id=sample.image_id)]


def box_problems(
    sample: Sample,
    real: tuple[int, int] | None,
    file: str,
    classes: Sequence[str],
    show: Callable[[Sequence[float]], str],
    names: Sequence[str] | None = None,
) -> list[Problem]:
    """Inverted, degenerate, duplicate boxes, and boxes crossing or outside the image (real size if known,
    else the annotated one). ``show`` writes a 0-based box as the file has it; ``names`` says which record
    each box is (default ``box 1``, ``box 2``, ... in file order)."""
    width, height = real if real is not None else (sample.width, sample.height)
    boxes = sample.boxes
    flags = zip(inverted(boxes).tolist(), degenerate(boxes).tolist(), duplicates(boxes, sample.labels).tolist())
    found = []
    for i, (box, label, flag) in enumerate(zip(boxes.tolist(), sample.labels.tolist(), flags)):
        what = f"{names[i] if names else f'box {i + 1}'} ({classes[label - 1]}) {show(box)}"
        found += [Problem(file, kind, f"{what} {message}", box=i + 1, image_id=sample.image_id)
                  for kind, message in _box_kinds(box, *flag, width, height)]
    return found


def _box_kinds(box: list[float], bad_shape: bool, flat: bool, twice: bool, width: int, height: int):
    x1, y1, x2, y2 = box
    if bad_shape:
        return [("inverted-box", "is inverted (max < min)")]
    kinds = []
    if flat:
        pixels = f"{x2 - x1 + 1:g}x{y2 - y1 + 1:g}"
        kinds.append(("degenerate-box", f"has zero extent (min == max: {pixels} pixel under the +1 convention)"))
    if width > 0 and height > 0:
        if x1 > width - 1 or y1 > height - 1 or x2 < 0 or y2 < 0:
            kinds.append(("box-outside-image", f"lies entirely outside the {width}x{height} image"))
        elif x1 < 0 or y1 < 0 or x2 > width - 1 or y2 > height - 1:
            kinds.append(("box-crosses-border", f"crosses the border of the {width}x{height} image"))
    if twice:
        kinds.append(("duplicate-box", "repeats an earlier box of the same class"))
    return kinds
