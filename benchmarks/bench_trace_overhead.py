"""What the trace costs when nobody asks for it: inference with ``trace=None`` against the same model code
with every trace line taken out ("compiled out"), side by side; and, for scale, with a trace.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_trace_overhead.py            # demo-cpu 320 px and res50
    PYTHONPATH=src .venv/bin/python benchmarks/bench_trace_overhead.py --quick    # demo-cpu only, few rounds
    options: --rounds N, --threads N, --no-res50, --no-write (else benchmarks/results/trace_overhead.md)

"Compiled out": the source of ``frcnn.model.{rpn,anchor_target,proposal_target,detector}`` is parsed and
every ``if trace is not None:`` block, every ``if rec:`` block (the detector's shorthand) and every
``with maybe_timed(trace, ...)`` wrapper (replaced by its body) is removed from the syntax tree; the result is
compiled into separate modules, wired to each other, and the detector class built from it gets the very same
weights. Its detections are checked to be identical to the original's. Then, per round and image, the three
variants run in an order that rotates every round (no variant always goes first): original with
``trace=None``, compiled out, original with a ``Trace``. Reported: the median over rounds of each variant's
time per image, and the median of the per-round ratios against "compiled out".
"""

from __future__ import annotations

import argparse
import ast
import datetime
import importlib
import inspect
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from frcnn.config import load_config
from frcnn.data.synthetic import render_scene
from frcnn.model.detector import FasterRCNN
from frcnn.model.trace import Trace
from frcnn.transforms import batch_images, image_to_tensor, prep_image

MODULES = ("rpn", "anchor_target", "proposal_target", "detector")


class _StripTrace(ast.NodeTransformer):
    @staticmethod
    def _is_trace_test(test: ast.expr) -> bool:
        if isinstance(test, ast.Name) and test.id == "rec":
            return True
        return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "trace"
                and isinstance(test.ops[0], ast.IsNot))

    def visit_If(self, node: ast.If):
        self.generic_visit(node)
        if self._is_trace_test(node.test):
            return node.orelse or None
        return node

    def visit_With(self, node: ast.With):
        self.generic_visit(node)
        item = node.items[0].context_expr
        if isinstance(item, ast.Call) and getattr(item.func, "id", "") == "maybe_timed":
            return node.body
        return node


def compiled_out() -> type[FasterRCNN]:
    """The detector class built from the model sources with every trace line removed."""
    stripped: dict[str, types.ModuleType] = {}
    for name in MODULES:
        original = importlib.import_module(f"frcnn.model.{name}")
        tree = _StripTrace().visit(ast.parse(inspect.getsource(original)))
        ast.fix_missing_locations(tree)
        module = types.ModuleType(f"frcnn_stripped.{name}")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(tree, f"<stripped {name}>", "exec"), module.__dict__)
        stripped[name] = module
        if "trace.put" in ast.unparse(tree) or "maybe_timed(" in ast.unparse(tree).replace("import maybe_timed", ""):
            raise RuntimeError(f"{name}: trace code left after stripping")
    det = stripped["detector"].__dict__
    det["proposal_layer"] = stripped["rpn"].proposal_layer
    det["RPN"] = stripped["rpn"].RPN
    det["anchor_target_layer"] = stripped["anchor_target"].anchor_target_layer
    det["proposal_target_layer"] = stripped["proposal_target"].proposal_target_layer
    return det["FasterRCNN"]


