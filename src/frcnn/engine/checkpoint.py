"""Checkpoint folders: everything ``eval`` and ``detect`` need, and nothing that can run code.

A checkpoint folder holds ``model.safetensors`` (the weights), ``config.yaml`` (the full resolved
config) and ``meta.json`` (class names, iteration, frcnn version). A training run's ``--out`` folder is
itself a checkpoint of its latest snapshot; ``snapshots/iter_NNNNNNN/`` keeps the last
``TRAIN.SNAPSHOT_KEPT`` snapshots, each a checkpoint plus ``optimizer.safetensors`` (momentum buffers)
for ``--resume``. Files are written to a temporary name and renamed, so an interrupted write never
leaves a half-written checkpoint behind. Nothing is ever unpickled. Reading checks every file against
the others (the weights' keys, shapes and values against the model the config and the class names
describe; momentum buffers against the optimizer's parameters): a damaged checkpoint is one
:class:`CheckpointError` line naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from frcnn import __version__
from frcnn.config import Config, choose_device, config_from_dict, config_to_dict, dump_yaml
from frcnn.errors import CheckpointError, ConfigError

WEIGHTS, CONFIG, META, OPTIMIZER = "model.safetensors", "config.yaml", "meta.json", "optimizer.safetensors"
TRAINING_WEIGHTS = "training_weights.safetensors"  # with TRAIN.EMA_DECAY: the weights SGD is at (frcnn.engine.ema)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    cfg: Config,
    class_names: list[str] | tuple[str, ...],
    iteration: int,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict[str, Any] | None = None,
    training_model: torch.nn.Module | None = None,
) -> None:
    """Write a checkpoint folder; ``extra`` (JSON values) goes into ``meta.json`` beside the class names.
    ``training_model``: the weights SGD is at when ``model`` is their average, for ``--resume``."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, net in ((WEIGHTS, model), (TRAINING_WEIGHTS, training_model)):
        if net is not None:
            state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
            _atomic_write(folder / name, lambda p, s=state: save_file(s, str(p), metadata={"format": "frcnn"}))
    _atomic_write(folder / CONFIG, lambda p: p.write_text(dump_yaml(cfg)))
    meta = {"format": "frcnn-checkpoint", "version": __version__, "classes": list(class_names),
            "iteration": iteration, **(extra or {})}
    if optimizer is not None:
        buffers = {
            str(i): s["momentum_buffer"].detach().contiguous().cpu()
            for i, s in enumerate(optimizer.state[p] for g in optimizer.param_groups for p in g["params"])
            if s.get("momentum_buffer") is not None
        }
        _atomic_write(folder / OPTIMIZER, lambda p: save_file(buffers, str(p)))
    _atomic_write(folder / META, lambda p: p.write_text(json.dumps(meta, indent=2)))


@dataclass
class Checkpoint:
    folder: Path
    cfg: Config
    class_names: tuple[str, ...]
    iteration: int
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # meta.json as read and checked (world_size, grad_scaler)

    def load_optimizer_into(self, optimizer: torch.optim.Optimizer) -> None:
        load_momentum(optimizer, read_momentum(self.folder), self.folder)


# ------------------------------------------------------------------------------------- reading, checked
# Every file of a checkpoint comes from disk and may be truncated, overwritten or hand-edited: each reader
# below turns whatever it finds into values of the right type or one CheckpointError line that starts
# with the file's path and says what is wrong with it.

def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}): corrupted") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None


