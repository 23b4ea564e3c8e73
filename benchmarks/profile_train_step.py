"""Where a training step's time goes: ``torch.profiler`` over scratch-cpu steps on a VOC data set, and each of the
tiny backbone's convolutions timed alone (forward, input gradient, weight gradient).

Builds the model and the batches as ``frcnn train`` does (``TrainBatches``, SGD from ``build_optimizer``), runs 10
warm-up steps, times 20, profiles 10 more and prints the ops by self CPU time. ``--memory-format channels_last``
holds the model channels-last. Only ratios from one invocation are figures.

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/profile_train_step.py \\
        --data ../shared/datasets/BCCD/BCCD [--memory-format channels_last] [--convs]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from frcnn.config import load_config
from frcnn.data import open_repaired
from frcnn.engine.batches import TrainBatches
from frcnn.engine.train import build_optimizer
from frcnn.model.detector import FasterRCNN


def per_ms(f, n: int = 10) -> float:
    for _ in range(3):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n * 1000


def time_convs(model: FasterRCNN, images: torch.Tensor) -> None:
    """Each conv of the head on its real input (batch of the step): forward, input and weight gradients."""
    x = images
    for m in model.head:
        if isinstance(m, torch.nn.Conv2d):
            y = m(x)
            g = torch.randn_like(y)

            def grads(mask, m=m, x=x, g=g):
                return torch.ops.aten.convolution_backward(g, x, m.weight, None, m.stride, m.padding, m.dilation,
                                                           False, [0, 0], 1, mask)
            print(f"conv {m.in_channels:4d}->{m.out_channels:4d} stride {m.stride[0]} dilation {m.dilation[0]} "
                  f"on {tuple(x.shape)}: forward {per_ms(lambda m=m, x=x: m(x)):6.1f} ms, input gradient "
                  f"{per_ms(lambda: grads([True, False, False])):6.1f} ms, weight gradient "
                  f"{per_ms(lambda: grads([False, True, False])):6.1f} ms")
        with torch.no_grad():
            x = m(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="trainval")
    parser.add_argument("--config", default="scratch-cpu")
    parser.add_argument("--anchors", default="[2,4,8]", help="ANCHOR_SCALES (auto is resolved by frcnn train only)")
    parser.add_argument("--memory-format", choices=("contiguous", "channels_last"), default="contiguous")
    parser.add_argument("--convs", action="store_true", help="also time each backbone conv alone")
    args = parser.parse_args()
    cfg = load_config(args.config, [f"ANCHOR_SCALES={args.anchors}", "TRAIN.MAX_EPOCHS=0", "TRAIN.STEP_EPOCHS=[]",
                                    "TRAIN.MAX_ITERS=1000", "TRAIN.STEPSIZE=[]"])
    dataset = open_repaired(args.data, args.split)
    torch.manual_seed(0)
    model = FasterRCNN(cfg, len(dataset.classes), load_pretrained=False)
    if args.memory_format == "channels_last":
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = build_optimizer(model, cfg.TRAIN)
    batches = TrainBatches(dataset, cfg)

    def step(i: int) -> None:
        b = batches[i]
        losses = model(b.images, b.image_sizes, b.gt_boxes, b.gt_labels, generator=b.generators())
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    for i in range(10):
        step(i)
    t = time.perf_counter()
    for i in range(10, 30):
        step(i)
    print(f"{args.memory_format}: {(time.perf_counter() - t) / 20:.3f} s a step ({torch.get_num_threads()} threads)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(30, 40):
            step(i)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    if args.convs:
        time_convs(model, batches[40].images)


if __name__ == "__main__":
    main()
