"""Distributed training on a 2-core CPU: 1 process x 2 threads vs 2 gloo processes x 1 thread, same global batch.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_distributed.py            # full run (~15 min on 2 idle cores)
    PYTHONPATH=src .venv/bin/python benchmarks/bench_distributed.py --quick    # smoke test (~2 min)
    options: --rounds N (demo-cpu rounds), --demo-iters N, --r50-rounds N, --r50-iters N, --r50-size HxW,
             --no-write (else benchmarks/results/distributed.md)

What runs (every run is the real command line, ``python -m frcnn train``, in its own processes):

* ``1x2``  one process, ``OMP_NUM_THREADS=2``, ``TRAIN.IMS_PER_BATCH=2``: the baseline, both cores to one process.
* ``2x1``  ``torchrun --nproc-per-node 2`` (gloo, DistributedDataParallel), ``OMP_NUM_THREADS=1`` each,
           ``TRAIN.IMS_PER_BATCH=1``: the same global batch of 2 images, one image per process.
* ``2x1 no DDP``  two independent one-process runs started together, ``OMP_NUM_THREADS=1`` each,
           ``TRAIN.IMS_PER_BATCH=1`` (``RNG_SEED`` 0 and 1, so they draw different images as the two ranks do):
           the compute of ``2x1`` with the same contention for the cores, memory and caches, but no
           communication at all. ``2x1`` minus this is what DDP costs (gradient all-reduce, waiting for the
           slower rank, the per-iteration loss check that is a collective).

Sizes: ``demo-cpu`` (tiny backbone, 320 px) on synthetic shapes of 320x320 (``make_shapes_dataset``, 32 trainval
images); ``voc-r50-c4`` with random weights (no ``PRETRAINED``: every layer and BatchNorm trains, as from
scratch) on 4 synthetic images of 600x800 (``--r50-size``; ``TRAIN.SCALES`` is set to the short side, so they
enter the network at that size), ``TRAIN.SYNC_BN`` false (the default) in both. Both are written to a temporary
folder. ``TRAIN.WARMUP_ITERS=0`` and no snapshot before the last iteration.

Timing: ``TRAIN.DISPLAY`` is set so each ``metrics.jsonl`` line has the mean seconds per iteration of its
window ("time"); the first ``warm-up`` lines are dropped (allocator, oneDNN primitive caches, first DataLoader
batch), the median of the others is the seconds per iteration; images per second = global batch / that. The
configurations run one after another inside every round, in an order that rotates each round, and the figures are
medians over rounds (machines differ up to 2x between sessions and are shared: compare within a run, ratios).
``startup`` is the wall time of the whole command minus its training loop (the last line's "elapsed"): imports,
torchrun and the process group, data checks, model construction, the final snapshot.

All-reduce: 2 gloo processes (spawned here, 1 thread each, nothing else running) all-reduce a float32 tensor
of the model's trainable parameter count, as one flat tensor and as DDP's buckets (25 MB each, issued
asynchronously, then waited for); median of repeats, each after a barrier. That is the gradient traffic DDP
has per iteration (DDP also overlaps it with the backward pass; on 2 busy cores there is no idle core to
overlap onto).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TIMEOUT = 3600  # seconds for one training command
BUCKET_MB = 25  # DistributedDataParallel's default bucket_cap_mb
CONFIGS = ("1x2", "2x1", "2x1 no DDP")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CODE: list[str] = []  # the src folder of the committed frcnn the runs use (see snapshot_code)


def snapshot_code(work: Path) -> str:
    """Extract ``src/`` of the commit HEAD into ``work`` and import frcnn from there, in this process and in
    every training command: other people edit the working tree while this runs. Returns the commit."""
    root = Path(__file__).resolve().parent.parent
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                            check=True).stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "src"], cwd=root, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(work)], input=archive, check=True)
    CODE.append(str(work / "src"))
    sys.path.insert(0, CODE[0])
    for name in [m for m in sys.modules if m == "frcnn" or m.startswith("frcnn.")]:
        del sys.modules[name]
    return commit


def _env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([*CODE, env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def _train_args(data: Path, out: Path, preset: str, sets: list[str]) -> list[str]:
    return ["train", "--data", str(data), "--split", "trainval", "--out", str(out), "--no-progress",
            "--config", preset, *[a for s in sets for a in ("--set", s)]]


def _times(out: Path, warmup: int) -> tuple[list[float], float]:
    """Per-line seconds per iteration after the warm-up lines, and the seconds of the whole training loop."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    lines = [r for r in lines if "time" in r]
    timed = lines[warmup:]
    if not timed:
        raise SystemExit(f"{out}: only {len(lines)} logged lines, none left after {warmup} warm-up lines")
    return [r["time"] for r in timed], lines[-1]["elapsed"]


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, err: str, what: str) -> None:
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{err[-3000:]}")


