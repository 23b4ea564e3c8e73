"""VOC AP: known answers from running the reference ``voc_eval.py``, and each matching rule on its own."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from frcnn.engine.voc_eval import _overlaps, eval_class, evaluate_voc, voc_ap


def zb(*box: float) -> list[float]:
    """A 1-based XML box as the 0-based box the evaluator takes."""
    return [v - 1 for v in box]


PERSON_GTS = {
    "img1": (torch.tensor([zb(1, 1, 10, 10), zb(21, 21, 30, 30)]), torch.tensor([False, True])),
    "img2": (torch.tensor([zb(5, 5, 14, 14), zb(30, 30, 39, 39)]), torch.tensor([False, False])),
}
PERSON_DETS = (
    ["img1", "img2", "img1", "img2", "img1"],
    torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
    torch.tensor([zb(1, 1, 10, 10), zb(50, 50, 60, 60), zb(21, 21, 30, 30), zb(5, 5, 14, 14), zb(1, 1, 10, 10)]),
)
CAR_GTS = {"img1": (np.array([zb(1, 1, 20, 20)]), np.array([False])), "img2": (np.zeros((0, 4)), np.zeros(0, bool))}
CAR_DETS = (["img1"], np.array([0.99]), np.array([zb(1, 1, 20, 40)]))


def test_iou_plus_one_convention():
    assert _overlaps(np.array([0.0, 0, 9, 9]), np.array([[5.0, 0, 14, 9]]))[0] == pytest.approx(1 / 3)
    assert _overlaps(np.array([0.0, 0, 4, 9]), np.array([[0.0, 0, 9, 9]]))[0] == 0.5
    assert _overlaps(np.array([0.0, 0, 4, 4]), np.array([[5.0, 5, 9, 9]]))[0] == 0.0


def test_reference_known_answer_person_11_point():
    res = eval_class(PERSON_DETS, PERSON_GTS, use_07_metric=True)
    assert res["npos"] == 3  # the difficult gt is not counted
    assert res["ap"] == pytest.approx(0.545455, abs=1e-6)
    # score order: TP, FP (no overlap), ignored (difficult), TP, FP (duplicate of img1's person)
    assert res["tp"].tolist() == [1, 0, 0, 1, 0]
    assert res["fp"].tolist() == [0, 1, 0, 0, 1]
    np.testing.assert_allclose(res["rec"], [1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(res["prec"], [1, 1 / 2, 1 / 2, 2 / 3, 1 / 2])


def test_reference_known_answer_person_area():
    assert eval_class(PERSON_DETS, PERSON_GTS, use_07_metric=False)["ap"] == pytest.approx(0.555556, abs=1e-6)


def test_iou_exactly_at_threshold_is_not_a_match():
    res = eval_class(CAR_DETS, CAR_GTS)
    assert res["ap"] == 0.0 and res["fp"].tolist() == [1] and res["npos"] == 1
    # just above the threshold it matches
    assert eval_class((["img1"], [0.9], [zb(1, 1, 20, 39)]), CAR_GTS)["ap"] == pytest.approx(1.0)


def test_input_order_does_not_matter_and_ties_are_stable():
    perm = [3, 0, 4, 2, 1]
    ids, scores, boxes = PERSON_DETS
    shuffled = ([ids[i] for i in perm], scores[perm], boxes[perm])
    assert eval_class(shuffled, PERSON_GTS)["ap"] == pytest.approx(0.545455, abs=1e-6)
    # two tied detections on one object: the first listed is the TP, the second the duplicate
    gts = {"a": ([[0, 0, 9, 9]], [False])}
    res = eval_class((["a", "a", "a"], [0.5, 0.5, 0.5], [[0, 0, 9, 9], [0, 0, 9, 8], [50, 50, 60, 60]]), gts)
    assert res["tp"].tolist() == [1, 0, 0] and res["fp"].tolist() == [0, 1, 1]


def test_best_overlap_decides_even_if_that_gt_is_taken():
    # the reference matches each detection to its best-overlapping gt only; if taken, it is a FP
    gts = {"a": ([[0, 0, 9, 9], [0, 0, 9, 12]], [False, False])}
    res = eval_class((["a", "a"], [0.9, 0.8], [[0, 0, 9, 9], [0, 0, 9, 9]]), gts)
    assert res["tp"].tolist() == [1, 0] and res["fp"].tolist() == [0, 1]


def test_detections_in_images_without_gt_are_false_positives():
    res = eval_class((["elsewhere", "a"], [0.9, 0.8], [[0, 0, 9, 9], [0, 0, 9, 9]]), {"a": ([[0, 0, 9, 9]], [False])})
    assert res["fp"].tolist() == [1, 0] and res["tp"].tolist() == [0, 1]
    assert res["ap"] == pytest.approx(0.5)  # precision 1/2 at every recall threshold


def test_perfect_and_empty_detections():
    gts = {"a": ([[0, 0, 9, 9]], [False]), "b": ([[3, 3, 20, 20]], [False])}
    perfect = (["a", "b"], [0.9, 0.1], [[0, 0, 9, 9], [3, 3, 20, 20]])
    assert eval_class(perfect, gts, use_07_metric=True)["ap"] == pytest.approx(1.0)
    assert eval_class(perfect, gts, use_07_metric=False)["ap"] == pytest.approx(1.0)
    assert eval_class(([], [], np.zeros((0, 4))), gts)["ap"] == 0.0
    assert eval_class(([], torch.zeros(0), torch.zeros(0, 4)), gts, use_07_metric=False)["ap"] == 0.0


def test_class_without_gt_has_nan_ap():
    res = eval_class((["a"], [0.9], [[0, 0, 9, 9]]), {"a": ([[0, 0, 9, 9]], [True])})
    assert res["npos"] == 0 and math.isnan(res["ap"])


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        eval_class((["a", "b"], [0.9], [[0, 0, 9, 9]]), {})


def test_voc_ap_matches_hand_computation():
    rec, prec = np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # the reference's float thresholds: recall exactly 0.3 does not reach t = np.arange(...)[3] = 0.30000000000000004
    assert voc_ap(np.array([0.3]), np.array([1.0]), use_07_metric=True) == pytest.approx(3 / 11)


def test_evaluate_voc_means_over_classes_with_gt():
    dets = {"person": PERSON_DETS, "car": CAR_DETS}
    gts = {"person": PERSON_GTS, "car": CAR_GTS}
    res = evaluate_voc(dets, gts, ["person", "car", "bike"], use_07_metric=True)
    assert res["metric"] == "voc07"
    assert res["per_class"]["person"] == pytest.approx(0.545455, abs=1e-6)
    assert res["per_class"]["car"] == 0.0 and res["per_class"]["bike"] is None
    assert res["npos"] == {"person": 3, "car": 1, "bike": 0}
    assert res["map"] == pytest.approx(0.545455 / 2, abs=1e-6)
    area = evaluate_voc(dets, gts, ["person", "car"], use_07_metric=False)
    assert area["metric"] == "voc2010" and area["map"] == pytest.approx(0.555556 / 2, abs=1e-6)
    assert evaluate_voc({}, {}, ["x"])["map"] == 0.0


def _reference_voc_eval(class_recs: dict, image_ids: list, confidence: np.ndarray, BB: np.ndarray,  # noqa: N803
                        npos: int, ovthresh: float, use_07_metric: bool) -> float:
    """The detection loop of py-faster-rcnn's ``voc_eval`` (lib/datasets/voc_eval.py), kept as written there."""
    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]  # noqa: N806
    image_ids = [image_ids[x] for x in sorted_ind]
    for d in range(nd):
        R = class_recs[image_ids[d]]  # noqa: N806
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)  # noqa: N806
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1., 0.)
            ih = np.maximum(iymax - iymin + 1., 0.)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.) * (bb[3] - bb[1] + 1.) +
                   (BBGT[:, 2] - BBGT[:, 0] + 1.) * (BBGT[:, 3] - BBGT[:, 1] + 1.) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.
        else:
            fp[d] = 1.
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(rec, prec, use_07_metric)


