"""frcnn vs torchvision's own Faster R-CNN, the same R50-C4 network (or R50-FPN: ``--row fpn``), side by side on CPU.

Run from the repository root:

    PYTHONPATH=src .venv/bin/python benchmarks/bench_torchvision.py            # full run (~6 min on 2 idle cores)
    PYTHONPATH=src .venv/bin/python benchmarks/bench_torchvision.py --row fpn  # R50-FPN row (~6 min, 2 busy cores)
    PYTHONPATH=src .venv/bin/python benchmarks/bench_torchvision.py --quick    # smoke test
    options: --runs N (timed runs per model and mode), --warmup N, --threads N, --calib-images N,
             --images-dir DIR, --out-dir DIR (results written as torchvision_r50c4.{md,json}), --no-write

R50-FPN row (``--row fpn``, written to torchvision_r50fpn.{md,json})
-------------------------------------------------------------------
torchvision's stock ``fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=21)`` (its defaults:
800/1333, RPN 2000/2000 train and 1000/1000 test, 512 RoIs, score 0.05, NMS 0.5) with frcnn's pixel mean/std in
0..255 units, BatchNorm calibrated then frozen; its state dict is given to frcnn's ``voc-r50-fpn`` preset as
``PRETRAINED`` (the loader under test). Same image, same padded tensor; proposals, crops, class probabilities and
detections compared stage by stage, each convention removed in turn (``verify_fpn``; ``FPN_NOTES`` explains every
difference); inference (frcnn, torchvision, frcnn fast path) and training-step times side by side in interleaved
rounds. Options as below; ``--train-runs`` (default 2 for this row).

What is compared in the C4 row (every choice, and why)
------------------------------------------------------
frcnn:        ``load_config("voc-r50-c4", POOLING_MODE=align, PRETRAINED=<tmp .pth>, DEVICE=cpu)``, 20 classes.
              RPN_CHANNELS stays at the preset's 512.
torchvision:  ``torchvision.models.detection.FasterRCNN`` assembled from torchvision parts:
  * backbone   ResNet-50 conv1..layer3 (``nn.Sequential`` named conv1, bn1, relu, maxpool, layer1..3),
               ``out_channels = 1024``, stride 16, one feature map '0'. FrozenBatchNorm2d everywhere.
  * anchors    torchvision's stock ``AnchorGenerator(sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),))``
               (= frcnn's scales 8, 16, 32 x 16 px). Not bit-identical to frcnn's anchors: torchvision's are
               centred on the cell corner (0, 0) with sizes 128*sqrt(r)-style rounding, frcnn's (the
               reference generate_anchors) are centred at (8, 8) in exclusive terms with the reference's
               rounding (e.g. 184x96 vs 181x91 for ratio 0.5). Timing does not depend on this. The
               verification step swaps frcnn's anchors into torchvision (as exclusive corners): the
               proposals of the two models are then identical; RoIAlign differs by the +1 convention
               (frcnn pools its inclusive x2/y2, i.e. 1 px less), and with frcnn's inclusive boxes fed to
               torchvision's pooler the class probabilities and final detections are identical too.
  * RPN head   a tiny custom head (``RPNHead512`` below): 3x3 conv 1024 -> 512 + ReLU, 1x1 conv -> A objectness
               logits, 1x1 conv -> 4A deltas. torchvision's ``RPNHead(1024, 9)`` would use a 1024-channel conv
               (2x the RPN conv FLOPs), frcnn's preset uses 512, so the torchvision side gets the custom head.
               frcnn's 2-way softmax (bg, fg) maps exactly onto torchvision's sigmoid of one logit:
               w_tv = w_fg - w_bg, b_tv = b_fg - b_bg.
  * RPN        pre NMS 6000 / post NMS 300 at test, 12000 / 2000 at train; NMS 0.7; fg IoU 0.7, bg 0.3;
               256 anchors per image, fg fraction 0.5; score_thresh 0.0 (torchvision default).
  * RoI pool   ``MultiScaleRoIAlign(['0'], 7, sampling_ratio=0)``. With one level it calls
               ``roi_align(x, rois, 7, spatial_scale=s, sampling_ratio=0)`` (aligned=False, the default);
               s = 2 ** round(log2(38 / 600)) = 1/16. frcnn's ``align`` mode calls the same op with
               spatial_scale 1/16, sampling_ratio 0, aligned=False: identical.
  * box head   ResNet-50 layer4 with stride 1 in its first block (conv2 and downsample), then
               AdaptiveAvgPool2d(1) + flatten -> 2048 (frcnn: x.mean((2, 3)); same value).
  * predictor  ``FastRCNNPredictor(2048, 21)``; bbox_reg_weights (10, 10, 5, 5) = 1 / frcnn's
               BBOX_NORMALIZE_STDS (0.1, 0.1, 0.2, 0.2).
  * RoI sampling  box_batch_size_per_image 256 (the voc-r50-c4 preset's TRAIN.BATCH_SIZE), positive
               fraction 0.25, fg IoU 0.5, bg IoU 0.5 (preset BG_THRESH_LO 0.0: all of [0, 0.5) is bg).
  * test       box_score_thresh 0.0, box_nms_thresh 0.3, box_detections_per_img 100.
  * transform  ``GeneralizedRCNNTransform`` via FasterRCNN(min_size=600, max_size=1000,
               image_mean=frcnn PIXEL_MEANS (RGB, 0..255), image_std=(1, 1, 1)); the input image is fed as
               0..255 RGB, already 600x1000, so the resize is an identity (scale 1.0; torchvision still
               runs its bilinear interpolate at scale 1, a few ms, counted in its time).
  * padding    torchvision pads to ``size_divisible``. Its AnchorGenerator derives the stride as
               padded_size // feature_size, so with size_divisible=1 a 600x1000 input (feature 38x63)
               would get stride 15 (600 // 38) -- wrong anchors. 32 (the default) pads to 608x1024
               (feature 38x64, 3.8% more backbone work than frcnn's unpadded 38x63). We use
               size_divisible=16: 608x1008, feature 38x63 (same as frcnn's), stride exactly 16.
               frcnn is fed the SAME 608x1008 tensor (its own ``prep_image`` + ``batch_images(size_divisor=16)``,
               image_sizes (600, 1000)); we assert it equals torchvision's transformed tensor, so both
               models do identical convolution work. (frcnn's own loaders do not pad: on an unpadded
               600x1000 image its backbone sees 2% fewer pixels; not used here.)
Weights: a torchvision resnet50 (random init, nn.BatchNorm2d) has its BatchNorm statistics calibrated on
real images (``--calib-images`` BCCD JPEGs resized to 600x1000, normalised as the detectors' input; layer4
run at stride 1 like the tail), then saved to a temporary .pth and given to frcnn as ``PRETRAINED``: frcnn then
uses FrozenBatchNorm2d and freezes conv1 + layer1 (RESNET.FIXED_BLOCKS=1). torchvision gets the same
by copying frcnn's whole state dict through ``frcnn_to_torchvision_state`` (strict load) and freezing
conv1 + layer1 (what ``trainable_layers=3`` does in torchvision's backbone builders). RPN and predictor
weights are frcnn's random init (normal std 0.01 / 0.001), copied, except that frcnn's RPN bbox-pred weights
are first multiplied by ``--rpn-delta-scale`` (0.1): with the raw init the deltas have std ~0.6 on calibrated
features, which throws boxes off the image (frcnn keeps those as 1-px slivers on the border, torchvision
drops them with remove_small_boxes after clipping); with 0.1 the std is ~0.06: proposals are anchor-like
but diverse, the fg scores spread over 0.01..0.99, and NMS 0.7 keeps ~1700 (test, of 6000) / ~2600
(train, of 12000) proposals -- more than 300 / 2000 -- so exactly the configured number of RoIs reaches
the tail (counted with forward hooks on frcnn's ``classifier.tail`` and torchvision's
``roi_heads.box_head`` and printed beside every time).
Training step: model.train(), one image (BloodImage_00000 resized to 600x1000) with its first ``--num-gt``
annotated boxes (same boxes in both: frcnn's inclusive +1 convention, x2 + 1 / y2 + 1 for torchvision),
forward + sum of the 4 losses + backward + ``torch.optim.SGD(lr=1e-3, momentum=0.9, weight_decay=1e-4)``
step over the trainable parameters (plain SGD on both; frcnn's engine adds bias-lr groups, not relevant).
Timing: torch.set_num_threads(--threads, default 2 = this machine's cores); inference first (eval, no_grad),
then training; per mode ``--warmup`` untimed rounds then ``--runs`` rounds, each round runs both models back
to back, frcnn first in even rounds and torchvision first in odd ones (A B, B A, A B ...: interleaved, and no
model always runs right after the other's allocations), wall clock with time.perf_counter. Reported: the
median time of each model, their ratio, and the median of the per-round ratios frcnn/torchvision (the most
robust figure when another user's job loads the machine: it slows both sides of a round alike).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor, nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from frcnn.config import load_config
from frcnn.model.detector import FasterRCNN
from frcnn.model.rpn import proposal_layer
from frcnn.model.trace import Trace
from frcnn.transforms import batch_images, image_to_tensor, prep_image

NUM_CLASSES = 20  # VOC; +1 background
IMAGE_HW = (600, 1000)
SIZE_DIVISIBLE = 16
DEFAULT_IMAGES = "/work/shared/datasets/BCCD/BCCD/JPEGImages"
BCCD_CLASSES = {"RBC": 1, "WBC": 2, "Platelets": 3}


NOTES = """Differences between the two models found while matching them (none changes the timing):

