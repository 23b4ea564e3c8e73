"""A second real data set for the from-scratch benchmarks: BCCD's white cells as large, one-class objects.

BCCD's cells are small (RBC and platelets ~50-100 px of a 640x480 image); the data sets users bring often have
one large object per image (a pet, a product, a part). This script makes such a set from BCCD's own pictures,
so that ``bench_accuracy.py`` can measure frcnn and torchvision on both kinds without any download:

    .venv/bin/python benchmarks/make_wbc_crops.py --out /tmp/wbc            # then
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_accuracy.py --config scratch-cpu --data /tmp/wbc \\
        --threads 1 --out /tmp/wbc.md
    options: --bccd VOC_ROOT (default ../shared/datasets/BCCD/BCCD), --seed N (default 0)

For every image of BCCD's ``trainval`` and ``test`` (the split is kept, so no test picture is ever trained on):
one of its white cells (WBC) is drawn at random, and a square window is cut around it whose side makes the
cell's longer side a uniform 45..90 % of the window (the window is at most the image's shorter side), placed
uniformly among the positions that hold the whole cell. Only the class WBC is written. Another white cell
reaching into the window is kept, clipped to the window, when at least half of it is inside; when less is
inside (a sliver a detector cannot be asked to find) another placement is drawn, and after 20 the image is left
out. Images without a white cell are left out. Boxes keep frcnn's convention: 0-based inclusive pixels in
memory, 1-based in the XML (:func:`frcnn.data.voc.write_voc_xml`); pixels are copied, never resampled (JPEG
quality 95, 4:4:4).

Deterministic: image ``ID`` is drawn from ``random.Random(f"{seed}:{ID}")`` only. BCCD is MIT-licensed; the
output folder says where it came from (``SOURCE.txt``) and is never written into an existing non-empty folder.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from PIL import Image

from frcnn.data.voc import VOCDataset, write_voc_xml
from frcnn.errors import FrcnnError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BCCD = REPO.parent / "shared" / "datasets" / "BCCD" / "BCCD"
CLASS = "WBC"
SPLITS = ("trainval", "test")
MIN_FRACTION, MAX_FRACTION = 0.45, 0.90  # the cell's longer side over the window's side
MIN_INSIDE = 0.5  # another cell is kept (clipped) when at least this share of its area is inside the window
PLACEMENTS = 20
JPEG_QUALITY = 95

T = TypeVar("T")
Box = tuple[float, float, float, float]  # 0-based inclusive (x1, y1, x2, y2)


def area(box: Box) -> float:
    return max(0.0, box[2] - box[0] + 1) * max(0.0, box[3] - box[1] + 1)


def clip_to_window(box: Box, x0: int, y0: int, side: int) -> Box:
    """``box`` in window coordinates (window ``[x0, x0 + side) x [y0, y0 + side)``), clipped to the window."""
    return (max(box[0] - x0, 0.0), max(box[1] - y0, 0.0),
            min(box[2] - x0, side - 1.0), min(box[3] - y0, side - 1.0))


def inside_fraction(box: Box, x0: int, y0: int, side: int) -> float:
    """The share of ``box``'s pixels that lie inside the window (0 when it misses the window)."""
    return area(clip_to_window(box, x0, y0, side)) / area(box)


def window_side(cell: Box, width: int, height: int, rng: random.Random) -> int:
    """The window's side: the cell's longer side over a uniform 45..90 %, at most the image's shorter side and at
    least the cell's longer side."""
    longer = max(cell[2] - cell[0] + 1, cell[3] - cell[1] + 1)
    side = round(longer / rng.uniform(MIN_FRACTION, MAX_FRACTION))
    return int(max(min(side, width, height), min(longer, width, height)))


def place_window(cell: Box, side: int, width: int, height: int, rng: random.Random) -> tuple[int, int]:
    """A uniform top-left corner among those that keep the whole cell (and the window) inside the image."""
    def axis(lo: float, hi: float, size: int) -> int:
        first, last = max(0, int(hi) + 1 - side), min(int(lo), size - side)
        return rng.randint(first, max(first, last))
    return axis(cell[0], cell[2], width), axis(cell[1], cell[3], height)


def crop_one(boxes: list[Box], width: int, height: int, rng: random.Random) -> tuple[int, int, int, list[Box]] | None:
    """Choose a cell and a window for one image: ``(x0, y0, side, boxes in the window)`` or None (left out)."""
    return crop_around(boxes[rng.randrange(len(boxes))], boxes, width, height, rng) if boxes else None


