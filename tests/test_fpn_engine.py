"""The tool around an FPN model (NECK=fpn, GitHub issue 12): train, resume, eval, detect and the fast path; checkpoints
of the other NECK refused in one line; export and onnxruntime; benchmark; the anchor fit of the pyramid's anchors.

Known answers come from outside the code under test: an uninterrupted run (resume), the model as trained (fast path),
shapes the pyramid's strides dictate (benchmark), every anchor of every level searched with box_iou (anchor fit),
--engine torch's detections and mAP (export)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import test_cli
import torch
from PIL import Image
from safetensors.torch import load_file
from test_fast import _randomise_statistics
from torch import nn

from frcnn.boxes import box_iou
from frcnn.cli import main
from frcnn.config import load_config, pyramid_strides
from frcnn.data.anchor_fit import anchor_fit, format_fit
from frcnn.data.sample import Sample
from frcnn.data.synthetic import make_shapes_dataset
from frcnn.engine.benchmark import _layer_inputs, random_rpn
from frcnn.engine.checkpoint import load_weights, read_checkpoint
from frcnn.engine.fast import prepare_for_inference
from frcnn.engine.inference import Predictor
from frcnn.errors import CheckpointError, ConfigError
from frcnn.model.anchors import level_anchors, shift_anchors
from frcnn.model.detector import FasterRCNN
from frcnn.model.trace import Trace

FPN = ["NECK=fpn", "FEAT_STRIDE=16", "ANCHOR_SCALES=[8]", "FPN_CHANNELS=32"]
SETS = [a for s in FPN for a in ("--set", s)]
TINY = test_cli.TINY  # demo-cpu at 128 px, 4 iterations, a snapshot every 2
CLASSES = ["circle", "square", "star", "triangle"]
voc, _error_line = test_cli.voc, test_cli._error_line  # the tiny synthetic VOC set; stderr is one line


def _train(voc: Path, out: Path, *args: str) -> None:
    assert main(["train", "--data", str(voc), "--split", "trainval", "--out", str(out), "--no-progress",
                 *args]) == 0


@pytest.fixture(scope="module")
def fpn_run(voc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fpn") / "run"
    _train(voc, out, *TINY, *SETS, "--set", "TRAIN.MAX_ITERS=4")
    return out


@pytest.fixture(scope="module")
def c4_run(voc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c4") / "run"
    _train(voc, out, *TINY, "--set", "TRAIN.MAX_ITERS=2")
    return out


# ------------------------------------------------------------------------------ train, resume, eval, detect


def test_fpn_train_then_resume_equals_the_uninterrupted_run_and_eval_and_detect_run_it(fpn_run, voc, tmp_path,
                                                                                         capsys):
    part = tmp_path / "part"
    _train(voc, part, *TINY, *SETS, "--set", "TRAIN.MAX_ITERS=2")
    _train(voc, part, "--resume", "--set", "TRAIN.MAX_ITERS=4")  # the run's own config.yaml, then --set
    full, resumed = load_file(str(fpn_run / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert any(k.startswith("head.fpn.lateral.") for k in full)  # the pyramid was trained and saved
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    ckpt = read_checkpoint(part)
    assert ckpt.cfg.NECK == "fpn" and ckpt.iteration == 4
    log = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 4]

    capsys.readouterr()
    for fast in ([], ["--no-fast"]):
        assert main(["eval", "--checkpoint", str(part), "--data", str(voc), "--split", "test", "--json",
                     *fast]) == 0
        result = json.loads(capsys.readouterr().out.strip())
        assert result["metric"] == "voc07" and 0.0 <= result["map"] <= 1.0
        assert set(result["per_class"]) == set(CLASSES)
    images = sorted((voc / "JPEGImages").glob("*.jpg"))[:2]
    assert main(["detect", "--checkpoint", str(part), *map(str, images), "--out", str(tmp_path / "det"),
                 "--threshold", "0"]) == 0
    for image in images:
        record = json.loads((tmp_path / "det" / f"{image.stem}.json").read_text())
        assert record["width"] == 128 and record["detections"]  # threshold 0: an FPN model detects something
        for det in record["detections"]:
            x1, y1, x2, y2 = det["box"]
            assert det["class"] in CLASSES and 0 <= x1 <= x2 <= 127 and 0 <= y1 <= y2 <= 127


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_fast_path_of_an_fpn_model_computes_what_the_model_as_trained_computes(channels_last):
    """BatchNorm folded (and channels-last): every pyramid level, the proposals, each RoI's class probabilities and
    boxes and the best detections equal the unfolded model's (float rounding apart)."""
    cfg = load_config("demo-cpu", [*FPN, "DEVICE=cpu", "TEST.SCALES=[160]", "TEST.MAX_SIZE=240"])
    torch.manual_seed(0)
    net = FasterRCNN(cfg, 3, load_pretrained=False).eval()
    _randomise_statistics(net)
    folded = prepare_for_inference(net, channels_last)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # the model as trained is left alone
    g = torch.Generator().manual_seed(1)
    image = Image.fromarray(torch.randint(0, 256, (150, 200, 3), generator=g, dtype=torch.uint8).numpy())
    a, b = Trace(), Trace()
    slow = Predictor(net, cfg, ("a", "b", "c")).predict([image], trace=a)[0]
    fast = Predictor(folded, cfg, ("a", "b", "c")).predict([image], trace=b)[0]
    levels_a, levels_b = a["head"]["levels"], b["head"]["levels"]
    assert len(levels_a) == len(levels_b) == len(pyramid_strides(cfg)) == 4
    for x, y in zip(levels_a, levels_b):
        torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b["roi_pooling"]["rois"], a["roi_pooling"]["rois"], atol=1e-3, rtol=0)
    torch.testing.assert_close(b["classification"]["cls_prob"], a["classification"]["cls_prob"], atol=1e-5, rtol=0)
    torch.testing.assert_close(b["classification"]["boxes"], a["classification"]["boxes"], atol=1e-2, rtol=0)
    assert slow.scores.numel() > 0
    best_slow, best_fast = slow.scores.argsort(descending=True)[:5], fast.scores.argsort(descending=True)[:5]
    assert torch.equal(slow.labels[best_slow], fast.labels[best_fast])
    torch.testing.assert_close(fast.boxes[best_fast], slow.boxes[best_slow], atol=1e-2, rtol=0)


