"""docs/semantics.md sections 2-4 where rounding, truncation and clamping matter, against tests/brute_force.py.

The reference and every backend take heads, offsets, lattices and block tables from
``reference.semantics``, so comparing them cannot see a fault there: only a test with its own
definition can. The property tests draw random geometries, in which some edges are rare (an offset
past the segment's end, a segment that misses a key chunk, a ratio equal to a random draw); the
cases here hold each of them, chosen where ``make mutation`` (experiments/mutation.py) found a
changed rule that passed every other test.
"""

from __future__ import annotations

import dataclasses
import math

import brute_force
import pytest
import torch

from reference import (
    AttentionGeometry,
    DilationConfig,
    SparsePatternConfig,
    active_block_count,
    active_pair_count,
    block_list,
    block_table,
    block_tables,
    dense_multiplicity,
    layout_mask,
)


def _custom_layout(blocks: int, seed: int) -> torch.Tensor:
    return torch.rand(blocks, blocks, generator=torch.Generator().manual_seed(seed)) < 0.5


# (id, N, H, segment lengths, rates, head mode, layout): each one an edge of section 2 or 3.
EDGES = [
    # rate 3 > segment 2: the heads' offsets are 0, 1, 2 and offset 2 lies past every segment's end
    ("offset-past-every-segment", 7, 3, (2,), (3,), "split", dict(pattern_type="dense", block_size=1)),
    # segments [0, 5) [5, 10) [10, 11): the last is shorter than offset 1, lattices of 3 and 2 points
    (
        "odd-segment-short-last",
        11,
        2,
        (5,),
        (2,),
        "split",
        dict(pattern_type="local_window", block_size=2, local_window_size=5),
    ),
    # 5 heads at rate 3: runs of ceil(5 / 3) = 2, offsets 0 0 1 1 2; blocks of 2 over lattices of 3 and 2
    (
        "heads-not-divisible-by-the-rate",
        13,
        5,
        (7,),
        (3,),
        "split",
        dict(pattern_type="global_local", block_size=2, local_window_size=4, global_tokens=3),
    ),
    # a lattice of 10 points in blocks of 3: a last block of 1
    (
        "block-not-dividing-the-lattice",
        10,
        1,
        (10,),
        (1,),
        "split",
        dict(pattern_type="dilated_sparse", sparsity_ratio=0.45, block_size=3),
    ),
    # segment 9 > N acts as N; every head in both branches
    (
        "segment-longer-than-the-sequence",
        6,
        2,
        (9, 4),
        (2, 1),
        "all",
        dict(pattern_type="random", sparsity_ratio=0.4, block_size=2, seed=3),
    ),
    # two branches over three heads, a custom layout
    (
        "custom-two-branches",
        9,
        3,
        (3, 9),
        (1, 2),
        "split",
        dict(pattern_type="custom", block_size=1, block_layout=_custom_layout(9, 7)),
    ),
]


def _geometry(case):
    _, seq_len, num_heads, segments, rates, head_mode, layout = case
    geometry = AttentionGeometry(DilationConfig(segments, rates, head_mode), seq_len, num_heads)
    return geometry, SparsePatternConfig(**layout)


def _chunks(n: int):
    """(query range, key range) pairs: the whole sequence, overlapping chunks, disjoint ones, reversed ones, and a
    chunk that falls between two lattice points."""
    # (1, 3) lies between two points of a lattice of rate >= 3, inside one of its blocks: a chunk with no point
    return [
        (None, None),
        ((1, n - 2), (2, n)),
        ((0, n // 2), (n // 2, n)),
        ((n - 3, n), (0, 4)),
        ((2, 5), None),
        ((1, 3), (1, 3)),
    ]


edge_cases = pytest.mark.parametrize("case", EDGES, ids=[case[0] for case in EDGES])
causal_flags = pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])


