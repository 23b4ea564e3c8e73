"""Typed configuration with the reference's names and defaults.

The names are the write-up's (``TRAIN.RPN_BATCHSIZE``, ``TEST.RPN_POST_NMS_TOP_N``, ``POOLING_SIZE`` ...)
so a reader of the write-up can guess them. A :class:`Config` is an immutable value passed explicitly to
whatever needs it; there is no global config object. Build one from a preset or YAML file plus
``KEY=VALUE`` overrides with :func:`load_config`.

Pixel order: frcnn reads images as RGB (Pillow), so ``PIXEL_MEANS`` is the reference's BGR mean
``(102.9801, 115.9465, 122.7717)`` reversed.
"""

from __future__ import annotations

import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from frcnn.errors import ConfigError

TINY_DEFAULT_WIDTHS = (32, 64, 128, 128)  # the tiny backbone's stage widths, every run saved before the key


@dataclass(frozen=True)
class TrainConfig:
    # optimisation (SGD with momentum, step schedule)
    LEARNING_RATE: float = 0.001
    MOMENTUM: float = 0.9
    WEIGHT_DECAY: float = 0.0001
    GAMMA: float = 0.1
    STEPSIZE: tuple[int, ...] = (30000,)
    MAX_ITERS: int = 70000
    # the schedule in epochs (passes over the training set, mirrored copies included): when MAX_EPOCHS > 0,
    # frcnn train sets MAX_ITERS and STEPSIZE from MAX_EPOCHS and STEP_EPOCHS and the training set's size, and
    # writes the resolved iterations into the run's config.yaml
    MAX_EPOCHS: float = 0.0
    STEP_EPOCHS: tuple[float, ...] = ()
    WARMUP_ITERS: int = 0
    WARMUP_FACTOR: float = 1.0 / 3
    # step: x GAMMA at each of STEPSIZE; cosine: half a cosine from LEARNING_RATE to 0 at MAX_ITERS (STEPSIZE unused)
    LR_SCHEDULE: str = "step"
    # 0 = off; else the detector a run saves, validates and returns is an exponential moving average of the
    # weights, this decay an iteration (ramped in; see frcnn.engine.ema)
    EMA_DECAY: float = 0.0
    # 0 = off; else, after the last iteration, every BatchNorm that trains has its statistics re-estimated with the
    # final weights over at least this many training images (frcnn.engine.precise_bn)
    PRECISE_BN_IMAGES: int = 0
    DOUBLE_BIAS: bool = True
    BIAS_DECAY: bool = False
    DISPLAY: int = 20
    SNAPSHOT_ITERS: int = 5000
    SNAPSHOT_KEPT: int = 3
    # input
    SCALES: tuple[int, ...] = (600,)
    MAX_SIZE: int = 1000
    IMS_PER_BATCH: int = 1  # images per process; the global batch is WORLD_SIZE x this
    # 0 = off; else, when a quarter of the boxes (or of one class's) are under 2 strides at SCALES[0], frcnn train
    # grows SCALES and MAX_SIZE (TEST's too) to bring them to 2 strides, at most this many times the time of an
    # iteration, and writes the grown sizes into the run's config.yaml (frcnn.data.small_boxes)
    SCALE_UP_LIMIT: float = 0.0
    USE_FLIPPED: bool = True
    # augmentation (training only; every transform moves the boxes with the pixels, +1 convention kept)
    COLOR_JITTER: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)  # brightness, contrast, saturation, hue (0 = off)
    RANDOM_CROP: float = 0.0  # 0 = off; else the smallest fraction of each side a random crop keeps
    MOSAIC: float = 0.0  # probability that a training image is a mosaic of four (0 = off)
    ROTATE90: bool = False  # turn each training image by a random multiple of 90 degrees (data with no "up")
    # approximate (the write-up's): RoI coordinates are constants for the RoI-wise loss; exact (Ren et al.
    # 3.2, non-approximate): its gradient flows through crop pooling's sampling grid into the RPN's deltas
    JOINT: str = "approximate"
    # distributed training (torchrun): SyncBatchNorm for BatchNorm that trains; linear LR scaling rule
    SYNC_BN: bool = False
    LR_SCALING: str = "none"  # none | linear: LEARNING_RATE x the number of processes
    # proposal target layer
    BATCH_SIZE: int = 128  # RoIs per image
    FG_FRACTION: float = 0.25
    # random (the reference's): the foreground RoIs drawn from all at random, so a large object with many
    # overlapping proposals takes most slots; per_object: each object in turn gives one (at random), so a small one
    # is learnt from as often as a large one
    FG_SAMPLING: str = "random"
    FG_THRESH: float = 0.5
    BG_THRESH_HI: float = 0.5
    BG_THRESH_LO: float = 0.1
    BBOX_NORMALIZE_MEANS: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    BBOX_NORMALIZE_STDS: tuple[float, ...] = (0.1, 0.1, 0.2, 0.2)
    # anchor target layer
    RPN_POSITIVE_OVERLAP: float = 0.7
    RPN_NEGATIVE_OVERLAP: float = 0.3
    RPN_CLOBBER_POSITIVES: bool = False
    # anchors crossing the image border by more than this many pixels take no part in the RPN's loss (the
    # reference's allowed_border: 0); negative: every anchor takes part (torchvision; detectron2's BOUNDARY_THRESH -1)
    RPN_ALLOWED_BORDER: float = 0.0
    RPN_FG_FRACTION: float = 0.5
    RPN_BATCHSIZE: int = 256
    # smooth L1 of the box losses: quadratic below 1 / sigma^2, linear above (the reference: sigma 3 for the RPN,
    # 1 for the classification layer; torchvision: beta = 1 / sigma^2 = 1/9 for both)
    RPN_SIGMA: float = 3.0
    RCNN_SIGMA: float = 1.0
    # proposal layer while training
    RPN_NMS_THRESH: float = 0.7
    RPN_PRE_NMS_TOP_N: int = 12000
    RPN_POST_NMS_TOP_N: int = 2000
    # mixed precision: none | fp16 (CUDA, with a GradScaler) | bf16 | auto: bf16 where the device computes it
    # natively (CPUs with avx512_bf16 or amx_bf16, Ampere+ GPUs), fp16 on older GPUs, else none; frcnn train writes
    # the resolved mode into the run's config.yaml (see frcnn.engine.precision)
    AMP: str = "none"


