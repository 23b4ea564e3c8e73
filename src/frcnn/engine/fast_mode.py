"""``--quick``: the documented fast mode of ``frcnn eval``, ``detect`` and ``benchmark``.

On top of the checkpoint's config, in memory (the checkpoint folder is only read), ``--quick`` on a CPU:

- sets ``TEST.AMP``: ``bf16`` where the CPU has native bfloat16 (:func:`native_bf16`: PyTorch's kernels at
  AVX-512 and the ``avx512_bf16`` or ``amx_bf16`` instructions), else ``none`` (float32), since bf16 emulated on
  an AVX2 CPU is 5-100x slower (``benchmarks/results/precision.md``);
- runs the classification network's Linear layers in dynamic int8 (:func:`quantize_tail`);
- on CPUs with VNNI (AVX-512 with ``avx512_vnni`` or ``amx_int8``) runs the backbone head and the RPN's 3x3
  convolution in static int8 (:func:`quantize_convs`: ranges observed on the first ``CALIBRATION_IMAGES``
  images, which run them in float; a command that will detect fewer than ``INT8_HEAD_MIN_IMAGES`` images keeps
  them float, which is cheaper then).

It keeps the checkpoint's RoI count (``TEST.RPN_POST_NMS_TOP_N``: 100 for demo-cpu, 300 for the voc-* presets).
On CUDA it changes nothing: bf16 and the int8 tail are CPU measures, and ``TEST.AMP`` stays the checkpoint's.

The choice comes from the measured trade-off on BCCD test (``benchmarks/bench_fast_mode.py``, results in
``benchmarks/results/fast_mode.md``): bf16 and the int8 tail at the checkpoint's own 100 RoIs gave 1.59x at
-0.01 mAP points, the int8 head and RPN convolution took it to 2.02x at -0.02 (rows side by side); fewer than
100 RoIs (75, 50) lost more than 1 mAP point (small platelets)
and 300 or 150 RoIs were no better than 100 on that model, so the RoI count is left to the checkpoint (capping
the voc-* presets' 300 would cost accuracy nobody measured). :func:`quick_overrides` is the config policy,
:func:`quick_predictor` what ``eval`` and ``detect`` run.
"""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from frcnn.config import Config
from frcnn.engine.precision import cpu_flags, native_bf16


def quick_overrides(cfg: Config, device: str | torch.device) -> dict[str, Any]:
    """The config keys ``--quick`` sets on ``cfg`` (a checkpoint's) for a run on ``device``, as an overrides
    dict for :func:`~frcnn.config.merge`: ``{"TEST": {"AMP": ...}}`` on a CPU, ``{"TEST": {}}`` elsewhere.
    ``TEST.RPN_POST_NMS_TOP_N`` (the RoI count) is never among them: it stays the checkpoint's."""
    test: dict[str, Any] = {}
    if torch.device(device).type == "cpu":
        test["AMP"] = "bf16" if native_bf16(device) else "none"
    return {"TEST": test}


def describe(cfg: Config, overrides: dict[str, Any], device: str | torch.device, int8: bool,
             int8_head: int = 0) -> str:
    """One line saying what ``--quick`` changed on ``cfg`` (printed by the commands); ``int8_head``: the
    calibration images of :func:`quantize_convs` (0: the head stays float)."""
    device = torch.device(device)
    if device.type != "cpu":
        return (f"quick mode: nothing to change on {device.type} (bf16/int8 are CPU measures); "
                "TEST.AMP stays the checkpoint's")
    parts = []
    for key, value in overrides["TEST"].items():
        old = getattr(cfg.TEST, key)
        parts.append(f"TEST.{key}={value}" + (f" (was {old})" if old != value else " (unchanged)"))
    parts.append(f"backbone head and RPN conv in int8 after {int8_head} calibration image"
                 f"{'s' if int8_head > 1 else ''} (run in float)" if int8_head else "backbone head in float")
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


#: images whose backbone-head activations set the int8 head's ranges (they run in float32 meanwhile)
CALIBRATION_IMAGES = 4
#: fewer images than this (``frcnn detect`` on a few files) keep the float head: a calibration image costs a
#: float32 head pass (demo-cpu at 320 px, 1 thread: 35.5 ms vs 19.2 in bf16), an int8 image saves ~9 ms (10.4 ms),
#: so 4 pay back after ~7 (`frcnn benchmark --config CKPT --threads 1 [--quick]`, run by run: indicative)
INT8_HEAD_MIN_IMAGES = 16
VNNI_FLAGS = ("avx512_vnni", "amx_int8")


