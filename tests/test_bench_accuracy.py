"""benchmarks/bench_accuracy.py: the torchvision model it builds matches frcnn's where it says it does (anchors,
initial weights, feature map), the box conversion between the two conventions, and its config handling."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes

from frcnn.boxes import scale_boxes, to_exclusive
from frcnn.config import load_config
from frcnn.errors import ConfigError
from frcnn.model.detector import FasterRCNN

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_accuracy.py"
_spec = importlib.util.spec_from_file_location("bench_accuracy", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def cfg():
    return load_config("demo-cpu", ["DEVICE=cpu"])


def test_anchors_equal_frcnn(cfg):
    tv = bench.build_torchvision(cfg, 3)
    fr = FasterRCNN(cfg, 3)
    # a 480x640 image at demo-cpu's 320 px: torchvision's 320x426 padded to 320x432, feature 40x54 (frcnn: 320x427)
    images = ImageList(torch.zeros(1, 3, 320, 432), [(320, 426)])
    feature = torch.zeros(1, 128, 40, 54)
    got = tv.rpn.anchor_generator(images, [feature])[0]
    want = to_exclusive(fr.anchor_generator(40, 54))
    # equal to float32's rounding: demo-cpu's scales 2.828 and 5.657 give anchors off the integer grid, and the two
    # libraries add the shifts in their own order (one unit in the last place at 512 px is 3e-5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    shapes = bench.anchor_shapes(cfg)
    assert shapes["frcnn"] == shapes["torchvision"]
    assert shapes["frcnn"][0][:2] == [46, 24] and shapes["torchvision_stock"][0][:2] == [46, 22]


def test_feature_map_and_stride_match(cfg):
    tv = bench.build_torchvision(cfg, 3)
    tv.eval()
    images, _ = tv.transform([torch.rand(3, 480, 640)])
    assert images.image_sizes == [(320, 426)] and tuple(images.tensors.shape[-2:]) == (320, 432)
    fr = FasterRCNN(cfg, 3).eval()
    with torch.no_grad():
        assert tv.backbone(images.tensors).shape[-2:] == fr.head(torch.zeros(1, 3, 320, 427)).shape[-2:]
    with pytest.raises(RuntimeError, match="anchor stride"):  # a padding that would shift torchvision's anchors
        tv.rpn.anchor_generator(ImageList(torch.zeros(1, 3, 320, 430), [(320, 426)]), [torch.zeros(1, 128, 40, 54)])


def test_same_initial_head_and_tail(cfg):
    torch.manual_seed(5)
    fr = FasterRCNN(cfg, 3)
    torch.manual_seed(5)
    tv = bench.build_torchvision(cfg, 3)
    for a, b in ((fr.head, tv.backbone), (fr.classifier.tail, tv.roi_heads.box_head)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert tv.roi_heads.box_predictor.cls_score.out_features == 4
    assert tv.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert tv.roi_heads.fg_bg_sampler.batch_size_per_image == 32 and tv.rpn.fg_bg_sampler.batch_size_per_image == 128


def test_box_conversion_round_trip():
    g = torch.Generator().manual_seed(0)
    xy = torch.randint(0, 300, (50, 2), generator=g).float()
    boxes = torch.cat((xy, xy + torch.randint(0, 200, (50, 2), generator=g).float()), 1)  # inclusive, w >= 1
    assert torch.equal(bench.from_torchvision(bench.to_torchvision(boxes)), boxes)
    # torchvision resizing the exclusive region = frcnn's scale_boxes of the inclusive box
    tv = resize_boxes(bench.to_torchvision(boxes), (480, 640), (240, 320))
    assert torch.allclose(bench.from_torchvision(tv), scale_boxes(boxes, 0.5))


def test_training_step_finite(cfg):
    torch.manual_seed(0)
    tv = bench.build_torchvision(cfg, 3)
    bench.set_stage(tv, cfg, True, 320)
    boxes = torch.tensor([[10.0, 20.0, 99.0, 119.0], [200.0, 150.0, 260.0, 230.0]])  # frcnn inclusive
    losses = tv([torch.rand(3, 240, 320)], [{"boxes": bench.to_torchvision(boxes), "labels": torch.tensor([1, 3])}])
    assert all(torch.isfinite(v) for v in losses.values())
    dets = bench.detect_torchvision(tv, cfg, _OneImage())
    assert dets[0].boxes.shape[1] == 4 and (dets[0].boxes[:, 2] <= 319).all()


def test_torchvision_side_trains_under_frcnns_bf16_autocast(cfg):
    from frcnn.engine.precision import Precision

    torch.manual_seed(0)
    tv = bench.build_torchvision(cfg, 3)
    bench.set_stage(tv, cfg, True, 160)
    boxes = torch.tensor([[10.0, 20.0, 99.0, 119.0]])
    seen = []
    hook = tv.backbone.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with Precision("bf16", "cpu").autocast():
        losses = tv([torch.rand(3, 120, 160)], [{"boxes": bench.to_torchvision(boxes), "labels": torch.tensor([2])}])
    hook.remove()
    assert seen == [torch.bfloat16]  # the convolutions ran in bf16
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


class _OneImage:
    classes = ("a", "b", "c")

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return None

    def load_image(self, sample):
        from PIL import Image

        return Image.new("RGB", (320, 240), (120, 60, 30))


def test_config_handling():
    cfg = bench.resolve_config("demo-cpu", [], 320)
    assert cfg.TRAIN.MAX_ITERS == 320 and cfg.TRAIN.STEPSIZE == (240,)
    kept = bench.resolve_config("demo-cpu", ["TRAIN.STEPSIZE=[100]"], 320)
    assert kept.TRAIN.STEPSIZE == (100,)
    with pytest.raises(ConfigError, match="once"):
        bench.resolve_config("demo-cpu", ["TRAIN.MAX_ITERS=10"], 20)
    with pytest.raises(ConfigError, match="TEST.AMP"):
        bench.resolve_config("demo-cpu", ["TEST.AMP=bf16"], None)
    assert bench.resolve_config("demo-cpu", ["TRAIN.AMP=bf16"], None).TRAIN.AMP == "bf16"  # both sides follow it
    assert any("RoIAlign" in n for n in bench.config_notes(load_config("demo-cpu", ["POOLING_MODE=crop"])))
