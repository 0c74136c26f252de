"""A ring step's pairs: where a StepPair's chunks sit (optimized/plan.py), and how the triton backend
launches a step forward and backward (optimized/triton_backend.py, optimized/triton_backward.py).

The step tests of tests/test_triton_backend.py place their chunks so that some shifts, bounds or
rounds coincide, and the ring's backward runs there only through drawn examples. The facts below
(StepPair's rows and hashing, rounds, joined launches, the int32 guard, the ring backward against
its pairs, the checks of its steps, the tile and index mode a step or a backward launches with,
and a lattice whose last block is partial) passed those tests when ``make mutation``
(experiments/mutation.py) changed them.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, as tests/test_triton_backend.py

from optimized.plan import CallPlan, StepPair
from reference import AttentionGeometry, DilationConfig, SparsePatternConfig


def test_a_step_pairs_rows_are_its_chunks_less_their_own_shifts():
    """Query rows are the query chunk less query_shift, key rows the key chunk less key_shift (different shifts,
    different chunk starts and lengths, so no sign or bound can stand in for another)."""
    geometry = AttentionGeometry(DilationConfig((64,), (1,), "split"), 64, 1)
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    pair = StepPair(CallPlan(geometry, config, False, 1.0, (40, 56), (16, 40)), 8, 3)
    assert pair.query_rows == (32, 48)
    assert pair.key_rows == (13, 37)
    assert StepPair(pair.plan, 0, 0).query_rows == (40, 56)
    assert StepPair(pair.plan, 0, 0).key_rows == (16, 40)


def test_step_pairs_are_frozen_values():
    """A ring step's pairs key the step-table cache (optimized.triton_backend.step_tables): equal pairs hash alike
    and none can change."""
    geometry = AttentionGeometry(DilationConfig((64,), (1,), "split"), 64, 1)
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    plan = CallPlan(geometry, config, False, 1.0, (0, 32), (32, 64))
    assert StepPair(plan, 0, 32) == StepPair(plan, 0, 32)
    assert hash((StepPair(plan, 0, 32),)) == hash((StepPair(plan, 0, 32),))
    with pytest.raises(dataclasses.FrozenInstanceError):
        StepPair(plan, 0, 32).query_shift = 1


def _triton():
    """The triton modules (in the interpreter off CUDA, as `make test` runs them), or a skip where triton is absent."""
    pytest.importorskip("triton")
    from optimized import triton_backend, triton_backward

    return triton_backend, triton_backward


def _shuffled_steps(causal: bool):
    """Two ring steps over a rank's query pieces (0, 16) and (48, 64) at rows 0-16 and 16-32 of q, and every key
    piece of N = 64 at rows of k laid out as (16, 48), (0, 16), (48, 64): key shifts 16, -32 and 0, none equal to
    a query shift. Step 0 pairs each query piece with its own keys, step 1 with the middle ones."""
    geometry = AttentionGeometry(DilationConfig((64,), (1,), "split"), 64, 4)
    config = SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=48)
    pair = lambda qr, q_row, kr, k_row: StepPair(  # noqa: E731
        CallPlan(geometry, config, causal, 0.25, qr, kr), qr[0] - q_row, kr[0] - k_row
    )
    first = (pair((0, 16), 0, (0, 16), 32), pair((48, 64), 16, (48, 64), 48))
    second = (pair((0, 16), 0, (16, 32), 0), pair((48, 64), 16, (32, 48), 16))
    return first, second


@pytest.mark.parametrize("causal, head_dim", [(False, 24), (True, 8)])
def test_a_rings_steps_equal_their_pairs_one_by_one_forward_and_backward(causal, head_dim):
    """Two ring steps on chunks at shifted rows of q and k (key shifts that differ from the query shifts, one
    negative), grouped heads, head dims padded to the kernel's width, a gradient reaching lse. Forward: the steps
    (step_forward, then step_forward_into) give bitwise what partial_forward(into=...) gives pair by pair.
    Backward: ring_backward (a dq launch per step round, a dk/dv launch per step round of disjoint key rows)
    gives bitwise what partial_backward gives pair by pair on the pair's own rows, summed in the steps' order.
    One step alone writes each key row once (one dk/dv launch, no float32 sum); a step of pairs with different
    numbers of tables (a dilated split geometry) adds a table that only one pair has."""
    triton_backend, triton_backward = _triton()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = _shuffled_steps(causal)
    generator = torch.Generator().manual_seed(21)
    q = torch.randn(2, 32, 4, head_dim, generator=generator).to(device)
    k, v = (torch.randn(2, 64, 2, head_dim, generator=generator).to(device) for _ in range(2))
    mask = (torch.rand(2, 64, generator=generator) < 0.2).to(device)
    grad_out = torch.randn(2, 32, 4, head_dim, generator=generator).to(device)
    grad_lse = torch.randn(2, 4, 32, generator=generator).to(device)
    tabled = (  # one step whose pairs have three and two tables: the step joins table 2 of the first pair only
        StepPair(_tabled_plan(causal, (0, 16), (0, 16)), 0, -32),
        StepPair(_tabled_plan(causal, (32, 48), (16, 32)), 16, 16),
    )
    for ring in (steps, steps[:1], (tabled,)):
        out, lse = triton_backend.step_forward(q, k, v, mask, ring[0], variant="v2")
        for pairs in ring[1:]:
            triton_backend.step_forward_into((out, lse), q, k, v, mask, pairs, variant="v2")
        pieces = {
            rows: (torch.zeros(2, 16, 4, head_dim, device=device), torch.full((2, 4, 16), float("-inf"), device=device))
            for rows in ((0, 16), (16, 32))
        }
        for pairs in ring:
            for pair in pairs:
                keys = slice(*pair.key_rows)
                into, q_piece = pieces[pair.query_rows], q[:, slice(*pair.query_rows)]
                triton_backend.partial_forward(
                    q_piece, k[:, keys], v[:, keys], mask[:, keys], pair.plan, variant="v2", into=into
                )
        assert torch.equal(out, torch.cat([pieces[rows][0] for rows in sorted(pieces)], dim=1))
        assert torch.equal(lse, torch.cat([pieces[rows][1] for rows in sorted(pieces)], dim=2))
        assert not bool(torch.isneginf(lse).all())

        grads = triton_backward.ring_backward(q, k, v, mask, ring, out, lse, grad_out, grad_lse)
        expected = [torch.zeros_like(t) for t in (q, k, v)]
        for pairs in ring:
            for pair in pairs:
                rows, keys = slice(*pair.query_rows), slice(*pair.key_rows)
                dq, dk, dv = triton_backward.partial_backward(
                    q[:, rows],
                    k[:, keys],
                    v[:, keys],
                    mask[:, keys],
                    pair.plan,
                    out[:, rows],
                    lse[:, :, rows],
                    grad_out[:, rows],
                    grad_lse[:, :, rows],
                )
                expected[0][:, rows] += dq
                expected[1][:, keys] += dk
                expected[2][:, keys] += dv
        for name, actual, wanted in zip(("dq", "dk", "dv"), grads, expected):
            assert actual.dtype == torch.float32
            assert torch.equal(actual, wanted), (name, len(ring))
            assert bool((actual != 0).any()), name
        if ring == steps[:1]:  # the key rows of step 1's pieces get no gradient from step 0
            assert not bool(grads[1][:, :32].any()) and not bool(grads[2][:, :32].any())


def _tabled_plan(causal: bool, query_range, key_range):
    """A dilated split geometry whose diagonal chunk pairs have three tables with entries and the others two."""
    geometry = AttentionGeometry(DilationConfig((16, 64), (1, 4), "split"), 64, 4)
    config = SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=16)
    return CallPlan(geometry, config, causal, 0.25, query_range, key_range)


def test_rounds_put_a_pair_just_below_an_earlier_one_in_its_round():
    """First fit also takes a later pair whose rows end where an earlier pair's begin (by query rows for the
    forward, by key rows for the backward's dk/dv)."""
    triton_backend, _ = _triton()
    upper = StepPair(_tabled_plan(False, (16, 32), (32, 48)), 0, 0)
    lower = StepPair(_tabled_plan(False, (0, 16), (16, 32)), 0, 0)
    assert triton_backend._rounds((upper, lower)) == [[upper, lower]]
    assert triton_backend._rounds((upper, lower), by="key") == [[upper, lower]]
    same_keys = StepPair(_tabled_plan(False, (0, 16), (32, 48)), 0, 0)
    assert triton_backend._rounds((upper, same_keys), by="key") == [[upper], [same_keys]]
    assert triton_backend._rounds((upper, same_keys)) == [[upper, same_keys]]