@dataclass(frozen=True)
class TestConfig:
    __test__ = False  # not a pytest class

    SCALES: tuple[int, ...] = (600,)
    MAX_SIZE: int = 1000
    NMS: float = 0.3
    # hard: greedy per-class NMS at NMS (the reference's); soft: Gaussian soft-NMS (frcnn.ops.soft_nms), a box
    # overlapping a better one of its class keeps its score times exp(-IoU^2 / SOFT_NMS_SIGMA) instead of going
    NMS_METHOD: str = "hard"
    SOFT_NMS_SIGMA: float = 0.5
    RPN_NMS_THRESH: float = 0.7
    RPN_PRE_NMS_TOP_N: int = 6000
    RPN_POST_NMS_TOP_N: int = 300
    SCORE_THRESH: float = 0.0
    MAX_PER_IMAGE: int = 100
    # 0 = off; else frcnn train raises RPN_POST_NMS_TOP_N to at least this many times the boxes of a busy training
    # image (9 in 10 have as many or fewer), MAX_PER_IMAGE to half that, RPN_PRE_NMS_TOP_N to twice it, into the run's
    # config.yaml (frcnn.data.dense)
    PROPOSALS_PER_OBJECT: float = 0.0
    AMP: str = "none"  # none | fp16 | bf16: autocast around the model at inference


@dataclass(frozen=True)
class ResnetConfig:
    FIXED_BLOCKS: int = 1


