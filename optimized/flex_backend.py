"""Backend "flex": the block tables as FlexAttention BlockMasks (torch.nn.attention.flex_attention).

Per BlockTable, every lattice (segment) of the table becomes one flex batch entry of a compacted
sequence: its query rows (b slots each) and the span of key blocks the table uses, so flex
blocks of BLOCK_SIZE = b are exactly the layout's blocks; flex's head axis holds (batch, head).
The BlockMask lists the table's CSR key blocks, those the mask allows entirely as flex's full
blocks (no mask_mod runs on them) unless the call brings key padding. The mask_mod masks key
slots past the lattice end or outside the chunk, causal pairs (t_k <= t_q in one lattice) and key
padding, and repeats the block layout where flex evaluates it alone (eager flex). Results are
gathered back and merged like the torch backend.

The layout, its index tensors and the BlockMask depend on the plan, the device, the head counts
and whether calls are padded, never on the batch, the dtype or the padding's values:
``layout_cache`` builds them once per such key, so a repeated call gathers q, k, v (and the key
padding), runs flex and gathers the results back.

Eager on the CPU (small sizes: eager flex materializes each lattice's scores; no backward there,
a torch limitation), torch.compile(flex_attention) on CUDA.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .blocks import PartialCollector, accumulation_dtype, kv_heads_of, tables_by_layer
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
class _FlexTable:
    """One BlockTable arranged for flex on one device: what a call needs beyond q, k, v and the padding.

    Flex's batch axis is the table's S lattices and its head axis is (batch, head): the BlockMask
    (S, 1, rows, span) then broadcasts over the heads, so nothing here depends on the batch size
    or the dtype, and one entry serves every batch and dtype of a plan. Every tensor is an
    integer or bool constant that never requires grad and is never written after the build:
    autograd may save it for a backward long after the call (flex saves the BlockMask and the
    mask_mod's tensors), and a later call reads the same values.
    """

    heads: range
    block_size: int
    num_lattices: int
    query_len: int  # lq = rows_max * b query slots per lattice
    key_len: int  # lk = span_max * b key slots per lattice
    q_index: torch.Tensor  # (S, lq) long: index into the query chunk (0 where invalid)
    k_index: torch.Tensor  # (S, lk) long: index into the key chunk (0 where invalid)
    query_heads: torch.Tensor  # (nh,) long: the table's heads
    kv_heads: torch.Tensor  # (nh,) long: their key/value heads (grouped-query)
    local_heads: torch.Tensor  # (nh,) long: 0 .. nh - 1
    keep_lattice: torch.Tensor  # (P,) long: lattice of each valid query slot
    keep_slot: torch.Tensor  # (P,) long: its slot in the lattice
    keep_index: torch.Tensor  # (P,) long: its index into the query chunk
    # (kv_lo, kv_hi, diagonal, block_allowed or None): what the mask_mod closes over (``_mask_mod``).
    mask_parts: tuple
    block_mask: object  # flex.BlockMask; its mask_mod knows no key padding

    def tensors(self):
        yield from (
            self.q_index,
            self.k_index,
            self.query_heads,
            self.kv_heads,
            self.local_heads,
            self.keep_lattice,
            self.keep_slot,
            self.keep_index,
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

    def mask_mod(self, key_ok=None, heads_per_batch: int = 1):
        """The table's mask_mod with a call's key padding ``key_ok`` (B, S, lk).

        Flex's heads are B * ``heads_per_batch``."""
        return _mask_mod(*self.mask_parts, self.block_size, key_ok, heads_per_batch)


def _mask_mod(kv_lo, kv_hi, diagonal, block_allowed, b: int, key_ok, heads_per_batch: int):
    """The mask of one table in compacted slots (flex batch = lattice, flex head = batch * nh + head).

    A key slot is allowed where it exists and lies in the key chunk, ``kv_lo[lattice] <= kv_idx <
    kv_hi[lattice]`` (a lattice's valid key slots are contiguous), and, with causal, where
    t_k <= t_q, which in compacted slots is ``kv_idx - q_idx <= diagonal[lattice]`` (``diagonal`` =
    lk when not causal): three loads per lattice, none per point. Query slots are not masked: the
    invalid ones are never read back. ``block_allowed`` (S, rows, span) adds the block layout
    where flex evaluates the mask alone (eager flex); compiled flex visits only the BlockMask's
    listed blocks and gets None. ``key_ok`` (B, S, lk) is a call's key padding (None: none).

    One code object for every call: compiled flex guards a closure on its code and on its cells'
    tensor metadata (None or not), so a new ``key_ok`` of the same shape compiles nothing new.
    """

    def mask_mod(lattice, head, q_idx, kv_idx):
        allowed = (kv_idx >= kv_lo[lattice]) & (kv_idx < kv_hi[lattice]) & (kv_idx - q_idx <= diagonal[lattice])
        if block_allowed is not None:
            allowed = allowed & block_allowed[lattice, q_idx // b, kv_idx // b]
        if key_ok is not None:
            allowed = allowed & key_ok[head // heads_per_batch, lattice, kv_idx]
        return allowed

    return mask_mod


def _block_lists(lattice, row, col, num_lattices: int, rows_max: int, span_max: int):
    """(num_blocks (S, 1, rows), indices (S, 1, rows, span)) int32 of CSR entries (lattice, row, col).

    The entries come in CSR order, so those of one (lattice, row) are consecutive.
    """
    flat_row = lattice * rows_max + row
    num_blocks = torch.zeros(num_lattices * rows_max, dtype=torch.long)
    num_blocks.index_add_(0, flat_row, torch.ones_like(flat_row))
    first = torch.cumsum(num_blocks, 0) - num_blocks
    position = torch.arange(flat_row.numel()) - first[flat_row]
    indices = torch.zeros(num_lattices, 1, rows_max, span_max, dtype=torch.int32)
    indices[lattice, 0, row, position] = col.to(torch.int32)
    return num_blocks.view(num_lattices, 1, rows_max).to(torch.int32), indices


def _build_table(table, plan: CallPlan, device, num_heads: int, num_kv_heads: int, padded: bool) -> _FlexTable:
    """The flex arrangement of ``table``: host work on the table's CPU tensors, then one copy each to ``device``.

    ``padded``: the calls bring a key padding mask, which the mask_mod must apply on every listed
    block. Without it, blocks that the mask allows entirely are listed as flex's full blocks, on
    which compiled flex runs no mask_mod.
    """
    flex = _flex_module()
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
    lq, lk = rows_max * b, span_max * b

    lattice_start = starts[first_row]
    lattice_length = lengths[first_row]
    query_first = table.query_block[first_row]
    # Query slots (S, lq) and key slots (S, lk) of every lattice: slot i is lattice point
    # t = first block * b + i.
    q_row = torch.arange(lq) // b
    q_t = query_first.unsqueeze(1) * b + torch.arange(lq)
    q_pos = lattice_start.unsqueeze(1) + table.stride * q_t
    q_valid = (q_row < rows_per_lattice.unsqueeze(1)) & (q_t < lattice_length.unsqueeze(1))
    q_valid &= (q_pos >= plan.query_range[0]) & (q_pos < plan.query_range[1])
    k_t = key_first.unsqueeze(1) * b + torch.arange(lk)
    k_pos = lattice_start.unsqueeze(1) + table.stride * k_t
    k_valid = (torch.arange(lk) < (key_span * b).unsqueeze(1)) & (k_t < lattice_length.unsqueeze(1))
    k_valid &= (k_pos >= plan.key_range[0]) & (k_pos < plan.key_range[1])
    # Every bound on k_valid is a bound on the slot (t and the position grow with it): an interval.
    valid_keys = k_valid.sum(1)
    kv_lo = torch.where(valid_keys > 0, k_valid.to(torch.int8).argmax(1), torch.zeros_like(valid_keys))
    kv_hi = kv_lo + valid_keys
    slots = torch.arange(lk)
    if not torch.equal(k_valid, (slots >= kv_lo.unsqueeze(1)) & (slots < kv_hi.unsqueeze(1))):
        raise RuntimeError("flex backend: the valid key slots of a lattice are not contiguous (internal error)")
    # t_k <= t_q  <=>  kv_idx - q_idx <= (query_first - key_first) * b.
    diagonal = (query_first - key_first) * b if plan.is_causal else torch.full((num_lattices,), lk)

    # Block structure: CSR entries as (lattice, row in lattice, key block - key_first).
    entry_in_lattice = row_in_lattice[entry_row]
    entry_col = table.key_block - key_first[entry_lattice]
    if padded:
        full = torch.zeros_like(entry_col, dtype=torch.bool)
    else:  # the whole block allowed: its keys valid and, with causal, its last key slot on or below its first query
        full = (entry_col * b >= kv_lo[entry_lattice]) & ((entry_col + 1) * b <= kv_hi[entry_lattice])
        full &= (entry_col + 1) * b - 1 - entry_in_lattice * b <= diagonal[entry_lattice]
    partial = ~full
    shape = (num_lattices, rows_max, span_max)
    kv_num_blocks, kv_indices = _block_lists(
        entry_lattice[partial], entry_in_lattice[partial], entry_col[partial], *shape
    )
    full_lists = (None, None)
    if bool(full.any()):
        full_lists = _block_lists(entry_lattice[full], entry_in_lattice[full], entry_col[full], *shape)
    block_allowed = None
    if torch.device(device).type != "cuda":  # eager flex evaluates the mask alone: it carries the layout
        block_allowed = torch.zeros(shape, dtype=torch.bool)
        block_allowed[entry_lattice, entry_in_lattice, entry_col] = True
    keep = q_valid.reshape(-1).nonzero().squeeze(1)
    q_index = torch.where(q_valid, q_pos - plan.query_start, torch.zeros_like(q_pos))
    k_index = torch.where(k_valid, k_pos - plan.key_start, torch.zeros_like(k_pos))

    def to(t):
        return None if t is None else t.to(device)

    # Slots are < lk: int32 halves what the mask_mod loads.
    mask_parts = (*(to(t.to(torch.int32)) for t in (kv_lo, kv_hi, diagonal)), to(block_allowed))
    block_mask = flex.BlockMask.from_kv_blocks(
        to(kv_num_blocks),
        to(kv_indices),
        to(full_lists[0]),
        to(full_lists[1]),
        BLOCK_SIZE=b,
        mask_mod=_mask_mod(*mask_parts, b, None, 1),
        seq_lengths=(lq, lk),
    )
    return _FlexTable(
        heads=table.heads,
        block_size=b,
        num_lattices=num_lattices,
        query_len=lq,
        key_len=lk,
        q_index=to(q_index),
        k_index=to(k_index),
        query_heads=torch.arange(table.heads.start, table.heads.stop, device=device),
        kv_heads=kv_heads_of(table.heads, num_heads, num_kv_heads, device),
        local_heads=torch.arange(len(table.heads), device=device),
        keep_lattice=to(keep // lq),
        keep_slot=to(keep % lq),
        keep_index=to(q_index.reshape(-1)[keep]),
        mask_parts=mask_parts,
        block_mask=block_mask,
    )


class LayoutCache:
    """Flex tables of recent plans, per (plan, device, heads, key/value heads, padded), least recently used first out.

    Bounded by bytes, not by count: a ring of P chunks has up to P^2 small chunk-pair plans, while
    one plan at long sequences holds tens to hundreds of MB (the BlockMask's (S, rows, span) int32
    indices and their transpose); a count bound would either evict a ring's pairs on every call or
    let a few long plans hold GPU memory without limit. The newest entry is kept even past the
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

    def get(self, plan: CallPlan, device, num_heads: int, num_kv_heads: int, padded: bool):
        """((layer, _FlexTable), ...) of ``plan``'s tables with rows, built on the first call for this key."""
        key = (plan, torch.device(device), num_heads, num_kv_heads, bool(padded))
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry
        # Built outside inference mode: inference tensors cannot be saved for backward, and a later
        # call with gradients reuses what an inference_mode call built.
        with torch.inference_mode(False), torch.no_grad():
            entry = tuple(
                (layer, _build_table(table, plan, key[1], num_heads, num_kv_heads, padded))
                for layer, table in tables_by_layer(plan.tables)
            )
        self._entries[key] = entry
        self._nbytes[key] = sum(table.nbytes() for _, table in entry)
        while len(self._entries) > 1 and self.nbytes > self.max_bytes:
            evicted, _ = self._entries.popitem(last=False)
            del self._nbytes[evicted]
        return entry


# One plan at N = 1M (b = 64, 64K segments, dense within them) takes about 150 MB; 512 MB holds a
# few such plans or the chunk pairs of a long ring, and is small next to the activations it serves.
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


def _table_partial(q, k, v, key_padding_mask, table: _FlexTable, plan: CallPlan, batch_index, compute_dtype):
    """(query chunk index (P,), out (B, P, nh, D), lse (B, P, nh)) of one table via flex.

    Per call: three gathers into the compacted layout (S, B * nh, L, D), the padding's gather,
    flex, one gather back each for out and lse. Everything else comes from the cached ``table``.
    ``batch_index``: arange(B) on the device; ``compute_dtype``: ``_compute_dtype`` of the call.
    """
    batch, head_dim = q.shape[0], q.shape[-1]
    b = plan.block_size
    S, lq, lk, nh = table.num_lattices, table.query_len, table.key_len, len(table.heads)
    if not q.is_cuda and batch * S * nh * lq * lk > EAGER_SCORE_LIMIT:
        raise ValueError(
            f"backend='flex' off CUDA runs eager FlexAttention, which would build {batch * S * nh * lq * lk} "
            f"scores for this table (q of shape {tuple(q.shape)}, block_size={b}); use backend='torch' "
            "or a CUDA device for this size"
        )

    def compacted(x, index, heads):  # (B, n, H', D) -> (S, B * nh, L, D), one gather
        gathered = x[batch_index.view(1, batch, 1, 1), index.unsqueeze(1).unsqueeze(1), heads.view(1, 1, nh, 1)]
        return gathered.reshape(S, batch * nh, index.shape[1], head_dim).to(compute_dtype)

    query = compacted(q, table.q_index, table.query_heads)
    key = compacted(k, table.k_index, table.kv_heads)
    value = compacted(v, table.k_index, table.kv_heads)

    block_mask = table.block_mask
    if key_padding_mask is not None:
        # The padding is the call's, never the cache's: a fresh (B, S, lk) tensor that this call's
        # mask_mod closes over, so a backward run after a later call still sees this call's mask.
        block_mask = copy.copy(block_mask)
        block_mask.mask_mod = table.mask_mod(~key_padding_mask[:, table.k_index], nh)
    out, lse = _run_flex(query, key, value, block_mask, plan.scale)
    # Back to (B, P, nh, ...) at the valid query slots, one gather each.
    where = (
        table.keep_lattice.view(1, -1, 1),
        batch_index.view(batch, 1, 1),
        table.local_heads.view(1, 1, nh),
        table.keep_slot.view(1, -1, 1),
    )
    result_dtype = accumulation_dtype(q.dtype)
    out = out.reshape(S, batch, nh, lq, head_dim)[where].to(result_dtype)
    lse = lse.reshape(S, batch, nh, lq)[where].to(result_dtype)
    # Rows with no allowed key (lse -inf or nan; never +inf): out exactly 0 and lse exactly -inf
    # whatever flex wrote there.
    empty = ~torch.isfinite(lse)
    return table.keep_index, out.masked_fill(empty.unsqueeze(-1), 0.0), lse.masked_fill(empty, float("-inf"))


def partial_forward(q, k, v, key_padding_mask, plan: CallPlan):
    """Partial attention of the plan's query chunk against its key chunk (COMMON interface), via flex.

    Returns out (B, Nq, H, D) and lse (B, H, Nq) (natural log), float32 (float64 for float64 inputs);
    empty rows 0 / -inf.
    """
    _check_inputs(q, k, v, plan)
    batch, num_queries, num_heads, head_dim = q.shape
    collector = PartialCollector(batch, num_queries, num_heads, head_dim, q.device, accumulation_dtype(q.dtype))
    batch_index = torch.arange(batch, device=q.device)
    compute_dtype = _compute_dtype(q, k, v, plan.block_size)
    for layer, table in layout_cache.get(plan, q.device, num_heads, k.shape[2], key_padding_mask is not None):
        q_index, out, lse = _table_partial(q, k, v, key_padding_mask, table, plan, batch_index, compute_dtype)
        collector.add(layer, table.heads, q_index, out, lse)
    return collector.result()
