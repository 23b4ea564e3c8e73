"""Train anywhere, run anywhere: a checkpoint whose config says ``DEVICE: cuda`` (trained on a GPU) evaluates,
detects, explains and reports on this machine with the results of the same weights saved with ``DEVICE: cpu``;
``--device`` (``device=`` in the library) chooses where to run, and a device this machine lacks is one line on
stderr and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from frcnn.cli import main
from frcnn.config import load_config, resolve_device
from frcnn.data import open_dataset
from frcnn.data.synthetic import make_shapes_dataset
from frcnn.engine.checkpoint import choose_device, load_model, read_checkpoint
from frcnn.engine.detect import open_image
from frcnn.engine.inference import Predictor
from frcnn.engine.train import train
from frcnn.errors import ConfigError
from frcnn.explain.report import write_report

CLASSES = ("circle", "square", "star", "triangle")
# a few iterations on 128-pixel images; every detection kept (SCORE_THRESH 0) so the comparisons have numbers
CFG = ["TRAIN.SCALES=[128]", "TRAIN.MAX_SIZE=128", "TEST.SCALES=[128]", "TEST.MAX_SIZE=128", "TRAIN.MAX_ITERS=3",
       "TRAIN.SNAPSHOT_ITERS=3", "TRAIN.WARMUP_ITERS=0", "DEVICE=cpu", "TEST.SCORE_THRESH=0.0"]
HAS_CUDA = torch.cuda.is_available()
NO_CUDA_ONLY = pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA: --device cuda is not a mistake here")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(voc, original, trained_on_cuda)``: a short training run (DEVICE: cpu) and a copy of it whose every
    config.yaml says ``DEVICE: cuda``, as a run on a GPU writes it; the two folders are both named ``model``."""
    root = tmp_path_factory.mktemp("device")
    voc = root / "voc"
    make_shapes_dataset(voc, num_trainval=4, num_test=2, image_size=(128, 128), seed=5)
    original = root / "cpu" / "model"
    train(load_config("demo-cpu", CFG), open_dataset(voc, "trainval", classes=CLASSES), original, progress=False)
    on_cuda = root / "cuda" / "model"
    shutil.copytree(original, on_cuda)
    configs = sorted(on_cuda.rglob("config.yaml"))
    assert len(configs) == 2  # the run's and its snapshot's
    for path in configs:
        text = path.read_text()
        assert text.count("DEVICE: cpu") == 1
        path.write_text(text.replace("DEVICE: cpu", "DEVICE: cuda"))
    assert read_checkpoint(on_cuda).cfg.DEVICE == "cuda"
    return voc, original, on_cuda


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _expected_auto() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


# ------------------------------------------------------------------------ a CUDA checkpoint on this machine

@NO_CUDA_ONLY
def test_the_checkpoint_s_own_device_would_be_refused_here(runs):
    """The premise of this module: what the checkpoint says cannot run on this machine."""
    _, _, on_cuda = runs
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device(read_checkpoint(on_cuda).cfg)


def test_eval_of_a_cuda_checkpoint_gives_the_original_s_detections_and_map(runs, tmp_path, capsys):
    voc, original, on_cuda = runs
    results, detections = [], []
    for name, ckpt in (("original", original), ("on_cuda", on_cuda)):
        code, out, err = _run(capsys, "eval", "--checkpoint", ckpt, "--data", voc, "--split", "test", "--json",
                              "--write-detections", tmp_path / name)
        assert code == 0, err
        results.append(json.loads(out))
        detections.append(json.loads((tmp_path / name / "detections.json").read_text()))
    assert len(detections[0]) > 0
    assert detections[1] == detections[0]
    assert results[1] == results[0]


def test_detect_with_a_cuda_checkpoint_writes_the_original_s_boxes(runs, tmp_path, capsys):
    voc, original, on_cuda = runs
    images = sorted((voc / "JPEGImages").iterdir())[:2]
    for name, ckpt in (("original", original), ("on_cuda", on_cuda)):
        code, _, err = _run(capsys, "detect", "--checkpoint", ckpt, *images, "--out", tmp_path / name,
                            "--threshold", "0", "--device", "cpu")
        assert code == 0, err
    for image in images:
        ours = json.loads((tmp_path / "on_cuda" / f"{image.stem}.json").read_text())
        theirs = json.loads((tmp_path / "original" / f"{image.stem}.json").read_text())
        assert len(theirs["detections"]) > 0
        assert ours == theirs


def _without_timings(value):
    """explain.json's numbers without the wall-clock times (the only numbers two runs may differ in)."""
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not k.startswith("time_ms") and k != "10_timing"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def test_explain_of_a_cuda_checkpoint_shows_the_original_s_stages(runs, tmp_path, capsys):
    voc, original, on_cuda = runs
    image = sorted((voc / "JPEGImages").iterdir())[0]  # in a VOC folder: its ground truth is found, stage 5 runs
    stages = []
    for name, ckpt in (("original", original), ("on_cuda", on_cuda)):
        code, _, err = _run(capsys, "explain", "--checkpoint", ckpt, image, "--out", tmp_path / name, "--json",
                            "--threshold", "0")
        assert code == 0, err
        stages.append(json.loads((tmp_path / name / "explain.json").read_text())["stages"])
        assert f"device {_expected_auto().type}" in (tmp_path / name / "index.html").read_text()
    assert stages[0]["09_detections"] and "05_targets" in stages[0]
    assert _without_timings(stages[1]) == _without_timings(stages[0])


