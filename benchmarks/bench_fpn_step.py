"""Training-step time of the CPU presets' networks with and without the feature pyramid, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_fpn_step.py [--rounds 6] [--threads 1]

One 320x427 image (BCCD's training size under scratch-cpu) with three boxes, forward + backward of the training
losses, random weights (seed 0); the variants run interleaved, round by round, and the median of rounds 2.. is
printed with its ratio to scratch-cpu's C4 network. Variants: scratch-cpu (C4, stride 8, anchors [2, 4, 8] as auto
picks on BCCD), scratch-cpu-fpn (64 pyramid and RPN channels), the same pyramid at 128 channels, and the pyramid
with FEAT_STRIDE 8; every variant at 32 RoIs an image, as the results were measured (both presets have 64 now).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from frcnn.config import load_config  # noqa: E402
from frcnn.engine.benchmark import alternated  # noqa: E402
from frcnn.model.detector import FasterRCNN  # noqa: E402

VARIANTS = {
    "scratch-cpu (C4)": ("scratch-cpu", ["ANCHOR_SCALES=[2,4,8]", "TRAIN.BATCH_SIZE=32"]),
    "scratch-cpu-fpn (64 ch)": ("scratch-cpu-fpn", ["TRAIN.BATCH_SIZE=32"]),
    "FPN, 128 ch": ("scratch-cpu-fpn", ["FPN_CHANNELS=128", "RPN_CHANNELS=128", "TRAIN.BATCH_SIZE=32"]),
    "FPN, 64 ch, FEAT_STRIDE 8": ("scratch-cpu-fpn", ["FEAT_STRIDE=8", "TRAIN.BATCH_SIZE=32"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for name, (preset, overrides) in VARIANTS.items():
        torch.manual_seed(0)
        models[name] = FasterRCNN(load_config(preset, overrides), 3).train()
    image, sizes = torch.randn(1, 3, 320, 427), torch.tensor([[320, 427]])
    gt = [torch.tensor([[10.0, 20, 50, 60], [150, 30, 250, 130], [300, 200, 400, 300]])]
    labels = [torch.tensor([1, 2, 3])]
    def step(model: FasterRCNN, generator: torch.Generator) -> None:
        sum(model(image, sizes, gt, labels, generator).values()).backward()

    times = alternated({name: partial(step, model, torch.Generator().manual_seed(0)) for name, model in models.items()},
                       args.rounds - 1, warmup=1)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), median of rounds 2..{args.rounds}")
    base = statistics.median(times["scratch-cpu (C4)"])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:28s} {m:.3f} s/step  {m / base:.2f}x")


if __name__ == "__main__":
    main()