- Anchors: torchvision's stock AnchorGenerator centres its anchors on the cell corner and rounds sizes
  differently from frcnn's reference anchors (8 px centre offset, up to 22 px size difference). The timed
  torchvision model uses its stock anchors; with frcnn's anchors swapped in, the proposals are identical.
- RoIAlign box extent: frcnn passes its inclusive (+1 convention) boxes to `roi_align` (aligned=False), so
  each crop covers x1..x2 instead of x1..x2+1 (1 px = 1/16 cell less in x and y than torchvision, which
  pools the exclusive box). Fed the inclusive boxes, torchvision's pooler gives identical crops, class
  probabilities and final detections.
- Off-image proposals: a proposal decoded entirely outside the image is clipped by frcnn to a 1-px sliver
  on the border and kept (it can take an NMS slot and a RoI); torchvision clips to zero size and drops it
  (remove_small_boxes 1e-3). With the raw random RPN init (deltas std ~0.6) 153 of 2599 kept test proposals
  were such slivers; with trained weights it is rare.
- RPN objectness: frcnn 2-way softmax (2A channels), torchvision one sigmoid logit (A channels); equal
  forward values (w_fg - w_bg), different loss parameterisation.
- Training targets: frcnn labels only anchors lying inside the image (reference), torchvision matches all
  anchors; frcnn fills the RoI batch up to TRAIN.BATCH_SIZE with repeated background RoIs, torchvision
  samples without replacement (here both always reached 256).
- Padding: frcnn's own loaders do not pad (size_divisor 1); torchvision needs a size_divisible that keeps
  padded_size // feature_size == 16 (1 gives stride 15 at 600x1000). Both were fed the same 608x1008 tensor.

Where frcnn is faster now (2026-12-01): "frcnn" is the model as trained, with frcnn's own exact NMS
(frcnn.ops.nms: blocked greedy, stopping at RPN_POST_NMS_TOP_N) and RoIAlign on the CPU (frcnn.ops.roi_ops:
separable bilinear gathers, forward and backward); "frcnn fast" adds the inference path of frcnn.engine.fast
(BatchNorm folded into the convolutions, channels-last on AVX-512 CPUs, align pooling's first tail convolutions
on the map before pooling), the default of frcnn eval/detect. Since 2026-12-02 the fast path and frcnn train also
keep freed memory for reuse (frcnn.engine.fast.reuse_freed_memory, benchmarks/results/memory_reuse.md): the
setting is process-wide, so every row here, torchvision's too, runs with it (without it, as torchvision runs
for its users, its inference took 5.30 s in the run of 2026-12-02 00:34). The verification above runs the model
as trained. Earlier (2026-11-24, before those): time outside the
network modules (proposal layer, RoIAlign, sampling, losses, post-processing; measured
separately with forward hooks, median of 3): inference frcnn 240 ms vs torchvision 242 ms, training forward
354 ms vs 360 ms. The convolutions (same modules, same weights) dominate both. torch.profiler over one
training step each (mean of two): self CPU total frcnn 13.35 s vs torchvision 13.68 s, the differences all in
the shared kernels (convolution_backward -130 ms, mkldnn_convolution -86 ms, roi_align_backward -57 ms):
run-to-run noise, no frcnn function costs extra."""


# ------------------------------------------------------------------------------------------- models

class RPNHead512(nn.Module):
    """torchvision's RPNHead interface (lists in, lists out) with a ``channels``-wide 3x3 conv."""

    def __init__(self, in_channels: int, channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, 4 * num_anchors, 1)

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, bbox = [], []
        for feature in x:
            t = F.relu(self.conv(feature))
            logits.append(self.cls_logits(t))
            bbox.append(self.bbox_pred(t))
        return logits, bbox


def c4_resnet(norm_layer) -> nn.Module:
    net = resnet50(weights=None, norm_layer=norm_layer)
    net.layer4[0].conv2.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    return net


