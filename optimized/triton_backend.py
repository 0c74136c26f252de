"""Backend "triton": the forward Triton kernel over the block tables (docs/semantics.md sections 4, 5).

One program handles one query block (or a ``BLOCK_M`` slice of it) of one lattice row of a
BlockTable, for one query head and one batch element. It reads the row's query points straight
from the caller's ``q`` at ``lattice_start + stride * t - query_start`` (strided addressing, no
gather copy), walks the row's key blocks from the CSR list reading ``k``/``v`` the same way, and
keeps an online softmax in float32 (base-2 exponentials on log2(e)-scaled scores). It writes
``out`` in place and ``lse`` in natural log.

Launches: tables whose heads are disjoint form one launch ("layer"): head_mode "split" is one
launch for the whole call. A head that sits in several branches (head_mode "all") gets one
launch per branch, each later launch merging into what is already written by the lse rule of
docs/semantics.md section 5 (merge on write). The first launch also writes 0 / -inf at the
positions of each row's segment that lie on no lattice point of the head (the gaps between points,
and those before the first), so no separate pass fills ``out``; only heads that it does not reach
everywhere (``LaunchTable.covers_head``: a short last segment, a chunk starting in a gap) are
filled first. How full key blocks are read, in which order work items launch and how a listed
block is found are kernel choices (VARIANTS, ITEM_ORDERS, INDEX_MODES; experiments/NOTES_gpu.md). A work item, and
a block of the sparse weights, is an int32 record whose columns ``WorkItem`` / ``WeightBlock`` name:
the host packs it by those names and the kernels read it through the ITEM_* / WEIGHT_* constants.

Masks: t >= lattice length, points outside the call's query/key chunks, causal (t_k <= t_q),
key padding, and head-dim padding to the next power of two. Grouped-query heads read kv head
``h // (H // H_kv)``. Float32 inputs use ``tl.dot(..., input_precision="ieee")`` (true fp32
products, no tf32). ``partial_forward`` records no autograd graph, so it refuses inputs that require
grad; ``optimized.triton_backward.differentiable_forward`` wraps it with the backward kernels.
"""

from __future__ import annotations

import enum
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - triton is a dependency of the gpu extra
    raise ImportError(f"backend='triton' needs the triton package: {error}") from error

from .blocks import block_points, head_layers
from .plan import CallPlan, StepPair
from .weights import SparseAttentionWeights

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_BLOCK_SIZE = 16
MAX_HEAD_DIM = 256
# Device-side block tables kept per (plan, device, order), least recently used first out. Bounded by
# bytes, not by count: a ring of P chunks has up to P^2 chunk-pair plans (64 at P = 8), each small,
# while one plan at 16M tokens takes tens of MB. Run 3 on the H200 showed a count bound of 64
# rebuilding every pair's tables on each call of an 8-chunk ring (31 ms against 0.6 ms unsplit).
TABLE_CACHE_BYTES = 512 << 20
# Rows with at most this many full key blocks keep their block list in registers (no index load in the loop).
MAX_REGISTER_ENTRIES = 256
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Kernel metadata: the int32 records the host packs and the kernels read
# --------------------------------------------------------------------------------------------


class WorkItem(enum.IntEnum):
    """Columns of a forward work item: one record per (BlockTable row, query head), ``len(WorkItem)`` wide.

    Lattice point t of the row sits at global position ``LATTICE_START + STRIDE * t`` for
    t < ``LATTICE_LENGTH``. The row's key blocks are ``KeyBlock[ENTRY_START:ENTRY_STOP]`` of the
    launch: the full ones (no mask needed) first, up to ``FULL_STOP``, led by the row's longest run
    of consecutive full blocks, ``RUN_COUNT`` blocks from ``RUN_BLOCK`` (LaunchTable).
    ``SEGMENT_START``/``SEGMENT_STOP`` bound the row's segment, whose off-lattice positions the
    first launch writes empty. ``QUERY_LO``/``QUERY_HI`` and ``KEY_LO``/``KEY_HI`` are the item's
    query and key chunks (global positions); global position p sits at row ``p - QUERY_SHIFT`` of
    the launch's q (``p - KEY_SHIFT`` of k and v). One plan's items have shift = chunk start (the
    tensors hold the chunks); a ring step's launch gathers the items of several chunk pairs over
    tensors that hold several chunks (``step_forward_into``), each pair with its own shifts.
    """

    LATTICE_START = 0
    LATTICE_LENGTH = 1
    QUERY_BLOCK = 2
    ENTRY_START = 3
    ENTRY_STOP = 4
    STRIDE = 5
    HEAD = 6
    FULL_STOP = 7
    RUN_BLOCK = 8
    RUN_COUNT = 9
    SEGMENT_START = 10
    SEGMENT_STOP = 11
    QUERY_LO = 12
    QUERY_HI = 13
    KEY_LO = 14
    KEY_HI = 15
    QUERY_SHIFT = 16
    KEY_SHIFT = 17


class WeightBlock(enum.IntEnum):
    """Columns of a sparse-weights block: one record per (key-block entry, query head), in optimized.weights' order.

    ``BRANCH`` is read by the host only (``block_branches``); ``PAD`` keeps a record at 8 int32 (32 bytes).
    """

    LATTICE_START = 0
    LATTICE_LENGTH = 1
    QUERY_BLOCK = 2
    KEY_BLOCK = 3
    STRIDE = 4
    HEAD = 5
    BRANCH = 6
    PAD = 7


# The same columns as compile-time constants of the kernels (a jit function may only read tl.constexpr globals).
ITEM_WIDTH = tl.constexpr(len(WorkItem))
ITEM_LATTICE_START = tl.constexpr(WorkItem.LATTICE_START.value)
ITEM_LATTICE_LENGTH = tl.constexpr(WorkItem.LATTICE_LENGTH.value)
ITEM_QUERY_BLOCK = tl.constexpr(WorkItem.QUERY_BLOCK.value)
ITEM_ENTRY_START = tl.constexpr(WorkItem.ENTRY_START.value)
ITEM_ENTRY_STOP = tl.constexpr(WorkItem.ENTRY_STOP.value)
ITEM_STRIDE = tl.constexpr(WorkItem.STRIDE.value)
ITEM_HEAD = tl.constexpr(WorkItem.HEAD.value)
ITEM_FULL_STOP = tl.constexpr(WorkItem.FULL_STOP.value)
ITEM_RUN_BLOCK = tl.constexpr(WorkItem.RUN_BLOCK.value)
ITEM_RUN_COUNT = tl.constexpr(WorkItem.RUN_COUNT.value)
ITEM_SEGMENT_START = tl.constexpr(WorkItem.SEGMENT_START.value)
ITEM_SEGMENT_STOP = tl.constexpr(WorkItem.SEGMENT_STOP.value)
ITEM_QUERY_LO = tl.constexpr(WorkItem.QUERY_LO.value)
ITEM_QUERY_HI = tl.constexpr(WorkItem.QUERY_HI.value)
ITEM_KEY_LO = tl.constexpr(WorkItem.KEY_LO.value)
ITEM_KEY_HI = tl.constexpr(WorkItem.KEY_HI.value)
ITEM_QUERY_SHIFT = tl.constexpr(WorkItem.QUERY_SHIFT.value)
ITEM_KEY_SHIFT = tl.constexpr(WorkItem.KEY_SHIFT.value)
WEIGHT_WIDTH = tl.constexpr(len(WeightBlock))
WEIGHT_LATTICE_START = tl.constexpr(WeightBlock.LATTICE_START.value)
WEIGHT_LATTICE_LENGTH = tl.constexpr(WeightBlock.LATTICE_LENGTH.value)
WEIGHT_QUERY_BLOCK = tl.constexpr(WeightBlock.QUERY_BLOCK.value)
WEIGHT_KEY_BLOCK = tl.constexpr(WeightBlock.KEY_BLOCK.value)
WEIGHT_STRIDE = tl.constexpr(WeightBlock.STRIDE.value)
WEIGHT_HEAD = tl.constexpr(WeightBlock.HEAD.value)


