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

In the code, ``_nms_blocked`` runs the steps: ``_sort_by_score`` (1), ``_spatial_index`` (2), then in a loop
``_resolve_head_block`` (3) and ``_suppress_by_kept`` (4), ``_gather_undecided`` (compaction) and
``_finish_with_torchvision``. Boxes are (5, N) tensors with rows x1, y1, area, x2, y2, N in score order.

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

from typing import NamedTuple

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


class _Grid(NamedTuple):
    """Step 2's spatial index, per box in score order."""

    box_cell: Tensor  #: (N,) the cell of the box's centre, ``y * nx + x``
    searches: Tensor  #: (3, N) the cells the box searches: first cell, cells per row, rows (see _search_rows)
    nx: int  #: cells per grid row
    num_cells: int


class _Undecided(NamedTuple):
    """The boxes neither kept nor suppressed yet, sorted by cell, padded to whole tiles of ``TILE``."""

    boxes: Tensor  #: (5, padded) x1, y1, area, x2, y2
    cell: Tensor  #: (padded,) the cell of each
    rank: Tensor  #: (padded,) the score rank of each (its column in ``sorted_boxes``); padding: N
    count: int  #: the real boxes are the first ``count``; the padding repeats the last one
    cell_start: Tensor  #: (num_cells + 1,) position of each cell's first box; ``cell_start[num_cells] == count``


def _round_down_f32(t: float) -> float:
    """The largest float32 <= ``t``: for every float32 ``x``, ``x > t`` (in double) iff ``x > result``."""
    t_f32 = torch.tensor(t, dtype=torch.float32)  # rounded to nearest: may lie above t
    if t_f32.double().item() > t:
        t_f32 = torch.nextafter(t_f32, torch.tensor(float("-inf")))
    return t_f32.item()