def build_torchvision(cfg) -> TVFasterRCNN:
    net = c4_resnet(FrozenBatchNorm2d)
    backbone = nn.Sequential(OrderedDict(
        conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool,
        layer1=net.layer1, layer2=net.layer2, layer3=net.layer3,
    ))
    backbone.out_channels = 1024
    for m in (backbone.conv1, backbone.layer1):  # FIXED_BLOCKS=1 (trainable_layers=3)
        for p in m.parameters():
            p.requires_grad_(False)
    box_head = nn.Sequential(OrderedDict(layer4=net.layer4, pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
    sizes = tuple(int(s * cfg.FEAT_STRIDE) for s in cfg.ANCHOR_SCALES)
    anchor_gen = TVAnchorGenerator(sizes=(sizes,), aspect_ratios=(tuple(float(r) for r in cfg.ANCHOR_RATIOS),))
    stds = cfg.TRAIN.BBOX_NORMALIZE_STDS
    model = TVFasterRCNN(
        backbone,
        num_classes=None,
        min_size=cfg.TEST.SCALES[0], max_size=cfg.TEST.MAX_SIZE,
        image_mean=list(cfg.PIXEL_MEANS), image_std=list(cfg.PIXEL_STDS),
        size_divisible=SIZE_DIVISIBLE,
        rpn_anchor_generator=anchor_gen,
        rpn_head=RPNHead512(1024, cfg.RPN_CHANNELS, anchor_gen.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=cfg.TRAIN.RPN_PRE_NMS_TOP_N, rpn_pre_nms_top_n_test=cfg.TEST.RPN_PRE_NMS_TOP_N,
        rpn_post_nms_top_n_train=cfg.TRAIN.RPN_POST_NMS_TOP_N, rpn_post_nms_top_n_test=cfg.TEST.RPN_POST_NMS_TOP_N,
        rpn_nms_thresh=cfg.TEST.RPN_NMS_THRESH,
        rpn_fg_iou_thresh=cfg.TRAIN.RPN_POSITIVE_OVERLAP, rpn_bg_iou_thresh=cfg.TRAIN.RPN_NEGATIVE_OVERLAP,
        rpn_batch_size_per_image=cfg.TRAIN.RPN_BATCHSIZE, rpn_positive_fraction=cfg.TRAIN.RPN_FG_FRACTION,
        box_roi_pool=MultiScaleRoIAlign(["0"], cfg.POOLING_SIZE, sampling_ratio=0),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(2048, NUM_CLASSES + 1),
        box_score_thresh=cfg.TEST.SCORE_THRESH, box_nms_thresh=cfg.TEST.NMS,
        box_detections_per_img=cfg.TEST.MAX_PER_IMAGE,
        box_fg_iou_thresh=cfg.TRAIN.FG_THRESH, box_bg_iou_thresh=cfg.TRAIN.BG_THRESH_HI,
        box_batch_size_per_image=cfg.TRAIN.BATCH_SIZE, box_positive_fraction=cfg.TRAIN.FG_FRACTION,
        bbox_reg_weights=tuple(1.0 / s for s in stds),
    )
    assert cfg.TRAIN.RPN_NMS_THRESH == cfg.TEST.RPN_NMS_THRESH
    return model


FRCNN_HEAD_NAMES = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3"}


def frcnn_to_torchvision_state(state: dict[str, Tensor], num_anchors: int) -> dict[str, Tensor]:
    """frcnn FasterRCNN state dict -> the torchvision model above (load with strict=True)."""
    out: dict[str, Tensor] = {}
    for key, v in state.items():
        if key.startswith("head."):
            idx, rest = key[len("head."):].split(".", 1)
            out[f"backbone.{FRCNN_HEAD_NAMES[int(idx)]}.{rest}"] = v
        elif key.startswith("rpn.rpn_net."):
            out["rpn.head.conv." + key.rsplit(".", 1)[1]] = v
        elif key.startswith("rpn.rpn_cls_score_net."):
            # channels: A background scores, then A foreground; softmax fg prob = sigmoid(fg - bg)
            out["rpn.head.cls_logits." + key.rsplit(".", 1)[1]] = v[num_anchors:] - v[:num_anchors]
        elif key.startswith("rpn.rpn_bbox_pred_net."):
            out["rpn.head.bbox_pred." + key.rsplit(".", 1)[1]] = v  # both (A, 4) channel-major
        elif key.startswith("classifier.tail.0."):
            out["roi_heads.box_head.layer4." + key[len("classifier.tail.0."):]] = v
        elif key.startswith("classifier.cls_score_net."):
            out["roi_heads.box_predictor.cls_score." + key.rsplit(".", 1)[1]] = v
        elif key.startswith("classifier.bbox_pred_net."):
            out["roi_heads.box_predictor.bbox_pred." + key.rsplit(".", 1)[1]] = v
        else:
            raise KeyError(f"no torchvision counterpart for frcnn weight {key}")
    return out


# -------------------------------------------------------------------------------------------- data

def load_image(path: Path) -> Tensor:
    """(3, 600, 1000) float 0..255 RGB, bilinear resize (frcnn's interpolate settings)."""
    x = image_to_tensor(Image.open(path)).unsqueeze(0)
    return F.interpolate(x, size=IMAGE_HW, mode="bilinear", align_corners=False)[0]


def load_gt(xml_path: Path, orig_hw: tuple[int, int], num_gt: int, image_hw: tuple[int, int] = IMAGE_HW
            ) -> tuple[Tensor, Tensor]:
    """First ``num_gt`` boxes of a VOC annotation, 0-based inclusive (+1 convention), scaled to ``image_hw``."""
    fy, fx = image_hw[0] / orig_hw[0], image_hw[1] / orig_hw[1]
    boxes, labels = [], []
    for obj in ET.parse(xml_path).getroot().iter("object"):
        bb = obj.find("bndbox")
        x1, y1, x2, y2 = (float(bb.find(t).text) - 1 for t in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 * fx, y1 * fy, (x2 + 1) * fx - 1, (y2 + 1) * fy - 1])
        labels.append(BCCD_CLASSES.get(obj.find("name").text, 1))
        if len(boxes) == num_gt:
            break
    return torch.tensor(boxes), torch.tensor(labels, dtype=torch.long)


@torch.no_grad()
def calibrated_resnet_state(images: list[Tensor], means, batch: int = 2) -> dict[str, Tensor]:
    """A randomly initialised resnet50 whose BatchNorm running stats are the average over ``images``."""
    torch.manual_seed(0)
    net = c4_resnet(nn.BatchNorm2d)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    net.train()
    mean = torch.tensor(means).view(1, 3, 1, 1)
    trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4)
    for i in range(0, len(images), batch):
        trunk(torch.stack(images[i : i + batch]) - mean)
    return {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


# ------------------------------------------------------------------------------------------ helpers

class RoICounter:
    def __init__(self, module: nn.Module):
        self.count = 0
        module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.count += inputs[0].shape[0]

    def take(self) -> int:
        c, self.count = self.count, 0
        return c


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "logical_cores": os.cpu_count(),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()),
    }


def timed_rounds(mode: str, entries: list, warmup: int, runs: int) -> dict:
    """``warmup`` + ``runs`` rounds; each round runs every (name, fn, RoICounter) of ``entries`` once, each model
    going first in turn. Times, RoIs at the tail, medians and the median of per-round ratios to torchvision."""
    times = {name: [] for name, _, _ in entries}
    rois = {name: [] for name, _, _ in entries}
    for i in range(warmup + runs):
        timed = i >= warmup
        row = []
        k = i % len(entries)  # every model goes first in turn
        for name, fn, counter in entries[k:] + entries[:k]:
            counter.take()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            n = counter.take()
            row.append(f"{name} {dt:6.2f} s ({n} RoIs)")
            if timed:
                times[name].append(dt)
                rois[name].append(n)
        print(f"  {mode} {'run' if timed else 'warm-up'} {i - warmup + 1 if timed else i + 1}: "
              + ", ".join(row), flush=True)
    out = {"times": times, "rois": rois, "median": {k: statistics.median(v) for k, v in times.items()},
           "median_pair_ratio": statistics.median(a / b for a, b in zip(times["frcnn"], times["torchvision"]))}
    if "frcnn fast" in times:
        out["median_pair_ratio_fast"] = statistics.median(
            a / b for a, b in zip(times["frcnn fast"], times["torchvision"]))
    return out


def maxdiff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


# ------------------------------------------------------------------------------------- verification

def input_and_verification(fr: FasterRCNN, tv: TVFasterRCNN, image: Tensor, size_divisor: int, verify_fn):
    """Print both parameter counts; frcnn's input (``image`` is already at the test size: a resize by 1), padded to
    ``size_divisor`` as torchvision pads it; ``verify_fn``'s stage-by-stage comparison, printed."""
    n_train = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (fr, tv)]
    n_all = [sum(p.numel() for p in m.parameters()) for m in (fr, tv)]
    print(f"  parameters (trainable / all): frcnn {n_train[0]:,} / {n_all[0]:,}, "
          f"torchvision {n_train[1]:,} / {n_all[1]:,}")
    cfg = fr.cfg
    prepared = prep_image(image, cfg.TEST.SCALES[0], cfg.TEST.MAX_SIZE, cfg.PIXEL_MEANS, cfg.PIXEL_STDS)
    assert prepared.scale == 1.0
    fr_input, fr_sizes = batch_images([prepared.tensor], size_divisor=size_divisor)
    t0 = time.perf_counter()
    check = verify_fn(fr, tv, image, fr_input, fr_sizes)
    print(f"verification ({time.perf_counter() - t0:.1f} s):")
    for k, v in check.items():
        print(f"  {k}: {v}")
    return fr_input, fr_sizes, check


def same_input(fr: FasterRCNN, tv: TVFasterRCNN, image: Tensor, fr_input: Tensor):
    """Both in eval mode; torchvision's transformed image, asserted equal to frcnn's input, and the first record."""
    fr.eval()
    tv.eval()
    images, _ = tv.transform([image])
    assert images.tensors.shape == fr_input.shape, (images.tensors.shape, fr_input.shape)
    out = {"input_max_abs_diff": maxdiff(images.tensors, fr_input)}
    assert out["input_max_abs_diff"] == 0.0, "frcnn input differs from torchvision's transformed image"
    return images, out


