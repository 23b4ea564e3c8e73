"""Stage 6: RoI pooling (:mod:`frcnn.model.pooling`), and :func:`top_rois`, the RoIs stages 6 and 7 show."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from frcnn.explain.run import ExplainRun
from frcnn.explain.stages.canvas import Stage, _line, _ms, _tag, draw_boxes, make_canvas
from frcnn.viz import charts

TOP_ROIS = 6  # RoIs shown in the pooling and classification pictures


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
