"""COCO annotation files: ids, crowd boxes, empty images, class lists, format detection, hostile input."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from frcnn.data import ClassSubset, open_dataset, parse_classes
from frcnn.data.coco import COCODataset, boxes_to_coco, write_coco_json
from frcnn.data.synthetic import make_shapes_dataset
from frcnn.errors import DataError

CATEGORIES = [{"id": 7, "name": "cat"}, {"id": 0, "name": "zero"}, {"id": 3, "name": "dog"},
              {"id": 42, "name": "unused"}]


def coco_doc() -> dict:
    return {
        "images": [{"id": 10, "file_name": "a.png", "width": 40, "height": 30},
                   {"id": 2, "file_name": "sub/b.png", "width": 40, "height": 30},
                   {"id": 5, "file_name": "c.png", "width": 40, "height": 30}],  # no boxes
        "annotations": [
            {"id": 1, "image_id": 10, "category_id": 0, "bbox": [1, 2, 10, 5], "area": 50, "iscrowd": 0},
            {"id": 2, "image_id": 10, "category_id": 7, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1},
            {"id": 3, "image_id": 2, "category_id": 3, "bbox": [30.5, 20, 20, 20]},  # crosses the border
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [5, 5, 0.5, 3]},  # thinner than a pixel
        ],
        "categories": [dict(c) for c in CATEGORIES],
    }


def write(folder, doc=None, name="ann.json"):
    (folder / "sub").mkdir(exist_ok=True)
    for f in ("a.png", "sub/b.png", "c.png"):
        if not (folder / f).exists():
            Image.new("RGB", (40, 30)).save(folder / f)
    path = folder / name
    path.write_text(json.dumps(coco_doc() if doc is None else doc))
    return path


def test_categories_in_id_order_with_id_zero_and_unused_ids(tmp_path):
    ds = open_dataset(write(tmp_path))
    assert isinstance(ds, COCODataset)
    assert ds.classes == ("zero", "dog", "cat", "unused")
    assert ds.category_ids == (0, 3, 7, 42)
    assert ds.label_to_category == {1: 0, 2: 3, 3: 7, 4: 42}
    assert ds.category_to_label[0] == 1  # category 0 is an object class, never background
    assert [s.image_id for s in ds] == ["10", "2", "5"] and ds.coco_image_ids == (10, 2, 5)


def test_boxes_labels_crowd_and_images_without_boxes(tmp_path):
    ds = open_dataset(write(tmp_path))
    a, b, c = ds[0], ds[1], ds[2]
    assert a.boxes.tolist() == [[1, 2, 10, 6], [0, 0, 39, 29]]  # x2 = x + w - 1
    assert a.labels.tolist() == [1, 3] and a.difficult.tolist() == [False, True]  # crowd: kept, flagged
    # as written, not clipped (the repairs of every command clip it and say so); a sliver is one pixel wide
    assert b.boxes.tolist() == [[30.5, 20, 49.5, 39], [5, 5, 5, 7]]
    assert b.path == tmp_path / "sub" / "b.png"
    assert c.boxes.shape == (0, 4) and c.labels.shape == (0,)
    assert ds.load_image(c).size == (40, 30)
    assert ds.coco.anns[3]["area"] == 400 and ds.coco.anns[3]["iscrowd"] == 0  # filled for pycocotools


def test_explicit_classes_fix_the_order_and_drop_the_others(tmp_path):
    ds = open_dataset(write(tmp_path), classes=parse_classes("cat,zero"))
    assert ds.classes == ("cat", "zero") and ds.category_ids == (7, 0)
    assert ds[0].labels.tolist() == [2, 1]
    assert ds[1].labels.tolist() == [1]  # the dog is dropped
    with pytest.raises(DataError, match="not among its categories"):
        open_dataset(write(tmp_path), classes=("cat", "horse"))


def test_images_folder_and_split_naming_another_json(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    write(images)
    doc = coco_doc()
    (tmp_path / "train.json").write_text(json.dumps(doc))
    doc["images"] = doc["images"][:1]
    doc["annotations"] = doc["annotations"][:2]
    (tmp_path / "val.json").write_text(json.dumps(doc))
    assert len(open_dataset(tmp_path / "train.json", images=images)) == 3
    assert len(open_dataset(tmp_path / "train.json", split="val", images=images)) == 1
    assert len(open_dataset(tmp_path / "train.json", split="train", images=images)) == 3
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(tmp_path / "train.json", split="test", images=images)
    with pytest.raises(DataError, match="does not exist"):  # images are looked for next to the JSON
        open_dataset(tmp_path / "train.json")


def test_format_detection(tmp_path):
    make_shapes_dataset(tmp_path / "voc", num_trainval=2, num_test=1, image_size=(64, 64), seed=1)
    assert open_dataset(tmp_path / "voc", "test").__class__.__name__ == "VOCDataset"
    with pytest.raises(DataError, match="give --split"):
        open_dataset(tmp_path / "voc")
    with pytest.raises(DataError, match="--images is for COCO"):
        open_dataset(tmp_path / "voc", "test", images=tmp_path)
    with pytest.raises(DataError, match="neither a VOC root"):
        open_dataset(tmp_path / "voc" / "JPEGImages")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a COCO annotation JSON"):
        open_dataset(tmp_path / "notes.txt")
    with pytest.raises(DataError, match="no such"):
        open_dataset(tmp_path / "missing")


def test_voc_with_classes_drops_other_classes(tmp_path):
    make_shapes_dataset(tmp_path, num_trainval=6, num_test=1, image_size=(64, 64), seed=1)
    full = open_dataset(tmp_path, "trainval")
    sub = open_dataset(tmp_path, "trainval", classes=("star", "circle"))
    assert isinstance(sub, ClassSubset) and sub.classes == ("star", "circle") and len(sub) == len(full)
    for i in range(len(full)):
        names = [full.classes[k - 1] for k in full[i].labels.tolist()]
        kept = [n for n in names if n in ("star", "circle")]
        assert [sub.classes[k - 1] for k in sub[i].labels.tolist()] == kept
    assert sub.load_image(sub[0]).size == (64, 64) and sub.root == full.root
    # a superset of the data's classes reads the split strictly, in the given order
    superset = ("triangle", "star", "square", "circle", "hexagon")
    assert open_dataset(tmp_path, "trainval", classes=superset).classes == superset


def test_write_coco_json_round_trips_boxes(tmp_path):
    make_shapes_dataset(tmp_path, num_trainval=3, num_test=1, image_size=(64, 64), seed=2)
    voc = open_dataset(tmp_path, "trainval")
    coco = open_dataset(write_coco_json(tmp_path / "tv.json", voc, category_ids=[0, 5, 6, 9]))
    assert coco.classes == voc.classes and coco.category_ids == (0, 5, 6, 9)
    for s, t in zip(voc, coco):
        assert torch.equal(s.boxes, t.boxes) and torch.equal(s.labels, t.labels) and s.path == t.path
    assert boxes_to_coco(torch.tensor([[0.0, 0.0, 9.0, 4.0]])) == [[0.0, 0.0, 10.0, 5.0]]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["images"][0].update(file_name="../secret.png"), "points outside"),
    (lambda d: d["images"][0].update(file_name="/etc/passwd"), "points outside"),
    (lambda d: d["images"][0].update(file_name="sub/../../x.png"), "points outside"),
    (lambda d: d["images"][1].update(id=10), "appears twice"),
    (lambda d: d["images"][0].update(width=0), "positive integer"),
    (lambda d: d["annotations"][0].update(category_id=99), "not in 'categories'"),
    (lambda d: d["annotations"][0].update(image_id=99), "not in 'images'"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), "negative width"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"\[x, y, w, h\]"),
    (lambda d: d["annotations"][0].update(bbox=[50, 2, 3, 4]), "outside"),
    (lambda d: d["annotations"][1].update(id=1), "appears twice"),
    (lambda d: d["annotations"][0].update(iscrowd=2), "iscrowd"),
    (lambda d: d["categories"].append({"id": 8, "name": "cat"}), "appears twice"),
    (lambda d: d.pop("images"), "missing list 'images'"),
])
def test_malformed_files_are_one_line_data_errors(tmp_path, mutate, message):
    doc = coco_doc()
    mutate(doc)
    with pytest.raises(DataError, match=message) as e:
        open_dataset(write(tmp_path, doc))
    assert "\n" not in str(e.value) and "ann.json" in str(e.value)


def test_unparsable_json_and_non_finite_numbers(tmp_path):
    path = write(tmp_path)
    path.write_text('{"images": [')
    with pytest.raises(DataError, match="not valid JSON"):
        open_dataset(path)
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="nested too deeply"):
        open_dataset(path)
    path.write_text(json.dumps(coco_doc()).replace("[1, 2, 10, 5]", "[1, 2, NaN, 5]"))
    with pytest.raises(DataError, match="non-finite"):
        open_dataset(path)


def test_image_over_the_pixel_limit_is_refused(tmp_path, monkeypatch):
    from frcnn.data import images
    ds = open_dataset(write(tmp_path))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="limit") as e:
        ds.load_image(ds[0])
    assert "\n" not in str(e.value)


def test_parse_classes(tmp_path):
    assert parse_classes(" a, b ,c") == ("a", "b", "c")
    f = tmp_path / "classes.txt"
    f.write_text("# my classes\nb\n\na  # first\n")
    assert parse_classes(str(f)) == ("b", "a")
    with pytest.raises(DataError, match="given twice"):
        parse_classes("a,b,a")
    with pytest.raises(DataError, match="no class names"):
        parse_classes(" , ")


def test_classes_can_refuse_other_classes_instead_of_dropping(tmp_path):
    with pytest.raises(DataError, match="annotation id 3 has class 'dog', not one of cat, zero"):
        open_dataset(write(tmp_path), classes=("cat", "zero"), drop_other_classes=False)
    assert open_dataset(write(tmp_path), classes=("zero", "dog", "cat"), drop_other_classes=False).classes == \
        ("zero", "dog", "cat")  # 'unused' has no boxes: nothing to refuse
    make_shapes_dataset(tmp_path / "voc", num_trainval=6, num_test=1, image_size=(64, 64), seed=1)
    with pytest.raises(DataError, match="unknown class"):
        open_dataset(tmp_path / "voc", "trainval", classes=("star", "circle"), drop_other_classes=False)