@pytest.mark.slow
def test_two_fpn_processes_train_the_weights_of_one_with_twice_the_images_and_bf16_trains(tmp_path):
    """test_distributed's promise for NECK=fpn (2 gloo processes x 1 image = 1 process x 2 images), and a bf16 run."""
    import test_distributed as td

    voc = tmp_path / "voc"
    make_shapes_dataset(voc, num_trainval=6, num_test=2, image_size=(128, 128), seed=1)
    same = ("TRAIN.MAX_ITERS=4", "MEMORY_FORMAT=contiguous")  # why contiguous: test_distributed's docstring
    td._train(voc, tmp_path / "one", 1, *FPN, "TRAIN.IMS_PER_BATCH=2", *same)
    td._train(voc, tmp_path / "two", 2, *FPN, "TRAIN.IMS_PER_BATCH=1", *same)
    td._train(voc, tmp_path / "half", 1, *FPN, "TRAIN.IMS_PER_BATCH=1", *same)
    one, two, half = (td._weights(tmp_path / r) for r in ("one", "two", "half"))
    diff = td._max_diff(one, two)
    assert diff < 2e-5, diff  # measured 1.8e-7
    assert td._max_diff(one, half) > 100 * max(diff, 1e-6)
    td._train(voc, tmp_path / "bf16", 1, *FPN, "TRAIN.AMP=bf16", "TRAIN.MAX_ITERS=2")
    bf16 = td._weights(tmp_path / "bf16")
    assert all(bool(torch.isfinite(v).all()) for v in bf16.values() if v.is_floating_point())
    assert read_checkpoint(tmp_path / "bf16").cfg.TRAIN.AMP == "bf16"


