"""The synthetic shapes set: tight boxes, determinism, VOC layout that VOCDataset reads, folder refusals."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frcnn.data import synthetic
from frcnn.data.synthetic import CLASSES, MARKER, make_shapes_dataset, render_scene
from frcnn.data.voc import VOCDataset
from frcnn.errors import DataError


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("seed", range(12))
def test_boxes_tightly_bound_the_drawn_pixels(seed):
    scene = render_scene(np.random.default_rng([seed, 0]), 240, 300)
    pixels = np.asarray(scene.image)
    assert scene.image.mode == "RGB" and pixels.shape == (240, 300, 3)
    assert 1 <= len(scene.objects) <= 5
    taken = np.zeros((240, 300), dtype=bool)
    for obj in scene.objects:
        assert obj.name in CLASSES
        x1, y1, x2, y2 = obj.box
        ys, xs = np.nonzero(obj.mask)
        # every visible pixel lies in the box, and the box touches the shape on all four sides
        assert (xs.min(), ys.min(), xs.max(), ys.max()) == (x1, y1, x2, y2)
        assert 0 <= x1 <= x2 <= 299 and 0 <= y1 <= y2 <= 239
        # the picture really has the shape's colour there (shapes are flat, drawn after the noise)
        assert (pixels[obj.mask] == obj.color).all()
        assert not (taken & obj.mask).any()  # visible masks never overlap
        taken |= obj.mask
        # not a speck: the shape is at least ~32 px across at 240 px (32 * 240 / 320 = 24, rotated a bit less)
        assert x2 - x1 + 1 >= 16 and y2 - y1 + 1 >= 16


def test_class_is_not_tied_to_colour():
    colours = defaultdict(set)
    for seed in range(40):
        for obj in render_scene(np.random.default_rng([seed, 0]), 160, 160).objects:
            colours[obj.name].add(obj.color)
    assert set(colours) == set(CLASSES)
    assert all(len(c) >= 5 for c in colours.values())


def test_written_set_is_voc_and_matches_the_rendered_scenes(tmp_path):
    root = tmp_path / "shapes"
    classes = make_shapes_dataset(root, num_trainval=6, num_test=3, image_size=(200, 260), seed=3)
    assert classes == CLASSES == tuple(sorted(CLASSES))
    trainval = VOCDataset(root, "trainval", classes=classes)
    test = VOCDataset(root, "test", classes=classes)
    assert len(trainval) == 6 and len(test) == 3 and not set(trainval.ids) & set(test.ids)
    for i, sample in enumerate([*trainval, *test]):
        scene = render_scene(np.random.default_rng([3, i]), 200, 260)
        assert (sample.width, sample.height) == (260, 200)
        assert sample.boxes.tolist() == [list(o.box) for o in scene.objects]
        assert [classes[k - 1] for k in sample.labels.tolist()] == [o.name for o in scene.objects]
        image = (trainval if i < 6 else test).load_image(sample)
        # JPEG changes pixels a little (mostly the noise), not the picture; flat shapes survive well
        diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(scene.image, dtype=np.int16)).mean(axis=2)
        assert diff.mean() < 12
        for obj in scene.objects:
            assert np.median(diff[obj.mask]) < 12
    xml = (root / "Annotations" / f"{trainval.ids[0]}.xml").read_text()
    x1 = int(trainval[0].boxes[0, 0])
    assert f"<xmin>{x1 + 1}</xmin>" in xml  # 1-based on disk


def test_same_seed_gives_identical_files_other_seed_does_not(tmp_path):
    make_shapes_dataset(tmp_path / "a", num_trainval=5, num_test=2, seed=7)
    make_shapes_dataset(tmp_path / "b", num_trainval=5, num_test=2, seed=7)
    make_shapes_dataset(tmp_path / "c", num_trainval=5, num_test=2, seed=8)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 1 + 7 + 7 + 2  # marker, 7 XML, 7 JPEG, 2 split files
    assert a == b
    assert a["JPEGImages/shapes_00000.jpg"] != c["JPEGImages/shapes_00000.jpg"]
    assert a["Annotations/shapes_00000.xml"] != c["Annotations/shapes_00000.xml"]


def test_existing_identical_set_is_reused_and_others_refused(tmp_path):
    root = tmp_path / "set"
    make_shapes_dataset(root, num_trainval=3, num_test=1)
    jpeg = root / "JPEGImages" / "shapes_00000.jpg"
    stamp = jpeg.stat().st_mtime_ns
    assert make_shapes_dataset(root, num_trainval=3, num_test=1) == CLASSES
    assert jpeg.stat().st_mtime_ns == stamp  # not rewritten
    with pytest.raises(DataError, match="other parameters"):
        make_shapes_dataset(root, num_trainval=4, num_test=1)
    with pytest.raises(DataError, match="other parameters"):
        make_shapes_dataset(root, num_trainval=3, num_test=1, seed=1)

    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("do not overwrite")
    with pytest.raises(DataError, match="not empty and is not a frcnn synthetic data set"):
        make_shapes_dataset(other, num_trainval=3, num_test=1)
    assert sorted(p.name for p in other.iterdir()) == ["thesis.tex"]

    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        make_shapes_dataset(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    make_shapes_dataset(empty, num_trainval=1, num_test=1)
    assert (empty / "ImageSets" / "Main" / "test.txt").read_text() == "shapes_00001\n"


def test_unfinished_set_with_same_parameters_is_completed(tmp_path):
    root = tmp_path / "set"
    make_shapes_dataset(root, num_trainval=3, num_test=1)
    reference = files(root)
    info = json.loads((root / MARKER).read_text())
    info["complete"] = False
    (root / MARKER).write_text(json.dumps(info))
    (root / "ImageSets" / "Main" / "test.txt").unlink()
    (root / "JPEGImages" / "shapes_00002.jpg").unlink()
    make_shapes_dataset(root, num_trainval=3, num_test=1)
    assert files(root) == reference


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(DataError, match="at least one"):
        make_shapes_dataset(tmp_path / "a", num_trainval=0)
    with pytest.raises(DataError, match="at least 64"):
        make_shapes_dataset(tmp_path / "a", image_size=(32, 320))
    with pytest.raises(DataError, match="seed"):
        make_shapes_dataset(tmp_path / "a", seed=-1)
    assert not (tmp_path / "a").exists()


def test_generation_work_is_bounded(tmp_path, monkeypatch):
    """The work of making a set, counted: one scene per image, few shapes drawn per object kept (each shape is
    drawn on a canvas of the image's size, then accepted or retried), nothing redone for a complete set."""
    scenes, masks = [], []
    real_scene, real_mask = synthetic.render_scene, synthetic._shape_mask

    def scene(*args, **kwargs):
        scenes.append(real_scene(*args, **kwargs))
        return scenes[-1]

    def mask(*args, **kwargs):
        drawn = real_mask(*args, **kwargs)
        masks.append(drawn.shape)
        return drawn

    monkeypatch.setattr(synthetic, "render_scene", scene)
    monkeypatch.setattr(synthetic, "_shape_mask", mask)
    make_shapes_dataset(tmp_path / "s", num_trainval=50, num_test=10)
    objects = sum(len(s.objects) for s in scenes)
    assert len(scenes) == 60 and 60 <= objects <= 300
    assert set(masks) == {(320, 320)}
    assert len(masks) <= 2 * objects, (len(masks), objects)  # seed 0: 197 shapes drawn for 177 kept
    sizes = {Image.open(p).size for p in (tmp_path / "s" / "JPEGImages").iterdir()}
    assert sizes == {(320, 320)}
    make_shapes_dataset(tmp_path / "s", num_trainval=50, num_test=10)  # complete: reused as it is
    assert len(scenes) == 60
