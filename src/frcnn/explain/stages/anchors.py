"""Stages 1 and 2: image pre-processing (:func:`frcnn.transforms.prep_image`) and the anchor generation layer
(:mod:`frcnn.model.anchors`)."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from frcnn.explain.run import ExplainRun
from frcnn.explain.stages.canvas import Canvas, Stage, _ms, draw_boxes, make_canvas
from frcnn.explain.stages.levels import Level, pyramid_levels
from frcnn.viz import charts


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


def _canvas_reaching(run: ExplainRun, boxes_net: Tensor) -> Canvas:
    """A canvas with a grey margin wide enough (up to 400 px) for ``boxes_net`` reaching outside the image."""
    probe = make_canvas(run)
    boxes = probe.from_net(boxes_net)
    reach = float(max(0.0, -boxes[:, :2].min().item(), (boxes[:, 2] - probe.image.width + 1).max().item(),
                      (boxes[:, 3] - probe.image.height + 1).max().item()))
    return make_canvas(run, margin=min(400, math.ceil(reach) + 4) if reach > 0 else 0)


def _centre_dot(canvas: Canvas, image: Image.Image, anchor: Tensor, colour=(255, 255, 255)) -> None:
    ctr = canvas.point_from_net((anchor[:2] + anchor[2:]) / 2)
    ImageDraw.Draw(image).ellipse([ctr[0] - 4, ctr[1] - 4, ctr[0] + 4, ctr[1] + 4], fill=colour, outline=(0, 0, 0))


def _centre_grid(run: ExplainRun, anchors: Tensor, a: int, stride: int) -> Image.Image:
    """The canvas with a dot at the centre of every cell's anchors (``anchors`` of one map, ``a`` per cell)."""
    grid = make_canvas(run)
    centres = grid.point_from_net((anchors[::a, :2] + anchors[::a, 2:]) / 2)
    g = ImageDraw.Draw(grid.image)
    r = max(1.5, min(4.0, grid.factor * stride / run.scale / 6))
    for x, y in centres.tolist():
        g.ellipse([x - r, y - r, x + r, y + r], fill=(255, 225, 25), outline=(0, 0, 0))
    return grid.image