def test_joined_launches_keep_each_pairs_items_entries_and_shifts():
    """A step's forward launch (_joined) and dk/dv launch (_joined_columns) are their pairs' own launches one after
    another: entry ranges offset by the entries before, each pair's shifts, counts and bounds combined (mean_run
    weighted by run_rows); a pair with fewer tables joins only the launches it has."""
    triton_backend, triton_backward = _triton()
    W, C = triton_backend.WorkItem, triton_backward.ColumnItem
    pairs = (
        StepPair(_tabled_plan(False, (0, 16), (0, 16)), 0, -32),
        StepPair(_tabled_plan(False, (32, 48), (16, 32)), 16, 16),
    )
    forward = [triton_backend.device_tables(pair.plan, "cpu")[0] for pair in pairs]
    joined = triton_backend._joined(list(zip(forward, pairs)), 4)
    assert joined.num_items == sum(launch.num_items for launch in forward)
    assert torch.equal(joined.key_block, torch.cat([launch.key_block for launch in forward]))
    first = forward[0].num_items
    for part, launch, pair, base in zip(
        (joined.items[:first], joined.items[first:]), forward, pairs, (0, forward[0].key_block.numel())
    ):
        expected = launch.items.clone()
        expected[:, [W.ENTRY_START, W.ENTRY_STOP, W.FULL_STOP]] += base
        expected[:, W.QUERY_SHIFT], expected[:, W.KEY_SHIFT] = pair.query_shift, pair.key_shift
        assert torch.equal(part, expected)
    assert (joined.max_full, joined.max_listed) == (
        max(launch.max_full for launch in forward),
        max(launch.max_listed for launch in forward),
    )
    assert joined.run_rows == sum(launch.run_rows for launch in forward) >= 2
    weighted = sum(launch.mean_run * launch.run_rows for launch in forward) / joined.run_rows
    assert joined.mean_run == weighted and weighted > 0

    own = [triton_backward.column_launches(pair.plan, "cpu", 2) for pair in pairs]
    assert [len(launches) for launches in own] == [3, 2]
    (launches,) = triton_backward.step_column_launches(pairs, "cpu", 2)  # disjoint key rows: one round
    assert len(launches) == 3
    for index, launch in enumerate(launches):
        parts = [(columns[index], pair) for columns, pair in zip(own, pairs) if index < len(columns)]
        assert launch.num_items == sum(part.num_items for part, _ in parts)
        assert launch.kv_heads == frozenset().union(*(part.kv_heads for part, _ in parts))
        assert torch.equal(launch.query_block, torch.cat([part.query_block for part, _ in parts]))
        expected, base = [], 0
        for part, pair in parts:
            items = part.items.clone()
            items[:, [C.ENTRY_START, C.ENTRY_STOP]] += base
            items[:, C.QUERY_SHIFT], items[:, C.KEY_SHIFT] = pair.query_shift, pair.key_shift
            expected.append(items)
            base += part.query_block.numel()
        assert torch.equal(launch.items, torch.cat(expected))


