"""Sparse attention weights (docs/semantics.md section 6) of the torch and flex backends.

Stored per active block and query head: b x b probabilities ``exp(scale * q.k - lse)`` from the
FINAL merged lse, so every row sums to 1 over all blocks of all branches (0 for empty rows).
A block is a strided set of positions in compacted coordinates, so each stored block carries its
global query and key positions (-1 for padding slots past the lattice end).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .blocks import (
    DeviceTable,
    accumulation_dtype,
    allowed_slots,
    block_points,
    gather_keys,
    gather_queries,
    kv_heads_of,
    local_index,
)
from .plan import CallPlan

# to_dense() refuses more elements than this unless asked (it is for small N only).
DENSE_ELEMENT_LIMIT = 1 << 28


class SparseAttentionWeights(Mapping):
    """Dict-like sparse attention probabilities.

    Keys (the seed's first four, then the ones that locate a block):
    - ``block_indices`` (NBLK, 2) int64: (query block, key block) in its lattice's compacted coordinates;
    - ``block_values`` (B, NBLK, b, b) float32 (float64 for float64 inputs): probabilities, 0 in masked
      and padding slots;
    - ``shape`` (B, H, N, N); ``block_size`` b;
    - ``block_heads`` (NBLK,) int64: query head; ``block_branches`` (NBLK,) int64: dilation branch;
    - ``query_positions``, ``key_positions`` (NBLK, b) int64: global positions, -1 for padding slots.
    """

    def __init__(self, data: dict) -> None:
        self._data = dict(data)

    def __getitem__(self, key):
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return (
            f"SparseAttentionWeights(shape={self['shape']}, block_size={self['block_size']}, "
            f"blocks={self.num_blocks}, nbytes={self.nbytes})"
        )

    @property
    def num_blocks(self) -> int:
        return int(self["block_heads"].numel())

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self._data.values() if isinstance(t, torch.Tensor))

    def _entries(self):
        """Flat (batch, head, query, key) indices and values of every stored slot with valid positions."""
        qp, kp = self["query_positions"], self["key_positions"]
        valid = (qp >= 0).unsqueeze(2) & (kp >= 0).unsqueeze(1)  # (NBLK, b, b)
        block, i, j = valid.nonzero(as_tuple=True)
        values = self["block_values"][:, block, i, j]  # (B, M)
        return self["block_heads"][block], qp[block, i], kp[block, j], values

    def to_dense(self, allow_large: bool = False) -> torch.Tensor:
        """Dense (B, H, N, N) probabilities (block_values' dtype); small N only. A key in two branches holds the sum."""
        B, H, Nq, Nk = self["shape"]
        elements = B * H * Nq * Nk
        if elements > DENSE_ELEMENT_LIMIT and not allow_large:
            raise ValueError(
                f"to_dense would build {elements} elements (shape {self['shape']}); "
                f"pass allow_large=True to build it anyway, or use to_sparse_coo()"
            )
        heads, queries, keys, values = self._entries()
        dense = torch.zeros(B, H * Nq * Nk, dtype=values.dtype, device=values.device)
        dense.index_add_(1, (heads * Nq + queries) * Nk + keys, values)
        return dense.reshape(B, H, Nq, Nk)

    def to_sparse_coo(self) -> torch.Tensor:
        """Coalesced torch.sparse_coo_tensor of shape (B, H, N, N); duplicates (two branches) summed."""
        heads, queries, keys, values = self._entries()
        B = values.shape[0]
        M = heads.numel()
        batch = torch.arange(B, device=values.device).repeat_interleave(M)
        indices = torch.stack([batch, heads.repeat(B), queries.repeat(B), keys.repeat(B)])
        return torch.sparse_coo_tensor(indices, values.reshape(-1), self["shape"], check_invariants=False).coalesce()


def attention_weights(q, k, key_padding_mask, lse, plan: CallPlan, work_size: int = 4096) -> SparseAttentionWeights:
    """The probabilities of every active block from the final lse (B, H, Nq); detached from autograd.

    q (B, Nq, H, D) at plan.query_range, k (B, Nk, H_kv, D) at plan.key_range. Values are
    computed in float32 (float64 for float64 inputs) on q's device, ``work_size`` (blocks x heads x batch) at a time.
    """
    batch, num_queries, num_heads, _ = q.shape
    device = q.device
    b = plan.block_size
    dtype = accumulation_dtype(q.dtype)
    lse = lse.detach().to(device=device, dtype=dtype)
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    parts = {name: [] for name in ("values", "indices", "heads", "branches", "qpos", "kpos")}
    with torch.no_grad():
        for table in plan.tables:
            if table.nnz == 0:
                continue
            dt = DeviceTable.of(table, device)
            nh = len(table.heads)
            kv_heads = kv_heads_of(table.heads, num_heads, k.shape[2], device)
            entry_row = table.entry_row.to(device)
            step = max(1, work_size // max(1, batch * nh))
            for e0 in range(0, table.nnz, step):
                rows = entry_row[e0 : e0 + step]
                start, length = dt.lattice_start[rows], dt.lattice_length[rows]
                q_block, k_block = dt.query_block[rows], dt.key_block[e0 : e0 + step]
                q_pos, q_t, q_valid = block_points(start, length, q_block, table.stride, b, plan.query_range)
                k_pos, k_t, k_valid = block_points(start, length, k_block, table.stride, b, plan.key_range)
                q_index = local_index(q_pos, q_valid, plan.query_start)
                k_index = local_index(k_pos, k_valid, plan.key_start)
                allowed = allowed_slots(key_padding_mask, k_index, k_valid, q_t, k_t, plan.is_causal)
                allowed = allowed & q_valid.unsqueeze(-1).unsqueeze(1)  # (B|1, n, 1, b, b)
                q_blocks = gather_queries(q, q_index, table.heads).to(dtype)
                k_blocks = gather_keys(k, k_index, kv_heads).to(dtype)
                scores = torch.einsum("bnihd,bnjhd->bnhij", q_blocks, k_blocks) * plan.scale
                row_lse = safe_lse[:, table.heads.start : table.heads.stop][:, :, q_index]  # (B, nh, n, b)
                probs = torch.exp(scores - row_lse.permute(0, 2, 1, 3).unsqueeze(-1))
                probs = probs.masked_fill(~allowed, 0.0)  # (B, n, nh, b, b)
                n = rows.numel()
                parts["values"].append(probs.reshape(batch, n * nh, b, b))
                parts["indices"].append(torch.stack([q_block, k_block], dim=1).repeat_interleave(nh, dim=0))
                head_ids = torch.arange(table.heads.start, table.heads.stop, device=device)
                parts["heads"].append(head_ids.repeat(n))
                parts["branches"].append(torch.full((n * nh,), table.branch, dtype=torch.long, device=device))
                minus_one = torch.full_like(q_pos, -1)
                parts["qpos"].append(torch.where(q_valid, q_pos, minus_one).repeat_interleave(nh, dim=0))
                parts["kpos"].append(torch.where(k_valid, k_pos, minus_one).repeat_interleave(nh, dim=0))

    def cat(name, empty_shape, dtype, dim=0):
        return torch.cat(parts[name], dim=dim) if parts[name] else torch.zeros(empty_shape, dtype=dtype, device=device)

    seq_len = plan.geometry.seq_len
    return SparseAttentionWeights(
        {
            "block_indices": cat("indices", (0, 2), torch.long),
            "block_values": cat("values", (batch, 0, b, b), dtype, dim=1),
            "shape": (batch, num_heads, seq_len, seq_len),
            "block_size": b,
            "block_heads": cat("heads", (0,), torch.long),
            "block_branches": cat("branches", (0,), torch.long),
            "query_positions": cat("qpos", (0, b), torch.long),
            "key_positions": cat("kpos", (0, b), torch.long),
        }
    )
