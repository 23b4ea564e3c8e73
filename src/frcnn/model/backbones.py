"""The head network (image -> stride-16 feature map) and the tail (pooled RoI -> feature vector "fc7").

``res50`` / ``res101``: conv1..layer3 as head; layer4, with the stride of its first block set to 1 as the
reference does, then a spatial mean, as tail (2048-d). ``vgg16``: conv1_1..conv5_3 without pool5 as head;
fc6/fc7 as tail (4096-d). ``tiny``: a small conv net for CPU training from scratch (four stages of 3x3
conv+BN+ReLU, one conv in the first and two in the others, 32-64-128-128 channels, the first conv of each
stage at stride 2 until ``FEAT_STRIDE`` is reached: 16, 8 or 4; tail: two fully connected layers of 512),
used by the ``demo-cpu`` preset. The big backbones give stride 16 only, and the config refuses another
``FEAT_STRIDE`` for them.

With ``NECK=fpn`` (:mod:`frcnn.model.fpn`) the head returns the maps of the backbone's stages through the
pyramid instead of one map: ResNet's layer1..layer4 (C2..C5, layer4 at its usual stride 2), the tiny backbone's
last stage at each stride from 4 to ``FEAT_STRIDE``. The tail then reads ``FPN_CHANNELS`` x 7 x 7 crops: ResNet's
is the FPN paper's two fully connected layers of 1024 (torchvision's ``TwoMLPHead``), the tiny one its own two of
512.

Starting from pretrained weights (``PRETRAINED``: a file holding a torchvision-style state dict, as
``.pth`` or ``.safetensors``), BatchNorm is frozen and the first blocks are fixed as in the reference
(ResNet: conv1 and ``RESNET.FIXED_BLOCKS`` stages; VGG16: conv1 and conv2). From scratch, every layer
trains and BatchNorm is ordinary.

The file is told by its keys (:func:`pretrained_kind`): an ImageNet classification network (``conv1.*``,
``layer1.*``, ``features.*``) fills the backbone only, with or without FPN; torchvision's whole
``fasterrcnn_resnet50_fpn`` (``backbone.body.*``, ``backbone.fpn.*``, ``rpn.head.*``, ``roi_heads.*``) fills a
``NECK=fpn`` ResNet-50 model everywhere (:func:`torchvision_fpn_to_frcnn`): trunk, pyramid, RPN, the two fully
connected layers of the box head, and the box predictor when its class count is the model's. Any other detector's
weights (a C4 torchvision model, an frcnn checkpoint's ``model.safetensors``) and an FPN detector given to a C4
model are refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet50, resnet101, vgg16
from torchvision.ops import FrozenBatchNorm2d

from frcnn.config import Config
from frcnn.errors import CheckpointError
from frcnn.model.fpn import PyramidHead, Stages


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


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"PRETRAINED={path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: one line, not a traceback
        raise CheckpointError(f"PRETRAINED={path}: cannot read weights ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"PRETRAINED={path}: not a state dict of tensors")
    return state


def _load_into(model: nn.Module, path: str, ignore_prefixes: tuple[str, ...],
               state: dict[str, Tensor] | None = None) -> None:
    """Load a torchvision-style state dict (``state``, else read from ``path``); keys under ``ignore_prefixes``
    (the classifier that the detector replaces, e.g. ``fc.``) are skipped in the file and not expected from it."""
    if state is None:
        state = load_state_dict_file(path)
    state = {k: v for k, v in state.items() if not k.startswith(ignore_prefixes)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not match: name the first one, in one line
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise CheckpointError(f"PRETRAINED={path}: does not match {type(model).__name__} ({first})") from None
    missing = [k for k in missing if not k.startswith(ignore_prefixes)]
    if missing or unexpected:
        raise CheckpointError(
            f"PRETRAINED={path}: does not match {type(model).__name__} "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})"
        )


def _freeze(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


# ------------------------------------------------------------------------- pretrained detector files

# torchvision's ResNet children as frcnn's FPN trunk (Stages.body) numbers them
_BODY_INDEX = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


def pretrained_kind(state: dict[str, Tensor]) -> str:
    """What a ``PRETRAINED`` file holds, by its keys: ``frcnn-fpn`` / ``frcnn-c4`` (an frcnn detector's weights),
    ``torchvision-fpn`` / ``torchvision-c4`` (a torchvision Faster R-CNN with or without ``backbone.fpn``), or
    ``backbone`` (a classification network: ImageNet ResNet or VGG16, the tiny backbone's head)."""
    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in state)

    if has("rpn.rpn_net.", "classifier.cls_score_net.", "head.trunk.", "head.fpn."):
        return "frcnn-fpn" if has("head.fpn.") else "frcnn-c4"
    if has("rpn.head.", "roi_heads.", "backbone."):
        return "torchvision-fpn" if has("backbone.fpn.") else "torchvision-c4"
    return "backbone"


_KIND_TEXT = {
    "frcnn-fpn": "the weights of an frcnn FPN detector (a checkpoint's model.safetensors)",
    "frcnn-c4": "the weights of an frcnn C4 detector (a checkpoint's model.safetensors)",
    "torchvision-fpn": "a torchvision Faster R-CNN R50-FPN state dict",
    "torchvision-c4": "a torchvision Faster R-CNN state dict without a feature pyramid (C4: no backbone.fpn.*)",
}


def _check_kind(cfg: Config, kind: str) -> None:
    """Refuse, in one line, a file that is not for this model (see the module docstring)."""
    if kind == "backbone" or (kind == "torchvision-fpn" and cfg.NECK == "fpn"):
        return
    model = "NECK=fpn" if cfg.NECK == "fpn" else "C4 (NECK=none)"
    if kind.startswith("frcnn"):
        hint = ("PRETRAINED takes torchvision weights (an ImageNet backbone, or fasterrcnn_resnet50_fpn's with "
                "NECK=fpn); an frcnn checkpoint is read by --checkpoint / --resume")
    elif cfg.NECK == "fpn":
        hint = "give an ImageNet backbone or torchvision's fasterrcnn_resnet50_fpn weights"
    else:
        hint = "a detector's weights load only into NECK=fpn models (preset voc-r50-fpn); give C4 an ImageNet backbone"
    raise CheckpointError(f"PRETRAINED={cfg.PRETRAINED}: {_KIND_TEXT[kind]}, this model is {model}: {hint}")


def torchvision_fpn_to_frcnn(state: dict[str, Tensor], cfg: Config) -> dict[str, Tensor]:
    """torchvision ``fasterrcnn_resnet50_fpn`` state dict -> frcnn ``FasterRCNN`` names (``head.trunk.body.*``,
    ``head.fpn.*``, ``rpn.*``, ``classifier.*``). Both torchvision layouts are read: ``inner_blocks.i.0.weight``
    and ``rpn.head.conv.0.0`` (0.13 on) and ``inner_blocks.i.weight`` and ``rpn.head.conv`` (the published COCO
    file).

    - objectness: torchvision has one logit ``z`` per anchor (sigmoid), frcnn two (softmax over background,
      foreground; channels all A background, then all A foreground). Background weights and biases 0 and
      foreground ``z``'s give ``softmax([0, z])[1] = sigmoid(z)`` exactly.
    - RPN deltas: torchvision views its (N, 4A, H, W) output as (N, A, 4, H, W), frcnn too: copied as they are.
    - box predictor: torchvision decodes ``bbox_pred / (10, 10, 5, 5)`` (its ``bbox_reg_weights``), frcnn
      ``bbox_pred * BBOX_NORMALIZE_STDS + BBOX_NORMALIZE_MEANS``; the rows are rescaled to give the same deltas,
      a factor of exactly 1 for the default stds (0.1, 0.1, 0.2, 0.2) and means 0.
    """
    out: dict[str, Tensor] = {}
    a = None
    for key, v in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        name = parts[-1]
        if key.startswith("backbone.body."):
            child = parts[2]
            if child not in _BODY_INDEX:  # fc / avgpool: not in torchvision's detector either
                continue
            out[".".join(["head.trunk.body", str(_BODY_INDEX[child]), *parts[3:]])] = v
        elif key.startswith(("backbone.fpn.inner_blocks.", "backbone.fpn.layer_blocks.")):
            kind = "lateral" if parts[2] == "inner_blocks" else "output"
            out[f"head.fpn.{kind}.{parts[3]}.{name}"] = v
        elif key.startswith("rpn.head.conv."):
            out[f"rpn.rpn_net.{name}"] = v
        elif key.startswith("rpn.head.cls_logits."):
            a = v.shape[0]
            out[f"rpn.rpn_cls_score_net.{name}"] = torch.cat((torch.zeros_like(v), v))
        elif key.startswith("rpn.head.bbox_pred."):
            out[f"rpn.rpn_bbox_pred_net.{name}"] = v
        elif key.startswith(("roi_heads.box_head.fc6.", "roi_heads.box_head.fc7.")):
            out[f"classifier.tail.{1 if parts[2] == 'fc6' else 3}.{name}"] = v
        elif key.startswith("roi_heads.box_predictor.cls_score."):
            out[f"classifier.cls_score_net.{name}"] = v
        elif key.startswith("roi_heads.box_predictor.bbox_pred."):
            # frcnn's raw output r gives r * std + mean = torchvision's t / w: r = t / (w std) - mean / std
            weights = (10.0, 10.0, 5.0, 5.0)  # torchvision's RoIHeads bbox_reg_weights
            stds, means = cfg.TRAIN.BBOX_NORMALIZE_STDS, cfg.TRAIN.BBOX_NORMALIZE_MEANS
            k1 = v.shape[0] // 4
            scale = v.new_tensor([1.0 / (w * s) for w, s in zip(weights, stds)]).repeat(k1)  # (1, 1, 1, 1)
            v = v * scale.view((-1,) + (1,) * (v.dim() - 1))
            if name == "bias":
                v = v - v.new_tensor([m / s for m, s in zip(means, stds)]).repeat(k1)
            out[f"classifier.bbox_pred_net.{name}"] = v
        else:
            raise CheckpointError(f"PRETRAINED={cfg.PRETRAINED}: {_KIND_TEXT['torchvision-fpn']} with a key frcnn "
                                  f"does not know: {key}")
    if a is None:
        raise CheckpointError(f"PRETRAINED={cfg.PRETRAINED}: {_KIND_TEXT['torchvision-fpn']} without rpn.head.*")
    return out


def _load_checked(module: nn.Module, state: dict[str, Tensor], path: str, what: str) -> None:
    """``state`` into ``module`` (strict: every key on both sides); a mismatch is one line naming the first."""
    own = module.state_dict()
    for key, v in state.items():
        if key in own and own[key].shape != v.shape:
            raise CheckpointError(f"PRETRAINED={path}: does not match {what}: {key} is {tuple(v.shape)} in the file, "
                                  f"{tuple(own[key].shape)} in the model")
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"PRETRAINED={path}: does not match {what} (missing {missing[:3]}"
                              f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]})")