def _iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of the boxes ``a`` and ``b`` (rows x1, y1, area, x2, y2), broadcast against each other.

    torchvision's arithmetic: ``inter / (area_a + area_b - inter)``; two buffers are reused in place.
    """
    a_x1, a_y1, a_area, a_x2, a_y2 = a.unbind(0)
    b_x1, b_y1, b_area, b_x2, b_y2 = b.unbind(0)
    max_x1 = torch.maximum(a_x1, b_x1)
    inter_w = torch.minimum(a_x2, b_x2).sub_(max_x1).clamp_(min=0)
    max_y1 = torch.maximum(a_y1, b_y1, out=max_x1)  # reuses max_x1's buffer
    inter = torch.minimum(a_y2, b_y2).sub_(max_y1).clamp_(min=0).mul_(inter_w)
    union = torch.add(a_area, b_area, out=inter_w).sub_(inter)  # reuses inter_w's buffer
    return inter.div_(union)


# ------------------------------------------------------------------------------------------------ step 1: sort by score


def _sort_by_score(boxes: Tensor, scores: Tensor) -> tuple[Tensor, Tensor]:
    """Step 1: ``order`` (score rank -> box index), as torchvision's kernel sorts (descending, ties by index),
    and ``sorted_boxes`` (5, N): rows x1, y1, area, x2, y2 in that order."""
    order = torch.sort(scores, dim=0, descending=True, stable=True)[1]
    sorted_boxes = boxes.new_empty(5, boxes.shape[0])  # area between the corners: rows 0:2 and 3:5 are (x, y)
    for row, col in ((0, 0), (1, 1), (3, 2), (4, 3)):  # x1, y1, x2, y2
        torch.index_select(boxes[:, col], 0, order, out=sorted_boxes[row])
    x1, y1, area, x2, y2 = sorted_boxes  # views
    torch.sub(x2, x1, out=area).mul_(y2 - y1)  # torchvision's area
    return order, sorted_boxes


# ------------------------------------------------------------------------------------------------ step 2: spatial index


def _search_half_ranges(sizes: Tensor, max_sizes: Tensor, t_prime: float) -> Tensor:
    """(2, N): per box and axis, how far off (centre to centre) a box it could suppress at IoU > ``t_prime`` lies.

    Along x (y is the same), IoU > t' needs ``inter_w > t' (w_i + w_j) / (1 + t')`` and ``w_j < w_i / t'``: the
    centres are closer than ``(w_i + w_j) (1 - t') / (2 + 2 t')``, which is below both ``(w_i + w_max) (1 - t') /
    (2 + 2 t')`` and ``w_i (1 - t') / (2 t')``.
    """
    half_ranges = torch.add(sizes, max_sizes[:, None]).mul_((1 - t_prime) / (2 + 2 * t_prime))
    if t_prime > 0:
        torch.minimum(half_ranges, sizes * ((1 - t_prime) / (2 * t_prime)), out=half_ranges)
    return half_ranges


def _grid_shape(span_x: float, span_y: float, mean_half_x: float, mean_half_y: float) -> tuple[float, float, int, int]:
    """Cell width and height (``CELL`` mean half-ranges, grown until at most ``MAX_CELLS`` cells cover the centres'
    spans), then the number of cells along x and along y."""
    cell_w = max(CELL * mean_half_x, span_x / MAX_CELLS, 1e-300)
    cell_h = max(CELL * mean_half_y, span_y / MAX_CELLS, 1e-300)
    while (int(span_x / cell_w) + 1) * (int(span_y / cell_h) + 1) > MAX_CELLS:
        cell_w, cell_h = cell_w * 1.5, cell_h * 1.5
    return cell_w, cell_h, int(span_x / cell_w) + 1, int(span_y / cell_h) + 1


def _search_rows(first: Tensor, last: Tensor, nx: int, num_cells: int) -> Tensor:
    """(3, N): the cells from ``first`` to ``last`` (rows x, y; inclusive) as rows of cells: the first cell, cells
    per row, rows. A box that would search ``MAX_ROWS`` rows or more searches every cell, as one row from cell 0."""
    searches = torch.empty(3, first.shape[1], dtype=torch.long)
    first_cell, row_cells, rows = searches  # views
    searches_all = last[1] - first[1] >= MAX_ROWS
    torch.add(first[1] * nx, first[0], out=first_cell).masked_fill_(searches_all, 0)
    torch.sub(last[0], first[0], out=row_cells).add_(1).clamp_(min=0).masked_fill_(searches_all, num_cells)
    torch.sub(last[1], first[1], out=rows).add_(1).clamp_(min=0).masked_fill_(searches_all, 1)
    return searches


def _spatial_index(sorted_boxes: Tensor, t_prime: float) -> _Grid:
    """Step 2: a grid over the box centres; per box its cell, and the cells holding every box it could suppress
    at IoU > ``t_prime`` (computed in double, with a margin for the rounding)."""
    corner1, corner2 = sorted_boxes[0:2].double(), sorted_boxes[3:5].double()  # rows x, y
    sizes = corner2 - corner1  # rows: widths, heights
    centres = torch.add(corner1 * 0.5, corner2, alpha=0.5)
    min_centres, max_centres, min_sizes, max_sizes = centres.amin(1), centres.amax(1), sizes.amin(1), sizes.amax(1)
    half_ranges = _search_half_ranges(sizes, max_sizes, t_prime)
    areas = sorted_boxes[2]
    min_positive_area = torch.where(areas > 0, areas, 1.0).min()[None].double()
    stats = torch.cat((min_centres, max_centres, min_sizes, max_sizes, half_ranges.mean(1), min_positive_area))
    cx_min, cy_min, cx_max, cy_max, w_min, h_min, w_max, h_max, mean_half_x, mean_half_y, min_area = stats.tolist()
    if t_prime > 0 and min_area < 2.0 ** (-100 if sorted_boxes.dtype == torch.float32 else -900):
        return _spatial_index(sorted_boxes, 0.0)  # areas this small void the rounding bound
    max_coordinate = max(abs(cx_min), abs(cy_min), abs(cx_max), abs(cy_max))
    max_size = max(abs(w_min), abs(h_min), abs(w_max), abs(h_max))
    magnitude = max_coordinate + max_size
    half_ranges.mul_(1 + 1e-6).add_(2.0**-40 * magnitude + 1e-300)  # the double arithmetic errs by ~2**-50 magnitude
    cell_w, cell_h, nx, ny = _grid_shape(cx_max - cx_min, cy_max - cy_min, mean_half_x, mean_half_y)

    offsets = centres.sub_(min_centres[:, None])  # from the grid's corner: >= 0
    inverse_cell_size = torch.tensor([[1 / cell_w], [1 / cell_h]], dtype=offsets.dtype)
    last_cell = torch.tensor([[nx - 1], [ny - 1]], dtype=offsets.dtype)

    def to_cell(scaled: Tensor) -> Tensor:
        # floor clamped to the grid (truncation is floor for v >= 0): monotonic, so a box whose centre lies
        # within +-half_ranges of this one's lies in the cells between first and last
        return scaled.clamp_(min=0).minimum(last_cell).long()

    box_cell = to_cell(offsets * inverse_cell_size)
    first = to_cell((offsets - half_ranges).mul_(inverse_cell_size))
    last = to_cell(offsets.add_(half_ranges).mul_(inverse_cell_size))
    return _Grid(box_cell[1] * nx + box_cell[0], _search_rows(first, last, nx, nx * ny), nx, nx * ny)


def _gather_undecided(
    positions: Tensor, boxes: Tensor, cell: Tensor, rank: Tensor, num_boxes: int, num_cells: int
) -> _Undecided:
    """The entries ``positions`` (in cell order) of ``boxes``, ``cell`` and ``rank``, padded to whole tiles."""
    count = positions.numel()
    positions = torch.cat((positions, positions[-1:].expand(-count % TILE)))
    rank, cell = rank.index_select(0, positions), cell.index_select(0, positions)
    rank[count:] = num_boxes
    cell_start = cell.new_zeros(num_cells + 1)
    torch.cumsum(torch.bincount(cell[:count], minlength=num_cells), 0, out=cell_start[1:])
    return _Undecided(boxes.index_select(1, positions), cell, rank, count, cell_start)


# ----------------------------------------------------------------------------------------------- step 3: the head block


def _greedy_keep_within_block(suppressors: Tensor) -> Tensor:
    """Greedy keep vector (bool) of one block: ``suppressors[j, i]`` (0/1, strictly lower-triangular) is 1 when
    box ``i`` suppresses box ``j`` if kept.

    The fixed point of ``keep[j] = not any(keep[i] and suppressors[j, i])`` is unique; iterated from all-True,
    the first k entries are exact after k rounds, so it is reached within BLOCK + 1.
    """
    keep = suppressors.new_ones(suppressors.shape[0])
    while not torch.equal(new_keep := suppressors.mv(keep).eq_(0), keep):
        keep = new_keep
    return keep.bool()


def _resolve_head_block(
    undecided: _Undecided, sorted_boxes: Tensor, t: float, strictly_lower: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Step 3: the head block, the ``BLOCK`` best-ranked undecided boxes, decided among themselves (final: every
    better-ranked box is decided and suppressed none of them).

    Returns the head's ranks (ascending) and positions in ``undecided``, and the ranks of the kept ones.
    """
    block = min(BLOCK, undecided.count)
    head_ranks, head_positions = torch.topk(undecided.rank[: undecided.count], block, largest=False, sorted=True)
    head = sorted_boxes.index_select(1, head_ranks)
    iou = _iou(head[:, :, None], head[:, None, :])
    suppressors = torch.gt(iou, t, out=iou).mul_(strictly_lower[:block, :block])  # [j, i]: i < j, IoU > t
    return head_ranks, head_positions, head_ranks[_greedy_keep_within_block(suppressors)]


# ----------------------------------------------------------------------------------- step 4: the kept suppress the rest


def _tile_runs(
    cell_start: Tensor, kept_searches: Tensor, row_offsets: Tensor, arange: Tensor, num_cells: int
) -> tuple[Tensor, Tensor, Tensor, int, int] | None:
    """The tiles the kept boxes search: each row of cells a kept box searches is a contiguous run of undecided
    positions (they are sorted by cell), covered by the tiles ``first_tile .. first_tile + run_tiles - 1``.

    Runs are (kept box, row) pairs flattened, ``rows`` per kept box (rows it does not search and empty rows:
    no tiles). Returns ``first_tile``, ``run_tiles``, ``runs_end`` (their cumsum: each run's end in the list of
    (kept box, tile) pairs), ``rows`` and the number of pairs; None when no kept box searches a tile.
    """
    first_cell, row_cells, num_rows = kept_searches
    rows = int(num_rows.max())
    if rows == 0:
        return None
    row_first_cell = (first_cell[:, None] + row_offsets[:rows]).clamp_(max=num_cells)  # (kept boxes, rows)
    run_start = cell_start.index_select(0, row_first_cell.view(-1))
    row_end_cell = row_first_cell.add_(row_cells[:, None]).clamp_(max=num_cells)  # in place
    run_end = cell_start.index_select(0, row_end_cell.view(-1))
    first_tile = run_start.div(TILE, rounding_mode="floor")
    run_tiles = run_end.add(TILE - 1).div_(TILE, rounding_mode="floor").sub_(first_tile).mul_(run_end > run_start)
    run_tiles.view(first_cell.numel(), rows).mul_(arange[:rows] < num_rows[:, None])  # the box's rows only
    runs_end = run_tiles.cumsum(0)
    num_pairs = int(runs_end[-1])
    if num_pairs == 0:
        return None
    return first_tile, run_tiles, runs_end, rows, num_pairs


def _searchers_by_tile(
    first_tile: Tensor, run_tiles: Tensor, runs_end: Tensor, rows: int, num_pairs: int, num_tiles: int
) -> tuple[Tensor, list[int], Tensor]:
    """The (kept box, tile) pairs grouped by tile: ``table[tile, :count]`` lists the kept boxes (their index among
    the kept) that search ``tile``; ``counts`` (descending) and ``tiles_by_count`` order the tiles by searchers."""
    runs_start = runs_end - run_tiles
    # the run of each pair: the last run starting at or before it (a run of no tiles starts where the next does)
    pair_run = torch.bincount(runs_start, minlength=num_pairs + 1)[:num_pairs].cumsum(0).sub_(1)
    pair_tile = (first_tile - runs_start).index_select(0, pair_run).add_(torch.arange(num_pairs))
    pair_tile, by_tile = torch.sort(pair_tile)
    pair_kept = pair_run.div_(rows, rounding_mode="floor").index_select(0, by_tile)
    searchers = torch.bincount(pair_tile, minlength=num_tiles)  # per tile
    # each pair's slot among its tile's searchers
    slot = torch.arange(num_pairs).sub_((searchers.cumsum(0) - searchers).index_select(0, pair_tile))
    counts, tiles_by_count = searchers.sort(descending=True)
    counts = counts.tolist()
    table = pair_tile.new_zeros(num_tiles, counts[0])  # unused slots: kept box 0, an exact (if wasted) IoU
    table.view(-1).index_copy_(0, slot.add_(pair_tile * counts[0]), pair_kept)
    return table, counts, tiles_by_count


def _suppress_tiles(
    suppressed: Tensor, undecided_boxes: Tensor, kept_boxes: Tensor, table: Tensor, counts: list[int],
    tiles_by_count: Tensor, t: float,
) -> None:
    """Fills ``suppressed`` (tiles, TILE) with whether a box's IoU with a kept box searching its tile is > t."""
    num_tiles = suppressed.shape[0]
    tiled_boxes = undecided_boxes.view(5, num_tiles, TILE)
    num_searched = counts.index(0) if counts[-1] == 0 else num_tiles  # tiles with a searcher come first
    begin = 0
    while begin < num_searched:  # tiles with the most searchers first, about CHUNK pairs at a time
        end = min(num_searched, begin + max(1, CHUNK // (counts[begin] * TILE)))
        tiles = tiles_by_count[begin:end]
        searcher_index = table.index_select(0, tiles)[:, : counts[begin]].reshape(-1)
        searchers = kept_boxes.index_select(1, searcher_index).view(5, end - begin, -1, 1)
        candidates = tiled_boxes.index_select(1, tiles).view(5, end - begin, 1, TILE)
        suppressed.index_copy_(0, tiles, _iou(searchers, candidates).gt_(t).amax(1))  # NaN is not > t
        begin = end


def _suppress_by_kept(
    undecided: _Undecided, grid: _Grid, sorted_boxes: Tensor, kept_ranks: Tensor, t: float, arange: Tensor,
    row_offsets: Tensor,
) -> Tensor:
    """Step 4: (tiles, TILE), 1 where an undecided box has IoU > t with a kept box whose search covers it."""
    num_tiles = undecided.rank.numel() // TILE
    suppressed = undecided.boxes.new_zeros(num_tiles, TILE)
    kept_searches = grid.searches.index_select(1, kept_ranks)
    runs = _tile_runs(undecided.cell_start, kept_searches, row_offsets, arange, grid.num_cells)
    if runs is not None:
        table, counts, tiles_by_count = _searchers_by_tile(*runs, num_tiles)
        kept_boxes = sorted_boxes.index_select(1, kept_ranks)
        _suppress_tiles(suppressed, undecided.boxes, kept_boxes, table, counts, tiles_by_count, t)
    return suppressed


def _finish_with_torchvision(boxes: Tensor, order: Tensor, alive_ranks: Tensor, t: float) -> Tensor:
    """The kept ranks among ``alive_ranks`` by torchvision's loop (scores: minus the rank, the same order)."""
    ranks = alive_ranks.sort()[0]
    alive_boxes = boxes.index_select(0, order.index_select(0, ranks))
    return ranks.index_select(0, torchvision.ops.nms(alive_boxes, -ranks.to(boxes.dtype), t))


def _nms_blocked(boxes: Tensor, scores: Tensor, t: float, max_keep: int | None = None) -> Tensor:
    """Steps 1-4 of the module docstring on N >= 1 CPU boxes with finite areas: torchvision's kept indices."""
    num_boxes = boxes.shape[0]
    order, sorted_boxes = _sort_by_score(boxes, scores)
    # t' of step 2: t less room for the IoU's rounding; t above 2 searches as 2 (IoU > 1 never happens)
    t_prime = min(t, 2.0) * (1 - 1e-5) if t >= 1e-7 else 0.0
    grid = _spatial_index(sorted_boxes, t_prime)
    all_by_cell = torch.sort(grid.box_cell)[1]
    undecided = _gather_undecided(
        all_by_cell, sorted_boxes, grid.box_cell, torch.arange(num_boxes), num_boxes, grid.num_cells
    )
    arange = torch.arange(max(BLOCK, MAX_ROWS))
    strictly_lower = (arange[:BLOCK, None] > arange[:BLOCK]).to(sorted_boxes.dtype)
    row_offsets = arange[:MAX_ROWS] * grid.nx  # from a search's first cell to each of its rows'
    kept, num_kept = [], 0  # the kept ranks, block by block (ascending)
    while True:
        # invariant: each box is kept (its rank in `kept`), suppressed, or in `undecided`; every box ranked
        # better than the best undecided one is decided
        head_ranks, head_positions, kept_ranks = _resolve_head_block(undecided, sorted_boxes, t, strictly_lower)
        kept.append(kept_ranks)
        num_kept += kept_ranks.numel()
        if head_ranks.numel() == undecided.count or (max_keep is not None and num_kept >= max_keep):
            break
        suppressed = _suppress_by_kept(undecided, grid, sorted_boxes, kept_ranks, t, arange, row_offsets)
        suppressed = suppressed.view(-1).index_fill_(0, head_positions, 1)  # the head is decided
        suppressed[undecided.count :] = 1  # padding
        alive = (suppressed == 0).nonzero().squeeze(1)
        if alive.numel() == 0:
            break
        if alive.numel() * kept_ranks.numel() <= TAIL * head_ranks.numel():  # few left, few kept: torchvision
            kept.append(_finish_with_torchvision(boxes, order, undecided.rank.index_select(0, alive), t))
            break
        undecided = _gather_undecided(alive, undecided.boxes, undecided.cell, undecided.rank, num_boxes, grid.num_cells)
    return order.index_select(0, torch.cat(kept))[:max_keep]


def _use_torchvision(boxes: Tensor, scores: Tensor, max_keep: int | None = None) -> bool:
    """Whether ``nms`` hands these arguments to torchvision unchanged (the module docstring's last list)."""
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
            in_class = torch.where(idxs == class_id)[0]
            keep_mask[in_class[nms(boxes[in_class], scores[in_class], iou_threshold)]] = True
        keep = torch.where(keep_mask)[0]
        return keep[scores[keep].sort(descending=True)[1]]
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)
