"""The whole detector (frcnn.model.detector) on the 'tiny' backbone: losses, batches, detections, trace."""

from __future__ import annotations

import math

import pytest
import torch

from frcnn.config import load_config
from frcnn.model.anchors import generate_anchors, shift_anchors
from frcnn.model.detector import FasterRCNN
from frcnn.model.trace import Trace
from frcnn.transforms import batch_images

K = 3
SIZES = [(160, 224), (128, 96)]  # (h, w): two different sizes
GTS = [torch.tensor([[20.0, 30, 99, 119], [120.0, 10, 200, 70]]), torch.tensor([[10.0, 40, 60, 100]])]
LABELS = [torch.tensor([1, 3]), torch.tensor([2])]


def _cfg(*overrides: str):
    # stride 16 and 9 anchors, as the write-up: the feature sizes and anchor counts below are worked out for them
    return load_config("demo-cpu", ["DEVICE=cpu", "FEAT_STRIDE=16", "ANCHOR_SCALES=[2,4,8]", *overrides])


def _model(*overrides: str) -> FasterRCNN:
    torch.manual_seed(0)
    return FasterRCNN(_cfg(*overrides), num_classes=K)


def _batch(n: int = 2):
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, h, w, generator=g) for h, w in SIZES[:n]]
    return batch_images(images)


def _train_forward(model, n=2, seed=0, trace=None):
    model.train()
    images, sizes = _batch(n)
    return model(images, sizes, GTS[:n], LABELS[:n], torch.Generator().manual_seed(seed), trace)


def test_train_losses_finite_with_the_four_keys_and_backprop():
    model = _model()
    losses = _train_forward(model, n=1)
    assert set(losses) == {"rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box"}
    for name, value in losses.items():
        assert value.dim() == 0 and math.isfinite(value.item()), name
    assert losses["rpn_cls"].item() == pytest.approx(math.log(2), abs=0.05)  # untrained: ~uniform over 2
    assert losses["rcnn_cls"].item() == pytest.approx(math.log(K + 1), abs=0.2)
    sum(losses.values()).backward()
    for module in (model.head, model.rpn, model.classifier):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_train_batch_of_two_sizes_and_reproducible():
    model = _model()
    trace = Trace()
    a = _train_forward(model, n=2, seed=3, trace=trace)
    b = _train_forward(model, n=2, seed=3)
    for key in a:
        assert math.isfinite(a[key].item())
        torch.testing.assert_close(a[key], b[key])
    cfg = model.cfg.TRAIN
    labels = trace["anchor_target"]["labels"]
    assert labels.shape[0] == 2
    inside = trace["anchor_target"]["inside"]
    assert int(inside[0].sum()) > cfg.RPN_BATCHSIZE > int(inside[1].sum())
    assert int((labels[0] >= 0).sum()) == cfg.RPN_BATCHSIZE  # fg + bg when enough anchors exist
    rec = trace["anchor_target"]
    candidates = inside[1] & (rec["type_a"][1] | rec["type_b"][1] | (rec["max_overlaps"][1] < 0.3))
    assert int((labels[1] >= 0).sum()) == int(candidates.sum())  # the small image: every candidate is used
    for i in range(2):
        assert int((labels[i] == 1).sum()) > 0
        assert int((labels[i] == 1).sum()) <= cfg.RPN_FG_FRACTION * cfg.RPN_BATCHSIZE
        assert (labels[i, ~inside[i]] == -1).all()
    pt = trace["proposal_target"]
    assert pt["rois"].shape[0] == 2 * cfg.BATCH_SIZE  # BATCH_SIZE RoIs per image
    assert int((pt["rois"][:, 0] == 1).sum()) == cfg.BATCH_SIZE
    assert (pt["labels"] >= 0).all() and (pt["labels"] <= K).all()
    assert torch.equal(trace["roi_pooling"]["rois"], pt["rois"])  # training pools the sampled RoIs
    assert trace["proposal_layer"]["post_nms_top_n"] == cfg.RPN_POST_NMS_TOP_N


