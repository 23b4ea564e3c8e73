"""benchmarks/make_wbc_crops.py: windows hold the whole cell at 45..90 % of their side, boxes are clipped by hand-
worked answers, and the written set reads back (pixels and boxes) with frcnn's own VOC reader."""

import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frcnn.data.voc import VOCDataset, write_voc_xml

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "make_wbc_crops.py"
_spec = importlib.util.spec_from_file_location("make_wbc_crops", _PATH)
wbc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wbc)
BCCD = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "BCCD" / "BCCD"


def test_window_holds_the_cell_at_the_drawn_fraction():
    cell = (100.0, 50.0, 179.0, 109.0)  # 80 x 60 px, inclusive
    for k in range(300):
        rng = random.Random(k)
        side = wbc.window_side(cell, 640, 480, rng)
        assert 80 / 0.9 - 0.5 <= side <= 80 / 0.45 + 0.5
        x0, y0 = wbc.place_window(cell, side, 640, 480, rng)
        assert 0 <= x0 and x0 + side <= 640 and 0 <= y0 and y0 + side <= 480  # the window is inside the image
        assert x0 <= 100 and 179 < x0 + side and y0 <= 50 and 109 < y0 + side  # and holds every pixel of the cell


def test_window_never_exceeds_the_image():
    cell = (10.0, 0.0, 209.0, 199.0)  # 200 px in a 300 x 200 image: at most the shorter side, 200
    for k in range(50):
        rng = random.Random(k)
        side = wbc.window_side(cell, 300, 200, rng)
        assert side == 200
        x0, y0 = wbc.place_window(cell, side, 300, 200, rng)
        assert (x0, y0) == (10, 0)  # the only window of 200 px holding x 10..209


def test_clipping_known_answers():
    box = (10.0, 20.0, 59.0, 69.0)  # 50 x 50 = 2500 px
    # window x 30..69, y 0..39: the box keeps x 30..59, y 20..39 -> (0, 20, 29, 39), 30 x 20 = 600 px
    assert wbc.clip_to_window(box, 30, 0, 40) == (0.0, 20.0, 29.0, 39.0)
    assert wbc.inside_fraction(box, 30, 0, 40) == pytest.approx(600 / 2500)
    assert wbc.inside_fraction(box, 60, 0, 40) == 0.0  # the window starts right after the box
    assert wbc.inside_fraction(box, 0, 0, 100) == 1.0


def test_a_cell_always_cut_by_another_leaves_the_image_out():
    cell = (90.0, 90.0, 109.0, 109.0)
    other = (0.0, 0.0, 199.0, 199.0)  # holds the cell: every window shows a part of it, never half (< 44^2 / 200^2)
    for k in range(20):
        assert wbc.crop_around(cell, [cell, other], 200, 200, random.Random(k)) is None
    beside = (150.0, 90.0, 169.0, 109.0)  # another cell 40 px to the right: in whole, in part (>= half) or out
    for k in range(50):
        x0, y0, side, kept = wbc.crop_around(cell, [cell, beside], 200, 200, random.Random(k))
        assert kept[0] == (90.0 - x0, 90.0 - y0, 109.0 - x0, 109.0 - y0)
        assert len(kept) in (1, 2)
        if len(kept) == 2:
            x1, _, x2, _ = kept[1]
            assert x1 == 150 - x0 and x2 - x1 + 1 >= 10 and x2 == min(169 - x0, side - 1)


