"""Backend "flex" (FlexAttention BlockMask over the compacted lattices) against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from random_inputs import make_inputs

import optimized
from optimized import flex_backend
from optimized.blocks import head_layers
from optimized.flex_backend import _mask_mod
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

pytest.importorskip("torch.nn.attention.flex_attention", reason="backend 'flex' needs torch >= 2.5")

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def check_partial(q, k, v, mask, geometry, config, causal, query_range, key_range, context):
    q0, q1 = query_range
    k0, k1 = key_range
    qc, kc, vc = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]
    mc = None if mask is None else mask[:, k0:k1]
    scale = q.shape[-1] ** -0.5
    plan = CallPlan(geometry, config, causal, scale, query_range, key_range)
    out, lse = flex_backend.partial_forward(qc, kc, vc, mc, plan)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and out.device == q.device
    kwargs = dict(query_start=q0, key_start=k0, is_causal=causal, key_padding_mask=mc, scale=scale)
    out64, lse64 = partial_attention(qc, kc, vc, geometry, config, **kwargs)
    out_lowp, lse_lowp = partial_attention(qc, kc, vc, geometry, config, compute_dtype=None, **kwargs)
    empty = torch.isneginf(lse64)
    assert_within_budget(compare("lse", lse, lse64, lse_lowp, q.dtype, empty=empty, empty_value=float("-inf")), context)
    assert_within_budget(
        compare("out", out, out64, out_lowp, q.dtype, empty=empty.transpose(1, 2).unsqueeze(-1)), context
    )
    return empty, out


LAYOUTS = {
    "dense": dict(pattern_type="dense"),
    "local_window": dict(pattern_type="local_window", local_window_size=4),  # radius in blocks: 4 // (2b)
    "global_local": dict(pattern_type="global_local", local_window_size=2, global_tokens=1),
    "dilated_sparse": dict(pattern_type="dilated_sparse", sparsity_ratio=0.34),
    "random": dict(pattern_type="random", sparsity_ratio=0.3, seed=2),
    "custom": dict(pattern_type="custom"),
}


def make_config(pattern, block_size):
    kwargs = dict(LAYOUTS[pattern], block_size=block_size)
    for size_key in ("local_window_size", "global_tokens"):
        if size_key in kwargs:
            kwargs[size_key] *= block_size
    if pattern == "custom":
        kwargs["block_layout"] = torch.rand(64, 64, generator=torch.Generator().manual_seed(4)) < 0.4
    return SparsePatternConfig(**kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pattern", sorted(LAYOUTS))
@pytest.mark.parametrize("head_mode, causal", [("split", True), ("all", False)])
def test_every_layout_matches_reference(device, pattern, head_mode, causal):
    block_size = 3 if device == "cpu" else 16
    N = 53 if device == "cpu" else 200
    config = make_config(pattern, block_size)
    segments = (16, 24) if device == "cpu" else (64, 96)
    geometry = AttentionGeometry(DilationConfig(segments, (1, 2), head_mode), N, 4)
    q, k, v, mask = make_inputs(len(pattern), 2, N, 4, 2, 16, torch.float32, 0.15, pad_first=True, device=device)
    check_partial(q, k, v, mask, geometry, config, causal, (0, N), (0, N), f"{pattern} {head_mode} {device}")


@pytest.mark.parametrize(
    "block_size, dtype", [(1, torch.float32), (3, torch.bfloat16), (4, torch.float32), (16, torch.bfloat16)]
)
def test_block_sizes_and_dtypes(block_size, dtype):
    config = SparsePatternConfig(pattern_type="local_window", block_size=block_size, local_window_size=4 * block_size)
    geometry = AttentionGeometry(DilationConfig((32, 64), (1, 3), "split"), 70, 3)
    q, k, v, mask = make_inputs(block_size, 1, 70, 3, 3, 16, dtype, 0.1, pad_first=True)
    check_partial(q, k, v, mask, geometry, config, True, (0, 70), (0, 70), f"block_size={block_size} dtype={dtype}")


@pytest.mark.parametrize("query_range, key_range", [((17, 45), (0, 30)), ((30, 61), (13, 44)), ((5, 6), (40, 61))])
def test_chunked_query_and_key_ranges(query_range, key_range):
    config = SparsePatternConfig(pattern_type="global_local", block_size=3, local_window_size=9, global_tokens=4)
    geometry = AttentionGeometry(DilationConfig((12, 30), (1, 3), "all"), 61, 4)
    q, k, v, mask = make_inputs(sum(query_range), 2, 61, 4, 2, 8, torch.float32, 0.1, pad_first=True)
    check_partial(q, k, v, mask, geometry, config, True, query_range, key_range, f"q={query_range} k={key_range}")


def test_empty_rows_are_exact():
    config = SparsePatternConfig(pattern_type="local_window", block_size=4, local_window_size=8)
    geometry = AttentionGeometry(DilationConfig((16,), (1,), "split"), 32, 2)
    q, k, v, mask = make_inputs(8, 2, 32, 2, 2, 8, torch.float32, 0.2, pad_first=True)
    mask[0] = True  # batch 0: every key padded, every row empty
    empty, _ = check_partial(q, k, v, mask, geometry, config, False, (0, 32), (0, 32), "empty rows")
    assert bool(empty[0].all()) and not bool(empty[1].any())


def test_module_end_to_end():
    config = SparsePatternConfig(pattern_type="dilated_sparse", block_size=4, sparsity_ratio=0.5)
    args = ([16, 32], [1, 2])
    q, k, v, mask = make_inputs(31, 2, 45, 4, 2, 8, torch.float32, 0.1, pad_first=True)
    module = optimized.BlockSparseRingDilatedAttention(*args, sparse_config=config, backend="flex")
    out, weights, lse = module(
        q, k, v, is_causal=True, key_padding_mask=mask, return_attention_weights=True, return_lse=True
    )
    assert module.last_backend == "flex"
    kwargs = dict(is_causal=True, key_padding_mask=mask, return_lse=True, return_attention_weights=True)
    out64, w64, lse64 = ReferenceAttention(*args, sparse_config=config)(q, k, v, **kwargs)
    out32, w32, lse32 = ReferenceAttention(*args, sparse_config=config, compute_dtype=None)(q, k, v, **kwargs)
    empty = torch.isneginf(lse64)
    assert_within_budget(compare("out", out, out64, out32, torch.float32, empty=empty.transpose(1, 2).unsqueeze(-1)))
    assert_within_budget(compare("lse", lse, lse64, lse32, torch.float32, empty=empty, empty_value=float("-inf")))
    assert_within_budget(compare("weights", weights.to_dense(), w64, w32, torch.float32))


def test_cpu_backward_is_refused_with_a_clear_error():
    geometry = AttentionGeometry(DilationConfig((8,), (1,), "split"), 8, 1)
    plan = CallPlan.whole(geometry, SparsePatternConfig(block_size=4), False, 0.5)
    q = torch.randn(1, 8, 1, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="requires_grad|require grad"):
        flex_backend.partial_forward(q, q.detach(), q.detach(), None, plan)


def test_eager_size_limit_names_the_alternative(monkeypatch):
    monkeypatch.setattr(flex_backend, "EAGER_SCORE_LIMIT", 100)
    geometry = AttentionGeometry(DilationConfig((32,), (1,), "split"), 32, 1)
    plan = CallPlan.whole(geometry, SparsePatternConfig(pattern_type="dense", block_size=4), False, 0.5)
    q = torch.randn(1, 32, 1, 4)
    with pytest.raises(ValueError, match="backend='torch'"):
        flex_backend.partial_forward(q, q, q, None, plan)


# ---------------------------------------------------------------------------------------------
# The layout cache: built once per (plan, device, heads, kv heads); the padding stays per call
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_cache(monkeypatch):
    """An empty layout cache for this test, and counters of what the backend builds."""
    cache = flex_backend.LayoutCache(flex_backend.LAYOUT_CACHE_BYTES)
    monkeypatch.setattr(flex_backend, "layout_cache", cache)
    built = {"tables": 0, "block_masks": 0}
    build_table = flex_backend._build_table

    def counting_build_table(*args, **kwargs):
        built["tables"] += 1
        return build_table(*args, **kwargs)

    block_mask_type = flex_backend._flex_module().BlockMask
    from_kv_blocks = block_mask_type.from_kv_blocks

    def counting_from_kv_blocks(cls, *args, **kwargs):
        built["block_masks"] += 1
        return from_kv_blocks(*args, **kwargs)

    monkeypatch.setattr(flex_backend, "_build_table", counting_build_table)
    monkeypatch.setattr(block_mask_type, "from_kv_blocks", classmethod(counting_from_kv_blocks))
    return cache, built


def tables_with_rows(plan):
    return sum(map(len, head_layers(plan.tables)))


# Two branches, three (branch, offset) tables in two head layers: small enough for eager flex.
CACHE_GEOMETRY = AttentionGeometry(DilationConfig((8, 16), (1, 2), "all"), 24, 2)
CACHE_CONFIG = SparsePatternConfig(pattern_type="global_local", block_size=2, local_window_size=4, global_tokens=2)
CACHE_N = CACHE_GEOMETRY.seq_len


def cache_plan(causal=True, query_range=(0, CACHE_N)):
    return CallPlan(CACHE_GEOMETRY, CACHE_CONFIG, causal, 8**-0.5, query_range, (0, CACHE_N))


def test_repeated_call_builds_no_layout_or_block_mask(fresh_cache, monkeypatch):
    cache, built = fresh_cache
    q, k, v, mask = make_inputs(61, 2, CACHE_N, 2, 1, 8, torch.float32, 0.2)
    block_masks = []
    run_flex = flex_backend._run_flex
    monkeypatch.setattr(flex_backend, "_run_flex", lambda *args: (block_masks.append(args[3]), run_flex(*args))[1])
    first = flex_backend.partial_forward(q, k, v, mask, cache_plan())
    assert built == {"tables": tables_with_rows(cache_plan()), "block_masks": tables_with_rows(cache_plan())}
    assert built["tables"] > 1
    # An equal plan built anew (hash and equality by value) finds the same entry.
    second = flex_backend.partial_forward(q, k, v, mask, cache_plan())
    assert built["tables"] == built["block_masks"] == tables_with_rows(cache_plan()) and len(cache) == 1
    # The second call's BlockMasks share the first call's index tensors (no new transpose, no copy).
    half = len(block_masks) // 2
    for old, new in zip(block_masks[:half], block_masks[half:]):
        assert new.kv_indices is old.kv_indices and new.q_indices is old.q_indices
    for got, want in zip(second, first):
        assert torch.equal(got, want)


def test_padding_changes_on_one_cached_entry_match_the_reference(fresh_cache):
    cache, built = fresh_cache
    q, k, v, first_mask = make_inputs(62, 2, CACHE_N, 2, 1, 8, torch.float32, 0.3, pad_first=True)
    second_mask = torch.rand(2, CACHE_N, generator=torch.Generator().manual_seed(63)) < 0.5
    assert not torch.equal(first_mask, second_mask)
    outs = []
    for mask in (first_mask, second_mask, None):
        context = f"padding change {len(outs)} on a cached entry"
        outs.append(
            check_partial(q, k, v, mask, CACHE_GEOMETRY, CACHE_CONFIG, True, (0, CACHE_N), (0, CACHE_N), context)[1]
        )
    # One entry for the padded calls (the padding is never part of it), one for the unpadded call.
    assert len(cache) == 2 and built["tables"] == built["block_masks"] == 2 * tables_with_rows(cache_plan())
    # The masks change the result (so the comparisons above would see a stale mask), and the first
    # mask used again gives its first result exactly.
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])
    again = flex_backend.partial_forward(q, k, v, first_mask, cache_plan())[0]
    assert torch.equal(again, outs[0])


def test_module_calls_with_changing_padding_match_the_reference(fresh_cache):
    cache, built = fresh_cache
    config = SparsePatternConfig(pattern_type="dilated_sparse", block_size=2, sparsity_ratio=0.5)
    args = ([8, 16], [1, 2])
    module = optimized.BlockSparseRingDilatedAttention(*args, sparse_config=config, backend="flex")
    reference64 = ReferenceAttention(*args, sparse_config=config)
    reference32 = ReferenceAttention(*args, sparse_config=config, compute_dtype=None)
    q, k, v, _ = make_inputs(64, 2, 21, 2, 1, 8, torch.float32)
    builds = []
    for seed in (65, 66):
        mask = torch.rand(2, 21, generator=torch.Generator().manual_seed(seed)) < 0.3
        call = dict(is_causal=True, key_padding_mask=mask, return_lse=True)
        out, lse = module(q, k, v, **call)
        builds.append(dict(built))
        out64, lse64 = reference64(q, k, v, **call)
        out32, lse32 = reference32(q, k, v, **call)
        empty = torch.isneginf(lse64)
        context = f"module call with padding seed {seed}"
        assert_within_budget(
            compare("out", out, out64, out32, torch.float32, empty=empty.transpose(1, 2).unsqueeze(-1)), context
        )
        assert_within_budget(
            compare("lse", lse, lse64, lse32, torch.float32, empty=empty, empty_value=float("-inf")), context
        )
    assert builds[0]["tables"] > 0 and builds[1] == builds[0] and len(cache) == 1


def test_new_padding_compiles_nothing_new(fresh_cache):
    """Each padded call closes a new key_ok over one mask_mod code; flex (through dynamo, eager here)
    must not recompile for it. An unpadded call is another variant and does compile: the check can fail."""
    q, k, v, mask = make_inputs(70, 2, CACHE_N, 2, 1, 8, torch.float32, 0.3)
    torch._dynamo.reset()  # no earlier test's graphs, nor their recompile count
    flex_backend.partial_forward(q, k, v, mask, cache_plan())
    with torch._dynamo.config.patch(error_on_recompile=True):
        flex_backend.partial_forward(q, k, v, ~mask, cache_plan())
        with pytest.raises(Exception, match="[Rr]ecompil"):
            flex_backend.partial_forward(q, k, v, None, cache_plan())


def dense_mask(table, mask_mod):
    """mask_mod evaluated on every (lattice, query slot, key slot) of ``table``: (S, lq, lk) bool."""
    lattice = torch.arange(table.num_lattices).view(-1, 1, 1)
    q_idx, kv_idx = torch.arange(table.query_len).view(1, -1, 1), torch.arange(table.key_len).view(1, 1, -1)
    return mask_mod(lattice, torch.zeros_like(lattice), q_idx, kv_idx).expand(-1, table.query_len, table.key_len)


def listed_blocks(num_blocks, indices, shape):
    """(S, rows, span) bool: the blocks a BlockMask's (num_blocks, indices) lists."""
    listed = torch.zeros(shape, dtype=torch.bool)
    if num_blocks is None:
        return listed
    num_blocks, indices = num_blocks[:, 0].long(), indices[:, 0].long()
    used = torch.arange(indices.shape[-1]) < num_blocks.unsqueeze(-1)
    lattice, row, position = used.nonzero(as_tuple=True)
    listed[lattice, row, indices[lattice, row, position]] = True
    return listed


