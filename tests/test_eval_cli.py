"""``frcnn eval``: VOC and COCO data, every metric, detections written and read back, plots, one-line refusals."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from frcnn.cli import main
from frcnn.config import load_config
from frcnn.data import open_dataset
from frcnn.data.coco import write_coco_json
from frcnn.data.synthetic import make_shapes_dataset
from frcnn.engine.coco_eval import STAT_NAMES, run_cocoeval
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
    dataset = open_dataset(coco_json)
    results = json.loads((tmp_path / "detections.json").read_text())
    assert {r["category_id"] for r in results} <= {0, 3, 7, 12}
    ev = run_cocoeval(dataset.coco, results)
    for name, value in zip(STAT_NAMES, ev.stats):
        assert result["metrics"]["coco"]["stats"][name] == pytest.approx(float(value), abs=1e-12)
    assert result["map"] == pytest.approx(float(ev.stats[0]), abs=1e-12)
    # the VOC numbers on the same images do not depend on the format of the annotations
    code, out, _ = _run(capsys, "eval", "--checkpoint", str(run), "--data", str(data), "--split", "test", "--json")
    assert json.loads(out)["metrics"]["voc07"] == result["metrics"]["voc07"]
    code, out, _ = _run(capsys, "eval", "--detections", str(tmp_path / "detections.json"), "--data",
                        str(coco_json), "--json", "--metric", "all")
    assert json.loads(out)["metrics"] == result["metrics"]


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
