"""VOC AP: known answers from running the reference ``voc_eval.py``, each matching rule on its own, and
agreement with the reference's own code (``voc_ap``, ``voc_eval`` and ``parse_rec`` of py-faster-rcnn's
lib/datasets/voc_eval.py, transcribed below) on random scenes and on files read by ``frcnn eval``."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET  # noqa: N817 - the reference's own name

import numpy as np
import pytest
import torch

from frcnn.cli import main
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
    return reference_voc_ap(rec, prec, use_07_metric)


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


# ------------------------------------------------------------------------------ the reference, transcribed
# py-faster-rcnn lib/datasets/voc_eval.py (the same file in ruotianluo/pytorch-faster-rcnn), as written there
# but for: no annotation cache (the recs are parsed directly), ``bool`` for the removed ``np.bool``, and paths
# passed in rather than formatted. Nothing of frcnn is called from here.

def reference_parse_rec(filename):
    """ Parse a PASCAL VOC xml file """
    tree = ET.parse(filename)
    objects = []
    for obj in tree.findall('object'):
        obj_struct = {}
        obj_struct['name'] = obj.find('name').text
        obj_struct['pose'] = obj.find('pose').text
        obj_struct['truncated'] = int(obj.find('truncated').text)
        obj_struct['difficult'] = int(obj.find('difficult').text)
        bbox = obj.find('bndbox')
        obj_struct['bbox'] = [int(bbox.find('xmin').text),
                              int(bbox.find('ymin').text),
                              int(bbox.find('xmax').text),
                              int(bbox.find('ymax').text)]
        objects.append(obj_struct)
    return objects


def reference_voc_ap(rec, prec, use_07_metric=False):
    """ ap = voc_ap(rec, prec, [use_07_metric])
    Compute VOC AP given precision and recall.
    If use_07_metric is true, uses the
    VOC 07 11 point method (default:False).
    """
    if use_07_metric:
        # 11 point metric
        ap = 0.
        for t in np.arange(0., 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.
    else:
        # correct AP calculation
        # first append sentinel values at the end
        mrec = np.concatenate(([0.], rec, [1.]))
        mpre = np.concatenate(([0.], prec, [0.]))

        # compute the precision envelope
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])

        # to calculate area under PR curve, look for points
        # where X axis (recall) changes value
        i = np.where(mrec[1:] != mrec[:-1])[0]

        # and sum (\Delta recall) * prec
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def reference_voc_eval(detfile, annopath, imagesetfile, classname, ovthresh=0.5, use_07_metric=False,
                       use_diff=False):
    """ap = voc_eval(...): ``detfile`` one class's results file, ``annopath`` with ``{}`` for the image id,
    ``imagesetfile`` the split's list of image ids."""
    # read list of images
    with open(imagesetfile) as f:
        lines = f.readlines()
    imagenames = [x.strip() for x in lines]
    recs = {}
    for imagename in imagenames:
        recs[imagename] = reference_parse_rec(annopath.format(imagename))

    # extract gt objects for this class
    class_recs = {}
    npos = 0
    for imagename in imagenames:
        R = [obj for obj in recs[imagename] if obj['name'] == classname]  # noqa: N806
        bbox = np.array([x['bbox'] for x in R])
        if use_diff:
            difficult = np.array([False for x in R]).astype(bool)
        else:
            difficult = np.array([x['difficult'] for x in R]).astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {'bbox': bbox,
                                 'difficult': difficult,
                                 'det': det}

    # read dets
    with open(detfile) as f:
        lines = f.readlines()

    splitlines = [x.strip().split(' ') for x in lines]
    image_ids = [x[0] for x in splitlines]
    confidence = np.array([float(x[1]) for x in splitlines])
    BB = np.array([[float(z) for z in x[2:]] for x in splitlines])  # noqa: N806

    # the detection loop, with its sort, matching and precision/recall, as written there: see
    # _reference_voc_eval above (there it starts after the reference's ``if BB.shape[0] > 0``)
    return _reference_voc_eval(class_recs, image_ids, confidence, BB.reshape(-1, 4), npos, ovthresh,
                               use_07_metric)


