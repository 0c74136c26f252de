"""Shared helpers of the torch and flex backends and the sparse weights: where blocks live.

A block of a ``BlockTable`` row is a strided set of ``b`` global positions
``lattice_start + stride * (block * b + arange(b))``; slots past the lattice end or outside the
call's chunk are invalid and are masked, never read (their index is clamped to 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reference.merge import merge_all
from reference.semantics import BlockTable


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the portable paths compute and accumulate in: float64 for float64 inputs (docs/numerics.md:
    every path computes float64 in float64), float32 for every lower precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class DeviceTable:
    """The integer tensors of one BlockTable moved to the compute device once."""

    table: BlockTable
    lattice_start: torch.Tensor  # (R,)
    lattice_length: torch.Tensor  # (R,)
    query_block: torch.Tensor  # (R,)
    row_ptr: torch.Tensor  # (R + 1,)
    row_count: torch.Tensor  # (R,)
    key_block: torch.Tensor  # (nnz,)

    @classmethod
    def of(cls, table: BlockTable, device: torch.device) -> DeviceTable:
        move = lambda t: t.to(device=device, dtype=torch.long)  # noqa: E731
        return cls(
            table,
            move(table.lattice_start),
            move(table.lattice_length),
            move(table.query_block),
            move(table.row_ptr),
            move(table.row_counts),
            move(table.key_block),
        )


# What one step over a group costs beyond its score blocks (the torch ops of a step on a few
# rows), in score blocks. 0 cuts at every factor-2 change of the row count: the CPU forward at
# N = 1024 then ran 1.3-1.35x slower on local_window, dilated_sparse and random
# (experiments/ab_row_groups.py, results/row_groups_cpu.json).
STEP_OVERHEAD_BLOCKS = 256


def rows_by_count(table: BlockTable) -> torch.Tensor:
    """The table's rows by descending key-block count, ties in table order (R,)."""
    return torch.sort(table.row_counts, descending=True, stable=True).indices


