"""Fast-mode trade-off: seconds per image and mAP of a trained checkpoint with fewer RoIs at the tail, bf16
autocast and int8 tail, on a VOC test split (BCCD test for ``benchmarks/results/fast_mode.md``).

Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_fast_mode.py --checkpoint DIR --data VOC_ROOT --split test \\
        [--threads 1] [--rounds 5] [--out benchmarks/results/fast_mode.md | --no-write]

Rows (each the checkpoint's config with, in memory only, the keys the row names):

- ``TEST.RPN_POST_NMS_TOP_N`` 300 / 150 / 100 / 50 in float32 (and the checkpoint's own value: the default row);
- ``TEST.AMP=bf16`` at the default RoI count and at the fewer-RoI counts, only where the CPU has native bf16
  (:func:`frcnn.engine.fast_mode.native_bf16`: capability AVX512 and avx512_bf16/amx_bf16); elsewhere bf16 is
  5-100x slower (``benchmarks/results/precision.md``) and the rows are left out;
- int8 (:func:`frcnn.engine.fast_mode.quantize_tail`): ``torch.ao.quantization.quantize_dynamic`` of the
  classification network's Linear layers (the tiny tail's two fully connected layers, the class score and box
  layers; int8 weights, activations quantized per call, in float32 outside autocast), alone and with bf16;
- ``--quick``: the predictor ``frcnn eval --quick`` builds (:func:`frcnn.engine.fast_mode.quick_predictor`:
  bf16 where native, the int8 tail and, on CPUs with VNNI, the backbone head and the RPN's 3x3 convolution in
  static int8, calibrated on the first 4 images of the first pass (which run them in float), at the checkpoint's
  own RoI count).

Every row runs the fast inference path (``Predictor.from_checkpoint``'s default: BatchNorm folded, channels-last
on AVX-512), one image per ``predict`` call, as ``frcnn eval`` does. mAP (VOC07, as ``frcnn eval``) and per-class AP
come from a first pass over the whole split, which is also the warm-up. Then ``--rounds`` timed rounds: in each
round every image goes through every row, the rows in an order rotated per image and per round (so a row is not
always first after a load change), each ``predict`` call timed alone. Per row and image the median over rounds;
reported are the median over images (s / image), the sum over images (total s for the split), and the ratio to
the default row as the median over images of the per-image ratios (paired on the same image, so robust to the
load of a shared machine drifting slowly).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from frcnn.data import open_repaired
from frcnn.engine.benchmark import machine_info
from frcnn.engine.checkpoint import load_model, read_checkpoint
from frcnn.engine.evaluate import score_detections
from frcnn.engine.fast import prepare_for_inference
from frcnn.engine.fast_mode import (
    BF16_FLAGS,
    cpu_flags,
    native_bf16,
    quantize_convs,
    quantize_tail,
    quick_overrides,
    quick_predictor,
)
from frcnn.engine.inference import Predictor

ROIS = (300, 150, 100, 75, 50)


@dataclass(frozen=True)
class Row:
    rois: int
    amp: str = "none"
    int8: bool = False
    quick: bool = False  # built by frcnn.engine.fast_mode.quick_predictor, as `frcnn eval --quick` does
    int8_head: bool = False  # quick mode's int8 backbone head and RPN conv (where the CPU has VNNI)

    @property
    def name(self) -> str:
        if self.quick:
            convs = " + int8 head and RPN conv" if self.int8_head else ""
            return f"--quick ({'bf16' if self.amp == 'bf16' else 'fp32'}{convs}" \
                   f"{' + int8 tail' if self.int8 else ''}, {self.rois} RoIs)"
        precision = {"none": "fp32", "bf16": "bf16"}[self.amp] + (" + int8 tail" if self.int8 else "")
        return f"{precision}, {self.rois} RoIs"


def build(checkpoint: Path, row: Row) -> Predictor:
    if row.quick:
        return quick_predictor(checkpoint, "cpu", say=print)
    model, ckpt = load_model(checkpoint, "cpu", overrides={"TEST": {"RPN_POST_NMS_TOP_N": row.rois, "AMP": row.amp}})
    model = prepare_for_inference(model, inplace=True)
    if row.int8 and not quantize_tail(model):
        raise RuntimeError("dynamic int8 quantization is not available in this PyTorch")
    return Predictor(model, ckpt.cfg, ckpt.class_names)


def rows_for(default: Row, bf16: bool, int8: bool, quick: Row) -> list[Row]:
    """fp32 at every RoI count; bf16, int8 and both at the default count and fewer; the --quick row."""
    counts = sorted(set(ROIS) | {default.rois}, reverse=True)
    rows = [Row(n) for n in counts]
    fewer = [n for n in counts if n <= default.rois]
    if bf16:
        rows += [Row(n, "bf16") for n in fewer]
    if int8:
        rows += [Row(n, "none", True) for n in fewer if n in (default.rois, min(fewer))]
        if bf16:
            rows += [Row(n, "bf16", True) for n in fewer]
    return rows + [quick]


def run(args: argparse.Namespace) -> dict:
    ckpt = read_checkpoint(args.checkpoint)
    default = Row(ckpt.cfg.TEST.RPN_POST_NMS_TOP_N, ckpt.cfg.TEST.AMP)
    if default.amp != "none":
        sys.exit(f"{args.checkpoint}: TEST.AMP={default.amp}; this benchmark expects a float32 checkpoint")
    bf16 = native_bf16("cpu") or args.force_bf16
    quick = quick_overrides(ckpt.cfg, "cpu")["TEST"]
    int8_head = quantize_convs(load_model(args.checkpoint, "cpu")[0])  # does this CPU get quick mode's int8 convs?
    quick_row = Row(default.rois, quick["AMP"], torch.backends.quantized.engine != "none", True, int8_head)
    rows = rows_for(default, bf16, not args.no_int8, quick_row)
    dataset = open_repaired(args.data, args.split, classes=ckpt.class_names)
    images = [dataset.load_image(dataset[i]) for i in range(len(dataset))]
    for im in images:
        im.load()
    if args.images:
        timed_images = list(range(0, len(images), max(1, len(images) // args.images)))[:args.images]
    else:
        timed_images = list(range(len(images)))
    predictors, results, failed = {}, {}, {}
    for row in rows:
        print(f"[{time.strftime('%H:%M:%S')}] {row.name}: detecting {len(images)} images", flush=True)
        try:
            predictor = build(args.checkpoint, row)
            started = time.perf_counter()
            detections = [predictor.predict([im])[0] for im in images]
            elapsed = time.perf_counter() - started
        except Exception as e:  # noqa: BLE001 - an optional row that does not work is reported, not fatal
            failed[row.name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"  failed: {failed[row.name]}", flush=True)
            continue
        predictors[row] = predictor
        result = score_detections(dataset, detections, "voc07")
        results[row] = {"map": result["map"], "per_class": result["per_class"], "first_pass_s": elapsed,
                        "detections_per_image": statistics.mean(len(d.scores) for d in detections)}
        print(f"  mAP {result['map']:.4f} ({elapsed:.1f} s)", flush=True)
    rows = [r for r in rows if r in predictors]
    times: dict[Row, dict[int, list[float]]] = {r: {i: [] for i in timed_images} for r in rows}
    for rnd in range(args.rounds):
        started = time.perf_counter()
        for k, i in enumerate(timed_images):
            shift = (rnd * len(timed_images) + k) % len(rows)
            for row in rows[shift:] + rows[:shift]:
                t0 = time.perf_counter()
                predictors[row].predict([images[i]])
                times[row][i].append(time.perf_counter() - t0)
        print(f"[{time.strftime('%H:%M:%S')}] round {rnd + 1}/{args.rounds}: {time.perf_counter() - started:.0f} s",
              flush=True)
    per_image = {r: {i: statistics.median(v) for i, v in times[r].items()} for r in rows}
    out_rows = []
    for row in rows:
        t = per_image[row]
        ratios = [t[i] / per_image[default][i] for i in timed_images]
        out_rows.append({
            "name": row.name, "rois": row.rois, "amp": row.amp, "int8": row.int8, "quick": row.quick,
            "default": row == default,
            "s_per_image": statistics.median(t.values()), "total_s": sum(t.values()),
            "ratio_to_default": statistics.median(ratios), "speedup": 1.0 / statistics.median(ratios),
            "map": results[row]["map"], "map_points_vs_default": 100 * (results[row]["map"] - results[default]["map"]),
            "per_class": results[row]["per_class"], "detections_per_image": results[row]["detections_per_image"],
            "first_pass_s": results[row]["first_pass_s"],
            "rounds_s_per_image": [statistics.median(t_i[r] for t_i in times[row].values())
                                   for r in range(args.rounds)],
        })
    return {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split,
            "images": len(images), "timed_images": len(timed_images), "rounds": args.rounds,
            "default": default.name, "native_bf16": native_bf16("cpu"),
            "rows": out_rows, "failed": failed, "classes": list(ckpt.class_names)}


def markdown(result: dict, machine: dict, command: str) -> str:
    flags = sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", *BF16_FLAGS, "amx_tile"))
    classes = result["classes"]
    lines = [
        f"# Fast mode: fewer RoIs, bf16, int8 tail on {Path(result['data']).name} {result['split']}",
        "",
        "Script: `benchmarks/bench_fast_mode.py` (its docstring says what is timed and how).",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine['cpu']}, {machine['cores']} logical cores shared with other jobs "
        f"(load average at start {machine['load_start']}, at end {machine['load_end']}), "
        f"`get_cpu_capability()` = {machine['capability']}, CPU flags {', '.join(flags)}, native bf16: "
        f"{result['native_bf16']}; torch {machine['torch']}, Python {platform.python_version()}, torch threads "
        f"{machine['threads']}; {machine['date']}.",
        "",
        f"Checkpoint `{result['checkpoint']}`, data `{result['data']}` split `{result['split']}` "
        f"({result['images']} images; mAP on all of them, VOC07 as `frcnn eval`); time per image over "
        f"{result['timed_images']} images x {result['rounds']} rounds, rows interleaved; fast inference path on; "
        f"default row = the checkpoint's config ({result['default']}).",
        "",
        "| row | s / image (median) | total s | time / default | speed-up | mAP | mAP points vs default | "
        + " | ".join(f"AP {c}" for c in classes) + " |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(classes),
    ]
    for r in result["rows"]:
        name = f"**{r['name']} (default)**" if r["default"] else r["name"]
        aps = " | ".join("n/a" if r["per_class"][c] is None else f"{r['per_class'][c]:.4f}" for c in classes)
        lines.append(f"| {name} | {r['s_per_image']:.4f} | {r['total_s']:.2f} | {r['ratio_to_default']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['map']:.4f} | {r['map_points_vs_default']:+.2f} | {aps} |")
    rows = [r for r in result["rows"] if not r["name"].startswith("--quick")]
    quick = next((r for r in result["rows"] if r["name"].startswith("--quick")), None)
    best = min((r for r in rows if r["map_points_vs_default"] >= -0.5), key=lambda r: r["ratio_to_default"])
    fastest = min(rows, key=lambda r: r["ratio_to_default"])
    lines += ["", f"Fastest row within 0.5 mAP points of the default: **{best['name']}**, {best['speedup']:.2f}x, "
                  f"{best['map_points_vs_default']:+.2f} points. Fastest row: {fastest['name']}, "
                  f"{fastest['speedup']:.2f}x, {fastest['map_points_vs_default']:+.2f} points."]
    if quick is not None:
        lines[-1] += (f" `--quick` (what `frcnn eval --quick` builds on this machine): {quick['speedup']:.2f}x, "
                      f"{quick['map_points_vs_default']:+.2f} points; it keeps the checkpoint's RoI count "
                      "(TEST.RPN_POST_NMS_TOP_N).")
    if result["failed"]:
        lines += ["", "Rows that did not run:", ""] + [f"- {k}: {v}" for k, v in result["failed"].items()]
    lines += ["", "Per round (median over images, s / image), to judge the noise of a shared machine:", ""]
    for r in result["rows"]:
        lines.append(f"- {r['name']}: {', '.join(f'{t:.4f}' for t in r['rounds_s_per_image'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images", type=int, help="time only this many images, evenly spaced (default: all)")
    parser.add_argument("--no-int8", action="store_true", help="leave out the int8 rows")
    parser.add_argument("--force-bf16", action="store_true",
                        help="bf16 rows even without native bf16 (slow: for the record only)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fast_mode.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = tuple(round(v, 2) for v in os.getloadavg())
    result = run(args)
    machine = {**machine_info(), "load_start": load_start, "load_end": tuple(round(v, 2) for v in os.getloadavg()),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS", "ATEN_CPU_CAPABILITY") if k in os.environ)
    command = env + "PYTHONPATH=src .venv/bin/python " + shlex.join([
        "benchmarks/bench_fast_mode.py", *sys.argv[1:]])
    text = markdown(result, machine, command)
    print(text)
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({**result, "machine": machine, "command": command},
                                                            indent=2) + "\n")
        print(f"written: {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
