"""frcnn vs torchvision's FasterRCNN on BCCD: the same network and budget, trained from scratch, scored alike.

Run from the repository root (the full benchmark: 3 seeds x 2 libraries x demo-cpu's 3200 iterations):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_accuracy.py --threads 2
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_accuracy.py --iters 20 --seeds 0 --out /tmp/acc.md  # smoke
    options: --config PRESET_OR_YAML (default demo-cpu), --set KEY=VALUE (repeatable, both libraries),
             --iters N, --seeds 0,1,2, --libs frcnn,torchvision, --threads N, --data VOC_ROOT,
             --out FILE.md (a .json next to it), --work DIR (run folders; default a temporary folder, removed)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_accuracy.py --rescore --out FILE.md  # see below

Each (seed, library) run trains on BCCD ``trainval`` for ``TRAIN.MAX_ITERS`` iterations and is scored on BCCD
``test`` by frcnn's evaluator (:func:`frcnn.engine.evaluate.score_detections`, VOC07 11-point AP at IoU > 0.5,
what ``frcnn eval`` prints), and for localisation by AP75 (IoU > 0.75) and AP .50:.95 (the mean over IoU > 0.50, 0.55,
.., 0.95), both the all-point area AP (:func:`localisation`): at IoU 0.5 two detectors can tie while one draws
tighter boxes. Results: a markdown table (per seed and the mean: mAP, AP per class, seconds per
training iteration, training and test time) printed and written to ``--out``, the same numbers as JSON beside it,
rewritten after every run (a stopped benchmark keeps what it finished). ``--rescore --out FILE.md`` reads
FILE.json, detects again with each run's saved model (its run folder, kept with ``--work``), checks that VOC07 mAP
is the one recorded, and adds what the run lacks (AP75 and AP .50:.95 to results written before they existed).

frcnn: exactly ``frcnn train``: the training set read by :func:`frcnn.data.check.training_set` (checked, repaired),
:func:`frcnn.engine.train.train` with the config (``--config`` + ``--set`` + ``RNG_SEED=seed``) into
``WORK/frcnn/seed<N>``; then exactly ``frcnn eval --checkpoint``: :meth:`Predictor.from_checkpoint` (fast path),
the test split read by :func:`frcnn.data.open_repaired`, :func:`collect_detections`, :func:`score_detections`.

torchvision: ``torchvision.models.detection.FasterRCNN`` assembled from the same config (:func:`build_torchvision`):

* backbone   frcnn's own head (``build_backbone(cfg).head``; tiny: 32-64-128-128 channels, stride FEAT_STRIDE)
             with ``out_channels``; built right after ``torch.manual_seed(seed)`` as frcnn builds it, so head and
             tail start from the very weights frcnn's start from.
* anchors    frcnn's reference anchors (ANCHOR_SCALES x ANCHOR_RATIOS on a 16-px base, ratio = h / w as in
             torchvision) as exclusive corners ``(x1, y1, x2 + 1, y2 + 1)``, centre offset included, in a
             torchvision ``AnchorGenerator`` (:class:`FrcnnAnchors`): every anchor equals frcnn's. torchvision's
             sizes / aspect ratios cannot express them: its shapes are a grid ``size_j x ratio_i`` of equal area
             per size, frcnn's keep the rounded base box of each ratio (23x12, 16x16, 11x22 at 16 px: areas 276,
             256, 242), so the nominal conversion (sizes 16 x scales, the same ratios) gives shapes up to 8 %
             off (demo-cpu: 46x22 for 46x24, 182x90 for 184x96) centred on the cell corner instead of 8 px in
             (frcnn's centre (7.5, 7.5) inclusive); all three sets are printed and written.
* RPN head   torchvision's ``RPNHead`` (3x3 conv + ReLU, 1x1 objectness, 1x1 deltas; normal(0.01) init) when
             RPN_CHANNELS equals the head's channels (demo-cpu: 128 = 128) and RPN_DILATION is 1, else the same
             with RPN_CHANNELS and RPN_DILATION.
* RoI pool   ``MultiScaleRoIAlign(['0'], POOLING_SIZE, sampling_ratio=0)`` (scale 1 / FEAT_STRIDE inferred).
* box head   frcnn's own tail (``build_backbone(cfg).tail``; tiny: Flatten, Linear(C*7*7, 512), ReLU,
             Linear(512, 512), ReLU), then ``FastRCNNPredictor(512, K + 1)`` (torchvision's init).
* counts     rpn batch TRAIN.RPN_BATCHSIZE, fg fraction TRAIN.RPN_FG_FRACTION, IoUs RPN_POSITIVE/NEGATIVE_OVERLAP;
             pre/post NMS top-n TRAIN.* in training and TEST.* at test; RPN NMS TRAIN/TEST.RPN_NMS_THRESH (set
             at each switch); box batch TRAIN.BATCH_SIZE, fg fraction TRAIN.FG_FRACTION, fg IoU FG_THRESH, bg IoU
             BG_THRESH_HI; bbox_reg_weights 1 / BBOX_NORMALIZE_STDS; test NMS TEST.NMS, TEST.MAX_PER_IMAGE
             detections, score threshold TEST.SCORE_THRESH (0.0: torchvision keeps scores > 0).
* images     ``GeneralizedRCNNTransform`` min_size = the iteration's scale (frcnn's own choice among
             TRAIN.SCALES, by the same seed), max_size TRAIN.MAX_SIZE (TEST.* at test), mean / std = PIXEL_MEANS /
             PIXEL_STDS divided by 255 (torchvision's 0..1 input), padding to a multiple of FEAT_STRIDE (so its
             feature map is frcnn's and its anchor stride exactly FEAT_STRIDE).
* data       the same training set object, and the same sequence of (image, mirrored) pairs: frcnn's own
             ``TrainBatches(dataset, cfg).entries(iteration)`` (a fresh random order of the images and their
             mirrored copies every epoch, seeded by RNG_SEED), TRAIN.IMS_PER_BATCH images an iteration,
             non-difficult boxes, mirrored with :func:`frcnn.boxes.flip_boxes`; COLOR_JITTER / RANDOM_CROP, when
             on, by frcnn's own functions with frcnn's per-image seeds.
* optimiser  frcnn's :func:`build_optimizer` (SGD, momentum, weight decay; biases at 2x the rate and without decay
             under DOUBLE_BIAS, BIAS_DECAY false) and :func:`learning_rate` (warm-up, steps) on the torchvision
             model's parameters, every iteration: the same rule, no difference in bias handling.
* losses, sampling, proposal and detection post-processing: torchvision's own (differences listed in NOTES).

Boxes. frcnn's boxes are 0-based inclusive pixels (width = x2 - x1 + 1); torchvision's are continuous coordinates
(width = x2 - x1). Pixel x covers [x, x + 1), so frcnn's box (x1, y1, x2, y2) is the region [x1, x2 + 1) x
[y1, y2 + 1): torchvision gets ground truth ``(x1, y1, x2 + 1, y2 + 1)`` (:func:`to_torchvision`), and its
detections (in original-image coordinates) come back with 1 subtracted from x2 and y2 (:func:`from_torchvision`),
then clipped to the image as frcnn's predictor clips. Resizing such a region by s gives ``(x1 s, y1 s, (x2 + 1) s,
(y2 + 1) s)``, which is frcnn's own ``scale_boxes`` rule: both libraries scale the same regions.

``--iters N`` sets TRAIN.MAX_ITERS and scales TRAIN.STEPSIZE by N / MAX_ITERS (unless ``--set TRAIN.STEPSIZE``);
WARMUP_ITERS is kept. ``--set`` applies to both libraries; settings the torchvision side cannot follow are refused
in one line (TEST.AMP other than none, TRAIN.MAX_EPOCHS with --iters) or stated in the results (see
:func:`config_notes`). TRAIN.AMP applies to both: the torchvision model trains under frcnn's :class:`Precision`
(the same autocast and optimizer step; ``auto`` resolved for the device as ``frcnn train`` resolves it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign

from frcnn.boxes import clip_boxes, flip_boxes, to_exclusive
from frcnn.config import Config, config_to_dict, load_config, merge, parse_override, resolve_device
from frcnn.errors import ConfigError, FrcnnError
from frcnn.model.anchors import generate_anchors
from frcnn.model.backbones import build_backbone
from frcnn.model.detector import Detections
from frcnn.transforms import image_to_tensor

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "BCCD" / "BCCD"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "accuracy.md"
LIBS = ("frcnn", "torchvision")
BASE_SIZE = 16  # frcnn's AnchorGenerator base box (model/anchors.py)
TV_LOG_EVERY = 100
TRAIN_SPLIT, TEST_SPLIT = "trainval", "test"

NOTES = """What is the same: the training images, their order, mirroring and scale per iteration (frcnn's own
TrainBatches); the head and tail modules and their initial weights; every anchor; the RPN and RoI counts, IoU
thresholds and NMS settings; RoIAlign with sampling_ratio 0; the optimiser rule (frcnn's build_optimizer and
learning_rate: SGD, momentum, weight decay, bias at 2x LR without decay under DOUBLE_BIAS, warm-up, steps); the
number of iterations and images per iteration; the evaluator (frcnn's score_detections, VOC07 11-point).

What is torchvision's own (differs from frcnn, by design of this comparison):
- RPN objectness: one sigmoid logit per anchor (binary cross entropy), frcnn a 2-way softmax (2 logits).
- RPN targets: torchvision labels every anchor; frcnn those TRAIN.RPN_ALLOWED_BORDER lets take part (the
  reference's 0: only anchors lying inside the image; scratch-cpu's -1: every anchor, as torchvision).
- Proposals: torchvision clips, drops boxes under 1e-3 px and scores <= rpn_score_thresh (0), frcnn keeps
  clipped slivers; both NMS at the configured threshold and keep the configured top-n.
- RoI sampling: torchvision samples without replacement (fewer than TRAIN.BATCH_SIZE RoIs when there are not
  enough), frcnn fills the batch up with repeated background RoIs; both add the gt boxes to the proposals.
  torchvision's background is IoU in [0, BG_THRESH_HI), frcnn's [BG_THRESH_LO, BG_THRESH_HI).
- Losses: RPN box smooth L1 beta 1/9 in both (frcnn sigma 3); the classification layer's box loss is smooth L1
  beta 1/9 in torchvision, sigma 1 (beta 1) in frcnn. torchvision normalises over all sampled anchors / RoIs of
  the batch, frcnn per image then over images (the same with one image per batch).
- Predictor init: torchvision's FastRCNNPredictor keeps nn.Linear's default init, frcnn draws normal(0.01)
  class scores and normal(0.001) box deltas (the reference).
- RoIAlign extent: torchvision pools the exclusive box, frcnn hands roi_align its inclusive corners (1 px less
  in x and y; see benchmarks/bench_torchvision.py).
- Resizing: torchvision's interpolate floors the size (a 640x480 image at scale 2/3: 426x320, frcnn rounds:
  427x320) and scales boxes by the per-axis size ratio; it normalises before resizing (equal up to rounding) and
  pads to a multiple of FEAT_STRIDE (same feature map size as frcnn's unpadded input).
- Detections: torchvision keeps scores > TEST.SCORE_THRESH, drops boxes under 1e-2 px, batched per-class NMS,
  then the top TEST.MAX_PER_IMAGE; frcnn per-class NMS then the top TEST.MAX_PER_IMAGE.
- Inference: frcnn is scored as frcnn eval runs it (its fast path: BatchNorm folded, channels-last on AVX-512,
  the same detections up to float rounding); torchvision's model as trained.
- Timing: s/iter is the training loop's wall time / iterations, data loading included (frcnn: its DataLoader
  with NUM_WORKERS, its metrics.jsonl, TensorBoard events and snapshots every SNAPSHOT_ITERS; torchvision:
  loading in the loop, one log line per 100 iterations); train time is the whole training call (model built,
  output folder, final checkpoint)."""


# ------------------------------------------------------------------------------------------- boxes

def to_torchvision(boxes: Tensor) -> Tensor:
    """frcnn boxes (0-based inclusive pixels) -> torchvision's continuous ``(x1, y1, x2 + 1, y2 + 1)``."""
    return to_exclusive(boxes)


