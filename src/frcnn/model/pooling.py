"""RoI pooling: crop a fixed-size feature map for each RoI (POOLING_MODE ``crop``, ``align`` or ``pool``).

RoIs are ``[batch_index, x1, y1, x2, y2]`` in network-input pixels; dividing by the head's stride
(16) brings them onto the feature map.

``crop`` is the write-up's crop pooling: an affine transform maps the output grid onto the RoI and
``affine_grid`` + ``grid_sample`` sample it bilinearly (at twice the size, then 2x2 max pooling, as the
reference). The reference was written when ``align_corners=True`` was PyTorch's only behaviour; modern
PyTorch defaults to ``False``, which would shrink every crop towards its centre, so it is set explicitly.
``align`` and ``pool`` are torchvision's ``roi_align`` and ``roi_pool``.

Only ``crop`` by ``grid_sample`` is differentiable w.r.t. the RoI coordinates (through ``theta`` and the
sampling grid): RoIs that carry a gradient (``TRAIN.JOINT=exact``) always take that path. ``align``,
``pool`` and the gathers below treat RoIs as constants.

On the CPU, ``crop`` and ``align`` run ``frcnn.ops.roi_ops`` instead: the same sampling written as a
separable bilinear weighting and done as parallel gathers of channels-last pixels (the formulation is in
that module's docstring); outputs and gradients w.r.t. the features match within 1e-5
(``tests/test_roi_ops.py``), 2-4x faster than torchvision's single-threaded CPU kernels and today's
``grid_sample`` crop (``benchmarks/results/roi_pooling.md``). ``pool`` stays torchvision's: its gather
version (``roi_ops.roi_pool``, identical output) was not enough faster to be worth it. Other devices
use torchvision and ``grid_sample``.

Under ``torch.autocast`` every mode returns the features' dtype (bfloat16 features give bfloat16 crops) and
samples at float32 coordinates: RoIs stay float32 (a bfloat16 coordinate near 300 is off by up to a pixel),
crop pooling builds its grid with autocast off (``affine_grid`` would round it to bfloat16, a third of a
cell) and interpolates in float32, ``roi_align`` casts to float32 itself, and ``roi_pool`` (max, exact in
any dtype) runs on float32 features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align, roi_pool

from frcnn.ops import roi_ops

# Without a backward pass, below this many RoI-channels the fixed cost of building the gathers (a few ms) loses to
# torchvision and grid_sample (measured: 8-32 RoIs of 32-128 channels); R50-C4's 300 x 1024 and 128 x 1024 are far
# above. With one (training), the gathers win at any size: torchvision's roi_align backward recomputes every
# sample's bilinear weights for each channel (demo-cpu's 32 RoIs x 128 channels: 4x; scratch-cpu's 4 x 64: 2.3x).
MIN_ROI_CHANNELS = 65536


def _gathers_win(features: Tensor, rois: Tensor) -> bool:
    if features.device.type != "cpu":
        return False
    training = features.requires_grad and torch.is_grad_enabled()
    return training or rois.shape[0] * features.shape[1] >= MIN_ROI_CHANNELS


def _differentiable_rois(rois: Tensor) -> bool:
    return rois.requires_grad and torch.is_grad_enabled()


def crop_pool(features: Tensor, rois: Tensor, size: int, stride: int, max_pool: bool = True) -> Tensor:
    """Crop pooling of ``rois`` (R, 5) from ``features`` (N, C, H, W): (R, C, size, size)."""
    if _gathers_win(features, rois) and not _differentiable_rois(rois):  # the gathers' rois are constants
        with torch.autocast("cpu", enabled=False):  # sampling and sums in float32 (float64 for float64 rois)
            return roi_ops.crop_pool(features, rois, size, stride, max_pool)
    return crop_pool_grid_sample(features, rois, size, stride, max_pool)


def crop_pool_grid_sample(features: Tensor, rois: Tensor, size: int, stride: int, max_pool: bool = True) -> Tensor:
    """Crop pooling by ``affine_grid`` + ``grid_sample`` (+ ``max_pool2d``): the definition, used off the CPU.

    Differentiable w.r.t. ``features`` and, when they carry a gradient, the coordinates of ``rois``."""
    n, c, h, w = features.shape
    r = rois.shape[0]
    grid_size = size * 2 if max_pool else size
    if r == 0:
        return features.new_zeros((0, c, size, size))
    theta = roi_ops.crop_theta(rois, stride, h, w)
    out = features.new_empty((r, c, grid_size, grid_size))
    batch_index = rois[:, 0].long()
    with torch.autocast(features.device.type, enabled=False):  # sampling in the rois' dtype (float32)
        grid = F.affine_grid(theta, [r, 1, grid_size, grid_size], align_corners=True)
        for i in range(n):  # one grid_sample per image: all its RoIs' grids stacked into one tall grid
            sel = (batch_index == i).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            g = grid[sel].reshape(1, sel.numel() * grid_size, grid_size, 2)
            crops = F.grid_sample(features[i : i + 1].to(g.dtype), g, mode="bilinear", align_corners=True)
            out[sel] = crops.view(c, sel.numel(), grid_size, grid_size).transpose(0, 1).to(out.dtype)
    return F.max_pool2d(out, 2, 2) if max_pool else out


CANONICAL_SIZE, CANONICAL_LEVEL = 224.0, 4  # the FPN level rule's k0: a 224-px RoI reads P4


def roi_levels(rois: Tensor, k_min: int, k_max: int, canonical_size: float = CANONICAL_SIZE,
               canonical_level: int = CANONICAL_LEVEL) -> Tensor:
    """The pyramid level of each RoI (FPN paper, eq. 1): ``k = floor(k0 + log2(sqrt(w h) / 224))`` clamped to
    ``[k_min, k_max]``, ``w`` and ``h`` the RoI's +1 sizes (torchvision's exclusive ones), with torchvision's
    ``1e-6`` against rounding at the boundaries. A 224-px RoI reads P4, 112 px P3, 448 px P5."""
    w = rois[:, 3] - rois[:, 1] + 1
    h = rois[:, 4] - rois[:, 2] + 1
    k = torch.floor(canonical_level + torch.log2(torch.sqrt(w * h) / canonical_size) + 1e-6)
    return k.clamp(k_min, k_max).long()


def pooled_level_index(rois: Tensor, strides: list[int]) -> Tensor:
    """Which of the pooled maps at ``strides`` (powers of two, finest first) each RoI is pooled from: the index
    (0 = the finest) of its :func:`roi_levels` level, clamped to those maps."""
    first = strides[0].bit_length() - 1
    return roi_levels(rois, first, strides[-1].bit_length() - 1) - first


def pool_pyramid(levels: list[Tensor], rois: Tensor, mode: str, size: int, strides: list[int]) -> Tensor:
    """Pool each RoI from its level (:func:`pooled_level_index`) of ``levels`` (maps at ``strides``, finest first),
    in any POOLING_MODE; one map: :func:`pool_rois`. (R, C, size, size), in the order of ``rois``."""
    if len(levels) == 1:
        return pool_rois(levels[0], rois, mode, size, strides[0])
    level = pooled_level_index(rois.detach(), strides)
    out = levels[0].new_zeros((rois.shape[0], levels[0].shape[1], size, size))
    for i, (features, stride) in enumerate(zip(levels, strides)):
        idx = (level == i).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = pool_rois(features, rois[idx], mode, size, stride).to(out.dtype)
    return out


def pool_rois(features: Tensor, rois: Tensor, mode: str, size: int, stride: int) -> Tensor:
    """Dispatch on POOLING_MODE; every mode returns (R, C, size, size)."""
    if mode == "crop":
        return crop_pool(features, rois, size, stride)
    if mode == "align":
        if _gathers_win(features, rois):
            with torch.autocast("cpu", enabled=False):  # float32 sums of bfloat16 features, like roi_align's
                return roi_ops.roi_align(features, rois, size, 1.0 / stride, sampling_ratio=0)
        return roi_align(features, rois, (size, size), spatial_scale=1.0 / stride, sampling_ratio=0)
    if mode == "pool":
        return roi_pool(features.to(rois.dtype), rois, (size, size), spatial_scale=1.0 / stride).to(features.dtype)
    raise ValueError(f"unknown POOLING_MODE {mode!r}")


