"""Stages 1 and 2: image pre-processing (:func:`frcnn.transforms.prep_image`) and the anchor generation layer
(:mod:`frcnn.model.anchors`)."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw

from frcnn.explain.run import ExplainRun
from frcnn.explain.stages.canvas import Stage, _ms, draw_boxes, make_canvas
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