def test_training_without_gt_raises():
    model = _model()
    images, sizes = _batch(1)
    with pytest.raises(ValueError, match="gt_boxes"):
        model(images, sizes)


@torch.no_grad()
def test_eval_detections_capped_labelled_and_inside_each_image():
    model = _model("TEST.MAX_PER_IMAGE=7")
    model.eval()
    model.classifier.bbox_pred_net.bias[2::4] = 5.0  # every refined box 2.7x wider and taller than its RoI:
    model.classifier.bbox_pred_net.bias[3::4] = 5.0  # only clipping keeps it inside the image
    images, sizes = _batch(2)
    dets = model(images, sizes)
    assert len(dets) == 2
    for d, (h, w) in zip(dets, SIZES):
        assert 0 < d.boxes.shape[0] <= 7  # an untrained net scores everything above SCORE_THRESH 0
        assert d.boxes.shape == (d.scores.shape[0], 4) and d.labels.shape == d.scores.shape
        assert ((d.labels >= 1) & (d.labels <= K)).all()
        assert (d.boxes[:, 0::2] >= 0).all() and (d.boxes[:, 2] <= w - 1).all()
        assert (d.boxes[:, 1::2] >= 0).all() and (d.boxes[:, 3] <= h - 1).all()
        assert (d.boxes[:, 2] == w - 1).any() and (d.boxes[:, 3] == h - 1).any()  # clipped to its own size
        assert torch.equal(d.scores, d.scores.sort(descending=True).values)


@torch.no_grad()
def test_eval_trace_stage_counts():
    model = _model()
    model.eval()
    images, sizes = _batch(2)
    trace = Trace()
    dets = model(images, sizes, trace=trace)
    test = model.cfg.TEST
    for stage in ("head", "anchors", "rpn", "proposal_layer", "roi_pooling", "classification", "detections"):
        assert stage in trace, stage
        assert stage in trace.timings, stage
    assert "anchor_target" not in trace and "proposal_target" not in trace
    fh, fw = trace["anchors"]["feat_size"]
    assert (fh, fw) == (10, 14)  # 160x224 padded batch at stride 16
    expected = shift_anchors(generate_anchors(16, model.cfg.ANCHOR_RATIOS, model.cfg.ANCHOR_SCALES), fh, fw, 16)
    assert torch.equal(trace["anchors"]["anchors"], expected)
    assert trace["rpn"]["fg_scores"].shape == (2, fh * fw * 9)
    rois = trace["proposal_layer"]["rois"]
    for i, (h, w) in enumerate(SIZES):
        sel = rois[:, 0] == i
        assert 0 < int(sel.sum()) <= test.RPN_POST_NMS_TOP_N
        assert (rois[sel, 3] <= w - 1).all() and (rois[sel, 4] <= h - 1).all()
    assert trace["proposal_layer"]["pre_nms_boxes"].shape[1] == min(test.RPN_PRE_NMS_TOP_N, fh * fw * 9)
    assert torch.equal(trace["roi_pooling"]["rois"], rois)  # inference pools every proposal
    assert trace["roi_pooling"]["crops"].shape == (rois.shape[0], 128, 7, 7)
    assert trace["classification"]["cls_prob"].shape == (rois.shape[0], K + 1)
    final = trace["detections"]["final"]
    assert [f["boxes"].shape[0] for f in final] == [d.boxes.shape[0] for d in dets]


