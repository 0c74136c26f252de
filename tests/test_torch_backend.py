"""Backend "torch" against the float64 dense reference (docs/semantics.md sections 4 and 5, docs/numerics.md)."""

from __future__ import annotations

import pytest
import torch
from random_inputs import make_inputs

import optimized
from optimized import torch_backend
from optimized.plan import CallPlan
from reference import (
    AttentionGeometry,
    DilationConfig,
    SparsePatternConfig,
    assert_within_budget,
    compare,
    partial_attention,
)
from reference import (
    BlockSparseRingDilatedAttention as ReferenceAttention,
)
from reference.verification import K_GRADIENT


def check_partial(forward, q, k, v, mask, geometry, config, causal, query_range, key_range, context):
    """Run ``forward`` on the chunks and compare (out, lse) with the reference; returns the empty-row mask."""
    q0, q1 = query_range
    k0, k1 = key_range
    qc, kc, vc = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]
    mc = None if mask is None else mask[:, k0:k1]
    scale = q.shape[-1] ** -0.5
    plan = CallPlan(geometry, config, causal, scale, query_range, key_range)
    out, lse = forward(qc, kc, vc, mc, plan)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    kwargs = dict(query_start=q0, key_start=k0, is_causal=causal, key_padding_mask=mc, scale=scale)
    out64, lse64 = partial_attention(qc, kc, vc, geometry, config, **kwargs)
    out_lowp, lse_lowp = partial_attention(qc, kc, vc, geometry, config, compute_dtype=None, **kwargs)
    empty = torch.isneginf(lse64)
    assert_within_budget(compare("lse", lse, lse64, lse_lowp, q.dtype, empty=empty, empty_value=float("-inf")), context)
    out_empty = empty.transpose(1, 2).unsqueeze(-1)
    assert_within_budget(compare("out", out, out64, out_lowp, q.dtype, empty=out_empty, empty_value=0.0), context)
    return empty


def torch_forward(work_size):
    return lambda q, k, v, mask, plan: torch_backend.partial_forward(q, k, v, mask, plan, work_size=work_size)


# (segment_lengths, dilation_rates, head_mode, H, H_kv, N, config kwargs)
LAYOUT_CASES = {
    "dense": dict(pattern_type="dense", block_size=4),
    "local_window": dict(pattern_type="local_window", block_size=3, local_window_size=12),
    "global_local": dict(pattern_type="global_local", block_size=4, local_window_size=8, global_tokens=5),
    "dilated_sparse": dict(pattern_type="dilated_sparse", block_size=3, sparsity_ratio=0.34),
    "random": dict(pattern_type="random", block_size=4, sparsity_ratio=0.3, seed=3),
    "custom": dict(pattern_type="custom", block_size=3),
}


def make_config(kwargs, max_blocks=64):
    kwargs = dict(kwargs)
    if kwargs["pattern_type"] == "custom":
        generator = torch.Generator().manual_seed(11)
        kwargs["block_layout"] = torch.rand(max_blocks, max_blocks, generator=generator) < 0.4
    return SparsePatternConfig(**kwargs)


@pytest.mark.parametrize("pattern", sorted(LAYOUT_CASES))
@pytest.mark.parametrize("head_mode", ["split", "all"])
@pytest.mark.parametrize("causal", [False, True])
def test_every_layout_matches_reference(pattern, head_mode, causal):
    config = make_config(LAYOUT_CASES[pattern])
    # Partial last segments (N not a multiple of 16 or 24) and partial last blocks.
    geometry = AttentionGeometry(DilationConfig((16, 24), (1, 2), head_mode), 53, 4)
    q, k, v, mask = make_inputs(hash((pattern, head_mode, causal)) % 1000, 2, 53, 4, 2, 8, torch.float32, 0.15, True)
    check_partial(
        torch_forward(7),
        q,
        k,
        v,
        mask,
        geometry,
        config,
        causal,
        (0, 53),
        (0, 53),
        f"{pattern} {head_mode} causal={causal}",
    )


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sizes_and_dtypes(block_size, dtype):
    config = SparsePatternConfig(pattern_type="local_window", block_size=block_size, local_window_size=4 * block_size)
    geometry = AttentionGeometry(DilationConfig((32, 64), (1, 3), "split"), 70, 3)
    q, k, v, mask = make_inputs(block_size, 1, 70, 3, 3, 16, dtype, 0.1)
    check_partial(
        torch_forward(4096),
        q,
        k,
        v,
        mask,
        geometry,
        config,
        True,
        (0, 70),
        (0, 70),
        f"block_size={block_size} dtype={dtype}",
    )


