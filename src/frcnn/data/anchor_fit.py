"""How well the config's anchors fit a data set's boxes, as the anchor target layer will see them.

Every ground-truth box is taken to *network-input pixels* with the resize policy
(:func:`frcnn.transforms.compute_scale`: short side ``TRAIN.SCALES[0]``, long side at most ``MAX_SIZE``);
the anchors are those of :mod:`frcnn.model.anchors` shifted over the feature grid of that resized image
(``ceil(size / FEAT_STRIDE)`` cells), and, as in the anchor target layer, only the anchors that take part in the
RPN's loss count: those lying entirely inside the image, or crossing its border by at most
``TRAIN.RPN_ALLOWED_BORDER`` pixels (every anchor when it is negative). For each box its best IoU with any such
anchor (+1 convention, :func:`frcnn.boxes.box_iou`) says whether the RPN gets a positive anchor of type B (``>=
TRAIN.RPN_POSITIVE_OVERLAP``, 0.7) or at least one that is not background (``>= RPN_NEGATIVE_OVERLAP``,
0.3). A box below 0.3 is learnt from a single weak type-A anchor at best: its object is too small (or too
large, or too elongated) for the anchors.

With ``NECK=fpn`` the anchors are every pyramid level's (:func:`frcnn.model.anchors.level_anchors` at each of
:func:`frcnn.config.pyramid_strides`, shifted over that level's ``ceil(size / stride)`` grid): a box's best IoU is
over all levels' inside anchors, its positives are summed over the levels. Choosing the scales (below) is for the
C4 anchors only (``NECK=none``; the config refuses ``ANCHOR_SCALES=auto`` with ``fpn``).

Choosing ``ANCHOR_SCALES`` (check-data's suggestion and ``ANCHOR_SCALES: auto`` in ``frcnn train``, one code
path: :func:`auto_anchor_fit`) is two separate parts:

- the candidates, :func:`candidate_scales`: three scales an octave apart ``(b, 2b, 4b)``, three like the
  reference's (8, 16, 32), ``b`` half an octave apart from 0.5 to 16 (``CANDIDATE_EXPONENTS``);
- the criterion, :func:`fit_criterion`: a sort key of an :class:`AnchorFit`, smallest best. Today: fewest boxes
  without an anchor at ``>= 0.7``, then at ``>= 0.3``, then the highest median best IoU; between equals, the set
  whose middle anchor is nearest the median box size. Replace that one function to choose otherwise; everything
  an :class:`AnchorFit` knows is available to it, including :meth:`AnchorFit.positives` (per box, the number of
  anchors taking part at ``>= RPN_POSITIVE_OVERLAP``, computed on demand).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from frcnn.boxes import box_area, scale_boxes
from frcnn.config import AUTO, Config, pyramid_strides
from frcnn.data.sample import Sample
from frcnn.errors import ConfigError
from frcnn.model.anchors import generate_anchors, level_anchors
from frcnn.transforms import compute_scale

__all__ = ["AnchorFit", "anchor_fit", "auto_anchor_fit", "auto_anchor_scales", "best_anchor_iou", "candidate_scales",
           "describe_auto", "fit_criterion", "positive_anchor_counts", "resized_groups", "shift_range",
           "suggest_scales", "write_histograms"]


@dataclass
class Group:
    """All boxes of the images that share one resized size ``(height, width)`` (network-input pixels)."""

    height: int
    width: int
    boxes: Tensor  # (n, 4)
    labels: Tensor  # (n,)
    images: int = 0  # how many images


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
    return [Group(h, w, torch.cat([b for b, _ in parts]), torch.cat([lbl for _, lbl in parts]), len(parts))
            for (h, w), parts in groups.items()]


def shift_range(base_anchors: Tensor, height: int, width: int, stride: int,
                border: float = 0.0) -> tuple[Tensor, Tensor]:
    """The grid shifts (in cells, per anchor shape and axis x, y) at which an anchor takes part in the RPN's loss in a
    ``height`` x ``width`` network input: ``(lo, hi)``, each shaped like ``base_anchors[..., :2]``, none where ``lo >
    hi``. As :func:`frcnn.model.anchor_target.taking_part`: ``x1 >= -border`` and ``x2 < width + border`` (the same
    in y), every shift of the ``ceil(size / stride)`` grid when ``border < 0``."""
    a = base_anchors
    grid = torch.tensor([math.ceil(width / stride), math.ceil(height / stride)], dtype=a.dtype)
    if border < 0:
        return torch.zeros_like(a[..., :2]), (grid - 1).expand_as(a[..., :2])
    limit = torch.tensor([width, height], dtype=a.dtype) + border
    lo = torch.ceil((-border - a[..., :2]) / stride).clamp(min=0)  # first shift keeping x1, y1 >= -border
    hi = torch.minimum(torch.ceil((limit - a[..., 2:]) / stride) - 1, grid - 1)  # last keeping x2 < width + border
    return lo, hi


def best_anchor_iou(boxes: Tensor, height: int, width: int, base_anchors: Tensor, stride: int,
                    border: float = 0.0) -> Tensor:
    """(n,) best IoU of each box with the anchors taking part in a ``height`` x ``width`` network input (inside it,
    or crossing its border by at most ``border`` pixels: :func:`shift_range`).

    Exact and O(n x A) rather than O(n x H x W x A): for a fixed anchor shape the intersection with a box is a
    product of an x and a y term, each non-increasing in the distance between the centres along its axis, so
    over the grid of shifts the best anchor of each shape is the one taking part whose centre is nearest the box's
    along each axis (the nearest grid index clamped to :func:`shift_range`).
    ``tests/test_anchor_fit.py`` checks it against every anchor of :func:`shift_anchors` with :func:`box_iou`.
    """
    if boxes.shape[0] == 0:
        return boxes.new_zeros(0)
    a = base_anchors.to(boxes.dtype)[None]  # (1, A, 4)
    lo, hi = shift_range(a, height, width, stride, border)
    centre = (boxes[:, None, :2] + boxes[:, None, 2:]) / 2  # (n, 1, 2)
    ideal = (centre - (a[..., :2] + a[..., 2:]) / 2) / stride
    k = torch.minimum(torch.maximum(torch.round(ideal), lo), hi)  # (n, A, 2)
    shifted = a + torch.cat((k, k), dim=-1) * stride
    b = boxes[:, None, :]
    wh = (torch.minimum(b[..., 2:], shifted[..., 2:]) - torch.maximum(b[..., :2], shifted[..., :2]) + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    iou = inter / (box_area(b) + box_area(shifted) - inter)
    iou = torch.where((lo <= hi).all(dim=-1), iou, torch.zeros_like(iou))  # no anchor of that shape takes part
    return iou.max(dim=1).values


def anchors_inside(height: int, width: int, base_anchors: Tensor, stride: int, border: float = 0.0) -> Tensor:
    """(A,) bool: whether each anchor shape takes part in the RPN's loss in a ``height`` x ``width`` network input
    at some position of the feature grid (lies inside it, or crosses its border by at most ``border`` pixels: the
    anchor target layer labels only such anchors; the others are never trained, yet the proposal layer still ranks
    them, clipped, at test time)."""
    lo, hi = shift_range(base_anchors.to(torch.float64), height, width, stride, border)
    return (lo <= hi).all(dim=-1)


_EPS = 1e-9  # IoU exactly at the threshold counts (>=) despite float rounding


def positive_anchor_counts(boxes: Tensor, height: int, width: int, base_anchors: Tensor, stride: int,
                           threshold: float, border: float = 0.0) -> Tensor:
    """(n,) for each box, how many anchors taking part in a ``height`` x ``width`` network input
    (:func:`shift_range`) have IoU ``>= threshold`` with it (+1 convention): its type-B positives in the anchor
    target layer, before sampling (an anchor at ``>= threshold`` with two boxes counts for both).

    Exact without building the grid: IoU ``>= t`` is ``ix * iy >= t (area_box + area_anchor) / (1 + t)`` with ``ix``,
    ``iy`` the overlaps along x and y, and it needs ``ix >= t max(w_box, w_anchor)``. So for each anchor shape only
    the x shifts of that window are visited (a loop over its width in cells, vectorised over boxes and shapes), and
    for each the y shifts reaching the required ``iy`` form an interval counted in closed form.
    ``tests/test_auto_schedule.py`` checks it against every anchor of :func:`shift_anchors` with :func:`box_iou`.
    """
    n = boxes.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long)
    t = float(threshold)
    b = boxes.to(torch.float64)[:, None, :]  # (n, 1, 4)
    a = base_anchors.to(torch.float64)[None]  # (1, A, 4)
    lo, hi = shift_range(a, height, width, stride, border)  # (1, A, 2) the shifts taking part, per axis
    b_len, a_len = b[..., 2:] - b[..., :2] + 1, a[..., 2:] - a[..., :2] + 1  # extents along x, y
    need = t * (b_len.prod(-1) + a_len.prod(-1)) / (1 + t)  # (n, A) the intersection IoU >= t needs
    # x shifts s with ix(s) >= p: p + bx1 - ax2 - 1 <= s <= bx2 - ax1 + 1 - p
    p = t * torch.maximum(b_len[..., 0], a_len[..., 0])
    k_lo = torch.maximum(torch.ceil((p + b[..., 0] - a[..., 2] - 1) / stride - _EPS), lo[..., 0])
    k_hi = torch.minimum(torch.floor((b[..., 2] - a[..., 0] + 1 - p) / stride + _EPS), hi[..., 0])
    width_x = torch.where(p <= torch.minimum(b_len[..., 0], a_len[..., 0]) + _EPS, k_hi - k_lo + 1, 0).clamp(min=0)
    most_y = torch.minimum(b_len[..., 1], a_len[..., 1])
    count = torch.zeros_like(need)
    for j in range(int(width_x.max())):
        s = (k_lo + j) * stride
        ix = (torch.minimum(b[..., 2], a[..., 2] + s) - torch.maximum(b[..., 0], a[..., 0] + s) + 1).clamp(min=0)
        q = need / ix.clamp(min=_EPS)  # the overlap along y this x shift needs
        y_lo = torch.maximum(torch.ceil((q + b[..., 1] - a[..., 3] - 1) / stride - _EPS), lo[..., 1])
        y_hi = torch.minimum(torch.floor((b[..., 3] - a[..., 1] + 1 - q) / stride + _EPS), hi[..., 1])
        ok = (j < width_x) & (ix > 0) & (q <= most_y + _EPS)
        count += torch.where(ok, (y_hi - y_lo + 1).clamp(min=0), 0)
    return count.sum(dim=1).round().long()


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
    images: int = 0
    groups: list[Group] | None = field(default=None, repr=False)  # for positives(), in the order of best_iou
    _positives: Tensor | None = field(default=None, repr=False)
    levels: tuple[int, ...] = ()  # NECK=fpn: the pyramid's strides (the anchors of every level); C4: ()
    border: float = 0.0  # TRAIN.RPN_ALLOWED_BORDER: which anchors take part (shift_range)

    @property
    def count(self) -> int:
        return int(self.best_iou.numel())

    def anchor_levels(self) -> list[tuple[Tensor, int]]:
        """``(reference anchors, stride)`` of each level: C4's one (the reference's, base 16, at ``stride``) or
        each FPN level's (:func:`level_anchors`)."""
        return level_base_anchors(self.scales, self.ratios, self.stride, self.levels)

    def anchor_sizes(self) -> list[float]:
        """The anchors' sizes in pixels (ratio 1): ``16 x scale`` (C4), ``scale x stride`` of every level (FPN)."""
        if self.levels:
            return [s * stride for stride in self.levels for s in self.scales]
        return [16 * s for s in self.scales]

    def positives(self) -> Tensor:
        """(n,) per box, the anchors taking part at IoU ``>= positive`` (:func:`positive_anchor_counts`);
        computed on first use."""
        if self._positives is None:
            counts = [sum(positive_anchor_counts(g.boxes, g.height, g.width, base, stride, self.positive, self.border)
                          for base, stride in self.anchor_levels()) for g in self.groups or []]
            self._positives = torch.cat(counts) if counts else torch.zeros(0, dtype=torch.long)
        return self._positives

    def mean_positives(self, mask: Tensor | None = None) -> float | None:
        """The mean number of positive anchors a box (``None`` without boxes)."""
        counts = self.positives() if mask is None else self.positives()[mask]
        return float(counts.double().mean()) if counts.numel() else None

    def untrained_anchors(self) -> list[tuple[int, int]]:
        """(width, height) in pixels of the anchor shapes that take part in no training image at this scale (lie
        inside none; :func:`anchors_inside`): the RPN never learns their scores, yet at test time they propose
        (clipped) among the others. None when every anchor takes part (``TRAIN.RPN_ALLOWED_BORDER < 0``)."""
        shapes = []
        for base, stride in self.anchor_levels():
            fits = torch.zeros(base.shape[0], dtype=torch.bool)
            for g in self.groups or []:
                fits |= anchors_inside(g.height, g.width, base, stride, self.border)
            wh = base[:, 2:] - base[:, :2] + 1
            shapes += [(round(float(w)), round(float(h))) for (w, h), ok in zip(wh.tolist(), fits.tolist()) if not ok]
        return shapes

    def positives_per_image(self) -> float | None:
        """All boxes' positive anchors over the number of images (images without boxes included)."""
        return float(self.positives().sum()) / self.images if self.images else None

    def fraction_at(self, threshold: float) -> float:
        """The fraction of boxes whose best anchor reaches ``threshold``."""
        return 1 - self.below(threshold) / self.count if self.count else 0.0

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
            "mean_positives": round(m, 3) if (m := self.mean_positives(mask)) is not None else None,
        }

    def to_json(self, classes: Sequence[str] = ()) -> dict:
        out = {"anchor_scales": list(self.scales), "anchor_ratios": list(self.ratios), "feat_stride": self.stride,
               "scale": self.target_size, "max_size": self.max_size, "positive_overlap": self.positive,
               "negative_overlap": self.negative,
               "anchor_sizes": self.anchor_sizes(), **({"pyramid_strides": list(self.levels)} if self.levels else {}),
               **self.summary(),
               "positives_per_image": round(p, 3) if (p := self.positives_per_image()) is not None else None}
        if classes:
            out["per_class"] = {name: self.summary(self.labels == k) for k, name in enumerate(classes, start=1)
                                if bool((self.labels == k).any())}
        return out