def _lattices(case, head: int) -> list[tuple[int, int, list[int]]]:
    """The brute force's lattices of one head: (segment start, segment stop, positions) per branch it is in."""
    _, seq_len, num_heads, segments, rates, head_mode, _ = case
    lattices = []
    for g, (w, r) in enumerate(zip(segments, rates)):
        heads = brute_force.heads_of_branch(num_heads, len(segments), head_mode, g)
        if head not in heads:
            continue
        o = brute_force.offset_of(heads.index(head), len(heads), r)
        w = min(w, seq_len)
        for start in range(0, seq_len, w):
            stop = min(start + w, seq_len)
            lattices.append((start, stop, [i for i in range(start, stop) if (i - start) % r == o]))
    return lattices


def _table_points(table, row: int, block: int, lo: int, hi: int) -> list[int]:
    start, length = int(table.lattice_start[row]), int(table.lattice_length[row])
    t = range(block * table.block_size, min((block + 1) * table.block_size, length))
    return [start + table.stride * x for x in t if lo <= start + table.stride * x < hi]


@edge_cases
@causal_flags
def test_dense_multiplicity_is_the_brute_force_count_with_padding(case, is_causal):
    geometry, config = _geometry(case)
    n, heads = geometry.seq_len, geometry.num_heads
    padding = torch.zeros(2, n, dtype=torch.bool)
    padding[1, 1::3] = True  # batch 0 pads nothing, batch 1 every third key
    counts = dense_multiplicity(geometry, config, is_causal, padding)
    assert counts.shape == (2, heads, n, n)
    for b in range(2):
        expected = brute_force.multiplicity(n, heads, geometry.dilation, config, is_causal, padding[b].tolist())
        assert counts[b].tolist() == expected, (b, case[0])
    assert torch.equal(dense_multiplicity(geometry, config, is_causal)[0], counts[0])


@edge_cases
@causal_flags
def test_block_tables_hold_exactly_the_brute_force_pairs_of_each_chunk(case, is_causal):
    """Every pair of the brute force within the chunks, once per branch; no row or key block without a point."""
    geometry, config = _geometry(case)
    n = geometry.seq_len
    allowed = torch.tensor(brute_force.multiplicity(n, geometry.num_heads, geometry.dilation, config, is_causal))
    for query_range, key_range in _chunks(n):
        (q0, q1), (k0, k1) = query_range or (0, n), key_range or (0, n)
        overlap = (max(q0, k0), min(q1, k1))
        covered = torch.zeros(geometry.num_heads, n, n, dtype=torch.long)
        tables = block_tables(geometry, config, is_causal, query_range, key_range)
        for table in tables:
            assert (table.query_limits, table.key_limits) == ((q0, q1), (k0, k1))
            assert table.row_ptr[0] == 0 and table.row_ptr[-1] == table.nnz == table.key_block.numel()
            assert torch.equal(table.row_counts, table.row_ptr[1:] - table.row_ptr[:-1])
            heads = list(table.heads)
            for row in range(table.num_rows):
                # a row belongs to a segment that meets both chunks (docs/semantics.md section 5's partials)
                assert table.segment_start[row] < overlap[1] and table.segment_stop[row] > overlap[0], row
                q_points = _table_points(table, row, int(table.query_block[row]), q0, q1)
                assert q_points, f"row {row} has no query point in {query_range}"
                for entry in range(int(table.row_ptr[row]), int(table.row_ptr[row + 1])):
                    k_points = _table_points(table, row, int(table.key_block[entry]), k0, k1)
                    assert k_points, f"key block {int(table.key_block[entry])} has no point in {key_range}"
                    for h in heads:
                        for i in q_points:
                            for j in k_points:
                                covered[h, i, j] += 1 if (j <= i or not is_causal) else 0
        window = (slice(None), slice(q0, q1), slice(k0, k1))
        assert torch.equal(covered[window], allowed[window]), (case[0], query_range, key_range)
        assert not covered.sum() - covered[window].sum(), "a pair outside the chunks"


