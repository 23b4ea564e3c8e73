"""frcnn.ops.nms against torchvision's ops called directly: identical kept indices, in the same order.

The blocked path is forced on small inputs (``MIN_BOXES = 0``, tiny ``BLOCK``, ``CHUNK``, ``TILE``, grid and
``MAX_ROWS``, no torchvision tail) so that every branch (several blocks, tiles and chunks, boxes that search
every cell, zero-area and inverted boxes, ties) runs on inputs hypothesis can shrink. The spatial index only
skips pairs, so the inputs aim at what it could get wrong: boxes of very different sizes and shapes, IoUs at
the threshold, far-off coordinates (coarse float32 spacing), areas too small for the rounding bound.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from frcnn.model.anchors import generate_anchors, shift_anchors
from frcnn.ops import nms as nms_mod

THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 1.0]
MORE_THRESHOLDS = THRESHOLDS + [0.1, 0.9, 1 / 3, 0.6, 1e-9, 0.999999, 1.5]
DEFAULTS = {name: getattr(nms_mod, name) for name in ("BLOCK", "CHUNK", "TILE", "MAX_CELLS", "MAX_ROWS", "TAIL",
                                                      "MIN_BOXES", "MIN_BOXES_MAX_KEEP")}


@pytest.fixture(autouse=True)
def force_blocked(monkeypatch):
    monkeypatch.setattr(nms_mod, "MIN_BOXES", 0)
    monkeypatch.setattr(nms_mod, "MIN_BOXES_MAX_KEEP", 0)
    for name, value in dict(BLOCK=7, CHUNK=20, TILE=4, MAX_CELLS=16, MAX_ROWS=3, TAIL=0).items():
        monkeypatch.setattr(nms_mod, name, value)


def same_nms(boxes, scores, t):
    want = torchvision.ops.nms(boxes, scores, t)
    got = nms_mod.nms(boxes, scores, t)
    assert got.dtype == torch.int64
    assert torch.equal(got, want), (got.tolist(), want.tolist())


@st.composite
def box_sets(draw, max_n=60):
    n = draw(st.integers(0, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["uniform", "grid", "clustered", "degenerate", "multiscale", "nested", "lattice",
                                 "far", "inverted", "tiny"]))

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    if kind == "grid":  # integer coordinates on a small grid: many duplicates, equal IoUs, zero areas
        xy = torch.randint(0, 6, (n, 2), generator=g).double()
        wh = torch.randint(0, 4, (n, 2), generator=g).double()
    elif kind == "clustered":
        c = rand(max(1, n // 8), 2) * 100
        xy = c[torch.randint(len(c), (n,), generator=g)] + torch.randn(n, 2, generator=g, dtype=torch.float64) * 3
        wh = 20 + torch.randn(n, 2, generator=g, dtype=torch.float64) * 2
    elif kind == "degenerate":  # identical boxes, some with zero width or height
        xy = torch.full((n, 2), 3.0, dtype=torch.float64)
        wh = torch.where(rand(n, 2) < 0.3, 0.0, 5.0)
    elif kind == "multiscale":  # widths and heights from 0.01 to 1000, independently: any size and shape
        wh = 10 ** (rand(n, 2) * 5 - 2)
        xy = rand(n, 2) * 100 - wh / 2
    elif kind == "nested":  # a few shared centres, sizes in steps around 1/t: area ratios at the prune's edge
        c = rand(max(1, n // 6), 2) * 50
        wh = 20 * torch.tensor([0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 1.0], dtype=torch.float64)[
            torch.randint(7, (n, 2), generator=g)]
        xy = c[torch.randint(len(c), (n,), generator=g)] - wh / 2
    elif kind == "lattice":  # multiples of 1/4: IoUs such as 0.5, 0.6, 1/3 exactly, and shifted centres
        xy = torch.randint(0, 40, (n, 2), generator=g).double() / 4
        wh = torch.randint(1, 24, (n, 2), generator=g).double() / 4
    elif kind == "far":  # far from the origin: float32 steps of 1/16 to 1/4, the double one of 1e-4
        xy = 10 ** draw(st.sampled_from([6.0, 7.0, 12.0])) + rand(n, 2) * 60
        wh = rand(n, 2) * 20
    elif kind == "inverted":  # some boxes with x2 < x1 or y2 < y1 (torchvision accepts them: they never overlap)
        xy = rand(n, 2) * 50
        wh = (rand(n, 2) - 0.3) * 30
    else:  # tiny: areas below the float rounding bound (float32 and float64), next to ordinary boxes
        scale = draw(st.sampled_from([1e-20, 1e-140, 1.0]))
        xy = rand(n, 2) * 10 * scale
        wh = rand(n, 2) * 5 * scale
    boxes = torch.cat((xy, xy + wh), 1)
    levels = draw(st.sampled_from([2, 5, 1000]))  # few score levels: many ties
    scores = torch.randint(0, levels, (n,), generator=g).double() / levels
    return boxes.to(dtype), scores.to(dtype)


@settings(max_examples=400, deadline=None)
@given(box_sets(), st.sampled_from(MORE_THRESHOLDS))
def test_nms_matches_torchvision(data, t):
    boxes, scores = data
    same_nms(boxes, scores, t)


@settings(max_examples=100, deadline=None)
@given(box_sets(), st.sampled_from(MORE_THRESHOLDS))
def test_torchvision_tail_matches_torchvision(data, t):
    boxes, scores = data
    tail, nms_mod.TAIL = nms_mod.TAIL, 10**9  # torchvision finishes after the first block
    try:
        same_nms(boxes, scores, t)
    finally:
        nms_mod.TAIL = tail


@settings(max_examples=150, deadline=None)
@given(box_sets(), st.sampled_from(MORE_THRESHOLDS), st.integers(1, 70))
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


@pytest.mark.parametrize("t", MORE_THRESHOLDS)
def test_edge_cases(t):
    for n in (0, 1, 2):
        same_nms(torch.rand(n, 4) * 10 + torch.tensor([0, 0, 10, 10]), torch.rand(n), t)
    same_nms(torch.tensor([[1.0, 2.0, 5.0, 9.0]] * 30), torch.ones(30), t)  # all identical, all tied
    same_nms(torch.tensor([[1.0, 1.0, 1.0, 4.0]] * 10), torch.rand(10), t)  # all identical, zero area
    same_nms(torch.tensor([[0.0, 0.0, 1e-20, 1e-20]] * 10), torch.rand(10), t)  # identical, subnormal area


@pytest.mark.parametrize("t", [-0.5, -1e-9, float("nan"), float("inf")])
def test_thresholds_outside_0_1(t):
    # below 0 every non-NaN IoU suppresses (torchvision's loop, unchanged); above 1 nothing does
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0], [1.0, 1.0, 1.0, 5.0]] * 4)
    same_nms(boxes, torch.arange(12.0), t)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_pairs_at_the_threshold_with_every_shift_and_size(dtype, scale):
    # many pairs, each a box and a shifted or shrunk copy whose IoU is exactly (or one ulp off) a threshold,
    # so the spatial index decides at its margins: shifts along x and y, sizes from 1e-3 to 1e3, far apart
    base, pairs = torch.tensor([0.0, 0.0, 8.0, 8.0], dtype=torch.float64), []
    for shift in (0.5, 1.0, 1.6, 2.0, 8 / 3, 3.0, 4.0):  # IoU (8 - s) / (8 + s): 0.88, 0.78, 2/3, 0.6, 0.5, ...
        for d in (torch.tensor([1.0, 0, 1, 0]), torch.tensor([0, 1.0, 0, 1])):
            pairs.append(torch.stack((base, base + shift * d.double())))
    for f in (0.5, 0.6, 0.7, 0.75):  # nested: IoU = f * f
        pairs.append(torch.stack((base, torch.tensor([0.0, 0.0, 8 * f, 8 * f], dtype=torch.float64))))
    boxes = torch.cat([p + 20.0 * i for i, p in enumerate(pairs)]) * scale
    boxes = torch.cat((boxes, torch.nextafter(boxes, boxes + 1), torch.nextafter(boxes, boxes - 1))).to(dtype)
    scores = torch.rand(boxes.shape[0], generator=torch.Generator().manual_seed(0)).to(dtype)
    for t in (0.88, 0.78, 2 / 3, 0.6, 0.5, 1 / 3, 0.25, 0.36, 0.49, 0.5625, 0.0, 1.0):
        t32 = torch.tensor(t, dtype=torch.float32)
        for tt in (t, float(t32), float(torch.nextafter(t32, torch.tensor(2.0)))):
            same_nms(boxes, scores, tt)


def tight_pairs(t, seed):
    """Pairs (x1, y1, x2, y2 rows) whose IoU is just above t with the centres as far apart as the index's bound
    allows: a box and one 1/t times as wide sharing its left or right edge, and equal boxes shifted by
    w (1 - t) / (1 + t); along x or y, either box first."""
    g = torch.Generator().manual_seed(seed)
    for i in range(24):
        w, h = (0.5 + torch.rand(2, generator=g, dtype=torch.float64)).tolist()
        eps = (1e-6, 1e-4)[i // 12]
        u = w / t * (1 - eps) if t > 0 else 1.5 * w
        s = w * (1 - t) / (1 + t) * (1 - eps)
        a = [0.0, 0.0, w, h]
        b = ([0.0, 0.0, u, h], [w - u, 0.0, w, h], [s, 0.0, w + s, h])[i % 3]
        if i % 2:  # the same along y
            a, b = [a[1], a[0], a[3], a[2]], [b[1], b[0], b[3], b[2]]
        yield torch.tensor([a, b] if i % 4 < 2 else [b, a], dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_pairs_at_the_bound_of_the_spatial_index(monkeypatch, dtype, t):
    # one box per block (the pair meets in step 4), one-box tiles and a grid 1e4 cells across the pair: the
    # index prunes right at its bound, so each pair is decided by the exact IoU only if the bound (and its
    # margin for the rounding of the IoU) is not too tight
    for name, value in dict(BLOCK=1, TILE=1, CELL=1e-4, MAX_CELLS=32768, MAX_ROWS=20000).items():
        monkeypatch.setattr(nms_mod, name, value)
    scores = torch.tensor([1.0, 0.5], dtype=dtype)
    for scale in (1.0, 1e-3, 1e4):
        for boxes in tight_pairs(t, seed=int(t * 10)):
            same_nms((boxes * scale).to(dtype), scores, t)
    # float32 areas in the subnormal range round up: this pair's float IoU exceeds 0.7 although its real IoU is
    # below 0.7 (1 - 1e-5), with the centres beyond that bound; the index falls back to an overlap test
    a = 2.0**-70
    same_nms(torch.tensor([[0.0, 0.0, a, a], [0.0, 0.0, a * 1.4286787509918213, a]]), torch.tensor([1.0, 0.5]), 0.7)


def test_boxes_that_search_every_cell(monkeypatch):
    # a few boxes as large as the image among small ones: their search spans more than MAX_ROWS cell rows
    g = torch.Generator().manual_seed(5)
    xy = torch.rand(300, 2, generator=g) * 100
    boxes = torch.cat((xy, xy + 2 + torch.rand(300, 2, generator=g) * 4), 1)
    boxes[::50] = torch.tensor([0.0, 0.0, 100.0, 100.0]) + torch.rand(6, 4, generator=g)
    for t in (0.0, 0.01, 0.3, 0.7):
        same_nms(boxes, torch.rand(300, generator=g), t)


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
    # the default sizes (blocks, tiles, grid, torchvision tail) on realistic proposal-layer inputs (3000 boxes)
    for name, value in DEFAULTS.items():
        monkeypatch.setattr(nms_mod, name, value)
    boxes, scores = rpn_like(3000, seed=1)
    same_nms(boxes, scores, t)
    same_nms(boxes, torch.round(scores * 20) / 20, t)  # heavy ties
    same_nms(boxes.double(), scores.double(), t)
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
    huge = torch.rand(20, 4) * 1e20 + torch.tensor([0, 0, 1e20, 1e20])  # float32 areas overflow to inf
    same_nms(huge, torch.rand(20), 0.5)


def test_max_keep_takes_the_blocked_path_from_min_boxes_max_keep_on(monkeypatch):
    """With the default crossovers: 1000 proposals of which the first 100 kept are wanted (the demo's test-time
    proposal layer) run the blocked path, 300 go to torchvision, 1000 without max_keep too; all give
    torchvision's indices."""
    for name, value in DEFAULTS.items():
        monkeypatch.setattr(nms_mod, name, value)
    calls = []
    blocked = nms_mod._nms_blocked
    monkeypatch.setattr(nms_mod, "_nms_blocked", lambda *a, **k: calls.append(a[0].shape[0]) or blocked(*a, **k))
    boxes, scores = rpn_like(1000, seed=3)
    for n, keep, expect in ((1000, 100, [1000]), (300, 100, []), (1000, None, [])):
        calls.clear()
        got = nms_mod.nms(boxes[:n], scores[:n], 0.7, max_keep=keep)
        assert torch.equal(got, torchvision.ops.nms(boxes[:n], scores[:n], 0.7)[:keep])
        assert calls == expect, (n, keep)
