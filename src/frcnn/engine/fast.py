"""The fast inference path: the same detector, rearranged for inference only.

- **Frozen BatchNorm folded into the convolution before it.** In eval mode a BatchNorm (frozen or not) is
  ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, an affine map per channel, so the convolution before it
  can absorb it: ``w' = w * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``. One pass
  over the feature map instead of two; outputs equal up to float rounding.
- **Channels-last** memory layout for the convolutions, where it is faster on this machine (oneDNN's
  blocked kernels prefer NHWC on many x86 CPUs; ``benchmarks/results/fast_path.md`` has the figures). The
  model's layers accept either layout, so only the parameters and the input change.

:func:`prepare_for_inference` returns a rearranged *copy*: the model that trains is never touched. Training,
``frcnn explain`` (whose pictures show the network's own stages) and validation during training use the model
as it is; ``frcnn eval``, ``detect`` and ``benchmark`` use the fast path unless ``--no-fast``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

BATCHNORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution (the next child registered after it in the same
    parent, as in torchvision's ResNets and frcnn's tiny backbone) into that convolution, replacing the
    BatchNorm by an identity. In place, for eval mode only; returns the number folded."""
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, BATCHNORMS)
                    and conv.out_channels == bn.running_mean.numel()):
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
            setattr(parent, bn_name, nn.Identity())
            folded += 1
    return folded


def channels_last_pays(device: torch.device, memory_format: str = "auto") -> bool:
    """Whether to run the convolutions in channels-last on ``device`` (the config's ``MEMORY_FORMAT``):
    ``auto`` picks it on CPUs with AVX-512, where it measured faster (inference:
    ``benchmarks/results/fast_path.md``; the R50-C4 training step: ``benchmarks/results/torchvision_r50c4.md``).
    Elsewhere (AVX2 CPUs, CUDA) it was not measured to win."""
    if memory_format != "auto":
        return memory_format == "channels_last"
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def prepare_for_inference(model: nn.Module, channels_last: bool | None = None, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` for inference: BatchNorm folded, eval mode, no gradients, and channels-last where
    it pays (``None``: the model's ``cfg.MEMORY_FORMAT``, see :func:`channels_last_pays`; ``True``/``False`` to force).
    ``inplace``: rearrange ``model`` itself (a model loaded only to run, like a checkpoint's: no copy needed)."""
    fast = (model if inplace else copy.deepcopy(model)).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    fold_batchnorm(fast)
    if channels_last is None:
        cfg = getattr(fast, "cfg", None)
        channels_last = channels_last_pays(next(fast.parameters()).device, getattr(cfg, "MEMORY_FORMAT", "auto"))
    if channels_last:  # a convolution whose weight is channels-last answers in channels-last: the rest follows
        fast.to(memory_format=torch.channels_last)
    return fast
