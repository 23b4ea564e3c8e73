"""Checkpoint folders: everything ``eval`` and ``detect`` need, and nothing that can run code.

A checkpoint folder holds ``model.safetensors`` (the weights), ``config.yaml`` (the full resolved
config) and ``meta.json`` (class names, iteration, frcnn version). A training run's ``--out`` folder is
itself a checkpoint of its latest snapshot; ``snapshots/iter_NNNNNNN/`` keeps the last
``TRAIN.SNAPSHOT_KEPT`` snapshots, each a checkpoint plus ``optimizer.safetensors`` (momentum buffers)
for ``--resume``. Files are written to a temporary name and renamed, so an interrupted write never
leaves a half-written checkpoint behind. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from frcnn import __version__
from frcnn.config import Config, config_from_dict, dump_yaml
from frcnn.errors import CheckpointError, ConfigError

WEIGHTS, CONFIG, META, OPTIMIZER = "model.safetensors", "config.yaml", "meta.json", "optimizer.safetensors"


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
) -> None:
    """Write a checkpoint folder; ``extra`` (JSON values) goes into ``meta.json`` beside the class names."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(folder / WEIGHTS, lambda p: save_file(state, str(p), metadata={"format": "frcnn"}))
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

    def load_optimizer_into(self, optimizer: torch.optim.Optimizer) -> None:
        load_momentum(optimizer, read_momentum(self.folder), self.folder)


def read_momentum(folder: Path) -> dict[str, torch.Tensor]:
    """The SGD momentum buffers of a snapshot, keyed by the parameter's position in the optimizer."""
    path = folder / OPTIMIZER
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {OPTIMIZER} to resume from")
    _refuse_pickle(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable optimizer state ({e})") from None


def load_momentum(optimizer: torch.optim.Optimizer, buffers: dict[str, torch.Tensor], folder: Path) -> None:
    """Put momentum buffers back, each checked against its parameter's position and shape."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for key, buf in buffers.items():
        index = int(key) if key.isdigit() else -1
        if not 0 <= index < len(params) or params[index].shape != buf.shape:
            raise CheckpointError(f"{folder / OPTIMIZER}: momentum buffer {key} does not fit the model's "
                                  f"{len(params)} parameters (another backbone or class count?)")
        optimizer.state[params[index]]["momentum_buffer"] = buf.to(params[index].device)


PICKLE_SUFFIXES = {".pth", ".pt", ".pkl", ".pickle", ".ckpt", ".bin", ".tar"}


def _refuse_pickle(path: Path) -> None:
    """A pickle (or a ``torch.save`` zip of pickles) under the name of a safetensors file is refused by its
    first bytes, before anything reads it."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80" or head == b"PK\x03\x04":
        kind = "a torch.save zip archive" if head == b"PK\x03\x04" else "a Python pickle"
        raise CheckpointError(f"{path}: is {kind}, not safetensors; frcnn never unpickles checkpoints")


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Read and validate a checkpoint folder; any problem is one :class:`CheckpointError` line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder")
    for name in (WEIGHTS, CONFIG, META):
        if not (folder / name).is_file():
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f"; {', '.join(pickles)} would need unpickling, which frcnn never does" if pickles else ""
            raise CheckpointError(f"{folder}: not a frcnn checkpoint (missing {name}{hint})")
    _refuse_pickle(folder / WEIGHTS)
    try:
        meta = json.loads((folder / META).read_text())
        classes = tuple(str(c) for c in meta["classes"])
        iteration = int(meta.get("iteration", 0))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / META}: unreadable ({type(e).__name__}: {e})") from None
    if meta.get("format") != "frcnn-checkpoint" or not classes:
        raise CheckpointError(f"{folder / META}: not a frcnn checkpoint")
    try:
        cfg = config_from_dict(yaml.safe_load((folder / CONFIG).read_text()) or {})
    except (yaml.YAMLError, ConfigError) as e:
        raise CheckpointError(f"{folder / CONFIG}: {str(e).splitlines()[0]}") from None
    try:
        weights = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder / WEIGHTS}: unreadable weights ({e})") from None
    return Checkpoint(folder, cfg, classes, iteration, weights)


def choose_device(device: str | torch.device | None = None, what: str = "device") -> torch.device:
    """The device to run a checkpoint on: ``None`` or ``"auto"`` is CUDA when this machine has it, else the
    CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or a :class:`torch.device`) as given.

    Never the checkpoint's ``DEVICE``: where a model was trained is a fact about the run, not a requirement
    of the checkpoint. A device this machine lacks is a one-line :class:`ConfigError`; ``what`` names the
    setting in that line (e.g. ``"--device"``).
    """
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
    try:
        model.load_state_dict(ckpt.weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.folder / WEIGHTS}: weights do not fit the config ({str(e)[:200]})") from None
    ckpt.cfg = cfg
    return model.to(device).eval(), ckpt


def prune_snapshots(snap_root: Path, keep: int) -> None:
    snaps = sorted(p for p in snap_root.glob("iter_*") if p.is_dir())
    for old in snaps[: max(0, len(snaps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_snapshot(snap_root: Path) -> Path | None:
    snaps = sorted(p for p in snap_root.glob("iter_*") if (p / META).is_file())
    return snaps[-1] if snaps else None
