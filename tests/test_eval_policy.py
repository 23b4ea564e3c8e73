"""One data policy for every command that reads annotated data: ``train``, ``eval``, ``report --data`` read the
same boxes (border-crossing boxes clipped, 1-pixel boxes dropped), say so in one line, and stop on what training
stops on; ``eval`` states the repaired gt boxes; ``eval --plots --iou T`` draws precision-recall at IoU T;
``report`` reads COCO data and finds the run inside ``frcnn demo``'s ``--out``.

The data: image ``a`` (60x40) holds a ``cat`` box crossing the right and bottom border and a 1-pixel-wide ``cat``
box; image ``b`` (120x120) one ``dog`` box. The same annotations as a VOC folder and as a COCO JSON.
Detections: the clipped cat box exactly (IoU 1) and a dog box with IoU 0.6 to its gt (100 x 60 pixels inside the
100 x 100 gt box: 6000 / 10000), so at IoU 0.5 the dog detection is a true positive and at 0.7 a false positive.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from explain_fixtures import CLASSES as CKPT_CLASSES
from explain_fixtures import HEIGHT, WIDTH, checkpoint, picture, voc_folder
from PIL import Image

from frcnn.cli import main
from frcnn.data import open_repaired
from frcnn.data.check import training_set
from frcnn.engine.results_io import write_coco_results
from frcnn.errors import DataError
from frcnn.model.detector import Detections

CLASSES = ("cat", "dog")
SIZES = {"a": (60, 40), "b": (120, 120)}
# 0-based inclusive boxes (+1 convention) as annotated, per image: (class, box)
ANNOTATED = {"a": [("cat", (30, 20, 69, 39)),  # crosses the border of the 60x40 image: clipped to x2 59
                   ("cat", (5, 5, 5, 12))],  # one pixel wide (xmin == xmax): degenerate, dropped
             "b": [("dog", (10, 10, 109, 109))]}
REPAIRED = {"a": [[30, 20, 59, 39]], "b": [[10, 10, 109, 109]]}
DETECTIONS = {"a": ("cat", (30, 20, 59, 39), 0.9),  # the clipped cat box itself: IoU 1
              "b": ("dog", (10, 10, 109, 69), 0.8)}  # IoU 100*60 / (100*100) = 0.6 with the dog box
SUMMARY = "repaired: clipped 1 boxes to their image ({a}); dropped 1 degenerate boxes ({a})"


def _voc_object(name: str, box, extra: str = "") -> str:
    coords = "".join(f"<{t}>{v + 1:g}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name><difficult>0</difficult>{extra}<bndbox>{coords}</bndbox></object>"


def make_voc(root: Path, annotated=None) -> Path:
    annotated = ANNOTATED if annotated is None else annotated
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, objects in annotated.items():
        w, h = SIZES[image_id]
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / "JPEGImages" / f"{image_id}.png")
        body = "".join(_voc_object(name, box) for name, box in objects)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.png</filename><size><width>{w}</width><height>{h}</height></size>"
            f"{body}</annotation>")
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{i}\n" for i in annotated))
    return root


def make_coco(folder: Path, annotated=None) -> Path:
    annotated = ANNOTATED if annotated is None else annotated
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for n, (image_id, objects) in enumerate(annotated.items(), start=1):
        w, h = SIZES[image_id]
        Image.new("RGB", (w, h), (90, 90, 90)).save(folder / f"{image_id}.png")
        images.append({"id": n, "file_name": f"{image_id}.png", "width": w, "height": h})
        for name, (x1, y1, x2, y2) in objects:
            bbox = [x1, y1, x2 - x1 + 1, y2 - y1 + 1]
            annotations.append({"id": len(annotations) + 1, "image_id": n, "category_id": CLASSES.index(name) + 1,
                                "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0})
    categories = [{"id": i, "name": name} for i, name in enumerate(CLASSES, start=1)]
    path = folder / "train.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture(params=["voc", "coco"])
def data(request, tmp_path):
    """``(format, --data, --split or None, the id the summary names image a by)``."""
    if request.param == "voc":
        return "voc", make_voc(tmp_path / "voc"), "train", "a"
    return "coco", make_coco(tmp_path / "coco"), None, "1"


def _boxes(dataset) -> list:
    return [(s.image_id, s.width, s.height, s.boxes.tolist(), [dataset.classes[k - 1] for k in s.labels.tolist()],
             s.difficult.tolist()) for s in (dataset[i] for i in range(len(dataset)))]


def _write_detections(path: Path, dataset) -> Path:
    dets = []
    for s in (dataset[i] for i in range(len(dataset))):
        name, box, score = DETECTIONS[Path(s.path).stem]
        dets.append(Detections(torch.tensor([box], dtype=torch.float32), torch.tensor([score]),
                               torch.tensor([dataset.classes.index(name) + 1])))
    return write_coco_results(path, dataset, dets)


def _eval(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["eval", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _data_args(data) -> list[str]:
    _, path, split, _ = data
    return ["--data", str(path), *(["--split", split] if split else [])]


# ---------------------------------------------------------------------------------------------- readers


def test_train_and_eval_read_the_same_boxes(data):
    kind, path, split, a = data
    trained, summary = training_set(path, split or "train")
    evaluated = open_repaired(path, split, classes=trained.classes, drop_other_classes=False)
    assert trained.classes == evaluated.classes == CLASSES
    assert _boxes(evaluated) == _boxes(trained)
    assert [s.boxes.tolist() for s in evaluated] == [REPAIRED["a"], REPAIRED["b"]]
    assert summary == evaluated.summary == SUMMARY.format(a=a)
    assert evaluated.repairs == {"clipped": 1, "dropped": 1}
    if kind == "coco":  # pycocotools' ground truth holds the repaired boxes too
        anns = evaluated.coco.dataset["annotations"]
        assert [(a["id"], a["bbox"], a["area"]) for a in anns] == [(1, [30.0, 20.0, 30.0, 20.0], 600.0),
                                                                    (3, [10, 10, 100, 100], 10000)]
        assert len(evaluated.dataset.coco.dataset["annotations"]) == 3  # the file as written is left alone


def test_a_checkpoint_of_other_classes_is_refused_in_one_line(data):
    _, path, split, _ = data
    with pytest.raises(DataError, match="unknown class 'dog'|class 'dog', not one of cat"):
        open_repaired(path, split, classes=("cat",), drop_other_classes=False)
    assert open_repaired(path, split, classes=("cat",)).classes == ("cat",)  # --classes drops the others


# ---------------------------------------------------------------------------------------------- eval


def test_eval_states_the_repairs_in_its_json_and_scores_the_repaired_boxes(data, capsys, tmp_path):
    kind, path, split, a = data
    dets = _write_detections(tmp_path / "dets.json", open_repaired(path, split))
    code, out, err = _eval(capsys, "--detections", str(dets), *_data_args(data), "--json", "--metric", "all")
    assert code == 0, err
    result = json.loads(out)  # stdout is the JSON alone; the repair line went to stderr
    assert result["repaired"] == {"clipped": 1, "dropped": 1}
    assert err.splitlines()[0] == SUMMARY.format(a=a)
    # the 1-pixel box is not a gt box any more (npos 1, not 2), and the crossing box is matched where it is clipped
    assert result["npos"] == {"cat": 1, "dog": 1}
    assert result["metrics"]["voc07"]["per_class"] == pytest.approx({"cat": 1.0, "dog": 1.0})
    if kind == "coco":  # pycocotools scores the repaired ground truth: the clipped box found exactly at every IoU
        assert result["metrics"]["coco"]["per_class"]["cat"] == pytest.approx(1.0)
        assert result["metrics"]["coco"]["per_class_ap50"]["dog"] == pytest.approx(1.0)


def test_eval_table_states_the_repairs(data, capsys, tmp_path):
    _, path, split, a = data
    dets = _write_detections(tmp_path / "dets.json", open_repaired(path, split))
    for extra in ([], ["--metric", "all"]):
        code, out, err = _eval(capsys, "--detections", str(dets), *_data_args(data), "--no-progress", *extra)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0] == SUMMARY.format(a=a)  # the one line training prints
        assert lines[-1] == ("ground truth as training reads it: 1 boxes clipped to their image, 1 dropped "
                             "(degenerate or duplicate)")


def test_nothing_to_repair_says_zero(tmp_path, capsys):
    root = make_voc(tmp_path / "voc", {"b": ANNOTATED["b"]})
    dataset = open_repaired(root, "train")
    assert dataset.summary == "" and dataset.repairs == {"clipped": 0, "dropped": 0}
    dets = _write_detections(tmp_path / "dets.json", dataset)
    code, out, _ = _eval(capsys, "--detections", str(dets), "--data", str(root), "--split", "train", "--json")
    assert code == 0 and json.loads(out)["repaired"] == {"clipped": 0, "dropped": 0}


@pytest.mark.parametrize("kind", ["voc", "coco"])
def test_what_training_stops_on_stops_eval_in_one_line(tmp_path, capsys, kind):
    bad = {**ANNOTATED, "b": [("dog", (109, 10, 10, 109))]}  # inverted: x2 < x1, not repairable
    if kind == "voc":
        path = make_voc(tmp_path / "voc", bad)
        argv = ["--data", str(path), "--split", "train"]
    else:
        path = make_coco(tmp_path / "coco", bad)
        argv = ["--data", str(path)]
    (tmp_path / "dets.json").write_text("[]")
    code, out, err = _eval(capsys, "--detections", str(tmp_path / "dets.json"), *argv, "--no-progress")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("frcnn eval: error: ") and "frcnn check-data --data" in err
    assert ("is inverted" in err if kind == "voc" else "negative width or height" in err) and out == ""
    with pytest.raises(DataError):
        training_set(path, "train")  # training stops on the same data


# ---------------------------------------------------------------------------------------------- PR curves


def test_pr_curves_at_the_iou_asked(data, capsys, tmp_path):
    kind, path, split, _ = data
    dets = _write_detections(tmp_path / "dets.json", open_repaired(path, split))
    curves = {}
    for iou, argv in ((0.5, []), (0.7, ["--iou", "0.7"])):
        plots = tmp_path / f"plots{iou}"
        code, _, err = _eval(capsys, "--detections", str(dets), *_data_args(data), "--plots", str(plots),
                             "--no-progress", *argv)
        assert code == 0, err
        curves[iou] = json.loads((plots / "pr_curves.json").read_text())
        assert curves[iou]["iou"] == iou
        assert (plots / "pr_curves.png").stat().st_size > 0
    dog5, dog7 = curves[0.5]["per_class"]["dog"], curves[0.7]["per_class"]["dog"]
    # IoU 0.6: a true positive at 0.5, a false positive at 0.7
    assert (dog5["tp"], dog5["recall"], dog5["precision"], dog5["ap"]) == ([1], [1.0], [1.0], 1.0)
    assert (dog7["tp"], dog7["recall"], dog7["precision"], dog7["ap"]) == ([0], [0.0], [0.0], 0.0)
    assert dog5["score"] == dog7["score"] == [pytest.approx(0.8)] and dog5["npos"] == dog7["npos"] == 1
    # the cat detection is its gt box (IoU 1): the same at both
    assert curves[0.5]["per_class"]["cat"] == curves[0.7]["per_class"]["cat"]
    assert curves[0.5]["per_class"]["cat"]["tp"] == [1] and curves[0.5]["per_class"]["cat"]["npos"] == 1
    with Image.open(tmp_path / "plots0.5" / "pr_curves.png") as p5, Image.open(tmp_path / "plots0.7" /
                                                                               "pr_curves.png") as p7:
        assert p5.size == p7.size and p5.tobytes() != p7.tobytes()


@pytest.mark.parametrize("argv, message", [
    (["--iou", "0.7"], "give --plots too"),
    (["--iou", "1.0", "--plots", "{tmp}/p"], "must lie in (0, 1)"),
    (["--iou", "0", "--plots", "{tmp}/p"], "must lie in (0, 1)"),
])
def test_iou_mistakes_are_one_line(tmp_path, capsys, argv, message):
    root = make_voc(tmp_path / "voc")
    (tmp_path / "dets.json").write_text("[]")
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, _, err = _eval(capsys, "--detections", str(tmp_path / "dets.json"), "--data", str(root), "--split",
                         "train", *argv)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------------------------- report


def _metrics_log(folder: Path, iterations=(1, 2, 3)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    keys = ("rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box")
    lines = [json.dumps({"iteration": it, **{k: 1.0 / it for k in keys}, "total": 4.0 / it, "lr": 0.01,
                         "time": 0.1, "elapsed": it / 10}) for it in iterations]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_report_data_on_coco(tmp_path, capsys):
    run = checkpoint(tmp_path / "run", iteration=3)
    _metrics_log(run)
    folder = tmp_path / "coco"
    folder.mkdir()
    picture().save(folder / "known.png")
    anns = [{"id": 1, "image_id": 7, "category_id": 2, "bbox": [40, 30, 40, 40]},  # square
            {"id": 2, "image_id": 7, "category_id": 1, "bbox": [120, 60, 60, 70]},  # circle
            {"id": 3, "image_id": 7, "category_id": 3, "bbox": [180, 100, 40, 40]}]  # star, crosses the border
    (folder / "test.json").write_text(json.dumps({
        "images": [{"id": 7, "file_name": "known.png", "width": WIDTH, "height": HEIGHT}], "annotations": anns,
        "categories": [{"id": i, "name": n} for i, n in enumerate(CKPT_CLASSES, start=1)]}))
    code = main(["report", str(run), "--data", str(folder / "test.json"), "--no-progress", "--images", "1",
                 "--threshold", "0"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out == ["repaired: clipped 1 boxes to their image (7)", str(run / "report" / "index.html")]
    page = (run / "report" / "index.html").read_text()
    for name in ("map.png", "pr.png", "test_images.png", "COCO AP@[.50:.95]", "AP (coco)",
                 "repaired: clipped 1 boxes to their image (7)", *CKPT_CLASSES):
        assert name in page, name


def _demo_like(out: Path) -> Path:
    """``frcnn demo``'s --out in tiny pieces: data/ (VOC, test split), model/ (the run: log and checkpoint),
    metrics.json, detections/, explain/."""
    voc_folder(out / "data")
    run = checkpoint(out / "model", iteration=3)
    _metrics_log(run)
    (out / "metrics.json").write_text(json.dumps({"map": 0.25, "metric": "voc07",
                                                  "per_class": {"circle": 0.5, "square": 0.0, "star": None}}))
    (out / "detections").mkdir()
    picture().save(out / "detections" / "known.png")
    (out / "explain").mkdir()
    (out / "explain" / "index.html").write_text("<html></html>")
    return run


def test_report_finds_the_run_inside_the_demo_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    run = _demo_like(out)
    assert main(["report", str(out), "--no-progress", "--images", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"run: {run}", str(out / "report" / "index.html")]
    page = (out / "report" / "index.html").read_text()
    assert "losses.png" in page and "map.png" in page and "test_images.png" in page  # the data beside the run
    assert main(["report", str(out), "--no-progress", "--images", "1"]) == 0  # again: replaces its own page
    capsys.readouterr()


def test_report_of_a_folder_with_no_run_or_several(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "data").mkdir(parents=True)
    assert main(["report", str(empty)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a training run" in err and "subfolder" in err
    two = tmp_path / "two"
    _metrics_log(two / "r1")
    _metrics_log(two / "r2")
    assert main(["report", str(two)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 2 training runs (r1, r2)" in err
    assert not (empty / "report").exists() and not (two / "report").exists()
