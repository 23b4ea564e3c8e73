"""Safe repairs of a data set before training, summarised in one line.

What is repaired (everything else that :mod:`frcnn.data.check` finds stops training):

* a box crossing the image border is clipped to the image (``0 <= x <= width - 1``);
* a degenerate box is dropped: zero extent in the file (VOC ``xmin == xmax`` or ``ymin == ymax``, one pixel
  under the +1 convention; COCO ``w`` or ``h`` <= 1), also when clipping leaves one. Such a box has no shape
  an anchor can match or a detector can learn: BCCD's two 1x1-pixel "RBC" boxes (BloodImage_00338 and
  BloodImage_00343) are dropped;
* a duplicate box (same class and coordinates as an earlier box of the same image) is dropped;
* an image whose annotation gives no size gets its real size;
* an image that is not RGB is converted when it is read (:func:`frcnn.data.images.open_image`), and a file
  whose extension lies is read by its content.

This is the one policy of every command that reads annotated data: training, evaluation (``frcnn eval``, the
validation of ``frcnn train --val-split``, ``frcnn report --data``) all read their data through
:func:`frcnn.data.open_repaired`, which checks it as ``frcnn check-data`` does, stops on what cannot be
repaired and applies these repairs (:class:`RepairedDataset`), so a model is scored on the boxes it was trained
to find. ``RepairedDataset.summary`` is the one line that says what was repaired and ``RepairedDataset.repairs``
the ground-truth boxes ``{"clipped": n, "dropped": m}``. On COCO data the pycocotools ground truth
(``RepairedDataset.coco``) holds the repaired boxes too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections import Counter
from collections.abc import Mapping

import torch
from PIL import Image
from torch import Tensor

from frcnn.boxes import clip_boxes
from frcnn.data.images import open_image
from frcnn.data.problems import Problem
from frcnn.data.sample import Sample
from frcnn.errors import DataError

__all__ = ["RepairedDataset", "degenerate", "duplicates", "repair_sample"]


def degenerate(boxes: Tensor) -> Tensor:
    """(N,) bool: boxes with zero extent in their file's terms (``x2 == x1`` or ``y2 == y1``, 0-based +1)."""
    return ((boxes[:, 2] == boxes[:, 0]) | (boxes[:, 3] == boxes[:, 1])) & inverted(boxes).logical_not()


def inverted(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])


def duplicates(boxes: Tensor, labels: Tensor) -> Tensor:
    """(N,) bool: True where a box repeats an earlier box of the same label exactly."""
    seen: set[tuple] = set()
    out = []
    for row in torch.cat((labels[:, None].to(boxes.dtype), boxes), dim=1).tolist():
        key = tuple(row)
        out.append(key in seen)
        seen.add(key)
    return torch.tensor(out, dtype=torch.bool)


def repair_sample(sample: Sample, width: int, height: int) -> tuple[Sample, Counter]:
    """The sample with its real size, boxes clipped, degenerate and duplicate boxes dropped; and the counts
    ``clipped``, ``degenerate``, ``duplicate``. Inverted boxes are left alone (they are not repairable)."""
    repaired, counts, _, _ = _repair(sample, width, height)
    return repaired, counts


def _repair(sample: Sample, width: int, height: int) -> tuple[Sample, Counter, Tensor, Tensor]:
    """:func:`repair_sample`, and per box of ``sample``: kept, and changed by clipping (both (N,) bool)."""
    boxes = sample.boxes
    clipped = clip_boxes(boxes, height, width)
    changed = (clipped != boxes).any(dim=1) & inverted(boxes).logical_not()
    boxes = torch.where(inverted(boxes)[:, None], boxes, clipped)
    drop_degenerate = degenerate(boxes)
    drop_duplicate = duplicates(boxes, sample.labels) & drop_degenerate.logical_not()
    keep = (drop_degenerate | drop_duplicate).logical_not()
    counts = Counter(clipped=int((changed & keep).sum()), degenerate=int(drop_degenerate.sum()),
                     duplicate=int(drop_duplicate.sum()))
    repaired = dataclasses.replace(sample, width=width, height=height, boxes=boxes[keep],
                                   labels=sample.labels[keep], difficult=sample.difficult[keep])
    return repaired, counts, keep, changed


