"""Soft-NMS (frcnn.ops.soft_nms) against greedy per-class NMS, and its two ways of computing the decay, side by side.

    .venv/bin/python benchmarks/bench_soft_nms.py [--repeats 20] [--threads 1]

Inputs are the detector's dense layout at two sizes: 100 RoIs x 4 classes (demo-cpu: TEST.RPN_POST_NMS_TOP_N 100)
and 300 RoIs x 20 classes (the voc-* presets), random boxes of 5..65 px in a 360 px square and uniform scores, 100
kept (TEST.MAX_PER_IMAGE). Rows: soft-NMS with the decay table computed in one go, soft-NMS a row per kept box
(``PRECOMPUTE_LIMIT`` forced either way), and greedy ``batched_nms`` at 0.3 of the same boxes; the runs alternate
and the table gives the median ms of ``--repeats``. The library's choice (``PRECOMPUTE_LIMIT``) is marked.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from frcnn.boxes import to_exclusive
from frcnn.ops import soft_nms as soft_mod
from frcnn.ops.nms import batched_nms

SIZES = ((100, 4), (300, 20))


def inputs(r: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(r, k, 2, generator=g) * 300
    wh = torch.rand(r, k, 2, generator=g) * 60 + 5
    return torch.cat((xy, xy + wh), -1), torch.rand(r, k, generator=g)


def timings(r: int, k: int, repeats: int) -> dict[str, float]:
    """Median ms of each way on the (r, k) input, the runs alternating."""
    boxes, scores = inputs(r, k)
    labels = torch.arange(k).repeat(r)
    limit = soft_mod.PRECOMPUTE_LIMIT

    def soft(lim: int) -> None:
        soft_mod.PRECOMPUTE_LIMIT = lim
        soft_mod.soft_nms(boxes, scores, 0.5, 0.0, 100)

    def greedy() -> None:
        batched_nms(to_exclusive(boxes.reshape(-1, 4)), scores.reshape(-1), labels, 0.3)[:100]

    runs = {"one go": lambda: soft(1 << 62), "rows": lambda: soft(0), "greedy": greedy}
    times: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for f in runs.values():
            f()  # warm-up
        for _ in range(repeats):
            for name, f in runs.items():
                t = time.perf_counter()
                f()
                times[name].append(1000 * (time.perf_counter() - t))
    finally:
        soft_mod.PRECOMPUTE_LIMIT = limit
    return {name: statistics.median(v) for name, v in times.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print("| RoIs x classes | soft, in one go (ms) | soft, a row per kept box (ms) | greedy NMS 0.3 (ms) |")
    print("|---|---:|---:|---:|")
    for r, k in SIZES:
        median = timings(r, k, args.repeats)
        chosen = "one go" if k * r * r <= soft_mod.PRECOMPUTE_LIMIT else "rows"
        cells = [f"{median[n]:.2f}{' (chosen)' if n == chosen else ''}" for n in ("one go", "rows", "greedy")]
        print(f"| {r} x {k} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
