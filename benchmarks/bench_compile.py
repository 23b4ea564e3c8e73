"""torch.compile on the fast path: the convolution-heavy modules (the head, and the tail with dynamic shapes since
the RoI count varies) compiled, the rest eager (NMS and sampling have data-dependent shapes). R50-C4, one 600x1000
input, random weights with the forced RPN of ``frcnn benchmark``; median of 3 after one call, and that first
call's time (the compile cost a user would pay).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_compile.py
"""

from __future__ import annotations

import os
import time

import torch

from frcnn.config import load_config
from frcnn.engine.benchmark import median_time, random_rpn
from frcnn.engine.fast import prepare_for_inference
from frcnn.model.detector import FasterRCNN


@torch.no_grad()
def main() -> None:
    cfg = load_config("voc-r50-c4", ["DEVICE=cpu", "PRETRAINED=frozen-bn.pth"])  # frozen BN; the file is not read
    torch.manual_seed(0)
    model = FasterRCNN(cfg, 20, load_pretrained=False).eval()
    random_rpn(model)
    x, sizes = torch.randn(1, 3, 600, 1000), torch.tensor([[600, 1000]])
    eager = prepare_for_inference(model)
    eager(x, sizes)
    eager_s = median_time(lambda: eager(x, sizes), 3)
    compiled = prepare_for_inference(model)
    compiled.head = torch.compile(compiled.head)
    compiled.classifier.tail = torch.compile(compiled.classifier.tail, dynamic=True)
    start = time.perf_counter()
    compiled(x, sizes)
    first_s = time.perf_counter() - start
    compiled_s = median_time(lambda: compiled(x, sizes), 3)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()}")
    print(f"R50-C4 600x1000 fast path: eager {eager_s:.3f} s, torch.compile (head + tail) {compiled_s:.3f} s, "
          f"first call {first_s:.1f} s")


if __name__ == "__main__":
    main()
