"""optimized/ring.py: the distributed ring's plumbing without a process group, and the in-process ring of triton.

tests/test_distributed.py runs the ring over gloo processes, where a wrong peer, a lost error or a
fingerprint that does not fit an int64 shows only as a hang or a crash, and tests/test_ring.py runs
the in-process ring with the torch backend, which never merges on write; ``make mutation``
(experiments/mutation.py) found these unpinned. Pinned here, with stand-ins for torch.distributed's
calls: the next and previous peers of every rank; a failed wait names the rank and what it waited
for and keeps the cause; the all-gathered layout returns every rank's length, names the ranks that
rejected their inputs, and groups the ranks by fingerprint when they disagree; a fingerprint is a
non-negative int64 that a rejected rank's marker never equals; the communication device follows
the group's backend; receive buffers take their template's shape with the chunk's length. And,
against the float64 reference within docs/numerics.md's budget: the in-process ring of a backend
that merges every chunk pair into its accumulator on write (triton in the interpreter), with a
step's pairs in one launch or pair by pair, and its gradients through the ring's one autograd node;
merging on write happens exactly when the backend can and no input needs a gradient; the backward
pair by pair of a backend without backward_steps; and the distributed backward ring on a group of
one rank (no transfer), which returns exactly the gradients asked for.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pytest
import torch

from optimized import ring
from reference import AttentionGeometry, DilationConfig, SparsePatternConfig
from reference.ring_schedule import ring_schedule


def ring_call(rank, peers):
    geometry = AttentionGeometry(DilationConfig((4,), (1,)), 4 * len(peers), 1)
    config = SparsePatternConfig(pattern_type="dense", block_size=2)
    schedule = ring_schedule(geometry, config, False, (4,) * len(peers))
    return ring._RingCall(
        dist=None,
        group=None,
        rank=rank,
        peers=tuple(peers),
        schedule=schedule,
        backend=None,
        options=None,
        geometry=geometry,
        sparse_config=None,
        is_causal=False,
        scale=1.0,
        stats=None,
    )


def test_peers_are_the_neighbours_in_group_order():
    peers = (10, 11, 12, 13)
    for rank in range(4):
        call = ring_call(rank, peers)
        assert call.world_size == 4
        assert call.next_peer == peers[(rank + 1) % 4]
        assert call.previous_peer == peers[(rank - 1) % 4]


class Work:
    def __init__(self, error=None):
        self.error, self.waited = error, False

    def wait(self):
        self.waited = True
        if self.error is not None:
            raise self.error


def test_wait_waits_for_every_work_and_names_the_rank_of_a_failure():
    call = SimpleNamespace(rank=1, world_size=3)
    works = [Work(), Work(), Work()]
    ring._wait(works, call, "the chunk")
    assert all(work.waited for work in works)
    cause = RuntimeError("connection closed by peer")
    with pytest.raises(RuntimeError, match=r"^ring: rank 1 of 3 failed waiting for the chunk \(a peer") as raised:
        ring._wait([Work(), Work(cause)], call, "the chunk")
    assert raised.value.__cause__ is cause and "connection closed by peer" in str(raised.value)


class Gathers:
    """torch.distributed's all_gather with what every rank sent given in advance."""

    def __init__(self, rows):
        self.rows = rows

    def all_gather(self, gathered, mine, group=None):
        assert len(gathered) == len(self.rows) and mine.dtype == torch.int64 and mine.shape == (2,)
        for out, row in zip(gathered, self.rows):
            out.copy_(torch.tensor(row, dtype=torch.int64))


def exchange(rows, rank=0):
    fingerprint, length = rows[rank]
    return ring._exchange_layout(Gathers(rows), None, "cpu", fingerprint, length, ("my", "description"), len(rows))


def test_layout_exchange_returns_every_ranks_length():
    fingerprint = ring._fingerprint(("same",))
    assert exchange([(fingerprint, 5), (fingerprint, 0), (fingerprint, 7)], rank=1) == (5, 0, 7)
    assert exchange([(fingerprint, 3)]) == (3,)


def test_layout_exchange_names_the_ranks_that_rejected_their_inputs():
    fingerprint = ring._fingerprint(("same",))
    rows = [(fingerprint, 4), (ring.INVALID_FINGERPRINT, 4), (ring.INVALID_FINGERPRINT, 4), (fingerprint, 4)]
    with pytest.raises(ValueError, match=r"^ring: rank\(s\) \[1, 2\] rejected their inputs"):
        exchange(rows)
    rows[0] = (ring.INVALID_FINGERPRINT, 4)  # rank 0 as well
    with pytest.raises(ValueError, match=r"^ring: rank\(s\) \[0, 1, 2\] rejected their inputs"):
        exchange(rows, rank=3)


