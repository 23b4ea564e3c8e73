"""What keeping freed memory for reuse (``frcnn.engine.fast.reuse_freed_memory``) is worth: R50-C4 at 600x1000.

The allocator setting is process-wide and cannot be undone for memory already taken, so each measurement is its
own child process, with and without it, alternated round after round (``--rounds``); each child times its runs
after one warm-up and prints the median. ``inference``: frcnn's fast path (align pooling, 300 RoIs, random
weights with the forced RPN of ``frcnn benchmark``), the head alone and the whole image. ``--train``: also one
training step of the model as ``frcnn train`` holds it (channels-last on AVX-512), random weights.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_memory_reuse.py [--rounds 3] [--runs 3] [--train]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

from frcnn.config import load_config
from frcnn.engine.benchmark import median_time, random_rpn
from frcnn.engine.fast import prepare_for_inference, reuse_freed_memory
from frcnn.engine.train import trains_channels_last
from frcnn.model.detector import FasterRCNN


def child(reuse: bool, train: bool, runs: int) -> dict:
    """Seconds per call in this process, with or without the setting (prepare_for_inference would set it)."""
    import frcnn.engine.fast as fast_module

    applied = reuse_freed_memory() if reuse else False
    fast_module.reuse_freed_memory = lambda: applied  # measure the layout rearrangement alone without it
    torch.manual_seed(0)
    cfg = load_config("voc-r50-c4", ["DEVICE=cpu", "POOLING_MODE=align", "PRETRAINED="])
    model = FasterRCNN(cfg, 20, load_pretrained=False).eval()
    random_rpn(model)
    x, sizes = torch.randn(1, 3, 608, 1008), torch.tensor([[600, 1000]])
    out = {"applied": applied}
    if train:
        model.train()
        if trains_channels_last(cfg, torch.device("cpu")):
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
        gt, labels = [torch.tensor([[100.0, 100, 300, 300], [400, 200, 700, 500]])], [torch.tensor([1, 2])]
        g = torch.Generator().manual_seed(0)

        def step():
            opt.zero_grad(set_to_none=True)
            sum(model(x, sizes, gt, labels, generator=g).values()).backward()
            opt.step()

        out["train step"] = median_time(step, runs, warmup=1)
        return out
    fast = prepare_for_inference(model)
    layout = torch.channels_last if next(fast.head.parameters()).is_contiguous(
        memory_format=torch.channels_last) else torch.contiguous_format
    xl = x.contiguous(memory_format=layout)
    with torch.no_grad():
        out["head"] = median_time(lambda: fast.head(xl), runs, warmup=1)
        out["image"] = median_time(lambda: fast(x, sizes), runs, warmup=1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--train", action="store_true")
    p.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    p.add_argument("--child-train", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "on", args.child_train, args.runs)))
        return 0
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()}")
    results: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    for _ in range(args.rounds):
        for setting in ("off", "on"):
            for train in (False, True) if args.train else (False,):
                cmd = [sys.executable, __file__, "--child", setting, "--runs", str(args.runs)]
                line = subprocess.run(cmd + (["--child-train"] if train else []), capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1]
                for k, v in json.loads(line).items():
                    if k != "applied":
                        results[setting].setdefault(k, []).append(v)
                    elif setting == "on" and not v:
                        print("reuse_freed_memory() did not take effect here (no glibc mallopt)")
    print("| measurement | default allocator, s | freed memory reused, s | speed-up |\n|---|---:|---:|---:|")
    for k in results["off"]:
        off, on = statistics.median(results["off"][k]), statistics.median(results["on"][k])
        print(f"| {k} | {off:.3f} | {on:.3f} | {off / on:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