def _pack(layout: type[enum.IntEnum], count: int, **fields) -> torch.Tensor:
    """(count, len(layout)) int64 records: column ``layout[NAME]`` holds ``fields[name]`` ((count,) or a scalar).

    Every field of the layout must be given, so a new column cannot be left unset.
    """
    names = {column.name.lower() for column in layout}
    if set(fields) != names:
        raise TypeError(f"{layout.__name__} records need exactly the fields {sorted(names)}, got {sorted(fields)}")
    records = torch.empty(count, len(layout), dtype=torch.long)
    for name, value in fields.items():
        records[:, layout[name.upper()]] = value
    return records


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# How the kernel reads k/v on full key blocks (kept selectable for the A/B in experiments/bench_gpu.py):
#   "v2":    an int64 address tile per step from the block index (run 2's kernel);
#   "v3":    each row's longest run of consecutive full blocks is walked by advancing one pointer tile
#            (the lattice is a strided 2D view: row stride dilation_rate * stride_n), the rest as in v2;
#   "v3tma": like v3, with k/v of full blocks read through Hopper tensor descriptors (TMA) built per
#            program on the lattice view; needs 16-byte aligned strides, else v3 runs.
#   "auto":  per launch, from its rows' mean run of consecutive full blocks (LaunchTable.mean_run):
#            v3tma for long runs (dense layouts), v3 for medium ones (local windows), else v2; the
#            thresholds come from the H200 A/B (experiments/results/run3, NOTES_gpu.md).
VARIANTS = ("auto", "v2", "v3", "v3tma")
VARIANT_ENV = "BSRDA_TRITON_VARIANT"
DEFAULT_VARIANT = "auto"
AUTO_TMA_MIN_RUN = 8.0  # mean full blocks per run at which v3tma beat v3 (dense: 16 blocks per row)
AUTO_RUNS_MIN_RUN = 3.0  # ... at which v3 beat v2 (local_window: ~5; dilated_sparse / random: ~1-2)
# Launch order of the work items (one query block of one head each):
#   "longest_first": rows with the most key blocks start first (fewer stragglers at the tail);
#   "by_lattice":    all query blocks of one (lattice, head) side by side, so the programs that run
#                    together read the same keys and values (L2 reuse); no sort by length.
ITEM_ORDERS = ("longest_first", "by_lattice")
ITEM_ORDER_ENV = "BSRDA_TRITON_ITEM_ORDER"
DEFAULT_ITEM_ORDER = "by_lattice"
# How the loop over listed full key blocks finds the next block index:
#   "registers": the row's list is loaded once and picked per step (a reduction over the list);
#   "load":      one scalar load per step from the (L1-resident) list.
INDEX_MODES = ("registers", "load")
INDEX_ENV = "BSRDA_TRITON_INDEX"
DEFAULT_INDEX = "registers"


def _choice(value: str | None, env: str, default: str, allowed: tuple[str, ...], what: str) -> str:
    value = value or os.environ.get(env) or default
    if value not in allowed:
        raise ValueError(f"{what}={value!r} (or env {env}) is not allowed: use one of {allowed}")
    return value


def kernel_variant(variant: str | None = None) -> str:
    return _choice(variant, VARIANT_ENV, DEFAULT_VARIANT, VARIANTS, "variant")


def item_order(order: str | None = None) -> str:
    return _choice(order, ITEM_ORDER_ENV, DEFAULT_ITEM_ORDER, ITEM_ORDERS, "order")


def index_mode(mode: str | None = None) -> str:
    return _choice(mode, INDEX_ENV, DEFAULT_INDEX, INDEX_MODES, "index")


# --------------------------------------------------------------------------------------------
# What the kernel accepts
# --------------------------------------------------------------------------------------------


def _refusals(
    block_size: int, head_dim: int, dtype: torch.dtype, device, dtype_label: str = "dtype", device_label: str = "device"
) -> list[tuple[type[Exception], str]]:
    """(exception type, message) for every reason the kernel cannot run a case, in a fixed order.

    The labels name where the values come from (the arguments of ``unsupported_reasons``, or q in
    ``_check_inputs``). ``device`` None leaves out the checks that depend on it.
    """
    refusals = []
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        refusals.append(
            (
                ValueError,
                (
                    f"block_size={block_size} is not supported by backend='triton': it needs a power of two "
                    f">= {MIN_BLOCK_SIZE} (16, 32, 64, 128, ...); use backend='torch' or 'flex' for other block sizes"
                ),
            )
        )
    if head_dim < 1 or head_dim > MAX_HEAD_DIM:
        refusals.append(
            (
                ValueError,
                (
                    f"head_dim={head_dim} is not supported by backend='triton': it needs "
                    f"1 <= head_dim <= {MAX_HEAD_DIM} "
                    f"(head dims that are not a power of two are padded by masks)"
                ),
            )
        )
    if dtype not in SUPPORTED_DTYPES:
        message = f"{dtype_label}={dtype} is not supported by backend='triton': it needs one of {SUPPORTED_DTYPES}"
        if dtype == torch.float64:
            message += "; the kernel computes in float32 at most; float64 inputs need backend='torch'"
        refusals.append((TypeError, message))
    off_cuda = device is not None and torch.device(device).type != "cuda"
    if off_cuda and not _interpreting():
        refusals.append(
            (
                ValueError,
                (
                    f"{device_label}={device} is not supported by backend='triton': it needs a CUDA device "
                    f"(or TRITON_INTERPRET=1 set before importing triton, to run the kernel in the CPU interpreter)"
                ),
            )
        )
    if off_cuda and dtype == torch.bfloat16:
        refusals.append(
            (
                TypeError,
                (
                    f"{dtype_label}={dtype} on {device_label}={device} is not supported by backend='triton': tl.dot on "
                    f"bfloat16 is broken in Triton's CPU interpreter; use float16 or float32 there, or a CUDA device"
                ),
            )
        )
    return refusals


def unsupported_reasons(block_size: int, head_dim: int, dtype: torch.dtype, device=None) -> list[str]:
    """Every reason the kernels (forward and backward) cannot run this case; an empty list: they run it.

    ``device``: optional; off CUDA the kernel runs only in Triton's interpreter (TRITON_INTERPRET=1),
    where tl.dot on bfloat16 is broken, so bfloat16 is refused there.
    """
    return [message for _, message in _refusals(block_size, head_dim, dtype, device)]


def _check_inputs(q, k, v, plan: CallPlan) -> None:
    """Raise for every case ``unsupported_reasons`` refuses: the first reason's exception, all the messages."""
    refusals = _refusals(
        plan.block_size, q.shape[-1], q.dtype, q.device, dtype_label="q.dtype", device_label="q.device"
    )
    if refusals:
        raise refusals[0][0]("; ".join(message for _, message in refusals))
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "q, k or v requires grad: triton_backend.partial_forward records no autograd graph; call "
            "optimized.triton_backward.differentiable_forward (what backend='triton' runs) for gradients"
        )


# --------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """Kernel tile: BLOCK_M query points x BLOCK_N key points per step (each divides block_size)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def default_tile(block_size: int, block_d: int, dtype: torch.dtype) -> TileConfig:
    if _interpreting():
        return TileConfig(min(block_size, 64), min(block_size, 64), 4, 1)
    if dtype == torch.float32:
        return TileConfig(min(block_size, 64), min(block_size, 32), 4, 2)
    if block_d >= 256:
        return TileConfig(min(block_size, 64), min(block_size, 32), 4, 2)
    if block_d >= 128:
        return TileConfig(min(block_size, 128), min(block_size, 64), 8, 3)
    return TileConfig(min(block_size, 128), min(block_size, 64), 4, 3)


