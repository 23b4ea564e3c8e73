"""Proposal target layer (frcnn.model.proposal_target): RoI sampling and classification targets."""

from __future__ import annotations

from dataclasses import replace

import torch

from frcnn.boxes import bbox_transform_inv, box_iou
from frcnn.config import TrainConfig
from frcnn.model.proposal_target import proposal_target_layer
from frcnn.model.trace import Trace

CFG = TrainConfig()  # BATCH_SIZE 128, FG_FRACTION 0.25, FG_THRESH 0.5, BG [0.1, 0.5)
STDS = torch.tensor(CFG.BBOX_NORMALIZE_STDS)
GTS = torch.tensor([[100.0, 100, 199, 199], [300.0, 250, 419, 329]])
GT_LABELS = torch.tensor([3, 7])


def _proposals(gts: torch.Tensor, n: int, seed: int, batch_index: int = 0, spread: float = 80.0) -> torch.Tensor:
    """Random boxes jittered around the gts (many fg, many bg), plus a few far away (IoU 0)."""
    g = torch.Generator().manual_seed(seed)
    centre = gts[torch.randint(len(gts), (n,), generator=g)]
    boxes = centre + (torch.rand(n, 4, generator=g) - 0.5) * spread
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 4)
    boxes[: n // 10] = torch.tensor([600.0, 600, 650, 650])
    return torch.cat((torch.full((n, 1), float(batch_index)), boxes), dim=1)


def _run(rois, gts, labels, cfg=CFG, seed=0, trace=None):
    return proposal_target_layer(rois, gts, labels, cfg, torch.Generator().manual_seed(seed), trace)


def test_batch_size_rois_and_fg_cap():
    rois = _proposals(GTS, 2000, 0)
    trace = Trace()
    out_rois, labels, targets = _run(rois, [GTS], [GT_LABELS], trace=trace)
    assert out_rois.shape == (128, 5) and labels.shape == (128,) and targets.shape == (128, 4)
    assert (out_rois[:, 0] == 0).all()
    num_fg = int((labels > 0).sum())
    assert num_fg == round(0.25 * 128) == 32  # plenty of fg candidates: exactly the cap
    overlaps = box_iou(out_rois[:, 1:], GTS).max(1).values
    torch.testing.assert_close(overlaps, trace["proposal_target"]["max_overlaps"])
    assert (overlaps[:num_fg] >= CFG.FG_THRESH).all()  # fg first
    assert ((overlaps[num_fg:] >= CFG.BG_THRESH_LO) & (overlaps[num_fg:] < CFG.BG_THRESH_HI)).all()
    assert (labels[num_fg:] == 0).all()


def test_fg_labels_are_those_of_the_best_gt():
    rois = _proposals(GTS, 2000, 1)
    out_rois, labels, _ = _run(rois, [GTS], [GT_LABELS])
    fg = labels > 0
    best = box_iou(out_rois[fg, 1:], GTS).argmax(1)
    assert torch.equal(labels[fg], GT_LABELS[best])
    assert set(labels[fg].tolist()) == {3, 7}


def test_targets_normalised_and_decode_to_gt():
    rois = _proposals(GTS, 2000, 2)
    out_rois, labels, targets = _run(rois, [GTS], [GT_LABELS])
    fg = labels > 0
    decoded = bbox_transform_inv(out_rois[fg, 1:], targets[fg] * STDS)
    best = GTS[box_iou(out_rois[fg, 1:], GTS).argmax(1)]
    torch.testing.assert_close(decoded, best, rtol=0, atol=1e-3)
    assert (targets[~fg] == 0).all()
    unnormalised = bbox_transform_inv(out_rois[fg, 1:], targets[fg])
    assert not torch.allclose(unnormalised, best, atol=1e-1)  # the stds were really applied


def test_fg_count_below_cap_when_few_fg():
    gts = GTS[:1]
    # 3 fg candidates (plus the gt itself), many bg
    fg_boxes = gts + torch.tensor([[0.0, 0, 5, 5], [2.0, 2, 0, 0], [-4.0, 0, 0, 0]])
    bg_boxes = gts + torch.tensor([60.0, 0, 60, 0])  # IoU 40/160 = 0.25 -> background
    rois = torch.cat((fg_boxes, bg_boxes.repeat(200, 1)))
    rois = torch.cat((torch.zeros(len(rois), 1), rois), dim=1)
    out_rois, labels, _ = _run(rois, [gts], [torch.tensor([1])])
    assert out_rois.shape[0] == 128
    assert int((labels > 0).sum()) == 4  # the three proposals and the gt box, without repetition
    assert int((labels == 0).sum()) == 124


def test_gt_boxes_are_candidates_without_any_proposal():
    rois = torch.zeros((0, 5))
    out_rois, labels, targets = _run(rois, [GTS], [GT_LABELS])
    assert out_rois.shape[0] == 128
    assert (labels > 0).all()  # only fg exist: every sampled RoI is one of the gts
    assert set(map(tuple, out_rois[:, 1:].tolist())) == set(map(tuple, GTS.tolist()))
    torch.testing.assert_close(targets, torch.zeros_like(targets), rtol=0, atol=1e-6)


def test_background_filled_up_by_repetition():
    gts = GTS[:1]
    bg_boxes = torch.stack([gts[0] + torch.tensor([60.0, 0, 60, 0]), gts[0] + torch.tensor([0.0, 70, 0, 70])])
    rois = torch.cat((torch.zeros(2, 1), bg_boxes), dim=1)
    out_rois, labels, _ = _run(rois, [gts], [torch.tensor([2])])
    assert out_rois.shape[0] == 128
    assert int((labels > 0).sum()) == 1  # the gt itself
    bg_rows = {tuple(r) for r in out_rois[labels == 0, 1:].tolist()}
    assert bg_rows <= {tuple(r) for r in bg_boxes.tolist()}
    assert int((labels == 0).sum()) == 127


def test_rois_below_bg_thresh_lo_are_never_sampled():
    gts = GTS[:1]
    far = torch.tensor([[0.0, 600, 600, 650, 650]])  # IoU 0 < BG_THRESH_LO
    bg = torch.cat((torch.zeros(1, 1), gts + torch.tensor([[60.0, 0, 60, 0]])), dim=1)
    out_rois, labels, _ = _run(torch.cat((far.repeat(50, 1), bg)), [gts], [torch.tensor([1])])
    assert not (out_rois[:, 1] == 600).any()
    lo0 = replace(CFG, BG_THRESH_LO=0.0)
    out_rois, _, _ = _run(torch.cat((far.repeat(50, 1), bg)), [gts], [torch.tensor([1])], cfg=lo0)
    assert (out_rois[:, 1] == 600).any()


def test_image_without_gt_all_background():
    rois = _proposals(GTS, 300, 3)
    out_rois, labels, targets = _run(rois, [torch.zeros((0, 4))], [torch.zeros(0, dtype=torch.long)])
    assert out_rois.shape[0] == 128
    assert (labels == 0).all() and (targets == 0).all()


def test_two_images_each_get_batch_size_rois_from_their_own_gts():
    """TRAIN.BATCH_SIZE is per image (the reference's minibatch is one image), so an image samples the same
    number of RoIs whether it shares its batch (or its process) with others or not."""
    gts1 = torch.tensor([[30.0, 40, 129, 119]])
    rois = torch.cat((_proposals(GTS, 1000, 4, 0), _proposals(gts1, 1000, 5, 1)))
    trace = Trace()
    out_rois, labels, targets = _run(rois, [GTS, gts1], [GT_LABELS, torch.tensor([5])], trace=trace)
    assert out_rois.shape[0] == 2 * 128
    for i, (gts, n_cls) in enumerate(((GTS, {3, 7}), (gts1, {5}))):
        sel = out_rois[:, 0] == i
        assert int(sel.sum()) == 128
        fg = sel & (labels > 0)
        assert int(fg.sum()) == 32
        assert set(labels[fg].tolist()) <= n_cls
        decoded = bbox_transform_inv(out_rois[fg, 1:], targets[fg] * STDS)
        assert (box_iou(decoded, gts).max(1).values > 0.999).all()


def test_reproducible_with_same_seed():
    rois = _proposals(GTS, 2000, 6)
    a = _run(rois, [GTS], [GT_LABELS], seed=11)
    b = _run(rois, [GTS], [GT_LABELS], seed=11)
    c = _run(rois, [GTS], [GT_LABELS], seed=12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


def _one_large_one_small(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 200 px object with 60 proposals around it (IoU >= 0.5), a 24 px one with a single proposal (IoU 0.75)."""
    gts = torch.tensor([[100.0, 100, 299, 299], [400.0, 400, 423, 423]])
    g = torch.Generator().manual_seed(seed)
    large = gts[0] + (torch.rand(60, 4, generator=g) - 0.5) * 20  # a corner moves <= 10 px: IoU > 0.8
    small = torch.tensor([[400.0, 403, 423, 426]])  # 24 x 21 overlap of 24 x 24 boxes: 504 / (1152 - 504) = 0.78
    boxes = torch.cat((large, small, torch.tensor([[600.0, 600, 650, 650]] * 20)))  # and 20 far (IoU 0)
    return torch.cat((torch.zeros(len(boxes), 1), boxes), dim=1), gts


def test_per_object_sampling_serves_each_object_in_turn():
    # 8 foreground slots (32 RoIs x 0.25, BG_THRESH_LO 0). Candidates: the large object's 60 proposals and its gt
    # box (61), the small one's proposal and gt box (2). At random the small object gets 8 x 2 / 63 = 0.25 of them
    # on average; per object it gets both of its candidates (rounds 0 and 1) and the large one the other 6.
    cfg = replace(CFG, BATCH_SIZE=32, BG_THRESH_LO=0.0)
    per_object = replace(cfg, FG_SAMPLING="per_object")
    small_at_random = 0
    for seed in range(10):
        rois, gts = _one_large_one_small(seed)
        for c in (cfg, per_object):
            trace = Trace()
            _, labels, _ = _run(rois, [gts], [torch.tensor([1, 2])], cfg=c, seed=seed, trace=trace)
            assign = trace["proposal_target"]["gt_assignment"][labels > 0]
            assert int((labels > 0).sum()) == 8
            if c is per_object:
                assert torch.bincount(assign, minlength=2).tolist() == [6, 2]
            else:
                small_at_random += int((assign == 1).sum())
    assert small_at_random < 10  # 2.5 expected over the 10 draws; per object gives 20


def test_per_object_sampling_with_uneven_objects_fills_rounds_in_order():
    from frcnn.model.proposal_target import _choose_per_object

    objects = torch.tensor([0] * 8 + [1] * 3 + [2])
    idx = torch.arange(100, 112)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        counts = [torch.bincount(objects[_choose_per_object(idx, objects, k, g) - 100], minlength=3).tolist()
                  for k in (3, 5, 6, 8, 12)]
        assert counts[0] == [1, 1, 1] and counts[1] == [2, 2, 1]  # round 0 for all; object 2 then has no more
        assert sorted(counts[2][:2]) == [2, 3] and counts[2][2] == 1  # round 2: one of objects 0 and 1, at random
        assert counts[3] == [4, 3, 1] and counts[4] == [8, 3, 1]  # object 1 runs out after round 2


def test_per_object_sampling_also_when_no_roi_is_background():
    # Without the 20 far boxes every candidate is foreground and all 8 RoIs (BATCH_SIZE 8) are: per object the small
    # object still gets both of its candidates, as in the branch with background.
    cfg = replace(CFG, BATCH_SIZE=8, BG_THRESH_LO=0.0, FG_SAMPLING="per_object")
    for seed in range(5):
        rois, gts = _one_large_one_small(seed)
        trace = Trace()
        _, labels, _ = _run(rois[:61], [gts], [torch.tensor([1, 2])], cfg=cfg, seed=seed, trace=trace)
        assert int((labels > 0).sum()) == 8
        assert torch.bincount(trace["proposal_target"]["gt_assignment"], minlength=2).tolist() == [6, 2]