def from_torchvision(boxes: Tensor) -> Tensor:
    """torchvision's continuous boxes -> frcnn's inclusive pixels ``(x1, y1, x2 - 1, y2 - 1)``."""
    return torch.cat((boxes[..., :2], boxes[..., 2:] - 1), dim=-1)


# ------------------------------------------------------------------------------------------ config

def resolve_config(config: str, sets: list[str], iters: int | None) -> Config:
    """``--config`` + ``--set``, then ``--iters`` (MAX_ITERS, STEPSIZE scaled unless set); refuses settings the
    torchvision side cannot follow."""
    cfg = load_config(config, sets)
    keys = {text.split("=", 1)[0].strip() for text in sets}
    if iters is not None:
        if iters < 1:
            raise ConfigError(f"--iters {iters}: must be at least 1")
        if "TRAIN.MAX_ITERS" in keys:
            raise ConfigError("give the iterations once: --iters N or --set TRAIN.MAX_ITERS=N")
        train = cfg.TRAIN
        steps = train.STEPSIZE if "TRAIN.STEPSIZE" in keys else tuple(
            max(1, round(s * iters / train.MAX_ITERS)) for s in train.STEPSIZE)
        cfg = merge(cfg, {"TRAIN": {"MAX_ITERS": iters, "STEPSIZE": list(steps)}})
    refused = []
    if cfg.TEST.AMP != "none":
        refused.append("TEST.AMP other than none (both sides test in float32)")
    if cfg.TRAIN.MAX_EPOCHS > 0 and iters is not None:
        refused.append("TRAIN.MAX_EPOCHS with --iters (give the budget once)")
    if refused:
        raise ConfigError("bench_accuracy cannot compare with " + "; ".join(refused))
    return cfg


