"""``frcnn report RUN_DIR``: one HTML page about a training run (see :mod:`frcnn.explain.page`).

From ``RUN_DIR/metrics.jsonl`` (one line per logged iteration, written by :mod:`frcnn.engine.train`): the
loss curves of every loss term and the learning rate. With a data set (``data``/``split``: a VOC root or a
COCO annotation JSON, read as training reads it by :func:`frcnn.data.open_repaired`, repairs included): every
kept snapshot (``RUN_DIR/snapshots/iter_*``) is evaluated with the data's default metric (VOC07 AP, or
pycocotools' AP@[.50:.95] on COCO data), giving mAP over iterations; the latest one also gives the per-class AP
table, precision-recall curves (IoU > 0.5, :func:`frcnn.engine.evaluate.pr_curves`) and a few test images
with their detections. A run that is still going is fine: a half-written last log line is skipped, a snapshot
pruned while we read it is left out, and re-running the command replaces the report it wrote before.

``RUN_DIR`` may also be a folder that holds one run in a subfolder, such as ``frcnn demo``'s ``--out``
(``OUT/model`` is the run, ``OUT/data`` its data, ``OUT/metrics.json`` its evaluation): :func:`find_run`.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from frcnn.config import config_to_dict
from frcnn.engine.checkpoint import CONFIG, META, WEIGHTS, choose_device, latest_snapshot, read_checkpoint, read_config
from frcnn.errors import CheckpointError, DataError
from frcnn.explain.page import Section, prepare_out, write_page
from frcnn.viz import charts
from frcnn.viz.draw import PALETTE, class_color, draw_detections

LOSS_SERIES = (("rpn_cls", "RPN cls"), ("rpn_box", "RPN box"), ("rcnn_cls", "RCNN cls"), ("rcnn_box", "RCNN box"),
               ("total", "total"))
LOSS_COLORS = (PALETTE[2], PALETTE[3], PALETTE[1], PALETTE[4], (30, 30, 30))
METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The log lines of a run, in order; a line that does not parse (being written right now) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "iteration" in record:
            records.append(record)
    return records


def loss_chart(records: list[dict[str, Any]], width: int = 900) -> Any:
    xs = [r["iteration"] for r in records]
    series = [(label, xs, [float(r.get(key, math.nan)) for r in records], colour)
              for (key, label), colour in zip(LOSS_SERIES, LOSS_COLORS)]
    return charts.line_chart(series, title="training losses (mean over each logged window)", xlabel="iteration",
                             ylabel="loss", width=width, height=360, y_range=(0.0, max(
                                 [y for _, _, ys, _ in series for y in ys if math.isfinite(y)] + [1e-6])))


def lr_chart(records: list[dict[str, Any]], width: int = 900) -> Any:
    xs = [r["iteration"] for r in records]
    return charts.line_chart([("learning rate", xs, [float(r.get("lr", math.nan)) for r in records], PALETTE[0])],
                             title="learning rate", xlabel="iteration", width=width, height=240)


def _checkpoints(run: Path) -> list[Path]:
    snaps = sorted(p for p in (run / "snapshots").glob("iter_*") if (p / META).is_file())
    if not snaps and (run / META).is_file():
        snaps = [run]
    return snaps


def _is_run(folder: Path) -> bool:
    return bool(read_metrics(folder / METRICS_FILE) or _checkpoints(folder))


def find_run(folder: str | Path) -> Path:
    """The training run ``folder`` is, or the one run among its subfolders (``frcnn demo``'s ``--out`` holds its
    run in ``model/``); a one-line :class:`DataError` when there is none, or more than one to choose from."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such run folder")
    if _is_run(folder):
        return folder
    inside = sorted(sub for sub in folder.iterdir() if sub.is_dir() and not sub.is_symlink() and _is_run(sub))
    if len(inside) == 1:
        return inside[0]
    if inside:
        raise DataError(f"{folder}: holds {len(inside)} training runs ({', '.join(p.name for p in inside)}); "
                        "give one of them")
    raise DataError(f"{folder}: not a training run (no {METRICS_FILE} and no checkpoint, here or in a subfolder)")


def _data_split(data: Path, split: str | None) -> str | None:
    """A VOC root's split defaults to ``test``; a COCO JSON needs none."""
    return (split or "test") if data.is_dir() else split


