"""The trace of one forward pass: every stage's intermediate result, recorded only on request.

Pass a :class:`Trace` to :meth:`frcnn.model.detector.FasterRCNN.forward` and each layer stores its
result under its own name; pass nothing and no layer does any extra work (each record is behind an
``if trace is not None``). Tensors are stored detached. Stage names and what they hold:

``head``               features (N, C, H/16, W/16) (FPN: the finest level's), levels (every map, finest first;
                       C4: one) and their strides
``anchors``            anchors (M, 4) in network-input pixels (FPN: every level's, level by level), feat_size (H, W)
                       and stride of the first map, num_base_anchors A, level_sizes (anchors per level),
                       feat_sizes (per level)
``rpn``                fg_scores (N, M) softmax objectness, deltas (N, M, 4)
``proposal_layer``     per image: pre_nms_boxes / pre_nms_scores (top RPN_PRE_NMS_TOP_N, per level for FPN) and
                       their levels, and the kept rois (R, 5) ``[batch_index, x1, y1, x2, y2]`` with scores (R,)
                       and roi_levels (R,) (the level each came from; 0 for C4)
``anchor_target``      labels (N, M) 1 fg / 0 bg / -1 don't care after sampling, type_a / type_b (N, M)
                       masks before sampling, inside (N, M) mask, max_overlaps (N, M), fg_candidates /
                       bg_candidates (N, M) the fg / bg labels before sampling
``proposal_target``    rois (S, 5), labels (S,), gt_assignment (S,), max_overlaps (S,)
``roi_pooling``        rois (R, 5) that were pooled, crops (R, C, P, P)
``classification``     cls_prob (R, K+1), boxes (R, 4(K+1)) class-specific refined boxes
``detections``         per image: pre_nms boxes/scores/labels and the final boxes/scores/labels
``timings``            seconds spent in each stage (a dict, filled only when tracing)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class Trace:
    """A record of the stages of one forward pass (see the module docstring for the names)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, float] = {}

    def put(self, stage: str, **values: Any) -> None:
        record = self.stages.setdefault(stage, {})
        for key, value in values.items():
            record[key] = _detach(value)

    def __getitem__(self, stage: str) -> dict[str, Any]:
        return self.stages[stage]

    def __contains__(self, stage: str) -> bool:
        return stage in self.stages

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):  # half precision (autocast) stored as float32, for numpy and charts
        return value.detach().float() if value.dtype in (torch.bfloat16, torch.float16) else value.detach()
    if isinstance(value, list):
        return [_detach(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


@contextmanager
def maybe_timed(trace: Trace | None, stage: str) -> Iterator[None]:
    """Time a stage into the trace; a no-op when there is no trace."""
    if trace is None:
        yield
    else:
        with trace.timed(stage):
            yield