def config_notes(cfg: Config) -> list[str]:
    """Settings of this config that the torchvision side follows only in part (stated in the results)."""
    notes = []
    if cfg.POOLING_MODE != "align":
        notes.append(f"POOLING_MODE={cfg.POOLING_MODE}: frcnn pools with {cfg.POOLING_MODE}, torchvision with "
                     "RoIAlign (MultiScaleRoIAlign is its only box pooler)")
    if cfg.TRAIN.JOINT != "approximate":
        notes.append(f"TRAIN.JOINT={cfg.TRAIN.JOINT}: torchvision trains approximate joint (proposals detached)")
    if cfg.TRAIN.BG_THRESH_LO > 0:
        notes.append(f"TRAIN.BG_THRESH_LO={cfg.TRAIN.BG_THRESH_LO}: torchvision's background starts at IoU 0")
    if any(cfg.TRAIN.BBOX_NORMALIZE_MEANS):
        notes.append("TRAIN.BBOX_NORMALIZE_MEANS not 0: torchvision's box coder has no means (only weights)")
    if len(cfg.TEST.SCALES) > 1:
        notes.append(f"TEST.SCALES={list(cfg.TEST.SCALES)}: both test at the first")
    if cfg.NUM_WORKERS:
        notes.append(f"NUM_WORKERS={cfg.NUM_WORKERS}: frcnn loads images in worker processes, torchvision in the "
                     "training loop")
    return notes


# ---------------------------------------------------------------------------------------- torchvision

