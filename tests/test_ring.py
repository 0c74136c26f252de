"""The in-process ring and the ring schedule (docs/semantics.md section 5).

A ring split of the sequence into contiguous chunks of any sizes (zero-length chunks, chunks
shorter than a block or a segment included) must give the unsplit result; the schedule must mark
exactly the chunk pairs that share an allowed pair, and send a chunk no farther than needed.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import optimized
from equivalence_tests import strategies as s
from equivalence_tests.helpers import (
    case_sizes,
    check_backend,
    check_gradients,
    example_count,
    gradient_case_kwargs,
    some_row_has_two_keys,
)
from reference import AttentionGeometry, DilationConfig, SparsePatternConfig, assert_within_budget, compare
from reference import BlockSparseRingDilatedAttention as ReferenceAttention
from reference.ring_schedule import RingSchedule, pair_is_active, ring_schedule
from reference.semantics import dense_multiplicity
from reference.verification import K_OUTPUT


@st.composite
def cases_with_splits(draw, allow_empty=True, **case_kwargs):
    sizes = case_sizes("torch").case_kwargs()
    sizes.update(case_kwargs)
    case = draw(s.attention_cases(**sizes))
    chunks = draw(s.ring_splits(case.shape.seq_len, max_parts=8, allow_empty=allow_empty))
    return case, tuple(chunks)


# --------------------------------------------------------------------------------------------
# The in-process ring against the float64 reference and the unsplit path
# --------------------------------------------------------------------------------------------


@settings(max_examples=example_count(25))
@given(case_and_chunks=cases_with_splits())
def test_in_process_ring_matches_reference_and_unsplit(case_and_chunks):
    case, chunks = case_and_chunks
    check_backend(case, "torch", torch.float32, "cpu", ring_chunk_lengths=chunks)

    # The ring differs from the unsplit path no more than the reference's own float32 run does.
    q, k, v, mask = s.make_inputs(case, torch.float32, "cpu")
    call = dict(is_causal=case.is_causal, key_padding_mask=mask, return_lse=True)
    kwargs = s.module_kwargs(case)
    ring_out, ring_lse = optimized.BlockSparseRingDilatedAttention(
        **kwargs, backend="torch", ring_chunk_lengths=chunks
    )(q, k, v, **call)
    whole_out, whole_lse = optimized.BlockSparseRingDilatedAttention(**kwargs, backend="torch")(q, k, v, **call)
    low_out, low_lse = ReferenceAttention(**kwargs, compute_dtype=None)(q, k, v, **call)
    empty = torch.isneginf(whole_lse)
    context = f"{case.describe()}, chunks={chunks}"
    assert torch.equal(torch.isneginf(ring_lse), empty), context
    assert_within_budget(
        compare(
            "out vs unsplit",
            ring_out,
            whole_out.double(),
            low_out,
            torch.float32,
            K_OUTPUT,
            empty=empty.transpose(1, 2).unsqueeze(-1),
        ),
        context,
    )
    assert_within_budget(
        compare(
            "lse vs unsplit",
            ring_lse,
            whole_lse.double(),
            low_lse,
            torch.float32,
            K_OUTPUT,
            empty=empty,
            empty_value=float("-inf"),
        ),
        context,
    )


@settings(max_examples=example_count(6))
@given(case_and_chunks=cases_with_splits(allow_empty=False, max_seq_len=32, max_heads=4, max_head_dim=8))
def test_in_process_ring_bfloat16_and_weights(case_and_chunks):
    case, chunks = case_and_chunks
    check_backend(case, "torch", torch.bfloat16, "cpu", ring_chunk_lengths=chunks, check_weights=True)


@settings(max_examples=example_count(8))
@given(case_and_chunks=cases_with_splits(**gradient_case_kwargs()))
def test_in_process_ring_gradients(case_and_chunks):
    case, chunks = case_and_chunks
    assume(some_row_has_two_keys(case))
    check_gradients(case, "torch", torch.float32, "cpu", ring_chunk_lengths=chunks)


def test_ring_size_splits_evenly_and_matches_explicit_chunks():
    module = optimized.BlockSparseRingDilatedAttention([8], [1], backend="torch", ring_size=3)
    assert module.chunk_lengths(10) == (4, 3, 3)
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 10, 2, 4, generator=generator) for _ in range(3))
    explicit = optimized.BlockSparseRingDilatedAttention([8], [1], backend="torch", ring_chunk_lengths=(4, 3, 3))
    assert torch.equal(module(q, k, v), explicit(q, k, v))


def test_chunk_lengths_must_cover_the_sequence():
    module = optimized.BlockSparseRingDilatedAttention([8], [1], backend="torch", ring_chunk_lengths=(4, 4))
    q = torch.randn(1, 9, 2, 4)
    with pytest.raises(ValueError, match="ring_chunk_lengths"):
        module(q, q, q)


# --------------------------------------------------------------------------------------------
# The schedule
# --------------------------------------------------------------------------------------------


def _geometry(case):
    return AttentionGeometry(case.dilation, case.shape.seq_len, case.shape.num_heads)


@settings(max_examples=example_count(30))
@given(case_and_chunks=cases_with_splits())
def test_schedule_marks_exactly_the_pairs_with_an_allowed_pair(case_and_chunks):
    case, chunks = case_and_chunks
    geometry = _geometry(case)
    schedule = ring_schedule(geometry, case.sparse_config, case.is_causal, chunks)
    for i in range(schedule.num_chunks):
        for j in range(schedule.num_chunks):
            counts = dense_multiplicity(
                geometry, case.sparse_config, case.is_causal, None, schedule.chunk_range(i), schedule.chunk_range(j)
            )
            expected = bool((counts > 0).any())
            assert schedule.active[i][j] == expected, (
                f"pair ({i}, {j}) of chunks {chunks}: schedule {schedule.active[i][j]}, literal {expected}; "
                f"{case.describe()}"
            )
            if case.is_causal and j > i and schedule.chunk_lengths[i] and schedule.chunk_lengths[j]:
                assert not schedule.active[i][j], "causal: a key chunk after the query chunk holds no pair"


def _check_schedule_delivers_exactly_what_is_needed(schedule: RingSchedule, bytes_per_token: int):
    P = schedule.num_chunks
    # Simulate the ring: where every chunk is at every step, moved only by the schedule's transfers.
    location = {c: c for c in range(P)}  # chunk -> rank holding it (None once dropped)
    sent = [0] * P
    for step in range(P):
        if step > 0:
            moved = {}
            for source, destination, chunk in schedule.transfers(step):
                assert location[chunk] == source, (
                    f"step {step}: chunk {chunk} sent by {source}, held by {location[chunk]}"
                )
                assert destination == (source + 1) % P
                moved[chunk] = destination
                sent[step] += schedule.chunk_lengths[chunk] * bytes_per_token
            location = {c: moved.get(c) for c in range(P)}
        for rank in range(P):
            chunk = schedule.chunk_at(rank, step)
            if schedule.computes(rank, step):
                assert location[chunk] == rank, f"rank {rank} computes chunk {chunk} at step {step} without holding it"
            assert schedule.receives(rank, step) == (step > 0 and location[chunk] == rank)
        for rank in range(P):
            if step + 1 < P:
                assert schedule.sends(rank, step + 1) == schedule.receives((rank + 1) % P, step + 1)
    assert list(schedule.step_bytes(bytes_per_token)) == sent
    # No chunk travels past the last rank that needs it.
    for chunk in range(P):
        last = schedule.chunk_last_step[chunk]
        if last > 0:
            assert schedule.active[(chunk + last) % P][chunk]
        assert all(not schedule.active[(chunk + s_) % P][chunk] for s_ in range(last + 1, P))
    assert schedule.last_step == max(schedule.chunk_last_step)
    for rank in range(P):
        assert schedule.compute_steps(rank) == tuple(x for x in range(P) if schedule.computes(rank, x))


@settings(max_examples=example_count(30))
@given(case_and_chunks=cases_with_splits(), bytes_per_token=st.integers(1, 1000))
def test_schedule_transfers_deliver_every_needed_chunk_and_nothing_more(case_and_chunks, bytes_per_token):
    case, chunks = case_and_chunks
    schedule = ring_schedule(_geometry(case), case.sparse_config, case.is_causal, chunks)
    _check_schedule_delivers_exactly_what_is_needed(schedule, bytes_per_token)


@given(
    segment_chunks=st.lists(st.integers(1, 3), min_size=1, max_size=8),
    base=st.sampled_from((2, 3, 4)),
    rates=st.lists(st.integers(1, 3), min_size=2, max_size=2),
    is_causal=st.booleans(),
    pattern=st.sampled_from(("dense", "dilated_sparse", "local_window")),
)
def test_zero_bytes_when_every_segment_fits_in_one_chunk(segment_chunks, base, rates, is_causal, pattern):
    # Segments of base and 2 * base; every chunk is a multiple of 2 * base, so no segment crosses a chunk.
    chunks = tuple(2 * base * n for n in segment_chunks)
    geometry = AttentionGeometry(DilationConfig((base, 2 * base), tuple(rates)), sum(chunks), 4)
    config = SparsePatternConfig(pattern_type=pattern, block_size=2, sparsity_ratio=0.5, local_window_size=4)
    schedule = ring_schedule(geometry, config, is_causal, chunks)
    assert schedule.last_step == 0
    assert schedule.step_bytes(64) == (0,) * len(chunks)
    assert all(schedule.transfers(step) == () for step in range(len(chunks)))
    assert all(schedule.compute_steps(rank) == (0,) for rank in range(len(chunks)))


def test_one_segment_over_the_whole_sequence_sends_every_chunk_every_step():
    chunks = (3, 5, 2, 6)
    geometry = AttentionGeometry(DilationConfig((16,), (1,)), 16, 2)
    schedule = ring_schedule(geometry, SparsePatternConfig(pattern_type="dense", block_size=2), False, chunks)
    assert schedule.last_step == 3
    assert schedule.step_bytes(10) == (0, 160, 160, 160)
    causal = ring_schedule(geometry, SparsePatternConfig(pattern_type="dense", block_size=2), True, chunks)
    # Causal: chunk c is needed by ranks c..P-1 only, so it travels P-1-c steps.
    assert causal.chunk_last_step == (3, 2, 1, 0)
    assert causal.step_bytes(10) == (0, 100, 80, 30)
    assert causal.compute_steps(0) == (0,) and causal.compute_steps(3) == (0, 1, 2, 3)


def test_pair_is_active_rejects_empty_chunks_and_later_keys_under_causal():
    geometry = AttentionGeometry(DilationConfig((8,), (1,)), 8, 1)
    config = SparsePatternConfig(pattern_type="dense", block_size=4)
    assert pair_is_active(geometry, config, False, (0, 4), (4, 8))
    assert not pair_is_active(geometry, config, True, (0, 4), (4, 8))
    assert not pair_is_active(geometry, config, False, (2, 2), (0, 8))


def test_schedule_rejects_bad_chunk_lengths():
    geometry = AttentionGeometry(DilationConfig((8,), (1,)), 8, 1)
    config = SparsePatternConfig(pattern_type="dense", block_size=4)
    with pytest.raises(ValueError, match="sum to 7"):
        ring_schedule(geometry, config, False, (3, 4))
    with pytest.raises(ValueError, match="ints >= 0"):
        ring_schedule(geometry, config, False, (9, -1))


# --------------------------------------------------------------------------------------------
# Zigzag: two pieces per rank (causal load balance)
# --------------------------------------------------------------------------------------------


@given(seq_len=st.integers(0, 300), world_size=st.integers(1, 9))
def test_zigzag_pieces_cover_the_sequence_once_two_per_rank(seq_len, world_size):
    from reference import zigzag_pieces

    pieces = zigzag_pieces(seq_len, world_size)
    assert len(pieces) == world_size and all(len(p) == 2 for p in pieces)
    flat = sorted(piece for rank in pieces for piece in rank)
    assert flat[0][0] == 0 and flat[-1][1] == seq_len
    assert all(a[1] == b[0] for a, b in zip(flat, flat[1:]))  # contiguous, no overlap, no gap
    lengths = [b - a for a, b in flat]
    assert max(lengths) - min(lengths) <= 1
    for rank, (first, second) in enumerate(pieces):  # piece r, then piece 2P - 1 - r
        assert first == flat[rank] and second == flat[2 * world_size - 1 - rank]


@pytest.mark.parametrize("bad", [(-1, 2), (8, 0), (8, True), (8.0, 2)])
def test_zigzag_pieces_refuse_bad_sizes(bad):
    from reference import zigzag_pieces

    with pytest.raises(ValueError, match="seq_len|world_size"):
        zigzag_pieces(*bad)


@settings(max_examples=example_count(15))
@given(case=s.attention_cases(**case_sizes("torch").case_kwargs()), world_size=st.integers(1, 4))
def test_zigzag_schedule_marks_exactly_the_piece_pairs_with_an_allowed_pair(case, world_size):
    from reference.ring_schedule import zigzag_schedule

    geometry = AttentionGeometry(case.dilation, case.shape.seq_len, case.shape.num_heads)
    schedule = zigzag_schedule(geometry, case.sparse_config, case.is_causal, world_size)
    allowed = dense_multiplicity(geometry, case.sparse_config, case.is_causal)[0].sum(0) > 0  # (N, N)
    for i in range(world_size):
        for j in range(world_size):
            expected = tuple(
                (a, b)
                for a, (q0, q1) in enumerate(schedule.pieces[i])
                for b, (k0, k1) in enumerate(schedule.pieces[j])
                if bool(allowed[q0:q1, k0:k1].any())
            )
            assert schedule.piece_pairs[i][j] == expected
            assert schedule.active[i][j] == bool(expected)
    assert schedule.chunk_lengths == tuple(sum(b - a for a, b in p) for p in schedule.pieces)


def test_zigzag_balances_causal_work_where_contiguous_does_not():
    """Allowed (query, key) pairs per rank under a causal mask over the whole sequence."""
    from reference import zigzag_pieces

    N, P = 256, 4
    geometry = AttentionGeometry(DilationConfig((N,), (1,)), N, 1)
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    per_query = dense_multiplicity(geometry, config, True)[0, 0].sum(1)  # (N,) allowed keys of each query
    contiguous = [int(per_query[r * N // P : (r + 1) * N // P].sum()) for r in range(P)]
    zigzag = [sum(int(per_query[a:b].sum()) for a, b in pieces) for pieces in zigzag_pieces(N, P)]
    assert sum(zigzag) == sum(contiguous)
    assert max(contiguous) / min(contiguous) > 5  # the last rank does 7x the first's work
    assert max(zigzag) == min(zigzag)  # every rank the same


def test_ring_layout_is_checked_by_name():
    with pytest.raises(ValueError, match="ring_layout must be one of"):
        optimized.BlockSparseRingDilatedAttention([8], [1], ring_layout="striped")
    with pytest.raises(ValueError, match="ring_layout='zigzag'.*process_group"):
        optimized.BlockSparseRingDilatedAttention([8], [1], ring_layout="zigzag", ring_size=2)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_local_piece_ranges_lay_a_ranks_pieces_end_to_end(layout):
    """A chunk's local rows hold its pieces in order: piece i at [sum of earlier lengths, + its length)."""
    from reference.ring_schedule import zigzag_schedule

    geometry = AttentionGeometry(DilationConfig((8, 50), (1, 2)), 50, 2)
    config = SparsePatternConfig(pattern_type="dense", block_size=4)
    if layout == "zigzag":
        schedule = zigzag_schedule(geometry, config, True, 3)
    else:
        schedule = ring_schedule(geometry, config, True, (13, 0, 37))
    for chunk, pieces in enumerate(schedule.pieces):
        ranges = [schedule.local_piece_range(chunk, i) for i in range(len(pieces))]
        assert [b - a for a, b in ranges] == [stop - start for start, stop in pieces]
        assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]]
        assert ranges[-1][1] == schedule.chunk_lengths[chunk]
    if layout == "zigzag":
        assert all(len(p) == 2 and p[0][0] > 0 for p in schedule.pieces[1:])  # a second piece starts past 0
        with pytest.raises(ValueError, match="chunk_range is for contiguous rings"):
            schedule.chunk_range(0)
    else:
        assert [schedule.chunk_range(c) for c in range(3)] == [(0, 13), (13, 13), (13, 50)]


