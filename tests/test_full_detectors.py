"""The full detectors of the presets ``voc-r50-c4`` and ``voc-vgg16`` (random weights, no file read): a training
step and an eval forward on a small image.

``PRETRAINED`` names a file that does not exist and the models are built with ``load_pretrained=False``: that
is the structure a pretrained run trains (frozen BatchNorm, fixed first blocks) without reading weights, as
:func:`frcnn.model.backbones.build_backbone` documents. Few RoIs keep the step affordable on a CPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from frcnn.config import load_config
from frcnn.engine.train import build_optimizer
from frcnn.model.detector import FasterRCNN

pytestmark = pytest.mark.slow

K = 3
H, W = 160, 192  # a small network input (10x12 features at stride 16); at 128 px no 128 px anchor fits
# inside the image, so the anchor target layer would label nothing and the RPN would get no loss
GT_BOXES = [torch.tensor([[10.0, 12.0, 80.0, 90.0], [90.0, 30.0, 150.0, 110.0]])]
GT_LABELS = [torch.tensor([1, 3])]
SMALL = ["DEVICE=cpu", "TRAIN.BATCH_SIZE=16", "TRAIN.RPN_PRE_NMS_TOP_N=600", "TRAIN.RPN_POST_NMS_TOP_N=60",
         "TEST.RPN_PRE_NMS_TOP_N=300", "TEST.RPN_POST_NMS_TOP_N=12"]


def _model(preset: str, *overrides: str) -> FasterRCNN:
    cfg = load_config(preset, [*SMALL, *overrides])
    torch.manual_seed(0)
    return FasterRCNN(cfg, num_classes=K, load_pretrained=False)


def _image() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, H, W, generator=g) * 50, torch.tensor([[H, W]])


def _train_step(model: FasterRCNN) -> dict[str, torch.Tensor]:
    model.train()
    images, sizes = _image()
    losses = model(images, sizes, GT_BOXES, GT_LABELS, torch.Generator().manual_seed(0))
    assert set(losses) == {"rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box"}
    for name, value in losses.items():
        assert value.dim() == 0 and math.isfinite(value.item()), (name, value)
        assert value.item() > 0, name  # every loss has samples: the RPN and the head both learn
    sum(losses.values()).backward()
    return losses


def _has_grad(module: nn.Module) -> bool:
    return any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters())


def _no_grad(module: nn.Module) -> bool:
    return all(not p.requires_grad and p.grad is None for p in module.parameters())


def _eval_forward(model: FasterRCNN) -> None:
    model.eval()
    images, sizes = _image()
    with torch.no_grad():
        dets = model(images, sizes)
    assert len(dets) == 1
    d = dets[0]
    assert d.boxes.shape == (d.scores.shape[0], 4) and d.labels.shape == d.scores.shape
    assert 0 < d.boxes.shape[0] <= model.cfg.TEST.MAX_PER_IMAGE  # SCORE_THRESH 0: an untrained net detects
    assert torch.isfinite(d.boxes).all() and torch.isfinite(d.scores).all()
    assert ((d.labels >= 1) & (d.labels <= K)).all()
    assert (d.boxes[:, 0::2] >= 0).all() and (d.boxes[:, 2] <= W - 1).all()
    assert (d.boxes[:, 1::2] >= 0).all() and (d.boxes[:, 3] <= H - 1).all()
    # +1 convention: width x2 - x1 + 1 is never negative (an untrained net predicts boxes under a pixel wide)
    assert (d.boxes[:, 2:] - d.boxes[:, :2] + 1 >= 0).all()


def _resnet_parts(model: FasterRCNN) -> dict[str, nn.Module]:
    conv1, bn1, _relu, _pool, layer1, layer2, layer3 = model.head
    layer4 = model.classifier.tail[0]
    return {"conv1": conv1, "bn1": bn1, "layer1": layer1, "layer2": layer2, "layer3": layer3, "layer4": layer4}


def test_r50_c4_from_scratch_trains_every_layer_and_detects():
    model = _model("voc-r50-c4")
    assert model.cfg.BACKBONE == "res50" and model.cfg.POOLING_MODE == "crop"
    _train_step(model)
    assert all(p.requires_grad for p in model.parameters())
    for name, part in _resnet_parts(model).items():
        assert _has_grad(part), name  # head (conv1..layer3) and tail (layer4)
    assert _has_grad(model.rpn) and _has_grad(model.classifier.cls_score_net)
    assert _has_grad(model.classifier.bbox_pred_net)
    _eval_forward(model)


@pytest.mark.parametrize("fixed_blocks", [1, 3])
def test_r50_c4_pretrained_structure_freezes_bn_conv1_and_fixed_blocks(fixed_blocks):
    model = _model("voc-r50-c4", "PRETRAINED=/nonexistent/resnet50.pth", f"RESNET.FIXED_BLOCKS={fixed_blocks}")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # every BatchNorm frozen
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.classifier.tail.modules())
    _train_step(model)
    parts = _resnet_parts(model)
    frozen = ["conv1", "bn1", *(f"layer{i}" for i in range(1, fixed_blocks + 1))]
    for name in frozen:
        assert _no_grad(parts[name]), name
    for name in [n for n in ("layer1", "layer2", "layer3") if n not in frozen] + ["layer4"]:
        assert _has_grad(parts[name]), name
        assert all(p.requires_grad and p.grad is not None for p in parts[name].parameters()), name
    assert _has_grad(model.rpn) and _has_grad(model.classifier.cls_score_net)
    # the optimizer never sees a frozen parameter, and sees every trainable one once
    optimizer = build_optimizer(model, model.cfg.TRAIN)
    in_groups = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))
    assert set(in_groups) == {id(p) for p in model.parameters() if p.requires_grad}
    frozen_ids = {id(p) for name in frozen for p in parts[name].parameters()}
    assert frozen_ids and not frozen_ids & set(in_groups)
    _eval_forward(model)


def test_vgg16_trains_with_conv1_conv2_fixed_and_detects():
    model = _model("voc-vgg16", "PRETRAINED=/nonexistent/vgg16.pth")
    assert model.cfg.BACKBONE == "vgg16"
    _train_step(model)
    convs = [m for m in model.head if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    for conv in convs[:4]:  # conv1_1, conv1_2, conv2_1, conv2_2
        assert _no_grad(conv)
    for conv in convs[4:]:  # conv3_1 .. conv5_3: the head trains
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    fc6, fc7 = [m for m in model.classifier.tail if isinstance(m, nn.Linear)]
    assert _has_grad(fc6) and _has_grad(fc7)  # the tail
    assert _has_grad(model.rpn) and _has_grad(model.classifier.bbox_pred_net)
    _eval_forward(model)
