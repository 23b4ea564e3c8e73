"""Anchor fit: the closed-form best IoU equals a search over every anchor; resize policy; suggestion; BCCD."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_voc import BCCD, needs_bccd

from frcnn.boxes import box_iou
from frcnn.config import load_config
from frcnn.data.anchor_fit import (
    anchor_fit,
    anchors_inside,
    best_anchor_iou,
    format_fit,
    resized_groups,
    suggest_scales,
    write_histograms,
)
from frcnn.data.check import check_data, fit_samples
from frcnn.data.sample import Sample
from frcnn.model.anchor_target import taking_part
from frcnn.model.anchors import generate_anchors, shift_anchors


def dense_best_iou(boxes, height, width, base, stride, border=0.0):
    """The definition: every anchor of the grid, those the anchor target layer lets take part, box_iou, max."""
    anchors = shift_anchors(base, math.ceil(height / stride), math.ceil(width / stride), stride)
    inside = taking_part(anchors, height, width, border)
    if not inside.any():
        return torch.zeros(boxes.shape[0])
    return box_iou(boxes, anchors[inside]).max(dim=1).values


@pytest.mark.parametrize("border", [0.0, 12.5, -1.0])  # inside only (the default), 12.5 px over, every anchor
@pytest.mark.parametrize(("height", "width", "scales"), [
    (600, 800, (8, 16, 32)), (600, 1000, (4, 8, 16)), (97, 131, (2, 4, 8)), (600, 450, (0.5, 1, 2)),
    (150, 200, (8, 16, 32)),  # the largest anchors fit nowhere inside: IoU 0 from those shapes
])
def test_closed_form_equals_the_search_over_every_anchor(height, width, scales, border):
    g = torch.Generator().manual_seed(height + width)
    xy = torch.rand(400, 2, generator=g) * torch.tensor([width, height])
    wh = torch.exp(torch.rand(400, 2, generator=g) * 6) + 1  # 2 .. 400 pixels
    boxes = torch.cat((xy, torch.minimum(xy + wh, torch.tensor([width - 1.0, height - 1.0]))), dim=1).round()
    base = generate_anchors(16, (0.5, 1, 2), scales)
    fast = best_anchor_iou(boxes, height, width, base, 16, border)
    assert torch.allclose(fast, dense_best_iou(boxes, height, width, base, 16, border), atol=1e-6)


def test_a_box_equal_to_an_inside_anchor_has_iou_one():
    base = generate_anchors(16, (0.5, 1, 2), (8, 16, 32))
    anchors = shift_anchors(base, 38, 50, 16)
    anchor = anchors[(10 * 50 + 20) * 9 + 4]  # cell (10, 20), ratio 1, scale 16: 256 x 256
    assert best_anchor_iou(anchor[None], 600, 800, base, 16).item() == pytest.approx(1.0)
    assert best_anchor_iou(torch.zeros(0, 4), 600, 800, base, 16).shape == (0,)


def test_boxes_follow_the_resize_policy():
    s = Sample("a", "a.jpg", 640, 480, torch.tensor([[0.0, 0, 99, 99]]), torch.tensor([1]), torch.tensor([False]))
    (group,) = resized_groups([s], 600, 1000)
    assert (group.height, group.width) == (600, 800)  # short side 480 -> 600
    assert group.boxes.tolist() == [[0, 0, 124, 124]]  # 100 px -> 125 px under the +1 convention
    hard = Sample("b", "b.jpg", 640, 480, torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([1]), torch.tensor([True]))
    assert resized_groups([hard], 600, 1000)[0].boxes.shape == (0, 4)  # difficult boxes are not trained on


def small_objects() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(20):
        xy = torch.rand(5, 2, generator=g) * 500
        boxes = torch.cat((xy, xy + 24 + torch.rand(5, 2, generator=g) * 8), dim=1)  # 25..33 px objects
        samples.append(Sample(str(i), f"{i}.jpg", 600, 600, boxes, torch.ones(5, dtype=torch.long),
                              torch.zeros(5, dtype=torch.bool)))
    return samples


def test_small_objects_get_no_anchor_and_smaller_scales_are_suggested(tmp_path):
    cfg = load_config("voc-r50-c4")
    samples = small_objects()
    fit = anchor_fit(samples, cfg)
    assert fit.count == 100 and fit.below(0.3) == 100  # 30 px objects vs 128 px anchors: IoU < 0.06
    fits = suggest_scales(samples, cfg)
    assert fits[0].scales == (1, 2, 4) and fits[0].below(0.3) == 0
    lines = format_fit(fits, fit, ["dot"])
    assert any("none >= 0.3: 100 (100.0%)" in line for line in lines)
    assert lines[-1].startswith("  suggested: --set ANCHOR_SCALES=[1,2,4] (anchors of 16, 32, 64 px)")
    assert fit.to_json(["dot"])["per_class"]["dot"]["below_negative"] == 100
    write_histograms(fit, tmp_path / "h.png")
    assert Image.open(tmp_path / "h.png").size == (1000, 380)


@needs_bccd
def test_bccd_anchor_fit_at_600():
    report = check_data(BCCD)
    cfg = load_config("voc-r50-c4")
    samples = fit_samples(report)
    fit = anchor_fit(samples, cfg)
    assert (fit.target_size, fit.scales) == (600, (8, 16, 32))
    assert fit.count == 4886  # 4888 minus the two 1-pixel boxes
    assert fit.below(0.7) == 1192 and fit.below(0.3) == 343
    platelets = fit.summary(fit.labels == 1)
    assert platelets["boxes"] == 361 and platelets["below_negative"] == 342  # ~50 px platelets vs 128 px anchors
    best = suggest_scales(samples, cfg)[0]
    assert best.scales == (4, 8, 16) and best.below(0.3) == 3


@pytest.mark.parametrize("border", [0.0, 40.0, -1.0])
@pytest.mark.parametrize("height, width", [(320, 427), (100, 100), (64, 300)])
def test_anchors_inside_equals_the_search_over_every_anchor(height, width, border):
    base = generate_anchors(16, (0.5, 1, 2), (2, 4, 8, 16, 32))
    all_shifted = shift_anchors(base, math.ceil(height / 8), math.ceil(width / 8), 8)
    inside = taking_part(all_shifted, height, width, border).view(-1, base.shape[0]).any(dim=0)
    assert torch.equal(anchors_inside(height, width, base, 8, border), inside)
    if border == 0 and height == 64:
        assert not inside.all()  # the comparison has power: 256-px anchors fit no 64-px image
    if border < 0:
        assert inside.all()


def _one_big_object_per_image(n: int = 40) -> list[Sample]:
    """Objects of 200..300 px (sides) in 320 x 427 images: as large as the one-class animal set of issue 11."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        w, h = (200 + 100 * torch.rand(2, generator=g)).tolist()
        x1, y1 = float(torch.rand(1, generator=g)) * (427 - w), float(torch.rand(1, generator=g)) * (320 - h)
        out.append(Sample(str(i), Path("x.jpg"), 427, 320, torch.tensor([[x1, y1, x1 + w - 1, y1 + h - 1]]),
                          torch.tensor([1]), torch.tensor([False])))
    return out