def crop_around(cell: Box, boxes: list[Box], width: int, height: int,
                rng: random.Random) -> tuple[int, int, int, list[Box]] | None:
    """A window around ``cell`` in which every box of ``boxes`` is at least half inside or not at all (up to
    PLACEMENTS draws): ``(x0, y0, side, the boxes in the window, clipped)`` or None."""
    side = window_side(cell, width, height, rng)
    for _ in range(PLACEMENTS):
        x0, y0 = place_window(cell, side, width, height, rng)
        kept, clean = [], True
        for box in boxes:
            share = inside_fraction(box, x0, y0, side)
            if share >= MIN_INSIDE:
                kept.append(clip_to_window(box, x0, y0, side))
            elif share > 0:
                clean = False
                break
        if clean:
            return x0, y0, side, kept
    return None


def write_new_set(out: Path, write: Callable[[Path], T]) -> T:
    """``write(out)`` into ``out``, a new or empty folder (else a :class:`FrcnnError`, nothing touched); if it fails,
    what it wrote is removed, so the same ``--out`` works again."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FrcnnError(f"{out} exists and is not an empty folder; give a new --out")
    existed = out.exists()
    try:
        return write(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if existed:
            out.mkdir()
        raise


def make_wbc_crops(bccd: Path, out: Path, seed: int = 0) -> dict[str, tuple[int, int]]:
    """Write the set to ``out``; returns ``{split: (images, cells)}``."""
    splits = {split: VOCDataset(bccd, split) for split in SPLITS}  # a bad --bccd stops before out is touched
    for split, data in splits.items():
        if CLASS not in data.classes:
            raise FrcnnError(f"{bccd} {split}: no {CLASS} boxes (is this BCCD?)")
    return write_new_set(out, lambda folder: _write(splits, bccd, folder, seed))


def _write(splits: dict[str, VOCDataset], bccd: Path, out: Path, seed: int) -> dict[str, tuple[int, int]]:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, data in splits.items():
        label = data.classes.index(CLASS) + 1
        ids, cells = [], 0
        for i in range(len(data)):
            sample = data[i]
            boxes = [tuple(float(v) for v in b) for b, lab in zip(sample.boxes.tolist(), sample.labels.tolist())
                     if lab == label]
            got = crop_one(boxes, sample.width, sample.height, random.Random(f"{seed}:{sample.image_id}"))
            if got is None:
                continue
            x0, y0, side, kept = got
            with Image.open(sample.path) as image:
                crop = image.convert("RGB").crop((x0, y0, x0 + side, y0 + side))
            crop.save(out / "JPEGImages" / f"{sample.image_id}.jpg", quality=JPEG_QUALITY, subsampling=0)
            write_voc_xml(out / "Annotations" / f"{sample.image_id}.xml", f"{sample.image_id}.jpg", side, side,
                          [(CLASS, box) for box in kept])
            ids.append(sample.image_id)
            cells += len(kept)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        counts[split] = (len(ids), cells)
    (out / "SOURCE.txt").write_text(
        f"Made by frcnn's benchmarks/make_wbc_crops.py --seed {seed} from {bccd}\n"
        "(BCCD, https://github.com/Shenggan/BCCD_Dataset, MIT license): one square window around a white cell\n"
        "per image, the class WBC only, BCCD's trainval / test split kept.\n")
    return counts


def run(make: Callable[..., dict[str, tuple[int, int]]], doc: str, seed_help: str, unit: str, argv=None,
        options: Sequence[tuple[str, int, str]] = ()) -> int:
    """The command line of a set maker ``make(bccd, out, seed, **options)``: one line a split (images and ``unit``).
    ``options``: more integer options, ``(name, default, help)`` each, given to ``make`` by name."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--bccd", type=Path, default=DEFAULT_BCCD, help="BCCD's VOC root")
    p.add_argument("--out", type=Path, required=True, help="a new (or empty) folder for the set")
    p.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
    for name, default, text in options:
        p.add_argument(f"--{name}", type=int, default=default, help=f"{text} (default {default})")
    args = p.parse_args(argv)
    try:
        counts = make(args.bccd, args.out, args.seed, **{name: getattr(args, name) for name, _, _ in options})
    except (FrcnnError, OSError) as e:  # OSError: an unreadable image, a full disk (nothing half-written is left)
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, (images, boxes) in counts.items():
        print(f"{split}: {images} images, {boxes} {unit}")
    print(f"wrote {args.out}")
    return 0


def main(argv=None) -> int:
    return run(make_wbc_crops, __doc__, "window draws", "white cells", argv)


if __name__ == "__main__":
    sys.exit(main())
