"""Non-maximum suppression on the CPU in PyTorch ops: torchvision's kept indices, 3-12x faster at 6000-12000 boxes.

``nms`` and ``batched_nms`` return exactly what ``torchvision.ops.nms`` / ``torchvision.ops.batched_nms`` return
(the same kept indices in the same order) on every input the tests throw at them: ties, duplicate, zero-area,
inverted and empty boxes, any mix of sizes, IoUs at the threshold. torchvision's CPU kernel is a serial loop
over box pairs (0.03-0.3 s for the proposal layer's 6000-12000 boxes; its loop stays faster when only a few dozen
boxes are kept). Here greedy NMS is resolved a block at a time, computing only the IoUs that can exceed t:

1. Sort by score as torchvision's kernel does (descending, ties by index: ``stable=True``).
2. Spatial index. With t' = t (1 - 1e-5) (room for the IoU's float rounding), IoU > t needs ``inter > t'
   (area_i + area_j) / (1 + t')``, so ``inter_w > t' (w_i + w_j) / (1 + t')`` (inter <= inter_w * min height)
   and ``w_j < w_i / t'``: centres closer than ``w_i (1 - t') / (2 t')`` and ``(w_i + w_max) (1 - t') / (2 +
   2 t')``, the same in y (plus a margin for the double arithmetic). Centres go into a grid of cells ``CELL``
   mean half-ranges wide; each box lists the cells it must search; undecided boxes are kept sorted by cell.
3. The next ``BLOCK`` undecided boxes: their IoU matrix gives the strictly lower-triangular mask ``M[j, i] =
   iou(i, j) > t``; greedy keeps the unique fixed point of ``keep[j] = not any(keep[i] and M[j, i])``, reached
   from all-True within ``BLOCK + 1`` rounds (the first k are exact after k; in practice 2-7 mat-vec products).
4. The kept boxes suppress the rest: the boxes in the cells a kept box searches are contiguous runs in cell
   order, cut into tiles of ``TILE``; each tile gets the IoU with every kept box that searches it (kept x TILE
   at once); IoU > t suppresses. Survivors are compacted, back to 3; torchvision's loop finishes the last few.

The index only skips pairs: every IoU is torchvision's arithmetic in the boxes' dtype, compared with ``> t``
as C++ compares a float with a double (t rounded *down* to float32 for float32 boxes: the same answer for
every float); NaN suppresses nothing. Areas below 2**-100 (2**-900 in float64) void the rounding bound: t' = 0.
Every op stays within ATen's parallel grain (32768 elements, for N < 16384) and avoids ops that parallelize
below it (searchsorted, repeat_interleave, tril, floor, aminmax, 2-d index_put): on a busy machine an OpenMP
region waits milliseconds for a descheduled thread (measured up to 30x slower with 2 threads). Other inputs go to
torchvision unchanged: fewer than ``MIN_BOXES`` boxes (``MIN_BOXES_MAX_KEEP`` with ``max_keep``), non-CPU, not
float32/float64, non-finite areas, t < 0 or NaN, tracing/scripting/compiling, malformed arguments (so the errors
are torchvision's).
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor

#: below this many boxes ``nms`` calls torchvision (measured crossover, benchmarks/results/nms.md); when only the
#: first ``max_keep`` kept boxes are wanted the blocked path stops early and wins from ``MIN_BOXES_MAX_KEEP`` on
#: (1000 proposals -> 100, the demo's: 1.1x-8x by how clustered; 300 -> 100: 0.26x; benchmarks/results/nms.md)
MIN_BOXES, MIN_BOXES_MAX_KEEP = 2000, 500
#: boxes resolved together in step 3 (BLOCK**2 IoU pairs stay below ATen's parallel grain of 32768)
BLOCK = 181
#: boxes per tile in step 4, and the most elements one op handles
TILE, CHUNK = 32, 32767
#: grid cell size in mean search half-ranges; most cells; most cell rows a box searches (more: it searches all)
CELL, MAX_CELLS, MAX_ROWS = 1.0, 8192, 8
#: torchvision finishes when the boxes left times this block's keep rate is below this
TAIL = 400


def _round_down_f32(t: float) -> float:
    """The largest float32 <= ``t``: for every float32 ``x``, ``x > t`` (in double) iff ``x > result``."""
    f = torch.tensor(t, dtype=torch.float32)
    if f.double().item() > t:
        f = torch.nextafter(f, torch.tensor(float("-inf")))
    return f.item()


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of the boxes ``a`` and ``b`` (rows x1, y1, area, x2, y2), broadcast against each other."""
    ax1, ay1, aa, ax2, ay2 = a.unbind(0)
    bx1, by1, ba, bx2, by2 = b.unbind(0)
    xx = torch.maximum(ax1, bx1)
    w = torch.minimum(ax2, bx2).sub_(xx).clamp_(min=0)
    torch.maximum(ay1, by1, out=xx)
    inter = torch.minimum(ay2, by2).sub_(xx).clamp_(min=0).mul_(w)
    return inter.div_(torch.add(aa, ba, out=w).sub_(inter))


