"""PASCAL VOC reader: every refusal on crafted XML, the +1/1-based conversion, and the real BCCD set."""

from __future__ import annotations

import tracemalloc
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

from frcnn.data.voc import VOCDataset, parse_voc_xml, write_voc_xml
from frcnn.errors import DataError

BCCD = Path(__file__).resolve().parents[1].parent / "shared/datasets/BCCD/BCCD"
CLASSES = {"cat": 1, "dog": 2}


def obj(name="cat", box=(1, 1, 10, 10), difficult: str | None = "0") -> str:
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    coords = "".join(f"<{t}>{v}</{t}>" for t, v in zip(("xmin", "ymin", "xmax", "ymax"), box))
    return f"<object><name>{name}</name>{diff}<bndbox>{coords}</bndbox></object>"


def xml(*objects: str, filename: str | None = "a.jpg", size: str = "<size><width>40</width><height>30</height></size>"):
    fn = "" if filename is None else f"<filename>{filename}</filename>"
    return f"<annotation>{fn}{size}{''.join(objects)}</annotation>"


def write(root: Path, name: str, text: str) -> Path:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    path = root / "Annotations" / f"{name}.xml"
    path.write_text(text)
    return path


def make_root(root: Path, annotations: dict[str, str], split: str = "train", size=(40, 30)) -> Path:
    for name, text in annotations.items():
        write(root, name, text)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for name in annotations:
        Image.new("RGB", size, (10, 20, 30)).save(root / "JPEGImages" / f"{name}.jpg")
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in annotations))
    return root


# ----------------------------------------------------------------------------------- parse_voc_xml


def test_parse_converts_to_zero_based_and_reads_fields(tmp_path):
    objects = obj("cat", (1, 2, 40, 30)), obj("dog", (5, 6, 5, 6), "1"), obj("cat", difficult=None)
    path = write(tmp_path, "a", xml(*objects))
    s = parse_voc_xml(path, CLASSES)
    assert s.image_id == "a"
    assert s.path == tmp_path / "JPEGImages" / "a.jpg"
    assert (s.width, s.height) == (40, 30)
    assert s.boxes.dtype == torch.float32
    assert s.boxes.tolist() == [[0, 1, 39, 29], [4, 5, 4, 5], [0, 0, 9, 9]]
    assert s.labels.dtype == torch.int64 and s.labels.tolist() == [1, 2, 1]
    assert s.difficult.dtype == torch.bool and s.difficult.tolist() == [False, True, False]


def test_parse_without_filename_uses_id_jpg_and_accepts_float_coords(tmp_path):
    path = write(tmp_path, "img_7", xml(obj(box=("1.5", "2", "10.25", "3")), filename=None))
    s = parse_voc_xml(path, CLASSES)
    assert s.path.name == "img_7.jpg"
    assert s.boxes.tolist() == [[0.5, 1.0, 9.25, 2.0]]


def test_parse_no_objects_gives_empty_tensors(tmp_path):
    s = parse_voc_xml(write(tmp_path, "a", xml()), CLASSES)
    assert s.boxes.shape == (0, 4) and s.labels.shape == (0,) and s.difficult.shape == (0,)


def test_class_names_are_stripped(tmp_path):
    s = parse_voc_xml(write(tmp_path, "a", xml(obj("\n\t dog  \n"))), CLASSES)
    assert s.labels.tolist() == [2]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<annotation><size>", "does not parse"),
        ("", "does not parse"),
        ("<voc/>", "expected <annotation>"),
        (xml(size=""), "missing <size>"),
        (xml(size="<size><width>40</width></size>"), "missing <height>"),
        (xml(size="<size><width>forty</width><height>30</height></size>"), "non-numeric <width>"),
        (xml(size="<size><width>0</width><height>30</height></size>"), "positive integer"),
        (xml(obj("")), "missing <name> in box 1"),
        (xml(obj(), "<object><name>cat</name></object>"), "missing <bndbox> in box 2"),
        (xml(obj(box=(1, 1, 10, ""))), "missing <ymax> in box 1"),
        (xml(obj(box=(1, "one", 10, 10))), "box 1 has a non-numeric <ymin> 'one'"),
        (xml(obj(box=(1, 1, "nan", 10))), "non-finite <xmax>"),
        (xml(obj(), obj(box=(50, 1, 40, 10))), "box 2 has x2 < x1 (xmin=50, xmax=40)"),
        (xml(obj(box=(1, 9, 10, 8))), "box 1 has y2 < y1 (ymin=9, ymax=8)"),
        (xml(obj(box=(1, 1, 41, 10))), "outside the 40x30 image"),
        (xml(obj(box=(1, 1, 10, 31))), "outside the 40x30 image"),
        (xml(obj(box=(0, 1, 10, 10))), "outside the 40x30 image"),
        (xml(obj(difficult="maybe")), "non-numeric <difficult>"),
        (xml(obj(difficult="2")), "expected 0 or 1"),
        (xml(obj(), obj("horse")), "box 2 has unknown class 'horse' (known classes: cat, dog)"),
        (xml(filename="../../etc/passwd"), "points outside"),
        (xml(filename="/etc/passwd"), "points outside"),
        (xml(filename="sub/../../a.jpg"), "points outside"),
    ],
)
def test_parse_refusals_are_one_line_data_errors_naming_the_file(tmp_path, text, message):
    path = write(tmp_path, "bad", text)
    with pytest.raises(DataError) as info:
        parse_voc_xml(path, CLASSES)
    msg = str(info.value)
    assert message in msg
    assert msg.startswith(str(path) + ":")
    assert "\n" not in msg


