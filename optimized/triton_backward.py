"""The Triton backward of the block-sparse dilated attention (gradients of docs/semantics.md section 4).

FlashAttention-2's backward, over the dilated lattice: with the partial's final lse and
``row_term = rowsum(dO * out) - dlse`` per query point, every allowed pair gets
``P = exp(scale q.k - lse)``, ``dP = dO . v`` and ``dS = P (dP - row_term)``; then
``dq = scale sum_j dS k``, ``dk = scale sum_i dS q`` and ``dv = sum_i P dO``. A key counted in
several branches (head_mode "all", overlapping lattices) is one term per branch, so it gets the
gradient of the multiset softmax exactly.

Two kernels read q, k, v, out, dO and lse straight from the caller's tensors along the lattice
(strided addressing, as the forward does; no gather copies):
- ``_dq_kernel``: one program per (query block slice, query head) of the forward's work items,
  walking the row's key blocks (the forward's launch tables, one launch per layer of disjoint heads);
- ``_dkdv_kernel``: one program per (key block slice, kv head) of a table's column list
  (``reference.semantics.ColumnList``, the same entries transposed), walking the query blocks that
  attend it and the query heads that share the kv head (grouped-query heads are summed inside the
  program, so no atomics are needed).
A gradient element is written by one program of one launch, or (when several launches reach it:
head_mode "all", or query heads of one kv head in several tables) read, added to and written back by
launches that run one after another, in a float32 buffer. Either way the result is the same bits
for the same inputs (no atomics, fixed order).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .plan import CallPlan, StepPair
from .triton_backend import (
    ITEM_ENTRY_START,
    ITEM_ENTRY_STOP,
    ITEM_FULL_STOP,
    ITEM_HEAD,
    ITEM_KEY_HI,
    ITEM_KEY_LO,
    ITEM_KEY_SHIFT,
    ITEM_LATTICE_LENGTH,
    ITEM_LATTICE_START,
    ITEM_QUERY_BLOCK,
    ITEM_QUERY_HI,
    ITEM_QUERY_LO,
    ITEM_QUERY_SHIFT,
    ITEM_STRIDE,
    ITEM_WIDTH,
    _check_step,
    _interpreting,
    _pack,
    _padding_view,
    _prepare,
    _rounds,
    device_tables,
    partial_forward,
    step_tables,
)

_LOG2E = 1.4426950408889634
# Column launch tables kept per (plan, device), least recently used first out, bounded by bytes.
COLUMN_CACHE_BYTES = 256 << 20


class ColumnItem(enum.IntEnum):
    """Columns of a backward (dk, dv) work item: one record per (table column, kv head).

    Key block ``KEY_BLOCK`` of the lattice at ``LATTICE_START`` (``LATTICE_LENGTH`` points,
    ``STRIDE`` apart); the query blocks that attend it are ``QueryBlock[ENTRY_START:ENTRY_STOP]``;
    the query heads ``HEAD_START..HEAD_STOP - 1`` of the table read kv head ``KV_HEAD``. The chunks
    and row shifts are those of the forward's ``WorkItem``: global position p sits at row
    ``p - QUERY_SHIFT`` of q (``p - KEY_SHIFT`` of k), so a ring step's pairs share one launch.
    """

    LATTICE_START = 0
    LATTICE_LENGTH = 1
    KEY_BLOCK = 2
    ENTRY_START = 3
    ENTRY_STOP = 4
    STRIDE = 5
    KV_HEAD = 6
    HEAD_START = 7
    HEAD_STOP = 8
    QUERY_LO = 9
    QUERY_HI = 10
    KEY_LO = 11
    KEY_HI = 12
    QUERY_SHIFT = 13
    KEY_SHIFT = 14


COLUMN_WIDTH = tl.constexpr(len(ColumnItem))
COLUMN_LATTICE_START = tl.constexpr(ColumnItem.LATTICE_START.value)
COLUMN_LATTICE_LENGTH = tl.constexpr(ColumnItem.LATTICE_LENGTH.value)
COLUMN_KEY_BLOCK = tl.constexpr(ColumnItem.KEY_BLOCK.value)
COLUMN_ENTRY_START = tl.constexpr(ColumnItem.ENTRY_START.value)
COLUMN_ENTRY_STOP = tl.constexpr(ColumnItem.ENTRY_STOP.value)
COLUMN_STRIDE = tl.constexpr(ColumnItem.STRIDE.value)
COLUMN_KV_HEAD = tl.constexpr(ColumnItem.KV_HEAD.value)
COLUMN_HEAD_START = tl.constexpr(ColumnItem.HEAD_START.value)
COLUMN_HEAD_STOP = tl.constexpr(ColumnItem.HEAD_STOP.value)
COLUMN_QUERY_LO = tl.constexpr(ColumnItem.QUERY_LO.value)
COLUMN_QUERY_HI = tl.constexpr(ColumnItem.QUERY_HI.value)
COLUMN_KEY_LO = tl.constexpr(ColumnItem.KEY_LO.value)
COLUMN_KEY_HI = tl.constexpr(ColumnItem.KEY_HI.value)
COLUMN_QUERY_SHIFT = tl.constexpr(ColumnItem.QUERY_SHIFT.value)
COLUMN_KEY_SHIFT = tl.constexpr(ColumnItem.KEY_SHIFT.value)


# --------------------------------------------------------------------------------------------
# Column launch tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnLaunch:
    """The (dk, dv) work of one BlockTable: column items and their query-block lists, int32 on the device."""

    items: torch.Tensor  # (n_items, len(ColumnItem)) int32
    query_block: torch.Tensor  # (nnz,) int32
    num_items: int
    kv_heads: frozenset  # the kv heads this launch writes


def _column_launch(table, num_heads: int, num_kv_heads: int, device) -> ColumnLaunch:
    columns = table.columns
    group = num_heads // num_kv_heads
    heads = table.heads
    kv_first, kv_last = heads.start // group, (heads.stop - 1) // group
    records = []
    for kv_head in range(kv_first, kv_last + 1):
        # The table's query heads that read this kv head: a contiguous run.
        head_start, head_stop = max(heads.start, kv_head * group), min(heads.stop, (kv_head + 1) * group)
        records.append(
            _pack(
                ColumnItem,
                columns.num_columns,
                lattice_start=columns.lattice_start,
                lattice_length=columns.lattice_length,
                key_block=columns.key_block,
                entry_start=columns.col_ptr[:-1],
                entry_stop=columns.col_ptr[1:],
                stride=table.stride,
                kv_head=kv_head,
                head_start=head_start,
                head_stop=head_stop,
                query_lo=table.query_limits[0],
                query_hi=table.query_limits[1],
                key_lo=table.key_limits[0],
                key_hi=table.key_limits[1],
                query_shift=table.query_limits[0],
                key_shift=table.key_limits[0],
            )
        )
    items = torch.cat(records)
    query_block = table.query_block[table.entry_row[columns.entry]]
    return ColumnLaunch(
        items=items.to(torch.int32).contiguous().to(device),
        query_block=query_block.to(torch.int32).to(device),
        num_items=int(items.shape[0]),
        kv_heads=frozenset(range(kv_first, kv_last + 1)),
    )


_column_cache: OrderedDict = OrderedDict()


def _cached_columns(key, build):
    """``build()``'s column launches, kept in the LRU column cache under ``key`` (bounded by bytes)."""
    cached = _column_cache.get(key)
    if cached is not None:
        _column_cache.move_to_end(key)
        return cached
    launches = build()
    _column_cache[key] = launches
    while len(_column_cache) > 1 and sum(map(_columns_nbytes, _column_cache.values())) > COLUMN_CACHE_BYTES:
        _column_cache.popitem(last=False)
    return launches