def anchor_fit(
    samples: Iterable[Sample], cfg: Config, scales: Sequence[float] | None = None, target_size: int | None = None,
    groups: list[Group] | None = None,
) -> AnchorFit:
    """The fit of ``cfg``'s anchors (or ``scales``) at ``target_size`` (default ``TRAIN.SCALES[0]``); with
    ``ANCHOR_SCALES: auto`` and no ``scales``, the fit of the scales auto chooses (:func:`auto_anchor_fit`)."""
    if scales is None and cfg.ANCHOR_SCALES == AUTO:
        return auto_anchor_fit(samples, cfg, target_size)
    scales = tuple(cfg.ANCHOR_SCALES if scales is None else scales)
    target_size = cfg.TRAIN.SCALES[0] if target_size is None else target_size
    if groups is None:
        groups = resized_groups(samples, target_size, cfg.TRAIN.MAX_SIZE)
    levels = pyramid_strides(cfg) if cfg.NECK == "fpn" else ()
    anchors = level_base_anchors(scales, cfg.ANCHOR_RATIOS, cfg.FEAT_STRIDE, levels)
    border = cfg.TRAIN.RPN_ALLOWED_BORDER
    best = [torch.stack([best_anchor_iou(g.boxes, g.height, g.width, base, stride, border) for base, stride in anchors])
            .max(dim=0).values for g in groups]
    boxes = torch.cat([g.boxes for g in groups]) if groups else torch.zeros(0, 4)
    w, h = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    return AnchorFit(scales, tuple(cfg.ANCHOR_RATIOS), cfg.FEAT_STRIDE, target_size, cfg.TRAIN.MAX_SIZE,
                     cfg.TRAIN.RPN_POSITIVE_OVERLAP, cfg.TRAIN.RPN_NEGATIVE_OVERLAP, (w * h).sqrt(), h / w,
                     torch.cat([g.labels for g in groups]) if groups else torch.zeros(0, dtype=torch.long),
                     torch.cat(best) if best else torch.zeros(0), sum(g.images for g in groups), groups,
                     levels=tuple(levels), border=border)


