"""Feature Pyramid Network (NECK=fpn): the neck, anchors per level, the multi-level proposal layer, RoI levels.

Known answers come from the issue and the FPN paper (level mapping), and from torchvision called directly
(its FeaturePyramidNetwork, AnchorGenerator, batched_nms)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from frcnn.config import load_config, pyramid_strides
from frcnn.errors import ConfigError
from frcnn.model.anchors import level_anchors, shift_anchors
from frcnn.model.detector import FasterRCNN
from frcnn.model.fpn import FPN
from frcnn.model.pooling import pool_pyramid, pool_rois, roi_levels
from frcnn.model.rpn import RPN, proposal_layer

R50_FPN = ["NECK=fpn", "FEAT_STRIDE=32", "ANCHOR_SCALES=[8]"]
TINY_FPN = ["NECK=fpn", "FEAT_STRIDE=16", "ANCHOR_SCALES=[8]", "FPN_CHANNELS=32"]


def test_fpn_equals_torchvisions_feature_pyramid_network_with_the_same_weights():
    torch.manual_seed(0)
    chans = [8, 16, 24, 32]
    ours = FPN(chans, 12)
    tv = FeaturePyramidNetwork(chans, 12, extra_blocks=LastLevelMaxPool())
    with torch.no_grad():
        for i in range(len(chans)):
            tv.inner_blocks[i][0].weight.copy_(ours.lateral[i].weight)
            tv.inner_blocks[i][0].bias.copy_(ours.lateral[i].bias)
            tv.layer_blocks[i][0].weight.copy_(ours.output[i].weight)
            tv.layer_blocks[i][0].bias.copy_(ours.output[i].bias)
    # odd sizes: the top-down path upsamples to the lateral's own size (not 2x)
    stages = [torch.randn(2, c, s, s + 3) for c, s in zip(chans, (33, 17, 9, 5))]
    got = ours(stages)
    want = list(tv({str(i): x for i, x in enumerate(stages)}).values())
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert got[4].shape[-2:] == (3, 4)  # P6: stride-2 subsampling of P5 (5 x 8)


def test_pyramid_strides():
    assert pyramid_strides(load_config(None, R50_FPN)) == (4, 8, 16, 32, 64)
    assert pyramid_strides(load_config("demo-cpu", TINY_FPN)) == (4, 8, 16, 32)
    assert pyramid_strides(load_config("demo-cpu", [*TINY_FPN[:1], "FEAT_STRIDE=8", *TINY_FPN[2:]])) == (4, 8, 16)
    assert pyramid_strides(load_config("demo-cpu")) == (8,)


def test_level_anchors_equal_torchvisions_fpn_anchors_in_the_plus_one_convention():
    strides, sizes = (4, 8, 16, 32, 64), ((32,), (64,), (128,), (256,), (512,))
    tv = TVAnchorGenerator(sizes=sizes, aspect_ratios=((0.5, 1.0, 2.0),) * 5)
    # sides that are multiples of 64: torchvision infers each level's stride as image size // map size, which for
    # other sizes is not the level's stride (800 px: P6 has 13 cells and stride 61); frcnn keeps 4, 8, .., 64
    h, w = 192, 320
    feats = [torch.zeros(1, 1, -(-h // s), -(-w // s)) for s in strides]
    want = tv(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), feats)[0]
    got = torch.cat([shift_anchors(level_anchors(s, [8], [0.5, 1, 2]), *f.shape[-2:], s)
                     for s, f in zip(strides, feats)])
    torch.testing.assert_close(got + torch.tensor([0.0, 0.0, 1.0, 1.0]), want, rtol=0, atol=0)


def test_level_anchors_of_the_first_cell_known_values():
    """Cell (0, 0) of each level, ratios 0.5, 1, 2 (h / w): size 8 x stride, w = size / sqrt(r) rounded per corner,
    +1 convention (x2 = exclusive x2 - 1)."""
    known = {
        4: [[-23, -11, 22, 10], [-16, -16, 15, 15], [-11, -23, 10, 22]],
        8: [[-45, -23, 44, 22], [-32, -32, 31, 31], [-23, -45, 22, 44]],
        16: [[-91, -45, 90, 44], [-64, -64, 63, 63], [-45, -91, 44, 90]],
        32: [[-181, -91, 180, 90], [-128, -128, 127, 127], [-91, -181, 90, 180]],
        64: [[-362, -181, 361, 180], [-256, -256, 255, 255], [-181, -362, 180, 361]],
    }
    for stride, rows in known.items():
        assert level_anchors(stride, [8], [0.5, 1, 2]).tolist() == rows
    # the second cell of P3 is the first moved by the stride
    assert shift_anchors(level_anchors(8, [8], [1]), 2, 2, 8)[1].tolist() == [-24, -32, 39, 31]


@pytest.mark.parametrize(("side", "level"), [(224, 4), (112, 3), (448, 5), (30, 2), (2000, 5), (223, 3), (10, 2)])
def test_roi_levels_known_answers(side, level):
    roi = torch.tensor([[0.0, 10, 20, 10 + side - 1, 20 + side - 1]])  # +1 convention: side px wide
    assert roi_levels(roi, 2, 5).tolist() == [level]


def test_roi_levels_use_the_area_of_non_square_boxes():
    roi = torch.tensor([[0.0, 0, 0, 447, 111]])  # 448 x 112: sqrt = 224
    assert roi_levels(roi, 2, 5).tolist() == [4]


@pytest.mark.parametrize("mode", ["crop", "align", "pool"])
def test_pool_pyramid_pools_each_roi_from_its_own_level(mode):
    torch.manual_seed(1)
    strides = [4, 8, 16, 32]
    levels = [torch.randn(2, 6, 512 // s, 640 // s) for s in strides]
    # 36 x 26 px, 112 x 112, 251 x 201 (sqrt 225), 601 x 501 (sqrt 549), 11 x 21
    rois = torch.tensor([[0, 3, 5, 38, 30], [1, 10, 10, 121, 121], [0, 0, 0, 250, 200], [1, 20, 3, 620, 503],
                         [0, 100, 50, 110, 70]], dtype=torch.float32)
    got = pool_pyramid(levels, rois, mode, 7, strides)
    expect_levels = roi_levels(rois, 2, 5).tolist()
    assert expect_levels == [2, 3, 4, 5, 2]
    for r, k in enumerate(expect_levels):
        want = pool_rois(levels[k - 2], rois[r : r + 1], mode, 7, strides[k - 2])
        torch.testing.assert_close(got[r : r + 1], want, rtol=0, atol=1e-6)


def test_rpn_on_a_pyramid_is_the_levels_outputs_one_after_the_other():
    torch.manual_seed(0)
    rpn = RPN(8, 8, 3)
    levels = [torch.randn(2, 8, 6, 7), torch.randn(2, 8, 3, 4)]
    logits, deltas = rpn(levels)
    parts = [rpn(x) for x in levels]
    torch.testing.assert_close(logits, torch.cat([p[0] for p in parts], 1))
    torch.testing.assert_close(deltas, torch.cat([p[1] for p in parts], 1))


def _independent_multilevel_proposals(fg, deltas, anchors, sizes, h, w, pre, post, thresh):
    """Transcription of torchvision's RegionProposalNetwork.filter_proposals for one image (without its small-box
    and score filters): top `pre` per level, batched_nms by level, best `post`."""
    from frcnn.boxes import bbox_transform_inv, clip_boxes

    boxes = clip_boxes(bbox_transform_inv(anchors, deltas), h, w)
    idx, lvl, start = [], [], 0
    for j, m in enumerate(sizes):
        top = torch.topk(fg[start : start + m], min(pre, m)).indices + start
        idx.append(top)
        lvl.append(torch.full_like(top, j))
        start += m
    idx, lvl = torch.cat(idx), torch.cat(lvl)
    b, s = boxes[idx], fg[idx]
    excl = b + torch.tensor([0.0, 0.0, 1.0, 1.0])
    keep = torchvision.ops.batched_nms(excl, s, lvl, thresh)[:post]
    return b[keep], s[keep]


def test_multilevel_proposal_layer_matches_torchvisions_rule():
    torch.manual_seed(3)
    strides, shapes = [8, 16, 32], [(12, 16), (6, 8), (3, 4)]
    anchors = torch.cat([shift_anchors(level_anchors(s, [8], [0.5, 1, 2]), h, w, s)
                         for s, (h, w) in zip(strides, shapes)])
    sizes = [h * w * 3 for h, w in shapes]
    m = anchors.shape[0]
    fg = torch.rand(2, m)  # distinct scores: the order is unambiguous
    deltas = torch.randn(2, m, 4) * 0.2
    image_sizes = torch.tensor([[96, 128], [90, 120]])
    rois, scores = proposal_layer(fg, deltas, anchors, image_sizes, 50, 40, 0.7, level_sizes=sizes)
    for i in range(2):
        h, w = image_sizes[i].tolist()
        wb, ws = _independent_multilevel_proposals(fg[i], deltas[i], anchors, sizes, h, w, 50, 40, 0.7)
        sel = rois[:, 0] == i
        torch.testing.assert_close(rois[sel, 1:], wb, rtol=0, atol=0)
        torch.testing.assert_close(scores[sel], ws, rtol=0, atol=0)
    # per level, not over all: a level whose scores are all lower still contributes proposals
    low = fg.clone()
    low[:, : sizes[0]] += 10  # level 0 outscores every other anchor
    rois, _ = proposal_layer(low, deltas, anchors, image_sizes, 20, 1000, 1.0, level_sizes=sizes)
    assert int((rois[:, 0] == 0).sum()) == 60  # 20 from each of the 3 levels (NMS at 1.0 removes none), not 20


def _batch(h=192, w=256):
    gt = [torch.tensor([[10.0, 20, 100, 120], [150, 30, 240, 180]])]
    return torch.randn(1, 3, h, w), torch.tensor([[h, w]]), gt, [torch.tensor([1, 2])]


@pytest.mark.parametrize(("preset", "overrides", "levels"), [("demo-cpu", TINY_FPN, 4), (None, R50_FPN, 5)])
def test_fpn_detector_trains_every_part_and_detects(preset, overrides, levels):
    cfg = load_config(preset, [*overrides, "TRAIN.RPN_PRE_NMS_TOP_N=300", "TEST.RPN_PRE_NMS_TOP_N=200"])
    torch.manual_seed(0)
    model = FasterRCNN(cfg, 2)
    images, sizes, gt, labels = _batch()
    losses = model(images, sizes, gt, labels, torch.Generator().manual_seed(0))
    assert set(losses) == {"rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box"}
    sum(losses.values()).backward()
    fpn = model.head.fpn
    assert len(fpn.output) == levels - 1
    # (the coarsest output conv may get none here: its RoIs and inside anchors need objects of 200+ px)
    for conv in [*fpn.lateral, *fpn.output[:3], model.rpn.rpn_net]:
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        det = model(images, sizes)[0]
    assert det.boxes.shape[0] > 0
    assert (det.boxes[:, 2] <= sizes[0, 1] - 1).all() and (det.boxes[:, 3] <= sizes[0, 0] - 1).all()


def test_fpn_anchors_of_the_detector_are_level_by_level():
    cfg = load_config("demo-cpu", TINY_FPN)
    model = FasterRCNN(cfg, 2)
    assert [g.stride for g in model.anchor_generators] == [4, 8, 16, 32]
    assert model.anchor_generators[0].base_anchors.tolist() == level_anchors(4, [8], [0.5, 1, 2]).tolist()
    assert model.rpn.num_anchors == 3


def test_exact_joint_training_reaches_the_rpn_deltas_through_the_pyramid():
    cfg = load_config("demo-cpu", [*TINY_FPN, "POOLING_MODE=crop", "TRAIN.JOINT=exact"])
    torch.manual_seed(0)
    model = FasterRCNN(cfg, 2)
    images, sizes, gt, labels = _batch()
    losses = model(images, sizes, gt, labels, torch.Generator().manual_seed(0))
    (losses["rcnn_cls"] + losses["rcnn_box"]).backward()
    assert model.rpn.rpn_bbox_pred_net.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("overrides", "message"), [
    (["NECK=fpn", "BACKBONE=vgg16"], "BACKBONE=vgg16 has none"),
    (["NECK=fpn"], "FEAT_STRIDE=16 is not one of 32 for BACKBONE=res50 with NECK=fpn"),
    (["NECK=fpn", "BACKBONE=tiny", "FEAT_STRIDE=4"], "FEAT_STRIDE=4 is not one of 8, 16 for BACKBONE=tiny"),
    (["NECK=fpn", "FEAT_STRIDE=32", "ANCHOR_SCALES=auto"], "ANCHOR_SCALES=auto is for NECK=none"),
    (["NECK=pyramid"], "NECK='pyramid' is not one of none, fpn"),
])
def test_bad_fpn_configs_say_what_is_wrong_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_overrides_are_checked_together_whatever_their_order():
    a = load_config(None, ["FEAT_STRIDE=32", "NECK=fpn"])
    b = load_config(None, ["NECK=fpn", "FEAT_STRIDE=32"])
    assert a == b and a.NECK == "fpn"


def test_scratch_cpu_fpn_is_scratch_cpu_with_the_tiny_pyramid():
    from dataclasses import replace

    c4, fpn = load_config("scratch-cpu"), load_config("scratch-cpu-fpn")
    assert pyramid_strides(fpn) == (4, 8, 16, 32)
    pyramid = (fpn.NECK, fpn.FEAT_STRIDE, fpn.ANCHOR_SCALES, fpn.FPN_CHANNELS, fpn.RPN_CHANNELS)
    assert pyramid == ("fpn", 16, (8.0,), 64, 64)
    assert c4.DILATED and not fpn.DILATED  # the pyramid's stride-16 level is the stride-16 stage itself
    train = fpn.TRAIN  # scratch-cpu's schedule (benchmarks/results/scratch_cpu.md, twenty-third session)
    schedule = (train.MAX_EPOCHS, train.STEP_EPOCHS, train.IMS_PER_BATCH, train.LEARNING_RATE, train.WEIGHT_DECAY,
                train.AMP, train.BATCH_SIZE, train.RPN_ALLOWED_BORDER)
    assert schedule == (17, (13,), 4, 0.02, 0.0005, "auto", 64, -1)
    same = replace(fpn, NECK="none", FEAT_STRIDE=8, DILATED=True, ANCHOR_SCALES="auto", FPN_CHANNELS=256,
                   RPN_CHANNELS=128)
    assert same == c4  # nothing else differs: the same recipe and schedule (TRAIN, TEST) as scratch-cpu