def _read_safetensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an empty, truncated or garbled file is one line with its size."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), no {what} in it")
    _refuse_pickle(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        detail = detail.replace("Error while deserializing header: ", "header: ")
        raise CheckpointError(f"{path}: not a valid safetensors file of {what} ({size} bytes, {detail}): "
                              "truncated or corrupted") from None


def _whole_number(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def _read_meta(folder: Path) -> dict[str, Any]:
    """``meta.json``, checked: a JSON object of format, class names, iteration (and what training adds)."""
    path = folder / META
    try:
        meta = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno}): "
                              "truncated or corrupted") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {_kind(meta)}")
    if meta.get("format") != "frcnn-checkpoint":
        raise CheckpointError(f"{path}: not a frcnn checkpoint (format {_short(meta.get('format'))}, "
                              "expected 'frcnn-checkpoint')")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c.strip() for c in classes):
        raise CheckpointError(f"{path}: classes must be a non-empty list of class names (strings), "
                              f"got {_short(classes)}")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise CheckpointError(f"{path}: class {repeated[0]!r} is listed {classes.count(repeated[0])} times")
    if not _whole_number(meta.get("iteration"), 0):
        got = _short(meta["iteration"]) if "iteration" in meta else "nothing"
        raise CheckpointError(f"{path}: iteration must be a whole number >= 0, got {got}")
    if "world_size" in meta and not _whole_number(meta["world_size"], 1):
        raise CheckpointError(f"{path}: world_size must be a whole number >= 1, got {_short(meta['world_size'])}")
    if "ema_updates" in meta and not _whole_number(meta["ema_updates"], 0):
        raise CheckpointError(f"{path}: ema_updates must be a whole number >= 0, got {_short(meta['ema_updates'])}")
    scaler = meta.get("grad_scaler")
    if scaler is not None and not isinstance(scaler, dict):
        raise CheckpointError(f"{path}: grad_scaler must be an object, got {_kind(scaler)}")
    if scaler:
        bad = [k for k in SCALER_KEYS if not isinstance(scaler.get(k), (int, float)) or isinstance(scaler.get(k), bool)
               or not math.isfinite(scaler[k])]
        if bad:
            raise CheckpointError(f"{path}: grad_scaler needs a finite number for {', '.join(bad)}")
    return meta


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: a saved config never has them, and aliases nested in aliases
    are the YAML form of the billion-laughs attack."""

    def compose_node(self, parent, index):  # noqa: ANN001, ANN201 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "an alias (*name), which frcnn configs never use",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def _missing_keys(data: dict[str, Any], full: dict[str, Any], prefix: str = "") -> list[str]:
    missing = []
    for key, value in full.items():
        if key not in data:
            missing.append(prefix + key)
        elif isinstance(value, dict) and isinstance(data[key], dict):
            missing += _missing_keys(data[key], value, f"{prefix}{key}.")
    return missing


def read_config(path: str | Path) -> Config:
    """A checkpoint's (or a run's) ``config.yaml``: the full resolved config it was written with. Anything
    else (not YAML, not a mapping, an unknown key, a wrong type, a file cut short) is one CheckpointError
    line naming the file."""
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise CheckpointError(f"{path}: empty file; a checkpoint stores its full config here")
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise CheckpointError(f"{path}: not valid YAML ({problem}{where})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a mapping of config keys, got {_kind(data)}")
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {str(e).splitlines()[0]}") from None
    missing = _missing_keys(data, config_to_dict(Config()))
    if missing and not text.endswith("\n"):  # frcnn writes every key and a final newline
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: cut short (ends mid-line, no {missing[0]}{more})")
    return cfg


NECK_NAMES = {"none": "one C4 feature map", "fpn": "a feature pyramid"}


def weights_neck(weights: dict[str, torch.Tensor]) -> str:
    """``fpn`` when the state dict holds a feature pyramid's layers (``head.fpn.*``, :mod:`frcnn.model.fpn`), else
    ``none``."""
    return "fpn" if any(k.startswith("head.fpn.") for k in weights) else "none"


def weights_problem(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """What keeps ``weights`` from loading into a model whose ``state_dict()`` is ``expected`` (tensors or meta
    tensors), in short: another NECK (C4 weights for an FPN model or the reverse), missing and unexpected keys, the
    first tensor of another shape (both shapes) or kind, the first tensor holding NaN or infinity; ``None`` when
    they fit."""
    def first(keys: list[str], what: str) -> str:
        return f"{what} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")

    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    file_neck, model_neck = weights_neck(weights), weights_neck(expected)
    if file_neck != model_neck:
        return (f"the weights are a NECK={file_neck} model's ({NECK_NAMES[file_neck]}), the model is NECK={model_neck} "
                f"({NECK_NAMES[model_neck]}): a checkpoint keeps the NECK it was trained with")
    if missing or unexpected:
        keys = [first(missing, "missing")] if missing else []
        keys += [first(unexpected, "unexpected")] if unexpected else []
        return f"{', '.join(keys)} (another BACKBONE?)"
    shapes = [k for k in expected if weights[k].shape != expected[k].shape]
    if shapes:
        k = shapes[0]
        got, need = list(weights[k].shape), list(expected[k].shape)
        more = f" ({len(shapes) - 1} more tensors differ)" if len(shapes) > 1 else ""
        hint = ""
        if k.endswith("cls_score_net.weight") and got and need:
            hint = f": weights for {got[0] - 1} classes, the model has {need[0] - 1}"
        return f"{k} is {got} in the file, the model needs {need}{hint}{more}"
    kinds = [k for k in expected if weights[k].dtype.is_floating_point != expected[k].dtype.is_floating_point]
    if kinds:
        return f"{kinds[0]} is {weights[kinds[0]].dtype}, the model needs {expected[kinds[0]].dtype}"
    for k, v in weights.items():
        if v.dtype.is_floating_point and not bool(torch.isfinite(v).all()):
            return f"{k} holds NaN or infinite values (corrupted, or saved from a diverged run)"
    return None


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path, what: str = "the model") -> None:
    """``model.load_state_dict(weights)`` after :func:`weights_problem`: weights that do not fit are one
    CheckpointError line naming ``path`` (the weights file) and the first key that differs."""
    problem = weights_problem(weights, model.state_dict())
    if problem is not None:
        raise CheckpointError(f"{path}: does not fit {what}: {problem}")
    model.load_state_dict(weights, strict=True)


def _model_state(cfg: Config, num_classes: int, config_path: Path) -> dict[str, torch.Tensor]:
    """The state_dict layout (meta tensors: shapes and dtypes, no memory, no RNG draw) of the model ``cfg``
    describes."""
    from frcnn.model.detector import FasterRCNN

    try:
        with torch.device("meta"):
            return FasterRCNN(cfg, num_classes, load_pretrained=False).state_dict()
    except Exception as e:  # noqa: BLE001 - values read from a file; whatever they break is that file's problem
        detail = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{config_path}: describes no model frcnn can build ({type(e).__name__}: "
                              f"{detail[:150]})") from None


def read_training_weights(folder: Path) -> dict[str, torch.Tensor] | None:
    """The weights SGD was at in a snapshot of a run with ``TRAIN.EMA_DECAY`` (its ``model.safetensors`` holds
    their average); None for a snapshot without them."""
    path = folder / TRAINING_WEIGHTS
    return _read_safetensors(path, "training weights") if path.is_file() else None


def read_momentum(folder: Path) -> dict[str, torch.Tensor]:
    """The SGD momentum buffers of a snapshot, keyed by the parameter's position in the optimizer."""
    path = folder / OPTIMIZER
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {OPTIMIZER} to resume from")
    return _read_safetensors(path, "momentum buffers")


