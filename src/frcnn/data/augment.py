"""Training-time augmentation for small data sets: mosaic, random crop, quarter turns and colour jitter.

All are off by default and switched on by ``TRAIN.MOSAIC``, ``TRAIN.RANDOM_CROP``, ``TRAIN.ROTATE90`` and
``TRAIN.COLOR_JITTER``;
:class:`frcnn.engine.batches.TrainBatches` applies them to each training image before the usual pre-processing
(:func:`frcnn.transforms.prep_image`: resize to one of ``TRAIN.SCALES``, mirror, normalise). Two more
augmentations exist without this module: the mirrored copies of ``TRAIN.USE_FLIPPED`` and scale jitter, since
``TRAIN.SCALES`` may list several short sides and every batch picks one of them at random.

* :func:`mosaic`: with probability ``TRAIN.MOSAIC``, the image and three more drawn at random from the training
  set share one image of the first's size, a quarter each around a random centre (YOLOv4's mosaic, each piece at
  the scale training gives it alone); boxes follow :func:`crop_boxes`'s rule. A mosaic that keeps no box is
  not used (the image stays as it was).
* :func:`random_crop`: with probability 0.5, a window whose width and height are each a uniform fraction in
  ``[min_fraction, 1]`` of the image's, at a uniform position. A box is kept if its centre lies in the window,
  clipped to it and shifted into its pixels (the +1 convention of :mod:`frcnn.boxes`); the others are dropped
  with their labels. A window keeping no box is drawn again, up to 10 times, and then the image is not cropped
  (an image without boxes is cropped on the first draw). The crop is resized to the training scale afterwards,
  so it also jitters the scale of the objects.
* :func:`rotate90`: a turn by a uniform random multiple of 90 degrees, for data with no "up" (cells under a
  microscope, aerial views, the demo's shapes). With the mirrored copies of ``TRAIN.USE_FLIPPED`` every image is
  seen in all 8 orientations of the square. A quarter turn swaps the image's height and width; boxes keep the
  +1 convention (a box is the same pixels, turned).
* :func:`color_jitter`: torchvision's ``ColorJitter`` on 0..255 pixels: brightness, contrast and saturation
  factors uniform in ``[max(0, 1 - a), 1 + a]``, a hue shift uniform in ``[-h, h]``, applied in a random order,
  each clamped to ``[0, 255]``; an amount of 0 skips its operation (all 0 = the image untouched).

Everything random comes from the ``generator`` passed in, so a batch stays a pure function of the run's seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from frcnn.boxes import clip_boxes, scale_boxes

CROP_TRIES = 10
_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


# --------------------------------------------------------------------------------------------- random crop

def crop_boxes(boxes: Tensor, window: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    """Boxes of an image in the pixels of its crop ``window = (x0, y0, width, height)``: ``(keep, boxes)``.

    The window covers pixels ``x0 .. x0 + width - 1``. ``keep`` (N,) marks the boxes whose centre
    ``((x1 + x2 + 1) / 2, (y1 + y2 + 1) / 2)`` lies in it and which keep at least one pixel each way; the
    returned boxes are those, clipped to the window and shifted by ``(-x0, -y0)``.
    """
    x0, y0, width, height = window
    cx = (boxes[:, 0] + boxes[:, 2] + 1) / 2
    cy = (boxes[:, 1] + boxes[:, 3] + 1) / 2
    inside = (cx >= x0) & (cx < x0 + width) & (cy >= y0) & (cy < y0 + height)
    shifted = clip_boxes(boxes - boxes.new_tensor([x0, y0, x0, y0]), height, width).to(boxes.dtype)
    keep = inside & (shifted[:, 2] >= shifted[:, 0]) & (shifted[:, 3] >= shifted[:, 1])
    return keep, shifted[keep]


def random_crop(image: Tensor, boxes: Tensor, labels: Tensor, min_fraction: float,
                generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(image, boxes, labels)`` of a random crop of the (3, H, W) ``image``, or the inputs themselves.

    ``min_fraction`` 0 is off. Else, with probability 0.5, a window of ``round(f * W) x round(g * H)`` pixels,
    ``f`` and ``g`` uniform in ``[min_fraction, 1]``, at a uniform integer position; boxes (original-image
    pixels, +1 convention) go through :func:`crop_boxes` and ``labels`` follow them. A window that would keep
    none of several boxes is drawn again up to ``CROP_TRIES`` times before giving up (no crop).
    """
    if min_fraction <= 0 or _uniform(0.0, 1.0, generator) >= 0.5:
        return image, boxes, labels
    _, h, w = image.shape
    for _ in range(CROP_TRIES):
        cw = min(w, max(1, round(w * _uniform(min_fraction, 1.0, generator))))
        ch = min(h, max(1, round(h * _uniform(min_fraction, 1.0, generator))))
        x0 = min(w - cw, int(_uniform(0.0, 1.0, generator) * (w - cw + 1)))
        y0 = min(h - ch, int(_uniform(0.0, 1.0, generator) * (h - ch + 1)))
        keep, cropped = crop_boxes(boxes, (x0, y0, cw, ch))
        if bool(keep.any()) or len(boxes) == 0:
            return image[:, y0:y0 + ch, x0:x0 + cw].contiguous(), cropped, labels[keep]
    return image, boxes, labels


