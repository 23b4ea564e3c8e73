"""``frcnn check-data``: every problem of a crafted VOC folder and COCO file found and named by file and value,
the counts, the BCCD figures, the command's table / JSON / exit codes, and the check before training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from test_images import png_claiming, truncated
from test_voc import BCCD, make_root, needs_bccd, obj, xml

from frcnn.cli import main
from frcnn.data.check import check_data, check_voc
from frcnn.data.voc import VOCDataset

LAUGHS = ('<?xml version="1.0"?><!DOCTYPE annotation [<!ENTITY a "aaaaaaaaaa">'
          + "".join(f'<!ENTITY {c} "{f"&{p};" * 10}">' for p, c in zip("abcdefgh", "bcdefghi"))
          + ']><annotation><filename>&i;</filename></annotation>')

# one image per problem; every XML says 40x30 unless the entry says otherwise
ANNOTATIONS = {
    "ok": xml(obj("cat", (1, 1, 20, 20)), obj("dog", (5, 5, 40, 30)), filename=None),
    "empty": xml(filename=None),
    "degenerate": xml(obj("cat", (7, 8, 7, 8)), filename=None),
    "inverted": xml(obj("cat", (20, 1, 10, 10)), filename=None),
    "crossing": xml(obj("dog", (0, 1, 10, 31)), filename=None),
    "outside": xml(obj("dog", (45, 1, 50, 10)), filename=None),
    "duplicate": xml(obj("cat", (2, 2, 9, 9)), obj("cat", (2, 2, 9, 9)), filename=None),
    "missing": xml(obj(), filename=None),
    "unreadable": xml(obj(), filename=None),
    "truncated": xml(obj(), filename=None),
    "pngasjpg": xml(obj(), filename=None),
    "mismatch": xml(obj(), filename=None),
    "sizezero": xml(obj(), filename=None, size="<size><width>0</width><height>0</height></size>"),
    "gray": xml(obj(), filename=None),
    "palette": xml(obj(), filename=None),
    "rgba": xml(obj(), filename=None),
    "horse": xml(obj("horse"), filename=None),
    "unparsable": "<annotation><size>",
    "laughs": LAUGHS,
    "escape": xml(obj(), filename="../../etc/passwd"),
    "bomb": xml(obj(), filename=None),
}

EXPECTED = {  # image id -> the kinds check-data must report for it
    "degenerate": ["degenerate-box"], "inverted": ["inverted-box"], "crossing": ["box-crosses-border"],
    "outside": ["box-outside-image"], "duplicate": ["duplicate-box"], "missing": ["missing-image"],
    "unreadable": ["unreadable-image"], "truncated": ["truncated-image"], "pngasjpg": ["format-mismatch"],
    "mismatch": ["size-mismatch"], "sizezero": ["size-missing"], "gray": ["image-mode"], "palette": ["image-mode"],
    "rgba": ["image-mode"], "horse": ["unknown-class"], "unparsable": ["unparsable-annotation"],
    "laughs": ["unsafe-xml"], "escape": ["path-outside-data"], "bomb": ["image-too-large"],
}


def crafted(root: Path) -> Path:
    make_root(root, ANNOTATIONS)
    images = root / "JPEGImages"
    (images / "missing.jpg").unlink()
    (images / "unreadable.jpg").write_text("not an image at all")
    truncated(images / "truncated.jpg", "JPEG")
    Image.new("RGB", (40, 30)).save(images / "pngasjpg.jpg", format="PNG")
    Image.new("RGB", (30, 40)).save(images / "mismatch.jpg")
    Image.new("L", (40, 30)).save(images / "gray.jpg")
    Image.new("P", (40, 30)).save(images / "palette.jpg", format="PNG")  # a palette PNG named .jpg: two problems
    Image.new("RGBA", (40, 30)).save(images / "rgba.jpg", format="PNG")
    png_claiming(images / "bomb.jpg", 50_000, 50_000)
    (root / "ImageSets" / "Main" / "small.txt").write_text("ok\nempty\n")
    return root


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = crafted(tmp_path_factory.mktemp("voc"))
    return check_voc(root, "train", classes=["cat", "dog"])


def test_every_problem_is_found_with_its_file(report):
    by_id: dict[str, list[str]] = {}
    for p in report.problems:
        by_id.setdefault(Path(p.file).stem, []).append(p.kind)
    by_id["palette"].remove("format-mismatch")
    by_id["rgba"].remove("format-mismatch")
    assert by_id == EXPECTED


def test_problems_carry_the_exact_values(report):
    lines = {p.kind: p.line for p in report.problems}
    assert lines["degenerate-box"].endswith("degenerate.xml: box 1 (cat) (7, 8, 7, 8) has zero extent "
                                            "(min == max: 1x1 pixel under the +1 convention)")
    assert "inverted.xml: box 1 (cat) (20, 1, 10, 10) is inverted" in lines["inverted-box"]
    assert "crossing.xml: box 1 (dog) (0, 1, 10, 31) crosses the border of the 40x30 image" in lines[
        "box-crosses-border"]
    assert "(45, 1, 50, 10) lies entirely outside the 40x30 image" in lines["box-outside-image"]
    assert "duplicate.xml: box 2 (cat) (2, 2, 9, 9) repeats" in lines["duplicate-box"]
    assert "annotation says the image is 40x30 but" in lines["size-mismatch"] and "is 30x40" in lines[
        "size-mismatch"]
    assert "<size> has <width> 0" in lines["size-missing"]
    assert "box 1 has unknown class 'horse' (known classes: cat, dog)" in lines["unknown-class"]
    assert "'../../etc/passwd' points outside" in lines["path-outside-data"]
    assert "decompression bomb" in lines["image-too-large"] and "2500000000 pixels" in lines["image-too-large"]
    assert all("\n" not in line for line in lines.values())


def test_repairable_or_not(report):
    repairable = {p.kind for p in report.problems if p.repairable}
    assert repairable == {"degenerate-box", "box-crosses-border", "duplicate-box", "format-mismatch",
                          "size-missing", "image-mode"}
    assert len(report.problems) - len(report.unrepairable) == 10  # 3 boxes, 3 format, 1 size, 3 modes


def test_counts(report):
    counts = report.splits["train"]
    assert counts.images == len(ANNOTATIONS)  # the three unreadable annotations still count as images
    assert counts.without_boxes == 1 + 1  # "empty", and "horse" whose only box has an unknown class
    assert counts.boxes == Counter(cat=15, dog=3)
    assert report.classes == ("cat", "dog")


def test_all_splits_and_distinct_images(tmp_path):
    root = crafted(tmp_path / "voc")
    report = check_voc(root)
    assert list(report.splits) == ["small", "train"]
    assert report.splits["small"].images == 2 and report.splits["small"].without_boxes == 1
    assert report.total.images == len(ANNOTATIONS)
    assert len(report.problems) == len(set(report.problems))  # "ok" and "empty" read twice, reported once


def test_lenient_reader_keeps_the_strict_one_line_errors(tmp_path):
    root = make_root(tmp_path, {"a": xml(obj("cat", (20, 1, 10, 10)), filename=None), "b": "<annotation>"})
    with pytest.raises(Exception, match=r"a\.xml: box 1 has x2 < x1"):
        VOCDataset(root, "train")
    problems = []
    ds = VOCDataset(root, "train", problems=problems)
    assert ds.listed == ("a", "b") and ds.ids == ("a",)
    assert [p.kind for p in problems] == ["unparsable-annotation"]
    assert ds[0].boxes.tolist() == [[19, 0, 9, 9]]  # kept as written for check-data to judge


def test_missing_annotation_is_reported(tmp_path):
    root = make_root(tmp_path, {"a": xml(filename=None)})
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nb\n")
    report = check_voc(root, "train", classes=["cat"])
    assert [(Path(p.file).name, p.kind) for p in report.problems] == [("b.xml", "missing-annotation")]


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(Exception, match="no such data folder"):
        check_data(tmp_path / "nothing")


# ----------------------------------------------------------------------------------------------- COCO


def coco_file(root: Path) -> Path:
    Image.new("RGB", (40, 30)).save(root / "a.jpg")
    Image.new("L", (40, 30)).save(root / "b.jpg")
    images = [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30},
              {"id": 2, "file_name": "b.jpg", "width": 40, "height": 30},
              {"id": 3, "file_name": "gone.jpg", "width": 40, "height": 30},
              {"id": 4, "file_name": "../../etc/passwd", "width": 40, "height": 30}]
    boxes = [(1, [0, 0, 10, 10]), (1, [5, 5, 0, 4]), (1, [5, 5, -3, 4]), (1, [35, 25, 10, 10]),
             (1, [50, 5, 3, 3]), (2, [1, 1, 5, 5]), (2, [1, 1, 5, 5]), (1, "oops")]
    anns = [{"id": 10 + i, "image_id": img, "category_id": 7, "bbox": b} for i, (img, b) in enumerate(boxes)]
    anns.append({"id": 99, "image_id": 1, "category_id": 8, "bbox": [1, 1, 2, 2]})
    path = root / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 7, "name": "cat"}]}))
    return path


def test_coco_problems(tmp_path):
    report = check_data(coco_file(tmp_path))
    found = sorted((p.kind, p.message.split(":")[0] if p.file.endswith(".json") else Path(p.file).name)
                   for p in report.problems)
    assert found == sorted([
        ("zero-area-box", "annotation id 11"), ("inverted-box", "annotation id 12"),
        ("box-crosses-border", "annotation id 13 (cat) [35, 25, 10, 10] crosses the border of the 40x30 image"),
        ("box-outside-image", "annotation id 14 (cat) [50, 5, 3, 3] lies entirely outside the 40x30 image"),
        ("duplicate-box", "annotation id 16 (cat) [1, 1, 5, 5] repeats an earlier box of the same class"),
        ("bad-annotation", "annotation id 17"), ("unknown-class", "annotation id 99"),
        ("image-mode", "b.jpg"), ("missing-image", "gone.jpg"), ("path-outside-data", "images[3]"),
    ])
    assert report.format == "coco" and report.classes == ("cat",)
    assert report.total.images == 3 and report.total.boxes == Counter(cat=5)


def test_coco_that_does_not_parse_is_one_problem(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    report = check_data(tmp_path / "bad.json")
    assert [p.kind for p in report.problems] == ["unparsable-annotation"] and report.unrepairable


# ----------------------------------------------------------------------------------------------- BCCD


@needs_bccd
def test_bccd_report():
    report = check_data(BCCD)
    assert {k: v.images for k, v in report.splits.items()} == {"test": 72, "train": 205, "trainval": 292, "val": 87}
    assert report.total.images == 364 and report.total.without_boxes == 0
    assert report.total.boxes == {"RBC": 4155, "WBC": 372, "Platelets": 361}
    assert sum(report.total.boxes.values()) == 4888
    assert [(Path(p.file).name, p.kind, p.box) for p in report.problems] == [
        ("BloodImage_00338.xml", "degenerate-box", 13), ("BloodImage_00343.xml", "degenerate-box", 4)]
    assert "(504, 337, 504, 337)" in report.problems[0].message
    assert "(181, 329, 181, 329)" in report.problems[1].message
    assert not report.unrepairable


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_table_and_exit_code_1_on_unrepairable(report, capsys):
    code = main(["check-data", "--data", str(report.source), "--split", "train", "--classes", "cat,dog",
                 "--no-progress", "--config", "demo-cpu"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines()[1].split() == ["split", "images", "no", "boxes", "cat", "dog", "boxes"]
    assert out.splitlines()[2].split() == ["train", str(len(ANNOTATIONS)), "2", "15", "3", "18"]
    assert "degenerate-box: 1 (repairable: dropped)" in out and "inverted-box: 1 (NOT repairable)" in out
    assert "anchor fit:" in out and "ANCHOR_SCALES [2, 2.828, 4, 5.657, 8]" in out


def test_cli_json_and_exit_code_0_when_all_repairable(tmp_path, capsys):
    root = make_root(tmp_path / "voc", {"a": xml(obj("cat", (0, 1, 10, 10)), obj("cat", (3, 3, 3, 3)), filename=None)})
    plot = tmp_path / "hist.png"
    code = main(["check-data", "--data", str(root), "--json", "--plot", str(plot)])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["total"]["boxes_per_class"] == {"cat": 2} and result["unrepairable"] == 0
    assert result["problem_counts"] == {"box-crosses-border": {"count": 1, "repairable": True,
                                                               "repair": "clipped to the image"},
                                        "degenerate-box": {"count": 1, "repairable": True, "repair": "dropped"}}
    assert result["problems"][0]["file"].endswith("a.xml") and result["problems"][0]["box"] == 1
    assert result["anchor_fit"]["boxes"] == 1 and "suggested_anchor_scales" in result
    assert Image.open(plot).format == "PNG"


def test_cli_missing_folder_is_one_line_exit_2(tmp_path, capsys):
    assert main(["check-data", "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope: no such data folder or file" in err


TINY = ["--no-progress", "--config", "demo-cpu", "--set", "TRAIN.SCALES=[64]", "--set", "TRAIN.MAX_SIZE=64",
        "--set", "TRAIN.MAX_ITERS=1", "--set", "TRAIN.SNAPSHOT_ITERS=1", "--set", "DEVICE=cpu",
        "--set", "TRAIN.USE_FLIPPED=False"]


def test_train_repairs_with_one_summary_line_and_trains(tmp_path, capsys):
    root = make_root(tmp_path / "voc", {"a": xml(obj("cat", (0, 1, 20, 31)), obj("cat", (5, 5, 5, 9)), filename=None)})
    Image.new("L", (40, 30)).save(root / "JPEGImages" / "a.jpg")
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--split", "train", "--out", str(out), *TINY]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("repaired")]
    assert lines == ["repaired: clipped 1 boxes to their image (a); dropped 1 degenerate boxes (a); "
                     "converting 1 images to RGB"]
    assert (out / "model.safetensors").is_file()


def test_train_stops_before_the_first_iteration_on_unrepairable(tmp_path, capsys):
    root = make_root(tmp_path / "voc", {"a": xml(obj(), filename=None), "b": xml(obj(), filename=None)})
    truncated(root / "JPEGImages" / "b.jpg", "JPEG")
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--split", "train", "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "b.jpg: cannot read image: data truncated" in err
    assert "frcnn check-data --data" in err
    assert not out.exists()


@pytest.mark.parametrize("text, says", [("[" * 100000 + "]" * 100000, "nested too deeply"),
                                        ('{"images": [], "categories": [], "x": 1' + "0" * 5000 + "}",
                                         "not valid JSON")])
def test_check_data_reports_json_python_cannot_read(tmp_path, text, says, capsys):
    path = tmp_path / "ann.json"
    path.write_text(text)
    code = main(["check-data", "--data", str(path), "--json"])
    assert code in (1, 2)
    out = capsys.readouterr()
    assert says in out.out + out.err and "Traceback" not in out.err


def test_an_error_about_a_name_with_a_line_break_stays_one_line(tmp_path, capsys):
    assert main(["eval", "--detections", str(tmp_path / "a\nb.json"), "--data", str(tmp_path / "x\ny")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "\\n" in err
