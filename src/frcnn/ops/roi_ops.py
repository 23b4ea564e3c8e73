"""Parallel RoI pooling on the CPU in PyTorch ops: RoIAlign, crop pooling and RoIPool as sparse gathers.

torchvision's CPU ``roi_align`` / ``roi_pool`` loop over RoIs, channels and sample points one scalar at a
time on one thread, and their backward passes are slower still. Here each mode becomes a weighted (or max)
gather of whole channel rows of the feature map laid out channels-last, ``(N * H * W, C)``, done by
``torch.nn.functional.embedding_bag`` (vectorised over channels, parallel over output bins).

**The separable formulation.** Bilinear RoIAlign of one RoI is

    out[c, ph, pw] = 1 / (gh * gw) * sum_iy sum_ix  bilinear(F[c], y(ph, iy), x(pw, ix))

over a ``gh x gw`` grid of sample points per bin. A bilinear sample is ``sum_y sum_x a(y) b(x) F[c, y, x]``
with ``a`` the two row weights ``(1 - ly, ly)`` and ``b`` the two column weights, and torchvision's edge rules
keep it a product: a sample with ``y`` outside ``[-1, H]`` *or* ``x`` outside ``[-1, W]`` is zero, which is the
product of a row factor (zero when ``y`` is out) and a column factor (zero when ``x`` is out); coordinates
are clamped per axis. Summing over the samples therefore factors into

    out[c, ph, pw] = sum_y sum_x  Wy[ph, y] * Wx[pw, x] * F[c, y, x]

with ``Wy`` (P x H) the row weights averaged over each bin's ``gh`` samples, and ``Wx`` (P x W) likewise.
Each row of ``Wy`` is non-zero on a short window (the bin's rows plus one), so the output bin ``(ph, pw)`` is
a weighted sum of the few feature-map pixels ``Wy[ph] x Wx[pw]``: the entries of that outer product,
zeros dropped, are one "bag" of embedding_bag. ``sampling_ratio=0`` (torchvision: ``ceil(roi_h / P)`` samples
per bin, per RoI) is vectorised over RoIs by building the samples for the largest count and masking the
rest. The backward pass is the transposed gather: one bag per feature-map pixel collecting the output bins
that read it (entries sorted by pixel), so it needs no atomics and no scatter.

Crop pooling (``affine_grid`` + bilinear ``grid_sample`` with zero padding and ``align_corners=True``)
separates the same way, one sample per bin and each out-of-map corner zero on its own axis; the 2x2 max
pooling that follows is ``max_pool2d`` itself. RoIPool (a max over integer bins) is a max-mode bag of the
bin's pixels, listed in torchvision's row-major order so that ties (zeros after a ReLU) send the gradient to
the same pixel.

The gradient flows to the features only: the RoIs are constants here (their weights are built detached), so
``pooling.crop_pool`` sends RoIs that carry a gradient (``TRAIN.JOINT=exact``) to ``grid_sample`` instead.
"""

from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor


def _local_weights(lo: Tensor, hi: Tensor, w_lo: Tensor, w_hi: Tensor) -> tuple[Tensor, Tensor]:
    """Per-bin weights of one axis on a local window: (base (R, P), weights (R, P, K), K).

    ``lo``/``hi`` (R, P, S) are the two cells each sample reads, ``w_lo``/``w_hi`` their weights (zero for
    samples that do not count); cells are non-decreasing along S.
    """
    base = lo[:, :, 0]
    live = (w_lo != 0) | (w_hi != 0)
    span = torch.where(live, hi - base[:, :, None], torch.zeros_like(hi))
    k = int(span.max()) + 1 if span.numel() else 1
    local = torch.zeros((*base.shape, k), dtype=w_lo.dtype, device=w_lo.device)
    local.scatter_add_(2, (lo - base[:, :, None]).clamp(0, k - 1), w_lo)
    local.scatter_add_(2, (hi - base[:, :, None]).clamp(0, k - 1), w_hi)
    return base, local


