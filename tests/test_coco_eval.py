"""COCO AP: the numbers equal pycocotools' COCOeval run directly on the same detections."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_coco import coco_doc, write

from frcnn.data import open_dataset
from frcnn.engine.coco_eval import STAT_NAMES, coco_evaluate, coco_results
from frcnn.engine.evaluate import format_table, score_detections
from frcnn.errors import DataError
from frcnn.model.detector import Detections


def _reference(json_path, results, cat_ids=None):
    """pycocotools as its README uses it: COCO(file), loadRes(list), COCOeval(..., "bbox")."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(json_path))
        ev = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def _random_detections(ds, seed: int, per_image: int = 12) -> list[Detections]:
    """Detections near the gt boxes (some exact, some shifted, some with the wrong class) and random ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in ds:
        boxes, labels = [], []
        for box, label in zip(s.boxes.tolist(), s.labels.tolist()):
            for _ in range(3):
                jitter = (torch.rand(4, generator=g) - 0.5) * 6
                boxes.append([v + float(j) for v, j in zip(box, jitter)])
                labels.append(label if torch.rand(1, generator=g) < 0.8 else int(torch.randint(1, 5, (1,),
                                                                                             generator=g)))
        while len(boxes) < per_image:
            x1, y1 = (torch.rand(2, generator=g) * torch.tensor([30.0, 20.0])).tolist()
            w, h = (torch.rand(2, generator=g) * 15 + 1).tolist()
            boxes.append([x1, y1, min(x1 + w, 39.0), min(y1 + h, 29.0)])
            labels.append(int(torch.randint(1, 5, (1,), generator=g)))
        b = torch.tensor(boxes).clamp(min=0)
        b[:, 2] = b[:, 2].clamp(max=s.width - 1)
        b[:, 3] = b[:, 3].clamp(max=s.height - 1)
        b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2])
        out.append(Detections(b, torch.rand(len(boxes), generator=g), torch.tensor(labels)))
    return out


def _rich_doc() -> dict:
    """coco_doc plus more boxes of every category, small/medium sizes, another crowd box."""
    doc = coco_doc()
    g = np.random.default_rng(0)
    next_id = 100
    for img in (10, 2):
        for cat in (0, 3, 7, 0, 3):
            x, y = g.uniform(0, 25), g.uniform(0, 15)
            w, h = g.uniform(3, 14), g.uniform(3, 14)
            doc["annotations"].append({"id": next_id, "image_id": img, "category_id": cat,
                                       "bbox": [round(x, 2), round(y, 2), round(w, 2), round(h, 2)],
                                       "area": round(w * h, 2), "iscrowd": 0})
            next_id += 1
    doc["annotations"].append({"id": next_id, "image_id": 2, "category_id": 3, "bbox": [0, 0, 20, 15],
                               "area": 300.0, "iscrowd": 1})
    for a in doc["annotations"]:  # the reference needs these fields; our reader fills them in itself
        a.setdefault("iscrowd", 0)
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
    return doc


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stats_and_per_class_ap_equal_pycocotools(tmp_path, seed):
    path = write(tmp_path, _rich_doc())
    ds = open_dataset(path)
    dets = _random_detections(ds, seed)
    res = coco_evaluate(ds, dets)
    results = coco_results(ds, dets)
    ref = _reference(path, results)
    for name, value in zip(STAT_NAMES, ref.stats):
        assert res["stats"][name] == pytest.approx(float(value), abs=1e-9), name
    assert res["map"] == pytest.approx(float(ref.stats[0]), abs=1e-9)
    # per class: pycocotools restricted to that one category
    for name, cid in zip(ds.classes, ds.category_ids):
        one = _reference(path, results, cat_ids=[cid])
        if one.stats[0] < 0:
            assert res["per_class"][name] is None, name
        else:
            assert res["per_class"][name] == pytest.approx(float(one.stats[0]), abs=1e-9), name
            assert res["per_class_ap50"][name] == pytest.approx(float(one.stats[1]), abs=1e-9), name
    assert res["per_class"]["unused"] is None


def test_results_entries_are_coco_ids_and_xywh(tmp_path):
    ds = open_dataset(write(tmp_path))
    dets = [Detections(torch.tensor([[1.0, 2.0, 10.0, 6.0]]), torch.tensor([0.5]), torch.tensor([1]))] + \
        [Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))] * 2
    assert coco_results(ds, dets) == [{"image_id": 10, "category_id": 0, "bbox": [1.0, 2.0, 10.0, 5.0],
                                       "score": 0.5}]
    # the gt box itself is found exactly: AP 1 for its class; the crowd box of class cat neither helps nor hurts
    res = coco_evaluate(ds, dets)
    assert res["per_class"]["zero"] == pytest.approx(1.0)


def test_no_detections_at_all(tmp_path):
    ds = open_dataset(write(tmp_path, _rich_doc()))
    empty = [Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))] * len(ds)
    res = coco_evaluate(ds, empty)
    assert res["map"] == 0.0 and res["per_class"]["zero"] == 0.0 and res["per_class"]["unused"] is None
    assert res["stats"]["AR100"] == 0.0


def test_coco_metric_in_score_detections_and_refused_on_voc(tmp_path):
    ds = open_dataset(write(tmp_path, _rich_doc()))
    dets = _random_detections(ds, 5)
    res = score_detections(ds, dets, metric=None)
    assert res["metric"] == "coco" and res["map"] == res["metrics"]["coco"]["stats"]["AP"]
    assert json.loads(json.dumps(res)) == res  # JSON-clean
    table = format_table(res, all_metrics=True)
    assert table.splitlines()[0].split() == ["class", "voc07", "voc2010", "coco", "AP", "coco", "AP50"]
    assert "AR100" in table and "AP@[.50:.95] (coco)" in format_table(res)
    voc_like = score_detections(ds, dets, metric="voc2010")
    assert voc_like["map"] == res["metrics"]["voc2010"]["map"]
    from test_overfit import TinySet

    tiny = TinySet()
    with pytest.raises(DataError, match="needs COCO data"):
        score_detections(tiny, [Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64))]
                         * len(tiny), metric="coco")
