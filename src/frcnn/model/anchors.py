"""Anchor generation layer.

C4 (the write-up's): nine reference anchors (``ANCHOR_SCALES`` x ``ANCHOR_RATIOS`` on a ``base_size`` pixel
box, rows ratio-major) are generated once, exactly as the reference ``generate_anchors.py`` does (including
its rounding of widths and heights), then shifted over every cell of the feature map with the head's
stride.

FPN (``NECK=fpn``): one generator per pyramid level, its anchors ``ANCHOR_SCALES`` x the level's stride
(``[8]``: 32 px on P2 at stride 4 .. 512 px on P6 at 64) x ``ANCHOR_RATIOS``, shaped and placed as
torchvision's and detectron2's FPN anchors are (:func:`level_anchors`), so that weights trained there find
the anchors they were trained for.

Anchors are in *network-input pixels*, +1 convention.
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


def level_anchors(stride: int, scales: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """The reference anchors of one FPN level: (len(ratios) * len(scales), 4), rows ratio-major.

    Size ``s = scale * stride``, ratio ``r = h / w``: ``w = s / sqrt(r)``, ``h = s * sqrt(r)`` (area ``s**2``),
    the exclusive corners ``round(-w / 2), round(-h / 2), round(w / 2), round(h / 2)`` around the corner of cell
    (0, 0), as torchvision's ``AnchorGenerator`` computes them, then written in the +1 convention (``x2 - 1``,
    ``y2 - 1``). torchvision and detectron2 centre FPN anchors on the cell's top-left corner, the reference's C4
    anchors on the centre of a 16-px box; each keeps its own so that pretrained weights see their anchors.
    """
    ratios_t = torch.tensor(ratios, dtype=torch.float32)
    sizes = torch.tensor(scales, dtype=torch.float32) * stride
    h_ratios = torch.sqrt(ratios_t)
    ws = (sizes[None, :] / h_ratios[:, None]).reshape(-1)
    hs = (sizes[None, :] * h_ratios[:, None]).reshape(-1)
    exclusive = (torch.stack((-ws, -hs, ws, hs), dim=1) / 2).round()
    return exclusive - torch.tensor([0.0, 0.0, 1.0, 1.0])


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
    """Caches the shifted anchors per feature-map size, device and dtype (they depend on nothing else).
    ``base_anchors`` given: those (an FPN level's, :func:`level_anchors`), else the reference's."""

    def __init__(self, scales: Sequence[float], ratios: Sequence[float], stride: int = 16, base_size: int = 16,
                 base_anchors: Tensor | None = None):
        super().__init__()
        self.stride = stride
        if base_anchors is None:
            base_anchors = generate_anchors(base_size, ratios, scales)
        self.register_buffer("base_anchors", base_anchors, persistent=False)
        self._cache: dict[tuple[int, int, torch.device, torch.dtype], Tensor] = {}

    @property
    def num_anchors(self) -> int:
        return self.base_anchors.shape[0]

    def forward(self, feat_height: int, feat_width: int) -> Tensor:
        key = (feat_height, feat_width, self.base_anchors.device, self.base_anchors.dtype)
        if key not in self._cache:
            self._cache[key] = shift_anchors(self.base_anchors, feat_height, feat_width, self.stride)
        return self._cache[key]


def anchor_generators(scales: Sequence[float], ratios: Sequence[float], strides: Sequence[int],
                      pyramid: bool) -> list[AnchorGenerator]:
    """One generator per level: the reference's at ``strides[0]`` (C4), or :func:`level_anchors` per stride."""
    if not pyramid:
        return [AnchorGenerator(scales, ratios, strides[0])]
    return [AnchorGenerator(scales, ratios, s, base_anchors=level_anchors(s, scales, ratios)) for s in strides]