def _columns_nbytes(entry) -> int:
    """Bytes of a cache entry: a plan's column launches, or a ring step's (per round)."""
    return sum(
        _columns_nbytes(launch)
        if isinstance(launch, tuple)
        else 4 * (launch.items.numel() + launch.query_block.numel())
        for launch in entry
    )


def column_launches(plan: CallPlan, device, num_kv_heads: int) -> tuple[ColumnLaunch, ...]:
    """One launch per table with entries, built once per (plan, device, H_kv) (LRU, bounded by bytes)."""
    return _cached_columns(
        (plan, str(device), num_kv_heads),
        lambda: tuple(
            _column_launch(table, plan.geometry.num_heads, num_kv_heads, device) for table in plan.tables if table.nnz
        ),
    )


def _joined_columns(parts: list[tuple[ColumnLaunch, StepPair]]) -> ColumnLaunch:
    """One launch over the column items of several pairs' launches, with each pair's shifts and entry offsets."""
    C = ColumnItem
    items, blocks, entry_base = [], [], 0
    for launch, pair in parts:
        part = launch.items.clone()
        part[:, [C.ENTRY_START, C.ENTRY_STOP]] += entry_base
        part[:, C.QUERY_SHIFT] = pair.query_shift
        part[:, C.KEY_SHIFT] = pair.key_shift
        items.append(part)
        blocks.append(launch.query_block)
        entry_base += launch.query_block.numel()
    return ColumnLaunch(
        items=torch.cat(items).contiguous(),
        query_block=torch.cat(blocks),
        num_items=sum(launch.num_items for launch, _ in parts),
        kv_heads=frozenset().union(*(launch.kv_heads for launch, _ in parts)),
    )