def test_an_empty_chunk_never_travels():
    """A zero-length chunk holds no key any rank needs: its last step is 0 and no transfer carries it."""
    geometry = AttentionGeometry(DilationConfig((12,), (1,)), 12, 1)
    schedule = ring_schedule(geometry, SparsePatternConfig(pattern_type="dense", block_size=2), False, (5, 0, 7))
    assert schedule.chunk_last_step[1] == 0
    assert not any(chunk == 1 for step in range(3) for _, _, chunk in schedule.transfers(step))
    assert schedule.chunk_last_step[0] > 0 and schedule.chunk_last_step[2] > 0  # the others do travel


def test_schedules_are_frozen_and_chunk_lengths_are_plain_ints():
    """Schedules are cached and shared, so none may change; chunk lengths are ints, not bools or floats."""
    import dataclasses

    from reference.ring_schedule import zigzag_schedule

    geometry = AttentionGeometry(DilationConfig((12,), (1,)), 12, 1)
    config = SparsePatternConfig(pattern_type="dense", block_size=2)
    for schedule in (ring_schedule(geometry, config, False, (5, 7)), zigzag_schedule(geometry, config, True, 2)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            schedule.active = ()
    for lengths in ((True, 11), (5.0, 7)):
        with pytest.raises(ValueError, match="chunk_lengths must be"):
            ring_schedule(geometry, config, False, lengths)