def _greedy_block(mask: Tensor) -> Tensor:
    """Greedy keep vector (bool) of a strictly lower-triangular 0/1 matrix: row j marks who suppresses j."""
    keep = mask.new_ones(mask.shape[0])
    while not torch.equal(new := mask.mv(keep).eq_(0), keep):  # reaches the fixed point within BLOCK + 1 rounds
        keep = new
    return keep.bool()


def _grid(S: Tensor, tp: float) -> tuple[Tensor, Tensor, int, int]:
    """Cell of each box centre (``y * nx + x``), and per box the block of cells holding every box it could
    suppress at IoU > tp: rows (first cell, cells per row, rows); then nx and the number of cells."""
    lo, hi = S[0:2].double(), S[3:5].double()
    w = hi - lo  # widths; heights
    c = torch.add(lo * 0.5, hi, alpha=0.5)  # centres
    cmin, cmax, wmin, wmax = c.amin(1), c.amax(1), w.amin(1), w.amax(1)
    half = torch.add(w, wmax[:, None]).mul_((1 - tp) / (2 + 2 * tp))  # partners are at most w_max wide
    if tp > 0:
        torch.minimum(half, w * ((1 - tp) / (2 * tp)), out=half)  # and narrower than w / tp
    amin = torch.where(S[2] > 0, S[2], 1.0).min()[None].double()  # smallest positive area
    stats = torch.cat((cmin, cmax, wmin, wmax, half.mean(1), amin)).tolist()
    cx0, cy0, cx1, cy1, wx0, wy0, wx1, wy1, hx, hy, amin = stats
    if tp > 0 and amin < 2.0 ** (-100 if S.dtype == torch.float32 else -900):
        return _grid(S, 0.0)
    mag = max(abs(cx0), abs(cy0), abs(cx1), abs(cy1)) + max(abs(wx0), abs(wy0), abs(wx1), abs(wy1))
    half.mul_(1 + 1e-6).add_(2.0**-40 * mag + 1e-300)  # margin: the double arithmetic below errs by ~2**-50 mag
    sx, sy = cx1 - cx0, cy1 - cy0
    dx, dy = max(CELL * hx, sx / MAX_CELLS, 1e-300), max(CELL * hy, sy / MAX_CELLS, 1e-300)
    while (int(sx / dx) + 1) * (int(sy / dy) + 1) > MAX_CELLS:
        dx, dy = dx * 1.5, dy * 1.5
    nx, ny = int(sx / dx) + 1, int(sy / dy) + 1
    c.sub_(cmin[:, None])
    scale = torch.tensor([[1 / dx], [1 / dy]], dtype=c.dtype)
    top = torch.tensor([[nx - 1], [ny - 1]], dtype=c.dtype)
    # cell = floor(v / d) clamped to the grid (truncation is floor for v >= 0): monotonic in v, so a box whose
    # centre lies within +-half of this one's lies in the cells between first and last
    cell = (c * scale).clamp_(min=0).minimum(top).long()
    first = (c - half).mul_(scale).clamp_(min=0).minimum(top).long()
    last = c.add_(half).mul_(scale).clamp_(min=0).minimum(top).long()
    q = torch.empty(3, S.shape[1], dtype=torch.long)  # first cell, cells per row, rows; a wide box: every cell
    wide = last[1] - first[1] >= MAX_ROWS
    torch.add(first[1] * nx, first[0], out=q[0]).masked_fill_(wide, 0)
    torch.sub(last[0], first[0], out=q[1]).add_(1).clamp_(min=0).masked_fill_(wide, nx * ny)
    torch.sub(last[1], first[1], out=q[2]).add_(1).clamp_(min=0).masked_fill_(wide, 1)
    return cell[1] * nx + cell[0], q, nx, nx * ny


