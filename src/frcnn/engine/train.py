"""Approximate joint training in one step: SGD on the sum of the RPN and classification losses.

The learning rate follows the reference schedule (``LEARNING_RATE`` times ``GAMMA`` after each of
``STEPSIZE``), with an optional linear warm-up; biases get twice the rate and no weight decay when
``DOUBLE_BIAS`` (and not ``BIAS_DECAY``). Every ``SNAPSHOT_ITERS`` a snapshot is written; every
``DISPLAY`` iterations one JSON line of mean losses, learning rate and timing goes to ``metrics.jsonl``.

Evaluation during training (``val_dataset``, ``eval_every``): every ``eval_every`` iterations and after the
last one, the model is scored on the held-out images (:func:`validate`) and one line ``{"iteration",
"val_map", "val_metric", "val_rpn_cls", "val_rpn_box", "val_rcnn_cls", "val_rcnn_box", "val_total",
"val_images", "val_time"}`` goes to ``metrics.jsonl`` (the ``val_`` prefix keeps these lines apart from the
training lines); the full result (see :mod:`frcnn.engine.evaluate`) and its PR curves, confusion summary
go to ``<out>/eval/``. Validation changes nothing in training: no gradient, BatchNorm statistics and
dropout frozen, its sampling seeded on its own and the global RNG state restored, so weights after N
iterations are the same with and without it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from frcnn.boxes import scale_boxes
from frcnn.config import Config, TrainConfig, dump_yaml, resolve_device
from frcnn.engine.batches import DetectionDataset, TrainBatches, iteration_seed
from frcnn.engine.checkpoint import (
    CONFIG,
    META,
    WEIGHTS,
    latest_snapshot,
    prune_snapshots,
    read_checkpoint,
    save_checkpoint,
)
from frcnn.errors import FrcnnError
from frcnn.model.detector import FasterRCNN
from frcnn.transforms import image_to_tensor, prep_image

LOSS_KEYS = ("rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box")
METRICS = "metrics.jsonl"


class TrainingError(FrcnnError):
    """Training cannot go on (a non-finite loss, an output folder in the way, nothing to resume)."""


def learning_rate(train: TrainConfig, iteration: int) -> float:
    lr = train.LEARNING_RATE * train.GAMMA ** sum(iteration >= s for s in train.STEPSIZE)
    if iteration < train.WARMUP_ITERS:
        alpha = iteration / train.WARMUP_ITERS
        lr *= train.WARMUP_FACTOR * (1 - alpha) + alpha
    return lr


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.SGD:
    weights, biases = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith("bias") else weights).append(p)
    groups = [{"params": weights, "weight_decay": train.WEIGHT_DECAY, "lr_mult": 1.0}]
    if biases:
        groups.append({"params": biases, "weight_decay": train.WEIGHT_DECAY if train.BIAS_DECAY else 0.0,
                       "lr_mult": 2.0 if train.DOUBLE_BIAS else 1.0})
    return torch.optim.SGD(groups, lr=train.LEARNING_RATE, momentum=train.MOMENTUM)


def _prepare_out(out: Path, resume: bool) -> Path | None:
    """Refuse to train into a folder holding anything unless resuming; return the snapshot to resume."""
    if resume:
        snap = latest_snapshot(out / "snapshots") if out.is_dir() else None
        if snap is None:
            raise TrainingError(f"--resume: {out} holds no snapshot to resume from")
        return snap
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TrainingError(f"--out {out} is not empty; choose a new folder or pass --resume to continue")
    out.mkdir(parents=True, exist_ok=True)
    return None


def _publish(snapshot: Path, out: Path) -> None:
    """Make the run folder itself a checkpoint of its latest snapshot."""
    for name in (WEIGHTS, CONFIG, META):
        tmp = out / (name + ".tmp")
        shutil.copyfile(snapshot / name, tmp)
        tmp.replace(out / name)


def train(
    cfg: Config,
    dataset: DetectionDataset,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_log: Callable[[dict], None] | None = None,
    val_dataset: DetectionDataset | None = None,
    eval_every: int = 0,
) -> FasterRCNN:
    """Train a detector on ``dataset`` into the folder ``out``; returns the trained model.

    With ``val_dataset`` (same classes as ``dataset``) and ``eval_every > 0``, validate every ``eval_every``
    iterations and after the last (see the module docstring)."""
    out = Path(out)
    if val_dataset is not None and tuple(val_dataset.classes) != tuple(dataset.classes):
        raise TrainingError(f"the validation data has classes {list(val_dataset.classes)}, "
                            f"the training data {list(dataset.classes)}")
    snapshot = _prepare_out(out, resume)
    device = resolve_device(cfg)
    torch.manual_seed(cfg.RNG_SEED)
    classes = tuple(dataset.classes)
    model = FasterRCNN(cfg, len(classes), load_pretrained=snapshot is None).to(device)
    optimizer = build_optimizer(model, cfg.TRAIN)
    start = 0
    if snapshot is not None:
        ckpt = read_checkpoint(snapshot)
        if ckpt.class_names != classes:
            raise TrainingError(f"--resume: {snapshot} was trained on classes {list(ckpt.class_names)}, "
                                f"the data has {list(classes)}")
        model.load_state_dict(ckpt.weights)
        ckpt.load_optimizer_into(optimizer)
        start = ckpt.iteration
        _trim_metrics(out / METRICS, start)
    else:
        (out / CONFIG).write_text(dump_yaml(cfg))
    model.train()
    train_cfg = cfg.TRAIN
    batches = TrainBatches(dataset, cfg)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, train_cfg.MAX_ITERS),
                                         num_workers=cfg.NUM_WORKERS, collate_fn=lambda b: b)
    window: dict[str, float] = {k: 0.0 for k in LOSS_KEYS}
    count, t0, started = 0, time.perf_counter(), time.perf_counter()
    bar = tqdm(total=train_cfg.MAX_ITERS, initial=start, desc="train", unit="it", disable=not progress,
               dynamic_ncols=True)
    last_snapshot = str(snapshot) if snapshot else "none yet"
    with open(out / METRICS, "a") as log:
        for it, batch in zip(range(start, train_cfg.MAX_ITERS), loader):
            lr = learning_rate(train_cfg, it)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            torch.manual_seed(batch.seed)  # dropout, where the tail has it
            generator = torch.Generator().manual_seed(batch.seed)
            losses = model(batch.images.to(device), batch.image_sizes.to(device),
                           [b.to(device) for b in batch.gt_boxes], [lbl.to(device) for lbl in batch.gt_labels],
                           generator=generator)
            total = sum(losses.values())
            if not torch.isfinite(total):
                bad = {k: round(v.item(), 4) for k, v in losses.items()}
                raise TrainingError(f"non-finite loss at iteration {it + 1} {bad} on images {batch.image_ids}; "
                                    f"last good snapshot: {last_snapshot}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            for k in LOSS_KEYS:
                window[k] += losses[k].item()
            count += 1
            bar.update(1)
            done = it + 1
            if done % train_cfg.DISPLAY == 0 or done == train_cfg.MAX_ITERS:
                now = time.perf_counter()
                record = {"iteration": done, **{k: window[k] / count for k in LOSS_KEYS}}
                record["total"] = sum(record[k] for k in LOSS_KEYS)
                record.update(lr=lr, time=(now - t0) / count, elapsed=now - started)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{record['total']:.3f}", lr=f"{lr:.2g}")
                if on_log is not None:
                    on_log(record)
                window = {k: 0.0 for k in LOSS_KEYS}
                count, t0 = 0, now
            if done % train_cfg.SNAPSHOT_ITERS == 0 or done == train_cfg.MAX_ITERS:
                snap = out / "snapshots" / f"iter_{done:07d}"
                save_checkpoint(snap, model, cfg, classes, done, optimizer)
                _publish(snap, out)
                prune_snapshots(out / "snapshots", train_cfg.SNAPSHOT_KEPT)
                last_snapshot = str(snap)
            if val_dataset is not None and eval_every > 0 and (done % eval_every == 0
                                                               or done == train_cfg.MAX_ITERS):
                record = validate(model, cfg, classes, val_dataset, out / "eval", done)
                log.write(json.dumps(record) + "\n")
                log.flush()
                if on_log is not None:
                    on_log(record)
    bar.close()
    return model.eval()


@contextmanager
def _frozen(model: torch.nn.Module):
    """Train-mode forward (training losses, TRAIN proposal settings) with BatchNorm and dropout in eval mode,
    no gradient, and the global RNG state restored afterwards; the modules' modes are restored too."""
    modes = {m: m.training for m in model.modules()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.train()
            for m in model.modules():
                if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)):
                    m.eval()
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def validation_losses(model: FasterRCNN, cfg: Config, dataset: DetectionDataset) -> dict[str, float]:
    """Mean training losses over ``dataset`` (one image at a time, ``TEST.SCALES[0]``, no flip, difficult and
    crowd boxes left out as in training) without changing the model: see :func:`_frozen`. The anchor and RoI
    sampling of image ``i`` is seeded by ``(RNG_SEED, i)``, so the numbers are reproducible."""
    device = next(model.parameters()).device
    sums = {k: 0.0 for k in LOSS_KEYS}
    with _frozen(model):
        for i in range(len(dataset)):
            sample = dataset[i]
            prepared = prep_image(image_to_tensor(dataset.load_image(sample)), cfg.TEST.SCALES[0], cfg.TEST.MAX_SIZE,
                                  cfg.PIXEL_MEANS, cfg.PIXEL_STDS)
            keep = ~sample.difficult
            boxes = scale_boxes(sample.boxes[keep], prepared.scale)
            size = torch.tensor([list(prepared.tensor.shape[-2:])])
            generator = torch.Generator().manual_seed(iteration_seed(cfg.RNG_SEED, -(1 << 40) - i))
            losses = model(prepared.tensor[None].to(device), size.to(device), [boxes.to(device)],
                           [sample.labels[keep].to(device)], generator=generator)
            for k in LOSS_KEYS:
                sums[k] += float(losses[k])
    n = max(1, len(dataset))
    return {k: v / n for k, v in sums.items()}


