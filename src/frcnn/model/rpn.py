"""Region proposal network and proposal layer.

``rpn_net`` (3x3 conv + ReLU) runs over the head's feature map; two 1x1 convs give, per anchor,
2 class scores (background, foreground; softmax) and 4 regression coefficients. The proposal layer
applies the coefficients to the anchors, clips the boxes to the image, keeps the top
``RPN_PRE_NMS_TOP_N`` by foreground score, runs NMS at ``RPN_NMS_THRESH`` and keeps at most
``RPN_POST_NMS_TOP_N``. Boxes are in network-input pixels.

With a pyramid (``NECK=fpn``) the same three convolutions run over every level and the anchors of all levels are
scored together (level by level, finest first). The proposal layer then keeps the top ``RPN_PRE_NMS_TOP_N`` of
*each* level, runs NMS within each level, and keeps the best ``RPN_POST_NMS_TOP_N`` over all levels: torchvision's
``RegionProposalNetwork`` and detectron2's ``find_top_rpn_proposals`` do so (the FPN paper ranks the top
proposals of all levels together after a per-level pre-selection).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from frcnn.boxes import bbox_transform_inv, clip_boxes, nms_threshold, to_exclusive, upcast
from frcnn.model.trace import Trace
from frcnn.ops.nms import batched_nms, nms


class RPN(nn.Module):
    def __init__(self, in_channels: int, channels: int, num_anchors: int, dilation: int = 1):
        super().__init__()
        self.num_anchors = num_anchors
        self.rpn_net = nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation)
        self.rpn_cls_score_net = nn.Conv2d(channels, 2 * num_anchors, 1)
        self.rpn_bbox_pred_net = nn.Conv2d(channels, 4 * num_anchors, 1)
        for layer in (self.rpn_net, self.rpn_cls_score_net, self.rpn_bbox_pred_net):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Scores (N, H*W*A, 2) and deltas (N, H*W*A, 4), anchors ordered ((h * W) + w) * A + a; for a list
        of maps (a pyramid) the levels' rows one after the other, finest first.

        As in the reference, the 2A score channels are all A background scores, then all A foreground.
        """
        if not isinstance(features, Tensor):
            outputs = [self(level) for level in features]
            return torch.cat([o[0] for o in outputs], 1), torch.cat([o[1] for o in outputs], 1)
        n, _, h, w = features.shape
        a = self.num_anchors
        x = torch.relu(self.rpn_net(features))
        logits = self.rpn_cls_score_net(x).view(n, 2, a, h, w).permute(0, 3, 4, 2, 1).reshape(n, -1, 2)
        deltas = self.rpn_bbox_pred_net(x).view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
        return logits, deltas


def stable_top_k(scores: Tensor, k: int) -> Tensor:
    """Indices (N, k) of the ``k`` largest scores of each row of ``scores`` (N, M), by decreasing score and, among
    equal scores, increasing index: the first ``k`` of ``sort(descending=True, stable=True)``, exactly. A sort of
    the whole row costs 1.8 ms at 23040 anchors; ``topk`` finds the k-th largest value, and only the scores at or
    above it (the k, plus ties at it) are sorted (0.2 ms at k = 1000, ``benchmarks/bench_proposal_layer.py``)."""
    # k of more than half the row: the sort is as fast (0.9x at 12000 of 21546); NaN orders differ: sort all
    if k == 0 or 2 * k >= scores.shape[1] or not bool(torch.isfinite(scores).all()):
        return scores.sort(dim=1, descending=True, stable=True)[1][:, :k]
    kth = scores.topk(k, dim=1, sorted=False).values.amin(dim=1)
    rows = []
    for row, t in zip(scores, kth):
        candidates = (row >= t).nonzero().squeeze(1)  # by increasing index, so the stable sort keeps ties so
        rows.append(candidates[row[candidates].sort(descending=True, stable=True)[1][:k]])
    return torch.stack(rows) if rows else scores.new_empty((0, k), dtype=torch.long)