def test_layout_exchange_groups_disagreeing_ranks_by_fingerprint():
    a, b = ring._fingerprint(("a",)), ring._fingerprint(("b",))
    rows = [(a, 4), (b, 4), (a, 4), (b, 4), (b, 4)]
    with pytest.raises(ValueError, match=r"grouped by fingerprint: \[\[0, 2\], \[1, 3, 4\]\]\).*This rank has: "):
        exchange(rows)
    with pytest.raises(ValueError, match=r"\('my', 'description'\)$"):
        exchange([(b, 4), (a, 4)])


@pytest.mark.parametrize("description", [(), ("a",), ("segment_lengths", (8, 16), 2, torch.float32), (1, 2.5, None)])
def test_fingerprint_is_the_first_63_bits_of_the_description_hash(description):
    fingerprint = ring._fingerprint(description)
    digest = hashlib.sha256(repr(description).encode()).digest()
    assert 0 <= fingerprint < 2**63 and fingerprint != ring.INVALID_FINGERPRINT
    assert fingerprint == int.from_bytes(digest[:8], "little") >> 1
    torch.tensor([fingerprint, 1], dtype=torch.int64)  # what the exchange sends: fits an int64
    assert fingerprint == ring._fingerprint(tuple(description))  # the same description, the same fingerprint


@pytest.mark.parametrize("backend, expected", [("nccl", "meta"), ("gloo", "cpu"), ("mpi", "cpu")])
def test_communication_device_follows_the_groups_backend(backend, expected):
    dist = SimpleNamespace(get_backend=lambda group: backend)
    assert ring._communication_device(dist, None, torch.device("meta")) == torch.device(expected)


def test_chunk_buffers_take_the_templates_shape_with_the_chunks_length():
    k = torch.randn(2, 5, 3, 4)
    mask = torch.rand(2, 5) < 0.5
    buffers = ring._chunk_buffers((k, None, mask), 7)
    assert buffers[1] is None
    assert buffers[0].shape == (2, 7, 3, 4) and buffers[0].dtype == k.dtype
    assert buffers[2].shape == (2, 7) and buffers[2].dtype == torch.bool
    assert ring._nbytes([k, mask]) == k.numel() * 4 + mask.numel()


# --------------------------------------------------------------------------------------------
# The in-process ring of a backend that merges on write (triton, in the interpreter off CUDA)
# --------------------------------------------------------------------------------------------

TRITON_CASE_KWARGS = dict(
    dilation=DilationConfig((16, 32), (1, 2), "all"),
    sparse_config=SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=32),
)


def triton_case(is_causal, padded, seed):
    from equivalence_tests import strategies as s

    shape = s.Shape(batch=2, seq_len=48, num_heads=2, num_kv_heads=1, head_dim=16)
    mask = None
    if padded:
        mask = torch.rand(2, 48, generator=torch.Generator().manual_seed(seed)) < 0.25
    return s.AttentionCase(shape, **TRITON_CASE_KWARGS, is_causal=is_causal, key_padding_mask=mask, input_seed=seed)


def test_merge_on_write_needs_a_backend_that_merges_and_no_gradient():
    pytest.importorskip("triton")
    from optimized.dispatch import REGISTRY, TritonOptions

    q, k, v = (torch.randn(1, 8, 2, 4) for _ in range(3))
    triton, merging = REGISTRY["triton"], TritonOptions()
    assert ring._merges_on_write(triton, merging, q, k, v)  # grad mode on, nothing requires grad
    assert not ring._merges_on_write(triton, TritonOptions(merge_on_write=False), q, k, v)
    assert not ring._merges_on_write(REGISTRY["torch"], merging, q, k, v)
    for leaf in range(3):
        inputs = [t.clone().requires_grad_(i == leaf) for i, t in enumerate((q, k, v))]
        assert not ring._merges_on_write(triton, merging, *inputs)
        with torch.no_grad():
            assert ring._merges_on_write(triton, merging, *inputs)


