"""Real photos: EXIF orientation (read upright everywhere, annotation sizes of the sideways pixels reported),
16-bit PNG, CMYK JPEG, multi-frame files named .jpg, a 1x1 image, images without boxes in training, and
symbolic links that leave the data folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_voc import make_root, obj, xml

from frcnn.cli import main
from frcnn.config import load_config
from frcnn.data.check import check_data, check_voc
from frcnn.data.coco import COCODataset
from frcnn.data.images import inspect_image, open_image
from frcnn.data.voc import VOCDataset, parse_voc_xml
from frcnn.engine.batches import TrainBatches
from frcnn.engine.detect import open_image as detect_open_image
from frcnn.errors import DataError
from frcnn.model.detector import FasterRCNN
from frcnn.model.trace import Trace

TINY = ["--no-progress", "--config", "demo-cpu", "--set", "TRAIN.SCALES=[64]", "--set", "TRAIN.MAX_SIZE=64",
        "--set", "TRAIN.MAX_ITERS=2", "--set", "TRAIN.SNAPSHOT_ITERS=2", "--set", "DEVICE=cpu",
        "--set", "TRAIN.USE_FLIPPED=False"]

# ----------------------------------------------------------------------------------- EXIF orientation

W, H = 48, 32  # the upright image: landscape, so tags 5..8 store it portrait
RED_BOX = (4, 18, 21, 27)  # 0-based inclusive, in the upright image; no flip or turn maps it onto itself
BLUE_BOX = (30, 3, 43, 12)
GREY, RED, BLUE = (128, 128, 128), (230, 20, 20), (20, 20, 230)


def upright() -> np.ndarray:
    a = np.zeros((H, W, 3), np.uint8)
    a[:] = GREY
    for (x1, y1, x2, y2), colour in ((RED_BOX, RED), (BLUE_BOX, BLUE)):
        a[y1:y2 + 1, x1:x2 + 1] = colour
    return a


def stored_pixels(up: np.ndarray, tag: int) -> np.ndarray:
    """The pixels a camera stores for the upright picture ``up`` under EXIF orientation ``tag``, written from the
    EXIF specification's table of where the stored 0th row and 0th column are shown, not from Pillow:
    1 top/left, 2 top/right, 3 bottom/right, 4 bottom/left, 5 left/top, 6 right/top, 7 right/bottom, 8 left/bottom.
    ``stored[i, j]`` = ``up[row(i, j), col(i, j)]``."""
    h, w = up.shape[:2]
    if tag <= 4:  # rows stay rows
        i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        row = i if tag in (1, 2) else h - 1 - i
        col = j if tag in (1, 4) else w - 1 - j
    else:  # the stored rows are the upright columns: stored is w x h
        i, j = np.meshgrid(np.arange(w), np.arange(h), indexing="ij")
        col = i if tag in (5, 8) else w - 1 - i  # 0th row shown on the left (5, 8) or on the right (6, 7)
        row = j if tag in (5, 6) else h - 1 - j  # 0th column shown at the top (5, 6) or at the bottom (7, 8)
    return up[row, col]


def write_photo(path: Path, tag: int, fmt: str = "JPEG") -> Path:
    exif = Image.Exif()
    exif[0x0112] = tag
    extra = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
    Image.fromarray(stored_pixels(upright(), tag)).save(path, format=fmt, exif=exif, **extra)
    return path


def mean_colour(image: Image.Image, box) -> np.ndarray:
    x1, y1, x2, y2 = box
    return np.asarray(image, dtype=np.float64)[y1 + 2:y2 - 1, x1 + 2:x2 - 1].reshape(-1, 3).mean(0)


def assert_upright(image: Image.Image) -> None:
    assert image.mode == "RGB" and image.size == (W, H)
    assert np.abs(mean_colour(image, RED_BOX) - RED).max() < 12
    assert np.abs(mean_colour(image, BLUE_BOX) - BLUE).max() < 12
    assert np.abs(np.asarray(image, dtype=np.float64)[28:31, 2:6].reshape(-1, 3).mean(0) - GREY).max() < 12


def photo_root(root: Path, tag: int, size: tuple[int, int] = (W, H)) -> Path:
    """A VOC root with one photo stored with EXIF ``tag`` and an annotation of ``size`` with the red box and
    the blue box (1-based in the XML)."""
    boxes = [obj("red", tuple(v + 1 for v in RED_BOX)), obj("blue", tuple(v + 1 for v in BLUE_BOX))]
    make_root(root, {"p": xml(*boxes, filename="p.jpg",
                              size=f"<size><width>{size[0]}</width><height>{size[1]}</height></size>")})
    write_photo(root / "JPEGImages" / "p.jpg", tag)
    return root


def test_stored_pixels_follow_the_exif_table():
    """The test's own table, on a 2x3 picture: tag 6 stores it turned a quarter counter-clockwise (a phone
    held upright, sensor on its side), tag 8 a quarter clockwise, tag 3 upside down."""
    up = np.arange(6).reshape(2, 3)[..., None]
    assert stored_pixels(up, 1)[..., 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert stored_pixels(up, 3)[..., 0].tolist() == [[5, 4, 3], [2, 1, 0]]
    assert stored_pixels(up, 6)[..., 0].tolist() == [[2, 5], [1, 4], [0, 3]]
    assert stored_pixels(up, 8)[..., 0].tolist() == [[3, 0], [4, 1], [5, 2]]
    assert stored_pixels(up, 5)[..., 0].tolist() == [[0, 3], [1, 4], [2, 5]]


@pytest.mark.parametrize("tag", range(1, 9))
def test_every_orientation_is_read_upright_by_every_reader(tmp_path, tag):
    root = photo_root(tmp_path / "voc", tag)
    path = root / "JPEGImages" / "p.jpg"
    with Image.open(path) as raw:  # the file really holds the sideways pixels and the tag
        assert raw.size == ((H, W) if tag >= 5 else (W, H)) and raw.getexif()[0x0112] == tag
        if tag != 1:
            assert np.abs(mean_colour(raw.convert("RGB"), RED_BOX) - RED).max() > 40
    assert_upright(open_image(path))
    assert_upright(detect_open_image(path))  # detect and explain
    info, problems = inspect_image(path)  # check-data
    assert (info.width, info.height, info.orientation) == (W, H, tag) and problems == []
    assert info.stored_size == ((H, W) if tag >= 5 else (W, H))
    ds = VOCDataset(root, "train")  # training, eval, report
    assert_upright(ds.load_image(ds[0]))
    assert check_voc(root, "train").problems == []


@pytest.mark.parametrize("tag", [3, 6])
def test_coco_reader_reads_upright_and_checks_the_upright_size(tmp_path, tag):
    write_photo(tmp_path / "p.jpg", tag)
    data = {"images": [{"id": 1, "file_name": "p.jpg", "width": W, "height": H}], "categories": [{"id": 1,
            "name": "red"}], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 18, 18, 10]}]}
    (tmp_path / "a.json").write_text(json.dumps(data))
    ds = COCODataset(tmp_path / "a.json")
    assert_upright(ds.load_image(ds[0]))
    assert check_data(tmp_path / "a.json").problems == []


@pytest.mark.parametrize("tag", [5, 6, 7, 8])
def test_annotation_of_the_sideways_pixels_is_reported(tmp_path, tag):
    """An annotation whose <size> is the stored (sideways) size: the tool ignored EXIF. Reported with the file,
    both sizes and the orientation, not repaired (training stops)."""
    root = photo_root(tmp_path / "voc", tag, size=(H, W))
    report = check_voc(root, "train")
    assert [p.kind for p in report.problems] == ["exif-rotated-size"]
    p = report.problems[0]
    assert not p.repairable and p.file == str(root / "Annotations" / "p.xml")
    assert f"annotation says the image is {H}x{W}" in p.message and f"as stored ({H}x{W})" in p.message
    assert f"EXIF orientation {tag}" in p.message and f"makes it {W}x{H} upright" in p.message
    assert str(root / "JPEGImages" / "p.jpg") in p.message


def test_sideways_size_without_exif_is_a_plain_size_mismatch(tmp_path):
    root = photo_root(tmp_path / "voc", 1, size=(H, W))
    assert [p.kind for p in check_voc(root, "train").problems] == ["size-mismatch"]


def test_sideways_size_in_coco_is_reported(tmp_path):
    write_photo(tmp_path / "p.jpg", 6)
    data = {"images": [{"id": 1, "file_name": "p.jpg", "width": H, "height": W}],
            "categories": [{"id": 1, "name": "red"}], "annotations": []}
    (tmp_path / "a.json").write_text(json.dumps(data))
    report = check_data(tmp_path / "a.json")
    assert [p.kind for p in report.problems] == ["exif-rotated-size"]
    assert report.problems[0].file == str(tmp_path / "a.json") and "EXIF orientation 6" in report.problems[0].message


def test_check_data_and_train_stop_on_the_sideways_annotation(tmp_path, capsys):
    root = photo_root(tmp_path / "voc", 6, size=(H, W))
    assert main(["check-data", "--data", str(root), "--split", "train"]) == 1
    out = capsys.readouterr().out
    assert "exif-rotated-size: 1 (NOT repairable)" in out and "EXIF orientation 6" in out
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--split", "train", "--out", str(run), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "p.xml: annotation says the image is 32x48" in err
    assert not run.exists()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A 2-iteration demo-cpu model trained on an EXIF-6 photo annotated upright (the sizes agree, so it trains)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    root = photo_root(tmp / "voc", 6)
    assert main(["train", "--data", str(root), "--split", "train", "--out", str(tmp / "run"), *TINY]) == 0
    return tmp / "run"


def test_detect_and_explain_see_the_photo_upright(tmp_path, checkpoint):
    photo = write_photo(tmp_path / "phone.jpg", 6)
    out = tmp_path / "det"
    assert main(["detect", "--checkpoint", str(checkpoint), str(photo), "--out", str(out), "--threshold", "1"]) == 0
    result = json.loads((out / "phone.json").read_text())
    assert (result["width"], result["height"]) == (W, H)
    assert_upright(Image.open(out / "phone.png").convert("RGB"))  # nothing drawn at threshold 1: the image itself
    page = tmp_path / "explain"
    assert main(["explain", "--checkpoint", str(checkpoint), str(photo), "--out", str(page)]) == 0
    assert f"({W} x {H})" in (page / "index.html").read_text()


# ----------------------------------------------------------------------------------- modes and frames


def test_16_bit_png_is_scaled_to_8_bits_not_clipped(tmp_path):
    values = np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    info, problems = inspect_image(tmp_path / "deep.png")
    assert [p.kind for p in problems] == ["image-mode"] and "I;16" in problems[0].message
    got = np.asarray(open_image(tmp_path / "deep.png"))
    assert got.shape == (1, 5, 3) and (got == got[..., :1]).all()
    assert got[0, :, 0].tolist() == [0, 1, 4, 128, 255]  # round(v * 255 / 65535); Pillow alone gives 0, 255, ...


def test_16_bit_png_through_the_voc_reader(tmp_path):
    root = make_root(tmp_path / "voc", {"a": xml(obj(), filename=None)})
    ramp = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 54).astype(np.uint16)  # 0 .. 64746
    Image.fromarray(ramp).save(root / "JPEGImages" / "a.jpg", format="PNG")
    ds = VOCDataset(root, "train")
    got = np.asarray(ds.load_image(ds[0]))[..., 0].astype(np.int64)
    assert np.array_equal(got, (ramp.astype(np.int64) * 255 + 32767) // 65535)
    assert sorted(p.kind for p in check_voc(root, "train").problems) == ["format-mismatch", "image-mode"]


def test_cmyk_jpeg_has_the_right_colours(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    cmyk.paste((255, 0, 255, 0), (8, 0, 16, 16))  # green on the right half
    cmyk.save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    assert [p.kind for p in inspect_image(tmp_path / "c.jpg")[1]] == ["image-mode"]
    rgb = np.asarray(open_image(tmp_path / "c.jpg"), dtype=np.int64)
    assert np.abs(rgb[4:12, 1:5].reshape(-1, 3).mean(0) - (255, 0, 0)).max() < 12
    assert np.abs(rgb[4:12, 11:15].reshape(-1, 3).mean(0) - (0, 255, 0)).max() < 12


def frames(path: Path, fmt: str, colours, sizes) -> Path:
    first, *rest = [Image.new("RGB", s, c) for c, s in zip(colours, sizes)]
    first.save(path, format=fmt, save_all=True, append_images=rest)
    return path


@pytest.mark.parametrize("fmt", ["GIF", "TIFF"])
def test_multi_frame_file_named_jpg_is_read_as_its_first_frame(tmp_path, fmt):
    path = frames(tmp_path / "anim.jpg", fmt, [(255, 0, 0), (0, 0, 255), (0, 255, 0)], [(40, 30), (40, 30), (8, 8)]
                  if fmt == "TIFF" else [(40, 30)] * 3)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert np.asarray(image).reshape(-1, 3).tolist() == [[255, 0, 0]] * (40 * 30)
    info, problems = inspect_image(path)
    palette = ["image-mode"] if fmt == "GIF" else []  # a GIF is a palette image
    assert info.frames == 3 and sorted(p.kind for p in problems) == ["format-mismatch", *palette, "multi-frame-image"]
    frame = next(p for p in problems if p.kind == "multi-frame-image")
    assert frame.repairable and f"{fmt} file holds 3 frames" in frame.message and "first is used" in frame.message


def test_camera_mpo_is_not_a_multi_frame_problem(tmp_path):
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "c.jpg", format="MPO", save_all=True,
                                             append_images=[Image.new("RGB", (8, 8))])
    assert Image.open(tmp_path / "c.jpg").n_frames == 2
    assert inspect_image(tmp_path / "c.jpg")[1] == []


def test_training_uses_the_first_frame_and_says_so(tmp_path, capsys):
    root = make_root(tmp_path / "voc", {"a": xml(obj("cat", (5, 5, 30, 25)), filename=None)})
    frames(root / "JPEGImages" / "a.jpg", "GIF", [(200, 0, 0), (0, 0, 200)], [(40, 30)] * 2)
    assert main(["train", "--data", str(root), "--split", "train", "--out", str(tmp_path / "run"), *TINY]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("repaired")]
    assert len(lines) == 1 and "using the first frame of 1 multi-frame images" in lines[0]


# ----------------------------------------------------------------------------------- tiny and empty images


def test_one_pixel_image_is_read(tmp_path):
    Image.new("RGB", (1, 1), (7, 200, 9)).save(tmp_path / "one.png")
    image = open_image(tmp_path / "one.png")
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (7, 200, 9)
    assert inspect_image(tmp_path / "one.png")[1] == []


def background_root(root: Path) -> Path:
    """``a``: a cat; ``empty``: no object at all; ``one``: a 1x1 image whose only box is one pixel (dropped)."""
    make_root(root, {"a": xml(obj("cat", (5, 5, 30, 25)), filename=None), "empty": xml(filename=None),
                     "one": xml(obj("cat", (1, 1, 1, 1)), filename=None,
                                size="<size><width>1</width><height>1</height></size>")})
    Image.new("RGB", (1, 1), (10, 20, 30)).save(root / "JPEGImages" / "one.jpg")
    return root


def test_images_without_boxes_train_as_all_background(tmp_path):
    """The batches of ``empty`` and of the 1x1 image carry no box; the RPN gets background anchors only, every
    sampled RoI is background, and the box losses are zero; ``a`` (control) has foreground."""
    from frcnn.data.check import training_set

    dataset, summary = training_set(background_root(tmp_path / "voc"), "train")
    assert "dropped 1 degenerate boxes (one)" in summary
    cfg = load_config("demo-cpu", ["TRAIN.SCALES=[64]", "TRAIN.MAX_SIZE=64", "TRAIN.USE_FLIPPED=False",
                                   "TRAIN.IMS_PER_BATCH=1", "DEVICE=cpu"])
    batches = TrainBatches(dataset, cfg)
    by_id = {}
    for it in range(3):
        batch = batches[it]
        by_id[batch.image_ids[0]] = batch
    assert set(by_id) == {"a", "empty", "one"}
    torch.manual_seed(0)
    model = FasterRCNN(cfg, len(dataset.classes), load_pretrained=False).train()
    for image_id, batch in by_id.items():
        trace = Trace()
        losses = model(batch.images, batch.image_sizes, batch.gt_boxes, batch.gt_labels,
                       generator=batch.generators(), trace=trace)
        anchors, rois = trace["anchor_target"]["labels"], trace["proposal_target"]["labels"]
        assert all(torch.isfinite(v) for v in losses.values())
        if image_id == "a":
            assert (anchors == 1).any() and (rois > 0).any() and losses["rpn_box"] > 0
            continue
        assert batch.gt_boxes[0].shape == (0, 4)
        assert tuple(batch.images.shape[-2:]) == ((64, 64) if image_id == "one" else (48, 64))  # 1x1 scaled up
        assert not (anchors == 1).any() and (anchors == 0).sum() > 0
        assert rois.numel() > 0 and (rois == 0).all()
        assert losses["rpn_box"] == 0 and losses["rcnn_box"] == 0 and losses["rpn_cls"] > 0 and losses["rcnn_cls"] > 0


def test_train_and_detect_with_a_one_pixel_image(tmp_path, capsys):
    root = background_root(tmp_path / "voc")
    run = tmp_path / "run"
    assert main(["train", "--data", str(root), "--split", "train", "--out", str(run), *TINY]) == 0
    out = tmp_path / "det"
    assert main(["detect", "--checkpoint", str(run), str(root / "JPEGImages" / "one.jpg"), "--out", str(out),
                 "--threshold", "0"]) == 0
    result = json.loads((out / "one.json").read_text())
    assert (result["width"], result["height"]) == (1, 1)
    assert all(0 <= v <= 0 for d in result["detections"] for v in d["box"])  # clipped to the one pixel
    assert Image.open(out / "one.png").size[0] >= 1


# ----------------------------------------------------------------------------------- symbolic links


def linked_root(tmp_path: Path) -> Path:
    """A VOC root whose ``inside`` links to an image in a subfolder (fine), ``outside`` links to a file
    outside the data folder, and ``viadir`` names ``sub/x.jpg`` through a linked folder outside."""
    root = make_root(tmp_path / "voc", {"inside": xml(obj(), filename="alias.jpg"),
                                        "outside": xml(obj(), filename="leak.jpg"),
                                        "viadir": xml(obj(), filename="elsewhere/x.jpg")})
    images = root / "JPEGImages"
    (images / "sub").mkdir()
    Image.new("RGB", (40, 30), (200, 100, 0)).save(images / "sub" / "real.jpg")
    (images / "alias.jpg").symlink_to(Path("sub") / "real.jpg")
    secret = tmp_path / "secret"
    secret.mkdir()
    Image.new("RGB", (40, 30)).save(secret / "x.jpg")
    (images / "leak.jpg").symlink_to(secret / "x.jpg")
    (images / "elsewhere").symlink_to(secret, target_is_directory=True)
    return root


def test_voc_reader_refuses_symlinks_that_leave_the_folder(tmp_path):
    root = linked_root(tmp_path)
    annotations = root / "Annotations"
    classes = {"cat": 1}
    inside = parse_voc_xml(annotations / "inside.xml", classes)
    assert inside.path == root / "JPEGImages" / "alias.jpg"
    for name in ("outside", "viadir"):
        with pytest.raises(DataError, match=r"points outside .*JPEGImages \(a symbolic link to .*secret") as e:
            parse_voc_xml(annotations / f"{name}.xml", classes)
        assert str(e.value).startswith(str(annotations / f"{name}.xml")) and "\n" not in str(e.value)
    (root / "ImageSets" / "Main" / "ok.txt").write_text("inside\n")
    ds = VOCDataset(root, "ok")
    assert np.abs(np.subtract(ds.load_image(ds[0]).getpixel((20, 15)), (200, 100, 0))).max() <= 3
    with pytest.raises(DataError, match="outside.xml: <filename> 'leak.jpg' points outside"):
        VOCDataset(root, "train")


def test_a_linked_images_folder_is_fine(tmp_path):
    """The images folder itself may be a link (data kept on another disk): both sides are resolved."""
    root = make_root(tmp_path / "voc", {"a": xml(obj(), filename=None)})
    disk = tmp_path / "disk"
    (root / "JPEGImages").rename(disk)
    (root / "JPEGImages").symlink_to(disk, target_is_directory=True)
    ds = VOCDataset(root, "train")
    assert ds.load_image(ds[0]).size == (40, 30)


def test_lexical_escape_is_still_refused(tmp_path):
    root = make_root(tmp_path / "voc", {"a": xml(obj(), filename="../Annotations/a.xml")})
    with pytest.raises(DataError, match=r"points outside .*JPEGImages$"):
        VOCDataset(root, "train")


def coco_linked(tmp_path: Path) -> Path:
    images = tmp_path / "coco"
    images.mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(images / "real.jpg")
    secret = tmp_path / "secret"
    secret.mkdir()
    Image.new("RGB", (40, 30)).save(secret / "x.jpg")
    (images / "alias.jpg").symlink_to("real.jpg")
    (images / "leak.jpg").symlink_to(secret / "x.jpg")
    return images


def coco_json(images: Path, names: list[str]) -> Path:
    data = {"images": [{"id": i, "file_name": n, "width": 40, "height": 30} for i, n in enumerate(names, 1)],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 9, 9]}
                            for i in range(1, len(names) + 1)]}
    path = images / "a.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_reader_refuses_symlinks_that_leave_the_folder(tmp_path):
    images = coco_linked(tmp_path)
    ds = COCODataset(coco_json(images, ["alias.jpg"]))
    assert ds[0].path == images / "alias.jpg" and ds.load_image(ds[0]).size == (40, 30)
    with pytest.raises(DataError, match=r"images\[1\]: file_name 'leak.jpg' points outside .*a symbolic link to "):
        COCODataset(coco_json(images, ["alias.jpg", "leak.jpg"]))


def test_check_data_reports_symlinks_that_leave_the_folder(tmp_path, capsys):
    root = linked_root(tmp_path)
    report = check_voc(root, "train")
    outside = sorted((p.file, p.kind) for p in report.problems)
    assert outside == [(str(root / "Annotations" / f"{n}.xml"), "path-outside-data") for n in ("outside", "viadir")]
    assert main(["check-data", "--data", str(root), "--split", "train"]) == 1
    assert "path-outside-data: 2 (NOT repairable)" in capsys.readouterr().out
    images = coco_linked(tmp_path / "c")
    report = check_data(coco_json(images, ["alias.jpg", "leak.jpg"]))
    outside = [p for p in report.problems if p.kind == "path-outside-data"]  # (its annotation is then orphaned)
    assert [p.message.split(":")[0] for p in outside] == ["images[1]"] and report.unrepairable
    assert os.path.realpath(tmp_path / "c" / "secret" / "x.jpg") in outside[0].message


def test_a_name_the_os_cannot_look_up_is_an_ordinary_missing_image(tmp_path):
    """Resolving links must not turn a NUL byte in a JSON ``file_name`` into a crash."""
    images = coco_linked(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        COCODataset(coco_json(images, ["a\0b.jpg"]))
    assert [p.kind for p in check_data(coco_json(images, ["a\0b.jpg"])).problems] == ["missing-image"]
