"""``--quick`` (:mod:`frcnn.engine.fast_mode`): the config keys it changes and only those (the RoI count stays the
checkpoint's), bf16 only where the CPU has it natively, the int8 tail, the checkpoint folder never written, and
eval/detect/benchmark end to end."""

from __future__ import annotations

import json

import pytest
import torch
from explain_fixtures import CLASSES, checkpoint, config, model, picture, voc_folder
from torch import nn

from frcnn.cli import main
from frcnn.config import config_to_dict, merge
from frcnn.engine import fast_mode, precision
from frcnn.engine.checkpoint import save_checkpoint
from frcnn.engine.fast_mode import (
    CalibratedInt8,
    Float32,
    describe,
    native_bf16,
    quantize_convs,
    quantize_tail,
    quick_overrides,
    quick_predictor,
)
from frcnn.engine.inference import Predictor

DOCUMENTED = {"TEST.AMP"}  # plus the int8 tail, not a config key


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _changed(a, b) -> dict[str, tuple]:
    fa, fb = _flat(config_to_dict(a)), _flat(config_to_dict(b))
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}


def _files(folder) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _ckpt_300(folder):
    """A checkpoint at 300 RoIs (TEST.RPN_POST_NMS_TOP_N), as the voc-* presets: --quick keeps them."""
    save_checkpoint(folder, model(), merge(config(), {"TEST": {"RPN_POST_NMS_TOP_N": 300}}), CLASSES, iteration=0)
    return folder


@pytest.mark.parametrize("native", [True, False])
def test_quick_overrides_keep_the_rois_and_choose_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr(fast_mode, "native_bf16", lambda device="cpu": native)
    many = merge(config(), {"TEST": {"RPN_POST_NMS_TOP_N": 300}})
    few = merge(config(), {"TEST": {"RPN_POST_NMS_TOP_N": 40}})
    amp = "bf16" if native else "none"
    # the RoI count is never named: 300 stays 300, 40 stays 40
    assert quick_overrides(many, "cpu") == {"TEST": {"AMP": amp}}
    assert quick_overrides(few, "cpu") == {"TEST": {"AMP": amp}}
    assert merge(many, quick_overrides(many, "cpu")).TEST.RPN_POST_NMS_TOP_N == 300
    # a checkpoint asking for bf16 on a CPU without it runs in float32 (bf16 emulated is 5-100x slower)
    asks_bf16 = merge(many, {"TEST": {"AMP": "bf16"}})
    assert quick_overrides(asks_bf16, "cpu")["TEST"]["AMP"] == amp
    # on CUDA quick changes nothing: TEST.AMP is the checkpoint's, and the line printed says so
    assert quick_overrides(asks_bf16, torch.device("cuda")) == {"TEST": {}}
    line = describe(asks_bf16, {"TEST": {}}, torch.device("cuda"), int8=False)
    assert line.startswith("quick mode: nothing to change on cuda") and "TEST.AMP stays the checkpoint's" in line
    assert "\n" not in line


