"""Data sets: PASCAL VOC folders, COCO annotation files and the synthetic shapes set used by ``frcnn demo``.

:func:`open_dataset` is the one entry point of the command line: it detects the format of ``--data``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from frcnn.data.sample import Sample
from frcnn.errors import DataError

__all__ = ["ClassSubset", "open_dataset", "open_repaired", "parse_classes"]


def parse_classes(text_or_file: str | os.PathLike) -> tuple[str, ...]:
    """The class list of ``--classes``: a comma-separated list (``"a,b,c"``) or a file with one name a line
    (or comma-separated; blank lines and ``#`` comments skipped). Names are stripped; the order is kept.

    Raises :class:`DataError` for an empty list or a name given twice.
    """
    text = str(text_or_file)
    path = Path(text)
    source, from_file = text, "," not in text and path.is_file()
    if from_file:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read the class list ({e})") from None
    names: list[str] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0] if from_file else line
        names += [n.strip() for n in line.split(",") if n.strip()]
    if not names:
        raise DataError(f"--classes {source}: no class names")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"--classes {source}: {', '.join(twice)} given twice")
    return tuple(names)


class ClassSubset:
    """A data set seen through another class list: labels renumbered to ``classes``, boxes of the data set's
    other classes dropped. Everything else (``load_image``, attributes such as ``root``) is the data set's."""

    def __init__(self, dataset, classes: Sequence[str]) -> None:
        import torch

        self.dataset = dataset
        self.classes: tuple[str, ...] = tuple(classes)
        index = {name: i for i, name in enumerate(self.classes, start=1)}
        self._map = torch.tensor([0] + [index.get(name, 0) for name in dataset.classes], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Sample:
        s = self.dataset[i]
        labels = self._map[s.labels]
        keep = labels > 0
        return Sample(s.image_id, s.path, s.width, s.height, s.boxes[keep], labels[keep], s.difficult[keep])

    def load_image(self, sample: Sample) -> Image.Image:
        return self.dataset.load_image(sample)

    def __getattr__(self, name: str):
        if name == "dataset":  # not yet set (copy/pickle): avoid recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __repr__(self) -> str:
        return f"ClassSubset({self.dataset!r}, classes={self.classes})"


def _coco_json(path: Path, split: str | None) -> Path:
    """The COCO JSON to read: ``path`` itself, or the one ``split`` names (a ``.json`` path, or
    ``<path's folder>/<split>.json``) when ``split`` is given and is not ``path``'s own stem."""
    if split is None or split == path.stem:
        return path
    candidates = [Path(split)] if split.endswith(".json") else []
    candidates.append(path.parent / (split if split.endswith(".json") else f"{split}.json"))
    for c in candidates:
        if _asks(c, "is_file"):
            return c
    raise DataError(f"--split {split!r}: {path} is a COCO file; a split names another COCO JSON, "
                    f"but {candidates[-1]} does not exist")


def open_dataset(
    path: str | os.PathLike,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    images: str | os.PathLike | None = None,
    *,
    drop_other_classes: bool = True,
):
    """Open ``--data``: a PASCAL VOC root or a COCO annotation JSON, detected from what ``path`` is.

    * A folder holding ``Annotations/`` is a VOC root: ``split`` is required (``ImageSets/Main/<split>.txt``);
      ``images`` must be None (VOC images are in ``JPEGImages/``). Returns a
      :class:`~frcnn.data.voc.VOCDataset` (or a :class:`ClassSubset` of one, see ``classes``).
    * A file (``.json`` or starting with ``{``) is a COCO annotation JSON, images resolved relative to the
      JSON's folder or to ``images``. ``split`` may be None or the JSON's own stem (ignored), or name another
      JSON: a ``.json`` path or ``<folder of path>/<split>.json`` (so ``--data coco/train.json
      --val-split val`` reads ``coco/val.json``). Returns a :class:`~frcnn.data.coco.COCODataset`.

    ``classes`` (names; e.g. from :func:`parse_classes` or a checkpoint) fixes the order of the labels
    (``classes[i]`` is label ``i + 1``) and drops every box of another class; with ``drop_other_classes=False``
    a box of another class is a :class:`DataError` instead (evaluating a checkpoint on data it cannot know).
    Without ``classes`` the classes are the data's own (VOC: sorted names found in the split; COCO: all
    categories in id order).

    Every result has ``classes``, ``__len__``, ``__getitem__`` (a :class:`Sample`) and ``load_image``.
    Raises :class:`DataError` (one line) when ``path`` is neither, or for any problem in the data.
    """
    classes = tuple(classes) if classes is not None else None
    kind, source = _detect(Path(path), split, images)
    if kind == "voc":
        return _open_voc(source, split, classes, drop_other_classes)
    from frcnn.data.coco import COCODataset

    return COCODataset(source, images=images, classes=classes, drop_other_classes=drop_other_classes)


def _detect(path: Path, split: str | None, images: str | os.PathLike | None) -> tuple[str, Path]:
    """``("voc", root)`` or ``("coco", the JSON to read)``; the one-line errors of :func:`open_dataset`."""
    is_dir, is_file = _asks(path, "is_dir"), _asks(path, "is_file")
    if is_dir and _asks(path / "Annotations", "is_dir"):
        if images is not None:
            raise DataError(f"--images is for COCO data; {path} is a VOC root (its images are in JPEGImages/)")
        if split is None:
            raise DataError(f"{path} is a VOC root: give --split (an image set in ImageSets/Main/)")
        return "voc", path
    if is_file:
        from frcnn.data.coco import is_coco_json

        if not is_coco_json(path):
            raise DataError(f"{path}: not a COCO annotation JSON (expected a .json file) nor a VOC root folder")
        return "coco", _coco_json(path, split)
    if is_dir:
        raise DataError(f"{path}: neither a VOC root (no Annotations/ folder) nor a COCO annotation JSON")
    raise DataError(f"{path}: no such data folder or file")


def _asks(path: Path, question: str) -> bool:
    """``path.is_dir()`` / ``path.is_file()``, False for a name the OS cannot look up (too long, a NUL)."""
    try:
        return getattr(path, question)()
    except (OSError, ValueError):
        return False


def open_repaired(
    path: str | os.PathLike,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    images: str | os.PathLike | None = None,
    *,
    drop_other_classes: bool = True,
    progress: bool = False,
):
    """``--data`` as every command reads it: the same data, boxes and repairs as ``frcnn train``.

    The data is checked first (:func:`frcnn.data.check.check_data`: every image opened once, every box
    against the image's real size); a problem training would stop on is a one-line :class:`DataError` (the
    first one, how many more, and the check-data command that lists them). Then the repairs of
    :mod:`frcnn.data.repair`: boxes crossing the border clipped, degenerate (1-pixel, zero-area) and duplicate
    boxes dropped, missing sizes filled in. ``path``, ``split``, ``images``, ``classes`` and
    ``drop_other_classes`` are those of :func:`open_dataset`.

    Returns a :class:`~frcnn.data.repair.RepairedDataset`: ``summary`` is the one line training prints
    (``"repaired: ..."``, "" when nothing was repaired), ``repairs`` the ground-truth boxes
    ``{"clipped": n, "dropped": m}`` of the classes read; on COCO data it keeps the COCO attributes
    (``coco``, with the repaired boxes, ``category_ids``, ...)."""
    from frcnn.data.check import check_data
    from frcnn.data.repair import RepairedDataset

    path = Path(path)
    classes = tuple(classes) if classes is not None else None
    kind, source = _detect(path, split, images)
    report = check_data(source, split if kind == "voc" else None, None, images, progress=progress)
    report.raise_if_unrepairable()
    if kind == "voc":
        dataset = report.datasets[split]
        if classes is not None:
            if not drop_other_classes:
                _refuse_other_classes(dataset, classes)
            dataset = ClassSubset(dataset, classes)
    else:
        from frcnn.data.coco import COCODataset

        dataset = COCODataset(source, images=images, classes=classes, drop_other_classes=drop_other_classes)
    return RepairedDataset(dataset, report.sizes, [p for p in report.problems if p.repairable])


def _refuse_other_classes(dataset, classes: tuple[str, ...]) -> None:
    """A one-line :class:`DataError` for the first box of ``dataset`` whose class is not in ``classes``."""
    known = set(classes)
    for i in range(len(dataset)):
        sample = dataset[i]
        for k, label in enumerate(sample.labels.tolist(), start=1):
            name = dataset.classes[label - 1]
            if name not in known:
                xml = Path(dataset.root) / "Annotations" / f"{sample.image_id}.xml"
                raise DataError(f"{xml}: box {k} has unknown class {name!r} (known classes: {', '.join(classes)})")


def _open_voc(root: Path, split: str, classes: tuple[str, ...] | None, drop_other_classes: bool = True):
    from frcnn.data.voc import VOCDataset

    if classes is None:
        return VOCDataset(root, split)
    try:
        return VOCDataset(root, split, classes=classes)
    except DataError as strict:
        if not drop_other_classes:
            raise
        # The split may hold classes outside ``classes``: read it with all of its classes and drop those.
        try:
            full = VOCDataset(root, split)
        except DataError:
            raise strict from None
        if set(full.classes) <= set(classes):
            raise strict from None  # the problem was not an extra class
        return ClassSubset(full, classes)
