"""The fast inference path: the same detector, rearranged for inference only.

- **Frozen BatchNorm folded into the convolution before it.** In eval mode a BatchNorm (frozen or not) is
  ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, an affine map per channel, so the convolution before it
  can absorb it: ``w' = w * s``, ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``. One pass
  over the feature map instead of two; outputs equal up to float rounding.
- **Channels-last** memory layout for the convolutions, where it is faster on this machine (oneDNN's
  blocked kernels prefer NHWC on many x86 CPUs; ``benchmarks/results/fast_path.md`` has the figures). The
  model's layers accept either layout, so only the parameters and the input change.
- **The tail's first 1x1 convolutions before RoIAlign** (:func:`convolve_before_pooling`, ``POOLING_MODE=align``
  with a ResNet C4 tail): run once on the feature map instead of on every RoI's 7x7 crop.
- **Freed memory kept for reuse** (:func:`reuse_freed_memory`): glibc hands every large block (a 600x1000 image's
  feature maps are 10-120 MB) back to the operating system when it is freed, so the next tensor of that size
  page-faults in again, 4 KB at a time, inside the convolution that first writes it.

:func:`prepare_for_inference` returns a rearranged *copy*: the model that trains is never touched. Training,
``frcnn explain`` (whose pictures show the network's own stages) and validation during training use the model
as it is; ``frcnn eval``, ``detect`` and ``benchmark`` use the fast path unless ``--no-fast``.
"""

from __future__ import annotations

import copy
import ctypes

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import FrozenBatchNorm2d

BATCHNORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt() parameters (malloc.h)
TRIM_BYTES = 1 << 30  # free memory above this much at the heap's top still goes back to the operating system


def reuse_freed_memory() -> bool:
    """Make this process's C allocator keep freed memory for the next tensor, as onnxruntime's arena does.

    By default glibc serves each allocation over 32 MB (often less) with its own ``mmap`` and unmaps it on free;
    the next one of that size is fresh memory whose every 4 KB page faults on first write, a cost paid inside
    the convolution writing it (with the setting below, R50-C4's fast path at 600x1000 ran 1.22x faster:
    ``benchmarks/results/memory_reuse.md``). With ``M_MMAP_MAX = 0`` every block comes from the heap, and with a high
    ``M_TRIM_THRESHOLD`` freed blocks stay there for reuse: the process keeps its peak memory until it exits
    (up to ``TRIM_BYTES`` more). Process-wide: the fast path and ``frcnn train`` call it (both do the same work
    again and again).
    Returns whether it took effect (False where the C library has no glibc ``mallopt``, e.g. macOS, Windows)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1


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


class PooledBottleneck(nn.Module):
    """ResNet's bottleneck block (BatchNorm folded) whose ``conv1`` and ``downsample`` ran on the feature map
    before RoI pooling, without their biases (:func:`convolve_before_pooling`): its input is the pooled
    ``[conv1 | downsample]`` channels; it adds ``conv1``'s bias, then does the rest of the block. The
    downsample's bias is added by ``conv3`` (both are added to the same sum)."""

    def __init__(self, block: Bottleneck):
        super().__init__()
        self.width = block.conv1.out_channels
        self.register_buffer("bias1", block.conv1.bias.detach().clone().view(1, -1, 1, 1))
        self.conv2, self.conv3, self.relu = block.conv2, block.conv3, block.relu
        self.conv3.bias.add_(block.downsample[0].bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.conv2(self.relu(x[:, : self.width] + self.bias1)))
        return self.relu(self.conv3(out) + x[:, self.width :])


def _pointwise(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.groups == 1)


@torch.no_grad()
def convolve_before_pooling(model: nn.Module) -> bool:
    """Move the first tail block's ``conv1`` and ``downsample`` (1x1 convolutions) before RoI pooling.

    RoIAlign is linear in the features (each output a fixed weighted sum of feature pixels; samples outside the
    map weigh zero), so a 1x1 convolution's weights commute with it: pooling then multiplying each pixel by the
    weights equals multiplying then pooling, up to float rounding. The bias does not (the weights of a RoI that
    reaches past the map sum to less than one), so it is added after pooling. ResNet-C4's layer4 begins with
    two such convolutions (BatchNorm folded, ``conv1`` before its ReLU): on R50 at 600x1000 they then run on
    the 38x63 map's 2394 pixels instead of 300 RoIs x 7 x 7 = 14700, 6x fewer, and the pooling gathers their
    512 + 2048 channels instead of 1024 (``benchmarks/results/onnx_torchvision.md``). Crop pooling's 2x2 max
    and ``roi_pool``'s max do not commute. In place, after :func:`fold_batchnorm`; returns whether it applied
    (``POOLING_MODE=align`` and a C4 ResNet tail)."""
    cfg, tail = getattr(model, "cfg", None), getattr(getattr(model, "classifier", None), "tail", None)
    if cfg is None or cfg.POOLING_MODE != "align" or not isinstance(tail, nn.Sequential):
        return False
    block = tail[0][0] if isinstance(tail[0], nn.Sequential) and len(tail[0]) else None
    if not (isinstance(block, Bottleneck) and _pointwise(block.conv1) and isinstance(block.bn1, nn.Identity)
            and isinstance(block.downsample, nn.Sequential) and _pointwise(block.downsample[0])
            and isinstance(block.downsample[1], nn.Identity)):
        return False
    convs = (block.conv1, block.downsample[0])
    merged = nn.Conv2d(convs[0].in_channels, sum(c.out_channels for c in convs), 1, bias=False)
    merged.weight = nn.Parameter(torch.cat([c.weight for c in convs]), requires_grad=False)
    model.classifier.before_pooling = merged
    tail[0][0] = PooledBottleneck(block)
    return True


def channels_last_pays(device: torch.device, memory_format: str = "auto") -> bool:
    """Whether to run the convolutions in channels-last on ``device`` (the config's ``MEMORY_FORMAT``):
    ``auto`` picks it on CPUs with AVX-512, where it measured faster (inference:
    ``benchmarks/results/fast_path.md``; the R50-C4 training step: ``benchmarks/results/torchvision_r50c4.md``).
    Elsewhere (AVX2 CPUs, CUDA) it was not measured to win."""
    if memory_format != "auto":
        return memory_format == "channels_last"
    return device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def prepare_for_inference(model: nn.Module, channels_last: bool | None = None, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` for inference: BatchNorm folded, eval mode, no gradients, align pooling's first tail
    convolutions on the map (:func:`convolve_before_pooling`), freed memory kept for reuse (:func:`reuse_freed_memory`,
    process-wide), and channels-last where it pays (``None``: the model's ``cfg.MEMORY_FORMAT``, see
    :func:`channels_last_pays`; ``True``/``False`` to force).
    ``inplace``: rearrange ``model`` itself (a model loaded only to run, like a checkpoint's: no copy needed)."""
    reuse_freed_memory()
    fast = (model if inplace else copy.deepcopy(model)).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    fold_batchnorm(fast)
    convolve_before_pooling(fast)
    if channels_last is None:
        cfg = getattr(fast, "cfg", None)
        channels_last = channels_last_pays(next(fast.parameters()).device, getattr(cfg, "MEMORY_FORMAT", "auto"))
    if channels_last:  # a convolution whose weight is channels-last answers in channels-last: the rest follows
        fast.to(memory_format=torch.channels_last)
    return fast
