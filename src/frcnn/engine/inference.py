"""Inference on images as they come: pre-process, detect, and map boxes back to original image pixels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from frcnn.boxes import clip_boxes, scale_boxes
from frcnn.config import Config, config_changes, merge
from frcnn.engine.checkpoint import CONFIG, load_model, read_config
from frcnn.engine.precision import Precision
from frcnn.model.detector import Detections, FasterRCNN
from frcnn.model.trace import Trace
from frcnn.transforms import batch_images, image_to_tensor, prep_image


def describe_overrides(cfg: Config, overrides: dict) -> str:
    """One line saying what ``overrides`` (``eval``/``detect --set``) change on the checkpoint's ``cfg``."""
    changes = config_changes(cfg, merge(cfg, overrides))
    return f"--set: {'; '.join(changes) or 'no change'} (this run only; the checkpoint is not changed)"


class Predictor:
    """A trained detector with its config and class names; ``predict`` takes PIL images."""

    def __init__(self, model: FasterRCNN, cfg: Config, class_names: Sequence[str]):
        self.model, self.cfg, self.class_names = model.eval(), cfg, tuple(class_names)
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, folder: str | Path, device: str | torch.device | None = None,
                        fast: bool = True, overrides: dict | None = None,
                        say: Callable[[str], None] | None = None) -> Predictor:
        """The checkpoint folder's detector on ``device``: ``None`` or ``"auto"`` is CUDA when this machine has
        it, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given. The checkpoint's ``DEVICE`` (where it
        was trained) is not used, so a model trained on CUDA runs on a CPU-only machine. ``fast``: the fast
        inference path (:mod:`frcnn.engine.fast`; same detections up to float rounding). ``overrides``: config
        changes for this run only (the ``TEST.*`` keys ``eval --set`` gives; the folder is not written), said in
        one line to ``say``."""
        model, ckpt = load_model(folder, device, overrides=overrides)
        if overrides and say is not None:
            say(describe_overrides(read_config(Path(folder) / CONFIG), overrides))
        if fast:
            from frcnn.engine.fast import prepare_for_inference

            model = prepare_for_inference(model, inplace=True)  # loaded here, used only here
        return cls(model, ckpt.cfg, ckpt.class_names)

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image], trace: Trace | None = None) -> list[Detections]:
        """Detections of each image, boxes in that image's original pixels (+1 convention), float32 whatever
        ``TEST.AMP`` the model runs in (fp16 on a CPU is a ConfigError)."""
        cfg = self.cfg
        prepared = [prep_image(image_to_tensor(im).to(self.device), cfg.TEST.SCALES[0], cfg.TEST.MAX_SIZE,
                               cfg.PIXEL_MEANS, cfg.PIXEL_STDS) for im in images]
        batch, sizes = batch_images([p.tensor for p in prepared])
        if trace is not None:
            trace.put("preprocess", scales=[p.scale for p in prepared],
                      original_sizes=[p.original_size for p in prepared], input=batch)
        with Precision(cfg.TEST.AMP, self.device, key="TEST.AMP").autocast():
            detections = self.model(batch, sizes.to(self.device), trace=trace)
        out = []
        for p, d in zip(prepared, detections):
            h, w = p.original_size
            boxes = clip_boxes(scale_boxes(d.boxes, 1.0 / p.scale), h, w)
            out.append(Detections(boxes.cpu(), d.scores.cpu(), d.labels.cpu()))
        return out
