"""``frcnn export``: the whole detector as one ONNX file, for onnxruntime (:mod:`frcnn.engine.onnx_engine`).

**What is in the graph.** Input ``image``: one pre-processed image, float32 ``(1, 3, H, W)``, already resized (short
side ``TEST.SCALES[0]``, long side at most ``TEST.MAX_SIZE``) and normalised (``PIXEL_MEANS``, ``PIXEL_STDS``) by
frcnn's own :func:`frcnn.transforms.prep_image`; ``H`` and ``W`` are dynamic (any size, one file), and the true
image size is the tensor's (a batch of one has no padding). Inside: the head, the anchors (shifted over the feature
map's size in-graph, never cached constants), the RPN, the proposal layer (decode, clip, top
``TEST.RPN_PRE_NMS_TOP_N`` or fewer, NMS, top ``TEST.RPN_POST_NMS_TOP_N``), RoI pooling in the config's
``POOLING_MODE`` (``align``: ONNX ``RoiAlign``; ``pool``: ``MaxRoiPool``; ``crop``: the affine grid built from the
RoIs and ``GridSample`` with ``align_corners``, then 2x2 max pooling), the classification network, class-specific
decoding and clipping, ``TEST.SCORE_THRESH``, per-class NMS at ``TEST.NMS`` (one ``NonMaxSuppression`` with the
classes as its batch) and the ``TEST.MAX_PER_IMAGE`` cap. Outputs: ``boxes`` ``(D, 4)`` float32 in network-input
pixels (+1 convention), ``scores`` ``(D,)`` float32, ``labels`` ``(D,)`` int64 in ``1..K``, best score first.
Pre-processing and mapping boxes back to the original image stay in Python
(:class:`~frcnn.engine.onnx_engine.OnnxPredictor`), exactly as :class:`~frcnn.engine.inference.Predictor` does them,
so both engines share that code. Batch: one image per run (the engine loops over images).

**Exporter and opset.** ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` + onnxscript), opset 20.
The dynamo exporter is PyTorch's supported one (the TorchScript exporter is deprecated) and it keeps sizes
symbolic: the feature map's size, ``min(RPN_PRE_NMS_TOP_N, anchors)`` (``torch.sym_min``) and every count
after NMS or the score threshold stay expressions of the input, where the TorchScript tracer would turn a
Python ``int`` of a shape into a constant. onnxscript translates torchvision's ``nms`` and ``roi_align`` into
ONNX ``NonMaxSuppression`` and ``RoiAlign``; ``roi_pool`` (onnxscript's translation fails on it) and per-class
NMS (:func:`class_nms`) have translations here (``MaxRoiPool``, ``NonMaxSuppression``); opset 20 is the exporter's
default and has ``GridSample`` (16+) in its current form. After export the file is checked: its input must
keep ``H`` and ``W`` symbolic (an export that silently specialised a size is refused).

**The graph's code.** :class:`DetectorGraph` runs the trained model's own modules (head, RPN, classification
network) and frcnn's box math (:mod:`frcnn.boxes`, :func:`frcnn.model.anchors.shift_anchors`); the proposal
layer, pooling and post-processing are written here once more for a batch of one in export-friendly ops:
sizes as tensors (``torch.as_tensor`` of a size would specialise it), torchvision's ``nms``/``roi_align``/
``roi_pool`` (frcnn's own CPU kernels are not ONNX ops), per-class NMS as one custom op (:func:`class_nms`,
``frcnn::class_nms``, exported as one ONNX node). ``tests/test_export.py`` holds both paths to the same
detections in every pooling mode.

**The pyramid (``NECK=fpn``).** :class:`PyramidGraph` has the same input, outputs and post-processing, and does
level by level what the model does on its maps (``P2..``; the last level for the RPN only):

- *anchors*: each level's reference anchors (:func:`frcnn.model.anchors.level_anchors`) shifted over that map's
  size at its stride, in the graph;
- *proposal layer* (:func:`frcnn.model.rpn.proposal_layer` with ``level_sizes``): per level, the RPN on the map,
  decoding and clipping, the top ``TEST.RPN_PRE_NMS_TOP_N`` (``TopK``, ties to the lower anchor index as the
  stable sort) and NMS within the level (one ``NonMaxSuppression`` per level, on the level's own boxes: what
  ``batched_nms`` computes, exactly so above 1000 boxes where it runs one NMS per level too, and to float rounding
  of the shifted boxes below); the kept boxes of all levels concatenated, finest first, and the best
  ``TEST.RPN_POST_NMS_TOP_N`` by ``TopK`` (equal scores stay in level, then index order: ``batched_nms``'s up to
  1000 boxes; above, its sort of the kept boxes is not stable);
- *RoI pooling* (:func:`frcnn.model.pooling.pool_pyramid`): each RoI's level by the model's own
  :func:`~frcnn.model.pooling.roi_levels` (``Sqrt``, ``Log``, ``Floor``, ``Clip``), the RoIs of each pooled level
  picked by ``NonZero`` and pooled from that map in ``POOLING_MODE`` (one ``RoiAlign``/``MaxRoiPool``/
  ``GridSample`` per level; an empty level pools nothing), and the crops put back in RoI order (the inverse of
  the picks' permutation, an argsort).

``tests/test_export.py`` holds it to PyTorch's detections with every level used and with empty pooled levels.

**Metadata** (``metadata_props``): ``frcnn.format`` (``frcnn-onnx``), ``frcnn.onnx_format`` (the graph's
interface version, :data:`ONNX_FORMAT`), ``frcnn.version``, ``frcnn.classes`` (JSON list) and ``frcnn.config``
(the full resolved YAML): the engine needs nothing but the ``.onnx`` file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms, roi_align, roi_pool

from frcnn import __version__
from frcnn.boxes import bbox_transform_inv, clip_boxes, nms_threshold, to_exclusive
from frcnn.config import Config, dump_yaml, merge
from frcnn.errors import CheckpointError, ConfigError
from frcnn.model.anchors import shift_anchors
from frcnn.model.detector import FasterRCNN
from frcnn.model.pooling import pooled_level_index

ONNX_FORMAT = 1  # the graph's inputs, outputs and metadata; a change makes older files incompatible
OPSET = 20
FORMAT_KEY, FORMAT_VALUE = "frcnn.format", "frcnn-onnx"
INPUT_NAMES, OUTPUT_NAMES = ["image"], ["boxes", "scores", "labels"]
INSTALL_HINT = "pip install 'frcnn[onnx]'"


def require(module: str, what: str):
    """Import an optional dependency of the ``onnx`` extra, or a one-line ConfigError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{what} needs {module}, which is not installed: {INSTALL_HINT}") from None