def evaluate_checkpoints(run: Path, data: Path, split: str | None, progress: bool,
                         device: str | torch.device | None = None) -> list[dict[str, Any]]:
    """Evaluate each kept snapshot on ``data``/``split`` (a VOC root, split default ``test``, or a COCO JSON),
    read once by :func:`frcnn.data.open_repaired` with the snapshots' classes: ``[{iteration, map, metric,
    per_class, curves, predictor, dataset, detections, folder}]`` (``curves``: :func:`pr_curves` at IoU > 0.5;
    ``dataset.summary``: the repairs, "" when none).

    ``device``: where the snapshots run (see :func:`frcnn.engine.checkpoint.choose_device`; default CUDA when
    this machine has it, else the CPU), whatever device they were trained on."""
    from frcnn.data import open_repaired
    from frcnn.engine.evaluate import collect_detections, pr_curves, score_detections
    from frcnn.engine.inference import Predictor

    device = choose_device(device)
    results = []
    opened: dict[tuple[str, ...], Any] = {}  # classes -> data set: read (and checked) once
    for folder in _checkpoints(run):
        try:
            iteration = read_checkpoint(folder).iteration
            predictor = Predictor.from_checkpoint(folder, device)
        except (CheckpointError, OSError):
            if all((folder / name).is_file() for name in (WEIGHTS, CONFIG, META)):
                raise  # damaged, not pruned: one line naming the file
            continue  # pruned or half-written while we looked: a running training may do that
        classes = tuple(predictor.class_names)
        if classes not in opened:
            opened[classes] = open_repaired(data, _data_split(Path(data), split), classes,
                                            drop_other_classes=False, progress=progress)
        dataset = opened[classes]
        detections = collect_detections(predictor, dataset, progress=progress)
        scored = score_detections(dataset, detections, None)
        results.append({"iteration": int(iteration), "map": scored["map"], "metric": scored["metric"],
                        "per_class": scored["per_class"], "curves": pr_curves(dataset, detections, 0.5),
                        "predictor": predictor, "dataset": dataset, "detections": detections,
                        "folder": str(folder)})
    return results


def pr_chart(curves: dict[str, dict[str, Any]], class_names: tuple[str, ...], width: int = 900) -> Any:
    """The precision-recall curve of every class with ground truth and detections (``curves``: :func:`pr_curves`
    of :mod:`frcnn.engine.evaluate`)."""
    series = []
    for k, name in enumerate(class_names, start=1):
        curve = curves.get(name, {})
        rec, prec, npos = curve.get("rec", []), curve.get("prec", []), curve.get("npos", 0)
        if npos and len(rec):
            series.append((name, [0.0, *map(float, rec)], [float(prec[0]), *map(float, prec)], class_color(k)))
    return charts.line_chart(series or [("no detections", [0, 1], [math.nan, math.nan], (0, 0, 0))],
                             title="precision-recall per class (latest snapshot, voc_eval matching, IoU > 0.5)",
                             xlabel="recall", ylabel="precision", width=width, height=380, y_range=(0.0, 1.0),
                             x_range=(0.0, 1.0))


def ap_table(result: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th><span style='display:inline-block;width:12px;height:12px;background:rgb{class_color(k)};"
        f"margin-right:6px'></span>{html.escape(name)}</th>"
        f"<td class=num>{'n/a (no gt)' if ap is None else f'{ap:.4f}'}</td></tr>"
        for k, (name, ap) in enumerate(result["per_class"].items(), start=1))
    metric = html.escape(str(result.get("metric", "voc07")))
    return (f"<table class=numbers><tr><th>class</th><th>AP ({metric})</th></tr>{rows}"
            f"<tr><th>mAP</th><td class=num>{result['map']:.4f}</td></tr></table>")


def _saved_evaluation(run: Path) -> tuple[Path, dict[str, Any]] | None:
    """An evaluation saved as JSON ``{"map", "per_class"}`` in the run or beside it (``frcnn demo``'s metrics.json)."""
    for path in (run / "metrics.json", run.parent / "metrics.json"):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(result, dict) and isinstance(result.get("per_class"), dict) and "map" in result:
            return path, result
    return None