def level_base_anchors(scales: Sequence[float], ratios: Sequence[float], stride: int, levels: Sequence[int] = ()
                       ) -> list[tuple[Tensor, int]]:
    """``(reference anchors, stride)`` per level: with ``levels`` (NECK=fpn's strides) each level's anchors as the
    model makes them (:func:`level_anchors`), else the C4 reference anchors (base 16) at ``stride``."""
    if levels:
        return [(level_anchors(s, scales, ratios), s) for s in levels]
    return [(generate_anchors(16, ratios, scales), stride)]


# ------------------------------------------------------------------------ choosing the scales: candidates, criterion

# three scales (b, 2b, 4b), b = 2^(k/2) half an octave apart from 0.5 to 16: anchors of 8 .. 1024 pixels. An octave
# apart only (0.5, 1, 2, ...), sizes between two candidates fit neither: BCCD tiled 2 x 2 at 448 px, its red cells
# (48 px) between the 32 and 64 px anchors of [2, 4, 8] (84% of all boxes without an anchor at IoU 0.7), trained
# 0.8170 (2 seeds) against 0.8416 with [1.414, 2.828, 5.657] (24%); on BCCD, the white-cell crops and the 3 x 3
# tiles both grids choose the same (benchmarks/results/scratch_cpu.md). On the demo's shapes (32..128 px) auto now
# picks [2.828, 5.657, 11.314] instead of [2, 4, 8], not measured: demo-cpu fixes its own five half-octave scales
CANDIDATE_EXPONENTS = tuple(k / 2 for k in range(-2, 9))


