"""TEST.PROPOSALS_PER_OBJECT: test-time proposals and detections an image raised for the training set's busiest image
(hand-computed counts), never lowered, resolved once into the run's config."""

from __future__ import annotations

import pytest
import torch

from frcnn.config import ConfigError, load_config, merge
from frcnn.data.dense import room_for_objects, room_line
from frcnn.data.sample import Sample
from frcnn.engine.train import resolve_run_config


def images_with(*counts: int) -> list[Sample]:
    """One 500 x 500 image per count, with that many 20 px boxes."""
    samples = []
    for i, n in enumerate(counts):
        xy = torch.stack([torch.arange(n) % 20 * 24.0, torch.arange(n) // 20 * 24.0], dim=1)
        samples.append(Sample(str(i), f"{i}.jpg", 500, 500, torch.cat((xy, xy + 19), dim=1),
                              torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)))
    return samples


def counts(cfg) -> tuple[int, int, int]:
    return cfg.TEST.RPN_PRE_NMS_TOP_N, cfg.TEST.RPN_POST_NMS_TOP_N, cfg.TEST.MAX_PER_IMAGE


def test_counts_follow_the_busy_training_images():
    cfg = load_config("scratch-cpu")  # test: 1000 before NMS, 100 proposals, 100 detections; 4 an object
    assert (counts(cfg), cfg.TEST.PROPOSALS_PER_OBJECT) == ((1000, 100, 100), 4)
    # 155 boxes: 4 x 155 = 620 proposals, 310 detections, 1240 before NMS
    room, done = room_for_objects(cfg, images_with(3, 155, 40))
    assert counts(room) == (1240, 620, 310) and room.TEST.PROPOSALS_PER_OBJECT == 0
    assert done == {"objects": 155, "per_object": 4.0, "from": {"RPN_PRE_NMS_TOP_N": 1000, "RPN_POST_NMS_TOP_N": 100,
                                                                "MAX_PER_IMAGE": 100},
                    "to": {"RPN_PRE_NMS_TOP_N": 1240, "RPN_POST_NMS_TOP_N": 620, "MAX_PER_IMAGE": 310}}
    assert room_line(done) == ("test: TEST.PROPOSALS_PER_OBJECT=4 -> RPN_PRE_NMS_TOP_N 1000 -> 1240, "
                               "RPN_POST_NMS_TOP_N 100 -> 620, MAX_PER_IMAGE 100 -> 310 (9 in 10 training images "
                               "have 155 boxes or fewer; TEST.PROPOSALS_PER_OBJECT=0: keep the counts)")
    assert merge(room, {"TEST": {"RPN_PRE_NMS_TOP_N": 1000, "RPN_POST_NMS_TOP_N": 100, "MAX_PER_IMAGE": 100,
                                 "PROPOSALS_PER_OBJECT": 4.0}}) == cfg  # nothing else changed
    # one crowded image in ten does not set the counts: the 90th percentile (nearest rank) of 9 x 20 and 500 is 20
    assert room_for_objects(cfg, images_with(*[20] * 9, 500)) == (cfg, None)
    assert counts(room_for_objects(cfg, images_with(*[20] * 8, 500, 500))[0]) == (4000, 2000, 1000)
    # 30 boxes: 120 proposals; 60 detections and 240 before NMS are under the preset's: kept
    assert counts(room_for_objects(cfg, images_with(30, 7))[0]) == (1000, 120, 100)
    # 25 boxes or fewer: 100 proposals are room enough, nothing changes (counts are never lowered)
    assert room_for_objects(cfg, images_with(25, 5)) == (cfg, None)
    off = merge(cfg, {"TEST": {"PROPOSALS_PER_OBJECT": 0}})
    assert room_for_objects(off, images_with(155)) == (off, None)
    assert room_for_objects(room, images_with(155)) == (room, None)  # resolved once
    assert counts(room_for_objects(merge(cfg, {"TEST": {"PROPOSALS_PER_OBJECT": 2.5}}), images_with(155))[0]) == (
        1000, 388, 194)  # ceil(2.5 x 155) = 388; 2 x 388 = 776 < 1000; 388 / 2 = 194
    with pytest.raises(ConfigError, match="PROPOSALS_PER_OBJECT"):
        merge(cfg, {"TEST": {"PROPOSALS_PER_OBJECT": -1}})


def test_frcnn_train_resolves_the_counts_into_the_run_config():
    cfg = merge(load_config("scratch-cpu"), {"TRAIN": {"SCALE_UP_LIMIT": 0}})
    resolved, lines, meta = resolve_run_config(cfg, images_with(3, 155))
    assert counts(resolved) == (1240, 620, 310)
    assert any(line.startswith("test: TEST.PROPOSALS_PER_OBJECT=4 -> ") for line in lines)
    assert meta["test_counts"]["objects"] == 155
    assert resolve_run_config(resolved, images_with(3, 155))[0] == resolved


def test_check_data_and_train_agree_on_the_counts(tmp_path, capsys):
    """A VOC set of two 400 x 400 images with 40 boxes each: 4 x 40 = 160 proposals an image at test."""
    import json

    from PIL import Image

    from frcnn.cli import main
    from frcnn.data.voc import write_voc_xml
    from frcnn.engine.checkpoint import read_config

    root = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for i, sample in enumerate(images_with(40, 40)):
        Image.new("RGB", (500, 500), (90, 120, 150)).save(root / "JPEGImages" / f"{i}.jpg")
        write_voc_xml(root / "Annotations" / f"{i}.xml", f"{i}.jpg", 500, 500,
                      [("dot", tuple(int(v) for v in b)) for b in sample.boxes.tolist()])
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("0\n1\n")
    expected = ("test: TEST.PROPOSALS_PER_OBJECT=4 -> RPN_POST_NMS_TOP_N 100 -> 160 (9 in 10 training images have 40 "
                "boxes or fewer; TEST.PROPOSALS_PER_OBJECT=0: keep the counts)")
    assert main(["check-data", "--data", str(root), "--split", "trainval", "--no-progress"]) == 0
    assert expected in capsys.readouterr().out.splitlines()
    assert main(["check-data", "--data", str(root), "--split", "trainval", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_counts"]["to"]["RPN_POST_NMS_TOP_N"] == 160
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--split", "trainval", "--out", str(out), "--no-progress", "--set",
                 "TRAIN.MAX_EPOCHS=1", "--set", "TRAIN.STEP_EPOCHS=[0.5]", "--set", "TRAIN.WARMUP_ITERS=0",
                 "--set", "DEVICE=cpu"]) == 0
    assert expected in capsys.readouterr().out.splitlines()
    assert counts(read_config(out / "config.yaml")) == (1000, 160, 100)
