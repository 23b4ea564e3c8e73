"""Image pre-processing: one code path for training and testing.

An RGB image is resized so that its short side is ``target_size`` (TRAIN.SCALES / TEST.SCALES, 600)
unless that makes its long side exceed ``max_size`` (MAX_SIZE, 1000), in which case the long side is
``max_size``; then ``PIXEL_MEANS`` is subtracted (and divided by ``PIXEL_STDS``, 1 in the reference).
Boxes follow the image into *network-input pixels* with :func:`frcnn.boxes.scale_boxes`.
Several images form a batch by zero-padding at the bottom and right (zero = the mean colour).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def compute_scale(height: int, width: int, target_size: int, max_size: int) -> float:
    """The reference's ``im_scale``: short side to ``target_size``, long side at most ``max_size``."""
    short, long = min(height, width), max(height, width)
    scale = float(target_size) / float(short)
    if round(scale * long) > max_size:
        scale = float(max_size) / float(long)
    return scale


def image_to_tensor(image: Image.Image) -> Tensor:
    """An RGB PIL image as a float32 (3, H, W) tensor of 0..255 values."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float()


@dataclass
class Prepared:
    """One pre-processed image: ``tensor`` (3, h, w) normalised, ``scale`` = h / original height."""

    tensor: Tensor
    scale: float
    original_size: tuple[int, int]  # (height, width) of the image as read

    @property
    def size(self) -> tuple[int, int]:
        return self.tensor.shape[-2], self.tensor.shape[-1]


def prep_image(
    image: Tensor,
    target_size: int,
    max_size: int,
    means: Sequence[float],
    stds: Sequence[float] = (1.0, 1.0, 1.0),
    flip: bool = False,
) -> Prepared:
    """Resize (bilinear, as the reference's cv2.INTER_LINEAR), optionally mirror, normalise."""
    _, h, w = image.shape
    scale = compute_scale(h, w, target_size, max_size)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    x = image.unsqueeze(0)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    x = x[0]
    if flip:
        x = x.flip(-1)
    mean = torch.as_tensor(means, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.as_tensor(stds, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return Prepared((x - mean) / std, scale, (h, w))


def batch_images(tensors: Sequence[Tensor], size_divisor: int = 1) -> tuple[Tensor, Tensor]:
    """Zero-pad (3, h, w) tensors into one (N, 3, H, W) batch; also returns the (N, 2) true sizes (h, w)."""
    sizes = torch.tensor([[t.shape[-2], t.shape[-1]] for t in tensors], dtype=torch.long)
    h, w = sizes.max(0).values.tolist()
    if size_divisor > 1:
        h = -(-h // size_divisor) * size_divisor
        w = -(-w // size_divisor) * size_divisor
    batch = tensors[0].new_zeros((len(tensors), 3, h, w))
    for i, t in enumerate(tensors):
        batch[i, :, : t.shape[-2], : t.shape[-1]] = t
    return batch, sizes