# --------------------------------------------------------------------------------------------- mosaic

def mosaic(pieces: Sequence[tuple[Tensor, Tensor, Tensor]], fill: Sequence[float],
           generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Four ``(image, boxes, labels)`` in one image the size of the first, split at a random centre.

    The centre ``(xc, yc)`` is uniform in the middle half of each side; piece ``k`` (0 top left, 1 top right,
    2 bottom left, 3 bottom right) fills its quarter with a window of its own pixels at a uniform position,
    after a resize that gives it the first image's short side (so its objects keep the scale training would
    give them alone). A piece smaller than its quarter touches the centre and leaves ``fill`` around it. Boxes
    go through :func:`crop_boxes` (centre in the window) and move with their window; the +1 convention holds.
    """
    first = pieces[0][0]
    _, h, w = first.shape
    xc = min(w - 1, max(1, int(_uniform(0.25, 0.75, generator) * w)))
    yc = min(h - 1, max(1, int(_uniform(0.25, 0.75, generator) * h)))
    canvas = torch.as_tensor(fill, dtype=first.dtype).view(3, 1, 1).expand(3, h, w).clone()
    out_boxes, out_labels = [], []
    for k, (image, boxes, labels) in enumerate(pieces):
        factor = min(h, w) / min(image.shape[-2:])
        if k and factor != 1.0:
            size = (max(1, round(image.shape[-2] * factor)), max(1, round(image.shape[-1] * factor)))
            image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear",
                                                    align_corners=False, antialias=factor < 1)[0]
            boxes = clip_boxes(scale_boxes(boxes, factor), *size)
        right, bottom = k % 2 == 1, k >= 2
        rw, rh = (w - xc if right else xc), (h - yc if bottom else yc)
        cw, ch = min(rw, image.shape[-1]), min(rh, image.shape[-2])
        x0 = int(_uniform(0.0, 1.0, generator) * (image.shape[-1] - cw + 1))
        y0 = int(_uniform(0.0, 1.0, generator) * (image.shape[-2] - ch + 1))
        px, py = (xc if right else xc - cw), (yc if bottom else yc - ch)
        canvas[:, py:py + ch, px:px + cw] = image[:, y0:y0 + ch, x0:x0 + cw]
        keep, cropped = crop_boxes(boxes, (x0, y0, cw, ch))
        out_boxes.append(cropped + cropped.new_tensor([px, py, px, py]))
        out_labels.append(labels[keep])
    return canvas, torch.cat(out_boxes), torch.cat(out_labels)


# --------------------------------------------------------------------------------------------- quarter turns


def turn_boxes(boxes: Tensor, height: int, width: int, k: int) -> Tensor:
    """Boxes of a (height x width) image in that image turned by ``k`` quarter turns anticlockwise
    (``torch.rot90(image, k, dims=(-2, -1))``). One turn takes pixel (x, y) to (y, W - 1 - x), so box
    (x1, y1, x2, y2) to (y1, W - 1 - x2, y2, W - 1 - x1), in an image W high and H wide."""
    for _ in range(k % 4):
        x1, y1, x2, y2 = boxes.unbind(dim=1)
        boxes = torch.stack((y1, width - 1 - x2, y2, width - 1 - x1), dim=1)
        height, width = width, height
    return boxes


def rotate90(image: Tensor, boxes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(image, boxes)`` turned by a uniform random number of quarter turns (0 to 3) of the (3, H, W) image."""
    k = int(torch.randint(4, (1,), generator=generator))
    if k == 0:
        return image, boxes
    _, h, w = image.shape
    return torch.rot90(image, k, dims=(1, 2)).contiguous(), turn_boxes(boxes, h, w, k)


