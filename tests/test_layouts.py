"""Block layouts, CSR block lists and flattened block tables (issue 2, section 3; docs/semantics.md section 3)."""

from __future__ import annotations

import brute_force
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from equivalence_tests import strategies as s
from reference import (
    AttentionGeometry,
    SparsePatternConfig,
    active_pair_count,
    block_list,
    block_tables,
    dense_multiplicity,
    layout_mask,
)

MAX_SEQ_LEN = 40


@st.composite
def configs_and_block_counts(draw, pattern_types=None):
    """A layout config and a block count nb it can serve (a custom layout needs NB >= nb)."""
    config = draw(s.layouts(pattern_types=pattern_types, max_seq_len=MAX_SEQ_LEN))
    most = config.block_layout.shape[0] if config.pattern_type == "custom" else 2 * MAX_SEQ_LEN
    return config, draw(st.integers(1, most))


@given(config_nb=configs_and_block_counts(), is_causal=s.causal_flags())
def test_layout_mask_matches_the_definition(config_nb, is_causal):
    config, nb = config_nb
    expected = brute_force.layout_rows_causal(config, nb) if is_causal else brute_force.layout_rows(config, nb)
    assert layout_mask(config, nb, is_causal).tolist() == expected, config


@given(config_nb=configs_and_block_counts())
def test_causal_removes_exactly_the_blocks_above_the_diagonal(config_nb):
    config, nb = config_nb
    full = layout_mask(config, nb, False)
    causal = layout_mask(config, nb, True)
    above = torch.ones(nb, nb, dtype=torch.bool).triu(1)
    assert not causal[above].any()
    assert torch.equal(causal[~above], full[~above])


@given(config_nb=configs_and_block_counts(pattern_types=("random", "dilated_sparse")))
def test_patterns_that_promise_the_diagonal_keep_it(config_nb):
    config, nb = config_nb
    assert layout_mask(config, nb).diagonal().all()


@given(seed=st.integers(0, 2**16), ratio=s.sparsity_ratios(), nb=st.integers(1, 50))
def test_random_layout_is_identical_for_the_same_seed(seed, ratio, nb):
    config = SparsePatternConfig(pattern_type="random", sparsity_ratio=ratio, seed=seed, block_size=4)
    first = layout_mask(config, nb)
    assert torch.equal(first, layout_mask(config, nb))
    # A fresh, equal config (another rank builds its own) gives the same layout, as does the
    # literal draw of docs/semantics.md section 3.
    twin = SparsePatternConfig(pattern_type="random", sparsity_ratio=ratio, seed=seed, block_size=4)
    assert torch.equal(first, layout_mask(twin, nb))
    generator = torch.Generator().manual_seed(seed)
    expected = (torch.rand((nb, nb), generator=generator) < ratio) | torch.eye(nb, dtype=torch.bool)
    assert torch.equal(first, expected)


def test_random_layout_depends_on_the_seed():
    masks = [
        layout_mask(SparsePatternConfig(pattern_type="random", sparsity_ratio=0.5, seed=seed), 16) for seed in (0, 1)
    ]
    assert not torch.equal(masks[0], masks[1])


def test_layout_mask_returns_a_copy_callers_may_modify():
    config = SparsePatternConfig(pattern_type="dense", block_size=2)
    layout_mask(config, 5).fill_(False)
    assert layout_mask(config, 5).all()


@given(config_nb=configs_and_block_counts(pattern_types=("custom",)), is_causal=s.causal_flags())
def test_custom_layout_uses_its_top_left_corner(config_nb, is_causal):
    config, nb = config_nb
    expected = config.block_layout[:nb, :nb]
    if is_causal:
        expected = expected & torch.ones(nb, nb, dtype=torch.bool).tril()
    assert torch.equal(layout_mask(config, nb, is_causal), expected)


