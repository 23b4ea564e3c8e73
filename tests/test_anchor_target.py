"""Anchor target layer (frcnn.model.anchor_target): which anchors the RPN learns from, and what."""

from __future__ import annotations

from dataclasses import replace

import torch

from frcnn.boxes import bbox_transform_inv, box_iou
from frcnn.config import TrainConfig
from frcnn.model.anchor_target import anchor_target_layer, subsample, taking_part
from frcnn.model.anchors import generate_anchors, shift_anchors
from frcnn.model.trace import Trace

CFG = TrainConfig()
ANCHORS = shift_anchors(generate_anchors(), 38, 50, 16)  # a 600x800 image at stride 16
SIZE = torch.tensor([[600, 800]])
GT = torch.tensor([[100.0, 150, 299, 349]])


def _run(gts, sizes=SIZE, cfg=CFG, seed=0, anchors=ANCHORS, trace=None):
    return anchor_target_layer(anchors, gts, sizes, cfg, torch.Generator().manual_seed(seed), trace)


def test_known_answer_single_gt():
    trace = Trace()
    labels, targets = _run([GT], trace=trace)
    rec = trace["anchor_target"]
    inside = rec["inside"][0]
    assert int(inside.sum()) == 5944
    assert rec["max_overlaps"][0][inside].max().item() == 0.6103515625
    type_a = rec["type_a"][0]
    assert int(type_a.sum()) == 9
    assert int(rec["type_b"][0].sum()) == 0  # nothing reaches 0.7
    assert (rec["max_overlaps"][0][type_a] == 0.6103515625).all()
    assert torch.equal(labels[0] == 1, type_a)  # all nine are foreground
    assert int((labels == 0).sum()) == 247  # 256 - 9
    assert labels.shape == (1, ANCHORS.shape[0]) and targets.shape == (1, ANCHORS.shape[0], 4)


def test_inside_means_entirely_inside_the_image():
    trace = Trace()
    labels, _ = _run([GT], trace=trace)
    inside = trace["anchor_target"]["inside"][0]
    expected = (ANCHORS[:, 0] >= 0) & (ANCHORS[:, 1] >= 0) & (ANCHORS[:, 2] <= 799) & (ANCHORS[:, 3] <= 599)
    assert torch.equal(inside, expected)
    assert (labels[0, ~inside] == -1).all()


def test_allowed_border_lets_anchors_cross_by_that_many_pixels():
    # a 100 x 50 image (last pixel column 99): one anchor 3 px over the left edge, one inside, one whose x2 (102)
    # is 3 px past the last column, one 1 px over the bottom (y2 = 50, last row 49)
    anchors = torch.tensor([[-3.0, 0, 10, 10], [0, 0, 10, 10], [90, 0, 102, 10], [20, 20, 40, 50]])
    expected = {0: [False, True, False, False], 1: [False, True, False, True], 2.5: [False, True, True, True],
                3: [True, True, True, True], -1: [True, True, True, True]}
    for border, want in expected.items():
        assert taking_part(anchors, 50, 100, border).tolist() == want, border
    # through the layer: the gt at the left edge; with the default the crossing anchor is don't care, with -1 it
    # takes part (IoU 10x11 / (14x11) = 0.714: foreground)
    gt = [torch.tensor([[0.0, 0, 9, 10]])]
    size = torch.tensor([[50, 100]])
    labels, _ = _run(gt, sizes=size, anchors=anchors)
    assert labels[0, 0] == -1 and labels[0, 1] == 1
    labels, _ = _run(gt, sizes=size, anchors=anchors, cfg=replace(CFG, RPN_ALLOWED_BORDER=-1))
    assert labels[0, 0] == 1 and labels[0, 1] == 1


def test_background_below_negative_overlap_and_dont_care_between():
    trace = Trace()
    labels, _ = _run([GT], cfg=replace(CFG, RPN_BATCHSIZE=100000))  # keep every candidate
    _run([GT], trace=trace)
    mo = trace["anchor_target"]["max_overlaps"][0]
    inside = trace["anchor_target"]["inside"][0]
    assert torch.equal(labels[0] == 0, inside & (mo < 0.3))
    middle = inside & (mo >= 0.3) & (mo < 0.6103515625)
    assert middle.any() and (labels[0, middle] == -1).all()


def test_type_b_anchors_are_foreground():
    row = _row(18, 25, 4)  # a 256x256 anchor in the middle of the image
    gt = ANCHORS[row : row + 1].clone()  # its neighbours one cell away reach IoU 0.88 >= 0.7
    gt[0, 2] += 3
    trace = Trace()
    labels, _ = _run([gt], cfg=replace(CFG, RPN_BATCHSIZE=100000), trace=trace)
    rec = trace["anchor_target"]
    assert int(rec["type_a"][0].sum()) == 1
    type_b = rec["type_b"][0]
    assert int(type_b.sum()) >= 2
    assert torch.equal(labels[0] == 1, type_b | rec["type_a"][0])
    iou = box_iou(ANCHORS[type_b], gt)
    assert (iou >= 0.7).all()


def _row(h: int, w: int, a: int) -> int:
    return (h * 50 + w) * 9 + a


def _many_gts() -> torch.Tensor:
    """48 gts on 128x128 anchors in the top-left part: over 128 foreground anchors, plenty of background."""
    rows = [_row(h, w, 3) for h in range(4, 16, 2) for w in range(4, 20, 2)]
    return ANCHORS[rows].clone()