class FrcnnAnchors(TVAnchorGenerator):
    """torchvision's AnchorGenerator holding frcnn's reference anchors (exclusive corners, frcnn's centre offset)
    as its cell anchors; its nominal sizes / aspect ratios (16 x ANCHOR_SCALES, ANCHOR_RATIOS) keep the count
    and order (ratio-major, as frcnn's), ``stock_cell_anchors`` keeps what they alone would give."""

    def __init__(self, scales, ratios, stride: int, base_size: int = BASE_SIZE):
        super().__init__(sizes=(tuple(float(base_size * s) for s in scales),),
                         aspect_ratios=(tuple(float(r) for r in ratios),))
        self.stride = stride
        self.stock_cell_anchors = [a.clone() for a in self.cell_anchors]
        self.cell_anchors = [to_exclusive(generate_anchors(base_size, ratios, scales))]

    def forward(self, image_list, feature_maps):
        padded = image_list.tensors.shape[-2:]
        for f in feature_maps:
            got = (padded[0] // f.shape[-2], padded[1] // f.shape[-1])
            if got != (self.stride, self.stride):  # torchvision derives the stride from these sizes
                raise RuntimeError(f"input {tuple(padded)} and feature map {tuple(f.shape[-2:])} give anchor stride "
                                   f"{got}, not FEAT_STRIDE {self.stride}")
        return super().forward(image_list, feature_maps)


class ChannelsRPNHead(nn.Module):
    """torchvision's RPNHead (lists in and out, normal(0.01) init) with a ``channels``-wide 3x3 conv of
    ``dilation`` (frcnn's RPN_CHANNELS and RPN_DILATION)."""

    def __init__(self, in_channels: int, channels: int, num_anchors: int, dilation: int = 1):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=dilation, dilation=dilation),
                                  nn.ReLU(inplace=True))
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, 4 * num_anchors, 1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for feature in x:
            t = self.conv(feature)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def build_torchvision(cfg: Config, num_classes: int) -> TVFasterRCNN:
    """torchvision's FasterRCNN on frcnn's backbone and settings (module docstring). Call it right after
    ``torch.manual_seed(cfg.RNG_SEED)`` for frcnn's initial head and tail weights. ``num_classes`` = K."""
    backbone = build_backbone(cfg)  # first, as frcnn's FasterRCNN builds it: the same initial weights
    head = backbone.head
    head.out_channels = backbone.head_channels
    anchors = FrcnnAnchors(cfg.ANCHOR_SCALES, cfg.ANCHOR_RATIOS, cfg.FEAT_STRIDE)
    a = anchors.num_anchors_per_location()[0]
    if cfg.RPN_CHANNELS == backbone.head_channels and cfg.RPN_DILATION == 1:
        rpn_head: nn.Module = RPNHead(backbone.head_channels, a)
    else:
        rpn_head = ChannelsRPNHead(backbone.head_channels, cfg.RPN_CHANNELS, a, cfg.RPN_DILATION)
    train, test = cfg.TRAIN, cfg.TEST
    return TVFasterRCNN(
        head,
        num_classes=None,
        min_size=tuple(train.SCALES), max_size=train.MAX_SIZE,
        image_mean=[m / 255.0 for m in cfg.PIXEL_MEANS], image_std=[s / 255.0 for s in cfg.PIXEL_STDS],
        size_divisible=cfg.FEAT_STRIDE,
        rpn_anchor_generator=anchors, rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=train.RPN_PRE_NMS_TOP_N, rpn_pre_nms_top_n_test=test.RPN_PRE_NMS_TOP_N,
        rpn_post_nms_top_n_train=train.RPN_POST_NMS_TOP_N, rpn_post_nms_top_n_test=test.RPN_POST_NMS_TOP_N,
        rpn_nms_thresh=train.RPN_NMS_THRESH,
        rpn_fg_iou_thresh=train.RPN_POSITIVE_OVERLAP, rpn_bg_iou_thresh=train.RPN_NEGATIVE_OVERLAP,
        rpn_batch_size_per_image=train.RPN_BATCHSIZE, rpn_positive_fraction=train.RPN_FG_FRACTION,
        rpn_score_thresh=0.0,
        box_roi_pool=MultiScaleRoIAlign(["0"], cfg.POOLING_SIZE, sampling_ratio=0),
        box_head=backbone.tail,
        box_predictor=FastRCNNPredictor(backbone.tail_channels, num_classes + 1),
        box_score_thresh=test.SCORE_THRESH, box_nms_thresh=test.NMS, box_detections_per_img=test.MAX_PER_IMAGE,
        box_fg_iou_thresh=train.FG_THRESH, box_bg_iou_thresh=train.BG_THRESH_HI,
        box_batch_size_per_image=train.BATCH_SIZE, box_positive_fraction=train.FG_FRACTION,
        bbox_reg_weights=tuple(1.0 / s for s in train.BBOX_NORMALIZE_STDS),
    )


def set_stage(model: TVFasterRCNN, cfg: Config, training: bool, scale: int | None = None) -> None:
    """Mode, image size and RPN NMS threshold of TRAIN (``scale``: the iteration's) or TEST."""
    stage = cfg.TRAIN if training else cfg.TEST
    model.train(training)
    model.transform.min_size = (scale if scale is not None else stage.SCALES[0],)
    model.transform.max_size = stage.MAX_SIZE
    model.rpn.nms_thresh = stage.RPN_NMS_THRESH


def anchor_shapes(cfg: Config) -> dict[str, list[list[float]]]:
    """The base anchors (cell (0, 0)) as ``[w, h, cx, cy]`` in continuous pixels: frcnn's (inclusive corners,
    w = x2 - x1 + 1, centre in exclusive terms), the torchvision model's, and torchvision's stock generator's
    from the nominal sizes / aspect ratios."""
    fr = to_exclusive(generate_anchors(BASE_SIZE, cfg.ANCHOR_RATIOS, cfg.ANCHOR_SCALES))
    gen = FrcnnAnchors(cfg.ANCHOR_SCALES, cfg.ANCHOR_RATIOS, cfg.FEAT_STRIDE)

    def rows(a: Tensor) -> list[list[float]]:
        wh, c = a[:, 2:] - a[:, :2], (a[:, :2] + a[:, 2:]) / 2
        return torch.cat((wh, c), 1).tolist()

    return {"frcnn": rows(fr), "torchvision": rows(gen.cell_anchors[0]),
            "torchvision_stock": rows(gen.stock_cell_anchors[0])}


def format_anchor_shapes(cfg: Config, shapes: dict) -> list[str]:
    pairs = [(r, s) for r in cfg.ANCHOR_RATIOS for s in cfg.ANCHOR_SCALES]
    lines = [f"anchors (w x h @ centre, continuous px, cell (0, 0), stride {cfg.FEAT_STRIDE}):",
             f"  {'ratio h/w':>9} {'scale':>5}  {'frcnn':>22}  {'torchvision (used)':>22}  "
             f"{'torchvision stock sizes/ratios':>30}"]

    def cell(v: list[float]) -> str:
        return f"{v[0]:g}x{v[1]:g} @ ({v[2]:g}, {v[3]:g})"

    for (r, s), a, b, c in zip(pairs, shapes["frcnn"], shapes["torchvision"], shapes["torchvision_stock"]):
        lines.append(f"  {r:>9g} {s:>5g}  {cell(a):>22}  {cell(b):>22}  {cell(c):>30}")
    same = shapes["frcnn"] == shapes["torchvision"]
    lines.append(f"  frcnn and torchvision (used) anchors {'identical' if same else 'DIFFER'}; stock sizes "
                 f"{[BASE_SIZE * s for s in cfg.ANCHOR_SCALES]}, aspect ratios {list(cfg.ANCHOR_RATIOS)}")
    return lines