def test_a_step_listing_2_to_the_31_key_blocks_is_refused(monkeypatch):
    """The kernels index the joined key-block list in int32: a step whose pairs list 2**31 entries together is
    refused before anything is built. The lists are expanded views, and a concatenation that large is stopped
    before it allocates (a step that got past the check would copy 8 GiB)."""
    triton_backend, _ = _triton()
    pair = StepPair(_tabled_plan(False, (0, 16), (0, 16)), 0, 0)
    launch = triton_backend.device_tables(pair.plan, "cpu")[0]
    huge = dataclasses.replace(launch, key_block=launch.key_block[:1].expand(2**30))
    real_cat = torch.cat

    def small_cat(tensors, *args, **kwargs):
        assert sum(t.numel() for t in tensors) < 2**31, "the oversized step was built"
        return real_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", small_cat)
    with pytest.raises(ValueError, match=r"too many key blocks .*2\*\*31"):
        triton_backend._joined([(huge, pair), (huge, pair)], 4)


def test_ring_backward_checks_its_steps():
    """ring_backward refuses no steps and, like the forward, a step whose rows lie outside q or k."""
    _, triton_backward = _triton()
    q, k, v = (torch.randn(1, 16, 4, 16) for _ in range(3))
    out, lse = torch.randn(1, 16, 4, 16), torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="at least one ring step"):
        triton_backward.ring_backward(q, k, v, None, (), out, lse, out, None)
    outside = (StepPair(_tabled_plan(False, (0, 16), (16, 32)), 0, 0),)  # key rows [16, 32) of 16
    with pytest.raises(ValueError, match=r"key chunk \(16, 32\) lies at rows \[16, 32\)"):
        triton_backward.ring_backward(q, k, v, None, (outside,), out, lse, out, None)


