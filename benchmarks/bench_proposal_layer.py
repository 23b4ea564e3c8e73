"""The proposal layer's pre-NMS selection: a stable sort of every anchor's score vs ``stable_top_k``.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_proposal_layer.py [--threads 1] [--repeats 200]

Rows: the top-k alone (``sort(descending=True, stable=True)[:, :k]`` vs :func:`frcnn.model.rpn.stable_top_k`, the
same indices, checked on every row), and the whole proposal layer as it was before (decode every anchor, sort
all, pick the top k: the ``before`` function below, a transcription of the earlier code) vs
:func:`frcnn.model.rpn.proposal_layer` now (pick the top k, decode only them), same rois and scores checked.
Settings: demo-cpu / scratch-cpu at 320x512 (stride 8, 9 anchors: 23040; top 1000 -> NMS 0.7 -> 100) and the
voc-r50-c4 preset at 600x1000 (stride 16: 21546 anchors; test 6000 -> 300, training 12000 -> 2000). Scores and
deltas are random (peaked objectness, deltas std 0.1). Median of ``--repeats`` calls, alternated.
"""

from __future__ import annotations

import argparse
import os
import statistics
from functools import partial

import torch

from frcnn.boxes import bbox_transform_inv, clip_boxes, nms_threshold, to_exclusive
from frcnn.engine.benchmark import alternated, machine_info
from frcnn.model.anchors import generate_anchors, shift_anchors
from frcnn.model.rpn import proposal_layer, stable_top_k
from frcnn.ops.nms import nms

SETTINGS = (  # name, map h, w, stride, anchor scales, pre, post
    ("demo-cpu 320x512 test", 40, 64, 8, (2, 4, 8), 1000, 100),
    ("voc-r50-c4 600x1000 test", 38, 63, 16, (8, 16, 32), 6000, 300),
    ("voc-r50-c4 600x1000 train", 38, 63, 16, (8, 16, 32), 12000, 2000),
)


def before(fg, deltas, anchors, sizes, pre, post, thresh):
    """The proposal layer of one image as it was: decode all anchors, stable-sort all scores, take the top."""
    boxes = clip_boxes(bbox_transform_inv(anchors, deltas[0]), float(sizes[0, 0]), float(sizes[0, 1]))
    order = fg[0].sort(descending=True, stable=True)[1][:pre]
    keep = nms(to_exclusive(boxes[order]), fg[0, order], nms_threshold(thresh, boxes.dtype), post)
    return boxes[order][keep], fg[0, order][keep]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m = machine_info()
    print(f"machine: {m['cpu']}, {m['capability']}, {m['cores']} cores, {args.threads} threads, torch {m['torch']}, "
          f"load {[round(x, 2) for x in os.getloadavg()]}")
    print("| setting | anchors | top k | sort all ms | stable_top_k ms | ratio | layer before ms | layer now ms "
          "| ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    for name, h, w, stride, scales, pre, post in SETTINGS:
        anchors = shift_anchors(generate_anchors(scales=scales), h, w, stride)
        n = anchors.shape[0]
        fg = torch.rand(1, n, generator=g) ** 8  # peaked: few high scores, as a trained RPN
        deltas = torch.randn(1, n, 4, generator=g) * 0.1
        sizes = torch.tensor([[h * stride, w * stride]], dtype=torch.float32)
        k = min(pre, n)
        assert torch.equal(stable_top_k(fg, k), fg.sort(dim=1, descending=True, stable=True)[1][:, :k])
        rois, scores = proposal_layer(fg, deltas, anchors, sizes, pre, post, 0.7)
        ref_rois, ref_scores = before(fg, deltas, anchors, sizes, pre, post, 0.7)
        assert torch.equal(rois[:, 1:], ref_rois) and torch.equal(scores, ref_scores)
        args_ = (fg, deltas, anchors, sizes, pre, post, 0.7)
        times = alternated({"sort": partial(torch.sort, fg, dim=1, descending=True, stable=True),
                            "topk": partial(stable_top_k, fg, k),
                            "before": partial(before, *args_), "now": partial(proposal_layer, *args_)}, args.repeats)
        t = {name: statistics.median(v) * 1e6 for name, v in times.items()}
        print(f"| {name} | {n} | {k} | {t['sort'] / 1e3:.2f} | {t['topk'] / 1e3:.2f} | {t['sort'] / t['topk']:.1f}x | "
              f"{t['before'] / 1e3:.2f} | {t['now'] / 1e3:.2f} | {t['before'] / t['now']:.2f}x |")


if __name__ == "__main__":
    main()
