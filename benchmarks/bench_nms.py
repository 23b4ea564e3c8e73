"""NMS: frcnn.ops.nms (blocked, PyTorch ops) vs torchvision's CPU kernel, side by side in one run.

    .venv/bin/python benchmarks/bench_nms.py [--repeats 7] [--sizes 1000,6000,12000]

Inputs are built like the proposal layer builds them: random deltas (std 0.1) decoded on the real anchors of a
600x1000 image (38x63 cells x 9 anchors), clipped, objectness peaked around a few objects, the top N by score,
exclusive corners; plus boxes clustered around 300 centres and uniform random boxes. For each input both
implementations run alternately (so load changes hit both), the kept indices are checked equal, and the table
gives the median of the repeats in ms and the ratio torchvision / frcnn, with 2 threads and with 1. frcnn's
blocked path is forced at every size here (``MIN_BOXES = 0``) to show the crossover.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torchvision

from frcnn.boxes import bbox_transform_inv, clip_boxes, to_exclusive
from frcnn.model.anchors import generate_anchors, shift_anchors
from frcnn.ops import nms as nms_mod


def rpn_like(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    anchors = shift_anchors(generate_anchors(), 38, 63, 16)
    boxes = clip_boxes(bbox_transform_inv(anchors, torch.randn(anchors.shape[0], 4, generator=g) * 0.1), 600, 1000)
    centres = torch.rand(12, 2, generator=g) * torch.tensor([1000.0, 600.0])
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    d = torch.cdist(ctr, centres).min(1).values
    scores = torch.sigmoid(-d / 60 + 0.5 * torch.rand(anchors.shape[0], generator=g))
    top, order = scores.topk(n)
    return to_exclusive(boxes[order]), top


def clustered(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(300, 2, generator=g) * torch.tensor([1000.0, 600.0])
    size = torch.rand(300, 2, generator=g) * 200 + 20
    which = torch.randint(300, (n,), generator=g)
    ctr = c[which] + torch.randn(n, 2, generator=g) * size[which] * 0.1
    wh = size[which] * (1 + torch.randn(n, 2, generator=g) * 0.1)
    return torch.cat((ctr - wh / 2, ctr + wh / 2), 1), torch.rand(n, generator=g)


def uniform(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([1000.0, 600.0])
    return torch.cat((xy, xy + 1 + torch.rand(n, 2, generator=g) * 200), 1), torch.rand(n, generator=g)


CASES = [("rpn", rpn_like, 0.7), ("rpn", rpn_like, 0.3), ("clustered", clustered, 0.7), ("uniform", uniform, 0.5)]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sizes", default="1000,6000,12000")
    ap.add_argument("--threads", default="2,1")
    args = ap.parse_args()
    nms_mod.MIN_BOXES = 0
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {cpu_model()}, {os.cpu_count()} cores")
    print(f"load average at start {os.getloadavg()}; BLOCK {nms_mod.BLOCK}, TILE {nms_mod.TILE}, "
          f"CHUNK {nms_mod.CHUNK}, CELL {nms_mod.CELL}, MAX_CELLS {nms_mod.MAX_CELLS}, TAIL {nms_mod.TAIL}")
    print()
    print("| threads | input | IoU thr | N | kept | torchvision ms | frcnn ms | ratio | identical |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for threads in (int(x) for x in args.threads.split(",")):
        torch.set_num_threads(threads)
        for n in (int(x) for x in args.sizes.split(",")):
            for name, make, t in CASES:
                boxes, scores = make(n)
                tv, fr, same = [], [], True
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    want = torchvision.ops.nms(boxes, scores, t)
                    t1 = time.perf_counter()
                    got = nms_mod.nms(boxes, scores, t)
                    t2 = time.perf_counter()
                    tv.append(t1 - t0)
                    fr.append(t2 - t1)
                    same &= torch.equal(got, want)
                a, b = statistics.median(tv) * 1e3, statistics.median(fr) * 1e3
                print(f"| {threads} | {name} | {t} | {n} | {len(want)} | {a:.1f} | {b:.1f} | {a / b:.2f} | {same} |",
                      flush=True)
    print()
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
