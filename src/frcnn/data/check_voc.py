"""``frcnn check-data`` on a VOC folder: every split (or one) read leniently, each image checked once.

:func:`check_voc` reads the annotations with the lenient :class:`frcnn.data.voc.VOCDataset` (problems
collected, not raised) and hands each distinct image to the format-neutral checks of
:mod:`frcnn.data.check_core` as a :class:`~frcnn.data.check_core.Record`.

Box values in messages are the file's own: VOC boxes 1-based ``(xmin, ymin, xmax, ymax)`` as in the XML.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from frcnn.data.check_core import Counts, DataReport, Record, check_records, sorted_unique
from frcnn.data.problems import Problem
from frcnn.errors import DataError

__all__ = ["check_voc", "voc_splits"]


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
    records = [Record(sample, str(root / "Annotations" / f"{sample.image_id}.xml"), ds_classes, _voc_box)
               for sample, ds_classes in samples.values()]
    sizes, found = check_records(records, max_pixels, progress)
    problems += found
    return DataReport(root, "voc", all_classes, split_counts, total, sorted_unique(problems), unique, sizes, datasets)


def _voc_box(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v + 1:g}" for v in box) + ")"
