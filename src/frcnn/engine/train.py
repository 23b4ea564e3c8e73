"""Approximate joint training in one step: SGD on the sum of the RPN and classification losses.

The learning rate follows the reference schedule (``LEARNING_RATE`` times ``GAMMA`` after each of
``STEPSIZE``) or, with ``LR_SCHEDULE: cosine``, half a cosine from ``LEARNING_RATE`` to 0 at ``MAX_ITERS``
(``STEPSIZE`` unused), with an optional linear warm-up; biases get twice the rate and no weight decay when
``DOUBLE_BIAS`` (and not ``BIAS_DECAY``). Every ``SNAPSHOT_ITERS`` a snapshot is written; every
``DISPLAY`` iterations one JSON line of mean losses, learning rate and timing goes to ``metrics.jsonl``. With
``PRECISE_BN_IMAGES``, BatchNorm's statistics are re-estimated after the last iteration, before the last snapshot
(:mod:`frcnn.engine.precise_bn`).

Evaluation during training (``val_dataset``, ``eval_every``): every ``eval_every`` iterations and after the
last one, the model is scored on the held-out images (:func:`validate`) and one line ``{"iteration",
"val_map", "val_metric", "val_rpn_cls", "val_rpn_box", "val_rcnn_cls", "val_rcnn_box", "val_total",
"val_images", "val_time"}`` goes to ``metrics.jsonl`` (the ``val_`` prefix keeps these lines apart from the
training lines); the full result (see :mod:`frcnn.engine.evaluate`) and its PR curves, confusion summary
go to ``<out>/eval/``. Validation changes nothing in training: no gradient, BatchNorm statistics and
dropout frozen, its sampling seeded on its own and the global RNG state restored, so weights after N
iterations are the same with and without it.

Resolved before iteration 1 (:func:`resolve_run_config`, process 0 computes, every process receives the same):
``TRAIN.MAX_EPOCHS > 0`` sets ``MAX_ITERS = ceil(MAX_EPOCHS x images an epoch / global batch)`` and ``STEPSIZE``
from ``STEP_EPOCHS`` (rounded; empty: no step), an epoch being every image and, with ``USE_FLIPPED``, its mirrored
copy (:mod:`frcnn.engine.batches`), the global batch ``processes x IMS_PER_BATCH``; ``TRAIN.SCALE_UP_LIMIT > 0``
grows the input where the boxes are too small for the stride (:func:`frcnn.data.small_boxes.scale_up`: training's
and test's ``SCALES`` and ``MAX_SIZE``); ``TEST.PROPOSALS_PER_OBJECT > 0`` makes room at test for the objects of
busy training images (:func:`frcnn.data.dense.room_for_objects`: proposals and detections an image);
``ANCHOR_SCALES: auto`` becomes the list :func:`frcnn.data.anchor_fit.auto_anchor_fit` chooses from the training
set at that input (check-data's suggestion);
``TRAIN.AMP: auto`` the mixed precision this device computes natively (:func:`frcnn.engine.precision.resolve_amp`,
resolved by every process, and again on ``--resume``, also from the run's own ``config.yaml``: a run moved to
another machine says so if it changes).
Each prints one line; the run's ``config.yaml`` (and every snapshot's) holds the resolved values, ``meta.json``
what they were resolved from (``"resolved"``). ``--resume`` keeps the run's values: it does not resolve again
unless ``MAX_EPOCHS`` or ``STEP_EPOCHS`` changed, and says so in one line when the training set (or the number of
processes) would now give other iterations. ``SNAPSHOT_ITERS``, ``WARMUP_ITERS`` and ``DISPLAY`` stay iterations.

Distributed (``torchrun``, see :mod:`frcnn.engine.distributed`): every process trains a DistributedDataParallel
copy on its ``TRAIN.IMS_PER_BATCH`` images of the iteration's global batch (:mod:`frcnn.engine.batches`); the
losses are means over images, so DDP's gradient average is the gradient of the whole global batch and N
processes train the weights one process would with N times the images. Process 0 alone writes ``--out``
(metrics, snapshots, the published checkpoint, evaluations, TensorBoard) and shows the progress bar; logged
losses are averaged over the processes; validation shards the images across them.

Memory layout (``MEMORY_FORMAT``): on CPUs where channels-last convolutions are faster (``auto``: AVX-512,
:func:`frcnn.engine.fast.channels_last_pays`) ResNet and VGG models train in channels-last (the R50-C4 step
was 1.12x torchvision's speed in contiguous layout, 1.26x in the run that made it channels-last, 1.22x in the latest,
``benchmarks/results/torchvision_r50c4.md``); ``tiny`` stays
contiguous, so the demo's documented runs reproduce. The arithmetic is the same up to float rounding;
checkpoints are stored contiguous.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from tqdm import tqdm

from frcnn.boxes import scale_boxes
from frcnn.config import AUTO, Config, TrainConfig, config_changes, dump_yaml
from frcnn.engine import distributed as dist
from frcnn.engine.batches import Batch, DetectionDataset, TrainBatches, iteration_seed, training_forward
from frcnn.engine.checkpoint import (
    CONFIG,
    META,
    TRAINING_WEIGHTS,
    WEIGHTS,
    latest_snapshot,
    load_momentum,
    load_weights,
    prune_snapshots,
    read_checkpoint,
    read_config,
    read_momentum,
    read_training_weights,
    save_checkpoint,
)
from frcnn.engine.ema import WeightAverage
from frcnn.engine.fast import channels_last_pays, reuse_freed_memory
from frcnn.engine.precise_bn import precise_bn_iterations, recompute_batchnorm
from frcnn.engine.precision import Precision, resolve_amp
from frcnn.engine.tensorboard import TensorBoardLog, validation_images
from frcnn.errors import CheckpointError, ConfigError, FrcnnError
from frcnn.model.detector import FasterRCNN
from frcnn.transforms import image_to_tensor, prep_image

LOSS_KEYS = ("rpn_cls", "rpn_box", "rcnn_cls", "rcnn_box")
METRICS = "metrics.jsonl"


class TrainingError(FrcnnError):
    """Training cannot go on (a non-finite loss, an output folder in the way, nothing to resume)."""


def learning_rate(train: TrainConfig, iteration: int, world_size: int = 1) -> float:
    """The rate of ``iteration``: step or cosine schedule, warm-up, and with ``LR_SCALING: linear`` the linear scaling
    rule (Goyal et al. 2017): ``LEARNING_RATE`` is the rate of one process's batch, ``world_size`` processes
    use ``world_size`` times it."""
    base = train.LEARNING_RATE * (world_size if train.LR_SCALING == "linear" else 1)
    if train.LR_SCHEDULE == "cosine":
        lr = base * 0.5 * (1 + math.cos(math.pi * min(iteration, train.MAX_ITERS) / train.MAX_ITERS))
    else:
        lr = base * train.GAMMA ** sum(iteration >= s for s in train.STEPSIZE)
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
    # One fused kernel a step instead of a loop of passes over each tensor (weight decay, momentum, update): the same
    # update but for the last bit of rounding (a first difference of 6e-11 at iteration 2), so a run drifts as with
    # another thread count; a training step in 0.93x the time for demo-cpu, 0.92x for scratch-cpu (2 threads,
    # benchmarks/results/scratch_cpu.md), most of it fc6's 3.2M weights.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.SGD(groups, lr=train.LEARNING_RATE, momentum=train.MOMENTUM, fused=fused or None)


# ------------------------------------------------------------------------ settings resolved before iteration 1


def _whole(x: float) -> float:
    """``x`` without the float noise of a product of decimals (0.7 x 10 is 7.000000000000001)."""
    return round(x, 6)


@dataclass(frozen=True)
class Schedule:
    """``TRAIN.MAX_EPOCHS`` and ``STEP_EPOCHS`` as iterations, for a training set of ``images`` images."""

    max_epochs: float
    step_epochs: tuple[float, ...]
    images: int  # images of the training set
    copies: int  # 2 with TRAIN.USE_FLIPPED (each image and its mirrored copy), else 1
    global_batch: int  # processes x IMS_PER_BATCH
    world_size: int
    max_iters: int
    steps: tuple[int, ...]
    gamma: float = 0.1
    cosine: bool = False  # TRAIN.LR_SCHEDULE=cosine: the steps are unused

    @property
    def per_epoch(self) -> int:
        return self.images * self.copies

    def epoch_text(self) -> str:
        mirrored = f" ({self.images} + mirrored)" if self.copies == 2 else ""
        per = self.global_batch // self.world_size
        batch = f" ({self.world_size} processes x {per})" if self.world_size > 1 else ""
        epochs = f"{self.max_epochs:g} epoch{'' if self.max_epochs == 1 else 's'}"
        images = f"{self.global_batch} image{'s' if self.global_batch > 1 else ''}"
        return f"{epochs} of {self.per_epoch} images{mirrored}, {images} an iteration{batch}"

    def line(self) -> str:
        """``schedule: 24 epochs of 584 images (292 + mirrored), 2 images an iteration = 7008 iterations, LR x0.1
        at 5256``."""
        if self.cosine:
            lr = "cosine LR to 0" + (" (TRAIN.STEP_EPOCHS unused)" if self.steps else "")
        elif self.steps:
            steps = ", ".join(f"{s} (epoch {e:g})" for s, e in zip(self.steps, self.step_epochs))
            lr = f"LR x{self.gamma:g} at {steps}"
        else:
            lr = "no LR step (TRAIN.STEP_EPOCHS is empty)"
        return f"schedule: {self.epoch_text()} = {self.max_iters} iterations, {lr}"

    def to_json(self) -> dict:
        return {"images": self.images, "images_per_epoch": self.per_epoch, "global_batch": self.global_batch}


def epoch_schedule(train: TrainConfig, num_images: int, world_size: int = 1) -> Schedule:
    """The iterations of ``TRAIN.MAX_EPOCHS`` (``> 0``) on ``num_images`` images trained by ``world_size`` processes:
    ``MAX_ITERS = ceil(MAX_EPOCHS x images an epoch / global batch)``, each of ``STEP_EPOCHS`` the same product
    rounded to the nearest iteration (halves up). An epoch is every image, and with ``USE_FLIPPED`` its mirrored copy
    too; the global batch is ``world_size x IMS_PER_BATCH``. Empty ``STEP_EPOCHS``: no step. A step at or after
    ``MAX_EPOCHS`` (it would never lower the rate) is a one-line :class:`ConfigError`."""
    if train.MAX_EPOCHS <= 0:
        raise ConfigError("TRAIN.MAX_EPOCHS is 0: the schedule is TRAIN.MAX_ITERS and TRAIN.STEPSIZE")
    late = [e for e in train.STEP_EPOCHS if e >= train.MAX_EPOCHS]
    if late:
        raise ConfigError(f"TRAIN.STEP_EPOCHS={list(train.STEP_EPOCHS)} has {late[0]:g}, not below TRAIN.MAX_EPOCHS="
                          f"{train.MAX_EPOCHS:g}: a step there never lowers the rate (leave STEP_EPOCHS empty for "
                          "no step)")
    copies = 2 if train.USE_FLIPPED else 1
    batch = world_size * train.IMS_PER_BATCH
    per_iteration = num_images * copies / batch  # iterations an epoch
    max_iters = max(1, math.ceil(_whole(train.MAX_EPOCHS * per_iteration)))
    steps = tuple(math.floor(_whole(e * per_iteration) + 0.5) for e in train.STEP_EPOCHS)
    return Schedule(train.MAX_EPOCHS, tuple(train.STEP_EPOCHS), num_images, copies, batch, world_size, max_iters,
                    steps, train.GAMMA, train.LR_SCHEDULE == "cosine")


def _saved_resolved(snapshot: Path) -> dict:
    """What a snapshot's settings were resolved from (``meta.json``'s ``"resolved"``; ``{}`` if none or unreadable:
    :func:`_read_resume` reports a damaged ``meta.json``)."""
    try:
        meta = json.loads((snapshot / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    resolved = meta.get("resolved") if isinstance(meta, dict) else None
    return resolved if isinstance(resolved, dict) else {}


def resolve_run_config(cfg: Config, dataset: DetectionDataset, world_size: int = 1,
                       snapshot: Path | None = None) -> tuple[Config, list[str], dict]:
    """``cfg`` with ``TRAIN.MAX_EPOCHS`` (``> 0``) turned into ``MAX_ITERS``/``STEPSIZE``, the input grown by
    ``TRAIN.SCALE_UP_LIMIT`` (``> 0``), the test-time counts raised by ``TEST.PROPOSALS_PER_OBJECT`` (``> 0``) and
    ``ANCHOR_SCALES: auto`` turned into a list, for ``dataset`` trained by ``world_size`` processes; returns
    ``(config, lines to print, what was resolved from)``, the last for ``meta.json``. Resolving a resolved config
    again gives the same config.

    Resuming (``snapshot``): the run's values are kept: its input sizes and test counts, its ``ANCHOR_SCALES`` for
    ``auto``, its ``MAX_ITERS`` and ``STEPSIZE`` unless ``MAX_EPOCHS`` or ``STEP_EPOCHS`` differ from the run's (then
    resolved again); one line says when the training set (or the number of processes) would now give other
    iterations."""
    lines: list[str] = []
    resolved: dict = {}
    before = _saved_resolved(snapshot) if snapshot is not None else {}
    wanted = (cfg.TRAIN.MAX_EPOCHS > 0 or cfg.ANCHOR_SCALES == AUTO or cfg.TRAIN.SCALE_UP_LIMIT > 0
              or cfg.TEST.PROPOSALS_PER_OBJECT > 0 or AUTO in (before.get("ANCHOR_SCALES"), before.get("AMP")))
    saved = read_config(snapshot / CONFIG) if snapshot is not None and wanted else None
    train = cfg.TRAIN
    if train.MAX_EPOCHS > 0:
        fresh = epoch_schedule(train, len(dataset), world_size)
        if saved is not None and (saved.TRAIN.MAX_EPOCHS, saved.TRAIN.STEP_EPOCHS) == (train.MAX_EPOCHS,
                                                                                       train.STEP_EPOCHS):
            train = replace(train, MAX_ITERS=saved.TRAIN.MAX_ITERS, STEPSIZE=saved.TRAIN.STEPSIZE)
            was = before.get("schedule")
            was = was if isinstance(was, dict) and {"images_per_epoch", "global_batch"} <= was.keys() else None
            resolved["schedule"] = was or fresh.to_json()
            if (fresh.max_iters, fresh.steps) != (train.MAX_ITERS, train.STEPSIZE):
                then = (f" (resolved for {was['images_per_epoch']} images an epoch, {was['global_batch']} an "
                        "iteration)") if was else ""
                lines.append(f"--resume: keeping the run's schedule, TRAIN.MAX_ITERS {train.MAX_ITERS} and STEPSIZE "
                             f"{list(train.STEPSIZE)}{then}; the training set as it is now ({fresh.epoch_text()}) "
                             f"would make it {fresh.max_iters} and {list(fresh.steps)}")
        else:
            train = replace(train, MAX_ITERS=fresh.max_iters, STEPSIZE=fresh.steps)
            resolved["schedule"] = fresh.to_json()
            lines.append(fresh.line())
    classes = getattr(dataset, "classes", ())

    @functools.cache
    def samples() -> list:  # the training set's samples, read once for the three choices below
        return [dataset[i] for i in range(len(dataset))]

    if cfg.TRAIN.SCALE_UP_LIMIT > 0:  # boxes too small for the stride: a larger input (frcnn.data.small_boxes)
        if saved is not None:
            cfg = replace(cfg, TEST=replace(cfg.TEST, SCALES=saved.TEST.SCALES, MAX_SIZE=saved.TEST.MAX_SIZE))
            train = replace(train, SCALES=saved.TRAIN.SCALES, MAX_SIZE=saved.TRAIN.MAX_SIZE,
                            SCALE_UP_LIMIT=saved.TRAIN.SCALE_UP_LIMIT)
        else:
            from frcnn.data.small_boxes import scale_up, scale_up_line

            grown, done = scale_up(replace(cfg, TRAIN=train), samples(), classes)
            if done is not None:
                cfg, train = grown, grown.TRAIN
                lines.append(scale_up_line(grown, done))
                resolved["input"] = done
    if cfg.TEST.PROPOSALS_PER_OBJECT > 0:  # busy images: room for their objects at test (frcnn.data.dense)
        if saved is not None:
            cfg = replace(cfg, TEST=replace(cfg.TEST, **{key: getattr(saved.TEST, key) for key in (
                "RPN_PRE_NMS_TOP_N", "RPN_POST_NMS_TOP_N", "MAX_PER_IMAGE", "PROPOSALS_PER_OBJECT")}))
        else:
            from frcnn.data.dense import room_for_objects, room_line

            cfg, done = room_for_objects(cfg, samples())
            if done is not None:
                lines.append(room_line(done))
                resolved["test_counts"] = done
    scales = cfg.ANCHOR_SCALES
    if scales == AUTO:
        if saved is not None:
            scales = saved.ANCHOR_SCALES
            lines.append(f"anchors: ANCHOR_SCALES=auto -> [{', '.join(f'{s:g}' for s in scales)}], the run's "
                         "(chosen when it started)")
        else:
            from frcnn.data.anchor_fit import auto_anchor_fit, describe_auto
            from frcnn.data.small_boxes import small_boxes_hint

            fit = auto_anchor_fit(samples(), replace(cfg, TRAIN=train))
            scales = fit.scales
            lines.append(f"anchors: {describe_auto(fit)}")
            if hint := small_boxes_hint(fit, classes):  # no anchor fits boxes this small
                lines.append(hint.strip())
        resolved["ANCHOR_SCALES"] = AUTO
    elif saved is not None and before.get("ANCHOR_SCALES") == AUTO and tuple(scales) == tuple(saved.ANCHOR_SCALES):
        resolved["ANCHOR_SCALES"] = AUTO  # the run's config.yaml holds the list auto chose: still auto's
    if saved is not None and before.get("AMP") == AUTO and train.AMP == saved.TRAIN.AMP:
        train = replace(train, AMP=AUTO)  # the mode auto chose on the run's machine: auto again on this one (train())
    return replace(cfg, TRAIN=train, ANCHOR_SCALES=scales), lines, resolved


# ------------------------------------------------------------------------------------------------ the run folder

LOCK = ".frcnn-train.lock"


def _prepare_out(out: Path, resume: bool, lock: FileLock) -> Path | None:
    """Take ``out`` for this training: refuse a folder holding anything unless resuming, one another
    ``frcnn train`` is using (``lock``), or one this process cannot write; return the snapshot to resume
    (``None``: start at iteration 0, also when a resumed run had not written its first snapshot yet)."""
    def refuse_if_not_empty() -> None:
        if not resume and out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
            raise TrainingError(f"--out {out} is not empty; choose a new folder or pass --resume to continue")

    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file; choose a new folder")
    refuse_if_not_empty()  # before writing anything there
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock.acquire(timeout=0)
    except Timeout:
        raise TrainingError(f"--out {out} is in use by another frcnn train; wait for it to end or choose another "
                            "folder") from None
    except OSError as e:
        raise TrainingError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    try:
        if resume:
            snap = latest_snapshot(out / "snapshots", say=print)
            if snap is None and not (out / CONFIG).is_file():
                raise TrainingError(f"--resume: {out} holds no snapshot to resume from")
            if snap is None:  # killed before its first snapshot: start again
                print(f"--resume: {out} has no snapshot yet; starting from iteration 0")
                (out / METRICS).unlink(missing_ok=True)
            return snap
        refuse_if_not_empty()  # again: another training may have started there since
        return None
    except BaseException:
        lock.release()
        raise


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
    iterations and after the last (see the module docstring). Under ``torchrun`` every process calls this
    with the same arguments. ``TRAIN.MAX_EPOCHS`` and ``ANCHOR_SCALES: auto`` are resolved first
    (:func:`resolve_run_config`); the returned model's ``cfg`` is the resolved config."""
    out = Path(out)
    if val_dataset is not None and tuple(val_dataset.classes) != tuple(dataset.classes):
        raise TrainingError(f"the validation data has classes {list(val_dataset.classes)}, "
                            f"the training data {list(dataset.classes)}")
    world = dist.setup(cfg)
    lock = FileLock(out / LOCK)
    snapshot = dist.on_main(world, lambda: _prepare_out(out, resume, lock), "checking --out")
    try:
        cfg, lines, resolved = dist.on_main(world, lambda: resolve_run_config(cfg, dataset, world.size, snapshot),
                                            "resolving the schedule and anchors")
        if cfg.TRAIN.AMP == AUTO:  # each process for its own device (all of one kind)
            amp, why = resolve_amp(AUTO, world.device)
            cfg = replace(cfg, TRAIN=replace(cfg.TRAIN, AMP=amp))
            lines.append(f"precision: TRAIN.AMP=auto -> {amp} ({why})")
            resolved["AMP"] = AUTO
        if world.is_main:
            for line in lines:
                print(line)
        return _train(cfg, dataset, out, snapshot, world, progress, on_log, val_dataset, eval_every, resolved)
    finally:
        if lock.is_locked:
            lock.release()