def row_groups(table: BlockTable, group_size: int, blocks_per_row: int = 1) -> list[tuple[int, int]]:
    """[start, stop) ranges of ``rows_by_count(table)`` that a caller processes together.

    A group steps through as many key blocks as its longest row, masking the shorter ones. Where
    a few rows are much longer than the rest (global_local's global rows), one group would make
    every row walk the longest; a group per count would pay a step's overhead many times. So rows,
    sorted by count, are cut into runs at factor-2 bucket boundaries, choosing the cuts that
    minimise the modelled cost: per run, the run's longest count x (STEP_OVERHEAD_BLOCKS per group
    of the run + its rows x ``blocks_per_row`` score blocks). A run longer than ``group_size`` rows
    is split into groups of ``group_size``, each charged the run's longest count.
    """
    counts = table.row_counts[rows_by_count(table)]
    if counts.numel() == 0:
        return []
    # Bucket b holds counts in [2^b, 2^(b+1)); -1 the rows without key blocks.
    bucket = torch.where(counts > 0, torch.floor(torch.log2(counts.clamp(min=1).double())).long(), -1)
    cuts = [0] + (torch.nonzero(bucket[1:] != bucket[:-1]).squeeze(1) + 1).tolist() + [counts.numel()]
    longest = counts.tolist()

    def cost(first: int, last: int) -> float:  # rows cuts[first] .. cuts[last] - 1 as one run
        rows = cuts[last] - cuts[first]
        groups = -(-rows // group_size)
        # Read at call time, so that experiments/ab_row_groups.py can set it.
        return max(longest[cuts[first]], 1) * (groups * STEP_OVERHEAD_BLOCKS + rows * blocks_per_row)

    # best[j]: the cheapest cover of the first j buckets, and where its last run starts.
    best = [(0.0, 0)] + [(float("inf"), 0)] * (len(cuts) - 1)
    for last in range(1, len(cuts)):
        best[last] = min((best[first][0] + cost(first, last), first) for first in range(last))
    runs, last = [], len(cuts) - 1
    while last > 0:
        first = best[last][1]
        runs.append((cuts[first], cuts[last]))
        last = first
    return [
        (row0, min(row0 + group_size, stop))
        for start, stop in reversed(runs)
        for row0 in range(start, stop, group_size)
    ]


def block_points(lattice_start, lattice_length, block, stride: int, block_size: int, limits: tuple[int, int]):
    """Points of blocks ``block`` (n,) of lattices (n,): (global positions, compacted t, valid), each (n, b).

    ``valid``: the point exists (t < L) and lies in the chunk ``limits`` = [lo, hi).
    """
    lo, hi = limits
    t = block.unsqueeze(1) * block_size + torch.arange(block_size, device=block.device)
    positions = lattice_start.unsqueeze(1) + stride * t
    valid = (t < lattice_length.unsqueeze(1)) & (positions >= lo) & (positions < hi)
    return positions, t, valid


def local_index(positions: torch.Tensor, valid: torch.Tensor, chunk_start: int) -> torch.Tensor:
    """Index into the caller's chunk tensor; invalid slots read index 0 (masked later)."""
    return torch.where(valid, positions - chunk_start, torch.zeros_like(positions))


def kv_heads_of(heads: range, num_heads: int, num_kv_heads: int, device) -> torch.Tensor:
    """Grouped-query: key/value head of each query head in ``heads``."""
    return torch.arange(heads.start, heads.stop, device=device) // (num_heads // num_kv_heads)


def gather_queries(q: torch.Tensor, index: torch.Tensor, heads: range) -> torch.Tensor:
    """(B, n, b, nh, D) blocks of q (B, Nq, H, D) at chunk indices ``index`` (n, b), heads ``heads``."""
    return q[:, :, heads.start : heads.stop][:, index]


def gather_keys(k: torch.Tensor, index: torch.Tensor, kv_heads: torch.Tensor) -> torch.Tensor:
    """(B, n, b, nh, D) blocks of k or v (B, Nk, H_kv, D) for the query heads' kv heads ``kv_heads`` (nh,)."""
    return k[:, index.unsqueeze(-1), kv_heads]


def gather_key_padding(key_padding_mask, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B or 1, n, b) bool: the key slot may be attended (valid and not padding)."""
    if key_padding_mask is None:
        return valid.unsqueeze(0)
    return valid.unsqueeze(0) & ~key_padding_mask[:, index]


def allowed_slots(key_padding_mask, k_index, k_valid, q_t, k_t, is_causal: bool) -> torch.Tensor:
    """(B|1, n, 1, b_q, b_k) bool: key slot j may be attended by query slot i of the same block row.

    Valid and not padding; with ``is_causal`` also t_k <= t_q, which on one lattice is exactly j <= i.
    """
    allowed = gather_key_padding(key_padding_mask, k_index, k_valid).unsqueeze(2).unsqueeze(3)
    if is_causal:
        allowed = allowed & (k_t.unsqueeze(1) <= q_t.unsqueeze(2)).unsqueeze(1)
    return allowed


def head_layers(tables) -> list[list[int]]:
    """Group the indices of tables with rows into layers whose tables cover disjoint heads.

    Tables of one layer write side by side into one (out, lse); layers are merged with the
    lse rule (head_mode "all": one layer per branch; "split": a single layer).
    """
    layers: list[tuple[set[int], list[int]]] = []
    for index, table in enumerate(tables):
        heads = set(table.heads)
        if not heads or table.num_rows == 0:
            continue  # a table with no rows writes nothing and needs no launch
        for taken, members in layers:
            if not (taken & heads):
                taken |= heads
                members.append(index)
                break
        else:
            layers.append((heads, [index]))
    return [members for _, members in layers]


def tables_by_layer(tables):
    """(layer, table) for every table with rows, layers as ``head_layers`` forms them."""
    for layer, index in indexed_tables_by_layer(tables):
        yield layer, tables[index]


def indexed_tables_by_layer(tables):
    """(layer, index into ``tables``) in the order of ``tables_by_layer``."""
    for layer, members in enumerate(head_layers(tables)):
        for index in members:
            yield layer, index


class PartialCollector:
    """Collects per-query-point results of tables and assembles (out, lse) of one call.

    Each piece holds P query points of a contiguous head run: chunk indices (P,), out
    (B, P, nh, D), lse (B, P, nh) in the collector's dtype; points no table wrote stay empty (out 0,
    lse -inf). Pieces that autograd tracks are assembled with out-of-place index_copy, so
    gradients flow to them. Untracked pieces (the torch backend's forward, any no_grad call) are
    copied into the result in place one at a time, each dropped once copied: the pieces, their
    concatenation and two full copies never coexist (about 2x out at the end instead of 4x).
    """

    # Queries merged at once across layers (head_mode "all") in the untracked path: bounds the
    # float64 temporaries of the merge to a slice of out.
    MERGE_QUERIES = 4096

    def __init__(
        self, batch: int, num_queries: int, num_heads: int, head_dim: int, device, dtype: torch.dtype = torch.float32
    ) -> None:
        self.shape = (batch, num_queries, num_heads, head_dim)
        self.device = device
        self.dtype = dtype  # of the pieces and the result: float32, or float64 for float64 inputs
        self.layers: dict[int, list] = {}

    def add(self, layer: int, heads: range, index: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
        self.layers.setdefault(layer, []).append((heads, index, out, lse))

    def _empty(self):
        B, Nq, H, D = self.shape
        return (
            torch.zeros(B, Nq * H, D, dtype=self.dtype, device=self.device),
            torch.full((B, H * Nq), float("-inf"), dtype=self.dtype, device=self.device),
        )

    def _slots(self, heads: range, index: torch.Tensor):
        """Flat (query, head) slots of out (B, Nq * H, D) and (head, query) slots of lse (B, H * Nq)."""
        _, Nq, H, _ = self.shape
        head_ids = torch.arange(heads.start, heads.stop, device=self.device)
        return (index.unsqueeze(1) * H + head_ids).reshape(-1), (head_ids * Nq + index.unsqueeze(1)).reshape(-1)

    def _assemble(self, pieces: list, tracked: bool):
        B, Nq, H, D = self.shape
        out, lse = self._empty()
        if not tracked:
            while pieces:  # pop: each piece is freed as soon as it is copied
                heads, index, piece_out, piece_lse = pieces.pop()
                out_slots, lse_slots = self._slots(heads, index)
                out.index_copy_(1, out_slots, piece_out.reshape(B, -1, D))
                lse.index_copy_(1, lse_slots, piece_lse.reshape(B, -1))
                del piece_out, piece_lse
        elif pieces:
            slots = [self._slots(heads, index) for heads, index, _, _ in pieces]
            out = out.index_copy(
                1, torch.cat([o for o, _ in slots]), torch.cat([piece[2].reshape(B, -1, D) for piece in pieces], dim=1)
            )
            lse = lse.index_copy(
                1, torch.cat([s for _, s in slots]), torch.cat([piece[3].reshape(B, -1) for piece in pieces], dim=1)
            )
        return out.reshape(B, Nq, H, D), lse.reshape(B, H, Nq)

    def result(self):
        """(out (B, Nq, H, D), lse (B, H, Nq)) in the collector's dtype.

        Layers are merged by the lse rule of docs/semantics.md section 5."""
        B, Nq, H, D = self.shape
        tracked = torch.is_grad_enabled() and any(
            piece[2].requires_grad or piece[3].requires_grad for pieces in self.layers.values() for piece in pieces
        )
        parts = [self._assemble(self.layers.pop(layer), tracked) for layer in sorted(self.layers)]
        parts = parts or [self._assemble([], tracked)]
        if len(parts) == 1:
            return parts[0]
        # Several branches per head (head_mode "all"): one merge of all of them, in float64. A
        # chain of float32 merges roughly doubled the gradient's rounding error against the
        # single-softmax reference (seen at k = 3 on dk with a key counted in three branches).
        if tracked:
            out, lse = merge_all([out.double() for out, _ in parts], [lse.double() for _, lse in parts])
            return out.to(self.dtype), lse.to(self.dtype)
        # Untracked: the same merge, a slice of queries at a time, into results of the collector's dtype.
        out = torch.empty(B, Nq, H, D, dtype=self.dtype, device=self.device)
        lse = torch.empty(B, H, Nq, dtype=self.dtype, device=self.device)
        for q0 in range(0, Nq, self.MERGE_QUERIES):
            q1 = min(q0 + self.MERGE_QUERIES, Nq)
            merged_out, merged_lse = merge_all(
                [part[:, q0:q1].double() for part, _ in parts], [part[:, :, q0:q1].double() for _, part in parts]
            )
            out[:, q0:q1] = merged_out
            lse[:, :, q0:q1] = merged_lse
        return out, lse
