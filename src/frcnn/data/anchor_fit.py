"""How well the config's anchors fit a data set's boxes, as the anchor target layer will see them.

Every ground-truth box is taken to *network-input pixels* with the resize policy
(:func:`frcnn.transforms.compute_scale`: short side ``TRAIN.SCALES[0]``, long side at most ``MAX_SIZE``);
the anchors are those of :mod:`frcnn.model.anchors` shifted over the feature grid of that resized image
(``ceil(size / FEAT_STRIDE)`` cells), and, as in the anchor target layer, only anchors lying entirely
inside the image count. For each box its best IoU with any such anchor (+1 convention,
:func:`frcnn.boxes.box_iou`) says whether the RPN gets a positive anchor of type B (``>=
TRAIN.RPN_POSITIVE_OVERLAP``, 0.7) or at least one that is not background (``>= RPN_NEGATIVE_OVERLAP``,
0.3). A box below 0.3 is learnt from a single weak type-A anchor at best: its object is too small (or too
large, or too elongated) for the anchors.

The suggested ``ANCHOR_SCALES`` keep the number of anchors (three scales an octave apart, so the RPN head
keeps its shape) and maximise the fraction of boxes at ``>= 0.7``, then ``>= 0.3``, then the median best
IoU; between equals, the set whose middle anchor is nearest the median box size wins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from frcnn.boxes import box_area, scale_boxes
from frcnn.config import Config
from frcnn.data.sample import Sample
from frcnn.model.anchors import generate_anchors
from frcnn.transforms import compute_scale

__all__ = ["AnchorFit", "anchor_fit", "best_anchor_iou", "resized_groups", "suggest_scales", "write_histograms"]

CANDIDATE_BASES = (0.5, 1, 2, 4, 8, 16)  # three scales (b, 2b, 4b): anchors of 8 .. 1024 pixels


@dataclass
class Group:
    """All boxes of the images that share one resized size ``(height, width)`` (network-input pixels)."""

    height: int
    width: int
    boxes: Tensor  # (n, 4)
    labels: Tensor  # (n,)


def resized_groups(
    samples: Iterable[Sample], target_size: int, max_size: int, include_difficult: bool = False
) -> list[Group]:
    """Non-difficult boxes of ``samples`` (original pixels, sizes as in the samples) after the resize policy."""
    groups: dict[tuple[int, int], list[tuple[Tensor, Tensor]]] = {}
    for s in samples:
        keep = torch.ones_like(s.difficult) if include_difficult else ~s.difficult
        scale = compute_scale(s.height, s.width, target_size, max_size)
        size = (max(1, round(s.height * scale)), max(1, round(s.width * scale)))
        groups.setdefault(size, []).append((scale_boxes(s.boxes[keep], scale), s.labels[keep]))
    return [Group(h, w, torch.cat([b for b, _ in parts]), torch.cat([lbl for _, lbl in parts]))
            for (h, w), parts in groups.items()]


def best_anchor_iou(boxes: Tensor, height: int, width: int, base_anchors: Tensor, stride: int) -> Tensor:
    """(n,) best IoU of each box with the anchors lying inside a ``height`` x ``width`` network input.

    Exact and O(n x A) rather than O(n x H x W x A): for a fixed anchor shape the intersection with a box is a
    product of an x and a y term, each non-increasing in the distance between the centres along its axis, so
    over the grid of shifts the best anchor of each shape is the inside one whose centre is nearest the box's
    along each axis (the nearest grid index clamped to the range of shifts that keep the anchor inside).
    ``tests/test_anchor_fit.py`` checks it against every anchor of :func:`shift_anchors` with :func:`box_iou`.
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros(0)
    grid = torch.tensor([math.ceil(width / stride), math.ceil(height / stride)], dtype=boxes.dtype)
    limit = torch.tensor([width, height], dtype=boxes.dtype)
    a = base_anchors.to(boxes.dtype)[None]  # (1, A, 4)
    lo = torch.ceil(-a[..., :2] / stride).clamp(min=0)  # first shift keeping x1, y1 >= 0
    hi = torch.minimum(torch.ceil((limit - a[..., 2:]) / stride) - 1, grid - 1)  # last keeping x2 < width
    centre = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2  # (n, 1, 2)
    ideal = (centre - (a[..., :2] + a[..., 2:]) / 2) / stride
    k = torch.minimum(torch.maximum(torch.round(ideal), lo), hi)  # (n, A, 2)
    shifted = a + torch.cat((k, k), dim=-1) * stride
    b = boxes[:, None, :]
    wh = (torch.minimum(b[..., 2:], shifted[..., 2:]) - torch.maximum(b[..., :2], shifted[..., :2]) + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (box_area(b) + box_area(shifted) - inter)
    iou = torch.where((lo <= hi).all(dim=-1), iou, torch.zeros_like(iou))  # no inside anchor of that shape
    return iou.max(dim=1).values


@dataclass
class AnchorFit:
    scales: tuple[float, ...]
    ratios: tuple[float, ...]
    stride: int
    target_size: int
    max_size: int
    positive: float  # TRAIN.RPN_POSITIVE_OVERLAP
    negative: float  # TRAIN.RPN_NEGATIVE_OVERLAP
    sizes: Tensor  # (n,) sqrt(w * h) in network-input pixels
    aspects: Tensor  # (n,) h / w
    labels: Tensor  # (n,)
    best_iou: Tensor  # (n,)

    @property
    def count(self) -> int:
        return int(self.best_iou.numel())

    def below(self, threshold: float, mask: Tensor | None = None) -> int:
        iou = self.best_iou if mask is None else self.best_iou[mask]
        return int((iou < threshold).sum())

    def summary(self, mask: Tensor | None = None) -> dict:
        n = self.count if mask is None else int(mask.sum())
        iou = self.best_iou if mask is None else self.best_iou[mask]
        sizes = self.sizes if mask is None else self.sizes[mask]
        return {
            "boxes": n,
            "median_size": round(float(sizes.median()), 1) if n else None,
            "median_best_iou": round(float(iou.median()), 3) if n else None,
            "below_positive": self.below(self.positive, mask),
            "below_negative": self.below(self.negative, mask),
        }

    def to_json(self, classes: Sequence[str] = ()) -> dict:
        out = {"anchor_scales": list(self.scales), "anchor_ratios": list(self.ratios), "feat_stride": self.stride,
               "scale": self.target_size, "max_size": self.max_size, "positive_overlap": self.positive,
               "negative_overlap": self.negative,
               "anchor_sizes": [16 * s for s in self.scales], **self.summary()}
        if classes:
            out["per_class"] = {name: self.summary(self.labels == k) for k, name in enumerate(classes, start=1)
                                if bool((self.labels == k).any())}
        return out


def anchor_fit(
    samples: Iterable[Sample], cfg: Config, scales: Sequence[float] | None = None, target_size: int | None = None,
    groups: list[Group] | None = None,
) -> AnchorFit:
    """The fit of ``cfg``'s anchors (or ``scales``) at ``target_size`` (default ``TRAIN.SCALES[0]``)."""
    scales = tuple(cfg.ANCHOR_SCALES if scales is None else scales)
    target_size = cfg.TRAIN.SCALES[0] if target_size is None else target_size
    if groups is None:
        groups = resized_groups(samples, target_size, cfg.TRAIN.MAX_SIZE)
    base = generate_anchors(16, cfg.ANCHOR_RATIOS, scales)
    best = [best_anchor_iou(g.boxes, g.height, g.width, base, cfg.FEAT_STRIDE) for g in groups]
    boxes = torch.cat([g.boxes for g in groups]) if groups else torch.zeros(0, 4)
    w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    return AnchorFit(scales, tuple(cfg.ANCHOR_RATIOS), cfg.FEAT_STRIDE, target_size, cfg.TRAIN.MAX_SIZE,
                     cfg.TRAIN.RPN_POSITIVE_OVERLAP, cfg.TRAIN.RPN_NEGATIVE_OVERLAP, (w * h).sqrt(), h / w,
                     torch.cat([g.labels for g in groups]) if groups else torch.zeros(0, dtype=torch.long),
                     torch.cat(best) if best else torch.zeros(0))


def suggest_scales(samples: Sequence[Sample], cfg: Config, target_size: int | None = None) -> list[AnchorFit]:
    """The fits of the config's scales and of the candidates ``(b, 2b, 4b)``, best first."""
    target_size = cfg.TRAIN.SCALES[0] if target_size is None else target_size
    groups = resized_groups(samples, target_size, cfg.TRAIN.MAX_SIZE)
    candidates = dict.fromkeys([tuple(cfg.ANCHOR_SCALES), *((b, 2 * b, 4 * b) for b in CANDIDATE_BASES)])
    fits = [anchor_fit(samples, cfg, scales, target_size, groups) for scales in candidates]

    def key(fit: AnchorFit) -> tuple:
        if not fit.count:
            return 0, 0, 0.0, 0.0
        # ties (neighbouring candidates share two sizes): the set centred on the median box size
        off_centre = abs(math.log2(16 * fit.scales[len(fit.scales) // 2]) - math.log2(float(fit.sizes.median())))
        return fit.below(fit.positive), fit.below(fit.negative), -float(fit.best_iou.median()), off_centre

    return sorted(fits, key=key)


# --------------------------------------------------------------------------------------------- drawing


def _histogram(values: Tensor, lo: float, hi: float, bins: int) -> list[int]:
    v = values.clamp(lo, hi - 1e-6)
    return torch.histc(v, bins=bins, min=lo, max=hi).round().long().tolist() if v.numel() else [0] * bins


def _panel(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], counts: list[int], lo: float, hi: float,
           marks: Sequence[float], title: str, tick: str, font) -> None:
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0, y0 - 18), title, fill=(0, 0, 0), font=font)
    top = max(counts) or 1
    width = (x1 - x0) / len(counts)
    for i, c in enumerate(counts):
        h = (y1 - y0 - 4) * c / top
        draw.rectangle((x0 + i * width + 1, y1 - h, x0 + (i + 1) * width - 1, y1), fill=(70, 110, 180))
    for m in marks:
        if lo <= m <= hi:
            x = x0 + (m - lo) / (hi - lo) * (x1 - x0)
            draw.line((x, y0, x, y1), fill=(210, 40, 40), width=2)
    for k in range(math.ceil(lo), math.floor(hi) + 1):
        x = x0 + (k - lo) / (hi - lo) * (x1 - x0)
        draw.line((x, y1, x, y1 + 4), fill=(0, 0, 0))
        draw.text((x - 10, y1 + 6), tick.format(2.0 ** k), fill=(0, 0, 0), font=font)
    draw.text((x0 + 4, y0 + 4), f"max {top}", fill=(0, 0, 0), font=font)


def write_histograms(fit: AnchorFit, path) -> None:
    """A PNG: box sizes ``sqrt(w h)`` and aspect ratios ``h / w`` after the resize policy (log2 bins),
    the anchors' sizes and ratios as red lines."""
    font = ImageFont.load_default(size=12)
    image = Image.new("RGB", (1000, 380), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((20, 8), f"{fit.count} boxes at scale {fit.target_size} (max {fit.max_size}); red: anchors "
                       f"{', '.join(f'{16 * s:g}' for s in fit.scales)} px, ratios "
                       f"{', '.join(f'{r:g}' for r in fit.ratios)}", fill=(0, 0, 0), font=font)
    sizes = torch.log2(fit.sizes.clamp(min=1))
    _panel(draw, (40, 60, 500, 330), _histogram(sizes, 2, 11, 36), 2, 11,
           [math.log2(16 * s) for s in fit.scales], "box size sqrt(w*h), network-input pixels", "{:g}", font)
    aspects = torch.log2(fit.aspects.clamp(min=1e-3))
    _panel(draw, (560, 60, 980, 330), _histogram(aspects, -4, 4, 32), -4, 4,
           [math.log2(r) for r in fit.ratios], "aspect ratio h/w", "{:g}", font)
    image.save(path, format="PNG")


# --------------------------------------------------------------------------------------------- the table


def _pct(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.1f}%)" if total else "0"


def format_fit(fits: list[AnchorFit], current: AnchorFit, classes: Sequence[str]) -> list[str]:
    """Lines for the terminal: the config's anchors (overall and per class) and the best candidate."""
    n = current.count
    lines = [f"anchor fit: {n} boxes (not difficult, after repairs) at scale {current.target_size} "
             f"(max {current.max_size}), stride {current.stride}, anchors inside the image only"]
    if not n:
        return lines
    def fmt(values: Iterable[float], factor: float = 1) -> str:
        return ", ".join(f"{factor * v:g}" for v in values)

    lines.append(f"  ANCHOR_SCALES [{fmt(current.scales)}] x ANCHOR_RATIOS [{fmt(current.ratios)}]: anchors of "
                 f"{fmt(current.scales, 16)} px")
    lines.append(f"  best IoU with an anchor: median {float(current.best_iou.median()):.3f}; "
                 f"no anchor >= {current.positive:g}: {_pct(current.below(current.positive), n)}; "
                 f"none >= {current.negative:g}: {_pct(current.below(current.negative), n)}")
    rows = [["class", "boxes", "median size px", "median best IoU", f"< {current.positive:g}",
             f"< {current.negative:g}"]]
    for k, name in enumerate(classes, start=1):
        s = current.summary(current.labels == k)
        if s["boxes"]:
            rows.append([name, str(s["boxes"]), f"{s['median_size']:.1f}", f"{s['median_best_iou']:.3f}",
                         str(s["below_positive"]), str(s["below_negative"])])
    from frcnn.data.check import table_lines

    lines += ["    " + line for line in table_lines(rows)]
    best = fits[0]
    if best.scales == current.scales:
        lines.append("  the configured ANCHOR_SCALES are the best of the candidates (b, 2b, 4b)")
    else:
        scales = ",".join(f"{s:g}" for s in best.scales)
        lines.append(f"  suggested: --set ANCHOR_SCALES=[{scales}] (anchors of {fmt(best.scales, 16)} px): "
                     f"no anchor >= {best.positive:g}: {_pct(best.below(best.positive), n)}; "
                     f"none >= {best.negative:g}: {_pct(best.below(best.negative), n)}; median best IoU "
                     f"{float(best.best_iou.median()):.3f}")
    return lines
