"""Which pairs attend: the one module that answers it (docs/semantics.md sections 2 and 3).

Every other module (the dense reference, the torch / flex / triton paths, the ring) asks this
module for head assignment, offsets, lattice membership, compacted indices, block layouts and
block lists. Pure torch, CPU tensors; a dense N x N mask only through ``dense_multiplicity``,
which refuses large sizes unless told otherwise.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .config import DilationConfig, SparsePatternConfig

# A dense multiplicity tensor larger than this (elements) must be asked for explicitly.
DENSE_MASK_ELEMENT_LIMIT = 1 << 26


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# Heads and offsets
# --------------------------------------------------------------------------------------------


def branch_heads(num_heads: int, num_branches: int, head_mode: str, branch: int) -> range:
    """Query heads that belong to ``branch`` (contiguous in both head modes)."""
    if head_mode == "all":
        return range(num_heads)
    # torch.tensor_split(range(H), G): the first H % G groups get one extra head.
    base, extra = divmod(num_heads, num_branches)
    start = branch * base + min(branch, extra)
    return range(start, start + base + (1 if branch < extra else 0))


def head_offset(index_in_branch: int, heads_in_branch: int, dilation_rate: int) -> int:
    """Lattice offset of the ``index_in_branch``-th head of a branch with ``heads_in_branch`` heads."""
    return index_in_branch // cdiv(heads_in_branch, dilation_rate)


def lattice_length(segment_length: int, offset: int, dilation_rate: int) -> int:
    """Number of positions u in [0, segment_length) with u % rate == offset."""
    return max(0, cdiv(segment_length - offset, dilation_rate))


# --------------------------------------------------------------------------------------------
# Geometry of one call: (configuration, N, H)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BranchGeometry:
    branch: int
    segment_length: int  # effective: min(w_g, N)
    dilation_rate: int
    seq_len: int
    heads: range

    @property
    def num_segments(self) -> int:
        return cdiv(self.seq_len, self.segment_length)

    def segment_bounds(self, segment: int) -> tuple[int, int]:
        start = segment * self.segment_length
        return start, min(start + self.segment_length, self.seq_len)

    def offset_of(self, head: int) -> int:
        return head_offset(head - self.heads.start, len(self.heads), self.dilation_rate)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Distinct offsets in use, ascending (heads are spread over them in contiguous runs)."""
        return tuple(sorted({self.offset_of(h) for h in self.heads}))

    def heads_with_offset(self, offset: int) -> range:
        """Contiguous run of query heads whose lattice offset is ``offset``."""
        members = [h for h in self.heads if self.offset_of(h) == offset]
        return range(members[0], members[-1] + 1) if members else range(0)

    def lattice_length(self, segment: int, offset: int) -> int:
        start, stop = self.segment_bounds(segment)
        return lattice_length(stop - start, offset, self.dilation_rate)

    def lattice_positions(self, segment: int, offset: int) -> torch.Tensor:
        """Global positions of the lattice (segment, offset), in compacted order t = 0..L-1."""
        start, stop = self.segment_bounds(segment)
        # An offset past the segment's end (rate > segment length) leaves the lattice empty.
        return torch.arange(min(start + offset, stop), stop, self.dilation_rate, dtype=torch.long)

    def compacted_index(self, positions: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(on_lattice, compacted_index) of global ``positions`` for query head ``head``."""
        segment = positions // self.segment_length
        place_in_segment = positions - segment * self.segment_length
        offset = self.offset_of(head)
        on_lattice = (place_in_segment % self.dilation_rate) == offset
        return on_lattice, (place_in_segment - offset) // self.dilation_rate


@dataclass(frozen=True)
class AttentionGeometry:
    """The dilation configuration applied to a sequence of ``seq_len`` tokens and ``num_heads`` heads."""

    dilation: DilationConfig
    seq_len: int
    num_heads: int

    def __post_init__(self) -> None:
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ValueError(f"seq_len must be an int >= 1, got {self.seq_len!r}")
        if isinstance(self.num_heads, bool) or not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"num_heads must be an int >= 1, got {self.num_heads!r}")
        if self.dilation.head_mode == "split" and self.num_heads < self.dilation.num_branches:
            raise ValueError(
                f"num_heads (H={self.num_heads}) must be >= the number of branches "
                f"(G={self.dilation.num_branches}) in head_mode='split'"
            )

    @functools.cached_property
    def branches(self) -> tuple[BranchGeometry, ...]:
        d = self.dilation
        return tuple(
            BranchGeometry(
                branch=g,
                segment_length=min(d.segment_lengths[g], self.seq_len),
                dilation_rate=d.dilation_rates[g],
                seq_len=self.seq_len,
                heads=branch_heads(self.num_heads, d.num_branches, d.head_mode, g),
            )
            for g in range(d.num_branches)
        )


# --------------------------------------------------------------------------------------------
# Block layouts (docs/semantics.md section 3)
# --------------------------------------------------------------------------------------------


def layout_mask(config: SparsePatternConfig, num_blocks: int, is_causal: bool = False) -> torch.Tensor:
    """Bool (nb, nb): which (query block, key block) pairs the layout allows."""
    return _layout_mask_cached(config, num_blocks, bool(is_causal)).clone()


@functools.lru_cache(maxsize=256)
def _layout_mask_cached(config: SparsePatternConfig, num_blocks: int, is_causal: bool) -> torch.Tensor:
    nb = num_blocks
    qb = torch.arange(nb).unsqueeze(1)
    kb = torch.arange(nb).unsqueeze(0)
    diagonal = qb == kb
    match config.pattern_type:
        case "dense":
            mask = torch.ones(nb, nb, dtype=torch.bool)
        case "local_window":
            mask = (qb - kb).abs() <= config.local_radius_blocks
        case "global_local":
            ng = config.global_blocks
            mask = ((qb - kb).abs() <= config.local_radius_blocks) | (kb < ng) | (qb < ng)
        case "dilated_sparse":
            mask = torch.remainder(qb - kb, config.dilated_stride) == 0
        case "random":
            generator = torch.Generator().manual_seed(config.seed)
            mask = (torch.rand((nb, nb), generator=generator) < config.sparsity_ratio) | diagonal
        case "custom":
            layout = config.block_layout
            if layout.shape[0] < nb:
                raise ValueError(
                    f"block_layout is {tuple(layout.shape)} but a segment needs {nb} x {nb} blocks "
                    f"(block_size={config.block_size}); give a layout with NB >= {nb}"
                )
            mask = layout[:nb, :nb].clone()
        case other:  # unreachable: the config validates pattern_type
            raise ValueError(f"unknown pattern_type {other!r}")
    if is_causal:
        mask &= kb <= qb
    return mask


@dataclass(frozen=True)
class BlockList:
    """A layout in CSR form: for query block qb, key blocks key_blocks[row_ptr[qb]:row_ptr[qb+1]]."""

    num_blocks: int
    row_ptr: torch.Tensor  # (nb + 1,) int64
    key_blocks: torch.Tensor  # (nnz,) int64, ascending within a row

    @property
    def row_counts(self) -> torch.Tensor:
        return self.row_ptr[1:] - self.row_ptr[:-1]

    @property
    def nnz(self) -> int:
        return int(self.key_blocks.numel())

    def to_dense(self) -> torch.Tensor:
        mask = torch.zeros(self.num_blocks, self.num_blocks, dtype=torch.bool)
        rows = torch.repeat_interleave(torch.arange(self.num_blocks), self.row_counts)
        mask[rows, self.key_blocks] = True
        return mask


@functools.lru_cache(maxsize=256)
def block_list(config: SparsePatternConfig, num_blocks: int, is_causal: bool = False) -> BlockList:
    mask = _layout_mask_cached(config, num_blocks, bool(is_causal))
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order: ascending rows, then columns
    counts = torch.bincount(rows, minlength=num_blocks)
    row_ptr = torch.zeros(num_blocks + 1, dtype=torch.long)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return BlockList(num_blocks=num_blocks, row_ptr=row_ptr, key_blocks=cols.to(torch.long))


# --------------------------------------------------------------------------------------------
# Flattened block tables: what the optimized paths consume
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockTable:
    """Active blocks of one (branch, offset) over every segment, flattened into CSR rows.

    Row ``n`` is query block ``query_block[n]`` of the lattice whose point t sits at global
    position ``lattice_start[n] + stride * t`` for t < ``lattice_length[n]``; its key blocks
    (same lattice) are ``key_block[row_ptr[n]:row_ptr[n+1]]``. Rows with no key block are kept
    so that a consumer sees every query position of the lattice. ``query_limits`` and
    ``key_limits`` are the [lo, hi) global position ranges a consumer must mask to (a chunk).
    ``segment_start[n]`` and ``segment_stop[n]`` bound the segment row ``n`` belongs to: a consumer
    that writes the segment's off-lattice positions of its heads (zeros) needs them.
    """

    branch: int
    offset: int
    stride: int
    block_size: int
    heads: range
    lattice_start: torch.Tensor  # (R,)
    lattice_length: torch.Tensor  # (R,)
    query_block: torch.Tensor  # (R,)
    row_ptr: torch.Tensor  # (R + 1,)
    key_block: torch.Tensor  # (nnz,)
    query_limits: tuple[int, int]
    key_limits: tuple[int, int]
    segment_start: torch.Tensor  # (R,)
    segment_stop: torch.Tensor  # (R,), clamped to the sequence

    @property
    def num_rows(self) -> int:
        return int(self.query_block.numel())

    @property
    def nnz(self) -> int:
        return int(self.key_block.numel())

    @property
    def row_counts(self) -> torch.Tensor:
        return self.row_ptr[1:] - self.row_ptr[:-1]

    @property
    def entry_row(self) -> torch.Tensor:
        """Row index of every key-block entry, (nnz,)."""
        return torch.repeat_interleave(torch.arange(self.num_rows), self.row_counts)

    @functools.cached_property
    def columns(self) -> ColumnList:
        """The same entries grouped by key block: which rows attend each (lattice, key block)."""
        return ColumnList.of(self)


@dataclass(frozen=True)
class ColumnList:
    """A BlockTable's entries transposed: one column per (lattice, key block) that some row attends.

    Column ``c`` is key block ``key_block[c]`` of the lattice starting at ``lattice_start[c]``
    (``lattice_length[c]`` points); the rows attending it are the table's entries
    ``entry[col_ptr[c]:col_ptr[c+1]]`` (indices into the row-wise ``key_block`` list), in
    ascending query block. Columns run in (lattice, key block) order. A consumer that owns a key
    block (a backward pass summing dk, dv over the queries that saw it) walks a column.
    """

    lattice_start: torch.Tensor  # (C,)
    lattice_length: torch.Tensor  # (C,)
    key_block: torch.Tensor  # (C,)
    col_ptr: torch.Tensor  # (C + 1,)
    entry: torch.Tensor  # (nnz,) row-wise entry indices, grouped by column

    @classmethod
    def of(cls, table: BlockTable) -> ColumnList:
        rows = table.entry_row
        lattice = table.lattice_start[rows]
        # Stable sorts, least significant key first: (lattice, key block, query block).
        order = torch.sort(table.query_block[rows], stable=True).indices
        order = order[torch.sort(table.key_block[order], stable=True).indices]
        order = order[torch.sort(lattice[order], stable=True).indices]
        sorted_lattice, sorted_key = lattice[order], table.key_block[order]
        starts_column = torch.ones(order.numel(), dtype=torch.bool)
        starts_column[1:] = (sorted_lattice[1:] != sorted_lattice[:-1]) | (sorted_key[1:] != sorted_key[:-1])
        first = starts_column.nonzero().squeeze(1)
        col_ptr = torch.cat([first, torch.tensor([order.numel()])])
        return cls(
            lattice_start=sorted_lattice[first],
            lattice_length=table.lattice_length[rows[order[first]]],
            key_block=sorted_key[first],
            col_ptr=col_ptr,
            entry=order,
        )

    @property
    def num_columns(self) -> int:
        return int(self.key_block.numel())

    @property
    def col_counts(self) -> torch.Tensor:
        return self.col_ptr[1:] - self.col_ptr[:-1]


def _chunk_block_range(lattice_start, lattice_length, stride, block_size, lo, hi):
    """First and one-past-last block of each lattice holding a point in [lo, hi)."""
    first_t = torch.clamp(torch.div(lo - lattice_start + stride - 1, stride, rounding_mode="floor"), min=0)
    stop_t = torch.minimum(
        torch.clamp(torch.div(hi - lattice_start + stride - 1, stride, rounding_mode="floor"), min=0),
        lattice_length,
    )
    nonempty = stop_t > first_t
    first_block = torch.div(first_t, block_size, rounding_mode="floor")
    stop_block = torch.where(nonempty, torch.div(stop_t - 1, block_size, rounding_mode="floor") + 1, first_block)
    return first_block, stop_block


def block_table(
    geometry: AttentionGeometry,
    config: SparsePatternConfig,
    branch: int,
    offset: int,
    is_causal: bool = False,
    query_range: tuple[int, int] | None = None,
    key_range: tuple[int, int] | None = None,
) -> BlockTable:
    """The flattened block list of one (branch, offset), restricted to a query and a key chunk."""
    return _block_table_cached(
        geometry,
        config,
        branch,
        offset,
        bool(is_causal),
        query_range or (0, geometry.seq_len),
        key_range or (0, geometry.seq_len),
    )


@functools.lru_cache(maxsize=1024)
def _block_table_cached(geometry, config, branch, offset, is_causal, query_range, key_range):
    geo = geometry.branches[branch]
    b, rate = config.block_size, geo.dilation_rate
    # Every segment at once: all but the last share one lattice length, hence one layout, so the
    # work is a few tensor ops per distinct block count instead of a Python loop per segment.
    seg_start = torch.arange(geo.num_segments, dtype=torch.long) * geo.segment_length
    seg_stop = torch.clamp(seg_start + geo.segment_length, max=geo.seq_len)
    length = torch.clamp(torch.div(seg_stop - seg_start - offset + rate - 1, rate, rounding_mode="floor"), min=0)
    lattice_start = seg_start + offset
    q_first, q_stop = _chunk_block_range(lattice_start, length, rate, b, *query_range)
    k_first, k_stop = _chunk_block_range(lattice_start, length, rate, b, *key_range)
    # A segment that misses either chunk holds no pair of this partial; one that holds query
    # points of the chunk and keys only outside it keeps its rows, with no key blocks.
    overlap_lo, overlap_hi = max(query_range[0], key_range[0]), min(query_range[1], key_range[1])
    kept = (length > 0) & (q_stop > q_first) & (seg_stop > overlap_lo) & (seg_start < overlap_hi)
    num_blocks = torch.div(length + b - 1, b, rounding_mode="floor")
    starts, lengths, qblocks, counts, keys, segment_of_rows = [], [], [], [], [], []
    for nb in sorted(set(num_blocks[kept].tolist()), key=lambda n: int((num_blocks == n).nonzero()[0])):
        segments = (kept & (num_blocks == nb)).nonzero().squeeze(1)  # ascending
        blocks = block_list(config, nb, is_causal)
        entry_rows = torch.repeat_interleave(torch.arange(nb), blocks.row_counts)  # (nnz,)
        row_ids = torch.arange(nb)
        row_kept = (row_ids >= q_first[segments, None]) & (row_ids < q_stop[segments, None])  # (S, nb)
        entry_kept = (
            (entry_rows >= q_first[segments, None])
            & (entry_rows < q_stop[segments, None])
            & (blocks.key_blocks >= k_first[segments, None])
            & (blocks.key_blocks < k_stop[segments, None])
        )  # (S, nnz)
        segment_of_row = segments[:, None].expand(-1, nb)[row_kept]
        segment_of_rows.append(segment_of_row)
        starts.append(lattice_start[segment_of_row])
        lengths.append(length[segment_of_row])
        qblocks.append(row_ids.expand(segments.numel(), -1)[row_kept])
        per_row = torch.zeros(segments.numel(), nb, dtype=torch.long)
        per_row.index_put_(
            (
                torch.arange(segments.numel())[:, None].expand_as(entry_kept)[entry_kept],
                entry_rows.expand_as(entry_kept)[entry_kept],
            ),
            torch.ones((), dtype=torch.long),
            accumulate=True,
        )
        counts.append(per_row[row_kept])
        keys.append(blocks.key_blocks.expand_as(entry_kept)[entry_kept])
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)  # noqa: E731
    row_counts = cat(counts)
    row_ptr = torch.zeros(row_counts.numel() + 1, dtype=torch.long)
    row_ptr[1:] = torch.cumsum(row_counts, 0)
    segment_of_row = cat(segment_of_rows)
    return BlockTable(
        branch=branch,
        offset=offset,
        stride=rate,
        block_size=b,
        heads=geo.heads_with_offset(offset),
        lattice_start=cat(starts),
        lattice_length=cat(lengths),
        query_block=cat(qblocks),
        row_ptr=row_ptr,
        key_block=cat(keys),
        query_limits=query_range,
        key_limits=key_range,
        segment_start=seg_start[segment_of_row],
        segment_stop=seg_stop[segment_of_row],
    )


def block_tables(geometry, config, is_causal=False, query_range=None, key_range=None) -> tuple[BlockTable, ...]:
    """Every (branch, offset) table of a call, in branch order."""
    return tuple(
        block_table(geometry, config, geo.branch, offset, is_causal, query_range, key_range)
        for geo in geometry.branches
        for offset in geo.offsets
    )


def active_pair_count(geometry, config, is_causal=False) -> int:
    """Allowed (head, query, key) pairs summed over heads, with multiplicity, no padding."""
    total = 0
    for table in block_tables(geometry, config, is_causal):
        b, L = table.block_size, table.lattice_length
        q_rows = torch.clamp(L - table.query_block * b, max=b)
        rows = table.entry_row
        k_rows = torch.clamp(L[rows] - table.key_block * b, max=b)
        pairs = q_rows[rows] * k_rows
        if is_causal:
            # Diagonal blocks keep the lower triangle (incl. the diagonal) of a square block.
            diag = table.key_block == table.query_block[rows]
            n = q_rows[rows][diag]
            pairs[diag] = n * (n + 1) // 2
        total += int(pairs.sum()) * len(table.heads)
    return total


def active_block_count(geometry, config, is_causal=False) -> int:
    """Active (query block, key block) pairs summed over heads."""
    return sum(t.nnz * len(t.heads) for t in block_tables(geometry, config, is_causal))


# --------------------------------------------------------------------------------------------
# The dense multiplicity: the literal definition, for small N only
# --------------------------------------------------------------------------------------------


def dense_multiplicity(
    geometry: AttentionGeometry,
    config: SparsePatternConfig,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    query_range: tuple[int, int] | None = None,
    key_range: tuple[int, int] | None = None,
    allow_large: bool = False,
) -> torch.Tensor:
    """How many branches allow each (head, query, key) pair: int64 (B or 1, H, Nq, Nk).

    Built literally from docs/semantics.md section 2 with Python loops over branches, heads, segments and
    offsets: slow, small, obviously right. ``key_padding_mask`` is (B, N) over the whole sequence.
    """
    q0, q1 = query_range or (0, geometry.seq_len)
    k0, k1 = key_range or (0, geometry.seq_len)
    H = geometry.num_heads
    batch = 1 if key_padding_mask is None else key_padding_mask.shape[0]
    elements = batch * H * (q1 - q0) * (k1 - k0)
    if elements > DENSE_MASK_ELEMENT_LIMIT and not allow_large:
        raise ValueError(
            f"dense_multiplicity would build {elements} elements (B={batch}, H={H}, Nq={q1 - q0}, "
            f"Nk={k1 - k0}); pass allow_large=True to build it anyway"
        )
    counts = torch.zeros(H, q1 - q0, k1 - k0, dtype=torch.long)
    b = config.block_size
    for geo in geometry.branches:
        for head in geo.heads:
            offset = geo.offset_of(head)
            for segment in range(geo.num_segments):
                positions = geo.lattice_positions(segment, offset)
                length = positions.numel()
                if length == 0:
                    continue
                t = torch.arange(length)
                allowed = layout_mask(config, cdiv(length, b), is_causal)[t // b][:, t // b]
                if is_causal:
                    allowed &= t.unsqueeze(0) <= t.unsqueeze(1)
                q_in = (positions >= q0) & (positions < q1)
                k_in = (positions >= k0) & (positions < k1)
                sub = allowed[q_in][:, k_in].long()
                qi = (positions[q_in] - q0).unsqueeze(1)
                kj = (positions[k_in] - k0).unsqueeze(0)
                counts[head, qi, kj] += sub
    counts = counts.unsqueeze(0).expand(batch, -1, -1, -1).clone()
    if key_padding_mask is not None:
        padded = key_padding_mask[:, k0:k1].to("cpu").bool()
        counts.masked_fill_(padded[:, None, None, :], 0)
    return counts