def _size(n) -> Tensor:
    """A (symbolic) size as a float32 scalar tensor; ``torch.as_tensor`` of a size would make it a constant."""
    return torch.full((), n, dtype=torch.float32)


def crop_pool_one(features: Tensor, boxes: Tensor, size: int, stride: int) -> Tensor:
    """Crop pooling (:func:`frcnn.model.pooling.crop_pool`) of ``boxes`` (R, 4) from one image's ``features``
    (1, C, H, W): the same affine grid written out per axis (``theta`` has no shear), one ``grid_sample`` of
    all RoIs stacked into one tall grid, then 2x2 max pooling. (R, C, size, size)."""
    _, c, h, w = features.shape
    g = size * 2
    x1, y1, x2, y2 = (boxes[:, k] / stride for k in range(4))
    sw, sh = _size(torch.sym_max(w - 1, 1)), _size(torch.sym_max(h - 1, 1))
    base = torch.linspace(-1.0, 1.0, g, dtype=boxes.dtype, device=boxes.device)  # affine_grid, align_corners
    gx = ((x2 - x1) / sw)[:, None] * base + ((x1 + x2 - _size(w) + 1) / sw)[:, None]  # (R, g)
    gy = ((y2 - y1) / sh)[:, None] * base + ((y1 + y2 - _size(h) + 1) / sh)[:, None]
    r = boxes.shape[0]
    grid = torch.stack((gx[:, None, :].expand(r, g, g), gy[:, :, None].expand(r, g, g)), dim=-1)
    crops = F.grid_sample(features, grid.reshape(1, r * g, g, 2), mode="bilinear", align_corners=True)
    return F.max_pool2d(crops.reshape(c, r, g, g).transpose(0, 1), 2, 2)


def _roi_pool_to_onnx(features, rois, spatial_scale: float, pooled_height: int, pooled_width: int):
    """``torchvision::roi_pool`` as ONNX ``MaxRoiPool`` (onnxscript's own translation takes another signature
    and fails); the op's second output, the argmax, is unused at inference and given as a cast of the first."""
    from onnxscript import opset20 as op

    pooled = op.MaxRoiPool(features, rois, pooled_shape=[pooled_height, pooled_width], spatial_scale=spatial_scale)
    return pooled, op.Cast(pooled, to=7)  # 7: int64