def test_box_on_the_image_edge_is_accepted(tmp_path):
    s = parse_voc_xml(write(tmp_path, "a", xml(obj(box=(1, 1, 40, 30)))), CLASSES)
    assert s.boxes.tolist() == [[0, 0, 39, 29]]


def test_filename_in_a_subfolder_of_jpegimages_is_allowed(tmp_path):
    s = parse_voc_xml(write(tmp_path, "a", xml(filename="sub/./x/../a.jpg")), CLASSES)
    assert s.path == tmp_path / "JPEGImages" / "sub" / "a.jpg"


@contextmanager
def peak_allocation() -> Iterator[list[int]]:
    """``with peak_allocation() as peak:`` sets ``peak[0]`` to the most bytes allocated at once inside the block.

    tracemalloc sees Python's allocations and expat's (pyexpat and ElementTree give expat Python's allocator),
    so this bounds the work of parsing on every machine, unlike a time limit."""
    tracing = tracemalloc.is_tracing()
    if tracing:
        tracemalloc.reset_peak()
    else:
        tracemalloc.start()
    peak = [0]
    start = tracemalloc.get_traced_memory()[0]
    try:
        yield peak
    finally:
        peak[0] = tracemalloc.get_traced_memory()[1] - start
        if not tracing:
            tracemalloc.stop()


