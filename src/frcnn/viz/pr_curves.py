"""Precision-recall curves as one PNG, drawn with Pillow: a small panel per class, its AP in the title.

Each panel plots precision (y, 0..1) against recall (x, 0..1) of the detections in score order, as
:func:`frcnn.engine.voc_eval.eval_class` returns them, with the interpolated (monotone) precision envelope
the AP integrates drawn as a thin darker line under the raw curve's points. With ``iou``, each panel also
says the IoU a detection had to exceed to count as a true positive (``frcnn eval --plots DIR --iou T``; the
curves themselves come from :func:`frcnn.engine.evaluate.pr_curves`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from frcnn.viz.draw import _font, class_color

__all__ = ["draw_pr_curves", "save_pr_curves"]

PANEL = 220  # pixels per panel side
_MARGIN = (34, 24, 10, 26)  # left, top, right, bottom inside a panel


def _envelope(prec: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(prec[::-1])[::-1] if prec.size else prec


def draw_pr_curves(curves: Mapping[str, Mapping[str, Any]], title: str = "", iou: float | None = None) -> Image.Image:
    """``curves[name] = {"rec": array, "prec": array, "ap": float | None}`` (one entry per class, in order),
    matched at IoU > ``iou`` (written in each panel when given).

    Returns an RGB image with one panel per class on a grid (at most 6 columns)."""
    names = list(curves)
    n = max(1, len(names))
    cols = min(6, n)
    rows = math.ceil(n / cols)
    top = 26 if title else 0
    image = Image.new("RGB", (cols * PANEL, rows * PANEL + top), "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(13), _font(10)
    if title:
        draw.text((8, 6), title, fill="black", font=font)
    left, up, right, bottom = _MARGIN
    for i, name in enumerate(names):
        ox, oy = (i % cols) * PANEL, (i // cols) * PANEL + top
        x0, y0, x1, y1 = ox + left, oy + up, ox + PANEL - right, oy + PANEL - bottom

        def to_px(r: np.ndarray, p: np.ndarray, x0=x0, y0=y0, x1=x1, y1=y1) -> list[tuple[float, float]]:
            return [(x0 + float(a) * (x1 - x0), y1 - float(b) * (y1 - y0)) for a, b in zip(r, p)]

        for t in (0.0, 0.5, 1.0):  # grid and tick labels
            gx, gy = x0 + t * (x1 - x0), y1 - t * (y1 - y0)
            draw.line([(gx, y0), (gx, y1)], fill=(230, 230, 230))
            draw.line([(x0, gy), (x1, gy)], fill=(230, 230, 230))
            draw.text((gx - 6, y1 + 3), f"{t:g}", fill=(90, 90, 90), font=small)
            draw.text((ox + 4, gy - 6), f"{t:g}", fill=(90, 90, 90), font=small)
        draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        c = curves[name]
        ap = c.get("ap")
        ap_text = "no gt" if ap is None or (isinstance(ap, float) and math.isnan(ap)) else f"AP {ap:.3f}"
        draw.text((x0, oy + 5), f"{name}  {ap_text}", fill="black", font=font)
        rec = np.nan_to_num(np.asarray(c.get("rec", []), dtype=np.float64), nan=0.0)
        prec = np.asarray(c.get("prec", []), dtype=np.float64)
        if rec.size:
            colour = class_color(i + 1)
            env = _envelope(prec)
            step = []  # the envelope as a step function from recall 0
            last_r = 0.0
            for r, p in zip(rec, env):
                step += [(last_r, p), (r, p)]
                last_r = r
            dark = tuple(int(v * 0.6) for v in colour)
            draw.line(to_px(*zip(*step)), fill=dark, width=1)
            if rec.size > 1:
                draw.line(to_px(rec, prec), fill=colour, width=2)
            for px, py in to_px(rec, prec)[-1:]:
                draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.text((x0 + 0.75 * (x1 - x0) - 15, y1 + 3), "recall", fill=(90, 90, 90), font=small)
        if iou is not None:
            draw.text((x1 - 58, y0 + 3), f"IoU > {iou:g}", fill=(90, 90, 90), font=small)
    return image


def save_pr_curves(path: str | os.PathLike, curves: Mapping[str, Mapping[str, Any]], title: str = "",
                   iou: float | None = None) -> Path:
    """:func:`draw_pr_curves` written as a PNG at ``path``; returns the path."""
    path = Path(path)
    draw_pr_curves(curves, title, iou).save(path, format="PNG")
    return path
