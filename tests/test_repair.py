"""Safe repairs before training: clip, drop degenerate and duplicate boxes, real sizes, one summary line."""

from __future__ import annotations

import torch
from PIL import Image
from test_voc import BCCD, make_root, needs_bccd, obj, xml

from frcnn.data.check import check_data, training_set
from frcnn.data.repair import RepairedDataset, degenerate, duplicates, inverted, repair_sample
from frcnn.data.sample import Sample


def sample(boxes, labels=None, width=40, height=30) -> Sample:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = b.shape[0]
    lbl = torch.tensor(labels if labels is not None else [1] * n, dtype=torch.int64)
    return Sample("s", "s.jpg", width, height, b, lbl, torch.zeros(n, dtype=torch.bool))


def test_predicates():
    b = torch.tensor([[0, 0, 9, 9], [5, 5, 5, 9], [5, 5, 9, 5], [9, 0, 5, 9], [0, 0, 9, 9]], dtype=torch.float32)
    assert degenerate(b).tolist() == [False, True, True, False, False]
    assert inverted(b).tolist() == [False, False, False, True, False]
    assert duplicates(b, torch.tensor([1, 1, 1, 1, 1])).tolist() == [False] * 4 + [True]
    assert duplicates(b, torch.tensor([1, 1, 1, 1, 2])).tolist() == [False] * 5  # another class: not a duplicate


def test_repair_clips_drops_and_counts():
    s = sample([[-1, 0, 10, 10], [3, 3, 3, 3], [0, 0, 9, 9], [0, 0, 9, 9], [38, 5, 45, 40], [39, 0, 50, 5]])
    repaired, counts = repair_sample(s, 40, 30)
    assert repaired.boxes.tolist() == [[0, 0, 10, 10], [0, 0, 9, 9], [38, 5, 39, 29]]
    # the last box clips to x1 == x2 == 39: one pixel wide, dropped as degenerate
    assert counts == {"clipped": 2, "degenerate": 2, "duplicate": 1}
    assert repaired.labels.shape == repaired.difficult.shape == (3,)


def test_repair_uses_the_real_size_and_leaves_inverted_boxes():
    s = sample([[20, 0, 10, 10], [0, 0, 60, 40]], width=0, height=0)
    repaired, counts = repair_sample(s, 50, 35)
    assert (repaired.width, repaired.height) == (50, 35)
    assert repaired.boxes.tolist() == [[20, 0, 10, 10], [0, 0, 49, 34]]
    assert counts["clipped"] == 1


def test_repaired_dataset_summary_and_images(tmp_path):
    root = make_root(tmp_path, {"a": xml(obj("cat", (0, 1, 20, 31)), obj("cat", (5, 5, 5, 5)), filename=None),
                                "b": xml(obj("cat", (1, 1, 9, 9)), obj("cat", (1, 1, 9, 9)), filename=None)})
    Image.new("P", (40, 30)).save(root / "JPEGImages" / "b.jpg", format="PNG")
    dataset, summary = training_set(root, "train")
    assert summary == ("repaired: clipped 1 boxes to their image (a); dropped 1 degenerate boxes (a); dropped 1 "
                       "duplicate boxes (b); converting 1 images to RGB; reading 1 images whose extension disagrees "
                       "with their content")
    assert [dataset[i].boxes.tolist() for i in range(2)] == [[[0, 0, 19, 29]], [[0, 0, 8, 8]]]
    assert dataset.load_image(dataset[1]).mode == "RGB"
    assert dataset.root == root  # attributes of the wrapped data set


def test_nothing_to_repair_is_an_empty_summary(tmp_path):
    root = make_root(tmp_path, {"a": xml(obj("cat"), filename=None)})
    dataset, summary = training_set(root, "train")
    assert summary == "" and isinstance(dataset, RepairedDataset) and len(dataset) == 1


def test_size_zero_in_the_xml_gets_the_real_size(tmp_path):
    root = make_root(tmp_path, {"a": xml(obj("cat"), filename=None, size="<size><width>0</width></size>")})
    dataset, summary = training_set(root, "train")
    assert (dataset[0].width, dataset[0].height) == (40, 30)
    assert "using the real size of 1 images" in summary


@needs_bccd
def test_bccd_single_pixel_boxes_are_dropped_for_training():
    report = check_data(BCCD, "trainval")
    dataset = report.repaired("trainval")
    assert dataset.summary == "repaired: dropped 2 degenerate boxes (BloodImage_00338, BloodImage_00343)"
    assert sum(dataset[i].boxes.shape[0] for i in range(len(dataset))) == 3943 - 2


def test_coco_training_set_drops_zero_area_boxes_and_pickles(tmp_path):
    import json
    import pickle

    Image.new("RGB", (40, 30)).save(tmp_path / "a.jpg")
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 6]},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [30, 20, 20, 20]}]
    (tmp_path / "train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}], "annotations": anns,
        "categories": [{"id": 3, "name": "cat"}]}))
    dataset, summary = training_set(tmp_path / "train.json", "train")
    # the crossing box is clipped by the repairs and said, as on VOC data (the COCO reader no longer clips silently)
    assert summary == "repaired: clipped 1 boxes to their image (1); dropped 1 degenerate boxes (1)"
    assert dataset.classes == ("cat",) and dataset[0].boxes.tolist() == [[2, 2, 11, 11], [30, 20, 39, 29]]
    again = pickle.loads(pickle.dumps(dataset))  # DataLoader workers
    assert again[0].boxes.tolist() == dataset[0].boxes.tolist() and again.json_path == dataset.json_path
