"""A small-object data set for the from-scratch benchmarks: BCCD's pictures tiled 2 x 2.

Four 640 x 480 pictures side by side make one 1280 x 960 image, so at a training scale of 320 every object is a
third of its size in BCCD at that scale: the platelets ~13 px (86% under 16 px, twice scratch-cpu's stride),
the red cells ~34 px. It is how ``check-data``'s small-box warning (by class) and its suggested input were
measured without any download:

    .venv/bin/python benchmarks/make_bccd_tiled.py --out /tmp/bccd_tiled      # then
    .venv/bin/frcnn check-data --data /tmp/bccd_tiled --split trainval --config scratch-cpu
    options: --bccd VOC_ROOT (default ../shared/datasets/BCCD/BCCD), --seed N (default 0)

Each split keeps its own pictures (BCCD's ``trainval`` and ``test``, read as training reads them: repaired), in an
order shuffled by ``random.Random(seed)``; pictures ``4t .. 4t + 3`` make tile ``t`` (top left, top right, bottom
left, bottom right), and the 0..3 left over are not used. Boxes move with their picture (0-based inclusive pixels
in memory, 1-based in the XML, :func:`frcnn.data.voc.write_voc_xml`), difficult flags kept; pixels are pasted,
never resampled (JPEG quality 95, Pillow's 4:2:0 chroma). BCCD is MIT-licensed; ``SOURCE.txt`` says where the set
came from, and nothing is written into an existing non-empty folder.
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


def tile_offsets(width: int, height: int) -> list[tuple[int, int]]:
    """Top-left corners of the 4 pictures of a tile, in reading order."""
    return [(0, 0), (width, 0), (0, height), (width, height)]


def make_bccd_tiled(bccd: Path, out: Path, seed: int = 0) -> dict[str, tuple[int, int]]:
    """Write the set to ``out`` (new or empty; removed again if writing fails); returns ``{split: (tiles, boxes)}``."""
    splits = {split: open_repaired(bccd, split, progress=False) for split in SPLITS}  # a bad --bccd: before out
    return write_new_set(out, lambda folder: _write(splits, bccd, folder, seed))


def _write(splits: dict, bccd: Path, out: Path, seed: int) -> dict[str, tuple[int, int]]:
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, data in splits.items():
        order = list(range(len(data)))
        random.Random(seed).shuffle(order)
        ids, boxes = [], 0
        for t in range(len(order) // 4):
            samples = [data[i] for i in order[4 * t:4 * t + 4]]
            width, height = samples[0].width, samples[0].height
            if any((s.width, s.height) != (width, height) for s in samples):
                names = ", ".join(s.image_id for s in samples)
                raise FrcnnError(f"{bccd} {split}: pictures of different sizes ({names})")
            canvas, objects = Image.new("RGB", (2 * width, 2 * height)), []
            for sample, (ox, oy) in zip(samples, tile_offsets(width, height)):
                with Image.open(sample.path) as image:
                    canvas.paste(image.convert("RGB"), (ox, oy))
                for b, label, difficult in zip(sample.boxes.tolist(), sample.labels.tolist(),
                                               sample.difficult.tolist()):
                    objects.append((data.classes[label - 1], (b[0] + ox, b[1] + oy, b[2] + ox, b[3] + oy), difficult))
            name = f"{split}_{t:03d}"
            canvas.save(out / "JPEGImages" / f"{name}.jpg", quality=JPEG_QUALITY)  # Pillow's 4:2:0 chroma
            write_voc_xml(out / "Annotations" / f"{name}.xml", f"{name}.jpg", 2 * width, 2 * height, objects)
            ids.append(name)
            boxes += len(objects)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        counts[split] = (len(ids), boxes)
    (out / "SOURCE.txt").write_text(
        f"Made by frcnn's benchmarks/make_bccd_tiled.py --seed {seed} from {bccd}\n"
        "(BCCD, https://github.com/Shenggan/BCCD_Dataset, MIT license): its pictures tiled 2 x 2, BCCD's\n"
        "trainval / test split kept.\n")
    return counts


def main(argv=None) -> int:
    return run(make_bccd_tiled, __doc__, "the order of the pictures", "boxes", argv)


if __name__ == "__main__":
    sys.exit(main())
