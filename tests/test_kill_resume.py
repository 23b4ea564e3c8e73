"""Runs that die: ``frcnn train`` killed with SIGKILL (at a random moment, inside a snapshot write, while the
run folder's checkpoint is being published) and resumed ends with the weights of an uninterrupted run, and
``metrics.jsonl`` has every iteration once; a second training on the same folder is refused while the first
runs; a resume with another config says what changed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from frcnn.cli import main
from frcnn.data.synthetic import make_shapes_dataset
from frcnn.engine.train import _trim_metrics

TIMEOUT = 300
ITERS = 12
TINY = ["--config", "demo-cpu", "--set", "TRAIN.SCALES=128", "--set", "TRAIN.MAX_SIZE=128", "--set",
        "TRAIN.WARMUP_ITERS=0", "--set", "TRAIN.DISPLAY=1", "--set", "TRAIN.SNAPSHOT_ITERS=2", "--set", "DEVICE=cpu"]

# Runs `frcnn train` with one function replaced by one that kills the process on its N-th call, after (or
# before) doing its work: a SIGKILL at an exact point of a snapshot write.
KILLER = """
import os, signal, sys, importlib
module, name, when, after = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "after"
mod = importlib.import_module(module)
real, calls = getattr(mod, name), [0]
def dying(*args, **kwargs):
    calls[0] += 1
    if calls[0] == when and not after:
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if calls[0] == when and after:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(mod, name, dying)
from frcnn.cli import main
sys.exit(main(sys.argv[5:]))
"""


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, "OMP_NUM_THREADS": "1"}


def _args(voc: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(voc), "--split", "trainval", "--out", str(out), "--no-progress", *TINY,
            "--set", f"TRAIN.MAX_ITERS={ITERS}", *extra]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "frcnn", *args], env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)


def _iterations(out: Path) -> list[int]:
    return [json.loads(x)["iteration"] for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, num_trainval=6, num_test=2, image_size=(128, 128), seed=3)
    return root


@pytest.fixture(scope="module")
def uninterrupted(voc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "run"
    done = _run(_args(voc, out))
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _kill_at_random(voc: Path, out: Path, rng: random.Random, resume: bool) -> None:
    """Start (or resume) a training and SIGKILL it after a random number of logged iterations."""
    before = len(_iterations(out)) if (out / "metrics.jsonl").is_file() else 0
    wait_for = before + rng.randint(1, 4)
    proc = subprocess.Popen([sys.executable, "-m", "frcnn", *_args(voc, out, *(["--resume"] if resume else []))],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            log = out / "metrics.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= wait_for:
                time.sleep(rng.random() * 0.3)  # somewhere inside the next iteration or snapshot
                break
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def _kill_inside(voc: Path, out: Path, module: str, name: str, when: int, after: bool, resume: bool) -> None:
    cmd = [sys.executable, "-c", KILLER, module, name, str(when), "after" if after else "before",
           *_args(voc, out, *(["--resume"] if resume else []))]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


@pytest.mark.slow
def test_killed_runs_resume_to_the_weights_of_an_uninterrupted_run(voc, uninterrupted, tmp_path):
    out = tmp_path / "run"
    rng = random.Random(13)
    _kill_at_random(voc, out, rng, resume=False)
    # inside the second snapshot's weights write (after the temporary file is written, before its rename)
    _kill_inside(voc, out, "frcnn.engine.checkpoint", "save_file", 1, after=True, resume=True)
    # while the run folder's own checkpoint is being replaced by the next snapshot's
    _kill_inside(voc, out, "shutil", "copyfile", 2, after=True, resume=True)
    _kill_at_random(voc, out, rng, resume=True)
    done = _run(_args(voc, out, "--resume"))
    assert done.returncode == 0, done.stderr[-2000:]
    whole, resumed = load_file(str(uninterrupted / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert (whole[k] == resumed[k]).all(), k  # bit-identical
    assert _iterations(out) == list(range(1, ITERS + 1))  # every iteration once


def test_a_half_written_last_line_is_dropped_on_resume(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iteration": 1, "total": 2.0}\n{"iteration": 2, "total": 1.5}\n{"iteration": 3, "tot')
    _trim_metrics(log, 2)
    assert log.read_text() == '{"iteration": 1, "total": 2.0}\n{"iteration": 2, "total": 1.5}\n'


@pytest.mark.slow
def test_a_second_training_on_the_same_folder_is_refused_while_the_first_runs(voc, tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "frcnn", *_args(voc, out, "--set", "TRAIN.MAX_ITERS=100000")],
                             env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        before = (out / "config.yaml").read_text()
        assert main(_args(voc, out, "--resume")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"frcnn train: error: --out {out} is in use by another frcnn train; wait for it to end or "
                       "choose another folder"]
        assert (out / "config.yaml").read_text() == before and first.poll() is None  # nothing touched
    finally:
        first.kill()
        first.wait(timeout=30)


def test_resume_with_another_config_says_what_changed(voc, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(voc, out, "--set", "TRAIN.MAX_ITERS=2")) == 0
    capsys.readouterr()
    assert main(_args(voc, out, "--set", "TRAIN.MAX_ITERS=3", "--set", "TRAIN.LEARNING_RATE=0.005", "--resume")) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "changed config" in x]
    assert lines == ["--resume from iteration 2 with a changed config: TRAIN.LEARNING_RATE: 0.01 -> 0.005; "
                     "TRAIN.MAX_ITERS: 2 -> 3"]
    assert "MAX_ITERS: 3" in (out / "config.yaml").read_text()  # the run folder says what it trains now


def test_resume_of_a_run_killed_before_its_first_snapshot_starts_again(voc, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("PRESET: demo-cpu\n")
    (out / "metrics.jsonl").write_text('{"iteration": 1, "total": 9.0}\n')
    assert main(_args(voc, out, "--set", "TRAIN.MAX_ITERS=2", "--resume")) == 0
    assert "has no snapshot yet; starting from iteration 0" in capsys.readouterr().out
    assert _iterations(out) == [1, 2]
