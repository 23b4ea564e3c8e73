"""``frcnn benchmark``: where the time of one image goes, on this machine, and how far it is from a floor.

One image of ``size`` (random pixels, seeded) goes through :class:`~frcnn.engine.inference.Predictor` with a
:class:`~frcnn.model.trace.Trace`; each stage's time (pre-processing, head, RPN, proposal layer, RoI pooling,
classification network, detection/NMS) is the median over ``runs`` after ``warmup`` runs. Alongside:

- the model's FLOPs for that image (torch's ``FlopCounterMode``: convolutions and matrix products);
- a floor: the time of the model's convolutions and linear layers alone, each fed inputs of the shapes it saw,
  in its fastest fp32 memory layout (contiguous or channels-last, chosen first): one pass calling each once, as
  the model does, timed after each whole-image run (so both see the machine in the same state; median over
  ``runs``). Also reported, as before 2026-12-02: the sum of each layer's median time over repeated calls on one
  input (its weights and input still in cache from the call before: lower than a pass, and measured apart
  from the image runs).
  Everything above the floor is pooling, NMS, normalisation, glue: the part frcnn itself can remove. (A
  GFLOP/s peak would not be a floor: oneDNN may use Winograd and beat it.)

Without a trained checkpoint the weights are random, and random RPN weights collapse the proposals (a few dozen
survive NMS); the benchmark then zeroes the RPN's box deltas (proposals are the anchors themselves) and draws
its objectness at random, so the tail sees ``TEST.RPN_POST_NMS_TOP_N`` RoIs as with a trained model. The
report says how many RoIs the tail actually pooled.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from frcnn.config import Config
from frcnn.engine.inference import Predictor
from frcnn.model.detector import FasterRCNN
from frcnn.model.trace import Trace

STAGES = ("preprocess", "head", "anchors", "rpn", "proposal_layer", "roi_pooling", "classification", "detections")


@dataclass
class BenchmarkResult:
    size: tuple[int, int]
    rois: int  # RoIs the tail pooled
    stages: dict[str, float]  # median seconds per stage
    total: float  # median seconds per image, end to end
    gflops: float
    floor: float  # seconds: convolutions and linear layers alone, one pass
    machine: dict[str, Any] = field(default_factory=dict)
    floor_repeated: float = 0.0  # seconds: the sum of each layer's median over repeated calls

    def to_json(self) -> dict[str, Any]:
        return {"size": list(self.size), "rois": self.rois, "stages_ms": {k: v * 1e3 for k, v in self.stages.items()},
                "total_ms": self.total * 1e3, "gflops": self.gflops, "floor_ms": self.floor * 1e3,
                "total_over_floor": self.total / self.floor if self.floor else None,
                "floor_repeated_ms": self.floor_repeated * 1e3, "machine": self.machine}


def machine_info() -> dict[str, Any]:
    """CPU model and capability, threads, torch version: printed with every figure."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def random_rpn(model: FasterRCNN, seed: int = 0) -> None:
    """Make a randomly initialised RPN propose like a trained one would, for timing: zero box deltas (the
    proposals are the anchors) and random objectness, so NMS keeps more than RPN_POST_NMS_TOP_N boxes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.rpn.rpn_bbox_pred_net.parameters():
            p.zero_()
        score = model.rpn.rpn_cls_score_net
        score.weight.copy_(torch.randn(score.weight.shape, generator=g))
        score.bias.copy_(torch.randn(score.bias.shape, generator=g))


def median_time(fn, runs: int, warmup: int = 0) -> float:
    """Median seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def alternated(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each of ``fns`` over ``runs`` rounds after ``warmup`` untimed ones; every round calls each once,
    a different one first each round (side-by-side ratios robust to a shared machine's load drifting)."""
    items = list(fns.items())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + runs):
        k = i % len(items)
        for name, fn in items[k:] + items[:k]:
            start = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def _layer_inputs(model: nn.Module, run) -> list[tuple[nn.Module, torch.Size]]:
    """Each convolution and linear layer of ``model`` with the shape of every input it got during ``run()``."""
    seen: list[tuple[nn.Module, torch.Size]] = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].shape)))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def floor_calls(layers: list[tuple[nn.Module, torch.Size]], device: torch.device,
                trials: int = 3) -> list[tuple[partial, float]]:
    """The floor's calls: each of the layers alone on an input of the shape it saw, in its fastest fp32 layout
    (contiguous or channels-last), with that layout's median seconds over ``trials`` calls after one untimed."""
    calls = []
    for module, shape in layers:
        x = torch.randn(shape, device=device)
        best = (median_time(partial(module, x), trials, 1), partial(module, x))
        if isinstance(module, nn.Conv2d) and x.dim() == 4:
            channels_last = copy.deepcopy(module).to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
            best = min(best, (median_time(partial(channels_last, x), trials, 1), partial(channels_last, x)),
                       key=lambda t: t[0])
        calls.append((best[1], best[0]))
    return calls


