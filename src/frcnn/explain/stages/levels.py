"""The pyramid levels of an FPN model (``NECK=fpn``) as the trace recorded them, for the stages that show them.

Level ``P<k>`` is the map at stride ``2**k`` (the FPN paper's naming: P2 at stride 4); anchors, objectness and
proposals come from every level, RoIs are pooled from all but the last (the RPN's only, for its largest anchors).
A C4 model has one map and no levels here (:func:`pyramid_levels` returns an empty list).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from frcnn.explain.run import ExplainRun
from frcnn.model.pooling import pooled_level_index

# one colour per level, finest first (P2 red ... P6 purple), for anchors, proposals and RoIs alike
LEVEL_COLORS = [(230, 25, 75), (245, 130, 48), (60, 180, 75), (0, 130, 200), (145, 30, 180), (240, 50, 230)]


@dataclass
class Level:
    index: int  # 0 for the finest
    stride: int
    feat_hw: tuple[int, int]
    start: int  # its first row in the anchors (and in the RPN's scores)
    count: int  # its anchors: h * w * A

    @property
    def k(self) -> int:
        return self.stride.bit_length() - 1

    @property
    def name(self) -> str:
        return f"P{self.k}"

    @property
    def color(self) -> tuple[int, int, int]:
        return LEVEL_COLORS[self.index % len(LEVEL_COLORS)]


def pyramid_levels(run: ExplainRun) -> list[Level]:
    """The levels of an FPN model's trace, finest first; empty for a C4 model (one map)."""
    rec = run.trace["anchors"]
    strides = run.trace["head"].get("strides", [rec["stride"]])
    if len(strides) < 2:
        return []
    levels, start = [], 0
    for i, (stride, hw, count) in enumerate(zip(strides, rec["feat_sizes"], rec["level_sizes"])):
        levels.append(Level(i, int(stride), (int(hw[0]), int(hw[1])), start, int(count)))
        start += int(count)
    return levels


def level_span(levels: list[Level]) -> str:
    """``"P2 .. P5"``."""
    return f"{levels[0].name} .. {levels[-1].name}"


def pooling_level_of(levels: list[Level], rois: Tensor) -> Tensor:
    """The level index (0 = finest) each RoI ``[batch_index, x1, y1, x2, y2]`` (R, 5) is pooled from:
    :func:`~frcnn.model.pooling.pooled_level_index` over the levels before the RPN-only one, as the model pools
    them."""
    return pooled_level_index(rois.float().cpu(), [lv.stride for lv in levels[:-1]])