def _fake_bccd(root: Path) -> dict[str, tuple]:
    """Two images with a WBC and RBCs (PNG, lossless), one without a WBC; trainval and test."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    yy, xx = np.mgrid[0:240, 0:320]
    pixels = np.stack([xx % 256, yy % 256, (xx * 7 + yy * 3) % 256], -1).astype(np.uint8)  # every place differs
    truth = {"a": (60.0, 40.0, 139.0, 129.0), "b": (200.0, 100.0, 279.0, 169.0)}
    for image_id, objects in {"a": [("WBC", truth["a"]), ("RBC", (0, 0, 30, 30))],
                              "b": [("RBC", (5, 5, 40, 40)), ("WBC", truth["b"])],
                              "c": [("RBC", (5, 5, 40, 40))]}.items():
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{image_id}.png")
        write_voc_xml(root / "Annotations" / f"{image_id}.xml", f"{image_id}.png", 320, 240, objects)
    (root / "ImageSets/Main/trainval.txt").write_text("a\nc\n")
    (root / "ImageSets/Main/test.txt").write_text("b\n")
    return {"pixels": pixels, **truth}


def test_written_set_reads_back(tmp_path):
    fake = _fake_bccd(tmp_path / "bccd")
    out = tmp_path / "wbc"
    counts = wbc.make_wbc_crops(tmp_path / "bccd", out, seed=3)
    assert counts == {"trainval": (1, 1), "test": (1, 1)}  # "c" has no white cell
    for split, image_id in (("trainval", "a"), ("test", "b")):
        data = VOCDataset(out, split)
        assert data.classes == ("WBC",) and [data[i].image_id for i in range(len(data))] == [image_id]
        sample = data[0]
        side = sample.width
        assert sample.height == side
        got = sample.boxes[0].tolist()
        x1, y1, x2, y2 = fake[image_id]
        x0, y0 = x1 - got[0], y1 - got[1]  # the window's corner, from the box's shift
        assert got == [x1 - x0, y1 - y0, x2 - x0, y2 - y0]
        assert 0.45 <= 80 / side <= 0.9 + 1e-9 or side == 240
        crop = np.asarray(data.load_image(sample), dtype=np.float64)
        want = fake["pixels"][int(y0):int(y0) + side, int(x0):int(x0) + side].astype(np.float64)
        assert crop.shape == want.shape and np.abs(crop - want).mean() < 3  # JPEG q95: the same pixels
    assert "BCCD" in (out / "SOURCE.txt").read_text()


def test_refuses_a_folder_with_files(tmp_path):
    _fake_bccd(tmp_path / "bccd")
    (tmp_path / "wbc").mkdir()
    (tmp_path / "wbc" / "mine.txt").write_text("keep me")
    assert wbc.main(["--bccd", str(tmp_path / "bccd"), "--out", str(tmp_path / "wbc")]) == 1
    assert (tmp_path / "wbc" / "mine.txt").read_text() == "keep me"
    assert not (tmp_path / "wbc" / "Annotations").exists()


def test_a_bad_source_leaves_no_output_behind(tmp_path, capsys):
    (tmp_path / "notvoc" / "Annotations").mkdir(parents=True)
    assert wbc.main(["--bccd", str(tmp_path / "notvoc"), "--out", str(tmp_path / "wbc")]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'notvoc' / 'JPEGImages'}: missing folder (a VOC "
                                               "root holds Annotations/, JPEGImages/, ImageSets/Main/)")
    assert not (tmp_path / "wbc").exists()  # so the same --out works once --bccd is right
    _fake_bccd(tmp_path / "bccd")
    assert wbc.main(["--bccd", str(tmp_path / "bccd"), "--out", str(tmp_path / "wbc")]) == 0


def test_a_failure_while_writing_removes_what_was_written(tmp_path, monkeypatch):
    _fake_bccd(tmp_path / "bccd")
    (tmp_path / "wbc").mkdir()  # the user's empty folder stays, empty

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(wbc, "write_voc_xml", broken)
    with pytest.raises(OSError):
        wbc.make_wbc_crops(tmp_path / "bccd", tmp_path / "wbc")
    assert (tmp_path / "wbc").is_dir() and not any((tmp_path / "wbc").iterdir())


@pytest.mark.skipif(not BCCD.is_dir(), reason=f"BCCD not found at {BCCD}")
def test_bccd_crops_hold_whole_white_cells(tmp_path):
    out = tmp_path / "wbc"
    counts = wbc.make_wbc_crops(BCCD, out, seed=0)
    assert counts["trainval"][0] > 250 and counts["test"][0] > 60
    for split in ("trainval", "test"):
        source_ids = set((BCCD / "ImageSets/Main" / f"{split}.txt").read_text().split())
        data = VOCDataset(out, split)  # strict: every box inside its image
        assert {data[i].image_id for i in range(len(data))} <= source_ids  # the split is kept
        for i in range(len(data)):
            s = data[i]
            widths = s.boxes[:, 2] - s.boxes[:, 0] + 1
            heights = s.boxes[:, 3] - s.boxes[:, 1] + 1
            assert len(s.boxes) >= 1 and float(torch.maximum(widths, heights).max()) >= 0.45 * s.width - 1
