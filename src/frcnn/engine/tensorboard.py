"""TensorBoard event files of a training run, in ``RUN/tensorboard/`` (``tensorboard --logdir RUN``).

They hold the same numbers as ``metrics.jsonl`` (which ``frcnn report`` reads): :meth:`TensorBoardLog.write`
takes the very records training writes there and adds each numeric value as a scalar at step
``record["iteration"]``. Tags: ``loss/rpn_cls``, ``loss/rpn_box``, ``loss/rcnn_cls``, ``loss/rcnn_box``,
``loss/total``, ``lr``, ``time/step`` (seconds per iteration), ``time/elapsed``; validation records' ``val_<k>``
keys become ``val/<k>`` (``val/map``, ``val/rpn_cls``, ..., ``val/total``, ``val/images``, ``val/time``). Strings
(``val_metric``) are skipped, and any other numeric key keeps its own name, so nothing logged is lost.
A few validation images with their detections drawn go in as ``val/detections/<image id>``
(:func:`detection_images`, always the first images of the validation set, so one can watch them improve).

On resume from iteration ``k``, open the log with ``purge_step=k + 1``: TensorBoard then discards what the
interrupted run wrote after its snapshot, as training drops those lines from ``metrics.jsonl``.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from frcnn.viz.draw import draw_detections

__all__ = ["FOLDER", "TensorBoardLog", "detection_images", "scalar_tag", "validation_images"]

FOLDER = "tensorboard"
_TAGS = {"rpn_cls": "loss/rpn_cls", "rpn_box": "loss/rpn_box", "rcnn_cls": "loss/rcnn_cls",
         "rcnn_box": "loss/rcnn_box", "total": "loss/total", "lr": "lr", "time": "time/step",
         "elapsed": "time/elapsed"}


def scalar_tag(key: str) -> str:
    """The TensorBoard tag of the ``metrics.jsonl`` key ``key``."""
    if key in _TAGS:
        return _TAGS[key]
    if key.startswith("val_"):
        return "val/" + key[len("val_"):]
    return key


class TensorBoardLog:
    """Event files under ``run_dir / "tensorboard"``; ``purge_step=k + 1`` when the run resumes from iteration
    ``k`` (events at steps ``> k`` left by the interrupted run are then discarded by TensorBoard)."""

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when a run is logged

        self.folder = Path(run_dir) / FOLDER
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        """Every numeric value of a ``metrics.jsonl`` record as a scalar at step ``record["iteration"]``."""
        step = int(record["iteration"])
        for key, value in record.items():
            if key == "iteration" or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            self.writer.add_scalar(scalar_tag(key), float(value), step)
        self.writer.flush()  # readable at once, as metrics.jsonl is

    def images(self, iteration: int, images: dict[str, Image.Image]) -> None:
        """Each image as ``val/detections/<image id>`` at step ``iteration``."""
        for image_id, image in images.items():
            self.writer.add_image(f"val/detections/{image_id}", np.asarray(image.convert("RGB")), int(iteration),
                                  dataformats="HWC")
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def detection_images(predictor: Any, dataset: Any, count: int = 4, threshold: float = 0.5,
                     ground_truth: bool = True) -> dict[str, Image.Image]:
    """The first ``count`` images of ``dataset`` (always the same ones), keyed by image id, with the detections
    of ``predictor`` (an :class:`~frcnn.engine.inference.Predictor`) scoring at least ``threshold`` drawn by
    :func:`frcnn.viz.draw.draw_detections`; with ``ground_truth``, the annotated boxes as thin white outlines
    under them (as on the ``frcnn report`` page)."""
    out = {}
    for i in range(min(count, len(dataset))):
        sample = dataset[i]
        image = dataset.load_image(sample)
        det = predictor.predict([image])[0]
        keep = det.scores >= threshold
        out[str(sample.image_id)] = draw_detections(image, det.boxes[keep], det.labels[keep], det.scores[keep],
                                                    predictor.class_names,
                                                    gt_boxes=sample.boxes if ground_truth else None)
    return out


def validation_images(model: torch.nn.Module, cfg: Any, class_names: tuple[str, ...], dataset: Any,
                      count: int = 4, threshold: float = 0.5) -> dict[str, Image.Image]:
    """:func:`detection_images` of a model in training: runs it in eval mode, then restores every module's mode
    and the global RNG state, so training goes on exactly as without it."""
    from frcnn.engine.inference import Predictor

    modes = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[]):
            return detection_images(Predictor(model, cfg, class_names), dataset, count, threshold)
    finally:
        for m, mode in modes.items():
            m.training = mode