def test_without_trace_nothing_is_recorded(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a Trace method was called without a trace")

    monkeypatch.setattr(Trace, "put", refuse)
    monkeypatch.setattr(Trace, "timed", refuse)
    model = _model()
    losses = _train_forward(model, n=2, trace=None)
    assert set(losses) == {"rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box"}
    model.eval()
    images, sizes = _batch(2)
    with torch.no_grad():
        dets = model(images, sizes, trace=None)
    assert len(dets) == 2


@pytest.mark.parametrize("mode", ["crop", "pool"])
def test_other_pooling_modes_train(mode):
    model = _model(f"POOLING_MODE={mode}")
    losses = _train_forward(model, n=1)
    assert all(math.isfinite(v.item()) for v in losses.values())


@torch.no_grad()
def test_detections_use_their_own_class_scores_and_boxes():
    model = _model("TEST.SCORE_THRESH=0.5")
    model.eval()
    cls, box = model.classifier.cls_score_net, model.classifier.bbox_pred_net
    cls.weight.zero_()
    cls.bias.copy_(torch.tensor([0.0, 0.0, 10.0, 0.0]))  # class 2 wins everywhere
    box.weight.zero_()
    box.bias.zero_()
    box.bias[8:12] = torch.tensor([1.0, -1.0, -2.0, -2.0])  # class 2 moves and shrinks its boxes; others stay
    images, sizes = _batch(1)
    trace = Trace()
    det = model(images, sizes, trace=trace)[0]
    assert det.labels.numel() > 0 and (det.labels == 2).all() and (det.scores > 0.99).all()
    rois = trace["proposal_layer"]["rois"][:, 1:]
    expected = _refine(rois, [1.0 * 0.1, -1.0 * 0.1, -2.0 * 0.2, -2.0 * 0.2], *SIZES[0])  # deltas x the stds
    dist = (det.boxes[:, None] - expected[None]).abs().amax(-1).min(1).values
    assert (dist < 1e-3).all()  # every detection is a class-2 refinement of a proposal
    assert not torch.equal(expected, _refine(rois, [0.0, 0.0, 0.0, 0.0], *SIZES[0]))


def _refine(rois: torch.Tensor, deltas: list[float], h: int, w: int) -> torch.Tensor:
    """The box regression written out (+1 convention, frcnn's exact inverse of the target coding), then clipped
    to the image: centre moves by ``dx * width``, size scales by ``exp(dw)``."""
    dx, dy, dw, dh = deltas
    out = []
    for x1, y1, x2, y2 in rois.double().tolist():
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        cx, cy = x1 + 0.5 * bw + dx * bw, y1 + 0.5 * bh + dy * bh
        nw, nh = math.exp(dw) * bw, math.exp(dh) * bh
        box = [cx - 0.5 * nw, cy - 0.5 * nh, cx + 0.5 * nw - 1, cy + 0.5 * nh - 1]
        out.append([min(max(v, 0.0), lim) for v, lim in zip(box, (w - 1, h - 1, w - 1, h - 1))])
    return torch.tensor(out, dtype=torch.float32)


# ------------------------------------------------------------------- the end of the detector: per-class NMS
# Hand-built RoIs, logits and deltas whose detections are known: ``detect`` alone, with K = 3 classes.

def _detect(rois: list[list[float]], logits: list[list[float]], sizes: list[tuple[int, int]], *overrides: str,
            deltas: torch.Tensor | None = None):
    model = _model("TEST.SCORE_THRESH=0.05", "TEST.NMS=0.3", *overrides)
    rois_t = torch.tensor(rois, dtype=torch.float32)
    bbox_pred = torch.zeros(len(rois), 4 * (K + 1)) if deltas is None else deltas
    return model.detect(rois_t, torch.tensor(logits), bbox_pred, torch.tensor(sizes))


def _probs(logits: list[float]) -> list[float]:
    e = [math.exp(v) for v in logits]
    return [v / sum(e) for v in e]


def _as_rows(det) -> list[tuple[int, list[float], float]]:
    return [(int(label), box, float(score))
            for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist())]


HI, LO = 6.0, -6.0  # a class that wins (p > 0.99) and one far below SCORE_THRESH 0.05


