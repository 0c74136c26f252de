"""Backend "flex": the block tables as FlexAttention BlockMasks (torch.nn.attention.flex_attention).

Per BlockTable, every lattice (segment) of the table becomes one batch entry of a compacted
sequence: its query rows (b slots each) and the span of key blocks the table uses, so flex
blocks of BLOCK_SIZE = b are exactly the layout's blocks. The BlockMask lists the table's CSR key
blocks; the mask_mod repeats the block layout (eager flex evaluates only the mask_mod) and masks
points past the lattice end or outside the chunk, causal pairs (t_k <= t_q in one lattice) and
key padding. Results are scattered back and merged like the torch backend.

Eager on the CPU (small sizes: eager flex materializes each lattice's scores; no backward there,
a torch limitation), torch.compile(flex_attention) on CUDA.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .blocks import PartialCollector, kv_heads_of, tables_by_layer
from .plan import CallPlan

# Eager (non-CUDA) flex builds the (lattices, heads, Lq, Lk) score tensor of a table: refuse beyond this.
EAGER_SCORE_LIMIT = 1 << 27
# Compiled flex tiles a block of b points with kernel tiles of at least 16 (tl.dot).
CUDA_BLOCK_MULTIPLE = 16


def _flex_module():
    try:
        from torch.nn.attention import flex_attention as flex
    except ImportError as error:  # pragma: no cover - torch < 2.5
        raise RuntimeError(f"backend='flex' needs torch.nn.attention.flex_attention (torch >= 2.5): {error}") from error
    return flex


# Recompilations allowed (shapes, dtypes, block sizes of a process). Past the limit dynamo would
# silently run eager flex (dense scores on the GPU): it is told to raise instead.
RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_flex_attention():
    return torch.compile(_flex_module().flex_attention)


def _kernel_options(block_size: int):
    """Kernel tiles that divide the block: compiled flex rejects tiles that do not (no choice left)."""
    tile = 16
    while tile < 64 and block_size % (2 * tile) == 0:
        tile *= 2
    return {"BLOCK_M": tile, "BLOCK_N": tile}


MIN_COMPILED_HEAD_DIM = 16


def pad_head_dim(query, key, value, minimum: int):
    """Zero-pad the head dim to ``minimum`` (compiled flex needs >= 16: inductor's "NYI: embedding
    dimension ... at least 16", seen on the H200 at D = 1). Zero columns change no score (q . k) and
    give zero output columns, which the caller slices off; the scale is passed explicitly."""
    missing = minimum - query.shape[-1]
    if missing <= 0:
        return query, key, value
    return tuple(torch.nn.functional.pad(x, (0, missing)) for x in (query, key, value))


def _run_flex(query, key, value, block_mask, scale):
    """flex_attention returning (out, natural-log lse), with the API of this torch version."""
    flex = _flex_module()
    if query.is_cuda:
        import torch._dynamo.config as dynamo_config

        limits = dict(recompile_limit=max(RECOMPILE_LIMIT, dynamo_config.recompile_limit),
                      fail_on_recompile_limit_hit=True)
        options = _kernel_options(block_mask.BLOCK_SIZE[0])
        head_dim = query.shape[-1]
        query, key, value = pad_head_dim(query, key, value, MIN_COMPILED_HEAD_DIM)
        with dynamo_config.patch(**limits):
            out, lse = _call_flex(flex, _compiled_flex_attention(), query, key, value, block_mask, scale, options)
        return out[..., :head_dim], lse
    return _call_flex(flex, flex.flex_attention, query, key, value, block_mask, scale, None)


def _call_flex(flex, function, query, key, value, block_mask, scale, options):
    with warnings.catch_warnings():
        # Eager flex off CUDA is deliberate here (small sizes); its "use torch.compile" hint is noise.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        if hasattr(flex, "AuxRequest"):
            out, aux = function(
                query, key, value, block_mask=block_mask, scale=scale, kernel_options=options,
                return_aux=flex.AuxRequest(lse=True),
            )
            return out, aux.lse
        return function(query, key, value, block_mask=block_mask, scale=scale, kernel_options=options, return_lse=True)


def _check_inputs(q, k, v, plan: CallPlan) -> None:
    if q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
        raise NotImplementedError(
            "backend='flex' on the CPU runs eager FlexAttention, which has no backward in torch "
            f"{torch.__version__}: q, k, v must not require grad on device {q.device}; use backend='torch' "
            "for gradients on the CPU, or run on CUDA"
        )
    if q.is_cuda and plan.block_size % CUDA_BLOCK_MULTIPLE != 0:
        raise ValueError(
            f"backend='flex' on CUDA needs sparse_config.block_size to be a multiple of {CUDA_BLOCK_MULTIPLE} "
            f"(compiled FlexAttention tiles), got block_size={plan.block_size}"
        )


class _TableLayout:
    """One BlockTable arranged as a batch of lattices (S of them) for flex, on ``device``."""

    def __init__(self, table, plan: CallPlan, device) -> None:
        b = table.block_size
        starts, lengths = table.lattice_start, table.lattice_length
        _, rows_per_lattice = torch.unique_consecutive(starts, return_counts=True)
        num_lattices = rows_per_lattice.numel()
        first_row = torch.cumsum(rows_per_lattice, 0) - rows_per_lattice
        row_lattice = torch.repeat_interleave(torch.arange(num_lattices), rows_per_lattice)
        row_in_lattice = torch.arange(table.num_rows) - first_row[row_lattice]
        entry_row = table.entry_row
        entry_lattice = row_lattice[entry_row]
        # Key blocks of a lattice used by the table: a span [key_first, key_first + key_span).
        big = torch.iinfo(torch.long).max
        key_first = torch.full((num_lattices,), big).scatter_reduce(0, entry_lattice, table.key_block, "amin")
        key_last = torch.full((num_lattices,), -1).scatter_reduce(0, entry_lattice, table.key_block, "amax")
        has_keys = key_last >= 0
        key_first = torch.where(has_keys, key_first, torch.zeros_like(key_first))
        key_span = torch.where(has_keys, key_last - key_first + 1, torch.zeros_like(key_first))
        rows_max = int(rows_per_lattice.max())
        span_max = max(1, int(key_span.max()))

        lattice_start = starts[first_row]
        lattice_length = lengths[first_row]
        query_first = table.query_block[first_row]
        # Query slots (S, rows_max * b) and key slots (S, span_max * b) of every lattice.
        q_row = torch.arange(rows_max * b) // b
        q_t = (query_first.unsqueeze(1) + q_row) * b + torch.arange(rows_max * b) % b
        q_pos = lattice_start.unsqueeze(1) + table.stride * q_t
        q_valid = (q_row < rows_per_lattice.unsqueeze(1)) & (q_t < lattice_length.unsqueeze(1))
        q_valid &= (q_pos >= plan.query_range[0]) & (q_pos < plan.query_range[1])
        k_col = torch.arange(span_max * b) // b
        k_t = (key_first.unsqueeze(1) + k_col) * b + torch.arange(span_max * b) % b
        k_pos = lattice_start.unsqueeze(1) + table.stride * k_t
        k_valid = (k_col < key_span.unsqueeze(1)) & (k_t < lattice_length.unsqueeze(1))
        k_valid &= (k_pos >= plan.key_range[0]) & (k_pos < plan.key_range[1])
        # Block structure: CSR entries as (lattice, row in lattice, key block - key_first).
        entry_col = table.key_block - key_first[entry_lattice]
        block_allowed = torch.zeros(num_lattices, rows_max, span_max, dtype=torch.bool)
        block_allowed[entry_lattice, row_in_lattice[entry_row], entry_col] = True
        kv_indices = torch.zeros(num_lattices, rows_max, span_max, dtype=torch.int32)
        position_in_row = torch.arange(table.nnz) - table.row_ptr[entry_row]
        kv_indices[entry_lattice, row_in_lattice[entry_row], position_in_row] = entry_col.to(torch.int32)
        kv_num_blocks = torch.zeros(num_lattices, rows_max, dtype=torch.int32)
        kv_num_blocks[row_lattice, row_in_lattice] = table.row_counts.to(torch.int32)

        to = lambda t: t.to(device)  # noqa: E731
        self.num_lattices, self.rows_max, self.span_max = num_lattices, rows_max, span_max
        self.q_pos, self.q_t, self.q_valid = to(q_pos), to(q_t), to(q_valid)
        self.k_pos, self.k_t, self.k_valid = to(k_pos), to(k_t), to(k_valid)
        self.block_allowed, self.kv_indices, self.kv_num_blocks = to(block_allowed), to(kv_indices), to(kv_num_blocks)


def _compute_dtype(q, k, v, block_size: int) -> torch.dtype:
    """float32 where flex in q.dtype would round or could not run; q.dtype otherwise.

    Eager flex rounds the probabilities to q.dtype before the value product, so off CUDA the
    compacted tensors are float32. Compiled flex's backward in half precision (torch 2.11, H200)
    has no kernel config for blocks that are not a multiple of 128; float32's always fits.
    """
    if not q.is_cuda:
        return torch.float32
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.dtype in (torch.float16, torch.bfloat16) and needs_grad and block_size % 128 != 0:
        return torch.float32
    return q.dtype


def _table_partial(q, k, v, key_padding_mask, table, plan: CallPlan):
    """(query chunk index (P,), out (B, P, nh, D), lse (B, P, nh)) of one table via flex."""
    flex = _flex_module()
    device = q.device
    batch, _, num_heads, head_dim = q.shape
    b = table.block_size
    layout = _TableLayout(table, plan, device)
    S = layout.num_lattices
    lq, lk = layout.rows_max * b, layout.span_max * b
    nh = len(table.heads)
    if not q.is_cuda and batch * S * nh * lq * lk > EAGER_SCORE_LIMIT:
        raise ValueError(
            f"backend='flex' off CUDA runs eager FlexAttention, which would build {batch * S * nh * lq * lk} "
            f"scores for this table (q of shape {tuple(q.shape)}, block_size={b}); use backend='torch' "
            "or a CUDA device for this size"
        )

    q_index = torch.where(layout.q_valid, layout.q_pos - plan.query_start, torch.zeros_like(layout.q_pos))
    k_index = torch.where(layout.k_valid, layout.k_pos - plan.key_start, torch.zeros_like(layout.k_pos))
    kv_heads = kv_heads_of(table.heads, num_heads, k.shape[2], device)
    compute_dtype = _compute_dtype(q, k, v, b)

    def compacted(x, index, heads):  # (B, n, H', D) -> (B * S, nh, L, D)
        gathered = x[:, index.unsqueeze(-1), heads]  # (B, S, L, nh, D)
        return gathered.permute(0, 1, 3, 2, 4).reshape(batch * S, nh, index.shape[1], head_dim).to(compute_dtype)

    query = compacted(q, q_index, torch.arange(table.heads.start, table.heads.stop, device=device))
    key = compacted(k, k_index, kv_heads)
    value = compacted(v, k_index, kv_heads)

    key_ok = layout.k_valid.unsqueeze(0)  # (1, S, lk)
    if key_padding_mask is not None:
        key_ok = key_ok & ~key_padding_mask[:, k_index]
    key_ok = key_ok.expand(batch, S, lk).reshape(batch * S, lk)
    q_valid, q_t, k_t, block_allowed = layout.q_valid, layout.q_t, layout.k_t, layout.block_allowed
    # Per-call values live in tensors, not Python constants, so compiled flex is not recompiled for them.
    lattice_of = torch.arange(S, device=device).repeat(batch)  # batch entry -> lattice
    not_causal = torch.tensor(not plan.is_causal, device=device)

    def mask_mod(batch_lattice, head, q_idx, kv_idx):
        lattice = lattice_of[batch_lattice]
        allowed = block_allowed[lattice, q_idx // b, kv_idx // b] & q_valid[lattice, q_idx]
        allowed = allowed & key_ok[batch_lattice, kv_idx]
        return allowed & (not_causal | (k_t[lattice, kv_idx] <= q_t[lattice, q_idx]))

    block_mask = flex.BlockMask.from_kv_blocks(
        layout.kv_num_blocks.unsqueeze(1).repeat(batch, 1, 1),
        layout.kv_indices.unsqueeze(1).repeat(batch, 1, 1, 1),
        BLOCK_SIZE=b,
        mask_mod=mask_mod,
        seq_lengths=(lq, lk),
    )
    out, lse = _run_flex(query, key, value, block_mask, plan.scale)
    out = out.to(torch.float32).reshape(batch, S, nh, lq, head_dim)
    lse = lse.to(torch.float32).reshape(batch, S, nh, lq)
    # Rows with no allowed key: out exactly 0 and lse exactly -inf whatever flex wrote there.
    empty = torch.isneginf(lse) | torch.isnan(lse)
    out = torch.where(empty.unsqueeze(-1), torch.zeros_like(out), out)
    lse = torch.where(empty, torch.full_like(lse, float("-inf")), lse)
    keep = layout.q_valid.reshape(-1).nonzero().squeeze(1)
    out = out.permute(0, 1, 3, 2, 4).reshape(batch, S * lq, nh, head_dim)[:, keep]
    lse = lse.permute(0, 1, 3, 2).reshape(batch, S * lq, nh)[:, keep]
    return q_index.reshape(-1)[keep], out, lse


def partial_forward(q, k, v, key_padding_mask, plan: CallPlan):
    """Partial attention of the plan's query chunk against its key chunk (COMMON interface), via flex.

    Returns out (B, Nq, H, D) float32 and lse (B, H, Nq) float32 (natural log); empty rows 0 / -inf.
    """
    _check_inputs(q, k, v, plan)
    batch, num_queries, num_heads, head_dim = q.shape
    collector = PartialCollector(batch, num_queries, num_heads, head_dim, q.device)
    for layer, table in tables_by_layer(plan.tables):
        q_index, out, lse = _table_partial(q, k, v, key_padding_mask, table, plan)
        collector.add(layer, table.heads, q_index, out, lse)
    return collector.result()
