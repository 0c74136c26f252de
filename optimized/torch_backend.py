"""Backend "torch": portable block-sparse attention in vectorized PyTorch (any device, autograd).

The algorithm the GPU kernel follows. For every BlockTable of the plan (one per (branch,
offset)), rows are processed in groups of similar key-block counts (``blocks.row_groups``): the
group's query blocks are gathered from the caller's tensors, then its CSR key blocks are walked
column by column ("the c-th active key block of every row", rows with fewer blocks masked) with
an online softmax in float32 (float64 for float64 inputs). At most ``work_size``
(rows x heads x batch) score blocks of b x b exist at once; no N x N tensor, no full-lattice copy.
Tables covering the same heads (head_mode "all") are merged with docs/semantics.md section 5's lse rule.
"""

from __future__ import annotations

import functools

import torch

from .blocks import (
    DeviceTable,
    PartialCollector,
    accumulation_dtype,
    allowed_slots,
    block_points,
    gather_keys,
    gather_queries,
    indexed_tables_by_layer,
    kv_heads_of,
    local_index,
    row_groups,
    rows_by_count,
)
from .plan import CallPlan

NEG_INF = float("-inf")


def check_work_size(work_size) -> int:
    """``work_size`` if it is an int >= 1 (the torch backend's one knob), else a ValueError naming it."""
    if isinstance(work_size, bool) or not isinstance(work_size, int) or work_size < 1:
        raise ValueError(f"work_size must be an int >= 1, got {work_size!r}")
    return work_size


