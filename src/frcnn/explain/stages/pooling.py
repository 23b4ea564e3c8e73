"""Stage 6: RoI pooling (:mod:`frcnn.model.pooling`), and :func:`top_rois`, the RoIs stages 6 and 7 show."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw
from torch import Tensor

from frcnn.explain.run import ExplainRun
from frcnn.explain.stages.canvas import Stage, _line, _ms, _tag, draw_boxes, make_canvas
from frcnn.explain.stages.levels import Level, pooling_level_of, pyramid_levels
from frcnn.model.pooling import CANONICAL_LEVEL, CANONICAL_SIZE
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
    levels = pyramid_levels(run)
    of = pooling_level_of(levels, rois) if levels else None
    summary = crops.mean(dim=1).numpy()  # channel mean per pooled cell
    lo, hi = (float(summary[idx].min()), float(summary[idx].max())) if len(idx) else (0.0, 1.0)
    side = 112
    cell = max(4, side // max(1, rec["size"]))
    tiles = []
    for n, i in enumerate(idx.tolist(), start=1):
        box = rois[i, 1:]
        w, h = (run.to_original(box.view(1, 4))[0, 2:] - run.to_original(box.view(1, 4))[0, :2] + 1).tolist()
        pair = charts.hstack([_crop(run, box, side), charts.heatmap(summary[i], cell, lo, hi, grid=True)], gap=4)
        where = f", {levels[int(of[i])].name}" if levels else ""
        tiles.append(charts.label_above(pair, f"RoI {n}: {w:.0f} x {h:.0f} px{where}", size=13))
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
    stage = Stage("06_roi_pooling", f"6. RoI pooling ({rec['mode']})", text, numbers, picture)
    return _pyramid_pooling(run, levels, stage, how) if levels else stage


# ------------------------------------------------------------------------------ FPN: RoIs by level

def rois_by_level(run: ExplainRun, levels: list[Level]) -> list[Tensor]:
    """Per pooled level (all but the RPN-only last), the indices of the pooled RoIs it is pooled from, in the
    order of the pooled RoIs (:func:`~frcnn.explain.stages.levels.pooling_level_of`)."""
    of = pooling_level_of(levels, run.trace["roi_pooling"]["rois"])
    return [(of == lv.index).nonzero().squeeze(1) for lv in levels[:-1]]


def size_range(levels: list[Level], lv: Level) -> str:
    """The RoI sizes ``sqrt(w h)`` (network px) the level rule sends to ``lv``, e.g. ``"112 - 224 px"``."""
    lo = CANONICAL_SIZE * 2.0 ** (lv.k - CANONICAL_LEVEL)
    hi = 2 * lo
    if len(levels) == 2:
        return "any"
    if lv.index == 0:
        return f"< {hi:g} px"
    if lv.index == len(levels) - 2:
        return f">= {lo:g} px"
    return f"{lo:g} - {hi:g} px"


def _pyramid_pooling(run: ExplainRun, levels: list[Level], stage: Stage, how: str) -> Stage:
    """Stage 6 for FPN: the C4 picture and numbers, plus every pooled RoI coloured by its level, counts per level."""
    rois = run.trace["roi_pooling"]["rois"].cpu()
    groups = rois_by_level(run, levels)
    pooled = levels[:-1]
    canvas = make_canvas(run)
    order = torch.cat(groups).flip(0) if groups else torch.zeros(0, dtype=torch.long)  # the finest drawn on top
    colour_of = {int(i): lv.color for lv, g in zip(pooled, groups) for i in g}
    img = draw_boxes(canvas.image, canvas.from_original(run.to_original(rois[order, 1:])),
                     [colour_of[int(i)] for i in order], width=max(1, _line(canvas.image.width) - 1))
    legend = charts.legend([(f"{lv.name} (stride {lv.stride}, sqrt(wh) {size_range(levels, lv)}): {len(g)} RoIs",
                             lv.color) for lv, g in zip(pooled, groups)], img.width, title="pooled from:")
    stage.image = charts.vstack([stage.image, charts.vstack([
        charts.label_above(img, f"all {len(rois)} RoIs, coloured by the level they are pooled from"), legend])],
        gap=12)
    k_min, k_max = pooled[0].k, pooled[-1].k
    rule = (f"k = floor({CANONICAL_LEVEL} + log2(sqrt(w h) / {CANONICAL_SIZE:g})) clamped to [{k_min}, {k_max}]")
    numbers = {k: v for k, v in stage.numbers.items() if k != "FEAT_STRIDE"}
    numbers["level_rule"] = rule
    numbers["levels"] = [{"level": lv.name, "stride": lv.stride, "sqrt_wh": size_range(levels, lv), "rois": len(g),
                          "roi_indices": g.tolist()} for lv, g in zip(pooled, groups)]
    if "proposal_target" in run.trace:  # what training would pool: the sampled RoIs
        of = pooling_level_of(levels, run.trace["proposal_target"]["rois"])
        numbers["sampled_rois_per_level"] = {lv.name: int((of == lv.index).sum()) for lv in pooled}
    stage.numbers = numbers
    size = run.trace["roi_pooling"]["size"]
    takes = ", ".join(f"{lv.name} (stride {lv.stride}) takes sqrt(wh) {size_range(levels, lv)}" for lv in pooled)
    stage.text = (f"With a pyramid, each RoI is pooled from one level, chosen by its size (FPN paper, eq. 1): {rule}, "
                  f"w and h the RoI's size in network pixels: a {CANONICAL_SIZE:g}-px RoI reads P{CANONICAL_LEVEL}, "
                  "a RoI half as large the level below, one twice as large the level above, within the clamp; "
                  f"here {takes}. "
                  f"The RPN-only level {levels[-1].name} is never pooled. The RoI is divided by its level's stride "
                  f"2^k onto that level's map and cut out with {how}, giving a {size} x {size} map per RoI whatever "
                  "its shape and level (non-square RoIs are warped to a square); all levels have the same channels, "
                  "so one classification network reads them all. Top: the RoIs of stage 7, each pair its pixels and "
                  "its pooled features averaged over the channels; bottom: every RoI, coloured by its level.")
    return stage
