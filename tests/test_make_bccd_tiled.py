"""benchmarks/make_bccd_tiled.py: four pictures in one, each box moved by its picture's corner (checked against the
pasted pixels), read back with frcnn's own VOC reader; a non-empty --out is refused."""

import importlib.util
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from frcnn.data.voc import VOCDataset, write_voc_xml

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "make_bccd_tiled.py"
_spec = importlib.util.spec_from_file_location("make_bccd_tiled", _PATH)
tiled = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiled)

W, H = 40, 30


def _colour(k: int) -> tuple[int, int, int]:
    return (40 * k % 256, 255 - 30 * k, 80 + 20 * k)


def _voc(root: Path) -> dict[str, tuple[tuple[int, int, int], tuple[int, int, int, int], str]]:
    """5 trainval and 4 test pictures of 40 x 30, grey, each with one box filled with its own colour."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    truth = {}
    for split, ks in (("trainval", range(5)), ("test", range(5, 9))):
        for k in ks:
            box = (2 + k, 3 + k % 4, 12 + 2 * k, 14 + k % 3)  # 0-based inclusive
            im = Image.new("RGB", (W, H), (128, 128, 128))
            ImageDraw.Draw(im).rectangle(box, fill=_colour(k))
            im.save(root / "JPEGImages" / f"p{k}.png")
            name = ("cat", "dog")[k % 2]
            write_voc_xml(root / "Annotations" / f"p{k}.xml", f"p{k}.png", W, H, [(name, box)])
            truth[f"p{k}"] = (_colour(k), box, name)
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"p{k}\n" for k in ks))
    return truth


def test_tiles_move_each_box_with_its_picture(tmp_path):
    truth = _voc(tmp_path / "voc")
    counts = tiled.make_bccd_tiled(tmp_path / "voc", tmp_path / "out", seed=3)
    assert counts == {"trainval": (1, 4), "test": (1, 4)}  # the fifth trainval picture is left over
    seen = set()
    for split in ("trainval", "test"):
        data = VOCDataset(tmp_path / "out", split)
        (sample,) = [data[0]]
        assert (sample.width, sample.height) == (2 * W, 2 * H)
        image = data.load_image(sample).convert("RGB")
        for box, label in zip(sample.boxes.tolist(), sample.labels.tolist()):
            ox, oy = (W if box[0] >= W else 0), (H if box[1] >= H else 0)  # the quadrant the box lies in
            centre = image.getpixel(((int(box[0]) + int(box[2])) // 2, (int(box[1]) + int(box[3])) // 2))
            key = min(truth, key=lambda k: sum((a - b) ** 2 for a, b in zip(truth[k][0], centre)))
            colour, source, name = truth[key]
            assert sum((a - b) ** 2 for a, b in zip(colour, centre)) < 300  # JPEG: near, not equal
            assert box == [source[0] + ox, source[1] + oy, source[2] + ox, source[3] + oy]
            assert data.classes[label - 1] == name
            seen.add(key)
    assert len(seen) == 8 and {f"p{k}" for k in range(5, 9)} <= seen  # every test picture, 4 of 5 trainval
    assert "MIT license" in (tmp_path / "out" / "SOURCE.txt").read_text()


def test_a_non_empty_out_is_refused_and_left_alone(tmp_path):
    _voc(tmp_path / "voc")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    assert tiled.main(["--bccd", str(tmp_path / "voc"), "--out", str(tmp_path / "out")]) == 1
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    with pytest.raises(tiled.FrcnnError, match="not an empty folder"):
        tiled.make_bccd_tiled(tmp_path / "voc", tmp_path / "out")


def test_grid_and_repeats(tmp_path):
    assert tiled.tile_offsets(40, 30, 3) == [(0, 0), (40, 0), (80, 0), (0, 30), (40, 30), (80, 30), (0, 60), (40, 60),
                                             (80, 60)]
    truth = _voc(tmp_path / "voc")
    # one picture a tile, trainval's pictures twice (two orders), test's once
    assert tiled.make_bccd_tiled(tmp_path / "voc", tmp_path / "out", seed=3, grid=1, repeats=2) == {
        "trainval": (10, 10), "test": (4, 4)}
    data = VOCDataset(tmp_path / "out", "trainval")
    sources = sorted(min(truth, key=lambda k: truth[k][1] != tuple(int(v) for v in data[i].boxes[0].tolist()))
                     for i in range(len(data)))
    assert sources == sorted([f"p{k}" for k in range(5)] * 2)  # each trainval picture in two tiles
    assert tiled.main(["--bccd", str(tmp_path / "voc"), "--out", str(tmp_path / "o3"), "--grid", "3"]) == 0
    assert (tmp_path / "o3" / "ImageSets" / "Main" / "test.txt").read_text() == ""  # 4 pictures: no 3 x 3 tile
    with pytest.raises(tiled.FrcnnError, match="at least 1"):
        tiled.make_bccd_tiled(tmp_path / "voc", tmp_path / "o4", grid=0)
