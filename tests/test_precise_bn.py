"""TRAIN.PRECISE_BN_IMAGES: BatchNorm statistics re-estimated with the final weights (frcnn.engine.precise_bn).

Known answers: the statistics are the mean, over the batches, of each batch's channel means and unbiased
variances, computed here with plain tensor reductions on the output of the layer before the BatchNorm."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_overfit import TinySet
from test_train import _cfg
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from frcnn.config import load_config
from frcnn.engine.batches import TrainBatches
from frcnn.engine.distributed import World
from frcnn.engine.precise_bn import precise_bn_iterations, recompute_batchnorm
from frcnn.engine.precision import Precision
from frcnn.engine.train import train
from frcnn.errors import ConfigError

NONE = Precision("none", torch.device("cpu"), "TRAIN.AMP")


class _Batches:
    """``batches[i]``: a batch of 2 random images (seeded by ``i``), as much of a Batch as the layer reads."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def __getitem__(self, i: int) -> SimpleNamespace:
        self.asked.append(i)
        g = torch.Generator().manual_seed(i)
        images = torch.randn(2, 3, 8, 8, generator=g) * (1 + i) + i  # a different mean and spread each batch
        return SimpleNamespace(images=images, image_sizes=torch.tensor([[8, 8], [8, 8]]), gt_boxes=[], gt_labels=[],
                               seed=i, generators=lambda: [])