def proposal_layer(
    fg_scores: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    image_sizes: Tensor,
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    trace: Trace | None = None,
    differentiable: bool = False,
    level_sizes: Sequence[int] = (),
) -> tuple[Tensor, Tensor]:
    """Turn anchors into proposals.

    ``fg_scores`` (N, M), ``deltas`` (N, M, 4), ``anchors`` (M, 4), ``image_sizes`` (N, 2) as (h, w).
    Returns ``rois`` (R, 5) as ``[batch_index, x1, y1, x2, y2]`` grouped by image, and their scores (R,).
    A float32 layer: half-precision scores and deltas (autocast) are upcast, so the decoding, the top-k and
    the NMS inputs, and the returned rois and scores, are float32.

    The rois are constants (approximate joint training) unless ``differentiable`` (``TRAIN.JOINT=exact``):
    then their coordinates carry the gradient of ``deltas`` through the decoding (``bbox_transform_inv``,
    whose log-size clamp cuts it above ``BBOX_XFORM_CLIP``) and the clipping (``clamp``: it passes where
    the box lies inside the image). The sort, the top-k and NMS only choose indices, never with a gradient;
    the values are the same either way.

    ``level_sizes``: the number of anchors of each pyramid level (their rows one after the other); with more
    than one, ``pre_nms_top_n`` is per level and NMS runs within each level (module docstring).
    """
    fg_scores, deltas = upcast(fg_scores.detach()), upcast(deltas if differentiable else deltas.detach())
    n, m = fg_scores.shape
    sizes = image_sizes.to(deltas.dtype)
    # the order of a stable sort: equal scores (flat image regions) keep the lower anchor index first, on every
    # device and in the exported ONNX graph (whose TopK breaks ties so), so NMS keeps the same boxes
    orders, levels, start = [], [], 0
    for j, size in enumerate(level_sizes if len(level_sizes) > 1 else (m,)):
        k = min(pre_nms_top_n, size) if pre_nms_top_n > 0 else size
        orders.append(stable_top_k(fg_scores[:, start : start + size], k) + start)
        levels.append(torch.full((k,), j, dtype=torch.long, device=fg_scores.device))
        start += size
    order, level = torch.cat(orders, 1), torch.cat(levels)
    top_scores = fg_scores.gather(1, order)
    # only the kept anchors are decoded: elementwise, so the same values as decoding all and picking after
    top_deltas = deltas.gather(1, order.unsqueeze(-1).expand(*order.shape, 4))
    top_boxes = bbox_transform_inv(anchors[order], top_deltas)
    top_boxes = clip_boxes(top_boxes, sizes[:, 0].view(n, 1, 1), sizes[:, 1].view(n, 1, 1))
    rois, scores, kept_levels = [], [], []
    thresh = nms_threshold(nms_thresh, top_boxes.dtype)
    post = post_nms_top_n if post_nms_top_n > 0 else None
    for i in range(n):
        with torch.no_grad():  # NMS chooses indices
            if len(orders) > 1:  # within each level, then the best over all levels
                keep = batched_nms(to_exclusive(top_boxes[i]), top_scores[i], level, thresh)[:post]
            else:
                keep = nms(to_exclusive(top_boxes[i]), top_scores[i], thresh, post)
        kept = top_boxes[i, keep]
        rois.append(torch.cat((kept.new_full((kept.shape[0], 1), i), kept), dim=1))
        scores.append(top_scores[i, keep])
        kept_levels.append(level[keep])
    out_rois, out_scores = torch.cat(rois), torch.cat(scores)
    if trace is not None:
        trace.put("proposal_layer", pre_nms_boxes=top_boxes, pre_nms_scores=top_scores, rois=out_rois,
                  scores=out_scores, pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n,
                  nms_thresh=nms_thresh, levels=level, roi_levels=torch.cat(kept_levels))
    return out_rois, out_scores