@dataclass(frozen=True)
class Config:
    TRAIN: TrainConfig = field(default_factory=TrainConfig)
    TEST: TestConfig = field(default_factory=TestConfig)
    RESNET: ResnetConfig = field(default_factory=ResnetConfig)
    # network
    BACKBONE: str = "res50"  # res50 | res101 | vgg16 | tiny
    # none: the write-up's C4 (one map at FEAT_STRIDE); fpn: a Feature Pyramid Network on the backbone's stages
    # (levels at strides 4 .. FEAT_STRIDE, plus one at 2 x FEAT_STRIDE for the RPN only; see frcnn.model.fpn)
    NECK: str = "none"
    FPN_CHANNELS: int = 256
    PRETRAINED: str = ""  # path to a torchvision-style state dict of the backbone ("" = from scratch)
    FEAT_STRIDE: int = 16  # the stride of the backbone's last map (C4: 16; FPN on ResNet: 32, C5)
    # x 16 px (the reference's base box), or "auto": chosen from the training set by frcnn train; with NECK=fpn,
    # x each level's stride (the FPN paper's [8]: 32 px on P2 .. 512 px on P6)
    ANCHOR_SCALES: tuple[float, ...] | str = (8, 16, 32)
    ANCHOR_RATIOS: tuple[float, ...] = (0.5, 1, 2)
    NORM: str = "batch"  # normalisation of a backbone trained from scratch (tiny): batch | group (GroupNorm)
    # tiny: the channels of its four stages (a stage's work grows with the product of its input and output widths).
    # No preset widens it: scratch-cpu with [32, 64, 128, 192] lost 0.8 and 0.3 points on BCCD (seeds 0, 1)
    TINY_WIDTHS: tuple[int, ...] = TINY_DEFAULT_WIDTHS
    # tiny: the stages past FEAT_STRIDE keep its resolution and dilate their convs as DeepLab does (each left-out
    # stride 2 doubles the dilation after it): FEAT_STRIDE 16's features and receptive field, every 8 (or 4) px
    DILATED: bool = False
    RPN_CHANNELS: int = 512
    # the dilation of the RPN's 3x3 conv: 2 reads the neighbours 2 cells away, with DILATED at stride 8 what the
    # stride-16 network's RPN reads every 8 px (receptive field +32 px instead of +16). No preset sets it: with
    # scratch-cpu on BCCD it lost 2.0 and 0.6 points (seeds 0, 1), the small platelets most
    RPN_DILATION: int = 1
    POOLING_MODE: str = "crop"  # crop | align | pool
    POOLING_SIZE: int = 7
    # dropout after each of the two fully connected layers of the box head (tiny, and NECK=fpn on ResNet), in
    # training only, as VGG16's fc6 / fc7 have it at 0.5 (vgg16 keeps its own); 0 = none. No preset sets it:
    # scratch-cpu with 0.5 lost 2.0 and 0.2 points on BCCD (seeds 0, 1)
    TAIL_DROPOUT: float = 0.0
    # pre-processing (RGB)
    PIXEL_MEANS: tuple[float, ...] = (122.7717, 115.9465, 102.9801)
    PIXEL_STDS: tuple[float, ...] = (1.0, 1.0, 1.0)
    # run
    RNG_SEED: int = 3
    DEVICE: str = "auto"  # auto | cpu | cuda | cuda:N
    NUM_WORKERS: int = 0
    DIST_BACKEND: str = "auto"  # auto (nccl on CUDA, gloo on the CPU) | nccl | gloo
    # layout of the convolutions' tensors in training and the fast inference path: auto (channels_last on CPUs
    # with AVX-512, where it measured faster; contiguous elsewhere) | channels_last | contiguous. Same numbers up
    # to float rounding (which discrete choices such as NMS can amplify over iterations)
    MEMORY_FORMAT: str = "auto"

    def __post_init__(self) -> None:
        _check_choice("BACKBONE", self.BACKBONE, ("res50", "res101", "vgg16", "tiny"))
        _check_choice("POOLING_MODE", self.POOLING_MODE, ("crop", "align", "pool"))
        _check_choice("TRAIN.AMP", self.TRAIN.AMP, (*AMP_MODES, AUTO))
        _check_choice("TRAIN.LR_SCALING", self.TRAIN.LR_SCALING, ("none", "linear"))
        _check_choice("TRAIN.LR_SCHEDULE", self.TRAIN.LR_SCHEDULE, ("step", "cosine"))
        _check_choice("TRAIN.JOINT", self.TRAIN.JOINT, ("approximate", "exact"))
        _check_choice("TRAIN.FG_SAMPLING", self.TRAIN.FG_SAMPLING, ("random", "per_object"))
        if self.TRAIN.JOINT == "exact" and self.POOLING_MODE != "crop":
            raise ConfigError(f"TRAIN.JOINT=exact needs POOLING_MODE=crop (got {self.POOLING_MODE}): only crop "
                              "pooling's grid_sample passes the gradient to the RoI coordinates, roi_align and "
                              "roi_pool do not")
        _check_choice("NORM", self.NORM, ("batch", "group"))
        if self.NORM == "group" and self.BACKBONE != "tiny":
            raise ConfigError(f"NORM=group is for BACKBONE=tiny (BACKBONE={self.BACKBONE} uses BatchNorm)")
        if len(self.TINY_WIDTHS) != 4 or min(self.TINY_WIDTHS) < 1:
            raise ConfigError(f"TINY_WIDTHS={list(self.TINY_WIDTHS)} needs 4 channel counts >= 1 (one a stage)")
        if self.BACKBONE != "tiny" and tuple(self.TINY_WIDTHS) != TINY_DEFAULT_WIDTHS:
            raise ConfigError(f"TINY_WIDTHS is for BACKBONE=tiny (BACKBONE={self.BACKBONE} has its own widths)")
        if self.NORM == "group" and any(w % 16 for w in self.TINY_WIDTHS):
            raise ConfigError(f"NORM=group needs TINY_WIDTHS in multiples of 16 (groups of 16 channels), got "
                              f"{list(self.TINY_WIDTHS)}")
        if self.DILATED and (self.BACKBONE != "tiny" or self.FEAT_STRIDE >= 16):
            raise ConfigError(f"DILATED=true is for BACKBONE=tiny at FEAT_STRIDE 8 or 4 (got {self.BACKBONE}, "
                              f"{self.FEAT_STRIDE}): only its stages past the stride can dilate")
        if not 0 <= self.TAIL_DROPOUT < 1:
            raise ConfigError(f"TAIL_DROPOUT={self.TAIL_DROPOUT} must be in [0, 1) (the fraction of a layer's outputs "
                              "dropped)")
        if self.TAIL_DROPOUT and self.BACKBONE != "tiny" and self.NECK != "fpn":
            raise ConfigError(f"TAIL_DROPOUT is for the fully connected box heads (BACKBONE=tiny, or NECK=fpn); "
                              f"BACKBONE={self.BACKBONE} with NECK=none has "
                              + ("its own (0.5)" if self.BACKBONE == "vgg16" else "a convolutional one"))
        if self.RPN_DILATION < 1:
            raise ConfigError(f"RPN_DILATION={self.RPN_DILATION} must be 1 or more (1: the plain 3x3 conv)")
        if isinstance(self.ANCHOR_SCALES, str) and self.ANCHOR_SCALES != AUTO:
            raise ConfigError(f"ANCHOR_SCALES={self.ANCHOR_SCALES!r} is neither a list of numbers nor auto")
        if not isinstance(self.ANCHOR_SCALES, str) and (not self.ANCHOR_SCALES or min(self.ANCHOR_SCALES) <= 0):
            raise ConfigError(f"ANCHOR_SCALES={list(self.ANCHOR_SCALES)} needs positive numbers (or auto)")
        if len(self.TRAIN.COLOR_JITTER) != 4 or min(self.TRAIN.COLOR_JITTER) < 0 or self.TRAIN.COLOR_JITTER[3] > 0.5:
            raise ConfigError(f"TRAIN.COLOR_JITTER={list(self.TRAIN.COLOR_JITTER)} needs 4 amounts >= 0 (brightness, "
                              "contrast, saturation, hue; hue at most 0.5)")
        if not 0 <= self.TRAIN.EMA_DECAY < 1:
            raise ConfigError(f"TRAIN.EMA_DECAY={self.TRAIN.EMA_DECAY} must lie in [0, 1) (0 = off)")
        if self.TRAIN.PRECISE_BN_IMAGES < 0:
            raise ConfigError(f"TRAIN.PRECISE_BN_IMAGES={self.TRAIN.PRECISE_BN_IMAGES} must be at least 0 (0 = off)")
        if self.TRAIN.SCALE_UP_LIMIT < 0:
            raise ConfigError(f"TRAIN.SCALE_UP_LIMIT={self.TRAIN.SCALE_UP_LIMIT} must be at least 0 (0 = off)")
        if not 0 <= self.TRAIN.MOSAIC <= 1:
            raise ConfigError(f"TRAIN.MOSAIC={self.TRAIN.MOSAIC} must lie in [0, 1] (0 = off)")
        if not 0 <= self.TRAIN.RANDOM_CROP < 1:
            raise ConfigError(f"TRAIN.RANDOM_CROP={self.TRAIN.RANDOM_CROP} must lie in [0, 1) (0 = off)")
        if self.TRAIN.MAX_EPOCHS < 0 or any(e <= 0 for e in self.TRAIN.STEP_EPOCHS):
            raise ConfigError("TRAIN.MAX_EPOCHS and TRAIN.STEP_EPOCHS must be positive (MAX_EPOCHS 0 = use MAX_ITERS)")
        if self.TRAIN.STEP_EPOCHS and not self.TRAIN.MAX_EPOCHS:
            raise ConfigError("TRAIN.STEP_EPOCHS needs TRAIN.MAX_EPOCHS (the schedule is in iterations otherwise)")
        _check_choice("DIST_BACKEND", self.DIST_BACKEND, ("auto", "nccl", "gloo"))
        _check_choice("MEMORY_FORMAT", self.MEMORY_FORMAT, ("auto", "channels_last", "contiguous"))
        for key in ("IMS_PER_BATCH", "BATCH_SIZE", "RPN_BATCHSIZE", "MAX_ITERS", "DISPLAY", "SNAPSHOT_ITERS"):
            if getattr(self.TRAIN, key) < 1:
                raise ConfigError(f"TRAIN.{key}={getattr(self.TRAIN, key)} must be at least 1")
        _check_choice("TEST.AMP", self.TEST.AMP, AMP_MODES)
        _check_choice("TEST.NMS_METHOD", self.TEST.NMS_METHOD, ("hard", "soft"))
        if not self.TEST.SOFT_NMS_SIGMA > 0:
            raise ConfigError(f"TEST.SOFT_NMS_SIGMA={self.TEST.SOFT_NMS_SIGMA} must be positive")
        for key, value in (("TRAIN.RPN_NMS_THRESH", self.TRAIN.RPN_NMS_THRESH), ("TEST.NMS", self.TEST.NMS),
                           ("TEST.RPN_NMS_THRESH", self.TEST.RPN_NMS_THRESH)):
            if not 0 <= value <= 1:
                raise ConfigError(f"{key}={value} is an IoU threshold: it must lie in [0, 1]")
        for key in ("RPN_SIGMA", "RCNN_SIGMA"):
            if getattr(self.TRAIN, key) <= 0:
                raise ConfigError(f"TRAIN.{key}={getattr(self.TRAIN, key)} must be positive")
        if self.TEST.PROPOSALS_PER_OBJECT < 0:
            raise ConfigError(f"TEST.PROPOSALS_PER_OBJECT={self.TEST.PROPOSALS_PER_OBJECT} must be at least 0 "
                              "(0 = off)")
        if self.TEST.MAX_PER_IMAGE < 1:
            raise ConfigError(f"TEST.MAX_PER_IMAGE={self.TEST.MAX_PER_IMAGE} must be at least 1")
        if len(self.PIXEL_MEANS) != 3 or len(self.PIXEL_STDS) != 3:
            raise ConfigError("PIXEL_MEANS and PIXEL_STDS need 3 values (R, G, B)")
        if not 0 < self.TRAIN.FG_FRACTION <= 1 or not 0 < self.TRAIN.RPN_FG_FRACTION <= 1:
            raise ConfigError("TRAIN.FG_FRACTION and TRAIN.RPN_FG_FRACTION must lie in (0, 1]")
        _check_choice("NECK", self.NECK, ("none", "fpn"))
        if self.NECK == "fpn":
            if self.BACKBONE == "vgg16":
                raise ConfigError("NECK=fpn needs a backbone with pyramid stages (res50, res101 or tiny); "
                                  "BACKBONE=vgg16 has none here")
            if self.ANCHOR_SCALES == AUTO:
                raise ConfigError("ANCHOR_SCALES=auto is for NECK=none; with NECK=fpn each level's anchors are "
                                  "ANCHOR_SCALES x its stride (the FPN paper: [8], 32..512 px on P2..P6)")
            if self.FPN_CHANNELS < 1:
                raise ConfigError(f"FPN_CHANNELS={self.FPN_CHANNELS} must be at least 1")
            strides = (8, 16) if self.BACKBONE == "tiny" else (32,)
        else:
            strides = (4, 8, 16) if self.BACKBONE == "tiny" else (16,)
        if self.FEAT_STRIDE not in strides:
            what = f"BACKBONE={self.BACKBONE}"
            if self.NECK == "fpn":
                what += " with NECK=fpn (its last pyramid stage" + (", C5)" if self.BACKBONE != "tiny" else ")")
            raise ConfigError(f"FEAT_STRIDE={self.FEAT_STRIDE} is not one of {', '.join(map(str, strides))} for {what}")
        if not 0 <= self.RESNET.FIXED_BLOCKS <= 3:
            raise ConfigError(f"RESNET.FIXED_BLOCKS={self.RESNET.FIXED_BLOCKS} must lie in 0..3")


