"""Stages 3 and 4: the region proposal network's objectness and the proposal layer before and after NMS
(:mod:`frcnn.model.rpn`)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from frcnn.explain.run import ExplainRun
from frcnn.explain.stages.canvas import Canvas, Stage, _line, _ms, draw_boxes, feature_overlay, make_canvas
from frcnn.viz import charts

TOP_BOXES = 50  # boxes drawn per proposal picture


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