def test_native_bf16_needs_avx512_and_the_bf16_instructions(monkeypatch):
    cpu = torch.backends.cpu
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    monkeypatch.setattr(cpu, "get_cpu_capability", lambda: "AVX512")
    assert native_bf16("cpu")
    assert not native_bf16(torch.device("cuda"))
    # capability limited (an AVX2 CPU, or ATEN_CPU_CAPABILITY=avx2): bf16 would be emulated
    monkeypatch.setattr(cpu, "get_cpu_capability", lambda: "AVX2")
    assert not native_bf16("cpu")
    monkeypatch.setattr(cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f"})  # AVX-512 without bf16 (Skylake, Zen 3)
    assert not native_bf16("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert native_bf16("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_quick_predictor_changes_exactly_the_documented_keys(monkeypatch, tmp_path, native):
    monkeypatch.setattr(fast_mode, "native_bf16", lambda device="cpu": native)
    folder = _ckpt_300(tmp_path / "ckpt")
    base = Predictor.from_checkpoint(folder, "cpu")
    quick = quick_predictor(folder, "cpu")
    changed = _changed(base.cfg, quick.cfg)
    assert set(changed) <= DOCUMENTED
    assert quick.cfg.TEST.RPN_POST_NMS_TOP_N == base.cfg.TEST.RPN_POST_NMS_TOP_N == 300  # 300 stays 300
    assert ("TEST.AMP" in changed) == native and quick.cfg.TEST.AMP == ("bf16" if native else "none")
    assert quick.model.cfg == quick.cfg  # the model proposes what the config says
    assert quick.class_names == base.class_names
    # the tail's Linear layers (fc6, fc7, class scores, boxes) in int8, nothing else of the model
    wrapped = [m for m in quick.model.classifier.modules() if isinstance(m, Float32)]
    assert len(wrapped) == 4
    assert not any(isinstance(m, nn.Linear) for m in quick.model.classifier.modules())
    assert not any(isinstance(m, Float32) for m in [*quick.model.head.modules(), *quick.model.rpn.modules()])
    detections = quick.predict([picture()])[0]
    assert detections.boxes.dtype == detections.scores.dtype == torch.float32


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_the_int8_tail_computes_what_the_float_tail_computes(amp):
    float_model = model()
    quantized = model()
    assert quantize_tail(quantized)
    pooled = torch.randn(20, 128, 7, 7, generator=torch.Generator().manual_seed(0)).relu()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
        ref = float_model.classifier(pooled)
        out = quantized.classifier(pooled)
    for r, o in zip(ref, out):
        assert o.dtype == torch.float32 and torch.isfinite(o).all()
        assert (o - r.float()).abs().max() <= 0.05 * r.float().abs().max()


def test_eval_detect_benchmark_quick_end_to_end_and_the_checkpoint_is_not_written(tmp_path, capsys):
    folder = _ckpt_300(tmp_path / "ckpt")
    voc = tmp_path / "voc"
    voc_folder(voc)
    before = _files(folder)
    assert main(["eval", "--checkpoint", str(folder), "--data", str(voc), "--split", "test", "--quick", "--json",
                 "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert result["num_images"] == 1 and 0.0 <= result["map"] <= 1.0
    assert "quick mode: TEST.AMP=" in out.err and "RPN_POST_NMS_TOP_N" not in out.err
    assert main(["detect", "--checkpoint", str(folder), "--quick", "--out", str(tmp_path / "det"),
                 str(voc / "JPEGImages" / "known.png"), "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert (tmp_path / "det" / "known.json").is_file() and "quick mode:" in out.err
    assert main(["benchmark", "--config", str(folder), "--quick", "--runs", "1", "--warmup", "0", "--json",
                 "--threads", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["rois"] <= 300 and "quick mode:" in out.err
    assert _files(folder) == before  # same files, bytes and modification times


def test_benchmark_quick_leaves_the_keys_given_by_rois_and_set(tmp_path, capsys):
    folder = checkpoint(tmp_path / "ckpt")
    assert main(["benchmark", "--config", str(folder), "--quick", "--rois", "7", "--set", "TEST.AMP=none",
                 "--runs", "1", "--warmup", "0", "--json", "--threads", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["rois"] <= 7
    assert "RPN_POST_NMS_TOP_N" not in out.err and "TEST.AMP" not in out.err and "int8" in out.err


@pytest.mark.parametrize("argv", [
    ["eval", "--detections", "DET", "--data", "VOC", "--split", "test", "--quick"],
    ["eval", "--checkpoint", "CKPT", "--data", "VOC", "--split", "test", "--quick", "--engine", "onnxruntime",
     "--device", "cpu"],
    ["benchmark", "--config", "CKPT", "--quick", "--engine", "onnxruntime"],
])
def test_quick_where_it_cannot_apply_is_one_line(tmp_path, capsys, argv):
    folder = checkpoint(tmp_path / "ckpt")
    voc = tmp_path / "voc"
    voc_folder(voc)
    argv = [{"CKPT": str(folder), "VOC": str(voc), "DET": str(tmp_path / "det.json")}.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--quick" in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_quick_keeps_the_checkpoints_precision_and_a_float_tail(tmp_path):
    folder = _ckpt_300(tmp_path / "ckpt")
    quick = quick_predictor(folder, "cuda")
    assert quick.cfg.TEST.AMP == "none" and quick.cfg.TEST.RPN_POST_NMS_TOP_N == 300
    assert not any(isinstance(m, Float32) for m in quick.model.modules())
    quick.predict([picture()])


def test_eval_and_detect_set_changes_test_keys_for_the_run_only(tmp_path, capsys):
    """``--set TEST.*`` reaches the model of eval and detect (with and without --quick), in memory only; other
    keys and the onnxruntime engine are one line."""
    folder = _ckpt_300(tmp_path / "ckpt")
    voc = tmp_path / "voc"
    voc_folder(voc)
    before = _files(folder)
    image = str(voc / "JPEGImages" / "known.png")
    assert main(["detect", "--checkpoint", str(folder), "--out", str(tmp_path / "all"), image, "--device", "cpu",
                 "--threshold", "0"]) == 0
    capsys.readouterr()
    n_all = len(json.loads((tmp_path / "all" / "known.json").read_text())["detections"])
    assert n_all > 1  # an untrained model: many low-scored boxes
    for quick in ([], ["--quick"]):
        out_dir = tmp_path / f"one{len(quick)}"
        assert main(["detect", "--checkpoint", str(folder), "--out", str(out_dir), image, "--device", "cpu",
                     "--threshold", "0", "--set", "TEST.MAX_PER_IMAGE=1", *quick]) == 0
        err = capsys.readouterr().err
        assert len(json.loads((out_dir / "known.json").read_text())["detections"]) == 1
        assert "--set: TEST.MAX_PER_IMAGE: 100 -> 1 (this run only" in err
    assert main(["eval", "--checkpoint", str(folder), "--data", str(voc), "--split", "test", "--json",
                 "--no-progress", "--device", "cpu", "--set", "TEST.NMS=0.5", "--set", "TEST.SCORE_THRESH=0.01"]) == 0
    err = capsys.readouterr().err
    assert "TEST.NMS: 0.3 -> 0.5" in err and "TEST.SCORE_THRESH: 0.0 -> 0.01" in err
    for bad, says in ((["--set", "BACKBONE=res50"], "--set BACKBONE: detect changes only TEST.* keys"),
                      (["--set", "TEST.NMS=abc"], "TEST.NMS"),
                      (["--set", "TEST.NMS=-1"], "TEST.NMS=-1.0 is an IoU threshold: it must lie in [0, 1]"),
                      (["--set", "TEST.MAX_PER_IMAGE=0"], "TEST.MAX_PER_IMAGE=0 must be at least 1"),
                      (["--set", "TEST.NMS=0.5", "--engine", "onnxruntime"], "its TEST settings in its graph")):
        assert main(["detect", "--checkpoint", str(folder), "--out", str(tmp_path / "bad"), image,
                     "--device", "cpu", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1
    assert _files(folder) == before


INT8_HEAD = quantize_convs(model())  # this machine quantizes heads: x86 engine, AVX-512 with VNNI
needs_int8_head = pytest.mark.skipif(not INT8_HEAD, reason="the int8 head needs an AVX-512 CPU with VNNI")


@needs_int8_head
def test_the_int8_head_runs_float_while_it_calibrates_then_int8_near_float():
    float_model, quantized = model(), model()
    assert quantize_convs(quantized, calibration=2) and isinstance(quantized.head, CalibratedInt8)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 3, 96, 128, generator=g) * 50 for _ in range(3)]
    with torch.no_grad():
        for x in xs[:2]:  # calibration: the float head (BatchNorm fused into the convolutions) with observers
            torch.testing.assert_close(quantized.head(x), float_model.head(x), rtol=1e-4, atol=1e-4)
        head = quantized.head
        assert head.observed is None and head.int8 is not None
        assert sum(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in head.int8.modules()) == sum(
            isinstance(m, nn.Conv2d) for m in float_model.head.modules())
        ref, out = float_model.head(xs[2]), quantized.head(xs[2])
    assert out.dtype == torch.float32 and out.shape == ref.shape
    error = float((out - ref).norm() / ref.norm())
    assert 0 < error < 0.1  # int8 ran, and stayed near float (measured ~0.02 on images, 0.06 on noise)
    # the RPN's 3x3 convolution likewise, on the head's features (it counts calls: one per image here)
    conv = quantized.rpn.rpn_net
    assert isinstance(conv, CalibratedInt8) and conv.left == 2
    with torch.no_grad():
        features = [float_model.head(x) for x in xs]
        for f in features[:2]:
            torch.testing.assert_close(conv(f), float_model.rpn.rpn_net(f), rtol=1e-4, atol=1e-4)
        assert conv.int8 is not None
        ref, out = float_model.rpn.rpn_net(features[2]), conv(features[2])
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.1


def test_the_rpn_conv_of_a_pyramid_calibrates_over_every_level_of_the_images():
    from frcnn.config import load_config
    from frcnn.model.detector import FasterRCNN

    if not INT8_HEAD:
        pytest.skip("the int8 head needs an AVX-512 CPU with VNNI")
    torch.manual_seed(0)
    net = FasterRCNN(load_config("scratch-cpu-fpn", ["DEVICE=cpu"]), 3, load_pretrained=False).eval()
    assert quantize_convs(net, calibration=2)
    assert net.strides == [4, 8, 16, 32]  # FEAT_STRIDE 16: P2..P4 and the RPN-only level
    assert net.head.left == 2 and net.rpn.rpn_net.left == 2 * 4


def test_the_int8_head_only_where_measured_and_not_for_a_few_images(monkeypatch, tmp_path):
    monkeypatch.setattr(fast_mode, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})  # no VNNI
    plain = model()
    assert not quantize_convs(plain) and not isinstance(plain.head, CalibratedInt8)
    monkeypatch.undo()
    if not INT8_HEAD:
        pytest.skip("the int8 head needs an AVX-512 CPU with VNNI")
    folder = checkpoint(tmp_path / "ckpt")
    lines = []
    few = quick_predictor(folder, "cpu", images=fast_mode.INT8_HEAD_MIN_IMAGES - 1, say=lines.append)
    many = quick_predictor(folder, "cpu", images=fast_mode.INT8_HEAD_MIN_IMAGES, say=lines.append)
    assert not isinstance(few.model.head, CalibratedInt8) and isinstance(many.model.head, CalibratedInt8)
    assert "backbone head in float" in lines[0]
    assert "backbone head and RPN conv in int8 after 4 calibration images" in lines[1]
    assert isinstance(many.model.rpn.rpn_net, CalibratedInt8) and many.model.rpn.rpn_net.left == 4
    for _ in range(fast_mode.CALIBRATION_IMAGES + 1):
        detections = many.predict([picture()])[0]
    assert many.model.head.int8 is not None and detections.scores.dtype == torch.float32
