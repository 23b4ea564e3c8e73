"""``frcnn benchmark``: every stage timed, the forced RoI count reached, FLOPs equal to the convolution and linear
layers' own arithmetic, and one-line errors. (Figures of speed are never asserted: they live in benchmarks/.)"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from frcnn.cli import main
from frcnn.config import load_config
from frcnn.engine.benchmark import STAGES, floor_calls, random_rpn
from frcnn.model.detector import FasterRCNN
from frcnn.model.trace import Trace


def _bench(capsys, *args: str) -> dict:
    assert main(["benchmark", "--runs", "1", "--warmup", "0", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _layer_flops(model: nn.Module, images: torch.Tensor) -> float:
    """2 x multiply-adds of every convolution and linear layer, from the shapes they produce (by hand)."""
    flops = []

    def count(m, args, out):
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            flops.append(2 * k * out.numel())
        else:
            flops.append(2 * m.in_features * out.numel())

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(images, torch.tensor([list(images.shape[-2:])]))
    for h in hooks:
        h.remove()
    return sum(flops)


def test_benchmark_times_every_stage_with_the_forced_roi_count(capsys):
    out = _bench(capsys, "--config", "demo-cpu", "--size", "96x128", "--rois", "40")
    assert set(out["stages_ms"]) == set(STAGES)
    assert all(v >= 0 for v in out["stages_ms"].values()) and out["total_ms"] > 0
    assert out["rois"] == 40 and out["size"] == [96, 128]
    assert out["floor_ms"] > 0 and out["floor_repeated_ms"] > 0
    assert out["machine"]["capability"] == torch.backends.cpu.get_cpu_capability()
    # the FLOPs are those of the convolutions and linear layers, counted independently on the same model
    cfg = load_config("demo-cpu", ["TEST.SCALES=[96]", "TEST.MAX_SIZE=128", "TEST.RPN_POST_NMS_TOP_N=40"])
    torch.manual_seed(0)
    model = FasterRCNN(cfg, 20, load_pretrained=False).eval()
    random_rpn(model)
    x = torch.randn(1, 3, 96, 128)
    assert out["gflops"] * 1e9 == pytest.approx(_layer_flops(model, x), rel=1e-6)


def test_random_weights_without_the_forced_rpn_collapse_and_with_it_do_not():
    """Why the benchmark sets the RPN: random weights keep few RoIs; random objectness on the anchors keeps N."""
    cfg = load_config("voc-r50-c4", ["TEST.SCALES=[192]", "TEST.MAX_SIZE=320", "TEST.RPN_POST_NMS_TOP_N=100"])
    torch.manual_seed(0)
    model = FasterRCNN(cfg, 20, load_pretrained=False).eval()
    x = torch.randn(1, 3, 192, 320) * 50
    counts = []
    for _ in range(2):
        trace = Trace()
        with torch.no_grad():
            model(x, torch.tensor([[192, 320]]), trace=trace)
        counts.append(int(trace["roi_pooling"]["rois"].shape[0]))
        random_rpn(model)
    assert counts[0] < 100 and counts[1] == 100, counts


def test_benchmark_of_a_checkpoint_uses_its_weights(capsys, tmp_path):
    from frcnn.engine.checkpoint import save_checkpoint

    cfg = load_config("demo-cpu", ["DEVICE=cpu"])
    save_checkpoint(tmp_path / "ckpt", FasterRCNN(cfg, 3, load_pretrained=False), cfg, ("a", "b", "c"), 1)
    out = _bench(capsys, "--config", str(tmp_path / "ckpt"), "--size", "64x64", "--rois", "10")
    assert out["size"] == [64, 64] and out["rois"] <= 10


@pytest.mark.parametrize("args, message", [
    (["--config", "demo-cpu", "--size", "12x200"], "--size 12x200: each side must be at least 2 x FEAT_STRIDE (16 px)"),
    (["--config", "demo-cpu", "--size", "big"], "--size 'big': expected HxW, e.g. 600x1000"),
    (["--config", "demo-cpu", "--rois", "0"], "--rois 0: must be at least 1"),
    (["--config", "nothing-here"], "neither a preset"),
])
def test_bad_benchmark_arguments_are_one_line(args, message, capsys):
    assert main(["benchmark", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_alternated_times_every_function_each_round_a_different_one_first():
    from frcnn.engine.benchmark import alternated

    calls: list[str] = []
    times = alternated({name: (lambda n=name: calls.append(n)) for name in "abc"}, runs=4, warmup=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in times.values() for t in v)
    assert [calls[i] for i in range(0, 18, 3)] == ["a", "b", "c", "a", "b", "c"]  # who goes first, round by round
    assert sorted(calls) == sorted("abc" * 6)


def test_the_floor_calls_every_layer_once_on_the_shape_it_saw():
    """The floor is timed a pass over these calls at a time, between whole-image runs: one call per (layer,
    input shape), in whichever layout was faster, computing what the layer computes."""
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)
    layers = [(conv, torch.Size([1, 3, 12, 16])), (conv, torch.Size([2, 3, 5, 7])), (linear, torch.Size([6, 8]))]
    calls = floor_calls(layers, torch.device("cpu"), trials=1)
    assert [tuple(c.args[0].shape) for c, _ in calls] == [(1, 3, 12, 16), (2, 3, 5, 7), (6, 8)]
    assert all(t > 0 for _, t in calls)
    for (call, _), (layer, _) in zip(calls, layers):
        x = call.args[0].contiguous()
        torch.testing.assert_close(call(), layer(x), rtol=1e-5, atol=1e-5)