def rows_per_group(work_size: int, batch: int, num_heads: int) -> int:
    """Rows processed at once so that rows x heads x batch score blocks stay within work_size."""
    return max(1, work_size // max(1, batch * num_heads))


def _row_queries(dt: DeviceTable, rows: torch.Tensor, plan: CallPlan):
    """(query chunk index, compacted t, valid), each (n, b), of the query blocks of ``rows``."""
    table = dt.table
    q_pos, q_t, q_valid = block_points(
        dt.lattice_start[rows],
        dt.lattice_length[rows],
        dt.query_block[rows],
        table.stride,
        table.block_size,
        plan.query_range,
    )
    return local_index(q_pos, q_valid, plan.query_start), q_t, q_valid


def _key_steps(key_padding_mask, dt: DeviceTable, rows: torch.Tensor, q_t, plan: CallPlan):
    """For c = 0, 1, ...: (key chunk index (n, b), allowed (B|1, n, 1, b_q, b_k)) of every row's c-th key block.

    Rows with fewer than c + 1 key blocks get no allowed slot. Forward and backward walk the same steps.
    """
    table = dt.table
    start, length = dt.lattice_start[rows], dt.lattice_length[rows]
    first_entry, count = dt.row_ptr[rows], dt.row_count[rows]
    max_count = int(count.max()) if count.numel() else 0
    for c in range(max_count):
        has_block = count > c
        entry = torch.where(has_block, first_entry + c, torch.zeros_like(first_entry))
        k_pos, k_t, k_valid = block_points(
            start, length, dt.key_block[entry], table.stride, table.block_size, plan.key_range
        )
        k_valid &= has_block.unsqueeze(1)
        k_index = local_index(k_pos, k_valid, plan.key_start)
        yield k_index, allowed_slots(key_padding_mask, k_index, k_valid, q_t, k_t, plan.is_causal)


def _row_group_partial(q, k, v, key_padding_mask, dt: DeviceTable, rows: torch.Tensor, kv_heads, plan: CallPlan):
    """Online softmax over the key blocks of ``rows`` of one table.

    Returns (query chunk index (n, b), query valid (n, b), out (B, n, nh, b, D), lse (B, n, nh, b)).
    """
    q_index, q_t, q_valid = _row_queries(dt, rows, plan)
    dtype = accumulation_dtype(q.dtype)
    q_blocks = gather_queries(q, q_index, dt.table.heads).to(dtype)  # (B, n, b, nh, D)
    batch, n, b, nh, head_dim = q_blocks.shape
    running_max = torch.full((batch, n, nh, b), NEG_INF, dtype=dtype, device=q.device)
    running_sum = torch.zeros((batch, n, nh, b), dtype=dtype, device=q.device)
    running_out = torch.zeros((batch, n, nh, b, head_dim), dtype=dtype, device=q.device)
    for k_index, allowed in _key_steps(key_padding_mask, dt, rows, q_t, plan):
        k_blocks = gather_keys(k, k_index, kv_heads).to(dtype)
        v_blocks = gather_keys(v, k_index, kv_heads).to(dtype)
        scores = torch.einsum("bnihd,bnjhd->bnhij", q_blocks, k_blocks) * plan.scale
        scores = scores.masked_fill(~allowed, NEG_INF)
        new_max = torch.maximum(running_max, scores.amax(dim=-1))
        safe_max = torch.where(torch.isneginf(new_max), torch.zeros_like(new_max), new_max)
        probs = torch.exp(scores - safe_max.unsqueeze(-1))
        rescale = torch.exp(running_max - safe_max)
        running_sum = running_sum * rescale + probs.sum(dim=-1)
        running_out = running_out * rescale.unsqueeze(-1) + torch.einsum("bnhij,bnjhd->bnhid", probs, v_blocks)
        running_max = new_max

    nonempty = running_sum > 0
    safe_sum = torch.where(nonempty, running_sum, torch.ones_like(running_sum))
    safe_max = torch.where(torch.isneginf(running_max), torch.zeros_like(running_max), running_max)
    out = running_out / safe_sum.unsqueeze(-1)
    lse = torch.where(nonempty, safe_max + torch.log(safe_sum), torch.full_like(running_sum, NEG_INF))
    return q_index, q_valid, out, lse


@functools.lru_cache(maxsize=256)
def _grouping(plan: CallPlan, batch: int, work_size: int) -> tuple[tuple[torch.Tensor, tuple], ...]:
    """Per table of ``plan.tables``: its rows by count and the [start, stop) groups of them (cached:
    a forward and its backward, and every call of the same shapes, group alike)."""
    grouping = []
    for table in plan.tables:
        group = rows_per_group(work_size, batch, len(table.heads))
        ranges = tuple(row_groups(table, group, blocks_per_row=batch * len(table.heads)))
        grouping.append((rows_by_count(table), ranges))
    return tuple(grouping)


def _row_groups(q, k, plan: CallPlan, work_size: int):
    """(layer, table, device table, kv heads, rows) for every group of rows the call processes."""
    batch, _, num_heads, _ = q.shape
    tables, grouping = plan.tables, _grouping(plan, batch, work_size)
    for layer, index in indexed_tables_by_layer(tables):
        table = tables[index]
        order, ranges = grouping[index]
        dt = DeviceTable.of(table, q.device)
        order = order.to(q.device)
        kv_heads = kv_heads_of(table.heads, num_heads, k.shape[2], q.device)
        for start, stop in ranges:
            yield layer, table, dt, kv_heads, order[start:stop]


def _forward(q, k, v, key_padding_mask, plan: CallPlan, work_size: int):
    batch, num_queries, num_heads, head_dim = q.shape
    collector = PartialCollector(batch, num_queries, num_heads, head_dim, q.device, accumulation_dtype(q.dtype))
    for layer, table, dt, kv_heads, rows in _row_groups(q, k, plan, work_size):
        q_index, q_valid, out, lse = _row_group_partial(q, k, v, key_padding_mask, dt, rows, kv_heads, plan)
        keep = q_valid.reshape(-1).nonzero().squeeze(1)
        if keep.numel() == 0:
            continue
        n, b = q_valid.shape
        out = out.permute(0, 1, 3, 2, 4).reshape(batch, n * b, len(table.heads), head_dim)[:, keep]
        lse = lse.permute(0, 1, 3, 2).reshape(batch, n * b, len(table.heads))[:, keep]
        collector.add(layer, table.heads, q_index.reshape(-1)[keep], out, lse)
    return collector.result()


def _entry_probabilities(q, k, v, key_padding_mask, plan: CallPlan, work_size: int, lse, grad_out):
    """Every active block entry with P = exp(scale q.k - lse) from the final lse, and dP = dO . v.

    Yields per key step of every row group: (query slots (n*b*nh,), key slots (n*b*nh,), q blocks,
    k blocks, dO blocks (each (B, n, b, nh, D)), P, dP (each (B, n, nh, b_q, b_k)), live query slots
    (B, n, nh, b_q)). Slots (n, b, nh) index the flattened (N, H) / (N, H_kv) axes.
    """
    num_heads, num_kv_heads = q.shape[2], k.shape[2]
    lse_points = lse.transpose(1, 2).unsqueeze(-1)  # (B, Nq, H, 1): gathered like q
    for _, table, dt, kv_heads, rows in _row_groups(q, k, plan, work_size):
        q_index, q_t, q_valid = _row_queries(dt, rows, plan)
        heads = table.heads
        head_ids = torch.arange(heads.start, heads.stop, device=q.device)
        query_slots = (q_index.unsqueeze(-1) * num_heads + head_ids).reshape(-1)
        q_blocks = gather_queries(q, q_index, heads).to(lse.dtype)  # (B, n, b, nh, D)
        do_blocks = gather_queries(grad_out, q_index, heads)
        row_lse = gather_queries(lse_points, q_index, heads).squeeze(-1).permute(0, 1, 3, 2)  # (B, n, nh, b)
        # Slots outside the lattice or chunk, and empty rows, take no part.
        live = q_valid[None, :, None, :] & ~torch.isneginf(row_lse)
        row_lse = torch.where(live, row_lse, torch.zeros_like(row_lse))
        for k_index, allowed in _key_steps(key_padding_mask, dt, rows, q_t, plan):
            k_blocks = gather_keys(k, k_index, kv_heads).to(lse.dtype)
            v_blocks = gather_keys(v, k_index, kv_heads).to(lse.dtype)
            scores = torch.einsum("bnihd,bnjhd->bnhij", q_blocks, k_blocks) * plan.scale
            probs = torch.exp(scores - row_lse.unsqueeze(-1)).masked_fill(~(allowed & live.unsqueeze(-1)), 0.0)
            dprobs = torch.einsum("bnihd,bnjhd->bnhij", do_blocks, v_blocks)
            key_slots = (k_index.unsqueeze(-1) * num_kv_heads + kv_heads).reshape(-1)
            yield query_slots, key_slots, q_blocks, k_blocks, do_blocks, probs, dprobs, live


def partial_backward(q, k, v, key_padding_mask, plan: CallPlan, work_size: int, out, lse, grad_out, grad_lse):
    """Gradients of docs/semantics.md section 4's formula, flash-attention style, from the final lse.

    Every active block entry recomputes P with the final (all branches, all chunks) lse, so
    dS = P * (dP - sum_j P dP + dlse) is the exact gradient of the union's softmax: a key counted
    in two branches contributes twice. The row sum is taken over the same P and dP in a first
    pass (not as rowsum(dO * out)), so the two cancelling terms carry the same rounding, as in the
    reference's autograd; sums over entries accumulate in float64.

    The same pass sums the row's mass M = sum_j P (1 up to the rounding of the float32 lse and
    exp), and the second uses P / M: the exact softmax of the recomputed scores. Without it a
    key counted in three branches (M = 3 * fl(1/3)) left dS = P dP (1 - M) ~ 1e-7 * P dP where
    the true gradient is exactly 0, past the budget under the dev profile. With P dP summed in
    float64, D / M equals dP there to float64 precision, so dS is 0 in float32.
    """
    batch, num_queries, num_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[1], k.shape[2]
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.to(out.dtype)
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
    entries = lambda: _entry_probabilities(q, k, v, key_padding_mask, plan, work_size, lse, grad_out)  # noqa: E731

    row_sum = torch.zeros(batch, num_queries * num_heads, dtype=torch.float64, device=q.device)
    row_mass = torch.zeros_like(row_sum)
    for query_slots, _, _, _, _, probs, dprobs, _ in entries():
        probs64 = probs.double()
        row_sum.index_add_(1, query_slots, (probs64 * dprobs.double()).sum(-1).permute(0, 1, 3, 2).reshape(batch, -1))
        row_mass.index_add_(1, query_slots, probs64.sum(-1).permute(0, 1, 3, 2).reshape(batch, -1))
    row_mass = torch.where(row_mass > 0, row_mass, torch.ones_like(row_mass))  # empty rows: no entry uses it
    # (B, Nq, H) -> gathered per step below through the same query slots; dlse joins it.
    row_terms = (grad_lse.transpose(1, 2).reshape(batch, -1).double() - row_sum / row_mass).to(lse.dtype)
    inverse_mass = (1.0 / row_mass).to(lse.dtype)

    dq = torch.zeros(batch, num_queries * num_heads, head_dim, dtype=torch.float64, device=q.device)
    dk = torch.zeros(batch, num_keys * num_kv_heads, head_dim, dtype=torch.float64, device=q.device)
    dv = torch.zeros_like(dk)
    for query_slots, key_slots, q_blocks, k_blocks, do_blocks, probs, dprobs, _ in entries():
        n, b_q, nh = q_blocks.shape[1], q_blocks.shape[2], q_blocks.shape[3]
        shift = row_terms[:, query_slots].reshape(batch, n, b_q, nh).permute(0, 1, 3, 2)  # (B, n, nh, b_q)
        scale_rows = inverse_mass[:, query_slots].reshape(batch, n, b_q, nh).permute(0, 1, 3, 2)
        probs = probs * scale_rows.unsqueeze(-1)
        dscores = probs * (dprobs + shift.unsqueeze(-1))
        dq.index_add_(
            1,
            query_slots,
            (torch.einsum("bnhij,bnjhd->bnihd", dscores, k_blocks) * plan.scale).reshape(batch, -1, head_dim).double(),
        )
        dk.index_add_(
            1,
            key_slots,
            (torch.einsum("bnhij,bnihd->bnjhd", dscores, q_blocks) * plan.scale).reshape(batch, -1, head_dim).double(),
        )
        dv.index_add_(
            1, key_slots, torch.einsum("bnhij,bnihd->bnjhd", probs, do_blocks).reshape(batch, -1, head_dim).double()
        )
    return (
        dq.reshape(q.shape).to(q.dtype),
        dk.reshape(k.shape).to(k.dtype),
        dv.reshape(v.shape).to(v.dtype),
    )


class _BlockSparseAttention(torch.autograd.Function):
    """The torch path with a flash-attention style backward (recomputes blocks; saves out and lse)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, plan, work_size):
        out, lse = _forward(q, k, v, key_padding_mask, plan, work_size)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.key_padding_mask, ctx.plan, ctx.work_size = key_padding_mask, plan, work_size
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = partial_backward(
            q, k, v, ctx.key_padding_mask, ctx.plan, ctx.work_size, out, lse, grad_out, grad_lse
        )
        return dq, dk, dv, None, None, None


def partial_forward(q, k, v, key_padding_mask, plan: CallPlan, work_size: int = 4096):
    """Partial attention of the query chunk against the key chunk of ``plan`` (COMMON interface).

    Returns out (B, Nq, H, D) and lse (B, H, Nq) (natural log) in float32, float64 for float64 inputs;
    empty rows 0 / -inf.
    Differentiable in q, k, v (backward recomputes blocks; extra memory O(work_size x b x b)).
    """
    work_size = check_work_size(work_size)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _BlockSparseAttention.apply(q, k, v, key_padding_mask, plan, work_size)
    return _forward(q, k, v, key_padding_mask, plan, work_size)
