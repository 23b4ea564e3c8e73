"""``frcnn eval``: VOC and COCO data, every metric, detections written and read back, plots, one-line refusals."""

from __future__ import annotations

import contextlib
import io
import json
import random

import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from frcnn.cli import main
from frcnn.config import load_config
from frcnn.data import open_dataset
from frcnn.data.coco import write_coco_json
from frcnn.data.synthetic import make_shapes_dataset
from frcnn.engine.train import train

CFG = ["TRAIN.SCALES=[128]", "TRAIN.MAX_SIZE=256", "TEST.SCALES=[128]", "TEST.MAX_SIZE=256", "TRAIN.MAX_ITERS=3",
       "TRAIN.SNAPSHOT_ITERS=3", "DEVICE=cpu", "TEST.SCORE_THRESH=0.0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "voc"
    make_shapes_dataset(data, num_trainval=4, num_test=4, image_size=(128, 128), seed=3)
    trainval = open_dataset(data, "trainval", classes=("circle", "square", "star", "triangle"))
    train(load_config("demo-cpu", CFG), trainval, root / "run", progress=False)
    test = open_dataset(data, "test", classes=trainval.classes)
    coco_json = write_coco_json(data / "test.json", test, category_ids=[0, 3, 7, 12])  # id 0 and gaps
    return root, data, root / "run", coco_json


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_voc_eval_json_keeps_the_foundation_keys_and_adds_every_metric(setup, capsys):
    root, data, run, _ = setup
    code, out, _ = _run(capsys, "eval", "--checkpoint", str(run), "--data", str(data), "--split", "test", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["metric"] == "voc07" and set(result["per_class"]) == {"circle", "square", "star", "triangle"}
    assert result["map"] == result["metrics"]["voc07"]["map"]
    assert set(result["metrics"]) == {"voc07", "voc2010"}
    code, out, _ = _run(capsys, "eval", "--checkpoint", str(run), "--data", str(data), "--split", "test",
                        "--metric", "voc2010", "--json")
    assert json.loads(out)["map"] == result["metrics"]["voc2010"]["map"]
    code, out, _ = _run(capsys, "eval", "--checkpoint", str(run), "--data", str(data), "--split", "test",
                        "--no-progress")
    assert code == 0 and "mAP" in out and "AP (voc07)" in out


def test_written_detections_evaluate_to_the_same_numbers(setup, capsys, tmp_path):
    root, data, run, _ = setup
    code, out, err = _run(capsys, "eval", "--checkpoint", str(run), "--data", str(data), "--split", "test",
                          "--json", "--write-detections", str(tmp_path / "dets"), "--plots", str(tmp_path / "plots"))
    assert code == 0
    direct = json.loads(out)
    assert "wrote" in err
    names = sorted(p.name for p in (tmp_path / "dets").iterdir())
    assert names == ["comp4_det_test_circle.txt", "comp4_det_test_square.txt", "comp4_det_test_star.txt",
                     "comp4_det_test_triangle.txt", "detections.json"]
    for source in ("dets/detections.json", "dets", "dets/comp4_det_test_star.txt"):
        code, out, _ = _run(capsys, "eval", "--detections", str(tmp_path / source), "--data", str(data),
                            "--split", "test", "--json")
        assert code == 0
        again = json.loads(out)
        assert again["metrics"] == direct["metrics"], source
    assert json.loads((tmp_path / "plots" / "metrics.json").read_text()) == direct
    with Image.open(tmp_path / "plots" / "pr_curves.png") as im:
        assert im.format == "PNG" and im.width >= 4 * 200
    summary = json.loads((tmp_path / "plots" / "confusion.json").read_text())
    assert set(summary["per_class"]) == set(direct["per_class"])
    assert "background" in (tmp_path / "plots" / "confusion.txt").read_text()
    # nothing is overwritten
    code, _, err = _run(capsys, "eval", "--checkpoint", str(run), "--data", str(data), "--split", "test",
                        "--plots", str(tmp_path / "plots"))
    assert code == 2 and err.count("\n") == 1 and "never overwrites" in err


def test_coco_eval_equals_pycocotools_on_the_written_detections(setup, capsys, tmp_path):
    root, data, run, coco_json = setup
    code, out, _ = _run(capsys, "eval", "--checkpoint", str(run), "--data", str(coco_json), "--json",
                        "--write-detections", str(tmp_path))
    assert code == 0
    result = json.loads(out)
    assert result["metric"] == "coco" and set(result["metrics"]) == {"voc07", "voc2010", "coco"}
    assert result["repaired"] == {"clipped": 0, "dropped": 0}  # the annotation file is the gt frcnn scored
    results = json.loads((tmp_path / "detections.json").read_text())
    assert results and {r["category_id"] for r in results} <= {0, 3, 7, 12}
    _assert_pycocotools_numbers(result, coco_json, tmp_path / "detections.json")
    # an untrained model scores 0 there; results near the ground truth give numbers that can disagree
    gt_doc = json.loads(coco_json.read_text())
    rng = random.Random(0)
    near = []
    for ann in gt_doc["annotations"]:
        for _ in range(2):
            x, y, w, h = (v + rng.uniform(-3, 3) for v in ann["bbox"])
            cat = ann["category_id"] if rng.random() < 0.8 else rng.choice([0, 3, 7, 12])
            near.append({"image_id": ann["image_id"], "category_id": cat, "bbox": [x, y, max(w, 2), max(h, 2)],
                         "score": rng.random()})
    for img in gt_doc["images"]:
        near.append({"image_id": img["id"], "category_id": rng.choice([0, 3, 7, 12]),
                     "bbox": [rng.uniform(0, 60), rng.uniform(0, 60), 20.0, 30.0], "score": rng.random()})
    (tmp_path / "near.json").write_text(json.dumps(near))
    code, out, _ = _run(capsys, "eval", "--detections", str(tmp_path / "near.json"), "--data", str(coco_json),
                        "--json")
    assert code == 0
    stats = _assert_pycocotools_numbers(json.loads(out), coco_json, tmp_path / "near.json")
    assert 0.1 < stats[0] < 0.95 and 0.1 < stats[8] < 1.0  # neither nothing nor everything found
    # the VOC numbers on the same images do not depend on the format of the annotations
    code, out, _ = _run(capsys, "eval", "--checkpoint", str(run), "--data", str(data), "--split", "test", "--json")
    assert json.loads(out)["metrics"]["voc07"] == result["metrics"]["voc07"]
    code, out, _ = _run(capsys, "eval", "--detections", str(tmp_path / "detections.json"), "--data",
                        str(coco_json), "--json", "--metric", "all")
    assert json.loads(out)["metrics"] == result["metrics"]


def _pycocotools(coco_json, results_json, cat_id=None):
    """pycocotools itself, as its README uses it, on the annotation file and a results file."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_json))
        ev = COCOeval(gt, gt.loadRes(str(results_json)), "bbox")
        if cat_id is not None:
            ev.params.catIds = [cat_id]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _assert_pycocotools_numbers(result: dict, coco_json, results_json):
    stats = _pycocotools(coco_json, results_json)
    names = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
    assert list(result["metrics"]["coco"]["stats"]) == list(names)
    for name, value in zip(names, stats):
        assert result["metrics"]["coco"]["stats"][name] == pytest.approx(float(value), abs=1e-12), name
    assert result["map"] == pytest.approx(max(float(stats[0]), 0.0), abs=1e-12)
    for name, cid in zip(("circle", "square", "star", "triangle"), (0, 3, 7, 12)):
        one = _pycocotools(coco_json, results_json, cid)[0]
        want = None if one < 0 else pytest.approx(float(one), abs=1e-12)
        assert result["metrics"]["coco"]["per_class"][name] == want, name
    return stats


@pytest.mark.parametrize("argv, message", [
    (["--data", "{data}", "--split", "test"], "either --checkpoint"),
    (["--checkpoint", "{run}", "--detections", "x.json", "--data", "{data}", "--split", "test"], "either --checkpoint"),
    (["--checkpoint", "{run}", "--data", "{data}", "--split", "test", "--metric", "coco"], "needs COCO data"),
    (["--checkpoint", "{run}", "--data", "{data}"], "give --split"),
    (["--checkpoint", "{run}", "--data", "{data}", "--split", "test", "--classes", "a,b"], "--classes is for"),
    (["--detections", "{data}/nope.json", "--data", "{data}", "--split", "test"], "no such"),
    (["--checkpoint", "{run}", "--data", "{data}/JPEGImages"], "neither a VOC root"),
])
def test_mistakes_are_one_line(setup, capsys, argv, message):
    root, data, run, _ = setup
    argv = [a.format(data=data, run=run) for a in argv]
    code, out, err = _run(capsys, "eval", *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err
