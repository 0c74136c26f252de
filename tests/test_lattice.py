"""Heads, offsets, lattices and compacted indices (issue 2, section 3; docs/semantics.md section 2)."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from equivalence_tests import strategies as s
from reference import AttentionGeometry, DilationConfig
from reference.semantics import branch_heads, head_offset


@st.composite
def geometries(draw, head_mode=None, max_heads=12, max_rate=5):
    shape = draw(s.shapes(max_batch=1, max_seq_len=48, max_heads=max_heads))
    dilation = draw(s.dilations(shape.num_heads, shape.seq_len, head_mode, max_rate=max_rate))
    return AttentionGeometry(dilation, shape.seq_len, shape.num_heads)


def _lattices_holding(geo, position):
    """Offsets in use whose lattice (in ``position``'s segment) holds ``position``."""
    segment = position // geo.segment_length
    return [o for o in geo.offsets if position in geo.lattice_positions(segment, o).tolist()]


@given(geometry=geometries())
def test_offsets_follow_the_ceil_rule_and_form_contiguous_runs(geometry):
    for geo in geometry.branches:
        heads_in_branch, rate = len(geo.heads), geo.dilation_rate
        offsets = [geo.offset_of(h) for h in geo.heads]
        run = math.ceil(heads_in_branch / rate)
        assert offsets == [j // run for j in range(heads_in_branch)]
        assert offsets == sorted(offsets) and all(o < rate for o in offsets)
        # The offsets in use are 0, 1, ... with no gap.
        assert list(geo.offsets) == list(range(offsets[-1] + 1))


@given(geometry=geometries())
def test_offsets_are_torchscales_rule_when_heads_divide_by_the_rate(geometry):
    for geo in geometry.branches:
        heads_in_branch, rate = len(geo.heads), geo.dilation_rate
        if heads_in_branch % rate != 0:
            continue
        per_offset = heads_in_branch // rate
        assert [geo.offset_of(h) for h in geo.heads] == [j // per_offset for j in range(heads_in_branch)]


@given(geometry=geometries(head_mode="split", max_heads=12, max_rate=4))
def test_every_position_is_on_exactly_one_lattice_when_every_offset_is_used(geometry):
    """With H_g >= r and H_g % r == 0 every offset 0..r-1 has heads, so the heads of a branch
    cover each position exactly once; otherwise a position is on at most one lattice."""
    for geo in geometry.branches:
        heads_in_branch, rate = len(geo.heads), geo.dilation_rate
        every_offset_used = heads_in_branch >= rate and heads_in_branch % rate == 0
        if every_offset_used:
            assert geo.offsets == tuple(range(rate))
        for position in range(geometry.seq_len):
            holders = _lattices_holding(geo, position)
            assert len(holders) == 1 if every_offset_used else len(holders) <= 1, (geo, position, holders)


@given(
    rate=st.integers(1, 4),
    heads_per_offset=st.integers(1, 3),
    num_branches=st.integers(1, 3),
    seq_len=st.integers(1, 40),
    segment_length=st.integers(1, 50),
)
def test_heads_divisible_by_the_rate_cover_every_position_once(
    rate, heads_per_offset, num_branches, seq_len, segment_length
):
    dilation = DilationConfig((segment_length,) * num_branches, (rate,) * num_branches, "split")
    geometry = AttentionGeometry(dilation, seq_len, num_heads=num_branches * rate * heads_per_offset)
    for geo in geometry.branches:
        assert geo.offsets == tuple(range(rate))
        assert [len(_lattices_holding(geo, p)) for p in range(seq_len)] == [1] * seq_len


def test_a_head_count_below_the_rate_leaves_positions_on_no_lattice():
    geometry = AttentionGeometry(DilationConfig((8,), (4,), "split"), seq_len=8, num_heads=2)
    (geo,) = geometry.branches
    assert geo.offsets == (0, 1)
    assert [len(_lattices_holding(geo, p)) for p in range(8)] == [1, 1, 0, 0, 1, 1, 0, 0]


@given(geometry=geometries())
def test_lattice_lengths_add_up_to_the_segment(geometry):
    for geo in geometry.branches:
        for segment in range(geo.num_segments):
            start, stop = geo.segment_bounds(segment)
            assert stop - start == (min(geo.segment_length, geometry.seq_len - start))
            total = 0
            for offset in range(geo.dilation_rate):
                positions = geo.lattice_positions(segment, offset)
                assert geo.lattice_length(segment, offset) == positions.numel()
                assert all((p - start) % geo.dilation_rate == offset for p in positions.tolist())
                assert all(start <= p < stop for p in positions.tolist())
                total += positions.numel()
            assert total == stop - start


@given(geometry=geometries())
def test_compacted_index_round_trips_with_lattice_positions(geometry):
    every_position = torch.arange(geometry.seq_len)
    for geo in geometry.branches:
        for head in geo.heads:
            offset = geo.offset_of(head)
            on_lattice, index = geo.compacted_index(every_position, head)
            expected_positions = []
            for segment in range(geo.num_segments):
                positions = geo.lattice_positions(segment, offset)
                expected_positions += positions.tolist()
                on, t = geo.compacted_index(positions, head)
                assert on.all()
                assert t.tolist() == list(range(positions.numel()))  # lattice point t sits at start + o + r * t
            assert every_position[on_lattice].tolist() == expected_positions


@given(geometry=geometries())
def test_heads_with_offset_are_contiguous_runs_that_partition_the_branch(geometry):
    for geo in geometry.branches:
        runs = [geo.heads_with_offset(o) for o in geo.offsets]
        assert all(run.step == 1 and len(run) > 0 for run in runs)
        for offset, run in zip(geo.offsets, runs):
            assert list(run) == [h for h in geo.heads if geo.offset_of(h) == offset]
        assert [h for run in runs for h in run] == list(geo.heads)  # in order, disjoint, complete
        assert len(geo.heads_with_offset(geo.dilation_rate)) == 0  # no head has an offset >= r


@given(num_heads=st.integers(1, 16), data=st.data())
def test_branch_heads_is_tensor_split_in_split_mode(num_heads, data):
    num_branches = data.draw(st.integers(1, num_heads))
    groups = torch.tensor_split(torch.arange(num_heads), num_branches)
    for branch, group in enumerate(groups):
        assert list(branch_heads(num_heads, num_branches, "split", branch)) == group.tolist()
        assert list(branch_heads(num_heads, num_branches, "all", branch)) == list(range(num_heads))


@given(geometry=geometries())
def test_geometry_branches_use_the_effective_segment_length(geometry):
    d = geometry.dilation
    for g, geo in enumerate(geometry.branches):
        assert geo.segment_length == min(d.segment_lengths[g], geometry.seq_len)
        assert geo.dilation_rate == d.dilation_rates[g]
        assert list(geo.heads) == list(branch_heads(geometry.num_heads, d.num_branches, d.head_mode, g))
        assert geo.num_segments == math.ceil(geometry.seq_len / geo.segment_length)


def test_head_offset_examples():
    # torchscale: 4 heads, rate 2 -> offsets 0, 0, 1, 1; 3 heads, rate 2 -> 0, 0, 1.
    assert [head_offset(j, 4, 2) for j in range(4)] == [0, 0, 1, 1]
    assert [head_offset(j, 3, 2) for j in range(3)] == [0, 0, 1]
    assert [head_offset(j, 2, 4) for j in range(2)] == [0, 1]