def trains_channels_last(cfg: Config, device: torch.device) -> bool:
    """Whether ``frcnn train`` holds the model in channels-last (``MEMORY_FORMAT``; ``auto``: as the fast path,
    except the tiny backbone: it stays contiguous, so its documented runs reproduce; channels-last was not
    benchmarked to pay there)."""
    return channels_last_pays(device, "contiguous" if cfg.MEMORY_FORMAT == AUTO and cfg.BACKBONE == "tiny"
                              else cfg.MEMORY_FORMAT)


def _train(cfg: Config, dataset: DetectionDataset, out: Path, snapshot: Path | None, world: dist.World,
           progress: bool, on_log: Callable[[dict], None] | None, val_dataset: DetectionDataset | None,
           eval_every: int, resolved: dict) -> FasterRCNN:
    device, main = world.device, world.is_main
    reuse_freed_memory()  # every iteration allocates the same large tensors again: keep them (engine/fast.py)
    torch.manual_seed(cfg.RNG_SEED)
    classes = tuple(dataset.classes)
    model = FasterRCNN(cfg, len(classes), load_pretrained=snapshot is None).to(device)
    if trains_channels_last(cfg, device):  # same numbers up to rounding; checkpoints stay contiguous
        model.to(memory_format=torch.channels_last)
    if world.distributed and cfg.TRAIN.SYNC_BN:
        dist.convert_sync_batchnorm(model)
    precision = Precision(cfg.TRAIN.AMP, device, "TRAIN.AMP")
    start = 0
    what = f"the model this run trains (BACKBONE {cfg.BACKBONE}, NECK {cfg.NECK}, {len(classes)} classes)"
    if snapshot is not None:
        state = dist.on_main(world, lambda: _read_resume(snapshot, classes, world, cfg), "reading the snapshot")
        live = state["training_weights"]  # a run with EMA: model.safetensors holds the average
        load_weights(model, state["weights"] if live is None else live,
                     snapshot / (WEIGHTS if live is None else TRAINING_WEIGHTS), what)
        start = state["iteration"]
        precision.load_state_dict(state["grad_scaler"])
        if main:
            _trim_metrics(out / METRICS, start)
            for note in state["notes"]:
                print(note)
            if state["changed"]:  # the run folder states what it now trains
                (out / CONFIG).write_text(dump_yaml(cfg))
    elif main:
        (out / CONFIG).write_text(dump_yaml(cfg))
    optimizer = build_optimizer(model, cfg.TRAIN)
    if snapshot is not None:
        load_momentum(optimizer, state["momentum"], snapshot)
    ema = None
    if cfg.TRAIN.EMA_DECAY > 0:  # resumed from a snapshot without an average: it starts from the weights
        resumed = snapshot is not None and state["training_weights"] is not None
        ema = WeightAverage(model, cfg.TRAIN.EMA_DECAY, state["ema_updates"] if resumed else 0)
        if resumed:
            load_weights(ema.module, state["weights"], snapshot / WEIGHTS, what)
    scored = model if ema is None else ema.module  # what is saved, validated and returned
    model.train()
    net = model
    if world.distributed:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    train_cfg = cfg.TRAIN
    batches = TrainBatches(dataset, cfg, world.rank, world.size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, train_cfg.MAX_ITERS),
                                         num_workers=cfg.NUM_WORKERS, collate_fn=_as_is)
    window: dict[str, float] = {k: 0.0 for k in LOSS_KEYS}
    count, t0, started = 0, time.perf_counter(), time.perf_counter()
    bar = tqdm(total=train_cfg.MAX_ITERS, initial=start, desc="train", unit="it", disable=not (progress and main),
               dynamic_ncols=True)
    last_snapshot = str(snapshot) if snapshot else "none yet"
    log = open(out / METRICS, "a") if main else None  # noqa: SIM115 - closed below
    board = TensorBoardLog(out, purge_step=start + 1 if snapshot is not None else None) if main else None

    def emit(record: dict) -> None:
        if log is not None and board is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
            board.write(record)
            if on_log is not None:
                on_log(record)

    try:
        for it, batch in zip(range(start, train_cfg.MAX_ITERS), loader):
            lr = learning_rate(train_cfg, it, world.size)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_mult"]
            with precision.autocast(), dist.collective("the forward pass"):
                losses = training_forward(net, batch, device)
            total = sum(losses.values())
            if not dist.all_true(world, bool(torch.isfinite(total)), "checking the losses"):
                _stop_on_nonfinite(world, it, losses, batch.image_ids, last_snapshot)
            optimizer.zero_grad(set_to_none=True)
            with dist.collective("the gradient all-reduce"):
                precision.backward_step(total, optimizer)
            if ema is not None:
                ema.update(model)
            for k in LOSS_KEYS:
                window[k] += losses[k].item()
            count += 1
            bar.update(1)
            done = it + 1
            if done % train_cfg.DISPLAY == 0 or done == train_cfg.MAX_ITERS:
                now = time.perf_counter()
                record = {"iteration": done, **dist.all_reduce_mean(world, {k: window[k] / count for k in LOSS_KEYS})}
                record["total"] = sum(record[k] for k in LOSS_KEYS)
                record.update(lr=lr, time=(now - t0) / count, elapsed=now - started)
                emit(record)
                bar.set_postfix(loss=f"{record['total']:.3f}", lr=f"{lr:.2g}")
                window = {k: 0.0 for k in LOSS_KEYS}
                count, t0 = 0, now
            if done == train_cfg.MAX_ITERS and train_cfg.PRECISE_BN_IMAGES > 0:  # before the last snapshot
                # (training normalises with each batch's own statistics: a longer run resumed from this snapshot
                # trains exactly as without it, and re-estimates the statistics at its own end)
                ran = recompute_batchnorm(scored, batches, precise_bn_iterations(train_cfg, world.size), precision,
                                          world, progress)
                if ran and main:
                    bar.write(f"precise BN: BatchNorm statistics re-estimated over the next {ran} training batches "
                              f"(TRAIN.PRECISE_BN_IMAGES={train_cfg.PRECISE_BN_IMAGES})")
            if main and (done % train_cfg.SNAPSHOT_ITERS == 0 or done == train_cfg.MAX_ITERS):
                snap = out / "snapshots" / f"iter_{done:07d}"
                save_checkpoint(snap, scored, cfg, classes, done, optimizer,
                                extra={"world_size": world.size, "grad_scaler": precision.state_dict(),
                                       **({"resolved": resolved} if resolved else {}),
                                       **({"ema_updates": ema.updates} if ema is not None else {})},
                                training_model=None if ema is None else model)
                _publish(snap, out)
                prune_snapshots(out / "snapshots", train_cfg.SNAPSHOT_KEPT)
                last_snapshot = str(snap)
            if val_dataset is not None and eval_every > 0 and (done % eval_every == 0
                                                               or done == train_cfg.MAX_ITERS):
                record = validate(scored, cfg, classes, val_dataset, out / "eval", done, world)
                if record is not None and board is not None:
                    emit(record)
                    board.images(done, validation_images(scored, cfg, classes, val_dataset))
    finally:
        bar.close()
        if log is not None:
            log.close()
        if board is not None:
            board.close()
    return scored.eval()


