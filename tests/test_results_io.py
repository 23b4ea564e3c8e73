"""Detections in files: the reference comp4 files and COCO results JSON round-trip to the same AP; VOC data
end to end (difficult boxes) gives the reference voc_eval's known answers."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from frcnn.data import open_dataset
from frcnn.data.coco import write_coco_json
from frcnn.data.voc import write_voc_xml
from frcnn.engine.evaluate import score_detections
from frcnn.engine.results_io import (
    read_coco_results,
    read_comp4,
    read_detections,
    write_coco_results,
    write_comp4,
)
from frcnn.errors import DataError
from frcnn.model.detector import Detections


def zb(*box: float) -> list[float]:
    return [v - 1 for v in box]


@pytest.fixture
def voc(tmp_path):
    """The known-answer scene of tests/test_voc_eval.py as a VOC folder (1-based XML boxes)."""
    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    objects = {
        "img1": [("person", zb(1, 1, 10, 10), False), ("person", zb(21, 21, 30, 30), True),
                 ("car", zb(1, 1, 20, 20), False)],
        "img2": [("person", zb(5, 5, 14, 14), False), ("person", zb(30, 30, 39, 39), False)],
        "img3": [],
    }
    for name, objs in objects.items():
        Image.new("RGB", (64, 64)).save(root / "JPEGImages" / f"{name}.jpg")
        write_voc_xml(root / "Annotations" / f"{name}.xml", f"{name}.jpg", 64, 64, objs)
    (root / "ImageSets/Main/test.txt").write_text("img1\nimg2\nimg3\n")
    return open_dataset(root, "test", classes=("person", "car"))


def _dets(voc) -> list[Detections]:
    per_image = {"img1": [], "img2": [], "img3": []}
    person = [("img1", 0.9, zb(1, 1, 10, 10)), ("img2", 0.8, zb(50, 50, 60, 60)), ("img1", 0.7, zb(21, 21, 30, 30)),
              ("img2", 0.6, zb(5, 5, 14, 14)), ("img1", 0.5, zb(1, 1, 10, 10))]
    for image, score, box in person:
        per_image[image].append((box, score, 1))
    per_image["img1"].append((zb(1, 1, 20, 40), 0.99, 2))  # IoU exactly 0.5: not a match
    per_image["img3"].append((zb(3.5, 4.25, 17.125, 30.0625), 0.123456789, 2))  # fractional coordinates
    out = []
    for s in voc:
        entries = per_image[s.image_id]
        out.append(Detections(torch.tensor([e[0] for e in entries], dtype=torch.float32).reshape(-1, 4),
                              torch.tensor([e[1] for e in entries], dtype=torch.float32),
                              torch.tensor([e[2] for e in entries], dtype=torch.int64)))
    return out


def test_voc_data_end_to_end_gives_the_reference_known_answers(voc):
    assert voc[0].difficult.tolist() == [False, True, False]
    res = score_detections(voc, _dets(voc), "voc07")
    assert res["npos"] == {"person": 3, "car": 1}  # the difficult person is not counted
    assert res["per_class"]["person"] == pytest.approx(0.545455, abs=1e-6)
    assert res["per_class"]["car"] == 0.0
    assert res["metrics"]["voc2010"]["per_class"]["person"] == pytest.approx(0.555556, abs=1e-6)
    assert res["map"] == pytest.approx((0.545455 + 0.0) / 2, abs=1e-6)


def test_comp4_files_are_the_reference_format_and_round_trip(voc, tmp_path):
    dets = _dets(voc)
    paths = write_comp4(tmp_path / "results", "test", voc, dets)
    assert [p.name for p in paths] == ["comp4_det_test_person.txt", "comp4_det_test_car.txt"]
    first = paths[0].read_text().splitlines()[0].split()
    assert first[0] == "img1" and float(first[1]) == pytest.approx(0.9)
    assert [float(v) for v in first[2:]] == [1.0, 1.0, 10.0, 10.0]  # 1-based, as the reference writes
    back = read_comp4(tmp_path / "results", voc)
    for a, b in zip(dets, back):
        order_a, order_b = torch.argsort(a.labels, stable=True), torch.argsort(b.labels, stable=True)
        assert torch.equal(a.boxes[order_a], b.boxes[order_b]) and torch.equal(a.scores[order_a], b.scores[order_b])
    assert score_detections(voc, back)["metrics"] == score_detections(voc, dets)["metrics"]
    # the reference's own precision ({:.3f} score, {:.1f} coordinates) reads too
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "comp4_1a2b_det_test_person.txt").write_text(
        "img1 0.900 1.0 1.0 10.0 10.0\nimg2 0.800 50.0 50.0 60.0 60.0\nimg1 0.700 21.0 21.0 30.0 30.0\n"
        "img2 0.600 5.0 5.0 14.0 14.0\nimg1 0.500 1.0 1.0 10.0 10.0\n")
    assert score_detections(voc, read_detections(tmp_path / "ref", voc))["per_class"]["person"] == \
        pytest.approx(0.545455, abs=1e-6)


def test_coco_results_round_trip_on_voc_and_coco_data(voc, tmp_path):
    dets = _dets(voc)
    path = write_coco_results(tmp_path / "dets.json", voc, dets)
    entries = json.loads(path.read_text())
    assert {"image_id": "img1", "category_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "score": pytest.approx(0.9)} \
        in entries
    back = read_detections(path, voc)
    for a, b in zip(dets, back):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.labels, b.labels)
    # the same images as COCO data, with other category ids: COCO ids in the file, same detections back
    coco = open_dataset(write_coco_json(voc.root / "test.json", voc, category_ids=[0, 17]))
    path = write_coco_results(tmp_path / "coco_dets.json", coco, dets)
    entries = json.loads(path.read_text())
    assert {e["image_id"] for e in entries} <= {1, 2, 3} and {e["category_id"] for e in entries} == {0, 17}
    back = read_coco_results(path, coco)
    for a, b in zip(dets, back):
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.labels, b.labels)
    assert score_detections(coco, back, "all")["metrics"] == score_detections(coco, dets, "all")["metrics"]


@pytest.mark.parametrize("content, message", [
    ('{"a": 1}', "JSON list"),
    ('[{"image_id": "img9", "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]', "not in the data"),
    ('[{"image_id": "img1", "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1}]', "not one of the data's classes"),
    ('[{"image_id": "img1", "category_id": 1, "bbox": [0, 0, 1], "score": 1}]', "4 finite numbers"),
    ('[{"image_id": "img1", "category_id": 1, "bbox": [0, 0, 1, 1]}]', "needs image_id"),
    ("[", "not valid JSON"),
])
def test_bad_coco_results_are_one_line_errors(voc, tmp_path, content, message):
    (tmp_path / "d.json").write_text(content)
    with pytest.raises(DataError, match=message) as e:
        read_detections(tmp_path / "d.json", voc)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("line, message", [
    ("img1 0.5 1 1 10", "expected 'image_id score x1 y1 x2 y2'"),
    ("img9 0.5 1 1 10 10", "not in the data"),
    ("img1 high 1 1 10 10", "non-numeric"),
    ("img1 nan 1 1 10 10", "non-finite"),
])
def test_bad_comp4_lines_are_one_line_errors(voc, tmp_path, line, message):
    (tmp_path / "comp4_det_test_car.txt").write_text(line + "\n")
    with pytest.raises(DataError, match=message) as e:
        read_detections(tmp_path, voc)
    assert "line 1" in str(e.value) and "\n" not in str(e.value)


def test_a_folder_without_results_files_is_refused(voc, tmp_path):
    with pytest.raises(DataError, match="no results files"):
        read_detections(tmp_path, voc)
    with pytest.raises(DataError, match="no such"):
        read_detections(tmp_path / "nope", voc)


def test_comp4_files_of_voc_ids_read_on_coco_data_of_the_same_images(voc, tmp_path):
    dets = _dets(voc)
    write_comp4(tmp_path / "results", "test", voc, dets)
    coco = open_dataset(write_coco_json(voc.root / "test.json", voc))
    assert [s.image_id for s in coco] == ["1", "2", "3"]  # COCO ids; the files name img1.. (the file stems)
    back = read_comp4(tmp_path / "results", coco)
    assert score_detections(coco, back, "voc07")["metrics"]["voc07"] == score_detections(voc, dets)["metrics"]["voc07"]
