"""Stage 5 (only with ground truth): the anchor target layer (:mod:`frcnn.model.anchor_target`) and the
proposal target layer (:mod:`frcnn.model.proposal_target`), their counts read from the trace."""

from __future__ import annotations

from typing import Any

import torch
from PIL import ImageDraw

from frcnn.explain.run import ExplainRun
from frcnn.explain.stages.canvas import (
    BACKGROUND_COLOR,
    Stage,
    _class_legend,
    _gt_on,
    _line,
    _ms,
    draw_boxes,
    make_canvas,
)
from frcnn.viz import charts
from frcnn.viz.draw import GT_COLOR, class_color


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
        "TRAIN.RPN_ALLOWED_BORDER": rec["allowed_border"],
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
    border = at["TRAIN.RPN_ALLOWED_BORDER"]
    which = ("every anchor (TRAIN.RPN_ALLOWED_BORDER < 0: those crossing the image border too)" if border < 0 else
             "every anchor lying inside the image" if border == 0 else
             f"every anchor lying inside the image or crossing its border by at most {border:g} px")
    text = (f"With ground truth, the anchor target layer labels {which}: foreground if "
            "it is the best match of some gt box (type A) or overlaps one by at least "
            f"{at['TRAIN.RPN_POSITIVE_OVERLAP']:g} "
            f"(type B), background below {at['TRAIN.RPN_NEGATIVE_OVERLAP']:g}, otherwise don't care; then it samples "
            f"at most RPN_BATCHSIZE = {at['TRAIN.RPN_BATCHSIZE']} anchors, at most half of them foreground, for the "
            "RPN loss. The proposal target layer gives each RoI the class of its best-overlapping gt box and samples "
            f"foreground (IoU >= {pt['TRAIN.FG_THRESH']:g}) and background RoIs for the classification loss "
            "(computed here from the test-time proposals, in eval mode).")
    return Stage("05_targets", "5. Anchor target and proposal target layers (with ground truth)", text, numbers,
                 charts.hstack([left, right]))
