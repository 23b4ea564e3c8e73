"""The head network (image -> stride-16 feature map) and the tail (pooled RoI -> feature vector "fc7").

``res50`` / ``res101``: conv1..layer3 as head; layer4, with the stride of its first block set to 1 as the
reference does, then a spatial mean, as tail (2048-d). ``vgg16``: conv1_1..conv5_3 without pool5 as head;
fc6/fc7 as tail (4096-d). ``tiny``: a small conv net for CPU training from scratch (four stages of 3x3
conv+BN+ReLU, one conv in the first and two in the others, ``TINY_WIDTHS`` channels (32-64-128-128), the
first conv of each stage at stride 2 until ``FEAT_STRIDE`` is reached: 16, 8 or 4; tail: two fully connected
layers of 512),
used by the ``demo-cpu`` preset. With ``DILATED`` its stages past ``FEAT_STRIDE`` dilate instead (DeepLab's
atrous trick: each stride 2 left out doubles the dilation of the convs after it), so at stride 8 it computes the
stride-16 network's features every 8 px, with its receptive field (87 px instead of 71) at the same cost.
The big backbones give stride 16 only for C4 (32, C5, with FPN), and the config refuses another ``FEAT_STRIDE``
for them.

With ``NECK=fpn`` (:mod:`frcnn.model.fpn`) the head returns the maps of the backbone's stages through the
pyramid instead of one map: ResNet's layer1..layer4 (C2..C5, layer4 at its usual stride 2), the tiny backbone's
last stage at each stride from 4 to ``FEAT_STRIDE``. The tail then reads ``FPN_CHANNELS`` x 7 x 7 crops: ResNet's
is the FPN paper's two fully connected layers of 1024 (torchvision's ``TwoMLPHead``), the tiny one its own two of
512.

Starting from pretrained weights (``PRETRAINED``: a file holding a torchvision-style state dict, as
``.pth`` or ``.safetensors``), BatchNorm is frozen and the first blocks are fixed as in the reference
(ResNet: conv1 and ``RESNET.FIXED_BLOCKS`` stages; VGG16: conv1 and conv2). From scratch, every layer
trains and BatchNorm is ordinary.

Reading the file and telling what it holds (an ImageNet network, or torchvision's whole R50-FPN detector) is
:mod:`frcnn.pretrained`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn
from torchvision.models import resnet50, resnet101, vgg16
from torchvision.ops import FrozenBatchNorm2d

from frcnn.config import Config
from frcnn.errors import CheckpointError
from frcnn.model.fpn import PyramidHead, Stages
from frcnn.pretrained import (
    check_kind,
    load_checked,
    load_into,
    load_state_dict_file,
    pretrained_kind,
    torchvision_fpn_to_frcnn,
)


@dataclass
class Backbone:
    head: nn.Module
    tail: nn.Module
    head_channels: int
    tail_channels: int
    # from a torchvision Faster R-CNN file: the RPN's and box predictor's weights under frcnn's names, for
    # FasterRCNN to load once it has built them (load_detector_heads)
    detector_heads: dict[str, Tensor] | None = None


class SpatialMean(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def _freeze(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


def _resnet(cfg: Config, load: bool) -> Backbone:
    pretrained = bool(cfg.PRETRAINED)
    build = resnet50 if cfg.BACKBONE == "res50" else resnet101
    net = build(weights=None, norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d)
    detector = None  # a torchvision FPN detector's weights, under frcnn's names
    if pretrained:
        if load:
            state = load_state_dict_file(cfg.PRETRAINED)
            kind = pretrained_kind(state)
            check_kind(cfg, kind)
            if kind == "torchvision-fpn":
                detector = torchvision_fpn_to_frcnn(state, cfg)
            else:
                load_into(net, cfg.PRETRAINED, ignore_prefixes=("fc.",), state=state)
        stages = [net.layer1, net.layer2, net.layer3]
        _freeze(net.conv1, net.bn1, *stages[: cfg.RESNET.FIXED_BLOCKS])
    if cfg.NECK == "fpn":
        trunk = Stages([net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4],
                       taps=(4, 5, 6, 7))
        head = PyramidHead(trunk, (256, 512, 1024, 2048), cfg.FPN_CHANNELS)
        tail = _mlp_tail(cfg.FPN_CHANNELS * cfg.POOLING_SIZE**2, 1024, cfg.TAIL_DROPOUT)
        heads = None
        if detector is not None:
            load_checked(head, {k[5:]: v for k, v in detector.items() if k.startswith("head.")}, cfg.PRETRAINED,
                          "the model's ResNet + FPN head")
            load_checked(tail, {k[16:]: v for k, v in detector.items() if k.startswith("classifier.tail.")},
                          cfg.PRETRAINED, "the model's box head (two fully connected layers)")
            heads = {k: v for k, v in detector.items() if not k.startswith(("head.", "classifier.tail."))}
        return Backbone(head, tail, cfg.FPN_CHANNELS, 1024, heads)
    # layer4 at stride 1: the 7x7 pooled crops stay 7x7 (reference resnet_v1)
    net.layer4[0].conv2.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    head = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    tail = nn.Sequential(net.layer4, SpatialMean())
    return Backbone(head, tail, 1024, 2048)


def _vgg16(cfg: Config, load: bool) -> Backbone:
    net = vgg16(weights=None)
    if cfg.PRETRAINED:
        if load:
            state = load_state_dict_file(cfg.PRETRAINED)
            check_kind(cfg, pretrained_kind(state))
            load_into(net, cfg.PRETRAINED, ignore_prefixes=("classifier.6.",), state=state)
        _freeze(*net.features[:10])
    head = net.features[:30]  # up to relu5_3, without pool5
    tail = nn.Sequential(nn.Flatten(), *net.classifier[:6])  # fc6, relu, dropout, fc7, relu, dropout
    return Backbone(head, tail, 512, 4096)


def _conv_bn(cin: int, cout: int, stride: int, norm: str = "batch", dilation: int = 1) -> list[nn.Module]:
    """3x3 conv + normalisation + ReLU. ``group``: GroupNorm of 16 channels a group (2 groups at 32
    channels), the same per-image statistics in training and inference, whatever the batch."""
    layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(cout // 16, cout)
    return [nn.Conv2d(cin, cout, 3, stride, dilation, dilation, bias=False), layer, nn.ReLU(inplace=True)]


def _mlp_tail(in_features: int, width: int, dropout: float = 0.0) -> nn.Sequential:
    """Two fully connected layers with ReLU on the flattened crop (the FPN paper's head at width 1024); with
    ``dropout`` each ReLU is followed by dropout, inside the same slot, so the weights keep their names."""
    def act() -> nn.Module:
        return nn.Sequential(nn.ReLU(inplace=True), nn.Dropout(dropout)) if dropout else nn.ReLU(inplace=True)

    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), act(), nn.Linear(width, width), act())


def _tiny(cfg: Config, load: bool) -> Backbone:
    widths = cfg.TINY_WIDTHS
    downsampling = cfg.FEAT_STRIDE.bit_length() - 1  # stages that halve the resolution: 4 for stride 16
    layers: list[nn.Module] = []
    ends, strides = [], []  # each stage's last module and its stride
    cin = 3
    dilation = 1  # DILATED: each stride-2 conv past FEAT_STRIDE left out doubles the dilation of the convs after it
    for i, width in enumerate(widths):
        layers += _conv_bn(cin, width, 2 if i < downsampling else 1, cfg.NORM, dilation)
        if cfg.DILATED and i >= downsampling:
            dilation *= 2
        if i:  # one conv in the first stage: a second, at half resolution, is about a sixth of the head's work
            layers += _conv_bn(width, width, 1, cfg.NORM, dilation)
        cin = width
        ends.append(len(layers) - 1)
        strides.append(2 ** min(i + 1, downsampling))
    head: nn.Module = nn.Sequential(*layers)
    pooled_channels = cfg.FPN_CHANNELS if cfg.NECK == "fpn" else cin
    # built here: the random init's order is the seed's
    tail = _mlp_tail(pooled_channels * cfg.POOLING_SIZE**2, 512, cfg.TAIL_DROPOUT)
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if cfg.PRETRAINED and load:
        state = load_state_dict_file(cfg.PRETRAINED)
        try:
            head.load_state_dict(state)
        except RuntimeError:
            raise CheckpointError(f"PRETRAINED={cfg.PRETRAINED}: not a tiny-backbone head state dict") from None
    if cfg.NECK == "fpn":  # the last stage at each stride from 4 on: C2 (stride 4), C3 (8), C4 (16)
        taps = [i for i, s in enumerate(strides) if s >= 4 and (i + 1 == len(strides) or strides[i + 1] != s)]
        head = PyramidHead(Stages(list(head), [ends[i] for i in taps]), [widths[i] for i in taps], cfg.FPN_CHANNELS)
    return Backbone(head, tail, pooled_channels, 512)


def build_backbone(cfg: Config, load_pretrained: bool = True) -> Backbone:
    """Build head and tail. With ``PRETRAINED`` set the structure is the pretrained one (frozen BN, fixed
    blocks) whether or not the file is read: ``load_pretrained=False`` rebuilds a trained model whose
    weights come from a checkpoint instead."""
    if cfg.BACKBONE in ("res50", "res101"):
        return _resnet(cfg, load_pretrained)
    if cfg.BACKBONE == "vgg16":
        return _vgg16(cfg, load_pretrained)
    return _tiny(cfg, load_pretrained)
