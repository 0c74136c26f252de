"""Backend "torch": portable block-sparse attention in vectorized PyTorch (any device, autograd).

The algorithm the GPU kernel follows. For every BlockTable of the plan (one per (branch,
offset)), rows are processed in groups: the group's query blocks are gathered from the caller's
tensors, then its CSR key blocks are walked column by column ("the c-th active key block of every
row", rows with fewer blocks masked) with an online softmax in float32. At most ``work_size``
(rows x heads x batch) score blocks of b x b exist at once; no N x N tensor, no full-lattice copy.
Tables covering the same heads (head_mode "all") are merged with SPEC section 5's lse rule.
"""

from __future__ import annotations

import torch

from .blocks import (
    DeviceTable,
    PartialCollector,
    block_points,
    gather_key_padding,
    gather_keys,
    gather_queries,
    head_layers,
    kv_heads_of,
    local_index,
)
from .plan import CallPlan

NEG_INF = float("-inf")


def _check_work_size(work_size) -> int:
    if isinstance(work_size, bool) or not isinstance(work_size, int) or work_size < 1:
        raise ValueError(f"work_size must be an int >= 1, got {work_size!r}")
    return work_size


def rows_per_group(work_size: int, batch: int, num_heads: int) -> int:
    """Rows processed at once so that rows x heads x batch score blocks stay within work_size."""
    return max(1, work_size // max(1, batch * num_heads))


def _row_group_partial(q, k, v, key_padding_mask, dt: DeviceTable, rows: slice, kv_heads, plan: CallPlan):
    """Online softmax over the key blocks of ``rows`` of one table.

    Returns (query chunk index (n, b), query valid (n, b), out (B, n, nh, b, D), lse (B, n, nh, b)).
    """
    table = dt.table
    b, stride = table.block_size, table.stride
    start, length = dt.lattice_start[rows], dt.lattice_length[rows]
    first_entry, count = dt.row_ptr[rows], dt.row_count[rows]
    q_pos, q_t, q_valid = block_points(start, length, dt.query_block[rows], stride, b, plan.query_range)
    q_index = local_index(q_pos, q_valid, plan.query_start)
    q_blocks = gather_queries(q, q_index, table.heads).to(torch.float32)  # (B, n, b, nh, D)

    batch, n, _, nh, head_dim = q_blocks.shape
    running_max = torch.full((batch, n, nh, b), NEG_INF, dtype=torch.float32, device=q.device)
    running_sum = torch.zeros((batch, n, nh, b), dtype=torch.float32, device=q.device)
    running_out = torch.zeros((batch, n, nh, b, head_dim), dtype=torch.float32, device=q.device)
    max_count = int(count.max()) if n else 0
    for c in range(max_count):
        has_block = count > c
        entry = torch.where(has_block, first_entry + c, torch.zeros_like(first_entry))
        k_pos, k_t, k_valid = block_points(start, length, dt.key_block[entry], stride, b, plan.key_range)
        k_valid &= has_block.unsqueeze(1)
        k_index = local_index(k_pos, k_valid, plan.key_start)
        allowed = gather_key_padding(key_padding_mask, k_index, k_valid).unsqueeze(2)  # (B|1, n, 1, b)
        allowed = allowed.unsqueeze(3)  # (B|1, n, 1, 1, b): broadcast over heads and query slots
        if plan.is_causal:
            # Same lattice, so causality in compacted indices is exactly j <= i.
            allowed = allowed & (k_t.unsqueeze(1) <= q_t.unsqueeze(2)).unsqueeze(1)
        k_blocks = gather_keys(k, k_index, kv_heads).to(torch.float32)
        v_blocks = gather_keys(v, k_index, kv_heads).to(torch.float32)
        scores = torch.einsum("bnihd,bnjhd->bnhij", q_blocks, k_blocks) * plan.scale
        scores = scores.masked_fill(~allowed, NEG_INF)
        # The running max only stabilizes exp; the result does not depend on it, so no gradient.
        new_max = torch.maximum(running_max, scores.detach().amax(dim=-1))
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


def partial_forward(q, k, v, key_padding_mask, plan: CallPlan, work_size: int = 4096):
    """Partial attention of the query chunk against the key chunk of ``plan`` (COMMON interface).

    Returns out (B, Nq, H, D) float32 and lse (B, H, Nq) float32 (natural log); empty rows 0 / -inf.
    """
    work_size = _check_work_size(work_size)
    batch, num_queries, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    collector = PartialCollector(batch, num_queries, num_heads, head_dim, q.device)
    tables = plan.tables
    for layer, members in enumerate(head_layers(tables)):
        for index in members:
            table = tables[index]
            if table.num_rows == 0:
                continue
            dt = DeviceTable.of(table, q.device)
            kv_heads = kv_heads_of(table.heads, num_heads, num_kv_heads, q.device)
            group = rows_per_group(work_size, batch, len(table.heads))
            for row0 in range(0, table.num_rows, group):
                rows = slice(row0, min(row0 + group, table.num_rows))
                q_index, q_valid, out, lse = _row_group_partial(q, k, v, key_padding_mask, dt, rows, kv_heads, plan)
                keep = q_valid.reshape(-1).nonzero().squeeze(1)
                if keep.numel() == 0:
                    continue
                n, b = q_valid.shape
                out = out.permute(0, 1, 3, 2, 4).reshape(batch, n * b, len(table.heads), head_dim)[:, keep]
                lse = lse.permute(0, 1, 3, 2).reshape(batch, n * b, len(table.heads))[:, keep]
                collector.add(layer, table.heads, q_index.reshape(-1)[keep], out, lse)
    out, lse = collector.result()
    if torch.is_grad_enabled() and not out.requires_grad and any(t.requires_grad for t in (q, k, v)):
        # No block is active: out is the constant 0. Tie it to the inputs so that backward gives
        # zero gradients, as the reference does, instead of failing for want of a grad_fn.
        everything = torch.ones((), dtype=torch.bool, device=q.device)
        out = out + sum(t.float().masked_fill(everything, 0.0).sum() for t in (q, k, v))
    return out, lse