def _ids(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class RepairedDataset:
    """``dataset`` with :func:`repair_sample` applied to every sample, ``sizes`` the real ``(width, height)``
    of each image path; ``problems`` (the repairable ones of the check) only feed :attr:`summary`.

    ``summary``: one line saying what was repaired ("" when nothing); ``repairs``: the ground-truth boxes
    ``{"clipped": n, "dropped": m}`` (dropped: degenerate or duplicate). A COCO data set (one with a
    pycocotools ``coco`` index) gets a ``coco`` index of the repaired boxes: clipped boxes rewritten (their
    ``area`` the clipped box's), dropped ones left out, everything else as in the file."""

    def __init__(self, dataset, sizes: Mapping[str, tuple[int, int]], problems: list[Problem] = ()) -> None:
        self.dataset = dataset
        self.classes = tuple(dataset.classes)
        samples, done = [], {"clipped": [], "degenerate": [], "duplicate": []}
        changes: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # sample index -> keep, clipped, repaired boxes
        for i, sample in enumerate(dataset[i] for i in range(len(dataset))):
            repaired, counts, keep, clipped = _repair(sample, *sizes.get(str(sample.path),
                                                                         (sample.width, sample.height)))
            samples.append(repaired)
            for key, n in counts.items():
                done[key] += [sample.image_id] * n
            if not bool(keep.all()) or bool(clipped.any()):
                changes[i] = (keep, clipped & keep, repaired.boxes)
        self._samples = tuple(samples)
        self.summary = _summary(done, problems)
        self.repairs = {"clipped": len(done["clipped"]), "dropped": len(done["degenerate"]) + len(done["duplicate"])}
        if changes and getattr(dataset, "coco", None) is not None and hasattr(dataset, "category_to_label"):
            self.coco = _repaired_coco(dataset, changes)

    def __len__(self) -> int:
        return len(self._samples)

    def __getitem__(self, i: int) -> Sample:
        return self._samples[i]

    def __getattr__(self, name: str):  # root, coco, ... of the wrapped data set
        if name == "dataset":  # not yet set (copy/pickle): avoid recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def load_image(self, sample: Sample) -> Image.Image:
        image = open_image(sample.path)
        if image.size != (sample.width, sample.height):
            raise DataError(f"{sample.path}: image is {image.width}x{image.height}, "
                            f"expected {sample.width}x{sample.height}")
        return image


def _repaired_coco(dataset, changes: Mapping[int, tuple[Tensor, Tensor, Tensor]]):
    """A pycocotools ``COCO`` index of ``dataset.coco``'s file with the repairs of ``changes`` applied. The boxes
    of sample ``i`` are the annotations of its image whose category is one of the data set's classes, in file
    order (as :class:`frcnn.data.coco.COCODataset` reads them)."""
    from pycocotools.coco import COCO

    from frcnn.data.coco import boxes_to_coco

    original = dataset.coco
    replaced: dict[int, dict | None] = {}  # annotation id -> repaired annotation, or None: dropped
    for i, (keep, clipped, boxes) in changes.items():
        anns = [a for a in original.imgToAnns.get(dataset.coco_image_ids[i], [])
                if a["category_id"] in dataset.category_to_label]
        kept = iter(boxes_to_coco(boxes))
        for ann, k, c in zip(anns, keep.tolist(), clipped.tolist()):
            if not k:
                replaced[ann["id"]] = None
                continue
            box = next(kept)
            if c:
                replaced[ann["id"]] = {**ann, "bbox": box, "area": box[2] * box[3]}
    annotations = [replaced.get(a["id"], a) for a in original.dataset.get("annotations", [])]
    coco = COCO()
    coco.dataset = {**original.dataset, "annotations": [a for a in annotations if a is not None]}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _summary(done: dict[str, list[str]], problems: list[Problem]) -> str:
    """One line, or "" when nothing was repaired."""
    parts = []
    for key, text in (("clipped", "clipped {} boxes to their image"), ("degenerate", "dropped {} degenerate boxes"),
                      ("duplicate", "dropped {} duplicate boxes")):
        if done[key]:
            parts.append(text.format(len(done[key])) + f" ({_ids(sorted(set(done[key])))})")
    by_kind = Counter(p.kind for p in problems)
    if by_kind["image-mode"]:
        parts.append(f"converting {by_kind['image-mode']} images to RGB")
    if by_kind["format-mismatch"]:
        parts.append(f"reading {by_kind['format-mismatch']} images whose extension disagrees with their content")
    if by_kind["multi-frame-image"]:
        parts.append(f"using the first frame of {by_kind['multi-frame-image']} multi-frame images")
    if by_kind["size-missing"]:
        parts.append(f"using the real size of {by_kind['size-missing']} images whose annotation has none")
    return ("repaired: " + "; ".join(parts)) if parts else ""
