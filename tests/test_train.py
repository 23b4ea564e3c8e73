"""Training loop: schedule, resumption equal to an uninterrupted run, refusal to overwrite, NaN stop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_overfit import TinySet

from frcnn.config import load_config
from frcnn.engine.batches import TrainBatches, iteration_seed
from frcnn.engine.checkpoint import read_checkpoint
from frcnn.engine.train import TrainingError, learning_rate, train

FAST = ["TRAIN.SCALES=[96]", "TEST.SCALES=[96]", "TRAIN.DISPLAY=2", "TRAIN.WARMUP_ITERS=3", "DEVICE=cpu",
        "TRAIN.STEPSIZE=[5]", "TRAIN.LEARNING_RATE=0.01"]


def _cfg(*extra: str):
    return load_config("demo-cpu", FAST + list(extra))


def test_learning_rate_schedule():
    cfg = load_config(None, ["TRAIN.LEARNING_RATE=0.1", "TRAIN.STEPSIZE=[10, 20]", "TRAIN.WARMUP_ITERS=4",
                             "TRAIN.WARMUP_FACTOR=0.25"])
    assert learning_rate(cfg.TRAIN, 0) == pytest.approx(0.025)
    assert learning_rate(cfg.TRAIN, 2) == pytest.approx(0.1 * (0.25 * 0.5 + 0.5))
    assert learning_rate(cfg.TRAIN, 4) == pytest.approx(0.1)
    assert learning_rate(cfg.TRAIN, 10) == pytest.approx(0.01)
    assert learning_rate(cfg.TRAIN, 25) == pytest.approx(0.001)


def test_batches_visit_every_image_and_flip_once_per_epoch():
    cfg = _cfg()
    batches = TrainBatches(TinySet(), cfg)
    epoch = [batches.entries(i)[0] for i in range(8)]
    assert sorted(epoch) == sorted((i, f) for i in range(4) for f in (False, True))
    assert batches.entries(3) == TrainBatches(TinySet(), cfg).entries(3)  # a pure function of (seed, it)
    assert iteration_seed(3, 5) != iteration_seed(3, 6) != iteration_seed(4, 5)


def test_flipped_batch_mirrors_the_boxes():
    cfg = _cfg("TRAIN.SCALES=[160]")
    batches = TrainBatches(TinySet(), cfg)
    it = next(i for i in range(8) if batches.entries(i)[0] == (1, True))
    batch = batches[it]
    # image 1 has one circle at x 12..75 in a 160 px image: mirrored it spans 84..147
    assert batch.gt_boxes[0].tolist() == [[84.0, 70.0, 147.0, 133.0]]


def test_resume_equals_an_uninterrupted_run(tmp_path):
    data = TinySet()
    train(_cfg("TRAIN.MAX_ITERS=8", "TRAIN.SNAPSHOT_ITERS=4"), data, tmp_path / "full", progress=False)
    train(_cfg("TRAIN.MAX_ITERS=4", "TRAIN.SNAPSHOT_ITERS=4"), data, tmp_path / "part", progress=False)
    train(_cfg("TRAIN.MAX_ITERS=8", "TRAIN.SNAPSHOT_ITERS=4"), data, tmp_path / "part", resume=True,
          progress=False)
    full = load_file(str(tmp_path / "full" / "model.safetensors"))
    part = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert full.keys() == part.keys()
    for key in full:
        assert torch.equal(full[key], part[key]), key
    assert read_checkpoint(tmp_path / "part").iteration == 8
    log = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [2, 4, 6, 8]
    expected = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["total"] for r in log] == pytest.approx([r["total"] for r in expected])


def test_training_refuses_a_non_empty_folder_and_a_resume_without_snapshot(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(TrainingError, match="not empty"):
        train(_cfg("TRAIN.MAX_ITERS=1"), TinySet(), out, progress=False)
    assert (out / "precious.txt").read_text() == "keep me"
    with pytest.raises(TrainingError, match="no snapshot"):
        train(_cfg("TRAIN.MAX_ITERS=1"), TinySet(), tmp_path / "empty", resume=True, progress=False)


def test_a_non_finite_loss_stops_with_iteration_and_images(tmp_path):
    with pytest.raises(TrainingError, match=r"non-finite loss at iteration \d+ .* on images \['img"):
        train(_cfg("TRAIN.MAX_ITERS=6", "TRAIN.LEARNING_RATE=1e30", "TRAIN.WARMUP_ITERS=0"), TinySet(),
              tmp_path / "run", progress=False)


def test_scientific_notation_in_overrides_is_a_number():
    # YAML 1.1 alone reads "1e-3" as a string; users type it all the time
    assert load_config(None, ["TRAIN.LEARNING_RATE=1e-3"]).TRAIN.LEARNING_RATE == pytest.approx(0.001)
    assert load_config(None, ["PRETRAINED=1e3"]).PRETRAINED == "1e3"
    assert load_config(None, ["TRAIN.STEPSIZE=[1e3, 2e3]"]).TRAIN.STEPSIZE == (1000, 2000)
