"""Mixed precision on a CPU: demo-cpu inference and training steps at 320 px in float32 and in bf16 autocast.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_precision.py               # this CPU as it is
    PYTHONPATH=src .venv/bin/python benchmarks/bench_precision.py --isa avx2    # the same CPU limited to AVX2
    options: --rounds N, --threads N, --no-write (else benchmarks/results/precision.md, a section per --isa)

``--isa avx2`` sets ``ATEN_CPU_CAPABILITY=avx2`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` before torch is imported, so
PyTorch's kernels and oneDNN's convolutions use only AVX2, as on a CPU without AVX-512 (and so without native
bf16 instructions): the nearest this machine comes to an AVX2-only CPU.

Both modes run the very same seeded, untrained model (20 classes) through :class:`frcnn.engine.precision.Precision`
as ``Predictor.predict`` and a training loop do: inference is ``model(images, sizes)`` under ``no_grad`` and
``autocast``; a training step is the forward with ground truth, ``backward_step`` (backward and an SGD step).
Per round each mode runs over the same images, in an order that alternates every round; reported are the
medians over rounds of the time per image, their ratio, and where inference time goes (per stage, from traced
runs, the modes alternating in the same way). Correctness (bf16 detections against fp32 ones on trained weights,
a bf16 training run that learns) is tested in ``tests/test_precision.py``, not here.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "--isa" in sys.argv and sys.argv[sys.argv.index("--isa") + 1].lower() == "avx2":
    os.environ["ATEN_CPU_CAPABILITY"] = "avx2"  # must be set before torch is imported
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from frcnn.config import load_config  # noqa: E402
from frcnn.data.synthetic import render_scene  # noqa: E402
from frcnn.engine.precision import Precision  # noqa: E402
from frcnn.engine.train import build_optimizer  # noqa: E402
from frcnn.model.detector import FasterRCNN  # noqa: E402
from frcnn.model.trace import Trace  # noqa: E402
from frcnn.transforms import batch_images, image_to_tensor, prep_image  # noqa: E402

MODES = ("none", "bf16")
CPU = torch.device("cpu")


def _inputs(cfg, n: int) -> list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]]:
    out = []
    for i in range(n):
        scene = render_scene(np.random.default_rng([11, i]), 320, 320)
        p = prep_image(image_to_tensor(scene.image), cfg.TEST.SCALES[0], cfg.TEST.MAX_SIZE, cfg.PIXEL_MEANS,
                       cfg.PIXEL_STDS)
        images, sizes = batch_images([p.tensor])
        boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32) * p.scale
        labels = torch.arange(1, len(scene.objects) + 1).clamp(max=20)
        out.append((images, sizes, [boxes], [labels]))
    return out


def _timed_rounds(run: dict, inputs: list, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            start = time.perf_counter()
            for x in inputs:
                run[mode](x)
            times[mode].append((time.perf_counter() - start) / len(inputs))
    return times


def bench(rounds: int, images: int) -> dict:
    cfg = load_config("demo-cpu", ["DEVICE=cpu"])
    inputs = _inputs(cfg, images)
    torch.manual_seed(0)
    model = FasterRCNN(cfg, 20, load_pretrained=False).eval()
    precision = {m: Precision(m, CPU) for m in MODES}

    def infer(mode, x):
        with torch.no_grad(), precision[mode].autocast():
            return model(x[0], x[1])

    for mode in MODES:  # warm-up
        for x in inputs:
            infer(mode, x)
    infer_times = _timed_rounds({m: (lambda x, m=m: infer(m, x)) for m in MODES}, inputs, rounds)
    per_stage: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}

    def traced(mode, x):
        trace = Trace()
        with torch.no_grad(), precision[mode].autocast():
            model(x[0], x[1], trace=trace)
        for k, v in trace.timings.items():
            per_stage[mode].setdefault(k, []).append(v)

    _timed_rounds({m: (lambda x, m=m: traced(m, x)) for m in MODES}, inputs, max(3, rounds // 3))
    stages = {m: {k: 1000 * statistics.median(v) for k, v in per_stage[m].items()} for m in MODES}

    train_models = {}
    for mode in MODES:
        torch.manual_seed(0)
        m = FasterRCNN(cfg, 20, load_pretrained=False).train()
        train_models[mode] = (m, build_optimizer(m, cfg.TRAIN))

    def step(mode, x):
        m, optimizer = train_models[mode]
        with precision[mode].autocast():
            losses = m(x[0], x[1], x[2], x[3], torch.Generator().manual_seed(0))
        optimizer.zero_grad(set_to_none=True)
        precision[mode].backward_step(sum(losses.values()), optimizer)

    for mode in MODES:  # warm-up
        step(mode, inputs[0])
    train_times = _timed_rounds({m: (lambda x, m=m: step(m, x)) for m in MODES}, inputs, rounds)
    return {"input": tuple(inputs[0][0].shape[-2:]), "images": images, "rounds": rounds, "stages": stages,
            "inference": infer_times, "train": train_times}


def markdown(result: dict, threads: int, command: str, load: tuple) -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    flags = sorted({f for f in open("/proc/cpuinfo").read().split() if f in ("avx2", "avx512f", "avx512_bf16",
                                                                              "amx_bf16", "amx_tile")})
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    env = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    lines = [
        f"## `get_cpu_capability()` = {capability}" + (f" (limited: {env})" if env else ""),
        "",
        f"Command: `{command}`  ",
        f"Machine: {model}, {os.cpu_count()} logical cores (shared), CPU flags {', '.join(flags)}; torch "
        f"{torch.__version__}, Python {platform.python_version()}; torch threads {threads}; "
        f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; load average at start "
        f"{tuple(round(v, 2) for v in load[0])}, at end {tuple(round(v, 2) for v in load[1])}.",
        "",
        f"demo-cpu, network input {result['input']}, untrained seeded model with 20 classes, {result['images']} "
        f"synthetic images; medians over {result['rounds']} rounds, the modes alternating which goes first.",
        "",
        "| | fp32 ms per image | bf16 ms per image | bf16 / fp32 |",
        "|---|---:|---:|---:|",
    ]
    for name in ("inference", "train"):
        t = {m: 1000 * statistics.median(v) for m, v in result[name].items()}
        label = ("inference (`TEST.AMP`)" if name == "inference"
                 else "training step (`TRAIN.AMP`: forward, backward, SGD)")
        lines.append(f"| {label} | {t['none']:.1f} | {t['bf16']:.1f} | {t['bf16'] / t['none']:.2f} |")
    lines += ["", "Inference per stage (median ms per image over traced passes, rounds as above):", "",
              "| stage | fp32 | bf16 |", "|---|---:|---:|"]
    fp32_stages, bf16_stages = result["stages"]["none"], result["stages"]["bf16"]
    for k in fp32_stages:
        lines.append(f"| {k} | {fp32_stages[k]:.1f} | {bf16_stages.get(k, float('nan')):.1f} |")
    lines += ["", "All rounds (ms per image):", ""]
    for name in ("inference", "train"):
        for m, v in result[name].items():
            lines.append(f"- {name} {m}: {', '.join(f'{1000 * t:.1f}' for t in v)}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--isa", choices=("native", "avx2"), default="native")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    result = bench(args.rounds, args.images)
    command = "PYTHONPATH=src .venv/bin/python " + " ".join(["benchmarks/bench_precision.py", *sys.argv[1:]])
    text = markdown(result, args.threads, command, (load0, os.getloadavg()))
    print(text)
    if args.no_write:
        return
    out = Path(__file__).parent / "results" / "precision.md"
    header = "# Mixed precision on a CPU: demo-cpu fp32 vs bf16 autocast\n\nScript: `benchmarks/bench_precision.py` " \
             "(its docstring says what is timed). One section per `--isa`; a new run replaces its own section.\n"
    sections: dict[str, str] = {}
    if out.is_file():
        for part in out.read_text().split("\n## ")[1:]:
            sections["## " + part.split("\n", 1)[0]] = "## " + part.rstrip("\n") + "\n"
    title = text.split("\n", 1)[0]
    sections = {k: v for k, v in sections.items() if k.split(" (limited")[0] != title.split(" (limited")[0]}
    sections[title] = text
    out.write_text(header + "\n" + "\n".join(sections[k] for k in sorted(sections, reverse=True)))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