# --------------------------------------------------------------------------------------------
# Device-side block tables, cached per (plan, device)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchTable:
    """One launch: work items (query-block row x head) and their key-block entries, int32 on the device.

    Within a row, key blocks that need no mask ("full": every point on the lattice and inside the
    key chunk, not the causal diagonal) come first, ``entry_start..full_stop``; the rest follow.
    The full ones start with the row's longest run of consecutive key blocks (``run_count``
    blocks from ``run_block``), which the v3 kernels walk without reading the list.
    """

    items: torch.Tensor  # (n_items, len(WorkItem)) int32
    key_block: torch.Tensor  # (nnz,) int32
    num_items: int
    max_full: int  # most full entries of one row (sizes the in-register index list)
    max_listed: int  # most full entries of one row outside its run
    mean_run: float  # mean run_count over the rows that have full blocks (picks the "auto" variant)
    run_rows: int  # how many rows have full blocks (weights mean_run when launches are joined)
    # (H,) bool on the CPU: this launch writes every query point of the head (skip zeroing it first).
    covers_head: torch.Tensor


def _layers(tables) -> list[list]:
    """Tables grouped into launches whose heads are disjoint (so one launch never writes a point twice)."""
    return [[tables[index] for index in members] for members in head_layers(tables)]


def _full_entries(table, is_causal: bool) -> torch.Tensor:
    """(nnz,) bool: the key block needs no mask (all its points exist and lie in the key chunk).

    Positions grow with t, so that holds when the block's first and last points are valid: each is
    asked of ``block_points`` as a block of one point (O(nnz), where whole blocks would be O(nnz * b)).
    """
    rows = table.entry_row
    start, length = table.lattice_start[rows], table.lattice_length[rows]
    t0 = table.key_block * table.block_size
    full = torch.ones(table.nnz, dtype=torch.bool)
    for t in (t0, t0 + table.block_size - 1):
        full &= block_points(start, length, t, table.stride, 1, table.key_limits)[2].squeeze(1)
    if is_causal:
        full &= table.key_block != table.query_block[rows]
    return full


def _entry_order(entry_row, key_block, full, rows):
    """Entry order (chosen run, other full, masked; ascending blocks in each) and per row (run_block, run_count)."""
    # Full first, ascending key blocks within each kind.
    first = torch.sort(entry_row * 2 + (~full).long(), stable=True).indices
    row_s, kb_s, full_s = entry_row[first], key_block[first], full[first]
    n = row_s.numel()
    run_block = torch.zeros(rows, dtype=torch.long)
    run_count = torch.zeros(rows, dtype=torch.long)
    if n == 0 or not bool(full_s.any()):
        return first, run_block, run_count
    prev_same = torch.zeros(n, dtype=torch.bool)
    prev_same[1:] = (row_s[1:] == row_s[:-1]) & full_s[:-1] & (kb_s[1:] == kb_s[:-1] + 1)
    run_id = torch.cumsum((~prev_same).long(), 0) - 1  # runs of consecutive full blocks in one row
    runs = int(run_id[-1]) + 1
    length = torch.bincount(run_id[full_s], minlength=runs)
    head_of_run = torch.zeros(runs, dtype=torch.long).scatter_reduce(
        0, run_id, torch.arange(n), reduce="amin", include_self=False
    )
    run_row = row_s[head_of_run]
    longest = torch.zeros(rows, dtype=torch.long).scatter_reduce(0, run_row, length, reduce="amax", include_self=True)
    candidate = (length == longest[run_row]) & (length > 0)
    chosen = torch.full((rows,), runs, dtype=torch.long).scatter_reduce(
        0, run_row[candidate], torch.arange(runs)[candidate], reduce="amin", include_self=True
    )
    has_run = chosen < runs
    chosen_safe = torch.where(has_run, chosen, 0)
    run_block = torch.where(has_run, kb_s[head_of_run[chosen_safe]], 0)
    run_count = torch.where(has_run, length[chosen_safe], 0)
    in_run = full_s & (run_id == chosen[row_s])
    category = torch.where(in_run, 0, torch.where(full_s, 1, 2))
    second = torch.sort(row_s * 3 + category, stable=True).indices
    return first[second], run_block, run_count


def _launch_table(tables, device, is_causal: bool, num_heads: int, order_name: str) -> LaunchTable:
    items, keys = [], []
    entry_base = 0
    written = torch.zeros(num_heads, dtype=torch.long)
    query_points = None
    for table in tables:
        nh = len(table.heads)
        rows = table.num_rows
        full = _full_entries(table, is_causal)
        entry_row = table.entry_row
        order, run_block, run_count = _entry_order(entry_row, table.key_block, full, rows)
        full_count = torch.bincount(entry_row[full], minlength=rows)
        # The row's segment: the first launch also writes the positions of the segment that lie on no
        # lattice point of this head (0 / -inf), so those need no separate fill of out and lse.
        segment_start, segment_stop = table.segment_start, table.segment_stop
        entry_start = table.row_ptr[:-1] + entry_base
        fields = _pack(
            WorkItem,
            rows,
            lattice_start=table.lattice_start,
            lattice_length=table.lattice_length,
            query_block=table.query_block,
            entry_start=entry_start,
            entry_stop=table.row_ptr[1:] + entry_base,
            stride=table.stride,
            head=0,  # set per head below
            full_stop=entry_start + full_count,
            run_block=run_block,
            run_count=run_count,
            segment_start=segment_start,
            segment_stop=segment_stop,
            query_lo=table.query_limits[0],
            query_hi=table.query_limits[1],
            key_lo=table.key_limits[0],
            key_hi=table.key_limits[1],
            query_shift=table.query_limits[0],
            key_shift=table.key_limits[0],
        )
        per_head = fields.unsqueeze(1).repeat(1, nh, 1)  # (rows, nh, F): heads of one row side by side
        per_head[:, :, WorkItem.HEAD] = torch.arange(table.heads.start, table.heads.stop)
        if order_name == "by_lattice":
            per_head = per_head.transpose(0, 1)  # (nh, rows, F): one head's rows (lattice-major) side by side
        items.append(per_head.reshape(rows * nh, len(WorkItem)))
        keys.append(table.key_block[order])
        entry_base += table.nnz
        # Positions a row writes with gaps zeroed: one contiguous zone from its first point (the segment's
        # start for block 0) to its last point + stride (the segment's end at most), inside the query chunk.
        q_lo, q_hi = table.query_limits
        t0 = table.query_block * table.block_size
        t_end = torch.minimum(t0 + table.block_size, table.lattice_length)
        zone_lo = torch.where(table.query_block == 0, segment_start, table.lattice_start + table.stride * t0)
        zone_hi = torch.minimum(table.lattice_start + table.stride * t_end, segment_stop)
        zone = torch.clamp(
            torch.minimum(zone_hi, torch.full_like(zone_hi, q_hi))
            - torch.maximum(zone_lo, torch.full_like(zone_lo, q_lo)),
            min=0,
        )
        written[table.heads.start : table.heads.stop] += int(zone.sum())
        query_points = q_hi - q_lo
    items = torch.cat(items)
    if order_name == "longest_first":
        # The heavy programs start early and the short ones fill the tail.
        counts = items[:, WorkItem.ENTRY_STOP] - items[:, WorkItem.ENTRY_START]
        items = items[torch.sort(counts, descending=True, stable=True).indices]
    if items.numel() and int(items.max()) >= 2**31:
        raise ValueError("sequence too long for the kernel's int32 block tables (positions >= 2**31)")
    full_entries = items[:, WorkItem.FULL_STOP] - items[:, WorkItem.ENTRY_START]
    run_count = items[:, WorkItem.RUN_COUNT]
    max_full = int(full_entries.max()) if items.numel() else 0
    max_listed = int((full_entries - run_count).max()) if items.numel() else 0
    has_full = run_count > 0
    mean_run = float(run_count[has_full].double().mean()) if bool(has_full.any()) else 0.0
    return LaunchTable(
        items=items.to(torch.int32).contiguous().to(device),
        key_block=torch.cat(keys).to(torch.int32).to(device),
        num_items=int(items.shape[0]),
        max_full=max_full,
        max_listed=max_listed,
        mean_run=mean_run,
        run_rows=int(has_full.sum()),
        covers_head=written == query_points,
    )