def test_report_of_a_run_on_cuda_evaluates_its_snapshots_here(runs, tmp_path, capsys):
    voc, original, on_cuda = runs
    pages = []
    for name, run in (("original", original), ("on_cuda", on_cuda)):
        out = tmp_path / name
        code, _, err = _run(capsys, "report", run, "--data", voc, "--split", "test", "--out", out, "--images", "1",
                            "--threshold", "0", "--no-progress")
        assert code == 0, err
        pages.append((out / "index.html").read_text().replace(str(run), "RUN"))
        assert (out / "pr.png").is_file() and (out / "test_images.png").is_file()
    assert "iteration 3" in pages[0] and "mAP" in pages[0]
    assert pages[1] == pages[0]
    for picture in ("pr.png", "test_images.png", "map.png"):
        assert (tmp_path / "on_cuda" / picture).read_bytes() == (tmp_path / "original" / picture).read_bytes()


# ------------------------------------------------------------------------------------------ the library

def test_library_loaders_run_where_this_machine_can_not_where_the_checkpoint_was_trained(runs):
    voc, original, on_cuda = runs
    image = open_image(sorted((voc / "JPEGImages").iterdir())[1])
    predictor = Predictor.from_checkpoint(on_cuda)
    assert predictor.device.type == _expected_auto().type
    model, ckpt = load_model(on_cuda)
    assert {p.device.type for p in model.parameters()} == {_expected_auto().type}
    assert ckpt.cfg.DEVICE == "cuda"  # the run's fact is kept, just not obeyed
    ours = Predictor.from_checkpoint(on_cuda, device="cpu").predict([image])[0]
    theirs = Predictor.from_checkpoint(original, device="cpu").predict([image])[0]
    assert len(theirs.scores) > 0
    assert torch.equal(ours.boxes, theirs.boxes) and torch.equal(ours.scores, theirs.scores)
    assert torch.equal(ours.labels, theirs.labels)


@NO_CUDA_ONLY
def test_library_loaders_refuse_cuda_on_a_machine_without_it(runs):
    voc, original, on_cuda = runs
    with pytest.raises(ConfigError, match="^device cuda but this machine has no CUDA device$"):
        Predictor.from_checkpoint(original, device="cuda")
    with pytest.raises(ConfigError, match="no CUDA device"):
        load_model(original, "cuda:0")
    with pytest.raises(ConfigError, match="no CUDA device"):
        write_report(original, data=voc, split="test", device="cuda", progress=False)
    assert not (original / "report").exists()  # refused before any work


def test_choose_device_auto_and_explicit(monkeypatch):
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("gpu", "mps", "cuda:x"):
        with pytest.raises(ConfigError, match="not a device frcnn runs on; use auto, cpu, cuda or cuda:N"):
            choose_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device(None) == choose_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="^--device cuda:1 but this machine has no CUDA device$"):
        choose_device("cuda:1", "--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert choose_device(None) == choose_device("auto") == torch.device("cuda")
    assert choose_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"cuda:2 but this machine has 2 CUDA device\(s\): cuda:0..cuda:1"):
        choose_device("cuda:2")


# -------------------------------------------------------------------------------- one line, exit code 2

def _argv(command: str, voc: Path, ckpt: Path, out: Path) -> list:
    image = sorted((voc / "JPEGImages").iterdir())[0]
    return {
        "eval": ["eval", "--checkpoint", ckpt, "--data", voc, "--split", "test", "--write-detections", out],
        "detect": ["detect", "--checkpoint", ckpt, image, "--out", out],
        "explain": ["explain", "--checkpoint", ckpt, image, "--out", out],
        "report": ["report", ckpt, "--data", voc, "--split", "test", "--out", out],
    }[command]


@NO_CUDA_ONLY
@pytest.mark.parametrize("command", ["eval", "detect", "explain", "report"])
def test_device_cuda_without_cuda_is_one_line_and_exit_2(command, runs, tmp_path, capsys):
    voc, original, _ = runs
    code, out, err = _run(capsys, *_argv(command, voc, original, tmp_path / "out"), "--device", "cuda")
    assert code == 2
    assert err.strip() == f"frcnn {command}: error: --device cuda but this machine has no CUDA device"
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "detect", "explain", "report"])
def test_a_device_that_is_not_one_is_one_line_and_exit_2(command, runs, tmp_path, capsys):
    voc, original, _ = runs
    code, _, err = _run(capsys, *_argv(command, voc, original, tmp_path / "out"), "--device", "gpu")
    assert code == 2
    assert err.strip() == (f"frcnn {command}: error: --device gpu: not a device frcnn runs on; "
                           "use auto, cpu, cuda or cuda:N")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["eval", "detect", "explain", "report"])
def test_help_names_the_device_flag(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--device auto|cpu|cuda[:N]" in capsys.readouterr().out