def _inputs(cfg, n: int, height: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for i in range(n):
        image = render_scene(np.random.default_rng([7, i]), height, width).image
        p = prep_image(image_to_tensor(image), cfg.TEST.SCALES[0], cfg.TEST.MAX_SIZE, cfg.PIXEL_MEANS,
                       cfg.PIXEL_STDS)
        out.append(batch_images([p.tensor]))
    return out


def bench(preset: str, overrides: list[str], images: int, size: tuple[int, int], rounds: int) -> dict:
    cfg = load_config(preset, ["DEVICE=cpu", *overrides])
    torch.manual_seed(0)
    original = FasterRCNN(cfg, 20, load_pretrained=False).eval()
    bare = compiled_out()(cfg, 20, load_pretrained=False).eval()
    bare.load_state_dict(original.state_dict())
    inputs = _inputs(cfg, images, *size)
    variants = {
        "trace=None": lambda b, s: original(b, s),
        "compiled out": lambda b, s: bare(b, s),
        "with a Trace": lambda b, s: original(b, s, trace=Trace()),
    }
    with torch.no_grad():
        for b, s in inputs:  # same answers, and a warm-up of every variant
            outs = [f(b, s)[0] for f in variants.values()]
            for o in outs[1:]:
                assert torch.equal(o.boxes, outs[0].boxes) and torch.equal(o.scores, outs[0].scores)
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for r in range(rounds):
            order = names[r % 3:] + names[: r % 3]
            for name in order:
                start = time.perf_counter()
                for b, s in inputs:
                    variants[name](b, s)
                times[name].append((time.perf_counter() - start) / len(inputs))
    ratio = {k: statistics.median(a / c for a, c in zip(times[k], times["compiled out"])) for k in names}
    return {"preset": preset, "input": f"{tuple(inputs[0][0].shape[-2:])}", "images": images, "rounds": rounds,
            "median_ms": {k: 1000 * statistics.median(v) for k, v in times.items()},
            "min_ms": {k: 1000 * min(v) for k, v in times.items()}, "ratio": ratio,
            "all_ms": {k: [round(1000 * t, 1) for t in v] for k, v in times.items()}}


def null_path_cost(repeats: int = 200_000) -> dict:
    """The exact extra work of ``trace=None``: the ``maybe_timed(None, ...)`` wrappers one forward enters (counted
    by wrapping it) times the cost of one, measured in a tight loop; the ``if trace is not None`` tests (a few
    tens of nanoseconds each) are left out of the bound as too small to matter."""
    import frcnn.model.detector as detector
    from frcnn.model.trace import maybe_timed

    cfg = load_config("demo-cpu", ["DEVICE=cpu"])
    torch.manual_seed(0)
    model = FasterRCNN(cfg, 20, load_pretrained=False).eval()
    calls = []

    def counting(trace, stage):
        calls.append(stage)
        return maybe_timed(trace, stage)

    detector.maybe_timed = counting
    try:
        with torch.no_grad():
            model(*_inputs(cfg, 1, 320, 320)[0])
    finally:
        detector.maybe_timed = maybe_timed
    start = time.perf_counter()
    for _ in range(repeats):
        with maybe_timed(None, "x"):
            pass
    per_call = (time.perf_counter() - start) / repeats
    return {"calls": len(calls), "stages": calls, "us_per_call": 1e6 * per_call,
            "us_per_forward": 1e6 * per_call * len(calls)}


def markdown(results: list[dict], threads: int, command: str, load: tuple, null: dict) -> str:
    lines = [
        "# Trace overhead: inference with trace=None vs. the trace compiled out",
        "",
        f"Command: `{command}`  ",
        "Script: `benchmarks/bench_trace_overhead.py` (its docstring says how the trace is compiled out).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores (shared); torch "
        f"{torch.__version__}, Python {platform.python_version()}; torch threads {threads}; "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"load average at start {load[0]}, at end {load[1]}.",
        "",
        "Untrained models (seeded), 20 classes, CPU. Synthetic shapes images; each round runs all variants over "
        "all images in a rotating order; medians over rounds. Ratio: median over rounds of variant / compiled out.",
        "",
        "| preset | network input (h, w) | images x rounds | variant | ms per image (median) | (fastest round) | "
        "ratio to compiled out |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        for k, ms in r["median_ms"].items():
            lines.append(f"| {r['preset']} | {r['input']} | {r['images']} x {r['rounds']} | {k} | {ms:.1f} | "
                         f"{r['min_ms'][k]:.1f} | {r['ratio'][k]:.3f} |")
    demo_ms = results[0]["min_ms"]["compiled out"]  # the least disturbed round
    lines += [
        "",
        f"Exact cost of the null path: one eval forward enters `maybe_timed(None, ...)` {null['calls']} times "
        f"({', '.join(null['stages'])}); one such no-op wrapper costs {null['us_per_call']:.2f} us (tight loop), "
        f"so `trace=None` adds {null['us_per_forward']:.1f} us per image, "
        f"{100 * null['us_per_forward'] / (1000 * demo_ms):.4f} % of the demo-cpu inference above (fastest round) "
        "(plus a handful of `if trace is not None` tests of tens of nanoseconds each).",
        "",
        "Reading the table: the timed ratios of `trace=None` to compiled out are within the run-to-run noise of this "
        "shared machine (see the load averages and the rounds below); the exact cost above is the figure to "
        "quote. Tracing itself (`with a Trace`) keeps every stage's tensors (detached, no copies) and times "
        "each stage.",
    ]
    lines += ["", "All rounds (ms per image):", ""]
    for r in results:
        for k, v in r["all_ms"].items():
            lines.append(f"- {r['preset']} {k}: {', '.join(map(str, v))}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-res50", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    rounds = args.rounds or (3 if args.quick else 15)
    results = [bench("demo-cpu", [], 3, (320, 320), rounds)]
    print(results[-1]["median_ms"], results[-1]["ratio"], flush=True)
    if not (args.quick or args.no_res50):
        results.append(bench("voc-r50-c4", ["POOLING_MODE=align"], 2, (600, 1000), max(3, rounds // 3)))
        print(results[-1]["median_ms"], results[-1]["ratio"], flush=True)
    null = null_path_cost()
    print(null, flush=True)
    text = markdown(results, args.threads, "PYTHONPATH=src .venv/bin/python " + " ".join(["benchmarks/"
                    "bench_trace_overhead.py", *sys.argv[1:]]), (load0, os.getloadavg()), null)
    print(text)
    if not args.no_write:
        out = Path(__file__).parent / "results" / "trace_overhead.md"
        out.write_text(text)
        print(f"written: {out}")


if __name__ == "__main__":
    main()
