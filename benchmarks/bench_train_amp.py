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

bf16 is native only on CPUs with avx512_bf16 or amx_bf16 (``frcnn.engine.precision.native_bf16``); elsewhere it is
emulated and many times slower (``benchmarks/results/precision.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("none", "bf16")


def run_once(args: argparse.Namespace, mode: str, out: Path) -> float:
    """Mean seconds per iteration of one ``frcnn train`` run (iterations after ``--skip``)."""
    cmd = [sys.executable, "-m", "frcnn", "train", "--data", str(args.data), "--split", args.split,
           "--config", args.config, "--out", str(out), "--no-progress",
           "--set", f"TRAIN.AMP={mode}", "--set", "TRAIN.MAX_EPOCHS=0", "--set", "TRAIN.STEP_EPOCHS=[]",
           "--set", f"TRAIN.MAX_ITERS={args.iters}", "--set", "TRAIN.STEPSIZE=[]",
           "--set", f"TRAIN.DISPLAY={args.skip}", "--set", f"TRAIN.SNAPSHOT_ITERS={args.iters}",
           *(x for kv in args.sets for x in ("--set", kv))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL)  # frcnn's own one-line errors reach stderr
    if done.returncode != 0:
        raise SystemExit(f"bench_train_amp: frcnn train --config {args.config} --set TRAIN.AMP={mode} failed "
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
    args = p.parse_args(argv)
    if args.iters % args.skip or args.iters <= args.skip:
        p.error("--iters must be a multiple of --skip and larger")
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    name = " ".join([args.config, *(f"--set {kv}" for kv in args.sets)])
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.rounds):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                seconds = run_once(args, mode, Path(work) / f"{mode}_{r}")
                results[mode].append(seconds)
                print(f"round {r + 1} {name} TRAIN.AMP={mode}: {seconds:.4f} s/iteration", flush=True)
    median = {mode: statistics.median(v) for mode, v in results.items()}
    print(f"{name}, {args.threads} threads, median of {args.rounds} rounds: float32 {median['none']:.4f} "
          f"s/iteration, bf16 {median['bf16']:.4f} (bf16 / float32 = {median['bf16'] / median['none']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
