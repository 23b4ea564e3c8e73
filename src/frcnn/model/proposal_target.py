"""Proposal target layer: which RoIs the classification layer learns from, and what it learns.

Per image the gt boxes are added to the proposals, each RoI takes the class of its best-overlapping gt
box, and ``TRAIN.BATCH_SIZE`` RoIs are drawn (per image, as in the reference, whose batch is one image):
up to ``FG_FRACTION`` of them foreground (IoU >= ``FG_THRESH``), the rest background (IoU in
``[BG_THRESH_LO, BG_THRESH_HI)``), repeating background RoIs at random when there are too few (the
reference's fill-up). The foreground RoIs are drawn at random (the reference's), or with ``FG_SAMPLING:
per_object`` one for each object in turn (:func:`_choose_per_object`). Regression targets are
normalised by ``BBOX_NORMALIZE_MEANS``/``STDS``. Coordinates: network-input pixels.

Proposals that carry a gradient (``TRAIN.JOINT=exact``) keep it in the sampled RoIs; the sampling only
chooses indices (on detached coordinates), the gt boxes added to the set are constants, and the regression
targets are computed from detached coordinates: a target is a label, not a path for the gradient.

A float32 layer, also under autocast: its inputs (the proposal layer's RoIs and gt boxes) are float32,
and the box math it calls upcasts anything in half precision (:func:`frcnn.boxes.upcast`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from frcnn.boxes import bbox_transform, box_iou
from frcnn.config import TrainConfig
from frcnn.model.anchor_target import Generators, per_image
from frcnn.model.trace import Trace


def _choose(idx: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
    """``size`` entries of ``idx`` at random: without replacement when there are enough, else with."""
    if size <= 0 or idx.numel() == 0:
        return idx[:0]
    if idx.numel() >= size:
        pick = torch.randperm(idx.numel(), generator=generator)[:size]
    else:
        pick = torch.randint(idx.numel(), (size,), generator=generator)
    return idx[pick.to(idx.device)]


def _choose_per_object(idx: Tensor, objects: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
    """``size`` entries of ``idx`` (``size <= len(idx)``), spread over ``objects`` (the gt index of each entry) as
    evenly as they allow: each object in turn gives one at random, round after round, and an object out of entries
    drops out; the objects served in the last, partial round are chosen at random."""
    perm = torch.randperm(idx.numel(), generator=generator)
    obj = objects.cpu()[perm]
    order = torch.sort(obj, stable=True).indices  # entries grouped by object, in the random order within each
    counts = torch.bincount(obj)
    rank = torch.empty_like(obj)
    rank[order] = torch.arange(obj.numel()) - (torch.cumsum(counts, 0) - counts)[obj[order]]  # place in its object
    pick = perm[torch.sort(rank, stable=True).indices[:size]]  # round 0 of every object first, then round 1, ...
    return idx[pick.to(idx.device)]


def _choose_fg(idx: Tensor, objects: Tensor, size: int, cfg: TrainConfig, generator: torch.Generator | None
               ) -> Tensor:
    """``size`` foreground RoIs of ``idx``: ``FG_SAMPLING`` per_object spreads them over ``objects`` when there are
    more than ``size``, else (and for random) :func:`_choose`."""
    if cfg.FG_SAMPLING == "per_object" and idx.numel() > size:
        return _choose_per_object(idx, objects, size, generator)
    return _choose(idx, size, generator)


def proposal_target_layer(
    rois: Tensor,
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    cfg: TrainConfig,
    generator: Generators = None,
    trace: Trace | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sampled RoIs (S, 5), their labels (S,) (0 = background) and normalised targets (S, 4);
    ``generator`` drives the sampling (see :func:`frcnn.model.anchor_target.per_image`)."""
    num_images = len(gt_boxes)
    generators = per_image(generator, num_images)
    rois_per_image = cfg.BATCH_SIZE
    fg_per_image = round(cfg.FG_FRACTION * rois_per_image)
    means = rois.new_tensor(cfg.BBOX_NORMALIZE_MEANS)
    stds = rois.new_tensor(cfg.BBOX_NORMALIZE_STDS)
    out_rois, out_labels, out_targets, out_assign, out_overlaps = [], [], [], [], []
    for i in range(num_images):
        gt, generator = gt_boxes[i], generators[i]
        proposals = rois[rois[:, 0] == i, 1:]
        boxes = torch.cat((proposals.detach(), gt))  # choices, labels and targets: on constants
        if gt.numel() > 0:
            max_overlaps, assign = box_iou(boxes, gt).max(dim=1)
            labels = gt_labels[i][assign]
        else:  # no objects: every RoI is background
            max_overlaps = boxes.new_zeros(boxes.shape[0])
            assign = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
            labels = assign.clone()
        fg_idx = (max_overlaps >= cfg.FG_THRESH).nonzero().squeeze(1)
        bg_mask = (max_overlaps < cfg.BG_THRESH_HI) & (max_overlaps >= cfg.BG_THRESH_LO)
        if gt.numel() == 0:
            bg_mask = torch.ones_like(bg_mask)
        bg_idx = bg_mask.nonzero().squeeze(1)
        if fg_idx.numel() > 0 and bg_idx.numel() > 0:
            fg = _choose_fg(fg_idx, assign[fg_idx], min(fg_per_image, fg_idx.numel()), cfg, generator)
            bg = _choose(bg_idx, rois_per_image - fg.numel(), generator)
        elif fg_idx.numel() > 0:  # no background at all: every RoI foreground
            fg, bg = _choose_fg(fg_idx, assign[fg_idx], rois_per_image, cfg, generator), bg_idx[:0]
        else:
            fg, bg = fg_idx[:0], _choose(bg_idx, rois_per_image, generator)
        keep = torch.cat((fg, bg))
        sampled = boxes[keep]
        sampled_labels = labels[keep].clone()
        sampled_labels[fg.numel():] = 0
        if gt.numel() > 0:
            targets = (bbox_transform(sampled, gt[assign[keep]]) - means) / stds
        else:
            targets = sampled.new_zeros((keep.numel(), 4))
        targets[sampled_labels == 0] = 0
        sampled = torch.cat((proposals, gt))[keep]  # the same values, with the proposals' gradient if any
        out_rois.append(torch.cat((sampled.new_full((keep.numel(), 1), i), sampled), dim=1))
        out_labels.append(sampled_labels)
        out_targets.append(targets)
        out_assign.append(assign[keep])
        out_overlaps.append(max_overlaps[keep])
    rois_s, labels_s, targets_s = torch.cat(out_rois), torch.cat(out_labels), torch.cat(out_targets)
    if trace is not None:
        trace.put("proposal_target", rois=rois_s, labels=labels_s, gt_assignment=torch.cat(out_assign),
                  max_overlaps=torch.cat(out_overlaps), fg_thresh=cfg.FG_THRESH,
                  bg_thresh=(cfg.BG_THRESH_LO, cfg.BG_THRESH_HI), batch_size=cfg.BATCH_SIZE)
    return rois_s, labels_s, targets_s