class _HeadOnly(nn.Module):
    """A detector whose only BatchNorm is in ``head``; calling the whole model is an error."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), norm)

    def forward(self, *args, **kwargs):
        raise AssertionError("only the head should run")


def _expected(conv: nn.Conv2d, batches: _Batches, iterations: range) -> tuple[torch.Tensor, torch.Tensor]:
    means, variances = [], []
    with torch.no_grad():
        for i in iterations:
            y = F.conv2d(batches[i].images, conv.weight)
            means.append(y.mean(dim=(0, 2, 3)))
            variances.append(y.var(dim=(0, 2, 3), unbiased=True))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_statistics_are_the_mean_of_the_batches_statistics():
    torch.manual_seed(0)
    model = _HeadOnly(nn.BatchNorm2d(4)).eval()
    norm = model.head[1]
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "tracked" not in k}
    batches = _Batches()
    ran = recompute_batchnorm(model, batches, range(10, 15), NONE, World())
    assert ran == 5 and batches.asked == [10, 11, 12, 13, 14]
    mean, var = _expected(model.head[0], _Batches(), range(10, 15))
    torch.testing.assert_close(norm.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.running_var, var, rtol=1e-5, atol=1e-5)
    assert int(norm.num_batches_tracked) == 5
    # the last batch alone (what momentum 1 would leave) is far from it: the known answer has power
    last_mean, _ = _expected(model.head[0], _Batches(), range(14, 15))
    assert (last_mean - mean).abs().max() > 0.1
    # nothing else moved: weights, momentum, eval mode
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert norm.momentum == 0.1 and not model.training


def test_batchnorm_outside_the_head_runs_the_whole_model():
    class Tail(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Conv2d(3, 4, 3, bias=False)
            self.tail_norm = nn.BatchNorm2d(4)
            self.calls = 0

        def forward(self, images, image_sizes, gt_boxes, gt_labels, generator=None):
            assert self.training  # the statistics are those of training mode
            self.calls += 1
            return self.tail_norm(self.head(images))

    torch.manual_seed(1)
    model = Tail()
    assert recompute_batchnorm(model, _Batches(), range(3), NONE, World()) == 3
    assert model.calls == 3 and model.training  # back in the mode it was in
    mean, var = _expected(model.head, _Batches(), range(3))
    torch.testing.assert_close(model.tail_norm.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.tail_norm.running_var, var, rtol=1e-5, atol=1e-5)


def test_frozen_batchnorm_is_left_alone_and_nothing_runs():
    model = _HeadOnly(FrozenBatchNorm2d(4))
    batches = _Batches()
    assert recompute_batchnorm(model, batches, range(5), NONE, World()) == 0
    assert batches.asked == []


@pytest.mark.parametrize(("images", "per", "world", "expected"),
                         [(500, 1, 1, range(7, 507)), (500, 4, 1, range(7, 132)), (10, 4, 2, range(7, 9)),
                          (0, 4, 1, range(7, 7))])
def test_iterations_follow_the_last_one_and_cover_the_images(images, per, world, expected):
    cfg = load_config("demo-cpu", [f"TRAIN.PRECISE_BN_IMAGES={images}", f"TRAIN.IMS_PER_BATCH={per}",
                                   "TRAIN.MAX_ITERS=7", "TRAIN.STEPSIZE=[5]"]).TRAIN
    assert precise_bn_iterations(cfg, world) == expected


def test_a_negative_number_of_images_is_one_line():
    with pytest.raises(ConfigError, match=r"TRAIN.PRECISE_BN_IMAGES=-1 must be at least 0"):
        load_config("demo-cpu", ["TRAIN.PRECISE_BN_IMAGES=-1"])


def test_demo_cpu_takes_it_and_the_other_presets_do_not():
    assert load_config("demo-cpu").TRAIN.PRECISE_BN_IMAGES == 500  # one image a batch
    assert load_config("scratch-cpu").TRAIN.PRECISE_BN_IMAGES == 0  # four: measured no gain on BCCD
    assert load_config(None).TRAIN.PRECISE_BN_IMAGES == 0  # the write-up's: pretrained, frozen BatchNorm


def test_training_saves_the_re_estimated_statistics_and_trains_as_without_them(tmp_path, capsys):
    """The run's model holds the statistics of the 3 batches after the last iteration under the final weights;
    every weight is that of the run without them, and a longer run resumed from the last snapshot ends as the
    uninterrupted one (training normalises with each batch's own statistics)."""
    data = TinySet()
    cfg = _cfg("TRAIN.MAX_ITERS=4", "TRAIN.SNAPSHOT_ITERS=4", "TRAIN.PRECISE_BN_IMAGES=3")
    train(cfg, data, tmp_path / "run", progress=False)
    assert "re-estimated over the next 3 training batches (TRAIN.PRECISE_BN_IMAGES=3)" in capsys.readouterr().out
    train(_cfg("TRAIN.MAX_ITERS=4", "TRAIN.SNAPSHOT_ITERS=4", "TRAIN.PRECISE_BN_IMAGES=0"), data, tmp_path / "off",
          progress=False)
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    off = load_file(str(tmp_path / "off" / "model.safetensors"))
    batches = TrainBatches(data, cfg)
    means, variances = [], []
    for i in (4, 5, 6):
        y = F.conv2d(batches[i].images, saved["head.0.weight"], stride=2, padding=1)
        means.append(y.mean(dim=(0, 2, 3)))
        variances.append(y.var(dim=(0, 2, 3), unbiased=True))
    torch.testing.assert_close(saved["head.1.running_mean"], torch.stack(means).mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(saved["head.1.running_var"], torch.stack(variances).mean(0), rtol=1e-4, atol=1e-5)
    statistics = [k for k in saved if "running_" in k or "num_batches_tracked" in k]
    assert statistics and all(torch.equal(saved[k], off[k]) for k in saved if k not in statistics)
    assert not torch.allclose(saved["head.1.running_mean"], off["head.1.running_mean"], rtol=1e-3, atol=1e-4)

    six = ("TRAIN.MAX_ITERS=6", "TRAIN.SNAPSHOT_ITERS=4", "TRAIN.PRECISE_BN_IMAGES=3")
    train(_cfg(*six), data, tmp_path / "whole", progress=False)
    train(_cfg(*six), data, tmp_path / "run", resume=True, progress=False)
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