@torch.library.custom_op("frcnn::class_nms", mutates_args=())
def class_nms(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    """Per-class NMS as one op: ``boxes`` (K, R, 4) (exclusive corners, as torchvision's ``nms`` takes them) and
    ``scores`` (K, R) of K classes; for each class, NMS at ``iou_threshold`` of its boxes scoring above
    ``score_threshold``. Returns the kept ``[class, box]`` index pairs (D, 2), class by class, best score first.

    In the exported graph this is ONE ``NonMaxSuppression`` with the classes as its batch (each class has its own
    boxes; ONNX's class axis would share them), instead of one NMS node per class: the graph and the export time
    stay flat in K (80 COCO classes unrolled took 161 s to export and 146 ms to run the demo-cpu graph)."""
    kept = []
    for c in range(boxes.shape[0]):
        sel = (scores[c] > score_threshold).nonzero().squeeze(1)
        keep = sel[nms(boxes[c, sel], scores[c, sel], iou_threshold)]
        kept.append(torch.stack((torch.full_like(keep, c), keep), dim=1))
    return torch.cat(kept) if kept else torch.zeros((0, 2), dtype=torch.long, device=boxes.device)


@class_nms.register_fake
def _class_nms_shape(boxes: Tensor, scores: Tensor, iou_threshold: float, score_threshold: float) -> Tensor:
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(), 2), dtype=torch.long)


def _class_nms_to_onnx(boxes, scores, iou_threshold: float, score_threshold: float):
    """:func:`class_nms` in ONNX: ``NonMaxSuppression`` over a batch of K classes; its rows are
    ``[batch, class, box]``, so columns 0 and 2 are ``[class, box]``."""
    from onnxscript import opset20 as op

    selected = op.NonMaxSuppression(boxes, op.Unsqueeze(scores, [1]), 0x7FFFFFFFFFFFFFFF, iou_threshold,
                                    score_threshold)
    return op.Gather(selected, [0, 2], axis=1)


