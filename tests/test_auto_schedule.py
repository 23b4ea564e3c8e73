"""Settings ``frcnn train`` resolves before iteration 1: the schedule in epochs (``TRAIN.MAX_EPOCHS``,
``STEP_EPOCHS``) and ``ANCHOR_SCALES: auto``; the count of positive anchors a box check-data reports."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_overfit import TinySet
from test_voc import BCCD, needs_bccd

from frcnn.boxes import box_iou
from frcnn.cli import main
from frcnn.config import load_config
from frcnn.data.anchor_fit import (
    anchor_fit,
    auto_anchor_fit,
    auto_anchor_scales,
    describe_auto,
    fit_criterion,
    format_fit,
    positive_anchor_counts,
    suggest_scales,
)
from frcnn.data.check import check_data, fit_samples
from frcnn.data.sample import Sample
from frcnn.data.synthetic import make_shapes_dataset
from frcnn.engine import precision
from frcnn.engine.checkpoint import read_checkpoint, read_config
from frcnn.engine.train import epoch_schedule, learning_rate, resolve_run_config, train
from frcnn.errors import ConfigError
from frcnn.model.anchor_target import taking_part
from frcnn.model.anchors import generate_anchors, shift_anchors

# ------------------------------------------------------------------------------ epochs -> iterations


def _train_cfg(*sets: str):
    return load_config(None, list(sets)).TRAIN


@pytest.mark.parametrize(("sets", "world", "max_iters", "steps"), [
    # 10 images + their mirrored copies = 20 an epoch, 2 an iteration: 10 iterations an epoch
    (["TRAIN.MAX_EPOCHS=3", "TRAIN.STEP_EPOCHS=[2]", "TRAIN.IMS_PER_BATCH=2"], 1, 30, (20,)),
    # no flips: 10 an epoch, 5 iterations an epoch
    (["TRAIN.MAX_EPOCHS=3", "TRAIN.STEP_EPOCHS=[2]", "TRAIN.IMS_PER_BATCH=2", "TRAIN.USE_FLIPPED=false"], 1, 15,
     (10,)),
    # 2 processes x 1 image is the global batch of 1 process x 2 images
    (["TRAIN.MAX_EPOCHS=3", "TRAIN.STEP_EPOCHS=[2]", "TRAIN.IMS_PER_BATCH=1"], 2, 30, (20,)),
    # 1 process x 1 image: 20 iterations an epoch; two steps
    (["TRAIN.MAX_EPOCHS=3", "TRAIN.STEP_EPOCHS=[2, 2.5]"], 1, 60, (40, 50)),
    # 25 / 3 = 8.33 iterations: ceil 9 (the last, partial batch counts); steps 13 / 3 = 4.33 -> 4, 15 / 3 -> 5
    (["TRAIN.MAX_EPOCHS=2.5", "TRAIN.STEP_EPOCHS=[1.3, 1.5]", "TRAIN.IMS_PER_BATCH=3", "TRAIN.USE_FLIPPED=false"], 1,
     9, (4, 5)),
    # 0.7 x 10 is 7.000000000000001 in floats: still 7 iterations
    (["TRAIN.MAX_EPOCHS=0.7", "TRAIN.USE_FLIPPED=false"], 1, 7, ()),
])
def test_epochs_to_iterations_known_answers(sets, world, max_iters, steps):
    schedule = epoch_schedule(_train_cfg(*sets), 10, world)
    assert (schedule.max_iters, schedule.steps) == (max_iters, steps)


def test_the_schedule_line_and_the_learning_rate_it_gives():
    train = _train_cfg("TRAIN.MAX_EPOCHS=3", "TRAIN.STEP_EPOCHS=[2]", "TRAIN.IMS_PER_BATCH=2",
                       "TRAIN.LEARNING_RATE=0.1")
    schedule = epoch_schedule(train, 10)
    assert schedule.line() == ("schedule: 3 epochs of 20 images (10 + mirrored), 2 images an iteration = 30 "
                               "iterations, LR x0.1 at 20 (epoch 2)")
    two = epoch_schedule(_train_cfg("TRAIN.MAX_EPOCHS=24", "TRAIN.STEP_EPOCHS=[18]"), 292, world_size=2)
    assert two.line() == ("schedule: 24 epochs of 584 images (292 + mirrored), 2 images an iteration (2 processes x "
                          "1) = 7008 iterations, LR x0.1 at 5256 (epoch 18)")
    none = epoch_schedule(_train_cfg("TRAIN.MAX_EPOCHS=1", "TRAIN.USE_FLIPPED=false"), 10)
    assert none.steps == () and none.line() == ("schedule: 1 epoch of 10 images, 1 image an iteration = 10 "
                                                "iterations, no LR step (TRAIN.STEP_EPOCHS is empty)")
    from dataclasses import replace

    resolved = replace(train, MAX_ITERS=schedule.max_iters, STEPSIZE=schedule.steps)
    assert learning_rate(resolved, 19) == pytest.approx(0.1) and learning_rate(resolved, 20) == pytest.approx(0.01)


def test_a_step_at_or_after_the_last_epoch_is_one_line():
    with pytest.raises(ConfigError, match=r"TRAIN.STEP_EPOCHS=\[3.0\] has 3, not below TRAIN.MAX_EPOCHS=3"):
        epoch_schedule(_train_cfg("TRAIN.MAX_EPOCHS=3", "TRAIN.STEP_EPOCHS=[3]"), 10)
    with pytest.raises(ConfigError, match="STEP_EPOCHS needs TRAIN.MAX_EPOCHS"):  # config.py's own check
        _train_cfg("TRAIN.STEP_EPOCHS=[3]")


# ------------------------------------------------------------------------- positive anchors a box


def _dense_positives(boxes, height, width, base, stride, threshold, border=0.0):
    """The definition: every anchor of the grid, those the anchor target layer lets take part, box_iou >=
    threshold, counted per box."""
    anchors = shift_anchors(base, math.ceil(height / stride), math.ceil(width / stride), stride).double()
    inside = taking_part(anchors, height, width, border)
    return (box_iou(boxes.double(), anchors[inside]) >= threshold).sum(dim=1)


@pytest.mark.parametrize(("height", "width", "scales", "stride", "threshold"), [
    (600, 800, (8, 16, 32), 16, 0.7), (97, 131, (2, 4, 8), 8, 0.7), (320, 480, (1, 2, 4), 4, 0.7),
    (150, 200, (8, 16, 32), 16, 0.5), (320, 320, (2, 4, 8), 8, 0.3),
])
@pytest.mark.parametrize("border", [0.0, 12.5, -1.0])
def test_positive_counts_equal_the_search_over_every_anchor(height, width, scales, stride, threshold, border):
    g = torch.Generator().manual_seed(height + width)
    xy = torch.rand(300, 2, generator=g) * torch.tensor([width, height])
    side = 16 * scales[1] * torch.exp(torch.randn(300, 1, generator=g) * 0.5)  # near the anchors: many positives
    wh = side * torch.exp(torch.randn(300, 2, generator=g) * 0.3)
    boxes = torch.cat((xy, torch.minimum(xy + wh, torch.tensor([width - 1.0, height - 1.0]))), dim=1)
    base = generate_anchors(16, (0.5, 1, 2), scales)
    for b in (boxes, boxes.round()):  # integer corners hit IoUs exactly at the threshold
        fast = positive_anchor_counts(b, height, width, base, stride, threshold, border)
        dense = _dense_positives(b, height, width, base, stride, threshold, border)
        assert torch.equal(fast, dense)
        assert int(dense.sum()) > 50  # the comparison has power
    assert positive_anchor_counts(torch.zeros(0, 4), height, width, base, stride, threshold).shape == (0,)


# ------------------------------------------------------------------------------ ANCHOR_SCALES: auto

# demo-cpu at 320 px (stride 8). A ratio-1 anchor of scale s is a 16s-pixel square centred at 7.5 + 8k, so the
# anchor of 64 px (scale 4) at cell k spans -24 + 8k .. 39 + 8k: boxes placed there meet it at IoU 1.
KNOWN = ["TRAIN.SCALES=[320]", "TRAIN.MAX_SIZE=320", "DEVICE=cpu"]


def _squares(side: int, cells=((5, 5), (15, 25), (25, 10)), images: int = 4) -> list[Sample]:
    offset = 7.5 - (side - 1) / 2  # the anchor's x1 at cell 0
    boxes = torch.tensor([[offset + 8 * kx, offset + 8 * ky, offset + 8 * kx + side - 1, offset + 8 * ky + side - 1]
                          for kx, ky in cells])
    return [Sample(f"im{i}", f"im{i}.png", 320, 320, boxes, torch.ones(len(cells), dtype=torch.long),
                   torch.zeros(len(cells), dtype=torch.bool)) for i in range(images)]


def test_auto_picks_the_candidate_centred_on_boxes_of_known_size():
    cfg = load_config("demo-cpu", [*KNOWN, "ANCHOR_SCALES=auto"])
    # 64 px boxes: (1, 2, 4), (2, 4, 8) and (4, 8, 16) all hold a 64 px anchor (IoU 1 for every box: the first
    # three keys tie); the tie goes to the set whose middle anchor is the median box size, 16 x 4 = 64: (2, 4, 8)
    fit = auto_anchor_fit(_squares(64), cfg)
    assert fit.scales == (2, 4, 8) and fit.below(0.7) == 0 and float(fit.best_iou.min()) == pytest.approx(1.0)
    # positives: the 64 px square one cell (8 px) off along one axis has IoU 56*64 / (2*4096 - 56*64) = 0.78, off
    # along both 0.62, two cells 0.60; the other shapes (92x48, 44x88, 32 and 128 px squares) stay below 0.6:
    # 5 positive anchors per box, 15 per image
    assert fit.positives().tolist() == [5] * 12
    assert fit.mean_positives() == 5.0 and fit.positives_per_image() == 15.0
    assert describe_auto(fit) == ("ANCHOR_SCALES=auto -> [2, 4, 8] (anchors of 32..128 px at scale 320; 100% of 12 "
                                  "boxes with an anchor at IoU >= 0.7; 5.0 positive anchors (IoU >= 0.7) a box, 15.0 "
                                  "an image)")
    assert auto_anchor_scales(_squares(64), cfg) == (2, 4, 8)
    # 32 px boxes: the tie of (0.5, 1, 2), (1, 2, 4), (2, 4, 8) goes to (1, 2, 4); one cell off is IoU
    # 24*32 / (2*1024 - 24*32) = 0.6 at this stride: a single positive anchor per box
    small = auto_anchor_fit(_squares(32), cfg)
    assert small.scales == (1, 2, 4) and small.positives().tolist() == [1] * 12
    # the configured fit and the criterion are separate from the candidates: a fixed list is measured as is
    fixed = anchor_fit(_squares(64), load_config("demo-cpu", [*KNOWN, "ANCHOR_SCALES=[2,4,8]"]))
    assert fixed.scales == (2, 4, 8) and fit_criterion(fixed) == fit_criterion(fit)


def test_demo_anchors_half_an_octave_apart_leave_no_size_without_a_positive():
    # A 45 px square centred on a cell lies half an octave from the 32 and 64 px anchors of (2, 4, 8): IoU 32**2 /
    # 45**2 = 0.506 and 45**2 / 64**2 = 0.494; its best is the 46 x 24 anchor (scale 2, ratio 0.5), 45*24 / (45*45 +
    # 46*24 - 45*24) = 0.527: no positive anchor (IoU >= 0.7), only a type-A one. demo-cpu's scales, half an octave
    # apart, hold the 45.248 px anchor of scale 2.828 too: IoU (45 / 45.248)**2 = 0.989.
    octave = anchor_fit(_squares(45), load_config("demo-cpu", [*KNOWN, "ANCHOR_SCALES=[2,4,8]"]))
    assert float(octave.best_iou.max()) == pytest.approx(1080 / 2049, rel=1e-5) and octave.below(0.7) == 12
    half = anchor_fit(_squares(45), load_config("demo-cpu", KNOWN))
    assert half.scales == (2, 2.828, 4, 5.657, 8) and half.below(0.7) == 0
    assert float(half.best_iou.min()) == pytest.approx((45 / 45.248) ** 2, rel=1e-5)


def test_auto_without_boxes_is_one_line():
    cfg = load_config("demo-cpu", [*KNOWN, "ANCHOR_SCALES=auto"])
    hard = [Sample("a", "a.png", 320, 320, torch.tensor([[0.0, 0, 63, 63]]), torch.tensor([1]), torch.tensor([True]))]
    with pytest.raises(ConfigError, match="ANCHOR_SCALES=auto: the training set has no boxes"):
        auto_anchor_fit(hard, cfg)


def test_check_data_lines_say_what_auto_chooses_with_positives():
    cfg = load_config("voc-r50-c4")  # anchors of 128..512 px at 600: far too large for 25..33 px objects
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(10):
        xy = torch.rand(5, 2, generator=g) * 500
        boxes = torch.cat((xy, xy + 24 + torch.rand(5, 2, generator=g) * 8), dim=1)
        samples.append(Sample(str(i), f"{i}.jpg", 600, 600, boxes, torch.ones(5, dtype=torch.long),
                              torch.zeros(5, dtype=torch.bool)))
    fits = suggest_scales(samples, cfg)
    current = anchor_fit(samples, cfg)
    lines = format_fit(fits, current, ["dot"])
    assert current.mean_positives() == 0.0
    assert "0.0 positive anchors (IoU >= 0.7) a box, 0.0 an image" in lines[2]
    assert lines[-2] == f"  {describe_auto(fits[0])}" and fits[0].scales == (1, 2, 4)
    assert lines[-1].startswith("  suggested: --set ANCHOR_SCALES=[1,2,4]")
    assert lines[-1].endswith(f"; {fits[0].mean_positives():.1f} positive anchors (IoU >= 0.7) a box, "
                              f"{fits[0].positives_per_image():.1f} an image")
    auto = format_fit(fits, fits[0], ["dot"], auto=True)  # the config says auto: no suggestion, the choice
    assert auto[1].startswith("  ANCHOR_SCALES auto -> [1, 2, 4] x ANCHOR_RATIOS") and auto[-1] == lines[-2]
    assert fits[0].to_json()["mean_positives"] == round(fits[0].mean_positives(), 3)


# ------------------------------------------------------------------------------------ real runs

TINY = ["--config", "demo-cpu", "--set", "TRAIN.SCALES=128", "--set", "TRAIN.MAX_SIZE=128",
        "--set", "TEST.SCALES=128", "--set", "TEST.MAX_SIZE=128", "--set", "TRAIN.SNAPSHOT_ITERS=2",
        "--set", "TRAIN.DISPLAY=2", "--set", "TRAIN.WARMUP_ITERS=0", "--set", "DEVICE=cpu"]
EPOCHS = ["--set", "ANCHOR_SCALES=auto", "--set", "TRAIN.MAX_EPOCHS=0.5", "--set", "TRAIN.STEP_EPOCHS=[0.25]"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, num_trainval=6, num_test=3, image_size=(128, 128), seed=1)
    return root


def _prefixed(text: str, prefix: str) -> list[str]:
    return [line[len(prefix):] for line in text.splitlines() if line.startswith(prefix)]


def test_train_resolves_writes_the_run_config_and_agrees_with_check_data(voc, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(voc), "--split", "trainval", "--out", str(out), "--no-progress", *TINY,
                 *EPOCHS]) == 0
    printed = capsys.readouterr().out
    # 6 images + mirrored = 12 an epoch, 1 an iteration: 0.5 epochs = 6 iterations, the step at 0.25 = 3
    assert _prefixed(printed, "schedule: ") == ["0.5 epochs of 12 images (6 + mirrored), 1 image an iteration = 6 "
                                                "iterations, LR x0.1 at 3 (epoch 0.25)"]
    (chosen,) = _prefixed(printed, "anchors: ")
    cfg = read_config(out / "config.yaml")
    assert (cfg.TRAIN.MAX_ITERS, cfg.TRAIN.STEPSIZE, cfg.TRAIN.MAX_EPOCHS, cfg.TRAIN.STEP_EPOCHS) == (6, (3,), 0.5,
                                                                                                    (0.25,))
    samples = fit_samples(check_data(voc, "trainval"))
    expected = auto_anchor_scales(samples, load_config("demo-cpu", [*TINY[3::2], "ANCHOR_SCALES=auto"]))
    assert cfg.ANCHOR_SCALES == expected
    assert chosen.startswith(f"ANCHOR_SCALES=auto -> [{', '.join(f'{s:g}' for s in expected)}] (anchors of")
    ckpt = read_checkpoint(out)
    assert ckpt.iteration == 6 and ckpt.cfg == cfg
    assert ckpt.meta["resolved"] == {"schedule": {"images": 6, "images_per_epoch": 12, "global_batch": 1},
                                     "ANCHOR_SCALES": "auto", "AMP": "auto"}  # demo-cpu's TRAIN.AMP is auto
    for snap in (out / "snapshots").iterdir():  # every snapshot holds the resolved config too
        assert read_config(snap / "config.yaml") == cfg
    # check-data says the same in the same words, with the config as given or as resolved
    assert main(["check-data", "--data", str(voc), "--split", "trainval", "--no-progress", *TINY, *EPOCHS]) == 0
    report = capsys.readouterr().out
    assert f"  {chosen}" in report.splitlines()
    assert report.splitlines()[-1] == f"  {chosen}"  # auto configured: the choice is the last line
    assert main(["check-data", "--data", str(voc), "--split", "trainval", "--no-progress", "--config",
                 str(out / "config.yaml")]) == 0
    assert f"  {chosen}" in capsys.readouterr().out.splitlines()
    # the run folder is what eval needs: the resolved anchors build the model
    assert main(["eval", "--checkpoint", str(out), "--data", str(voc), "--split", "test", "--json"]) == 0


@pytest.mark.parametrize("native", [True, False])
def test_train_resolves_amp_auto_into_the_run_config(voc, tmp_path, capsys, monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": native)
    out = tmp_path / "run"
    assert main(["train", "--data", str(voc), "--split", "trainval", "--out", str(out), "--no-progress", *TINY,
                 "--set", "TRAIN.MAX_ITERS=4", "--set", "TRAIN.AMP=auto"]) == 0
    mode = "bf16" if native else "none"
    (line,) = _prefixed(capsys.readouterr().out, "precision: ")
    assert line.startswith(f"TRAIN.AMP=auto -> {mode} (")
    cfg = read_config(out / "config.yaml")
    assert cfg.TRAIN.AMP == mode and read_checkpoint(out).meta["resolved"] == {"AMP": "auto"}
    # resumed as given (auto) on the same machine: the same mode, no changed config
    shutil.rmtree(out / "snapshots" / "iter_0000004")  # as if stopped after iteration 2
    assert main(["train", "--data", str(voc), "--split", "trainval", "--out", str(out), "--no-progress", *TINY,
                 "--set", "TRAIN.MAX_ITERS=4", "--set", "TRAIN.AMP=auto", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "changed config" not in printed and read_config(out / "config.yaml").TRAIN.AMP == mode
    # resumed on a machine that resolves otherwise: chosen again there, and said as a changed config
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": not native)
    shutil.rmtree(out / "snapshots" / "iter_0000004")
    assert main(["train", "--data", str(voc), "--split", "trainval", "--out", str(out), "--no-progress", *TINY,
                 "--set", "TRAIN.MAX_ITERS=4", "--set", "TRAIN.AMP=auto", "--resume"]) == 0
    other = "none" if native else "bf16"
    assert f"TRAIN.AMP: {mode} -> {other}" in capsys.readouterr().out
    assert read_config(out / "config.yaml").TRAIN.AMP == other
    # resumed from the run's own config.yaml (frcnn train --resume without --config): auto chose the mode written
    # there, so it chooses again here (a bf16 run moved to a CPU without it must not run emulated bf16)
    monkeypatch.setattr(precision, "native_bf16", lambda device="cpu": native)
    assert main(["train", "--data", str(voc), "--split", "trainval", "--out", str(out), "--no-progress",
                 "--resume", "--set", "TRAIN.MAX_ITERS=6"]) == 0
    printed = capsys.readouterr().out
    assert f"TRAIN.AMP: {other} -> {mode}" in printed and f"precision: TRAIN.AMP=auto -> {mode}" in printed
    assert read_config(out / "config.yaml").TRAIN.AMP == mode and read_checkpoint(out).iteration == 6
    # an explicit mode on resume is the user's: kept
    assert main(["train", "--data", str(voc), "--split", "trainval", "--out", str(out), "--no-progress",
                 "--resume", "--set", "TRAIN.MAX_ITERS=8", "--set", f"TRAIN.AMP={other}"]) == 0
    assert "precision: " not in capsys.readouterr().out and read_config(out / "config.yaml").TRAIN.AMP == other


def test_check_data_json_carries_positives(voc, capsys):
    assert main(["check-data", "--data", str(voc), "--split", "trainval", "--json", *TINY, "--set",
                 "ANCHOR_SCALES=auto"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["anchor_fit"]["anchor_scales"] == result["suggested_anchor_scales"]
    assert result["anchor_fit"]["mean_positives"] is not None and "positives_per_image" in result["anchor_fit"]


def _lib_cfg(*extra: str):
    return load_config("demo-cpu", ["TRAIN.SCALES=[96]", "TEST.SCALES=[96]", "TRAIN.DISPLAY=2", "DEVICE=cpu",
                                    "TRAIN.WARMUP_ITERS=0", "TRAIN.SNAPSHOT_ITERS=4", "TRAIN.LEARNING_RATE=0.01",
                                    "ANCHOR_SCALES=auto", "TRAIN.MAX_EPOCHS=1", "TRAIN.STEP_EPOCHS=[0.5]", *extra])


class FewerImages(TinySet):
    """TinySet with its last image left out (a training set that changed between start and resume)."""

    def __len__(self) -> int:
        return 3


def test_resume_keeps_the_resolved_values_and_resolution_is_idempotent(tmp_path, capsys):
    data = TinySet()  # 4 images + mirrored, 1 an iteration: 1 epoch = 8 iterations, the step at 4
    full = train(_lib_cfg(), data, tmp_path / "full", progress=False)
    assert (full.cfg.TRAIN.MAX_ITERS, full.cfg.TRAIN.STEPSIZE) == (8, (4,))
    resolved = full.cfg
    assert resolve_run_config(resolved, data)[0] == resolved  # resolving the resolved config changes nothing
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "snapshots" / "iter_0000008")  # as if killed after iteration 4..7
    capsys.readouterr()
    # resumed with the config as given (auto, epochs): the run's values, no line about a changed config
    train(_lib_cfg(), data, part, resume=True, progress=False)
    printed = capsys.readouterr().out
    assert "changed config" not in printed and "schedule:" not in printed
    scales = ", ".join(f"{s:g}" for s in resolved.ANCHOR_SCALES)
    assert f"anchors: ANCHOR_SCALES=auto -> [{scales}], the run's (chosen when it started)" in printed
    assert read_config(part / "config.yaml") == resolved and read_checkpoint(part).iteration == 8
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the uninterrupted run's weights
    assert json.loads((part / "meta.json").read_text())["resolved"]["ANCHOR_SCALES"] == "auto"
    # resumed with the run's own config (what frcnn train --resume reads) on a training set of 3 images: one line,
    # the run's iterations kept
    shutil.rmtree(part / "snapshots" / "iter_0000008")
    train(resolved, FewerImages(), part, resume=True, progress=False)
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == (
        "--resume: keeping the run's schedule, TRAIN.MAX_ITERS 8 and STEPSIZE [4] (resolved for 8 images an epoch, "
        "1 an iteration); the training set as it is now (1 epoch of 6 images (3 + mirrored), 1 image an iteration) "
        "would make it 6 and [3]")
    assert read_config(part / "config.yaml") == resolved and read_checkpoint(part).iteration == 8
    # another MAX_EPOCHS is another schedule: resolved again, and said as a changed config
    train(_lib_cfg("TRAIN.MAX_EPOCHS=1.5"), data, part, resume=True, progress=False)
    printed = capsys.readouterr().out
    assert "schedule: 1.5 epochs of 8 images (4 + mirrored), 1 image an iteration = 12 iterations" in printed
    assert "TRAIN.MAX_ITERS: 8 -> 12" in printed and read_checkpoint(part).iteration == 12


def test_a_fixed_config_resolves_to_itself():
    cfg = load_config("demo-cpu", ["DEVICE=cpu"])
    assert resolve_run_config(cfg, TinySet()) == (cfg, [], {})


def test_bad_combinations_are_one_line(voc, tmp_path, capsys):
    def error(args: list[str]) -> str:
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and len(err.splitlines()) == 1, err
        return err

    train_args = ["train", "--data", str(voc), "--split", "trainval", "--no-progress", *TINY]
    err = error([*train_args, "--out", str(tmp_path / "a"), "--set", "TRAIN.MAX_EPOCHS=2",
                 "--set", "TRAIN.STEP_EPOCHS=[2]"])
    assert "TRAIN.STEP_EPOCHS=[2.0] has 2, not below TRAIN.MAX_EPOCHS=2" in err
    assert not (tmp_path / "a" / "config.yaml").exists()
    assert "TRAIN.STEP_EPOCHS needs TRAIN.MAX_EPOCHS" in error([*train_args, "--out", str(tmp_path / "b"),
                                                                 "--set", "TRAIN.STEP_EPOCHS=[2]"])
    assert "expects a list of numbers or auto" in error([*train_args, "--out", str(tmp_path / "c"),
                                                          "--set", "ANCHOR_SCALES=automatic"])
    # a command that has no training set to choose from: one line, before any work
    assert "ANCHOR_SCALES=auto" in error(["benchmark", "--config", "demo-cpu", "--set", "ANCHOR_SCALES=auto",
                                          "--runs", "1", "--warmup", "0"])


@pytest.mark.slow
def test_two_processes_resolve_once_and_alike(voc, tmp_path):
    """Under torchrun process 0 resolves, every process trains with its values: 6 images + mirrored over a global
    batch of 2 (2 processes x 1) = 6 iterations an epoch."""
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                           "127.0.0.1", "--master-port", str(port), "-m", "frcnn", "train", "--data", str(voc),
                           "--split", "trainval", "--out", str(out), "--no-progress", *TINY, *EPOCHS],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _prefixed(done.stdout, "schedule: ") == ["0.5 epochs of 12 images (6 + mirrored), 2 images an iteration "
                                                    "(2 processes x 1) = 3 iterations, LR x0.1 at 2 (epoch 0.25)"]
    assert len(_prefixed(done.stdout, "anchors: ")) == 1
    cfg = read_config(out / "config.yaml")
    assert (cfg.TRAIN.MAX_ITERS, cfg.TRAIN.STEPSIZE) == (3, (2,)) and read_checkpoint(out).iteration == 3


@needs_bccd
def test_scratch_cpu_resolves_on_bccd_as_its_comment_says():
    """The scratch-cpu preset on BCCD trainval (292 images, mirrored): 17 epochs of 4 images an iteration = 17 x 584
    / 4 = 2482 iterations, the step at 13 epochs = 1898; its anchors are the demo's [2, 4, 8] (BCCD's cells of
    27..127 px at 320)."""
    from frcnn.data import open_repaired

    data = open_repaired(BCCD, "trainval")
    cfg, lines, _ = resolve_run_config(load_config("scratch-cpu"), data)
    assert (cfg.TRAIN.MAX_ITERS, cfg.TRAIN.STEPSIZE) == (2482, (1898,))
    assert cfg.ANCHOR_SCALES == (2, 4, 8) and cfg.TRAIN.AMP == "auto" and cfg.TRAIN.LEARNING_RATE == 0.02
    assert not any(line.startswith("warning") for line in lines)  # platelets ~27 px at 320: not under 2 strides
    assert any(line.startswith("schedule: 17 epochs of 584 images (292 + mirrored), 4 images an iteration")
               for line in lines)