def _as_is(batch: Batch) -> Batch:
    return batch


def _stop_on_nonfinite(world: dist.World, it: int, losses: dict[str, torch.Tensor], image_ids: list[str],
                       last_snapshot: str) -> None:
    """Raise the non-finite-loss error in every process, naming the losses and images of each process whose
    loss is not finite."""
    bad = None
    if not all(torch.isfinite(v) for v in losses.values()):
        bad = ({k: round(v.item(), 4) for k, v in losses.items()}, image_ids)
    reports = [r for r in (dist.gather(world, bad, "reporting a non-finite loss") or []) if r is not None]
    message = "; ".join(f"{values} on images {ids}" for values, ids in reports)
    message = dist.broadcast(world, message, "reporting a non-finite loss")
    raise TrainingError(f"non-finite loss at iteration {it + 1} {message}; last good snapshot: {last_snapshot}")


def _read_resume(snapshot: Path, classes: tuple[str, ...], world: dist.World, cfg: Config) -> dict:
    """What every process needs from the snapshot: weights, momentum buffers, iteration, loss-scaler state;
    and one line for each thing that differs from the run so far (the config, the number of processes)."""
    ckpt = read_checkpoint(snapshot)
    if ckpt.class_names != classes:
        raise TrainingError(f"--resume: {snapshot} was trained on classes {list(ckpt.class_names)}, "
                            f"the data has {list(classes)}")
    meta = ckpt.meta
    before = int(meta.get("world_size", 1))
    notes = []
    changed = config_changes(ckpt.cfg, cfg)
    if changed:
        notes.append(f"--resume from iteration {ckpt.iteration} with a changed config: {'; '.join(changed)}")
    if before != world.size:
        per = ckpt.cfg.TRAIN.IMS_PER_BATCH
        notes.append(f"resuming a run of {before} process(es) with {world.size}: the global batch goes from "
                     f"{before * per} to {world.size * per} images, so iterations from {ckpt.iteration + 1} on "
                     "see other images than the original run would have")
    live = read_training_weights(snapshot)
    if live is None and "ema_updates" in meta:  # its model.safetensors is an average, not where SGD stopped
        raise CheckpointError(f"{snapshot}: no {TRAINING_WEIGHTS} to resume from (the snapshot of a run with "
                              "TRAIN.EMA_DECAY keeps the weights SGD is at there)")
    return {"weights": ckpt.weights, "momentum": read_momentum(snapshot), "iteration": ckpt.iteration,
            "grad_scaler": meta.get("grad_scaler") or {}, "notes": notes, "changed": bool(changed),
            "training_weights": live, "ema_updates": int(meta.get("ema_updates", 0))}


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