@pytest.mark.parametrize("seed", range(5))
def test_random_scenes_agree_with_the_reference_loop(seed):
    rng = np.random.default_rng(seed)
    gts, class_recs, npos = {}, {}, 0
    for i in range(8):
        m = int(rng.integers(0, 5))
        xy = rng.uniform(0, 80, (m, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (m, 2))], axis=1).round()
        difficult = rng.random(m) < 0.2
        gts[f"im{i}"] = (boxes, difficult)
        class_recs[f"im{i}"] = {"bbox": boxes, "difficult": difficult, "det": [False] * m}
        npos += int((~difficult).sum())
    # detections: jittered copies of gts (some twice) plus random boxes; distinct scores so both sorts agree
    ids, boxes = [], []
    for image_id, (g, _) in gts.items():
        for box in np.concatenate([g, g[: len(g) // 2]]):
            ids.append(image_id)
            boxes.append(box + rng.normal(0, 3, 4))
        for _ in range(2):
            ids.append(image_id)
            xy = rng.uniform(0, 80, 2)
            boxes.append(np.concatenate([xy, xy + rng.uniform(5, 40, 2)]))
    scores = rng.permutation(len(ids)) / len(ids) + 0.001
    dets = (ids, scores, np.array(boxes))
    for use_07 in (True, False):
        recs = {k: {**v, "det": list(v["det"])} for k, v in class_recs.items()}
        expected = _reference_voc_eval(recs, list(ids), scores, np.array(boxes), npos, 0.5, use_07)
        assert eval_class(dets, gts, 0.5, use_07)["ap"] == pytest.approx(expected, rel=0, abs=1e-12)