def test_auto_never_picks_anchors_that_fit_no_image_when_smaller_ones_fit_as_well():
    # 320 x 427 inputs at stride 8: the reference's anchors of scale 32 (736 x 384, 512 x 512, 352 x 704) never lie
    # inside, nor do the 176 x 352 ones of scale 16 (taller than 320). [8, 16, 32] and [4, 8, 16] have the same best
    # anchors (the 256 px and 128 px ones), so the same fit; [8, 16, 32] has 3 more shapes the RPN can never learn.
    cfg = load_config("demo-cpu")
    samples = _one_big_object_per_image()
    fits = {f.scales: f for f in suggest_scales(samples, cfg)}
    assert fits[(8, 16, 32)].below(0.7) == fits[(4, 8, 16)].below(0.7)
    assert fits[(4, 8, 16)].untrained_anchors() == [(176, 352)]
    assert sorted(fits[(8, 16, 32)].untrained_anchors()) == [(176, 352), (352, 704), (512, 512), (736, 384)]
    assert suggest_scales(samples, cfg)[0].scales == (4, 8, 16)
    assert fits[(2, 4, 8)].untrained_anchors() == []


def test_with_every_anchor_taking_part_none_is_untrained_and_the_report_says_so():
    # TRAIN.RPN_ALLOWED_BORDER=-1 (scratch-cpu): the anchor target layer labels every anchor, so the 4 shapes of
    # [8, 16, 32] that lie inside no 320 x 427 input (previous test) are trained too, and the fit counts them
    samples = _one_big_object_per_image()
    inside_only = anchor_fit(samples, load_config("demo-cpu", ["ANCHOR_SCALES=[8,16,32]"]))
    every = anchor_fit(samples, load_config("demo-cpu", ["ANCHOR_SCALES=[8,16,32]", "TRAIN.RPN_ALLOWED_BORDER=-1"]))
    assert len(inside_only.untrained_anchors()) == 4 and every.untrained_anchors() == []
    assert (every.best_iou >= inside_only.best_iou).all() and (every.best_iou > inside_only.best_iou).any()
    assert (every.positives() >= inside_only.positives()).all()
    assert format_fit([], inside_only, ["a"])[0].endswith("stride 8, anchors inside the image only")
    assert format_fit([], every, ["a"])[0].endswith("stride 8, every anchor (TRAIN.RPN_ALLOWED_BORDER < 0)")
    assert not any("warning" in line for line in format_fit([], every, ["a"]))
