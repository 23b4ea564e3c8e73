"""Draw detections on an image: a coloured outline per box and a filled "name 0.93" tag above it.

Boxes are ``(x1, y1, x2, y2)`` in the given image's pixels, 0-based inclusive (the +1 convention of
:class:`~frcnn.data.sample.Sample`): the outline covers pixels ``x1..x2`` and ``y1..y2`` and grows inwards.
Labels are ``1..K``; ``class_names[label - 1]`` names label ``label``. Colours come from a fixed palette
indexed by label (:func:`class_color`), so a class has the same colour in every picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["GT_COLOR", "PALETTE", "class_color", "draw_detections"]

# Sasha Trubetskoy's 20 distinct colours, most distinct first; label k gets PALETTE[(k - 1) % 20].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (255, 225, 25), (0, 128, 128),
    (250, 190, 212), (170, 110, 40), (128, 0, 0), (170, 255, 195), (128, 128, 0),
    (220, 190, 255), (0, 0, 128), (255, 215, 180), (128, 128, 128), (255, 250, 200),
)
GT_COLOR = (255, 255, 255)  # ground-truth boxes: thin white outlines under the detections


def class_color(label: int) -> tuple[int, int, int]:
    """The RGB colour of class ``label`` (1..K); the palette repeats after 20 classes."""
    if label < 1:
        raise ValueError(f"label {label}: class labels start at 1 (0 is background)")
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    r, g, b = background
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _array(x: Any, dtype: type) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


def _pixel_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int] | None:
    """Rounded, clipped to the image, ``x2 >= x1``; None for non-finite boxes."""
    if not np.isfinite(box).all():
        return None
    x1 = min(max(round(float(box[0])), 0), width - 1)
    y1 = min(max(round(float(box[1])), 0), height - 1)
    x2 = min(max(round(float(box[2])), x1), width - 1)
    y2 = min(max(round(float(box[3])), y1), height - 1)
    return x1, y1, x2, y2


def draw_detections(
    image: Image.Image,
    boxes: Any,
    labels: Any,
    scores: Any | None,
    class_names: Sequence[str],
    gt_boxes: Any | None = None,
) -> Image.Image:
    """A copy of ``image`` (as RGB) with the detections drawn on it.

    ``boxes`` (N, 4) in ``image``'s pixels, ``labels`` (N,) ints in 1..K, ``scores`` (N,) or None (then tags
    show names only); tensors, arrays or lists. ``gt_boxes`` (M, 4), if given, are drawn first as thin white
    outlines. Line width and font size grow with the image; higher scores are drawn on top.
    """
    out = image.convert("RGB")  # always a new image
    width, height = out.size
    boxes_np = _array(boxes, np.float64).reshape(-1, 4)
    labels_np = _array(labels, np.int64).reshape(-1)
    scores_np = None if scores is None else _array(scores, np.float64).reshape(-1)
    n = boxes_np.shape[0]
    if labels_np.shape != (n,) or (scores_np is not None and scores_np.shape != (n,)):
        raise ValueError(f"boxes ({n}), labels ({labels_np.shape[0]}) and scores disagree in length")

    side = max(width, height)
    line = max(2, round(side / 320))
    font_size = max(11, round(side / 40))
    font = _font(font_size)
    pad = max(1, font_size // 6)
    draw = ImageDraw.Draw(out)

    if gt_boxes is not None:
        for box in _array(gt_boxes, np.float64).reshape(-1, 4):
            xy = _pixel_box(box, width, height)
            if xy is not None:
                draw.rectangle(xy, outline=GT_COLOR, width=max(1, line // 2))

    order = list(range(n)) if scores_np is None else np.argsort(scores_np, kind="stable").tolist()
    placed = []
    for i in order:
        xy = _pixel_box(boxes_np[i], width, height)
        if xy is None:
            continue
        colour = class_color(int(labels_np[i]))
        draw.rectangle(xy, outline=colour, width=line)
        placed.append((i, xy, colour))

    for i, (x1, y1, _, _), colour in placed:  # tags after all outlines, so no outline crosses a tag
        label = int(labels_np[i])
        name = class_names[label - 1] if label - 1 < len(class_names) else f"class {label}"
        text = name if scores_np is None or math.isnan(scores_np[i]) else f"{name} {scores_np[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_w, tag_h = right - left + 2 * pad, bottom - top + 2 * pad
        tx = max(0, min(x1, width - tag_w))
        ty = y1 - tag_h if y1 - tag_h >= 0 else y1  # above the box, or inside it at the image's top
        draw.rectangle([tx, ty, tx + tag_w - 1, ty + tag_h - 1], fill=colour)
        draw.text((tx + pad - left, ty + pad - top), text, fill=_text_color(colour), font=font)
    return out