def step_column_launches(
    pairs: tuple[StepPair, ...], device, num_kv_heads: int
) -> tuple[tuple[ColumnLaunch, ...], ...]:
    """A ring step's dk/dv launches, built once per (pairs, device, H_kv) (LRU): for each round of pairs with
    disjoint key rows, one launch per table index, joining that table's launch of every pair of the round."""

    def build():
        rounds = []
        for members in _rounds(pairs, by="key"):
            per_pair = [(column_launches(pair.plan, device, num_kv_heads), pair) for pair in members]
            count = max(len(launches) for launches, _ in per_pair)
            joined = (
                _joined_columns([(launches[index], pair) for launches, pair in per_pair if index < len(launches)])
                for index in range(count)
            )
            rounds.append(tuple(joined))
        return tuple(rounds)

    return _cached_columns(("step", pairs, str(device), num_kv_heads), build)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    if FP32_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _row_statistics(Lse, RowTerm, row_base, idx_q, q_ok):
    """Base-2 lse (+inf on empty rows and masked slots, so P = 0 there) and row_term of query points."""
    lse = tl.load(Lse + row_base + idx_q, mask=q_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    row_term = tl.load(RowTerm + row_base + idx_q, mask=q_ok, other=0.0)
    return lse, row_term


@triton.jit
def _points(lattice_start, stride, lattice_len, t, lo, hi, shift):
    """Lattice points ``t``: whether each exists and lies in the chunk [lo, hi), and its row (position - shift)."""
    position = lattice_start + stride * t
    ok = (t < lattice_len) & (position >= lo) & (position < hi)
    return ok, tl.where(ok, position - shift, 0).to(tl.int64)


@triton.jit
def _rows(base, index, stride_n, d, mask):
    """The (points x BLOCK_D) tile of a tensor at chunk rows ``index`` (0 where masked)."""
    return tl.load(base + index[:, None] * stride_n + d[None, :], mask=mask, other=0.0)


@triton.jit
def _gradient_terms(q, k, v, do, lse, row_term, allowed, qk_scale, FP32_DOT: tl.constexpr, MASKED: tl.constexpr):
    """P = exp(scale q.k - lse) and dS = P (dO.v - row_term): (BLOCK_M, BLOCK_N); P = 0 off ``allowed`` if MASKED.

    Query slots off the lattice or chunk need no mask: their lse is +inf, so P is 0 there.
    """
    s = _dot(q, tl.trans(k), FP32_DOT)
    p = tl.math.exp2(s * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(allowed, p, 0.0)
    dp = _dot(do, tl.trans(v), FP32_DOT)
    return p, p * (dp - row_term[:, None])


@triton.jit
def _dq_kernel(
    Q,
    K,
    V,
    DO,
    KPM,
    Lse,
    RowTerm,
    DQ,
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
    stride_dob,
    stride_don,
    stride_doh,
    stride_dqb,
    stride_dqn,
    stride_dqh,
    stride_mb,
    stride_mn,
    num_heads,
    num_queries,
    kv_group,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr,
    EVEN_D: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    M_SUB: tl.constexpr = BLOCK // BLOCK_M
    N_SUB: tl.constexpr = BLOCK // BLOCK_N
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    meta = Items + (pid // M_SUB) * ITEM_WIDTH
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
    t_q = query_block * BLOCK + (pid % M_SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok, idx_q = _points(lattice_start, stride, lattice_len, t_q, q_lo, q_hi, q_shift)
    q_mask = q_ok[:, None] & d_ok[None, :]
    q = _rows(Q + batch * stride_qb + head.to(tl.int64) * stride_qh, idx_q, stride_qn, d, q_mask)
    do = _rows(DO + batch * stride_dob + head.to(tl.int64) * stride_doh, idx_q, stride_don, d, q_mask)
    lse, row_term = _row_statistics(Lse, RowTerm, (batch * num_heads + head) * num_queries, idx_q, q_ok)

    k_base = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = V + batch * stride_vb + kv_head.to(tl.int64) * stride_vh
    kpm_base = KPM + batch * stride_mb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_off = tl.arange(0, BLOCK_N)
    # Full key blocks first (the forward's order: every point on the lattice and in the key chunk, not
    # the causal diagonal): no lattice, chunk or causal mask, only the padding's.
    full_stop = tl.load(meta + ITEM_FULL_STOP)
    for step in range(0, (full_stop - entry_start) * N_SUB):
        key_block = tl.load(KeyBlock + entry_start + step // N_SUB)
        t_k = key_block * BLOCK + (step % N_SUB) * BLOCK_N + n_off
        idx_k = (lattice_start - k_shift + stride * t_k).to(tl.int64)
        if EVEN_D:
            k = tl.load(k_base + idx_k[:, None] * stride_kn + d[None, :])
            v = tl.load(v_base + idx_k[:, None] * stride_vn + d[None, :])
        else:
            k = _rows(k_base, idx_k, stride_kn, d, d_ok[None, :])
            v = _rows(v_base, idx_k, stride_vn, d, d_ok[None, :])
        key_ok = n_off >= 0
        if HAS_PADDING:
            key_ok = tl.load(kpm_base + idx_k * stride_mn) == 0
        _, ds = _gradient_terms(q, k, v, do, lse, row_term, key_ok[None, :], qk_scale, FP32_DOT, HAS_PADDING)
        dq += _dot(ds.to(k.dtype), k, FP32_DOT)
    # The other key blocks: a lattice's last block, chunk edges, the causal diagonal.
    for step in range(0, (entry_stop - full_stop) * N_SUB):
        key_block = tl.load(KeyBlock + full_stop + step // N_SUB)
        t_k = key_block * BLOCK + (step % N_SUB) * BLOCK_N + n_off
        k_ok, idx_k = _points(lattice_start, stride, lattice_len, t_k, k_lo, k_hi, k_shift)
        k_mask = k_ok[:, None] & d_ok[None, :]
        k = _rows(k_base, idx_k, stride_kn, d, k_mask)
        v = _rows(v_base, idx_k, stride_vn, d, k_mask)
        if HAS_PADDING:
            padded = tl.load(kpm_base + idx_k * stride_mn, mask=k_ok, other=1)
            k_ok = k_ok & (padded == 0)
        # Keys off the lattice are masked too (their k is 0, but exp(-lse) alone may overflow).
        allowed = k_ok[None, :]
        if IS_CAUSAL:
            allowed = allowed & (t_k[None, :] <= t_q[:, None])
        _, ds = _gradient_terms(q, k, v, do, lse, row_term, allowed, qk_scale, FP32_DOT, True)
        dq += _dot(ds.to(k.dtype), k, FP32_DOT)
    dq = dq * scale
    dq_ptrs = DQ + batch * stride_dqb + head.to(tl.int64) * stride_dqh + idx_q[:, None] * stride_dqn + d[None, :]
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=q_mask, other=0.0)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _dkdv_kernel(
    Q,
    K,
    V,
    DO,
    KPM,
    Lse,
    RowTerm,
    DK,
    DV,
    Items,
    QueryBlock,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dob,
    stride_don,
    stride_doh,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dvb,
    stride_dvn,
    stride_dvh,
    stride_mb,
    stride_mn,
    num_heads,
    num_queries,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    HAS_PADDING: tl.constexpr,
    FP32_DOT: tl.constexpr,
    EVEN_D: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    M_SUB: tl.constexpr = BLOCK // BLOCK_M
    N_SUB: tl.constexpr = BLOCK // BLOCK_N
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    meta = Items + (pid // N_SUB) * COLUMN_WIDTH
    lattice_start = tl.load(meta + COLUMN_LATTICE_START)
    lattice_len = tl.load(meta + COLUMN_LATTICE_LENGTH)
    key_block = tl.load(meta + COLUMN_KEY_BLOCK)
    entry_start = tl.load(meta + COLUMN_ENTRY_START)
    entry_stop = tl.load(meta + COLUMN_ENTRY_STOP)
    stride = tl.load(meta + COLUMN_STRIDE)
    kv_head = tl.load(meta + COLUMN_KV_HEAD)
    head_start = tl.load(meta + COLUMN_HEAD_START)
    head_count = tl.load(meta + COLUMN_HEAD_STOP) - head_start
    q_lo = tl.load(meta + COLUMN_QUERY_LO)
    q_hi = tl.load(meta + COLUMN_QUERY_HI)
    k_lo = tl.load(meta + COLUMN_KEY_LO)
    k_hi = tl.load(meta + COLUMN_KEY_HI)
    q_shift = tl.load(meta + COLUMN_QUERY_SHIFT)
    k_shift = tl.load(meta + COLUMN_KEY_SHIFT)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    t_k = key_block * BLOCK + (pid % N_SUB) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok, idx_k = _points(lattice_start, stride, lattice_len, t_k, k_lo, k_hi, k_shift)
    k_mask = k_ok[:, None] & d_ok[None, :]
    k = _rows(K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh, idx_k, stride_kn, d, k_mask)
    v = _rows(V + batch * stride_vb + kv_head.to(tl.int64) * stride_vh, idx_k, stride_vn, d, k_mask)
    key_ok = k_ok
    if HAS_PADDING:
        padded = tl.load(KPM + batch * stride_mb + idx_k * stride_mn, mask=k_ok, other=1)
        key_ok = key_ok & (padded == 0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # One step per (attending query block, slice of it, query head of this kv head): heads innermost,
    # so the query block's positions are computed once per slice.
    for step in range(0, (entry_stop - entry_start) * M_SUB * head_count):
        head = head_start + step % head_count
        slice_index = step // head_count
        query_block = tl.load(QueryBlock + entry_start + slice_index // M_SUB)
        t_q = query_block * BLOCK + (slice_index % M_SUB) * BLOCK_M + tl.arange(0, BLOCK_M)
        q_ok, idx_q = _points(lattice_start, stride, lattice_len, t_q, q_lo, q_hi, q_shift)
        q_mask = q_ok[:, None] & d_ok[None, :]
        q = _rows(Q + batch * stride_qb + head.to(tl.int64) * stride_qh, idx_q, stride_qn, d, q_mask)
        do = _rows(DO + batch * stride_dob + head.to(tl.int64) * stride_doh, idx_q, stride_don, d, q_mask)
        lse, row_term = _row_statistics(Lse, RowTerm, (batch * num_heads + head) * num_queries, idx_q, q_ok)
        # Only the causal diagonal needs a mask here: keys off the lattice or padded are this program's
        # own rows, whose sums are dropped or zeroed at the end (a key's dk, dv read only its column).
        p, ds = _gradient_terms(q, k, v, do, lse, row_term, t_k[None, :] <= t_q[:, None], qk_scale, FP32_DOT, IS_CAUSAL)
        dv += _dot(tl.trans(p.to(do.dtype)), do, FP32_DOT)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, FP32_DOT)
    if HAS_PADDING:
        # A padded key is attended by no query: its dk, dv are exactly 0.
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    dk = dk * scale
    dk_ptrs = DK + batch * stride_dkb + kv_head.to(tl.int64) * stride_dkh + idx_k[:, None] * stride_dkn + d[None, :]
    dv_ptrs = DV + batch * stride_dvb + kv_head.to(tl.int64) * stride_dvh + idx_k[:, None] * stride_dvn + d[None, :]
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=k_mask, other=0.0)
        dv += tl.load(dv_ptrs, mask=k_mask, other=0.0)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=k_mask)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelTile:
    """One kernel's tile: ``rows`` points it owns (queries for dq, keys for dk/dv) x ``step`` points per loop step."""

    rows: int
    step: int
    num_warps: int
    num_stages: int

    def fit(self, block_size: int) -> KernelTile:
        """The tile clipped to the block (both sides must divide it)."""
        return KernelTile(min(self.rows, block_size), min(self.step, block_size), self.num_warps, self.num_stages)


@dataclass(frozen=True)
class BackwardTile:
    """Tiles of the two kernels: dq (a query slice, key steps) and dk/dv (a key slice, query steps)."""

    dq: KernelTile
    kv: KernelTile


def default_backward_tile(block_size: int, block_d: int, dtype: torch.dtype) -> BackwardTile:
    if _interpreting():
        tile = KernelTile(32, 32, 4, 1)
        return BackwardTile(tile.fit(block_size), tile.fit(block_size))
    if dtype == torch.float32 or block_d >= 256:
        tile = KernelTile(32, 32, 4, 2)
        return BackwardTile(tile.fit(block_size), tile.fit(block_size))
    # The best of experiments/tune_backward.py on the H200 (experiments/NOTES_gpu.md, run 13): the dk/dv
    # kernel is the one that cares, 64 keys x 64-query steps; dq takes 128-query slices at D = 128.
    dq = KernelTile(128, 64, 8, 3) if block_d >= 128 else KernelTile(64, 64, 4, 3)
    return BackwardTile(dq.fit(block_size), KernelTile(64, 64, 4, 4).fit(block_size))


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# Query points per slice of the row term's float32 product: bounds its temporaries to a slice (at 1M
# tokens the whole product took 2 more q-sized tensors, 1.25x the step's tensors on the H200, run 11).
ROW_TERM_SLICE = 1 << 16


def _row_term(grad_out, out, grad_lse):
    """(B, H, Nq) float32: rowsum(dO * out) - dlse, what every dS of a row subtracts (FlashAttention-2's delta)."""
    batch, num_queries, num_heads, _ = out.shape
    row_term = torch.empty(batch, num_heads, num_queries, dtype=torch.float32, device=out.device)
    for q0 in range(0, num_queries, ROW_TERM_SLICE):
        q1 = min(q0 + ROW_TERM_SLICE, num_queries)
        product = grad_out[:, q0:q1].to(torch.float32) * out[:, q0:q1].to(torch.float32)
        row_term[:, :, q0:q1] = product.sum(-1).transpose(1, 2)
    if grad_lse is not None:
        row_term -= grad_lse.to(torch.float32)
    return row_term


@dataclass(frozen=True)
class _BackwardCall:
    """What every launch of one backward shares: the tensors in kernel form, the tile, the compile-time flags."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    grad_out: torch.Tensor
    mask_view: tuple
    lse: torch.Tensor
    row_term: torch.Tensor
    tile: BackwardTile
    plan: CallPlan  # block size, causal and scale (every pair of a ring shares them)

    @classmethod
    def of(cls, q, k, v, key_padding_mask, plan, out, lse, grad_out, grad_lse, tile):
        q, k, v = _prepare(q, k, v)
        grad_out = torch.zeros_like(out) if grad_out is None else _unit_stride(grad_out)
        if grad_out.dtype != q.dtype:
            grad_out = grad_out.to(q.dtype)  # the dot products take q's dtype (float32 partials of a ring chunk)
        row_term = _row_term(grad_out, out, grad_lse)
        lse = lse.detach().to(torch.float32).contiguous()
        block_d = max(16, triton.next_power_of_2(q.shape[-1]))
        tile = tile or default_backward_tile(plan.block_size, block_d, q.dtype)
        return cls(q, k, v, grad_out, _padding_view(key_padding_mask, lse), lse, row_term, tile, plan)

    @property
    def common(self) -> dict:
        head_dim = self.q.shape[-1]
        block_d = max(16, triton.next_power_of_2(head_dim))
        return dict(
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK=self.plan.block_size,
            IS_CAUSAL=self.plan.is_causal,
            HAS_PADDING=self.mask_view[3],
            FP32_DOT=self.q.dtype == torch.float32,
            EVEN_D=head_dim == block_d,
        )

    def dq(self, launch, dq, accumulate: bool) -> None:
        """One dq launch over forward work items (``LaunchTable``), adding to dq when ``accumulate``."""
        q, k, v, grad_out, tile = self.q, self.k, self.v, self.grad_out, self.tile
        mask, mask_sb, mask_sn, _ = self.mask_view
        num_heads = q.shape[2]
        grid = (launch.num_items * (self.plan.block_size // tile.dq.rows), q.shape[0])
        _dq_kernel[grid](
            q,
            k,
            v,
            grad_out,
            mask,
            self.lse,
            self.row_term,
            dq,
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
            grad_out.stride(0),
            grad_out.stride(1),
            grad_out.stride(2),
            dq.stride(0),
            dq.stride(1),
            dq.stride(2),
            mask_sb,
            mask_sn,
            num_heads,
            q.shape[1],
            num_heads // k.shape[2],
            self.plan.scale * _LOG2E,
            self.plan.scale,
            BLOCK_M=tile.dq.rows,
            BLOCK_N=tile.dq.step,
            ACCUMULATE=accumulate,
            **self.common,
            num_warps=tile.dq.num_warps,
            num_stages=tile.dq.num_stages,
        )

    def dkdv(self, launch, dk, dv, accumulate: bool) -> None:
        """One dk/dv launch over column items (``ColumnLaunch``), adding to dk, dv when ``accumulate``."""
        q, k, v, grad_out, tile = self.q, self.k, self.v, self.grad_out, self.tile
        mask, mask_sb, mask_sn, _ = self.mask_view
        grid = (launch.num_items * (self.plan.block_size // tile.kv.rows), q.shape[0])
        _dkdv_kernel[grid](
            q,
            k,
            v,
            grad_out,
            mask,
            self.lse,
            self.row_term,
            dk,
            dv,
            launch.items,
            launch.query_block,
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            v.stride(0),
            v.stride(1),
            v.stride(2),
            grad_out.stride(0),
            grad_out.stride(1),
            grad_out.stride(2),
            dk.stride(0),
            dk.stride(1),
            dk.stride(2),
            dv.stride(0),
            dv.stride(1),
            dv.stride(2),
            mask_sb,
            mask_sn,
            q.shape[2],
            q.shape[1],
            self.plan.scale * _LOG2E,
            self.plan.scale,
            BLOCK_M=tile.kv.step,
            BLOCK_N=tile.kv.rows,
            ACCUMULATE=accumulate,
            **self.common,
            num_warps=tile.kv.num_warps,
            num_stages=tile.kv.num_stages,
        )

    def run(self, dq_launches, kv_launches, single_kv_writer: bool):
        """(dq, dk, dv) from all the launches, in the dtypes of q, k, v.

        A gradient element written by one launch only is written in place in its own dtype;
        otherwise the launches add up, one after another, in a zero-filled float32 buffer.
        """
        q, k, v = self.q, self.k, self.v
        dq = torch.zeros(q.shape, dtype=q.dtype if len(dq_launches) == 1 else torch.float32, device=q.device)
        for index, launch in enumerate(dq_launches):
            self.dq(launch, dq, accumulate=index > 0)
        kv_dtype = k.dtype if single_kv_writer else torch.float32
        dk = torch.zeros(k.shape, dtype=kv_dtype, device=q.device)
        dv = torch.zeros(v.shape, dtype=kv_dtype, device=q.device)
        for index, launch in enumerate(kv_launches):
            self.dkdv(launch, dk, dv, accumulate=not single_kv_writer and index > 0)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _distinct(launches) -> bool:
    """Whether no two column launches write the same kv head."""
    reached = [head for launch in launches for head in launch.kv_heads]
    return len(reached) == len(set(reached))


def partial_backward(
    q,
    k,
    v,
    key_padding_mask,
    plan: CallPlan,
    out,
    lse,
    grad_out,
    grad_lse,
    tile: BackwardTile | None = None,
    order: str | None = None,
):
    """(dq, dk, dv) of one partial (docs/semantics.md section 5) from its saved out and lse.

    ``grad_out`` (B, Nq, H, D) and ``grad_lse`` (B, H, Nq) are the gradients reaching the partial's
    out and lse (either may be None: zero). Results have the dtypes of q, k, v. Inputs were checked
    by the forward (triton_backend.partial_forward) of the same call.

    dq: the forward's work items, one launch per layer of disjoint heads (a query point of a head is
    in one item of a layer; several layers, head_mode "all", add up). dk, dv: one launch per table (a
    kv head that several tables reach, its query heads in several branches or offsets, adds up).
    """
    call = _BackwardCall.of(q, k, v, key_padding_mask, plan, out, lse, grad_out, grad_lse, tile)
    kv_launches = column_launches(plan, call.q.device, call.k.shape[2])
    return call.run(device_tables(plan, call.q.device, order), kv_launches, _distinct(kv_launches))


def ring_backward(
    q,
    k,
    v,
    key_padding_mask,
    steps: tuple[tuple[StepPair, ...], ...],
    out,
    lse,
    grad_out,
    grad_lse,
    tile: BackwardTile | None = None,
    order: str | None = None,
):
    """(dq, dk, dv) of q, k, v from a ring's steps (the StepPairs of each), given the merged out and lse.

    Every pair's gradients are those of one partial handed the merged out and lse (FlashAttention-2's
    backward over key blocks: no partial is recomputed). Per step one dq launch per round of pairs
    with disjoint query rows and head layer (the forward's step launches), and one dk/dv launch per
    round of pairs with disjoint key rows and table index; the sums run in float32 buffers.
    """
    if not steps:
        raise ValueError("steps must hold at least one ring step")
    for pairs in steps:
        _check_step(q, k, pairs)
    call = _BackwardCall.of(q, k, v, key_padding_mask, steps[0][0].plan, out, lse, grad_out, grad_lse, tile)
    device, num_kv_heads = call.q.device, call.k.shape[2]
    dq_launches = [
        launch
        for pairs in steps
        for launches in step_tables(tuple(pairs), device, call.q.shape[1], order).rounds
        for launch in launches
    ]
    kv_rounds = [step_column_launches(tuple(pairs), device, num_kv_heads) for pairs in steps]
    kv_launches = [launch for rounds in kv_rounds for launches in rounds for launch in launches]
    single_kv_writer = len(kv_rounds) == 1 and len(kv_rounds[0]) == 1 and _distinct(kv_launches)
    return call.run(dq_launches, kv_launches, single_kv_writer)


class _TritonAttention(torch.autograd.Function):
    """The triton forward with this module's backward: saves q, k, v, out and lse, recomputes P per block."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, plan, kernel_choices):
        out, lse = partial_forward(q, k, v, key_padding_mask, plan, **dict(kernel_choices))
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.key_padding_mask, ctx.plan, ctx.order = key_padding_mask, plan, dict(kernel_choices).get("order")
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = partial_backward(
            q, k, v, ctx.key_padding_mask, ctx.plan, out, lse, grad_out, grad_lse, order=ctx.order
        )
        return dq, dk, dv, None, None, None


def differentiable_forward(q, k, v, key_padding_mask, plan: CallPlan, **kernel_choices):
    """``triton_backend.partial_forward``, differentiable in q, k, v when autograd needs it (else the plain call)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _TritonAttention.apply(q, k, v, key_padding_mask, plan, tuple(sorted(kernel_choices.items())))
    return partial_forward(q, k, v, key_padding_mask, plan, **kernel_choices)
