"""An exponential moving average of the weights (``TRAIN.EMA_DECAY`` > 0): the detector a run saves and scores.

After every optimiser step the average moves towards the weights SGD is at: ``avg <- d avg + (1 - d) w`` with
``d = min(EMA_DECAY, (1 + n) / (10 + n))`` at the n-th update (TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``): early on ``d`` is small and the average follows the weights, so a short run is not pulled
towards its random initial weights. Floating-point buffers (BatchNorm's running statistics) are averaged the same
way; integer ones (BatchNorm's batch counter) are copied. The average never feeds back into training.

Where it goes: a snapshot's ``model.safetensors`` (what ``eval``, ``detect`` and the run folder get) holds the
average, ``training_weights.safetensors`` the weights SGD is at, for ``--resume``; ``meta.json``'s
``ema_updates`` the update count.
"""

from __future__ import annotations

import copy

import torch


def ema_decay(decay: float, updates: int) -> float:
    """The decay of the ``updates``-th update (1-based)."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightAverage:
    """The moving average of ``model``'s weights and buffers, held in a copy of it (``module``, eval mode)."""

    def __init__(self, model: torch.nn.Module, decay: float, updates: int = 0):
        self.decay, self.updates = decay, updates
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - ema_decay(self.decay, self.updates)
        live = model.state_dict()
        for key, avg in self.module.state_dict().items():
            if avg.is_floating_point():
                avg.lerp_(live[key], weight)
            else:
                avg.copy_(live[key])
