"""What every stage is made of: the :class:`Stage` record and the pictures' common ground (the "canvas").

Pictures are drawn on the *original* image, enlarged by a whole factor when it is small so text stays
legible (a "canvas"). Boxes go network-input pixels -> original pixels -> canvas pixels with
:func:`frcnn.boxes.scale_boxes` (the +1 convention: pixel ``x`` covers ``[x, x + 1)``), so the projection
is exact; a feature cell ``(i, j)`` covers network-input pixels ``[16 j, 16 j + 16)`` (``FEAT_STRIDE``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor

from frcnn.boxes import scale_boxes
from frcnn.explain.run import ExplainRun
from frcnn.viz import charts
from frcnn.viz.draw import GT_COLOR, class_color

BG_NAME = "background"
BACKGROUND_COLOR = (128, 128, 128)


@dataclass
class Stage:
    key: str  # file stem, e.g. "04_proposal_layer"
    title: str
    text: str
    numbers: dict[str, Any]
    image: Image.Image | None = None
    notes: list[str] = field(default_factory=list)


def display_factor(width: int, height: int) -> float:
    """Whole-number enlargement for small images (>= 480 px on the long side), shrink for huge ones."""
    side = max(width, height)
    if side > 1400:
        return 1400 / side
    return float(max(1, math.ceil(480 / side)))


@dataclass
class Canvas:
    """The original image enlarged by ``factor`` with a ``margin`` of grey around it (for anchors that
    reach outside the image). Canvas pixel = original pixel * factor + margin."""

    image: Image.Image
    factor: float
    scale: float  # network-input pixels per original pixel
    margin: int = 0

    def from_original(self, boxes: Tensor) -> Tensor:
        return scale_boxes(boxes.float().cpu(), self.factor) + self.margin

    def from_net(self, boxes: Tensor) -> Tensor:
        """Network-input boxes straight to the canvas (not clipped): ``scale_boxes`` by ``factor / scale``."""
        return scale_boxes(boxes.float().cpu(), self.factor / self.scale) + self.margin

    def point_from_net(self, xy: Tensor) -> Tensor:
        """Points (pixel centres) of the network input to the canvas."""
        return (xy.float().cpu() + 0.5) * (self.factor / self.scale) - 0.5 + self.margin


def make_canvas(run: ExplainRun, margin: int = 0) -> Canvas:
    f = display_factor(run.image.width, run.image.height)
    size = (max(1, round(run.image.width * f)), max(1, round(run.image.height * f)))
    # enlarged pixel for pixel (nearest), so an object's edge is exactly where its box says; huge images shrink
    base = run.image.copy() if f == 1 else run.image.resize(size, Image.NEAREST if f > 1 else Image.LANCZOS)
    if margin:
        framed = Image.new("RGB", (size[0] + 2 * margin, size[1] + 2 * margin), (200, 200, 200))
        framed.paste(base, (margin, margin))
        base = framed
    return Canvas(base, f, run.scale, margin)


def feature_overlay(canvas: Canvas, values: np.ndarray, stride: int, lo: float = 0.0, hi: float = 1.0,
                    alpha: float = 0.55) -> Image.Image:
    """The canvas with a (fh, fw) feature-grid map blended on top; cell (i, j) covers network-input
    pixels ``[stride * j, stride * (j + 1))`` x ``[stride * i, stride * (i + 1))``."""
    fh, fw = values.shape
    k = canvas.factor / canvas.scale  # canvas pixels per network-input pixel
    rgb = Image.fromarray(charts.colormap(values, lo, hi), "RGB")
    cover = rgb.resize((max(1, round(fw * stride * k)), max(1, round(fh * stride * k))), Image.NEAREST)
    layer = canvas.image.copy()
    layer.paste(cover, (canvas.margin, canvas.margin))
    out = Image.blend(canvas.image, layer, alpha)
    inner = (canvas.margin, canvas.margin, canvas.margin + round(canvas.image.width - 2 * canvas.margin),
             canvas.margin + round(canvas.image.height - 2 * canvas.margin))
    # outside the image there is nothing to see: keep the frame as it was
    mask = Image.new("L", out.size, 0)
    ImageDraw.Draw(mask).rectangle([inner[0], inner[1], inner[2] - 1, inner[3] - 1], fill=255)
    return Image.composite(out, canvas.image, mask)


def _line(canvas_side: int) -> int:
    return max(2, round(canvas_side / 320))


def draw_boxes(image: Image.Image, boxes: Tensor, colors: Sequence[tuple[int, ...]], width: int = 2,
               alpha: int = 255) -> Image.Image:
    """Outlines of canvas boxes (+1 convention: the outline covers pixels x1..x2 and grows inwards)."""
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    for box, colour in zip(boxes.tolist(), colors):
        if not all(math.isfinite(v) for v in box):
            continue
        x1, y1 = round(box[0]), round(box[1])
        x2, y2 = max(round(box[2]), x1), max(round(box[3]), y1)
        d.rectangle([x1, y1, x2, y2], outline=(*colour[:3], alpha), width=width)
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def _tag(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple[int, int, int],
         size: int = 13) -> None:
    f = charts.font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    x, y = xy
    y = max(0, y - (bottom - top) - 4)
    draw.rectangle([x, y, x + right - left + 4, y + bottom - top + 4], fill=colour)
    lum = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((x + 2 - left, y + 2 - top), text, fill=(0, 0, 0) if lum > 150 else (255, 255, 255), font=f)


def _class_name(run: ExplainRun, label: int) -> str:
    if label == 0:
        return BG_NAME
    return run.class_names[label - 1] if label - 1 < len(run.class_names) else f"class {label}"


def _class_legend(run: ExplainRun, labels: Sequence[int], width: int, extra=()) -> Image.Image:
    entries = [(_class_name(run, k), class_color(k)) for k in sorted(set(int(v) for v in labels)) if k > 0]
    return charts.legend([*entries, *extra], width, title="legend:")


def _gt_on(canvas: Canvas, run: ExplainRun, image: Image.Image, tags: bool = True, extra: int = 1) -> Image.Image:
    if run.gt is None or run.gt.boxes.numel() == 0:
        return image
    boxes = canvas.from_original(run.gt.boxes)
    out = draw_boxes(image, boxes, [GT_COLOR] * len(boxes), width=max(2, _line(image.width) + extra))
    if tags:
        d = ImageDraw.Draw(out)
        for box, label in zip(boxes.tolist(), run.gt.labels.tolist()):
            _tag(d, (box[0], box[1]), f"gt {_class_name(run, label)}", GT_COLOR)
    return out


def _ms(run: ExplainRun, *names: str) -> float:
    return round(1000 * sum(run.trace.timings.get(n, 0.0) for n in names), 2)