def test_reference_transcription_gives_the_known_answers():
    # the known answers above (0.545455 / 0.555556) come from the reference: its transcription must give them too
    gts = {k: {"bbox": np.asarray(b.tolist()), "difficult": np.asarray(d.tolist()), "det": [False] * len(d)}
           for k, (b, d) in PERSON_GTS.items()}
    ids, scores, boxes = PERSON_DETS
    assert _reference_voc_eval(gts, ids, scores.numpy(), boxes.numpy(), 3, 0.5, True) == pytest.approx(
        0.545455, abs=1e-6)
    gts = {k: {**v, "det": [False] * len(v["det"])} for k, v in gts.items()}
    assert _reference_voc_eval(gts, ids, scores.numpy(), boxes.numpy(), 3, 0.5, False) == pytest.approx(
        0.555556, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_voc_ap_equals_the_reference_voc_ap(seed):
    rng = np.random.default_rng(seed)
    for _ in range(20):
        n = int(rng.integers(1, 30))
        tp = (rng.random(n) < 0.6).astype(float)
        npos = int(tp.sum() + rng.integers(0, 5)) or 1
        rec = np.cumsum(tp) / npos
        prec = np.cumsum(tp) / np.arange(1, n + 1)
        for use_07 in (True, False):
            assert voc_ap(rec, prec, use_07) == reference_voc_ap(rec, prec, use_07)


# ------------------------------------------------------------- frcnn eval against the reference on the same files

def _voc_root(tmp_path, seed: int):
    """A VOC root written by hand (XML text, JPEGs of the stated size), its comp4 results files (1-based, as
    py-faster-rcnn writes them, distinct scores so that both sorts agree) and the classes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = ("cat", "dog")
    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    ids = [f"{seed}{i:04d}" for i in range(10)]
    dets: dict[str, list[tuple[str, list[float]]]] = {c: [] for c in classes}
    for image_id in ids:
        w, h = int(rng.integers(60, 120)), int(rng.integers(50, 100))
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / "JPEGImages" / f"{image_id}.jpg")
        objects = []
        for _ in range(int(rng.integers(0, 5))):
            name = classes[int(rng.integers(0, 2))]
            x1, y1 = int(rng.integers(1, w - 20)), int(rng.integers(1, h - 20))
            x2, y2 = int(rng.integers(x1 + 8, w + 1)), int(rng.integers(y1 + 8, h + 1))  # 1-based, inside
            box = (x1, y1, x2, y2)
            if any(o[1] == box for o in objects):
                continue  # a duplicate box would be repaired (dropped) by frcnn, not by the reference
            objects.append((name, box, int(rng.random() < 0.2)))
            for _ in range(int(rng.integers(0, 3))):  # 0-2 detections near it, some of another class
                cls = name if rng.random() < 0.8 else classes[int(rng.integers(0, 2))]
                jit = rng.normal(0, 2.5, 4)
                d = [min(max(v + j, 1.0), lim) for v, j, lim in zip(box, jit, (w, h, w, h))]
                dets[cls].append((image_id, [round(v, 1) for v in d]))
        for _ in range(int(rng.integers(0, 3))):  # and some anywhere
            x1, y1 = rng.uniform(1, w - 10), rng.uniform(1, h - 10)
            d = [x1, y1, rng.uniform(x1 + 3, w), rng.uniform(y1 + 3, h)]
            dets[classes[int(rng.integers(0, 2))]].append((image_id, [round(v, 1) for v in d]))
        xml = [f"<annotation><folder>VOC</folder><filename>{image_id}.jpg</filename>",
               f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>0</segmented>"]
        for name, (x1, y1, x2, y2), difficult in objects:
            xml.append(f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
                       f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
                       f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")
        (root / "Annotations" / f"{image_id}.xml").write_text("".join(xml) + "</annotation>\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in ids))
    results = tmp_path / "results"
    results.mkdir()
    n = sum(len(v) for v in dets.values())
    scores = iter(rng.permutation(n) / n + 0.0005)
    for name in classes:
        (results / f"comp4_det_test_{name}.txt").write_text("".join(
            f"{image_id} {next(scores):.4f} {d[0]:.1f} {d[1]:.1f} {d[2]:.1f} {d[3]:.1f}\n"
            for image_id, d in dets[name]))
    return root, results, classes


@pytest.mark.parametrize("seed", range(3))
def test_frcnn_eval_equals_the_reference_voc_eval_on_the_same_files(tmp_path, capsys, seed):
    root, results, classes = _voc_root(tmp_path, seed)
    code = main(["eval", "--detections", str(results), "--data", str(root), "--split", "test", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["repaired"] == {"clipped": 0, "dropped": 0}  # frcnn scored the ground truth as written
    assert any("<difficult>1</difficult>" in x.read_text() for x in (root / "Annotations").iterdir())
    for metric, use_07 in (("voc07", True), ("voc2010", False)):
        expected = {}
        for name in classes:
            ap = reference_voc_eval(str(results / f"comp4_det_test_{name}.txt"),
                                    str(root / "Annotations" / "{}.xml"),
                                    str(root / "ImageSets" / "Main" / "test.txt"), name, 0.5, use_07)
            expected[name] = float(ap)
        got = result["metrics"][metric]["per_class"]
        assert set(got) == set(classes)
        for name in classes:
            assert got[name] == pytest.approx(expected[name], rel=0, abs=1e-12), (metric, name)
        assert result["metrics"][metric]["map"] == pytest.approx(
            (expected["cat"] + expected["dog"]) / 2, rel=0, abs=1e-12)
        assert 0.05 < expected["cat"] < 0.99 and 0.05 < expected["dog"] < 0.99  # neither trivial nor perfect