@pytest.mark.parametrize(
    "causal, query_range, padded",
    [
        (True, (0, CACHE_N), False),
        (False, (0, CACHE_N), False),
        (True, (5, 19), False),
        (True, (0, CACHE_N), True),
    ],
)
def test_listed_blocks_and_compiled_mask_give_the_exact_mask(fresh_cache, causal, query_range, padded):
    """What compiled flex evaluates (the mask_mod on listed partial blocks, everything on full blocks,
    nothing elsewhere) is the exact mask that eager flex evaluates, and every block the exact mask
    allows entirely is a full block unless calls are padded (the padding may mask any key)."""
    cache, _ = fresh_cache
    plan = CallPlan(CACHE_GEOMETRY, CACHE_CONFIG, causal, 0.5, query_range, (3, CACHE_N - 3))
    any_full = False
    for _, table in cache.get(plan, torch.device("cpu"), 2, 1, padded):
        b, mask = table.block_size, table.block_mask
        exact = dense_mask(table, table.mask_mod())
        kv_lo, kv_hi, diagonal, _ = table.mask_parts
        compiled = dense_mask(table, _mask_mod(kv_lo, kv_hi, diagonal, None, b, None, 1))
        shape = (table.num_lattices, table.query_len // b, table.key_len // b)
        partial = listed_blocks(mask.kv_num_blocks, mask.kv_indices, shape)
        full = listed_blocks(mask.full_kv_num_blocks, mask.full_kv_indices, shape)
        assert not (partial & full).any()
        points = lambda blocks: blocks.repeat_interleave(b, 1).repeat_interleave(b, 2)  # noqa: B023 - used at once
        simulated = (points(partial) & compiled) | points(full)
        assert torch.equal(simulated, exact)
        entirely = exact.view(shape[0], shape[1], b, shape[2], b).transpose(2, 3).flatten(3).all(-1)
        assert torch.equal(full, torch.zeros_like(full) if padded else entirely)
        any_full |= bool(full.any())
    assert any_full != padded


def test_batch_size_and_dtype_share_an_entry_kv_heads_do_not(fresh_cache):
    """Nothing cached depends on the batch or the dtype (flex's heads hold (batch, head)); the key/value
    head count picks the kv head of each query head, so it is part of the key."""
    cache, built = fresh_cache
    for batch, dtype, kv_heads in ((2, torch.float32, 1), (3, torch.bfloat16, 1), (1, torch.float32, 2)):
        q, k, v, mask = make_inputs(batch, batch, CACHE_N, 2, kv_heads, 8, dtype, 0.2)
        check_partial(
            q,
            k,
            v,
            mask,
            CACHE_GEOMETRY,
            CACHE_CONFIG,
            False,
            (0, CACHE_N),
            (0, CACHE_N),
            f"batch {batch} dtype {dtype} kv heads {kv_heads}",
        )
        if kv_heads == 1:
            assert len(cache) == 1 and built["tables"] == tables_with_rows(cache_plan(causal=False))
    assert len(cache) == 2 and built["tables"] == 2 * tables_with_rows(cache_plan(causal=False))


def test_cache_is_bounded_by_bytes_least_recently_used_first_out(fresh_cache):
    cache, built = fresh_cache
    cpu = torch.device("cpu")
    plans = [cache_plan(query_range=(q0, q0 + 8)) for q0 in (0, 8, 16)]
    sizes = []
    for plan in plans:  # each alone, to learn its size
        cache.clear()
        cache.get(plan, cpu, 2, 1, False)
        sizes.append(cache.nbytes)
    assert min(sizes) > 0
    cache.clear()
    cache.max_bytes = sum(sorted(sizes)[1:])  # room for the two largest plans, not for all three
    for index in (0, 1, 0):  # plan 1 is now the least recently used
        cache.get(plans[index], cpu, 2, 1, False)
    assert len(cache) == 2
    builds = built["tables"]
    cache.get(plans[2], cpu, 2, 1, False)
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    first = cache.get(plans[0], cpu, 2, 1, False)  # still cached: plan 1 went out first
    assert built["tables"] == builds + tables_with_rows(plans[2])
    assert cache.get(plans[0], cpu, 2, 1, False) is first
    cache.get(plans[1], cpu, 2, 1, False)
    assert built["tables"] == builds + tables_with_rows(plans[2]) + tables_with_rows(plans[1])
    # An entry larger than the bound is kept alone (rebuilding it on every call would be worse).
    cache.max_bytes = 0
    cache.get(plans[2], cpu, 2, 1, False)
    assert len(cache) == 1 and cache.nbytes == sizes[2]


def test_entry_built_in_inference_mode_holds_normal_constant_tensors(fresh_cache):
    """Autograd saves the BlockMask and mask_mod tensors for the backward: inference tensors could not be
    saved, and tensors that require grad would tie graphs to the cache."""
    cache, _ = fresh_cache
    q, k, v, mask = make_inputs(69, 2, CACHE_N, 2, 1, 8, torch.float32, 0.2)
    with torch.inference_mode():
        expected = flex_backend.partial_forward(q, k, v, mask, cache_plan())
    (entry,) = cache._entries.values()
    tensors = [tensor for _, table in entry for tensor in table.tensors()]
    assert tensors and not any(t.is_inference() or t.requires_grad for t in tensors)
    got = flex_backend.partial_forward(q, k, v, mask, cache_plan())
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# CUDA: compiled flex, gradients, the block-size rule
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs CUDA (compiled FlexAttention; the CPU runs the same comparisons eagerly above)"
)


