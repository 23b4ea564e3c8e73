"""Turn the trace of one image into pictures and numbers, one :class:`Stage` per step of the pipeline.

Each ``*_stage`` function takes an :class:`~frcnn.explain.run.ExplainRun` and returns a :class:`Stage`: a
title, two or three sentences in the write-up's vocabulary, the numbers that matter (counts read from the
trace, thresholds from the config, timings) and one picture. The numbers are the layers' own: every count
is read off the tensors the layers recorded, never recomputed by a second implementation.

One module per part of the pipeline, named as in :mod:`frcnn.model` and in the order of the page:
:mod:`.canvas` (what every stage shares), :mod:`.anchors` (stages 1-2), :mod:`.rpn` (3-4), :mod:`.targets` (5),
:mod:`.pooling` (6), :mod:`.roi_heads` (7), :mod:`.detections` (8-9); stage 10 and :func:`build_stages` are here
(the map with the stage titles: :mod:`frcnn.explain`). Every public name of those modules is importable
from here (``from frcnn.explain.stages import ...``). :mod:`.levels` reads an FPN model's pyramid levels from
the trace; stages 2, 3, 4 and 6 then show them level by level (the level helpers stay in the stage modules).
"""

from __future__ import annotations

from collections.abc import Callable

from frcnn.explain.run import ExplainRun
from frcnn.explain.stages.anchors import anchors_stage, preprocess_stage
from frcnn.explain.stages.canvas import (
    BACKGROUND_COLOR,
    BG_NAME,
    Canvas,
    Stage,
    display_factor,
    draw_boxes,
    feature_overlay,
    make_canvas,
)
from frcnn.explain.stages.detections import (
    FP_COLOR,
    MAX_DRAWN,
    MISS_COLOR,
    TP_COLOR,
    class_nms_stage,
    final_stage,
    match_detections,
)
from frcnn.explain.stages.levels import LEVEL_COLORS, Level, pooling_level_of, pyramid_levels
from frcnn.explain.stages.pooling import TOP_ROIS, pooling_stage, rois_by_level, size_range, top_rois
from frcnn.explain.stages.roi_heads import classification_stage
from frcnn.explain.stages.rpn import (
    TOP_BOXES,
    kept_levels,
    level_objectness,
    objectness_tiles,
    proposal_stage,
    rpn_stage,
)
from frcnn.explain.stages.targets import anchor_target_numbers, proposal_target_numbers, targets_stage
from frcnn.viz import charts

__all__ = [
    "BACKGROUND_COLOR", "BG_NAME", "FP_COLOR", "LEVEL_COLORS", "MAX_DRAWN", "MISS_COLOR", "STAGE_ORDER", "TOP_BOXES",
    "TOP_ROIS", "TP_COLOR", "Canvas", "Level", "Stage", "anchor_target_numbers", "anchors_stage", "build_stages",
    "class_nms_stage", "classification_stage", "display_factor", "draw_boxes", "feature_overlay", "final_stage",
    "kept_levels", "level_objectness", "make_canvas", "match_detections", "objectness_tiles", "pooling_level_of",
    "pooling_stage", "preprocess_stage", "proposal_stage", "proposal_target_numbers", "pyramid_levels",
    "rois_by_level", "rpn_stage", "size_range", "targets_stage", "timing_stage", "top_rois",
]


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
