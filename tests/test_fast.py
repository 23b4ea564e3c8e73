"""The fast inference path: BatchNorm folded into convolutions (equal outputs, nothing left to fold), channels-last,
a copy that leaves the trained model alone, and the same detections as the model as trained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from explain_fixtures import CLASSES, HEIGHT, WIDTH, checkpoint, config, model, picture
from PIL import Image
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from frcnn.config import load_config
from frcnn.engine.fast import fold_batchnorm, prepare_for_inference
from frcnn.engine.inference import Predictor
from frcnn.model.detector import FasterRCNN
from frcnn.model.trace import Trace


def _randomise_statistics(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)):
            n = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, FrozenBatchNorm2d])
@pytest.mark.parametrize("bias", [False, True])
def test_a_folded_convolution_computes_conv_then_batchnorm(norm, bias):
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), norm(8), nn.ReLU()).eval()
    _randomise_statistics(block)
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        expected = block(x)
        assert fold_batchnorm(block) == 1
        assert isinstance(block[1], nn.Identity)
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["demo-cpu", "voc-r50-c4"])
def test_every_batchnorm_of_the_backbones_folds(preset):
    cfg = load_config(preset, ["PRETRAINED=r50.pth"] if preset == "voc-r50-c4" else [])
    net = FasterRCNN(cfg, 3, load_pretrained=False).eval()
    count = sum(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in net.modules())
    assert count > 0
    assert fold_batchnorm(net) == count  # every one of them followed a convolution
    assert not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in net.modules())


def test_prepare_for_inference_leaves_the_trained_model_alone():
    net = model()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fast = prepare_for_inference(net, channels_last=True)
    assert fast is not net
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert all(not p.requires_grad for p in fast.parameters())
    conv = next(m for m in fast.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_fast_path_computes_what_the_model_as_trained_computes(channels_last):
    """Same proposals, same class probabilities and refined boxes for every RoI, same best detections. (The
    final lists of an untrained model hold many boxes overlapping at about the NMS threshold, where a float
    rounding can flip a suppression, so they are compared by their best detections.)"""
    net = model()
    _randomise_statistics(net)  # BatchNorm that actually does something
    cfg = config()
    # texture everywhere: flat regions give an untrained RPN exactly tied scores, ordered by rounding
    noise = torch.randint(0, 60, (HEIGHT, WIDTH, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    image = Image.fromarray((torch.from_numpy(np.array(picture())) // 2 + noise).numpy())
    traces = [Trace(), Trace()]
    slow = Predictor(net, cfg, CLASSES).predict([image], trace=traces[0])[0]
    fast = Predictor(prepare_for_inference(net, channels_last), cfg, CLASSES).predict([image], trace=traces[1])[0]
    a, b = traces
    torch.testing.assert_close(b["head"]["features"], a["head"]["features"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b["roi_pooling"]["rois"], a["roi_pooling"]["rois"], atol=1e-3, rtol=0)
    torch.testing.assert_close(b["classification"]["cls_prob"], a["classification"]["cls_prob"], atol=1e-5, rtol=0)
    torch.testing.assert_close(b["classification"]["boxes"], a["classification"]["boxes"], atol=1e-2, rtol=0)
    best_slow, best_fast = slow.scores.argsort(descending=True)[:5], fast.scores.argsort(descending=True)[:5]
    assert torch.equal(slow.labels[best_slow], fast.labels[best_fast])
    torch.testing.assert_close(fast.boxes[best_fast], slow.boxes[best_slow], atol=1e-2, rtol=0)


def test_a_checkpoint_runs_fast_by_default_and_as_trained_on_request(tmp_path):
    folder = checkpoint(tmp_path / "ckpt")
    fast, plain = Predictor.from_checkpoint(folder, "cpu"), Predictor.from_checkpoint(folder, "cpu", fast=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.model.modules())


def test_prepare_in_place_rearranges_the_model_itself():
    net = model()
    assert prepare_for_inference(net, channels_last=False, inplace=True) is net
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