def candidate_scales(cfg: Config) -> list[tuple[float, ...]]:
    """The scale sets auto (and check-data's suggestion) chooses among: ``(b, 2b, 4b)`` for each base ``b =
    2^e``, ``e`` in ``CANDIDATE_EXPONENTS`` (rounded to 3 decimals: 1.414, 2.828, 5.657)."""
    return [tuple(round(2 ** (e + j), 3) for j in range(3)) for e in CANDIDATE_EXPONENTS]


def fit_criterion(fit: AnchorFit) -> tuple:
    """THE criterion of :func:`suggest_scales` and ``ANCHOR_SCALES: auto``: a sort key, the smallest is chosen.

    Fewest boxes with no anchor at ``>= positive`` (0.7); then fewest anchor shapes that lie inside no training
    image (:meth:`AnchorFit.untrained_anchors`: they add nothing to the fit, the RPN never learns their scores,
    yet they propose at test time: a set whose largest anchors never fit the images fits the boxes exactly as
    well as the set an octave smaller; on large cells it trained no better, AP75 0.959 against 0.966,
    ``benchmarks/results/scratch_cpu.md``); then fewest boxes with none at ``>= negative`` (0.3),
    then the highest median best IoU; ties
    (neighbouring candidates share two sizes) go to the set whose middle anchor is nearest the median box size.
    To choose by something else (positives a box: ``fit.mean_positives()``, the
    stride, ...) replace this function; candidates and plumbing do not change."""
    if not fit.count:
        return 0, 0, 0, 0.0, 0.0
    off_centre = abs(math.log2(16 * fit.scales[len(fit.scales) // 2]) - math.log2(float(fit.sizes.median())))
    return (fit.below(fit.positive), len(fit.untrained_anchors()), fit.below(fit.negative),
            -float(fit.best_iou.median()), off_centre)


def suggest_scales(samples: Sequence[Sample], cfg: Config, target_size: int | None = None,
                   criterion: Callable[[AnchorFit], tuple] | None = None) -> list[AnchorFit]:
    """The fits of the candidates (:func:`candidate_scales`), best first by ``criterion`` (default
    :func:`fit_criterion`); the first is what ``ANCHOR_SCALES: auto`` chooses. C4 anchors only (NECK=none)."""
    if cfg.NECK != "none":
        raise ConfigError(f"the ANCHOR_SCALES suggestion (and auto) choose C4 anchors (NECK=none), not NECK={cfg.NECK}")
    target_size = cfg.TRAIN.SCALES[0] if target_size is None else target_size
    groups = resized_groups(samples, target_size, cfg.TRAIN.MAX_SIZE)
    fits = [anchor_fit(samples, cfg, scales, target_size, groups) for scales in dict.fromkeys(candidate_scales(cfg))]
    return sorted(fits, key=criterion or fit_criterion)


def auto_anchor_fit(samples: Iterable[Sample], cfg: Config, target_size: int | None = None) -> AnchorFit:
    """The fit of the scales ``ANCHOR_SCALES: auto`` chooses for ``samples`` (their non-difficult boxes after the
    resize policy at ``TRAIN.SCALES[0]``): the best of :func:`suggest_scales`. A set without such boxes is a
    one-line :class:`ConfigError`."""
    fits = suggest_scales(list(samples), cfg, target_size)
    if not fits[0].count:
        raise ConfigError("ANCHOR_SCALES=auto: the training set has no boxes (not difficult) to choose anchors "
                          "from; give ANCHOR_SCALES as a list, e.g. [8, 16, 32]")
    return fits[0]


def auto_anchor_scales(samples: Iterable[Sample], cfg: Config) -> tuple[float, ...]:
    """The ``ANCHOR_SCALES`` that ``auto`` resolves to for ``samples`` (``frcnn train`` and ``check-data`` agree:
    both call :func:`auto_anchor_fit`)."""
    return auto_anchor_fit(samples, cfg).scales


def _nums(values: Iterable[float], factor: float = 1) -> str:
    return ", ".join(f"{factor * v:g}" for v in values)


def _positives_text(fit: AnchorFit) -> str:
    per_box, per_image = fit.mean_positives(), fit.positives_per_image()
    text = f"{per_box:.1f} positive anchors (IoU >= {fit.positive:g}) a box" if per_box is not None else ""
    return text + (f", {per_image:.1f} an image" if per_image is not None and text else "")


def describe_auto(fit: AnchorFit) -> str:
    """The one line (without prefix) that says what ``ANCHOR_SCALES=auto`` chose, as ``frcnn train`` and
    ``frcnn check-data`` print it."""
    sizes = [16 * s for s in fit.scales]
    return (f"ANCHOR_SCALES=auto -> [{_nums(fit.scales)}] (anchors of {min(sizes):g}..{max(sizes):g} px at scale "
            f"{fit.target_size}; {100 * fit.fraction_at(fit.positive):.0f}% of {fit.count} boxes with an anchor at "
            f"IoU >= {fit.positive:g}; {_positives_text(fit)})")


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
                       f"{', '.join(f'{s:g}' for s in fit.anchor_sizes())} px, ratios "
                       f"{', '.join(f'{r:g}' for r in fit.ratios)}", fill=(0, 0, 0), font=font)
    sizes = torch.log2(fit.sizes.clamp(min=1))
    _panel(draw, (40, 60, 500, 330), _histogram(sizes, 2, 11, 36), 2, 11,
           [math.log2(s) for s in fit.anchor_sizes()], "box size sqrt(w*h), network-input pixels", "{:g}", font)
    aspects = torch.log2(fit.aspects.clamp(min=1e-3))
    _panel(draw, (560, 60, 980, 330), _histogram(aspects, -4, 4, 32), -4, 4,
           [math.log2(r) for r in fit.ratios], "aspect ratio h/w", "{:g}", font)
    image.save(path, format="PNG")


# --------------------------------------------------------------------------------------------- the table


def _taking_part(border: float) -> str:
    if border < 0:
        return "every anchor (TRAIN.RPN_ALLOWED_BORDER < 0)"
    return f"anchors inside the image{f' or crossing its border by <= {border:g} px' if border else ' only'}"


def count_share(n: int, total: int) -> str:
    """``"12 (3.4%)"``: a count and its share of ``total`` (``"0"`` when there is nothing to count)."""
    return f"{n} ({100 * n / total:.1f}%)" if total else "0"


def format_fit(fits: list[AnchorFit], current: AnchorFit, classes: Sequence[str], auto: bool = False,
               criterion: Callable[[AnchorFit], tuple] | None = None) -> list[str]:
    """Lines for the terminal: the config's anchors (overall and per class), what ``ANCHOR_SCALES=auto`` chooses
    (``fits[0]``, :func:`describe_auto`) and, unless the config's are as good, the suggestion. ``auto``: the
    config says ``auto`` (``current`` is then ``fits[0]``). No ``fits`` (NECK=fpn: the suggestion is C4's): one line
    says so instead."""
    n = current.count
    where = (f"FPN levels at strides {_nums(current.levels)}" if current.levels else f"stride {current.stride}")
    lines = [f"anchor fit: {n} boxes (not difficult, after repairs) at scale {current.target_size} "
             f"(max {current.max_size}), {where}, {_taking_part(current.border)}"]
    if not n:
        return lines
    configured = "auto -> " if auto else ""
    per_level = " x each level's stride" if current.levels else ""
    lines.append(f"  ANCHOR_SCALES {configured}[{_nums(current.scales)}]{per_level} x ANCHOR_RATIOS "
                 f"[{_nums(current.ratios)}]: anchors of {_nums(current.anchor_sizes())} px")
    lines.append(f"  best IoU with an anchor: median {float(current.best_iou.median()):.3f}; "
                 f"no anchor >= {current.positive:g}: {count_share(current.below(current.positive), n)}; "
                 f"none >= {current.negative:g}: {count_share(current.below(current.negative), n)}; "
                 f"{_positives_text(current)}")
    rows = [["class", "boxes", "median size px", "median best IoU", f"< {current.positive:g}",
             f"< {current.negative:g}", "positives a box"]]
    for k, name in enumerate(classes, start=1):
        s = current.summary(current.labels == k)
        if s["boxes"]:
            rows.append([name, str(s["boxes"]), f"{s['median_size']:.1f}", f"{s['median_best_iou']:.3f}",
                         str(s["below_positive"]), str(s["below_negative"]), f"{s['mean_positives']:.1f}"])
    from frcnn.data.check import table_lines

    lines += ["    " + line for line in table_lines(rows)]
    if untrained := current.untrained_anchors():
        shapes = ", ".join(f"{w}x{h}" for w, h in untrained)
        shapes_total = len(current.anchor_levels()) * len(current.scales) * len(current.ratios)
        lines.append(f"  warning: {len(untrained)} of the {shapes_total} anchor shapes "
                     f"({shapes} px) lie inside no training image at this scale: the RPN never learns them, yet they "
                     f"propose at test time")
    if not fits:
        lines.append("  no ANCHOR_SCALES suggestion: auto and the suggestion choose C4 anchors (NECK=none), "
                     "not the pyramid's")
        return lines
    best = fits[0]
    lines.append(f"  {describe_auto(best)}")
    if auto:
        return lines
    if best.scales == current.scales:
        lines.append("  the configured ANCHOR_SCALES are the best of the candidates (b, 2b, 4b): what auto chooses")
    elif (criterion or fit_criterion)(current) <= (criterion or fit_criterion)(best):
        lines.append("  the configured ANCHOR_SCALES fit at least as well as every candidate (b, 2b, 4b)")
    else:
        scales = ",".join(f"{s:g}" for s in best.scales)
        lines.append(f"  suggested: --set ANCHOR_SCALES=[{scales}] (anchors of {_nums(best.scales, 16)} px): "
                     f"no anchor >= {best.positive:g}: {count_share(best.below(best.positive), n)}; "
                     f"none >= {best.negative:g}: {count_share(best.below(best.negative), n)}; median best IoU "
                     f"{float(best.best_iou.median()):.3f}; {_positives_text(best)}")
    return lines