def tv_training_batch(dataset, cfg: Config, entries, iteration: int, device) -> tuple[list, list]:
    """The iteration's images (0..1 RGB) and targets (exclusive boxes) for torchvision: frcnn's images, mirrored
    and (when on) augmented as frcnn's TrainBatches does."""
    from frcnn.engine.batches import training_image

    images, targets = [], []
    for position, (index, flipped) in enumerate(entries):
        image, boxes, labels = training_image(dataset, dataset[index], cfg, iteration, position)
        if flipped:
            image = image.flip(-1)
            boxes = flip_boxes(boxes, image.shape[-1])
        images.append((image / 255.0).to(device))
        targets.append({"boxes": to_torchvision(boxes).float().to(device), "labels": labels.to(device)})
    return images, targets


def train_torchvision(cfg: Config, dataset, run_dir: Path, tag: str) -> tuple[TVFasterRCNN, dict]:
    """Train (module docstring) and return the model and ``{"loop_s", "train_s", "final_losses"}``."""
    from frcnn.engine.batches import TrainBatches, iteration_seed
    from frcnn.engine.precision import Precision
    from frcnn.engine.train import build_optimizer, learning_rate

    started = time.perf_counter()
    device = resolve_device(cfg)
    torch.manual_seed(cfg.RNG_SEED)  # initial weights (head and tail: frcnn's), then torchvision's samplers
    model = build_torchvision(cfg, len(dataset.classes)).to(device)
    optimizer = build_optimizer(model, cfg.TRAIN)
    precision = Precision(cfg.TRAIN.AMP, device, "TRAIN.AMP")  # frcnn's autocast and step (auto: as frcnn train)
    order = TrainBatches(dataset, cfg)  # frcnn's (image, mirrored) sequence; its images are not loaded
    train = cfg.TRAIN
    log = open(run_dir / "metrics.jsonl", "w")  # noqa: SIM115 - closed below
    window: dict[str, float] = {}
    count, loop_start = 0, time.perf_counter()
    t0 = loop_start
    last: dict = {}
    try:
        for it in range(train.MAX_ITERS):
            lr = learning_rate(train, it)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            g = torch.Generator().manual_seed(iteration_seed(cfg.RNG_SEED, it))  # frcnn's scale of the iteration
            scale = train.SCALES[int(torch.randint(len(train.SCALES), (1,), generator=g))]
            set_stage(model, cfg, True, scale)
            images, targets = tv_training_batch(dataset, cfg, order.entries(it), it, device)
            with precision.autocast():
                losses = model(images, targets)
            total = sum(losses.values())
            if not torch.isfinite(total):
                values = {k: round(float(v), 4) for k, v in losses.items()}
                raise FrcnnError(f"torchvision {tag}: non-finite loss at iteration {it + 1}: {values}")
            optimizer.zero_grad(set_to_none=True)
            precision.backward_step(total, optimizer)
            for k, v in losses.items():
                window[k] = window.get(k, 0.0) + float(v.detach())
            count += 1
            done = it + 1
            if done % TV_LOG_EVERY == 0 or done == train.MAX_ITERS:
                now = time.perf_counter()
                record = {"iteration": done, **{k: v / count for k, v in window.items()}}
                record.update(total=sum(v / count for v in window.values()), lr=lr, time=(now - t0) / count,
                              elapsed=now - loop_start)
                log.write(json.dumps(record) + "\n")
                log.flush()
                parts = " ".join(f"{k.removeprefix('loss_')} {v / count:.4f}" for k, v in window.items())
                print(f"torchvision {tag}: iter {done}/{train.MAX_ITERS}  loss {record['total']:.4f} ({parts})  "
                      f"lr {lr:.3g}  {record['time']:.3f} s/iter", flush=True)
                last, window, count, t0 = record, {}, 0, now
    finally:
        log.close()
    loop_s = time.perf_counter() - loop_start
    torch.save(model.state_dict(), run_dir / "model.pt")
    info = {"loop_s": loop_s, "train_s": time.perf_counter() - started,
            "final_losses": {k: v for k, v in last.items() if k not in ("iteration", "lr", "time", "elapsed")}}
    return model, info


@torch.no_grad()
def detect_torchvision(model: TVFasterRCNN, cfg: Config, dataset) -> list[Detections]:
    """Detections of every test image in frcnn's format: boxes in original-image inclusive pixels, clipped as
    frcnn's predictor clips, labels 1..K (the same class order: the model was built on the training classes)."""
    device = next(model.parameters()).device
    set_stage(model, cfg, False)
    out = []
    for i in range(len(dataset)):
        sample = dataset[i]
        image = image_to_tensor(dataset.load_image(sample)) / 255.0
        h, w = image.shape[-2:]
        pred = model([image.to(device)])[0]
        boxes = clip_boxes(from_torchvision(pred["boxes"].float()), h, w)
        out.append(Detections(boxes.cpu(), pred["scores"].float().cpu(), pred["labels"].cpu()))
    return out


# ------------------------------------------------------------------------------------------------ runs

LOCALISATION_IOUS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.50, 0.55, .., 0.95


