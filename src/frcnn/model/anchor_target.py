"""Anchor target layer: which anchors the RPN learns from, and what it learns.

Per image, only anchors lying inside the image take part (``RPN_ALLOWED_BORDER``: by default entirely
inside; a margin in pixels lets anchors cross the border by that much, a negative one lets every anchor take
part). Foreground: for each gt box the
anchors of maximal IoU with it, ties included ("type A"), and every anchor whose best IoU is at least
``RPN_POSITIVE_OVERLAP`` ("type B"). Background: best IoU below ``RPN_NEGATIVE_OVERLAP``. The rest are
"don't care" (-1). Then at most ``RPN_FG_FRACTION * RPN_BATCHSIZE`` foreground and
``RPN_BATCHSIZE - #fg`` background anchors are kept at random; regression targets point each anchor at
its best gt box. Coordinates: network-input pixels.

A float32 layer, also under autocast: its inputs (anchors and gt boxes) are float32, and the box
math it calls upcasts anything in half precision (:func:`frcnn.boxes.upcast`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from frcnn.boxes import bbox_transform, box_iou
from frcnn.config import TrainConfig
from frcnn.model.trace import Trace

Generators = torch.Generator | Sequence[torch.Generator | None] | None


def per_image(generator: Generators, n: int) -> list[torch.Generator | None]:
    """One sampling generator per image: a sequence gives each image its own (so an image samples the same
    whichever batch or process it lands in), a single generator (or None) is shared by the images in turn."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n:
            raise ValueError(f"{len(generator)} sampling generators for {n} images")
        return list(generator)
    return [generator] * n


def subsample(mask: Tensor, keep: int, generator: torch.Generator | None) -> Tensor:
    """Keep ``keep`` randomly chosen True entries of a 1-D mask (all of them if there are fewer)."""
    idx = mask.nonzero().squeeze(1)
    if idx.numel() <= keep:
        return mask
    perm = torch.randperm(idx.numel(), generator=generator).to(idx.device)
    out = torch.zeros_like(mask)
    out[idx[perm[:keep]]] = True
    return out


def taking_part(anchors: Tensor, height: int, width: int, border: float) -> Tensor:
    """(M,) bool: the anchors lying inside a ``height`` x ``width`` image, crossing its border by at most
    ``border`` pixels (+1 convention: the last pixel column is ``width - 1``); all of them if ``border < 0``."""
    if border < 0:
        return torch.ones(anchors.shape[0], dtype=torch.bool, device=anchors.device)
    return ((anchors[:, 0] >= -border) & (anchors[:, 1] >= -border)
            & (anchors[:, 2] < width + border) & (anchors[:, 3] < height + border))


@torch.no_grad()
def anchor_target_layer(
    anchors: Tensor,
    gt_boxes: Sequence[Tensor],
    image_sizes: Tensor,
    cfg: TrainConfig,
    generator: Generators = None,
    trace: Trace | None = None,
) -> tuple[Tensor, Tensor]:
    """Labels (N, M) in {1, 0, -1} and regression targets (N, M, 4) for every anchor of every image;
    ``generator`` drives the sampling (see :func:`per_image`)."""
    n, m = len(gt_boxes), anchors.shape[0]
    generators = per_image(generator, n)
    labels = anchors.new_full((n, m), -1, dtype=torch.long)
    targets = anchors.new_zeros((n, m, 4))
    record: dict[str, list[Tensor]] = {"type_a": [], "type_b": [], "inside": [], "max_overlaps": []}
    for i, gt in enumerate(gt_boxes):
        h, w = image_sizes[i].tolist()
        inside = taking_part(anchors, h, w, cfg.RPN_ALLOWED_BORDER)
        max_overlaps = anchors.new_zeros(m)
        type_a = torch.zeros_like(inside)
        if gt.numel() == 0:  # an image without objects: every inside anchor is background
            bg = inside
            fg = torch.zeros_like(inside)
        else:
            overlaps = anchors.new_zeros((m, gt.shape[0]))
            overlaps[inside] = box_iou(anchors[inside], gt)
            max_overlaps, argmax = overlaps.max(dim=1)
            gt_max = overlaps[inside].max(dim=0).values if inside.any() else overlaps.new_zeros(gt.shape[0])
            # type A: for each gt, every inside anchor reaching its best IoU (a gt no anchor touches has none)
            type_a = ((overlaps == gt_max) & (gt_max > 0)).any(dim=1) & inside
            type_b = inside & (max_overlaps >= cfg.RPN_POSITIVE_OVERLAP)
            fg = type_a | type_b
            bg = inside & (max_overlaps < cfg.RPN_NEGATIVE_OVERLAP)
            if cfg.RPN_CLOBBER_POSITIVES:
                fg = fg & ~bg
            else:
                bg = bg & ~fg
            targets[i] = bbox_transform(anchors, gt[argmax])
        if trace is not None:  # the labels before sampling: fg / bg candidates (the rest inside: don't care)
            record.setdefault("fg_candidates", []).append(fg)
            record.setdefault("bg_candidates", []).append(bg)
        num_fg = int(cfg.RPN_FG_FRACTION * cfg.RPN_BATCHSIZE)
        fg = subsample(fg, num_fg, generators[i])
        bg = subsample(bg, cfg.RPN_BATCHSIZE - int(fg.sum()), generators[i])
        labels[i, fg] = 1
        labels[i, bg] = 0
        if trace is not None:
            record["type_a"].append(type_a)
            record["type_b"].append(inside & (max_overlaps >= cfg.RPN_POSITIVE_OVERLAP))
            record["inside"].append(inside)
            record["max_overlaps"].append(max_overlaps)
    targets[labels != 1] = 0
    if trace is not None:
        trace.put("anchor_target", labels=labels, **{k: torch.stack(v) for k, v in record.items()},
                  positive_overlap=cfg.RPN_POSITIVE_OVERLAP, negative_overlap=cfg.RPN_NEGATIVE_OVERLAP,
                  batch_size=cfg.RPN_BATCHSIZE, fg_fraction=cfg.RPN_FG_FRACTION, allowed_border=cfg.RPN_ALLOWED_BORDER)
    return labels, targets
