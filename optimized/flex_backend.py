"""Backend "flex": the block tables of a call as one FlexAttention call (torch.nn.attention.flex_attention).

Every (table, lattice, query head) of the plan is one document of one long query sequence: its
query rows, b slots each, laid end to end (flex's batch axis is the batch, its head axis 1).
Every (table, lattice, key/value head) is one document of the key sequence: the span of key
blocks the table uses in that lattice, so the query heads that share a key/value head
(grouped-query) share its key document. Flex blocks of BLOCK_SIZE = b are exactly the layout's
blocks. The BlockMask lists, per query row, the key blocks of its table row in its own key
document ("document masking" without a mask_mod lookup of documents: no block of another
document is ever listed), those the mask allows entirely as flex's full blocks (no mask_mod
runs on them) unless the call brings key padding. The mask_mod masks key slots past the lattice
end or outside the chunk, causal pairs (t_k <= t_q in one lattice) and key padding, from three
int32 values per query row; where flex evaluates the mask alone (eager flex) it also carries the
block layout. One gather each brings q, k and v into the sequences, one flex call runs every
table of every head layer, one gather each brings out and lse back as (layer, query, head);
head layers (head_mode "all": one per branch) are merged by the lse rule (docs/semantics.md
sections 4 and 5).

The layout, its index tensors and the BlockMask depend on the plan, the device, the head counts
and whether calls are padded, never on the batch, the dtype or the padding's values:
``layout_cache`` builds them once per such key, so a repeated call gathers q, k, v (and the key
padding), runs flex once and gathers the results back.

Eager on the CPU (small sizes: eager flex materializes the scores of the whole call; no
backward there, a torch limitation), torch.compile(flex_attention) on CUDA.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from reference.merge import merge_all

from .blocks import PartialCollector, accumulation_dtype, kv_heads_of, tables_by_layer
from .plan import CallPlan

# Eager (non-CUDA) flex builds the (batch, query slots, key slots) score tensor of the call: refuse beyond this.
EAGER_SCORE_LIMIT = 1 << 27
# Compiled flex tiles a block of b points with kernel tiles of at least 16 (tl.dot).
CUDA_BLOCK_MULTIPLE = 16
# Compiled flex runs its decoding kernel on query sequences shorter than this; the call's query
# sequence is padded to it on CUDA so that the main kernel, which reads the BlockMask's index
# lists by their row strides only, always runs.
MIN_COMPILED_QUERY_LEN = 128


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

        limits = dict(
            recompile_limit=max(RECOMPILE_LIMIT, dynamo_config.recompile_limit), fail_on_recompile_limit_hit=True
        )
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
                query,
                key,
                value,
                block_mask=block_mask,
                scale=scale,
                kernel_options=options,
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
    if q.is_cuda and q.dtype == torch.float64:
        raise TypeError(
            f"q.dtype={q.dtype} is not supported by backend='flex' on CUDA: compiled FlexAttention computes in "
            "float32 at most; float64 inputs need backend='torch' (or flex on the CPU, which runs eagerly in float64)"
        )
    if q.is_cuda and plan.block_size % CUDA_BLOCK_MULTIPLE != 0:
        raise ValueError(
            f"backend='flex' on CUDA needs sparse_config.block_size to be a multiple of {CUDA_BLOCK_MULTIPLE} "
            f"(compiled FlexAttention tiles), got block_size={plan.block_size}"
        )


@dataclass(frozen=True, eq=False)
class _FlexLayout:
    """Every table of one plan laid end to end for one flex call on one device.

    Flex's batch axis is the call's batch and its head axis 1: the BlockMask (1, 1, rows, ...)
    broadcasts over the batch, so nothing here depends on the batch size or the dtype, and one
    entry serves every batch and dtype of a plan. Every tensor is an integer or bool constant
    that never requires grad and is never written after the build: autograd may save it for a
    backward long after the call (flex saves the BlockMask and the mask_mod's tensors), and a
    later call reads the same values.
    """

    block_size: int
    num_layers: int
    query_len: int  # Lq: query slots of the call, rows * b
    key_len: int  # Lk: key slots of the call
    query_index: torch.Tensor  # (Lq,) long: row of q.flatten(1, 2) (position * H + head); 0 where invalid
    key_index: torch.Tensor  # (Lk,) long: row of k.flatten(1, 2) (position * H_kv + kv head); 0 where invalid
    key_position: torch.Tensor | None  # (Lk,) long: key chunk position of each key slot (padded calls only)
    out_index: torch.Tensor  # (L, Nq, H) long: the query slot of (layer, query, head); an empty slot where none
    lse_index: torch.Tensor  # (L, H, Nq) long: the same in lse's (head, query) order
    # (kv_lo, kv_hi, diagonal or None, row_first_block or None, block_local or None): what the
    # mask_mod closes over (``_mask_mod``).
    mask_parts: tuple
    block_mask: object  # flex.BlockMask; its mask_mod knows no key padding

    def tensors(self):
        yield from (
            t
            for t in (self.query_index, self.key_index, self.key_position, self.out_index, self.lse_index)
            if t is not None
        )
        yield from (t for t in self.mask_parts if t is not None)
        mask = self.block_mask
        yield from (
            t
            for t in (
                mask.kv_num_blocks,
                mask.kv_indices,
                mask.full_kv_num_blocks,
                mask.full_kv_indices,
                mask.q_num_blocks,
                mask.q_indices,
                mask.full_q_num_blocks,
                mask.full_q_indices,
            )
            if t is not None
        )

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def mask_mod(self, key_ok=None):
        """The call's mask_mod with a call's key padding ``key_ok`` (B, Lk) (None: none)."""
        return _mask_mod(*self.mask_parts, self.block_size, key_ok)


def _mask_mod(kv_lo, kv_hi, diagonal, row_first_block, block_local, b: int, key_ok):
    """The mask of a call in sequence slots (flex batch = batch, one flex head).

    Query slot q_idx lies in query row ``q_idx // b``, whose key document holds the valid key
    slots ``kv_lo[row] <= kv_idx < kv_hi[row]`` (a lattice's valid key slots are contiguous; the
    bound also keeps every other document out). With causal, t_k <= t_q, which in sequence slots
    is ``kv_idx - q_idx <= diagonal[row]`` (``diagonal`` None when not causal): three loads per
    query row, none per key. Query slots are not masked: the invalid ones are never read back.
    ``block_local`` (rows, span) with ``row_first_block`` (rows,) adds the block layout where flex
    evaluates the mask alone (eager flex): key block ``kv_idx // b`` is column ``kv_idx // b -
    row_first_block[row]`` of the row's document. Compiled flex visits only the BlockMask's
    listed blocks and gets None. ``key_ok`` (B, Lk) is a call's key padding (None: none).

    One code object for every call: compiled flex guards a closure on its code and on its cells'
    tensor metadata (None or not), so a new ``key_ok`` of the same shape compiles nothing new.
    """

    def mask_mod(batch, head, q_idx, kv_idx):
        row = q_idx // b
        allowed = (kv_idx >= kv_lo[row]) & (kv_idx < kv_hi[row])
        if diagonal is not None:
            allowed = allowed & (kv_idx - q_idx <= diagonal[row])
        if block_local is not None:
            # Clamped: outside the row's document the bounds above already refuse the pair.
            column = (kv_idx // b - row_first_block[row]).clamp(0, block_local.shape[1] - 1)
            allowed = allowed & block_local[row, column]
        if key_ok is not None:
            allowed = allowed & key_ok[batch, kv_idx]
        return allowed

    return mask_mod


def _block_lists(rows, cols, num_rows: int):
    """(num_blocks (1, 1, num_rows), indices (1, 1, num_rows, width)) int32 of the blocks (rows, cols).

    Ascending columns within a row; ``width`` is the longest row (at least 1), not the number of
    columns: the call's key sequence holds many documents, and a dense width would be quadratic.
    """
    order = torch.argsort(rows * (int(cols.max()) + 1 if cols.numel() else 1) + cols)
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(rows, minlength=num_rows)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    position = torch.arange(rows.numel()) - (torch.cumsum(counts, 0) - counts)[rows]
    indices = torch.zeros(num_rows, width, dtype=torch.int32)
    indices[rows, position] = cols.to(torch.int32)
    return counts.to(torch.int32).view(1, 1, num_rows), indices.view(1, 1, num_rows, width)


@dataclass(frozen=True)
class _TableSlots:
    """One table's rows and key blocks in its own coordinates, before heads and sequence offsets.

    Row n is the table's row n; key block j (of K) is block ``k_block[j]`` of lattice
    ``block_lattice[j]``, the lattices' spans laid end to end (lattice l starts at ``kstart[l]``).
    """

    heads: range
    num_rows: int  # R
    num_key_blocks: int  # K
    q_chunk: torch.Tensor  # (R, b) long: query chunk index of each query slot (0 where invalid)
    q_valid: torch.Tensor  # (R, b) bool
    k_chunk: torch.Tensor  # (K, b) long: key chunk index of each key slot (0 where invalid)
    k_valid: torch.Tensor  # (K, b) bool
    row_key_first: torch.Tensor  # (R,) long: first key block (of K) of the row's lattice
    row_kv_lo: torch.Tensor  # (R,) long: valid key slots of the row's lattice, from that block's first slot
    row_kv_hi: torch.Tensor  # (R,) long
    row_diagonal: torch.Tensor  # (R,) long: t of the row's first query slot - t of its lattice's first key slot
    entry_row: torch.Tensor  # (nnz,) long
    entry_block: torch.Tensor  # (nnz,) long: key block (of K)
    entry_column: torch.Tensor  # (nnz,) long: column in the row's lattice span
    entry_full: torch.Tensor  # (nnz,) bool: the mask allows the block entirely (no key padding)
    span_max: int


def _table_slots(table, plan: CallPlan) -> _TableSlots:
    b = table.block_size
    starts, lengths = table.lattice_start, table.lattice_length
    _, rows_per_lattice = torch.unique_consecutive(starts, return_counts=True)
    num_lattices = rows_per_lattice.numel()
    first_row = torch.cumsum(rows_per_lattice, 0) - rows_per_lattice
    row_lattice = torch.repeat_interleave(torch.arange(num_lattices), rows_per_lattice)
    entry_row = table.entry_row
    entry_lattice = row_lattice[entry_row]
    # Key blocks of a lattice used by the table: a span [key_first, key_first + key_span).
    big = torch.iinfo(torch.long).max
    key_first = torch.full((num_lattices,), big).scatter_reduce(0, entry_lattice, table.key_block, "amin")
    key_last = torch.full((num_lattices,), -1).scatter_reduce(0, entry_lattice, table.key_block, "amax")
    has_keys = key_last >= 0
    key_first = torch.where(has_keys, key_first, torch.zeros_like(key_first))
    key_span = torch.where(has_keys, key_last - key_first + 1, torch.zeros_like(key_first))
    kstart = torch.cumsum(key_span, 0) - key_span
    num_key_blocks = int(key_span.sum())
    lattice_start, lattice_length = starts[first_row], lengths[first_row]

    # Query slots (R, b): slot s of row n is lattice point t = query_block[n] * b + s.
    slots = torch.arange(b)
    q_t = table.query_block.unsqueeze(1) * b + slots
    q_pos = starts.unsqueeze(1) + table.stride * q_t
    q_valid = (q_t < lengths.unsqueeze(1)) & (q_pos >= plan.query_range[0]) & (q_pos < plan.query_range[1])
    # Key slots (K, b): key block j is block key_first + (j - kstart) of its lattice.
    block_lattice = torch.repeat_interleave(torch.arange(num_lattices), key_span)
    block_column = torch.arange(num_key_blocks) - kstart[block_lattice]
    k_t = (key_first[block_lattice] + block_column).unsqueeze(1) * b + slots
    k_pos = lattice_start[block_lattice].unsqueeze(1) + table.stride * k_t
    k_valid = (k_t < lattice_length[block_lattice].unsqueeze(1)) & (k_pos >= plan.key_range[0])
    k_valid &= k_pos < plan.key_range[1]
    # Every bound on k_valid is a bound on the slot (t and the position grow with it): an interval
    # [kv_lo, kv_hi) of the lattice's span slots.
    span_slot = (block_column.unsqueeze(1) * b + slots)[k_valid]
    valid_lattice = block_lattice.unsqueeze(1).expand(-1, b)[k_valid]
    valid_keys = torch.zeros(num_lattices, dtype=torch.long).index_add_(0, valid_lattice, torch.ones_like(span_slot))
    kv_lo = torch.full((num_lattices,), big).scatter_reduce(0, valid_lattice, span_slot, "amin")
    kv_last = torch.full((num_lattices,), -1).scatter_reduce(0, valid_lattice, span_slot, "amax")
    kv_lo = torch.where(valid_keys > 0, kv_lo, torch.zeros_like(kv_lo))
    kv_hi = kv_lo + valid_keys
    if not torch.equal(torch.where(valid_keys > 0, kv_last + 1, kv_hi), kv_hi):
        raise RuntimeError("flex backend: the valid key slots of a lattice are not contiguous (internal error)")

    entry_column = table.key_block - key_first[entry_lattice]
    entry_lo, entry_hi = kv_lo[entry_lattice], kv_hi[entry_lattice]
    # The whole block allowed: its keys valid and, with causal, its last key on or below the row's first query.
    entry_full = (entry_column * b >= entry_lo) & ((entry_column + 1) * b <= entry_hi)
    if plan.is_causal:
        entry_full &= (table.key_block + 1) * b - 1 <= table.query_block[entry_row] * b
    return _TableSlots(
        heads=table.heads,
        num_rows=table.num_rows,
        num_key_blocks=num_key_blocks,
        q_chunk=torch.where(q_valid, q_pos - plan.query_start, torch.zeros_like(q_pos)),
        q_valid=q_valid,
        k_chunk=torch.where(k_valid, k_pos - plan.key_start, torch.zeros_like(k_pos)),
        k_valid=k_valid,
        row_key_first=kstart[row_lattice],
        row_kv_lo=kv_lo[row_lattice],
        row_kv_hi=kv_hi[row_lattice],
        row_diagonal=(table.query_block - key_first[row_lattice]) * b,
        entry_row=entry_row,
        entry_block=kstart[entry_lattice] + entry_column,
        entry_column=entry_column,
        entry_full=entry_full,
        span_max=int(key_span.max()) if num_lattices else 0,
    )


def _build_layout(plan: CallPlan, device, num_heads: int, num_kv_heads: int, padded: bool) -> _FlexLayout | None:
    """The plan's tables as one flex call on ``device``; None when no table has rows.

    Host work on the tables' CPU tensors, then one copy each to ``device``. ``padded``: the calls
    bring a key padding mask, which the mask_mod must apply on every listed block. Without it,
    blocks that the mask allows entirely are listed as flex's full blocks, on which compiled flex
    runs no mask_mod.
    """
    flex = _flex_module()
    b = plan.block_size
    on_cuda = torch.device(device).type == "cuda"
    tables = [(layer, _table_slots(table, plan)) for layer, table in tables_by_layer(plan.tables)]
    if not tables:
        return None
    num_layers = tables[-1][0] + 1
    num_queries = plan.query_range[1] - plan.query_range[0]
    query_rows = sum(len(t.heads) * t.num_rows for _, t in tables)
    key_blocks = sum(len(_kv_heads(t.heads, num_heads, num_kv_heads)) * t.num_key_blocks for _, t in tables)
    # One row past the tables is never listed: every (layer, query, head) that no table covers
    # reads its empty slot. On CUDA the sequence is long enough for flex's main kernel.
    num_rows = max(query_rows + 1, -(-MIN_COMPILED_QUERY_LEN // b) if on_cuda else 0)
    num_key_rows = max(key_blocks, 1)
    query_len, key_len = num_rows * b, num_key_rows * b
    if query_len + key_len + plan.geometry.seq_len >= 1 << 31:  # the mask_mod's int32 slot arithmetic
        raise ValueError(
            f"backend='flex' lays the call out as {query_len} query slots and {key_len} key slots, past flex's "
            f"int32 indices (seq_len={plan.geometry.seq_len}, num_heads={num_heads}, block_size={b}); "
            "use backend='triton' or backend='torch' for this size"
        )
    empty_slot = query_rows * b

    query_index = torch.zeros(num_rows, b, dtype=torch.long)
    key_index = torch.zeros(num_key_rows, b, dtype=torch.long)
    key_position = torch.zeros(num_key_rows, b, dtype=torch.long)
    out_index = torch.full((num_layers, num_queries, num_heads), empty_slot, dtype=torch.long)
    kv_lo = torch.zeros(num_rows, dtype=torch.long)
    kv_hi = torch.zeros(num_rows, dtype=torch.long)
    diagonal = torch.zeros(num_rows, dtype=torch.long)
    row_first_block = torch.zeros(num_rows, dtype=torch.long)
    rows, cols, fulls, columns = [], [], [], []
    row_base = key_base = 0
    slots = torch.arange(b)
    for layer, t in tables:
        nh, R, K = len(t.heads), t.num_rows, t.num_key_blocks
        kv_heads = _kv_heads(t.heads, num_heads, num_kv_heads)
        heads = torch.arange(t.heads.start, t.heads.stop)
        # Query rows row_base + j * R + n (head j of the table); key blocks key_base + i * K + block
        # (its i-th key/value head); query head j reads key/value head kv_of[j].
        kv_of = kv_heads_of(t.heads, num_heads, num_kv_heads, "cpu") - kv_heads.start
        q_rows = row_base + torch.arange(nh).unsqueeze(1) * R + torch.arange(R)  # (nh, R)
        query_index[q_rows] = torch.where(t.q_valid, t.q_chunk * num_heads + heads.view(-1, 1, 1), 0)
        k_rows = key_base + torch.arange(len(kv_heads)).unsqueeze(1) * K + torch.arange(K)  # (n_kv, K)
        kv_ids = torch.arange(kv_heads.start, kv_heads.stop).view(-1, 1, 1)
        key_index[k_rows] = torch.where(t.k_valid, t.k_chunk * num_kv_heads + kv_ids, 0)
        key_position[k_rows] = t.k_chunk.expand(len(kv_heads), -1, -1)
        valid = t.q_valid.expand(nh, -1, -1)
        out_index[layer, t.q_chunk.expand(nh, -1, -1)[valid], heads.view(-1, 1, 1).expand(-1, R, b)[valid]] = (
            q_rows.unsqueeze(-1) * b + slots
        )[valid]
        # The row's key document starts at key block doc_first: its valid key slots and causal diagonal.
        doc_first = key_base + kv_of.unsqueeze(1) * K + t.row_key_first  # (nh, R)
        kv_lo[q_rows] = doc_first * b + t.row_kv_lo
        kv_hi[q_rows] = doc_first * b + t.row_kv_hi
        # t_k <= t_q  <=>  kv_idx - q_idx <= (query_block - key_first) * b - q_row * b + doc_first * b.
        diagonal[q_rows] = t.row_diagonal - q_rows * b + doc_first * b
        row_first_block[q_rows] = doc_first
        rows.append((q_rows[:, t.entry_row]).reshape(-1))
        cols.append((key_base + kv_of.unsqueeze(1) * K + t.entry_block).reshape(-1))
        fulls.append(t.entry_full.expand(nh, -1).reshape(-1))
        columns.append(t.entry_column.expand(nh, -1).reshape(-1))
        row_base += nh * R
        key_base += len(kv_heads) * K
    rows, cols, columns = torch.cat(rows), torch.cat(cols), torch.cat(columns)
    full = torch.zeros_like(rows, dtype=torch.bool) if padded else torch.cat(fulls)
    partial = ~full

    block_local = row_first = None
    if not on_cuda:  # eager flex evaluates the mask alone: it carries the layout
        span_max = max(1, max(t.span_max for _, t in tables))
        block_local = torch.zeros(num_rows, span_max, dtype=torch.bool)
        block_local[rows, columns] = True
        row_first = row_first_block

    def to(tensor):
        return None if tensor is None else tensor.to(device)

    # Sequence slots are < 2^31: int32 halves what the mask_mod loads.
    mask_parts = (
        to(kv_lo.to(torch.int32)),
        to(kv_hi.to(torch.int32)),
        to(diagonal.to(torch.int32)) if plan.is_causal else None,
        to(None if row_first is None else row_first.to(torch.int32)),
        to(block_local),
    )
    kv_lists = _block_lists(rows[partial], cols[partial], num_rows)
    q_lists = _block_lists(cols[partial], rows[partial], num_key_rows)
    full_kv_lists = full_q_lists = (None, None)
    if bool(full.any()):
        full_kv_lists = _block_lists(rows[full], cols[full], num_rows)
        full_q_lists = _block_lists(cols[full], rows[full], num_key_rows)
    # Built directly, not by from_kv_blocks: its transpose goes through a dense (rows, width)
    # matrix whose width must be every key block of the sequence.
    block_mask = flex.BlockMask(
        seq_lengths=(query_len, key_len),
        kv_num_blocks=to(kv_lists[0]),
        kv_indices=to(kv_lists[1]),
        full_kv_num_blocks=to(full_kv_lists[0]),
        full_kv_indices=to(full_kv_lists[1]),
        q_num_blocks=to(q_lists[0]),
        q_indices=to(q_lists[1]),
        full_q_num_blocks=to(full_q_lists[0]),
        full_q_indices=to(full_q_lists[1]),
        BLOCK_SIZE=(b, b),
        mask_mod=_mask_mod(*mask_parts, b, None),
    )
    return _FlexLayout(
        block_size=b,
        num_layers=num_layers,
        query_len=query_len,
        key_len=key_len,
        query_index=to(query_index.view(-1)),
        key_index=to(key_index.view(-1)),
        key_position=to(key_position.view(-1)) if padded else None,
        out_index=to(out_index),
        lse_index=to(out_index.transpose(1, 2).contiguous()),
        mask_parts=mask_parts,
        block_mask=block_mask,
    )


def _kv_heads(heads: range, num_heads: int, num_kv_heads: int) -> range:
    """The key/value heads that the query heads ``heads`` read (grouped-query), a contiguous run."""
    group = num_heads // num_kv_heads
    return range(heads.start // group, (heads.stop - 1) // group + 1)


class LayoutCache:
    """Flex layouts of recent plans, per (plan, device, heads, key/value heads, padded), least recently used first out.

    Bounded by bytes, not by count: a ring of P chunks has up to P^2 small chunk-pair plans, while
    one plan at long sequences holds tens to hundreds of MB (the BlockMask's index lists and their
    transpose, the gather indices); a count bound would either evict a ring's pairs on every call
    or let a few long plans hold GPU memory without limit. The newest entry is kept even past the
    bound: evicting it would rebuild it on every call. Entries hold no tensor that requires grad
    and no reference to a call's inputs, so repeated calls keep no autograd graph alive.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict = OrderedDict()
        self._nbytes: dict = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(self._nbytes.values())

    def clear(self) -> None:
        self._entries.clear()
        self._nbytes.clear()

    def get(self, plan: CallPlan, device, num_heads: int, num_kv_heads: int, padded: bool) -> _FlexLayout | None:
        """The ``_FlexLayout`` of ``plan`` (None: no table has rows), built on the first call for this key."""
        key = (plan, torch.device(device), num_heads, num_kv_heads, bool(padded))
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        # Built outside inference mode: inference tensors cannot be saved for backward, and a later
        # call with gradients reuses what an inference_mode call built.
        with torch.inference_mode(False), torch.no_grad():
            entry = _build_layout(plan, key[1], num_heads, num_kv_heads, padded)
        self._entries[key] = entry
        self._nbytes[key] = 0 if entry is None else entry.nbytes()
        while len(self._entries) > 1 and self.nbytes > self.max_bytes:
            evicted, _ = self._entries.popitem(last=False)
            del self._nbytes[evicted]
        return entry


# One plan at N = 64K (H = 12, segments 2048-8192, rates 1-4, b = 128, dense) takes about 20 MB in
# head_mode "split" and 60 MB in "all", mostly the gather indices (8 bytes per query and key slot,
# 16 per (layer, query, head)); sixteen times that at 1M. 512 MB holds a few such plans or the
# chunk pairs of a long ring, and is small next to the activations it serves.
LAYOUT_CACHE_BYTES = 512 << 20
layout_cache = LayoutCache(LAYOUT_CACHE_BYTES)


def _compute_dtype(q, k, v, block_size: int) -> torch.dtype:
    """float32 where flex in q.dtype would round or could not run; q.dtype otherwise.

    Eager flex rounds the probabilities to q.dtype before the value product, so off CUDA the
    compacted tensors are float32, float64 for float64 inputs (docs/numerics.md: float64 is computed
    in float64). Compiled flex's backward in half precision (torch 2.11, H200) has no kernel config
    for blocks that are not a multiple of 128; float32's always fits.
    """
    if not q.is_cuda:
        return accumulation_dtype(q.dtype)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.dtype in (torch.float16, torch.bfloat16) and needs_grad and block_size % 128 != 0:
        return torch.float32
    return q.dtype


def _gather(x, index, dtype):
    """(B, n, H', D) -> (B, 1, L, D): rows ``index`` of x.flatten(1, 2), one gather."""
    return x.flatten(1, 2)[:, index].to(dtype).unsqueeze(1)


def _merge_layers(out, lse):
    """(out (B, Nq, H, D), lse (B, H, Nq)) of head layers out (B, L, Nq, H, D), lse (B, L, H, Nq).

    Several layers (head_mode "all": one per branch) are merged by the lse rule of
    docs/semantics.md section 5, in float64 and all at once as the torch backend does (a chain of
    float32 merges roughly doubled the gradient's rounding error); untracked calls merge a slice
    of queries at a time, which bounds the float64 temporaries.
    """
    if out.shape[1] == 1:
        return out[:, 0], lse[:, 0]
    outs, lses = out.unbind(1), lse.unbind(1)
    if torch.is_grad_enabled() and (out.requires_grad or lse.requires_grad):
        merged_out, merged_lse = merge_all([part.double() for part in outs], [part.double() for part in lses])
        return merged_out.to(out.dtype), merged_lse.to(lse.dtype)
    batch, _, num_queries, num_heads, head_dim = out.shape
    merged_out = torch.empty(batch, num_queries, num_heads, head_dim, dtype=out.dtype, device=out.device)
    merged_lse = torch.empty(batch, num_heads, num_queries, dtype=lse.dtype, device=lse.device)
    for q0 in range(0, num_queries, PartialCollector.MERGE_QUERIES):
        q1 = min(q0 + PartialCollector.MERGE_QUERIES, num_queries)
        part_out, part_lse = merge_all(
            [part[:, q0:q1].double() for part in outs], [part[:, :, q0:q1].double() for part in lses]
        )
        merged_out[:, q0:q1] = part_out
        merged_lse[:, :, q0:q1] = part_lse
    return merged_out, merged_lse


def partial_forward(q, k, v, key_padding_mask, plan: CallPlan):
    """Partial attention of the plan's query chunk against its key chunk (COMMON interface), via flex.

    Returns out (B, Nq, H, D) and lse (B, H, Nq) (natural log), float32 (float64 for float64 inputs);
    empty rows 0 / -inf. Per call: one gather each of q, k, v (and the key padding), one flex call,
    one gather each of out and lse; everything else comes from the cached layout.
    """
    _check_inputs(q, k, v, plan)
    batch, num_queries, num_heads, head_dim = q.shape
    result_dtype = accumulation_dtype(q.dtype)
    layout = layout_cache.get(plan, q.device, num_heads, k.shape[2], key_padding_mask is not None)
    if layout is None:  # no table has rows: every row is empty
        return (
            torch.zeros(batch, num_queries, num_heads, head_dim, dtype=result_dtype, device=q.device),
            torch.full((batch, num_heads, num_queries), float("-inf"), dtype=result_dtype, device=q.device),
        )
    scores = batch * layout.query_len * layout.key_len
    if not q.is_cuda and scores > EAGER_SCORE_LIMIT:
        raise ValueError(
            f"backend='flex' off CUDA runs eager FlexAttention, which would build {scores} scores for this call "
            f"(batch {batch} x {layout.query_len} query slots x {layout.key_len} key slots; q of shape "
            f"{tuple(q.shape)}, block_size={plan.block_size}); use backend='torch' or a CUDA device for this size"
        )
    compute_dtype = _compute_dtype(q, k, v, plan.block_size)
    query = _gather(q, layout.query_index, compute_dtype)
    key = _gather(k, layout.key_index, compute_dtype)
    value = _gather(v, layout.key_index, compute_dtype)
    block_mask = layout.block_mask
    if key_padding_mask is not None:
        # The padding is the call's, never the cache's: a fresh (B, Lk) tensor that this call's
        # mask_mod closes over, so a backward run after a later call still sees this call's mask.
        block_mask = copy.copy(block_mask)
        block_mask.mask_mod = layout.mask_mod(~key_padding_mask[:, layout.key_position])
    out, lse = _run_flex(query, key, value, block_mask, plan.scale)
    # Back to (layer, query, head), one gather each; uncovered ones read the empty slot.
    out = out[:, 0][:, layout.out_index].to(result_dtype)
    lse = lse[:, 0][:, layout.lse_index].to(result_dtype)
    # Rows with no allowed key (lse -inf or nan; never +inf): out exactly 0 and lse exactly -inf
    # whatever flex wrote there. (lse > -inf is False on both: two kernels where isfinite takes four.)
    empty = (lse > float("-inf")).logical_not_()
    # In place: nothing saved for a backward reads these gathered tensors.
    out.masked_fill_(empty.transpose(-1, -2).unsqueeze(-1), 0.0)
    lse.masked_fill_(empty, float("-inf"))
    return _merge_layers(out, lse)