class CalibratedInt8(nn.Module):
    """A convolutional module (the backbone head; the RPN's 3x3 convolution) in static int8, calibrated on its
    first calls.

    Its first ``calibration`` calls run the module in float32 with observers on every activation
    (``torch.ao.quantization.quantize_fx.prepare_fx``, x86 engine: per-channel symmetric int8 weights, uint8
    activations over their observed min..max, all 8 bits since VNNI needs no reduced range), so those images get
    float32 results; after the last of them it is converted (``convert_fx``) and every later call runs the int8
    kernels. Inputs and outputs are float32 outside autocast. Calibration sees pixels only (no boxes, no
    labels): the images a command detects or evaluates, in the order it reads them. On BCCD test (demo-cpu, 4
    calibration images) quick mode with it scored 0.02 mAP points under float (``benchmarks/results/fast_mode.md``);
    min..max observers calibrate in about the time of a float32 pass."""

    def __init__(self, observed: nn.Module, calibration: int):
        super().__init__()
        self.observed: nn.Module | None = observed
        self.int8: nn.Module | None = None
        self.left = calibration

    def forward(self, x: torch.Tensor):
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.int8 is not None:
                return self.int8(x)
            out = self.observed(x)
            self.left -= 1
            if self.left <= 0:
                from torch.ao.quantization.quantize_fx import convert_fx

                with _quiet():
                    self.int8, self.observed = convert_fx(self.observed), None
            return out


@contextmanager
def _quiet():
    with warnings.catch_warnings():  # torch.ao.quantization says it is deprecated (in favour of torchao)
        warnings.simplefilter("ignore")
        yield


def quantize_convs(model: nn.Module, calibration: int = CALIBRATION_IMAGES) -> bool:
    """The backbone head and the RPN's 3x3 convolution as :class:`CalibratedInt8`, calibrated on the first
    ``calibration`` images (the RPN convolution runs once per pyramid level); in place. Only where int8 was
    measured to pay: a CPU model, x86 quantized engine, AVX-512 with VNNI (``avx512_vnni`` or ``amx_int8``).
    False, and the model unchanged, elsewhere or where a module does not trace (``torch.fx``) or the API is gone."""
    if (next(model.parameters()).device.type != "cpu" or torch.backends.quantized.engine not in ("x86", "fbgemm")
            or not torch.backends.cpu.get_cpu_capability().startswith("AVX512") or not cpu_flags() & set(VNNI_FLAGS)):
        return False
    try:
        with _quiet():
            from torch.ao.quantization import (
                MinMaxObserver,
                QConfig,
                default_per_channel_weight_observer,
                get_default_qconfig_mapping,
            )
            from torch.ao.quantization.quantize_fx import prepare_fx

            qconfig = QConfig(activation=MinMaxObserver.with_args(reduce_range=False),  # VNNI: the full 8 bits
                              weight=default_per_channel_weight_observer)
            qconfig_mapping = get_default_qconfig_mapping("x86").set_global(qconfig)
            device = next(model.parameters()).device

            def observed(module: nn.Module, channels: int) -> nn.Module:
                module = copy.deepcopy(module).float().to(memory_format=torch.contiguous_format).eval()
                return prepare_fx(module, qconfig_mapping, (torch.zeros(1, channels, 64, 64, device=device),))

            head = observed(model.head, 3)
            rpn_conv = observed(model.rpn.rpn_net, model.rpn.rpn_net.in_channels)
    except Exception:  # noqa: BLE001 - any tracing or API failure leaves the float model, said by the caller
        return False
    model.head = CalibratedInt8(head, calibration)
    model.rpn.rpn_net = CalibratedInt8(rpn_conv, calibration * len(model.strides))
    return True


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
        with _quiet():
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
                    say: Callable[[str], None] | None = None, overrides: dict | None = None,
                    images: int | None = None):
    """A :class:`~frcnn.engine.inference.Predictor` of the checkpoint ``folder`` with :func:`quick_overrides`
    applied in memory (the folder is only read); ``fast``: the fast inference path; ``say`` gets the line of
    :func:`describe`. ``overrides``: the user's ``--set TEST.*`` (they win over quick mode's), said in one more line.
    ``images``: how many images it will detect, if known: below ``INT8_HEAD_MIN_IMAGES`` the head stays float."""
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
    few = images is not None and images < INT8_HEAD_MIN_IMAGES
    int8_head = CALIBRATION_IMAGES if not few and quantize_convs(model) else 0
    if say is not None and base is not None and quick is not None:
        say(describe(base, quick, device, int8, int8_head))
        if overrides:
            say(describe_overrides(base, overrides))
    return Predictor(model, ckpt.cfg, ckpt.class_names)