def validate(model: FasterRCNN, cfg: Config, classes: tuple[str, ...], dataset: DetectionDataset, folder: Path,
             iteration: int) -> dict:
    """Score ``model`` on ``dataset`` (mAP of the data's default metric and the validation losses) without
    changing it; write the evaluation into ``folder``; return the ``metrics.jsonl`` record."""
    from frcnn.engine.evaluate import collect_detections, score_detections, write_eval_outputs
    from frcnn.engine.inference import Predictor

    started = time.perf_counter()
    losses = validation_losses(model, cfg, dataset)
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[]):
            detections = collect_detections(Predictor(model, cfg, classes), dataset, progress=False)
    finally:
        for m, mode in modes.items():
            m.training = mode
    result = score_detections(dataset, detections, metric=None)
    result.update(iteration=iteration, split=getattr(dataset, "split", None))
    write_eval_outputs(folder, dataset, detections, result)
    record = {"iteration": iteration, "val_map": result["map"], "val_metric": result["metric"],
              **{f"val_{k}": v for k, v in losses.items()}}
    record.update(val_total=sum(losses.values()), val_images=len(dataset), val_time=time.perf_counter() - started)
    return record


def _trim_metrics(path: Path, iteration: int) -> None:
    """On resume, drop log lines written after the snapshot (they are about to be recomputed)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line).get("iteration", 0) <= iteration]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)