def test_float16_inputs_accumulate_in_float32():
    config = SparsePatternConfig(pattern_type="dilated_sparse", block_size=4, sparsity_ratio=0.5)
    geometry = AttentionGeometry(DilationConfig((20, 40), (1, 2), "all"), 40, 2)
    q, k, v, mask = make_inputs(5, 1, 40, 2, 1, 8, torch.float16)
    check_partial(torch_forward(3), q, k, v, mask, geometry, config, False, (0, 40), (0, 40), "float16")


@pytest.mark.parametrize(
    "query_range, key_range",
    [((0, 20), (0, 61)), ((17, 45), (0, 30)), ((30, 61), (13, 44)), ((5, 6), (40, 61)), ((50, 61), (0, 9))],
)
@pytest.mark.parametrize("head_mode", ["split", "all"])
def test_chunked_query_and_key_ranges(query_range, key_range, head_mode):
    config = SparsePatternConfig(pattern_type="global_local", block_size=3, local_window_size=9, global_tokens=4)
    geometry = AttentionGeometry(DilationConfig((12, 30), (1, 3), head_mode), 61, 4)
    q, k, v, mask = make_inputs(sum(query_range + key_range), 2, 61, 4, 2, 8, torch.float32, 0.1)
    check_partial(
        torch_forward(5),
        q,
        k,
        v,
        mask,
        geometry,
        config,
        True,
        query_range,
        key_range,
        f"chunks q={query_range} k={key_range} {head_mode}",
    )


def test_chunks_merge_to_the_whole_result():
    # docs/semantics.md section 5: partials over disjoint key chunks merge exactly to the unsplit result.
    from reference.merge import merge_partials

    config = SparsePatternConfig(pattern_type="random", block_size=4, sparsity_ratio=0.4)
    geometry = AttentionGeometry(DilationConfig((16, 32), (1, 2), "all"), 48, 2)
    q, k, v, mask = make_inputs(21, 1, 48, 2, 2, 8, torch.float32, 0.1)
    scale = 8**-0.5
    whole = torch_backend.partial_forward(q, k, v, mask, CallPlan.whole(geometry, config, True, scale))
    out, lse = None, None
    for k0, k1 in ((0, 13), (13, 30), (30, 48)):
        plan = CallPlan(geometry, config, True, scale, (0, 48), (k0, k1))
        part = torch_backend.partial_forward(q, k[:, k0:k1], v[:, k0:k1], mask[:, k0:k1], plan)
        out, lse = part if out is None else merge_partials(out, lse, *part)
    assert_within_budget(compare("merged out", out, whole[0].double(), whole[0], torch.float32))
    assert_within_budget(
        compare(
            "merged lse",
            lse,
            whole[1].double(),
            whole[1],
            torch.float32,
            empty=torch.isneginf(whole[1]),
            empty_value=float("-inf"),
        )
    )


