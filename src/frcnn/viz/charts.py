"""Small Pillow-only charts for the explain and run-report pages: colour maps, heat maps, colour bars,
legends, bar charts and line charts. Every function returns a new RGB :class:`PIL.Image.Image`.

Text is Pillow's scalable default font at a size chosen for legibility (>= 12 px); colours of classes come
from :func:`frcnn.viz.draw.class_color` so a class looks the same in every picture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "bar_chart", "colorbar", "colormap", "font", "heatmap", "hstack", "label_above", "legend", "line_chart",
    "text_width", "vstack",
]

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (225, 225, 225)

# viridis at 9 evenly spaced stops (matplotlib's values), interpolated linearly in between
_VIRIDIS = np.array([
    (68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
], dtype=np.float64)


def colormap(values: np.ndarray | float, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Viridis colours (..., 3) uint8 of ``values`` scaled from ``[lo, hi]`` (clipped)."""
    v = np.asarray(values, dtype=np.float64)
    t = np.clip((v - lo) / (hi - lo) if hi > lo else np.zeros_like(v), 0.0, 1.0)
    t = np.nan_to_num(t, nan=0.0)
    pos = t * (len(_VIRIDIS) - 1)
    i0 = np.floor(pos).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (pos - i0)[..., None]
    return np.round(_VIRIDIS[i0] * (1 - frac) + _VIRIDIS[i0 + 1] * frac).astype(np.uint8)


def score_color(value: float, lo: float = 0.0, hi: float = 1.0) -> tuple[int, int, int]:
    r, g, b = colormap(np.array([value]), lo, hi)[0].tolist()
    return int(r), int(g), int(b)


def font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def text_width(text: str, size: int = 14) -> int:
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font(size))
    return right - left


def heatmap(values: np.ndarray, cell: int = 16, lo: float | None = None, hi: float | None = None,
            grid: bool = False) -> Image.Image:
    """A (H, W) array as an image of ``cell`` x ``cell`` pixel squares in viridis (``lo``/``hi`` default to
    the array's min/max)."""
    v = np.asarray(values, dtype=np.float64)
    lo = float(np.nanmin(v)) if lo is None else lo
    hi = float(np.nanmax(v)) if hi is None else hi
    rgb = colormap(v, lo, hi)
    im = Image.fromarray(rgb, "RGB").resize((v.shape[1] * cell, v.shape[0] * cell), Image.NEAREST)
    if grid and cell >= 6:
        d = ImageDraw.Draw(im)
        for x in range(0, im.width, cell):
            d.line([(x, 0), (x, im.height)], fill=(0, 0, 0), width=1)
        for y in range(0, im.height, cell):
            d.line([(0, y), (im.width, y)], fill=(0, 0, 0), width=1)
    return im


def colorbar(lo: float, hi: float, label: str, width: int = 320, size: int = 13) -> Image.Image:
    """A horizontal viridis bar from ``lo`` to ``hi`` with end values and a label."""
    f = font(size)
    bar_h, pad = 14, 6
    out = Image.new("RGB", (width, bar_h + 2 * size + 3 * pad), BACKGROUND)
    d = ImageDraw.Draw(out)
    d.text((pad, pad), label, fill=INK, font=f)
    top = pad * 2 + size
    inner = width - 2 * pad
    ramp = colormap(np.linspace(0, 1, inner))[None, :, :].repeat(bar_h, 0)
    out.paste(Image.fromarray(ramp, "RGB"), (pad, top))
    d.rectangle([pad - 1, top - 1, pad + inner, top + bar_h], outline=INK)
    lo_t, hi_t = f"{lo:.3g}", f"{hi:.3g}"
    d.text((pad, top + bar_h + 2), lo_t, fill=INK, font=f)
    d.text((width - pad - text_width(hi_t, size), top + bar_h + 2), hi_t, fill=INK, font=f)
    return out


def legend(entries: Sequence[tuple[str, tuple[int, int, int]]], width: int, size: int = 14,
           title: str = "") -> Image.Image:
    """Coloured squares with names, wrapped into rows that fit ``width``."""
    f = font(size)
    pad, sw = 6, size
    items = [(str(name), tuple(colour)) for name, colour in entries]
    rows: list[list[tuple[str, tuple, int]]] = [[]]
    x = pad + (text_width(title, size) + 2 * pad if title else 0)
    for name, colour in items:
        w = sw + 4 + text_width(name, size) + 2 * pad
        if rows[-1] and x + w > width:
            rows.append([])
            x = pad
        rows[-1].append((name, colour, x))
        x += w
    row_h = size + 2 * pad
    out = Image.new("RGB", (width, row_h * len(rows)), BACKGROUND)
    d = ImageDraw.Draw(out)
    if title:
        d.text((pad, pad), title, fill=INK, font=f)
    for r, row in enumerate(rows):
        y = r * row_h + pad
        for name, colour, x0 in row:
            d.rectangle([x0, y + 1, x0 + sw - 1, y + sw], fill=colour, outline=INK)
            d.text((x0 + sw + 4, y), name, fill=INK, font=f)
    return out


def vstack(images: Sequence[Image.Image], gap: int = 4) -> Image.Image:
    images = [im for im in images if im is not None]
    width = max(im.width for im in images)
    out = Image.new("RGB", (width, sum(im.height for im in images) + gap * (len(images) - 1)), BACKGROUND)
    y = 0
    for im in images:
        out.paste(im.convert("RGB"), (0, y))
        y += im.height + gap
    return out