def load_momentum(optimizer: torch.optim.Optimizer, buffers: dict[str, torch.Tensor], folder: Path) -> None:
    """Put momentum buffers back, each checked against its parameter's position, shape and dtype first: a
    buffer that does not fit is one CheckpointError line, and the optimizer is left untouched."""
    path = folder / OPTIMIZER
    params = [p for g in optimizer.param_groups for p in g["params"]]
    n = len(params)
    if len(buffers) > n:
        raise CheckpointError(f"{path}: {len(buffers)} momentum buffers for the model's {n} parameters "
                              "(another backbone or class count?)")
    placed = {}
    for key, buf in buffers.items():
        if not (key.isascii() and key.isdigit()):
            raise CheckpointError(f"{path}: key {_short(key)} is not a parameter position (0..{n - 1})")
        index = int(key)
        if index >= n:
            raise CheckpointError(f"{path}: momentum buffer {key} but the model has {n} parameters (0..{n - 1}): "
                                  "another backbone?")
        param = params[index]
        if buf.shape != param.shape:
            raise CheckpointError(f"{path}: momentum buffer {key} is {list(buf.shape)}, parameter {key} is "
                                  f"{list(param.shape)} (another backbone or class count?)")
        if not buf.dtype.is_floating_point:
            raise CheckpointError(f"{path}: momentum buffer {key} is {buf.dtype}, not floating point")
        if not bool(torch.isfinite(buf).all()):
            raise CheckpointError(f"{path}: momentum buffer {key} holds NaN or infinite values")
        placed[index] = buf
    for index, buf in placed.items():
        optimizer.state[params[index]]["momentum_buffer"] = buf.to(device=params[index].device,
                                                                   dtype=params[index].dtype)


