"""The fast inference path, variant by variant, side by side in one run: the model as trained, BatchNorm folded,
BatchNorm folded + channels-last; demo-cpu (320x512) and voc-r50-c4 (600x1000), random weights with the RPN set
to propose TEST.RPN_POST_NMS_TOP_N RoIs (as ``frcnn benchmark`` does). Median seconds per image, end to end.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_fast_path.py [--runs 5] [--rounds 3] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from frcnn.config import load_config
from frcnn.engine.benchmark import machine_info, random_rpn, run_benchmark
from frcnn.engine.fast import fold_batchnorm, prepare_for_inference
from frcnn.model.detector import FasterRCNN

CASES = {"demo-cpu": (320, 512), "voc-r50-c4": (600, 1000)}


def variants(model):
    folded = fold_batchnorm_copy(model)
    return {"as trained": model, "BatchNorm folded": folded,
            "folded + channels-last": prepare_for_inference(model, channels_last=True)}


def fold_batchnorm_copy(model):
    import copy

    m = copy.deepcopy(model).eval()
    fold_batchnorm(m)
    return m


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="rounds, each variant once per round, order rotating")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    info = machine_info()
    load0 = os.getloadavg()
    lines = ["| preset | size | variant | s / image (median of rounds) | vs as trained |", "|---|---|---|---:|---:|"]
    for preset, (h, w) in CASES.items():
        cfg = load_config(preset, ["DEVICE=cpu", f"TEST.SCALES=[{h}]", f"TEST.MAX_SIZE={w}"])
        torch.manual_seed(0)
        model = FasterRCNN(cfg, 20, load_pretrained=False).eval()
        random_rpn(model)
        models = variants(model)
        names = list(models)
        times = {n: [] for n in names}
        for r in range(args.rounds):
            for n in names[r % len(names):] + names[: r % len(names)]:
                result = run_benchmark(models[n], cfg, tuple(f"c{i}" for i in range(20)), (h, w), runs=args.runs,
                                       warmup=1, floor=False)
                times[n].append(result.total)
                print(f"{preset} round {r + 1} {n}: {result.total:.3f} s", flush=True)
        base = statistics.median(times["as trained"])
        for n in names:
            t = statistics.median(times[n])
            lines.append(f"| {preset} | {h}x{w} | {n} | {t:.3f} | {base / t:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        out = Path(__file__).resolve().parent / "results" / "fast_path.md"
        out.write_text("\n".join([
            "# The fast inference path, variant by variant",
            "",
            f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/bench_fast_path.py --runs {args.runs} "
            f"--rounds {args.rounds}`  ",
            f"Machine: {info['cpu']}, {info['capability']}, {info['cores']} cores, {info['threads']} threads, "
            f"torch {info['torch']}; load average at start {tuple(round(x, 2) for x in load0)}, at end "
            f"{tuple(round(x, 2) for x in os.getloadavg())}.",
            "",
            table, "",
        ]))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