# ------------------------------------------------------------------------------ checkpoints of the other NECK


def test_resuming_a_c4_run_as_fpn_and_an_fpn_run_as_c4_is_one_line(c4_run, fpn_run, voc, tmp_path, capsys):
    cases = [(c4_run, SETS, "none", "fpn"), (fpn_run, ["--set", "NECK=none"], "fpn", "none")]
    for i, (run, sets, file_neck, model_neck) in enumerate(cases):
        copy = shutil.copytree(run, tmp_path / f"run{i}")
        before = (copy / "model.safetensors").read_bytes()
        capsys.readouterr()
        code = main(["train", "--data", str(voc), "--split", "trainval", "--out", str(copy), "--resume",
                     "--no-progress", *sets, "--set", "TRAIN.MAX_ITERS=6"])
        line = _error_line(capsys)
        assert code == 2
        assert line.startswith("frcnn train: error: ") and "model.safetensors: does not fit" in line, line
        assert f"the weights are a NECK={file_neck} model's" in line and f"the model is NECK={model_neck}" in line
        assert (copy / "model.safetensors").read_bytes() == before


def test_fpn_weights_into_a_c4_model_and_the_reverse_are_one_checkpoint_error():
    c4 = FasterRCNN(load_config("demo-cpu"), 4, load_pretrained=False)
    fpn = FasterRCNN(load_config("demo-cpu", FPN), 4, load_pretrained=False)
    for model, weights, says in [(c4, fpn.state_dict(), "NECK=fpn model's (a feature pyramid), the model is NECK=none"),
                                 (fpn, c4.state_dict(), "NECK=none model's (one C4 feature map), the model is "
                                                        "NECK=fpn")]:
        with pytest.raises(CheckpointError) as e:
            load_weights(model, weights, Path("x/model.safetensors"))
        assert says in str(e.value) and "\n" not in str(e.value)


def test_benchmark_of_a_c4_checkpoint_with_neck_fpn_is_one_line_not_the_c4_network(c4_run, capsys):
    code = main(["benchmark", "--config", str(c4_run), *SETS, "--size", "64x64", "--runs", "1", "--warmup", "0"])
    line = _error_line(capsys)
    assert code == 2
    assert "NECK fpn" in line and "the weights are a NECK=none model's" in line, line


# ------------------------------------------------------------------------------------------------- export


def _matched(a: list[dict], b: list[dict]) -> None:
    """The same detections (each of ``a`` has its own in ``b``: class equal, box within 0.011 px, score within 1e-4)."""
    assert len(a) == len(b)
    free = list(b)
    for x in a:
        match = next((y for y in free if y["class"] == x["class"] and abs(y["score"] - x["score"]) <= 1e-4 + 1e-5
                      and max(abs(u - v) for u, v in zip(x["box"], y["box"])) <= 0.011), None)
        assert match is not None, x
        free.remove(match)


