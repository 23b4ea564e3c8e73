"""Stage 7: the classification layer (:mod:`frcnn.model.roi_heads`): class probabilities and refined boxes of
the RoIs :func:`~frcnn.explain.stages.pooling.top_rois` picks."""

from __future__ import annotations

import math

import torch
from PIL import ImageDraw

from frcnn.explain.run import ExplainRun
from frcnn.explain.stages.canvas import (
    BACKGROUND_COLOR,
    Stage,
    _class_legend,
    _class_name,
    _line,
    _ms,
    _tag,
    draw_boxes,
    make_canvas,
)
from frcnn.explain.stages.pooling import top_rois
from frcnn.viz import charts
from frcnn.viz.draw import class_color


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