AMP_MODES = ("none", "fp16", "bf16")
AUTO = "auto"


def pyramid_strides(cfg: Config) -> tuple[int, ...]:
    """The strides of the maps the RPN reads: ``(FEAT_STRIDE,)`` for C4; with ``NECK=fpn`` the backbone's stages
    from stride 4 to ``FEAT_STRIDE`` (P2..P5 on ResNet) and one more level at twice that (P6, the RPN's only)."""
    if cfg.NECK != "fpn":
        return (cfg.FEAT_STRIDE,)
    return tuple(1 << k for k in range(2, cfg.FEAT_STRIDE.bit_length() + 1))


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")


# --------------------------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    # The write-up's network: ResNet-50 C4, crop pooling, PASCAL VOC schedule (reference res101.yml).
    "voc-r50-c4": {
        "BACKBONE": "res50",
        "TRAIN": {"BATCH_SIZE": 256, "BG_THRESH_LO": 0.0, "DOUBLE_BIAS": False, "STEPSIZE": [30000],
                  "MAX_ITERS": 70000},
    },
    # ResNet-50 + FPN as torchvision's fasterrcnn_resnet50_fpn (FasterRCNN's defaults) and detectron2's
    # faster_rcnn_R_50_FPN: PRETRAINED takes an ImageNet ResNet-50 or that model's whole state dict.
    "voc-r50-fpn": {
        "BACKBONE": "res50",
        "NECK": "fpn",
        "FEAT_STRIDE": 32,  # C5; the pyramid is P2..P5 (+ P6 for the RPN)
        "ANCHOR_SCALES": [8],  # x each level's stride: 32..512 px, torchvision's ((32,), .., (512,)) sizes
        "RPN_CHANNELS": 256,  # torchvision's RPNHead(256, 3): its 3x3 conv keeps the FPN's 256 channels
        "POOLING_MODE": "align",  # MultiScaleRoIAlign / ROIAlign
        # torchvision's GeneralizedRCNNTransform normalisation (ImageNet mean/std x 255): its weights expect it
        "PIXEL_MEANS": [123.675, 116.28, 103.53],
        "PIXEL_STDS": [58.395, 57.12, 57.375],
        "TRAIN": {
            "SCALES": [800], "MAX_SIZE": 1333,  # min_size 800, max_size 1333 (both libraries)
            "RPN_PRE_NMS_TOP_N": 2000,  # per level: rpn_pre_nms_top_n_train
            "RPN_POST_NMS_TOP_N": 2000,  # per image: rpn_post_nms_top_n_train
            "BATCH_SIZE": 512, "FG_FRACTION": 0.25,  # box_batch_size_per_image, box_positive_fraction
            "BG_THRESH_LO": 0.0,  # box_bg_iou_thresh 0.5: every RoI below 0.5 IoU is background
            # detectron2's PascalVOC-Detection/faster_rcnn_R_50_FPN: 18000 iterations of 16 images at lr 0.02,
            # x0.1 at 12000 and 16000, 100 warm-up iterations from 1/1000; per image (IMS_PER_BATCH 1, linear
            # scaling): lr 0.02 / 16, ~9 passes over VOC07+12 trainval with its mirrored copies, steps at 2/3
            # and 8/9 of them; biases as weights (BIAS_LR_FACTOR 1, weight decay 1e-4 on them too)
            "LEARNING_RATE": 0.00125, "MAX_EPOCHS": 9, "STEP_EPOCHS": [6, 8],
            "WARMUP_ITERS": 1600, "WARMUP_FACTOR": 0.001, "DOUBLE_BIAS": False, "BIAS_DECAY": True,
        },
        "TEST": {
            "SCALES": [800], "MAX_SIZE": 1333,
            "RPN_PRE_NMS_TOP_N": 1000, "RPN_POST_NMS_TOP_N": 1000,  # rpn_{pre,post}_nms_top_n_test
            "NMS": 0.5, "SCORE_THRESH": 0.05,  # box_nms_thresh, box_score_thresh
        },
    },
    # VGG16 (conv5_3 head, fc6/fc7 tail) as in the reference vgg16.yml.
    "voc-vgg16": {
        "BACKBONE": "vgg16",
        "TRAIN": {"BATCH_SIZE": 256, "BG_THRESH_LO": 0.0, "STEPSIZE": [50000], "MAX_ITERS": 70000},
    },
    # CPU-sized: a small backbone trained from scratch at stride 8 (its shapes of 32 px would be 2 cells wide
    # at 16, and star/triangle, circle/square get confused), images of 320 px, anchors of 32..128 px half an octave
    # apart: with [2, 4, 8] 55% of the shapes (sizes spread evenly on a log scale) had no anchor at IoU >= 0.7, with
    # these 3%; `frcnn demo` seeds 0, 1, 2 (1 thread, benchmarks/results/scratch_cpu.md) 0.9184, 0.9344, 0.9089
    # against 0.9055, 0.9101, 0.8928 with [2, 4, 8] on the same machine. Foreground RoIs drawn one object at a time
    # (TRAIN.FG_SAMPLING per_object), so the small shapes inside larger ones are learnt from as often as those:
    # 0.9217, 0.9292, 0.9238 (worst seed +1.3 points, mean +0.4); on BCCD it lost (2 seeds, -0.5 and -0.9).
    # 32 RoIs per image and a single conv in the backbone's first stage make room for the iterations: 4800 in bf16
    # autocast (TRAIN.AMP auto: where the CPU computes bf16 natively, a training step in 0.70x float32's time) in
    # about the time 3200 took in float32. Weight decay 5e-4 instead of the default 1e-4 (more regularisation for
    # a network trained from scratch on few images): with [2, 4, 8] on an AMD machine 0.9139, 0.9352, 0.8975
    # against 0.9042, 0.9090, 0.8983 with 1e-4 (0.8946, 0.8895, 0.8922 for 3200 float32 iterations).
    # BatchNorm's statistics re-estimated over 500 training images after the last iteration (TRAIN.PRECISE_BN_IMAGES;
    # with one image a batch, momentum 0.1 leaves them an average of the last ten or so): on 13 demo checkpoints
    # (seeds 0-7, 1 and 2 threads, Intel machine with AMX, bf16) +0.38 points on the mean, 11 of 13 up (0.9074,
    # 0.9249, 0.9225 -> 0.9342, 0.9329, 0.9242 for seeds 0-2 at 2 threads; seed 2 at 1 thread 0.9246 -> 0.9045).
    # scratch-cpu's 4 images a batch gain nothing from it on BCCD (4 checkpoints, -0.04), so it does not take it.
    "demo-cpu": {
        "BACKBONE": "tiny",
        "FEAT_STRIDE": 8,
        "RPN_CHANNELS": 128,
        "ANCHOR_SCALES": [2, 2.828, 4, 5.657, 8],
        "POOLING_MODE": "align",
        "PIXEL_STDS": [58.395, 57.12, 57.375],
        "TRAIN": {"SCALES": [320], "MAX_SIZE": 512, "LEARNING_RATE": 0.01, "WEIGHT_DECAY": 0.0005,
                  "WARMUP_ITERS": 100, "STEPSIZE": [3600], "MAX_ITERS": 4800, "SNAPSHOT_ITERS": 500, "AMP": "auto",
                  "BATCH_SIZE": 32, "RPN_BATCHSIZE": 128, "RPN_PRE_NMS_TOP_N": 2000,
                  "RPN_POST_NMS_TOP_N": 300, "DISPLAY": 50, "BG_THRESH_LO": 0.0, "FG_SAMPLING": "per_object",
                  "PRECISE_BN_IMAGES": 500},
        "TEST": {"SCALES": [320], "MAX_SIZE": 512, "RPN_PRE_NMS_TOP_N": 1000, "RPN_POST_NMS_TOP_N": 100},
    },
    # Your own data, from scratch, on a CPU: demo-cpu's network and weight decay with anchors chosen from the training
    # set, 4 images an iteration (BatchNorm trains on the batch's statistics) at LR 0.02, 64 RoIs an image, bf16
    # autocast where the CPU has it (TRAIN.AMP auto: 0.65-0.70x float32's time a step) and a schedule in epochs (17
    # passes over the images and their mirrored copies, x0.1 after 13; BCCD trainval: 2482 iterations of 4 images).
    # Anchors crossing the image border take part in the RPN's loss (TRAIN.RPN_ALLOWED_BORDER -1, as in torchvision and
    # detectron2; the reference's 0 labels only anchors inside): on BCCD test (benchmarks/results/scratch_cpu.md, Intel
    # machine, 2026-12-03) seeds 0-3 0.8975, 0.9030, 0.9024, 0.9025 against 0.8955, 0.8874, 0.8999, 0.8996 (mean of
    # seeds 0-2 0.9010 against 0.8943; seeds 0-4 0.9022, torchvision at the same budget there 0.9006). Earlier on an AMD
    # machine, before fused SGD and training's own RoI pooling: 0.9033 (RBC 0.819), torchvision at the same budget
    # 0.8992; 32 RoIs over 20 epochs (about the same time) gave 0.8975, with weight decay 1e-4 0.8968, 12 epochs of 2
    # images in float32 0.8886, 6 epochs of 1 image 0.8756. Measured and not kept: torchvision's box-loss knee
    # (TRAIN.RCNN_SIGMA 3) 0.8972 over seeds 0-3 against 0.9014 (Intel), an average of the weights (TRAIN.EMA_DECAY
    # 0.998) 0.9034, a cosine LR 0.8958, 20 epochs 0.8928; 14 epochs of 1 image and 128 RoIs, about 3x the time, mean
    # 0.8850 over 2 seeds; random crops with colour jitter lost 1.8 points and GroupNorm 1.4 (one seed each, 1 image a
    # batch). Where boxes are too small for the stride the input grows, at most 2x an iteration's time
    # (TRAIN.SCALE_UP_LIMIT; BCCD tiled 3 x 3: 0.823 at 448 against 0.668 at 320, 0.729 at 640), and busy images get
    # test-time proposals for 4 boxes of a busy training image (TEST.PROPOSALS_PER_OBJECT; the same tiles at 448:
    # 0.823 against 0.629 with 100); on BCCD neither fires. The backbone's last conv dilated (DILATED: the stride-16
    # network's receptive field, 87 px instead of 71, on the stride-8 map, at the same cost a step): BCCD seeds 0-2
    # 0.9027, 0.9038, 0.8967 against 0.8946, 0.8873, 0.8965 (AMD machine without bf16, float32, 2026-12-05); on
    # large objects (the white-cell crops, cells ~200 px) AP .50:.95 0.7663, 0.7865 against 0.7531, 0.7789.
    # The LR on that machine, BCCD seeds 0, 1: 0.03 gave 0.8842, 0.9015 and 0.015 0.8955, 0.8975 against 0.9027, 0.9038.
    "scratch-cpu": {
        "BACKBONE": "tiny",
        "FEAT_STRIDE": 8,
        "DILATED": True,
        "RPN_CHANNELS": 128,
        "ANCHOR_SCALES": "auto",
        "POOLING_MODE": "align",
        "PIXEL_STDS": [58.395, 57.12, 57.375],
        "TRAIN": {"SCALES": [320], "MAX_SIZE": 512, "LEARNING_RATE": 0.02, "WEIGHT_DECAY": 0.0005,
                  "WARMUP_ITERS": 100, "MAX_EPOCHS": 17, "STEP_EPOCHS": [13], "IMS_PER_BATCH": 4,
                  "SNAPSHOT_ITERS": 500, "AMP": "auto", "SCALE_UP_LIMIT": 2.0,
                  "BATCH_SIZE": 64, "RPN_BATCHSIZE": 128, "RPN_PRE_NMS_TOP_N": 2000,
                  "RPN_POST_NMS_TOP_N": 300, "DISPLAY": 50, "BG_THRESH_LO": 0.0, "RPN_ALLOWED_BORDER": -1},
        "TEST": {"SCALES": [320], "MAX_SIZE": 512, "RPN_PRE_NMS_TOP_N": 1000, "RPN_POST_NMS_TOP_N": 100,
                 "PROPOSALS_PER_OBJECT": 4.0},
    },
}

