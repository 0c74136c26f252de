"""The ring (docs/semantics.md section 5): a split of the sequence into contiguous chunks gives the unsplit result.

Two ways to run it:

- ``in_process_forward``: one process splits q, k, v into chunks and computes one partial per
  (query chunk, key chunk) pair the schedule marks active, merged by the lse rule. Autograd flows
  through the backend's partials directly.
- ``distributed_forward``: every rank of a ``torch.distributed`` group holds one contiguous chunk
  of q, k, v (and of the key padding mask); key/value chunks travel around the ring with
  ``batch_isend_irecv``, double-buffered so that the next chunk's transfer overlaps the current
  partial. A custom autograd function runs a backward ring in which dk/dv accumulators travel
  with their chunks and go back to their owner at the end.

Which chunk pairs hold an allowed pair, which steps compute and how far each chunk travels is
``reference.ring_schedule`` (asked of ``reference.semantics``), identical on every rank.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from reference.config import DilationConfig, SparsePatternConfig
from reference.inputs import bnhd_view, default_scale, layout_view, validate_qkv
from reference.merge import merge_partials
from reference.ring_schedule import RingSchedule, ring_schedule, zigzag_schedule
from reference.semantics import AttentionGeometry

from .blocks import accumulation_dtype
from .dispatch import Backend, Case, Choice, choose
from .plan import CallPlan, StepPair

NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _empty_partial(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_queries, num_heads, head_dim = q.shape
    dtype = accumulation_dtype(q.dtype)
    out = torch.zeros(batch, num_queries, num_heads, head_dim, dtype=dtype, device=q.device)
    lse = torch.full((batch, num_heads, num_queries), NEG_INF, dtype=dtype, device=q.device)
    return out, lse


def _merges_on_write(backend: Backend, options, q, k, v) -> bool:
    """Whether the ring merges every pair into its query chunk's accumulator inside the backend's kernel.

    Only without autograd: the in-place accumulator records no graph (the backward rings recompute
    each pair's partial instead).
    """
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return backend.merges_on_write and options.merge_on_write and not needs_grad


def _add_pair(backend: Backend, options, merged, on_write: bool, q, k, v, key_padding_mask, plan: CallPlan):
    """``merged`` (a query chunk's running (out, lse), None before its first pair) with one more pair.

    The first pair is a plain partial (it writes every position, so nothing needs zeroing first); with
    ``on_write`` later pairs are merged into it by the backend's kernel as they are written.
    """
    if on_write and merged is not None:
        backend.forward_partial_into(merged, q, k, v, key_padding_mask, plan, options)
        return merged
    out, lse = backend.forward_partial(q, k, v, key_padding_mask, plan, options)
    return _merge_into(merged, out, lse)


def _run_steps(backend: Backend, options, q, steps, single: bool):
    """(out, lse) of q's rows from ``steps``: (pairs, k, v, mask) of every ring step that computes, in order
    (an iterable: a distributed ring's steps arrive one after another).

    The first step writes a fresh (out, lse), the later ones merge into it. ``single`` (one step
    computes, and no backward will read out): the output takes q's dtype straight away, as an
    unsplit call writes it; otherwise float32, q's dtype after the ring.
    """
    merged = None
    for pairs, k, v, mask in steps:
        if merged is None:
            out_dtype = q.dtype if single else accumulation_dtype(q.dtype)
            merged = backend.forward_step(q, k, v, mask, pairs, options, out_dtype)
        else:
            backend.forward_step_into(merged, q, k, v, mask, pairs, options)
    return merged if merged is not None else _empty_partial(q)


def _merge_into(acc, out, lse):
    """Add a partial to a running (out, lse) pair (None: nothing yet); results in lse's dtype
    (float32, or float64 for float64 inputs)."""
    out = out.to(lse.dtype)
    if acc is None:
        return out, lse
    return merge_partials(acc[0], acc[1], out, lse)


# --------------------------------------------------------------------------------------------
# In one process
# --------------------------------------------------------------------------------------------


def in_process_forward(
    backend: Backend,
    options,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask,
    geometry: AttentionGeometry,
    sparse_config: SparsePatternConfig,
    is_causal: bool,
    scale: float,
    chunks,
):
    """The ring simulated in one process: (out (B, N, H, D), lse (B, H, N)), float32 (float64 for float64 inputs).

    ``backend`` (an ``optimized.dispatch.Backend``) computes every active pair with ``options``.
    ``chunks`` are the chunk lengths (zero-length chunks allowed: they hold no pair). Query chunk
    ``i`` meets key chunks in ring order ``i, i-1, ...`` (the order rank ``i`` of a distributed
    ring merges them), skipping the pairs the schedule marks inactive.
    """
    schedule = ring_schedule(geometry, sparse_config, is_causal, chunks)
    on_write = _merges_on_write(backend, options, q, k, v)
    if backend.merges_on_write and options.merge_on_write and backend.launches_per_step(options):
        steps = _in_process_steps(geometry, sparse_config, bool(is_causal), float(scale), schedule.chunk_lengths)
        if on_write:
            return _run_steps(
                backend, options, q, [(pairs, k, v, key_padding_mask) for pairs in steps], len(steps) == 1
            )
        if backend.backward_partial is not None:
            return _InProcessRing.apply(q, k, v, key_padding_mask, (backend, options, steps))
    outs, lses = [], []
    for i in range(schedule.num_chunks):
        q0, q1 = schedule.chunk_range(i)
        if q1 == q0:
            continue
        q_chunk = q[:, q0:q1]
        merged = None
        for step in range(schedule.num_chunks):
            if not schedule.computes(i, step):
                continue
            j = schedule.chunk_at(i, step)
            k0, k1 = schedule.chunk_range(j)
            plan = CallPlan(geometry, sparse_config, bool(is_causal), float(scale), (q0, q1), (k0, k1))
            mask_chunk = None if key_padding_mask is None else key_padding_mask[:, k0:k1]
            merged = _add_pair(backend, options, merged, on_write, q_chunk, k[:, k0:k1], v[:, k0:k1], mask_chunk, plan)
        out, lse = merged if merged is not None else _empty_partial(q_chunk)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


@functools.lru_cache(maxsize=256)
def _in_process_steps(geometry, sparse_config, is_causal: bool, scale: float, chunk_lengths: tuple):
    """The StepPairs of every ring step that computes, built once per call shape (the same objects each call,
    so the kernels' table caches find them at once).

    The pairs of step s (query chunk i, key chunk i - s) write disjoint rows: one call per step, every
    chunk at its own rows of the whole q, k, v (shift 0) and of one accumulator.
    """
    schedule = ring_schedule(geometry, sparse_config, is_causal, chunk_lengths)
    plan = lambda i, j: CallPlan(  # noqa: E731
        geometry, sparse_config, is_causal, scale, schedule.chunk_range(i), schedule.chunk_range(j)
    )
    steps = (
        tuple(
            StepPair(plan(i, schedule.chunk_at(i, step)), 0, 0)
            for i in range(schedule.num_chunks)
            if schedule.computes(i, step)
        )
        for step in range(schedule.num_chunks)
    )
    return tuple(pairs for pairs in steps if pairs)


class _InProcessRing(torch.autograd.Function):
    """The in-process ring's steps as one autograd node, for a backend that merges on write.

    The forward runs the steps without autograd (no partial is kept); the backward gives every
    active pair's gradients from the merged out and lse: all at once where the backend can
    (``backward_steps``: a launch per step, as the forward), else pair by pair (``_add_pair_gradients``).
    """

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, ring):
        backend, options, steps = ring
        # One step: out in q's dtype, as the unsplit triton call saves it for its backward.
        single = len(steps) == 1
        out, lse = _run_steps(backend, options, q, [(pairs, k, v, key_padding_mask) for pairs in steps], single)
        ctx.ring, ctx.key_padding_mask = ring, key_padding_mask
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        backend, options, steps = ctx.ring
        if backend.backward_steps is not None:
            grads = backend.backward_steps(q, k, v, ctx.key_padding_mask, steps, options, out, lse, grad_out, grad_lse)
            return *(g if need else None for g, need in zip(grads, ctx.needs_input_grad)), None, None
        merged = (out, lse, grad_out, grad_lse)
        # Per chunk: its first pair's gradient as the backend returns it, float32 sums from its second pair on
        # (a chunk that one pair reaches, as every chunk of a ring without crossings, costs no extra pass).
        sums = [{} if need else None for need in ctx.needs_input_grad[:3]]
        for pairs in steps:
            for pair in pairs:
                rows = slice(*pair.plan.query_range), slice(*pair.plan.key_range)
                _add_pair_gradients(backend, options, pair.plan, q, k, v, ctx.key_padding_mask, merged, sums, *rows)
        return *(_assemble(chunks, t) for chunks, t in zip(sums, (q, k, v))), None, None


def _assemble(chunks: dict | None, like: torch.Tensor, dtype=None):
    """A gradient shaped like ``like`` (in ``dtype``, default like's) from per-chunk sums ({(start, stop):
    tensor} of rows on dim 1; rows of no chunk: 0)."""
    if chunks is None:
        return None
    dtype = dtype or like.dtype
    if list(chunks) == [(0, like.shape[1])]:
        return chunks[0, like.shape[1]].to(dtype)
    grad = torch.zeros_like(like, dtype=dtype)
    for (start, stop), part in chunks.items():
        grad[:, start:stop] = part
    return grad


def _add_pair_gradients(backend: Backend, options, plan, q, k, v, mask, merged, sums, q_rows, k_rows) -> None:
    """Add one chunk pair's gradients to ``sums`` ([dq, dk, dv]: per-chunk sums {(start, stop): tensor}
    of q's, k's and v's rows; None: not needed).

    ``merged`` is (out, lse, grad_out, grad_lse) of the merged result. A pair's score s gets
    P (dout . v - rowsum(dout * out) + grad_lse) with P = exp(s - lse), out and lse the merged ones
    (docs/semantics.md section 5): the backend's backward of one partial, handed the merged out
    and lse, computes exactly that (FlashAttention-2's backward over key blocks), so no partial is
    recomputed and no merge is differentiated. ``q_rows`` / ``k_rows`` are the pair's rows of q / k.
    """
    out, lse, grad_out, grad_lse = merged
    parts = backend.backward_partial(
        q[:, q_rows],
        k[:, k_rows],
        v[:, k_rows],
        None if mask is None else mask[:, k_rows],
        plan,
        options,
        out[:, q_rows],
        lse[:, :, q_rows],
        None if grad_out is None else grad_out[:, q_rows],
        None if grad_lse is None else grad_lse[:, :, q_rows],
    )
    for chunks, part, rows in zip(sums, parts, (q_rows, k_rows, k_rows)):
        if chunks is None:
            continue
        key = (rows.start, rows.stop)
        if key not in chunks:
            chunks[key] = part
        else:
            chunks[key] = chunks[key].to(accumulation_dtype(part.dtype)) + part


# --------------------------------------------------------------------------------------------
# Over a process group
# --------------------------------------------------------------------------------------------


@dataclass
class RingStats:
    """What the last distributed call of a module did on this rank (a counter, hence mutable).

    ``*_bytes[s]`` is the number of bytes this rank sent to deliver step ``s`` (index 0 is always 0;
    summed over ranks it equals ``schedule.step_bytes``). ``backward_bytes`` has one more entry:
    the final return of every dk/dv accumulator to its owner. Filled in by the backward ring
    when ``backward()`` runs.
    """

    rank: int
    world_size: int
    chunk_lengths: tuple[int, ...]
    schedule: RingSchedule
    forward_bytes: list[int] = field(default_factory=list)
    computed_steps: list[int] = field(default_factory=list)
    weights_bytes: list[int] = field(default_factory=list)
    backward_bytes: list[int] = field(default_factory=list)


@dataclass
class _RingCall:
    """Everything a ring pass needs besides the tensors; built once per call."""

    dist: object  # torch.distributed
    group: object
    rank: int
    peers: tuple[int, ...]  # global rank of every group rank (P2POp wants global ranks)
    schedule: RingSchedule
    backend: Backend
    options: object  # the backend's options type
    geometry: AttentionGeometry
    sparse_config: SparsePatternConfig
    is_causal: bool
    scale: float
    stats: RingStats

    @property
    def world_size(self) -> int:
        return self.schedule.num_chunks

    @property
    def next_peer(self) -> int:
        return self.peers[(self.rank + 1) % self.world_size]

    @property
    def previous_peer(self) -> int:
        return self.peers[(self.rank - 1) % self.world_size]

    def plan(self, query_range: tuple[int, int], key_range: tuple[int, int]) -> CallPlan:
        """The plan of one (query piece, key piece) pair, global ranges."""
        return CallPlan(self.geometry, self.sparse_config, self.is_causal, self.scale, query_range, key_range)

    def post(self, sends, receives):
        """Start sends to the next rank and receives from the previous one; returns the works."""
        P2POp = self.dist.P2POp
        ops = [P2POp(self.dist.isend, t, self.next_peer, self.group) for t in sends]
        ops += [P2POp(self.dist.irecv, t, self.previous_peer, self.group) for t in receives]
        return self.dist.batch_isend_irecv(ops) if ops else []


def _wait(works, call: _RingCall, what: str) -> None:
    """Wait for transfers; a peer that raised, died or hangs surfaces here as the group's timeout."""
    try:
        for work in works:
            work.wait()
    except RuntimeError as error:
        raise RuntimeError(
            f"ring: rank {call.rank} of {call.world_size} failed waiting for {what} (a peer raised, died or "
            f"timed out; the process group's timeout bounds the wait): {error}"
        ) from error


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _chunk_buffers(like, length: int):
    """Receive buffers shaped like ``like`` (tensors or None) with ``length`` tokens on dim 1."""
    return [None if t is None else t.new_empty((t.shape[0], length, *t.shape[2:])) for t in like]


def _travel(call: _RingCall, payload, step_bytes: list, every_step: bool = False):
    """Carry ``payload`` (this rank's chunk: tensors with tokens on dim 1, or None) around the ring.

    Yields ``(step, chunk, tensors)``: at step s the rank holds key chunk (rank - s) mod P; steps
    where the schedule says it computes are yielded (every step with ``every_step``; the tensors
    are None at a step the rank received nothing for). The transfer for step s + 1 is started
    before step s is yielded and waited after the caller's work on it (double buffering). Bytes
    sent to deliver step s are added to ``step_bytes[s]``.
    """
    schedule, rank, num_chunks = call.schedule, call.rank, call.schedule.num_chunks
    held = list(payload)
    for step in range(num_chunks):
        works, incoming = [], None
        if step + 1 < num_chunks:
            sends = [t for t in held if t is not None] if schedule.sends(rank, step + 1) else []
            if schedule.receives(rank, step + 1):
                incoming = _chunk_buffers(payload, schedule.chunk_lengths[schedule.chunk_at(rank, step + 1)])
            works = call.post(sends, [t for t in incoming or [] if t is not None])
            step_bytes[step + 1] += _nbytes(sends)
        if every_step or schedule.computes(rank, step):
            yield step, schedule.chunk_at(rank, step), held
        _wait(works, call, f"the key/value chunk of step {step + 1}")
        held = incoming


def _as_bool(mask):
    return None if mask is None else mask.to(torch.bool)


def _ring_forward(call: _RingCall, q, k, v, mask_bytes):
    """Forward ring of this rank: merged (out float32, lse float32) of its query rows."""
    on_write = _merges_on_write(call.backend, call.options, q, k, v)
    call.stats.computed_steps = []
    call.stats.forward_bytes = [0] * call.world_size
    arrivals = _travel(call, (k, v, mask_bytes), call.stats.forward_bytes)
    if on_write and call.backend.launches_per_step(call.options):

        def steps():
            for step, chunk, (k_chunk, v_chunk, mask_chunk) in arrivals:
                call.stats.computed_steps.append(step)
                yield _step_pairs(call, chunk), k_chunk, v_chunk, _as_bool(mask_chunk)

        computing = sum(call.schedule.computes(call.rank, step) for step in range(call.world_size))
        # Grad mode is off inside the autograd function's forward, but a backward that reads out may follow.
        single = computing == 1 and not any(t.requires_grad for t in (q, k, v))
        return _run_steps(call.backend, call.options, q, steps(), single)
    merged = [None] * len(call.schedule.pieces[call.rank])  # one running (out, lse) per query piece
    for step, chunk, (k_chunk, v_chunk, mask_chunk) in arrivals:
        _add_step(call, merged, on_write, chunk, q, k_chunk, v_chunk, _as_bool(mask_chunk))
        call.stats.computed_steps.append(step)
    return _concatenate_pieces(call, q, merged)


def _step_pairs(call: _RingCall, chunk: int) -> tuple[StepPair, ...]:
    """This rank's active piece pairs against key chunk ``chunk``, placed at their rows of q and of the chunk."""
    schedule, rank = call.schedule, call.rank
    return tuple(
        StepPair(
            call.plan(schedule.pieces[rank][a], schedule.pieces[chunk][b]),
            schedule.pieces[rank][a][0] - schedule.local_piece_range(rank, a)[0],
            schedule.pieces[chunk][b][0] - schedule.local_piece_range(chunk, b)[0],
        )
        for a, b in schedule.piece_pairs[rank][chunk]
    )


def _local_rows(schedule: RingSchedule, chunk: int, piece: int) -> slice:
    return slice(*schedule.local_piece_range(chunk, piece))


def _add_step(call: _RingCall, merged: list, on_write: bool, chunk: int, q, k_chunk, v_chunk, mask_chunk) -> None:
    """Add this rank's active piece pairs against key chunk ``chunk`` to ``merged`` (per query piece)."""
    schedule, rank = call.schedule, call.rank
    for a, b in schedule.piece_pairs[rank][chunk]:
        rows = _local_rows(schedule, chunk, b)
        merged[a] = _add_pair(
            call.backend,
            call.options,
            merged[a],
            on_write,
            q[:, _local_rows(schedule, rank, a)],
            k_chunk[:, rows],
            v_chunk[:, rows],
            None if mask_chunk is None else mask_chunk[:, rows],
            call.plan(schedule.pieces[rank][a], schedule.pieces[chunk][b]),
        )


def _concatenate_pieces(call: _RingCall, q, merged):
    """(out, lse) of all of q's rows from its pieces' (None: no pair reached the piece: empty)."""
    local = [_local_rows(call.schedule, call.rank, a) for a in range(len(merged))]
    filled = [m if m is not None else _empty_partial(q[:, rows]) for rows, m in zip(local, merged)]
    if len(filled) == 1:
        return filled[0]
    return torch.cat([out for out, _ in filled], dim=1), torch.cat([lse for _, lse in filled], dim=2)


def _step_partial(call: _RingCall, chunk: int, q, k_chunk, v_chunk, mask_chunk):
    """(out, lse) of this rank's query rows against key chunk ``chunk``: its active piece pairs merged
    (out-of-place, so autograd sees every partial)."""
    merged = [None] * len(call.schedule.pieces[call.rank])
    _add_step(call, merged, False, chunk, q, k_chunk, v_chunk, mask_chunk)
    return _concatenate_pieces(call, q, merged)


def _pair_gradients(call: _RingCall, chunk, q, k_chunk, v_chunk, mask_chunk, out, lse, grad_out, grad_lse, needs):
    """Gradients (dq, dk, dv; None where not needed) of one partial's share of the merged result.

    With w = exp(lse_j - lse): the merged out receives w * out_j and the merged lse
    logsumexp(lse_j), so the partial gets grad_out_j = w * grad_out and
    grad_lse_j = w * (grad_lse + <grad_out, out_j - out>); the partial is recomputed with autograd.
    """
    leaves = [t.detach().requires_grad_(need) for t, need in zip((q, k_chunk, v_chunk), needs)]
    with torch.enable_grad():
        out_j, lse_j = _step_partial(call, chunk, *leaves, _as_bool(mask_chunk))
    lse_j_value = lse_j.detach()
    weight = torch.where(torch.isneginf(lse_j_value), torch.zeros_like(lse_j_value), torch.exp(lse_j_value - lse))
    grad_out_j = weight.transpose(1, 2).unsqueeze(-1) * grad_out
    spread = ((out_j.detach().to(out.dtype) - out) * grad_out).sum(-1).transpose(1, 2)  # (B, H, Nq)
    grad_lse_j = weight * (grad_lse + spread)
    outputs, grads = [], []
    for tensor, grad in ((out_j, grad_out_j), (lse_j, grad_lse_j)):
        if tensor.requires_grad:
            outputs.append(tensor)
            grads.append(grad.to(tensor.dtype))
    if not outputs:
        raise RuntimeError(
            f"backend {call.backend.name!r} returned partials without autograd history, so the ring cannot "
            f"compute gradients through it; use backend='torch' (or another differentiable backend) for training"
        )
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    computed = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True))
    results = []
    for leaf in leaves:
        grad = next(computed) if leaf.requires_grad else None
        if leaf.requires_grad and grad is None:
            grad = torch.zeros_like(leaf)
        results.append(None if grad is None else grad.to(out.dtype))
    return results


def _step_gradients(call: _RingCall, chunk, q, k_chunk, v_chunk, mask_chunk, out, lse, grad_out, grad_lse, needs):
    """(dq, dk, dv; None where not needed) of this rank's piece pairs against key chunk ``chunk``, from the
    merged out and lse (``_add_pair_gradients``), in out's dtype (float32)."""
    schedule, rank = call.schedule, call.rank
    sums = [{} if need else None for need in needs]
    merged = (out, lse, grad_out, grad_lse)
    for a, b in schedule.piece_pairs[rank][chunk]:
        plan = call.plan(schedule.pieces[rank][a], schedule.pieces[chunk][b])
        q_rows, k_rows = _local_rows(schedule, rank, a), _local_rows(schedule, chunk, b)
        _add_pair_gradients(
            call.backend, call.options, plan, q, k_chunk, v_chunk, _as_bool(mask_chunk), merged, sums, q_rows, k_rows
        )
    return [_assemble(chunks, t, out.dtype) for chunks, t in zip(sums, (q, k_chunk, v_chunk))]


def _add(total, part):
    if part is None:
        return total
    return part if total is None else total + part


def _ring_backward(call: _RingCall, q, k, v, mask_bytes, out, lse, grad_out, grad_lse, needs):
    """Backward ring: (dq, dk, dv) of this rank's chunks (None where not needed).

    k/v travel exactly as in the forward (prefetched one step ahead). The dk/dv accumulator of
    chunk c travels behind it: the rank holding c at step s adds its contribution to what it
    received from rank - 1 and passes the sum on; after the chunk's last step the accumulator
    goes straight back to rank c in one final exchange. Accumulators are in out's dtype (float32, or
    float64 for float64 inputs).
    """
    schedule, rank, P = call.schedule, call.rank, call.schedule.num_chunks
    needs_kv = needs[1] or needs[2]
    backend, options = call.backend, call.options
    from_merged = (
        backend.merges_on_write
        and options.merge_on_write
        and backend.launches_per_step(options)
        and backend.backward_partial is not None
    )
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out.to(out.dtype)
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
    stats_bytes = call.stats.backward_bytes = [0] * (P + 1)
    last_steps = schedule.chunk_last_step

    def zeros_kv(length):
        return [t.new_zeros((t.shape[0], length, *t.shape[2:]), dtype=out.dtype) for t in (k, v)]

    dq = None
    acc_works, acc_incoming = [], None  # accumulator in flight for the chunk held at the next step
    finished = {}  # chunk -> [dk, dv] accumulators whose chunk ended its journey here
    for step, chunk, held in _travel(call, (k, v, mask_bytes), stats_bytes, every_step=True):
        part = [None, None]
        if schedule.computes(rank, step):
            k_chunk, v_chunk, mask_chunk = held
            gradients = _step_gradients if from_merged else _pair_gradients
            dq_part, dk_part, dv_part = gradients(
                call, chunk, q, k_chunk, v_chunk, mask_chunk, out, lse, grad_out, grad_lse, needs
            )
            dq = _add(dq, dq_part)
            part = [dk_part, dv_part]
        if needs_kv and (step == 0 or schedule.receives(rank, step)):
            # This chunk's accumulator: what rank - 1 passed on (none at step 0), plus our part.
            _wait(acc_works, call, f"the dk/dv accumulator of backward step {step}")
            acc = acc_incoming if step > 0 else zeros_kv(schedule.chunk_lengths[chunk])
            acc = [a if p is None else a + p for a, p in zip(acc, part)]
            acc_works, acc_incoming = [], None
            sends = acc if step + 1 < P and schedule.sends(rank, step + 1) else []
            if step + 1 < P and schedule.receives(rank, step + 1):
                acc_incoming = zeros_kv(schedule.chunk_lengths[schedule.chunk_at(rank, step + 1)])
            acc_works = call.post(sends, acc_incoming or [])
            stats_bytes[step + 1 if step + 1 < P else P] += _nbytes(sends)
            if step == last_steps[chunk]:
                finished[chunk] = acc
    _wait(acc_works, call, "the last dk/dv accumulator transfer")

    dk = dv = None
    if needs_kv:
        # Every accumulator returns to its owner: chunk c ends at rank c + last_steps[c].
        dist, group = call.dist, call.group
        ops, own = [], finished.get(rank)
        for chunk, acc in finished.items():
            if chunk != rank:
                ops += [dist.P2POp(dist.isend, t, call.peers[chunk], group) for t in acc]
                stats_bytes[P] += _nbytes(acc)
        if last_steps[rank] > 0:
            own = zeros_kv(schedule.chunk_lengths[rank])
            source = call.peers[(rank + last_steps[rank]) % P]
            ops += [dist.P2POp(dist.irecv, t, source, group) for t in own]
        _wait(dist.batch_isend_irecv(ops) if ops else [], call, "the return of the dk/dv accumulators")
        dk, dv = own
    if dq is None and needs[0]:
        dq = torch.zeros_like(q, dtype=out.dtype)
    return (
        None if not needs[0] else dq.to(q.dtype),
        None if not needs[1] else dk.to(k.dtype),
        None if not needs[2] else dv.to(v.dtype),
    )


class _RingAttention(torch.autograd.Function):
    """The distributed ring as one autograd node: forward ring, backward ring."""

    @staticmethod
    def forward(ctx, q, k, v, mask_bytes, call: _RingCall):
        out, lse = _ring_forward(call, q, k, v, mask_bytes)
        ctx.call = call
        ctx.save_for_backward(q, k, v, mask_bytes, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, mask_bytes, out, lse = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        dq, dk, dv = _ring_backward(ctx.call, q, k, v, mask_bytes, out, lse, grad_out, grad_lse, needs)
        return dq, dk, dv, None, None


def _ring_weights(call: _RingCall, q, k, mask_bytes, lse):
    """Sparse weights of this rank's query rows: a second ring pass of k (and the mask) with the final lse."""
    pieces = []
    ranges = call.schedule.chunk_range  # contiguous rings only (distributed_forward refuses zigzag weights)
    weights = lambda k_chunk, mask_chunk, chunk: call.backend.sparse_weights(  # noqa: E731
        q, k_chunk, _as_bool(mask_chunk), lse, call.plan(ranges(call.rank), ranges(chunk)), call.options
    )
    call.stats.weights_bytes = [0] * call.world_size
    for _, chunk, (k_chunk, mask_chunk) in _travel(call, (k, mask_bytes), call.stats.weights_bytes):
        pieces.append(weights(k_chunk, mask_chunk, chunk))
    if not pieces:  # no active pair: an empty result of the right structure
        pieces.append(weights(k, mask_bytes, call.rank))
    return _concatenate_weights(pieces)


def _concatenate_weights(pieces):
    """One weights object holding the blocks of every piece (the pieces share shape and block size)."""
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    merged = {}
    for key in first:
        values = [piece[key] for piece in pieces]
        if isinstance(values[0], torch.Tensor):
            merged[key] = torch.cat(values, dim=1 if key == "block_values" else 0)
        else:
            merged[key] = values[0]
    return type(first)(merged)


# --------------------------------------------------------------------------------------------
# Agreement between ranks
# --------------------------------------------------------------------------------------------


def _fingerprint(description: tuple) -> int:
    """A 63-bit hash of everything the ranks must agree on."""
    digest = hashlib.sha256(repr(description).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


INVALID_FINGERPRINT = -1  # sent by a rank whose own inputs failed validation


def _exchange_layout(call_dist, group, device, fingerprint: int, local_len: int, description, world_size: int):
    """All-gather (fingerprint, local length) once; raise ValueError on every rank if they differ."""
    mine = torch.tensor([fingerprint, local_len], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    call_dist.all_gather(gathered, mine, group=group)
    rows = [tuple(int(x) for x in t.tolist()) for t in gathered]
    invalid = [r for r, (fp, _) in enumerate(rows) if fp == INVALID_FINGERPRINT]
    if invalid:
        raise ValueError(f"ring: rank(s) {invalid} rejected their inputs (see their error); no rank runs this call")
    fingerprints = [fp for fp, _ in rows]
    if len(set(fingerprints)) != 1:
        groups = {}
        for r, fp in enumerate(fingerprints):
            groups.setdefault(fp, []).append(r)
        raise ValueError(
            "ring: the ranks of process_group do not hold the same configuration and compatible shapes "
            f"(ranks grouped by fingerprint: {sorted(groups.values())}); every rank must pass the same "
            "segment_lengths, dilation_rates, sparse_config, head_mode, backend, B, H, H_kv, D, dtype, "
            f"is_causal, scale, key_padding_mask presence and return flags. This rank has: {description}"
        )
    return tuple(length for _, length in rows)


def _communication_device(call_dist, group, tensor_device):
    # NCCL moves CUDA tensors only; gloo handles CPU tensors everywhere.
    return tensor_device if str(call_dist.get_backend(group)) == "nccl" else torch.device("cpu")


@dataclass(frozen=True)
class RingRequest:
    """What the distributed ring needs of the caller besides the tensors (the module builds it per call).

    ``backend``: the requested name (``"auto"`` is resolved on every rank after validation);
    ``options``: backend name -> that backend's options; ``layout``: the inputs' axis order.
    ``chunk_lengths_cache``: a dict the caller keeps between calls, so that the all-gather of the
    ranks' chunk lengths runs once per configuration and shape.
    """

    group: object
    dilation: DilationConfig
    sparse_config: SparsePatternConfig
    backend: str
    options: dict
    layout: str = "bnhd"
    chunk_lengths_cache: dict = field(default_factory=dict, compare=False)
    ring_layout: str = "contiguous"  # or "zigzag": each rank holds two pieces (reference.zigzag_pieces)


@dataclass(frozen=True)
class RingResult:
    """What one distributed call returns: the results as ``forward`` returns them, the choice and the stats."""

    results: tuple
    choice: Choice
    stats: RingStats


def distributed_forward(
    request: RingRequest, q, k, v, is_causal, key_padding_mask, return_attention_weights, return_lse, scale
) -> RingResult:
    """Forward over ``request.group``: this rank's rows.

    Each rank passes its own contiguous chunk of q, k, v (in ``request.layout``, N_r tokens) and of
    the key padding mask (B, N_r); chunk r holds global positions [sum(N_<r), sum(N_<=r)) in rank
    order, and the N_r may differ (each rank must hold at least one token). With
    ``request.ring_layout == "zigzag"`` rank r passes instead the rows of its two ranges of
    ``reference.zigzag_pieces(N, P)``, the first range's rows then the second's. ``results`` holds out
    for this rank's rows (in the caller's layout); lse (B, H, N_r); weights: a
    ``SparseAttentionWeights`` in GLOBAL coordinates (shape (B, H, N, N), global query/key
    positions) holding only this rank's query rows, so the ranks' ``to_dense()`` results add up to
    the whole matrix. ``stats`` records the bytes sent (the backward ring fills its part later).
    """
    group = request.group
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group is set but torch.distributed is not initialized (call init_process_group)")
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    device = _communication_device(dist, group, q.device if isinstance(q, torch.Tensor) else torch.device("cpu"))

    # Validate locally, but still take part in the exchange so that every rank raises, none hangs.
    try:
        if isinstance(q, torch.Tensor) and q.dim() == 4 and bnhd_view(q, request.layout).shape[1] == 0:
            raise ValueError(f"q: every rank of the ring must hold at least one token, got q of shape {tuple(q.shape)}")
        validate_qkv(q, k, v, key_padding_mask, scale, layout=request.layout)
        q, k, v = (bnhd_view(t, request.layout) for t in (q, k, v))
        choice = choose(request.backend, Case.of_call(q, k, v, request.sparse_config.block_size))
    except (TypeError, ValueError) as error:
        try:
            _exchange_layout(dist, group, device, INVALID_FINGERPRINT, 0, "invalid inputs", world_size)
        except ValueError:
            pass  # the others now raise too; this rank raises its own, more precise error
        raise error
    scale = default_scale(q.shape[3], scale)
    batch, local_len, num_heads, head_dim = q.shape
    grad_wanted = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    description = (
        ("dilation", request.dilation),
        ("sparse_config", request.sparse_config),
        ("backend", choice.name),
        ("B", batch),
        ("H", num_heads),
        ("H_kv", k.shape[2]),
        ("D", head_dim),
        ("dtype", str(q.dtype)),
        ("is_causal", bool(is_causal)),
        ("scale", float(scale)),
        ("key_padding_mask", key_padding_mask is not None),
        ("return_attention_weights", bool(return_attention_weights)),
        ("return_lse", bool(return_lse)),
        ("requires_grad", grad_wanted),
        ("world_size", world_size),
        ("ring_layout", request.ring_layout),
    )
    cache = request.chunk_lengths_cache
    key = (description, local_len)
    if key not in cache:
        cache[key] = _exchange_layout(
            dist, group, device, _fingerprint(description), local_len, description, world_size
        )
    chunk_lengths = cache[key]

    geometry = AttentionGeometry(request.dilation, sum(chunk_lengths), num_heads)
    if request.ring_layout == "zigzag":
        schedule = zigzag_schedule(geometry, request.sparse_config, bool(is_causal), world_size)
        if schedule.chunk_lengths != chunk_lengths:
            # Every rank knows every length, so every rank raises the same error (none waits on another).
            raise ValueError(
                f"ring_layout='zigzag': rank r must hold the rows of reference.zigzag_pieces(N={sum(chunk_lengths)}, "
                f"P={world_size})[r], i.e. {schedule.chunk_lengths} tokens per rank, got {chunk_lengths}"
            )
    else:
        schedule = ring_schedule(geometry, request.sparse_config, bool(is_causal), chunk_lengths)
    if group is None or group is dist.group.WORLD:
        peers = tuple(range(world_size))
    else:
        peers = tuple(dist.get_global_rank(group, r) for r in range(world_size))
    stats = RingStats(rank=rank, world_size=world_size, chunk_lengths=chunk_lengths, schedule=schedule)
    call = _RingCall(
        dist=dist,
        group=group,
        rank=rank,
        peers=peers,
        schedule=schedule,
        backend=choice.backend,
        options=request.options[choice.name],
        geometry=geometry,
        sparse_config=request.sparse_config,
        is_causal=bool(is_causal),
        scale=float(scale),
        stats=stats,
    )
    # The mask travels as bytes: not every backend of torch.distributed moves bool tensors.
    mask_bytes = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    out, lse = _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), mask_bytes, call)
    results = (layout_view(out.to(q.dtype), request.layout),)
    if return_attention_weights:
        results += (_ring_weights(call, q.detach().contiguous(), k.detach().contiguous(), mask_bytes, lse.detach()),)
    if return_lse:
        results += (lse,)
    return RingResult(results, choice, stats)
