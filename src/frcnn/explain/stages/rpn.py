"""Stages 3 and 4: the region proposal network's objectness and the proposal layer before and after NMS
(:mod:`frcnn.model.rpn`)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from frcnn.explain.run import ExplainRun
from frcnn.explain.stages.canvas import Canvas, Stage, _line, _ms, draw_boxes, feature_overlay, make_canvas
from frcnn.explain.stages.levels import Level, level_span, pyramid_levels
from frcnn.viz import charts

TOP_BOXES = 50  # boxes drawn per proposal picture


def rpn_stage(run: ExplainRun) -> Stage:
    cfg = run.cfg
    levels = pyramid_levels(run)
    if levels:
        return _pyramid_rpn_stage(run, levels)
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
    d = cfg.RPN_DILATION
    dilated = f" of dilation {d} (its taps {d} cells apart)" if d > 1 else ""
    text = (f"The region proposal network runs a 3x3 convolution{dilated} (rpn_net) and ReLU over the head's "
            "feature map, then two 1x1 convolutions: rpn_cls_score_net gives each anchor a background and a foreground "
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
    picture = charts.vstack([pair, bar])
    levels = pyramid_levels(run)
    if levels:
        return _pyramid_proposals(run, levels, Stage("04_proposal_layer", "4. Proposal layer (before and after NMS)",
                                                     text, numbers, picture))
    return Stage("04_proposal_layer", "4. Proposal layer (before and after NMS)", text, numbers, picture)


# ------------------------------------------------------------------------------ FPN: one map per level

def level_objectness(run: ExplainRun, levels: list[Level]) -> list[np.ndarray]:
    """Per level, the (h, w) map of the best foreground probability over each cell's anchors."""
    fg = run.trace["rpn"]["fg_scores"][0].cpu()
    a = run.trace["anchors"]["num_base_anchors"]
    return [fg[lv.start: lv.start + lv.count].view(*lv.feat_hw, a).amax(dim=2).numpy() for lv in levels]


def objectness_tiles(run: ExplainRun, levels: list[Level]) -> list[Image.Image]:
    """One objectness picture per level, each cell of the level's map over the network pixels it covers."""
    canvas = make_canvas(run)
    return [charts.label_above(feature_overlay(canvas, best, lv.stride),
                               f"{lv.name}: stride {lv.stride}, {lv.feat_hw[1]} x {lv.feat_hw[0]} cells")
            for lv, best in zip(levels, level_objectness(run, levels))]


def _pyramid_rpn_stage(run: ExplainRun, levels: list[Level]) -> Stage:
    cfg = run.cfg
    tiles = objectness_tiles(run, levels)
    grid = charts.vstack([charts.hstack(tiles[k:k + 2], gap=12) for k in range(0, len(tiles), 2)], gap=8)
    picture = charts.vstack([grid, charts.colorbar(0, 1, "RPN foreground probability, best anchor per cell",
                                                   width=min(grid.width, 480))])
    per_level = []
    for lv, best in zip(levels, level_objectness(run, levels)):
        i, j = np.unravel_index(int(best.argmax()), best.shape)
        fg = run.trace["rpn"]["fg_scores"][0, lv.start: lv.start + lv.count].cpu()
        per_level.append({"level": lv.name, "stride": lv.stride, "feature_map_hw": list(lv.feat_hw),
                          "anchors": lv.count, "objectness_max": float(fg.max()), "objectness_mean": float(fg.mean()),
                          "anchors_above_0.5": int((fg > 0.5).sum()), "best_cell_ij": [int(i), int(j)]})
    numbers = {
        "levels": per_level,
        "anchors": sum(lv.count for lv in levels),
        "RPN_CHANNELS": cfg.RPN_CHANNELS,
        "time_ms_head": _ms(run, "head"),
        "time_ms_rpn": _ms(run, "rpn"),
    }
    text = (f"The region proposal network runs the same three convolutions, with the same weights, over every "
            f"pyramid level ({level_span(levels)}): a 3x3 convolution (rpn_net) and ReLU, then rpn_cls_score_net "
            "(a background and a foreground score per anchor; softmax: the objectness shown here) and "
            "rpn_bbox_pred_net (four regression coefficients per anchor). One picture per level, each cell of "
            "the level's map covering stride x stride network pixels: fine levels (small anchors) should light up "
            "on small objects, coarse levels (large anchors) on large ones.")
    return Stage("03_rpn", "3. Region proposal network output (every pyramid level)", text, numbers, picture)


def kept_levels(run: ExplainRun) -> Tensor:
    """The level index of each proposal image 0 kept after NMS, in the order of the proposal layer's rois."""
    rec = run.trace["proposal_layer"]
    return rec["roi_levels"].cpu()[rec["rois"][:, 0].cpu() == 0]


def _pyramid_proposals(run: ExplainRun, levels: list[Level], stage: Stage) -> Stage:
    """Stage 4 for FPN: the C4 pictures and numbers, plus the proposals coloured by level and counts per level."""
    rec = run.trace["proposal_layer"]
    rois = rec["rois"].cpu()
    rois = rois[rois[:, 0] == 0, 1:]
    of = kept_levels(run)
    shown = min(len(rois), 4 * TOP_BOXES)
    canvas = make_canvas(run)
    order = torch.arange(shown).flip(0)  # the best drawn last, on top
    img = draw_boxes(canvas.image, canvas.from_original(run.to_original(rois[order])),
                     [levels[int(of[i])].color for i in order], width=_line(canvas.image.width))
    candidates = rec["levels"].cpu()
    counts = [(lv, int((candidates == lv.index).sum()), int((of == lv.index).sum())) for lv in levels]
    legend = charts.legend([(f"{lv.name} (stride {lv.stride}): {kept} of {cand}", lv.color)
                            for lv, cand, kept in counts], img.width, title="kept of candidates:")
    by_level = charts.vstack([charts.label_above(img, f"top {shown} of {len(rois)} after NMS, coloured by level"),
                              legend])
    stage.image = charts.vstack([stage.image, by_level], gap=12)
    stage.numbers = {**stage.numbers, "levels": [{"level": lv.name, "stride": lv.stride, "anchors": lv.count,
                                                  "candidates": cand, "kept": kept} for lv, cand, kept in counts]}
    pre = rec["pre_nms_top_n"] if rec["pre_nms_top_n"] > 0 else "0: all"
    per_level = ", ".join(f"{c} on {lv.name}" for lv, c, _ in counts)
    stage.text = (f"The proposal layer applies the RPN's regression coefficients to all {stage.numbers['anchors']} "
                  "anchors of all levels and clips the boxes to the image. With a pyramid, RPN_PRE_NMS_TOP_N "
                  f"({pre}) is per level: each level keeps its own best candidates ({per_level}), so that the many "
                  "small anchors of the fine levels do not crowd out the few large ones. Non-maximum suppression at "
                  f"IoU {rec['nms_thresh']:g} runs within each level (a box never suppresses one of another "
                  f"level), then the best RPN_POST_NMS_TOP_N ({rec['post_nms_top_n']}) over all levels are kept, "
                  f"whatever their level; {len(rois)} were. These are the RoIs; the last picture colours each by "
                  "the level whose anchor it came from.")
    return stage