class DetectorGraph(nn.Module):
    """What ``frcnn export`` puts into the ONNX file: ``image`` (1, 3, H, W) pre-processed ->
    ``(boxes (D, 4) network-input pixels, scores (D,), labels (D,) int64)``, best score first."""

    def __init__(self, model: FasterRCNN):
        super().__init__()
        self.head, self.rpn, self.classifier = model.head, model.rpn, model.classifier
        self.register_buffer("base_anchors", model.anchor_generator.base_anchors.clone(), persistent=False)
        self.cfg, self.num_classes = model.cfg, model.num_classes

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg, test = self.cfg, self.cfg.TEST
        features = self.head(image)
        height, width = _size(image.shape[2]), _size(image.shape[3])
        # proposal layer (frcnn.model.rpn.proposal_layer) for one image
        boxes, _, keep = self.rpn_proposals(features, self.base_anchors, cfg.FEAT_STRIDE, height, width)
        if test.RPN_POST_NMS_TOP_N > 0:
            keep = keep[: test.RPN_POST_NMS_TOP_N]
        proposals = boxes[keep]
        pooled = self.pool(features, proposals, cfg.FEAT_STRIDE)
        cls_logits, bbox_pred = self.classifier(pooled)
        return self.detect(proposals, cls_logits, bbox_pred, height, width)

    def rpn_proposals(self, features: Tensor, base_anchors: Tensor, stride: int, height: Tensor, width: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """One map's anchors (``base_anchors`` shifted over its size at ``stride``), the RPN on it, the decoded and
        clipped boxes of the top ``TEST.RPN_PRE_NMS_TOP_N`` anchors and their scores, best first, and the indices
        NMS at ``TEST.RPN_NMS_THRESH`` keeps of them (best first)."""
        test = self.cfg.TEST
        _, _, fh, fw = features.shape
        anchors = shift_anchors(base_anchors, fh, fw, stride)
        logits, deltas = self.rpn(features)
        fg = logits[0].softmax(-1)[:, 1]
        boxes = clip_boxes(bbox_transform_inv(anchors, deltas[0]), height, width)
        k = torch.sym_min(test.RPN_PRE_NMS_TOP_N, fg.shape[0]) if test.RPN_PRE_NMS_TOP_N > 0 else fg.shape[0]
        scores, order = fg.topk(k)  # ONNX TopK: ties keep the lower anchor index first, as rpn.py's stable sort
        boxes = boxes[order]
        return boxes, scores, nms(to_exclusive(boxes), scores, nms_threshold(test.RPN_NMS_THRESH, boxes.dtype))

    def pool(self, features: Tensor, proposals: Tensor, stride: int) -> Tensor:
        """RoI pooling (:func:`frcnn.model.pooling.pool_rois`) of ``proposals`` (R, 4) from one map at ``stride``,
        in the config's POOLING_MODE: (R, C, POOLING_SIZE, POOLING_SIZE). The map first goes through the
        classifier's ``before_pooling``, as in the model (an identity unless the fast path filled it)."""
        size, mode = self.cfg.POOLING_SIZE, self.cfg.POOLING_MODE
        features = self.classifier.before_pooling(features)
        rois = torch.cat((torch.zeros_like(proposals[:, :1]), proposals), dim=1)
        if mode == "crop":
            return crop_pool_one(features, proposals, size, stride)
        if mode == "align":
            return roi_align(features, rois, (size, size), spatial_scale=1.0 / stride, sampling_ratio=0)
        return roi_pool(features, rois, (size, size), spatial_scale=1.0 / stride)

    def detect(self, proposals: Tensor, cls_logits: Tensor, bbox_pred: Tensor, height: Tensor,
               width: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`frcnn.model.detector.FasterRCNN.detect` for one image. Kept detections are ordered by score,
        ties by their (RoI, class) position, as torchvision's stable sort orders the PyTorch path's."""
        test, k1 = self.cfg.TEST, self.num_classes + 1
        probs = cls_logits.softmax(-1)
        stds = bbox_pred.new_tensor(self.cfg.TRAIN.BBOX_NORMALIZE_STDS).repeat(k1)
        means = bbox_pred.new_tensor(self.cfg.TRAIN.BBOX_NORMALIZE_MEANS).repeat(k1)
        boxes = clip_boxes(bbox_transform_inv(proposals, bbox_pred * stds + means), height, width)
        boxes = boxes.reshape(-1, k1, 4)
        kept = torch.ops.frcnn.class_nms(to_exclusive(boxes[:, 1:]).transpose(0, 1).contiguous(),
                                         probs[:, 1:].transpose(0, 1).contiguous(),
                                         nms_threshold(test.NMS, boxes.dtype), test.SCORE_THRESH)
        roi, label = kept[:, 1], kept[:, 0] + 1
        by_position = (roi * k1 + label).argsort()  # the PyTorch path's candidate order: RoI, then class
        roi, label = roi[by_position], label[by_position]
        scores = probs[roi, label]
        # ONNX TopK puts the lower index first among equal values: a stable descending sort
        order = scores.topk(scores.shape[0]).indices[: test.MAX_PER_IMAGE]
        roi, label = roi[order], label[order]
        return boxes[roi, label], probs[roi, label], label


class PyramidGraph(DetectorGraph):
    """:class:`DetectorGraph` of a ``NECK=fpn`` model (module docstring, "The pyramid"): the same input, outputs and
    :meth:`detect`; the RPN, the proposal layer and RoI pooling level by level."""

    def __init__(self, model: FasterRCNN):
        super().__init__(model)
        self.strides = list(model.strides)  # P2.. and the RPN's extra level, finest first
        for j, generator in enumerate(model.anchor_generators):
            self.register_buffer(f"base_anchors{j}", generator.base_anchors.clone(), persistent=False)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        test = self.cfg.TEST
        levels = self.head(image)  # [P2, ..., P6], finest first
        height, width = _size(image.shape[2]), _size(image.shape[3])
        # proposal layer (frcnn.model.rpn.proposal_layer with level_sizes): each level's own anchors, top
        # RPN_PRE_NMS_TOP_N and NMS within the level, then the best RPN_POST_NMS_TOP_N of all levels
        level_boxes, level_scores = [], []
        for j, (features, stride) in enumerate(zip(levels, self.strides)):
            boxes, scores, keep = self.rpn_proposals(features, getattr(self, f"base_anchors{j}"), stride, height,
                                                     width)
            level_boxes.append(boxes[keep])
            level_scores.append(scores[keep])
        boxes, scores = torch.cat(level_boxes), torch.cat(level_scores)
        # best first over all levels; equal scores keep their place in this list (finer level first, then the
        # level's order), which is the order of the anchor indices batched_nms breaks ties by
        best = scores.topk(scores.shape[0]).indices
        if test.RPN_POST_NMS_TOP_N > 0:
            best = best[: test.RPN_POST_NMS_TOP_N]
        proposals = boxes[best]
        # RoI pooling (frcnn.model.pooling.pool_pyramid): each RoI from its level (the last level is the RPN's
        # only), then the crops put back in the order of the proposals
        strides = self.strides[:-1]
        rois = torch.cat((torch.zeros_like(proposals[:, :1]), proposals), dim=1)
        level = pooled_level_index(rois, strides)
        crops, picks = [], []
        for i, (features, stride) in enumerate(zip(levels[:-1], strides)):
            pick = (level == i).nonzero().squeeze(1)
            crops.append(self.pool(features, proposals[pick], stride))
            picks.append(pick)
        pooled = torch.cat(crops)[torch.cat(picks).argsort()]
        cls_logits, bbox_pred = self.classifier(pooled)
        return self.detect(proposals, cls_logits, bbox_pred, height, width)


def metadata(cfg: Config, class_names: Sequence[str]) -> dict[str, str]:
    return {FORMAT_KEY: FORMAT_VALUE, "frcnn.onnx_format": str(ONNX_FORMAT), "frcnn.version": __version__,
            "frcnn.classes": json.dumps(list(class_names)), "frcnn.config": dump_yaml(cfg)}


@torch.no_grad()
def export_model(model: FasterRCNN, cfg: Config, class_names: Sequence[str], out: str | Path,
                 example_size: tuple[int, int] | None = None) -> Path:
    """Export ``model`` (any device; exported from a CPU copy in float32) to ``out``, which must not exist.
    ``example_size``: the (H, W) of the example image the exporter traces with (default: the config's test
    size); the file runs on any size."""
    import copy

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists; export never overwrites: choose another --out")
    onnx = require("onnx", "frcnn export")
    require("onnxscript", "frcnn export")
    if cfg.TEST.NMS_METHOD == "soft":  # the graph's class NMS is ONNX's NonMaxSuppression: greedy
        print(f"export: ONNX has no soft-NMS: the graph suppresses greedily at TEST.NMS={cfg.TEST.NMS:g} (its config "
              f"says TEST.NMS_METHOD=hard); the checkpoint's own path keeps soft-NMS")
        cfg = merge(cfg, {"TEST": {"NMS_METHOD": "hard"}})
    model = copy.deepcopy(model).float().cpu().eval()
    model.cfg = cfg
    graph = (PyramidGraph if model.pyramid else DetectorGraph)(model).eval()
    if example_size is None:
        example_size = (cfg.TEST.SCALES[0], max(cfg.TEST.SCALES[0], min(cfg.TEST.MAX_SIZE,
                                                                       round(cfg.TEST.SCALES[0] * 4 / 3))))
    image = torch.randn(1, 3, *example_size, generator=torch.Generator().manual_seed(0))
    dims = {2: torch.export.Dim("height", min=2 * cfg.FEAT_STRIDE, max=8192),
            3: torch.export.Dim("width", min=2 * cfg.FEAT_STRIDE, max=8192)}
    translations = {torch.ops.torchvision.roi_pool.default: _roi_pool_to_onnx,
                    torch.ops.frcnn.class_nms.default: _class_nms_to_onnx}
    chatter = io.StringIO()
    try:  # the exporter prints its progress and warns of deprecations: kept out of frcnn's output
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(graph, (image,), dynamo=True, opset_version=OPSET, input_names=INPUT_NAMES,
                                        output_names=OUTPUT_NAMES, dynamic_shapes={"image": dims}, verbose=False,
                                        external_data=False, custom_translation_table=translations)
    except Exception as e:  # an op or a shape the exporter cannot take: one line, the exporter's first
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise CheckpointError(f"torch.onnx.export failed ({type(e).__name__}: {first[:300]})") from e
    proto = program.model_proto
    dims_out = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if not (isinstance(dims_out[2], str) and isinstance(dims_out[3], str)):
        raise CheckpointError(f"export specialised the image size to {dims_out}: this model cannot be exported "
                              "with a dynamic size")
    for key, value in metadata(cfg, class_names).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save_model(proto, str(tmp))
    os.replace(tmp, out)
    return out


def export_checkpoint(folder: str | Path, out: str | Path) -> Path:
    """``frcnn export``: the checkpoint folder's detector as ONNX at ``out`` (refused if ``out`` exists)."""
    from frcnn.engine.checkpoint import load_model

    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} exists; export never overwrites: choose another --out")
    model, ckpt = load_model(folder, "cpu")
    return export_model(model, ckpt.cfg, ckpt.class_names, out)