def validation_losses(model: FasterRCNN, cfg: Config, dataset: DetectionDataset,
                      world: dist.World | None = None) -> dict[str, float]:
    """Mean training losses over ``dataset`` (one image at a time, ``TEST.SCALES[0]``, no flip, difficult and
    crowd boxes left out as in training) without changing the model: see :func:`_frozen`. The anchor and RoI
    sampling of image ``i`` is seeded by ``(RNG_SEED, i)``, so the numbers are reproducible. With a
    distributed ``world`` the images are shared out and the sums added up over the processes."""
    world = world or dist.World()
    device = next(model.parameters()).device
    sums = {k: 0.0 for k in LOSS_KEYS}
    with _frozen(model):
        for i in dist.shard(world, len(dataset)):
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
    totals = dist.all_reduce_mean(world, sums)  # the mean of the sums: times world.size is their sum
    return {k: v * world.size / n for k, v in totals.items()}


def validate(model: FasterRCNN, cfg: Config, classes: tuple[str, ...], dataset: DetectionDataset, folder: Path,
             iteration: int, world: dist.World | None = None) -> dict | None:
    """Score ``model`` on ``dataset`` (mAP of the data's default metric and the validation losses) without
    changing it; write the evaluation into ``folder``; return the ``metrics.jsonl`` record. With a distributed
    ``world`` every process detects a share of the images; process 0 scores, writes and returns the record,
    the others return ``None``."""
    from frcnn.engine.evaluate import collect_detections, score_detections, write_eval_outputs
    from frcnn.engine.inference import Predictor

    world = world or dist.World()
    started = time.perf_counter()
    losses = validation_losses(model, cfg, dataset, world)
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[]):
            detections = collect_detections(Predictor(model, cfg, classes), dataset, progress=False, world=world)
    finally:
        for m, mode in modes.items():
            m.training = mode
    if detections is None:
        return None
    result = score_detections(dataset, detections, metric=None)
    result.update(iteration=iteration, split=getattr(dataset, "split", None))
    write_eval_outputs(folder, dataset, detections, result)
    record = {"iteration": iteration, "val_map": result["map"], "val_metric": result["metric"],
              **{f"val_{k}": v for k, v in losses.items()}}
    record.update(val_total=sum(losses.values()), val_images=len(dataset), val_time=time.perf_counter() - started)
    return record


def _trim_metrics(path: Path, iteration: int) -> None:
    """On resume, drop log lines written after the snapshot (they are about to be recomputed), and a last
    line cut short by a kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("iteration", 0) <= iteration:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)