_table_cache: OrderedDict = OrderedDict()
# Tables a CUDA graph was captured with: the graph replays their addresses, so they are never evicted.
_pinned_tables: dict = {}


def device_tables(plan: CallPlan, device, order: str | None = None) -> tuple[LaunchTable, ...]:
    """The launches of ``plan`` on ``device`` in item order ``order``, built once per (plan, device, order) (LRU)."""
    order = item_order(order)
    num_heads = plan.geometry.num_heads
    return _cached(
        (plan, str(device), order),
        device,
        lambda: tuple(_launch_table(layer, device, plan.is_causal, num_heads, order) for layer in _layers(plan.tables)),
    )


def _cached(key, device, build):
    """``build()``'s launches, kept in the LRU table cache under ``key`` (pinned while a CUDA graph captures)."""
    capturing = torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing()
    pinned = _pinned_tables.get(key)
    if pinned is not None:
        return pinned
    cached = _table_cache.get(key)
    if cached is not None:
        if capturing:
            _pinned_tables[key] = _table_cache.pop(key)
        else:
            _table_cache.move_to_end(key)
        return cached
    launches = build()
    if capturing:
        _pinned_tables[key] = launches
        return launches
    _table_cache[key] = launches
    while len(_table_cache) > 1 and sum(map(_launches_nbytes, _table_cache.values())) > TABLE_CACHE_BYTES:
        _table_cache.popitem(last=False)
    return launches


def _launches_nbytes(launches) -> int:
    """Bytes of a cache entry's tables (a plan's launches, or a ring step's StepLaunches)."""
    if isinstance(launches, StepLaunches):
        return sum(map(_launches_nbytes, launches.rounds))
    return sum(launch.items.numel() * 4 + launch.key_block.numel() * 4 for launch in launches)


def _rounds(pairs: tuple[StepPair, ...], by: str = "query") -> list[list[StepPair]]:
    """Pairs grouped so that no two in a group write the same row (a launch must never merge two partials
    into one point at once): of the accumulator (``by`` "query"), or of dk and dv (``by`` "key", the
    backward); first fit, in the given order (the merge order)."""
    rows = (lambda pair: pair.query_rows) if by == "query" else (lambda pair: pair.key_rows)  # noqa: E731
    rounds: list[list[StepPair]] = []
    for pair in pairs:
        lo, hi = rows(pair)
        for members in rounds:
            if all(hi <= rows(other)[0] or rows(other)[1] <= lo for other in members):
                members.append(pair)
                break
        else:
            rounds.append([pair])
    return rounds


def _joined(parts: list[tuple[LaunchTable, StepPair]], num_heads: int) -> LaunchTable:
    """One launch over the items of several pairs' launches, with each pair's shifts and entry offsets."""
    W = WorkItem
    items, keys, entry_base = [], [], 0
    for launch, pair in parts:
        part = launch.items.clone()
        part[:, [W.ENTRY_START, W.ENTRY_STOP, W.FULL_STOP]] += entry_base
        part[:, W.QUERY_SHIFT] = pair.query_shift
        part[:, W.KEY_SHIFT] = pair.key_shift
        items.append(part)
        keys.append(launch.key_block)
        entry_base += launch.key_block.numel()
    if entry_base >= 2**31:
        raise ValueError("a ring step lists too many key blocks for the kernel's int32 block tables (>= 2**31)")
    run_rows = sum(launch.run_rows for launch, _ in parts)
    mean_run = sum(launch.mean_run * launch.run_rows for launch, _ in parts) / run_rows if run_rows else 0.0
    return LaunchTable(
        items=torch.cat(items).contiguous(),
        key_block=torch.cat(keys),
        num_items=sum(launch.num_items for launch, _ in parts),
        max_full=max(launch.max_full for launch, _ in parts),
        max_listed=max(launch.max_listed for launch, _ in parts),
        mean_run=mean_run,
        run_rows=run_rows,
        covers_head=torch.zeros(num_heads, dtype=torch.bool),  # never read: a step always merges into its accumulator
    )


@dataclass(frozen=True)
class StepLaunches:
    """A ring step's launches: per round of pairs (``_rounds``), one launch per head layer; and the
    (row start, row stop, head start, head stop) boxes of q's rows that the first launch does not write."""

    rounds: tuple[tuple[LaunchTable, ...], ...]
    first_fills: tuple[tuple[int, int, int, int], ...]


def step_tables(pairs: tuple[StepPair, ...], device, num_queries: int, order: str | None = None) -> StepLaunches:
    """The launches of a ring step over q's ``num_queries`` rows, built once per (pairs, device, rows, order)
    (LRU), so that a repeated step does no host tensor work: each launch joins one head layer of every
    pair of a round."""
    order = item_order(order)
    num_heads = pairs[0].plan.geometry.num_heads

    def build():
        rounds = []
        for members in _rounds(pairs):
            per_pair = [(device_tables(pair.plan, device, order), pair) for pair in members]
            layers = max(len(tables) for tables, _ in per_pair)
            rounds.append(
                tuple(
                    _joined([(tables[layer], pair) for tables, pair in per_pair if layer < len(tables)], num_heads)
                    for layer in range(layers)
                )
            )
        # The first launch writes a first-round pair's rows in full at the heads its plan's first launch covers.
        written = torch.zeros(num_queries, num_heads, dtype=torch.bool)
        for pair in _rounds(pairs)[0]:
            tables = device_tables(pair.plan, device, order)
            if tables:
                written[slice(*pair.query_rows)] = tables[0].covers_head
        return StepLaunches(tuple(rounds), _boxes(~written))

    return _cached(("step", pairs, str(device), num_queries, order), device, build)