# --------------------------------------------------------------------------------------------- colour jitter

def _grayscale(image: Tensor) -> Tensor:
    r, g, b = image.unbind(-3)
    return (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2]).unsqueeze(-3)


def _blend(image: Tensor, other: Tensor, factor: float) -> Tensor:
    return (image * factor + other * (1.0 - factor)).clamp(0, 255)


def _shift_hue(image: Tensor, shift: float) -> Tensor:
    """Rotate the HSV hue of every pixel by ``shift`` turns; saturation and value are kept."""
    r, g, b = image.unbind(-3)
    maxc, minc = image.amax(-3), image.amin(-3)
    span = maxc - minc
    safe = torch.where(span > 0, span, torch.ones_like(span))
    sector = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, 2 + (b - r) / safe, 4 + (r - g) / safe))
    sector = torch.remainder(sector + 6 * shift, 6.0)  # hue in sixths of a turn
    # HSV -> RGB: channel n (R 5, G 3, B 1) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6 hue) mod 6
    k = torch.remainder(sector + image.new_tensor([5.0, 3.0, 1.0]).view(3, 1, 1), 6.0)
    return (maxc - span * torch.minimum(k, 4 - k).clamp(0, 1)).clamp(0, 255)


def adjust_colors(image: Tensor, factors: Sequence[float | None], order: Sequence[int]) -> Tensor:
    """``image`` (3, H, W), 0..255, through brightness, contrast, saturation and hue (``factors[0..3]``; None
    skips one) in the order of ``order`` (a permutation of 0..3), as torchvision's ``adjust_*`` functions."""
    for op in order:
        factor = factors[op]
        if factor is None:
            continue
        if op == 0:
            image = (image * factor).clamp(0, 255)
        elif op == 1:
            image = _blend(image, _grayscale(image).mean(), factor)
        elif op == 2:
            image = _blend(image, _grayscale(image), factor)
        else:
            image = _shift_hue(image, factor)
    return image


def jitter_params(amounts: Sequence[float], generator: torch.Generator) -> tuple[list[float | None], list[int]]:
    """``(factors, order)`` for :func:`adjust_colors`, drawn as torchvision's ``ColorJitter`` draws them: the
    order first (a random permutation), then each factor whose amount is not 0 (brightness, contrast, saturation
    uniform in ``[max(0, 1 - a), 1 + a]``, hue in ``[-h, h]``); an amount of 0 gives None."""
    order = torch.randperm(4, generator=generator).tolist()
    factors: list[float | None] = [None if a == 0 else _uniform(max(0.0, 1.0 - a), 1.0 + a, generator)
                                   for a in amounts[:3]]
    factors.append(None if amounts[3] == 0 else _uniform(-amounts[3], amounts[3], generator))
    return factors, order


def color_jitter(image: Tensor, amounts: Sequence[float], generator: torch.Generator) -> Tensor:
    """``image`` (3, H, W) of 0..255 values with random brightness, contrast, saturation and hue.

    ``amounts`` = (brightness, contrast, saturation, hue) as ``TRAIN.COLOR_JITTER`` (torchvision's
    ``ColorJitter`` arguments; hue at most 0.5). All 0 returns ``image`` itself and draws nothing.
    """
    if not any(amounts):
        return image
    factors, order = jitter_params(amounts, generator)
    return adjust_colors(image, factors, order)
