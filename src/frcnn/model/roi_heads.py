"""Classification network: pooled RoI features -> tail -> fc7 -> class scores and class-specific boxes.

``cls_score_net`` gives K + 1 scores (0 = background); ``bbox_pred_net`` gives 4 regression coefficients
per class, normalised by ``BBOX_NORMALIZE_STDS`` during training and un-normalised at inference.

``before_pooling`` is an identity as built and trained: the fast inference path may move layers of the tail
that commute with RoI pooling there, to run once on the feature map instead of on every RoI
(:func:`frcnn.engine.fast.convolve_before_pooling`).
"""

from __future__ import annotations

from torch import Tensor, nn


class ClassificationNetwork(nn.Module):
    def __init__(self, tail: nn.Module, tail_channels: int, num_classes: int):
        super().__init__()
        self.before_pooling: nn.Module = nn.Identity()  # no parameters: checkpoints are unchanged
        self.tail = tail
        self.cls_score_net = nn.Linear(tail_channels, num_classes)
        self.bbox_pred_net = nn.Linear(tail_channels, 4 * num_classes)
        nn.init.normal_(self.cls_score_net.weight, std=0.01)
        nn.init.normal_(self.bbox_pred_net.weight, std=0.001)
        nn.init.zeros_(self.cls_score_net.bias)
        nn.init.zeros_(self.bbox_pred_net.bias)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        fc7 = self.tail(pooled)
        return self.cls_score_net(fc7), self.bbox_pred_net(fc7)