def test_per_class_nms_suppresses_same_class_overlaps_and_keeps_other_classes():
    # boxes 100 x 10 px shifted right by s: IoU (+1 convention) = (100 - s) / (100 + s)
    a = [0.0, 0.0, 0.0, 99.0, 9.0]
    shifted = lambda s, img=0: [float(img), s, 0.0, 99.0 + s, 9.0]  # noqa: E731
    rois = [a,
            shifted(53.0),          # IoU 47/153 = 0.307 > 0.3 with a, class 1: suppressed
            shifted(54.0),          # IoU 46/154 = 0.299 <= 0.3 with a, class 1: kept
            shifted(10.0),          # IoU 90/110 with a, but class 2: kept
            [0.0, 0.0, 20.0, 99.0, 29.0],   # no overlap, class 1 and class 3 both above the threshold: both kept
            [0.0, 0.0, 40.0, 60.0, 49.0],   # every class below SCORE_THRESH: nothing
            [1.0, 0.0, 0.0, 99.0, 9.0]]     # the same box as a but in image 1: NMS is per image
    logits = [[0.0, HI, LO, LO],
              [0.0, HI - 0.5, LO, LO],
              [0.0, HI - 1.0, LO, LO],
              [0.0, LO, HI - 2.0, LO],
              [0.0, 2.0, LO, 1.5],
              [4.0, LO, LO, LO],
              [0.0, HI - 3.0, LO, LO]]
    dets = _detect(rois, logits, [(40, 200), (40, 200)])
    p = [_probs(v) for v in logits]
    expected0 = sorted([(1, a[1:], p[0][1]), (1, shifted(54.0)[1:], p[2][1]), (2, shifted(10.0)[1:], p[3][2]),
                        (1, rois[4][1:], p[4][1]), (3, rois[4][1:], p[4][3])], key=lambda r: -r[2])
    assert len(dets) == 2
    got0 = _as_rows(dets[0])
    assert [(lbl, box) for lbl, box, _ in got0] == [(lbl, box) for lbl, box, _ in expected0]
    assert [s for *_, s in got0] == pytest.approx([s for *_, s in expected0], abs=1e-6)
    got1 = _as_rows(dets[1])
    assert [(lbl, box) for lbl, box, _ in got1] == [(1, a[1:])]
    assert got1[0][2] == pytest.approx(p[6][1], abs=1e-6)


def test_nms_threshold_comes_from_test_nms():
    rois = [[0.0, 0.0, 0.0, 99.0, 9.0], [0.0, 53.0, 0.0, 152.0, 9.0]]  # IoU 0.307
    logits = [[0.0, HI, LO, LO], [0.0, HI - 1, LO, LO]]
    assert len(_detect(rois, logits, [(40, 200)])[0].boxes) == 1  # TEST.NMS 0.3
    assert len(_detect(rois, logits, [(40, 200)], "TEST.NMS=0.31")[0].boxes) == 2


def test_score_thresh_is_strict_and_per_class():
    # class probabilities exactly known: logits (0, log 2, log 1, log 1) give (0.2, 0.4, 0.2, 0.2)
    rois = [[0.0, 0.0, 0.0, 9.0, 9.0]]
    logits = [[0.0, math.log(2.0), 0.0, 0.0]]
    labels = lambda *o: sorted(_detect(rois, logits, [(20, 20)], *o)[0].labels.tolist())  # noqa: E731
    assert labels("TEST.SCORE_THRESH=0.1") == [1, 2, 3]
    assert labels("TEST.SCORE_THRESH=0.3") == [1]
    assert labels("TEST.SCORE_THRESH=0.5") == []


