"""The fast inference path: BatchNorm folded into convolutions (equal outputs, nothing left to fold), channels-last,
a copy that leaves the trained model alone, and the same detections as the model as trained."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from explain_fixtures import CLASSES, HEIGHT, WIDTH, checkpoint, config, model, picture
from PIL import Image
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from frcnn.config import load_config
from frcnn.engine.fast import PooledBottleneck, fold_batchnorm, prepare_for_inference
from frcnn.engine.inference import Predictor
from frcnn.model.detector import FasterRCNN
from frcnn.model.pooling import pool_rois
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


def _r50_rois(count: int, h: int, w: int) -> torch.Tensor:
    """``count`` RoIs inside an h x w image (the proposal layer clips to it), some at its edges."""
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(count, 2, generator=g) * torch.tensor([w - 2.0, h - 2.0])
    wh = torch.rand(count, 2, generator=g) * torch.tensor([w / 1.5, h / 1.5]) + 1
    x2y2 = torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))
    rois = torch.cat([torch.zeros(count, 1), xy, x2y2], 1)
    rois[0, 1:] = torch.tensor([0.0, 0.0, w - 1.0, h - 1.0])  # the whole image, every border
    return rois


@pytest.mark.parametrize("count", [8, 80])  # torchvision's roi_align and frcnn's gathers (roi_ops) both
def test_the_tails_first_1x1_convolutions_commute_with_roi_align(count):
    """With align pooling the fast path runs layer4's conv1 and downsample on the map, before pooling: the
    classification network's outputs for the same RoIs equal those of the model as trained (BatchNorm live)."""
    torch.manual_seed(0)
    net = FasterRCNN(load_config("voc-r50-c4", ["POOLING_MODE=align"]), 3, load_pretrained=False).eval()
    _randomise_statistics(net.classifier)
    h, w = 96, 160
    features = torch.randn(1, 1024, h // 16, w // 16).relu()
    rois = _r50_rois(count, h, w)
    with torch.no_grad():
        expected = net.classifier(pool_rois(features, rois, "align", 7, 16))
        fast = prepare_for_inference(net, channels_last=False)
        assert isinstance(fast.classifier.tail[0][0], PooledBottleneck)
        assert fast.classifier.before_pooling.out_channels == 512 + 2048
        got = fast.classifier(pool_rois(fast.classifier.before_pooling(features), rois, "align", 7, 16))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4 * e.abs().max().item())


@pytest.mark.parametrize("preset, pooling", [("voc-r50-c4", "crop"), ("voc-r50-c4", "pool"), ("voc-r50-fpn", "align"),
                                             ("demo-cpu", "align")])
def test_max_pooling_and_mlp_tails_keep_their_convolutions_after_pooling(preset, pooling):
    """Crop pooling's 2x2 max and roi_pool are not linear; FPN and tiny tails have no convolution to move."""
    net = FasterRCNN(load_config(preset, [f"POOLING_MODE={pooling}"]), 3, load_pretrained=False).eval()
    fast = prepare_for_inference(net, channels_last=False)
    assert isinstance(fast.classifier.before_pooling, nn.Identity)
    assert not any(isinstance(m, PooledBottleneck) for m in fast.modules())


def test_reuse_freed_memory_serves_large_tensors_from_the_heap_and_reuses_them():
    """glibc's own accounting (mallinfo2): by default a 64 MB tensor is its own mmap, unmapped on free; after
    reuse_freed_memory none is mapped, and once the heap has grown to the work's size, allocating and freeing
    such tensors again takes no new memory from the system."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt and mallinfo2 are Linux's")
    code = textwrap.dedent("""
        import ctypes, torch
        from frcnn.engine.fast import reuse_freed_memory
        class Info(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                        "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = Info
        def cycle():  # what one 64 MB tensor adds to the mapped and to the heap bytes while it lives
            before = libc.mallinfo2()
            t = torch.ones(1 << 24)
            after = libc.mallinfo2()
            del t
            return after.hblkhd - before.hblkhd, after.arena - before.arena
        mapped, heap = cycle()
        print(mapped >= 64 << 20, heap < 1 << 20)
        print(reuse_freed_memory())
        grown = [cycle() for _ in range(12)]
        print(all(m == 0 for m, _ in grown), sum(h for _, h in grown) >= 60 << 20, all(h == 0 for _, h in grown[6:]))
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    except subprocess.CalledProcessError as e:
        if "mallinfo2" in e.stderr:
            pytest.skip("this C library has no mallinfo2 (glibc < 2.33)")
        raise
    assert out.stdout.split() == ["True"] * 6