def _under(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_detector_heads(model: nn.Module, heads: dict[str, Tensor], path: str) -> None:
    """The RPN and box predictor of a torchvision Faster R-CNN file (:func:`torchvision_fpn_to_frcnn`, the
    ``rpn.`` and ``classifier.`` keys) into a built ``FasterRCNN``. A predictor for another number of classes
    (torchvision's COCO one has 91) is left out, in one printed line: the model's fresh one is fine-tuned."""
    _load_checked(model.rpn, _under(heads, "rpn."), path, "the model's RPN")
    predictor = _under(heads, "classifier.")
    k1 = model.num_classes + 1
    file_k1 = predictor["cls_score_net.weight"].shape[0] if "cls_score_net.weight" in predictor else 0
    if file_k1 != k1:
        has = f"has {file_k1} classes (background included)" if file_k1 else "has none"
        print(f"PRETRAINED={path}: its box predictor {has}, the model {k1}: the predictor keeps its fresh init "
              "(to be trained), everything else is loaded")
        return
    for name in ("cls_score_net", "bbox_pred_net"):
        _load_checked(getattr(model.classifier, name), _under(predictor, name + "."), path,
                      f"the model's box predictor ({name})")


def _resnet(cfg: Config, load: bool) -> Backbone:
    pretrained = bool(cfg.PRETRAINED)
    build = resnet50 if cfg.BACKBONE == "res50" else resnet101
    net = build(weights=None, norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d)
    detector = None  # a torchvision FPN detector's weights, under frcnn's names
    if pretrained:
        if load:
            state = load_state_dict_file(cfg.PRETRAINED)
            kind = pretrained_kind(state)
            _check_kind(cfg, kind)
            if kind == "torchvision-fpn":
                detector = torchvision_fpn_to_frcnn(state, cfg)
            else:
                _load_into(net, cfg.PRETRAINED, ignore_prefixes=("fc.",), state=state)
        stages = [net.layer1, net.layer2, net.layer3]
        _freeze(net.conv1, net.bn1, *stages[: cfg.RESNET.FIXED_BLOCKS])
    if cfg.NECK == "fpn":
        trunk = Stages([net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4],
                       taps=(4, 5, 6, 7))
        head = PyramidHead(trunk, (256, 512, 1024, 2048), cfg.FPN_CHANNELS)
        tail = _mlp_tail(cfg.FPN_CHANNELS * cfg.POOLING_SIZE**2, 1024)
        heads = None
        if detector is not None:
            _load_checked(head, {k[5:]: v for k, v in detector.items() if k.startswith("head.")}, cfg.PRETRAINED,
                          "the model's ResNet + FPN head")
            _load_checked(tail, {k[16:]: v for k, v in detector.items() if k.startswith("classifier.tail.")},
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
            _check_kind(cfg, pretrained_kind(state))
            _load_into(net, cfg.PRETRAINED, ignore_prefixes=("classifier.6.",), state=state)
        _freeze(*net.features[:10])
    head = net.features[:30]  # up to relu5_3, without pool5
    tail = nn.Sequential(nn.Flatten(), *net.classifier[:6])  # fc6, relu, dropout, fc7, relu, dropout
    return Backbone(head, tail, 512, 4096)


def _conv_bn(cin: int, cout: int, stride: int, norm: str = "batch") -> list[nn.Module]:
    """3x3 conv + normalisation + ReLU. ``group``: GroupNorm of 16 channels a group (2 groups at 32
    channels), the same per-image statistics in training and inference, whatever the batch."""
    layer = nn.BatchNorm2d(cout) if norm == "batch" else nn.GroupNorm(cout // 16, cout)
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), layer, nn.ReLU(inplace=True)]


def _mlp_tail(in_features: int, width: int) -> nn.Sequential:
    """Two fully connected layers with ReLU on the flattened crop (the FPN paper's head at width 1024)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(inplace=True),
                         nn.Linear(width, width), nn.ReLU(inplace=True))


def _tiny(cfg: Config, load: bool) -> Backbone:
    widths = (32, 64, 128, 128)
    downsampling = cfg.FEAT_STRIDE.bit_length() - 1  # stages that halve the resolution: 4 for stride 16
    layers: list[nn.Module] = []
    ends, strides = [], []  # each stage's last module and its stride
    cin = 3
    for i, width in enumerate(widths):
        layers += _conv_bn(cin, width, 2 if i < downsampling else 1, cfg.NORM)
        if i:  # one conv in the first stage: a second, at half resolution, is about a sixth of the head's work
            layers += _conv_bn(width, width, 1, cfg.NORM)
        cin = width
        ends.append(len(layers) - 1)
        strides.append(2 ** min(i + 1, downsampling))
    head: nn.Module = nn.Sequential(*layers)
    pooled_channels = cfg.FPN_CHANNELS if cfg.NECK == "fpn" else cin
    tail = _mlp_tail(pooled_channels * cfg.POOLING_SIZE**2, 512)  # built here: the random init's order is the seed's
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
