"""The ``frcnn`` command. Each sub-command is a thin layer over the library; every mistake in the
user's input ends as one line on stderr and a non-zero exit code, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from frcnn import __version__
from frcnn.errors import FrcnnError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PRESET_OR_YAML",
                   help="a preset (voc-r50-c4, voc-vgg16, demo-cpu) or a YAML file of config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set TRAIN.RPN_BATCHSIZE=128 (repeatable)")


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

    p = sub.add_parser("train", help="train a detector on a VOC folder",
                       description="Train Faster R-CNN (approximate joint training) on a PASCAL VOC folder.")
    p.add_argument("--data", required=True, type=Path, help="VOC root holding Annotations/, JPEGImages/, ImageSets/")
    p.add_argument("--split", required=True, help="image set to train on, e.g. trainval")
    p.add_argument("--out", required=True, type=Path, help="run folder (new or empty; with --resume, the run)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last snapshot")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a VOC split (per-class AP and mAP)",
                       description="Evaluate a checkpoint with the reference VOC AP (IoU > 0.5, +1 pixel convention).")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (a training run's --out)")
    p.add_argument("--data", required=True, type=Path, help="VOC root")
    p.add_argument("--split", required=True, help="image set to evaluate, e.g. test")
    p.add_argument("--metric", choices=("voc07", "voc2010"), default="voc07",
                   help="voc07: 11-point AP (default); voc2010: area under the PR curve")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("detect", help="detect objects in images; write a drawn PNG and a JSON per image",
                       description="Run a checkpoint on images (files or folders of images).")
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder")
    p.add_argument("inputs", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    p.add_argument("--out", required=True, type=Path, help="folder for the results (existing files are kept)")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score to report (default 0.5)")
    p.set_defaults(func=cmd_detect)
    return parser


# ---------------------------------------------------------------------------------------------- commands

def cmd_train(args: argparse.Namespace) -> int:
    from frcnn.config import load_config
    from frcnn.data.voc import VOCDataset
    from frcnn.engine.train import train

    if args.resume and args.config is None and (args.out / "config.yaml").is_file():
        cfg = load_config(str(args.out / "config.yaml"), args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    dataset = VOCDataset(args.data, args.split)
    print(f"training on {len(dataset)} images of {args.data} ({args.split}), classes: {', '.join(dataset.classes)}")
    train(cfg, dataset, args.out, resume=args.resume, progress=not args.no_progress)
    print(f"checkpoint: {args.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from frcnn.data.voc import VOCDataset
    from frcnn.engine.evaluate import evaluate, format_table
    from frcnn.engine.inference import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint)
    dataset = VOCDataset(args.data, args.split, classes=predictor.class_names)
    result = evaluate(predictor, dataset, metric=args.metric, progress=not (args.no_progress or args.json))
    if args.json:
        print(json.dumps(result))
    else:
        print(format_table(result))
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
    from frcnn.engine.detect import detect_files
    from frcnn.engine.inference import Predictor

    files = _image_files(args.inputs)
    predictor = Predictor.from_checkpoint(args.checkpoint)
    for written in detect_files(predictor, files, args.out, args.threshold):
        print(written)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from frcnn.demo import run_demo

    run_demo(args.out, seed=args.seed, progress=not args.no_progress)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        code = args.func(args)
    except FrcnnError as e:
        print(f"frcnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"frcnn {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.command in ("demo", "train"):
        print(f"done in {time.perf_counter() - started:.0f} s")
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