def _align_axis(start: Tensor, length: Tensor, p: int, size: int, sampling_ratio: int) -> tuple[Tensor, Tensor]:
    """RoIAlign weights along one axis (torchvision's CPU kernel, aligned=False): base, weights, K."""
    bin_size = length / p
    if sampling_ratio > 0:
        grid = torch.full_like(length, sampling_ratio)
    else:
        grid = torch.ceil(length / p)
    s = int(grid.max()) if grid.numel() else 1
    ph = torch.arange(p, dtype=start.dtype, device=start.device)
    i = torch.arange(s, dtype=start.dtype, device=start.device)
    # y = roi_start + ph * bin_size + (iy + .5) * bin_size / grid, in that order
    pos = (start[:, None, None] + ph[None, :, None] * bin_size[:, None, None]) + (
        (i[None, None, :] + 0.5) * bin_size[:, None, None]
    ) / grid[:, None, None]
    valid = (i[None, None, :] < grid[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    lo = pos.floor().long()
    edge = lo >= size - 1
    lo = torch.where(edge, torch.full_like(lo, size - 1), lo)
    hi = torch.where(edge, lo, lo + 1)
    frac = torch.where(edge, torch.zeros_like(pos), pos - lo.to(pos.dtype))
    scale = valid.to(pos.dtype) / grid[:, None, None]
    return _local_weights(lo, hi, (1 - frac) * scale, frac * scale)


def _crop_axis(norm: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Bilinear grid_sample weights (align_corners=True, zero padding) along one axis: base, weights, K."""
    pos = (norm + 1) * ((size - 1) / 2)
    lo = pos.floor()
    frac = pos - lo
    lo = lo.long()[:, :, None]
    hi = lo + 1
    w_lo = ((1 - frac)[:, :, None]) * ((lo >= 0) & (lo < size)).to(pos.dtype)
    w_hi = frac[:, :, None] * ((hi >= 0) & (hi < size)).to(pos.dtype)
    lo, hi = lo.clamp(-1, size), hi.clamp(-1, size)
    return _local_weights(lo, hi, w_lo, w_hi)


def _bags(batch: Tensor, ybase: Tensor, wy: Tensor, xbase: Tensor, wx: Tensor, h: int, w: int) -> _Plan:
    """Outer products Wy[r, a, ph] x Wx[r, b, pw] as compact bags, in (r, a, b, ph, pw) order.

    ``wy`` (R, A, P, KY) and ``wx`` (R, B, Q, KX) hold each bin's weights on a window starting at ``ybase``
    (R, A, P) / ``xbase`` (R, B, Q); ``A = B = 2`` are crop pooling's 2x2 max-pool phases, else 1.
    """
    r, a, p, ky = wy.shape
    b, q, kx = wx.shape[1:]
    weight = wy[:, :, None, :, None, :, None] * wx[:, None, :, None, :, None, :]  # (R, A, B, P, Q, KY, KX)
    ys = ybase[..., None] + torch.arange(ky, device=wy.device)
    xs = xbase[..., None] + torch.arange(kx, device=wy.device)
    flat = (batch.view(r, 1, 1, 1, 1, 1, 1) * h + ys[:, :, None, :, None, :, None]) * w
    flat = flat + xs[:, None, :, None, :, None, :]
    keep = weight != 0
    return _Plan(flat[keep], weight[keep], keep.reshape(-1, ky * kx).sum(1), r, a * b, p)


def _max_bags(batch: Tensor, ylo: Tensor, yhi: Tensor, xlo: Tensor, xhi: Tensor, h: int, w: int) -> _Plan:
    """RoIPool's bins [ylo, yhi) x [xlo, xhi) (R, P) as bags of pixels in row-major order (torchvision's ties)."""
    r, p = ylo.shape
    ky = max(int((yhi - ylo).max()), 1)
    kx = max(int((xhi - xlo).max()), 1)
    ys = ylo[:, :, None] + torch.arange(ky, device=ylo.device)  # (R, P, KY)
    xs = xlo[:, :, None] + torch.arange(kx, device=ylo.device)
    keep = (ys < yhi[:, :, None])[:, :, None, :, None] & (xs < xhi[:, :, None])[:, None, :, None, :]
    flat = (batch.view(r, 1, 1, 1, 1) * h + ys[:, :, None, :, None]) * w + xs[:, None, :, None, :]
    return _Plan(flat[keep], None, keep.reshape(-1, ky * kx).sum(1), r, 1, p)


class _Plan:
    """Bags of one pooling call: entry indices into the (N*H*W, C) table, weights (None: max), bag sizes."""

    def __init__(self, index: Tensor, weight: Tensor | None, counts: Tensor, rois: int, phases: int, size: int):
        self.index, self.weight, self.counts = index, weight, counts
        self.rois, self.phases, self.size = rois, phases, size
        self.starts = torch.cat((counts.new_zeros(1), torch.cumsum(counts, 0)))

    def chunks(self):
        """(first RoI, last RoI + 1, first bag, first entry, last entry) for blocks of CHUNK RoIs."""
        bins = self.phases * self.size * self.size
        firsts = list(range(0, self.rois, CHUNK))
        bounds = self.starts[torch.tensor([*firsts, self.rois]) * bins].tolist()
        for k, r0 in enumerate(firsts):
            yield r0, min(r0 + CHUNK, self.rois), r0 * bins, bounds[k], bounds[k + 1]


CHUNK = 8  # RoIs per block: a block's channels-last output (CHUNK * bins, C) stays in cache for its transpose


_POOL: dict[int, ThreadPoolExecutor] = {}


def _run_blocks(plan: _Plan, block) -> None:
    """Run ``block(worker, r0, r1, b0, e0, e1)`` on every block of RoIs: on ``torch.get_num_threads()`` Python
    threads, each op in them single-threaded (many small OpenMP regions stall on a busy machine; whole blocks per
    thread do not). Worker ``k`` always gets blocks ``k, k + threads, ...`` in that order, whichever pool thread
    runs it, so what a worker accumulates, and in which order, does not depend on the scheduling."""
    chunks = list(plan.chunks())
    threads = min(torch.get_num_threads(), len(chunks))
    if threads <= 1:
        for chunk in chunks:
            block(0, *chunk)
        return
    pool = _POOL.get(threads) or _POOL.setdefault(threads, ThreadPoolExecutor(threads, "frcnn-roi"))
    inference = torch.is_inference_mode_enabled()  # an output made under the caller's inference_mode can only
    # be written in inference mode, and, like grad mode, inference mode is per thread

    def worker(k: int) -> None:
        # grad mode is per thread: a worker's is on, unlike the autograd.Function's own
        with torch.inference_mode() if inference else contextlib.nullcontext(), torch.no_grad():
            for chunk in chunks[k::threads]:
                block(k, *chunk)

    torch.set_num_threads(1)
    try:
        list(pool.map(worker, range(threads)))
    finally:
        torch.set_num_threads(threads)


class _Gather(torch.autograd.Function):
    """Pooled (R, C, P, P) from bags over the channels-last table, a block of RoIs at a time.

    Weighted bags are summed (RoIAlign, crop pooling; with 4 phases, crop's 2x2 max pooling follows as a max
    over the phases, first maximum winning like ``max_pool2d``); unweighted bags are maxed (RoIPool, first
    maximum winning like torchvision). Each block's channels-last result is copied into the output while it is
    still in cache: as it is when the output is to be channels-last (features that were), else transposed.
    Backward: each block's output gradient, back to channels-last, is added to the
    table's rows the block read (``index_add_`` for sums, ``scatter_add_`` at the arg-max).
    """

    @staticmethod
    def forward(ctx, table: Tensor, plan: _Plan, channels_last: bool) -> Tensor:
        c = table.shape[1]
        p2 = plan.size * plan.size
        out = table.new_empty((plan.rois, p2, c) if channels_last else (plan.rois, c, p2))
        argmax = None
        if table.requires_grad and (plan.weight is None or plan.phases > 1):
            kind = torch.uint8 if plan.weight is not None else torch.int32
            argmax = torch.empty((plan.rois, p2, c), dtype=kind, device=table.device)

        def block(_worker: int, r0: int, r1: int, b0: int, e0: int, e1: int) -> None:
            n = r1 - r0
            offsets = plan.starts[b0 : b0 + n * plan.phases * p2] - e0
            index = plan.index[e0:e1]
            if plan.weight is None:
                pooled, _, _, where = torch.embedding_bag(table, index, offsets, False, 2, False, None, False, None)
                if argmax is not None:
                    empty = (plan.counts[b0 : b0 + n * p2] == 0).view(n, p2, 1)
                    argmax[r0:r1] = where.view(n, p2, c).masked_fill(empty, -1)
            else:
                pooled = F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=plan.weight[e0:e1])
                if plan.phases > 1:
                    pooled, where = pooled.view(n, plan.phases, p2, c).max(1)
                    if argmax is not None:
                        argmax[r0:r1] = where
            out[r0:r1].copy_(pooled.view(n, p2, c) if channels_last else pooled.view(n, p2, c).transpose(1, 2))

        _run_blocks(plan, block)
        ctx.plan, ctx.argmax, ctx.rows = plan, argmax, table.shape[0]
        if channels_last:
            return out.view(plan.rois, plan.size, plan.size, c).permute(0, 3, 1, 2)
        return out.view(plan.rois, c, plan.size, plan.size)

    @staticmethod
    def backward(ctx, grad: Tensor):
        plan, argmax = ctx.plan, ctx.argmax
        r, c = grad.shape[:2]
        p2 = plan.size * plan.size
        grad = grad.reshape(r, c, p2)
        bag = None
        if plan.weight is not None:
            bag = torch.repeat_interleave(torch.arange(plan.counts.numel(), device=grad.device), plan.counts)
        # one gradient table per worker (not per pool thread): no two threads add to one row, and the sums are
        # the same, bit for bit, however the pool schedules the workers (a seeded run reproduces)
        tables: dict[int, Tensor] = {}

        def block(worker: int, r0: int, r1: int, b0: int, e0: int, e1: int) -> None:
            grad_table = tables.get(worker)
            if grad_table is None:
                grad_table = tables[worker] = grad.new_zeros((ctx.rows, c))
            n = r1 - r0
            rows = grad[r0:r1].transpose(1, 2)  # (n, p2, C)
            if bag is None:  # RoIPool: the gradient goes to each bin's arg-max (none for an empty bin)
                where = argmax[r0:r1].view(n * p2, c).long()
                hit = where >= 0
                grad_table.scatter_add_(0, where.clamp(min=0), rows.reshape(n * p2, c) * hit)
                return
            if plan.phases > 1:  # crop: to the phase that won the 2x2 max
                rows = rows.new_zeros((n, plan.phases, p2, c)).scatter_(1, argmax[r0:r1, None].long(), rows[:, None])
            rows = rows.reshape(-1, c)
            grad_table.index_add_(0, plan.index[e0:e1], rows[bag[e0:e1] - b0] * plan.weight[e0:e1, None])

        _run_blocks(plan, block)
        return functools.reduce(torch.add, (tables[k] for k in sorted(tables))), None, None


def _no_rois(features: Tensor, size: int) -> Tensor:
    """(0, C, size, size), still attached to ``features`` so that a backward pass goes through."""
    return features[:0, :, :1, :1].expand(0, features.shape[1], size, size).contiguous()


def _round_half_away(x: Tensor) -> Tensor:
    return (torch.sign(x) * torch.floor(x.abs() + 0.5)).long()


def _table(features: Tensor, dtype: torch.dtype) -> Tensor:
    """(N, C, H, W) -> (N * H * W, C): each pixel's channels contiguous, one row per pixel."""
    n, c, h, w = features.shape
    return features.to(dtype).permute(0, 2, 3, 1).contiguous().view(n * h * w, c)


def _channels_last(features: Tensor) -> bool:
    """Whether ``features`` are laid out channels-last (and not also contiguous): the crops then are too, as a
    convolution's output follows its input, and a channels-last tail reads them without a conversion."""
    return features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous()


def _compute_dtype(features: Tensor) -> torch.dtype:
    return features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32


def roi_align(features: Tensor, rois: Tensor, size: int, spatial_scale: float, sampling_ratio: int = 0) -> Tensor:
    """``torchvision.ops.roi_align(features, rois, size, spatial_scale, sampling_ratio, aligned=False)``."""
    n, c, h, w = features.shape
    if rois.shape[0] == 0:
        return _no_rois(features, size)
    dtype = _compute_dtype(features)
    rois = rois.detach().to(dtype)
    x1, y1, x2, y2 = (rois[:, k] * spatial_scale for k in range(1, 5))
    ybase, wy = _align_axis(y1, torch.clamp(y2 - y1, min=1.0), size, h, sampling_ratio)
    xbase, wx = _align_axis(x1, torch.clamp(x2 - x1, min=1.0), size, w, sampling_ratio)
    plan = _bags(rois[:, 0].long(), ybase[:, None], wy[:, None], xbase[:, None], wx[:, None], h, w)
    return _Gather.apply(_table(features, dtype), plan, _channels_last(features)).to(features.dtype)


def crop_theta(rois: Tensor, stride: int, h: int, w: int) -> Tensor:
    """Crop pooling's affine transforms (R, 2, 3): the output grid onto each RoI, in grid_sample's [-1, 1]."""
    x1, y1, x2, y2 = (rois[:, k] / stride for k in range(1, 5))
    # grid_sample's coordinates run from -1 (first cell centre) to 1 (last): a span of (w - 1) cells.
    # A map one cell wide has no span; any finite divisor then samples that one column.
    sw, sh = max(w - 1, 1), max(h - 1, 1)
    theta = rois.new_zeros((rois.shape[0], 2, 3))
    theta[:, 0, 0] = (x2 - x1) / sw
    theta[:, 0, 2] = (x1 + x2 - w + 1) / sw
    theta[:, 1, 1] = (y2 - y1) / sh
    theta[:, 1, 2] = (y1 + y2 - h + 1) / sh
    return theta


def crop_pool(features: Tensor, rois: Tensor, size: int, stride: int, max_pool: bool = True) -> Tensor:
    """``frcnn.model.pooling.crop_pool``: affine_grid + bilinear grid_sample (+ 2x2 max pool) as bags."""
    n, c, h, w = features.shape
    r = rois.shape[0]
    if r == 0:
        return _no_rois(features, size)
    rois = rois.detach()
    g = size * 2 if max_pool else size
    with torch.autocast(features.device.type, enabled=False):  # the very sampling positions of grid_sample's
        grid = F.affine_grid(crop_theta(rois, stride, h, w), [r, 1, g, g], align_corners=True)
    xbase, wx = _crop_axis(grid[:, 0, :, 0], w)
    ybase, wy = _crop_axis(grid[:, :, 0, 1], h)
    a = 2 if max_pool else 1  # output row ph reads grid rows a * ph + phase: phases first
    ybase, xbase = (t.view(r, size, a).transpose(1, 2) for t in (ybase, xbase))
    wy, wx = (t.view(r, size, a, -1).transpose(1, 2) for t in (wy, wx))
    plan = _bags(rois[:, 0].long(), ybase, wy, xbase, wx, h, w)
    return _Gather.apply(_table(features, grid.dtype), plan, _channels_last(features)).to(features.dtype)


def roi_pool(features: Tensor, rois: Tensor, size: int, spatial_scale: float) -> Tensor:
    """``torchvision.ops.roi_pool(features, rois, size, spatial_scale)``: max over integer bins."""
    n, c, h, w = features.shape
    if rois.shape[0] == 0:
        return _no_rois(features, size)
    rois = rois.detach()
    # torchvision's round(): halves away from zero (torch.round takes them to even)
    x1, y1, x2, y2 = (_round_half_away(rois[:, k] * spatial_scale) for k in range(1, 5))
    ylo, yhi = _pool_axis(y1, y2, size, h, rois.dtype)
    xlo, xhi = _pool_axis(x1, x2, size, w, rois.dtype)
    plan = _max_bags(rois[:, 0].long(), ylo, yhi, xlo, xhi, h, w)
    return _Gather.apply(_table(features, _compute_dtype(features)), plan, _channels_last(features)).to(features.dtype)


def _pool_axis(start: Tensor, end: Tensor, p: int, size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """RoIPool's bins along one axis (torchvision): [floor(i * bin) + start, ceil((i + 1) * bin) + start) clipped."""
    length = torch.clamp(end - start + 1, min=1)
    bin_size = length.to(dtype) / p
    i = torch.arange(p, dtype=dtype, device=start.device)
    lo = torch.floor(i[None] * bin_size[:, None]).long() + start[:, None]
    hi = torch.ceil((i[None] + 1) * bin_size[:, None]).long() + start[:, None]
    return lo.clamp(0, size), hi.clamp(0, size)