def test_the_backward_takes_its_default_tile_by_the_head_dim(monkeypatch):
    """A backward call (the ring's and the unsplit one's) picks the GPU's default tile by the padded head dim, not
    by another axis: at D = 16 with 256 queries half precision gets the tuned dq tile, not the one of D >= 256."""
    _, triton_backward = _triton()
    monkeypatch.setattr(triton_backward, "_interpreting", lambda: False)
    geometry = AttentionGeometry(DilationConfig((256,), (1,), "split"), 256, 2)
    plan = CallPlan.whole(geometry, SparsePatternConfig(pattern_type="dense", block_size=64), False, 0.25)
    generator = torch.Generator().manual_seed(5)
    q, k, v, out, grad_out = (torch.randn(1, 256, 2, 16, generator=generator).half() for _ in range(5))
    lse = torch.randn(1, 2, 256, generator=generator)
    call = triton_backward._BackwardCall.of(q, k, v, None, plan, out, lse, grad_out, None, None)
    assert call.tile == triton_backward.default_backward_tile(64, 16, torch.float16)
    assert call.tile != triton_backward.default_backward_tile(64, 256, torch.float16)


class _TileAsked(Exception):
    pass


@pytest.mark.parametrize("head_dim, block_d", [(8, 16), (24, 32)])
def test_a_step_takes_its_default_tile_by_the_padded_head_dim(monkeypatch, head_dim, block_d):
    """step_forward and step_forward_into ask default_tile for the head dim padded to a power of two, at least 16
    (not another axis: 4 heads, 64 rows); the ask is stopped there, before any launch."""
    triton_backend, _ = _triton()
    asked = []

    def default_tile(block_size, padded, dtype):
        asked.append((block_size, padded, dtype))
        raise _TileAsked

    monkeypatch.setattr(triton_backend, "default_tile", default_tile)
    pairs = _shuffled_steps(False)[0]
    generator = torch.Generator().manual_seed(8)
    q = torch.randn(1, 32, 4, head_dim, generator=generator)
    k, v = (torch.randn(1, 64, 2, head_dim, generator=generator) for _ in range(2))
    accumulator = (torch.zeros(1, 32, 4, head_dim), torch.full((1, 4, 32), float("-inf")))
    with pytest.raises(_TileAsked):
        triton_backend.step_forward(q, k, v, None, pairs)
    with pytest.raises(_TileAsked):
        triton_backend.step_forward_into(accumulator, q, k, v, None, pairs)
    assert asked == [(16, block_d, torch.float32)] * 2


def test_a_lattice_whose_last_block_is_partial_attends_no_key_past_its_end():
    """Segments of 24 points in blocks of 16: each lattice's last block holds 8 points, and the next lattice point
    would be the next segment's first key, inside the key chunk. Not causal, so only the lattice bound keeps it
    out (docs/semantics.md section 2): the triton forward (its masked key-block path) against the reference."""
    triton_backend, _ = _triton()
    from reference import assert_within_budget, compare, partial_attention

    geometry = AttentionGeometry(DilationConfig((24,), (1,), "split"), 48, 2)
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    generator = torch.Generator().manual_seed(24)
    q, k, v = (torch.randn(1, 48, 2, 16, generator=generator) for _ in range(3))
    out, lse = triton_backend.partial_forward(q, k, v, None, CallPlan.whole(geometry, config, False, 0.25))
    out64, lse64 = partial_attention(q, k, v, geometry, config, scale=0.25)
    out32, lse32 = partial_attention(q, k, v, geometry, config, scale=0.25, compute_dtype=None)
    assert_within_budget(compare("out", out, out64, out32, torch.float32))
    assert_within_budget(compare("lse", lse, lse64, lse32, torch.float32))