def _nms_blocked(boxes: Tensor, scores: Tensor, t: float, max_keep: int | None = None) -> Tensor:
    n, T = boxes.shape[0], TILE
    order = torch.sort(scores, dim=0, descending=True, stable=True)[1]
    S = boxes.new_empty(5, n)  # score order: x1, y1, area, x2, y2
    for row, col in ((0, 0), (1, 1), (3, 2), (4, 3)):
        torch.index_select(boxes[:, col], 0, order, out=S[row])
    torch.sub(S[3], S[0], out=S[2]).mul_(S[4] - S[1])
    cell, Q, nx, G = _grid(S, min(t, 2.0) * (1 - 1e-5) if t >= 1e-7 else 0.0)  # IoU > 1 never happens

    def compact(pos: Tensor, C: Tensor, cell: Tensor, rank: Tensor):
        """Entries ``pos``, padded to whole tiles by repeating the last one (rank n); ``start``: cell starts."""
        r = pos.numel()
        pos = torch.cat((pos, pos[-1:].expand(-r % T)))
        rank, cell = rank.index_select(0, pos), cell.index_select(0, pos)
        rank[r:] = n
        start = cell.new_zeros(G + 1)
        torch.cumsum(torch.bincount(cell[:r], minlength=G), 0, out=start[1:])
        return C.index_select(1, pos), cell, rank, r, start

    # undecided boxes sorted by cell: C their rows, rank their score rank
    C, cell_c, rank, r, start = compact(torch.sort(cell)[1], S, cell, torch.arange(n))
    ar = torch.arange(max(BLOCK, MAX_ROWS))
    lower, offs = (ar[:BLOCK, None] > ar[:BLOCK]).to(S.dtype), ar[:MAX_ROWS] * nx
    out = []
    while True:
        m = min(BLOCK, r)
        hv, hp = torch.topk(rank[:r], m, largest=False, sorted=True)  # the head block: ranks, positions
        head = S.index_select(1, hv)
        iou = _iou(head[:, :, None], head[:, None, :])
        kr = hv[_greedy_block(torch.gt(iou, t, out=iou).mul_(lower[:m, :m]))]
        out.append(kr)
        if m == r or (max_keep is not None and sum(map(len, out)) >= max_keep):
            break
        k, nt = kr.numel(), rank.numel() // T
        sup = C.new_zeros(nt, T)  # 1: suppressed
        q = Q.index_select(1, kr)
        rows, P = int(q[2].max()), 0
        if rows > 0:  # each kept box searches `rows` runs of cells: positions lo..hi, tiles ft..ft+nq-1
            first = (q[0][:, None] + offs[:rows]).clamp_(max=G)
            lo = start.index_select(0, first.view(-1))
            hi = start.index_select(0, first.add_(q[1][:, None]).clamp_(max=G).view(-1))
            ft = lo.div(T, rounding_mode="floor")
            nq = hi.add(T - 1).div_(T, rounding_mode="floor").sub_(ft).mul_(hi > lo)
            nq.view(k, rows).mul_(ar[:rows] < q[2][:, None])
            cs = nq.cumsum(0)
            P = int(cs[-1])
        if P:
            # (kept box, tile) pairs, grouped by tile into a table of the kept boxes that search each tile
            st = cs - nq
            qi = torch.bincount(st, minlength=P + 1)[:P].cumsum(0).sub_(1)  # query of each pair
            tile, o = torch.sort((ft - st).index_select(0, qi).add_(torch.arange(P)))
            kept = qi.div_(rows, rounding_mode="floor").index_select(0, o)
            counts = torch.bincount(tile, minlength=nt)
            slot = torch.arange(P).sub_((counts.cumsum(0) - counts).index_select(0, tile))
            cnt, tord = counts.sort(descending=True)
            cnt = cnt.tolist()
            table = tile.new_zeros(nt, cnt[0])  # unused slots: kept box 0, an exact (if wasted) IoU
            table.view(-1).index_copy_(0, slot.add_(tile * cnt[0]), kept)
            K, Cv = S.index_select(1, kr), C.view(5, nt, T)
            a, nz = 0, cnt.index(0) if cnt[-1] == 0 else nt  # nz tiles are searched
            while a < nz:  # tiles with the most searchers first, about CHUNK pairs at a time
                e = min(nz, a + max(1, CHUNK // (cnt[a] * T)))
                tiles = tord[a:e]
                Kc = K.index_select(1, table.index_select(0, tiles)[:, : cnt[a]].reshape(-1)).view(5, e - a, -1, 1)
                Cc = Cv.index_select(1, tiles).view(5, e - a, 1, T)
                sup.index_copy_(0, tiles, _iou(Kc, Cc).gt_(t).amax(1))  # NaN is not > t
                a = e
        sup = sup.view(-1).index_fill_(0, hp, 1)
        sup[r:] = 1
        alive = (sup == 0).nonzero().squeeze(1)
        if alive.numel() == 0:
            break
        if alive.numel() * k <= TAIL * m:  # few boxes left, few of them kept: torchvision's loop is cheaper
            rest = rank.index_select(0, alive).sort()[0]
            sub = boxes.index_select(0, order.index_select(0, rest))
            out.append(rest.index_select(0, torchvision.ops.nms(sub, -rest.to(boxes.dtype), t)))
            break
        C, cell_c, rank, r, start = compact(alive, C, cell_c, rank)
    return order.index_select(0, torch.cat(out))[:max_keep]


def _use_torchvision(boxes: Tensor, scores: Tensor, max_keep: int | None = None) -> bool:
    return (
        torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling()
        or not isinstance(boxes, Tensor) or not isinstance(scores, Tensor)
        or boxes.device.type != "cpu" or scores.device != boxes.device
        or boxes.dtype not in (torch.float32, torch.float64) or boxes.is_quantized or scores.dtype != boxes.dtype
        or boxes.dim() != 2 or boxes.shape[1] != 4 or scores.dim() != 1 or scores.shape[0] != boxes.shape[0]
        or boxes.shape[0] < (MIN_BOXES if max_keep is None else MIN_BOXES_MAX_KEEP)
        # finite areas (so finite coordinates, widths and heights): an inf or NaN area makes area * 0 NaN
        or not bool((((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) * 0).sum() == 0)
    )


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_keep: int | None = None) -> Tensor:
    """``torchvision.ops.nms``: indices (int64) of the kept boxes, by decreasing score; the same result.

    ``boxes`` (N, 4) as ``(x1, y1, x2, y2)`` with torchvision's (exclusive) width ``x2 - x1``; ``scores`` (N,).
    ``max_keep``: only the first ``max_keep`` kept indices are wanted (``torchvision.ops.nms(...)[:max_keep]``,
    exactly); greedy NMS decides in score order, so the work stops once that many are kept (the proposal
    layer keeps RPN_POST_NMS_TOP_N of thousands).
    """
    if _use_torchvision(boxes, scores, max_keep) or not float(iou_threshold) >= 0:
        return torchvision.ops.nms(boxes, scores, iou_threshold)[:max_keep]
    t = float(iou_threshold)
    if boxes.dtype == torch.float32:
        t = _round_down_f32(t)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    with torch.no_grad():
        return _nms_blocked(boxes.detach(), scores.detach(), t, max_keep)


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