def gradients(forward, q, k, v, out_weight, lse_weight, dtype):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = forward(*leaves)
    finite = torch.isfinite(lse)
    loss = (out.to(dtype) * out_weight.to(out.device, dtype)).sum()
    zero = torch.zeros((), dtype=dtype, device=lse.device)
    loss = loss + torch.where(finite, lse.to(dtype) * lse_weight.to(lse.device, dtype), zero).sum()
    loss.backward()
    return [t.grad.cpu() for t in leaves]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_gradients_match_float64_formula(dtype):
    config = SparsePatternConfig(pattern_type="global_local", block_size=16, local_window_size=32, global_tokens=16)
    geometry = AttentionGeometry(DilationConfig((64, 128), (1, 2), "all"), 150, 4)
    q, k, v, mask = make_inputs(41, 2, 150, 4, 2, 16, dtype, 0.15, pad_first=True, device="cuda")
    scale = 16**-0.5
    generator = torch.Generator().manual_seed(5)
    out_weight = torch.randn(2, 150, 4, 16, generator=generator)
    lse_weight = torch.randn(2, 4, 150, generator=generator)
    plan = CallPlan.whole(geometry, config, True, scale)
    actual = gradients(
        lambda a, b, c: flex_backend.partial_forward(a, b, c, mask, plan),
        q,
        k,
        v,
        out_weight,
        lse_weight,
        torch.float32,
    )
    exact = gradients(
        lambda a, b, c: partial_attention(
            a,
            b,
            c,
            geometry,
            config,
            is_causal=True,
            key_padding_mask=mask.cpu(),
            scale=scale,
            compute_dtype=torch.float64,
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
            a, b, c, geometry, config, is_causal=True, key_padding_mask=mask.cpu(), scale=scale, compute_dtype=dtype
        ),
        q,
        k,
        v,
        out_weight,
        lse_weight,
        dtype,
    )
    for name, got, want, base in zip(("dq", "dk", "dv"), actual, exact, lowp):
        assert_within_budget(compare(name, got, want, base, dtype, k=K_GRADIENT), f"flex cuda {dtype}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("block_size, dtype", [(16, torch.bfloat16), (64, torch.float32), (128, torch.bfloat16)])
def test_cuda_block_sizes(block_size, dtype):
    config = SparsePatternConfig(pattern_type="local_window", block_size=block_size, local_window_size=4 * block_size)
    N = 5 * block_size + 7
    geometry = AttentionGeometry(DilationConfig((2 * block_size, 4 * block_size), (1, 2), "split"), N, 2)
    q, k, v, mask = make_inputs(block_size, 1, N, 2, 1, 32, dtype, 0.1, pad_first=True, device="cuda")
    check_partial(q, k, v, mask, geometry, config, True, (0, N), (0, N), f"cuda block_size={block_size}")


def test_cuda_block_size_rule_is_checked_before_running(monkeypatch):
    # The same check the CUDA path makes, exercised on the CPU through a tensor that claims CUDA.
    geometry = AttentionGeometry(DilationConfig((8,), (1,), "split"), 8, 1)
    plan = CallPlan.whole(geometry, SparsePatternConfig(block_size=3), False, 0.5)

    class FakeCuda:
        is_cuda = True
        requires_grad = False
        device = torch.device("cpu")
        dtype = torch.float32

    with pytest.raises(ValueError, match="block_size=3"):
        flex_backend._check_inputs(FakeCuda(), FakeCuda(), FakeCuda(), plan)

    class FakeCudaFloat64(FakeCuda):
        dtype = torch.float64

    # Compiled flex computes in float32 at most: float64 is refused, never rounded silently.
    with pytest.raises(TypeError, match=r"q\.dtype=torch\.float64.*backend='torch'"):
        flex_backend._check_inputs(FakeCudaFloat64(), FakeCudaFloat64(), FakeCudaFloat64(), plan)


def test_head_dim_padding_for_compiled_flex_changes_nothing():
    """Compiled flex (CUDA) pads head dims below 16 with zeros; the same padding on eager flex (CPU) gives
    the unpadded result in the first D columns, zeros after, and the same lse."""
    from torch.nn.attention.flex_attention import create_block_mask

    from optimized import flex_backend

    generator = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 3, 32, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    flex = flex_backend._flex_module()
    out, lse = flex_backend._call_flex(flex, flex.flex_attention, q, k, v, mask, 0.5, None)
    padded = flex_backend.pad_head_dim(q, k, v, 16)
    assert padded[0].shape[-1] == 16
    out_p, lse_p = flex_backend._call_flex(flex, flex.flex_attention, *padded, mask, 0.5, None)
    torch.testing.assert_close(out_p[..., :3], out, rtol=1e-12, atol=1e-12)
    assert torch.equal(out_p[..., 3:], torch.zeros_like(out_p[..., 3:]))
    torch.testing.assert_close(lse_p, lse, rtol=1e-12, atol=1e-12)


CUDA_CACHE_CONFIG = SparsePatternConfig(
    pattern_type="global_local", block_size=16, local_window_size=32, global_tokens=16
)
CUDA_CACHE_GEOMETRY = AttentionGeometry(DilationConfig((64, 128), (1, 2), "all"), 150, 4)


@pytest.mark.gpu
@needs_cuda
def test_cuda_new_padding_compiles_nothing_new(fresh_cache):
    q, k, v, mask = make_inputs(71, 2, 150, 4, 2, 16, torch.bfloat16, 0.2, pad_first=True, device="cuda")
    check_partial(q, k, v, mask, CUDA_CACHE_GEOMETRY, CUDA_CACHE_CONFIG, True, (0, 150), (0, 150), "first padding")
    check_partial(q, k, v, None, CUDA_CACHE_GEOMETRY, CUDA_CACHE_CONFIG, True, (0, 150), (0, 150), "no padding")
    other = torch.rand(2, 150, generator=torch.Generator().manual_seed(72)).lt(0.4).cuda()
    with torch._dynamo.config.patch(error_on_recompile=True):
        check_partial(
            q,
            k,
            v,
            other,
            CUDA_CACHE_GEOMETRY,
            CUDA_CACHE_CONFIG,
            True,
            (0, 150),
            (0, 150),
            "second padding, cached entry, no recompile",
        )
        check_partial(
            q, k, v, None, CUDA_CACHE_GEOMETRY, CUDA_CACHE_CONFIG, True, (0, 150), (0, 150), "no padding again"
        )


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_two_calls_then_one_backward(fresh_cache, dtype):
    """Two calls on one cached entry with different padding, then one backward through both: each
    call's gradient uses its own padding (the cache holds none), and the second call built nothing."""
    cache, built = fresh_cache
    geometry, config = CUDA_CACHE_GEOMETRY, CUDA_CACHE_CONFIG
    q, k, v, first = make_inputs(73, 2, 150, 4, 2, 16, dtype, 0.2, pad_first=True, device="cuda")
    second = torch.rand(2, 150, generator=torch.Generator().manual_seed(74)).lt(0.4).cuda()
    scale = 16**-0.5
    plan = CallPlan.whole(geometry, config, True, scale)
    generator = torch.Generator().manual_seed(75)
    out_weight = torch.randn(4, 150, 4, 16, generator=generator)
    lse_weight = torch.randn(4, 4, 150, generator=generator)

    def both(forward):
        def run(a, b, c):
            (out1, lse1), (out2, lse2) = forward(a, b, c, first), forward(a, b, c, second)
            return torch.cat([out1, out2]), torch.cat([lse1, lse2])

        return run

    def reference(compute_dtype):
        return lambda a, b, c, mask: partial_attention(
            a, b, c, geometry, config, is_causal=True, key_padding_mask=mask, scale=scale, compute_dtype=compute_dtype
        )

    actual = gradients(
        both(lambda a, b, c, mask: flex_backend.partial_forward(a, b, c, mask, plan)),
        q,
        k,
        v,
        out_weight,
        lse_weight,
        torch.float32,
    )
    assert len(cache) == 1 and built["tables"] == tables_with_rows(plan)
    exact = gradients(both(reference(torch.float64)), q, k, v, out_weight, lse_weight, torch.float64)
    lowp = gradients(both(reference(dtype)), q, k, v, out_weight, lse_weight, dtype)
    for name, got, want, base in zip(("dq", "dk", "dv"), actual, exact, lowp):
        assert_within_budget(compare(name, got, want, base, dtype, k=K_GRADIENT), f"two calls, one backward {dtype}")


@pytest.mark.gpu
@needs_cuda
def test_cuda_repeated_forward_backward_keeps_no_memory(fresh_cache):
    q, k, v, mask = make_inputs(76, 2, 150, 4, 2, 16, torch.float32, 0.2, device="cuda")
    plan = CallPlan.whole(CUDA_CACHE_GEOMETRY, CUDA_CACHE_CONFIG, True, 0.25)
    allocated = []
    for _ in range(3):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = flex_backend.partial_forward(*leaves, mask, plan)
        (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
        del leaves, out, lse
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert allocated[2] == allocated[1]
