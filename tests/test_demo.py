"""``frcnn demo`` writes everything it promises (a seconds-long version: few images, few iterations;
the full demo's mAP and time are figures for the benchmark notes, not test assertions)."""

from __future__ import annotations

import json

from PIL import Image

from frcnn.demo import run_demo
from frcnn.engine.inference import Predictor

QUICK = ("TRAIN.MAX_ITERS=6", "TRAIN.SNAPSHOT_ITERS=3", "TRAIN.DISPLAY=3", "TRAIN.SCALES=128", "TRAIN.MAX_SIZE=128",
         "TEST.SCALES=128", "TEST.MAX_SIZE=128")


def test_quick_demo_writes_data_checkpoint_metrics_and_drawings(tmp_path):
    out = tmp_path / "demo"
    result = run_demo(out, seed=5, progress=False, overrides=QUICK, num_images=(8, 4))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["map"] == result["map"] and saved["metric"] == "voc07"
    assert set(saved["per_class"]) == {"circle", "square", "star", "triangle"}
    assert len((out / "data" / "ImageSets" / "Main" / "test.txt").read_text().split()) == 4
    predictor = Predictor.from_checkpoint(out / "model")  # the checkpoint is complete on its own
    assert predictor.class_names == ("circle", "square", "star", "triangle")
    drawn = sorted((out / "detections").glob("*.png"))
    assert len(drawn) == 4
    assert Image.open(drawn[0]).size == (320, 320)  # drawn on the original image
    assert len(json.loads((out / "explain" / "explain.json").read_text())["stages"]) == 10  # with its gt: 10 stages


def test_demo_is_reproducible_with_a_seed(tmp_path):
    a = run_demo(tmp_path / "a", seed=2, progress=False, overrides=QUICK, num_images=(4, 2))
    b = run_demo(tmp_path / "b", seed=2, progress=False, overrides=QUICK, num_images=(4, 2))
    assert a["per_class"] == b["per_class"]
    assert (tmp_path / "a" / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "model" / "model.safetensors").read_bytes()
