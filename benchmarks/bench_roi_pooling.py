"""RoI pooling on the CPU: torchvision's kernels (and the grid_sample crop) against frcnn.ops.roi_ops.

    .venv/bin/python benchmarks/bench_roi_pooling.py [--repeats 5] [--out benchmarks/results/roi_pooling.md]

Settings: R50-C4 (300 RoIs, 1024 channels, 38x63 map at stride 16, POOLING_SIZE 7, crop sampled at 14),
demo-cpu (100 RoIs, 128 channels, the stride-8 map of a 320x320 image) and scratch-cpu's training batch (4 images of
320x427, 64 RoIs each, 128 channels at stride 8; ``--settings scratch-cpu`` for it alone). RoIs: centres uniform over
the image,
sides log-uniform from 16 pixels to the image's size (clipped), like proposals. Each mode, forward and
forward+backward, 2 threads and 1 thread, reference and frcnn timed alternately in one run: median ms, ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torchvision
import torchvision.ops as tvo

from frcnn.model.pooling import crop_pool_grid_sample
from frcnn.ops import roi_ops

SETTINGS = {"R50-C4": dict(c=1024, h=38, w=63, stride=16, rois=300, image=(600, 1000)),
            "demo-cpu": dict(c=128, h=40, w=40, stride=8, rois=100, image=(320, 320)),
            "scratch-cpu": dict(c=128, h=40, w=54, stride=8, rois=64, image=(320, 427), images=4)}


def make_rois(count: int, image: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ih, iw = image
    size = torch.tensor([iw, ih], dtype=torch.float32)
    centre = torch.rand(count, 2, generator=g) * size
    side = torch.exp(torch.rand(count, 2, generator=g) * (torch.log(size) - 2.77) + 2.77)
    lo = (centre - side / 2).clamp(min=0)
    hi = torch.minimum(centre + side / 2, size - 1)
    return torch.cat((torch.zeros(count, 1), lo, hi), 1)


def implementations(size: int, stride: int):
    s = 1 / stride
    return {
        "align": (lambda x, r: tvo.roi_align(x, r, (size, size), s, 0), lambda x, r: roi_ops.roi_align(x, r, size, s)),
        "crop": (lambda x, r: crop_pool_grid_sample(x, r, size, stride),
                 lambda x, r: roi_ops.crop_pool(x, r, size, stride)),
        "pool": (lambda x, r: tvo.roi_pool(x, r, (size, size), s), lambda x, r: roi_ops.roi_pool(x, r, size, s)),
    }


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    lines = [
        "# RoI pooling: torchvision's CPU kernels vs frcnn.ops.roi_ops",
        "",
        f"Command: `{' '.join(['.venv/bin/python', *sys.argv])}`  ",
        f"CPU: {cpu}, {os.cpu_count()} cores, capability {torch.backends.cpu.get_cpu_capability()}; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}  ",
        f"Load average at start: {os.getloadavg()}",
        "",
        "Reference: torchvision `roi_align` (aligned=False, sampling_ratio 0) / `roi_pool`, and for crop today's "
        "`affine_grid` + `grid_sample` + `max_pool2d` (`crop_pool_grid_sample`). Median of "
        f"{args.repeats} runs after one warm-up, reference and frcnn alternating. ratio = reference / frcnn.",
        "",
        "| setting | mode | pass | threads | reference ms | frcnn ms | ratio | load avg |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)
    for name in args.settings:
        st = SETTINGS[name]
        images = st.get("images", 1)
        g = torch.Generator().manual_seed(1)
        features = torch.randn(images, st["c"], st["h"], st["w"], generator=g)
        rois = torch.cat([make_rois(st["rois"], st["image"], seed=i) + torch.tensor([float(i), 0, 0, 0, 0])
                          for i in range(images)])
        grad_out = torch.randn(rois.shape[0], st["c"], 7, 7, generator=g)
        for threads in (2, 1):
            torch.set_num_threads(threads)
            for mode, pair in implementations(7, st["stride"]).items():
                for backward in (False, True):
                    def run(fn, backward=backward, features=features, rois=rois, grad_out=grad_out):
                        if not backward:
                            with torch.no_grad():
                                fn(features, rois)
                            return
                        x = features.detach().requires_grad_()
                        fn(x, rois).backward(grad_out)
                    times: tuple[list[float], list[float]] = ([], [])
                    for k in (0, 1):
                        run(pair[k])  # warm-up
                    for _ in range(args.repeats):
                        for k in (0, 1):
                            times[k].extend(timed(lambda fn=pair[k], run=run: run(fn), 1))
                    ref, ours = statistics.median(times[0]), statistics.median(times[1])
                    row = (f"| {name} | {mode} | {'fwd+bwd' if backward else 'fwd'} | {threads} | {ref:.1f} | "
                           f"{ours:.1f} | {ref / ours:.2f}x | {os.getloadavg()[0]:.1f} |")
                    lines.append(row)
                    print(row, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