def anchors_stage(run: ExplainRun) -> Stage:
    cfg = run.cfg
    levels = pyramid_levels(run)
    if levels:
        return _pyramid_anchors_stage(run, levels)
    rec = run.trace["anchors"]
    anchors = rec["anchors"].cpu()
    fh, fw = rec["feat_size"]
    a = rec["num_base_anchors"]
    stride = rec["stride"]
    ch, cw = fh // 2, fw // 2
    cell = (ch * fw + cw) * a
    at_cell = anchors[cell: cell + a]
    canvas = _canvas_reaching(run, at_cell)
    n_ratios = len(cfg.ANCHOR_RATIOS)
    n_scales = a // max(1, n_ratios)
    ratio_colors = [(230, 25, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (60, 180, 75)]
    colours = [ratio_colors[(i // max(1, n_scales)) % len(ratio_colors)] for i in range(a)]
    left = draw_boxes(canvas.image, canvas.from_net(at_cell), colours, width=2)
    _centre_dot(canvas, left, at_cell[0])
    sizes = (at_cell[:, 2:] - at_cell[:, :2] + 1).round().int().tolist()
    legend = charts.legend(
        [(f"ratio {cfg.ANCHOR_RATIOS[r]:g}: "
          + ", ".join(f"{w}x{h}" for w, h in sizes[r * n_scales:(r + 1) * n_scales]),
          ratio_colors[r % len(ratio_colors)]) for r in range(n_ratios)], max(left.width, 420),
        title="w x h (network px):")
    left = charts.vstack([charts.label_above(left, f"the {a} anchors of feature cell ({ch}, {cw})"), legend])

    right = charts.label_above(_centre_grid(run, anchors, a, stride),
                               f"anchor centres: a {fw} x {fh} grid, every {stride} network px")
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


def _centre_cell(run: ExplainRun, level: Level) -> int:
    """The first anchor row of the level's cell under the centre of the resized image."""
    h, w = run.input_size
    fh, fw = level.feat_hw
    a = level.count // (fh * fw)
    i, j = min(fh - 1, (h // 2) // level.stride), min(fw - 1, (w // 2) // level.stride)
    return level.start + (i * fw + j) * a


def _pyramid_anchors_stage(run: ExplainRun, levels: list[Level]) -> Stage:
    cfg = run.cfg
    anchors = run.trace["anchors"]["anchors"].cpu()
    a = run.trace["anchors"]["num_base_anchors"]
    cells = [anchors[_centre_cell(run, lv): _centre_cell(run, lv) + a] for lv in levels]
    canvas = _canvas_reaching(run, torch.cat(cells))
    left = canvas.image
    for lv, at_cell in zip(reversed(levels), reversed(cells)):  # the largest first, the finest on top
        left = draw_boxes(left, canvas.from_net(at_cell), [lv.color] * a, width=2)
    for lv, at_cell in zip(levels, cells):
        _centre_dot(canvas, left, at_cell[0], lv.color)
    sizes = [(c[:, 2:] - c[:, :2] + 1).round().int().tolist() for c in cells]
    legend = charts.legend(
        [(f"{lv.name}, stride {lv.stride}, " + "/".join(f"{s * lv.stride:g}" for s in cfg.ANCHOR_SCALES)
          + " px: " + ", ".join(f"{w}x{h}" for w, h in wh), lv.color)
         for lv, wh in zip(levels, sizes)], max(left.width, 420), title="w x h (network px):")
    left = charts.vstack([charts.label_above(left, "the anchors of the cell under the image centre, per level"),
                          legend])
    side = max(200, left.width // 3)
    grids = []
    for lv in levels:
        fh, fw = lv.feat_hw
        grid = _centre_grid(run, anchors[lv.start: lv.start + lv.count], a, lv.stride)
        grid = grid.resize((side, max(1, round(grid.height * side / grid.width))), Image.LANCZOS)
        grids.append(charts.label_above(grid, f"{lv.name}: {fw} x {fh} centres, every {lv.stride} px", size=12))
    right = charts.vstack([charts.hstack(grids[k:k + 2], gap=6) for k in range(0, len(grids), 2)], gap=6)
    scales = list(cfg.ANCHOR_SCALES)
    numbers = {
        "levels": [{"level": lv.name, "stride": lv.stride, "feature_map_hw": list(lv.feat_hw),
                    "anchor_sizes_px": [round(s * lv.stride) for s in scales], "anchors": lv.count}
                   for lv in levels],
        "anchors_per_location": a,
        "ANCHOR_SCALES": scales,
        "ANCHOR_RATIOS": list(cfg.ANCHOR_RATIOS),
        "anchor_sizes_wh": {lv.name: wh for lv, wh in zip(levels, sizes)},
        "total_anchors": int(anchors.shape[0]),
        "time_ms": _ms(run, "anchors"),
    }
    first, last = levels[0], levels[-1]
    sizes_text = ", ".join("/".join(str(round(s * lv.stride)) for s in scales) + f" px on {lv.name}" for lv in levels)
    at_strides = ", ".join(f"{lv.name} at stride {lv.stride}" for lv in levels)
    text = (f"With a Feature Pyramid Network (NECK=fpn) the head gives {len(levels)} feature maps, level P<k> at "
            f"stride 2^k network pixels: {at_strides}, all with FPN_CHANNELS ({cfg.FPN_CHANNELS}) channels. Each "
            f"level has its own {a} anchors per cell ({len(scales)} scale(s) x {len(cfg.ANCHOR_RATIOS)} aspect "
            f"ratios), of size ANCHOR_SCALES x the level's stride ({sizes_text}; a ratio keeps the area, up to "
            "rounding), centred on the top-left corner of each cell as in torchvision and detectron2, and "
            "translated over every cell of its "
            f"map, one stride apart: {int(anchors.shape[0])} anchors in all, from {first.count} on {first.name} to "
            f"{last.count} on {last.name}. Small anchors on fine maps, large anchors on coarse ones. The last level "
            f"({last.name}) serves the RPN only (its largest anchors); RoIs are pooled from {first.name} .. "
            f"{levels[-2].name}.")
    return Stage("02_anchors", "2. Anchor generation layer (one set per pyramid level)", text, numbers,
                 charts.hstack([left, right]))