def localisation(dataset, detections: list[Detections]) -> dict[str, float]:
    """``{"ap75", "ap50_95"}``: the mean over classes of the all-point (area) AP at IoU > 0.75, and its mean over
    IoU > 0.50, 0.55, .., 0.95 (COCO's thresholds, frcnn's strict ``>`` and +1 box convention); classes without
    ground truth left out."""
    from frcnn.engine.evaluate import pr_curves

    def mean_ap(iou: float) -> float:
        aps = [c["ap"] for c in pr_curves(dataset, detections, iou).values() if c["ap"] is not None]
        return sum(aps) / len(aps) if aps else float("nan")

    by_iou = {iou: mean_ap(iou) for iou in LOCALISATION_IOUS}
    return {"ap75": by_iou[0.75], "ap50_95": sum(by_iou.values()) / len(by_iou)}


def run_frcnn(cfg: Config, train_set, test_set, run_dir: Path, tag: str) -> dict:
    from frcnn.engine.evaluate import collect_detections, score_detections
    from frcnn.engine.inference import Predictor
    from frcnn.engine.train import LOSS_KEYS, train

    records: list[dict] = []
    t0 = time.perf_counter()
    train(cfg, train_set, run_dir, progress=True, on_log=records.append)
    train_s = time.perf_counter() - t0
    last = [r for r in records if "total" in r][-1]
    predictor = Predictor.from_checkpoint(run_dir, resolve_device(cfg), fast=True)  # as frcnn eval
    t1 = time.perf_counter()
    detections = collect_detections(predictor, test_set, progress=False)
    test_s = time.perf_counter() - t1
    result = score_detections(test_set, detections, "voc07")
    return {"loop_s": last["elapsed"], "train_s": train_s, "test_s": test_s, "result": result,
            "localisation": localisation(test_set, detections),
            "final_losses": {k: last[k] for k in (*LOSS_KEYS, "total")}}


def run_torchvision(cfg: Config, train_set, test_set, run_dir: Path, tag: str) -> dict:
    from frcnn.engine.evaluate import score_detections

    run_dir.mkdir(parents=True, exist_ok=True)
    if any(run_dir.iterdir()):
        raise FrcnnError(f"{run_dir} is not empty; choose a new --work folder")
    model, info = train_torchvision(cfg, train_set, run_dir, tag)
    t1 = time.perf_counter()
    detections = detect_torchvision(model, cfg, test_set)
    info["test_s"] = time.perf_counter() - t1
    info["result"] = score_detections(test_set, detections, "voc07")
    info["localisation"] = localisation(test_set, detections)
    (run_dir / "metrics.json").write_text(json.dumps(info["result"], indent=2) + "\n")
    return info


# ---------------------------------------------------------------------------------------------- report

