"""RoI pooling: crop a fixed-size feature map for each RoI (POOLING_MODE ``crop``, ``align`` or ``pool``).

RoIs are ``[batch_index, x1, y1, x2, y2]`` in network-input pixels; dividing by the head's stride
(16) brings them onto the feature map.

``crop`` is the write-up's crop pooling: an affine transform maps the output grid onto the RoI and
``affine_grid`` + ``grid_sample`` sample it bilinearly (at twice the size, then 2x2 max pooling, as the
reference). The reference was written when ``align_corners=True`` was PyTorch's only behaviour; modern
PyTorch defaults to ``False``, which would shrink every crop towards its centre, so it is set explicitly.
``align`` and ``pool`` are torchvision's ``roi_align`` and ``roi_pool``.

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


def crop_pool(features: Tensor, rois: Tensor, size: int, stride: int, max_pool: bool = True) -> Tensor:
    """Crop pooling of ``rois`` (R, 5) from ``features`` (N, C, H, W): (R, C, size, size)."""
    n, c, h, w = features.shape
    r = rois.shape[0]
    grid_size = size * 2 if max_pool else size
    if r == 0:
        return features.new_zeros((0, c, size, size))
    rois = rois.detach()
    x1, y1, x2, y2 = (rois[:, k] / stride for k in range(1, 5))
    # grid_sample's coordinates run from -1 (first cell centre) to 1 (last): a span of (w - 1) cells.
    # A map one cell wide has no span; any finite divisor then samples that one column.
    sw, sh = max(w - 1, 1), max(h - 1, 1)
    theta = rois.new_zeros((r, 2, 3))
    theta[:, 0, 0] = (x2 - x1) / sw
    theta[:, 0, 2] = (x1 + x2 - w + 1) / sw
    theta[:, 1, 1] = (y2 - y1) / sh
    theta[:, 1, 2] = (y1 + y2 - h + 1) / sh
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


def pool_rois(features: Tensor, rois: Tensor, mode: str, size: int, stride: int) -> Tensor:
    """Dispatch on POOLING_MODE; every mode returns (R, C, size, size)."""
    if mode == "crop":
        return crop_pool(features, rois, size, stride)
    if mode == "align":
        return roi_align(features, rois, (size, size), spatial_scale=1.0 / stride, sampling_ratio=0)
    if mode == "pool":
        return roi_pool(features.to(rois.dtype), rois, (size, size), spatial_scale=1.0 / stride).to(features.dtype)
    raise ValueError(f"unknown POOLING_MODE {mode!r}")