def hstack(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    out = Image.new("RGB", (width, max(im.height for im in images)), BACKGROUND)
    x = 0
    for im in images:
        out.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return out


def label_above(image: Image.Image, text: str, size: int = 14) -> Image.Image:
    """``image`` with a line of text above it (wider than the image if the text needs it)."""
    f = font(size)
    pad = 4
    width = max(image.width, text_width(text, size) + 2 * pad)
    out = Image.new("RGB", (width, image.height + size + 2 * pad), BACKGROUND)
    ImageDraw.Draw(out).text((pad, pad), text, fill=INK, font=f)
    out.paste(image.convert("RGB"), (0, size + 2 * pad))
    return out


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def bar_chart(items: Sequence[tuple[str, float]], unit: str = "", title: str = "", width: int = 720,
              colors: Sequence[tuple[int, int, int]] | None = None, size: int = 14,
              vmax: float | None = None) -> Image.Image:
    """Horizontal bars, one row per ``(name, value)``, the value written after each bar; the longest bar is
    ``vmax`` (default: the largest value)."""
    f = font(size)
    pad, row = 8, size + 12
    name_w = max([text_width(n, size) for n, _ in items] + [10]) + 2 * pad
    value_w = max([text_width(f"{_fmt(v)} {unit}", size) for _, v in items] + [10]) + 2 * pad
    top = (size + 2 * pad) if title else pad
    out = Image.new("RGB", (width, top + row * len(items) + pad), BACKGROUND)
    d = ImageDraw.Draw(out)
    if title:
        d.text((pad, pad), title, fill=INK, font=f)
    if vmax is None:
        vmax = max([v for _, v in items if math.isfinite(v)] + [1e-12])
    span = max(10, width - name_w - value_w)
    for i, (name, value) in enumerate(items):
        y = top + i * row
        d.text((pad, y + 4), name, fill=INK, font=f)
        length = 0 if not math.isfinite(value) else max(1, round(span * max(value, 0) / vmax))
        colour = colors[i] if colors is not None else (70, 130, 180)
        d.rectangle([name_w, y + 3, name_w + length, y + row - 4], fill=colour)
        d.text((name_w + length + pad, y + 4), f"{_fmt(value)} {unit}".strip(), fill=INK, font=f)
    return out


def line_chart(series: Sequence[tuple[str, Sequence[float], Sequence[float], tuple[int, int, int]]],
               title: str = "", xlabel: str = "", ylabel: str = "", width: int = 640, height: int = 320,
               log_y: bool = False, y_range: tuple[float, float] | None = None, size: int = 13,
               markers: bool = False, x_range: tuple[float, float] | None = None) -> Image.Image:
    """Lines ``(name, xs, ys, colour)`` on shared axes with ticks, grid, axis labels and a legend."""
    f = font(size)
    pad = 8
    left, right, top, bottom = 64, 16, (size + 2 * pad) if title or ylabel else pad, size * 2 + 3 * pad
    legend_img = legend([(name, colour) for name, _, _, colour in series], width, size) if len(series) > 1 else None
    out = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(out)
    if title:
        d.text((pad, pad), title, fill=INK, font=f)

    def tr(v: float) -> float:
        return math.log10(v) if log_y else v

    xs_all = [float(x) for _, xs, ys, _ in series for x, y in zip(xs, ys) if math.isfinite(y)]
    ys_all = [tr(float(y)) for _, _, ys, _ in series for y in ys if math.isfinite(y) and (y > 0 or not log_y)]
    x0, x1 = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    y0, y1 = (min(ys_all), max(ys_all)) if ys_all else (0.0, 1.0)
    if y_range is not None:
        y0, y1 = (tr(y_range[0]), tr(y_range[1]))
    if x_range is not None:
        x0, x1 = x_range
    if x1 <= x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pw, ph = width - left - right, height - top - bottom
    d.rectangle([left, top, left + pw, top + ph], outline=INK)

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * pw, top + ph - (y - y0) / (y1 - y0) * ph

    for t in _nice_ticks(y0, y1):
        _, yy = px(x0, t)
        d.line([(left, yy), (left + pw, yy)], fill=GRID)
        label = _fmt(10 ** t) if log_y else _fmt(t)
        d.text((left - pad - text_width(label, size), yy - size / 2), label, fill=INK, font=f)
    for t in _nice_ticks(x0, x1):
        xx, _ = px(t, y0)
        d.line([(xx, top), (xx, top + ph)], fill=GRID)
        label = _fmt(t)
        d.text((xx - text_width(label, size) / 2, top + ph + 4), label, fill=INK, font=f)
    d.rectangle([left, top, left + pw, top + ph], outline=INK)
    if xlabel:
        d.text((left + pw / 2 - text_width(xlabel, size) / 2, top + ph + size + 2 * pad - 2), xlabel, fill=INK,
               font=f)
    if ylabel:  # y axis name: on the title's line, right-aligned over the plot
        d.text((left + pw - text_width(f"y: {ylabel}", size), pad), f"y: {ylabel}", fill=(90, 90, 90), font=f)
    for _, xs, ys, colour in series:
        pts = [px(float(x), tr(float(y))) for x, y in zip(xs, ys) if math.isfinite(y) and (y > 0 or not log_y)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        if markers or len(pts) == 1:
            for x, y in pts:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    return vstack([out, legend_img]) if legend_img is not None else out