def run_config(config: str, data: Path, work: Path, preset: str, sets: list[str], warmup: int) -> dict:
    """One training command of ``config``; its seconds per iteration (median of the timed lines) and startup."""
    py = [sys.executable, "-m"]
    started = time.perf_counter()
    if config == "1x2":
        out = work / "one"
        done = subprocess.run([*py, "frcnn", *_train_args(data, out, preset, [*sets, "TRAIN.IMS_PER_BATCH=2"])],
                              env=_env(2), capture_output=True, text=True, timeout=TIMEOUT)
        _check(done, done.stderr, f"{preset} {config}")
        times, covered = _times(out, warmup)
        outs = [(times, covered)]
    elif config == "2x1":
        out = work / "ddp"
        launcher = [*py, "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                    "--master-port", str(_free_port()), "-m", "frcnn"]
        done = subprocess.run([*launcher, *_train_args(data, out, preset, [*sets, "TRAIN.IMS_PER_BATCH=1"])],
                              env=_env(1), capture_output=True, text=True, timeout=TIMEOUT)
        _check(done, done.stderr, f"{preset} {config}")
        outs = [_times(out, warmup)]
    else:  # two independent processes, no communication
        procs = []
        for seed in (0, 1):
            out = work / f"indep{seed}"
            args = _train_args(data, out, preset, [*sets, "TRAIN.IMS_PER_BATCH=1", f"RNG_SEED={seed}"])
            procs.append((subprocess.Popen([*py, "frcnn", *args], env=_env(1), stdout=subprocess.DEVNULL,
                                           stderr=subprocess.PIPE, text=True), out))
        outs = []
        for p, out in procs:
            _, err = p.communicate(timeout=TIMEOUT)
            _check(p, err, f"{preset} {config}")
            outs.append(_times(out, warmup))
    wall = time.perf_counter() - started
    per_process = [statistics.median(t) for t, _ in outs]
    return {"s_per_iter": statistics.mean(per_process), "per_process": per_process,
            "lines": [t for t, _ in outs], "startup": wall - max(c for _, c in outs), "load": os.getloadavg()[0]}


def bench_size(name: str, preset: str, data: Path, sets: list[str], rounds: int, warmup: int,
               work: Path) -> dict:
    runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
    for r in range(rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for config in order:
            folder = work / f"{name}-r{r}-{config.replace(' ', '_')}"
            folder.mkdir()
            res = run_config(config, data, folder, preset, sets, warmup)
            runs[config].append(res)
            print(f"  {name} round {r + 1}/{rounds} {config}: {res['s_per_iter']:.3f} s/iteration "
                  f"(per process {[round(t, 3) for t in res['per_process']]}), startup {res['startup']:.1f} s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    return {"runs": runs, "sets": sets, "rounds": rounds, "warmup": warmup,
            "s_per_iter": {c: statistics.median(x["s_per_iter"] for x in v) for c, v in runs.items()},
            "round_efficiency": [a["s_per_iter"] / b["s_per_iter"] for a, b in zip(runs["1x2"], runs["2x1"])],
            "startup": {c: statistics.median(x["startup"] for x in v) for c, v in runs.items()}}


def _all_reduce_worker(rank: int, port: int, numel: int, repeats: int, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    flat = torch.randn(numel)
    step = BUCKET_MB * 1024 * 1024 // 4
    buckets = list(flat.split(step))
    result: dict[str, list[float]] = {"flat": [], "buckets": []}
    for i in range(repeats + 2):  # 2 warm-up repeats
        for kind in ("flat", "buckets"):
            dist.barrier()
            t = time.perf_counter()
            if kind == "flat":
                dist.all_reduce(flat)
            else:
                for w in [dist.all_reduce(b, async_op=True) for b in buckets]:
                    w.wait()
            if i >= 2:
                result[kind].append(time.perf_counter() - t)
    if rank == 0:
        queue.put(result)
    dist.barrier()
    dist.destroy_process_group()


def bench_all_reduce(numel: int, repeats: int) -> dict[str, list[float]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_all_reduce_worker, args=(r, port, numel, repeats, queue)) for r in range(2)]
    for p in procs:
        p.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: go on waiting unless a worker died
            if any(p.exitcode not in (None, 0) for p in procs):
                raise SystemExit("the all-reduce workers failed") from None
    for p in procs:
        p.join(timeout=60)
    return result


def trainable_params(preset: str, sets: list[str], num_classes: int) -> int:
    from frcnn.config import load_config
    from frcnn.model.detector import FasterRCNN

    model = FasterRCNN(load_config(preset, sets), num_classes, load_pretrained=False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _fmt_list(v: list[float]) -> str:
    return ", ".join(f"{x:.3f}" for x in v)


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"Command: `{meta['command']}`  ",
        f"Code: frcnn at commit `{meta['commit']}` (the script extracts `src/` of HEAD and runs that, not the working "
        "tree).  ",
        f"Machine: {meta['cpu']}, {meta['cores']} logical cores (shared with other engineers' jobs), "
        f"`torch.backends.cpu.get_cpu_capability()` = {meta['capability']}; torch {torch.__version__}, "
        f"Python {platform.python_version()}; {meta['date']}; load average at start {meta['load0']}, at end "
        f"{meta['load1']}.  ",
        "Threads: `1x2` runs with OMP_NUM_THREADS=MKL_NUM_THREADS=2, every `2x1` process with 1 "
        "(torch.get_num_threads() follows OMP_NUM_THREADS); gloo's own communication threads come on top.",
        "",
        "| size | config | processes x threads | images / iteration | s / iteration | images / s | vs `1x2` | "
        "startup s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    label = {"1x2": "1 x 2", "2x1": "2 x 1 (DDP, gloo)", "2x1 no DDP": "2 x 1, independent, no DDP"}
    for name, res in results["sizes"].items():
        base = 2 / res["s_per_iter"]["1x2"]
        for c in CONFIGS:
            s = res["s_per_iter"][c]
            lines.append(f"| {name} | `{c}` | {label[c]} | 2 | {s:.3f} | {2 / s:.2f} | {(2 / s) / base:.2f} | "
                         f"{res['startup'][c]:.1f} |")
    lines += ["", "Scaling efficiency (2-process images/s over 1-process images/s, both on the 2 cores) and where "
              "the time of a `2x1` iteration goes:", "",
              "| size | trainable params | efficiency `2x1` / `1x2` | (median of per-round ratios) | compute "
              "(`2x1 no DDP`) s | DDP cost (`2x1` - `no DDP`) s | all-reduce flat s | all-reduce 25 MB buckets s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, res in results["sizes"].items():
        sp = res["s_per_iter"]
        ar = results["all_reduce"][name]
        lines.append(f"| {name} | {res['params']:,} | {sp['1x2'] / sp['2x1']:.2f} | "
                     f"{statistics.median(res['round_efficiency']):.2f} | {sp['2x1 no DDP']:.3f} | "
                     f"{sp['2x1'] - sp['2x1 no DDP']:+.3f} ({(sp['2x1'] - sp['2x1 no DDP']) / sp['2x1']:+.0%}) | "
                     f"{statistics.median(ar['flat']):.4f} | {statistics.median(ar['buckets']):.4f} |")
    lines += ["", "Settings:", ""]
    for name, res in results["sizes"].items():
        lines.append(f"- {name}: `--config {res['preset']}` " + " ".join(f"`--set {s}`" for s in res["sets"])
                     + f"; {res['data']}; {res['rounds']} round(s), first {res['warmup']} logged line(s) of each "
                     "run dropped.")
    lines += ["", "All runs (seconds per iteration of each timed `metrics.jsonl` line; `2x1 no DDP`: both "
              "processes):", ""]
    for name, res in results["sizes"].items():
        for c in CONFIGS:
            for i, run in enumerate(res["runs"][c]):
                lines.append(f"- {name} `{c}` round {i + 1}: " + " | ".join(_fmt_list(t) for t in run["lines"])
                             + f"; startup {run['startup']:.1f} s; 1-min load average after {run['load']:.2f}")
    for name, ar in results["all_reduce"].items():
        lines.append(f"- all-reduce {name}: flat {_fmt_list(ar['flat'])}; buckets {_fmt_list(ar['buckets'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: fewer iterations, smaller R50 images")
    parser.add_argument("--rounds", type=int, default=None, help="demo-cpu rounds (default 3, quick 1)")
    parser.add_argument("--r50-rounds", type=int, default=1)
    parser.add_argument("--r50-iters", type=int, default=3, help="voc-r50-c4 iterations per run (first dropped)")
    parser.add_argument("--r50-size", default="600x800", help="voc-r50-c4 image HxW (short side = TRAIN.SCALES)")
    parser.add_argument("--demo-iters", type=int, default=40, help="demo-cpu iterations per run")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    load0 = os.getloadavg()
    rounds = args.rounds or (1 if args.quick else 3)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, {cpu}, "
          f"{os.cpu_count()} cores, load {load0}", flush=True)
    common = ["DEVICE=cpu", "TRAIN.WARMUP_ITERS=0", "TRAIN.SNAPSHOT_ITERS=100000"]
    r50_hw = (300, 400) if args.quick else tuple(int(v) for v in args.r50_size.split("x"))
    sizes = {
        "demo-cpu 320 px": {"preset": "demo-cpu", "hw": (320, 320), "n": 32,
                            "sets": [*common, f"TRAIN.MAX_ITERS={12 if args.quick else args.demo_iters}",
                                     "TRAIN.DISPLAY=2" if args.quick else "TRAIN.DISPLAY=4"],
                            "rounds": rounds, "warmup": 2 if args.quick else 1},
        f"voc-r50-c4 {r50_hw[0]}x{r50_hw[1]}": {
            "preset": "voc-r50-c4", "hw": r50_hw, "n": 4,
            "sets": [*common, f"TRAIN.SCALES=[{r50_hw[0]}]", f"TRAIN.MAX_ITERS={2 if args.quick else args.r50_iters}",
                     "TRAIN.DISPLAY=1"],
            "rounds": args.r50_rounds, "warmup": 1},
    }
    results: dict = {"sizes": {}, "all_reduce": {}}
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        work = Path(tmp)
        commit = snapshot_code(work)
        print(f"frcnn from commit {commit} (src/ extracted to {CODE[0]})", flush=True)
        from frcnn.data.synthetic import make_shapes_dataset

        for name, s in sizes.items():
            data = work / f"data-{s['hw'][0]}x{s['hw'][1]}"
            classes = make_shapes_dataset(data, num_trainval=s["n"], num_test=1, image_size=s["hw"], seed=0)
            params = trainable_params(s["preset"], s["sets"], len(classes))
            ar = bench_all_reduce(params, 3 if args.quick else 10)
            results["all_reduce"][name] = ar
            print(f"{name}: {params:,} trainable parameters, all-reduce median flat "
                  f"{statistics.median(ar['flat']):.4f} s, buckets {statistics.median(ar['buckets']):.4f} s",
                  flush=True)
            res = bench_size(name, s["preset"], data, s["sets"], s["rounds"], s["warmup"], work)
            res.update(preset=s["preset"], params=params,
                       data=f"{s['n']} synthetic shapes images of {s['hw'][0]}x{s['hw'][1]} (seed 0), flipped too")
            results["sizes"][name] = res
    meta = {"commit": commit,
            "command": " ".join(["PYTHONPATH=src .venv/bin/python benchmarks/bench_distributed.py", *sys.argv[1:]]),
            "cpu": cpu, "cores": os.cpu_count(), "capability": torch.backends.cpu.get_cpu_capability(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load0": tuple(round(v, 2) for v in load0), "load1": tuple(round(v, 2) for v in os.getloadavg())}
    text = markdown(results, meta)
    print(text)
    if args.no_write:
        return
    out = Path(__file__).parent / "results" / "distributed.md"
    notes = ""
    if out.is_file() and "\n## Reading" in out.read_text():
        notes = "\n## Reading" + out.read_text().split("\n## Reading", 1)[1]
    header = ("# Distributed training on a 2-core CPU: 1 process x 2 threads vs 2 gloo processes x 1 thread\n\n"
              "Script: `benchmarks/bench_distributed.py` (its docstring says what runs and what is timed).\n\n"
              "## Figures\n\n")
    out.write_text(header + text + notes)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
