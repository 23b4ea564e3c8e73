"""Evaluation during training: logs mAP and validation losses, writes eval/, and changes nothing in training."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from test_overfit import TinySet

from frcnn.config import load_config
from frcnn.engine.train import train, validation_losses
from frcnn.model.detector import FasterRCNN

FAST = ["TRAIN.SCALES=[96]", "TEST.SCALES=[96]", "TRAIN.DISPLAY=2", "DEVICE=cpu", "TRAIN.LEARNING_RATE=0.01",
        "TRAIN.MAX_ITERS=4", "TRAIN.SNAPSHOT_ITERS=4"]


def _cfg(*extra: str):
    return load_config("demo-cpu", FAST + list(extra))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_validation_logs_map_and_losses_and_does_not_change_training(tmp_path):
    data = TinySet()
    train(_cfg(), data, tmp_path / "plain", progress=False)
    train(_cfg(), data, tmp_path / "val", progress=False, val_dataset=TinySet(), eval_every=2)
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    val = load_file(str(tmp_path / "val" / "model.safetensors"))
    assert plain.keys() == val.keys()
    for k in plain:  # every weight and every BatchNorm statistic is bit-identical
        assert torch.equal(plain[k], val[k]), k

    records = _records(tmp_path / "val" / "metrics.jsonl")
    vals = [r for r in records if "val_map" in r]
    assert [r["iteration"] for r in vals] == [2, 4]
    for r in vals:
        assert r["val_metric"] == "voc07" and 0.0 <= r["val_map"] <= 1.0 and r["val_images"] == 4
        for k in ("val_rpn_cls", "val_rpn_box", "val_rcnn_cls", "val_rcnn_box"):
            assert r[k] >= 0.0 and r[k] == r[k]
        assert abs(r["val_total"] - sum(r[k] for k in ("val_rpn_cls", "val_rpn_box", "val_rcnn_cls",
                                                       "val_rcnn_box"))) < 1e-9
    # training lines are the same as without validation (apart from timing)
    train_lines = [r for r in records if "val_map" not in r]
    plain_lines = _records(tmp_path / "plain" / "metrics.jsonl")
    strip = ("time", "elapsed")
    assert [{k: v for k, v in r.items() if k not in strip} for r in train_lines] == \
        [{k: v for k, v in r.items() if k not in strip} for r in plain_lines]

    result = json.loads((tmp_path / "val" / "eval" / "metrics.json").read_text())
    assert result["iteration"] == 4 and result["map"] == vals[-1]["val_map"]
    assert set(result["metrics"]) == {"voc07", "voc2010"}
    assert (tmp_path / "val" / "eval" / "pr_curves.png").stat().st_size > 0


def test_validation_losses_leave_the_model_as_it_was():
    torch.manual_seed(0)
    cfg = _cfg()
    model = FasterRCNN(cfg, 2).train()
    # let BatchNorm have non-trivial statistics
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    a = validation_losses(model, cfg, TinySet())
    b = validation_losses(model, cfg, TinySet())
    assert a == b  # seeded on its own
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_cli_trains_on_coco_json_with_validation(tmp_path, capsys):
    from frcnn.cli import main
    from frcnn.data import open_dataset
    from frcnn.data.coco import write_coco_json
    from frcnn.data.synthetic import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_trainval=3, num_test=2, image_size=(96, 96), seed=4)
    classes = ("circle", "square", "star", "triangle")
    for split in ("trainval", "test"):
        write_coco_json(tmp_path / "data" / f"{split}.json", open_dataset(tmp_path / "data", split, classes),
                        category_ids=[0, 2, 4, 9])
    sets = ["--set", "TRAIN.MAX_ITERS=3", "--set", "TRAIN.SCALES=[96]", "--set", "TEST.SCALES=[96]",
            "--set", "TRAIN.SNAPSHOT_ITERS=3", "--set", "DEVICE=cpu"]
    code = main(["train", "--data", str(tmp_path / "data" / "trainval.json"), "--val-split", "test",
                 "--eval-every", "2", "--out", str(tmp_path / "run"), "--config", "demo-cpu", "--no-progress", *sets])
    out = capsys.readouterr().out
    assert code == 0 and "validating on 2 images" in out
    vals = [r for r in _records(tmp_path / "run" / "metrics.jsonl") if "val_map" in r]
    assert [r["iteration"] for r in vals] == [2, 3] and all(r["val_metric"] == "coco" for r in vals)
    result = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert set(result["metrics"]) == {"voc07", "voc2010", "coco"} and result["iteration"] == 3

    code = main(["train", "--data", str(tmp_path / "data"), "--split", "trainval", "--eval-every", "2",
                 "--out", str(tmp_path / "run2"), "--config", "demo-cpu", *sets])
    assert code == 2 and "--eval-every N needs --val-split" in capsys.readouterr().err


def test_training_writes_the_same_numbers_to_tensorboard(tmp_path):
    """Every logged loss, the learning rate and the validation mAP/losses of metrics.jsonl are in RUN/tensorboard
    at their iteration, and each validation adds images with detections drawn."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = TinySet()
    train(_cfg(), data, tmp_path / "run", progress=False, val_dataset=TinySet(), eval_every=2)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    records = _records(tmp_path / "run" / "metrics.jsonl")
    for tag, key, lines in (("loss/total", "total", [r for r in records if "total" in r]),
                            ("lr", "lr", [r for r in records if "lr" in r]),
                            ("val/map", "val_map", [r for r in records if "val_map" in r])):
        points = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in points] == [r["iteration"] for r in lines] == [2, 4], tag
        for (_, value), r in zip(points, lines):
            assert value == torch.tensor(r[key], dtype=torch.float32).item(), tag
    image_tags = events.Tags()["images"]
    assert image_tags and all(t.startswith("val/detections/") for t in image_tags)
    assert [e.step for e in events.Images(image_tags[0])] == [2, 4]
