"""Mixed precision (``TRAIN.AMP`` / ``TEST.AMP``): ``none``, ``fp16`` or ``bf16``; ``TRAIN.AMP`` also ``auto``
(:func:`resolve_amp`: bf16 where the device computes it natively, else float32 on a CPU).

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

from frcnn.config import AMP_MODES, AUTO
from frcnn.errors import ConfigError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
#: the CPU instructions that make bf16 autocast native (PyTorch's AVX-512 kernels use them)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """True on a CPU where bf16 autocast runs natively: ``torch.backends.cpu.get_cpu_capability()`` is
    AVX-512 (not limited by ``ATEN_CPU_CAPABILITY``) and the CPU has ``avx512_bf16`` or ``amx_bf16``
    (PyTorch's own check where it has one, else ``/proc/cpuinfo``). False on any other device."""
    if torch.device(device).type != "cpu":
        return False
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if check is not None and check():
        return True
    return bool(cpu_flags() & set(BF16_FLAGS))


def resolve_amp(mode: str, device: torch.device | str) -> tuple[str, str]:
    """``TRAIN.AMP`` as a run on ``device`` uses it, and why: ``auto`` is ``bf16`` on a CPU with native bf16
    (:func:`native_bf16`; a training step in 0.64x float32's time there, 11x slower where bf16 is emulated:
    ``benchmarks/results/precision.md``) and ``none`` on any other CPU; on CUDA ``bf16`` where the GPU has it
    (Ampere and later), else ``fp16`` with a GradScaler. Any other mode is returned as it is."""
    if mode != AUTO:
        return mode, ""
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "this GPU computes bfloat16"
        return "fp16", "this GPU has no bfloat16: float16 with loss scaling"
    if device.type != "cpu":
        return "none", f"no mixed precision on {device.type}"
    if native_bf16(device):
        return "bf16", "this CPU computes bfloat16 natively"
    return "none", f"no native bfloat16 on this CPU ({torch.backends.cpu.get_cpu_capability()}): float32"


class Precision:
    """The autocast context and the backward/optimizer step of one ``AMP`` mode on one device.

    ``key`` names the setting in error messages (``TRAIN.AMP`` or ``TEST.AMP``).
    """

    def __init__(self, mode: str, device: torch.device | str, key: str = "AMP"):
        device = torch.device(device)
        mode = resolve_amp(mode, device)[0]
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
