"""TensorBoard event files of a run: the metrics.jsonl records as scalars, validation images, resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from explain_fixtures import BOXES, CLASSES, config, model, picture, voc_folder
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from frcnn.data.voc import VOCDataset
from frcnn.engine.inference import Predictor
from frcnn.engine.tensorboard import TensorBoardLog, detection_images, scalar_tag, validation_images
from frcnn.model.detector import Detections
from frcnn.viz.draw import class_color

KEYS = ("rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box")


def _train_record(it: int, scale: float = 1.0) -> dict:
    record = {"iteration": it, **{k: scale * (j + 1) / (it + 3) for j, k in enumerate(KEYS)}}
    record["total"] = sum(record[k] for k in KEYS)
    record.update(lr=0.01 * 0.1 ** (it // 6), time=0.123 + it / 1000, elapsed=it * 0.7)
    return record


def _val_record(it: int) -> dict:
    record = {"iteration": it, "val_map": 0.1 * it / 3, "val_metric": "voc07",
              **{f"val_{k}": 2.0 / (it + j) for j, k in enumerate(KEYS)}}
    record.update(val_total=sum(record[f"val_{k}"] for k in KEYS), val_images=5, val_time=1.25)
    return record


def _read(run) -> EventAccumulator:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def _scalars(events: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the event files must hold: every numeric value, rounded to float32 as TensorBoard stores it."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key, value in record.items():
            if key != "iteration" and not isinstance(value, str):
                out.setdefault(scalar_tag(key), []).append((record["iteration"], float(np.float32(value))))
    return out


def test_tags_of_the_metrics_keys():
    assert [scalar_tag(k) for k in (*KEYS, "total", "lr", "time", "elapsed")] == [
        "loss/rpn_cls", "loss/rpn_box", "loss/rcnn_cls", "loss/rcnn_box", "loss/total", "lr", "time/step",
        "time/elapsed"]
    assert [scalar_tag(k) for k in ("val_map", "val_rpn_cls", "val_total", "val_images", "val_time")] == [
        "val/map", "val/rpn_cls", "val/total", "val/images", "val/time"]
    assert scalar_tag("something_new") == "something_new"  # a key added later is still logged


def test_scalars_are_the_records(tmp_path):
    records = [_train_record(2), _train_record(4), _val_record(4), _train_record(6), _val_record(6)]
    log = TensorBoardLog(tmp_path)
    for record in records:
        log.write(record)
    log.close()
    assert (tmp_path / "tensorboard").is_dir()
    scalars = _scalars(_read(tmp_path))
    assert set(scalars) == {"loss/rpn_cls", "loss/rpn_box", "loss/rcnn_cls", "loss/rcnn_box", "loss/total", "lr",
                            "time/step", "time/elapsed", "val/map", "val/rpn_cls", "val/rpn_box", "val/rcnn_cls",
                            "val/rcnn_box", "val/total", "val/images", "val/time"}
    assert scalars == _expected(records)
    assert [step for step, _ in scalars["loss/total"]] == [2, 4, 6]
    assert [step for step, _ in scalars["val/map"]] == [4, 6]


def test_written_records_are_readable_before_close(tmp_path):
    log = TensorBoardLog(tmp_path)
    log.write(_train_record(2))
    assert _scalars(_read(tmp_path))["loss/total"] == _expected([_train_record(2)])["loss/total"]
    log.close()


def _image(width: int, height: int, shade: int) -> Image.Image:
    array = np.zeros((height, width, 3), np.uint8)
    array[..., 0] = shade
    array[: height // 2, :, 1] = 200  # not uniform, so a transposed read would show
    array[:, : width // 3, 2] = 90
    return Image.fromarray(array)


def _decoded(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def test_images_are_stored_at_their_size(tmp_path):
    images = {"000005": _image(40, 30, 10), "000007": _image(23, 51, 250)}
    with TensorBoardLog(tmp_path) as log:
        log.images(10, images)
    events = _read(tmp_path)
    assert sorted(events.Tags()["images"]) == ["val/detections/000005", "val/detections/000007"]
    for image_id, image in images.items():
        (event,) = events.Images(f"val/detections/{image_id}")
        assert (event.step, event.width, event.height) == (10, image.width, image.height)
        assert np.array_equal(_decoded(event), np.asarray(image))  # PNG: lossless


def test_resume_discards_what_came_after_the_snapshot(tmp_path):
    first = TensorBoardLog(tmp_path)
    for it in (2, 4, 6, 8):
        first.write(_train_record(it))
        first.images(it, {"a": _image(8, 6, it)})
    first.close()  # the run stops after iteration 8; its last snapshot was at iteration 4
    resumed = TensorBoardLog(tmp_path, purge_step=4 + 1)
    for it in (6, 8, 10):
        resumed.write(_train_record(it, scale=3.0))
        resumed.images(it, {"a": _image(8, 6, 100 + it)})
    resumed.close()
    events = _read(tmp_path)
    kept = [_train_record(2), _train_record(4)] + [_train_record(it, scale=3.0) for it in (6, 8, 10)]
    assert _scalars(events) == _expected(kept)  # one point per step, the resumed run's after the snapshot
    shades = [(e.step, int(_decoded(e)[0, 0, 0])) for e in events.Images("val/detections/a")]
    assert shades == [(2, 2), (4, 4), (6, 106), (8, 108), (10, 110)]


class _Fixed:
    """A predictor that always finds the same detections (boxes in original pixels)."""

    class_names = CLASSES

    def __init__(self, boxes, scores, labels):
        self.detections = Detections(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores),
                                     torch.tensor(labels))
        self.seen: list[tuple[int, int]] = []

    def predict(self, images):
        self.seen += [im.size for im in images]
        return [self.detections for _ in images]


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "voc"
    voc_folder(root)
    second = picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    second.save(root / "JPEGImages" / "flipped.png")
    xml = (root / "Annotations" / "known.xml").read_text().replace("known.png", "flipped.png")
    (root / "Annotations" / "flipped.xml").write_text(xml)
    (root / "ImageSets" / "Main" / "test.txt").write_text("known\nflipped\n")
    return VOCDataset(root, "test")


def test_detection_images_draw_the_detections_above_the_threshold(voc):
    predictor = _Fixed([[10, 20, 60, 90], [100, 10, 150, 40]], [0.9, 0.3], [3, 1])
    images = detection_images(predictor, voc, count=5, threshold=0.5, ground_truth=False)
    assert list(images) == ["known", "flipped"]  # the data's first images, in order; count capped by the data
    original = np.asarray(picture())
    drawn = np.asarray(images["known"])
    assert drawn.shape == original.shape and predictor.seen == [(200, 150), (200, 150)]
    assert tuple(drawn[55, 10]) == class_color(3) and tuple(drawn[89, 35]) == class_color(3)  # the outline
    assert np.array_equal(drawn[30:50, 70:80], original[30:50, 70:80])  # inside the box, below its tag
    assert np.array_equal(drawn[20:35, 100:151], original[20:35, 100:151])  # score 0.3: not drawn
    with_gt = np.asarray(detection_images(predictor, voc, count=1, threshold=0.5)["known"])
    x1, y1, x2, y2 = BOXES[1].int().tolist()
    assert tuple(with_gt[(y1 + y2) // 2, x2]) == (255, 255, 255) != tuple(drawn[(y1 + y2) // 2, x2])


def test_detection_images_of_a_tiny_model(voc):
    predictor = Predictor(model(), config(), CLASSES)
    (det,) = predictor.predict([picture()])
    assert len(det.boxes) > 0
    threshold = float(det.scores.max())  # the best detection only
    images = detection_images(predictor, voc, count=1, threshold=threshold, ground_truth=False)
    drawn, original = np.asarray(images["known"]), np.asarray(picture())
    x1, y1, x2, y2 = (int(round(v)) for v in det.boxes[int(det.scores.argmax())].tolist())
    label = int(det.labels[int(det.scores.argmax())])
    assert tuple(drawn[y2, (x1 + x2) // 2]) == class_color(label)  # the bottom edge of the box
    changed = np.argwhere((drawn != original).any(axis=2))
    assert len(changed) > 0
    assert changed[:, 0].max() <= y2  # the outline and its tag, nothing below the box


def test_validation_images_leave_a_training_model_as_it_was(voc):
    net = model().train()
    net.head.eval()  # a mix of modes, restored exactly
    modes = [m.training for m in net.modules()]
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    images = validation_images(net, config(), CLASSES, voc, count=2, threshold=0.0)
    assert list(images) == ["known", "flipped"]
    assert [m.training for m in net.modules()] == modes
    assert torch.equal(torch.rand(3), expected_next)
