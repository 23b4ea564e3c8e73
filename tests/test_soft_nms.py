"""Gaussian soft-NMS (frcnn.ops.soft_nms) against hand-computed scores and against an independent transcription of
Algorithm 1 of Bodla et al. (ICCV 2017), and the detector's TEST.NMS_METHOD switch."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou

from frcnn.boxes import to_exclusive
from frcnn.config import load_config
from frcnn.errors import ConfigError
from frcnn.model.detector import FasterRCNN
from frcnn.model.trace import Trace
from frcnn.ops import soft_nms as soft_nms_module
from frcnn.ops.soft_nms import soft_nms
from frcnn.transforms import batch_images


def _paper(boxes: list[list[float]], scores: list[float], sigma: float, thresh: float) -> list[tuple[int, float]]:
    """Algorithm 1 of the paper for one class, written from its pseudo-code with Python floats: while boxes
    remain, take the best, rescore the rest by exp(-iou^2 / sigma), drop those at or under ``thresh``.
    IoU in the +1 pixel convention. Returns (index, score) in the order taken."""
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
        inter = iw * ih
        area = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
        return inter / (area - inter)

    rest = {i: s for i, s in enumerate(scores) if s > thresh}
    out = []
    while rest:
        m = max(rest, key=lambda i: (rest[i], -i))  # the best; a tie to the lower index
        out.append((m, rest.pop(m)))
        for i in list(rest):
            rest[i] *= math.exp(-iou(boxes[m], boxes[i]) ** 2 / sigma)
            if rest[i] <= thresh:
                del rest[i]
    return out


def test_hand_computed_scores_and_order():
    # class 0: A, then B half inside A (IoU 50/100 = 0.5), C far away; class 1: A's box again
    boxes = torch.tensor([[[0.0, 0, 9, 9], [0, 0, 9, 9]],
                          [[0.0, 0, 9, 4], [50, 50, 59, 59]],
                          [[40.0, 40, 49, 49], [60, 60, 69, 69]]])
    scores = torch.tensor([[0.9, 0.6], [0.8, 0.0], [0.7, 0.0]])
    rows, classes, kept = soft_nms(boxes, scores, sigma=0.5, score_thresh=0.0, max_keep=10)
    assert rows.tolist() == [0, 2, 0, 1]
    assert classes.tolist() == [0, 0, 1, 0]  # A's twin in class 1 keeps its 0.6: classes never interact
    torch.testing.assert_close(kept, torch.tensor([0.9, 0.7, 0.6, 0.8 * math.exp(-0.25 / 0.5)]))
    assert kept[3].item() == pytest.approx(0.48522, abs=1e-5)
    # at most max_keep, the best first; a threshold above B's decayed score drops B
    assert soft_nms(boxes, scores, 0.5, 0.0, 2)[0].tolist() == [0, 2]
    assert soft_nms(boxes, scores, 0.5, 0.5, 10)[0].tolist() == [0, 2, 0]


@pytest.mark.parametrize("precompute", [True, False])
def test_matches_the_papers_algorithm_on_random_boxes(precompute, monkeypatch):
    if not precompute:  # the decay rows computed for each kept box instead of all at once
        monkeypatch.setattr(soft_nms_module, "PRECOMPUTE_LIMIT", 0)
    g = torch.Generator().manual_seed(0)
    r, k = 40, 3
    xy = torch.rand(r, k, 2, generator=g) * 60
    wh = torch.rand(r, k, 2, generator=g) * 30 + 2
    boxes = torch.cat((xy, xy + wh), -1).round()  # integer pixels: many overlaps, some identical boxes
    scores = torch.rand(r, k, generator=g)
    for sigma, thresh in ((0.5, 0.0), (0.3, 0.05), (2.0, 0.2)):
        rows, classes, kept = soft_nms(boxes, scores, sigma, thresh, max_keep=r * k)
        expected = []
        for c in range(k):
            expected += [(c, i, s) for i, s in _paper(boxes[:, c].tolist(), scores[:, c].tolist(), sigma, thresh)]
        assert len(rows) == len(expected)
        # every class keeps its own boxes in the paper's order, with its scores
        for c in range(k):
            mine = [(int(i), float(s)) for i, cc, s in zip(rows, classes, kept) if cc == c]
            theirs = [(i, s) for cc, i, s in expected if cc == c]
            assert [i for i, _ in mine] == [i for i, _ in theirs]
            assert [s for _, s in mine] == pytest.approx([s for _, s in theirs], rel=1e-5)
        assert torch.equal(kept, kept.sort(descending=True).values)  # over all classes: best first


def test_empty_and_all_under_the_threshold():
    boxes = torch.zeros(5, 2, 4)
    for scores in (torch.zeros(5, 2), torch.full((5, 2), 0.1)):
        rows, classes, kept = soft_nms(boxes, scores, 0.5, 0.1, 100)
        assert rows.numel() == classes.numel() == kept.numel() == 0
    rows, _, kept = soft_nms(torch.zeros(0, 2, 4), torch.zeros(0, 2), 0.5, 0.0, 100)
    assert rows.numel() == kept.numel() == 0


def test_input_scores_are_not_changed():
    boxes = torch.tensor([[[0.0, 0, 9, 9]], [[0.0, 0, 9, 8]]])
    scores = torch.tensor([[0.9], [0.8]])  # K = 1: the transpose is contiguous, a view would write through
    soft_nms(boxes, scores, 0.5, 0.0, 10)
    assert torch.equal(scores, torch.tensor([[0.9], [0.8]]))


def test_config_refuses_unknown_method_and_non_positive_sigma():
    with pytest.raises(ConfigError, match=r"TEST.NMS_METHOD='linear' is not one of hard, soft"):
        load_config("demo-cpu", ["TEST.NMS_METHOD=linear"])
    with pytest.raises(ConfigError, match=r"TEST.SOFT_NMS_SIGMA=0.0 must be positive"):
        load_config("demo-cpu", ["TEST.SOFT_NMS_SIGMA=0"])


@torch.no_grad()
def test_detector_soft_path_is_soft_nms_of_the_decoded_boxes():
    """The detector with NMS_METHOD soft returns soft_nms of the class boxes and probabilities it decoded
    (read from its trace); boxes of one class may then overlap by more than TEST.NMS, which hard never keeps."""
    torch.manual_seed(0)
    cfg = load_config("demo-cpu", ["DEVICE=cpu", "FEAT_STRIDE=16", "ANCHOR_SCALES=[2,4,8]", "TEST.NMS_METHOD=soft",
                                   "TEST.MAX_PER_IMAGE=1000"])
    model = FasterRCNN(cfg, num_classes=3).eval()
    images, sizes = batch_images([torch.randn(3, 160, 224, generator=torch.Generator().manual_seed(1))])
    trace = Trace()
    det = model(images, sizes, trace=trace)[0]
    rec = trace["classification"]
    boxes = rec["boxes"].view(-1, 4, 4)[:, 1:].clamp(min=0)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(max=223)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(max=159)
    rows, classes, kept = soft_nms(boxes, rec["cls_prob"][:, 1:], 0.5, 0.0, 1000)
    assert det.scores.numel() == boxes.shape[0] * 3  # decayed, never to 0: every RoI's box of every class
    torch.testing.assert_close(det.scores, kept)
    torch.testing.assert_close(det.boxes, boxes[rows, classes])
    assert torch.equal(det.labels, classes + 1)
    model.cfg = load_config("demo-cpu", ["DEVICE=cpu", "FEAT_STRIDE=16", "ANCHOR_SCALES=[2,4,8]",
                                         "TEST.MAX_PER_IMAGE=1000"])
    hard = model(images, sizes)[0]
    assert _most_overlap(det) > 0.3 >= _most_overlap(hard)


def _most_overlap(det) -> float:
    """The largest IoU between two detections of the same class."""
    same = det.labels[:, None] == det.labels[None]
    iou = box_iou(to_exclusive(det.boxes), to_exclusive(det.boxes))
    return float(iou[same & ~torch.eye(len(same), dtype=torch.bool)].max())