def test_export_of_an_fpn_checkpoint_and_onnxruntime_detect_eval_and_benchmark_it(fpn_run, voc, tmp_path, capsys):
    """The trained checkpoint (its RPN's box deltas are not zero): exported, run by onnxruntime, the detections and
    the mAP are PyTorch's; benchmark --engine onnxruntime exports an FPN preset and times it."""
    out = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(fpn_run), "--out", str(out)]) == 0
    images = sorted((voc / "JPEGImages").glob("*.jpg"))[:2]
    for engine, where in (("torch", fpn_run), ("onnxruntime", out)):
        assert main(["detect", "--checkpoint", str(where), *map(str, images), "--out", str(tmp_path / engine),
                     "--engine", engine, "--threshold", "0"]) == 0
    for image in images:
        a, b = (json.loads((tmp_path / e / f"{image.stem}.json").read_text())["detections"]
                for e in ("torch", "onnxruntime"))
        assert a  # threshold 0: something to compare
        _matched(a, b)
    results = {}
    for engine, where in (("torch", fpn_run), ("onnxruntime", out)):
        capsys.readouterr()
        assert main(["eval", "--checkpoint", str(where), "--data", str(voc), "--split", "test", "--json",
                     "--engine", engine]) == 0
        results[engine] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["torch"]["map"] == pytest.approx(results["onnxruntime"]["map"], abs=1e-6)
    assert main(["benchmark", "--engine", "onnxruntime", "--config", "demo-cpu", *SETS, "--size", "64x96", "--runs",
                 "1", "--warmup", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result["engine"] == "onnxruntime" and result["size"] == [64, 96] and result["total_ms"] > 0


# ---------------------------------------------------------------------------------------------- benchmark


def test_benchmark_of_an_fpn_preset_forces_the_roi_count_and_counts_every_level(capsys):
    assert main(["benchmark", "--config", "demo-cpu", *SETS, "--size", "96x128", "--rois", "40", "--runs", "1",
                 "--warmup", "0", "--json", "--no-fast"]) == 0
    result = json.loads(capsys.readouterr().out.strip())
    assert result["size"] == [96, 128]
    assert result["rois"] == 40  # random weights, the RPN made to propose at least as many on the pyramid
    assert result["gflops"] > 0 and result["floor_ms"] > 0
    assert all(v >= 0 for v in result["stages_ms"].values()) and result["stages_ms"]["roi_pooling"] > 0


def test_the_floor_times_the_pyramid_and_the_rpn_on_every_level():
    cfg = load_config("demo-cpu", [*FPN, "TEST.SCALES=[96]", "TEST.MAX_SIZE=128", "TEST.RPN_POST_NMS_TOP_N=30"])
    torch.manual_seed(0)
    model = FasterRCNN(cfg, 3, load_pretrained=False).eval()
    random_rpn(model)
    image = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        seen = _layer_inputs(model, lambda: model(image, torch.tensor([[96, 128]])))
    rpn_inputs = [tuple(shape[-2:]) for m, shape in seen if m is model.rpn.rpn_net]
    # P2..P5 of a 96 x 128 input: ceil(96 / s) x ceil(128 / s) at strides 4, 8, 16, 32
    assert rpn_inputs == [(24, 32), (12, 16), (6, 8), (3, 4)]
    fpn_convs = {id(m) for m in [*model.head.fpn.lateral, *model.head.fpn.output]}
    assert fpn_convs <= {id(m) for m, _ in seen}
    with torch.no_grad():
        det_rois = Trace()
        model(image, torch.tensor([[96, 128]]), trace=det_rois)
    assert det_rois["roi_pooling"]["rois"].shape[0] == 30


# --------------------------------------------------------------------------------------------- anchor fit


def _sample(width: int, height: int, boxes: torch.Tensor) -> Sample:
    n = boxes.shape[0]
    return Sample("x", Path("x.jpg"), width, height, boxes, torch.ones(n, dtype=torch.long),
                  torch.zeros(n, dtype=torch.bool))


def _dense_fpn(boxes: torch.Tensor, height: int, width: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, from the model itself: every anchor its generators make on the maps its head gives a
    height x width input, the inside ones only; best IoU of each box and its count at >= 0.7."""
    model = FasterRCNN(cfg, 2, load_pretrained=False).eval()
    with torch.no_grad():
        levels = model.head(torch.zeros(1, 3, height, width))
    anchors = torch.cat([gen(*f.shape[-2:]) for gen, f in zip(model.anchor_generators, levels)])
    inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < width) & (anchors[:, 3] < height)
    iou = box_iou(boxes, anchors[inside])
    return iou.max(dim=1).values, (iou >= 0.7 - 1e-9).sum(dim=1)


@pytest.mark.parametrize(("height", "width"), [(128, 160), (97, 131)])
def test_fpn_anchor_fit_is_the_search_over_every_level_of_the_model(height, width):
    cfg = load_config("demo-cpu", [*FPN, f"TRAIN.SCALES=[{height}]", "TRAIN.MAX_SIZE=1000"])
    g = torch.Generator().manual_seed(height)
    xy = torch.rand(60, 2, generator=g) * torch.tensor([width - 8.0, height - 8.0])
    wh = torch.exp(torch.rand(60, 2, generator=g) * 4.5) + 3  # 4 .. 93 px
    boxes = torch.cat((xy, torch.minimum(xy + wh, torch.tensor([width - 1.0, height - 1.0]))), dim=1).round()
    sample = _sample(width, height, boxes)
    fit = anchor_fit([sample], cfg)
    best, positives = _dense_fpn(boxes, height, width, cfg)
    torch.testing.assert_close(fit.best_iou, best, atol=1e-6, rtol=0)
    assert fit.positives().tolist() == positives.tolist()
    assert fit.anchor_sizes() == [32, 64, 128, 256] and fit.levels == (4, 8, 16, 32)


def test_a_box_that_is_a_p3_anchor_fits_exactly_and_the_report_says_fpn():
    # level_anchors(8, [8], [1]) is [-32, -32, 31, 31]; at cell (row 5, column 6) it is shifted by (48, 40)
    box = shift_anchors(level_anchors(8, [8], [1]), 6, 7, 8)[-1]
    assert box.tolist() == [16.0, 8.0, 79.0, 71.0]
    sample = _sample(160, 128, box[None])
    fpn = anchor_fit([sample], load_config("demo-cpu", [*FPN, "TRAIN.SCALES=[128]", "TRAIN.MAX_SIZE=160"]))
    assert fpn.best_iou.tolist() == [pytest.approx(1.0)]
    # the C4 anchors of the same scale (8 x 16 = 128 px) fit this 64 px box at most 0.25
    c4 = anchor_fit([sample], load_config("demo-cpu", ["FEAT_STRIDE=16", "ANCHOR_SCALES=[8]", "TRAIN.SCALES=[128]",
                                                        "TRAIN.MAX_SIZE=160"]))
    assert c4.best_iou.item() <= 64 * 64 / (128 * 128) + 1e-6
    lines = format_fit([], fpn, ["circle"])
    assert lines[0].endswith("FPN levels at strides 4, 8, 16, 32, anchors inside the image only")
    assert "anchors of 32, 64, 128, 256 px" in lines[1]
    assert lines[-1].strip().startswith("no ANCHOR_SCALES suggestion") and "C4" in lines[-1]
    with pytest.raises(ConfigError, match="C4 anchors"):
        from frcnn.data.anchor_fit import suggest_scales

        suggest_scales([sample], load_config("demo-cpu", FPN))


def test_check_data_json_of_an_fpn_config_reports_the_pyramid_and_no_suggestion(voc, capsys):
    assert main(["check-data", "--data", str(voc), "--split", "trainval", "--json", "--config", "demo-cpu",
                 *SETS]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    fit = out["anchor_fit"]
    assert fit["pyramid_strides"] == [4, 8, 16, 32] and fit["anchor_sizes"] == [32, 64, 128, 256]
    assert out["suggested_anchor_scales"] is None and out["suggested_fit"] is None
    assert fit["boxes"] > 0 and math.isfinite(fit["median_best_iou"])


def test_check_data_of_a_c4_config_keeps_its_suggestion(voc, capsys):
    assert main(["check-data", "--data", str(voc), "--split", "trainval", "--json", "--config", "demo-cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    assert "pyramid_strides" not in out["anchor_fit"] and len(out["suggested_anchor_scales"]) == 3
    assert out["anchor_fit"]["anchor_sizes"] == [16 * s for s in out["anchor_fit"]["anchor_scales"]]