def test_custom_layout_smaller_than_a_segment_needs_is_refused():
    config = SparsePatternConfig(pattern_type="custom", block_size=2, block_layout=torch.eye(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_layout"):
        layout_mask(config, 4)


@given(config_nb=configs_and_block_counts(), is_causal=s.causal_flags())
def test_block_list_is_the_layout_in_csr_form(config_nb, is_causal):
    config, nb = config_nb
    mask = layout_mask(config, nb, is_causal)
    blocks = block_list(config, nb, is_causal)
    assert blocks.num_blocks == nb
    assert blocks.row_ptr.tolist() == [0, *torch.cumsum(mask.sum(1), 0).tolist()]
    for qb in range(nb):
        row = blocks.key_blocks[blocks.row_ptr[qb] : blocks.row_ptr[qb + 1]].tolist()
        assert row == mask[qb].nonzero().flatten().tolist()  # ascending, exactly the allowed blocks
    assert torch.equal(blocks.to_dense(), mask)


# --------------------------------------------------------------------------------------------
# Block tables over a whole call geometry
# --------------------------------------------------------------------------------------------


@st.composite
def geometries(draw, max_seq_len=MAX_SEQ_LEN):
    shape = draw(s.shapes(max_batch=1, max_seq_len=max_seq_len))
    dilation = draw(s.dilations(shape.num_heads, shape.seq_len))
    config = draw(s.layouts(max_seq_len=shape.seq_len))
    return AttentionGeometry(dilation, shape.seq_len, shape.num_heads), config


@st.composite
def chunk_ranges(draw, seq_len):
    """None (the whole sequence) or a non-empty [lo, hi) chunk."""
    if draw(st.booleans()):
        return None
    lo = draw(st.integers(0, seq_len - 1))
    return lo, draw(st.integers(lo + 1, seq_len))


def _points(table, row, block, lo, hi):
    """Global positions of compacted block ``block`` of table row ``row`` that lie in [lo, hi)."""
    b, stride = table.block_size, table.stride
    start, length = int(table.lattice_start[row]), int(table.lattice_length[row])
    t = torch.arange(block * b, min((block + 1) * b, length))
    positions = start + stride * t
    return positions[(positions >= lo) & (positions < hi)]


@given(geometry_config=geometries(), is_causal=s.causal_flags(), data=st.data())
def test_block_tables_list_exactly_the_blocks_of_allowed_pairs(geometry_config, is_causal, data):
    geometry, config = geometry_config
    n = geometry.seq_len
    query_range = data.draw(chunk_ranges(n), label="query_range")
    key_range = data.draw(chunk_ranges(n), label="key_range")
    q0, q1 = query_range or (0, n)
    k0, k1 = key_range or (0, n)
    allowed = dense_multiplicity(geometry, config, is_causal, None, query_range, key_range)[0]
    # covered[h, i, j]: in how many tables (one per branch for a head) a listed block holds (i, j).
    covered = torch.zeros_like(allowed)
    chunked = query_range is not None or key_range is not None
    for table in block_tables(geometry, config, is_causal, query_range, key_range):
        assert table.stride == geometry.branches[table.branch].dilation_rate
        assert table.block_size == config.block_size
        assert list(table.heads) == [
            h
            for h in geometry.branches[table.branch].heads
            if geometry.branches[table.branch].offset_of(h) == table.offset
        ]
        heads = torch.tensor(list(table.heads), dtype=torch.long)
        for row in range(table.num_rows):
            qb = int(table.query_block[row])
            q_points = _points(table, row, qb, q0, q1)
            assert q_points.numel() > 0, "a row without a query point in the chunk"
            for entry in range(int(table.row_ptr[row]), int(table.row_ptr[row + 1])):
                kb = int(table.key_block[entry])
                k_points = _points(table, row, kb, k0, k1)
                assert k_points.numel() > 0, "a listed key block without a key point in the chunk"
                qi = (q_points - q0)[:, None]
                kj = (k_points - k0)[None, :]
                covered[heads[:, None, None], qi[None], kj[None]] += 1
                holds_allowed = bool((allowed[heads[:, None, None], qi[None], kj[None]] > 0).any())
                # Only the diagonal block of a causal layout, cut by a chunk, may lose every pair.
                assert holds_allowed or (is_causal and chunked and kb == qb), (table.branch, row, qb, kb)
    if is_causal:
        causal = torch.arange(q0, q1)[:, None] >= torch.arange(k0, k1)[None, :]
        covered = covered * causal
    assert torch.equal(covered, allowed)


@given(geometry_config=geometries(), is_causal=s.causal_flags(), data=st.data())
def test_block_tables_keep_every_query_point_of_every_lattice(geometry_config, is_causal, data):
    geometry, config = geometry_config
    query_range = data.draw(chunk_ranges(geometry.seq_len), label="query_range")
    q0, q1 = query_range or (0, geometry.seq_len)
    tables = {(t.branch, t.offset): t for t in block_tables(geometry, config, is_causal, query_range, None)}
    for geo in geometry.branches:
        for offset in geo.offsets:
            table = tables.pop((geo.branch, offset))
            listed = sorted(
                int(p)
                for row in range(table.num_rows)
                for p in _points(table, row, int(table.query_block[row]), q0, q1)
            )
            expected = sorted(
                int(p)
                for segment in range(geo.num_segments)
                for p in geo.lattice_positions(segment, offset)
                if q0 <= int(p) < q1
            )
            assert listed == expected
    assert not tables, f"tables for offsets no head uses: {list(tables)}"


@given(geometry_config=geometries(), is_causal=s.causal_flags(), data=st.data())
def test_block_table_rows_know_their_segment(geometry_config, is_causal, data):
    """Each row's segment bounds are the segment (BranchGeometry.segment_bounds) its lattice lies in."""
    geometry, config = geometry_config
    query_range = data.draw(chunk_ranges(geometry.seq_len), label="query_range")
    for table in block_tables(geometry, config, is_causal, query_range, None):
        geo = geometry.branches[table.branch]
        assert table.segment_start.shape == table.segment_stop.shape == (table.num_rows,)
        for row in range(table.num_rows):
            start, stop = int(table.segment_start[row]), int(table.segment_stop[row])
            segment = start // geo.segment_length
            assert (start, stop) == geo.segment_bounds(segment), (table.branch, row)
            first = int(table.lattice_start[row])
            last = first + table.stride * (int(table.lattice_length[row]) - 1)
            assert start <= first <= last < stop, (table.branch, row, start, first, last, stop)
            assert first - start == table.offset


@given(geometry_config=geometries(), is_causal=s.causal_flags())
def test_active_pair_count_equals_the_dense_count(geometry_config, is_causal):
    geometry, config = geometry_config
    assert active_pair_count(geometry, config, is_causal) == int(dense_multiplicity(geometry, config, is_causal).sum())


@given(geometry_config=geometries(), is_causal=s.causal_flags(), data=st.data())
def test_column_lists_hold_every_entry_once_grouped_by_key_block(geometry_config, is_causal, data):
    """The transposed lists a backward pass walks: the same (lattice, query block, key block) triples."""
    geometry, config = geometry_config
    n = geometry.seq_len
    query_range = data.draw(chunk_ranges(n), label="query_range")
    key_range = data.draw(chunk_ranges(n), label="key_range")
    for table in block_tables(geometry, config, is_causal, query_range, key_range):
        columns = table.columns
        rows = table.entry_row
        row_wise = sorted(
            zip(table.lattice_start[rows].tolist(), table.query_block[rows].tolist(), table.key_block.tolist())
        )
        column_wise = []
        for c in range(columns.num_columns):
            entries = columns.entry[columns.col_ptr[c] : columns.col_ptr[c + 1]]
            assert entries.numel() > 0, "a column exists only where some row attends it"
            assert torch.equal(table.key_block[entries], columns.key_block[c].expand(entries.numel()))
            assert torch.equal(table.lattice_start[rows[entries]], columns.lattice_start[c].expand(entries.numel()))
            assert torch.equal(table.lattice_length[rows[entries]], columns.lattice_length[c].expand(entries.numel()))
            query_blocks = table.query_block[rows[entries]]
            assert bool((query_blocks[1:] > query_blocks[:-1]).all()), "ascending query blocks, each once"
            column_wise += [
                (int(columns.lattice_start[c]), qb, int(columns.key_block[c])) for qb in query_blocks.tolist()
            ]
        assert sorted(column_wise) == row_wise
        keys = list(zip(columns.lattice_start.tolist(), columns.key_block.tolist()))
        assert keys == sorted(set(keys)), "one column per (lattice, key block), in that order"
