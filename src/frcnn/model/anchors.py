"""Anchor generation layer.

Nine reference anchors (``ANCHOR_SCALES`` x ``ANCHOR_RATIOS`` on a ``base_size`` pixel box, rows
ratio-major) are generated once, exactly as the reference ``generate_anchors.py`` does (including its
rounding of widths and heights), then shifted over every cell of the feature map with the head's
stride. Anchors are in *network-input pixels*, +1 convention.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _whctrs(anchor: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = anchor[2] - anchor[0] + 1
    h = anchor[3] - anchor[1] + 1
    return w, h, anchor[0] + 0.5 * (w - 1), anchor[1] + 0.5 * (h - 1)


def _mkanchors(ws: Tensor, hs: Tensor, x_ctr: Tensor, y_ctr: Tensor) -> Tensor:
    return torch.stack(
        (x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1), x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)), dim=1
    )


def generate_anchors(
    base_size: int = 16, ratios: Sequence[float] = (0.5, 1, 2), scales: Sequence[float] = (8, 16, 32)
) -> Tensor:
    """The reference anchors: an (len(ratios) * len(scales), 4) float32 tensor, rows ratio-major.

    For each ratio the base box's area is kept and its width rounded (``round(sqrt(area / ratio))``),
    then each such box is scaled by every scale around the same centre.
    """
    base = torch.tensor([0, 0, base_size - 1, base_size - 1], dtype=torch.float64)
    w, h, x_ctr, y_ctr = _whctrs(base)
    size_ratios = (w * h) / torch.tensor(ratios, dtype=torch.float64)
    ws = torch.round(torch.sqrt(size_ratios))  # round half to even, as numpy's np.round
    hs = torch.round(ws * torch.tensor(ratios, dtype=torch.float64))
    ratio_anchors = _mkanchors(ws, hs, x_ctr, y_ctr)
    scales_t = torch.tensor(scales, dtype=torch.float64)
    rows = []
    for anchor in ratio_anchors:
        aw, ah, ax, ay = _whctrs(anchor)
        rows.append(_mkanchors(aw * scales_t, ah * scales_t, ax, ay))
    return torch.cat(rows).to(torch.float32)


def shift_anchors(base_anchors: Tensor, feat_height: int, feat_width: int, stride: int) -> Tensor:
    """All anchors of a ``feat_height`` x ``feat_width`` map: (H * W * A, 4), row ``((h * W) + w) * A + a``.

    Anchor ``a`` at cell ``(h, w)`` is reference anchor ``a`` shifted by ``(w * stride, h * stride)``.
    """
    device = base_anchors.device
    shift_x = torch.arange(feat_width, device=device, dtype=torch.float32) * stride
    shift_y = torch.arange(feat_height, device=device, dtype=torch.float32) * stride
    sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack((sx, sy, sx, sy), dim=-1).reshape(-1, 1, 4)
    return (shifts + base_anchors.reshape(1, -1, 4)).reshape(-1, 4)


class AnchorGenerator(torch.nn.Module):
    """Caches the shifted anchors per feature-map size, device and dtype (they depend on nothing else)."""

    def __init__(self, scales: Sequence[float], ratios: Sequence[float], stride: int = 16, base_size: int = 16):
        super().__init__()
        self.stride = stride
        self.register_buffer("base_anchors", generate_anchors(base_size, ratios, scales), persistent=False)
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}

    @property
    def num_anchors(self) -> int:
        return self.base_anchors.shape[0]

    def forward(self, feat_height: int, feat_width: int) -> Tensor:
        key = (feat_height, feat_width, self.base_anchors.device, self.base_anchors.dtype)
        if key not in self._cache:
            self._cache[key] = shift_anchors(self.base_anchors, feat_height, feat_width, self.stride)
        return self._cache[key]