PICKLE_SUFFIXES = {".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".bin", ".tar"}


def _refuse_pickle(path: Path) -> None:
    """A pickle (or a ``torch.save`` zip of pickles) under the name of a safetensors file is refused by its
    first bytes, before anything reads it."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if head[:1] == b"\x80" or head == b"PK\x03\x04":
        kind = "a torch.save zip archive" if head == b"PK\x03\x04" else "a Python pickle"
        raise CheckpointError(f"{path}: is {kind}, not safetensors; frcnn never unpickles checkpoints")


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Read and validate a checkpoint folder; any problem is one :class:`CheckpointError` line naming the file:
    a file missing, empty, truncated or garbled, ``meta.json`` or ``config.yaml`` of the wrong form, weights
    whose keys, shapes or values do not fit the model that config and those classes describe."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    for name in (WEIGHTS, CONFIG, META):
        if not (folder / name).is_file():
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f"; {', '.join(pickles)} would need unpickling, which frcnn never does" if pickles else ""
            raise CheckpointError(f"{folder}: not a frcnn checkpoint (missing {name}{hint})")
    _refuse_pickle(folder / WEIGHTS)
    meta = _read_meta(folder)
    classes = tuple(meta["classes"])
    cfg = read_config(folder / CONFIG)
    weights = _read_safetensors(folder / WEIGHTS, "weights")
    problem = weights_problem(weights, _model_state(cfg, len(classes), folder / CONFIG))
    if problem is not None:
        raise CheckpointError(f"{folder / WEIGHTS}: does not fit {CONFIG} (BACKBONE {cfg.BACKBONE}, NECK {cfg.NECK}) "
                              f"and {META} ({len(classes)} classes): {problem}")
    return Checkpoint(folder, cfg, classes, meta["iteration"], weights, meta)


def load_model(folder: str | Path, device: str | torch.device | None = None,
               overrides: dict[str, Any] | None = None):
    """Build the detector a checkpoint describes and load its weights: ``(model, checkpoint)``, the model in
    eval mode on ``device`` (see :func:`choose_device`: ``None`` is CUDA when there is one, else the CPU;
    the checkpoint's ``DEVICE`` is not used)."""
    from frcnn.config import merge
    from frcnn.model.detector import FasterRCNN

    device = choose_device(device)
    ckpt = read_checkpoint(folder)
    cfg = merge(ckpt.cfg, overrides or {})
    # the weights come from the checkpoint, never from the backbone file named at training time
    model = FasterRCNN(cfg, len(ckpt.class_names), load_pretrained=False)
    load_weights(model, ckpt.weights, ckpt.folder / WEIGHTS,
                 f"{CONFIG} with these settings (BACKBONE {cfg.BACKBONE}, NECK {cfg.NECK})")
    ckpt.cfg = cfg
    return model.to(device).eval(), ckpt


def snapshot_folders(snap_root: Path) -> list[Path]:
    """The ``iter_NNNNNNN`` folders under ``snap_root``, complete or not, in iteration order."""
    found = []
    for p in snap_root.glob("iter_*"):
        digits = p.name[len("iter_"):]
        if digits.isascii() and digits.isdigit() and p.is_dir():
            found.append((int(digits), p))
    return [p for _, p in sorted(found)]


def prune_snapshots(snap_root: Path, keep: int) -> None:
    snaps = snapshot_folders(snap_root)
    for old in snaps[: max(0, len(snaps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_snapshot(snap_root: Path, say: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete snapshot (its ``meta.json``, written last, is there), or ``None``. Newer folders
    without it are snapshots whose writing was interrupted: skipped, and with ``say`` (e.g. ``print``) one
    line each says so."""
    snaps = snapshot_folders(snap_root)
    complete = [p for p in snaps if (p / META).is_file()]
    latest = complete[-1] if complete else None
    if say is not None:
        for p in snaps[snaps.index(latest) + 1 if latest is not None else 0:]:  # all newer ones are incomplete
            say(f"{p}: skipped, an incomplete snapshot (no {META}: its writing was interrupted)")
    return latest
