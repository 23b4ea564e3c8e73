"""Boxes come back in original-image pixels for images that get resized up and down.

Known objects at known positions in images whose scale is not 1 (100x150 -> 320 up; 900x1200 and 1200x900 -> 320
down; 150x1000 limited by MAX_SIZE), through ``Predictor.predict`` (one batch of all of them) and ``frcnn detect``
JSON. The detections are controlled: the classification network's weights are zero, its biases make class 2
win every RoI with zero box regression, and the proposal layer is replaced in the test by one that proposes the
object boxes mapped into network-input pixels. Every expected number is computed here, independently of frcnn:

* the scale by the reference's rule (py-faster-rcnn ``prep_im_for_blob``: short side to SCALE, unless the
  rounded long side would exceed MAX_SIZE, then long side to MAX_SIZE), transcribed below;
* the network-input size ``round(h * scale) x round(w * scale)`` (cv2.resize's rounding of ``fx``, ``fy``);
* the +1 convention (pixel ``x`` covers ``[x, x + 1)``): a box goes into the network as
  ``x1 * s, (x2 + 1) * s - 1`` and comes back as ``x1 / s, (x2 + 1) / s - 1``, so a detection of exactly the
  proposed box is the object's original box. (The reference's ``im_detect`` divides all four coordinates by
  the scale, which puts ``x2``, ``y2`` ``1 - 1 / s`` pixels off that interval; frcnn follows the interval
  both ways, training and inference alike: :func:`frcnn.boxes.scale_boxes`.)

The resized pixels themselves are checked as well: the bright object of the original image lies in the
network input where its mapped box says, within the 1.5 pixels bilinear resampling blurs an edge by.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from frcnn.cli import main
from frcnn.config import load_config
from frcnn.engine.checkpoint import save_checkpoint
from frcnn.engine.inference import Predictor
from frcnn.model.detector import FasterRCNN
from frcnn.model.trace import Trace
from frcnn.transforms import image_to_tensor, prep_image

CLASSES = ("one", "two", "three")
SCALE, MAX_SIZE = 320, 500

# (height, width, objects as 0-based inclusive (x1, y1, x2, y2) in original pixels)
IMAGES = {
    "up": (100, 150, [(20, 30, 59, 79), (110, 60, 149, 99)]),      # x3.2; the second touches the bottom-right
    "down": (900, 1200, [(300, 150, 749, 599)]),                  # x0.3556: 320 x 427
    "portrait": (1200, 900, [(90, 600, 539, 1049)]),               # short side is the width
    "max_size": (150, 1000, [(100, 20, 499, 139), (700, 0, 999, 149)]),  # 2.13 would make 2133 > 500: x0.5
}


# ------------------------------------------------------------------- the reference's arithmetic, transcribed

def reference_scale(height: int, width: int, target_size: int, max_size: int) -> float:
    """py-faster-rcnn lib/utils/blob.py ``prep_im_for_blob``, the scale part, as written there."""
    im_size_min = np.min([height, width])
    im_size_max = np.max([height, width])
    im_scale = float(target_size) / float(im_size_min)
    # Prevent the biggest axis from being more than MAX_SIZE
    if np.round(im_scale * im_size_max) > max_size:
        im_scale = float(max_size) / float(im_size_max)
    return im_scale


def input_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """cv2.resize(im, None, None, fx=scale, fy=scale): dsize = (round(w * fx), round(h * fy))."""
    return int(np.round(height * scale)), int(np.round(width * scale))


def to_network(box, s: float) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1 * s, y1 * s, (x2 + 1) * s - 1, (y2 + 1) * s - 1]


def to_original(box, s: float) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1 / s, y1 / s, (x2 + 1) / s - 1, (y2 + 1) / s - 1]


# --------------------------------------------------------------------------------------- the scale rule

@pytest.mark.parametrize("h, w", [(100, 150), (150, 100), (900, 1200), (1200, 900), (150, 1000), (320, 320),
                                  (103, 161),   # long side 500.19 rounds to 500: the short-side rule holds
                                  (101, 158),   # long side 500.59 rounds to 501 > 500: MAX_SIZE decides
                                  (1, 1), (333, 500), (2000, 37)])
def test_preprocessing_scale_is_the_reference_rule(h, w):
    s = reference_scale(h, w, SCALE, MAX_SIZE)
    image = torch.zeros(3, h, w)
    prepared = prep_image(image, SCALE, MAX_SIZE, (0.0, 0.0, 0.0))
    assert prepared.scale == pytest.approx(s, rel=1e-12)
    assert tuple(prepared.tensor.shape[-2:]) == input_size(h, w, s)
    assert prepared.original_size == (h, w)
    short, long = sorted(input_size(h, w, s))
    assert short == SCALE or long == MAX_SIZE  # one of the two limits is met exactly
    assert short <= SCALE + 1 and long <= MAX_SIZE  # the other one is not exceeded (up to rounding)


def test_scale_rule_boundaries_known_answers():
    assert reference_scale(103, 161, 320, 500) == 320 / 103  # np.round(500.19) = 500 is not > 500
    assert reference_scale(101, 158, 320, 500) == 500 / 158  # np.round(500.59) = 501 > 500
    assert input_size(103, 161, 320 / 103) == (320, 500)
    assert input_size(900, 1200, 320 / 900) == (320, 427)
    assert input_size(150, 1000, 0.5) == (75, 500)


# ---------------------------------------------------------------------------- controlled detections

def _picture(h: int, w: int, objects) -> Image.Image:
    im = Image.new("RGB", (w, h), (0, 0, 0))
    draw = ImageDraw.Draw(im)
    for x1, y1, x2, y2 in objects:
        draw.rectangle((x1, y1, x2, y2), fill=(255, 255, 255))  # PIL's rectangle includes x2, y2
    return im


def _config():
    return load_config("demo-cpu", ["DEVICE=cpu", f"TEST.SCALES=[{SCALE}]", f"TEST.MAX_SIZE={MAX_SIZE}",
                                    "TEST.SCORE_THRESH=0.5", "TEST.NMS=0.3"])


def _controlled_model(cfg) -> FasterRCNN:
    torch.manual_seed(0)
    model = FasterRCNN(cfg, len(CLASSES)).eval()
    with torch.no_grad():
        cls, box = model.classifier.cls_score_net, model.classifier.bbox_pred_net
        cls.weight.zero_()
        cls.bias.copy_(torch.tensor([0.0, 0.0, 12.0, 0.0]))  # class 2 ("two") wins every RoI, p > 0.9999
        box.weight.zero_()
        box.bias.zero_()  # no regression: each detection is its RoI
    return model


def _plan():
    """Network-input size -> the RoIs (network-input pixels) of that image, and what each image expects."""
    rois_by_size, expected = {}, {}
    for name, (h, w, objects) in IMAGES.items():
        s = reference_scale(h, w, SCALE, MAX_SIZE)
        size = input_size(h, w, s)
        assert size not in rois_by_size
        rois_by_size[size] = [to_network(o, s) for o in objects]
        expected[name] = (s, size, [list(map(float, o)) for o in objects])
    return rois_by_size, expected


@pytest.fixture
def proposals(monkeypatch):
    """Replace the proposal layer by one that proposes the planned boxes for each image of the batch (found by
    its network-input size, which must be the expected one)."""
    rois_by_size, expected = _plan()
    seen = []

    def fake_proposal_layer(fg_scores, deltas, anchors, image_sizes, *args, **kwargs):
        rows = []
        for i, (h, w) in enumerate(image_sizes.tolist()):
            assert (h, w) in rois_by_size, f"network-input size {(h, w)} is none of the expected sizes"
            seen.append((h, w))
            rows += [[float(i), *box] for box in rois_by_size[(h, w)]]
        rois = torch.tensor(rows, dtype=torch.float32, device=fg_scores.device)
        return rois, torch.ones(len(rows), device=fg_scores.device)

    monkeypatch.setattr("frcnn.model.detector.proposal_layer", fake_proposal_layer)
    return expected, seen


def _check_boxes(boxes: list[list[float]], objects: list[list[float]], s: float, tol: float) -> None:
    got = sorted(boxes)
    want = sorted(objects)
    assert len(got) == len(want)
    for g, o in zip(got, want):
        assert g == pytest.approx(o, abs=tol)
        assert g == pytest.approx(to_original(to_network(o, s), s), abs=tol)


def test_predictor_maps_boxes_back_to_original_pixels(proposals):
    expected, seen = proposals
    cfg = _config()
    predictor = Predictor(_controlled_model(cfg), cfg, CLASSES)
    images = [_picture(h, w, objs) for h, w, objs in IMAGES.values()]
    trace = Trace()
    dets = predictor.predict(images, trace=trace)  # one batch: every image padded to the largest
    assert sorted(seen) == sorted(size for _, size, _ in expected.values())
    assert len(dets) == len(IMAGES)
    for det, (name, (s, _, objects)) in zip(dets, expected.items()):
        assert det.labels.tolist() == [2] * len(objects), name
        assert (det.scores > 0.9999).all(), name
        _check_boxes(det.boxes.tolist(), objects, s, tol=1e-3)
    assert trace["preprocess"]["scales"] == pytest.approx([s for s, _, _ in expected.values()], rel=1e-12)
    assert trace["preprocess"]["original_sizes"] == [(h, w) for h, w, _ in IMAGES.values()]


def test_the_object_lies_in_the_network_input_where_its_mapped_box_says():
    cfg = _config()
    for name, (h, w, objects) in IMAGES.items():
        s = reference_scale(h, w, SCALE, MAX_SIZE)
        prepared = prep_image(image_to_tensor(_picture(h, w, objects)), SCALE, MAX_SIZE, cfg.PIXEL_MEANS,
                              cfg.PIXEL_STDS)
        assert tuple(prepared.tensor.shape[-2:]) == input_size(h, w, s), name
        red = prepared.tensor[0] * cfg.PIXEL_STDS[0] + cfg.PIXEL_MEANS[0]  # back to 0..255
        for obj in objects:
            x1, y1, x2, y2 = to_network(obj, s)
            # inside the mapped box (a pixel in from its edges) the object is bright; one pixel past it, dark
            inner = red[int(np.ceil(y1 + 1.5)):int(np.floor(y2 - 1.5)) + 1,
                        int(np.ceil(x1 + 1.5)):int(np.floor(x2 - 1.5)) + 1]
            assert inner.numel() > 0 and (inner > 127.5).all(), name
            cx, cy = int(round((x1 + x2) / 2)), int(round((y1 + y2) / 2))
            top, bottom = _bright_run(red[:, cx] > 127.5, cy)
            left, right = _bright_run(red[cy, :] > 127.5, cx)
            assert abs(top - y1) <= 1.5 and abs(bottom - y2) <= 1.5, name
            assert abs(left - x1) <= 1.5 and abs(right - x2) <= 1.5, name


def _bright_run(mask: torch.Tensor, at: int) -> tuple[int, int]:
    """First and last index of the run of True values of ``mask`` that holds ``at``."""
    assert bool(mask[at])
    lo, hi = at, at
    while lo > 0 and bool(mask[lo - 1]):
        lo -= 1
    while hi < len(mask) - 1 and bool(mask[hi + 1]):
        hi += 1
    return lo, hi


def test_detect_json_boxes_are_original_pixels(proposals, tmp_path, capsys):
    expected, _ = proposals
    cfg = _config()
    ckpt = tmp_path / "ckpt"
    save_checkpoint(ckpt, _controlled_model(cfg), cfg, CLASSES, iteration=0)
    files = []
    for name, (h, w, objects) in IMAGES.items():
        path = tmp_path / "images" / f"{name}.png"  # PNG: lossless, the object's pixels as drawn
        path.parent.mkdir(exist_ok=True)
        _picture(h, w, objects).save(path)
        files.append(path)
    out = tmp_path / "out"
    code = main(["detect", "--checkpoint", str(ckpt), *map(str, files), "--out", str(out), "--threshold", "0.5",
                 "--device", "cpu"])
    capsys.readouterr()
    assert code == 0
    for name, (h, w, objects) in IMAGES.items():
        doc = json.loads((out / f"{name}.json").read_text())
        assert (doc["width"], doc["height"]) == (w, h)
        assert [d["class"] for d in doc["detections"]] == ["two"] * len(objects)
        s = expected[name][0]
        _check_boxes([d["box"] for d in doc["detections"]], [list(map(float, o)) for o in objects], s, tol=0.006)
