"""Feature Pyramid Network (Lin et al. 2017): one map per backbone stage, all with the same channels.

The backbone's stages ``C2..C5`` (strides 4..32 on ResNet; the tiny backbone's stages at strides 4..FEAT_STRIDE)
each get a lateral 1x1 convolution to ``FPN_CHANNELS``. Top-down, from the coarsest: a level's map is its
lateral plus the level above upsampled to its size (nearest neighbour); a 3x3 convolution then smooths each
sum into ``P2..P5``. ``P6``, for the RPN only (its largest anchors), is ``P5`` subsampled by a stride-2 max pool
of size 1, as in the paper's and torchvision's ``LastLevelMaxPool``. No normalisation and no ReLU, as the paper.

The output is a list of maps, finest first: ``[P2, P3, P4, P5, P6]`` at the strides of
:func:`frcnn.config.pyramid_strides`. The RPN reads all of them, RoI pooling all but the last
(:func:`frcnn.model.pooling.roi_levels`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    def __init__(self, in_channels: Sequence[int], channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)
        for conv in [*self.lateral, *self.output]:  # torchvision's and detectron2's init
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, stages: Sequence[Tensor]) -> list[Tensor]:
        """``stages`` finest first (C2, C3, ...) -> ``[P2, ..., P(last), P(last + 1)]``."""
        top = self.lateral[-1](stages[-1])
        outputs = [self.output[-1](top)]
        for i in range(len(stages) - 2, -1, -1):
            lateral = self.lateral[i](stages[i])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            outputs.insert(0, self.output[i](top))
        outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs


class PyramidHead(nn.Module):
    """The head of an FPN model: the backbone's stages, then the pyramid. Image -> list of maps, finest first."""

    def __init__(self, trunk: nn.Module, stage_channels: Sequence[int], channels: int):
        super().__init__()
        self.trunk = trunk
        self.fpn = FPN(stage_channels, channels)

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.fpn(self.trunk(images))


class Stages(nn.Module):
    """Run ``modules`` in turn and return the outputs of those named in ``taps``, in order."""

    def __init__(self, modules: Sequence[nn.Module], taps: Sequence[int]):
        super().__init__()
        self.body = nn.Sequential(*modules)
        self.taps = tuple(taps)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, m in enumerate(self.body):
            x = m(x)
            if i in self.taps:
                out.append(x)
        return out
