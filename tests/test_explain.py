"""frcnn explain: exact projection of boxes and feature cells onto the original image, stage numbers equal to
what the layers produce for the same image and config, the page, the JSON and the command line."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from explain_fixtures import BOXES, CLASSES, GREY, LABELS, RED, checkpoint, config, model, picture, voc_folder

from frcnn.boxes import scale_boxes
from frcnn.cli import main
from frcnn.config import load_config
from frcnn.engine.inference import Predictor
from frcnn.explain import explain_image
from frcnn.explain.run import GroundTruth, run_traced
from frcnn.explain.stages import (
    anchor_target_numbers,
    build_stages,
    draw_boxes,
    feature_overlay,
    make_canvas,
    match_detections,
    proposal_target_numbers,
)
from frcnn.model.detector import FasterRCNN
from frcnn.model.trace import Trace
from frcnn.transforms import batch_images, image_to_tensor, prep_image
from frcnn.viz import charts


@pytest.fixture(scope="module")
def net():
    return model()


@pytest.fixture(scope="module")
def traced(net):
    return run_traced(net, config(), CLASSES, picture(), GroundTruth(BOXES.clone(), LABELS.clone()))


@pytest.fixture(scope="module")
def stages(traced):
    return {s.key: s for s in build_stages(traced, threshold=0.2)}


def _reference_trace(net, with_gt: bool = True) -> Trace:
    """The same image through the model directly, with a fresh trace and the same seed."""
    cfg = config()
    p = prep_image(image_to_tensor(picture()), cfg.TEST.SCALES[0], cfg.TEST.MAX_SIZE, cfg.PIXEL_MEANS, cfg.PIXEL_STDS)
    batch, sizes = batch_images([p.tensor])
    trace = Trace()
    kwargs = {}
    if with_gt:
        kwargs = {"gt_boxes": [scale_boxes(BOXES, p.scale)], "gt_labels": [LABELS],
                  "generator": torch.Generator().manual_seed(cfg.RNG_SEED)}
    with torch.no_grad():
        net(batch, sizes, trace=trace, **kwargs)
    return trace


# ------------------------------------------------------------------------------------------ projection

def test_a_box_of_known_position_goes_to_the_network_input_and_back_exactly(traced):
    scale = 320 / 150
    assert traced.scale == pytest.approx(scale)
    assert torch.allclose(traced.gt_net, scale_boxes(BOXES, scale))
    assert torch.allclose(traced.to_original(traced.gt_net), BOXES, atol=1e-4)


def test_a_box_drawn_from_network_pixels_lines_up_with_the_object_on_the_canvas(traced):
    canvas = make_canvas(traced)
    f = int(canvas.factor)
    assert f == 3 and canvas.image.size == (200 * f, 150 * f)  # small images are enlarged by a whole factor
    box = canvas.from_net(traced.gt_net[:1])[0]
    x1, y1, x2, y2 = (40 * f, 30 * f, 80 * f - 1, 70 * f - 1)  # pixel x covers [x, x + 1): x2 ends at (79 + 1) f - 1
    assert box.tolist() == pytest.approx([x1, y1, x2, y2], abs=1e-3)
    px = np.asarray(draw_boxes(canvas.image, box.view(1, 4), [(0, 255, 0)], width=1))
    ymid, xmid = (y1 + y2) // 2, (x1 + x2) // 2
    for x, y in ((x1, ymid), (x2, ymid), (xmid, y1), (xmid, y2)):
        assert tuple(px[y, x]) == (0, 255, 0)  # the outline is on the object's edge pixels
    for x, y in ((x1 + 1, ymid), (x2 - 1, ymid), (xmid, y1 + 1), (xmid, y2 - 1)):
        assert tuple(px[y, x]) == RED  # just inside the outline: the object
    for x, y in ((x1 - 1, ymid), (x2 + 1, ymid), (xmid, y1 - 1), (xmid, y2 + 1)):
        assert tuple(px[y, x]) == GREY  # just outside: the background


def test_a_feature_cell_covers_its_stride_of_network_pixels_on_the_canvas(traced):
    canvas = make_canvas(traced)
    fh, fw = traced.trace["anchors"]["feat_size"]
    values = np.zeros((fh, fw))
    i, j = 3, 5
    values[i, j] = 1.0
    out = np.asarray(feature_overlay(canvas, values, 16, alpha=1.0))
    k = canvas.factor / canvas.scale  # canvas pixels per network pixel
    hot = tuple(charts.colormap(np.array([1.0]))[0])
    x0, x1, y0, y1 = 16 * j * k, 16 * (j + 1) * k, 16 * i * k, 16 * (i + 1) * k
    assert tuple(out[int(y0) + 1, int(x0) + 1]) == hot and tuple(out[int(y1) - 2, int(x1) - 2]) == hot
    assert tuple(out[int(y0) - 2, int(x0) + 1]) != hot and tuple(out[int(y0) + 1, int(x1) + 2]) != hot


# --------------------------------------------------------------------------- the numbers are the layers'

def test_explain_detections_are_the_predictors(net, traced):
    det = Predictor(net, config(), CLASSES).predict([picture()])[0]
    assert torch.allclose(det.boxes, traced.detections.boxes) and torch.equal(det.labels, traced.detections.labels)
    assert torch.allclose(det.scores, traced.detections.scores)


def test_proposal_counts_equal_the_proposal_layers(net, stages):
    ref = _reference_trace(net)
    cfg = config()
    n = stages["04_proposal_layer"].numbers
    assert n["proposals_after_nms"] == ref["proposal_layer"]["rois"].shape[0] <= cfg.TEST.RPN_POST_NMS_TOP_N
    assert n["boxes_before_nms"] == ref["proposal_layer"]["pre_nms_scores"].shape[1] == min(
        cfg.TEST.RPN_PRE_NMS_TOP_N, n["anchors"])
    assert n["anchors"] == ref["anchors"]["anchors"].shape[0]
    assert n["TEST.RPN_NMS_THRESH"] == cfg.TEST.RPN_NMS_THRESH


def test_anchor_target_counts_equal_the_layers_and_sum_to_the_inside_anchors(net, traced, stages):
    ref = _reference_trace(net)["anchor_target"]
    cfg = config()
    n = stages["05_targets"].numbers["anchor_target"]
    assert n == anchor_target_numbers(traced)
    assert n["inside_anchors"] == int(ref["inside"][0].sum())
    assert n["fg_sampled"] == int((ref["labels"][0] == 1).sum())
    assert n["bg_sampled"] == int((ref["labels"][0] == 0).sum())
    assert n["fg_sampled"] + n["bg_sampled"] + n["dont_care_after_sampling"] == n["inside_anchors"]
    assert n["fg_before_sampling"] + n["bg_before_sampling"] + n["dont_care_before_sampling"] == n["inside_anchors"]
    assert n["fg_type_a"] == int(ref["type_a"][0].sum()) and n["fg_type_b"] == int(ref["type_b"][0].sum())
    assert n["fg_type_a"] >= len(BOXES)  # every gt box has at least one best anchor
    assert n["fg_sampled"] <= cfg.TRAIN.RPN_FG_FRACTION * cfg.TRAIN.RPN_BATCHSIZE
    assert n["bg_before_sampling"] >= cfg.TRAIN.RPN_BATCHSIZE  # enough exist, so the batch is full:
    assert n["fg_sampled"] + n["bg_sampled"] == cfg.TRAIN.RPN_BATCHSIZE == n["TRAIN.RPN_BATCHSIZE"]
    # the default rule (the reference's): anchors crossing the border take no part, and the page says so
    assert n["TRAIN.RPN_ALLOWED_BORDER"] == 0 and n["inside_anchors"] < n["anchors"]
    assert "the anchor target layer labels every anchor lying inside the image:" in stages["05_targets"].text


def test_with_every_anchor_taking_part_the_counts_and_the_page_say_so():
    from dataclasses import replace

    cfg = config()
    cfg = replace(cfg, TRAIN=replace(cfg.TRAIN, RPN_ALLOWED_BORDER=-1))  # scratch-cpu's rule
    torch.manual_seed(0)
    net = FasterRCNN(cfg, num_classes=len(CLASSES), load_pretrained=False).eval()
    run = run_traced(net, cfg, CLASSES, picture(), GroundTruth(BOXES.clone(), LABELS.clone()), warmup=False)
    stage = {s.key: s for s in build_stages(run, threshold=0.2)}["05_targets"]
    n = stage.numbers["anchor_target"]
    assert n["TRAIN.RPN_ALLOWED_BORDER"] == -1 and n["inside_anchors"] == n["anchors"]
    assert "labels every anchor (TRAIN.RPN_ALLOWED_BORDER < 0: those crossing the image border too):" in stage.text


def test_with_soft_nms_the_class_nms_stage_says_so_and_shows_sigma():
    from dataclasses import replace

    cfg = config()
    cfg = replace(cfg, TEST=replace(cfg.TEST, NMS_METHOD="soft", SOFT_NMS_SIGMA=0.3))
    torch.manual_seed(0)
    net = FasterRCNN(cfg, num_classes=len(CLASSES), load_pretrained=False).eval()
    run = run_traced(net, cfg, CLASSES, picture(), GroundTruth(BOXES.clone(), LABELS.clone()), warmup=False)
    stage = {s.key: s for s in build_stages(run, threshold=0.2)}["08_class_nms"]
    assert stage.numbers["TEST.NMS_METHOD"] == "soft" and stage.numbers["TEST.SOFT_NMS_SIGMA"] == 0.3
    assert "TEST.NMS" not in stage.numbers  # unused by soft-NMS
    assert "Gaussian soft-NMS (TEST.NMS_METHOD soft)" in stage.text and "exp(-IoU^2 / 0.3)" in stage.text


def test_proposal_target_counts_equal_the_layers(net, traced, stages):
    ref = _reference_trace(net)["proposal_target"]
    cfg = config()
    n = stages["05_targets"].numbers["proposal_target"]
    assert n == proposal_target_numbers(traced)
    assert n["fg_rois"] == int((ref["labels"] > 0).sum()) >= len(BOXES)  # the gt boxes themselves are candidates
    assert n["fg_rois"] + n["bg_rois"] == ref["labels"].numel() == cfg.TRAIN.BATCH_SIZE
    assert n["fg_rois"] <= round(cfg.TRAIN.FG_FRACTION * cfg.TRAIN.BATCH_SIZE)


def test_detection_and_pooling_numbers_equal_the_layers(net, traced, stages):
    ref = _reference_trace(net, with_gt=False)
    cfg = config()
    nms = stages["08_class_nms"].numbers
    assert nms["detections_after_nms"] == len(ref["detections"]["final"][0]["scores"]) <= cfg.TEST.MAX_PER_IMAGE
    assert nms["boxes_before_nms"] == len(ref["detections"]["pre_nms"][0]["scores"])
    assert nms["TEST.NMS"] == cfg.TEST.NMS and nms["TEST.NMS_METHOD"] == "hard"
    assert "non-maximum suppression at IoU 0.3 (TEST.NMS)" in stages["08_class_nms"].text
    pool = stages["06_roi_pooling"].numbers
    assert pool["POOLING_MODE"] == cfg.POOLING_MODE and pool["POOLING_SIZE"] == cfg.POOLING_SIZE
    assert pool["pooled_shape"] == list(ref["roi_pooling"]["crops"].shape)
    assert stages["07_classification"].numbers["rois_classified"] == ref["classification"]["cls_prob"].shape[0]
    final = stages["09_detections"].numbers
    assert final["detections"] == int((traced.detections.scores >= 0.2).sum())
    assert final["true_positives"] + final["false_positives"] == final["detections"]
    assert set(stages["10_timing"].numbers["ms"]) >= {"preprocess", "head", "rpn", "proposal_layer", "anchor_target",
                                                      "proposal_target", "roi_pooling", "classification"}


def test_every_stage_has_a_picture_text_and_numbers_in_pipeline_order(stages):
    assert list(stages) == ["01_preprocess", "02_anchors", "03_rpn", "04_proposal_layer", "05_targets",
                            "06_roi_pooling", "07_classification", "08_class_nms", "09_detections", "10_timing"]
    for s in stages.values():
        assert s.image is not None and s.image.width > 100 and s.image.height > 50
        assert s.text.count(".") >= 2 and s.numbers


def test_voc_matching_marks_true_positives_duplicates_and_misses():
    gt, gl = torch.tensor([[0.0, 0, 9, 9], [20, 20, 29, 29]]), torch.tensor([1, 2])
    boxes = torch.tensor([[0.0, 0, 9, 9], [1, 0, 9, 9], [20, 20, 29, 29]])
    tp, matched = match_detections(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.tensor([1, 1, 1]), gt, gl)
    assert tp.tolist() == [True, False, False]  # a duplicate, and a box of the wrong class
    assert matched.tolist() == [True, False]


# --------------------------------------------------------------------------------- page, JSON, command line

def test_explain_without_ground_truth_leaves_out_the_target_stage(net, tmp_path):
    image = tmp_path / "plain.png"
    picture().save(image)
    index = explain_image(net, config(), CLASSES, image, tmp_path / "out", write_json=True)
    data = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert "05_targets" not in data["stages"] and len(data["stages"]) == 9
    assert "05_targets.png" not in index.read_text()


def test_cli_explain_writes_a_self_contained_page_and_the_json_of_the_layers(tmp_path, capsys):
    image = voc_folder(tmp_path / "voc")  # the annotation is found beside the image
    ckpt = checkpoint(tmp_path / "ckpt")
    out = tmp_path / "explain"
    assert main(["explain", "--checkpoint", str(ckpt), str(image), "--out", str(out), "--json",
                 "--threshold", "0.2"]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    page = (out / "index.html").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == 10 and re.findall(r"src='([^']+)'", page) == pngs
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", page)  # nothing fetched from anywhere
    data = json.loads((out / "explain.json").read_text())
    at = data["stages"]["05_targets"]["anchor_target"]
    assert at["fg_sampled"] + at["bg_sampled"] + at["dont_care_after_sampling"] == at["inside_anchors"]
    assert data["stages"]["04_proposal_layer"]["proposals_after_nms"] <= config().TEST.RPN_POST_NMS_TOP_N


def test_cli_explain_refuses_a_non_empty_out_and_bad_inputs_in_one_line(tmp_path, capsys):
    image = voc_folder(tmp_path / "voc")
    ckpt = checkpoint(tmp_path / "ckpt")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    cases = [
        ["--out", str(taken)],
        ["--out", str(tmp_path / "o1"), "--gt", str(tmp_path / "missing.xml")],
        ["--out", str(tmp_path / "o2"), "--threshold", "2"],
    ]
    for extra in cases:
        assert main(["explain", "--checkpoint", str(ckpt), str(image), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("frcnn explain: error:") and err.count("\n") == 1
    assert main(["explain", "--checkpoint", str(ckpt), str(tmp_path / "nope.png"), "--out", str(tmp_path / "o3")]) == 2
    assert (taken / "mine.txt").read_text() == "keep me" and sorted(p.name for p in taken.iterdir()) == ["mine.txt"]


def test_ground_truth_is_read_as_training_reads_it(tmp_path):
    """explain --gt: a box crossing the image is clipped and a 1-pixel box dropped, as training's reader does
    (frcnn.data.open_repaired); an inverted box is one DataError line."""
    from frcnn.data import open_repaired
    from frcnn.data.voc import write_voc_xml
    from frcnn.errors import DataError
    from frcnn.explain.run import read_ground_truth

    image_path = voc_folder(tmp_path)
    xml = tmp_path / "Annotations" / "known.xml"
    w, h = picture().size
    # 0-based inclusive boxes (write_voc_xml adds VOC's 1): one crossing the right edge, one pixel, one inside
    write_voc_xml(xml, "known.png", w, h, [("square", [120, 61, w + 15, 130]), ("circle", [5, 5, 5, 5]),
                                           ("circle", [41, 31, 80, 70])])
    gt = read_ground_truth(xml, image_path, picture(), CLASSES)
    data = open_repaired(tmp_path, "test", CLASSES, drop_other_classes=False, progress=False)
    assert torch.equal(gt.boxes, data[0].boxes) and torch.equal(gt.labels, data[0].labels)
    assert gt.boxes.tolist() == [[120.0, 61.0, w - 1.0, 130.0], [41.0, 31.0, 80.0, 70.0]]  # by hand
    write_voc_xml(xml, "known.png", w, h, [("circle", [50, 31, 41, 70])])
    with pytest.raises(DataError, match="box 1 .* is inverted"):
        read_ground_truth(xml, image_path, picture(), CLASSES)


def test_rpn_stage_names_the_dilation_of_its_conv():
    cfg = load_config("demo-cpu", ["DEVICE=cpu", "RPN_DILATION=2"])
    torch.manual_seed(0)
    net2 = FasterRCNN(cfg, num_classes=len(CLASSES), load_pretrained=False).eval()
    run = run_traced(net2, cfg, CLASSES, picture(), GroundTruth(BOXES.clone(), LABELS.clone()))
    text = {s.key: s for s in build_stages(run, threshold=0.2)}["03_rpn"].text
    assert text.startswith("The region proposal network runs a 3x3 convolution of dilation 2 (its taps 2 cells "
                           "apart) (rpn_net)")
