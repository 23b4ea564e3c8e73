"""``frcnn export`` and the onnxruntime engine: one exported file (dynamic image size) gives PyTorch's detections
at two image sizes (same count, labels equal, boxes within 0.01 px, scores within 1e-4) on the demo-cpu model,
in every pooling mode, on its NECK=fpn variant (every pyramid level used, and levels left empty) in every pooling
mode, and on a small R50-C4 input; the CLI's --engine flag; one-line errors for bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import onnx  # the onnx extra, part of the test extra: CI runs these tests, never skips them
import pytest
import torch
from PIL import Image, ImageDraw
from test_cli import _error_line

from frcnn.cli import main
from frcnn.config import load_config, merge
from frcnn.data.synthetic import CLASSES, make_shapes_dataset
from frcnn.engine.checkpoint import save_checkpoint
from frcnn.engine.export import export_model
from frcnn.engine.fast import prepare_for_inference
from frcnn.engine.inference import Predictor
from frcnn.engine.onnx_engine import OnnxPredictor
from frcnn.model.detector import Detections, FasterRCNN
from frcnn.model.pooling import pool_rois, roi_levels
from frcnn.model.trace import Trace

# two pictures of different sizes: through TEST.SCALES they become network inputs of two different sizes
SIZES = [(150, 200), (260, 210)]  # (h, w)


def _picture(h: int, w: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(90, 150, (h, w, 3), generator=g, dtype=torch.uint8)
    image = Image.fromarray(noise.numpy())
    d = ImageDraw.Draw(image)
    d.rectangle([w // 5, h // 5, w // 2, h // 2], fill=(220, 30, 30))
    d.ellipse([w // 2, h // 3, w - 10, h - 10], fill=(30, 60, 220))
    return image


PICTURES = [_picture(h, w, i) for i, (h, w) in enumerate(SIZES)]


def _calibrate(layer: torch.nn.Module, inputs: list[torch.Tensor], std: float, g: torch.Generator) -> None:
    """Random weights for ``layer`` (a Linear or a 1x1 Conv2d) whose outputs on ``inputs`` (what it saw: one
    tensor, or one per pyramid level) spread by about ``std`` around zero, whatever the scale of the inputs
    (random backbones differ by 1e5 in scale)."""
    x = torch.cat([t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) if t.dim() == 4 else t for t in inputs])
    centre, spread = x.mean(0), (x - x.mean(0)).std().clamp(min=1e-12)
    weight = torch.randn(layer.weight.shape[0], x.shape[1], generator=g) * std / (spread * x.shape[1] ** 0.5)
    layer.weight.copy_(weight.view(layer.weight.shape))
    layer.bias.copy_(-weight @ centre)


@torch.no_grad()
def _deterministic(model: FasterRCNN, seed: int = 0, cls_std: float = 3.0, box_std: float = 0.5) -> FasterRCNN:
    """Weights that behave like a trained model's for this test, set from one calibration picture: objectness
    logits spread by 1.5 (well-separated proposal scores, no saturated ties; the RPN's box deltas zero, as
    benchmark's random_rpn), class logits by ``cls_std`` (a few confident detections) and box deltas by
    ``box_std`` (the boxes move)."""
    g = torch.Generator().manual_seed(seed)
    model.eval()
    rpn, classifier = model.rpn, model.classifier
    seen: list[torch.Tensor] = []
    picture = _picture(200, 260, 99)
    for layer, std in ((rpn.rpn_cls_score_net, 1.5), (classifier.cls_score_net, cls_std),
                       (classifier.bbox_pred_net, box_std)):
        hook = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        Predictor(model, model.cfg, CLASSES).predict([picture])
        hook.remove()
        _calibrate(layer, seen, std, g)
        seen.clear()
        if layer is rpn.rpn_cls_score_net:
            rpn.rpn_bbox_pred_net.weight.zero_()
            rpn.rpn_bbox_pred_net.bias.zero_()
    return model


def _demo_model(mode: str = "align", *sets: str) -> tuple[FasterRCNN, object]:
    cfg = load_config("demo-cpu", ["DEVICE=cpu", f"POOLING_MODE={mode}", "TEST.RPN_POST_NMS_TOP_N=60", *sets])
    torch.manual_seed(0)
    return _deterministic(FasterRCNN(cfg, len(CLASSES), load_pretrained=False)), cfg


def assert_same_detections(a: Detections, b: Detections) -> tuple[float, float]:
    """Same count, and each detection of ``a`` has its own in ``b``: label equal, box within 0.01 px, score
    within 1e-4. (Matched, not compared in order: detections of exactly equal score, e.g. saturated at 1.0,
    come in an unspecified order from PyTorch's sort.) Returns the largest box and score differences."""
    assert len(a.scores) == len(b.scores)
    assert a.boxes.dtype == b.boxes.dtype == a.scores.dtype == b.scores.dtype == torch.float32
    free, worst = torch.ones(len(b.scores), dtype=torch.bool), (0.0, 0.0)
    for box, score, label in zip(a.boxes, a.scores, a.labels):
        fits = free & (b.labels == label) & ((b.boxes - box).abs().amax(1) <= 0.01) & ((b.scores - score).abs() <= 1e-4)
        assert fits.any(), f"no match for {label.item()} {score.item()} {box.tolist()}"
        j = fits.nonzero()[0, 0]
        free[j] = False
        worst = (max(worst[0], (b.boxes[j] - box).abs().max().item()), max(worst[1], abs(b.scores[j] - score).item()))
    return worst


def _parity(torch_predictor, onnx_predictor, pictures=PICTURES, confident: int = 3) -> list[int]:
    counts = []
    for picture in pictures:
        ours, theirs = torch_predictor.predict([picture])[0], onnx_predictor.predict([picture])[0]
        box_diff, score_diff = assert_same_detections(ours, theirs)
        counts.append(int((ours.scores > 0.5).sum()))
        print(f"parity {onnx_predictor.cfg.BACKBONE} NECK={onnx_predictor.cfg.NECK} {onnx_predictor.cfg.POOLING_MODE} "
              f"{picture.size}: "
              f"{len(ours.scores)} detections ({counts[-1]} above 0.5), boxes within {box_diff:.2e} px, "
              f"scores within {score_diff:.2e}")  # pytest -s shows the figures
    assert max(counts) >= confident, counts  # a few confident detections, not only near-zero scores
    return counts


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model, cfg = _demo_model()
    return save_checkpoint_folder(tmp_path_factory.mktemp("ckpt") / "model", model, cfg)


def save_checkpoint_folder(folder: Path, model: FasterRCNN, cfg) -> Path:
    save_checkpoint(folder, model, cfg, CLASSES, iteration=0)
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint) -> Path:
    out = checkpoint / "model.onnx"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------------------ parity

def test_demo_cpu_onnxruntime_equals_pytorch_at_two_sizes_through_one_file(checkpoint, exported):
    onnx_predictor = OnnxPredictor(exported)
    assert onnx_predictor.class_names == CLASSES
    sizes = {tuple(onnx_predictor.prepare(p).size) for p in PICTURES}
    assert len(sizes) == 2  # two different network-input sizes, one file
    _parity(Predictor.from_checkpoint(checkpoint, "cpu"), onnx_predictor)  # the fast path, as the CLI runs it
    _parity(Predictor.from_checkpoint(checkpoint, "cpu", fast=False), onnx_predictor)


def test_the_file_is_self_contained_with_a_dynamic_size(exported):
    proto = onnx.load(str(exported))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["frcnn.format"] == "frcnn-onnx" and json.loads(meta["frcnn.classes"]) == list(CLASSES)
    assert "POOLING_MODE: align" in meta["frcnn.config"]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1 and dims[1].dim_value == 3 and dims[2].dim_param and dims[3].dim_param
    ops = [n.op_type for n in proto.graph.node]
    assert {"NonMaxSuppression", "RoiAlign", "TopK"} <= set(ops)  # proposal layer, pooling and NMS are in the graph
    assert ops.count("NonMaxSuppression") == 2  # the proposal layer's, and one for every class at once


def test_class_nms_is_per_class_nms():
    """The custom op behind the graph's per-class NMS, run by PyTorch: torchvision's batched_nms, class by class."""
    from torchvision.ops import batched_nms

    from frcnn.engine.export import class_nms

    g = torch.Generator().manual_seed(0)
    k, r = 4, 50
    corner = torch.rand(k, r, 2, generator=g) * 100
    boxes = torch.cat((corner, corner + 5 + torch.rand(k, r, 2, generator=g) * 40), dim=-1)
    scores = torch.rand(k, r, generator=g)
    scores[1] = 0.0  # a class with no box above the threshold
    kept = class_nms(boxes, scores, 0.5, 0.05)
    assert kept.shape[1] == 2 and kept.dtype == torch.long
    live = scores > 0.05
    cls = torch.arange(k)[:, None].expand(k, r)
    ref = batched_nms(boxes[live], scores[live], cls[live], 0.5)
    expected = {(int(c), int(i)) for c, i in zip(cls[live][ref], live.nonzero()[ref][:, 1])}
    assert {(int(c), int(i)) for c, i in kept} == expected and 1 not in kept[:, 0].tolist()
    assert class_nms(boxes[:, :0], scores[:, :0], 0.5, 0.0).shape == (0, 2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["crop", "pool"])
def test_every_pooling_mode_exports_with_parity(mode, tmp_path):
    model, cfg = _demo_model(mode)
    path = export_model(model, cfg, CLASSES, tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("GridSample" if mode == "crop" else "MaxRoiPool") in ops
    _parity(Predictor(prepare_for_inference(model), cfg, CLASSES), OnnxPredictor(path))


def test_a_dilated_backbone_and_rpn_export_with_parity(tmp_path):
    model, cfg = _demo_model("align", "DILATED=true", "RPN_DILATION=3")
    path = export_model(model, cfg, CLASSES, tmp_path / "m.onnx")
    dilations = [a.ints for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"
                 for a in n.attribute if a.name == "dilations"]
    assert [2, 2] in dilations and [3, 3] in dilations  # the last conv's and the RPN's, written into the graph
    _parity(Predictor(prepare_for_inference(model), cfg, CLASSES), OnnxPredictor(path))


def test_the_graph_pools_what_the_model_pools_after_before_pooling():
    """The export graph runs the classifier's ``before_pooling`` on the map, as the model does (the fast path
    fills it for align pooling of a ResNet C4 tail)."""
    from frcnn.engine.export import DetectorGraph

    model, cfg = _demo_model("align")
    c = model.classifier.tail[1].in_features // cfg.POOLING_SIZE**2  # the pooled channels
    torch.manual_seed(1)
    model.classifier.before_pooling = torch.nn.Conv2d(c, c, 1)
    features, proposals = torch.randn(1, c, 20, 30), torch.tensor([[0.0, 0, 100, 80], [40, 30, 300, 200]])
    with torch.no_grad():
        got = DetectorGraph(model).pool(features, proposals, cfg.FEAT_STRIDE)
        rois = torch.cat((torch.zeros(2, 1), proposals), 1)
        mapped = model.classifier.before_pooling(features)
        expected = pool_rois(mapped, rois, "align", cfg.POOLING_SIZE, cfg.FEAT_STRIDE)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_no_detection_above_the_threshold_is_an_empty_result(tmp_path):
    model, cfg = _demo_model()
    cfg = merge(cfg, {"TEST": {"SCORE_THRESH": 0.9999}})
    model.cfg = cfg
    path = export_model(model, cfg, CLASSES, tmp_path / "m.onnx")
    ours, theirs = Predictor(model, cfg, CLASSES).predict(PICTURES), OnnxPredictor(path).predict(PICTURES)
    for a, b in zip(ours, theirs):
        assert len(a.scores) == len(b.scores) == 0 and b.boxes.shape == (0, 4) and b.labels.shape == (0,)


def test_a_soft_nms_checkpoint_exports_greedy_nms_and_says_so(tmp_path, capsys):
    """ONNX has no soft-NMS: the graph keeps greedy NMS at TEST.NMS, the file's config says hard, and the
    detections are those of the PyTorch model with TEST.NMS_METHOD=hard."""
    model, cfg = _demo_model()
    soft = merge(cfg, {"TEST": {"NMS_METHOD": "soft"}})
    model.cfg = soft
    path = export_model(model, soft, CLASSES, tmp_path / "m.onnx")
    assert "ONNX has no soft-NMS: the graph suppresses greedily at TEST.NMS=0.3" in capsys.readouterr().out
    assert model.cfg is soft  # the caller's model is not changed
    onnx_predictor = OnnxPredictor(path)
    assert onnx_predictor.cfg.TEST.NMS_METHOD == "hard"
    model.cfg = merge(cfg, {"TEST": {"NMS_METHOD": "hard"}})
    assert _parity(Predictor(model, model.cfg, CLASSES), onnx_predictor)


@pytest.mark.slow
def test_r50_c4_small_input_parity(tmp_path):
    """Crop pooling (the preset's), 80 RoIs of 1024 channels: the PyTorch path pools by frcnn.ops.roi_ops'
    gathers there (above pooling.MIN_ROI_CHANNELS), the graph by GridSample."""
    cfg = load_config("voc-r50-c4", ["DEVICE=cpu", "TEST.SCALES=[160]", "TEST.MAX_SIZE=256",
                                     "TEST.RPN_PRE_NMS_TOP_N=600", "TEST.RPN_POST_NMS_TOP_N=80"])
    torch.manual_seed(0)
    model = _deterministic(FasterRCNN(merge(cfg, {"PRETRAINED": ""}), len(CLASSES), load_pretrained=False))
    path = export_model(model, cfg, CLASSES, tmp_path / "r50.onnx", example_size=(160, 224))
    pictures = [_picture(160, 224, 0), _picture(200, 150, 1)]  # network inputs 160x224 and 213x160
    _parity(Predictor(prepare_for_inference(model), cfg, CLASSES), OnnxPredictor(path), pictures)


# ------------------------------------------------------------------------------------------- the pyramid

FPN = ["NECK=fpn", "FEAT_STRIDE=16", "ANCHOR_SCALES=[8]", "FPN_CHANNELS=32"]  # the tiny backbone's P2..P5
LEVELS, POOLED = 4, 3  # the RPN reads P2..P5 (strides 4..32), RoIs are pooled from P2..P4


def _fpn_model(mode: str, *sets: str) -> tuple[FasterRCNN, object]:
    cfg = load_config("demo-cpu", [*FPN, "DEVICE=cpu", f"POOLING_MODE={mode}", *sets])
    torch.manual_seed(0)
    return _deterministic(FasterRCNN(cfg, len(CLASSES), load_pretrained=False)), cfg


def _pyramid_use(model: FasterRCNN, cfg, picture) -> tuple[list[int], list[int], int]:
    """What PyTorch's own run of ``picture`` did on the pyramid (its trace): the proposals kept from each RPN level,
    the RoIs pooled from each pooled level (the model's roi_levels) and the boxes that went into the RPN's NMS."""
    trace = Trace()
    Predictor(model, cfg, CLASSES).predict([picture], trace=trace)
    proposals = torch.bincount(trace["proposal_layer"]["roi_levels"], minlength=LEVELS).tolist()
    pooled = torch.bincount(roi_levels(trace["roi_pooling"]["rois"], 2, 4) - 2, minlength=POOLED).tolist()
    return proposals, pooled, trace["proposal_layer"]["pre_nms_boxes"].shape[1]


def _pyramid_ops(path: Path, mode: str) -> list[str]:
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("NonMaxSuppression") == LEVELS + 1  # NMS within each level, and the per-class NMS
    pooling = {"align": "RoiAlign", "pool": "MaxRoiPool", "crop": "GridSample"}[mode]
    assert ops.count(pooling) == POOLED  # each pooled level's RoIs from its own map
    return ops


@pytest.mark.parametrize("mode", ["align", pytest.param("crop", marks=pytest.mark.slow),
                                  pytest.param("pool", marks=pytest.mark.slow)])
def test_fpn_onnxruntime_equals_pytorch_at_two_sizes_through_one_file(mode, tmp_path):
    """NECK=fpn with the top 60 of each level: every RPN level keeps proposals, the best 100 over all levels are
    fewer than NMS left, and every pooled level gets RoIs (PyTorch's trace says so), at two sizes."""
    model, cfg = _fpn_model(mode, "TEST.RPN_PRE_NMS_TOP_N=60", "TEST.RPN_POST_NMS_TOP_N=100")
    for picture in PICTURES:
        proposals, pooled, boxes = _pyramid_use(model, cfg, picture)
        assert min(proposals) > 0 and min(pooled) > 0 and sum(proposals) == 100, (proposals, pooled)
        assert boxes <= 1000  # PyTorch's batched_nms: one NMS of boxes shifted apart per level
    path = export_model(model, cfg, CLASSES, tmp_path / "fpn.onnx")
    _pyramid_ops(path, mode)
    onnx_predictor = OnnxPredictor(path)
    assert len({tuple(onnx_predictor.prepare(p).size) for p in PICTURES}) == 2  # two network-input sizes, one file
    _parity(Predictor(prepare_for_inference(model), cfg, CLASSES), onnx_predictor)
    _parity(Predictor(model, cfg, CLASSES), onnx_predictor)


def test_fpn_export_with_empty_pooled_levels_and_thousands_of_proposals(tmp_path):
    """The top 1000 of each level (the preset's): thousands of boxes go into the RPN's NMS (PyTorch's batched_nms
    then runs one NMS per level), the best 60 all come from one level and two pooled levels get no RoI."""
    model, cfg = _fpn_model("align", "TEST.RPN_POST_NMS_TOP_N=60")
    for picture in PICTURES:
        proposals, pooled, boxes = _pyramid_use(model, cfg, picture)
        assert boxes > 1000 and pooled.count(0) == 2, (proposals, pooled, boxes)
    path = export_model(model, cfg, CLASSES, tmp_path / "fpn.onnx")
    _pyramid_ops(path, "align")
    _parity(Predictor(prepare_for_inference(model), cfg, CLASSES), OnnxPredictor(path))


# ----------------------------------------------------------------------------------------------- the CLI

def test_detect_with_onnxruntime_writes_what_torch_writes(checkpoint, exported, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i, p in enumerate(PICTURES):
        p.save(images / f"p{i}.png")
    for engine, where in (("torch", checkpoint), ("onnxruntime", checkpoint)):  # a folder holding model.onnx
        assert main(["detect", "--checkpoint", str(where), str(images), "--out", str(tmp_path / engine),
                     "--engine", engine, "--threshold", "0.3"]) == 0
    for i in range(len(PICTURES)):
        a = json.loads((tmp_path / "torch" / f"p{i}.json").read_text())["detections"]
        b = json.loads((tmp_path / "onnxruntime" / f"p{i}.json").read_text())["detections"]
        assert [d["class"] for d in a] == [d["class"] for d in b]
        for x, y in zip(a, b):
            assert max(abs(u - v) for u, v in zip(x["box"], y["box"])) <= 0.011
            assert abs(x["score"] - y["score"]) <= 1e-4 + 1e-5


def test_eval_with_onnxruntime_scores_what_torch_scores(checkpoint, exported, tmp_path, capsys):
    voc = tmp_path / "voc"
    make_shapes_dataset(voc, num_trainval=1, num_test=3, image_size=(128, 160), seed=2)
    results = {}
    for engine, where in (("torch", checkpoint), ("onnxruntime", exported)):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(where), "--data", str(voc), "--split", "test", "--json",
                     "--no-progress", "--engine", engine]) == 0
        results[engine] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["torch"]["map"] == pytest.approx(results["onnxruntime"]["map"], abs=1e-6)
    assert results["torch"]["per_class"] == pytest.approx(results["onnxruntime"]["per_class"], abs=1e-6)


def test_benchmark_with_onnxruntime(exported, capsys):
    assert main(["benchmark", "--config", str(exported), "--engine", "onnxruntime", "--size", "160x224",
                 "--runs", "1", "--warmup", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["engine"] == "onnxruntime" and result["size"] == [160, 224]
    assert result["total_ms"] > 0 and set(result["stages_ms"]) == {"preprocess", "graph"}
    assert main(["benchmark", "--config", str(exported), "--engine", "onnxruntime", "--rois", "10"]) == 2
    assert "--rois" in _error_line(capsys)


# --------------------------------------------------------------------------------------------- bad input

def test_export_of_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(out)]) == 2
    assert "not a frcnn checkpoint" in _error_line(capsys)
    assert not out.exists()


def test_export_never_overwrites(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"mine")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 2
    assert "exists" in _error_line(capsys)
    assert out.read_bytes() == b"mine"


def _foreign_onnx(path: Path) -> Path:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_an_onnx_file_that_is_not_frcnns(tmp_path, capsys):
    path = _foreign_onnx(tmp_path / "foreign.onnx")
    image = tmp_path / "p.png"
    PICTURES[0].save(image)
    out = tmp_path / "out"
    assert main(["detect", "--checkpoint", str(path), str(image), "--out", str(out), "--engine", "onnxruntime"]) == 2
    assert "not one frcnn exported" in _error_line(capsys)
    assert not out.exists()
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not onnx at all" * 10)
    assert main(["detect", "--checkpoint", str(garbage), str(image), "--out", str(out), "--engine",
                 "onnxruntime"]) == 2
    assert "cannot load it as an ONNX model" in _error_line(capsys)
    assert main(["detect", "--checkpoint", str(tmp_path), str(image), "--out", str(out), "--engine",
                 "onnxruntime"]) == 2
    assert "no model.onnx in this folder" in _error_line(capsys)


def test_an_onnx_file_of_another_format_version(exported, tmp_path, capsys):
    proto = onnx.load(str(exported))
    for p in proto.metadata_props:
        if p.key == "frcnn.onnx_format":
            p.value = "0"
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    assert main(["benchmark", "--config", str(old), "--engine", "onnxruntime", "--runs", "1"]) == 2
    assert "export it again" in _error_line(capsys)


def test_onnxruntime_not_installed(checkpoint, exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    image = tmp_path / "p.png"
    PICTURES[0].save(image)
    assert main(["detect", "--checkpoint", str(exported), str(image), "--out", str(tmp_path / "o"),
                 "--engine", "onnxruntime"]) == 2
    line = _error_line(capsys)
    assert "onnxruntime" in line and "frcnn[onnx]" in line
    assert not (tmp_path / "o").exists()
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "frcnn[onnx]" in _error_line(capsys)
    assert not (tmp_path / "m.onnx").exists()


def test_onnxruntime_runs_on_the_cpu_only(exported, tmp_path, capsys):
    image = tmp_path / "p.png"
    PICTURES[0].save(image)
    with pytest.raises(Exception, match="runs on the CPU"):
        OnnxPredictor.open(exported, "cuda")
