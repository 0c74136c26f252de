"""The torch backend's row grouping (optimized.blocks.row_groups) against an exhaustive search of its cost model.

Any grouping gives the same attention, so the output tests cannot see a wrong bucket, a wrong
group count or a cover that is not the cheapest: only its own definition can. Here the model of
the docstring is written out once more and every cover of the factor-2 buckets is tried (found by
``make mutation``, experiments/mutation.py).
"""

from __future__ import annotations

import dataclasses
import itertools
from types import SimpleNamespace

import pytest
import torch

from optimized import blocks
from reference import AttentionGeometry, DilationConfig, SparsePatternConfig, block_tables


def _bucket(count: int) -> int:
    """[2^b, 2^(b+1)) holds bucket b; rows without key blocks are bucket -1."""
    return count.bit_length() - 1 if count > 0 else -1


def _model_cost(counts: list[int], runs, group_size: int, blocks_per_row: int, overhead: float) -> float:
    """Each run of rows (longest first) costs its longest count (a step of no block still costs one) times
    (its groups of ``group_size`` rows x the step overhead + its rows x ``blocks_per_row``)."""
    total = 0.0
    for start, stop in runs:
        groups = (stop - start + group_size - 1) // group_size
        total += max(counts[start], 1) * (groups * overhead + (stop - start) * blocks_per_row)
    return total


def _cheapest_groupings(counts: list[int], group_size: int, blocks_per_row: int, overhead: float):
    """Every grouping of the cheapest covers: runs cut at bucket changes, split into groups of ``group_size``."""
    boundaries = [i for i in range(1, len(counts)) if _bucket(counts[i]) != _bucket(counts[i - 1])]
    covers = []
    for chosen in itertools.product((False, True), repeat=len(boundaries)):
        edges = [0] + [b for b, take in zip(boundaries, chosen) if take] + [len(counts)]
        runs = list(zip(edges[:-1], edges[1:]))
        covers.append((_model_cost(counts, runs, group_size, blocks_per_row, overhead), runs))
    best = min(cost for cost, _ in covers)
    return [
        [(row, min(row + group_size, stop)) for start, stop in runs for row in range(start, stop, group_size)]
        for cost, runs in covers
        if cost <= best * (1 + 1e-12)
    ]


ROW_COUNTS = {
    "global-rows-and-a-tail": [40, 1, 1, 1, 1, 1, 1, 1, 3, 2, 0, 0, 17, 9, 5, 2, 2],
    "every-power-of-two-edge": [64, 33, 32, 31, 16, 15, 8, 7, 4, 3, 2, 1, 0],
    "one-bucket": [6] * 11,
    "only-empty-rows": [0, 0, 0, 0],
    "two-heavy-many-light": [100, 100, 5, 5, 6, 7, 4, 4, 5, 6, 0],
    # rows without key blocks next to rows of one block, then of two or three: where their buckets meet
    # matters only when groups are split (found by an exhaustive search over this grid)
    "ones-then-empty": [0, 1, 2, 0, 1],
    "twos-then-empty": [0, 3, 0, 2, 0],
}


@pytest.mark.parametrize("name", ROW_COUNTS)
@pytest.mark.parametrize("overhead", [256, 0, 3, 1e6])
@pytest.mark.parametrize("group_size, blocks_per_row", [(100, 1), (3, 1), (4, 8), (1, 2)])
def test_row_groups_are_a_cheapest_cover_of_the_buckets(monkeypatch, name, overhead, group_size, blocks_per_row):
    row_counts = torch.tensor(ROW_COUNTS[name])
    monkeypatch.setattr(blocks, "STEP_OVERHEAD_BLOCKS", overhead)  # read at call time (the docstring says so)
    table = SimpleNamespace(row_counts=row_counts)
    order = sorted(range(len(row_counts)), key=lambda row: -int(row_counts[row]))  # stable: ties in table order
    assert blocks.rows_by_count(table).tolist() == order
    counts = [int(row_counts[row]) for row in order]
    groups = blocks.row_groups(table, group_size, blocks_per_row)
    assert groups in _cheapest_groupings(counts, group_size, blocks_per_row, overhead), groups
    if blocks_per_row == 1:
        assert blocks.row_groups(table, group_size) == groups  # one score block per row unless told


def test_rows_with_equal_counts_keep_the_table_order():
    """Many ties (the sort is stable), as a long lattice of one local window gives."""
    row_counts = torch.randint(0, 3, (500,), generator=torch.Generator().manual_seed(5))
    order = sorted(range(500), key=lambda row: -int(row_counts[row]))
    assert blocks.rows_by_count(SimpleNamespace(row_counts=row_counts)).tolist() == order


def test_no_rows_give_no_groups():
    assert blocks.row_groups(SimpleNamespace(row_counts=torch.zeros(0, dtype=torch.long)), 8) == []


# --------------------------------------------------------------------------------------------
# Layers of tables: disjoint heads, tables with rows only
# --------------------------------------------------------------------------------------------


def _tables(seq_len, num_heads, segments, rates, head_mode, query_range=None):
    geometry = AttentionGeometry(DilationConfig(segments, rates, head_mode), seq_len, num_heads)
    config = SparsePatternConfig(pattern_type="dense", block_size=1)
    return block_tables(geometry, config, False, query_range)


@pytest.mark.parametrize(
    "arguments, layers",
    [
        # head_mode "split": one layer; rate 3 > segment 2 leaves offset 2's table without rows
        (dict(seq_len=7, num_heads=3, segments=(2,), rates=(3,), head_mode="split"), [[0, 1]]),
        # a query chunk of one point: offset 0's table has one row, offset 1's none
        (dict(seq_len=7, num_heads=3, segments=(2,), rates=(3,), head_mode="split", query_range=(0, 1)), [[0]]),
        (dict(seq_len=9, num_heads=3, segments=(3, 9), rates=(1, 2), head_mode="split"), [[0, 1]]),
        # head_mode "all": one layer per branch
        (dict(seq_len=6, num_heads=2, segments=(9, 4), rates=(2, 1), head_mode="all"), [[0, 1], [2]]),
    ],
)
def test_layers_hold_the_tables_with_rows_one_per_branch_in_head_mode_all(arguments, layers):
    tables = _tables(**arguments)
    assert [t.num_rows > 0 for t in tables].count(True) == sum(map(len, layers))
    assert blocks.head_layers(tables) == layers
    expected = [(layer, tables[index]) for layer, members in enumerate(layers) for index in members]
    assert list(blocks.tables_by_layer(tables)) == expected
    assert list(blocks.indexed_tables_by_layer(tables)) == [(layer, i) for layer, m in enumerate(layers) for i in m]


def test_a_table_joins_the_first_layer_whose_heads_it_does_not_share():
    table = lambda heads, rows: SimpleNamespace(heads=range(*heads), num_rows=rows)  # noqa: E731
    tables = [
        table((0, 2), 3),
        table((0, 0), 2),
        table((2, 4), 0),
        table((0, 2), 2),
        table((2, 3), 1),
        table((0, 4), 5),
    ]
    assert blocks.head_layers(tables) == [[0, 4], [3], [5]]


def test_device_tables_are_frozen_copies_of_the_table():
    table = _tables(seq_len=7, num_heads=3, segments=(2,), rates=(3,), head_mode="split")[0]
    device_table = blocks.DeviceTable.of(table, torch.device("cpu"))
    assert torch.equal(device_table.row_count, table.row_counts) and torch.equal(
        device_table.key_block, table.key_block
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        device_table.row_count = table.row_counts
