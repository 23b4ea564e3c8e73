"""The synthetic "shapes" data set of ``frcnn demo``, written to disk in the PASCAL VOC layout.

Each image is a textured background (smooth random colour field, random lines, gaussian noise) with 1 to 5
filled shapes: circles, squares, stars and triangles, in random colours, sizes (about 32..128 px across at
320 px, scaled with the image) and rotations. The class is the shape, never the colour. Shapes may overlap
partly: the full boxes of any two shapes have IoU < 0.4 and every shape keeps at least 60% of its pixels
visible.

Boxes: each object's box is the tight bounding box of its *visible* pixels (after later shapes are drawn
over it). In memory (:class:`ShapeObject`) boxes are 0-based inclusive pixel indices, as in
:class:`~frcnn.data.sample.Sample`; in the XML files they are 1-based, as VOC wants.

Determinism: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` only, so a seed gives
byte-identical XML and JPEG files on every run (for a given numpy/Pillow).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from frcnn.data.voc import write_voc_xml
from frcnn.errors import DataError

__all__ = ["CLASSES", "MARKER", "Scene", "ShapeObject", "make_shapes_dataset", "render_scene"]

CLASSES: tuple[str, ...] = ("circle", "square", "star", "triangle")  # sorted, as VOCDataset sorts them
MARKER = ".frcnn-synthetic.json"
GENERATOR = "frcnn synthetic shapes"
VERSION = 2  # bump when the pictures change, so an old folder is not mistaken for a new one

_REFERENCE_SIDE = 320  # the sizes below are for a 320 px image and scale with min(H, W)
_MIN_SIZE, _MAX_SIZE = 32.0, 128.0
_MAX_OBJECTS = 5
_MAX_BOX_IOU = 0.4
_MIN_VISIBLE = 0.6
_JPEG_QUALITY = 90  # with 4:4:4 chroma (subsampling=0), so small coloured shapes keep their edges


@dataclass(frozen=True)
class ShapeObject:
    name: str
    box: tuple[int, int, int, int]  # 0-based inclusive (x1, y1, x2, y2), tight around ``mask``
    mask: np.ndarray  # (H, W) bool: the object's visible pixels
    color: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    image: Image.Image  # RGB, before JPEG compression
    objects: tuple[ShapeObject, ...]


# ------------------------------------------------------------------------------------------ drawing


def _background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    grid = rng.uniform(30, 225, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3))
    grey = grid.mean(axis=2, keepdims=True)
    grid = grey + (grid - grey) * rng.uniform(0.2, 0.7)  # muted colours, so shapes stand out
    field = Image.fromarray(grid.astype(np.uint8)).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(int(rng.integers(2, 9))):
        xy = rng.uniform(-0.2, 1.2, size=4) * [width, height, width, height]
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([float(v) for v in xy], fill=colour, width=int(rng.integers(1, 4)))
    noise = rng.standard_normal(size=(height, width, 3), dtype=np.float32)
    noise *= rng.uniform(3, 12)
    noise += np.asarray(field, dtype=np.float32) + 0.5  # + 0.5: the cast below then rounds
    return Image.fromarray(np.clip(noise, 0, 255, out=noise).astype(np.uint8))


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _shape_mask(name: str, cx: float, cy: float, size: float, angle: float, height: int, width: int) -> np.ndarray:
    """The filled shape of about ``size`` px across, centred at ``(cx, cy)``, as an (H, W) bool mask."""
    canvas = Image.new("1", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if name == "circle":
        r = size / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif name == "square":
        draw.polygon(_polygon(cx, cy, [size / math.sqrt(2)] * 4, angle), fill=1)
    elif name == "triangle":
        draw.polygon(_polygon(cx, cy, [size * 0.6] * 3, angle), fill=1)
    elif name == "star":
        draw.polygon(_polygon(cx, cy, [size * 0.6, size * 0.25] * 5, angle), fill=1)
    else:
        raise ValueError(f"unknown shape {name!r}")
    return np.asarray(canvas, dtype=bool)


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    return int(xs[0]), int(ys[0]), int(xs[-1]), int(ys[-1])


def _box_iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area - inter)


def _colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A saturated random colour, at least somewhat far from ``background`` (the mean colour underneath)."""
    best, best_dist = (255, 0, 0), -1.0
    for _ in range(8):
        rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.5, 1), rng.uniform(0.45, 1))
        colour = np.array(rgb) * 255
        dist = float(np.linalg.norm(colour - background))
        if dist > best_dist:
            best, best_dist = (int(round(colour[0])), int(round(colour[1])), int(round(colour[2]))), dist
        if dist >= 90:
            break
    return best


