"""How close 2 gloo processes x 1 image stay to 1 process x 2 images, iteration count by iteration count.

The setting of tests/test_distributed.py's central test (demo-cpu, SYNC_BN, 128 px synthetic images of one size,
1 thread per process): after K iterations, the max abs weight difference of the 2-process run from the 1-process
run, next to the 1-process run with half the batch (what a wrong split would look like) and, as the baseline of
float rounding, the 1-process run with 2 threads instead of 1.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_distributed_equivalence.py [--iters 6,9,12,15,20]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import test_distributed as td  # noqa: E402  (its launcher and settings: the test's own)

from frcnn.data.synthetic import make_shapes_dataset  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--iters", default="6,9,12,15,20")
    args = p.parse_args()
    print("| iterations | 2 processes vs 1 | 1 process, half the batch | 1 process, 2 threads vs 1 |")
    print("|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        voc = root / "voc"
        make_shapes_dataset(voc, num_trainval=8, num_test=4, image_size=(128, 128), seed=2)
        for k in (int(x) for x in args.iters.split(",")):
            its = f"TRAIN.MAX_ITERS={k}"
            td._train(voc, root / f"one{k}", 1, "TRAIN.IMS_PER_BATCH=2", its)
            td._train(voc, root / f"two{k}", 2, "TRAIN.IMS_PER_BATCH=1", its)
            td._train(voc, root / f"half{k}", 1, "TRAIN.IMS_PER_BATCH=1", its)
            env = {**td._env(), "OMP_NUM_THREADS": "2"}
            cmd = [sys.executable, "-m", "frcnn", "train", "--data", str(voc), "--split", "trainval", "--out",
                   str(root / f"threads{k}"), "--no-progress", *td.TINY, "--set", "TRAIN.IMS_PER_BATCH=2",
                   "--set", its]
            subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=td.TIMEOUT)
            one = td._weights(root / f"one{k}")
            row = [td._max_diff(one, td._weights(root / f"{n}{k}")) for n in ("two", "half", "threads")]
            print(f"| {k} | {row[0]:.2g} | {row[1]:.2g} | {row[2]:.2g} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
