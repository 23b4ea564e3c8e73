"""frcnn explain on an FPN model (NECK=fpn, the tiny backbone: levels P2..P5 at strides 4, 8, 16, 32, P5 the RPN's
only): anchors per level, objectness per level, proposals by level, RoIs by level, timings; the C4 page's numbers
keep their keys (its pictures: tests/test_explain.py)."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from explain_fixtures import BOXES, CLASSES, LABELS, picture, voc_folder
from explain_fixtures import config as c4_config
from explain_fixtures import model as c4_model

from frcnn.boxes import bbox_transform_inv, clip_boxes
from frcnn.cli import main
from frcnn.config import load_config
from frcnn.engine.checkpoint import save_checkpoint
from frcnn.explain.run import GroundTruth, run_traced
from frcnn.explain.stages import build_stages
from frcnn.explain.stages.levels import pyramid_levels
from frcnn.explain.stages.pooling import pooling_stage, rois_by_level
from frcnn.explain.stages.rpn import kept_levels, level_objectness, objectness_tiles
from frcnn.model.detector import FasterRCNN
from frcnn.model.pooling import pool_pyramid, pool_rois
from frcnn.model.trace import Trace

FPN = ["NECK=fpn", "FEAT_STRIDE=16", "ANCHOR_SCALES=[8]", "FPN_CHANNELS=32"]
STRIDES = [4, 8, 16, 32]


def fpn_config():
    return load_config("demo-cpu", ["DEVICE=cpu", *FPN])


def fpn_model() -> FasterRCNN:
    """Seeded, untrained; the RPN's score layer drawn wide so objectness varies from cell to cell and level to
    level (at its 0.01 initialisation every anchor scores about 0.5, and a mix-up of levels would not show)."""
    torch.manual_seed(0)
    net = FasterRCNN(fpn_config(), num_classes=len(CLASSES), load_pretrained=False).eval()
    with torch.no_grad():
        torch.nn.init.normal_(net.rpn.rpn_cls_score_net.weight, std=0.5)
    return net


@pytest.fixture(scope="module")
def net():
    return fpn_model()


@pytest.fixture(scope="module")
def traced(net):
    return run_traced(net, fpn_config(), CLASSES, picture(), GroundTruth(BOXES.clone(), LABELS.clone()))


@pytest.fixture(scope="module")
def stages(traced):
    return {s.key: s for s in build_stages(traced, threshold=0.2)}


def test_the_levels_are_read_from_the_trace(traced):
    levels = pyramid_levels(traced)
    rec = traced.trace["anchors"]
    assert [lv.stride for lv in levels] == STRIDES and [lv.name for lv in levels] == ["P2", "P3", "P4", "P5"]
    h, w = traced.batch_size_hw
    assert [lv.feat_hw for lv in levels] == [(-(-h // s), -(-w // s)) for s in STRIDES]  # ceil: the conv's padding
    assert [lv.count for lv in levels] == [fh * fw * 3 for fh, fw in rec["feat_sizes"]]
    assert [lv.start for lv in levels] == [0, levels[0].count, levels[0].count + levels[1].count,
                                           rec["anchors"].shape[0] - levels[3].count]


def test_every_stage_is_there_in_order_with_a_picture(stages):
    assert list(stages) == ["01_preprocess", "02_anchors", "03_rpn", "04_proposal_layer", "05_targets",
                            "06_roi_pooling", "07_classification", "08_class_nms", "09_detections", "10_timing"]
    for s in stages.values():
        assert s.image is not None and s.image.width > 100 and s.image.height > 50
        assert s.text.count(".") >= 2 and s.numbers


def test_anchors_of_each_level_are_scale_times_stride(traced, stages):
    n = stages["02_anchors"].numbers
    assert [lv["level"] for lv in n["levels"]] == ["P2", "P3", "P4", "P5"]
    assert [lv["stride"] for lv in n["levels"]] == STRIDES
    assert [lv["anchor_sizes_px"] for lv in n["levels"]] == [[32], [64], [128], [256]]  # 8 x stride
    assert sum(lv["anchors"] for lv in n["levels"]) == n["total_anchors"] == traced.trace["anchors"]["anchors"].shape[0]
    # by hand, torchvision's shapes: ratio 0.5 of 32 px is w = 32 / sqrt(0.5) = 45.25 -> corners -23 .. 23,
    # h = 22.63 -> -11 .. 11, +1 convention: 46 x 22; the square one is 32 x 32
    assert n["anchor_sizes_wh"]["P2"] == [[46, 22], [32, 32], [22, 46]]
    assert n["anchor_sizes_wh"]["P5"] == [[362, 182], [256, 256], [182, 362]]
    text = stages["02_anchors"].text
    for s in STRIDES:
        assert f"{8 * s} px on P{s.bit_length() - 1}" in text
    assert "ANCHOR_SCALES x the level's stride" in text and "RPN only" in text


def test_one_objectness_picture_per_level_each_that_levels_rpn_output(net, traced, stages):
    levels = pyramid_levels(traced)
    tiles = objectness_tiles(traced, levels)
    assert len(tiles) == len(levels) == len(traced.trace["head"]["levels"]) == 4
    assert len({t.tobytes() for t in tiles}) == 4  # four different pictures
    maps = level_objectness(traced, levels)
    with torch.no_grad():  # the RPN run on each level's map on its own: the same maps, level for level
        for lv, got, features in zip(levels, maps, traced.trace["head"]["levels"]):
            logits, _ = net.rpn(features)
            want = logits.softmax(-1)[0, :, 1].view(*lv.feat_hw, 3).amax(dim=2)
            assert got.shape == lv.feat_hw
            torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-6)
    n = stages["03_rpn"].numbers["levels"]
    assert [x["objectness_max"] for x in n] == pytest.approx([float(m.max()) for m in maps])
    assert len({round(x["objectness_max"], 6) for x in n}) == 4  # the levels really differ


def test_each_kept_proposal_is_decoded_from_an_anchor_of_its_level(traced, stages):
    levels = pyramid_levels(traced)
    rec = traced.trace["proposal_layer"]
    of = kept_levels(traced)
    rois = rec["rois"][:, 1:]
    assert len(of) == len(rois) > 0
    anchors = traced.trace["anchors"]["anchors"]
    h, w = traced.input_size
    decoded = clip_boxes(bbox_transform_inv(anchors, traced.trace["rpn"]["deltas"][0]), h, w)
    for box, k in zip(rois, of.tolist()):
        lv = levels[k]
        hits = (decoded == box).all(dim=1).nonzero().squeeze(1)
        assert ((hits >= lv.start) & (hits < lv.start + lv.count)).any()
    n = stages["04_proposal_layer"].numbers["levels"]
    pre = fpn_config().TEST.RPN_PRE_NMS_TOP_N
    assert [x["candidates"] for x in n] == [min(pre, lv.count) for lv in levels]  # top-N per level
    assert [x["kept"] for x in n] == [int((of == i).sum()) for i in range(4)]
    assert sum(x["kept"] for x in n) == stages["04_proposal_layer"].numbers["proposals_after_nms"]


# sizes (+1, network px) -> level by hand: k = floor(4 + log2(sqrt(wh) / 224)) clamped to [2, 4]
KNOWN = torch.tensor([[0.0, 0, 49, 49],     # 50: floor(1.84) = 1 -> 2
                      [0, 0, 110, 110],     # 111: floor(2.99) = 2
                      [10, 10, 121, 121],   # 112: 3
                      [0, 0, 222, 222],     # 223: floor(3.99) = 3
                      [0, 0, 223, 223],     # 224: 4
                      [0, 0, 447, 447],     # 448: 5 -> 4 (P5 is the RPN's only)
                      [0, 0, 55, 223]])     # 56 x 224: sqrt = 112 -> 3
KNOWN_LEVELS = {"P2": [0, 1], "P3": [2, 3, 6], "P4": [4, 5]}


def _with_rois(run, boxes):
    """``run`` whose pooled (and classified) RoIs are ``boxes`` of image 0."""
    trace = Trace()
    trace.stages = {k: dict(v) for k, v in run.trace.stages.items()}
    trace.timings = dict(run.trace.timings)
    rois = torch.cat((torch.zeros(len(boxes), 1), boxes), dim=1)
    trace.stages["roi_pooling"].update(rois=rois, crops=run.trace["roi_pooling"]["crops"][: len(boxes)])
    trace.stages["classification"]["cls_prob"] = run.trace["classification"]["cls_prob"][: len(boxes)]
    fake = copy.copy(run)
    fake.trace = trace
    return fake, rois


def test_the_rois_listed_under_each_level_are_those_the_level_rule_sends_there(traced):
    fake, rois = _with_rois(traced, KNOWN)
    levels = pyramid_levels(fake)
    groups = rois_by_level(fake, levels)
    assert {lv.name: g.tolist() for lv, g in zip(levels, groups)} == KNOWN_LEVELS
    stage = pooling_stage(fake)
    listed = {x["level"]: x["roi_indices"] for x in stage.numbers["levels"]}
    assert listed == KNOWN_LEVELS
    assert [x["stride"] for x in stage.numbers["levels"]] == [4, 8, 16]
    assert [x["sqrt_wh"] for x in stage.numbers["levels"]] == ["< 112 px", "112 - 224 px", ">= 224 px"]
    assert stage.numbers["level_rule"] == "k = floor(4 + log2(sqrt(w h) / 224)) clamped to [2, 4]"
    assert "FEAT_STRIDE" not in stage.numbers  # one stride per level, listed
    # and the model pools each from that level
    cfg = fpn_config()
    maps = traced.trace["head"]["levels"][:-1]
    pooled = pool_pyramid(maps, rois, cfg.POOLING_MODE, cfg.POOLING_SIZE, STRIDES[:-1])
    for k, idx in enumerate(KNOWN_LEVELS.values()):
        own = pool_rois(maps[k], rois[idx], cfg.POOLING_MODE, cfg.POOLING_SIZE, STRIDES[k])
        torch.testing.assert_close(pooled[idx], own, rtol=0, atol=0)


def test_pooling_stage_counts_the_real_rois_by_level(traced, stages):
    n = stages["06_roi_pooling"].numbers
    pooled = traced.trace["roi_pooling"]["rois"]
    assert sum(x["rois"] for x in n["levels"]) == n["rois_pooled"] == pooled.shape[0]
    assert sorted(i for x in n["levels"] for i in x["roi_indices"]) == list(range(pooled.shape[0]))
    sampled = traced.trace["proposal_target"]["rois"].shape[0]
    assert sum(n["sampled_rois_per_level"].values()) == sampled == fpn_config().TRAIN.BATCH_SIZE


def test_timings_cover_every_stage(stages):
    ms = stages["10_timing"].numbers["ms"]
    assert set(ms) >= {"preprocess", "head", "anchors", "rpn", "proposal_layer", "anchor_target", "proposal_target",
                       "roi_pooling", "classification", "detections"}
    assert all(v >= 0 for v in ms.values()) and stages["10_timing"].numbers["total_ms"] > 0


def test_cli_explain_on_an_fpn_checkpoint(tmp_path, capsys):
    image = voc_folder(tmp_path / "voc")
    save_checkpoint(tmp_path / "ckpt", fpn_model(), fpn_config(), CLASSES, iteration=0)
    out = tmp_path / "explain"
    assert main(["explain", "--checkpoint", str(tmp_path / "ckpt"), str(image), "--out", str(out), "--json"]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    page = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 10 and re.findall(r"src='([^']+)'", page) == pngs
    assert "FPN (strides 4, 8, 16, 32)" in page
    for s in STRIDES:
        assert f"stride {s}" in page
    assert "k = floor(4 + log2(sqrt(w h) / 224)) clamped to [2, 4]" in page
    data = json.loads((out / "explain.json").read_text())["stages"]
    assert [x["stride"] for x in data["02_anchors"]["levels"]] == STRIDES
    assert len(data["03_rpn"]["levels"]) == 4 and len(data["06_roi_pooling"]["levels"]) == 3


def test_c4_stages_keep_their_numbers_and_say_nothing_of_levels():
    run = run_traced(c4_model(), c4_config(), CLASSES, picture(), GroundTruth(BOXES.clone(), LABELS.clone()))
    assert pyramid_levels(run) == []
    got = {s.key: s for s in build_stages(run, threshold=0.2)}
    assert list(got["02_anchors"].numbers) == ["feature_map_hw", "FEAT_STRIDE", "anchors_per_location",
                                               "ANCHOR_SCALES", "ANCHOR_RATIOS", "anchor_sizes_wh", "total_anchors",
                                               "time_ms"]
    assert list(got["03_rpn"].numbers) == ["feature_map_hw", "anchors", "objectness_max", "objectness_mean",
                                           "anchors_above_0.5", "best_cell_ij", "RPN_CHANNELS", "time_ms_head",
                                           "time_ms_rpn"]
    assert "levels" not in got["04_proposal_layer"].numbers
    assert list(got["06_roi_pooling"].numbers) == ["POOLING_MODE", "POOLING_SIZE", "rois_pooled", "pooled_shape",
                                                   "FEAT_STRIDE", "time_ms"]
    for s in got.values():
        assert "level" not in s.text.lower() and "FPN" not in s.text and "pyramid" not in s.text