@edge_cases
@causal_flags
def test_block_tables_list_every_query_point_of_a_segment_that_meets_both_chunks(case, is_causal):
    geometry, config = _geometry(case)
    n = geometry.seq_len
    for query_range, key_range in _chunks(n):
        (q0, q1), (k0, k1) = query_range or (0, n), key_range or (0, n)
        lo, hi = max(q0, k0), min(q1, k1)
        for head in range(geometry.num_heads):
            listed = sorted(
                p
                for table in block_tables(geometry, config, is_causal, query_range, key_range)
                if head in table.heads
                for row in range(table.num_rows)
                for p in _table_points(table, row, int(table.query_block[row]), q0, q1)
            )
            # a segment that meets both chunks keeps its rows (with or without key blocks): the same
            # condition as the table's, written for the segment's bounds
            expected = sorted(
                p
                for start, stop, lattice in _lattices(case, head)
                if start < hi and stop > lo
                for p in lattice
                if q0 <= p < q1
            )
            assert listed == expected, (case[0], head, query_range, key_range)


@edge_cases
@causal_flags
def test_active_counts_are_the_brute_force_counts(case, is_causal):
    geometry, config = _geometry(case)
    n = geometry.seq_len
    pairs = brute_force.multiplicity(n, geometry.num_heads, geometry.dilation, config, is_causal)
    assert active_pair_count(geometry, config, is_causal) == sum(map(sum, (map(sum, head) for head in pairs)))
    blocks = 0
    layout = brute_force.layout_rows_causal if is_causal else brute_force.layout_rows
    for head in range(geometry.num_heads):
        for _, _, lattice in _lattices(case, head):
            nb = math.ceil(len(lattice) / config.block_size)
            blocks += sum(map(sum, layout(config, nb))) if nb else 0
    assert active_block_count(geometry, config, is_causal) == blocks


@edge_cases
def test_column_lists_count_the_entries_of_each_key_block(case):
    geometry, config = _geometry(case)
    for query_range, key_range in _chunks(geometry.seq_len):
        for table in block_tables(geometry, config, True, query_range, key_range):
            columns = table.columns
            rows = table.entry_row
            assert torch.equal(columns.col_counts, columns.col_ptr[1:] - columns.col_ptr[:-1])
            expected = [
                int(((table.lattice_start[rows] == start) & (table.key_block == key)).sum())
                for start, key in zip(columns.lattice_start.tolist(), columns.key_block.tolist())
            ]
            assert columns.col_counts.tolist() == expected
            assert int(columns.col_counts.sum()) == table.nnz == columns.entry.numel()


def test_the_causal_flag_defaults_to_false_everywhere():
    geometry, config = _geometry(EDGES[1])
    dense = SparsePatternConfig(pattern_type="dense", block_size=2)
    assert not torch.equal(block_list(dense, 3).to_dense(), block_list(dense, 3, True).to_dense())
    assert torch.equal(block_list(dense, 3).to_dense(), torch.ones(3, 3, dtype=torch.bool))
    assert block_list(config, 5).nnz == int(layout_mask(config, 5).sum()) == block_list(config, 5, False).nnz
    full = block_tables(geometry, config, False)
    assert [t.nnz for t in block_tables(geometry, config)] == [t.nnz for t in full]
    assert [block_table(geometry, config, t.branch, t.offset).nnz for t in full] == [t.nnz for t in full]
    assert sum(t.nnz for t in full) > sum(t.nnz for t in block_tables(geometry, config, True))
    assert active_pair_count(geometry, config) == active_pair_count(geometry, config, False)
    assert active_pair_count(geometry, config) > active_pair_count(geometry, config, True)
    assert active_block_count(geometry, config) == active_block_count(geometry, config, False)
    assert active_block_count(geometry, config) > active_block_count(geometry, config, True)
    assert torch.equal(dense_multiplicity(geometry, config), dense_multiplicity(geometry, config, False))
    table = block_table(geometry, config, 0, 0)
    assert (table.query_limits, table.key_limits) == ((0, geometry.seq_len), (0, geometry.seq_len))