# scratch-cpu with a Feature Pyramid Network on the tiny backbone: P2..P4 (strides 4, 8, 16) from its stages
# and P5 for the RPN, 64 channels (the RPN's too), one anchor size a level (8 x stride: 32..256 px at 320-px
# images) x 3 ratios, so no anchor choice to make; scratch-cpu's schedule, RoIs and precision. 1.13x scratch-cpu's
# time a training step at one image (128 channels: 2.2x; benchmarks/bench_fpn_step.py), about 1.24x at four. At
# scratch-cpu's first schedule (6 epochs of 1 image, 32 RoIs, LR 0.01, weight decay 1e-4, float32, anchors inside
# the image only), 3 seeds (benchmarks/results/fpn_cpu.md): BCCD VOC07 mAP 0.8841 against 0.8756 for C4 (platelets
# 0.897 against 0.869); on the demo's shapes it loses (0.75-0.87 against 0.89). At today's schedule (AMD machine
# without bf16, float32, seed 0; benchmarks/results/scratch_cpu.md): 0.8940 against 0.8726 with that first
# schedule, and against 0.9027 for scratch-cpu's dilated C4 network, which now finds the platelets as well.
PRESETS["scratch-cpu-fpn"] = {
    **PRESETS["scratch-cpu"], "NECK": "fpn", "FEAT_STRIDE": 16, "DILATED": False, "ANCHOR_SCALES": [8],
    "FPN_CHANNELS": 64, "RPN_CHANNELS": 64,
}