def test_foreground_capped_and_total_equals_batch_size():
    gts = _many_gts()
    labels, _ = _run([gts], cfg=replace(CFG, RPN_BATCHSIZE=100000))
    assert int((labels == 1).sum()) > 128 and int((labels == 0).sum()) > 256  # enough of both to sample
    labels, _ = _run([gts])
    assert int((labels == 1).sum()) == int(CFG.RPN_FG_FRACTION * CFG.RPN_BATCHSIZE) == 128
    assert int((labels >= 0).sum()) == CFG.RPN_BATCHSIZE


def test_foreground_cap_follows_config():
    cfg = replace(CFG, RPN_BATCHSIZE=64, RPN_FG_FRACTION=0.25)
    labels, _ = _run([_many_gts()], cfg=cfg)
    assert int((labels == 1).sum()) == 16
    assert int((labels == 0).sum()) == 48


def test_image_without_gt_only_background():
    trace = Trace()
    labels, targets = _run([torch.zeros((0, 4))], trace=trace)
    assert not (labels == 1).any()
    assert int((labels == 0).sum()) == CFG.RPN_BATCHSIZE
    assert (labels[0, ~trace["anchor_target"]["inside"][0]] == -1).all()
    assert (targets == 0).all()


def test_regression_targets_decode_to_best_gt():
    gts = torch.tensor([[100.0, 150, 299, 349], [500.0, 300, 560, 420], [40.0, 400, 400, 560]])
    labels, targets = _run([gts], cfg=replace(CFG, RPN_BATCHSIZE=100000))
    fg = labels[0] == 1
    assert int(fg.sum()) >= 3
    decoded = bbox_transform_inv(ANCHORS[fg], targets[0, fg])
    best = gts[box_iou(ANCHORS[fg], gts).argmax(1)]
    torch.testing.assert_close(decoded, best, rtol=0, atol=1e-3)
    assert (targets[0, ~fg] == 0).all()


def test_gt_touching_no_anchor_creates_no_foreground():
    anchors = torch.tensor([[0.0, 0, 15, 15], [16.0, 0, 31, 15], [0.0, 16, 15, 31]])
    far = torch.tensor([[50.0, 50, 60, 60]])
    labels, _ = _run([far], sizes=torch.tensor([[100, 100]]), anchors=anchors)
    assert labels[0].tolist() == [0, 0, 0]
    # with a second gt that does overlap, only its best anchor becomes foreground
    both = torch.tensor([[50.0, 50, 60, 60], [16.0, 0, 30, 14]])
    labels, _ = _run([both], sizes=torch.tensor([[100, 100]]), anchors=anchors)
    assert labels[0].tolist() == [0, 1, 0]


def test_clobber_positives_turns_low_overlap_best_anchors_background():
    anchors = torch.tensor([[0.0, 0, 15, 15], [40.0, 40, 79, 79]])
    gt = torch.tensor([[0.0, 0, 3, 3]])  # best anchor IoU 16/256 < 0.3
    sizes = torch.tensor([[100, 100]])
    assert _run([gt], sizes=sizes, anchors=anchors)[0][0].tolist() == [1, 0]
    clobber = replace(CFG, RPN_CLOBBER_POSITIVES=True)
    assert _run([gt], sizes=sizes, anchors=anchors, cfg=clobber)[0][0].tolist() == [0, 0]


def test_reproducible_with_same_generator_seed():
    gts = _many_gts()
    a, ta = _run([gts], seed=5)
    b, tb = _run([gts], seed=5)
    c, _ = _run([gts], seed=6)
    assert torch.equal(a, b) and torch.equal(ta, tb)
    assert not torch.equal(a, c)


def test_two_images_per_batch():
    sizes = torch.tensor([[600, 800], [400, 500]])
    gts = [GT, torch.tensor([[10.0, 20, 200, 150], [300.0, 200, 420, 380]])]
    trace = Trace()
    labels, targets = _run(gts, sizes=sizes, trace=trace)
    assert labels.shape == (2, ANCHORS.shape[0]) and targets.shape == (2, ANCHORS.shape[0], 4)
    inside = trace["anchor_target"]["inside"]
    assert int(inside[0].sum()) == 5944 and inside[1].sum() < inside[0].sum()
    assert (ANCHORS[inside[1]][:, 2] <= 499).all() and (ANCHORS[inside[1]][:, 3] <= 399).all()
    for i in range(2):
        assert (labels[i, ~inside[i]] == -1).all()
        assert int((labels[i] >= 0).sum()) == CFG.RPN_BATCHSIZE
        fg = labels[i] == 1
        decoded = bbox_transform_inv(ANCHORS[fg], targets[i, fg])
        assert (box_iou(decoded, gts[i]).max(1).values > 0.999).all()  # each image's fg point at its own gts
    first_alone, _ = _run([GT], seed=0)
    assert torch.equal(labels[0], first_alone[0])


def test_subsample_keeps_requested_count_of_true_entries():
    mask = torch.zeros(100, dtype=torch.bool)
    mask[::3] = True
    out = subsample(mask, 10, torch.Generator().manual_seed(0))
    assert int(out.sum()) == 10 and not (out & ~mask).any()
    assert torch.equal(subsample(mask, 1000, None), mask)


def test_which_presets_let_anchors_cross_the_border():
    from frcnn.config import PRESETS, load_config

    # scratch-cpu (measured on BCCD, benchmarks/results/scratch_cpu.md) and scratch-cpu-fpn, which takes its
    # schedule; every other preset keeps the reference's 0
    assert load_config("scratch-cpu").TRAIN.RPN_ALLOWED_BORDER == -1
    crossing = ("scratch-cpu", "scratch-cpu-fpn")
    assert {name: load_config(name).TRAIN.RPN_ALLOWED_BORDER for name in PRESETS} == {
        name: -1 if name in crossing else 0 for name in PRESETS}
