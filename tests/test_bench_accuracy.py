"""benchmarks/bench_accuracy.py: the torchvision model it builds matches frcnn's where it says it does (anchors,
initial weights, feature map), the box conversion between the two conventions, and its config handling."""

import importlib.util
import json
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


@pytest.mark.parametrize(("overrides", "dilation", "channels"), [((), 1, 128), (("RPN_DILATION=2",), 2, 128),
                                                                  (("RPN_CHANNELS=64", "RPN_DILATION=2"), 2, 64)])
def test_torchvision_rpn_conv_has_frcnns_width_and_dilation(overrides, dilation, channels):
    cfg = load_config("demo-cpu", ["DEVICE=cpu", *overrides])
    conv = bench.build_torchvision(cfg, 3).rpn.head.conv[0]
    conv = conv[0] if isinstance(conv, torch.nn.Sequential) else conv  # RPNHead nests a Conv2dNormActivation
    ours = FasterRCNN(cfg, 3).rpn.rpn_net
    assert (conv.out_channels, conv.dilation, conv.padding) == (channels, (dilation,) * 2, (dilation,) * 2)
    assert (ours.out_channels, ours.dilation, ours.padding) == (conv.out_channels, conv.dilation, conv.padding)


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


class _Truth:
    """One image, one class, one ground-truth box (0, 0, 9, 9): 10 x 10 px, inclusive."""
    classes = ("cell",)

    def __len__(self):
        return 1

    def __getitem__(self, i):
        from frcnn.data.sample import Sample

        return Sample(image_id="x", path=Path("x.jpg"), width=40, height=40, boxes=torch.tensor([[0.0, 0, 9, 9]]),
                      labels=torch.tensor([1]), difficult=torch.tensor([False]))


def _one(box):
    from frcnn.model.detector import Detections

    return [Detections(torch.tensor([box]), torch.tensor([0.9]), torch.tensor([1]))]


def test_localisation_known_answers():
    # (0, 0, 8, 9): 9 x 10 = 90 px inside the 100 px truth, IoU 0.9: a hit at IoU > 0.50 .. 0.85 (8 thresholds),
    # a miss at > 0.90 and > 0.95 (strict), so AP75 1 and AP .50:.95 8 / 10
    assert bench.localisation(_Truth(), _one([0.0, 0, 8, 9])) == pytest.approx({"ap75": 1.0, "ap50_95": 0.8})
    # (0, 0, 6, 9): IoU 0.7, a hit at > 0.50, 0.55, 0.60, 0.65 only
    assert bench.localisation(_Truth(), _one([0.0, 0, 6, 9])) == pytest.approx({"ap75": 0.0, "ap50_95": 0.4})


def test_rescore_adds_localisation_and_checks_the_record(tmp_path, capsys):
    from PIL import Image

    from frcnn.config import config_to_dict
    from frcnn.data.voc import write_voc_xml
    from frcnn.engine.evaluate import score_detections

    assert bench.main(["--rescore", "--out", str(tmp_path / "none.md")]) == 1
    assert "none.json not found" in capsys.readouterr().err
    for name, text in (("garbled", "not json"), ("other", '{"a": 1}')):  # one line naming the file, no traceback
        (tmp_path / f"{name}.json").write_text(text)
        assert bench.main(["--rescore", "--out", str(tmp_path / f"{name}.md")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}.json: not the JSON this benchmark writes with --out (")
        assert err.count("\n") == 1 and (tmp_path / f"{name}.json").read_text() == text
    data = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (data / sub).mkdir(parents=True)
    Image.new("RGB", (96, 64), (200, 40, 40)).save(data / "JPEGImages" / "t.png")
    write_voc_xml(data / "Annotations" / "t.xml", "t.png", 96, 64, [("cell", (10, 10, 49, 39))])
    (data / "ImageSets/Main/test.txt").write_text("t\n")
    cfg = load_config("demo-cpu", ["DEVICE=cpu", "TEST.SCORE_THRESH=0.0"])
    torch.manual_seed(0)
    model = bench.build_torchvision(cfg, 1)
    run_dir = tmp_path / "runs" / "torchvision" / "seed0"
    run_dir.mkdir(parents=True)
    torch.save(model.state_dict(), run_dir / "model.pt")
    from frcnn.data import open_repaired

    test_set = open_repaired(data, "test", classes=["cell"], drop_other_classes=False)
    want_map = score_detections(test_set, bench.detect_torchvision(model, cfg, test_set), "voc07")["map"]
    settings = {"data": str(data), "classes": ["cell"], "libs": ["torchvision"], "train_images": 1,
                "test_images": 1, "use_flipped": True, "config": "demo-cpu", "sets": [], "max_iters": 1,
                "ims_per_batch": 1, "lr": 0.01, "warmup": 0, "gamma": 0.1, "stepsize": [1], "seeds": [0],
                "planned_runs": 1}
    row = {"lib": "torchvision", "seed": 0, "run_dir": str(run_dir), "map": want_map, "per_class": {"cell": want_map},
           "s_per_iter": 0.1, "train_s": 1.0, "test_s_per_img": 0.1}
    payload = {"command": "x", "machine": bench.machine(), "settings": settings, "config": config_to_dict(cfg),
               "anchors": bench.anchor_shapes(cfg), "config_notes": [], "runs": [row]}
    out = tmp_path / "acc.md"
    out.with_suffix(".json").write_text(json.dumps({**payload, "runs": [{**row, "map": want_map + 0.01}]}))
    assert bench.main(["--rescore", "--out", str(out)]) == 1  # a record that is not this model's: refused
    assert "recorded" in capsys.readouterr().err
    out.with_suffix(".json").write_text(json.dumps(payload))
    assert bench.main(["--rescore", "--out", str(out)]) == 0
    got = json.loads(out.with_suffix(".json").read_text())["runs"][0]
    want = bench.localisation(test_set, bench.detect_torchvision(model, cfg, test_set))
    assert got["ap75"] == pytest.approx(want["ap75"]) and got["ap50_95"] == pytest.approx(want["ap50_95"])
    assert "| AP75 | AP .50:.95 |" in out.read_text()