def test_billion_laughs_is_refused_without_expansion(tmp_path):
    lol = ['<!ENTITY lol0 "lol">'] + [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    text = f'<?xml version="1.0"?><!DOCTYPE annotation [{"".join(lol)}]>' + xml(filename="&lol9;")
    path = write(tmp_path, "lol", text)
    # &lol9; is 3e9 characters; even expat's own amplification guard lets about 40 MB through before it stops
    with peak_allocation() as peak, pytest.raises(DataError, match="unsafe XML"):
        parse_voc_xml(path, CLASSES)
    assert peak[0] < 1_000_000, peak  # about 0.1 MB: refused at the entity declaration, nothing expanded


def test_external_entity_is_refused(tmp_path):
    text = '<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation>&x;</annotation>'
    with pytest.raises(DataError, match="unsafe XML"):
        parse_voc_xml(write(tmp_path, "ext", text), CLASSES)


def test_write_then_parse_round_trips_zero_based_boxes(tmp_path):
    (tmp_path / "Annotations").mkdir()
    path = tmp_path / "Annotations" / "w.xml"
    write_voc_xml(path, "w.png", 50, 20, [("dog", (0, 0, 49, 19)), ("cat", (3.5, 4, 7, 8), True)])
    assert "<xmax>50</xmax>" in path.read_text() and "<xmin>4.50</xmin>" in path.read_text()
    s = parse_voc_xml(path, CLASSES)
    assert s.path.name == "w.png" and (s.width, s.height) == (50, 20)
    assert s.boxes.tolist() == [[0, 0, 49, 19], [3.5, 4, 7, 8]]
    assert s.labels.tolist() == [2, 1] and s.difficult.tolist() == [False, True]


# ----------------------------------------------------------------------------------- VOCDataset


def test_dataset_gathers_sorted_classes_and_reads_images(tmp_path):
    annotations = {"b": xml(obj("zebra"), filename=None), "a": xml(obj("ant"), obj("zebra"), filename=None)}
    root = make_root(tmp_path, annotations)
    ds = VOCDataset(root, "train")
    assert ds.classes == ("ant", "zebra")
    assert ds.ids == ("b", "a") and len(ds) == 2
    assert ds[1].labels.tolist() == [1, 2] and ds[0].labels.tolist() == [2]
    image = ds.load_image(ds[0])
    assert image.mode == "RGB" and image.size == (40, 30)


def test_dataset_with_given_classes_refuses_unknown_names(tmp_path):
    root = make_root(tmp_path, {"a": xml(obj("cat"), filename=None)})
    assert VOCDataset(root, "train", classes=["dog", "cat"])[0].labels.tolist() == [2]
    with pytest.raises(DataError, match=r"a\.xml: box 1 has unknown class 'cat' \(known classes: dog, horse\)"):
        VOCDataset(root, "train", classes=["dog", "horse"])


def test_dataset_refuses_missing_folders_and_lists_splits(tmp_path):
    root = make_root(tmp_path / "voc", {"a": xml(filename=None)})
    with pytest.raises(DataError, match="no such split \\(available: train\\)"):
        VOCDataset(root, "test")
    with pytest.raises(DataError, match="no such data folder"):
        VOCDataset(tmp_path / "nothing", "train")
    (root / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(DataError, match=r"a\.xml: image .*a\.jpg does not exist"):
        VOCDataset(root, "train")
    (root / "JPEGImages").rmdir()
    with pytest.raises(DataError, match="JPEGImages: missing folder"):
        VOCDataset(root, "train")


def test_dataset_refuses_missing_annotation_and_bad_ids(tmp_path):
    root = make_root(tmp_path, {"a": xml(filename=None)})
    split = root / "ImageSets" / "Main" / "train.txt"
    split.write_text("a\nb\n")
    with pytest.raises(DataError, match=r"b\.xml: cannot read"):
        VOCDataset(root, "train")
    split.write_text("a\na\n")
    with pytest.raises(DataError, match="listed twice"):
        VOCDataset(root, "train")
    split.write_text("../a\n")
    with pytest.raises(DataError, match="not a plain image id"):
        VOCDataset(root, "train")
    split.write_text("\n")
    with pytest.raises(DataError, match="lists no image ids"):
        VOCDataset(root, "train")


def test_load_image_refuses_corrupt_and_mismatched_images(tmp_path):
    root = make_root(tmp_path, {"a": xml(filename=None), "b": xml(filename=None)})
    (root / "JPEGImages" / "a.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.new("L", (41, 30)).save(root / "JPEGImages" / "b.jpg")
    ds = VOCDataset(root, "train", classes=["cat"])
    with pytest.raises(DataError, match=r"a\.jpg: cannot read image"):
        ds.load_image(ds[0])
    with pytest.raises(DataError, match=r"b\.jpg: image is 41x30 but its annotation says 40x30"):
        ds.load_image(ds[1])


# ----------------------------------------------------------------------------------- BCCD

needs_bccd = pytest.mark.skipif(not (BCCD / "Annotations").is_dir(), reason=f"BCCD not found at {BCCD}")


@needs_bccd
def test_bccd_splits_and_counts():
    sizes = {split: len(VOCDataset(BCCD, split)) for split in ("train", "val", "test", "trainval")}
    assert sizes == {"train": 205, "val": 87, "test": 72, "trainval": 292}
    counts: Counter[str] = Counter()
    ids: set[str] = set()
    for split in ("train", "val", "test"):
        ds = VOCDataset(BCCD, split, classes=("Platelets", "RBC", "WBC"))
        ids |= set(ds.ids)
        for s in ds:
            counts.update(ds.classes[k - 1] for k in s.labels.tolist())
            assert bool((s.boxes[:, 2] >= s.boxes[:, 0]).all() and (s.boxes[:, 3] >= s.boxes[:, 1]).all())
            assert bool((s.boxes >= 0).all() and (s.boxes[:, 2] <= s.width - 1).all())
            assert bool((s.boxes[:, 3] <= s.height - 1).all()) and not bool(s.difficult.any())
    assert len(ids) == 364
    assert counts == {"RBC": 4155, "WBC": 372, "Platelets": 361}
    assert sum(counts.values()) == 4888


@needs_bccd
def test_bccd_classes_and_known_degenerate_boxes():
    ds = VOCDataset(BCCD, "trainval")
    test = VOCDataset(BCCD, "test")
    assert ds.classes == test.classes == ("Platelets", "RBC", "WBC")
    s = parse_voc_xml(BCCD / "Annotations" / "BloodImage_00338.xml", {"Platelets": 1, "RBC": 2, "WBC": 3})
    assert s.boxes[12].tolist() == [503, 336, 503, 336]  # a 1x1-pixel RBC in the source data
    first = next(s for s in (*ds, *test) if s.image_id == "BloodImage_00000")
    assert first.boxes[0].tolist() == [259, 176, 490, 375]  # XML (260, 177, 491, 376) minus 1
    assert ds.load_image(ds[0]).size == (ds[0].width, ds[0].height) == (640, 480)
