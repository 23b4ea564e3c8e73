"""PRETRAINED=<torchvision fasterrcnn_resnet50_fpn state dict> into the voc-r50-fpn preset.

The known answers come from torchvision called directly: its model (random weights from a seed, BatchNorm statistics
set on an image) is saved, loaded into frcnn, and its own modules give the RPN outputs to compare with."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import FrozenBatchNorm2d

from frcnn.config import load_config
from frcnn.errors import CheckpointError
from frcnn.model.detector import FasterRCNN

K = 3  # object classes; the models have K + 1 with background
A = 3  # anchors per cell (3 ratios, one size per level)
BODY = {"conv1": 0, "bn1": 1, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}


def fpn_cfg(path, *overrides):
    return load_config("voc-r50-fpn", [f"PRETRAINED={path}", "DEVICE=cpu", *overrides])


@pytest.fixture(scope="module")
def tv_model():
    """torchvision's R50-FPN Faster R-CNN, random weights from a seed; BatchNorm statistics are those of a random
    image (so that the features stay of order 1 through 50 layers) and every bias is made non-zero (the stock init
    zeroes most of them, which would hide a bias mapped to the wrong place)."""
    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=K + 1)
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        tv.backbone.body.train()
        tv.backbone.body(torch.randn(2, 3, 128, 160))
        for name, p in tv.named_parameters():
            if name.endswith("bias") and not name.startswith("backbone.body"):
                p.normal_(0, 0.05)
    tv.saved_state = tv.state_dict()  # what the file holds: nn.BatchNorm2d's keys, num_batches_tracked included
    freeze_batchnorm(tv)  # then FrozenBatchNorm2d, as frcnn and torchvision's pretrained models run it
    return tv.eval()


def freeze_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.load_state_dict(child.state_dict())  # (drops num_batches_tracked)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)


@pytest.fixture(scope="module")
def tv_file(tv_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tv") / "fasterrcnn_resnet50_fpn.pth"
    torch.save(tv_model.saved_state, path)
    assert any(k.endswith("num_batches_tracked") for k in tv_model.saved_state)
    return path


@pytest.fixture(scope="module")
def loaded(tv_file):
    return FasterRCNN(fpn_cfg(tv_file), K).eval()


def test_every_tensor_is_torchvisions_after_the_mapping(tv_model, loaded):
    tv, fr = tv_model, loaded
    for name, index in BODY.items():
        want = getattr(tv.backbone.body, name).state_dict()
        got = fr.head.trunk.body[index].state_dict()
        assert set(got) == set(want), name
        for k in want:
            assert torch.equal(got[k], want[k]), f"{name}.{k}"
    for i in range(4):
        for ours, theirs in ((fr.head.fpn.lateral[i], tv.backbone.fpn.inner_blocks[i][0]),
                             (fr.head.fpn.output[i], tv.backbone.fpn.layer_blocks[i][0])):
            assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    head = tv.rpn.head
    assert torch.equal(fr.rpn.rpn_net.weight, head.conv[0][0].weight)
    assert torch.equal(fr.rpn.rpn_net.bias, head.conv[0][0].bias)
    # 2A channels: all A background logits (0), then all A foreground (torchvision's logit)
    cls = fr.rpn.rpn_cls_score_net
    assert cls.weight.shape[0] == 2 * A
    assert not cls.weight[:A].any() and not cls.bias[:A].any()
    assert torch.equal(cls.weight[A:], head.cls_logits.weight) and torch.equal(cls.bias[A:], head.cls_logits.bias)
    assert torch.equal(fr.rpn.rpn_bbox_pred_net.weight, head.bbox_pred.weight)
    assert torch.equal(fr.rpn.rpn_bbox_pred_net.bias, head.bbox_pred.bias)
    tail, box_head, predictor = fr.classifier.tail, tv.roi_heads.box_head, tv.roi_heads.box_predictor
    assert torch.equal(tail[1].weight, box_head.fc6.weight) and torch.equal(tail[1].bias, box_head.fc6.bias)
    assert torch.equal(tail[3].weight, box_head.fc7.weight) and torch.equal(tail[3].bias, box_head.fc7.bias)
    assert torch.equal(fr.classifier.cls_score_net.weight, predictor.cls_score.weight)
    assert torch.equal(fr.classifier.cls_score_net.bias, predictor.cls_score.bias)
    # torchvision's box coder weights (10, 10, 5, 5) are 1 / frcnn's BBOX_NORMALIZE_STDS (0.1, 0.1, 0.2, 0.2), means
    # 0: the predictor's deltas are the same numbers (rescaled by exactly 1)
    assert tv.roi_heads.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert [1 / w for w in tv.roi_heads.box_coder.weights] == list(fr.cfg.TRAIN.BBOX_NORMALIZE_STDS)
    assert torch.equal(fr.classifier.bbox_pred_net.weight, predictor.bbox_pred.weight)
    assert torch.equal(fr.classifier.bbox_pred_net.bias, predictor.bbox_pred.bias)


def test_backbone_is_frozen_as_for_any_pretrained_backbone(loaded):
    body = loaded.head.trunk.body
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in body.modules()) == 53
    assert not any(p.requires_grad for m in (body[0], body[4]) for p in m.parameters())  # conv1, layer1
    assert all(p.requires_grad for m in (body[5], body[6], body[7]) for p in m.parameters())
    assert all(p.requires_grad for p in loaded.head.fpn.parameters())


@torch.no_grad()
def test_rpn_probabilities_and_deltas_of_every_anchor_are_torchvisions(tv_model, loaded):
    torch.manual_seed(1)
    x = torch.randn(1, 3, 256, 320)
    tv_feats = list(tv_model.backbone(x).values())
    fr_feats = loaded.head(x)
    assert [f.shape for f in fr_feats] == [f.shape for f in tv_feats]
    for ours, theirs in zip(fr_feats, tv_feats):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    objectness, deltas = concat_box_prediction_layers(*tv_model.rpn.head(tv_feats))
    logits, fr_deltas = loaded.rpn(fr_feats)
    cells = sum(f.shape[-2] * f.shape[-1] for f in tv_feats)
    assert logits.shape == (1, cells * A, 2) and objectness.shape == (cells * A, 1)
    want = objectness[:, 0].sigmoid()
    assert float(want.std()) > 0.01  # not a constant: the comparison sees every anchor's own score
    torch.testing.assert_close(logits.softmax(-1)[0, :, 1], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(fr_deltas[0], deltas, rtol=0, atol=1e-5)


@torch.no_grad()
def test_box_head_scores_and_deltas_are_torchvisions(tv_model, loaded):
    torch.manual_seed(2)
    crops = torch.randn(6, 256, 7, 7)
    logits, box = tv_model.roi_heads.box_predictor(tv_model.roi_heads.box_head(crops))
    fr_logits, fr_box = loaded.classifier(crops)
    torch.testing.assert_close(fr_logits.softmax(-1), logits.softmax(-1), rtol=0, atol=1e-6)
    stds = torch.tensor(loaded.cfg.TRAIN.BBOX_NORMALIZE_STDS).repeat(K + 1)
    weights = torch.tensor(tv_model.roi_heads.box_coder.weights).repeat(K + 1)
    torch.testing.assert_close(fr_box * stds, box / weights, rtol=1e-6, atol=1e-6)


def test_the_old_key_layout_and_safetensors_load_the_same(tv_model, loaded, tmp_path):
    """The published COCO file predates torchvision 0.13: ``rpn.head.conv.weight``, ``inner_blocks.i.weight``."""
    old = {}
    for k, v in tv_model.saved_state.items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(4):
                k = k.replace(f"fpn.{block}.{i}.0.", f"fpn.{block}.{i}.")
        old[k] = v.contiguous()
    path = tmp_path / "old.safetensors"
    save_file(old, str(path))
    model = FasterRCNN(fpn_cfg(path), K)
    want = loaded.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())


def test_a_predictor_of_other_classes_is_left_out_in_one_printed_line(tv_model, tmp_path, capsys):
    state = dict(tv_model.saved_state)
    state["roi_heads.box_predictor.cls_score.weight"] = torch.randn(91, 1024)
    state["roi_heads.box_predictor.cls_score.bias"] = torch.randn(91)
    state["roi_heads.box_predictor.bbox_pred.weight"] = torch.randn(364, 1024)
    state["roi_heads.box_predictor.bbox_pred.bias"] = torch.randn(364)
    path = tmp_path / "coco.pth"
    torch.save(state, path)
    torch.manual_seed(5)
    model = FasterRCNN(fpn_cfg(path), K)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"PRETRAINED={path}: its box predictor has 91 classes (background included), the model 4: "
                   "the predictor keeps its fresh init (to be trained), everything else is loaded"]
    assert model.classifier.cls_score_net.weight.shape == (K + 1, 1024)
    assert not model.classifier.cls_score_net.bias.any()  # frcnn's init: zero bias
    assert torch.equal(model.classifier.tail[3].weight, tv_model.roi_heads.box_head.fc7.weight)


def test_an_imagenet_resnet50_still_fills_the_backbone_only(tmp_path):
    torch.manual_seed(4)
    net = resnet50(weights=None)
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)
    torch.manual_seed(0)
    model = FasterRCNN(fpn_cfg(path), K)
    assert torch.equal(model.head.trunk.body[7][2].conv3.weight, net.layer4[2].conv3.weight)
    assert torch.equal(model.head.trunk.body[1].running_var, net.bn1.running_var)
    assert not model.head.fpn.lateral[0].bias.any()  # the pyramid keeps its init


def one_line(cfg) -> str:
    with pytest.raises(CheckpointError) as info:
        FasterRCNN(cfg, K)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_torchvision_fpn_file_given_to_a_c4_model(tv_file):
    message = one_line(load_config("voc-r50-c4", [f"PRETRAINED={tv_file}"]))
    assert message.startswith(f"PRETRAINED={tv_file}: a torchvision Faster R-CNN R50-FPN state dict, "
                              "this model is C4 (NECK=none)")


def test_a_c4_frcnn_checkpoint_given_to_an_fpn_model(tmp_path):
    c4 = FasterRCNN(load_config("voc-r50-c4", ["RPN_CHANNELS=16"]), K)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in c4.state_dict().items()}, str(path))
    message = one_line(fpn_cfg(path))
    assert message.startswith(f"PRETRAINED={path}: the weights of an frcnn C4 detector")
    assert "this model is NECK=fpn" in message


def test_a_c4_torchvision_file_given_to_an_fpn_model(tv_model, tmp_path):
    """The layout of benchmarks/bench_torchvision.py's C4 model: backbone.conv1.*, backbone.layer1.*, no FPN."""
    state = {k.replace("backbone.body.", "backbone."): v for k, v in tv_model.saved_state.items()
             if not k.startswith("backbone.fpn.")}
    path = tmp_path / "c4.pth"
    torch.save(state, path)
    message = one_line(fpn_cfg(path))
    assert message.startswith(f"PRETRAINED={path}: a torchvision Faster R-CNN state dict without a feature pyramid")


def test_an_rpn_of_another_width_is_one_line(tv_file):
    message = one_line(fpn_cfg(tv_file, "RPN_CHANNELS=512"))
    assert message.startswith(f"PRETRAINED={tv_file}: does not match the model's RPN: rpn_net.weight is "
                              "(256, 256, 3, 3) in the file, (512, 256, 3, 3) in the model")
