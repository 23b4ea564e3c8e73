"""Turn the trace of one image into pictures and numbers, one :class:`Stage` per step of the pipeline.

Each ``*_stage`` function takes an :class:`~frcnn.explain.run.ExplainRun` and returns a :class:`Stage`: a
title, two or three sentences in the write-up's vocabulary, the numbers that matter (counts read from the
trace, thresholds from the config, timings) and one picture. The numbers are the layers' own: every count
is read off the tensors the layers recorded, never recomputed by a second implementation.

Pictures are drawn on the *original* image, enlarged by a whole factor when it is small so text stays
legible (a "canvas"). Boxes go network-input pixels -> original pixels -> canvas pixels with
:func:`frcnn.boxes.scale_boxes` (the +1 convention: pixel ``x`` covers ``[x, x + 1)``), so the projection
is exact; a feature cell ``(i, j)`` covers network-input pixels ``[16 j, 16 j + 16)`` (``FEAT_STRIDE``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from frcnn.boxes import box_iou, scale_boxes
from frcnn.explain.run import ExplainRun
from frcnn.viz import charts
from frcnn.viz.draw import GT_COLOR, class_color, draw_detections

BG_NAME = "background"
BACKGROUND_COLOR = (128, 128, 128)
TP_COLOR, FP_COLOR, MISS_COLOR = (0, 200, 0), (255, 0, 0), (255, 200, 0)
TOP_BOXES = 50  # boxes drawn per proposal picture
TOP_ROIS = 6  # RoIs shown in the pooling and classification pictures
MAX_DRAWN = 30  # final detections drawn at most


@dataclass
class Stage:
    key: str  # file stem, e.g. "04_proposal_layer"
    title: str
    text: str
    numbers: dict[str, Any]
    image: Image.Image | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ geometry

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


# ---------------------------------------------------------------------------------------------- stages

def preprocess_stage(run: ExplainRun) -> Stage:
    cfg = run.cfg
    rec = run.trace["preprocess"]
    batch = rec["input"][0].cpu()
    mean = torch.tensor(cfg.PIXEL_MEANS).view(3, 1, 1)
    std = torch.tensor(cfg.PIXEL_STDS).view(3, 1, 1)
    pixels = (batch * std + mean).clamp(0, 255).round().byte().permute(1, 2, 0).numpy()
    net = Image.fromarray(pixels, "RGB")
    h, w = run.input_size
    H, W = run.batch_size_hw
    if (H, W) != (h, w):  # shade the zero padding (the mean colour after normalisation)
        d = ImageDraw.Draw(net)
        d.rectangle([w, 0, W - 1, H - 1], fill=(255, 0, 255))
        d.rectangle([0, h, W - 1, H - 1], fill=(255, 0, 255))
    original = charts.label_above(run.image, f"original {run.image.width} x {run.image.height}")
    seen = charts.label_above(net, f"network input {W} x {H} (x{run.scale:.4g})")
    numbers = {
        "original_size_wh": [run.image.width, run.image.height],
        "input_size_wh": [w, h],
        "batch_size_wh": [W, H],
        "scale": run.scale,
        "TEST.SCALES": list(cfg.TEST.SCALES),
        "TEST.MAX_SIZE": cfg.TEST.MAX_SIZE,
        "padding_right_bottom": [W - w, H - h],
        "PIXEL_MEANS": list(cfg.PIXEL_MEANS),
        "PIXEL_STDS": list(cfg.PIXEL_STDS),
        "time_ms": _ms(run, "preprocess"),
    }
    stds = " and the result divided by PIXEL_STDS" if any(v != 1 for v in cfg.PIXEL_STDS) else ""
    text = (f"The image is resized so that its short side is TEST.SCALES ({cfg.TEST.SCALES[0]} px) unless its "
            f"long side would then exceed TEST.MAX_SIZE ({cfg.TEST.MAX_SIZE} px); here by a scale factor of "
            f"{run.scale:.4g}. The mean pixel value PIXEL_MEANS (a configuration value, the same for every image) "
            f"is subtracted{stds}, exactly as in training. A batch pads images with zeros at the bottom and right "
            f"(here {W - w} x {H - h} px); every box the network finds is divided by the scale factor to land "
            "back on the original image.")
    return Stage("01_preprocess", "1. Image pre-processing", text, numbers, charts.hstack([original, seen]))


def anchors_stage(run: ExplainRun) -> Stage:
    cfg = run.cfg
    rec = run.trace["anchors"]
    anchors = rec["anchors"].cpu()
    fh, fw = rec["feat_size"]
    a = rec["num_base_anchors"]
    stride = rec["stride"]
    ch, cw = fh // 2, fw // 2
    cell = (ch * fw + cw) * a
    at_cell = anchors[cell: cell + a]
    probe = make_canvas(run)
    boxes = probe.from_net(at_cell)
    reach = float(max(0.0, -boxes[:, :2].min().item(), (boxes[:, 2] - probe.image.width + 1).max().item(),
                      (boxes[:, 3] - probe.image.height + 1).max().item()))
    canvas = make_canvas(run, margin=min(400, math.ceil(reach) + 4) if reach > 0 else 0)
    n_ratios = len(cfg.ANCHOR_RATIOS)
    n_scales = a // max(1, n_ratios)
    ratio_colors = [(230, 25, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (60, 180, 75)]
    colours = [ratio_colors[(i // max(1, n_scales)) % len(ratio_colors)] for i in range(a)]
    left = draw_boxes(canvas.image, canvas.from_net(at_cell), colours, width=2)
    d = ImageDraw.Draw(left)
    ctr = canvas.point_from_net((at_cell[0, :2] + at_cell[0, 2:]) / 2)
    d.ellipse([ctr[0] - 4, ctr[1] - 4, ctr[0] + 4, ctr[1] + 4], fill=(255, 255, 255), outline=(0, 0, 0))
    sizes = (at_cell[:, 2:] - at_cell[:, :2] + 1).round().int().tolist()
    legend = charts.legend(
        [(f"ratio {cfg.ANCHOR_RATIOS[r]:g}: "
          + ", ".join(f"{w}x{h}" for w, h in sizes[r * n_scales:(r + 1) * n_scales]),
          ratio_colors[r % len(ratio_colors)]) for r in range(n_ratios)], max(left.width, 420),
        title="w x h (network px):")
    left = charts.vstack([charts.label_above(left, f"the {a} anchors of feature cell ({ch}, {cw})"), legend])

    grid = make_canvas(run)
    centres = grid.point_from_net((anchors[::a, :2] + anchors[::a, 2:]) / 2)
    g = ImageDraw.Draw(grid.image)
    r = max(1.5, min(4.0, grid.factor * stride / run.scale / 6))
    for x, y in centres.tolist():
        g.ellipse([x - r, y - r, x + r, y + r], fill=(255, 225, 25), outline=(0, 0, 0))
    right = charts.label_above(grid.image, f"anchor centres: a {fw} x {fh} grid, every {stride} network px")
    numbers = {
        "feature_map_hw": [fh, fw],
        "FEAT_STRIDE": stride,
        "anchors_per_location": a,
        "ANCHOR_SCALES": list(cfg.ANCHOR_SCALES),
        "ANCHOR_RATIOS": list(cfg.ANCHOR_RATIOS),
        "anchor_sizes_wh": sizes,
        "total_anchors": int(anchors.shape[0]),
        "time_ms": _ms(run, "anchors"),
    }
    text = (f"The anchor generation layer makes {a} anchors ({len(cfg.ANCHOR_SCALES)} scales x "
            f"{len(cfg.ANCHOR_RATIOS)} aspect ratios) around one point and translates them over every cell of "
            f"the head's {fw} x {fh} feature map, {stride} pixels apart: {int(anchors.shape[0])} anchors, the same "
            "for every image of this size, whatever it shows. The RPN's scores and regression coefficients are "
            "in 1-1 correspondence with these anchors.")
    return Stage("02_anchors", "2. Anchor generation layer", text, numbers, charts.hstack([left, right]))


def rpn_stage(run: ExplainRun) -> Stage:
    cfg = run.cfg
    fh, fw = run.trace["anchors"]["feat_size"]
    a = run.trace["anchors"]["num_base_anchors"]
    stride = run.trace["anchors"]["stride"]
    fg = run.trace["rpn"]["fg_scores"][0].cpu().view(fh, fw, a).numpy()
    best = fg.max(axis=2)
    canvas = make_canvas(run)
    over = charts.label_above(feature_overlay(canvas, best, stride), "objectness, best anchor per cell")
    over = charts.vstack([over, charts.colorbar(0, 1, "RPN foreground probability", width=over.width)])
    n_scales = a // max(1, len(cfg.ANCHOR_RATIOS))
    cell = max(4, min(16, 150 // max(fh, fw)))
    tiles = []
    for i in range(a):
        r, s = divmod(i, n_scales)
        ratio = cfg.ANCHOR_RATIOS[r] if r < len(cfg.ANCHOR_RATIOS) else "?"
        scale = cfg.ANCHOR_SCALES[s] if s < len(cfg.ANCHOR_SCALES) else "?"
        tiles.append(charts.label_above(charts.heatmap(fg[:, :, i], cell, 0, 1), f"scale {scale:g}, ratio {ratio:g}",
                                        size=12))
    rows = [charts.hstack(tiles[k:k + n_scales], gap=6) for k in range(0, a, n_scales)]
    small = charts.label_above(charts.vstack(rows, gap=6), "per anchor shape (same colour scale)")
    argmax = np.unravel_index(int(best.argmax()), best.shape)
    numbers = {
        "feature_map_hw": [fh, fw],
        "anchors": int(fh * fw * a),
        "objectness_max": float(fg.max()),
        "objectness_mean": float(fg.mean()),
        "anchors_above_0.5": int((fg > 0.5).sum()),
        "best_cell_ij": [int(argmax[0]), int(argmax[1])],
        "RPN_CHANNELS": cfg.RPN_CHANNELS,
        "time_ms_head": _ms(run, "head"),
        "time_ms_rpn": _ms(run, "rpn"),
    }
    text = ("The region proposal network runs a 3x3 convolution (rpn_net) and ReLU over the head's feature "
            "map, then two 1x1 convolutions: rpn_cls_score_net gives each anchor a background and a foreground "
            "score (softmax: the objectness shown here) and rpn_bbox_pred_net gives its four regression "
            "coefficients. Bright cells are where the RPN believes an object is; the small maps split the "
            "score by anchor shape.")
    return Stage("03_rpn", "3. Region proposal network output", text, numbers, charts.hstack([over, small], gap=16))


def _score_boxes(canvas: Canvas, run: ExplainRun, boxes: Tensor, scores: Tensor, title: str) -> Image.Image:
    order = torch.argsort(scores, stable=True)  # low scores first, the best drawn on top
    boxes, scores = boxes[order], scores[order]
    colours = [charts.score_color(float(s)) for s in scores]
    img = draw_boxes(canvas.image, canvas.from_original(run.to_original(boxes)), colours,
                     width=_line(canvas.image.width))
    return charts.label_above(img, title)


def proposal_stage(run: ExplainRun) -> Stage:
    rec = run.trace["proposal_layer"]
    pre_boxes, pre_scores = rec["pre_nms_boxes"][0].cpu(), rec["pre_nms_scores"][0].cpu()
    rois, scores = rec["rois"].cpu(), rec["scores"].cpu()
    mine = rois[:, 0] == 0
    rois, scores = rois[mine, 1:], scores[mine]
    canvas = make_canvas(run)
    n_pre, n_post = min(TOP_BOXES, len(pre_scores)), min(TOP_BOXES, len(scores))
    before = _score_boxes(canvas, run, pre_boxes[:n_pre], pre_scores[:n_pre],
                          f"top {n_pre} of {len(pre_scores)} before NMS")
    after = _score_boxes(canvas, run, rois[:n_post], scores[:n_post], f"top {n_post} of {len(scores)} after NMS")
    pair = charts.hstack([before, after])
    lo = float(min(pre_scores[:n_pre].min(), scores[:n_post].min())) if n_pre and n_post else 0.0
    bar = charts.colorbar(0, 1, f"box colour: RPN foreground probability (drawn: {lo:.3g} and up)",
                          width=min(pair.width, 480))
    num_anchors = int(run.trace["rpn"]["fg_scores"].shape[1])
    numbers = {
        "anchors": num_anchors,
        "TEST.RPN_PRE_NMS_TOP_N": rec["pre_nms_top_n"],
        "boxes_before_nms": int(len(pre_scores)),
        "TEST.RPN_NMS_THRESH": rec["nms_thresh"],
        "TEST.RPN_POST_NMS_TOP_N": rec["post_nms_top_n"],
        "proposals_after_nms": int(len(scores)),
        "best_score": float(scores.max()) if len(scores) else None,
        "time_ms": _ms(run, "proposal_layer"),
    }
    text = (f"The proposal layer applies the RPN's regression coefficients to all {num_anchors} anchors, clips "
            f"the boxes to the image, keeps the {len(pre_scores)} with the highest foreground probability "
            f"(RPN_PRE_NMS_TOP_N) and runs non-maximum suppression at IoU {rec['nms_thresh']:g}: of a group of "
            f"boxes overlapping more than that, only the best-scoring survives. At most RPN_POST_NMS_TOP_N "
            f"({rec['post_nms_top_n']}) survive; {len(scores)} did. These are the RoIs.")
    return Stage("04_proposal_layer", "4. Proposal layer (before and after NMS)", text, numbers,
                 charts.vstack([pair, bar]))


def anchor_target_numbers(run: ExplainRun) -> dict[str, Any]:
    """The anchor target layer's label counts of image 0, read from its trace record."""
    rec = run.trace["anchor_target"]
    labels, inside = rec["labels"][0].cpu(), rec["inside"][0].cpu()
    type_a, type_b = rec["type_a"][0].cpu(), rec["type_b"][0].cpu()
    fg_c, bg_c = rec["fg_candidates"][0].cpu(), rec["bg_candidates"][0].cpu()
    n_inside = int(inside.sum())
    fg_s, bg_s = int((labels == 1).sum()), int((labels == 0).sum())
    return {
        "anchors": int(labels.numel()),
        "inside_anchors": n_inside,
        "fg_type_a": int(type_a.sum()),
        "fg_type_b": int(type_b.sum()),
        "fg_type_a_and_b": int((type_a & type_b).sum()),
        "fg_before_sampling": int(fg_c.sum()),
        "bg_before_sampling": int(bg_c.sum()),
        "dont_care_before_sampling": n_inside - int(fg_c.sum()) - int(bg_c.sum()),
        "fg_sampled": fg_s,
        "bg_sampled": bg_s,
        "dont_care_after_sampling": int(((labels == -1) & inside).sum()),
        "TRAIN.RPN_BATCHSIZE": rec["batch_size"],
        "TRAIN.RPN_FG_FRACTION": rec.get("fg_fraction"),
        "TRAIN.RPN_POSITIVE_OVERLAP": rec["positive_overlap"],
        "TRAIN.RPN_NEGATIVE_OVERLAP": rec["negative_overlap"],
        "time_ms": _ms(run, "anchor_target"),
    }