def test_empty_rows_are_exact_and_present():
    # Every key padded in batch 0: every row of batch 0 is empty. In batch 1 a head's rows are
    # empty exactly off its lattice (rate 2: every other position).
    config = SparsePatternConfig(pattern_type="local_window", block_size=4, local_window_size=8)
    geometry = AttentionGeometry(DilationConfig((16,), (2,), "split"), 33, 2)
    q, k, v, mask = make_inputs(8, 2, 33, 2, 2, 8, torch.float32, 0.2)
    mask[0] = True
    plan = CallPlan.whole(geometry, config, False, 8**-0.5)
    out, lse = torch_backend.partial_forward(q, k, v, mask, plan)
    assert bool(torch.isneginf(lse[0]).all()) and bool((out[0] == 0).all())
    on_lattice = torch.isfinite(lse[1])
    assert not bool(on_lattice[0, 1::2].any()) and not bool(on_lattice[1, 0::2].any())
    assert int(on_lattice.sum()) >= 30
    assert not bool(torch.isnan(out).any())
    check_partial(torch_forward(4096), q, k, v, mask, geometry, config, False, (0, 33), (0, 33), "empty rows")


def test_module_end_to_end_matches_reference_module():
    config = SparsePatternConfig(pattern_type="dilated_sparse", block_size=4, sparsity_ratio=0.5)
    args = ([16, 32], [1, 2])
    q, k, v, mask = make_inputs(31, 2, 45, 4, 2, 8, torch.float32, 0.1)
    module = optimized.BlockSparseRingDilatedAttention(*args, sparse_config=config, backend="torch", work_size=6)
    out, lse = module(q, k, v, is_causal=True, key_padding_mask=mask, return_lse=True)
    assert out.dtype == q.dtype and module.last_backend == "torch"
    ref64 = ReferenceAttention(*args, sparse_config=config)
    ref_lowp = ReferenceAttention(*args, sparse_config=config, compute_dtype=None)
    out64, lse64 = ref64(q, k, v, is_causal=True, key_padding_mask=mask, return_lse=True)
    out_lowp, lse_lowp = ref_lowp(q, k, v, is_causal=True, key_padding_mask=mask, return_lse=True)
    empty = torch.isneginf(lse64)
    assert_within_budget(compare("out", out, out64, out_lowp, q.dtype, empty=empty.transpose(1, 2).unsqueeze(-1)))
    assert_within_budget(compare("lse", lse, lse64, lse_lowp, q.dtype, empty=empty, empty_value=float("-inf")))


def test_work_size_does_not_change_the_result():
    config = SparsePatternConfig(pattern_type="dense", block_size=4)
    geometry = AttentionGeometry(DilationConfig((32,), (1,), "split"), 64, 2)
    q, k, v, _ = make_inputs(2, 1, 64, 2, 2, 8, torch.float32)
    plan = CallPlan.whole(geometry, config, True, 8**-0.5)
    big = torch_backend.partial_forward(q, k, v, None, plan, work_size=4096)
    small = torch_backend.partial_forward(q, k, v, None, plan, work_size=1)
    assert_within_budget(compare("out", small[0], big[0].double(), big[0], torch.float32))


@pytest.mark.parametrize("work_size", [0, -3, 2.5, True])
def test_bad_work_size_is_rejected(work_size):
    geometry = AttentionGeometry(DilationConfig((8,), (1,), "split"), 8, 1)
    plan = CallPlan.whole(geometry, SparsePatternConfig(block_size=4), False, 1.0)
    q = torch.randn(1, 8, 1, 4)
    with pytest.raises(ValueError, match="work_size"):
        torch_backend.partial_forward(q, q, q, None, plan, work_size=work_size)


# ---------------------------------------------------------------------------------------------
# Gradients: of docs/semantics.md section 4's formula, against a float64 dense computation of it
# ---------------------------------------------------------------------------------------------


