"""``frcnn explain``: every stage of the detector on one image, as pictures and numbers, in one HTML page.

:func:`explain_image` runs a checkpoint on one image with a trace (see :mod:`frcnn.explain.run`), turns the
trace into one :class:`~frcnn.explain.stages.Stage` per step (:mod:`frcnn.explain.stages`) and writes
``index.html`` with one PNG per stage beside it (:mod:`frcnn.explain.page`), and optionally
``explain.json`` with the numbers of every stage. :mod:`frcnn.explain.report` writes the training-run page.

Files, and the stage of the write-up each draws (the ``stages`` modules are named as in :mod:`frcnn.model`):

- ``run.py``: the traced forward pass (:class:`ExplainRun`) and the ground truth read beside the image
- ``stages/canvas.py``: :class:`~frcnn.explain.stages.Stage` and the drawing helpers every stage shares
- ``stages/anchors.py``: 1. image pre-processing; 2. anchor generation layer
- ``stages/rpn.py``: 3. region proposal network output; 4. proposal layer (before and after NMS)
- ``stages/targets.py``: 5. anchor target and proposal target layers (only with ground truth)
- ``stages/pooling.py``: 6. RoI pooling
- ``stages/roi_heads.py``: 7. classification layer
- ``stages/detections.py``: 8. per-class non-maximum suppression; 9. final detections
- ``stages/levels.py``: the pyramid levels of an FPN model (``NECK=fpn``): stages 2, 3, 4 and 6 then show
  every level (anchors, objectness, proposals and RoIs by level) beside what they show for C4
- ``stages/__init__.py``: 10. time spent per stage, and :func:`build_stages` (every stage in order)
- ``page.py``: the HTML page and its PNGs; ``report.py``: the training-run page (``frcnn report``)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from frcnn.config import Config, pyramid_strides
from frcnn.explain.page import Section, prepare_out, to_jsonable, write_page
from frcnn.explain.run import ExplainRun, GroundTruth, find_annotation, read_ground_truth, run_traced
from frcnn.explain.stages import Stage, build_stages
from frcnn.model.detector import FasterRCNN

__all__ = ["ExplainRun", "GroundTruth", "Stage", "build_stages", "explain_image", "run_traced", "write_explain"]

JSON_NAME = "explain.json"


def write_explain(run: ExplainRun, out: Path, title: str, subtitle: Sequence[str] = (), threshold: float = 0.5,
                  write_json: bool = False) -> Path:
    """Write the page of an :class:`ExplainRun` into ``out`` (new or empty); returns ``out/index.html``."""
    out = Path(out)
    prepare_out(out)
    stages = build_stages(run, threshold)
    sections = [Section(anchor=s.key, title=s.title, text=s.text, numbers=s.numbers, image=s.image,
                        image_name=s.key, notes=s.notes) for s in stages]
    index = write_page(out, title, subtitle, sections)
    if write_json:
        data = {"title": title, "threshold": threshold, "stages": {s.key: s.numbers for s in stages}}
        (out / JSON_NAME).write_text(json.dumps(to_jsonable(data), indent=1))
    return index


def _neck(cfg: Config) -> str:
    """``" + FPN (strides 4, 8, 16, 32)"`` for a pyramid; nothing for C4 (its subtitle as it always was)."""
    return f" + FPN (strides {', '.join(str(s) for s in pyramid_strides(cfg))})" if cfg.NECK == "fpn" else ""


def explain_image(model: FasterRCNN, cfg: Config, class_names: Sequence[str], image_path: Path, out: Path,
                  gt_path: Path | None = None, threshold: float = 0.5, write_json: bool = False,
                  checkpoint: str = "", device: str | torch.device | None = None) -> Path:
    """Explain ``image_path``; ground truth from ``gt_path`` or, for an image of a VOC data set, its XML.

    ``device``: where the model runs (default: where its weights are; see :func:`run_traced`)."""
    from frcnn.engine.detect import open_image

    image_path = Path(image_path)
    image = open_image(image_path)
    if Path(out).exists():
        prepare_out(Path(out))  # refuse a folder in the way before the work, not after
    class_names = tuple(class_names)
    xml = Path(gt_path) if gt_path is not None else find_annotation(image_path)
    gt = read_ground_truth(xml, image_path, image, class_names) if xml is not None else None
    run = run_traced(model, cfg, class_names, image, gt, device=device)
    device = next(model.parameters()).device
    subtitle = [f"image {image_path} ({image.width} x {image.height})",
                f"checkpoint {checkpoint or '(in memory)'}; backbone {cfg.BACKBONE}{_neck(cfg)}, "
                f"POOLING_MODE {cfg.POOLING_MODE}; "
                f"classes: {', '.join(class_names)}; device {device}",
                f"ground truth: {xml}" if xml is not None else "no ground truth (stage 5 needs --gt)"]
    with torch.no_grad():
        return write_explain(run, out, f"frcnn explain: {image_path.name}", subtitle, threshold, write_json)