@torch.no_grad()
def verify(fr: FasterRCNN, tv: TVFasterRCNN, image: Tensor, fr_input: Tensor, fr_sizes: Tensor) -> dict:
    images, out = same_input(fr, tv, image, fr_input)
    f_fr = fr.head(fr_input)
    f_tv = tv.backbone(images.tensors)
    out["feature_shape"] = list(f_fr.shape)
    out["feature_max_abs_diff"] = maxdiff(f_fr, f_tv)
    out["feature_max_abs"] = float(f_fr.abs().max())
    logits, deltas = fr.rpn(f_fr)
    obj, bbox = tv.rpn.head([f_tv])
    obj_flat, bbox_flat = concat_box_prediction_layers(obj, bbox)
    out["rpn_fg_prob_max_abs_diff"] = maxdiff(logits.softmax(-1)[0, :, 1], obj_flat[:, 0].sigmoid())
    out["rpn_deltas_max_abs_diff"] = maxdiff(deltas[0], bbox_flat)
    out["rpn_deltas_std"] = float(deltas.std())
    fg = logits.softmax(-1)[..., 1]
    out["rpn_fg_prob_range"] = [float(fg.min()), float(fg.max())]
    anchors = fr.anchor_generator(*f_fr.shape[-2:])
    for name, stage in (("test", fr.cfg.TEST), ("train", fr.cfg.TRAIN)):
        rois, _ = proposal_layer(fg, deltas, anchors, fr_sizes, stage.RPN_PRE_NMS_TOP_N, 0, stage.RPN_NMS_THRESH)
        out[f"frcnn_proposals_after_nms_uncapped_{name}"] = rois.shape[0]

    # proposals and detections with frcnn's anchors swapped into torchvision (exclusive corners)
    ag = tv.rpn.anchor_generator
    stock = ag.cell_anchors
    excl = fr.anchor_generator.base_anchors.clone()
    excl[:, 2:] += 1
    ag.cell_anchors = [excl]
    try:
        feats = OrderedDict([("0", f_tv)])
        props_tv, _ = tv.rpn(images, feats)
    finally:
        ag.cell_anchors = stock
    trace = Trace()
    dets_fr = fr(fr_input, fr_sizes, trace=trace)[0]
    rois_fr = trace.stages["proposal_layer"]["rois"][:, 1:].clone()
    rois_fr[:, 2:] += 1
    out["proposals_frcnn_vs_tv_matched_anchors"] = [rois_fr.shape[0], props_tv[0].shape[0]]
    wh = rois_fr[:, 2:] - rois_fr[:, :2]
    out["frcnn_proposals_1px_slivers"] = int((wh <= 1).any(1).sum())
    if rois_fr.shape != props_tv[0].shape:
        return out
    out["proposals_max_abs_diff_px"] = maxdiff(rois_fr, props_tv[0])
    # RoIAlign: frcnn hands roi_align its inclusive (+1 convention) boxes, torchvision its exclusive ones,
    # so frcnn's crops cover 1 px less in x and y. Fed frcnn's inclusive boxes, torchvision's pooler agrees.
    crops_fr = trace.stages["roi_pooling"]["crops"]
    pool = tv.roi_heads.box_roi_pool
    out["roi_align_crops_max_abs_diff_tv_exclusive_boxes"] = maxdiff(
        crops_fr, pool(feats, props_tv, images.image_sizes))
    incl = props_tv[0].clone()
    incl[:, 2:] -= 1
    crops_incl = pool(feats, [incl], images.image_sizes)
    out["roi_align_crops_max_abs_diff_tv_inclusive_boxes"] = maxdiff(crops_fr, crops_incl)
    cls, box = tv.roi_heads.box_predictor(tv.roi_heads.box_head(crops_incl))
    out["cls_prob_max_abs_diff"] = maxdiff(cls.softmax(-1), trace.stages["classification"]["cls_prob"])
    b_tv, s_tv, l_tv = (t[0] for t in tv.roi_heads.postprocess_detections(cls, box, props_tv, images.image_sizes))
    boxes_fr = dets_fr.boxes.clone()
    boxes_fr[:, 2:] += 1
    out["detections_frcnn_vs_tv"] = [boxes_fr.shape[0], b_tv.shape[0]]
    if boxes_fr.shape == b_tv.shape:
        out["detections_boxes_max_abs_diff_px"] = maxdiff(boxes_fr, b_tv)
        out["detections_scores_max_abs_diff"] = maxdiff(dets_fr.scores, s_tv)
        out["detections_labels_equal"] = bool(torch.equal(dets_fr.labels, l_tv))
    # stock torchvision anchors vs frcnn's (what the benchmark runs)
    out["anchor_centre_offset_px"] = float(
        ((excl[:, :2] + excl[:, 2:]) / 2 - (stock[0][:, :2] + stock[0][:, 2:]) / 2).abs().max())
    sizes_fr, sizes_tv = excl[:, 2:] - excl[:, :2], stock[0][:, 2:] - stock[0][:, :2]
    out["anchor_size_max_diff_px"] = float((sizes_fr - sizes_tv).abs().max())
    return out


# ------------------------------------------------------------------------------------------ R50-FPN row

FPN_CLASSES = 20  # VOC; torchvision's model gets num_classes=21
FPN_SIZE_DIVISIBLE = 32  # torchvision's default; frcnn is fed the same padded tensor


