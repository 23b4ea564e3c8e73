"""Box math (frcnn.boxes): known answers from the reference code, then properties."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from frcnn.boxes import (
    BBOX_XFORM_CLIP,
    bbox_transform,
    bbox_transform_inv,
    box_area,
    box_iou,
    clip_boxes,
    flip_boxes,
    scale_boxes,
    to_exclusive,
)

T = torch.tensor
STDS = T([0.1, 0.1, 0.2, 0.2])


# ------------------------------------------------------------------------------------------ known answers


def test_box_area_uses_plus_one_convention():
    assert box_area(T([[0.0, 0, 9, 9], [3.0, 4, 3, 4], [0.0, 0, 4, 9]])).tolist() == [100.0, 1.0, 50.0]


def test_bbox_transform_known_answers():
    ex = T([[0.0, 0, 15, 15], [10.0, 20, 49, 59]])
    gt = T([[8.0, 8, 23, 23], [0.0, 0, 79, 39]])
    out = bbox_transform(ex, gt)
    expected = T([[0.5, 0.5, 0.0, 0.0], [0.25, -0.5, 0.6931472, 0.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_bbox_transform_normalised_by_stds():
    out = bbox_transform(T([[10.0, 20, 49, 59]]), T([[0.0, 0, 79, 39]])) / STDS
    torch.testing.assert_close(out, T([[2.5, -5.0, 3.465736, 0.0]]), rtol=0, atol=1e-5)


def test_bbox_transform_inv_zero_deltas_is_identity():
    """The reference's bbox_transform_inv gives (0, 0, 16, 16) here; frcnn deliberately returns the
    reference answer minus one pixel at x2 and y2, i.e. exactly the input box (0, 0, 15, 15)."""
    out = bbox_transform_inv(T([[0.0, 0, 15, 15]]), T([[0.0, 0, 0, 0]]))
    assert out.tolist() == [[0.0, 0.0, 15.0, 15.0]]


def test_bbox_transform_inv_known_answer():
    out = bbox_transform_inv(T([[10.0, 20, 49, 59]]), T([[0.25, -0.5, math.log(2.0), 0.0]]))
    torch.testing.assert_close(out, T([[0.0, 0.0, 79.0, 39.0]]), rtol=0, atol=1e-4)


def test_bbox_transform_inv_clamps_log_size():
    out = bbox_transform_inv(T([[0.0, 0, 15, 15]]), T([[0.0, 0, 100.0, 100.0]]))
    assert torch.isfinite(out).all()
    width = out[0, 2] - out[0, 0] + 1
    torch.testing.assert_close(width, T(16 * math.exp(BBOX_XFORM_CLIP)), rtol=1e-5, atol=0)


def test_box_iou_known_answers():
    iou = box_iou(T([[0.0, 0, 9, 9], [0.0, 0, 4, 9]]), T([[5.0, 0, 14, 9], [0.0, 0, 9, 9], [20.0, 20, 30, 30]]))
    torch.testing.assert_close(iou[0, 0], T(1 / 3))
    torch.testing.assert_close(iou[1, 1], T(0.5))
    assert iou[0, 2] == 0 and iou[1, 2] == 0
    assert iou.shape == (2, 3)


def test_box_iou_with_a_leading_dimension_is_one_matrix_per_slice():
    # class 0: the known answers above; class 1: the same boxes moved by (3, 7), so the same IoUs
    a = T([[[0.0, 0, 9, 9], [0.0, 0, 4, 9]], [[3.0, 7, 12, 16], [3.0, 7, 7, 16]]])
    b = T([[[5.0, 0, 14, 9], [0.0, 0, 9, 9]], [[8.0, 7, 17, 16], [3.0, 7, 12, 16]]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 2, 2)
    torch.testing.assert_close(iou[0], T([[1 / 3, 1.0], [0.0, 0.5]]))
    torch.testing.assert_close(iou[1], iou[0])


def test_box_iou_touching_boxes_overlap_by_one_pixel_column():
    # under +1, [0,0,9,9] and [9,0,18,9] share the column x = 9: 10 pixels of 190
    torch.testing.assert_close(box_iou(T([[0.0, 0, 9, 9]]), T([[9.0, 0, 18, 9]])), T([[10 / 190]]))


def test_clip_boxes_known_answer():
    out = clip_boxes(T([[-5.0, -3, 900, 700], [10.0, 20, 30, 40]]), 600, 800)
    assert out.tolist() == [[0.0, 0.0, 799.0, 599.0], [10.0, 20.0, 30.0, 40.0]]


def test_clip_boxes_class_specific_columns():
    out = clip_boxes(T([[-1.0, -1, 50, 50, 5, 5, 8, 80]]), 20, 40)
    assert out.tolist() == [[0.0, 0.0, 39.0, 19.0, 5.0, 5.0, 8.0, 19.0]]


def test_clip_boxes_per_image_sizes_broadcast():
    boxes = T([[[0.0, 0, 500, 500]], [[0.0, 0, 500, 500]]])
    out = clip_boxes(boxes, T([100.0, 300.0]).view(2, 1, 1), T([200.0, 400.0]).view(2, 1, 1))
    assert out.tolist() == [[[0.0, 0.0, 199.0, 99.0]], [[0.0, 0.0, 399.0, 299.0]]]


def test_scale_boxes_known_answer():
    # pixel 0..9 (10 px) at scale 2 covers 0..19 (20 px)
    assert scale_boxes(T([[0.0, 0, 9, 4]]), 2.0).tolist() == [[0.0, 0.0, 19.0, 9.0]]


def test_flip_boxes_known_answer():
    assert flip_boxes(T([[0.0, 5, 9, 7]]), 100).tolist() == [[90.0, 5.0, 99.0, 7.0]]


def test_to_exclusive_known_answer():
    assert to_exclusive(T([[0.0, 0, 9, 9]])).tolist() == [[0.0, 0.0, 10.0, 10.0]]


def test_functions_do_not_modify_inputs():
    boxes = T([[1.0, 2, 30, 40]])
    before = boxes.clone()
    scale_boxes(boxes, 2.0)
    flip_boxes(boxes, 50)
    clip_boxes(boxes, 10, 10)
    to_exclusive(boxes)
    assert torch.equal(boxes, before)


# ------------------------------------------------------------------------------------------- properties


@st.composite
def boxes_strategy(draw, n_min: int = 1, n_max: int = 8, lo: float = 0.0, hi: float = 500.0):
    n = draw(st.integers(n_min, n_max))
    coord = st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32)
    size = st.floats(0.0, 300.0, allow_nan=False, allow_infinity=False, width=32)
    rows = []
    for _ in range(n):
        x1, y1, w, h = draw(coord), draw(coord), draw(size), draw(size)
        rows.append([x1, y1, x1 + w, y1 + h])
    return torch.tensor(rows, dtype=torch.float64)


deltas_strategy = st.lists(
    st.tuples(*[st.floats(-2.0, 2.0, allow_nan=False, width=32)] * 4), min_size=1, max_size=8
)


@settings(max_examples=40, deadline=None)
@given(boxes_strategy(), boxes_strategy())
def test_encode_decode_round_trip(ex, gt):
    n = min(len(ex), len(gt))
    ex, gt = ex[:n], gt[:n]
    deltas = bbox_transform(ex, gt)
    assume(bool((deltas[:, 2:] < BBOX_XFORM_CLIP).all()))  # beyond the clamp, decoding saturates by design
    decoded = bbox_transform_inv(ex, deltas)
    torch.testing.assert_close(decoded, gt, rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(boxes_strategy(), deltas_strategy)
def test_decode_encode_round_trip(ex, deltas):
    n = min(len(ex), len(deltas))
    ex, d = ex[:n], torch.tensor(deltas[:n], dtype=torch.float64)
    torch.testing.assert_close(bbox_transform(ex, bbox_transform_inv(ex, d)), d, rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(boxes_strategy(), boxes_strategy())
def test_iou_symmetric_bounded_and_one_on_itself(a, b):
    ab, ba = box_iou(a, b), box_iou(b, a)
    torch.testing.assert_close(ab, ba.T)
    assert (ab >= 0).all() and (ab <= 1 + 1e-12).all()
    torch.testing.assert_close(torch.diagonal(box_iou(a, a)), torch.ones(len(a), dtype=a.dtype))


@settings(max_examples=40, deadline=None)
@given(boxes_strategy(lo=-400.0, hi=900.0), st.integers(1, 700), st.integers(1, 700))
def test_clip_boxes_bounds(boxes, h, w):
    out = clip_boxes(boxes, h, w)
    assert (out[:, 0::2] >= 0).all() and (out[:, 0::2] <= w - 1).all()
    assert (out[:, 1::2] >= 0).all() and (out[:, 1::2] <= h - 1).all()
    inside = (boxes[:, 0] >= 0) & (boxes[:, 1] >= 0) & (boxes[:, 2] <= w - 1) & (boxes[:, 3] <= h - 1)
    assert torch.equal(out[inside], boxes[inside])  # boxes already inside are untouched


@settings(max_examples=40, deadline=None)
@given(boxes_strategy(), st.floats(0.1, 5.0, allow_nan=False))
def test_scale_then_inverse_scale_is_identity(boxes, f):
    torch.testing.assert_close(scale_boxes(scale_boxes(boxes, f), 1.0 / f), boxes, rtol=0, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(boxes_strategy(), st.floats(0.1, 5.0, allow_nan=False))
def test_scale_multiplies_area_by_f_squared(boxes, f):
    torch.testing.assert_close(box_area(scale_boxes(boxes, f)), box_area(boxes) * f * f, rtol=1e-9, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(boxes_strategy(hi=400.0), st.integers(1000, 2000))
def test_flip_twice_is_identity_and_keeps_size(boxes, width):
    once = flip_boxes(boxes, width)
    torch.testing.assert_close(flip_boxes(once, width), boxes, rtol=0, atol=1e-9)
    torch.testing.assert_close(box_area(once), box_area(boxes))
    assert (once[:, 0] <= once[:, 2]).all()


@settings(max_examples=40, deadline=None)
@given(boxes_strategy(), boxes_strategy())
def test_to_exclusive_makes_torchvision_iou_equal(a, b):
    torch.testing.assert_close(torchvision.ops.box_iou(to_exclusive(a), to_exclusive(b)), box_iou(a, b))


@pytest.mark.parametrize("k", [1, 3, 21])
def test_class_specific_decoding_shapes_and_columns(k):
    g = torch.Generator().manual_seed(k)
    boxes = torch.rand(5, 4, generator=g) * 100
    boxes[:, 2:] += boxes[:, :2]
    deltas = torch.randn(5, 4 * k, generator=g) * 0.3
    out = bbox_transform_inv(boxes, deltas)
    assert out.shape == (5, 4 * k)
    for j in range(k):  # column block j is the decoding with class j's coefficients alone
        torch.testing.assert_close(out[:, 4 * j : 4 * j + 4], bbox_transform_inv(boxes, deltas[:, 4 * j : 4 * j + 4]))


def test_decoding_broadcasts_leading_dims():
    anchors = T([[0.0, 0, 15, 15], [10.0, 10, 40, 20]])
    deltas = torch.zeros(3, 2, 4)
    out = bbox_transform_inv(anchors.unsqueeze(0), deltas)
    assert out.shape == (3, 2, 4)
    assert torch.equal(out[2], anchors)
