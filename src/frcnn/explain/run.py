"""Run the detector once on one image with a :class:`~frcnn.model.trace.Trace`, as inference does.

The pre-processing, the forward pass and the mapping of the final boxes back to the original image are
those of :meth:`frcnn.engine.inference.Predictor.predict`; with ground truth, the boxes are scaled into
network-input pixels and passed to the model in eval mode, which then also runs the anchor target and
proposal target layers (their sampling seeded with ``RNG_SEED``) without changing the detections.

Coordinate spaces: the trace holds network-input pixels; :meth:`ExplainRun.to_original` maps them to
original-image pixels exactly as inference does (``scale_boxes`` by ``1 / scale``, +1 convention).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from frcnn.boxes import clip_boxes, scale_boxes
from frcnn.config import Config
from frcnn.data.repair import inverted, repair_sample
from frcnn.data.voc import parse_voc_xml
from frcnn.errors import DataError
from frcnn.model.detector import Detections, FasterRCNN
from frcnn.model.trace import Trace
from frcnn.transforms import batch_images, image_to_tensor, prep_image


@dataclass
class GroundTruth:
    """Boxes (G, 4) in original-image pixels (0-based, +1 convention) and labels (G,) in 1..K."""

    boxes: Tensor
    labels: Tensor
    source: str = ""


@dataclass
class ExplainRun:
    image: Image.Image  # the original RGB image
    cfg: Config
    class_names: tuple[str, ...]
    trace: Trace
    scale: float  # network-input pixels per original pixel
    input_size: tuple[int, int]  # (h, w) of the resized image
    batch_size_hw: tuple[int, int]  # (H, W) of the padded batch tensor
    detections: Detections  # final detections in original-image pixels, as Predictor returns them
    gt: GroundTruth | None
    gt_net: Tensor | None  # gt boxes in network-input pixels, as given to the model

    @property
    def original_size(self) -> tuple[int, int]:
        return self.image.height, self.image.width

    def to_original(self, boxes: Tensor) -> Tensor:
        """Network-input boxes (..., 4) to original-image pixels, clipped to the image (as inference)."""
        h, w = self.original_size
        return clip_boxes(scale_boxes(boxes.float().cpu(), 1.0 / self.scale), h, w)


def find_annotation(image_path: Path) -> Path | None:
    """``ROOT/Annotations/<stem>.xml`` for an image at ``ROOT/JPEGImages/<name>`` (a VOC data set), else None."""
    if image_path.parent.name != "JPEGImages":
        return None
    xml = image_path.parent.parent / "Annotations" / f"{image_path.stem}.xml"
    return xml if xml.is_file() else None


def read_ground_truth(xml_path: Path, image_path: Path, image: Image.Image,
                      class_names: tuple[str, ...]) -> GroundTruth:
    """Non-difficult boxes of a VOC XML (classes named as the checkpoint names them), read as training reads
    them: boxes crossing the image clipped, 1-pixel and duplicate boxes dropped (:func:`repair_sample`); what
    training would stop on is one DataError line."""
    if not xml_path.is_file():
        raise DataError(f"{xml_path}: no such annotation file")
    problems: list = []
    sample = parse_voc_xml(xml_path, {n: i for i, n in enumerate(class_names, start=1)},
                           images_dir=Path(os.path.abspath(image_path)).parent, problems=problems)
    if problems or sample is None:
        raise DataError(problems[0].line)
    if (sample.width, sample.height) != image.size:
        raise DataError(f"{xml_path}: annotation says {sample.width}x{sample.height} but {image_path} is "
                        f"{image.width}x{image.height}")
    if inverted(sample.boxes).any():
        i = int(inverted(sample.boxes).nonzero()[0]) + 1
        raise DataError(f"{xml_path}: box {i} {sample.boxes[i - 1].add(1).tolist()} is inverted (x2 < x1 or y2 < y1)")
    sample, _ = repair_sample(sample, image.width, image.height)
    keep = ~sample.difficult
    return GroundTruth(sample.boxes[keep], sample.labels[keep], str(xml_path))


@torch.no_grad()
def run_traced(model: FasterRCNN, cfg: Config, class_names: tuple[str, ...], image: Image.Image,
               gt: GroundTruth | None = None, warmup: bool = True,
               device: str | torch.device | None = None) -> ExplainRun:
    """One traced inference of ``image`` (and, with ``gt``, the target layers too).

    ``warmup`` first runs the same image once without a trace, so the timings are not those of a cold start.
    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``; default: where the model's weights are) is
    where it runs: the model is moved there in place, as :meth:`torch.nn.Module.to` does. The trace's tensors
    stay on that device; the returned detections and ground truth are on the CPU.
    """
    from frcnn.engine.checkpoint import choose_device

    device = next(model.parameters()).device if device is None else choose_device(device)
    model.to(device).eval()
    if warmup:
        prepared = prep_image(image_to_tensor(image).to(device), cfg.TEST.SCALES[0], cfg.TEST.MAX_SIZE,
                              cfg.PIXEL_MEANS, cfg.PIXEL_STDS)
        batch, sizes = batch_images([prepared.tensor])
        model(batch, sizes.to(device))
    trace = Trace()
    start = time.perf_counter()
    prepared = prep_image(image_to_tensor(image).to(device), cfg.TEST.SCALES[0], cfg.TEST.MAX_SIZE,
                          cfg.PIXEL_MEANS, cfg.PIXEL_STDS)
    batch, sizes = batch_images([prepared.tensor])
    trace.timings["preprocess"] = time.perf_counter() - start
    trace.put("preprocess", scales=[prepared.scale], original_sizes=[prepared.original_size], input=batch)
    gt_net = None
    kwargs: dict = {}
    if gt is not None:
        gt_net = scale_boxes(gt.boxes.float(), prepared.scale).to(device)
        kwargs = {"gt_boxes": [gt_net], "gt_labels": [gt.labels.to(device)],
                  # a CPU generator, as in training: the layers draw on it and move the indices to the device
                  "generator": torch.Generator().manual_seed(cfg.RNG_SEED)}
    det = model(batch, sizes.to(device), trace=trace, **kwargs)[0]
    h, w = prepared.original_size
    boxes = clip_boxes(scale_boxes(det.boxes, 1.0 / prepared.scale), h, w)
    final = Detections(boxes.cpu(), det.scores.cpu(), det.labels.cpu())
    return ExplainRun(image=image, cfg=cfg, class_names=tuple(class_names), trace=trace, scale=prepared.scale,
                      input_size=tuple(prepared.size), batch_size_hw=tuple(batch.shape[-2:]), detections=final,
                      gt=gt, gt_net=None if gt_net is None else gt_net.cpu())
