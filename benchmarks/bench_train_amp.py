"""Training speed in float32 and in bf16 autocast (``TRAIN.AMP``), side by side: seconds per iteration of ``frcnn
train`` for one preset on one data set.

Each round runs ``frcnn train --config CONFIG --set TRAIN.AMP=MODE --set TRAIN.MAX_ITERS=N`` (and any ``--set``
given) once per mode, in a child process with ``--threads`` threads, the modes alternating which goes first from
round to round; a run's figure is the mean of the logged per-iteration times after the first ``--skip``
iterations (warm-up: allocator, oneDNN's kernel choice). Prints one line per run, then the median per mode and the
ratio bf16 / float32. Only the ratio of rows from one invocation is a figure (machines of the same kind differ up
to 2x from one session to the next).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_train_amp.py --config scratch-cpu \\
        --data ../shared/datasets/BCCD/BCCD --split trainval --threads 2 --rounds 2

``--vary KEY=A,B`` times each value of one more config key the same way (alternating, medians given as a ratio to
the first value's), e.g. ``--vary NUM_WORKERS=0,1`` for data loading in the training process or in a worker:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_train_amp.py --config demo-cpu --data DEMO/data --amp bf16 \
        --vary NUM_WORKERS=0,1 --threads 1 --rounds 3

A list value keeps its brackets: ``--vary "TINY_WIDTHS=[32,64,128,128],[32,64,128,192]"``.

``--src DIR`` (repeatable) times the source tree ``DIR`` (``frcnn`` imported from it, e.g. a ``git worktree`` of an
earlier commit) instead of the installed one; with two or more, the trees alternate like the modes, and the
medians are also given as a ratio to the first tree's. ``--amp MODE`` times that mode alone.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_train_amp.py --config scratch-cpu \
        --data ../shared/datasets/BCCD/BCCD --amp bf16 --src /tmp/before/src --src src --threads 2 --rounds 3

bf16 is native only on CPUs with avx512_bf16 or amx_bf16 (``frcnn.engine.precision.native_bf16``); elsewhere it is
emulated and many times slower (``benchmarks/results/precision.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("none", "bf16")


def split_values(values: str) -> list[str]:
    """``--vary``'s values: split at commas, except those inside ``[...]`` (a list value's)."""
    return re.split(r",(?![^\[]*\])", values)


def run_once(args: argparse.Namespace, mode: str, out: Path, src: str | None = None, varied: str | None = None
             ) -> float:
    """Mean seconds per iteration of one ``frcnn train`` run (iterations after ``--skip``); ``varied``: one more
    ``KEY=VALUE`` for this run."""
    cmd = [sys.executable, "-m", "frcnn", "train", "--data", str(args.data), "--split", args.split,
           "--config", args.config, "--out", str(out), "--no-progress",
           "--set", f"TRAIN.AMP={mode}", "--set", "TRAIN.MAX_EPOCHS=0", "--set", "TRAIN.STEP_EPOCHS=[]",
           "--set", f"TRAIN.MAX_ITERS={args.iters}", "--set", "TRAIN.STEPSIZE=[]",
           "--set", f"TRAIN.DISPLAY={args.skip}", "--set", f"TRAIN.SNAPSHOT_ITERS={args.iters}",
           *(x for kv in [*args.sets, *([varied] if varied else [])] for x in ("--set", kv))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join((str(Path(src).resolve()), env.get("PYTHONPATH", "")))
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)  # frcnn's own one-line errors reach stderr
    if done.returncode != 0:
        raise SystemExit(f"bench_train_amp: frcnn train --config {args.config} --set TRAIN.AMP={mode}"
                         f"{'' if varied is None else ' --set ' + varied} failed "
                         f"(exit {done.returncode}; its message is above)")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in records if "time" in r and r["iteration"] > args.skip]
    return sum(times) / len(times)  # windows of equal length (DISPLAY iterations each)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="scratch-cpu")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="trainval")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--skip", type=int, default=50, help="warm-up iterations left out (also the logging window)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="another config change for every run (repeatable), e.g. TRAIN.BATCH_SIZE=32")
    p.add_argument("--src", action="append", default=[], metavar="DIR",
                   help="time frcnn imported from this source tree (repeatable: the trees alternate)")
    p.add_argument("--amp", choices=MODES, help="time this TRAIN.AMP mode only")
    p.add_argument("--vary", metavar="KEY=A,B", help="also time each of these values of one config key")
    args = p.parse_args(argv)
    if args.iters % args.skip or args.iters <= args.skip:
        p.error("--iters must be a multiple of --skip and larger")
    missing = [d for d in args.src if not (Path(d) / "frcnn" / "__init__.py").is_file()]
    if missing:
        p.error(f"--src {missing[0]} holds no frcnn package (give the folder that contains frcnn/)")
    modes = (args.amp,) if args.amp else MODES
    varied: list[str | None] = [None]
    if args.vary:
        key, _, values = args.vary.partition("=")
        if not key or not values:
            p.error(f"--vary {args.vary}: expected KEY=A,B")
        varied = [f"{key}={v}" for v in split_values(values)]
    runs = [(src, mode, v) for src in (args.src or [None]) for mode in modes for v in varied]
    results: dict[tuple, list[float]] = {run: [] for run in runs}
    name = " ".join([args.config, *(f"--set {kv}" for kv in args.sets)])

    def label(src: str | None, mode: str, v: str | None = None) -> str:
        return f"{'' if src is None else src + ' '}TRAIN.AMP={mode}{'' if v is None else ' ' + v}"

    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for k, run in enumerate(runs if r % 2 == 0 else runs[::-1]):
                seconds = run_once(args, run[1], Path(work) / f"{r}_{k}", run[0], run[2])
                results[run].append(seconds)
                print(f"round {r + 1} {name} {label(*run)}: {seconds:.4f} s/iteration", flush=True)
    median = {run: statistics.median(v) for run, v in results.items()}
    for src in (args.src or [None]):
        for v in varied:
            times = ", ".join(f"{'float32' if m == 'none' else m} {median[(src, m, v)]:.4f}" for m in modes)
            ratio = (f" (bf16 / float32 = {median[(src, 'bf16', v)] / median[(src, 'none', v)]:.2f})"
                     if len(modes) == 2 else "")
            where = "" if src is None else f" [{src}]"
            what = "" if v is None else f" {v}"
            print(f"{name}{where}{what}, {args.threads} threads, median of {args.rounds} rounds: {times} "
                  f"s/iteration{ratio}")
    for src in args.src[1:]:
        for m in modes:
            for v in varied:
                print(f"{label(src, m, v)} / {label(args.src[0], m, v)} = "
                      f"{median[(src, m, v)] / median[(args.src[0], m, v)]:.3f}")
    for v in varied[1:]:
        for src in (args.src or [None]):
            for m in modes:
                print(f"{label(src, m, v)} / {label(src, m, varied[0])} = "
                      f"{median[(src, m, v)] / median[(src, m, varied[0])]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
