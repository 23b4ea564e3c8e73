"""``--quick``: the documented fast mode of ``frcnn eval``, ``detect`` and ``benchmark``.

On top of the checkpoint's config, in memory (the checkpoint folder is only read), ``--quick`` on a CPU:

- sets ``TEST.AMP``: ``bf16`` where the CPU has native bfloat16 (:func:`native_bf16`: PyTorch's kernels at
  AVX-512 and the ``avx512_bf16`` or ``amx_bf16`` instructions), else ``none`` (float32), since bf16 emulated on
  an AVX2 CPU is 5-100x slower (``benchmarks/results/precision.md``);
- runs the classification network's Linear layers in dynamic int8 (:func:`quantize_tail`).

It keeps the checkpoint's RoI count (``TEST.RPN_POST_NMS_TOP_N``: 100 for demo-cpu, 300 for the voc-* presets).
On CUDA it changes nothing: bf16 and the int8 tail are CPU measures, and ``TEST.AMP`` stays the checkpoint's.

The choice comes from the measured trade-off on BCCD test (``benchmarks/bench_fast_mode.py``, results in
``benchmarks/results/fast_mode.md``): bf16 and the int8 tail at the checkpoint's own 100 RoIs gave the whole
speed-up (1.65x, -0.01 mAP points); fewer than 100 RoIs (75, 50) lost more than 1 mAP point (small platelets)
and 300 or 150 RoIs were no better than 100 on that model, so the RoI count is left to the checkpoint (capping
the voc-* presets' 300 would cost accuracy nobody measured). :func:`quick_overrides` is the config policy,
:func:`quick_predictor` what ``eval`` and ``detect`` run.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frcnn.config import Config

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
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


def quick_overrides(cfg: Config, device: str | torch.device) -> dict[str, Any]:
    """The config keys ``--quick`` sets on ``cfg`` (a checkpoint's) for a run on ``device``, as an overrides
    dict for :func:`~frcnn.config.merge`: ``{"TEST": {"AMP": ...}}`` on a CPU, ``{"TEST": {}}`` elsewhere.
    ``TEST.RPN_POST_NMS_TOP_N`` (the RoI count) is never among them: it stays the checkpoint's."""
    test: dict[str, Any] = {}
    if torch.device(device).type == "cpu":
        test["AMP"] = "bf16" if native_bf16(device) else "none"
    return {"TEST": test}


def describe(cfg: Config, overrides: dict[str, Any], device: str | torch.device, int8: bool) -> str:
    """One line saying what ``--quick`` changed on ``cfg`` (printed by the commands)."""
    device = torch.device(device)
    if device.type != "cpu":
        return (f"quick mode: nothing to change on {device.type} (bf16/int8 are CPU measures); "
                "TEST.AMP stays the checkpoint's")
    parts = []
    for key, value in overrides["TEST"].items():
        old = getattr(cfg.TEST, key)
        parts.append(f"TEST.{key}={value}" + (f" (was {old})" if old != value else " (unchanged)"))
    parts.append("tail's Linear layers in int8" if int8 else "tail in float")
    if "AMP" in overrides["TEST"]:
        parts.append("this CPU has native bf16" if native_bf16(device)
                     else f"no native bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}): float32")
    return f"quick mode: {', '.join(parts)}"


class Float32(nn.Module):
    """``module`` run in float32 outside autocast: a dynamic int8 Linear takes float32 inputs only, and under
    bf16 autocast the layers before it hand it bfloat16."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.module(x.float())


def quantize_tail(model: nn.Module) -> bool:
    """Dynamic int8 quantization (``torch.ao.quantization.quantize_dynamic``: int8 weights, activations
    quantized per call) of every Linear layer of ``model.classifier`` (the tail's fully connected layers, the
    class score and box layers), each wrapped in :class:`Float32`; in place, on a CPU model only. False, and
    the model unchanged, where PyTorch cannot (a CUDA model, no quantized engine or an x86 CPU without AVX2,
    the API gone: ``torch.ao.quantization`` is deprecated in favour of torchao)."""
    engine = torch.backends.quantized.engine
    if next(model.parameters()).device.type != "cpu" or engine == "none":
        return False
    if engine in ("x86", "fbgemm") and not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        return False  # fbgemm's kernels need AVX2
    try:
        import warnings

        with warnings.catch_warnings():  # torch.ao.quantization says it is deprecated (in favour of torchao)
            warnings.simplefilter("ignore")
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
            from torch.ao.quantization import quantize_dynamic

            classifier = quantize_dynamic(model.classifier, {nn.Linear}, dtype=torch.qint8)
    except (ImportError, AttributeError, RuntimeError, NotImplementedError, AssertionError):
        return False
    for parent in list(classifier.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DynamicLinear):
                setattr(parent, name, Float32(child))
    model.classifier = classifier
    return True


def quick_predictor(folder: str | Path, device: str | torch.device | None, fast: bool = True,
                    say: Callable[[str], None] | None = None, overrides: dict | None = None):
    """A :class:`~frcnn.engine.inference.Predictor` of the checkpoint ``folder`` with :func:`quick_overrides`
    applied in memory (the folder is only read); ``fast``: the fast inference path; ``say`` gets the line of
    :func:`describe`. ``overrides``: the user's ``--set TEST.*`` (they win over quick mode's), said in one more line."""
    from frcnn.engine.checkpoint import CONFIG, choose_device, load_model, read_config
    from frcnn.engine.inference import Predictor, describe_overrides

    device = choose_device(device)
    path = Path(folder) / CONFIG
    base = read_config(path) if path.is_file() else None  # no config.yaml: load_model says what is wrong
    given = (overrides or {}).get("TEST", {})
    quick = None
    if base is not None:  # the user's keys are left out of quick mode's
        quick = {"TEST": {k: v for k, v in quick_overrides(base, device)["TEST"].items() if k not in given}}
    model, ckpt = load_model(folder, device, overrides={"TEST": {**(quick or {"TEST": {}})["TEST"], **given}})
    if fast:
        from frcnn.engine.fast import prepare_for_inference

        model = prepare_for_inference(model, inplace=True)
    int8 = quantize_tail(model)
    if say is not None and base is not None and quick is not None:
        say(describe(base, quick, device, int8))
        if overrides:
            say(describe_overrides(base, overrides))
    return Predictor(model, ckpt.cfg, ckpt.class_names)