# ------------------------------------------------------------------------------------- build and dump

def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) of a config, for YAML/JSON."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out[f.name] = config_to_dict(value)
        elif isinstance(value, tuple):  # ("auto" stays a string)
            out[f.name] = list(value)
        else:
            out[f.name] = value
    return out


# What PyYAML's safe loader raises on hostile text besides YAMLError: ValueError (``2020-13-45``, ``!!int x``),
# KeyError (``!!bool x``), IndexError (``!!int`` with no value), AttributeError (``!!timestamp x``), and
# RecursionError (``[[[[...`` a thousand deep).
_YAML_FAILURES = (yaml.YAMLError, ValueError, LookupError, AttributeError, RecursionError)


# Values in messages are shown cut short: YAML aliases nested in aliases (``&a [x, x]``, ``&b [*a, *a]``, ...) make a
# list of 2**N items from a few hundred bytes, whose full repr would never end.
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict, _BRIEF.maxstring, _BRIEF.maxother = 3, 6, 6, 80, 80


def _brief(value: Any) -> str:
    return _BRIEF.repr(value)


def _yaml_problem(e: BaseException) -> str:
    """The first line of a YAML loading error, or its type when it has no text."""
    return (str(e).splitlines() or [type(e).__name__])[0]


def _parse_number(key: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{key} expects a number, got {text!r}") from None


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type ``hint``; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is types.UnionType:  # a list or the word auto (ANCHOR_SCALES)
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        if isinstance(value, str):
            raise ConfigError(f"{key} expects a list of numbers or auto, got {_brief(value)}")
        return _coerce(key, value, typing.get_args(hint)[0])
    if origin is tuple:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} expects a list, got {_brief(value)}")
        (elem, _) = typing.get_args(hint)
        return tuple(_coerce(key, v, elem) for v in value)
    if hint in (int, float) and isinstance(value, str):
        value = _parse_number(key, value)  # YAML 1.1 reads "1e-3" as a string
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} expects a number, got {_brief(value)}")
        try:
            value = float(value)
        except OverflowError:  # an int of hundreds of digits
            raise ConfigError(f"{key} expects a finite number, got an integer too large for a float") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key} expects a finite number, got {_brief(value)}")
        return value
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} expects an integer, got {_brief(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} expects true or false, got {_brief(value)}")
        return value
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{key} expects a string, got {_brief(value)}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover - a bug in this file


def merge(cfg: Any, updates: dict[str, Any], prefix: str = "") -> Any:
    """A copy of ``cfg`` with the nested ``updates`` applied; unknown keys and wrong types raise."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} expects a mapping, got {_brief(updates)}")
    hints = typing.get_type_hints(type(cfg))
    known = {f.name for f in fields(cfg)}
    changes: dict[str, Any] = {}
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in known:
            shown = full if full.isprintable() else repr(full)  # a key with a line break stays one line
            close = difflib.get_close_matches(key, sorted(known), n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(sorted(known))}"
            raise ConfigError(f"unknown config key {shown} ({hint})")
        current = getattr(cfg, key)
        if is_dataclass(current):
            changes[key] = merge(current, value, prefix=f"{full}.")
        else:
            changes[key] = _coerce(full, value, hints[key])
    try:
        return replace(cfg, **changes)
    except TypeError as e:  # pragma: no cover
        raise ConfigError(str(e)) from None


def parse_override(text: str) -> dict[str, Any]:
    """``"TRAIN.RPN_BATCHSIZE=128"`` -> ``{"TRAIN": {"RPN_BATCHSIZE": 128}}`` (value read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except _YAML_FAILURES:  # not YAML: the text itself
        value = raw
    parts = key.strip().split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        nested = {p: nested}
    return nested


DEFAULT_TRAINING_PRESET = "scratch-cpu"


def default_training_preset(overrides: typing.Iterable[str] = ()) -> str | None:
    """The preset ``frcnn train`` and ``frcnn check-data`` take without ``--config``: ``scratch-cpu``, a network that
    trains from scratch on a CPU in minutes, unless an override sets ``PRETRAINED`` (a backbone's weights): then
    None, the reference's defaults (the write-up's ResNet-50 C4, made to start from ImageNet weights)."""
    for text in overrides:
        if "=" in text and text.split("=", 1)[0].strip() == "PRETRAINED" and parse_override(text)["PRETRAINED"]:
            return None
    return DEFAULT_TRAINING_PRESET


def load_config(preset_or_yaml: str | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults, then a preset name or a YAML file, then ``KEY=VALUE`` overrides, in that order.

    A YAML file may start from a preset with a top-level ``PRESET: name`` key.
    """
    cfg = Config()
    if preset_or_yaml:
        if preset_or_yaml in PRESETS:
            cfg = merge(cfg, PRESETS[preset_or_yaml])
        else:
            path = Path(preset_or_yaml)
            try:
                text = path.read_text(encoding="utf-8") if path.is_file() else None
            except UnicodeDecodeError as e:
                raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except (OSError, ValueError):  # a name the OS cannot look up (too long), an unreadable file
                text = None
            if text is None:
                raise ConfigError(
                    f"--config {preset_or_yaml!r}: neither a preset ({', '.join(PRESETS)}) nor a readable YAML file"
                )
            try:
                data = yaml.safe_load(text) or {}
            except _YAML_FAILURES as e:
                raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)})") from None
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping of config keys")
            preset = data.pop("PRESET", None)
            if preset is not None:
                if not isinstance(preset, str) or preset not in PRESETS:
                    raise ConfigError(f"{path}: unknown PRESET {_brief(preset)} (known: {', '.join(PRESETS)})")
                cfg = merge(cfg, PRESETS[preset])
            try:
                cfg = merge(cfg, data)
            except ConfigError as e:  # name the file
                raise ConfigError(f"{path}: {e}") from None
    # the overrides are checked together, as one change: NECK=fpn FEAT_STRIDE=32 is valid in either order
    combined: dict[str, Any] = {}
    for text in overrides:
        deep_update(combined, parse_override(text))
    return merge(cfg, combined) if combined else cfg


def deep_update(into: dict[str, Any], update: dict[str, Any]) -> None:
    """Merge the nested overrides ``update`` into ``into`` (in place; later values win)."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            deep_update(into[key], value)
        else:
            into[key] = value


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with :func:`config_to_dict` (checkpoints store the full resolved config)."""
    return merge(Config(), data)


def config_changes(old: Config, new: Config) -> list[str]:
    """``KEY: old -> new`` for every key whose value differs (nested keys dotted), in field order."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    a, b = flat(config_to_dict(old)), flat(config_to_dict(new))
    return [f"{k}: {a[k]} -> {b[k]}" for k in a if a[k] != b[k]]


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def choose_device(device=None, what: str = "device"):
    """A torch device from a name: ``None`` or ``"auto"`` is CUDA when this machine has it, else the CPU; ``"cpu"``,
    ``"cuda"``, ``"cuda:N"`` (or a :class:`torch.device`) as given. A device this machine lacks is a one-line
    :class:`ConfigError`; ``what`` names the setting in that line (``"DEVICE"``, ``"--device"``)."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise ConfigError(f"{what} {device}: not a device frcnn runs on; use auto, cpu, cuda or cuda:N")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {device} but this machine has no CUDA device")
        count = torch.cuda.device_count()
        if (chosen.index or 0) >= count:
            raise ConfigError(f"{what} {device} but this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
    return chosen


def resolve_device(cfg: Config):
    """The torch device named by ``DEVICE`` (training's; see :func:`choose_device`)."""
    return choose_device(cfg.DEVICE, "DEVICE")


__all__ = [
    "Config", "TrainConfig", "TestConfig", "ResnetConfig", "PRESETS", "load_config", "merge",
    "parse_override", "config_to_dict", "config_from_dict", "config_changes", "dump_yaml", "choose_device",
    "resolve_device", "pyramid_strides", "deep_update",
]
