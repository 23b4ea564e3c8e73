"""The onnxruntime engine: :class:`OnnxPredictor` runs a file written by ``frcnn export`` (:mod:`frcnn.engine.export`).

It has :class:`~frcnn.engine.inference.Predictor`'s interface (``predict(images) -> list[Detections]``, boxes in
original image pixels, ``class_names``, ``cfg``), so ``frcnn detect``, ``eval`` and ``benchmark`` swap one for the
other with ``--engine onnxruntime``. Pre-processing (:func:`frcnn.transforms.prep_image`) and mapping boxes back
(:func:`frcnn.boxes.scale_boxes`, :func:`frcnn.boxes.clip_boxes`) are the PyTorch engine's own code; the graph
does the rest. Everything else comes from the file's metadata (class names, the config, frcnn's version), so a
``.onnx`` file is all the engine needs. onnxruntime runs on the CPU with ``torch.get_num_threads()`` threads;
the graph is float32 whatever ``TEST.AMP`` says. onnxruntime is the optional extra ``onnx``
(``pip install 'frcnn[onnx]'``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from frcnn import __version__
from frcnn.boxes import clip_boxes, scale_boxes
from frcnn.config import Config, config_from_dict
from frcnn.engine.export import FORMAT_KEY, FORMAT_VALUE, INPUT_NAMES, ONNX_FORMAT, OUTPUT_NAMES, require
from frcnn.errors import CheckpointError, ConfigError, FrcnnError
from frcnn.model.detector import Detections
from frcnn.transforms import Prepared, image_to_tensor, prep_image

ONNX_NAME = "model.onnx"  # a checkpoint folder may hold its export under this name


def onnx_path(path: str | Path) -> Path:
    """The ``.onnx`` file ``--checkpoint`` names: the file itself, or ``model.onnx`` in a checkpoint folder."""
    path = Path(path)
    if path.is_dir():
        if not (path / ONNX_NAME).is_file():
            raise CheckpointError(f"{path}: no {ONNX_NAME} in this folder; write one with "
                                  f"frcnn export --checkpoint {path} --out {path / ONNX_NAME}")
        return path / ONNX_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such .onnx file or folder")
    return path


def read_metadata(meta: dict[str, str], path: Path) -> tuple[Config, tuple[str, ...]]:
    """The config and class names of an exported model, from its ``metadata_props``; a file that is not
    frcnn's, or of another ONNX format version, is one CheckpointError line."""
    if meta.get(FORMAT_KEY) != FORMAT_VALUE:
        raise CheckpointError(f"{path}: an ONNX model, but not one frcnn exported (no {FORMAT_KEY} metadata); "
                              "write one with frcnn export")
    version = meta.get("frcnn.version", "unknown")
    if meta.get("frcnn.onnx_format") != str(ONNX_FORMAT):
        raise CheckpointError(f"{path}: exported by frcnn {version} in ONNX format {meta.get('frcnn.onnx_format')}; "
                              f"frcnn {__version__} reads format {ONNX_FORMAT}: export it again with this version")
    try:
        classes = json.loads(meta["frcnn.classes"])
        cfg = config_from_dict(yaml.safe_load(meta["frcnn.config"]))
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise ValueError("frcnn.classes is not a list of names")
    except (KeyError, ValueError, TypeError, yaml.YAMLError, FrcnnError) as e:
        raise CheckpointError(f"{path}: damaged frcnn metadata ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return cfg, tuple(classes)


class OnnxPredictor:
    """An exported detector run by onnxruntime; ``predict`` takes PIL images (one graph run per image)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        ort = require("onnxruntime", "--engine onnxruntime")
        self.path = onnx_path(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # not ONNX at all, a truncated file, an unknown op: one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: onnxruntime cannot load it as an ONNX model ({first[:200]})") from None
        self.cfg, self.class_names = read_metadata(self.session.get_modelmeta().custom_metadata_map, self.path)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != INPUT_NAMES or outputs != OUTPUT_NAMES:
            raise CheckpointError(f"{self.path}: inputs {inputs} and outputs {outputs} are not those of a frcnn "
                                  f"export ({INPUT_NAMES} -> {OUTPUT_NAMES})")
        self.device = torch.device("cpu")

    @classmethod
    def open(cls, path: str | Path, device: str | torch.device | None = None) -> OnnxPredictor:
        """``--checkpoint`` (a ``.onnx`` file or a folder holding ``model.onnx``) for ``--engine onnxruntime``,
        which runs on the CPU: ``device`` must be ``None``, ``"auto"`` or ``"cpu"``."""
        if device is not None and str(device) not in ("auto", "cpu"):
            raise ConfigError(f"--device {device}: --engine onnxruntime runs on the CPU (use --device cpu or auto)")
        return cls(path)

    def prepare(self, image: Image.Image) -> Prepared:
        """Pre-processing, as :class:`~frcnn.engine.inference.Predictor` does it."""
        cfg = self.cfg
        return prep_image(image_to_tensor(image), cfg.TEST.SCALES[0], cfg.TEST.MAX_SIZE, cfg.PIXEL_MEANS,
                          cfg.PIXEL_STDS)

    def run(self, prepared: Prepared) -> list[np.ndarray]:
        """The graph: boxes (network-input pixels), scores, labels."""
        return self.session.run(OUTPUT_NAMES, {INPUT_NAMES[0]: prepared.tensor.unsqueeze(0).numpy()})

    @staticmethod
    def finish(prepared: Prepared, outputs: Sequence[np.ndarray]) -> Detections:
        """Boxes back to the original image's pixels, as :class:`~frcnn.engine.inference.Predictor` maps them."""
        boxes, scores, labels = (torch.from_numpy(np.ascontiguousarray(a)) for a in outputs)
        h, w = prepared.original_size
        return Detections(clip_boxes(scale_boxes(boxes, 1.0 / prepared.scale), h, w), scores, labels)

    def predict(self, images: Sequence[Image.Image]) -> list[Detections]:
        """Detections of each image, boxes in that image's original pixels (+1 convention), float32."""
        out = []
        for image in images:
            prepared = self.prepare(image)
            out.append(self.finish(prepared, self.run(prepared)))
        return out


def run_onnx_benchmark(predictor: OnnxPredictor, size: tuple[int, int], runs: int = 5,
                       warmup: int = 2) -> dict[str, Any]:
    """One ``size`` image (random pixels, seeded, as ``frcnn benchmark``) through the onnxruntime engine: median
    seconds of pre-processing plus mapping boxes back, of the graph (one session run: head to per-class NMS),
    and in total. onnxruntime runs the graph as one call, so its stages are not timed apart."""
    h, w = size
    g = torch.Generator().manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
    pre, graph, total = [], [], []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        prepared = predictor.prepare(image)
        t1 = time.perf_counter()
        outputs = predictor.run(prepared)
        t2 = time.perf_counter()
        predictor.finish(prepared, outputs)
        t3 = time.perf_counter()
        if i >= warmup:
            pre.append(t1 - t0 + t3 - t2)
            graph.append(t2 - t1)
            total.append(t3 - t0)
    return {"engine": "onnxruntime", "onnx": str(predictor.path), "size": [h, w],
            "stages_ms": {"preprocess": statistics.median(pre) * 1e3, "graph": statistics.median(graph) * 1e3},
            "total_ms": statistics.median(total) * 1e3, "threads": predictor.session.get_session_options()
            .intra_op_num_threads}


def format_onnx_benchmark(result: dict[str, Any], machine: dict[str, Any]) -> str:
    import onnxruntime

    h, w = result["size"]
    lines = [f"frcnn benchmark --engine onnxruntime: one {h}x{w} image, {result['onnx']}",
             f"machine: {machine['cpu']}, {machine['capability']}, {machine['cores']} cores, "
             f"{result['threads']} threads, onnxruntime {onnxruntime.__version__}, torch {machine['torch']}",
             "", "| stage | ms | share |", "| --- | ---: | ---: |"]
    names = {"preprocess": "preprocess (and boxes back to the image)",
             "graph": "onnxruntime graph (head to per-class NMS)"}
    for k, v in result["stages_ms"].items():
        lines.append(f"| {names[k]} | {v:.1f} | {v / result['total_ms']:.0%} |")
    lines.append(f"| **total** | **{result['total_ms']:.1f}** | |")
    return "\n".join(lines)