@pytest.mark.parametrize(
    "chunks, is_causal, padded, ring_launch",
    [((20, 12, 16), True, True, "step"), ((5, 0, 43), False, True, "pair"), ((48,), True, False, "step")],
)
def test_triton_in_process_ring_merges_on_write_within_budget(chunks, is_causal, padded, ring_launch):
    """Every chunk pair merged into its query chunk's accumulator by the kernel, a step's pairs in one
    launch or pair by pair; one chunk: one step, written in q's dtype."""
    pytest.importorskip("triton")
    from equivalence_tests.helpers import check_backend
    from optimized.dispatch import TritonOptions

    options = {"backend_options": (TritonOptions(ring_launch=ring_launch),)}
    case = triton_case(is_causal, padded, seed=sum(chunks) + len(chunks))
    check_backend(case, "triton", torch.float32, "cpu", ring_chunk_lengths=chunks, module_options=options)


@pytest.mark.parametrize("chunks, padded", [((20, 12, 16), True), ((7, 41), False), ((48,), False)])
def test_triton_in_process_ring_gradients_within_budget(chunks, padded):
    """The ring's one autograd node (_InProcessRing): every active pair's gradients from the merged out and lse."""
    pytest.importorskip("triton")
    from equivalence_tests.helpers import check_gradients

    case = triton_case(True, padded, seed=7 * len(chunks))
    check_gradients(case, "triton", torch.float32, "cpu", ring_chunk_lengths=chunks)


@pytest.mark.parametrize("chunks", [(20, 12, 16), (48,)])
def test_in_process_ring_backward_pair_by_pair_for_a_backend_without_backward_steps(monkeypatch, chunks):
    """A backend that merges on write but has no backward_steps: the ring's backward runs every active pair's
    backward_partial with the merged out and lse, and sums each chunk's gradients."""
    pytest.importorskip("triton")
    from equivalence_tests.helpers import check_gradients
    from optimized import dispatch

    class PairByPair(type(dispatch.REGISTRY["triton"])):
        backward_steps = None

    monkeypatch.setitem(dispatch.REGISTRY, "triton", PairByPair())
    check_gradients(
        triton_case(True, True, seed=11 * len(chunks)), "triton", torch.float32, "cpu", ring_chunk_lengths=chunks
    )


# --------------------------------------------------------------------------------------------
# The backward ring on a group of one rank (no transfer: no process group needed)
# --------------------------------------------------------------------------------------------


def one_rank_call(backend, segment_lengths=(8, 16), block_size=4, local_window_size=8, scale=0.5):
    """A causal ``_RingCall`` on one rank holding the whole sequence (its length the last segment), 2 heads."""
    from optimized.dispatch import REGISTRY

    seq_len = segment_lengths[-1]
    geometry = AttentionGeometry(DilationConfig(segment_lengths, (1, 2), "all"), seq_len, 2)
    config = SparsePatternConfig(
        pattern_type="local_window", block_size=block_size, local_window_size=local_window_size
    )
    schedule = ring_schedule(geometry, config, True, (seq_len,))
    chosen = REGISTRY[backend]
    stats = ring.RingStats(rank=0, world_size=1, chunk_lengths=(seq_len,), schedule=schedule)
    return ring._RingCall(
        dist=torch.distributed,  # one rank: every transfer list is empty, nothing is called
        group=None,
        rank=0,
        peers=(0,),
        schedule=schedule,
        backend=chosen,
        options=chosen.default_options(),
        geometry=geometry,
        sparse_config=config,
        is_causal=True,
        scale=scale,
        stats=stats,
    )


