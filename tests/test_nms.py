"""frcnn.model.nms against torchvision's ops called directly: identical kept indices, in the same order.

The blocked path is forced on small inputs (``MIN_BOXES = 0``, tiny ``BLOCK`` and ``CHUNK``) so that every
branch (several blocks, several column chunks, zero-area boxes, ties) runs on inputs hypothesis can shrink.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from frcnn.model import nms as nms_mod
from frcnn.model.anchors import generate_anchors, shift_anchors

THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 1.0]


@pytest.fixture(autouse=True)
def force_blocked(monkeypatch):
    monkeypatch.setattr(nms_mod, "MIN_BOXES", 0)
    monkeypatch.setattr(nms_mod, "BLOCK", 7)
    monkeypatch.setattr(nms_mod, "CHUNK", 20)


def same_nms(boxes, scores, t):
    want = torchvision.ops.nms(boxes, scores, t)
    got = nms_mod.nms(boxes, scores, t)
    assert got.dtype == torch.int64
    assert torch.equal(got, want), (got.tolist(), want.tolist())


@st.composite
def box_sets(draw, max_n=60):
    n = draw(st.integers(0, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["uniform", "grid", "clustered", "degenerate"]))
    if kind == "grid":  # integer coordinates on a small grid: many duplicates, equal IoUs, zero areas
        xy = torch.randint(0, 6, (n, 2), generator=g).float()
        wh = torch.randint(0, 4, (n, 2), generator=g).float()
    elif kind == "clustered":
        c = torch.rand(max(1, n // 8), 2, generator=g) * 100
        xy = c[torch.randint(len(c), (n,), generator=g)] + torch.randn(n, 2, generator=g) * 3
        wh = 20 + torch.randn(n, 2, generator=g) * 2
    elif kind == "degenerate":  # identical boxes, some with zero width or height
        xy = torch.full((n, 2), 3.0)
        wh = torch.where(torch.rand(n, 2, generator=g) < 0.3, 0.0, 5.0)
    else:
        xy = torch.rand(n, 2, generator=g) * 100
        wh = torch.rand(n, 2, generator=g) * 40
    boxes = torch.cat((xy, xy + wh), 1)
    levels = draw(st.sampled_from([2, 5, 1000]))  # few score levels: many ties
    scores = torch.randint(0, levels, (n,), generator=g).float() / levels
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return boxes.to(dtype), scores.to(dtype)


@settings(max_examples=300, deadline=None)
@given(box_sets(), st.sampled_from(THRESHOLDS + [0.1, 0.9]))
def test_nms_matches_torchvision(data, t):
    boxes, scores = data
    same_nms(boxes, scores, t)


@settings(max_examples=150, deadline=None)
@given(box_sets(), st.sampled_from(THRESHOLDS + [0.1, 0.9]), st.integers(1, 70))
def test_nms_with_max_keep_is_the_first_kept_of_torchvision(data, t, max_keep):
    boxes, scores = data
    want = torchvision.ops.nms(boxes, scores, t)[:max_keep]
    assert torch.equal(nms_mod.nms(boxes, scores, t, max_keep=max_keep), want)


@settings(max_examples=150, deadline=None)
@given(box_sets(), st.sampled_from(THRESHOLDS), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_batched_nms_matches_torchvision(data, t, classes, seed):
    boxes, scores = data
    idxs = torch.randint(0, classes, (boxes.shape[0],), generator=torch.Generator().manual_seed(seed))
    want = torchvision.ops.batched_nms(boxes, scores, idxs, t)
    assert torch.equal(nms_mod.batched_nms(boxes, scores, idxs, t), want)


def test_batched_nms_per_class_path_matches_torchvision():
    # above 1000 boxes torchvision runs one NMS per class (and sorts the union): the same here
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(1500, 2, generator=g) * 300
    boxes = torch.cat((xy, xy + 10 + torch.rand(1500, 2, generator=g) * 50), 1)
    scores = torch.randint(0, 50, (1500,), generator=g).float()
    idxs = torch.randint(0, 5, (1500,), generator=g)
    for t in THRESHOLDS:
        want = torchvision.ops.batched_nms(boxes, scores, idxs, t)
        assert torch.equal(nms_mod.batched_nms(boxes, scores, idxs, t), want)


@pytest.mark.parametrize("t", THRESHOLDS)
def test_edge_cases(t):
    for n in (0, 1, 2):
        same_nms(torch.rand(n, 4) * 10 + torch.tensor([0, 0, 10, 10]), torch.rand(n), t)
    same_nms(torch.tensor([[1.0, 2.0, 5.0, 9.0]] * 30), torch.ones(30), t)  # all identical, all tied
    same_nms(torch.tensor([[1.0, 1.0, 1.0, 4.0]] * 10), torch.rand(10), t)  # all identical, zero area


def test_ties_follow_torchvision_order():
    # disjoint boxes keep everything: the output is the sort order itself, ties by index
    n = 500
    x = torch.arange(n).float() * 20
    boxes = torch.stack((x, torch.zeros(n), x + 10, torch.full((n,), 10.0)), 1)
    scores = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(0)).float()
    same_nms(boxes, scores, 0.5)


def test_threshold_compared_like_torchvision():
    # IoU exactly representable around the threshold: float32 IoU vs a double threshold
    for w in range(1, 40):
        boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0 * w / 40]])
        for t in (0.3, 0.7, 0.1 * w / 4, float(torch.tensor(w / 40, dtype=torch.float32))):
            same_nms(boxes, torch.tensor([1.0, 0.5]), t)
            same_nms(boxes.double(), torch.tensor([1.0, 0.5]).double(), t)


def rpn_like(n, seed):
    """Proposal-layer boxes: random deltas decoded on real anchors, objectness peaked around a few objects."""
    from frcnn.boxes import bbox_transform_inv, clip_boxes, to_exclusive

    g = torch.Generator().manual_seed(seed)
    anchors = shift_anchors(generate_anchors(), 38, 63, 16)
    boxes = clip_boxes(bbox_transform_inv(anchors, torch.randn(anchors.shape[0], 4, generator=g) * 0.1), 600, 1000)
    centres = torch.rand(8, 2, generator=g) * torch.tensor([1000.0, 600.0])
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    d = torch.cdist(ctr, centres).min(1).values
    scores = torch.sigmoid(-d / 60 + torch.rand(anchors.shape[0], generator=g))
    top, order = scores.topk(n)
    return to_exclusive(boxes[order]), top


@pytest.mark.parametrize("t", [0.7, 0.3])
def test_proposal_sized_inputs(monkeypatch, t):
    # default block and chunk sizes on realistic proposal-layer inputs (bounded: 3000 boxes)
    monkeypatch.setattr(nms_mod, "BLOCK", 181)
    monkeypatch.setattr(nms_mod, "CHUNK", 32768)
    boxes, scores = rpn_like(3000, seed=1)
    same_nms(boxes, scores, t)
    same_nms(boxes, torch.round(scores * 20) / 20, t)  # heavy ties
    for k in (1, 100, 300):  # the proposal layer keeps RPN_POST_NMS_TOP_N of them
        assert torch.equal(nms_mod.nms(boxes, scores, t, max_keep=k), torchvision.ops.nms(boxes, scores, t)[:k])


def test_dispatch_to_torchvision_keeps_errors_and_other_inputs(monkeypatch):
    monkeypatch.setattr(nms_mod, "MIN_BOXES", 10)
    boxes, scores = torch.rand(5, 4) + torch.tensor([0, 0, 1, 1]), torch.rand(5)
    same_nms(boxes, scores, 0.5)  # small: torchvision's own result
    with pytest.raises(RuntimeError):
        nms_mod.nms(torch.rand(20, 3), torch.rand(20), 0.5)
    with pytest.raises(RuntimeError):
        nms_mod.nms(torch.rand(20, 4), torch.rand(19), 0.5)
    inf_boxes = torch.rand(20, 4) + torch.tensor([0, 0, 1, 1])
    inf_boxes[3, 2] = float("inf")
    same_nms(inf_boxes, torch.rand(20), 0.5)
