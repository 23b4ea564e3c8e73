"""``frcnn check-data``: every problem of a data set, found before training, in one report.

:func:`check_voc` reads a VOC folder leniently (every split, or one), opens every image once with
:func:`frcnn.data.images.inspect_image` (pixel limit, real format, mode, frames, truncation) and checks every box
against the image's real size: its upright size, EXIF orientation applied, as every command reads it. An
annotation whose size is the sideways size of the pixels as stored (``exif-rotated-size``: the annotation tool
ignored the EXIF orientation, so its boxes were probably drawn on the sideways image) is not repaired: see
:func:`size_problems`. The :class:`DataReport` holds the counts (images, boxes per class per
split, images without boxes), the :class:`~frcnn.data.problems.Problem` list (file, kind, exact value,
repairable or not) and what training needs: the real image sizes and the lenient data sets, which
:class:`frcnn.data.repair.RepairedDataset` repairs.

Box values in messages are the file's own: VOC boxes 1-based ``(xmin, ymin, xmax, ymax)`` as in the XML.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from frcnn.data.images import ImageInfo, inspect_image
from frcnn.data.problems import KINDS, Problem
from frcnn.data.repair import RepairedDataset, degenerate, duplicates, inverted, repair_sample
from frcnn.data.sample import Sample
from frcnn.errors import DataError

__all__ = ["Counts", "DataReport", "check_voc", "voc_splits"]


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


# ---------------------------------------------------------------------------------------------- VOC


def voc_splits(root: Path) -> list[str]:
    """The image sets of a VOC folder (``ImageSets/Main/*.txt`` without the per-class ``cat_train`` files)."""
    sets_dir = root / "ImageSets" / "Main"
    return sorted(p.stem for p in sets_dir.glob("*.txt") if "_" not in p.stem) if sets_dir.is_dir() else []


def check_voc(
    root: str | os.PathLike,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    max_pixels: int | None = None,
    progress: bool = False,
) -> DataReport:
    """Check one split (or every split when ``split`` is None) of a VOC folder; see the module doc."""
    from frcnn.data.voc import VOCDataset

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such data folder")
    names = [split] if split is not None else voc_splits(root)
    if not names:
        raise DataError(f"{root / 'ImageSets' / 'Main'}: no split files (a VOC root holds ImageSets/Main/<split>.txt)")
    problems: list[Problem] = []
    datasets = {name: VOCDataset(root, name, classes, problems) for name in names}
    split_counts, samples = {}, {}
    for name, ds in datasets.items():
        split_counts[name] = Counts()
        for sample in ds:
            split_counts[name].add(sample, ds.classes)
            samples.setdefault(sample.image_id, (sample, ds.classes))
        # images listed whose annotation could not be read still count as images of the split
        split_counts[name].images += len(ds.listed) - len(ds)
    all_classes = tuple(classes) if classes is not None else tuple(sorted({c for ds in datasets.values()
                                                                           for c in ds.classes}))
    total = Counts()
    for sample, ds_classes in samples.values():
        total.add(sample, ds_classes)
    total.images += len({i for ds in datasets.values() for i in ds.listed} - set(samples))
    unique = [s for s, _ in samples.values()]
    infos, image_problems = inspect_images(unique, max_pixels, progress)
    sizes = real_sizes(infos)
    problems += image_problems
    for sample, ds_classes in samples.values():
        xml = str(root / "Annotations" / f"{sample.image_id}.xml")
        problems += size_problems(sample, infos.get(str(sample.path)), xml)
        problems += box_problems(sample, sizes.get(str(sample.path)), xml, ds_classes, _voc_box)
    return DataReport(root, "voc", all_classes, split_counts, total, sorted_unique(problems), unique, sizes, datasets)


def _voc_box(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v + 1:g}" for v in box) + ")"


# ---------------------------------------------------------------------------------------------- shared


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
    from frcnn.data.check_coco import check_coco

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