def write_report(run: str | Path, out: str | Path | None = None, data: str | Path | None = None,
                 split: str | None = None, num_images: int = 4, threshold: float = 0.5, progress: bool = True,
                 device: str | torch.device | None = None, say: Callable[[str], Any] | None = None) -> Path:
    """Write the run's page into ``out`` (default ``RUN_DIR/report``); returns its ``index.html``.

    ``run`` is a training run or a folder holding one (:func:`find_run`); ``data`` a VOC root (``split``
    default ``test``) or a COCO JSON. ``device``: where the snapshots run when ``data`` is given (default CUDA
    when this machine has it, else the CPU; the run's own ``DEVICE`` is not used). ``say`` gets the lines worth
    telling the user now: the run found inside ``RUN_DIR``, the repairs of the data."""
    device = choose_device(device)  # a device this machine lacks is refused before any work
    given = Path(run)
    run = find_run(given)
    if run != given and say is not None:
        say(f"run: {run}")
    records = read_metrics(run / METRICS_FILE)
    out = Path(out) if out is not None else given / "report"
    prepare_out(out, rewritable=True)
    if data is None and (run.parent / "data" / "ImageSets" / "Main" / f"{split or 'test'}.txt").is_file():
        data = run.parent / "data"  # frcnn demo's layout: OUT/model (the run) beside OUT/data
    config = {}
    if (run / CONFIG).is_file():
        config = config_to_dict(read_config(run / CONFIG))
    max_iters = (config.get("TRAIN") or {}).get("MAX_ITERS")
    sections = []
    last = records[-1] if records else {}
    progress_numbers = {
        "last_logged_iteration": last.get("iteration"),
        "TRAIN.MAX_ITERS": max_iters,
        "elapsed_s": round(last["elapsed"], 1) if "elapsed" in last else None,
        "s_per_iteration": round(last["time"], 4) if "time" in last else None,
        "last_total_loss": last.get("total"),
        "latest_snapshot": str(latest_snapshot(run / "snapshots") or "none yet"),
        "BACKBONE": config.get("BACKBONE"),
        "POOLING_MODE": config.get("POOLING_MODE"),
    }
    if records:
        sections.append(Section("losses", "Losses", "The four terms of the training loss (RPN classification and "
                                "box regression, classification-layer classification and box regression) and their "
                                "sum, each the mean over the iterations of one logged window.",
                                numbers=progress_numbers, image=loss_chart(records), image_name="losses"))
        sections.append(Section("lr", "Learning rate", "The learning rate of each logged iteration (warm-up, then "
                                "steps of GAMMA at STEPSIZE).", image=lr_chart(records), image_name="learning_rate"))
    else:
        sections.append(Section("losses", "Losses", "Nothing logged yet.", numbers=progress_numbers))
    if data is not None:
        split = _data_split(Path(data), split)
        results = evaluate_checkpoints(run, Path(data), split, progress, device)
        if results:
            latest = results[-1]
            names = tuple(latest["dataset"].classes)
            metric = {"coco": "COCO AP@[.50:.95]"}.get(latest["metric"], latest["metric"].upper())
            where = f"{split}, " if split else ""
            repaired = latest["dataset"].summary
            if repaired and say is not None:
                say(repaired)
            maps = charts.line_chart([("mAP", [r["iteration"] for r in results], [r["map"] for r in results],
                                       PALETTE[0])], title=f"mAP ({metric}) on {split or Path(data).name} per kept "
                                                           "snapshot",
                                     xlabel="iteration", width=900, height=280, y_range=(0.0, 1.0), markers=True)
            sections.append(Section("map", "mAP over evaluations", f"Every kept snapshot evaluated on {data} "
                                    f"({where}{len(latest['dataset'])} images), read as training reads it: "
                                    + (repaired or "nothing to repair") + ".",
                                    image=maps, image_name="map",
                                    numbers={f"iteration {r['iteration']}": round(r["map"], 4) for r in results}))
            sections.append(Section("ap", f"Per-class AP at iteration {latest['iteration']}",
                                    f"Average precision of each class ({metric}); the curves show precision "
                                    "against recall as the score threshold falls (the reference voc_eval "
                                    "matching at IoU > 0.5).", image=pr_chart(latest["curves"], names),
                                    image_name="pr", html_body=ap_table(latest)))
            dataset, predictor = latest["dataset"], latest["predictor"]
            tiles = []
            for i in range(min(num_images, len(dataset))):
                sample = dataset[i]
                det = latest["detections"][i]
                keep = det.scores >= threshold
                drawn = draw_detections(dataset.load_image(sample), det.boxes[keep], det.labels[keep],
                                        det.scores[keep], predictor.class_names, gt_boxes=sample.boxes)
                tiles.append(charts.label_above(drawn, f"{sample.image_id}: {int(keep.sum())} detections"))
            if tiles:
                rows = [charts.hstack(tiles[k:k + 2], gap=10) for k in range(0, len(tiles), 2)]
                legend = charts.legend([(n, class_color(k)) for k, n in enumerate(names, start=1)]
                                       + [("gt", (255, 255, 255))], rows[0].width, title="legend:")
                sections.append(Section("images", "Test images", f"The first {len(tiles)} images of {split} with "
                                        f"the detections of the latest snapshot scoring at least {threshold:g} "
                                        "(white: ground truth).", image=charts.vstack([*rows, legend], gap=10),
                                        image_name="test_images"))
        else:
            sections.append(Section("map", "Evaluation", "No snapshot to evaluate yet."))
    else:
        saved = _saved_evaluation(run)
        text = ("No data set to evaluate on: pass --data (a VOC root with --split NAME, or a COCO annotation JSON) "
                "to evaluate the kept snapshots, draw precision-recall curves and test images.")
        if saved is not None:
            text += f" Below: the evaluation saved in {saved[0]}."
        sections.append(Section("map", "Evaluation", text, html_body=ap_table(saved[1]) if saved else ""))
    return write_page(out, f"frcnn report: {run.resolve().name}", [f"run {run}", f"{len(records)} logged iterations"],
                      sections)