def machine() -> dict:
    from frcnn.engine.benchmark import machine_info

    return {"cpu": machine_info()["cpu"], "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "logical_cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def _f(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _duration(s: float) -> str:
    return f"{s:.0f} s ({s / 60:.1f} min)"


def results_table(runs: list[dict], classes: list[str], libs: list[str]) -> str:
    head = ["library", "seed", "mAP (VOC07)", "AP75", "AP .50:.95", *(f"AP {c}" for c in classes), "s/iter",
            "train time", "test s/img"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['lib']} | {r['seed']} | failed: {r['error']} |" + " |" * (len(head) - 3))
            continue
        lines.append(f"| {r['lib']} | {r['seed']} | {_f(r['map'])} | {_f(r.get('ap75'))} | {_f(r.get('ap50_95'))} | "
                     + " | ".join(_f(r["per_class"][c]) for c in classes)
                     + f" | {r['s_per_iter']:.3f} | {_duration(r['train_s'])} | {r['test_s_per_img']:.3f} |")
    for lib in libs:
        ok = [r for r in runs if r["lib"] == lib and "error" not in r]
        if not ok:
            continue

        def stat(values: list[float | None], digits: int = 4) -> str:
            vals = [v for v in values if v is not None and not math.isnan(v)]
            if not vals:
                return "n/a"
            sd = f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else ""
            return f"{statistics.mean(vals):.{digits}f}{sd}"

        seeds = ",".join(str(r["seed"]) for r in ok)
        lines.append(f"| **{lib} mean** | {seeds} | **{stat([r['map'] for r in ok])}** | "
                     + f"{stat([r.get('ap75') for r in ok])} | {stat([r.get('ap50_95') for r in ok])} | "
                     + " | ".join(stat([r["per_class"][c] for r in ok]) for c in classes)
                     + f" | {stat([r['s_per_iter'] for r in ok], 3)} | "
                     + f"{_duration(statistics.mean(r['train_s'] for r in ok))} | "
                     + f"{stat([r['test_s_per_img'] for r in ok], 3)} |")
    return "\n".join(lines)


def write_results(out: Path, payload: dict, table: str, anchor_lines: list[str]) -> None:
    info, s = payload["machine"], payload["settings"]
    done, planned = len(payload["runs"]), s["planned_runs"]
    md = [
        f"# Accuracy at the same budget: frcnn vs torchvision's FasterRCNN on {Path(s['data']).name}",
        "",
        f"Command: `{payload['command']}`  ",
        "Script: `benchmarks/bench_accuracy.py` (its docstring lists how the torchvision model is assembled).",
        "",
        f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, `get_cpu_capability()` "
        f"{info['cpu_capability']}; torch {info['torch']}, torchvision {info['torchvision']}, Python {info['python']}; "
        f"torch threads {info['threads']}; started {info['date']}; load average at start {info['loadavg_start']}"
        + (f", at end {info['loadavg_end']}" if "loadavg_end" in info else "") + ".",
        "",
        f"Data: `{s['data']}`, trained on `{TRAIN_SPLIT}` ({s['train_images']} images, mirrored copies "
        f"{'on' if s['use_flipped'] else 'off'}), scored on `{TEST_SPLIT}` ({s['test_images']} images) with frcnn's "
        "evaluator (VOC07 11-point AP, IoU > 0.5). Classes: " + ", ".join(s["classes"]) + ".",
        "",
        f"Config: `{s['config']}`" + "".join(f" `--set {x}`" for x in s["sets"])
        + f"; {s['max_iters']} iterations of {s['ims_per_batch']} image(s), LR {s['lr']} (warm-up {s['warmup']} "
        f"iterations, x{s['gamma']} at {s['stepsize']}), both libraries from scratch, seeds {s['seeds']}.",
        "",
        f"Runs: {done} of {planned}" + ("" if done == planned else " (partial: the benchmark has not finished)") + ".",
        "",
        table,
        "",
        "mAP and AP: frcnn's `score_detections` (what `frcnn eval` prints). AP75 and AP .50:.95: the mean over "
        "classes of the all-point AP at IoU > 0.75 and its mean over IoU > 0.50, 0.55, .., 0.95 (`localisation`). "
        "s/iter: training loop wall time / "
        "iterations; train time: the whole training call; test s/img: detection over the test split / images. "
        "Mean rows: mean ± sample standard deviation over the seeds.",
        "",
        "Final training losses (mean of the last logged window):",
        "",
    ]
    for r in payload["runs"]:
        if "final_losses" in r:
            md.append(f"- {r['lib']} seed {r['seed']}: "
                      + ", ".join(f"{k} {v:.4f}" for k, v in r["final_losses"].items()))
    md += ["", "```", *anchor_lines, "```", ""]
    if payload["config_notes"]:
        md += ["Settings of this config the torchvision side follows in part:", ""]
        md += [f"- {n}" for n in payload["config_notes"]] + [""]
    md += [NOTES, ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(md))
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- rescore

def redetect(lib: str, cfg: Config, run_dir: Path, test_set) -> list[Detections]:
    """Detections over ``test_set`` by the model a run saved in ``run_dir`` (frcnn: its checkpoint folder, as
    ``frcnn eval``; torchvision: ``model.pt``, rebuilt by :func:`build_torchvision`)."""
    if lib == "frcnn":
        from frcnn.engine.evaluate import collect_detections
        from frcnn.engine.inference import Predictor

        return collect_detections(Predictor.from_checkpoint(run_dir, resolve_device(cfg), fast=True), test_set,
                                  progress=False)
    weights = run_dir / "model.pt"
    if not weights.is_file():
        raise FrcnnError(f"{weights} not found (the run folder was not kept: give --work)")
    model = build_torchvision(cfg, len(test_set.classes)).to(resolve_device(cfg))
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return detect_torchvision(model, cfg, test_set)


def rescore(out: Path) -> int:
    """``--rescore``: detect again with every finished run's model, check VOC07 mAP against the record (to 1e-4:
    another thread count may round differently), add AP75 and AP .50:.95, rewrite ``out`` and its JSON."""
    from frcnn.config import config_from_dict
    from frcnn.data import open_repaired
    from frcnn.engine.evaluate import score_detections

    json_path = out.with_suffix(".json")
    if not json_path.is_file():
        raise FrcnnError(f"{json_path} not found (--rescore reads the results an earlier run wrote with --out)")
    try:
        payload = json.loads(json_path.read_text())
        s, base, runs = payload["settings"], config_from_dict(payload["config"]), payload["runs"]
        data, classes, libs = Path(s["data"]), s["classes"], s["libs"]
    except (ValueError, KeyError, TypeError) as e:
        raise FrcnnError(f"{json_path}: not the JSON this benchmark writes with --out ({type(e).__name__}: {e})") \
            from None
    test_set = open_repaired(data, TEST_SPLIT, classes=classes, drop_other_classes=False)
    for row in runs:
        if "error" in row:
            continue
        if not row.get("run_dir"):
            raise FrcnnError(f"{row['lib']} seed {row['seed']}: no run folder recorded (the benchmark ran without "
                             "--work)")
        cfg = merge(base, parse_override(f"RNG_SEED={row['seed']}"))
        detections = redetect(row["lib"], cfg, Path(row["run_dir"]), test_set)
        got = score_detections(test_set, detections, "voc07")["map"]
        if abs(got - row["map"]) > 1e-4:
            raise FrcnnError(f"{row['lib']} seed {row['seed']}: VOC07 mAP {got:.4f} now, {row['map']:.4f} recorded "
                             f"(is {row['run_dir']} still that run's?)")
        row.update(localisation(test_set, detections))
        print(f"{row['lib']} seed {row['seed']}: mAP {got:.4f} (recorded {row['map']:.4f}), AP75 {row['ap75']:.4f}, "
              f"AP .50:.95 {row['ap50_95']:.4f}", flush=True)
    table = results_table(runs, classes, libs)
    write_results(out, payload, table, format_anchor_shapes(base, payload["anchors"]))
    print(f"\n{table}\n\nwrote {out} and {json_path}")
    return 0


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="demo-cpu", help="frcnn preset or YAML file (default demo-cpu)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both libraries (repeatable)")
    p.add_argument("--iters", type=int, default=None, help="TRAIN.MAX_ITERS (STEPSIZE scaled to match)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated RNG_SEEDs (default 0,1,2)")
    p.add_argument("--libs", default=",".join(LIBS), help="comma-separated: frcnn,torchvision")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, OMP_NUM_THREADS)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="BCCD VOC root")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown results (JSON next to it)")
    p.add_argument("--work", type=Path, default=None, help="run folders (default: a temporary folder, removed)")
    p.add_argument("--rescore", action="store_true",
                   help="detect again with the runs recorded in --out's JSON and add what they lack (AP75, AP .50:.95)")
    a = p.parse_args(argv)
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: comma-separated integers")
    a.libs = [lib.strip() for lib in a.libs.split(",") if lib.strip()]
    if not a.seeds or not a.libs or any(lib not in LIBS for lib in a.libs):
        p.error(f"--seeds needs at least one seed, --libs a comma-separated subset of {','.join(LIBS)}")
    if a.threads is not None and a.threads < 1:
        p.error("--threads must be at least 1")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.rescore:
        try:
            return rescore(args.out)
        except FrcnnError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    splits = args.data / "ImageSets" / "Main"
    if not all((splits / f"{s}.txt").is_file() for s in (TRAIN_SPLIT, TEST_SPLIT)):
        print(f"data not found: {args.data} has no ImageSets/Main/{TRAIN_SPLIT}.txt and {TEST_SPLIT}.txt "
              "(give the VOC root with --data)", file=sys.stderr)
        return 2
    try:
        return _main(args, argv)
    except FrcnnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _main(args: argparse.Namespace, argv) -> int:
    from frcnn.data import open_repaired
    from frcnn.data.check import training_set

    base = resolve_config(args.config, args.sets, args.iters)
    info = machine()
    command = "OMP_NUM_THREADS={} .venv/bin/python benchmarks/bench_accuracy.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "<unset>"), shlex.join(sys.argv[1:] if argv is None else argv)).strip()
    print(f"machine: {info['cpu']}, {info['cpu_capability']}, {info['threads']} threads, torch {info['torch']}, "
          f"torchvision {info['torchvision']}, load {info['loadavg_start']}")
    train_set, repaired = training_set(args.data, TRAIN_SPLIT, None, None)
    if repaired:
        print(f"{TRAIN_SPLIT}: {repaired}")
    test_set = open_repaired(args.data, TEST_SPLIT, classes=train_set.classes, drop_other_classes=False)
    if test_set.summary:
        print(f"{TEST_SPLIT}: {test_set.summary}")
    # epochs and ANCHOR_SCALES=auto resolved on the training set as frcnn train does: both libraries get the numbers
    from frcnn.engine.train import resolve_run_config

    base, lines, _ = resolve_run_config(base, train_set)
    for line in lines:
        print(line)
    classes = list(train_set.classes)
    print(f"data: {len(train_set)} {TRAIN_SPLIT} and {len(test_set)} {TEST_SPLIT} images, classes {', '.join(classes)}")
    t = base.TRAIN
    print(f"config {' '.join([args.config, *args.sets])}: {t.MAX_ITERS} iterations of {t.IMS_PER_BATCH} image(s), "
          f"LR {t.LEARNING_RATE} warm-up {t.WARMUP_ITERS} steps {list(t.STEPSIZE)}; seeds {args.seeds}; "
          f"libraries {', '.join(args.libs)}")
    anchor_lines = format_anchor_shapes(base, anchor_shapes(base))
    print("\n".join(anchor_lines))
    notes = config_notes(base)
    for n in notes:
        print(f"note: {n}")

    temp = args.work is None
    work = Path(tempfile.mkdtemp(prefix="bench_accuracy_")) if temp else args.work
    print(f"run folders under {work}{' (temporary, removed at the end)' if temp else ''}")
    payload = {
        "command": command, "machine": info,
        "settings": {"data": str(args.data), "config": args.config, "sets": args.sets, "iters": args.iters,
                     "seeds": args.seeds, "libs": args.libs, "classes": classes, "train_images": len(train_set),
                     "test_images": len(test_set), "use_flipped": t.USE_FLIPPED, "max_iters": t.MAX_ITERS,
                     "ims_per_batch": t.IMS_PER_BATCH, "lr": t.LEARNING_RATE, "warmup": t.WARMUP_ITERS,
                     "gamma": t.GAMMA, "stepsize": list(t.STEPSIZE),
                     "planned_runs": len(args.seeds) * len(args.libs), "work": None if temp else str(work)},
        "config": config_to_dict(base), "anchors": anchor_shapes(base), "config_notes": notes, "runs": [],
    }
    runners = {"frcnn": run_frcnn, "torchvision": run_torchvision}
    try:
        for seed in args.seeds:
            cfg = merge(base, parse_override(f"RNG_SEED={seed}"))
            for lib in args.libs:
                tag = f"seed {seed}"
                run_dir = work / lib / f"seed{seed}"
                print(f"\n=== {lib}, {tag}: {t.MAX_ITERS} iterations -> {run_dir}", flush=True)
                row: dict = {"lib": lib, "seed": seed, "run_dir": None if temp else str(run_dir)}
                try:
                    got = runners[lib](cfg, train_set, test_set, run_dir, tag)
                except FrcnnError as e:  # a non-finite loss, a folder in the way: say it, go on
                    print(f"{lib} {tag} failed: {e}", flush=True)
                    row["error"] = str(e)
                else:
                    res = got["result"]
                    row.update(map=res["map"], per_class=res["per_class"], metrics=res["metrics"],
                               s_per_iter=got["loop_s"] / t.MAX_ITERS, loop_s=got["loop_s"], train_s=got["train_s"],
                               test_s=got["test_s"], test_s_per_img=got["test_s"] / len(test_set),
                               final_losses=got["final_losses"], **got["localisation"])
                    print(f"{lib} {tag}: mAP {res['map']:.4f}, AP75 {row['ap75']:.4f}, AP .50:.95 "
                          f"{row['ap50_95']:.4f} ("
                          + ", ".join(f"{c} {_f(res['per_class'][c])}" for c in classes)
                          + f"), {row['s_per_iter']:.3f} s/iter, train {_duration(row['train_s'])}, "
                          f"test {row['test_s_per_img']:.3f} s/img", flush=True)
                payload["runs"].append(row)
                payload["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
                write_results(args.out, payload, results_table(payload["runs"], classes, args.libs), anchor_lines)
    finally:
        if temp:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(results_table(payload["runs"], classes, args.libs))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.json')}")
    return 1 if any("error" in r for r in payload["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
