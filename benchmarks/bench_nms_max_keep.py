"""NMS as the proposal layer calls it: only the first RPN_POST_NMS_TOP_N kept boxes are used (100 of the top 1000
for the demo presets, 300 of the top 6000 at test, 2000 of the top 12000 in training). torchvision
``nms(...)[:N]`` against frcnn ``nms(..., max_keep=N)`` on the proposal-like boxes of bench_nms.py: the same kept
indices (checked), median of 9 alternated runs.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_nms_max_keep.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nms import rpn_like  # noqa: E402

from frcnn.ops.nms import nms  # noqa: E402

# (boxes, first kept, IoU): demo-cpu at test, R50 at test, training
CASES = ((1000, 100, 0.7), (6000, 300, 0.7), (12000, 2000, 0.7))


def first_kept(boxes: torch.Tensor, scores: torch.Tensor, t: float, keep: int) -> torch.Tensor:
    return torchvision.ops.nms(boxes, scores, t)[:keep]


def median_ms(fn, other, runs: int = 9) -> tuple[float, float]:
    a, b = [], []
    for i in range(runs):  # alternate who goes first, so a change of load hits both
        for f, acc in ((fn, a), (other, b)) if i % 2 else ((other, b), (fn, a)):
            start = time.perf_counter()
            f()
            acc.append(time.perf_counter() - start)
    return statistics.median(a) * 1e3, statistics.median(b) * 1e3


def main() -> None:
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()}")
    print("| boxes | first kept | IoU | torchvision ms | frcnn ms | ratio |\n|---:|---:|---:|---:|---:|---:|")
    for n, keep, t in CASES:
        boxes, scores = rpn_like(n)
        tv = partial(first_kept, boxes, scores, t, keep)
        fr = partial(nms, boxes, scores, t, keep)
        assert torch.equal(tv(), fr())
        tv_ms, fr_ms = median_ms(tv, fr)
        print(f"| {n} | {keep} | {t} | {tv_ms:.1f} | {fr_ms:.1f} | {tv_ms / fr_ms:.2f}x |")


if __name__ == "__main__":
    main()
