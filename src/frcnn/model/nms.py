"""Non-maximum suppression on the CPU in PyTorch ops: torchvision's kept indices, 2.5-3.5x faster at 6000+ boxes.

``nms`` and ``batched_nms`` take torchvision's arguments and return exactly what ``torchvision.ops.nms`` /
``torchvision.ops.batched_nms`` return (the same kept indices in the same order), on every input the tests
throw at them: ties of scores, duplicate, zero-area and empty boxes, thresholds 0 to 1.

Why: torchvision's CPU kernel is a serial greedy loop, one box pair at a time (about 0.1-0.5 s for the
proposal layer's 6000-12000 boxes). Greedy NMS itself is sequential, but it can be resolved a block at a time:

1. Sort by score exactly as torchvision's kernel does (descending, ties by index: ``stable=True``; checked
   against torchvision in tests/test_nms.py) and keep the boxes as columns ``x1, y1, x2, y2, area``.
2. Take the next ``BLOCK`` boxes that nothing kept so far suppresses. Their IoU matrix gives the strictly
   upper-triangular mask ``M[i, j] = iou(i, j) > t``; greedy within the block keeps the unique fixed point of
   ``keep[j] = not any(keep[i] and M[i, j] for i < j)``. Iterating that map from all-True makes the first k
   entries exact after k rounds, so it stops at the fixed point within ``BLOCK + 1`` rounds (in practice
   2-7; each round is one small matrix-vector product).
3. The block's kept boxes suppress the remaining boxes: IoU tiles of at most ``CHUNK`` pairs, ``iou > t`` as
   0/1 floats, and a matrix-vector product counts the kept boxes suppressing each column; the survivors are
   compacted and the loop goes back to 2. Every op stays below ATen's parallel grain (32768 elements): on a
   busy machine an op that opens an OpenMP region waits for a descheduled worker thread for milliseconds
   (measured 5-15x slower overall with 256-box blocks), so this path is deliberately single-threaded.

The work is the pairs greedy NMS visits (kept boxes x boxes still alive after them), a whole row block at a
time. The IoU is torchvision's arithmetic in the boxes' dtype: ``area = (x2 - x1) * (y2 - y1)``,
``inter = max(0, min(x2) - max(x1)) * max(0, min(y2) - max(y1))``, ``inter / (area_i + area_j - inter)``,
compared with ``> iou_threshold`` the way C++ compares a float with a double (the threshold is rounded
*down* to float32 for float32 boxes, which gives the same answer for every float); a NaN IoU (0/0 of two
zero-area boxes) suppresses nothing, as in torchvision.

Inputs this path does not handle go to torchvision unchanged: fewer than ``MIN_BOXES`` boxes (torchvision's
loop is faster there; the crossover is measured in benchmarks/bench_nms.py), non-CPU tensors, dtypes other
than float32/float64, non-finite coordinates, tracing/scripting/compiling, and malformed arguments (so the
errors are torchvision's).
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor

#: below this many boxes ``nms`` calls torchvision (measured crossover, benchmarks/results/nms.md)
MIN_BOXES = 2000
#: boxes resolved together in step 2 (BLOCK**2 IoU pairs stay below ATen's parallel grain of 32768)
BLOCK = 181
#: IoU pairs computed per vectorised pass in step 3
CHUNK = 32768


def _round_down_f32(t: float) -> float:
    """The largest float32 <= ``t``: for every float32 ``x``, ``x > t`` (in double) iff ``x > result``."""
    f = torch.tensor(t, dtype=torch.float32)
    if f.double().item() > t:
        f = torch.nextafter(f, torch.tensor(float("-inf")))
    return f.item()


def _iou(a: list[Tensor], b: list[Tensor], bufs: list[Tensor]) -> Tensor:
    """IoU (k, r) of the boxes ``a`` and ``b`` (lists x1, y1, x2, y2, area of k and r values), into ``bufs``."""
    k, r = a[0].shape[0], b[0].shape[0]
    xx, inter, hh = (buf[: k * r].view(k, r) for buf in bufs)
    torch.maximum(a[0][:, None], b[0][None, :], out=xx)
    torch.minimum(a[2][:, None], b[2][None, :], out=inter).sub_(xx).clamp_(min=0)
    torch.maximum(a[1][:, None], b[1][None, :], out=xx)
    torch.minimum(a[3][:, None], b[3][None, :], out=hh).sub_(xx).clamp_(min=0)
    inter.mul_(hh)
    torch.add(a[4][:, None], b[4][None, :], out=xx).sub_(inter)
    return inter.div_(xx)


def _greedy_block(mask: Tensor) -> Tensor:
    """Greedy keep vector (bool) of a strictly upper-triangular 0/1 float suppression matrix."""
    m = mask.shape[0]
    keep = mask.new_ones(m)
    for _ in range(m + 1):
        new = (keep @ mask == 0).to(mask.dtype)
        if torch.equal(new, keep):
            break
        keep = new
    return keep.bool()


def _nms_blocked(boxes: Tensor, scores: Tensor, t: float, block: int, chunk: int, max_keep: int | None = None
                 ) -> Tensor:
    # Every op here stays below ATen's parallel grain (32768 elements), so none opens an OpenMP region: on a
    # busy machine a region waits for a descheduled worker thread for milliseconds (measured: 10x slower).
    n = boxes.shape[0]
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.sort(scores, dim=0, descending=True, stable=True)[1]
    x1, y1, x2, y2 = (boxes[:, c].index_select(0, order) for c in range(4))
    cols = [x1, y1, x2, y2, (x2 - x1) * (y2 - y1)]
    bufs = [boxes.new_empty(max(chunk, block * block)) for _ in range(3)]
    ar = torch.arange(block, device=boxes.device)
    upper = (ar[:, None] < ar[None, :]).to(boxes.dtype)
    pos = torch.arange(n, device=boxes.device)
    out, found = [], 0
    while True:
        r = pos.numel()
        m = min(block, r)
        head = [c[:m] for c in cols]
        iou = _iou(head, head, bufs)
        mask = torch.gt(iou, t, out=bufs[2][: m * m].view(m, m)).mul_(upper[:m, :m])
        kb = _greedy_block(mask)
        out.append(pos[:m][kb])
        found += out[-1].numel()
        if m == r or (max_keep is not None and found >= max_keep):  # the rest can only come later in order
            break
        kept, rest = [c[kb] for c in head], [c[m:] for c in cols]
        step = max(1, chunk // kept[0].shape[0])
        ones = bufs[0].new_ones(kept[0].shape[0])
        counts = []
        for s in range(0, r - m, step):
            iou = _iou(kept, [c[s : s + step] for c in rest], bufs)
            over = torch.gt(iou, t, out=bufs[2][: iou.numel()].view(iou.shape))  # 0/1 floats; NaN is not > t
            counts.append(ones @ over)  # how many kept boxes suppress each column (a reduction would not stay serial)
        alive = torch.cat(counts) == 0
        idx = alive.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        cols, pos = [c.index_select(0, idx) for c in rest], pos[m:].index_select(0, idx)
    return order[torch.cat(out)][:max_keep]


def _use_torchvision(boxes: Tensor, scores: Tensor) -> bool:
    return (
        torch.jit.is_scripting()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or not isinstance(boxes, Tensor)
        or not isinstance(scores, Tensor)
        or boxes.device.type != "cpu"
        or boxes.dtype not in (torch.float32, torch.float64)
        or boxes.is_quantized
        or boxes.dim() != 2
        or boxes.shape[1] != 4
        or scores.dim() != 1
        or scores.shape[0] != boxes.shape[0]
        or scores.dtype != boxes.dtype
        or scores.device != boxes.device
        or boxes.shape[0] < MIN_BOXES
        or not bool(torch.isfinite(boxes[:, 0] + boxes[:, 1] + boxes[:, 2] + boxes[:, 3]).all())
    )


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_keep: int | None = None) -> Tensor:
    """``torchvision.ops.nms``: indices (int64) of the kept boxes, by decreasing score; the same result.

    ``boxes`` (N, 4) as ``(x1, y1, x2, y2)`` with torchvision's (exclusive) width ``x2 - x1``; ``scores`` (N,).
    ``max_keep``: only the first ``max_keep`` kept indices are wanted (``torchvision.ops.nms(...)[:max_keep]``,
    exactly); greedy NMS decides in score order, so the work stops once that many are kept (the proposal
    layer keeps RPN_POST_NMS_TOP_N of thousands).
    """
    if _use_torchvision(boxes, scores):
        return torchvision.ops.nms(boxes, scores, iou_threshold)[:max_keep]
    t = float(iou_threshold)
    if boxes.dtype == torch.float32:
        t = _round_down_f32(t)
    with torch.no_grad():
        return _nms_blocked(boxes.detach(), scores.detach(), t, BLOCK, CHUNK, max_keep)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision.ops.batched_nms`` (NMS within each category ``idxs``) with :func:`nms`; the same result.

    The same two strategies as torchvision, chosen by the same rule, so even the float arithmetic matches:
    up to 1000 CPU boxes, one NMS on boxes shifted apart per category; above, one NMS per category.
    """
    if boxes.device.type != "cpu" or torch.jit.is_scripting() or torch.jit.is_tracing():
        return torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    if boxes.numel() > 4000:
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for class_id in torch.unique(idxs):
            curr = torch.where(idxs == class_id)[0]
            keep_mask[curr[nms(boxes[curr], scores[curr], iou_threshold)]] = True
        keep = torch.where(keep_mask)[0]
        return keep[scores[keep].sort(descending=True)[1]]
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)
