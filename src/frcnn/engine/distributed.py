"""Several processes, one training: torch.distributed as ``torchrun`` sets it up.

``torchrun --nproc-per-node N -m frcnn train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in their environment; :func:`setup` reads them, joins
the process group (NCCL on CUDA, gloo on the CPU, unless ``DIST_BACKEND`` says otherwise) and puts each
process on ``cuda:LOCAL_RANK`` when the device is CUDA. Without those variables it is one process, and
nothing here talks to anyone. Process 0 ("main") is the one that writes files and prints.

A collective that fails (another process died, the network went away, ``FRCNN_DIST_TIMEOUT`` seconds
passed) becomes a one-line :class:`DistributedError` instead of a hang or a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from frcnn.config import Config, resolve_device
from frcnn.errors import ConfigError, FrcnnError

T = TypeVar("T")
DEFAULT_TIMEOUT = 1800  # seconds a collective may wait for the other processes
LOST_PEER_WORDS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe")


class DistributedError(FrcnnError):
    """The processes of a distributed run lost each other (one died, or a collective timed out)."""


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size`` processes and the device it computes on."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def _env_number(name: str, default: float, kind=int, least: float = 0):
    """An environment variable torchrun (or the user) sets, as a number; anything else is one ConfigError line."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not value >= least or value == float("inf"):
        raise ConfigError(f"environment variable {name}={text!r}: expected a number >= {least:g}")
    return value


def launched_by_torchrun() -> bool:
    return _env_number("WORLD_SIZE", 1, least=1) > 1


def env_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched by torchrun)."""
    rank, size = _env_number("RANK", 0), _env_number("WORLD_SIZE", 1, least=1)
    if launched_by_torchrun() and rank >= size:
        raise ConfigError(f"environment variable RANK={rank} is not below WORLD_SIZE={size}")
    return rank


def setup(cfg: Config) -> World:
    """Join the process group torchrun prepared (once per process) on the config's ``DEVICE``."""
    return join(resolve_device(cfg), cfg.DIST_BACKEND)


def join(device: torch.device, backend: str = "auto") -> World:
    """Join the process group torchrun prepared (once per process); a CUDA ``device`` becomes
    ``cuda:LOCAL_RANK``. Without torchrun: one process on ``device``."""
    if not launched_by_torchrun():
        return World(device=device)
    rank, size = env_rank(), _env_number("WORLD_SIZE", 1, least=1)
    local_rank = _env_number("LOCAL_RANK", 0)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                              "device(s): start at most that many processes per node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("DIST_BACKEND=nccl needs CUDA devices; this run is on the CPU: use gloo (or auto)")
    if not dist.is_initialized():
        timeout = timedelta(seconds=_env_number("FRCNN_DIST_TIMEOUT", DEFAULT_TIMEOUT, float, least=1))
        try:
            dist.init_process_group(backend, timeout=timeout,
                                    device_id=device if backend == "nccl" else None)
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"cannot join the {backend} process group: {str(e).splitlines()[0]}") from None
    return World(rank, size, local_rank, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn the failure of a collective inside the block into one :class:`DistributedError` line."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError is one; gloo also raises plain RuntimeErrors
        text = str(e).lower()
        lost = isinstance(e, dist.DistBackendError) or any(w in text for w in LOST_PEER_WORDS)
        if not (lost and dist.is_initialized()):
            raise
        first = re.sub(r"\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0]) if str(e).strip() else type(e).__name__
        raise DistributedError(f"rank {dist.get_rank()}: {what} failed, another process probably stopped "
                               f"({first[:200]})") from None


def all_reduce_mean(world: World, values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over the processes (the values themselves in one process)."""
    if not world.distributed:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=world.device)
    with collective("averaging the logged losses"):
        dist.all_reduce(t)
    return {k: v / world.size for k, v in zip(keys, t.tolist())}


def all_true(world: World, flag: bool, what: str) -> bool:
    """Whether ``flag`` holds in every process (a collective: every process must call it)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    with collective(what):
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


def broadcast(world: World, value: T, what: str) -> T:
    """Process 0's ``value`` in every process (picklable objects, within this run's own processes)."""
    if not world.distributed:
        return value
    box = [value if world.is_main else None]
    with collective(what):
        dist.broadcast_object_list(box, src=0, device=world.device if world.device.type == "cuda" else None)
    return box[0]


def gather(world: World, value: T, what: str) -> list[T] | None:
    """Every process's ``value`` in rank order on process 0 (``None`` elsewhere)."""
    if not world.distributed:
        return [value]
    out: list[Any] | None = [None] * world.size if world.is_main else None
    with collective(what):
        dist.gather_object(value, out, dst=0)
    return out


def on_main(world: World, action: Callable[[], T], what: str) -> T:
    """Run ``action`` on process 0 only; an error there (one of frcnn's) is raised in every process, so
    all of them stop with the same message and a non-zero exit, and nobody waits forever."""
    result: Any = None
    error = None
    if world.is_main:
        try:
            result = action()
        except FrcnnError as e:
            error = (type(e), str(e))
    error = broadcast(world, error, what)
    if error is not None:
        kind, message = error
        raise kind(message)
    return broadcast(world, result, what)


def shard(world: World, n: int) -> range:
    """The indices ``0 .. n-1`` this process handles when work is split across processes."""
    return range(world.rank, n, world.size)


class _AllReduceSum(torch.autograd.Function):
    """The sum over the processes, differentiable: the gradient of each process's input is the sum of the
    gradients of the output over the processes (each process's loss depends on every input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm whose training statistics are those of the whole global batch, on any device.

    torch's own ``nn.SyncBatchNorm`` runs on GPUs only; this one sums each channel's count, sum and
    squared deviations over the processes with a differentiable all-reduce (two passes, like a one-process
    BatchNorm), so a 2-process run normalises, and back-propagates, as one process holding both halves.
    Outside a distributed training forward it is an ordinary ``BatchNorm2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = (0, 2, 3)
        count = all_reduce(x.new_tensor([x.numel() / x.shape[1]]))
        mean = all_reduce(x.sum(dims)) / count
        centred = x - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def convert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Every trainable ``BatchNorm2d`` of ``module`` as a :class:`SyncBatchNorm2d` with the same parameters and
    statistics (frozen BatchNorm of pretrained backbones is another class and stays as it is)."""
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats).to(next(child.buffers()).device)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module