def gradients(forward, q, k, v, out_weight, lse_weight, dtype):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = forward(*leaves)
    finite = torch.isfinite(lse)
    loss = (out.to(dtype) * out_weight.to(dtype)).sum()
    loss = loss + torch.where(finite, lse.to(dtype) * lse_weight.to(dtype), torch.zeros((), dtype=dtype)).sum()
    loss.backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize(
    "pattern, head_mode, dtype",
    [
        ("local_window", "split", torch.float32),
        ("random", "all", torch.float32),
        ("global_local", "all", torch.bfloat16),
    ],
)
def test_gradients_match_float64_formula(pattern, head_mode, dtype):
    config = make_config(LAYOUT_CASES[pattern])
    geometry = AttentionGeometry(DilationConfig((16, 24), (1, 2), head_mode), 37, 4)
    q, k, v, mask = make_inputs(41, 2, 37, 4, 2, 8, dtype, 0.15, True)
    scale = 8**-0.5
    out64, lse64 = partial_attention(q, k, v, geometry, config, is_causal=True, key_padding_mask=mask, scale=scale)
    assert bool(torch.isneginf(lse64).any()), "the case should hold an empty row"

    generator = torch.Generator().manual_seed(5)
    out_weight = torch.randn(out64.shape, generator=generator)
    lse_weight = torch.randn(lse64.shape, generator=generator)
    plan = CallPlan.whole(geometry, config, True, scale)
    actual = gradients(
        lambda a, b, c: torch_backend.partial_forward(a, b, c, mask, plan, work_size=5),
        q,
        k,
        v,
        out_weight,
        lse_weight,
        torch.float32,
    )
    exact = gradients(
        lambda a, b, c: partial_attention(
            a, b, c, geometry, config, is_causal=True, key_padding_mask=mask, scale=scale, compute_dtype=torch.float64
        ),
        q,
        k,
        v,
        out_weight,
        lse_weight,
        torch.float64,
    )
    lowp = gradients(
        lambda a, b, c: partial_attention(
            a, b, c, geometry, config, is_causal=True, key_padding_mask=mask, scale=scale, compute_dtype=dtype
        ),
        q,
        k,
        v,
        out_weight,
        lse_weight,
        dtype,
    )
    for name, got, want, base in zip(("dq", "dk", "dv"), actual, exact, lowp):
        assert got.dtype == dtype
        assert_within_budget(compare(name, got, want, base, dtype, k=K_GRADIENT), f"{pattern} {head_mode} {dtype}")


@pytest.mark.parametrize("pattern", ["global_local", "dense", "random", "custom_ragged"])
@pytest.mark.parametrize("group_size", [1, 3, 1000])
def test_row_groups_cover_every_row_once(pattern, group_size):
    from optimized.blocks import row_groups, rows_by_count
    from reference.semantics import block_tables

    if pattern == "custom_ragged":  # rows of 0, 1, 2, ..., 7 key blocks
        layout = torch.tril(torch.ones(8, 8, dtype=torch.bool), diagonal=-1)
        config = SparsePatternConfig(pattern_type="custom", block_size=4, block_layout=layout)
    else:
        config = SparsePatternConfig(
            pattern_type=pattern, block_size=4, local_window_size=8, global_tokens=4, sparsity_ratio=0.3
        )
    geometry = AttentionGeometry(DilationConfig((32, 64), (1, 2), "all"), 70, 2)
    for table in block_tables(geometry, config):
        counts = table.row_counts[rows_by_count(table)]
        assert bool((counts[1:] <= counts[:-1]).all()), "rows_by_count is not by descending count"
        ranges = row_groups(table, group_size, blocks_per_row=2)
        assert [start for start, _ in ranges] == [0] + [stop for _, stop in ranges[:-1]]  # contiguous
        assert ranges[-1][1] == table.num_rows
        assert all(0 < stop - start <= group_size for start, stop in ranges)