@torch.no_grad()
def run_benchmark(model: FasterRCNN, cfg: Config, class_names: tuple[str, ...], size: tuple[int, int],
                  runs: int = 5, warmup: int = 2, floor: bool = True,
                  float_model: FasterRCNN | None = None) -> BenchmarkResult:
    """Time one ``size`` image through ``model`` stage by stage (see the module docstring); ``floor=False``
    skips the FLOPs and the floor (reported as 0). ``float_model``: the network whose FLOPs and floor are
    measured when ``model`` has int8 layers (which neither counts): the same model before quantization."""
    h, w = size
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
    predictor = Predictor(model, cfg, class_names)
    gflops, calls = 0.0, []
    if floor:
        measured = predictor if float_model is None else Predictor(float_model, cfg, class_names)
        with FlopCounterMode(display=False) as counter:
            measured.predict([image])
        gflops = counter.get_total_flops() / 1e9
        calls = floor_calls(_layer_inputs(measured.model, lambda: measured.predict([image])), measured.device)

    def floor_pass() -> float:
        start = time.perf_counter()
        for call, _ in calls:
            call()
        return time.perf_counter() - start

    for _ in range(warmup):
        predictor.predict([image])
        floor_pass()
    samples: dict[str, list[float]] = {k: [] for k in STAGES}
    totals, floors, rois = [], [], 0
    for _ in range(runs):
        trace = Trace()
        start = time.perf_counter()
        predictor.predict([image], trace=trace)
        totals.append(time.perf_counter() - start)
        for k in STAGES:
            samples[k].append(trace.timings.get(k, 0.0))
        rois = int(trace["roi_pooling"]["rois"].shape[0])
        if calls:
            floors.append(floor_pass())
    # pre-processing and mapping boxes back are what the stages do not cover
    stages = {k: statistics.median(v) for k, v in samples.items()}
    stages["preprocess"] = statistics.median(t - sum(s[i] for k, s in samples.items() if k != "preprocess")
                                             for i, t in enumerate(totals))
    floor_time = statistics.median(floors) if floors else 0.0
    return BenchmarkResult((h, w), rois, stages, statistics.median(totals), gflops, floor_time, machine_info(),
                           floor_repeated=sum(t for _, t in calls))


def format_result(r: BenchmarkResult) -> str:
    m = r.machine
    lines = [f"frcnn benchmark: one {r.size[0]}x{r.size[1]} image, {r.rois} RoIs at the tail",
             f"machine: {m['cpu']}, {m['capability']}, {m['cores']} cores, {m['threads']} threads, "
             f"torch {m['torch']}" + (f", CUDA {m['cuda']}" if m.get("cuda") else ""),
             "", "| stage | ms | share |", "| --- | ---: | ---: |"]
    for k, v in r.stages.items():
        name = "preprocess (and boxes back to the image)" if k == "preprocess" else k
        lines.append(f"| {name} | {v * 1e3:.1f} | {v / r.total:.0%} |")
    lines.append(f"| **total** | **{r.total * 1e3:.1f}** | |")
    if r.floor:
        lines += ["", f"FLOPs: {r.gflops:.1f} GFLOP per image; floor (convolutions and linear layers alone, "
                      f"fastest fp32 layout, a pass between image runs): {r.floor * 1e3:.1f} ms; total / floor: "
                      f"{r.total / r.floor:.2f}",
                  f"(each layer's median over repeated calls, summed: {r.floor_repeated * 1e3:.1f} ms; total / that: "
                  f"{r.total / r.floor_repeated:.2f})"]
    return "\n".join(lines)