@pytest.mark.parametrize("index, register_index", [("registers", True), ("load", False)])
def test_a_step_launches_with_the_index_mode_it_is_given(monkeypatch, index, register_index):
    """step_forward and step_forward_into hand every launch the index mode asked for (the launches are recorded,
    not run)."""
    triton_backend, _ = _triton()
    asked = []
    monkeypatch.setattr(triton_backend, "_launch_forward", lambda *args, **kwargs: asked.append(args[10]))
    pairs = _shuffled_steps(False)[0]
    generator = torch.Generator().manual_seed(9)
    q = torch.randn(1, 32, 4, 16, generator=generator)
    k, v = (torch.randn(1, 64, 2, 16, generator=generator) for _ in range(2))
    accumulator = (torch.zeros(1, 32, 4, 16), torch.full((1, 4, 32), float("-inf")))
    triton_backend.step_forward(q, k, v, None, pairs, index=index)
    triton_backend.step_forward_into(accumulator, q, k, v, None, pairs, index=index)
    assert len(asked) >= 2 and set(asked) == {register_index}


def test_the_weights_in_the_gpus_query_tile_equal_those_in_the_interpreters(monkeypatch):
    """attention_weights takes 64-row query tiles on a GPU (16 in the interpreter): run in the interpreter with the
    GPU's choice, a block of 64 gives the same probabilities, bit for bit."""
    triton_backend, _ = _triton()
    geometry = AttentionGeometry(DilationConfig((128,), (1,), "split"), 128, 2)
    plan = CallPlan.whole(geometry, SparsePatternConfig(pattern_type="dense", block_size=64), True, 0.25)
    generator = torch.Generator().manual_seed(64)
    q, k, v = (torch.randn(1, 128, 2, 16, generator=generator) for _ in range(3))
    _, lse = triton_backend.partial_forward(q, k, v, None, plan)
    interpreted = triton_backend.attention_weights(q, k, None, lse, plan)
    # The GPU's choice where attention_weights picks its tile; the interpreter's answer everywhere else (the
    # input checks refuse a CPU tensor off the interpreter).
    monkeypatch.setattr(triton_backend, "_interpreting", lambda: sys._getframe(1).f_code.co_name != "attention_weights")
    gpu_tiles = triton_backend.attention_weights(q, k, None, lse, plan)
    assert torch.equal(gpu_tiles["block_values"], interpreted["block_values"])
    assert bool(interpreted["block_values"].any())


def test_backward_tiles_are_frozen_and_grad_out_of_any_strides_gives_the_same_gradients():
    """A KernelTile is frozen (tiles are shared defaults); a grad_out whose last dim is not unit-stride (here its
    token dim is) is made contiguous before the kernels read it, so the gradients are bitwise those of the
    contiguous grad_out. ``make mutation`` found both unpinned."""
    from optimized import triton_backward

    tile = triton_backward.KernelTile(16, 16, 4, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        tile.rows = 32
    geometry = AttentionGeometry(DilationConfig((32,), (1,)), 32, 2)
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    plan = CallPlan.whole(geometry, config, True, 0.25)
    generator = torch.Generator().manual_seed(31)
    q, k, v = (torch.randn(1, 32, 2, 16, generator=generator) for _ in range(3))
    out, lse = triton_backward.partial_forward(q, k, v, None, plan)
    grad_out = torch.randn(1, 16, 2, 32, generator=generator).permute(0, 3, 2, 1)  # (B, N, H, D), stride(1) == 1
    assert grad_out.stride(1) == 1 and grad_out.stride(-1) != 1
    strided = triton_backward.partial_backward(q, k, v, None, plan, out, lse, grad_out, None)
    contiguous = triton_backward.partial_backward(q, k, v, None, plan, out, lse, grad_out.contiguous(), None)
    for got, expected in zip(strided, contiguous):
        assert torch.equal(got, expected)
