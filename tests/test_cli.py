"""The ``frcnn`` command end to end on a tiny synthetic VOC set: train -> eval -> detect, and the
one-line errors (exit code 2, file named, nothing overwritten) for the user's mistakes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from frcnn.cli import main
from frcnn.data.synthetic import make_shapes_dataset
from frcnn.data.voc import write_voc_xml

TINY = ["--config", "demo-cpu", "--set", "TRAIN.SCALES=128", "--set", "TRAIN.MAX_SIZE=128",
        "--set", "TEST.SCALES=128", "--set", "TEST.MAX_SIZE=128", "--set", "TRAIN.MAX_ITERS=4",
        "--set", "TRAIN.SNAPSHOT_ITERS=2", "--set", "TRAIN.DISPLAY=2", "--set", "TRAIN.WARMUP_ITERS=0"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, num_trainval=6, num_test=3, image_size=(128, 128), seed=1)
    return root


@pytest.fixture(scope="module")
def run(voc, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "model"
    assert main(["train", "--data", str(voc), "--split", "trainval", "--out", str(out), "--no-progress", *TINY]) == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def copy_voc(voc: Path, dst: Path) -> Path:
    shutil.copytree(voc, dst)
    return dst


# ------------------------------------------------------------------------------------------ happy path

@pytest.mark.parametrize("command", [[], ["demo"], ["train"], ["eval"], ["detect"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: frcnn" in capsys.readouterr().out


def test_train_writes_a_checkpoint_folder(run):
    for name in ("model.safetensors", "config.yaml", "meta.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "meta.json").read_text())
    assert meta["classes"] == ["circle", "square", "star", "triangle"] and meta["iteration"] == 4
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [2, 4]
    assert {"rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box", "total", "lr", "time"} <= set(logged[0])
    assert "TRAIN:" in (run / "config.yaml").read_text() and "MAX_ITERS: 4" in (run / "config.yaml").read_text()


def test_eval_json_is_one_object_with_map_metric_and_per_class(run, voc, capsys):
    assert main(["eval", "--checkpoint", str(run), "--data", str(voc), "--split", "test", "--json"]) == 0
    out = capsys.readouterr().out.strip()
    result = json.loads(out)  # the whole of stdout is one JSON object
    assert result["metric"] == "voc07"
    assert 0.0 <= result["map"] <= 1.0
    assert set(result["per_class"]) == {"circle", "square", "star", "triangle"}


def test_eval_table_lists_every_class_and_the_map(run, voc, capsys):
    assert main(["eval", "--checkpoint", str(run), "--data", str(voc), "--split", "test", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for name in ("circle", "square", "star", "triangle", "mAP"):
        assert name in out


def test_detect_writes_png_and_json_per_image_and_never_overwrites(run, voc, tmp_path, capsys):
    images = sorted((voc / "JPEGImages").glob("*.jpg"))[:2]
    out = tmp_path / "det"
    assert main(["detect", "--checkpoint", str(run), *map(str, images), "--out", str(out),
                 "--threshold", "0"]) == 0
    for image in images:
        record = json.loads((out / f"{image.stem}.json").read_text())
        assert record["width"] == 128 and record["height"] == 128
        assert Image.open(out / f"{image.stem}.png").size == (128, 128)  # drawn at the original size
        for det in record["detections"]:
            assert det["class"] in {"circle", "square", "star", "triangle"} and 0 <= det["score"] <= 1
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= 127 and 0 <= y1 <= y2 <= 127  # original image pixels
    first = (out / f"{images[0].stem}.json").read_bytes()
    capsys.readouterr()
    assert main(["detect", "--checkpoint", str(run), str(images[0]), "--out", str(out)]) == 0
    assert (out / f"{images[0].stem}.json").read_bytes() == first  # kept
    assert (out / f"{images[0].stem}_2.png").is_file() and (out / f"{images[0].stem}_2.json").is_file()


def test_detect_accepts_a_folder(run, voc, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for image in sorted((voc / "JPEGImages").glob("*.jpg"))[:2]:
        shutil.copy(image, folder)
    assert main(["detect", "--checkpoint", str(run), str(folder), "--out", str(tmp_path / "o")]) == 0
    assert len(list((tmp_path / "o").glob("*.json"))) == 2


# ------------------------------------------------------------------------------------------- bad input

def test_missing_data_folder(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "nope"), "--split", "trainval", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "nope" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_malformed_data_folder(tmp_path, capsys):
    (tmp_path / "data" / "Annotations").mkdir(parents=True)
    code = main(["train", "--data", str(tmp_path / "data"), "--split", "trainval", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "JPEGImages" in _error_line(capsys)


def test_xml_that_does_not_parse(voc, tmp_path, capsys):
    data = copy_voc(voc, tmp_path / "data")
    xml = sorted((data / "Annotations").glob("*.xml"))[0]
    xml.write_text("<annotation><object>")
    code = main(["train", "--data", str(data), "--split", "trainval", "--out", str(tmp_path / "o"), *TINY])
    assert code == 2
    assert xml.name in _error_line(capsys)


def test_inverted_box(voc, tmp_path, capsys):
    data = copy_voc(voc, tmp_path / "data")
    image_id = (data / "ImageSets" / "Main" / "trainval.txt").read_text().split()[0]
    write_voc_xml(data / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", 128, 128,
                  [("circle", (50, 10, 20, 40))])  # x2 < x1
    code = main(["train", "--data", str(data), "--split", "trainval", "--out", str(tmp_path / "o"), *TINY])
    assert code == 2
    assert f"{image_id}.xml" in _error_line(capsys)


def test_unknown_class_at_eval(run, voc, tmp_path, capsys):
    data = copy_voc(voc, tmp_path / "data")
    image_id = (data / "ImageSets" / "Main" / "test.txt").read_text().split()[0]
    write_voc_xml(data / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", 128, 128,
                  [("hexagon", (10, 10, 40, 40))])
    code = main(["eval", "--checkpoint", str(run), "--data", str(data), "--split", "test", "--json"])
    assert code == 2
    line = _error_line(capsys)
    assert "hexagon" in line and f"{image_id}.xml" in line


def test_unreadable_image_at_detect(run, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    code = main(["detect", "--checkpoint", str(run), str(bad), "--out", str(tmp_path / "o")])
    assert code == 2
    assert "broken.jpg" in _error_line(capsys)


def test_folder_that_is_not_a_checkpoint(voc, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("hello")
    code = main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(voc), "--split", "test"])
    assert code == 2
    assert "ckpt" in _error_line(capsys)


def test_training_into_a_non_empty_folder_refuses_and_keeps_it(voc, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    code = main(["train", "--data", str(voc), "--split", "trainval", "--out", str(out), *TINY])
    assert code == 2
    assert "--resume" in _error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "precious"


def test_unknown_config_key(voc, tmp_path, capsys):
    code = main(["train", "--data", str(voc), "--split", "trainval", "--out", str(tmp_path / "o"),
                 "--set", "TRAIN.RPN_BACHSIZE=128"])
    assert code == 2
    assert "TRAIN.RPN_BACHSIZE" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_wrong_config_type(voc, tmp_path, capsys):
    code = main(["train", "--data", str(voc), "--split", "trainval", "--out", str(tmp_path / "o"),
                 "--set", "TRAIN.RPN_BATCHSIZE=many"])
    assert code == 2
    assert "TRAIN.RPN_BATCHSIZE" in _error_line(capsys)


def test_demo_refuses_a_non_empty_out(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert main(["demo", "--out", str(tmp_path), "--no-progress"]) == 2
    assert str(tmp_path) in _error_line(capsys)
    assert (tmp_path / "keep.txt").read_text() == "x"


# ------------------------------------------------------------------------------------------ without --config

def test_the_default_training_preset():
    from frcnn.config import default_training_preset

    assert default_training_preset([]) == "scratch-cpu"
    assert default_training_preset(["TRAIN.MAX_ITERS=3", "PRETRAINED="]) == "scratch-cpu"  # empty: no weights
    assert default_training_preset(["PRETRAINED=resnet50.pth"]) is None
    assert default_training_preset([" PRETRAINED = w.safetensors"]) is None


def test_train_without_config_trains_scratch_cpu_and_check_data_agrees(voc, tmp_path, capsys):
    """Without --config a new user gets the from-scratch CPU preset (not the write-up's ResNet-50 from random
    weights for 70000 iterations), said in one line; check-data fits the anchors of that same preset."""
    from frcnn.config import load_config
    from frcnn.engine.checkpoint import read_config

    small = ["--set", "TRAIN.SCALES=128", "--set", "TRAIN.MAX_SIZE=128", "--set", "TEST.SCALES=128",
             "--set", "TEST.MAX_SIZE=128", "--set", "TRAIN.MAX_EPOCHS=0.5", "--set", "TRAIN.STEP_EPOCHS=[0.25]",
             "--set", "TRAIN.WARMUP_ITERS=0", "--set", "DEVICE=cpu"]
    out = tmp_path / "run"
    assert main(["train", "--data", str(voc), "--split", "trainval", "--out", str(out), "--no-progress",
                 *small]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == ("config: scratch-cpu (no --config; for the write-up's ResNet-50 from ImageNet weights: "
                          "--config voc-r50-c4 --set PRETRAINED=FILE)")
    cfg = read_config(out / "config.yaml")
    preset = load_config("scratch-cpu", small[1::2])
    assert (cfg.BACKBONE, cfg.TRAIN.IMS_PER_BATCH, cfg.TRAIN.LEARNING_RATE) == ("tiny", 4, 0.02)
    assert cfg.TRAIN.MAX_ITERS == 2  # 0.5 epochs of 12 images (6 + mirrored), 4 an iteration
    assert (cfg.RPN_CHANNELS, cfg.TRAIN.BATCH_SIZE, cfg.TRAIN.RPN_ALLOWED_BORDER) == (
        preset.RPN_CHANNELS, preset.TRAIN.BATCH_SIZE, preset.TRAIN.RPN_ALLOWED_BORDER)
    (chosen,) = [line for line in printed if line.startswith("anchors: ANCHOR_SCALES=auto -> ")]
    assert main(["check-data", "--data", str(voc), "--split", "trainval", "--no-progress", *small]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[0] == printed[0] and report[-1] == f"  {chosen[len('anchors: '):]}"
    # with a backbone's weights named, the reference's defaults (fixed anchors: a suggestion, no auto line)
    assert main(["check-data", "--data", str(voc), "--split", "trainval", "--no-progress", "--set",
                 "PRETRAINED=resnet50.pth"]) == 0
    report = capsys.readouterr().out
    assert not report.startswith("config:") and "ANCHOR_SCALES auto" not in report and "suggested: " in report
    assert main(["check-data", "--data", str(voc), "--split", "trainval", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["anchor_fit"]  # --json: the JSON object alone
