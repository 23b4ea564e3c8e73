"""Mixed precision (``TRAIN.AMP`` / ``TEST.AMP``): ``none``, ``fp16`` or ``bf16``.

:class:`Precision` is all a training loop or a predictor needs::

    precision = Precision(cfg.TRAIN.AMP, device)       # a one-line ConfigError for fp16 on a CPU
    with precision.autocast():
        losses = model(...)
    optimizer.zero_grad(set_to_none=True)
    precision.backward_step(sum(losses.values()), optimizer)

``bf16`` runs the convolutions and linear layers under ``torch.autocast`` in bfloat16 (CPU or CUDA); it has
float32's range, so no loss scaling. ``fp16`` is for CUDA GPUs: autocast in float16 with a
:class:`torch.amp.GradScaler` that scales the loss so small gradients do not underflow, skips a step whose
gradients are not finite and adapts the scale; its state is part of a resumable run (:meth:`state_dict`).

What autocast changes and what it must not: box coding, IoU and clipping, the proposal layer's decoding and
NMS inputs, the anchor and proposal target layers, the losses and the detection post-processing compute in
float32 whatever dtype the features and logits arrive in (each of those layers says so; ``tests/
test_precision.py`` checks it), so the returned losses and detections are float32.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from frcnn.config import AMP_MODES
from frcnn.errors import ConfigError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    """The autocast context and the backward/optimizer step of one ``AMP`` mode on one device.

    ``key`` names the setting in error messages (``TRAIN.AMP`` or ``TEST.AMP``).
    """

    def __init__(self, mode: str, device: torch.device | str, key: str = "AMP"):
        device = torch.device(device)
        if mode not in AMP_MODES:
            raise ConfigError(f"{key}={mode!r} is not one of {', '.join(AMP_MODES)}")
        if mode == "fp16" and device.type != "cuda":
            raise ConfigError(f"{key}=fp16 needs a CUDA device, this run is on {device.type} "
                              f"(fp16 is for GPUs; use {key}=bf16 or none)")
        self.mode, self.device = mode, device
        self.dtype = DTYPES.get(mode, torch.float32)
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in this mode's dtype on this device; a no-op context for ``none``."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` then ``optimizer.step()``; with fp16 through the GradScaler (scaled backward, a
        step skipped when a gradient is inf/NaN, scale update). Zeroing the gradients is the caller's."""
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's state (plain numbers, JSON-serialisable) for fp16; ``{}`` otherwise."""
        return dict(self.scaler.state_dict()) if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. An empty state (a run saved without fp16) leaves a fresh scaler; a
        scaler state given to ``none``/``bf16`` is ignored (the loss scale only matters to fp16)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def __repr__(self) -> str:
        return f"Precision({self.mode!r}, {str(self.device)!r})"