def _gradients(run, inputs, needs, grad_out, grad_lse):
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip(inputs, needs)]
    out, lse = run(*leaves)
    finite = torch.isfinite(lse)
    loss = (out * grad_out.to(out.dtype)).sum() + torch.where(finite, lse * grad_lse.to(lse.dtype), 0).sum()
    loss.backward()
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize(
    "needs", [(True, False, False), (False, True, False), (False, False, True), (True, True, False), (True, True, True)]
)
def test_backward_ring_of_one_rank_gives_the_gradients_asked_for(needs):
    """Gradients of q, k, v (only those that require grad) through the distributed ring's autograd node, against
    the unsplit torch backend in float64 within the budget of its float32 run (docs/numerics.md, k = 3)."""
    from reference.verification import K_GRADIENT, assert_within_budget, compare

    call = one_rank_call("torch")
    generator = torch.Generator().manual_seed(sum(needs) + 4 * needs[0])
    q, k, v = (torch.randn(2, 16, 2, 4, generator=generator) for _ in range(3))
    mask = torch.rand(2, 16, generator=generator) < 0.2
    grad_out, grad_lse = torch.randn(2, 16, 2, 4, generator=generator), torch.randn(2, 2, 16, generator=generator)
    ring_grads = _gradients(
        lambda q_, k_, v_: ring._RingAttention.apply(q_, k_, v_, mask.to(torch.uint8), call),
        (q, k, v),
        needs,
        grad_out,
        grad_lse,
    )
    plan = call.plan((0, 16), (0, 16))

    def unsplit(dtype):
        return _gradients(
            lambda q_, k_, v_: call.backend.forward_partial(q_, k_, v_, mask, plan, call.options),
            tuple(t.to(dtype) for t in (q, k, v)),
            needs,
            grad_out,
            grad_lse,
        )

    for name, got, exact, baseline, need in zip(
        "qkv", ring_grads, unsplit(torch.float64), unsplit(torch.float32), needs
    ):
        if not need:
            assert got is None
            continue
        assert got.dtype == torch.float32
        assert_within_budget(compare(f"d{name}", got, exact, baseline, torch.float32, K_GRADIENT), f"needs={needs}")


def test_a_ring_request_and_result_are_frozen():
    """A request is built per call and a result handed back: neither may change after (the cache of chunk
    lengths, a dict the caller keeps, is the one mutable part, and takes no part in equality)."""
    import dataclasses

    request = ring.RingRequest(None, DilationConfig((4,), (1,)), SparsePatternConfig(), "torch", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.backend = "triton"
    assert request == dataclasses.replace(request, chunk_lengths_cache={(1,): (4,)})
    result = ring.RingResult((), None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.results = (1,)


def test_a_one_step_triton_ring_in_half_precision_writes_what_the_unsplit_call_writes():
    """A ring whose only computing step holds every pair writes q's dtype directly, its head layers merged in
    that dtype as the unsplit call merges them: bitwise the unsplit output (float16, head_mode "all"); with two
    computing steps it accumulates in float32 and stays within docs/numerics.md's budget in float16."""
    pytest.importorskip("triton")
    from equivalence_tests.helpers import check_backend
    from optimized import BlockSparseRingDilatedAttention

    kwargs = dict(
        segment_lengths=[16, 32],
        dilation_rates=[1, 2],
        sparse_config=TRITON_CASE_KWARGS["sparse_config"],
        head_mode="all",
        backend="triton",
    )
    generator = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(2, 48, 2, 16, generator=generator).to(torch.float16) for _ in range(3))
    with torch.no_grad():
        unsplit = BlockSparseRingDilatedAttention(**kwargs)(q, k, v, is_causal=True)
        # Chunks (32, 16): every segment of 16 and of 32 lies inside one chunk, so only step 0 computes.
        one_step = BlockSparseRingDilatedAttention(**kwargs, ring_chunk_lengths=[32, 16])(q, k, v, is_causal=True)
    assert one_step.dtype == torch.float16 and torch.equal(one_step, unsplit)
    case = triton_case(True, True, seed=5)
    check_backend(case, "triton", torch.float16, "cpu", ring_chunk_lengths=(20, 12, 16))


def test_a_one_step_distributed_triton_ring_writes_q_dtype_unless_a_backward_follows():
    """On a rank that computes in one step only, the forward ring writes q's dtype as the unsplit call does
    (float16, head_mode "all": its layers merge in float16, bitwise the unsplit output); when an input requires
    grad it keeps float32, which the backward ring's accumulators take (a group of one rank: no transfer)."""
    pytest.importorskip("triton")
    call = one_rank_call("triton", segment_lengths=(16, 32), block_size=16, local_window_size=16, scale=0.25)
    triton = call.backend
    generator = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=generator).to(torch.float16) for _ in range(3))
    with torch.no_grad():
        out, lse = ring._ring_forward(call, q, k, v, None)
        unsplit_out, unsplit_lse = triton.forward_partial(q, k, v, None, call.plan((0, 32), (0, 32)), call.options)
    assert out.dtype == torch.float16 and torch.equal(out, unsplit_out) and torch.equal(lse, unsplit_lse)
    with torch.no_grad():  # as inside the ring's autograd function: grad mode off, the input requires grad
        out, _ = ring._ring_forward(call, q.clone().requires_grad_(), k, v, None)
    assert out.dtype == torch.float32
