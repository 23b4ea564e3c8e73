"""FasterRCNN: head -> RPN -> proposal layer -> (targets) -> RoI pooling -> classification network.

The head gives one map (C4, the write-up's) or, with ``NECK=fpn``, a pyramid of maps (:mod:`frcnn.model.fpn`):
then anchors, RPN and proposal layer work level by level (:mod:`frcnn.model.anchors`, :mod:`frcnn.model.rpn`)
and each RoI is pooled from the level its size maps to (:func:`frcnn.model.pooling.roi_levels`).

Training (one step): the anchor target layer labels anchors for the RPN loss, the proposal target layer
samples RoIs for the classification loss, and the four losses are summed.

Joint training (``TRAIN.JOINT``, Ren et al. section 3.2). ``approximate`` (the write-up's, the reference's):
the proposals are constants, so the RoI-wise loss (``rcnn_cls`` + ``rcnn_box``) trains the classification
network and, through the pooled features, the head, but never the RPN's box regression. ``exact``
(non-approximate): the RoI coordinates are a differentiable function of the RPN's deltas, and the RoI-wise
loss also reaches ``rpn.rpn_bbox_pred_net``. Where the gradient passes and where it is cut:

- proposal layer: the objectness scores, the sort, the top-k, NMS and the post-NMS cap only choose indices
  (no gradient, and none to ``rpn_cls_score_net``); the kept boxes are gathered from the decoding of every
  anchor with the live deltas (``bbox_transform_inv``: passes, except a log-size change clamped at
  ``BBOX_XFORM_CLIP``) and the clipping (``clamp``: passes inside the image, cut on a clipped side);
- proposal target layer: the sampling only chooses indices; the gt boxes appended to the RoIs are constants
  (a sampled gt RoI passes nothing); the regression targets are computed from detached coordinates (a target
  is a label, not a path); the sampled proposals keep their gradient;
- RoI pooling: crop pooling by ``affine_grid`` + ``grid_sample`` is differentiable w.r.t. the RoI
  coordinates (bilinear: piecewise linear, its gradient jumps where a sample crosses a feature cell) and
  ``max_pool2d`` passes it to the winning sample. The CPU gathers (``roi_ops``), ``roi_align`` and
  ``roi_pool`` are not, so ``exact`` always takes ``grid_sample`` and needs ``POOLING_MODE=crop``.

The losses are the same and the forward values are identical in both modes (same proposals, same samples,
same losses): only the backward pass differs. The RPN's own losses train it the same way in both. At
inference (and in eval mode) the proposals are constants in both modes.

Inference: class-specific boxes are decoded, clipped, filtered by ``TEST.SCORE_THRESH``, reduced by
per-class NMS (``TEST.NMS_METHOD``: greedy at ``TEST.NMS``, or Gaussian soft-NMS, :mod:`frcnn.ops.soft_nms`) and
capped at ``TEST.MAX_PER_IMAGE`` per image.
Every box here is in network-input pixels; :mod:`frcnn.engine.inference` maps them back to the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from frcnn.boxes import bbox_transform_inv, clip_boxes, nms_threshold, to_exclusive, upcast
from frcnn.config import Config, pyramid_strides
from frcnn.errors import ConfigError
from frcnn.model.anchor_target import Generators, anchor_target_layer
from frcnn.model.anchors import AnchorGenerator, anchor_generators
from frcnn.model.backbones import build_backbone
from frcnn.model.losses import fast_rcnn_loss, rpn_loss
from frcnn.model.pooling import pool_pyramid
from frcnn.model.proposal_target import proposal_target_layer
from frcnn.model.roi_heads import ClassificationNetwork
from frcnn.model.rpn import RPN, proposal_layer
from frcnn.model.trace import Trace, maybe_timed
from frcnn.ops.nms import batched_nms
from frcnn.ops.soft_nms import soft_nms
from frcnn.pretrained import load_detector_heads


@dataclass
class Detections:
    """Final detections of one image: boxes (D, 4), scores (D,), labels (D,) in 1..K."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor


class FasterRCNN(nn.Module):
    def __init__(self, cfg: Config, num_classes: int, load_pretrained: bool = True):
        """``num_classes`` counts the object classes (K); the network adds background as class 0.
        ``load_pretrained=False`` skips reading ``PRETRAINED`` (weights will come from a checkpoint)."""
        super().__init__()
        if isinstance(cfg.ANCHOR_SCALES, str):
            raise ConfigError("ANCHOR_SCALES=auto is resolved from the training set by frcnn train; "
                              "a model needs the resolved list")
        self.cfg = cfg
        self.num_classes = num_classes
        backbone = build_backbone(cfg, load_pretrained)
        self.head = backbone.head
        self.strides = list(pyramid_strides(cfg))  # C4: [FEAT_STRIDE]; FPN: P2.. and the RPN's extra level
        self.anchor_generators = nn.ModuleList(
            anchor_generators(cfg.ANCHOR_SCALES, cfg.ANCHOR_RATIOS, self.strides, pyramid=cfg.NECK == "fpn"))
        self.rpn = RPN(backbone.head_channels, cfg.RPN_CHANNELS, self.anchor_generator.num_anchors, cfg.RPN_DILATION)
        self.classifier = ClassificationNetwork(backbone.tail, backbone.tail_channels, num_classes + 1)
        if backbone.detector_heads is not None:  # PRETRAINED was a whole torchvision Faster R-CNN (R50-FPN)
            load_detector_heads(self, backbone.detector_heads, cfg.PRETRAINED)

    @property
    def anchor_generator(self) -> AnchorGenerator:
        """The first level's (C4: the only one)."""
        return self.anchor_generators[0]

    @property
    def pyramid(self) -> bool:
        return len(self.strides) > 1

    def forward(
        self,
        images: Tensor,
        image_sizes: Tensor,
        gt_boxes: Sequence[Tensor] | None = None,
        gt_labels: Sequence[Tensor] | None = None,
        generator: Generators = None,
        trace: Trace | None = None,
    ) -> dict[str, Tensor] | list[Detections]:
        """``images`` (N, 3, H, W) pre-processed; ``image_sizes`` (N, 2) true (h, w) of each.

        In training mode ``gt_boxes``/``gt_labels`` (one tensor per image, network-input pixels, labels
        1..K) are required and a dict of the four losses is returned; ``generator`` drives the random
        sampling of anchors and RoIs (one generator per image, or one for all). In eval mode a list of
        :class:`Detections` is returned.
        """
        cfg, train = self.cfg, self.training
        with maybe_timed(trace, "head"):
            features = self.head(images)  # C4: one map; FPN: a list, finest first (the last for the RPN only)
        levels = features if self.pyramid else [features]
        with maybe_timed(trace, "anchors"):
            level_anchors = [gen(*f.shape[-2:]) for gen, f in zip(self.anchor_generators, levels)]
            anchors = torch.cat(level_anchors) if self.pyramid else level_anchors[0]
        if trace is not None:
            trace.put("head", features=levels[0], image_sizes=image_sizes, levels=levels, strides=self.strides)
            trace.put("anchors", anchors=anchors, feat_size=tuple(levels[0].shape[-2:]),
                      num_base_anchors=self.rpn.num_anchors, stride=self.strides[0],
                      level_sizes=[a.shape[0] for a in level_anchors],
                      feat_sizes=[tuple(f.shape[-2:]) for f in levels])
        with maybe_timed(trace, "rpn"):
            rpn_logits, rpn_deltas = self.rpn(levels if self.pyramid else features)
            fg_scores = upcast(rpn_logits.detach()).softmax(-1)[..., 1]  # float32: ranks proposals for NMS
        if trace is not None:
            trace.put("rpn", fg_scores=fg_scores, deltas=rpn_deltas)
        stage = cfg.TRAIN if train else cfg.TEST
        exact = train and cfg.TRAIN.JOINT == "exact"  # the rois carry the deltas' gradient (module docstring)
        with maybe_timed(trace, "proposal_layer"):
            rois, _ = proposal_layer(fg_scores, rpn_deltas, anchors, image_sizes,
                                     stage.RPN_PRE_NMS_TOP_N, stage.RPN_POST_NMS_TOP_N, stage.RPN_NMS_THRESH,
                                     trace, differentiable=exact,
                                     level_sizes=[a.shape[0] for a in level_anchors])
        losses: dict[str, Tensor] = {}
        if gt_boxes is not None and gt_labels is not None:
            with maybe_timed(trace, "anchor_target"):
                labels, targets = anchor_target_layer(anchors, gt_boxes, image_sizes, cfg.TRAIN, generator, trace)
            losses["rpn_cls"], losses["rpn_box"] = rpn_loss(rpn_logits, rpn_deltas, labels, targets,
                                                            cfg.TRAIN.RPN_SIGMA)
            with maybe_timed(trace, "proposal_target"):  # sampled rois keep the gradient; targets do not
                sampled = proposal_target_layer(rois, gt_boxes, gt_labels, cfg.TRAIN, generator, trace)
            if train:
                rois, roi_labels, roi_targets = sampled
        elif train:
            raise ValueError("training needs gt_boxes and gt_labels")
        with maybe_timed(trace, "roi_pooling"):  # exact: grid_sample, differentiable w.r.t. the rois
            # before_pooling: an identity, unless the fast path moved the tail's first 1x1 convolutions there
            maps = [self.classifier.before_pooling(f) for f in (levels[:-1] if self.pyramid else levels)]
            pooled = pool_pyramid(maps, rois, cfg.POOLING_MODE, cfg.POOLING_SIZE,
                                  self.strides[:-1] if self.pyramid else self.strides)
        if trace is not None:
            trace.put("roi_pooling", rois=rois, crops=pooled, mode=cfg.POOLING_MODE, size=cfg.POOLING_SIZE)
        with maybe_timed(trace, "classification"):
            cls_logits, bbox_pred = self.classifier(pooled)
        if train:
            losses["rcnn_cls"], losses["rcnn_box"] = fast_rcnn_loss(cls_logits, bbox_pred, roi_labels, roi_targets,
                                                                  cfg.TRAIN.RCNN_SIGMA, rois[:, 0].long())
            return losses
        with maybe_timed(trace, "detections"):
            return self.detect(rois, cls_logits, bbox_pred, image_sizes, trace)

    @torch.no_grad()
    def detect(
        self, rois: Tensor, cls_logits: Tensor, bbox_pred: Tensor, image_sizes: Tensor, trace: Trace | None = None
    ) -> list[Detections]:
        """Class-specific decoding, clipping, score threshold, per-class NMS (TEST.NMS_METHOD: greedy at TEST.NMS
        or Gaussian soft-NMS), at most MAX_PER_IMAGE.

        A float32 layer: half-precision logits and deltas (autocast) are upcast first, so the detections
        (boxes and scores) are float32."""
        test = self.cfg.TEST
        k1 = self.num_classes + 1
        cls_logits, bbox_pred = upcast(cls_logits), upcast(bbox_pred)
        probs = cls_logits.softmax(-1)
        stds = bbox_pred.new_tensor(self.cfg.TRAIN.BBOX_NORMALIZE_STDS).repeat(k1)
        means = bbox_pred.new_tensor(self.cfg.TRAIN.BBOX_NORMALIZE_MEANS).repeat(k1)
        boxes = bbox_transform_inv(rois[:, 1:], bbox_pred * stds + means)
        batch_index = rois[:, 0].long()
        if trace is not None:
            trace.put("classification", cls_prob=probs, boxes=boxes, rois=rois)
        results, pre_nms, rec = [], [], trace is not None
        for i, (h, w) in enumerate(image_sizes.tolist()):
            sel = batch_index == i
            b = clip_boxes(boxes[sel], h, w).view(-1, k1, 4)[:, 1:]  # drop the background column
            s = probs[sel][:, 1:]
            labels = torch.arange(1, k1, device=s.device).expand_as(s)
            keep = s > test.SCORE_THRESH
            if rec:
                pre_nms.append({"boxes": b[keep], "scores": s[keep], "labels": labels[keep]})
            if test.NMS_METHOD == "soft":
                rows, cls, scores = soft_nms(b, s, test.SOFT_NMS_SIGMA, test.SCORE_THRESH, test.MAX_PER_IMAGE)
                results.append(Detections(b[rows, cls], scores, cls + 1))
                continue
            b, s, labels = b[keep], s[keep], labels[keep]
            kept = batched_nms(to_exclusive(b), s, labels, nms_threshold(test.NMS, b.dtype))[: test.MAX_PER_IMAGE]
            results.append(Detections(b[kept], s[kept], labels[kept]))
        if trace is not None:
            trace.put("detections", pre_nms=pre_nms,
                      final=[{"boxes": d.boxes, "scores": d.scores, "labels": d.labels} for d in results],
                      nms_thresh=test.NMS, score_thresh=test.SCORE_THRESH, max_per_image=test.MAX_PER_IMAGE,
                      nms_method=test.NMS_METHOD, soft_nms_sigma=test.SOFT_NMS_SIGMA)
        return results
