"""Precise BatchNorm statistics: re-estimated with the final weights before the last snapshot is written.

A BatchNorm layer that trains keeps running averages of its batches' means and variances (momentum 0.1), so at
the end of training they are, in effect, the average of the last ten or so batches, each normalised by weights
that have moved since. With one image a batch (``demo-cpu``) that estimate is noisy, and test time uses it.
``TRAIN.PRECISE_BN_IMAGES`` > 0 re-estimates it after the last iteration, as detectron2's ``PreciseBN`` hook
does (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021): the model, in training mode and without
gradients, runs the forward passes of the batches training would have taken next (iterations ``MAX_ITERS``,
``MAX_ITERS + 1``, ...: the same augmentation and sampling; only the head's where every such layer is in it, as
in the tiny backbone), and each layer's statistics become the plain mean, over those batches, of each batch's
mean and variance (``momentum=None``). With several processes each averages its own batches and the processes'
averages are averaged. Only the BatchNorm statistics change, never a weight.

Nothing runs where no BatchNorm trains: pretrained backbones freeze theirs (``FrozenBatchNorm2d``, another
class), VGG16 has none.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm import tqdm

from frcnn.config import TrainConfig
from frcnn.engine import distributed as dist
from frcnn.engine.batches import TrainBatches, training_forward
from frcnn.engine.precision import Precision


def trained_batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics (a frozen one is another class)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def precise_bn_iterations(cfg_train: TrainConfig, world_size: int = 1) -> range:
    """The iterations whose batches re-estimate the statistics: at least ``PRECISE_BN_IMAGES`` images over all
    processes, whole batches, from ``MAX_ITERS`` on."""
    per_iteration = cfg_train.IMS_PER_BATCH * world_size
    count = math.ceil(cfg_train.PRECISE_BN_IMAGES / per_iteration)
    return range(cfg_train.MAX_ITERS, cfg_train.MAX_ITERS + count)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: TrainBatches, iterations: range, precision: Precision,
                        world: dist.World, progress: bool = False) -> int:
    """Re-estimate every trained BatchNorm's statistics of ``model`` over the batches of ``iterations``; return
    how many batches ran (0 where no BatchNorm trains). ``model`` keeps its weights and its train/eval mode."""
    norms = trained_batchnorms(model)
    if not norms or not iterations:
        return 0
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: every batch weighs the same
    model.train()
    device = world.device
    head = getattr(model, "head", None)  # every BatchNorm in the head (the tiny backbone's): only the head runs
    in_head = head is not None and {id(m) for m in norms} <= {id(m) for m in head.modules()}
    try:
        for i in tqdm(iterations, desc="precise BN", unit="batch", disable=not (progress and world.is_main),
                      dynamic_ncols=True):
            batch = batches[i]
            with precision.autocast(), dist.collective("the BatchNorm statistics' forward pass"):
                if in_head:
                    head(batch.images.to(device))
                else:
                    training_forward(model, batch, device)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
    if world.distributed:
        for m in norms:
            for stat in (m.running_mean, m.running_var):
                with dist.collective("averaging the BatchNorm statistics"):
                    torch.distributed.all_reduce(stat)
                stat.div_(world.size)
    return len(iterations)