def test_a_random_draw_equal_to_the_ratio_is_not_kept():
    """docs/semantics.md section 3: kept where the draw is strictly below sparsity_ratio (or on the diagonal)."""
    draws = torch.rand((6, 6), generator=torch.Generator().manual_seed(11))
    ratio = float(draws[2, 4])  # a float32 value, exact as a Python float
    config = SparsePatternConfig(pattern_type="random", sparsity_ratio=ratio, seed=11, block_size=1)
    mask = layout_mask(config, 6)
    assert not mask[2, 4]
    assert torch.equal(mask, (draws < ratio) | torch.eye(6, dtype=torch.bool))


def test_compacted_indices_are_integers_that_index_the_lattice():
    geometry = AttentionGeometry(DilationConfig((7,), (3,)), seq_len=16, num_heads=5)
    (geo,) = geometry.branches
    positions = torch.arange(16)
    for head in geo.heads:
        on_lattice, index = geo.compacted_index(positions, head)
        assert index.dtype == torch.long
        offset = geo.offset_of(head)
        for p in positions[on_lattice].tolist():
            segment = p // geo.segment_length
            assert int(geo.lattice_positions(segment, offset)[index[p]]) == p


def test_geometry_records_are_frozen():
    """Tables, block lists and geometries are cached and shared by every caller: none may be changed."""
    geometry, config = _geometry(EDGES[2])
    table = block_tables(geometry, config)[0]
    for record, name in [
        (geometry.branches[0], "dilation_rate"),
        (block_list(config, 4), "num_blocks"),
        (table, "stride"),
        (table.columns, "key_block"),
        (geometry, "seq_len"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, name, 2)


@pytest.mark.parametrize("field", ["seq_len", "num_heads"])
@pytest.mark.parametrize("value", [True, False, 2.0, 0, -1], ids=repr)
def test_geometry_refuses_a_length_or_head_count_that_is_not_a_positive_int(field, value):
    # head_mode "all": no branch count to compare num_heads with, so only the field's own check can refuse it
    arguments = dict(dilation=DilationConfig((4,), (1,), "all"), seq_len=8, num_heads=2)
    arguments[field] = value
    with pytest.raises(ValueError, match=field):
        AttentionGeometry(**arguments)


# --------------------------------------------------------------------------------------------
# dense_multiplicity's size guard: 2**26 elements (512 MB of counts) without allow_large
# --------------------------------------------------------------------------------------------


def _lattice_of_one_point(seq_len: int, num_heads: int):
    """A geometry whose every lattice holds one point (rate = segment = N): building it costs the tensor only."""
    return AttentionGeometry(DilationConfig((seq_len,), (seq_len,), "all"), seq_len, num_heads)


def test_dense_multiplicity_builds_exactly_the_limit():
    # B * H * Nq * Nk = 2 * 2 * 4096 * 4096 = 2**26, with chunks that do not start at 0
    geometry = _lattice_of_one_point(4100, 2)
    padding = torch.zeros(2, 4100, dtype=torch.bool)
    counts = dense_multiplicity(
        geometry,
        SparsePatternConfig(pattern_type="dense", block_size=1),
        False,
        padding,
        query_range=(1, 4097),
        key_range=(2, 4098),
    )
    assert counts.shape == (2, 2, 4096, 4096)
    # head 0's one lattice point is position 0 (outside both chunks), head 1's position 1 (outside the key chunk)
    assert int(counts.sum()) == 0


def test_dense_multiplicity_refuses_one_row_more_naming_the_sizes():
    geometry = _lattice_of_one_point(4100, 2)
    padding = torch.zeros(2, 4100, dtype=torch.bool)
    config = SparsePatternConfig(pattern_type="dense", block_size=1)
    with pytest.raises(ValueError) as info:
        dense_multiplicity(geometry, config, False, padding, query_range=(1, 4097), key_range=(2, 4099))
    message = str(info.value)
    assert f"{2 * 2 * 4096 * 4097} elements" in message and "B=2, H=2, Nq=4096, Nk=4097" in message
    assert "allow_large=True" in message