class FixedStrideAnchors(TVAnchorGenerator):
    """torchvision's AnchorGenerator with each level's true stride instead of ``padded_size // map_size`` (which is
    61 for P6 of an 800-px side: 13 cells)."""

    def __init__(self, strides, sizes, aspect_ratios):
        super().__init__(sizes, aspect_ratios)
        self.strides = strides

    def forward(self, image_list, feature_maps):
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        strides = [[torch.tensor(s, dtype=torch.int64, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


def freeze_batchnorm(module: nn.Module) -> None:
    """nn.BatchNorm2d -> FrozenBatchNorm2d in place (what torchvision's pretrained detectors and frcnn run)."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.load_state_dict(child.state_dict())
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)


def build_torchvision_fpn(cfg, calib: list[Tensor]) -> TVFasterRCNN:
    """Stock ``fasterrcnn_resnet50_fpn`` (random weights, seed 0) with frcnn's pixel normalisation in 0..255 units
    (= torchvision's ImageNet mean/std x 255, so the same input tensor reaches both), BatchNorm statistics calibrated
    on ``calib`` then frozen, conv1 + layer1 fixed (trainable_backbone_layers=3, as with pretrained weights)."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.manual_seed(0)
    tv = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=FPN_CLASSES + 1,
                                 image_mean=list(cfg.PIXEL_MEANS), image_std=list(cfg.PIXEL_STDS))
    body = tv.backbone.body
    with torch.no_grad():
        for m in body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average
        body.train()
        mean = torch.tensor(cfg.PIXEL_MEANS).view(1, 3, 1, 1)
        std = torch.tensor(cfg.PIXEL_STDS).view(1, 3, 1, 1)
        for i in range(0, len(calib), 2):
            body((torch.stack(calib[i : i + 2]) - mean) / std)
    freeze_batchnorm(tv)
    for m in (body.conv1, body.layer1):
        for p in m.parameters():
            p.requires_grad_(False)
    return tv.eval()


def tv_dets(d: dict) -> tuple[Tensor, Tensor, Tensor]:
    return d["boxes"], d["scores"], d["labels"]


def sort_detections(boxes: Tensor, labels: Tensor) -> Tensor:
    """An order of detections by label then rounded box: the same set in another (score-tie) order lines up."""
    keys = torch.cat((labels[:, None].float(), boxes.round()), 1).tolist()
    return torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), dtype=torch.long)


def same_rows(a: Tensor, b: Tensor, tol: float = 1e-3) -> int:
    """How many rows (boxes) of ``a`` are a row of ``b`` to ``tol`` px (frcnn's x2 = cx + w / 2 - 1, + 1 to compare,
    is torchvision's cx + w / 2 to an ulp, not always bit for bit)."""
    if not len(a) or not len(b):
        return 0
    return int(((a[:, None, :] - b[None, :, :]).abs() <= tol).all(-1).any(1).sum())


def match_detections(a: tuple, b: tuple, iou: float = 0.99) -> int:
    """How many detections of ``a`` (exclusive boxes, scores, labels) have one of ``b`` with the same label at IoU
    >= ``iou``."""
    if not len(a[0]) or not len(b[0]):
        return 0
    same = (torchvision.ops.box_iou(a[0], b[0]) >= iou) & (a[2][:, None] == b[2][None, :])
    return int(same.any(1).sum())


@torch.no_grad()
def verify_fpn(fr: FasterRCNN, tv: TVFasterRCNN, image: Tensor, fr_input: Tensor, fr_sizes: Tensor) -> dict:
    """Stage by stage with the same weights and input; each convention removed in turn (the module's FPN notes)."""
    from torchvision.ops import roi_align

    from frcnn.boxes import to_exclusive
    from frcnn.model.pooling import roi_levels

    images, out = same_input(fr, tv, image, fr_input)
    f_fr = fr.head(fr_input)
    f_tv = tv.backbone(images.tensors)
    out["feature_shapes"] = [list(f.shape[-2:]) for f in f_fr]
    out["features_max_abs_diff"] = max(maxdiff(a, b) for a, b in zip(f_fr, f_tv.values()))
    logits, deltas = fr.rpn(f_fr)
    obj, bbox = concat_box_prediction_layers(*tv.rpn.head(list(f_tv.values())))
    fg = logits.softmax(-1)[..., 1]
    out["rpn_fg_prob_max_abs_diff"] = maxdiff(fg[0], obj[:, 0].sigmoid())
    out["rpn_deltas_max_abs_diff"] = maxdiff(deltas[0], bbox)
    out["rpn_fg_prob_range"] = [float(fg.min()), float(fg.max())]
    out["rpn_deltas_std"] = float(deltas.std())

    # anchors: torchvision infers a level's stride as padded size // map size
    feats = list(f_tv.values())
    stock = tv.rpn.anchor_generator(images, feats)[0]
    ours = torch.cat([g(*f.shape[-2:]) for g, f in zip(fr.anchor_generators, f_fr)])
    sizes = [f.shape[-2] * f.shape[-1] * fr.rpn.num_anchors for f in f_fr]
    excl = to_exclusive(ours)
    out["tv_inferred_strides_hw"] = [[images.tensors.shape[-2] // f.shape[-2], images.tensors.shape[-1] // f.shape[-1]]
                                     for f in feats]
    diff = (excl - stock).abs().amax(1)
    out["anchors_differing_per_level"] = [int((d > 0).sum()) for d in diff.split(sizes)]
    out["anchors_max_abs_diff_px"] = float(diff.max())

    # proposals: stock torchvision vs frcnn, then torchvision with frcnn's strides
    trace = Trace()
    dets_fr = fr(fr_input, fr_sizes, trace=trace)[0]
    rois_fr = trace.stages["proposal_layer"]["rois"]
    props_fr = to_exclusive(rois_fr[:, 1:])
    wh = rois_fr[:, 3:] - rois_fr[:, 1:3] + 1
    out["frcnn_proposals_1px_slivers"] = int((wh <= 1).any(1).sum())  # clipped off-image boxes torchvision drops
    props_stock, _ = tv.rpn(images, f_tv)
    out["proposals_frcnn_vs_tv_stock"] = [props_fr.shape[0], props_stock[0].shape[0]]
    out["proposals_stock_same_box_in_both"] = same_rows(props_fr, props_stock[0])
    generator = tv.rpn.anchor_generator
    tv.rpn.anchor_generator = FixedStrideAnchors(fr.strides, generator.sizes, generator.aspect_ratios)
    try:
        props_tv, _ = tv.rpn(images, f_tv)
    finally:
        tv.rpn.anchor_generator = generator
    props_tv = props_tv[0]
    out["proposals_frcnn_vs_tv_fixed_strides"] = [props_fr.shape[0], props_tv.shape[0]]
    out["proposals_fixed_strides_same_box_in_both"] = same_rows(props_fr, props_tv)
    # frcnn keeps the 1-px slivers (anchors of the padded area, clipped) where torchvision drops them
    # (remove_small_boxes): without them frcnn's list is the start of torchvision's, in order
    solid = props_fr[(wh > 1).all(1)]
    out["proposals_without_slivers_in_tv"] = [same_rows(solid, props_tv), len(solid)]
    if len(solid) <= len(props_tv):
        out["proposals_without_slivers_vs_tv_first_rows_max_abs_diff_px"] = maxdiff(solid, props_tv[: len(solid)])
        missing = [i for i in range(len(solid)) if not same_rows(solid[i : i + 1], props_tv)]
        out["proposals_without_slivers_not_in_tv"] = [[round(float(x), 2) for x in solid[i]] for i in missing[:3]]

    # from here on both sides work on frcnn's proposals: each stage is compared on the same input
    props_tv = props_fr
    # RoI levels (torchvision's LevelMapper on exclusive boxes vs frcnn's roi_levels on +1 boxes) and crops
    from torchvision.ops.poolers import _setup_scales

    pool = tv.roi_heads.box_roi_pool
    _, mapper = _setup_scales(list(f_tv.values())[:4], images.image_sizes, pool.canonical_scale, pool.canonical_level)
    lv_tv = mapper([props_tv])
    lv_fr = roi_levels(torch.cat((torch.zeros(len(props_tv), 1), props_tv - torch.tensor([0, 0, 1, 1.0])), 1), 2, 5)
    out["roi_levels_equal"] = bool(torch.equal(lv_tv, lv_fr - 2))
    out["roi_levels_histogram_P2_P5"] = torch.bincount(lv_fr - 2, minlength=4).tolist()
    crops_fr = trace.stages["roi_pooling"]["crops"]
    stock_crops = pool(dict(list(f_tv.items())[:4]), [props_tv], images.image_sizes)
    out["crops_max_abs_diff_tv_stock_pooler"] = maxdiff(crops_fr, stock_crops)

    def tv_crops(boxes: Tensor, sampling_ratio: int) -> Tensor:  # MultiScaleRoIAlign's per-level roi_align
        crops = torch.zeros_like(crops_fr)
        for k, stride in enumerate(fr.strides[:4]):
            idx = (lv_tv == k).nonzero().squeeze(1)
            rois = torch.cat((torch.zeros(len(idx), 1), boxes[idx]), 1)
            crops[idx] = roi_align(list(f_tv.values())[k], rois, 7, 1.0 / stride, sampling_ratio=sampling_ratio)
        return crops

    incl = props_tv - torch.tensor([0.0, 0.0, 1.0, 1.0])
    out["crops_max_abs_diff_tv_exclusive_boxes_sampling_0"] = maxdiff(crops_fr, tv_crops(props_tv, 0))
    out["crops_max_abs_diff_tv_inclusive_boxes_sampling_2"] = maxdiff(crops_fr, tv_crops(incl, 2))
    crops = tv_crops(incl, 0)
    out["crops_max_abs_diff_tv_inclusive_boxes_sampling_0"] = maxdiff(crops_fr, crops)
    cls, box = tv.roi_heads.box_predictor(tv.roi_heads.box_head(crops))
    out["cls_prob_max_abs_diff"] = maxdiff(cls.softmax(-1), trace.stages["classification"]["cls_prob"])
    out["cls_prob_max"] = float(cls.softmax(-1)[:, 1:].max())
    b, sc, lb = (t[0] for t in tv.roi_heads.postprocess_detections(cls, box, [props_tv], images.image_sizes))
    boxes_fr = to_exclusive(dets_fr.boxes)
    out["detections_frcnn_vs_tv_same_crops"] = [boxes_fr.shape[0], b.shape[0]]
    out["detections_same_crops_matched_iou_0.999"] = match_detections((boxes_fr, dets_fr.scores, dets_fr.labels),
                                                                      (b, sc, lb), 0.999)
    out["detections_same_crops_same_order"] = bool(torch.equal(dets_fr.labels, lb))
    if boxes_fr.shape == b.shape:
        order_fr, order_tv = sort_detections(boxes_fr, dets_fr.labels), sort_detections(b, lb)
        out["detections_same_crops_boxes_max_abs_diff_px"] = maxdiff(boxes_fr[order_fr], b[order_tv])
        out["detections_same_crops_scores_max_abs_diff"] = maxdiff(dets_fr.scores[order_fr], sc[order_tv])
    # end to end, each as it stands (stock anchors, stock pooler): how many frcnn detections torchvision has too
    stock = tv_dets(tv([image])[0])
    ours_e2e = (boxes_fr, dets_fr.scores, dets_fr.labels)
    out["end_to_end_detections_frcnn_tv"] = [boxes_fr.shape[0], stock[0].shape[0]]
    out["end_to_end_frcnn_detections_matched_iou_0.99"] = match_detections(ours_e2e, stock)
    out["end_to_end_frcnn_detections_matched_iou_0.9"] = match_detections(ours_e2e, stock, 0.9)
    return out


def run_fpn(args, info: dict, image_path: Path, calib_paths: list[Path]) -> int:
    """The R50-FPN row: torchvision's own fasterrcnn_resnet50_fpn and frcnn's voc-r50-fpn preset, same weights (the
    torchvision model's state dict given to frcnn as PRETRAINED), same input tensor."""
    from frcnn.engine.fast import prepare_for_inference

    cfg0 = load_config("voc-r50-fpn", ["DEVICE=cpu"])
    raw = image_to_tensor(Image.open(image_path))
    h, w = raw.shape[-2:]
    scale = min(cfg0.TEST.SCALES[0] / min(h, w), cfg0.TEST.MAX_SIZE / max(h, w))
    hw = (int(h * scale), int(w * scale))  # torchvision's sizes (floor); frcnn's compute_scale rounds
    fr_hw = (round(h * scale), round(w * scale))

    def resized(path: Path) -> Tensor:
        x = image_to_tensor(Image.open(path)).unsqueeze(0)
        return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)[0]

    image = resized(image_path)
    calib = [resized(p) for p in calib_paths]
    print(f"image {image_path.name} {h}x{w} -> {hw[0]}x{hw[1]} (torchvision's floor; frcnn's own resize would give "
          f"{fr_hw[0]}x{fr_hw[1]}); calibrating BN on {len(calib)} images ...", flush=True)
    t0 = time.perf_counter()
    tv = build_torchvision_fpn(cfg0, calib)
    with torch.no_grad():  # the same weights go to frcnn (module docstring: degenerate proposals)
        tv.rpn.head.bbox_pred.weight.mul_(args.rpn_delta_scale)
    print(f"  torchvision model and calibration {time.perf_counter() - t0:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pth = Path(tmp) / "fasterrcnn_resnet50_fpn.pth"
        torch.save(tv.state_dict(), pth)
        cfg = load_config("voc-r50-fpn", ["DEVICE=cpu", f"PRETRAINED={pth}"])
        torch.manual_seed(cfg.RNG_SEED)
        fr = FasterRCNN(cfg, FPN_CLASSES)
    fr_input, fr_sizes, check = input_and_verification(fr, tv, image, FPN_SIZE_DIVISIBLE, verify_fpn)

    orig_hw = (h, w)
    gt_boxes, gt_labels = load_gt(image_path.parent.parent / "Annotations" / (image_path.stem + ".xml"), orig_hw,
                                  args.num_gt, hw)
    tv_targets = [{"boxes": torch.cat((gt_boxes[:, :2], gt_boxes[:, 2:] + 1), 1), "labels": gt_labels}]
    fr_fast = prepare_for_inference(fr)
    counters = {"frcnn": RoICounter(fr.classifier.tail), "torchvision": RoICounter(tv.roi_heads.box_head),
                "frcnn fast": RoICounter(fr_fast.classifier.tail)}
    opts = {name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                                  weight_decay=1e-4) for name, m in (("frcnn", fr), ("torchvision", tv))}
    gen = torch.Generator().manual_seed(cfg.RNG_SEED)
    torch.manual_seed(cfg.RNG_SEED)
    last_losses: dict[str, dict[str, float]] = {}

    def step(name: str, losses: dict) -> None:
        sum(losses.values()).backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        last_losses[name] = {k: round(float(v.detach()), 4) for k, v in losses.items()}

    def no_grad(fn):
        return lambda: torch.no_grad()(fn)()

    inference = [("frcnn", no_grad(lambda: fr(fr_input, fr_sizes)), counters["frcnn"]),
                 ("torchvision", no_grad(lambda: tv([image])), counters["torchvision"]),
                 ("frcnn fast", no_grad(lambda: fr_fast(fr_input, fr_sizes)), counters["frcnn fast"])]
    train = [("frcnn", lambda: step("frcnn", fr(fr_input, fr_sizes, [gt_boxes], [gt_labels], generator=gen)),
              counters["frcnn"]),
             ("torchvision", lambda: step("torchvision", tv([image], tv_targets)), counters["torchvision"])]
    results = {}
    for mode, entries, runs in (("inference", inference, args.runs), ("train", train, args.train_runs)):
        fr.train(mode == "train")
        tv.train(mode == "train")
        results[mode] = timed_rounds(mode, entries, args.warmup, runs)
    print(f"  last losses: {last_losses}")
    inf, trn = results["inference"], results["train"]
    table = results_table(inf, trn)
    info["loadavg_end"] = list(os.getloadavg())
    info["wall_seconds"] = round(time.perf_counter() - info.pop("t_start"), 1)
    print()
    print(table)
    print(f"total wall time {info['wall_seconds']} s, load average at end {info['loadavg_end']}")
    if args.no_write:
        return 0
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "PYTHONPATH=src nice -n 10 .venv/bin/python benchmarks/bench_torchvision.py " + " ".join(args.argv)
    payload = {"command": command.strip(), "machine": info,
               "settings": {"runs": args.runs, "train_runs": args.train_runs, "warmup": args.warmup,
                            "calib_images": len(calib), "rpn_delta_scale": args.rpn_delta_scale,
                            "image": image_path.name, "image_hw": list(hw),
                            "padded_input_hw": list(fr_input.shape[-2:]),
                            "num_gt": len(gt_boxes), "frcnn_config": "voc-r50-fpn PRETRAINED=<torchvision state dict>",
                            "torchvision": "fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, "
                                           "num_classes=21, image_mean/std = frcnn's PIXEL_MEANS/STDS)",
                            "optimizer": "SGD lr 1e-3 momentum 0.9 wd 1e-4"},
               "verification": check,
               "results": {m: {"median_s": r["median"], "times_s": r["times"], "rois_at_tail": r["rois"]}
                           for m, r in results.items()},
               "median_per_round_ratio_frcnn_over_torchvision": {
                   "inference": inf["median_pair_ratio"], "train": trn["median_pair_ratio"],
                   "inference_fast_path": inf["median_pair_ratio_fast"]},
               "last_losses": last_losses}
    (out_dir / "torchvision_r50fpn.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = ["# frcnn vs torchvision Faster R-CNN, R50-FPN, CPU", "",
          f"Command: `{payload['command']}`  ",
          "Script: `benchmarks/bench_torchvision.py` (its docstring and `FPN_NOTES` list every choice).", "",
          f"Machine: {info['cpu']} (torch CPU capability {info['cpu_capability']}), {info['logical_cores']} logical "
          f"cores; torch {info['torch']}, torchvision {info['torchvision']}, Python {info['python']}; torch threads "
          f"{info['threads']}; {info['date']}. The machine was shared with two running experiments: load average "
          f"at start {info['loadavg_start']}, at end {info['loadavg_end']}. Times are therefore compared as ratios "
          "measured side by side in the same rounds, not as absolute figures.", "",
          f"Median of {args.runs} (inference) and {args.train_runs} (training) interleaved rounds (each model first "
          f"in turn), each after {args.warmup} warm-up round(s). "
          f"Input: {image_path.name} resized to {hw[0]}x{hw[1]}, padded to {fr_input.shape[-2]}x{fr_input.shape[-1]} "
          f"(size_divisible {FPN_SIZE_DIVISIBLE}), the same tensor for both models. Training: one image, "
          f"{len(gt_boxes)} gt boxes, forward + backward + SGD step, frozen BN, conv1 + layer1 fixed.", "",
          table, "",
          "RoIs at tail: RoIs entering the box head (fc6/fc7) per call, every timed run.", "",
          "All timed runs (s):", ""]
    for m, r in results.items():
        md += [f"- {m} {name}: " + ", ".join(f"{t:.3f}" for t in r["times"][name]) for name in r["times"]]
    md += ["", f"Last losses: {last_losses}", "", "Verification (same weights; frcnn loaded torchvision's state dict "
           "through PRETRAINED):", ""]
    md += [f"- {k}: {v}" for k, v in check.items()]
    md += ["", FPN_NOTES, ""]
    (out_dir / "torchvision_r50fpn.md").write_text("\n".join(md))
    print(f"wrote {out_dir / 'torchvision_r50fpn.md'} and .json")
    return 0


def results_table(inf: dict, trn: dict) -> str:
    def roi_text(v: list[int]) -> str:
        return str(v[0]) if len(set(v)) == 1 else f"{min(v)}-{max(v)}"

    rows = ["| model | inference s/img | RoIs at tail (test) | train s/step | RoIs at tail (train) |",
            "|---|---:|---:|---:|---:|"]
    for name in ("frcnn", "torchvision"):
        rows.append(f"| {name} | {inf['median'][name]:.3f} | {roi_text(inf['rois'][name])} | "
                    f"{trn['median'][name]:.3f} | {roi_text(trn['rois'][name])} |")
    rows.append(f"| frcnn fast path (default of eval/detect) | {inf['median']['frcnn fast']:.3f} | "
                f"{roi_text(inf['rois']['frcnn fast'])} | | |")
    rows.append(f"| **frcnn / torchvision, median of per-round ratios** | {inf['median_pair_ratio']:.3f} | | "
                f"{trn['median_pair_ratio']:.3f} | |")
    rows.append(f"| **frcnn fast / torchvision, median of per-round ratios** | {inf['median_pair_ratio_fast']:.3f} "
                "| | | |")
    return "\n".join(rows)


FPN_NOTES = """What differs from torchvision's fasterrcnn_resnet50_fpn, and how the verification above removes it:

- Weights: torchvision's own model (random init, seed 0; BatchNorm statistics calibrated on BCCD images, then
  FrozenBatchNorm2d; its RPN bbox_pred weights x --rpn-delta-scale 0.1 as in the C4 row, else the raw init's deltas
  throw boxes off the image) is saved and given to frcnn as PRETRAINED: the loader under test maps it. Parameter counts
  differ by 771 = 3 x 256 + 3: frcnn's objectness has 2 logits per anchor (background weights 0), torchvision's 1.
  Features, RPN probabilities (softmax([0, z])[1] = sigmoid(z)) and deltas come out the same (max diffs above).
- Input: frcnn's own resize rounds the short-side scale's long side (1067 px), torchvision's floors it (1066) and
  normalises before resizing; both are fed the same 800x1066 image (resize by 1: an identity) with torchvision's
  mean/std given in 0..255 units, and the same 800x1088 padded tensor (asserted equal).
- Anchors: equal on P2..P5. torchvision infers a level's stride as padded size // map size: P6 of 800 px has 13
  cells, stride 61 in y instead of 64, so its P6 anchors drift (up to 36 px); frcnn keeps 64. The proposals are also
  compared with torchvision given the true strides (FixedStrideAnchors).
- Proposal layer: frcnn clips boxes of the padded area (anchors right of the 1066-px image) to 1-px slivers on the
  border and keeps them; torchvision's remove_small_boxes drops them after clipping (they have zero width in its
  exclusive convention), and other proposals take their places in its top 1000. The two also clip differently
  within the last pixel (frcnn: x <= W - 1 inclusive, torchvision: x <= W exclusive), which changes what NMS
  suppresses at the image's edge: in the run recorded, all frcnn proposals but the 15 slivers and one at the right
  edge (x2 = 1066) are in torchvision's list (within 1e-3 px: frcnn's x2 + 1 is torchvision's x2 to an ulp).
  torchvision's score_thresh is 0 (no effect). Everything after the proposal layer is compared on frcnn's proposals.
- RoI levels: the same rule (k0 4, canonical 224, eps 1e-6, area of the exclusive box = frcnn's +1 box).
- RoIAlign: torchvision's MultiScaleRoIAlign samples 2 x 2 points per bin (sampling_ratio=2) of the exclusive box,
  frcnn's POOLING_MODE=align adaptively (sampling_ratio=0, ceil(roi size / 7) per bin) of its inclusive box (1 px
  less). Each is shown alone above; with both removed the crops agree to float rounding, then the class
  probabilities and the detections (torchvision's postprocess_detections on the same class scores and deltas:
  score 0.05, remove_small_boxes 1e-2, NMS 0.5 per class, 100 per image) are the same set.
- End to end, each model as it stands (stock anchors, stock pooler), the detections differ through the RoIAlign
  sampling: with random weights the scores are close to each other and the top 100 reorder; with trained weights the
  crops differ by far less than their content and the effect is small, but not zero. frcnn's align mode cannot be
  given sampling_ratio=2 today (frcnn.model.pooling).
- BatchNorm eps: torchvision's published COCO_V1 weights run FrozenBatchNorm2d with eps 0 (overwrite_eps); frcnn
  and torchvision models built from a state dict use 1e-5. Not visible here (both 1e-5).
- Training: frcnn labels only anchors inside the image and samples RoIs as the reference (fills up to 512 with
  repeated background RoIs), torchvision matches all anchors; both draw 256 anchors and 512 RoIs per image."""


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=None, help="timed runs per model and mode (default 7; quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per mode (default 1)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 run, 2 calibration images")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--calib-images", type=int, default=None, help="BN calibration images (default 8; quick 2)")
    p.add_argument("--num-gt", type=int, default=5)
    p.add_argument("--rpn-delta-scale", type=float, default=0.1, help="scale of frcnn's RPN bbox-pred init")
    p.add_argument("--images-dir", default=DEFAULT_IMAGES)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--no-write", action="store_true", help="print only (the default for --quick)")
    p.add_argument("--row", choices=("c4", "fpn"), default="c4",
                   help="c4: R50-C4 (torchvision_r50c4.md); fpn: R50-FPN, torchvision's fasterrcnn_resnet50_fpn "
                        "(torchvision_r50fpn.md; runs 3, train runs 2, calibration images 4 unless given)")
    p.add_argument("--train-runs", type=int, default=None, help="timed training rounds (default: --runs; fpn 2)")
    a = p.parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    fpn = a.row == "fpn"
    a.runs = a.runs if a.runs is not None else (1 if a.quick else 3 if fpn else 7)
    a.warmup = a.warmup if a.warmup is not None else 1
    a.train_runs = a.train_runs if a.train_runs is not None else (min(a.runs, 2) if fpn else a.runs)
    a.calib_images = a.calib_images if a.calib_images is not None else (2 if a.quick else 4 if fpn else 8)
    if a.quick:
        a.no_write = True
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    info = machine()
    print(f"machine: {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']}, "
          f"torchvision {info['torchvision']}, threads {info['threads']}, load {info['loadavg_start']}")

    img_dir = Path(args.images_dir)
    paths = sorted(img_dir.glob("*.jpg"))
    if len(paths) < args.calib_images + 1:
        print(f"need {args.calib_images + 1} images in {img_dir}", file=sys.stderr)
        return 2
    bench_path = paths[0]
    if args.row == "fpn":
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        info["t_start"] = t_start
        return run_fpn(args, info, bench_path, paths[1 : 1 + args.calib_images])
    calib = [load_image(p) for p in paths[1 : 1 + args.calib_images]]
    image = load_image(bench_path)
    orig_hw = Image.open(bench_path).size[::-1]
    gt_boxes, gt_labels = load_gt(img_dir.parent / "Annotations" / (bench_path.stem + ".xml"), orig_hw, args.num_gt)
    print(f"image {bench_path.name} -> {IMAGE_HW[0]}x{IMAGE_HW[1]}, {len(gt_boxes)} gt boxes; "
          f"calibrating BN on {len(calib)} images ...", flush=True)

    base = load_config("voc-r50-c4", ["POOLING_MODE=align", "DEVICE=cpu"])
    t0 = time.perf_counter()
    state = calibrated_resnet_state(calib, base.PIXEL_MEANS)
    print(f"  calibration {time.perf_counter() - t0:.1f} s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pth = Path(tmp) / "resnet50_calibrated.pth"
        torch.save(state, pth)
        cfg = load_config("voc-r50-c4", ["POOLING_MODE=align", "DEVICE=cpu", f"PRETRAINED={pth}"])
        torch.manual_seed(cfg.RNG_SEED)
        fr = FasterRCNN(cfg, NUM_CLASSES)
    with torch.no_grad():
        fr.rpn.rpn_bbox_pred_net.weight.mul_(args.rpn_delta_scale)
    tv = build_torchvision(cfg)
    tv.load_state_dict(frcnn_to_torchvision_state(fr.state_dict(), fr.rpn.num_anchors), strict=True)
    fr_input, fr_sizes, check = input_and_verification(fr, tv, image, SIZE_DIVISIBLE, verify)

    fr_count = RoICounter(fr.classifier.tail)
    tv_count = RoICounter(tv.roi_heads.box_head)
    tv_targets = [{"boxes": torch.cat((gt_boxes[:, :2], gt_boxes[:, 2:] + 1), 1), "labels": gt_labels}]

    def infer_fr():
        with torch.no_grad():
            fr(fr_input, fr_sizes)

    def infer_tv():
        with torch.no_grad():
            tv([image])

    # frcnn's default inference path (frcnn eval/detect/benchmark): BatchNorm folded, channels-last on AVX-512
    from frcnn.engine.fast import prepare_for_inference

    fr_fast = prepare_for_inference(fr)
    fast_count = RoICounter(fr_fast.classifier.tail)

    def infer_fast():
        with torch.no_grad():
            fr_fast(fr_input, fr_sizes)

    # the model as `frcnn train` holds it: channels-last where MEMORY_FORMAT auto picks it (AVX-512 CPUs)
    from frcnn.engine.train import trains_channels_last

    fr_train = copy.deepcopy(fr)
    train_layout = "channels-last" if trains_channels_last(cfg, torch.device("cpu")) else "contiguous"
    if train_layout == "channels-last":
        fr_train.to(memory_format=torch.channels_last)
    info["frcnn_train_layout"] = train_layout
    train_count = RoICounter(fr_train.classifier.tail)
    fr_opt = torch.optim.SGD([p for p in fr_train.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                             weight_decay=1e-4)
    tv_opt = torch.optim.SGD([p for p in tv.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                             weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.RNG_SEED)
    torch.manual_seed(cfg.RNG_SEED)  # torchvision's samplers use the global generator
    last_losses: dict[str, dict[str, float]] = {}

    def train_fr():
        fr_opt.zero_grad(set_to_none=True)
        losses = fr_train(fr_input, fr_sizes, [gt_boxes], [gt_labels], generator=gen)
        sum(losses.values()).backward()
        fr_opt.step()
        last_losses["frcnn"] = {k: round(float(v.detach()), 4) for k, v in losses.items()}

    def train_tv():
        tv_opt.zero_grad(set_to_none=True)
        losses = tv([image], tv_targets)
        sum(losses.values()).backward()
        tv_opt.step()
        last_losses["torchvision"] = {k: round(float(v.detach()), 4) for k, v in losses.items()}

    results: dict[str, dict] = {}
    modes = (("inference", [("frcnn", infer_fr, fr_count), ("torchvision", infer_tv, tv_count),
                            ("frcnn fast", infer_fast, fast_count)], "eval"),
             ("train", [("frcnn", train_fr, train_count), ("torchvision", train_tv, tv_count)], "train"))
    for mode, entries, set_mode in modes:
        fr.train(set_mode == "train")
        fr_train.train(set_mode == "train")
        tv.train(set_mode == "train")
        results[mode] = timed_rounds(mode, entries, args.warmup, args.runs)
        if mode == "train":
            print(f"  last losses: {last_losses}")

    inf, trn = results["inference"], results["train"]
    ratio_inf = inf["median"]["frcnn"] / inf["median"]["torchvision"]
    ratio_trn = trn["median"]["frcnn"] / trn["median"]["torchvision"]

    def roi_text(v: list[int]) -> str:
        return str(v[0]) if len(set(v)) == 1 else f"{min(v)}-{max(v)}"

    header = "| model | inference s/img | RoIs at tail (test) | train s/step | RoIs at tail (train) |"
    rows = [header, "|---|---:|---:|---:|---:|"]
    for name in ("frcnn", "torchvision"):
        rows.append(f"| {name} | {inf['median'][name]:.3f} | {roi_text(inf['rois'][name])} | "
                    f"{trn['median'][name]:.3f} | {roi_text(trn['rois'][name])} |")
    rows.append(f"| frcnn / torchvision (ratio of medians) | {ratio_inf:.3f} | | {ratio_trn:.3f} | |")
    rows.append(f"| frcnn / torchvision (median of per-round ratios) | {inf['median_pair_ratio']:.3f} | | "
                f"{trn['median_pair_ratio']:.3f} | |")
    ratio_fast = inf["median"]["frcnn fast"] / inf["median"]["torchvision"]
    rows.append(f"| frcnn fast path (default of eval/detect) | {inf['median']['frcnn fast']:.3f} | "
                f"{roi_text(inf['rois']['frcnn fast'])} | | |")
    rows.append(f"| frcnn fast / torchvision (ratio of medians; per-round) | {ratio_fast:.3f}; "
                f"{inf['median_pair_ratio_fast']:.3f} | | | |")
    table = "\n".join(rows)
    info["loadavg_end"] = list(os.getloadavg())
    info["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    print()
    print(f"median of {args.runs} interleaved runs, {info['threads']} threads, 608x1008 padded input "
          f"(600x1000 image):")
    print(table)
    print(f"total wall time {info['wall_seconds']} s, load average at end {info['loadavg_end']}")

    if not args.no_write:
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        command = "PYTHONPATH=src .venv/bin/python benchmarks/bench_torchvision.py " + " ".join(
            sys.argv[1:] if argv is None else argv)
        payload = {
            "command": command.strip(), "machine": info,
            "settings": {"runs": args.runs, "warmup": args.warmup, "calib_images": args.calib_images,
                         "image": bench_path.name, "image_hw": list(IMAGE_HW),
                         "padded_input_hw": list(fr_input.shape[-2:]), "size_divisible": SIZE_DIVISIBLE,
                         "num_gt": len(gt_boxes),
                         "frcnn_config": "voc-r50-c4 POOLING_MODE=align PRETRAINED=<calibrated>",
                         "rpn_delta_scale": args.rpn_delta_scale,
                         "rpn_channels": cfg.RPN_CHANNELS, "box_batch_size": cfg.TRAIN.BATCH_SIZE,
                         "optimizer": "SGD lr 1e-3 momentum 0.9 wd 1e-4"},
            "verification": check,
            "results": {m: {"median_s": r["median"], "times_s": r["times"], "rois_at_tail": r["rois"]}
                        for m, r in results.items()},
            "ratio_frcnn_over_torchvision": {"inference": ratio_inf, "train": ratio_trn,
                                             "inference_fast_path": ratio_fast},
            "median_per_round_ratio_frcnn_over_torchvision": {
                "inference": inf["median_pair_ratio"], "train": trn["median_pair_ratio"]},
            "last_losses": last_losses,
        }
        (out_dir / "torchvision_r50c4.json").write_text(json.dumps(payload, indent=2) + "\n")
        md = [
            "# frcnn vs torchvision Faster R-CNN, R50-C4 (RoIAlign), CPU",
            "",
            f"Command: `{payload['command']}`  ",
            "Script: `benchmarks/bench_torchvision.py` (its docstring lists every modelling choice).",
            "",
            f"Machine: {info['cpu']}, {info['logical_cores']} logical cores; torch {info['torch']}, "
            f"torchvision {info['torchvision']}, Python {info['python']}; torch threads {info['threads']}; "
            f"{info['date']}; load average at start {info['loadavg_start']}, at end {info['loadavg_end']}.",
            "",
            f"Median of {args.runs} interleaved rounds (each model first in turn) "
            f"after {args.warmup} warm-up "
            f"round(s). Input: {bench_path.name} resized to 600x1000, padded to "
            f"{fr_input.shape[-2]}x{fr_input.shape[-1]} (size_divisible {SIZE_DIVISIBLE}) for both models. "
            f"Training: one image, {len(gt_boxes)} gt boxes, forward + backward + SGD step, frozen BN, "
            f"conv1 + layer1 fixed; frcnn's model in {info['frcnn_train_layout']} layout, as `frcnn train` holds "
            "it here (MEMORY_FORMAT auto).",
            "",
            table,
            "",
            "RoIs at tail: number of RoIs entering the layer4 tail per call (forward hook), every timed run.",
            "",
            "All timed runs (seconds):",
            "",
        ]
        for m, r in results.items():
            for name in r["times"]:
                md.append(f"- {m} {name}: " + ", ".join(f"{t:.3f}" for t in r["times"][name]))
        md += ["", "Verification (same weights through `frcnn_to_torchvision_state`):", ""]
        md += [f"- {k}: {v}" for k, v in check.items()]
        md += ["", NOTES, ""]
        (out_dir / "torchvision_r50c4.md").write_text("\n".join(md))
        print(f"wrote {out_dir / 'torchvision_r50c4.md'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