def test_row_groups_set_a_few_long_rows_apart_and_keep_uniform_rows_together():
    """global_local at 64 blocks a lattice: the global rows walk 64 key blocks, the others a few."""
    from optimized.blocks import row_groups, rows_by_count
    from reference.semantics import block_tables

    config = SparsePatternConfig(pattern_type="global_local", block_size=4, local_window_size=8, global_tokens=4)
    geometry = AttentionGeometry(DilationConfig((256,), (1,), "split"), 1024, 1)
    (table,) = block_tables(geometry, config)
    counts = table.row_counts[rows_by_count(table)]
    ranges = row_groups(table, 10_000, blocks_per_row=8)
    longest_of_each = [int(counts[start]) for start, _ in ranges]
    assert len(ranges) >= 2 and longest_of_each[0] == 64 and max(longest_of_each[1:]) < 8, longest_of_each
    # A layout whose rows walk 2 or 3 blocks stays one group: a cut would cost a step more than it saves.
    config = SparsePatternConfig(pattern_type="local_window", block_size=4, local_window_size=8)
    (table,) = block_tables(geometry, config)
    assert row_groups(table, 10_000, blocks_per_row=8) == [(0, table.num_rows)]


@pytest.mark.parametrize("layers", [1, 3])
def test_collector_assembles_untracked_pieces_in_place_exactly_as_tracked_ones(layers, monkeypatch):
    """The no-grad path (pieces copied in place, layers merged a slice of queries at a time) gives
    bitwise the result of the autograd path, and the autograd path still carries gradients."""
    from optimized.blocks import PartialCollector

    monkeypatch.setattr(PartialCollector, "MERGE_QUERIES", 5)  # several slices of the 13 queries
    batch, num_queries, num_heads, head_dim = 2, 13, 4, 3
    generator = torch.Generator().manual_seed(layers)
    pieces = []
    for layer in range(layers):
        for heads in (range(0, 1), range(1, 4)):
            # Each layer writes a random subset of the queries of its heads, as tables do; the rest stay empty.
            index = torch.randperm(num_queries, generator=generator)[
                : int(torch.randint(1, num_queries, (1,), generator=generator))
            ]
            out = torch.randn(batch, index.numel(), len(heads), head_dim, generator=generator)
            lse = torch.randn(batch, index.numel(), len(heads), generator=generator)
            pieces.append((layer, heads, index, out, lse))

    def collect(track: bool):
        collector = PartialCollector(batch, num_queries, num_heads, head_dim, torch.device("cpu"))
        leaves = []
        for layer, heads, index, out, lse in pieces:
            out, lse = out.clone().requires_grad_(track), lse.clone().requires_grad_(track)
            leaves += [out, lse]
            collector.add(layer, heads, index, out, lse)
        return collector.result(), leaves

    with torch.no_grad():
        (out_untracked, lse_untracked), _ = collect(track=False)
    (out_tracked, lse_tracked), leaves = collect(track=True)
    assert torch.equal(out_untracked, out_tracked.detach()) and torch.equal(lse_untracked, lse_tracked.detach())
    (out_tracked.sum() + torch.where(torch.isinf(lse_tracked), 0.0, lse_tracked).sum()).backward()
    assert all(leaf.grad is not None for leaf in leaves)


def test_backward_is_exactly_zero_where_a_query_sees_one_key_through_three_branches():
    """Segments of 1 in three branches: each query attends to itself only, three times. out = v
    whatever q and k are, so dq and dk are exactly 0; before the backward normalised P by its row
    mass, the three float32 terms left ~1e-7 * |dP| |k| (past the budget under the dev profile)."""
    generator = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 37, 4, 16, generator=generator, requires_grad=True) for _ in range(3))
    module = optimized.BlockSparseRingDilatedAttention(
        [1, 1, 1],
        [1, 1, 1],
        head_mode="all",
        backend="torch",
        sparse_config=SparsePatternConfig(pattern_type="dense", block_size=1),
    )
    out = module(q, k, v)
    out.backward(torch.randn(out.shape, generator=generator))
    assert torch.equal(q.grad, torch.zeros_like(q)) and torch.equal(k.grad, torch.zeros_like(k))
    assert torch.allclose(
        out.detach(), v.detach(), rtol=0, atol=4 * torch.finfo(torch.float32).eps * float(v.detach().abs().max())
    )
