"""A small-object data set for the from-scratch benchmarks: BCCD's pictures tiled 2 x 2 (or N x N).

Four 640 x 480 pictures side by side make one 1280 x 960 image, so at a training scale of 320 every object is a
third of its size in BCCD at that scale: the platelets ~13 px (86% under 16 px, twice scratch-cpu's stride),
the red cells ~34 px. It is how ``check-data``'s small-box warning (by class) and its suggested input were
measured without any download:

    .venv/bin/python benchmarks/make_bccd_tiled.py --out /tmp/bccd_tiled      # then
    .venv/bin/frcnn check-data --data /tmp/bccd_tiled --split trainval --config scratch-cpu
    options: --bccd VOC_ROOT (default ../shared/datasets/BCCD/BCCD), --seed N (default 0), --grid N (default 2:
    N x N pictures a tile), --repeats R (default 1: trainval's pictures tiled R times, each time in a new order)

With ``--grid 3`` (1920 x 1440 images) the objects are a ninth of BCCD's size at scale 320 / 480 (platelets ~9 px,
red cells ~23 px); ``--repeats 3`` gives its 292 training pictures 96 tiles of different neighbours (test: each
picture once, 8 tiles), as many iterations an epoch as the 2 x 2 set has.

Each split keeps its own pictures (BCCD's ``trainval`` and ``test``, read as training reads them: repaired), in an
order shuffled by ``random.Random(seed)``; pictures ``4t .. 4t + 3`` make tile ``t`` (top left, top right, bottom
left, bottom right; N x N: rows of N in reading order), and the 0..3 left over are not used (each repeat of
trainval: the next shuffle of the same generator, its own leftovers unused). Boxes move with their picture
(0-based inclusive pixels in memory, 1-based in the XML, :func:`frcnn.data.voc.write_voc_xml`), difficult flags
kept; pixels are pasted, never resampled (JPEG quality 95, Pillow's 4:2:0 chroma). BCCD is MIT-licensed;
``SOURCE.txt`` says where the set came from, and nothing is written into an existing non-empty folder.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image

from frcnn.data import open_repaired
from frcnn.data.voc import write_voc_xml
from frcnn.errors import FrcnnError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_wbc_crops import run, write_new_set  # noqa: E402  (the sibling set maker's folder and command-line rules)

SPLITS = ("trainval", "test")
JPEG_QUALITY = 95


def tile_offsets(width: int, height: int, grid: int = 2) -> list[tuple[int, int]]:
    """Top-left corners of the ``grid x grid`` pictures of a tile, in reading order."""
    return [(col * width, row * height) for row in range(grid) for col in range(grid)]


def make_bccd_tiled(bccd: Path, out: Path, seed: int = 0, grid: int = 2, repeats: int = 1
                    ) -> dict[str, tuple[int, int]]:
    """Write the set to ``out`` (new or empty; removed again if writing fails); returns ``{split: (tiles, boxes)}``."""
    if grid < 1 or repeats < 1:
        raise FrcnnError(f"--grid {grid} and --repeats {repeats}: both must be at least 1")
    splits = {split: open_repaired(bccd, split, progress=False) for split in SPLITS}  # a bad --bccd: before out
    return write_new_set(out, lambda folder: _write(splits, bccd, folder, seed, grid, repeats))


def _tiles(n: int, rng: random.Random, grid: int, repeats: int) -> list[list[int]]:
    """The pictures (indices of ``n``) of each tile: ``repeats`` shuffles by ``rng``, cut in runs of ``grid^2``."""
    per, tiles = grid * grid, []
    for _ in range(repeats):
        order = list(range(n))
        rng.shuffle(order)
        tiles += [order[per * t:per * t + per] for t in range(n // per)]
    return tiles


def _write(splits: dict, bccd: Path, out: Path, seed: int, grid: int, repeats: int) -> dict[str, tuple[int, int]]:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, data in splits.items():
        ids, boxes = [], 0
        for t, tile in enumerate(_tiles(len(data), random.Random(seed), grid, repeats if split == "trainval" else 1)):
            samples = [data[i] for i in tile]
            width, height = samples[0].width, samples[0].height
            if any((s.width, s.height) != (width, height) for s in samples):
                names = ", ".join(s.image_id for s in samples)
                raise FrcnnError(f"{bccd} {split}: pictures of different sizes ({names})")
            canvas, objects = Image.new("RGB", (grid * width, grid * height)), []
            for sample, (ox, oy) in zip(samples, tile_offsets(width, height, grid)):
                with Image.open(sample.path) as image:
                    canvas.paste(image.convert("RGB"), (ox, oy))
                for b, label, difficult in zip(sample.boxes.tolist(), sample.labels.tolist(),
                                               sample.difficult.tolist()):
                    objects.append((data.classes[label - 1], (b[0] + ox, b[1] + oy, b[2] + ox, b[3] + oy), difficult))
            name = f"{split}_{t:03d}"
            canvas.save(out / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY)  # Pillow's 4:2:0 chroma
            write_voc_xml(out / "Annotations" / f"{name}.xml", f"{name}.jpg", grid * width, grid * height, objects)
            ids.append(name)
            boxes += len(objects)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        counts[split] = (len(ids), boxes)
    (out / "SOURCE.txt").write_text(
        f"Made by frcnn's benchmarks/make_bccd_tiled.py --seed {seed} --grid {grid} --repeats {repeats} from {bccd}\n"
        f"(BCCD, https://github.com/Shenggan/BCCD_Dataset, MIT license): its pictures tiled {grid} x {grid}, BCCD's\n"
        "trainval / test split kept.\n")
    return counts


def main(argv=None) -> int:
    return run(make_bccd_tiled, __doc__, "the order of the pictures", "boxes", argv,
               options=[("grid", 2, "N x N pictures a tile"), ("repeats", 1, "trainval's pictures tiled R times")])


if __name__ == "__main__":
    sys.exit(main())
