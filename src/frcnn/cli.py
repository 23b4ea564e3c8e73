"""The ``frcnn`` command. Each sub-command is a thin layer over the library; every mistake in the
user's input ends as one line on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from frcnn import __version__
from frcnn.config import DEFAULT_TRAINING_PRESET, PRESETS
from frcnn.errors import FrcnnError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
DEFAULT_CONFIG_HELP = (f" (default: {DEFAULT_TRAINING_PRESET}, training from scratch; with --set PRETRAINED=FILE "
                       "the reference's defaults, the write-up's ResNet-50 C4)")


def _add_config_args(p: argparse.ArgumentParser, default: str = "") -> None:
    p.add_argument("--config", metavar="PRESET_OR_YAML",
                   help=f"a preset ({', '.join(PRESETS)}) or a YAML file of config keys{default}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set TRAIN.RPN_BATCHSIZE=128 (repeatable)")


def _add_data_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data", required=True, type=Path, metavar="PATH",
                   help="a PASCAL VOC root (Annotations/, JPEGImages/, ImageSets/Main/) or a COCO annotation JSON")
    p.add_argument("--split", help=f"VOC: the image set to {what} (ImageSets/Main/<split>.txt), required; "
                                   "COCO: optional, names another JSON next to --data")
    p.add_argument("--images", type=Path, metavar="DIR",
                   help="COCO: folder the file_names are relative to (default: the JSON's folder)")
    p.add_argument("--classes", metavar="A,B,C_OR_FILE",
                   help="class list (comma-separated or a file, one a line): fixes the label order and drops "
                        "boxes of other classes")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where to run the model (default auto: CUDA when this machine has it, else the CPU); "
                        "the checkpoint's DEVICE, where it was trained, is not used")


def _add_fast_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-fast", dest="fast", action="store_false",
                   help="run the model as trained, without the fast inference path (BatchNorm folded into the "
                        "convolutions, channels-last where faster; same detections up to float rounding)")
    p.add_argument("--quick", action="store_true",
                   help="quick mode, on top of the checkpoint's config (the folder is not written): on a CPU "
                        "TEST.AMP=bf16 where it has native bf16 (AVX-512 with avx512_bf16 or amx_bf16; else "
                        "float32), the tail's Linear layers in dynamic int8 and, on CPUs with VNNI, the backbone "
                        "head and RPN conv in static int8 (calibrated on the first 4 images, which run in float); "
                        "the RoI count "
                        "(TEST.RPN_POST_NMS_TOP_N) stays the checkpoint's; on CUDA it changes nothing. "
                        "2.02x faster, -0.02 mAP points on BCCD test (demo-cpu), benchmarks/results/fast_mode.md. "
                        "Works with or without --no-fast")


def _add_engine_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--engine", choices=("torch", "onnxruntime"), default="torch",
                   help=f"torch (default): the checkpoint folder in PyTorch; onnxruntime: a model written by frcnn "
                        f"export, {what} (needs the onnx extra: pip install 'frcnn[onnx]'; CPU only)")


def _add_test_set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="test_sets", action="append", default=[], metavar="TEST.KEY=VALUE",
                   help="a test-time setting for this run, on top of the checkpoint's config (repeatable; only "
                        "TEST.* keys, e.g. TEST.NMS=0.5, TEST.RPN_POST_NMS_TOP_N=300; the folder is not written)")


def _test_overrides(args: argparse.Namespace) -> dict | None:
    """``--set`` of eval/detect as a config overrides dict; anything but ``TEST.*`` is one line."""
    from frcnn.config import deep_update, parse_override
    from frcnn.errors import ConfigError

    combined: dict = {}
    for text in args.test_sets:
        change = parse_override(text)
        if set(change) != {"TEST"} or not isinstance(change["TEST"], dict):
            raise ConfigError(f"--set {text.split('=', 1)[0]}: {args.command} changes only TEST.* keys (test-time "
                              "settings); the network and its training settings are the checkpoint's")
        deep_update(combined, change)
    return combined or None


def _predictor(args: argparse.Namespace, device, images: int | None = None):
    """The engine ``--engine`` names, on ``--checkpoint``: a Predictor or an OnnxPredictor (same interface);
    ``images``: how many it will detect, if known (quick mode's int8 head needs enough to pay back)."""
    overrides = _test_overrides(args)
    if args.engine == "onnxruntime":
        from frcnn.engine.onnx_engine import OnnxPredictor
        from frcnn.errors import ConfigError

        if args.quick:
            raise _quick_onnx_error()
        if overrides:
            raise ConfigError("--set: an exported model has its TEST settings in its graph; use --engine torch "
                              "(or export again from a checkpoint with them)")
        return OnnxPredictor.open(args.checkpoint, args.device)
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    if args.quick:
        from frcnn.engine.fast_mode import quick_predictor

        return quick_predictor(args.checkpoint, device, fast=args.fast, say=say, overrides=overrides, images=images)
    from frcnn.engine.inference import Predictor

    return Predictor.from_checkpoint(args.checkpoint, device, fast=args.fast, overrides=overrides, say=say)


def _quick_onnx_error() -> FrcnnError:
    from frcnn.errors import ConfigError

    return ConfigError("--quick changes a PyTorch model (bf16, int8 tail); an exported model has its precision in "
                       "its graph: use --engine torch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frcnn", description="Faster R-CNN: train, evaluate, detect, explain.")
    parser.add_argument("--version", action="version", version=f"frcnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="generate a synthetic data set, train on it, evaluate and draw (CPU, minutes)",
                       description="Generate a synthetic shapes data set (VOC layout), train the demo-cpu preset on "
                                   "it, evaluate on its test split and draw detections, all into --out.")
    p.add_argument("--out", required=True, type=Path, help="folder to create (must be new or empty)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of training (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train a detector on a VOC folder or a COCO JSON",
                       description="Train Faster R-CNN (approximate joint training) on a PASCAL VOC folder or a COCO "
                                   "annotation JSON. Before the first iteration, TRAIN.MAX_EPOCHS > 0 sets "
                                   "TRAIN.MAX_ITERS and STEPSIZE from the training set's size, and ANCHOR_SCALES=auto "
                                   "chooses the anchors from its boxes (as check-data suggests); each says so in one "
                                   "line and the run's config.yaml keeps the resolved values.")
    _add_data_args(p, "train on, e.g. trainval")
    p.add_argument("--val-split", metavar="NAME",
                   help="held-out data evaluated during training: a VOC image set, or for COCO another JSON "
                        "(NAME.json next to --data, or a path); logs mAP and validation losses to metrics.jsonl")
    p.add_argument("--eval-every", type=int, metavar="N",
                   help="with --val-split: evaluate every N iterations and after the last "
                        "(default: every TRAIN.SNAPSHOT_ITERS)")
    p.add_argument("--out", required=True, type=Path, help="run folder (new or empty; with --resume, the run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last snapshot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_args(p, DEFAULT_CONFIG_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check-data", help="find problems in a data set before training; anchor fit",
                       description="Check a VOC root (every split, or --split) or a COCO JSON: counts, every "
                                   "problem with its file and value (repairable or not), and how well the "
                                   "config's anchors fit the boxes (with NECK=fpn every pyramid level's; with "
                                   "NECK=none also the ANCHOR_SCALES that auto would choose, as frcnn train "
                                   "does). Exit code 0: nothing that training cannot repair; 1: a problem "
                                   "training would stop on; 2: the data cannot be read.")
    p.add_argument("--data", required=True, type=Path, help="VOC root or COCO annotation JSON")
    p.add_argument("--split", help="one image set (VOC) or another JSON next to --data (COCO); default: all")
    p.add_argument("--classes", help="expected class names, comma-separated (others are unknown classes)")
    p.add_argument("--images", type=Path, help="COCO images folder (default: the JSON's folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write histograms of box sizes and aspect ratios")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_args(p, DEFAULT_CONFIG_HELP)
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("eval", help="evaluate a checkpoint or detections on VOC or COCO data (per-class AP, mAP)",
                       description="Evaluate a checkpoint (or detections made elsewhere) with the reference VOC AP "
                                   "(IoU > 0.5, +1 pixel convention) and, on COCO data, pycocotools' COCOeval.")
    p.add_argument("--checkpoint", type=Path,
                   help="checkpoint folder (a training run's --out); with --engine onnxruntime a .onnx file or a "
                        "folder holding model.onnx")
    _add_data_args(p, "evaluate, e.g. test")
    p.add_argument("--detections", type=Path, metavar="FILE",
                   help="evaluate these detections instead of running a checkpoint: a COCO results JSON, or the "
                        "reference VOC results files comp4_det_<split>_<class>.txt (their folder or one of them)")
    p.add_argument("--metric", choices=("voc07", "voc2010", "coco", "all"), default=None,
                   help="voc07: 11-point AP; voc2010: area under the PR curve; coco: pycocotools AP@[.50:.95] "
                        "(COCO data); all: every metric (default: coco on COCO data, else voc07)")
    p.add_argument("--json", action="store_true", help="print one JSON object (every metric) instead of a table")
    p.add_argument("--write-detections", type=Path, metavar="DIR",
                   help="also write the detections as detections.json (COCO results) and comp4 files into DIR")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help="also write metrics.json, precision-recall curves (pr_curves.png, their numbers in "
                        "pr_curves.json) and a confusion summary with the objects missed (confusion.json/.txt) "
                        "into DIR")
    p.add_argument("--iou", type=float, metavar="T",
                   help="with --plots: the IoU a detection must exceed to count in the precision-recall curves "
                        "(default 0.5; VOC and COCO data alike); the AP metrics keep their own IoU")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_device_arg(p)
    _add_fast_arg(p)
    _add_test_set_arg(p)
    _add_engine_arg(p, "--checkpoint names the .onnx file or a folder holding model.onnx")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("detect", help="detect objects in images; write a drawn PNG and a JSON per image",
                       description="Run a checkpoint on images (files or folders of images).")
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="checkpoint folder; with --engine onnxruntime a .onnx file or a folder holding model.onnx")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    p.add_argument("--out", required=True, type=Path, help="folder for the results (existing files are kept)")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score to report (default 0.5)")
    _add_device_arg(p)
    _add_fast_arg(p)
    _add_test_set_arg(p)
    _add_engine_arg(p, "--checkpoint names the .onnx file or a folder holding model.onnx")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("explain", help="one image through every stage of the detector, as an HTML page of pictures",
                       description="Run a checkpoint on one image with a trace and write DIR/index.html (opens from "
                                   "disk, no network) with one PNG per stage: pre-processing, anchors, RPN, proposal "
                                   "layer, target layers (with ground truth), RoI pooling, classification, per-class "
                                   "NMS, final detections, time per stage.")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder")
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("--gt", type=Path, metavar="ANNOTATION",
                   help="VOC XML of the image (default: its annotation when IMAGE is in a VOC folder's JPEGImages/)")
    p.add_argument("--out", required=True, type=Path, help="folder for the page (must be new or empty)")
    p.add_argument("--json", action="store_true", help="also write the numbers of every stage to DIR/explain.json")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score of the detections shown (default 0.5)")
    _add_device_arg(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("benchmark", help="time one image stage by stage on this machine; FLOPs and a floor",
                       description="Time one image (random pixels) through the detector, stage by stage (median of "
                                   "--runs after --warmup), with the machine, the model's FLOPs and a floor: its "
                                   "convolutions and linear layers alone in their fastest fp32 layout. Without a "
                                   "checkpoint the weights are random and the RPN is set to propose "
                                   "TEST.RPN_POST_NMS_TOP_N RoIs.")
    p.add_argument("--config", required=True, metavar="PRESET_OR_YAML_OR_CHECKPOINT",
                   help="a preset or YAML (random weights) or a checkpoint folder (its weights)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--size", metavar="HxW", help="network input size (default: TEST.SCALES[0] x the long side "
                                                  "at 5:3, at most TEST.MAX_SIZE)")
    p.add_argument("--rois", type=int, metavar="N", help="RoIs at the tail (TEST.RPN_POST_NMS_TOP_N)")
    p.add_argument("--runs", type=int, default=5, help="timed runs (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    _add_fast_arg(p)
    _add_engine_arg(p, "--config names the .onnx file (or a folder holding model.onnx), or a preset, YAML or "
                       "checkpoint that is exported first (time per stage: pre-processing and the whole graph)")
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("export", help="write the detector as an ONNX file for onnxruntime (--engine onnxruntime)",
                       description="Export a checkpoint's whole detector to ONNX (opset 20, dynamo exporter): head, "
                                   "anchors, RPN, proposal layer, RoI pooling, classification and per-class NMS, "
                                   "for one pre-processed image of any size; class names and config go into its "
                                   "metadata. Needs the onnx extra: pip install 'frcnn[onnx]'. C4 and NECK=fpn "
                                   "models alike (the pyramid level by level).")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (a training run's --out)")
    p.add_argument("--out", required=True, type=Path, metavar="MODEL.onnx",
                   help="the file to write (refused if it exists)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="an HTML page of a training run: losses, learning rate, AP, detections",
                       description="Write RUN_DIR/report/index.html (or --out): loss curves and learning rate from "
                                   "metrics.jsonl and, with --data, mAP per kept snapshot, per-class AP and "
                                   "precision-recall curves of the latest one, and a few test images with detections. "
                                   "Works on a run that is still going; re-running replaces the report it wrote.")
    p.add_argument("run", type=Path, metavar="RUN_DIR",
                   help="a training run's --out folder, or a folder holding one (frcnn demo's --out)")
    p.add_argument("--data", type=Path, help="VOC root or COCO annotation JSON to evaluate on (optional; read as "
                                             "training reads it, repairs included)")
    p.add_argument("--split", help="VOC: image set of --data to evaluate (default test); COCO: optional, names "
                                   "another JSON next to --data")
    p.add_argument("--out", type=Path, help="folder for the page (default RUN_DIR/report)")
    p.add_argument("--images", type=int, default=4, help="test images drawn with detections (default 4)")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score of the detections drawn")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_device_arg(p)
    p.set_defaults(func=cmd_report)
    return parser


# ---------------------------------------------------------------------------------------------- commands

def cmd_train(args: argparse.Namespace) -> int:
    from frcnn.data import parse_classes
    from frcnn.data.check import training_set
    from frcnn.engine.train import train
    from frcnn.errors import ConfigError

    if args.resume and args.config is None and (args.out / "config.yaml").is_file():
        from frcnn.config import merge, parse_override
        from frcnn.engine.checkpoint import read_config

        cfg = read_config(args.out / "config.yaml")  # the run's own: damage is one line naming it
        for text in args.overrides:
            cfg = merge(cfg, parse_override(text))
    else:
        cfg = _training_config(args)
    if args.eval_every is not None and (args.val_split is None or args.eval_every < 1):
        raise ConfigError("--eval-every N needs --val-split and N >= 1")
    classes = parse_classes(args.classes) if args.classes else None
    dataset, repaired = training_set(args.data, args.split, classes, args.images, progress=not args.no_progress)
    if repaired:
        print(repaired)
    val = _open_data(args, args.val_split, dataset.classes) if args.val_split else None
    where = f"{args.data} ({args.split})" if args.split else str(args.data)
    print(f"training on {len(dataset)} images of {where}, classes: {', '.join(dataset.classes)}")
    if val is not None:
        print(f"validating on {len(val)} images ({args.val_split}) every {args.eval_every or cfg.TRAIN.SNAPSHOT_ITERS} "
              "iterations")
    train(cfg, dataset, args.out, resume=args.resume, progress=not args.no_progress, val_dataset=val,
          eval_every=args.eval_every or cfg.TRAIN.SNAPSHOT_ITERS)
    print(f"checkpoint: {args.out}")
    return 0


def _training_config(args: argparse.Namespace, say: bool = True):
    """``--config`` and ``--set`` of train and check-data; without ``--config``, the default preset for training
    (:func:`frcnn.config.default_training_preset`), said in one line."""
    from frcnn.config import default_training_preset, load_config

    preset = args.config
    if preset is None:
        preset = default_training_preset(args.overrides)
        if preset and say:
            print(f"config: {preset} (no --config; for the write-up's ResNet-50 from ImageNet weights: "
                  "--config voc-r50-c4 --set PRETRAINED=FILE)")
    return load_config(preset, args.overrides)


def cmd_check_data(args: argparse.Namespace) -> int:
    from frcnn.config import AUTO
    from frcnn.data import parse_classes
    from frcnn.data.anchor_fit import anchor_fit, format_fit, suggest_scales, write_histograms
    from frcnn.data.check import check_data, fit_samples, format_counts, format_problems
    from frcnn.data.dense import room_for_objects, room_line
    from frcnn.data.small_boxes import scale_up, scale_up_line, small_boxes, small_boxes_hint

    cfg = _training_config(args, say=not args.json)
    classes = parse_classes(args.classes) if args.classes else None
    report = check_data(args.data, args.split, classes, args.images, progress=not (args.no_progress or args.json))
    samples = fit_samples(report)
    cfg, grown = scale_up(cfg, samples, report.classes)  # the input frcnn train will take (TRAIN.SCALE_UP_LIMIT)
    cfg, room = room_for_objects(cfg, samples)  # and its test-time counts (TEST.PROPOSALS_PER_OBJECT)
    # fits[0] is what ANCHOR_SCALES=auto chooses (anchor_fit.auto_anchor_fit, frcnn train's code path); the
    # suggestion is for C4 anchors: with NECK=fpn only the fit of the pyramid's anchors is reported
    fits = suggest_scales(samples, cfg) if cfg.NECK == "none" else []
    auto = cfg.ANCHOR_SCALES == AUTO
    current = fits[0] if auto else anchor_fit(samples, cfg)
    if args.plot:
        write_histograms(current, args.plot)
    if args.json:
        print(json.dumps({**report.to_json(), "anchor_fit": current.to_json(report.classes),
                          "suggested_anchor_scales": list(fits[0].scales) if fits else None,
                          "suggested_fit": fits[0].to_json(report.classes) if fits else None,
                          "small_boxes": small_boxes(current, report.classes), "scale_up": grown,
                          "test_counts": room}))
    else:
        hint = small_boxes_hint(current, report.classes)
        print("\n".join(format_counts(report) + format_problems(report)
                        + ([scale_up_line(cfg, grown)] if grown else []) + ([room_line(room)] if room else [])
                        + format_fit(fits, current, report.classes, auto=auto) + ([hint] if hint else [])))
        if args.plot:
            print(f"histograms: {args.plot}")
    return 1 if report.unrepairable else 0


def _open_data(args: argparse.Namespace, split: str | None, classes: Sequence[str] | None = None):
    """``--data`` read as training reads it (:func:`frcnn.data.open_repaired`): what training would stop on is
    one line, the repairs are said in one line (train's --val-split: prefixed by the split; --json: on stderr)."""
    from frcnn.data import open_repaired, parse_classes
    from frcnn.engine.distributed import env_rank

    if classes is None and args.classes:
        classes = parse_classes(args.classes)
    quiet = args.no_progress or getattr(args, "json", False)
    # classes the user chose drop the data's other boxes; classes of a checkpoint or a training set do not:
    # there a box of another class is an error
    dataset = open_repaired(args.data, split, classes=classes, images=args.images,
                            drop_other_classes=bool(args.classes), progress=not quiet and env_rank() == 0)
    if dataset.summary and env_rank() == 0:
        prefix = f"{split}: " if args.command == "train" else ""
        print(prefix + dataset.summary, file=sys.stderr if getattr(args, "json", False) else sys.stdout)
    return dataset


def cmd_eval(args: argparse.Namespace) -> int:
    from frcnn.engine import distributed as dist
    from frcnn.engine import evaluate as ev
    from frcnn.engine.checkpoint import choose_device
    from frcnn.engine.results_io import comp4_name, read_detections, write_coco_results, write_comp4
    from frcnn.errors import ConfigError, DataError

    if (args.checkpoint is None) == (args.detections is None):
        raise ConfigError("give either --checkpoint (run a model) or --detections FILE (evaluate its detections)")
    if args.quick and args.checkpoint is None:
        raise ConfigError("--quick runs a checkpoint faster; --detections are evaluated as they are")
    if args.checkpoint is not None and args.classes:
        raise ConfigError("--classes is for --detections: a checkpoint has its own classes")
    if args.iou is not None and args.plots is None:
        raise ConfigError("--iou sets the IoU of the precision-recall curves of --plots DIR: give --plots too "
                          "(the AP metrics keep their own IoU)")
    iou = ev.check_iou(0.5 if args.iou is None else args.iou)
    world = dist.join(choose_device(args.device, "--device"))  # under torchrun: a share of the images each
    predictor = _predictor(args, world.device) if args.checkpoint is not None else None
    dataset = _open_data(args, args.split, predictor.class_names if predictor else None)
    if args.metric == "coco" and not ev.is_coco(dataset):
        raise DataError(f"--metric coco needs COCO data (an annotation JSON); {args.data} is VOC: use voc07 or voc2010")
    split = args.split or args.data.stem
    planned = []
    if args.write_detections is not None:
        planned += [args.write_detections / "detections.json",
                    *(args.write_detections / comp4_name(split, c) for c in dataset.classes)]
    if args.plots is not None:
        planned += [args.plots / name for name in ev.OUTPUT_FILES]
    existing = [str(p) for p in planned if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise DataError(f"{existing[0]} exists{more}; eval never overwrites: choose another folder")
    if predictor is not None:
        detections = ev.collect_detections(predictor, dataset, progress=not (args.no_progress or args.json),
                                           world=world)
        if detections is None:  # another process than 0: its detections went to process 0
            return 0
    else:
        detections = read_detections(args.detections, dataset)
    result = ev.score_detections(dataset, detections, args.metric)
    written = []
    if args.write_detections is not None:
        args.write_detections.mkdir(parents=True, exist_ok=True)
        written.append(write_coco_results(args.write_detections / "detections.json", dataset, detections))
        written += write_comp4(args.write_detections, split, dataset, detections)
    if args.plots is not None:
        written += ev.write_eval_outputs(args.plots, dataset, detections, result, iou=iou)
    if args.json:
        print(json.dumps(result))
    else:
        print(ev.format_table(result, all_metrics=args.metric == "all"))
    for path in written:
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _image_files(inputs: Sequence[Path]) -> list[Path]:
    from frcnn.errors import DataError

    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{path}: no images in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def cmd_detect(args: argparse.Namespace) -> int:
    from frcnn.engine.checkpoint import choose_device
    from frcnn.engine.detect import detect_files

    device = choose_device(args.device, "--device")
    files = _image_files(args.inputs)
    predictor = _predictor(args, device, images=len(files))
    for written in detect_files(predictor, files, args.out, args.threshold):
        print(written)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from frcnn.engine.checkpoint import choose_device, load_model
    from frcnn.explain import explain_image

    device = choose_device(args.device, "--device")
    if not 0.0 <= args.threshold <= 1.0:
        from frcnn.errors import DataError

        raise DataError(f"--threshold {args.threshold}: must lie in [0, 1]")
    model, ckpt = load_model(args.checkpoint, device)
    index = explain_image(model, ckpt.cfg, ckpt.class_names, args.image, args.out, gt_path=args.gt,
                          threshold=args.threshold, write_json=args.json, checkpoint=str(args.checkpoint))
    print(index)
    if args.json:
        print(index.parent / "explain.json")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    import torch

    from frcnn.config import config_to_dict, load_config, merge, parse_override
    from frcnn.engine.benchmark import format_result, random_rpn, run_benchmark
    from frcnn.engine.checkpoint import CONFIG, choose_device, load_model
    from frcnn.errors import ConfigError
    from frcnn.model.detector import FasterRCNN

    device = choose_device(args.device, "--device")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    checkpoint = Path(args.config)
    if args.quick and args.engine == "onnxruntime":
        raise _quick_onnx_error()
    if args.engine == "onnxruntime" and (checkpoint.suffix == ".onnx" or (checkpoint / "model.onnx").is_file()):
        return _benchmark_onnx_file(args, checkpoint)
    cfg = load_config(str(checkpoint / CONFIG) if (checkpoint / CONFIG).is_file() else args.config, args.overrides)
    asked = cfg  # the checkpoint's config and --set: the model's (--quick changes the run, not the network)
    if args.quick:
        from frcnn.engine.fast_mode import quick_overrides

        given = {o.split("=", 1)[0].strip() for o in args.overrides}  # keys given by --set win (--rois: below)
        base = cfg
        quick = {"TEST": {k: v for k, v in quick_overrides(cfg, device)["TEST"].items() if f"TEST.{k}" not in given}}
        cfg = merge(cfg, quick)
    size = _benchmark_size(args, cfg)
    updates = [f"TEST.SCALES=[{min(size)}]", f"TEST.MAX_SIZE={max(size)}"]  # the image is fed at its own size
    if args.rois is not None:
        if args.rois < 1:
            raise ConfigError(f"--rois {args.rois}: must be at least 1")
        updates.append(f"TEST.RPN_POST_NMS_TOP_N={args.rois}")
    for text in updates:
        cfg = merge(cfg, parse_override(text))
    if (checkpoint / CONFIG).is_file():  # --set reaches the model: one that changes its network (NECK=fpn on a C4
        # checkpoint) is one line from load_model, never a silent run of the checkpoint's own network
        model, ckpt = load_model(checkpoint, device, overrides=config_to_dict(merge(asked, {"TEST": {
            "SCALES": list(cfg.TEST.SCALES), "MAX_SIZE": cfg.TEST.MAX_SIZE,
            "RPN_POST_NMS_TOP_N": cfg.TEST.RPN_POST_NMS_TOP_N}})))
        classes = ckpt.class_names
    else:
        torch.manual_seed(0)
        classes = tuple(f"class{i}" for i in range(1, 21))
        model = FasterRCNN(merge(cfg, {"PRETRAINED": ""}), len(classes), load_pretrained=False).to(device).eval()
        random_rpn(model)
    if args.engine == "onnxruntime":  # the same model, exported first
        return _benchmark_exported(args, model, cfg, classes, size)
    if args.fast:
        from frcnn.engine.fast import prepare_for_inference

        model = prepare_for_inference(model, inplace=True)
    if args.quick:
        from frcnn.engine.fast_mode import CALIBRATION_IMAGES, describe, quantize_convs, quantize_tail

        float_model = copy.deepcopy(model)  # FLOPs and floor are the float network's (int8 layers count in neither)
        calibration = max(1, min(args.warmup, CALIBRATION_IMAGES))  # the warm-up runs calibrate the int8 convs
        int8 = quantize_tail(model)
        print(describe(base, quick, device, int8, calibration if quantize_convs(model, calibration) else 0),
              file=sys.stderr)
    result = run_benchmark(model, cfg, classes, size, runs=args.runs, warmup=args.warmup,
                           float_model=float_model if args.quick else None)
    print(json.dumps(result.to_json()) if args.json else format_result(result))
    return 0


def _benchmark_size(args: argparse.Namespace, cfg) -> tuple[int, int]:
    """``--size`` (default: TEST.SCALES[0] x the long side at 5:3), checked against the stride; also checks
    ``--runs`` and ``--warmup``."""
    from frcnn.errors import ConfigError

    size = _parse_size(args.size) if args.size else (
        cfg.TEST.SCALES[0], min(cfg.TEST.MAX_SIZE, round(cfg.TEST.SCALES[0] * 5 / 3)))
    if min(size) < 2 * cfg.FEAT_STRIDE:
        raise ConfigError(f"--size {size[0]}x{size[1]}: each side must be at least 2 x FEAT_STRIDE "
                          f"({2 * cfg.FEAT_STRIDE} px)")
    if args.runs < 1 or args.warmup < 0:
        raise ConfigError("--runs must be at least 1 and --warmup at least 0")
    return size


def _benchmark_onnx_file(args: argparse.Namespace, path: Path) -> int:
    """``frcnn benchmark --engine onnxruntime --config MODEL.onnx``: the file as exported (its RoI counts and
    thresholds are in the graph, so --set and --rois are refused); the image is fed at --size."""
    from frcnn.config import merge
    from frcnn.engine.onnx_engine import OnnxPredictor
    from frcnn.errors import ConfigError

    if args.overrides or args.rois is not None:
        raise ConfigError(f"{path}: --set and --rois change the graph of an exported model; give a preset or a "
                          "checkpoint instead (exported with them) or export again")
    predictor = OnnxPredictor.open(path, args.device)
    size = _benchmark_size(args, predictor.cfg)
    predictor.cfg = merge(predictor.cfg, {"TEST": {"SCALES": [min(size)], "MAX_SIZE": max(size)}})
    return _print_onnx_benchmark(args, predictor, size)


def _benchmark_exported(args: argparse.Namespace, model, cfg, classes, size: tuple[int, int]) -> int:
    """``frcnn benchmark --engine onnxruntime`` of a preset, YAML or checkpoint: exported to a temporary file."""
    import tempfile

    from frcnn.engine.export import export_model
    from frcnn.engine.onnx_engine import OnnxPredictor

    with tempfile.TemporaryDirectory(prefix="frcnn-benchmark-") as tmp:
        started = time.perf_counter()
        path = export_model(model, cfg, classes, Path(tmp) / "model.onnx", example_size=size)
        if not args.json:
            print(f"exported to ONNX in {time.perf_counter() - started:.0f} s")
        return _print_onnx_benchmark(args, OnnxPredictor.open(path, args.device), size)


def _print_onnx_benchmark(args: argparse.Namespace, predictor, size: tuple[int, int]) -> int:
    from frcnn.engine.benchmark import machine_info
    from frcnn.engine.onnx_engine import format_onnx_benchmark, run_onnx_benchmark

    result = run_onnx_benchmark(predictor, size, runs=args.runs, warmup=args.warmup)
    machine = machine_info()
    print(json.dumps({**result, "machine": machine}) if args.json else format_onnx_benchmark(result, machine))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from frcnn.engine.export import export_checkpoint

    print(export_checkpoint(args.checkpoint, args.out))
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    from frcnn.errors import ConfigError

    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {text!r}: expected HxW, e.g. 600x1000") from None
    return h, w


def cmd_report(args: argparse.Namespace) -> int:
    from frcnn.engine.checkpoint import choose_device
    from frcnn.explain.report import write_report

    device = choose_device(args.device, "--device")
    print(write_report(args.run, out=args.out, data=args.data, split=args.split, num_images=args.images,
                       threshold=args.threshold, progress=not args.no_progress, device=device, say=print))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from frcnn.demo import run_demo

    run_demo(args.out, seed=args.seed, progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Under ``torchrun`` every process runs it; process 0 alone prints (errors included),
    and every process exits non-zero when the command fails."""
    from frcnn.engine.distributed import env_rank, teardown

    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        main_process = env_rank() == 0
    except FrcnnError:  # a garbled RANK: the commands that use it say so in one line
        main_process = True
    if not main_process:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the other processes print nothing
    try:
        code = args.func(args)
    except FrcnnError as e:
        if main_process:  # one line, even for a name typed with a line break in it
            message = str(e).replace("\r", "\\r").replace("\n", "\\n")
            print(f"frcnn {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"frcnn {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        teardown()
    if args.command in ("demo", "train"):
        print(f"done in {time.perf_counter() - started:.0f} s")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