def test_max_per_image_keeps_the_best_scores_over_all_classes():
    # 8 disjoint boxes, alternating classes 1 and 2, decreasing scores; the cap counts detections of all classes
    rois, logits = [], []
    for j in range(8):
        rois.append([0.0, 20.0 * j, 0.0, 20.0 * j + 9, 9.0])
        logits.append([0.0, HI - 0.3 * j, LO, LO] if j % 2 == 0 else [0.0, LO, HI - 0.3 * j, LO])
    det = _detect(rois, logits, [(20, 200)], "TEST.MAX_PER_IMAGE=5")[0]
    assert [b[0] for b in det.boxes.tolist()] == [0.0, 20.0, 40.0, 60.0, 80.0]
    assert det.labels.tolist() == [1, 2, 1, 2, 1]
    full = _detect(rois, logits, [(20, 200)], "TEST.MAX_PER_IMAGE=100")[0]
    assert len(full.boxes) == 8


def test_class_specific_deltas_then_clipping_to_the_image():
    # one RoI scored for classes 1 and 2; class 2's deltas move it right by half its width and double its height
    rois = [[0.0, 10.0, 10.0, 29.0, 19.0]]  # w 20, h 10, centre (20, 15)
    logits = [[0.0, 1.0, 1.0, LO]]
    stds = (0.1, 0.1, 0.2, 0.2)
    deltas = torch.zeros(1, 4 * (K + 1))
    deltas[0, 8:12] = torch.tensor([0.5 / stds[0], 0.0, 0.0, math.log(2.0) / stds[3]])  # normalised targets
    det = _detect(rois, logits, [(24, 36)], deltas=deltas)[0]
    rows = {lbl: box for lbl, box, _ in _as_rows(det)}
    assert rows[1] == pytest.approx([10.0, 10.0, 29.0, 19.0])  # zero deltas: the RoI itself
    # class 2: centre x 30, w 20 -> x 20..39 clipped to 35; h 20 around 15 -> y 5..24 clipped to 23
    assert rows[2] == pytest.approx([20.0, 5.0, 35.0, 23.0], abs=1e-4)


@pytest.mark.parametrize(("rpn_sigma", "rcnn_sigma"), [(3.0, 1.0), (1.0, 3.0)])
def test_box_losses_use_the_configured_sigmas(monkeypatch, rpn_sigma, rcnn_sigma):
    """TRAIN.RPN_SIGMA / RCNN_SIGMA reach the two box losses: each equals torch's smooth L1 with beta 1/sigma^2
    over the foreground boxes the layer was given (the reference's 3 and 1 by default)."""
    import torch.nn.functional as F

    import frcnn.model.detector as detector

    seen = {}

    def spy(name, fn):
        def wrapped(*args):
            seen[name] = args
            return fn(*args)
        return wrapped

    monkeypatch.setattr(detector, "rpn_loss", spy("rpn", detector.rpn_loss))
    monkeypatch.setattr(detector, "fast_rcnn_loss", spy("rcnn", detector.fast_rcnn_loss))
    model = _model(f"TRAIN.RPN_SIGMA={rpn_sigma}", f"TRAIN.RCNN_SIGMA={rcnn_sigma}")
    losses = _train_forward(model, n=1)
    _, deltas, labels, targets, sigma = seen["rpn"]
    assert sigma == rpn_sigma
    fg = labels[0] == 1
    expected = F.smooth_l1_loss(deltas[0, fg].float(), targets[0, fg], beta=1 / rpn_sigma**2, reduction="sum")
    torch.testing.assert_close(losses["rpn_box"], expected / (labels[0] >= 0).sum())
    _, bbox_pred, roi_labels, roi_targets, sigma, _ = seen["rcnn"]
    assert sigma == rcnn_sigma
    fg = (roi_labels > 0).nonzero()[:, 0]
    pred = bbox_pred.float().view(len(roi_labels), -1, 4)[fg, roi_labels[fg]]
    expected = F.smooth_l1_loss(pred, roi_targets[fg].float(), beta=1 / rcnn_sigma**2, reduction="sum")
    torch.testing.assert_close(losses["rcnn_box"], expected / len(roi_labels))