def render_scene(rng: np.random.Generator, height: int = 320, width: int = 320) -> Scene:
    """One synthetic picture and its objects (tight 0-based boxes of the visible pixels)."""
    image = _background(rng, height, width)
    scale = min(height, width) / _REFERENCE_SIDE
    wanted = int(rng.integers(1, _MAX_OBJECTS + 1))
    names: list[str] = []
    full_masks: list[np.ndarray] = []
    full_boxes: list[tuple[int, int, int, int]] = []
    visible: list[np.ndarray] = []
    for _ in range(wanted):
        for _attempt in range(30):
            name = CLASSES[int(rng.integers(len(CLASSES)))]
            size = math.exp(rng.uniform(math.log(_MIN_SIZE), math.log(_MAX_SIZE))) * scale
            reach = size * 0.72 + 2  # covers every shape's circumradius
            cx, cy = rng.uniform(reach, width - 1 - reach), rng.uniform(reach, height - 1 - reach)
            mask = _shape_mask(name, cx, cy, size, rng.uniform(0, 2 * math.pi), height, width)
            if not mask.any():
                continue
            box = _mask_box(mask)
            if any(_box_iou(box, other) >= _MAX_BOX_IOU for other in full_boxes):
                continue
            if any((v & ~mask).sum() < _MIN_VISIBLE * f.sum() for v, f in zip(visible, full_masks)):
                continue
            visible = [v & ~mask for v in visible]
            names.append(name)
            full_masks.append(mask)
            full_boxes.append(box)
            visible.append(mask)
            break
    pixels = np.array(image)
    colours = []
    for mask in full_masks:  # later shapes are drawn over earlier ones, as ``visible`` assumes
        colour = _colour(rng, pixels[mask].mean(axis=0))
        pixels[mask] = colour
        colours.append(colour)
    objects = tuple(ShapeObject(n, _mask_box(v), v, c) for n, v, c in zip(names, visible, colours))
    return Scene(Image.fromarray(pixels), objects)


# ------------------------------------------------------------------------------------------ the folder


def _existing_set(root: Path, params: dict) -> bool:
    """True if ``root`` already holds a complete set made with ``params``; False if it is free to write.

    Refuses a non-empty folder that is not an unfinished or finished set with these same parameters.
    """
    if not root.exists():
        return False
    if not root.is_dir():
        raise DataError(f"{root}: exists and is not a folder")
    if not any(root.iterdir()):
        return False
    marker = root / MARKER
    if not marker.is_file():
        raise DataError(f"{root}: folder is not empty and is not a frcnn synthetic data set; use a new folder")
    try:
        info = json.loads(marker.read_text())
        theirs, complete = info["params"], bool(info["complete"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{marker}: unreadable marker ({type(e).__name__}); use a new folder") from None
    if info.get("generator") != GENERATOR or theirs != params:
        raise DataError(
            f"{root}: holds a synthetic data set made with other parameters ({theirs}, not {params}); "
            f"use a new folder"
        )
    return complete


def _write_marker(root: Path, params: dict, complete: bool) -> None:
    info = {"generator": GENERATOR, "params": params, "classes": list(CLASSES), "complete": complete}
    (root / MARKER).write_text(json.dumps(info, indent=1) + "\n")


def make_shapes_dataset(
    root: str | os.PathLike,
    num_trainval: int = 400,
    num_test: int = 100,
    image_size: tuple[int, int] = (320, 320),
    seed: int = 0,
    progress: bool = False,
) -> tuple[str, ...]:
    """Write the shapes set into ``root`` (VOC layout, splits ``trainval`` and ``test``); return the classes.

    ``image_size`` is ``(height, width)``. Pass the returned classes to :class:`~frcnn.data.voc.VOCDataset`
    so labels are the same even for a tiny set where some shape never occurs. If ``root`` already holds a
    complete set made with the same arguments, it is reused as is; any other non-empty folder is refused.
    """
    height, width = (int(v) for v in image_size)
    if num_trainval < 1 or num_test < 1:
        raise DataError(f"need at least one trainval and one test image (got {num_trainval}, {num_test})")
    if min(height, width) < 64:
        raise DataError(f"image_size {image_size}: height and width must be at least 64")
    if seed < 0:
        raise DataError(f"seed {seed}: must be >= 0")
    root = Path(root)
    params = {"version": VERSION, "num_trainval": int(num_trainval), "num_test": int(num_test),
              "image_size": [height, width], "seed": int(seed)}
    if _existing_set(root, params):
        return CLASSES

    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    _write_marker(root, params, complete=False)
    ids = [f"shapes_{i:05d}" for i in range(num_trainval + num_test)]
    for i, image_id in enumerate(tqdm(ids, desc="shapes", unit="img", disable=not progress, dynamic_ncols=True)):
        scene = render_scene(np.random.default_rng([seed, i]), height, width)
        scene.image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=_JPEG_QUALITY, subsampling=0)
        write_voc_xml(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", width, height,
                      [(o.name, o.box) for o in scene.objects])
    (root / "ImageSets/Main/trainval.txt").write_text("".join(f"{i}\n" for i in ids[:num_trainval]))
    (root / "ImageSets/Main/test.txt").write_text("".join(f"{i}\n" for i in ids[num_trainval:]))
    _write_marker(root, params, complete=True)
    return CLASSES