def _boxes(flags: torch.Tensor) -> tuple[tuple[int, int, int, int], ...]:
    """(row start, row stop, head start, head stop) boxes covering the True entries of (rows, heads) ``flags``."""
    if not bool(flags.any()):
        return ()
    change = torch.ones(flags.shape[0], dtype=torch.bool)
    change[1:] = (flags[1:] != flags[:-1]).any(dim=1)
    starts = torch.nonzero(change).flatten().tolist() + [flags.shape[0]]
    return tuple(
        (row_start, row_stop, head_start, head_stop)
        for row_start, row_stop in zip(starts[:-1], starts[1:])
        for head_start, head_stop in _head_runs(flags[row_start])
    )


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _softmax_step(s, v, m_i, l_i, acc, FP32_DOT: tl.constexpr):
    """One online-softmax update with base-2 scores ``s`` (already scaled by log2(e) * scale)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no allowed key yet keeps m = -inf: shift by 0 so exp2 gives 0, never NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_shift)
    p = tl.math.exp2(s - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if FP32_DOT:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _full_block_step(
    q, k, v, m_i, l_i, acc, KPM, kpm_base, stride_mn, idx_k, qk_scale, HAS_PADDING: tl.constexpr, FP32_DOT: tl.constexpr
):
    """One key tile of a full block: every point exists and lies in the chunk (only padding can mask)."""
    if FP32_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if HAS_PADDING:
        padded = tl.load(KPM + kpm_base + idx_k * stride_mn)
        s = tl.where((padded == 0)[None, :], s, float("-inf"))
    return _softmax_step(s, v, m_i, l_i, acc, FP32_DOT)


@triton.jit
def _forward_kernel(
    Q,
    K,
    V,
    KPM,
    Out,
    Lse,
    Items,
    KeyBlock,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_on,
    stride_oh,
    stride_mb,
    stride_mn,
    num_heads,
    num_queries,
    kv_group,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    MERGE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    EVEN_D: tl.constexpr,
    REGISTER_INDEX: tl.constexpr,
    MAX_ENTRIES: tl.constexpr,
    RUNS: tl.constexpr,
    TMA: tl.constexpr,
    ZERO_GAPS: tl.constexpr,
):
    M_SUB: tl.constexpr = BLOCK // BLOCK_M
    N_SUB: tl.constexpr = BLOCK // BLOCK_N
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    item = pid // M_SUB
    m_sub = pid % M_SUB
    meta = Items + item * ITEM_WIDTH
    lattice_start = tl.load(meta + ITEM_LATTICE_START)
    lattice_len = tl.load(meta + ITEM_LATTICE_LENGTH)
    query_block = tl.load(meta + ITEM_QUERY_BLOCK)
    entry_start = tl.load(meta + ITEM_ENTRY_START)
    entry_stop = tl.load(meta + ITEM_ENTRY_STOP)
    stride = tl.load(meta + ITEM_STRIDE)
    head = tl.load(meta + ITEM_HEAD)
    kv_head = head // kv_group
    q_lo = tl.load(meta + ITEM_QUERY_LO)
    q_hi = tl.load(meta + ITEM_QUERY_HI)
    k_lo = tl.load(meta + ITEM_KEY_LO)
    k_hi = tl.load(meta + ITEM_KEY_HI)
    q_shift = tl.load(meta + ITEM_QUERY_SHIFT)
    k_shift = tl.load(meta + ITEM_KEY_SHIFT)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    t_q = query_block * BLOCK + m_sub * BLOCK_M + tl.arange(0, BLOCK_M)
    pos_q = lattice_start + stride * t_q
    q_ok = (t_q < lattice_len) & (pos_q >= q_lo) & (pos_q < q_hi)
    idx_q = tl.where(q_ok, pos_q - q_shift, 0).to(tl.int64)
    q_ptrs = Q + batch * stride_qb + head.to(tl.int64) * stride_qh + idx_q[:, None] * stride_qn + d[None, :]
    q = tl.load(q_ptrs, mask=q_ok[:, None] & d_ok[None, :], other=0.0)

    k_base = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch * stride_vb + kv_head.to(tl.int64) * stride_vh
    kpm_base = batch * stride_mb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full_stop = tl.load(meta + ITEM_FULL_STOP)
    n_off = tl.arange(0, BLOCK_N)
    # Lattice point t of this row sits at row (lattice_start - k_shift) + stride * t of k: a strided 2D view.
    row_step = stride.to(tl.int64) * stride_kn
    if RUNS:
        run_block = tl.load(meta + ITEM_RUN_BLOCK)
        run_count = tl.load(meta + ITEM_RUN_COUNT)
        list_start = entry_start + run_count
    else:
        list_start = entry_start
    if TMA:
        # Descriptors over the lattice points inside the key chunk: [first_t, stop_t) x HEAD_DIM.
        first_t = tl.maximum((k_lo - lattice_start + stride - 1) // stride, 0)
        stop_t = tl.minimum(tl.maximum((k_hi - lattice_start + stride - 1) // stride, 0), lattice_len)
        rows = tl.maximum(stop_t - first_t, 1)
        row0 = (lattice_start - k_shift).to(tl.int64) + stride.to(tl.int64) * first_t
        k_desc = tl.make_tensor_descriptor(
            k_base + row0 * stride_kn,
            shape=[rows, HEAD_DIM],
            strides=[stride * stride_kn, 1],
            block_shape=[BLOCK_N, BLOCK_D],
        )
        v_desc = tl.make_tensor_descriptor(
            v_base + row0 * stride_vn,
            shape=[rows, HEAD_DIM],
            strides=[stride * stride_vn, 1],
            block_shape=[BLOCK_N, BLOCK_D],
        )
    if RUNS:
        # The row's run of consecutive full blocks: one pointer tile (or descriptor) walked by a constant step.
        t_run = run_block * BLOCK
        idx_k = (lattice_start - k_shift + stride * (t_run + n_off)).to(tl.int64)
        if not TMA:
            k_ptrs = k_base + idx_k[:, None] * stride_kn + d[None, :]
            v_ptrs = v_base + idx_k[:, None] * stride_vn + d[None, :]
            k_step = BLOCK_N * row_step
            v_step = BLOCK_N * stride.to(tl.int64) * stride_vn
        for step in range(0, run_count * N_SUB):
            if TMA:
                k = k_desc.load([t_run + step * BLOCK_N - first_t, 0])
                v = v_desc.load([t_run + step * BLOCK_N - first_t, 0])
            elif EVEN_D:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
            m_i, l_i, acc = _full_block_step(
                q, k, v, m_i, l_i, acc, KPM, kpm_base, stride_mn, idx_k, qk_scale, HAS_PADDING, FP32_DOT
            )
            if not TMA:
                k_ptrs += k_step
                v_ptrs += v_step
            if HAS_PADDING:
                idx_k += BLOCK_N * stride

    # Listed full key blocks: no lattice/chunk/causal mask. Their block list sits in registers when it
    # is short, so the loads of step i+2 have their addresses without waiting on an index load.
    if REGISTER_INDEX:
        slots = tl.arange(0, MAX_ENTRIES)
        row_blocks = tl.load(KeyBlock + list_start + slots, mask=slots < full_stop - list_start, other=0)
    for step in range(0, (full_stop - list_start) * N_SUB):
        if REGISTER_INDEX:
            key_block = tl.sum(tl.where(slots == step // N_SUB, row_blocks, 0), axis=0)
        else:
            key_block = tl.load(KeyBlock + list_start + step // N_SUB)
        t_k0 = key_block * BLOCK + (step % N_SUB) * BLOCK_N
        t_k = t_k0 + n_off
        idx_k = (lattice_start - k_shift + stride * t_k).to(tl.int64)
        if TMA:
            k = k_desc.load([t_k0 - first_t, 0])
            v = v_desc.load([t_k0 - first_t, 0])
        elif EVEN_D:
            k = tl.load(k_base + idx_k[:, None] * stride_kn + d[None, :])
            v = tl.load(v_base + idx_k[:, None] * stride_vn + d[None, :])
        else:
            k = tl.load(k_base + idx_k[:, None] * stride_kn + d[None, :], mask=d_ok[None, :], other=0.0)
            v = tl.load(v_base + idx_k[:, None] * stride_vn + d[None, :], mask=d_ok[None, :], other=0.0)
        m_i, l_i, acc = _full_block_step(
            q, k, v, m_i, l_i, acc, KPM, kpm_base, stride_mn, idx_k, qk_scale, HAS_PADDING, FP32_DOT
        )

    # The other key blocks: the last block of a lattice, chunk edges, the causal diagonal.
    for step in range(0, (entry_stop - full_stop) * N_SUB):
        key_block = tl.load(KeyBlock + full_stop + step // N_SUB)
        t_k = key_block * BLOCK + (step % N_SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
        pos_k = lattice_start + stride * t_k
        k_ok = (t_k < lattice_len) & (pos_k >= k_lo) & (pos_k < k_hi)
        idx_k = tl.where(k_ok, pos_k - k_shift, 0).to(tl.int64)
        kv_mask = k_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + idx_k[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + idx_k[:, None] * stride_vn + d[None, :], mask=kv_mask, other=0.0)
        if HAS_PADDING:
            padded = tl.load(KPM + kpm_base + idx_k * stride_mn, mask=k_ok, other=1)
            k_ok = k_ok & (padded == 0)
        if FP32_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        allowed = k_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (t_k[None, :] <= t_q[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_i, l_i, acc = _softmax_step(s, v, m_i, l_i, acc, FP32_DOT)

    nonempty = l_i > 0.0
    inv_l = tl.where(nonempty, 1.0 / tl.where(nonempty, l_i, 1.0), 0.0)
    out = acc * inv_l[:, None]
    lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    lse_ptrs = Lse + (batch * num_heads + head) * num_queries + idx_q
    o_ptrs = Out + batch * stride_ob + head.to(tl.int64) * stride_oh + idx_q[:, None] * stride_on + d[None, :]
    o_mask = q_ok[:, None] & d_ok[None, :]
    if MERGE:
        # Merge on write with an earlier branch's partial (docs/semantics.md section 5); empty ones change nothing.
        old_lse = tl.load(lse_ptrs, mask=q_ok, other=float("-inf"))
        old_out = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        top = tl.maximum(old_lse, lse)
        top_shift = tl.where(top == float("-inf"), 0.0, top)
        w_old = tl.exp(old_lse - top_shift)
        w_new = tl.exp(lse - top_shift)
        total = w_old + w_new
        some = total > 0.0
        inv_total = tl.where(some, 1.0 / tl.where(some, total, 1.0), 0.0)
        out = (old_out * w_old[:, None] + out * w_new[:, None]) * inv_total[:, None]
        lse = tl.where(some, top_shift + tl.log(tl.where(some, total, 1.0)), float("-inf"))
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)
    tl.store(lse_ptrs, lse, mask=q_ok)

    if ZERO_GAPS:
        # The positions of this head's segment that lie on no lattice point are empty (out 0, lse -inf).
        # The program writes those after each of its points (up to stride - 1, within the segment) and,
        # for the lattice's first point, those before it; the host then skips its fill of this head.
        segment_start = tl.load(meta + ITEM_SEGMENT_START)
        segment_stop = tl.load(meta + ITEM_SEGMENT_STOP)
        zero_tile = tl.zeros([BLOCK_M, BLOCK_D], dtype=Out.dtype.element_ty)
        empty_lse = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        on_lattice = t_q < lattice_len
        first_row = t_q == 0  # the lattice's first point (one row of one program)
        out_base = Out + batch * stride_ob + head.to(tl.int64) * stride_oh
        lse_base = Lse + (batch * num_heads + head) * num_queries
        for gap in range(1, stride):
            for side in tl.static_range(2):
                # side 0: pos_q + gap (after each point); side 1: lattice_start - gap (before the first point)
                if side == 0:
                    pos_g = pos_q + gap
                    g_ok = on_lattice & (pos_g < segment_stop)
                else:
                    pos_g = lattice_start - gap + tl.zeros([BLOCK_M], dtype=tl.int32)
                    g_ok = first_row & (pos_g >= segment_start)
                g_ok = g_ok & (pos_g >= q_lo) & (pos_g < q_hi)
                idx_g = tl.where(g_ok, pos_g - q_shift, 0).to(tl.int64)
                tl.store(
                    out_base + idx_g[:, None] * stride_on + d[None, :], zero_tile, mask=g_ok[:, None] & d_ok[None, :]
                )
                tl.store(lse_base + idx_g, empty_lse, mask=g_ok)


@triton.jit
def _weights_kernel(
    Q,
    K,
    KPM,
    Lse,
    Values,
    Blocks,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_mb,
    stride_mn,
    num_heads,
    num_queries,
    num_blocks,
    q_lo,
    q_hi,
    k_lo,
    k_hi,
    kv_group,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    N_SUB: tl.constexpr = BLOCK // BLOCK_N
    block = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    m_sub = tile // N_SUB
    n_sub = tile % N_SUB
    meta = Blocks + block * WEIGHT_WIDTH
    lattice_start = tl.load(meta + WEIGHT_LATTICE_START)
    lattice_len = tl.load(meta + WEIGHT_LATTICE_LENGTH)
    query_block = tl.load(meta + WEIGHT_QUERY_BLOCK)
    key_block = tl.load(meta + WEIGHT_KEY_BLOCK)
    stride = tl.load(meta + WEIGHT_STRIDE)
    head = tl.load(meta + WEIGHT_HEAD)
    kv_head = head // kv_group

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    i = m_sub * BLOCK_M + tl.arange(0, BLOCK_M)
    j = n_sub * BLOCK_N + tl.arange(0, BLOCK_N)
    t_q = query_block * BLOCK + i
    t_k = key_block * BLOCK + j
    pos_q = lattice_start + stride * t_q
    pos_k = lattice_start + stride * t_k
    q_ok = (t_q < lattice_len) & (pos_q >= q_lo) & (pos_q < q_hi)
    k_ok = (t_k < lattice_len) & (pos_k >= k_lo) & (pos_k < k_hi)
    idx_q = tl.where(q_ok, pos_q - q_lo, 0).to(tl.int64)
    idx_k = tl.where(k_ok, pos_k - k_lo, 0).to(tl.int64)
    q = tl.load(
        Q + batch * stride_qb + head.to(tl.int64) * stride_qh + idx_q[:, None] * stride_qn + d[None, :],
        mask=q_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k = tl.load(
        K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh + idx_k[:, None] * stride_kn + d[None, :],
        mask=k_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if HAS_PADDING:
        padded = tl.load(KPM + batch * stride_mb + idx_k * stride_mn, mask=k_ok, other=1)
        k_ok = k_ok & (padded == 0)
    if FP32_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    lse = tl.load(Lse + (batch * num_heads + head) * num_queries + idx_q, mask=q_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    allowed = q_ok[:, None] & k_ok[None, :]
    if IS_CAUSAL:
        allowed = allowed & (t_k[None, :] <= t_q[:, None])
    probs = tl.where(allowed, tl.exp(s * scale - lse[:, None]), 0.0)
    out = Values + ((batch * num_blocks + block) * BLOCK + i[:, None]) * BLOCK + j[None, :]
    tl.store(out, probs)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _prepare(q, k, v):
    # The kernels address the head dim with unit stride; anything else is made contiguous once.
    fix = lambda t: t if t is None or t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    return fix(q), fix(k), fix(v)


def _padding_view(key_padding_mask, like):
    if key_padding_mask is None:
        return like, 0, 0, False  # never read: HAS_PADDING is False
    mask = key_padding_mask.view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1), True


def _head_runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """Contiguous [start, stop) ranges of the heads where ``flags`` is True."""
    runs, start = [], None
    for h, flag in enumerate(flags.tolist() + [False]):
        if flag and start is None:
            start = h
        elif not flag and start is not None:
            runs.append((start, h))
            start = None
    return runs


def _unset_outputs(batch, num_queries, num_heads, head_dim, out_dtype, device):
    """(out, lse) the kernel is to write: empty, or NaN off CUDA and with BSRDA_TRITON_POISON=1 (_allocate_outputs)."""
    poison = torch.device(device).type != "cuda" or os.environ.get("BSRDA_TRITON_POISON", "0") not in ("", "0")
    alloc = (lambda *shape, **kw: torch.full(shape, float("nan"), **kw)) if poison else torch.empty  # noqa: E731
    out = alloc(batch, num_queries, num_heads, head_dim, dtype=out_dtype, device=device)
    lse = alloc(batch, num_heads, num_queries, dtype=torch.float32, device=device)
    return out, lse


def _allocate_outputs(batch, num_queries, num_heads, head_dim, out_dtype, device, covered):
    """out = 0 and lse = -inf on every head the first launch does not write in full; the rest is left unset.

    Skipping the fill where the kernel writes every point saves a pass over out (4.3 GB at 1M
    tokens, D=128). Off CUDA, or with BSRDA_TRITON_POISON=1, those heads are filled with NaN, so a
    point the kernel failed to write fails every comparison instead of passing by luck.
    """
    out, lse = _unset_outputs(batch, num_queries, num_heads, head_dim, out_dtype, device)
    for start, stop in _head_runs(~covered):
        out[:, :, start:stop].zero_()
        lse[:, start:stop].fill_(float("-inf"))
    return out, lse


def _check_accumulator(into, out_shape, device):
    """The (out, lse) a call merges into: float32, out (B, Nq, H, D) with unit stride on D, lse (B, H, Nq)."""
    if not (isinstance(into, tuple) and len(into) == 2 and all(isinstance(t, torch.Tensor) for t in into)):
        raise TypeError(f"into must be a tuple (out, lse) of tensors, got {type(into).__name__}")
    out, lse = into
    batch, num_queries, num_heads, _ = out_shape
    expected = {"out": (out, tuple(out_shape)), "lse": (lse, (batch, num_heads, num_queries))}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float32 or tensor.device != torch.device(device):
            raise ValueError(
                f"into's {name} must be float32 of shape {shape} on {device} (the query chunk's accumulator), "
                f"got {tensor.dtype} of shape {tuple(tensor.shape)} on {tensor.device}"
            )
    if out.stride(-1) != 1 or not lse.is_contiguous():
        raise ValueError(
            f"into's out needs unit stride on its last dim and lse must be contiguous, got strides "
            f"{out.stride()} and {lse.stride()}"
        )
    return out, lse


def _auto_variant(launch: LaunchTable) -> str:
    if launch.mean_run >= AUTO_TMA_MIN_RUN:
        return "v3tma"
    if launch.mean_run >= AUTO_RUNS_MIN_RUN:
        return "v3"
    return "v2"


def _tma_ready(*tensors) -> bool:
    """Tensor descriptors need 16-byte aligned base addresses and strides (every lattice view then is)."""
    for t in tensors:
        size = t.element_size()
        if t.data_ptr() % 16 or any((st * size) % 16 for st in t.stride()[:-1]):
            return False
    return True


_allocator_set = False


def _ensure_descriptor_allocator() -> None:
    # Descriptors built inside a kernel live in a scratch buffer Triton asks the host for.
    global _allocator_set
    if not _allocator_set:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _allocator_set = True


def _checked_tile(tile: TileConfig | None, block_size: int, block_d: int, dtype) -> TileConfig:
    tile = tile or default_tile(block_size, block_d, dtype)
    if block_size % tile.block_m or block_size % tile.block_n:
        raise ValueError(f"tile {tile} must divide block_size={block_size}")
    return tile


def _launch_forward(
    q, k, v, mask_view, out, lse, launch: LaunchTable, plan: CallPlan, tile, variant, register_index, merge, zero_gaps
):
    """One launch of the forward kernel over ``launch``'s items (block size, causal and scale from ``plan``)."""
    batch, num_queries, num_heads, head_dim = q.shape[0], out.shape[1], out.shape[2], q.shape[3]
    block_d = max(16, triton.next_power_of_2(head_dim))
    b = plan.block_size
    mask, mask_sb, mask_sn, has_padding = mask_view
    reads = _auto_variant(launch) if variant == "auto" else variant
    runs = reads != "v2"
    tma = reads == "v3tma" and _tma_ready(k, v)
    if tma and q.is_cuda:
        _ensure_descriptor_allocator()
    listed = launch.max_listed if runs else launch.max_full
    grid = (launch.num_items * (b // tile.block_m), batch)
    _forward_kernel[grid](
        q,
        k,
        v,
        mask,
        out,
        lse,
        launch.items,
        launch.key_block,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        mask_sb,
        mask_sn,
        num_heads,
        num_queries,
        num_heads // k.shape[2],
        plan.scale * _LOG2E,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK=b,
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        IS_CAUSAL=plan.is_causal,
        HAS_PADDING=has_padding,
        MERGE=merge,
        FP32_DOT=q.dtype == torch.float32,
        EVEN_D=block_d == head_dim,
        REGISTER_INDEX=register_index and listed <= MAX_REGISTER_ENTRIES,
        MAX_ENTRIES=max(16, triton.next_power_of_2(max(1, listed))),
        RUNS=runs,
        TMA=tma,
        ZERO_GAPS=zero_gaps,
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )


def partial_forward(
    q,
    k,
    v,
    key_padding_mask,
    plan: CallPlan,
    tile: TileConfig | None = None,
    variant: str | None = None,
    order: str | None = None,
    index: str | None = None,
    into: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Partial attention of q (B, Nq, H, D) at plan.query_range against k, v (B, Nk, H_kv, D) at plan.key_range.

    Returns (out, lse): out (B, Nq, H, D) in q.dtype when the call covers the whole key range,
    float32 for a key chunk (its partial is merged with others later); lse (B, H, Nq) float32.
    ``into``: a running float32 (out, lse) of the same query chunk (a ring's accumulator, empty
    rows 0 / -inf) that the kernel merges this pair into as it writes (docs/semantics.md section 5),
    in place; positions the pair does not reach keep their values. Returns ``into``.
    ``variant``: how full key blocks are read (VARIANTS; default: env BSRDA_TRITON_VARIANT or DEFAULT_VARIANT);
    ``order``: the launch order of work items (ITEM_ORDERS); ``index``: how listed blocks are found
    (INDEX_MODES). Each defaults to its environment variable, then to its DEFAULT_*; the output
    does not depend on them (each query block's keys are walked in the same order either way).
    """
    _check_inputs(q, k, v, plan)
    variant = kernel_variant(variant)
    register_index = index_mode(index) == "registers"
    q, k, v = _prepare(q, k, v)
    batch, num_queries, num_heads, head_dim = q.shape
    block_d = max(16, triton.next_power_of_2(head_dim))
    b = plan.block_size
    whole_keys = plan.key_range == (0, plan.geometry.seq_len)
    out_dtype = q.dtype if whole_keys else torch.float32
    launches = device_tables(plan, q.device, order)
    if into is not None:
        out, lse = _check_accumulator(into, (batch, num_queries, num_heads, head_dim), q.device)
        if not launches:
            return out, lse
    elif not launches:
        out = torch.zeros(batch, num_queries, num_heads, head_dim, dtype=out_dtype, device=q.device)
        lse = torch.full((batch, num_heads, num_queries), float("-inf"), dtype=torch.float32, device=q.device)
        return out, lse
    else:
        out, lse = _allocate_outputs(
            batch, num_queries, num_heads, head_dim, out_dtype, q.device, launches[0].covers_head
        )
    tile = _checked_tile(tile, b, block_d, q.dtype)
    mask_view = _padding_view(key_padding_mask, lse)
    for layer, launch in enumerate(launches):
        _launch_forward(
            q,
            k,
            v,
            mask_view,
            out,
            lse,
            launch,
            plan,
            tile,
            variant,
            register_index,
            merge=into is not None or layer > 0,
            zero_gaps=into is None and layer == 0,
        )
    return out, lse


def _check_step(q, k, pairs) -> None:
    """The pairs of one step: StepPairs of one call (geometry, layout, causal, scale) whose rows lie in q and k."""
    if not pairs or not all(isinstance(pair, StepPair) for pair in pairs):
        raise TypeError(f"pairs must be a non-empty tuple of StepPair, got {pairs!r}")
    shared = lambda plan: (plan.geometry, plan.sparse_config, plan.is_causal, plan.scale)  # noqa: E731
    for index, pair in enumerate(pairs):
        plan = pair.plan
        if shared(plan) != shared(pairs[0].plan):
            raise ValueError(
                f"pairs of one step must share geometry, sparse_config, is_causal and scale: pairs[{index}] "
                f"{shared(plan)} differs from pairs[0] {shared(pairs[0].plan)}"
            )
        for what, (lo, hi), length in (("query", pair.query_rows, q.shape[1]), ("key", pair.key_rows, k.shape[1])):
            if lo < 0 or hi > length:
                raise ValueError(
                    f"pair {pair}: its {what} chunk {getattr(plan, what + '_range')} lies at rows [{lo}, {hi}) of a "
                    f"tensor of {length} rows; the rows must lie in [0, {length}]"
                )


def step_forward_into(
    into: tuple[torch.Tensor, torch.Tensor],
    q,
    k,
    v,
    key_padding_mask,
    pairs: tuple[StepPair, ...],
    tile: TileConfig | None = None,
    variant: str | None = None,
    order: str | None = None,
    index: str | None = None,
):
    """Merge every chunk pair of a ring step into the running float32 (out, lse) ``into`` of q's rows, in place.

    One launch per head layer for all the pairs (``step_tables``; pairs that write the same rows
    take separate launches, in the given order), where ``partial_forward(into=...)`` launches per
    pair. The result is that of merging the pairs one after another (docs/semantics.md section 5).
    ``q`` and ``into`` hold the query chunks at the rows each pair's ``query_shift`` says; ``k``,
    ``v`` and ``key_padding_mask`` the key chunks, by ``key_shift``. Returns ``into``.
    """
    _check_step(q, k, pairs)
    plan = pairs[0].plan
    _check_inputs(q, k, v, plan)
    variant = kernel_variant(variant)
    register_index = index_mode(index) == "registers"
    q, k, v = _prepare(q, k, v)
    out, lse = _check_accumulator(into, tuple(q.shape), q.device)
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    tile = _checked_tile(tile, plan.block_size, block_d, q.dtype)
    mask_view = _padding_view(key_padding_mask, lse)
    for launches in step_tables(tuple(pairs), q.device, q.shape[1], order).rounds:
        for launch in launches:
            _launch_forward(
                q, k, v, mask_view, out, lse, launch, plan, tile, variant, register_index, merge=True, zero_gaps=False
            )
    return out, lse


def step_forward(
    q,
    k,
    v,
    key_padding_mask,
    pairs: tuple[StepPair, ...],
    out_dtype: torch.dtype = torch.float32,
    tile: TileConfig | None = None,
    variant: str | None = None,
    order: str | None = None,
    index: str | None = None,
):
    """(out (B, Nq, H, D) in ``out_dtype``, lse (B, H, Nq) float32) of q's rows from a ring's first step.

    What ``step_forward_into`` merges into an empty accumulator, without filling one first: the
    first round's first launch writes its rows plainly (gaps included, as ``partial_forward``
    does), and only the rows and heads no pair of that round writes in full are filled empty.
    ``out_dtype``: float32 for an accumulator that later steps merge into; q's dtype when this step
    is the last (its layers then merge in q's dtype, as an unsplit call does).
    """
    _check_step(q, k, pairs)
    plan = pairs[0].plan
    _check_inputs(q, k, v, plan)
    if out_dtype not in (torch.float32, q.dtype):
        raise ValueError(f"out_dtype={out_dtype} must be torch.float32 or q's dtype {q.dtype}")
    variant = kernel_variant(variant)
    register_index = index_mode(index) == "registers"
    q, k, v = _prepare(q, k, v)
    batch, num_queries, num_heads, head_dim = q.shape
    out, lse = _unset_outputs(batch, num_queries, num_heads, head_dim, out_dtype, q.device)
    step = step_tables(tuple(pairs), q.device, num_queries, order)
    for row_start, row_stop, head_start, head_stop in step.first_fills:
        out[:, row_start:row_stop, head_start:head_stop].zero_()
        lse[:, head_start:head_stop, row_start:row_stop].fill_(float("-inf"))
    block_d = max(16, triton.next_power_of_2(head_dim))
    tile = _checked_tile(tile, plan.block_size, block_d, q.dtype)
    mask_view = _padding_view(key_padding_mask, lse)
    for round_index, launches in enumerate(step.rounds):
        for layer, launch in enumerate(launches):
            first = round_index == 0 and layer == 0
            _launch_forward(
                q, k, v, mask_view, out, lse, launch, plan, tile, variant, register_index, merge=not first,
                zero_gaps=first,
            )  # fmt: skip
    return out, lse


def _weight_blocks(plan: CallPlan):
    """Per stored block (order of optimized.weights: tables, entries, heads), on the CPU: the kernel's
    records (n, len(WeightBlock)) and the global positions of the block's query and key points, (n, b)
    each with -1 for a slot on no point of the call's chunk."""
    records, query_positions, key_positions = [], [], []
    for table in plan.tables:
        if table.nnz == 0:
            continue
        nh = len(table.heads)
        entry_row = table.entry_row
        start, length, query_block = (
            table.lattice_start[entry_row],
            table.lattice_length[entry_row],
            table.query_block[entry_row],
        )
        fields = _pack(
            WeightBlock,
            table.nnz,
            lattice_start=start,
            lattice_length=length,
            query_block=query_block,
            key_block=table.key_block,
            stride=table.stride,
            head=0,
            branch=table.branch,
            pad=0,  # head: set per head below
        )
        per_head = fields.unsqueeze(1).repeat(1, nh, 1)
        per_head[:, :, WeightBlock.HEAD] = torch.arange(table.heads.start, table.heads.stop)
        records.append(per_head.reshape(table.nnz * nh, len(WeightBlock)))
        for positions, block, limits in (
            (query_positions, query_block, plan.query_range),
            (key_positions, table.key_block, plan.key_range),
        ):
            points, _, valid = block_points(start, length, block, table.stride, table.block_size, limits)
            positions.append(torch.where(valid, points, -1).repeat_interleave(nh, dim=0))
    if not records:
        no_positions = torch.zeros(0, plan.block_size, dtype=torch.long)
        return torch.zeros(0, len(WeightBlock), dtype=torch.long), no_positions, no_positions
    return torch.cat(records), torch.cat(query_positions), torch.cat(key_positions)


def attention_weights(q, k, key_padding_mask, lse, plan: CallPlan):
    """Sparse attention probabilities (docs/semantics.md section 6) from the final lse, in optimized.weights' form."""

    _check_inputs(q, k, k, plan)
    q, k, _ = _prepare(q, k, None)
    batch, num_queries, num_heads, head_dim = q.shape
    device = q.device
    b = plan.block_size
    block_d = max(16, triton.next_power_of_2(head_dim))
    blocks_cpu, query_positions, key_positions = _weight_blocks(plan)
    num_blocks = int(blocks_cpu.shape[0])
    values = torch.empty(batch, num_blocks, b, b, dtype=torch.float32, device=device)
    lse = lse.detach().to(device=device, dtype=torch.float32).contiguous()
    if num_blocks:
        blocks = blocks_cpu.to(torch.int32).to(device)
        tile_m = min(b, 16 if _interpreting() else 64)
        tile_n = min(b, 64)
        mask, mask_sb, mask_sn, has_padding = _padding_view(key_padding_mask, lse)
        grid = (num_blocks, batch, (b // tile_m) * (b // tile_n))
        _weights_kernel[grid](
            q,
            k,
            mask,
            lse,
            values,
            blocks,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            mask_sb,
            mask_sn,
            num_heads,
            num_queries,
            num_blocks,
            plan.query_range[0],
            plan.query_range[1],
            plan.key_range[0],
            plan.key_range[1],
            num_heads // k.shape[2],
            plan.scale,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK=b,
            BLOCK_M=tile_m,
            BLOCK_N=tile_n,
            IS_CAUSAL=plan.is_causal,
            HAS_PADDING=has_padding,
            FP32_DOT=q.dtype == torch.float32,
            num_warps=4,
            num_stages=1,
        )
    seq_len = plan.geometry.seq_len
    return SparseAttentionWeights(
        {
            "block_indices": blocks_cpu[:, [WeightBlock.QUERY_BLOCK, WeightBlock.KEY_BLOCK]].to(device),
            "block_values": values,
            "shape": (batch, num_heads, seq_len, seq_len),
            "block_size": b,
            "block_heads": blocks_cpu[:, WeightBlock.HEAD].to(device),
            "block_branches": blocks_cpu[:, WeightBlock.BRANCH].to(device),
            "query_positions": query_positions.to(device),
            "key_positions": key_positions.to(device),
        }
    )
