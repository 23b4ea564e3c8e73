"""TRAIN.EMA_DECAY: the moving average of the weights, its known answers, and how training saves and resumes it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_overfit import TinySet
from test_train import _cfg

from frcnn.config import load_config
from frcnn.engine.checkpoint import read_checkpoint
from frcnn.engine.ema import WeightAverage
from frcnn.engine.train import train
from frcnn.errors import CheckpointError, ConfigError


def _net(weight: float, running_mean: float, batches: int) -> torch.nn.Module:
    net = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.fill_(weight)
        net[1].running_mean.fill_(running_mean)
        net[1].num_batches_tracked.fill_(batches)
    return net


def test_weight_average_known_answers():
    live = _net(0.0, 0.0, 0)
    ema = WeightAverage(live, decay=0.9)
    live.load_state_dict(_net(1.0, 4.0, 7).state_dict())
    ema.update(live)  # update 1: decay min(0.9, 2/11) = 2/11, so 9/11 of the new value
    assert ema.module[0].weight.item() == pytest.approx(9 / 11)
    assert ema.module[1].running_mean.item() == pytest.approx(36 / 11)
    assert ema.module[1].num_batches_tracked.item() == 7  # a counter is copied, not averaged
    live.load_state_dict(_net(2.0, 0.0, 8).state_dict())
    ema.update(live)  # update 2: decay 3/12
    assert ema.module[0].weight.item() == pytest.approx(0.25 * 9 / 11 + 0.75 * 2.0)
    late = WeightAverage(_net(0.0, 0.0, 0), decay=0.9, updates=1000)  # (1 + n) / (10 + n) > 0.9: the cap
    late.update(_net(1.0, 0.0, 0))
    assert late.module[0].weight.item() == pytest.approx(0.1)
    assert live[0].weight.item() == 2.0 and not any(p.requires_grad for p in ema.module.parameters())


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_ema_decay_outside_0_1_is_one_line(decay):
    with pytest.raises(ConfigError, match="TRAIN.EMA_DECAY"):
        load_config("demo-cpu", [f"TRAIN.EMA_DECAY={decay}"])


def _weights(path):
    return load_file(str(path))


def test_training_saves_the_average_and_trains_as_without_it(tmp_path):
    data = TinySet()
    # BatchNorm's statistics left as training keeps them (the plain run's would be re-estimated at its end)
    steps = ["TRAIN.MAX_ITERS=5", "TRAIN.SNAPSHOT_ITERS=1", "TRAIN.SNAPSHOT_KEPT=5", "TRAIN.PRECISE_BN_IMAGES=0"]
    train(_cfg(*steps), data, tmp_path / "plain", progress=False)
    train(_cfg(*steps, "TRAIN.EMA_DECAY=0.5"), data, tmp_path / "ema", progress=False)
    snaps = [tmp_path / "ema" / "snapshots" / f"iter_{k:07d}" for k in range(1, 6)]
    plain = _weights(tmp_path / "plain" / "model.safetensors")
    sgd = _weights(snaps[-1] / "training_weights.safetensors")
    assert all(torch.equal(plain[k], sgd[k]) for k in plain)  # the average never feeds back into training
    final = _weights(tmp_path / "ema" / "model.safetensors")
    assert not all(torch.equal(plain[k], final[k]) for k in plain if final[k].is_floating_point())
    assert json.loads((tmp_path / "ema" / "meta.json").read_text())["ema_updates"] == 5
    for k in range(2, 6):  # snapshot k's average = d prev average + (1 - d) weights after step k, d = min(0.5, ...)
        d = min(0.5, (1 + k) / (10 + k))
        before, now = _weights(snaps[k - 2] / "model.safetensors"), _weights(snaps[k - 1] / "model.safetensors")
        step = _weights(snaps[k - 1] / "training_weights.safetensors")
        for key, value in now.items():
            expected = step[key] if not value.is_floating_point() else d * before[key] + (1 - d) * step[key]
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=f"update {k}: {key}")


def test_resume_with_ema_equals_an_uninterrupted_run(tmp_path):
    data = TinySet()
    ema = "TRAIN.EMA_DECAY=0.6"
    train(_cfg("TRAIN.MAX_ITERS=6", "TRAIN.SNAPSHOT_ITERS=3", ema), data, tmp_path / "full", progress=False)
    train(_cfg("TRAIN.MAX_ITERS=3", "TRAIN.SNAPSHOT_ITERS=3", ema), data, tmp_path / "part", progress=False)
    train(_cfg("TRAIN.MAX_ITERS=6", "TRAIN.SNAPSHOT_ITERS=3", ema), data, tmp_path / "part", resume=True,
          progress=False)
    for name in ("model.safetensors", "snapshots/iter_0000006/training_weights.safetensors"):
        full, part = _weights(tmp_path / "full" / name), _weights(tmp_path / "part" / name)
        assert all(torch.equal(full[k], part[k]) for k in full), name


def test_a_garbled_update_count_is_one_line(tmp_path):
    train(_cfg("TRAIN.MAX_ITERS=1", "TRAIN.EMA_DECAY=0.5"), TinySet(), tmp_path / "run", progress=False)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    (tmp_path / "run" / "meta.json").write_text(json.dumps({**meta, "ema_updates": -3}))
    with pytest.raises(CheckpointError, match=r"meta.json: ema_updates must be a whole number >= 0, got -3"):
        read_checkpoint(tmp_path / "run")


def test_resume_without_the_training_weights_is_one_line(tmp_path):
    cfg = _cfg("TRAIN.MAX_ITERS=1", "TRAIN.EMA_DECAY=0.5")
    train(cfg, TinySet(), tmp_path / "run", progress=False)
    (tmp_path / "run" / "snapshots" / "iter_0000001" / "training_weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"iter_0000001: no training_weights.safetensors to resume from"):
        train(_cfg("TRAIN.MAX_ITERS=2", "TRAIN.EMA_DECAY=0.5"), TinySet(), tmp_path / "run", resume=True,
              progress=False)
    assert (tmp_path / "run" / "model.safetensors").is_file()  # the run's checkpoint is left as it was