def proposal_target_numbers(run: ExplainRun) -> dict[str, Any]:
    rec = run.trace["proposal_target"]
    labels = rec["labels"].cpu()
    rois = rec["rois"].cpu()
    bg = rois[labels == 0]
    lo, hi = rec["bg_thresh"]
    return {
        "candidates": int(run.trace["proposal_layer"]["rois"].shape[0]) + int(run.gt_net.shape[0]),
        "fg_rois": int((labels > 0).sum()),
        "bg_rois": int((labels == 0).sum()),
        "distinct_bg_rois": int(torch.unique(bg, dim=0).shape[0]) if len(bg) else 0,
        "TRAIN.BATCH_SIZE": rec["batch_size"],
        "TRAIN.FG_FRACTION": run.cfg.TRAIN.FG_FRACTION,
        "TRAIN.FG_THRESH": rec["fg_thresh"],
        "TRAIN.BG_THRESH_LO": lo,
        "TRAIN.BG_THRESH_HI": hi,
        "time_ms": _ms(run, "proposal_target"),
    }


def targets_stage(run: ExplainRun) -> Stage | None:
    if run.gt is None or "anchor_target" not in run.trace:
        return None
    rec = run.trace["anchor_target"]
    anchors = run.trace["anchors"]["anchors"].cpu()
    labels = rec["labels"][0].cpu()
    type_a = rec["type_a"][0].cpu()
    at = anchor_target_numbers(run)
    canvas = make_canvas(run)
    line = _line(canvas.image.width)
    img = draw_boxes(canvas.image, canvas.from_net(anchors[labels == 0]), [(0, 130, 200)] * int((labels == 0).sum()),
                     width=1, alpha=110)
    img = _gt_on(canvas, run, img, tags=False)
    fg = labels == 1
    colours = [(255, 0, 255) if bool(t) else (255, 225, 25) for t in type_a[fg]]
    img = draw_boxes(img, canvas.from_net(anchors[fg]), colours, width=line)
    left = charts.vstack([
        charts.label_above(img, f"anchor target layer: {at['fg_sampled']} fg + {at['bg_sampled']} bg sampled"),
        charts.legend([("fg type A", (255, 0, 255)), ("fg type B only", (255, 225, 25)),
                       ("bg (sampled)", (0, 130, 200)), ("gt", GT_COLOR)], img.width, title="legend:")])

    pt = proposal_target_numbers(run)
    prec = run.trace["proposal_target"]
    rois, plabels = prec["rois"].cpu()[:, 1:], prec["labels"].cpu()
    assign = prec["gt_assignment"].cpu()
    img = draw_boxes(canvas.image, canvas.from_net(rois[plabels == 0]), [BACKGROUND_COLOR] * int((plabels == 0).sum()),
                     width=1, alpha=140)
    fgm = plabels > 0
    img = _gt_on(canvas, run, img, extra=3)  # under the fg RoIs (the gt boxes themselves are candidates)
    img = draw_boxes(img, canvas.from_net(rois[fgm]), [class_color(int(k)) for k in plabels[fgm]], width=line)
    d = ImageDraw.Draw(img)
    gt_c = canvas.from_original(run.gt.boxes) if run.gt.boxes.numel() else torch.zeros(0, 4)
    for box, g in zip(canvas.from_net(rois[fgm]).tolist(), assign[fgm].tolist()):  # RoI centre -> its gt's centre
        if g < len(gt_c):
            gx, gy = float(gt_c[g, 0] + gt_c[g, 2]) / 2, float(gt_c[g, 1] + gt_c[g, 3]) / 2
            d.line([((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), (gx, gy)], fill=GT_COLOR, width=1)
    right = charts.vstack([
        charts.label_above(img, f"proposal target layer: {pt['fg_rois']} fg + {pt['bg_rois']} bg RoIs"),
        _class_legend(run, plabels[fgm].tolist(), img.width,
                      extra=[("bg RoI", BACKGROUND_COLOR), ("matched gt (line: RoI to its gt)", GT_COLOR)])])
    numbers = {"anchor_target": at, "proposal_target": pt, "gt_boxes": int(run.gt.boxes.shape[0]),
               "gt_source": run.gt.source}
    text = ("With ground truth, the anchor target layer labels every anchor lying inside the image: foreground if "
            "it is the best match of some gt box (type A) or overlaps one by at least "
            f"{at['TRAIN.RPN_POSITIVE_OVERLAP']:g} "
            f"(type B), background below {at['TRAIN.RPN_NEGATIVE_OVERLAP']:g}, otherwise don't care; then it samples "
            f"at most RPN_BATCHSIZE = {at['TRAIN.RPN_BATCHSIZE']} anchors, at most half of them foreground, for the "
            "RPN loss. The proposal target layer gives each RoI the class of its best-overlapping gt box and samples "
            f"foreground (IoU >= {pt['TRAIN.FG_THRESH']:g}) and background RoIs for the classification loss "
            "(computed here from the test-time proposals, in eval mode).")
    return Stage("05_targets", "5. Anchor target and proposal target layers (with ground truth)", text, numbers,
                 charts.hstack([left, right]))


def top_rois(run: ExplainRun) -> Tensor:
    """Indices of the RoIs shown in stages 6 and 7 (the same ones, numbered alike): by best class probability,
    first the best RoI of each class, then the next best of any class, ``TOP_ROIS`` in all."""
    probs = run.trace["classification"]["cls_prob"].cpu()
    best, label = probs[:, 1:].max(dim=1)
    order = torch.argsort(best, descending=True, stable=True).tolist()
    chosen, seen = [], set()
    for i in order:
        if int(label[i]) not in seen:
            seen.add(int(label[i]))
            chosen.append(i)
    chosen = chosen[:TOP_ROIS]
    chosen += [i for i in order if i not in chosen][: TOP_ROIS - len(chosen)]
    return torch.tensor(sorted(chosen, key=lambda i: -float(best[i])), dtype=torch.long)


def _crop(run: ExplainRun, box: Tensor, side: int = 112) -> Image.Image:
    x1, y1, x2, y2 = (float(v) for v in run.to_original(box.view(1, 4))[0])
    return run.image.crop((math.floor(x1), math.floor(y1), math.floor(x2) + 1, math.floor(y2) + 1)).resize(
        (side, side), Image.BILINEAR)


def pooling_stage(run: ExplainRun) -> Stage:
    cfg = run.cfg
    rec = run.trace["roi_pooling"]
    rois, crops = rec["rois"].cpu(), rec["crops"].cpu()
    idx = top_rois(run)
    summary = crops.mean(dim=1).numpy()  # channel mean per pooled cell
    lo, hi = (float(summary[idx].min()), float(summary[idx].max())) if len(idx) else (0.0, 1.0)
    side = 112
    cell = max(4, side // max(1, rec["size"]))
    tiles = []
    for n, i in enumerate(idx.tolist(), start=1):
        box = rois[i, 1:]
        w, h = (run.to_original(box.view(1, 4))[0, 2:] - run.to_original(box.view(1, 4))[0, :2] + 1).tolist()
        pair = charts.hstack([_crop(run, box, side), charts.heatmap(summary[i], cell, lo, hi, grid=True)], gap=4)
        tiles.append(charts.label_above(pair, f"RoI {n}: {w:.0f} x {h:.0f} px", size=13))
    rows = [charts.hstack(tiles[k:k + 3], gap=14) for k in range(0, len(tiles), 3)]
    canvas = make_canvas(run)
    overview = draw_boxes(canvas.image, canvas.from_original(run.to_original(rois[idx, 1:])),
                          [(255, 225, 25)] * len(idx), width=_line(canvas.image.width))
    d = ImageDraw.Draw(overview)
    for n, box in enumerate(canvas.from_original(run.to_original(rois[idx, 1:])).tolist(), start=1):
        _tag(d, (box[0], box[1]), str(n), (255, 225, 25))
    right = charts.vstack([*rows, charts.colorbar(lo, hi, "pooled feature map: mean over channels",
                                                  width=min(360, max(r.width for r in rows)))]) if rows else None
    picture = charts.hstack([charts.label_above(overview, f"{len(idx)} RoIs (numbered as in stage 7)"), right]) \
        if right else overview
    numbers = {
        "POOLING_MODE": rec["mode"],
        "POOLING_SIZE": rec["size"],
        "rois_pooled": int(rois.shape[0]),
        "pooled_shape": list(crops.shape),
        "FEAT_STRIDE": cfg.FEAT_STRIDE,
        "time_ms": _ms(run, "roi_pooling"),
    }
    how = {"crop": "crop pooling (affine_grid + grid_sample, bilinear, at twice the size then 2x2 max pooling)",
           "align": "RoI align (bilinear samples averaged in each bin)",
           "pool": "RoI pooling (max over each bin)"}.get(rec["mode"], rec["mode"])
    text = (f"Each RoI is divided by the head's stride ({cfg.FEAT_STRIDE}) onto the feature map and cut out with "
            f"{how}, giving a {rec['size']} x {rec['size']} map per RoI whatever its shape: non-square RoIs are "
            "warped to a square. Left of each pair: the RoI's pixels (warped the same way); right: its pooled "
            "features, averaged over the channels.")
    return Stage("06_roi_pooling", f"6. RoI pooling ({rec['mode']})", text, numbers, picture)


def classification_stage(run: ExplainRun) -> Stage:
    cfg = run.cfg
    rec = run.trace["classification"]
    probs, boxes, rois = rec["cls_prob"].cpu(), rec["boxes"].cpu(), rec["rois"].cpu()
    k1 = probs.shape[1]
    fg_best, fg_label = probs[:, 1:].max(dim=1)
    fg_label = fg_label + 1
    idx = top_rois(run)
    canvas = make_canvas(run)
    line = _line(canvas.image.width)
    img = canvas.image
    refined = torch.stack([boxes[i, 4 * int(fg_label[i]): 4 * int(fg_label[i]) + 4] for i in idx.tolist()]) \
        if len(idx) else torch.zeros(0, 4)
    roi_c = canvas.from_original(run.to_original(rois[idx, 1:]))
    ref_c = canvas.from_original(run.to_original(refined))
    img = draw_boxes(img, roi_c, [(255, 255, 255)] * len(idx), width=1)
    img = draw_boxes(img, ref_c, [class_color(int(fg_label[i])) for i in idx.tolist()], width=line)
    d = ImageDraw.Draw(img)
    charts_rows = []
    for n, (i, rb, fb) in enumerate(zip(idx.tolist(), roi_c.tolist(), ref_c.tolist()), start=1):
        c0 = ((rb[0] + rb[2]) / 2, (rb[1] + rb[3]) / 2)
        c1 = ((fb[0] + fb[2]) / 2, (fb[1] + fb[3]) / 2)
        d.line([c0, c1], fill=(255, 255, 255), width=2)
        ang = math.atan2(c1[1] - c0[1], c1[0] - c0[0])
        for da in (2.6, -2.6):
            d.line([c1, (c1[0] + 8 * math.cos(ang + da), c1[1] + 8 * math.sin(ang + da))], fill=(255, 255, 255),
                   width=2)
        _tag(d, (fb[0], fb[1]), str(n), class_color(int(fg_label[i])))
        top = torch.argsort(probs[i], descending=True, stable=True)[:3].tolist()
        items = [(_class_name(run, k), float(probs[i, k])) for k in top]
        colors = [class_color(k) if k > 0 else BACKGROUND_COLOR for k in top]
        charts_rows.append(charts.bar_chart(items, title=f"RoI {n}: class probabilities (top 3)", width=340,
                                            colors=colors, size=13, vmax=1.0))
    argmax = probs.argmax(dim=1)
    legend = _class_legend(run, fg_label[idx].tolist(), img.width,
                           extra=[("RoI (white) -> refined box (class colour)", (255, 255, 255))])
    left = charts.vstack([charts.label_above(img, f"{len(idx)} RoIs: the best of each class, then the next best"),
                          legend])
    picture = charts.hstack([left, charts.vstack(charts_rows)]) if charts_rows else left
    numbers = {
        "rois_classified": int(probs.shape[0]),
        "classes_with_background": int(k1),
        "rois_argmax_background": int((argmax == 0).sum()),
        "rois_argmax_per_class": {_class_name(run, k): int((argmax == k).sum()) for k in range(1, k1)},
        "TRAIN.BBOX_NORMALIZE_STDS": list(cfg.TRAIN.BBOX_NORMALIZE_STDS),
        "shown": [{"roi": n, "top_class": _class_name(run, int(fg_label[i])), "prob": float(fg_best[i])}
                  for n, i in enumerate(idx.tolist(), start=1)],
        "time_ms": _ms(run, "classification"),
    }
    text = ("The pooled map of each RoI goes through the tail of the network (fc7), then two fully connected "
            "layers: cls_score_net gives the class scores (softmax: a probability for background and each class) "
            "and bbox_pred_net gives class-specific regression coefficients, which move the RoI to a refined "
            "box for each class. The arrows go from each RoI to its refined box for its most likely class.")
    return Stage("07_classification", "7. Classification layer", text, numbers, picture)


def _present_classes(run: ExplainRun, threshold: float) -> list[int]:
    final = run.trace["detections"]["final"][0]
    labels = final["labels"][final["scores"] >= threshold].tolist()
    if not labels and len(final["scores"]):
        labels = [int(final["labels"][int(final["scores"].argmax())])]
    return sorted(set(int(k) for k in labels))


def class_nms_stage(run: ExplainRun, threshold: float) -> Stage:
    rec = run.trace["detections"]
    pre, final = rec["pre_nms"][0], rec["final"][0]
    classes = _present_classes(run, threshold)
    canvas = make_canvas(run)
    line = _line(canvas.image.width)
    rows, per_class = [], {}
    for k in classes[:4]:
        def pick(d: dict, k: int = k) -> tuple[Tensor, Tensor]:
            sel = d["labels"].cpu() == k
            b, s = d["boxes"].cpu()[sel], d["scores"].cpu()[sel]
            shown = s >= threshold
            if not bool(shown.any()):  # nothing above the threshold: the best ten, so the picture says something
                shown = torch.argsort(s, descending=True)[:10]
            return b[shown], s[shown]
        pictures = []
        for name, d in (("before", pre), ("after", final)):
            b, s = pick(d)
            order = torch.argsort(s, stable=True)
            img = draw_boxes(canvas.image, canvas.from_original(run.to_original(b[order])),
                             [class_color(k)] * len(b), width=line)
            plural = "es" if len(b) != 1 else ""
            pictures.append(charts.label_above(img, f"{_class_name(run, k)}: {len(b)} box{plural} drawn, {name} NMS"))
        rows.append(charts.hstack(pictures))
        per_class[_class_name(run, k)] = {
            "before_nms": int((pre["labels"] == k).sum()), "after_nms": int((final["labels"] == k).sum()),
            "before_nms_above_threshold": int(((pre["labels"] == k) & (pre["scores"] >= threshold)).sum()),
            "after_nms_above_threshold": int(((final["labels"] == k) & (final["scores"] >= threshold)).sum()),
        }
    picture = charts.vstack(rows, gap=10) if rows else charts.label_above(canvas.image, "no detections")
    numbers = {
        "TEST.NMS": rec["nms_thresh"],
        "TEST.SCORE_THRESH": rec["score_thresh"],
        "TEST.MAX_PER_IMAGE": rec["max_per_image"],
        "boxes_before_nms": int(len(pre["scores"])),
        "detections_after_nms": int(len(final["scores"])),
        "display_threshold": threshold,
        "per_class": per_class,
        "time_ms": _ms(run, "detections"),
    }
    text = (f"Every RoI now has a refined box and a probability for each class. Per class, boxes scoring above "
            f"TEST.SCORE_THRESH ({rec['score_thresh']:g}) go through non-maximum suppression at IoU "
            f"{rec['nms_thresh']:g} (TEST.NMS): a box overlapping a better one of the same class by more is "
            f"dropped; at most TEST.MAX_PER_IMAGE ({rec['max_per_image']}) survive over all classes. Shown: the "
            f"classes detected with a score of at least {threshold:g}, boxes scoring at least that.")
    return Stage("08_class_nms", "8. Per-class non-maximum suppression", text, numbers, picture)


def match_detections(boxes: Tensor, scores: Tensor, labels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                     iou: float = 0.5) -> tuple[Tensor, Tensor]:
    """VOC matching in one image: by descending score, a detection is a true positive if its best gt box of
    the same class overlaps it by more than ``iou`` and is not yet taken. Returns (tp flags (D,), matched (G,))."""
    tp = torch.zeros(len(scores), dtype=torch.bool)
    matched = torch.zeros(len(gt_boxes), dtype=torch.bool)
    if len(gt_boxes) == 0 or len(scores) == 0:
        return tp, matched
    overlaps = box_iou(boxes.float(), gt_boxes.float())
    overlaps[labels.view(-1, 1) != gt_labels.view(1, -1)] = -1
    for i in torch.argsort(scores, descending=True, stable=True).tolist():
        best, j = overlaps[i].max(dim=0)
        if best > iou and not matched[j]:
            tp[i] = True
            matched[j] = True
    return tp, matched


def final_stage(run: ExplainRun, threshold: float) -> Stage:
    det = run.detections
    above = torch.argsort(det.scores, descending=True, stable=True)
    above = above[det.scores[above] >= threshold]
    boxes, scores, labels = det.boxes[above], det.scores[above], det.labels[above]
    n = len(scores)
    drawn = slice(0, MAX_DRAWN)  # the best ones; all of them count
    canvas = make_canvas(run)
    line = _line(canvas.image.width)
    shown = draw_detections(canvas.image, canvas.from_original(boxes[drawn]), labels[drawn], scores[drawn],
                            run.class_names, gt_boxes=None if run.gt is None else canvas.from_original(run.gt.boxes))
    caption = f"{n} detections with score >= {threshold:g}" + (f" (best {MAX_DRAWN} drawn)" if n > MAX_DRAWN else "")
    extra = [("gt", GT_COLOR)] if run.gt is not None else []
    pictures = [charts.vstack([charts.label_above(shown, caption),
                               _class_legend(run, labels[drawn].tolist(), shown.width, extra)])]
    numbers: dict[str, Any] = {
        "threshold": threshold, "detections": n,
        "per_class": {_class_name(run, k): int((labels == k).sum()) for k in sorted(set(labels.tolist()))},
        "boxes": [{"class": _class_name(run, int(lb)), "score": round(float(s), 4),
                   "box": [round(float(v), 2) for v in b]} for b, s, lb in zip(boxes, scores, labels)],
    }
    if run.gt is not None:
        tp, matched = match_detections(boxes, scores, labels, run.gt.boxes, run.gt.labels)
        missed = ~matched
        img = draw_boxes(canvas.image, canvas.from_original(run.gt.boxes[missed]), [MISS_COLOR] * int(missed.sum()),
                         width=line + 2)
        flags = tp[drawn].tolist()
        img = draw_boxes(img, canvas.from_original(boxes[drawn]), [TP_COLOR if t else FP_COLOR for t in flags],
                         width=line)
        d = ImageDraw.Draw(img)
        for b, s, lb, t in reversed(list(zip(canvas.from_original(boxes[drawn]).tolist(), scores[drawn].tolist(),
                                             labels[drawn].tolist(), flags))):  # the best tag on top
            _tag(d, (b[0], b[1]), f"{'TP' if t else 'FP'} {_class_name(run, lb)} {s:.2f}", TP_COLOR if t else FP_COLOR)
        for b, lb in zip(canvas.from_original(run.gt.boxes[missed]).tolist(), run.gt.labels[missed].tolist()):
            _tag(d, (b[0], b[3] + 18), f"missed {_class_name(run, lb)}", MISS_COLOR)
        legend = charts.legend([("true positive", TP_COLOR), ("false positive", FP_COLOR), ("missed gt", MISS_COLOR)],
                               img.width, title="legend:")
        pictures.append(charts.vstack([charts.label_above(img, "against the ground truth (IoU > 0.5, same class)"),
                                       legend]))
        numbers.update(true_positives=int(tp.sum()), false_positives=int((~tp).sum()), missed=int(missed.sum()),
                       gt_boxes=int(len(matched)))
    text = (f"The detections that survive per-class NMS, with a score of at least {threshold:g}, drawn on the "
            "original image: their boxes were divided by the pre-processing scale factor, so they line up with "
            "the objects at the original resolution. Each class has its own colour in every picture.")
    if run.gt is not None:
        text += (" Against the ground truth, a detection is a true positive if it overlaps a not yet matched gt "
                 "box of its class by IoU > 0.5 (VOC's rule), else a false positive; unmatched gt boxes are misses.")
    return Stage("09_detections", "9. Final detections", text, numbers, charts.hstack(pictures))


STAGE_ORDER = ("preprocess", "head", "anchors", "rpn", "proposal_layer", "anchor_target", "proposal_target",
               "roi_pooling", "classification", "detections")


def timing_stage(run: ExplainRun) -> Stage:
    timings = dict(run.trace.timings)
    names = [n for n in STAGE_ORDER if n in timings] + sorted(set(timings) - set(STAGE_ORDER))
    items = [(n, 1000 * timings[n]) for n in names]
    total = sum(v for _, v in items)
    picture = charts.bar_chart(items, unit="ms", title=f"time per stage (total {total:.1f} ms, one image, "
                                                       f"{'CUDA' if run.trace['head']['features'].is_cuda else 'CPU'})")
    numbers = {"ms": {n: round(v, 3) for n, v in items}, "total_ms": round(total, 3)}
    text = ("Wall-clock time of each stage for this one image, measured only because the report asked for a "
            "trace (without one, the layers record and time nothing). The head network usually dominates; the "
            "anchor target and proposal target layers run here only because ground truth was given.")
    return Stage("10_timing", "10. Time spent per stage", text, numbers, picture)


def build_stages(run: ExplainRun, threshold: float = 0.5) -> list[Stage]:
    """Every stage of the pipeline, in order (stage 5 only with ground truth)."""
    makers: list[Callable[[], Stage | None]] = [
        lambda: preprocess_stage(run), lambda: anchors_stage(run), lambda: rpn_stage(run),
        lambda: proposal_stage(run), lambda: targets_stage(run), lambda: pooling_stage(run),
        lambda: classification_stage(run), lambda: class_nms_stage(run, threshold),
        lambda: final_stage(run, threshold), lambda: timing_stage(run),
    ]
    return [s for s in (make() for make in makers) if s is not None]
