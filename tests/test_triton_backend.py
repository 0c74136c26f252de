"""Backend "triton" against the float64 dense reference (docs/semantics.md sections 4-6, docs/numerics.md).

On a machine with CUDA the kernel runs on the GPU; elsewhere it runs in Triton's CPU
interpreter (TRITON_INTERPRET=1, set here before triton is imported and by ``make test``), so
the sizes are small: N <= 64, D 16/32, block 16/32. bfloat16 runs only on CUDA (tl.dot on
bfloat16 is broken in the interpreter).
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from random_inputs import make_inputs  # noqa: E402 - after the interpreter switch above

import optimized  # noqa: E402
from optimized import triton_backend  # noqa: E402
from optimized.plan import CallPlan, StepPair  # noqa: E402
from reference import (  # noqa: E402
    AttentionGeometry,
    DilationConfig,
    SparsePatternConfig,
    assert_within_budget,
    compare,
    partial_attention,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = DEVICE.type != "cuda"
if INTERPRETED and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("no CUDA device and TRITON_INTERPRET is off: the kernel cannot run", allow_module_level=True)

DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(
            INTERPRETED, reason="bfloat16 only on CUDA: tl.dot on bf16 is broken in the interpreter"
        ),
    ),
]


def check_partial(q, k, v, mask, geometry, config, causal, query_range=None, key_range=None, context="", tile=None):
    """Run the kernel on the chunks and compare (out, lse) with the reference; returns the empty rows."""
    N = q.shape[1]
    q0, q1 = query_range or (0, N)
    k0, k1 = key_range or (0, N)
    qc, kc, vc = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]
    mc = None if mask is None else mask[:, k0:k1]
    scale = q.shape[-1] ** -0.5
    plan = CallPlan(geometry, config, causal, scale, (q0, q1), (k0, k1))
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    # Poison-free: outputs are allocated by the kernel wrapper; every point is written or stays 0/-inf.
    out, lse = triton_backend.partial_forward(dev(qc), dev(kc), dev(vc), dev(mc), plan, tile=tile)
    assert lse.dtype == torch.float32 and out.shape == qc.shape and lse.shape == (q.shape[0], q.shape[2], q1 - q0)
    kwargs = dict(query_start=q0, key_start=k0, is_causal=causal, key_padding_mask=mc, scale=scale)
    out64, lse64 = partial_attention(qc, kc, vc, geometry, config, **kwargs)
    out_lowp, lse_lowp = partial_attention(qc, kc, vc, geometry, config, compute_dtype=None, **kwargs)
    empty = torch.isneginf(lse64)
    assert_within_budget(
        compare("lse", lse.cpu(), lse64, lse_lowp, q.dtype, empty=empty, empty_value=float("-inf")), context
    )
    out_empty = empty.transpose(1, 2).unsqueeze(-1)
    assert_within_budget(compare("out", out.cpu(), out64, out_lowp, q.dtype, empty=out_empty, empty_value=0.0), context)
    return empty


def make_config(pattern, block_size=16, max_blocks=8):
    kwargs = {
        "dense": dict(),
        "local_window": dict(local_window_size=2 * block_size),
        "global_local": dict(local_window_size=2 * block_size, global_tokens=block_size),
        "dilated_sparse": dict(sparsity_ratio=0.5),
        "random": dict(sparsity_ratio=0.4, seed=5),
        "custom": dict(),
    }[pattern]
    if pattern == "custom":
        kwargs["block_layout"] = torch.rand(max_blocks, max_blocks, generator=torch.Generator().manual_seed(2)) < 0.5
    return SparsePatternConfig(pattern_type=pattern, block_size=block_size, **kwargs)


# Every pattern; both head modes and causal values spread over them (the interpreter is slow).
LAYOUT_CASES = [
    ("dense", "split", True),
    ("local_window", "all", False),
    ("global_local", "split", False),
    ("dilated_sparse", "all", True),
    ("random", "split", True),
    ("custom", "all", False),
]


@pytest.mark.parametrize("pattern, head_mode, causal", LAYOUT_CASES)
def test_every_layout_matches_reference(pattern, head_mode, causal):
    # Segments of 64 (rate 1, 4 blocks) and 48 -> 40 with N = 40 (rate 2, partial last block).
    config = make_config(pattern)
    N = 56
    geometry = AttentionGeometry(DilationConfig((32, 64), (1, 2), head_mode), N, 4)
    q, k, v, mask = make_inputs(len(pattern), 2, N, 4, 2, 16, torch.float32, 0.15, pad_first=True)
    check_partial(q, k, v, mask, geometry, config, causal, context=f"{pattern} {head_mode} causal={causal}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_with_grouped_query_heads_and_padding(dtype):
    config = SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=32)
    geometry = AttentionGeometry(DilationConfig((32, 64), (1, 2), "split"), 64, 4)
    q, k, v, mask = make_inputs(7, 1, 64, 4, 1, 32, dtype, 0.2, pad_first=True)
    empty = check_partial(q, k, v, mask, geometry, config, True, context=f"dtype={dtype}")
    assert bool(empty.any()), "the case must contain empty rows (padding at key 0 with causal; rate 2 lattices)"


def test_empty_rows_are_exact_when_every_key_is_padding():
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    geometry = AttentionGeometry(DilationConfig((32,), (2,), "all"), 40, 2)
    q, k, v, mask = make_inputs(3, 2, 40, 2, 2, 16, torch.float16, 0.1)
    mask[1] = True  # batch 1: nothing to attend
    empty = check_partial(q, k, v, mask, geometry, config, False, context="batch 1 all padding")
    assert bool(empty[1].all())


@pytest.mark.parametrize("query_range, key_range", [((0, 20), (0, 61)), ((17, 45), (0, 30)), ((30, 61), (13, 44))])
def test_chunked_query_and_key_ranges(query_range, key_range):
    config = SparsePatternConfig(pattern_type="global_local", block_size=16, local_window_size=32, global_tokens=16)
    geometry = AttentionGeometry(DilationConfig((32, 61), (1, 2), "all"), 61, 4)
    q, k, v, mask = make_inputs(sum(query_range + key_range), 1, 61, 4, 2, 16, torch.float32, 0.1)
    check_partial(
        q, k, v, mask, geometry, config, True, query_range, key_range, f"chunks q={query_range} k={key_range}"
    )


def test_sub_tiles_and_padded_head_dim():
    """block 32 cut into 16 x 16 kernel tiles (as block 128 is on the GPU); D = 24 padded to 32."""
    config = SparsePatternConfig(pattern_type="dilated_sparse", block_size=32, sparsity_ratio=0.5)
    geometry = AttentionGeometry(DilationConfig((64,), (1,), "split"), 64, 2)
    q, k, v, mask = make_inputs(11, 1, 64, 2, 2, 24, torch.float32, 0.1)
    tile = triton_backend.TileConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)
    check_partial(q, k, v, mask, geometry, config, True, context="sub-tiles", tile=tile)


def test_attention_weights_match_reference_and_torch_structure():
    from optimized import weights as torch_weights

    config = SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=32)
    geometry = AttentionGeometry(DilationConfig((32, 48), (1, 2), "all"), 48, 2)
    q, k, v, mask = make_inputs(13, 1, 48, 2, 1, 16, torch.float32, 0.1)
    scale = 16**-0.5
    plan = CallPlan.whole(geometry, config, True, scale)
    _, lse = triton_backend.partial_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), mask.to(DEVICE), plan)
    ours = triton_backend.attention_weights(q.to(DEVICE), k.to(DEVICE), mask.to(DEVICE), lse, plan)
    theirs = torch_weights.attention_weights(q.to(DEVICE), k.to(DEVICE), mask.to(DEVICE), lse, plan)
    assert type(ours) is type(theirs) and set(ours) == set(theirs) and ours["shape"] == theirs["shape"]
    for name in ("block_indices", "block_heads", "block_branches", "query_positions", "key_positions"):
        assert torch.equal(ours[name].cpu(), theirs[name].cpu()), name
    assert ours["block_values"].shape == theirs["block_values"].shape
    kwargs = dict(is_causal=True, key_padding_mask=mask, scale=scale, return_weights=True)
    _, lse64, probs64 = partial_attention(q, k, v, geometry, config, **kwargs)
    _, _, probs_lowp = partial_attention(q, k, v, geometry, config, compute_dtype=None, **kwargs)
    dense = ours.to_dense().cpu()
    assert_within_budget(compare("weights", dense, probs64, probs_lowp, q.dtype), "triton weights")
    rows = dense.sum(-1)
    assert torch.equal(rows[torch.isneginf(lse64)], torch.zeros_like(rows[torch.isneginf(lse64)]))


def test_module_runs_triton_backend():
    config = SparsePatternConfig(pattern_type="random", block_size=16, sparsity_ratio=0.5, seed=1)
    attention = optimized.BlockSparseRingDilatedAttention([16, 32], [1, 2], config, backend="triton")
    q, k, v, _ = make_inputs(17, 1, 40, 2, 2, 16, torch.float16)
    geometry = AttentionGeometry(DilationConfig((16, 32), (1, 2), "split"), 40, 2)
    out, lse = attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), return_lse=True)
    assert attention.last_backend == "triton" and out.dtype == torch.float16
    out64, lse64 = partial_attention(q, k, v, geometry, config)
    out_lowp, _ = partial_attention(q, k, v, geometry, config, compute_dtype=None)
    empty = torch.isneginf(lse64).transpose(1, 2).unsqueeze(-1)
    assert_within_budget(compare("out", out.cpu(), out64, out_lowp, q.dtype, empty=empty), "module")


# Every read variant with the default order and index, and each other order / index mode once.
KERNEL_CHOICES = [(variant, None, None) for variant in triton_backend.VARIANTS] + [
    ("v3", "by_lattice", "load"),
    ("v2", "by_lattice", "registers"),
    ("v2", "longest_first", "load"),
]


@pytest.mark.parametrize("variant, order, index", KERNEL_CHOICES)
@pytest.mark.parametrize(
    "pattern, head_mode, causal, D, dtype, query_range, key_range",
    [
        ("dense", "split", False, 32, torch.float16, None, None),
        ("global_local", "all", True, 24, torch.float32, (9, 61), (5, 58)),
        ("dilated_sparse", "split", False, 16, torch.float32, (7, 61), (0, 61)),
    ],
)
def test_kernel_variants_match_reference(
    variant, order, index, pattern, head_mode, causal, D, dtype, query_range, key_range
):
    """Every way of reading full key blocks (address tile, pointer runs, tensor descriptors), of ordering the
    work items and of finding listed blocks gives the same function.

    Block 16 over segments 64 (rate 1) and 61 (rate 2): rows hold runs of consecutive full blocks,
    listed full blocks outside the run, and masked blocks (chunk edges, lattice ends, diagonal).
    """
    config = make_config(pattern, max_blocks=8)
    geometry = AttentionGeometry(DilationConfig((64, 61), (1, 2), head_mode), 61, 4)
    q, k, v, mask = make_inputs(D + len(pattern), 1, 61, 4, 2, D, dtype, 0.1)
    scale = D**-0.5
    q0, q1 = query_range or (0, 61)
    k0, k1 = key_range or (0, 61)
    plan = CallPlan(geometry, config, causal, scale, (q0, q1), (k0, k1))
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    out, lse = triton_backend.partial_forward(
        dev(q[:, q0:q1]),
        dev(k[:, k0:k1]),
        dev(v[:, k0:k1]),
        dev(mask[:, k0:k1]),
        plan,
        variant=variant,
        order=order,
        index=index,
    )
    launch = triton_backend.device_tables(plan, DEVICE, order)[0]
    run_count = launch.items[:, triton_backend.WorkItem.RUN_COUNT]
    assert int((run_count > 0).sum()) > 0, "the case must contain runs of full blocks"
    if pattern == "dilated_sparse":
        assert launch.max_listed > 0, "the case must contain full blocks outside a row's run"
    kwargs = dict(query_start=q0, key_start=k0, is_causal=causal, key_padding_mask=mask[:, k0:k1], scale=scale)
    qc, kc, vc = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]
    out64, lse64 = partial_attention(qc, kc, vc, geometry, config, **kwargs)
    out_lowp, lse_lowp = partial_attention(qc, kc, vc, geometry, config, compute_dtype=None, **kwargs)
    context = f"variant={variant} order={order} index={index} {pattern} {head_mode} D={D}"
    empty = torch.isneginf(lse64)
    assert_within_budget(
        compare("lse", lse.cpu(), lse64, lse_lowp, dtype, empty=empty, empty_value=float("-inf")), context
    )
    out_empty = empty.transpose(1, 2).unsqueeze(-1)
    assert_within_budget(compare("out", out.cpu(), out64, out_lowp, dtype, empty=out_empty, empty_value=0.0), context)


@pytest.mark.parametrize(
    "seq_len, segments, rates, heads, query_range, covered",
    [
        # Every segment holds every offset: the launch writes each position (points, and the gaps as 0 / -inf).
        (64, (32, 64), (2, 4), 4, None, [True] * 4),
        # The last segment (2 positions) holds offsets 0 and 1 of rate 4 only: heads 2 and 3 are filled first.
        (66, (66, 64), (1, 4), 8, None, [True] * 4 + [True, True, False, False]),
        # A query chunk starting in the gap after a block's last point (t = 15 at 60 or 61, rate 4): that
        # block has no point in the chunk, so no row writes 62, 63 for offsets 0 and 1; offsets 2, 3 have theirs.
        (128, (128,), (4,), 4, (62, 128), [False, False, True, True]),
    ],
)
def test_first_launch_zeroes_the_lattice_gaps(seq_len, segments, rates, heads, query_range, covered):
    """Positions on no lattice point of a head are written 0 / -inf by the kernel (no separate fill) where
    its rows reach them; covers_head says which heads still need the fill. NaN poison (always on the
    CPU) makes any position that neither writes fail the comparison."""
    geometry = AttentionGeometry(DilationConfig(segments, rates, "split"), seq_len, heads)
    config = make_config("dense")
    q0, q1 = query_range or (0, seq_len)
    plan = CallPlan(geometry, config, False, 16**-0.5, (q0, q1), (0, seq_len))
    launch = triton_backend.device_tables(plan, DEVICE)[0]
    assert launch.covers_head.tolist() == covered
    q, k, v, _ = make_inputs(seq_len, 1, seq_len, heads, heads, 16, torch.float32)
    empty = check_partial(q, k, v, None, geometry, config, False, query_range=query_range, context="gaps")
    assert bool(empty.any()), "the case must contain positions on no lattice point"


@pytest.mark.parametrize("pattern, expected", [("dense", "v3tma"), ("local_window", "v3"), ("dilated_sparse", "v2")])
def test_auto_variant_follows_the_runs_of_full_blocks(pattern, expected):
    """ "auto" reads long runs of consecutive full blocks through descriptors, short ones by pointer steps, and
    scattered blocks from the list (the H200 A/B, NOTES_gpu.md); the result is the same (test above)."""
    geometry = AttentionGeometry(DilationConfig((256,), (1,), "split"), 256, 2)
    config = make_config(pattern, block_size=16, max_blocks=16)
    if pattern == "local_window":
        config = SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=64)
    if pattern == "dilated_sparse":
        config = SparsePatternConfig(pattern_type="dilated_sparse", block_size=16, sparsity_ratio=0.25)
    launch = triton_backend.device_tables(CallPlan.whole(geometry, config, False, 1.0), DEVICE)[0]
    assert triton_backend._auto_variant(launch) == expected, launch.mean_run


@pytest.mark.parametrize(
    "argument, value, allowed",
    [
        ("variant", "v9", "v2"),
        ("order", "shortest_first", "by_lattice"),
        ("index", "guess", "registers"),
    ],
)
def test_unknown_kernel_choice_is_a_value_error(argument, value, allowed):
    q, k, v, _ = make_inputs(1, 1, 32, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=f"={value!r}.*{allowed}"):
        triton_backend.partial_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, _plan(16), **{argument: value})


# ------------------------------------------------------------------------------------------
# What the kernel refuses
# ------------------------------------------------------------------------------------------


def _plan(block_size, D=16, N=32):
    config = SparsePatternConfig(pattern_type="dense", block_size=block_size)
    geometry = AttentionGeometry(DilationConfig((N,), (1,), "split"), N, 2)
    return CallPlan.whole(geometry, config, False, D**-0.5)


@pytest.mark.parametrize("block_size", [8, 24, 3])
def test_bad_block_size_is_a_value_error(block_size):
    q, k, v, _ = make_inputs(1, 1, 32, 2, 2, 16, torch.float32)
    with pytest.raises(ValueError, match=rf"block_size={block_size}.*power of two >= 16"):
        triton_backend.partial_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, _plan(block_size))
    reasons = triton_backend.unsupported_reasons(block_size, 16, torch.float32)
    assert len(reasons) == 1 and f"block_size={block_size}" in reasons[0]


def test_bad_head_dim_is_a_value_error():
    q, k, v, _ = make_inputs(1, 1, 32, 2, 2, 320, torch.float32)
    with pytest.raises(ValueError, match="head_dim=320"):
        triton_backend.partial_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, _plan(16, 320))
    assert triton_backend.unsupported_reasons(16, 64, torch.float16) == []
    assert triton_backend.unsupported_reasons(16, 320, torch.float16) == [
        f"head_dim=320 is not supported by backend='triton': it needs 1 <= head_dim <= {triton_backend.MAX_HEAD_DIM} "
        f"(head dims that are not a power of two are padded by masks)"
    ]


def test_the_plain_forward_refuses_inputs_that_require_grad():
    """It records no graph: gradients go through triton_backward.differentiable_forward, never silently nowhere."""
    q, k, v, _ = make_inputs(1, 1, 32, 2, 2, 16, torch.float32)
    q = q.to(DEVICE).requires_grad_()
    with pytest.raises(RuntimeError, match="requires grad.*differentiable_forward"):
        triton_backend.partial_forward(q, k.to(DEVICE), v.to(DEVICE), None, _plan(16))


def test_float64_is_a_type_error_that_names_the_torch_backend():
    q, k, v, _ = make_inputs(1, 1, 32, 2, 2, 16, torch.float64)
    with pytest.raises(TypeError, match=r"q\.dtype=torch\.float64.*float32 at most.*backend='torch'"):
        triton_backend.partial_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, _plan(16))


def test_unsupported_reasons_lists_every_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at call time: off CUDA the kernel then cannot run at all
    reasons = triton_backend.unsupported_reasons(24, 300, torch.float64, "cpu")
    expected = ["block_size=24", "head_dim=300", "dtype=torch.float64", "device=cpu"]
    assert len(reasons) == len(expected) and all(r.startswith(e) for r, e in zip(reasons, expected)), reasons
    assert triton_backend.unsupported_reasons(16, 256, torch.bfloat16, "cuda") == []
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (reason,) = triton_backend.unsupported_reasons(16, 16, torch.bfloat16, "cpu")
    assert reason.startswith("dtype=torch.bfloat16 on device=cpu") and "interpreter" in reason
    # A call with several problems raises the first one's exception with every message.
    q, k, v, _ = make_inputs(1, 1, 32, 2, 2, 16, torch.float64)
    with pytest.raises(ValueError, match=r"block_size=24.*q\.dtype=torch\.float64"):
        triton_backend.partial_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, _plan(24))


@pytest.mark.parametrize(
    "layout, prefix, host_only",
    [
        (triton_backend.WorkItem, "ITEM_", set()),
        (triton_backend.WeightBlock, "WEIGHT_", {"BRANCH", "PAD"}),
    ],
)
def test_kernel_constants_follow_the_record_layouts(layout, prefix, host_only):
    """Each column the kernels read is the layout's column, and a record has no gap and no spare column."""
    assert [column.value for column in layout] == list(range(len(layout)))
    assert getattr(triton_backend, prefix + "WIDTH").value == len(layout)
    for column in layout:
        constant = getattr(triton_backend, prefix + column.name, None)
        assert (constant is None) == (column.name in host_only), column
        assert constant is None or constant.value == column.value, column


@pytest.mark.parametrize("causal", [False, True])
def test_merge_on_write_of_adjacent_key_chunks_is_the_union(causal):
    """Two key chunks merged into one accumulator by the kernel equal the partial over their union (section 5)."""
    config = SparsePatternConfig(pattern_type="global_local", block_size=16, local_window_size=32, global_tokens=16)
    geometry = AttentionGeometry(DilationConfig((32, 61), (1, 2), "all"), 61, 4)
    q, k, v, mask = make_inputs(7, 2, 61, 4, 2, 16, torch.float32, 0.1)
    mask[1] = True  # batch 1 attends nothing: its rows must stay exactly empty
    (q0, q1), pieces = (13, 50), ((5, 29), (29, 61))
    scale = 16**-0.5
    qc = q[:, q0:q1].to(DEVICE)
    accumulator = (
        torch.zeros(2, q1 - q0, 4, 16, device=DEVICE),
        torch.full((2, 4, q1 - q0), float("-inf"), device=DEVICE),
    )
    for k0, k1 in pieces:
        plan = CallPlan(geometry, config, causal, scale, (q0, q1), (k0, k1))
        kc, vc, mc = (t[:, k0:k1].to(DEVICE) for t in (k, v, mask))
        assert triton_backend.partial_forward(qc, kc, vc, mc, plan, into=accumulator) is not None
    out, lse = accumulator
    k0, k1 = pieces[0][0], pieces[-1][1]
    kwargs = dict(query_start=q0, key_start=k0, is_causal=causal, key_padding_mask=mask[:, k0:k1], scale=scale)
    qr, kr, vr = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]
    out64, lse64 = partial_attention(qr, kr, vr, geometry, config, **kwargs)
    out32, lse32 = partial_attention(qr, kr, vr, geometry, config, compute_dtype=None, **kwargs)
    empty = torch.isneginf(lse64)
    assert bool(empty.any()) and not bool(empty.all())  # both kinds of rows are checked
    assert_within_budget(compare("lse", lse.cpu(), lse64, lse32, torch.float32, empty=empty, empty_value=float("-inf")))
    out_empty = empty.transpose(1, 2).unsqueeze(-1)
    assert_within_budget(compare("out", out.cpu(), out64, out32, torch.float32, empty=out_empty, empty_value=0.0))


def _zigzag_step(causal: bool):
    """A rank's ring step as zigzag lays it out: query pieces (0, 16) and (64, 80) at rows 0-16 and 16-32 of q,
    key pieces (16, 32) and (80, 96) at rows 0-16 and 16-32 of the key chunk; every piece pair in the step."""
    config = SparsePatternConfig(pattern_type="global_local", block_size=16, local_window_size=32, global_tokens=16)
    geometry = AttentionGeometry(DilationConfig((32, 96), (1, 2), "all"), 96, 4)
    q_pieces, k_pieces = ((0, 16), (64, 80)), ((16, 32), (80, 96))
    pairs = tuple(
        StepPair(CallPlan(geometry, config, causal, 0.25, qp, kp), qp[0] - 16 * a, kp[0] - 16 * b)
        for a, qp in enumerate(q_pieces)
        for b, kp in enumerate(k_pieces)
    )
    return pairs, q_pieces, k_pieces


@pytest.mark.parametrize("causal", [False, True])
def test_a_ring_step_in_one_launch_equals_its_pairs_merged_one_by_one(causal):
    """step_forward_into (every pair of a ring step in one launch per head layer and round) gives bitwise what
    partial_forward(into=...) gives pair by pair in the same order, on chunks at shifted rows of q and k."""
    pairs, q_pieces, k_pieces = _zigzag_step(causal)
    q, k, v, mask = make_inputs(11, 2, 32, 4, 2, 16, torch.float32, 0.2)
    mask[1] = True  # batch 1 attends nothing: its rows stay empty
    q, k, v, mask = (t.to(DEVICE) for t in (q, k, v, mask))
    empty = lambda rows: (  # noqa: E731
        torch.zeros(2, rows, 4, 16, device=DEVICE),
        torch.full((2, 4, rows), float("-inf"), device=DEVICE),
    )
    step = empty(32)
    assert triton_backend.step_forward_into(step, q, k, v, mask, pairs, variant="v2") is not None
    pieces = [empty(16), empty(16)]
    for pair in pairs:
        a, b = q_pieces.index(pair.plan.query_range), k_pieces.index(pair.plan.key_range)
        rows, keys = slice(16 * a, 16 * a + 16), slice(16 * b, 16 * b + 16)
        triton_backend.partial_forward(
            q[:, rows], k[:, keys], v[:, keys], mask[:, keys], pair.plan, variant="v2", into=pieces[a]
        )
    assert torch.equal(step[0], torch.cat([out for out, _ in pieces], dim=1))
    assert torch.equal(step[1], torch.cat([lse for _, lse in pieces], dim=2))
    reached = ~torch.isneginf(step[1])
    assert bool(reached[0].any()) and not bool(reached[1].any())
    # Two query pieces x two key pieces: the pairs of one query piece take separate launches.
    assert [len(members) for members in triton_backend._rounds(pairs)] == [2, 2]
    step = triton_backend.step_tables(pairs, DEVICE, 32)
    assert [len(launches) for launches in step.rounds] == [2, 2]  # head_mode "all": two layers
    # Both query pieces are in the first round; a piece's rows are filled at the heads its first pair's first
    # launch does not write in full (a piece that starts in a gap of a dilated lattice).
    fills = set()
    for pair in triton_backend._rounds(pairs)[0]:
        covers = triton_backend.device_tables(pair.plan, DEVICE)[0].covers_head.tolist()
        fills |= {(*pair.query_rows, head) for head, covered in enumerate(covers) if not covered}
    boxes = {(r0, r1, h) for r0, r1, h0, h1 in step.first_fills for h in range(h0, h1)}
    assert boxes == fills and fills


@pytest.mark.parametrize("causal", [False, True])
def test_a_rings_first_step_writes_what_merging_into_an_empty_accumulator_gives(causal):
    """step_forward (the first step: plain writes, fills only where no first-round pair writes a head in full) equals
    step_forward_into from (0, -inf) bitwise: on zigzag's two rounds, and on pairs that leave rows of q to nobody
    and start a chunk in a gap of a dilated lattice (off CUDA unwritten points would hold NaN)."""
    pairs, _, _ = _zigzag_step(causal)
    geometry = AttentionGeometry(DilationConfig((16, 48), (1, 3), "split"), 96, 4)
    config = SparsePatternConfig(pattern_type="dilated_sparse", sparsity_ratio=0.5, block_size=16)
    gapped = tuple(  # query chunks (5, 40) and (61, 96) at rows 0-35 and 40-75 of q: rows 35-40 and 75-80 unreached
        StepPair(CallPlan(geometry, config, causal, 0.25, qr, kr), qr[0] - row, kr[0] - key_row)
        for qr, row, kr, key_row in (((5, 40), 0, (0, 48), 0), ((61, 96), 40, (48, 96), 32))
    )
    q, k, v, mask = make_inputs(13, 2, 80, 4, 2, 16, torch.float32, 0.2)
    mask[1] = True  # batch 1 attends nothing: empty rows written by the kernel, not by a fill
    q, k, v, mask = (t.to(DEVICE) for t in (q, k, v, mask))
    for step in (pairs, gapped):
        rows = 32 if step is pairs else 80
        qs, ks, vs, ms = q[:, :rows], k[:, :rows], v[:, :rows], mask[:, :rows]
        first = triton_backend.step_forward(qs, ks, vs, ms, step, variant="v2")
        merged = (
            torch.zeros(2, rows, 4, 16, device=DEVICE),
            torch.full((2, 4, rows), float("-inf"), device=DEVICE),
        )
        triton_backend.step_forward_into(merged, qs, ks, vs, ms, step, variant="v2")
        assert first[0].dtype == torch.float32
        assert torch.equal(first[0], merged[0]) and torch.equal(first[1], merged[1])
        assert bool(torch.isneginf(first[1]).any()) and not bool(torch.isneginf(first[1]).all())


def test_a_single_step_in_q_dtype_is_the_unsplit_call():
    """With out_dtype = q's dtype (a ring whose only step computes) a step of one pair over the whole sequence
    writes what partial_forward writes for the unsplit call, bitwise; other out dtypes are refused."""
    geometry = AttentionGeometry(DilationConfig((32, 64), (1, 2), "all"), 64, 4)
    config = SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=32)
    plan = CallPlan.whole(geometry, config, True, 0.25)
    q, k, v, mask = make_inputs(14, 1, 64, 4, 2, 16, torch.float16, 0.2)
    q, k, v, mask = (t.to(DEVICE) for t in (q, k, v, mask))
    out, lse = triton_backend.step_forward(q, k, v, mask, (StepPair(plan, 0, 0),), torch.float16)
    expected_out, expected_lse = triton_backend.partial_forward(q, k, v, mask, plan)
    assert out.dtype == expected_out.dtype == torch.float16
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    with pytest.raises(ValueError, match=r"out_dtype=torch.bfloat16 must be torch.float32 or q's dtype"):
        triton_backend.step_forward(q, k, v, mask, (StepPair(plan, 0, 0),), torch.bfloat16)


def test_step_pairs_are_checked():
    """Each pair's rows must lie inside q and k, and the pairs must be of one call; messages name the pair."""
    pairs, _, _ = _zigzag_step(False)
    q, k, v, _ = make_inputs(12, 1, 32, 4, 2, 16, torch.float32, 0.0)
    accumulator = (torch.zeros(1, 32, 4, 16), torch.full((1, 4, 32), float("-inf")))
    with pytest.raises(TypeError, match="non-empty tuple of StepPair"):
        triton_backend.step_forward_into(accumulator, q, k, v, None, ())
    causal_pair = StepPair(dataclasses.replace(pairs[0].plan, is_causal=True), 0, 16)
    with pytest.raises(ValueError, match=r"must share .* pairs\[1\]"):
        triton_backend.step_forward_into(accumulator, q, k, v, None, (pairs[0], causal_pair))
    with pytest.raises(ValueError, match=r"key chunk \(80, 96\) lies at rows \[64, 80\) of a tensor of 32 rows"):
        triton_backend.step_forward_into(accumulator, q, k, v, None, (StepPair(pairs[3].plan, 48, 16),))
    with pytest.raises(ValueError, match=r"query chunk \(64, 80\) lies at rows \[-16, 0\)"):
        triton_backend.step_forward_into(accumulator, q, k, v, None, (StepPair(pairs[3].plan, 80, 64),))


@pytest.mark.parametrize(
    "query_ranges, expected",
    [
        ([(0, 8), (8, 16), (4, 12)], [[0, 1], [2]]),  # (4, 12) overlaps both: a round of its own
        ([(0, 8), (0, 8), (0, 8)], [[0], [1], [2]]),
        ([(0, 8), (3, 5), (8, 9), (5, 8)], [[0, 2], [1, 3]]),  # touching ranges share a round
    ],
)
def test_rounds_put_pairs_on_disjoint_rows_first_fit_in_order(query_ranges, expected):
    geometry = AttentionGeometry(DilationConfig((16,), (1,), "split"), 16, 1)
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    pairs = [StepPair(CallPlan(geometry, config, False, 1.0, r, (0, 16)), 0, 0) for r in query_ranges]
    rounds = triton_backend._rounds(tuple(pairs))
    position = lambda member: next(i for i, pair in enumerate(pairs) if pair is member)  # noqa: E731
    assert [[position(member) for member in members] for members in rounds] == expected


def test_merge_on_write_leaves_rows_the_pair_does_not_reach():
    """Rows with no allowed key in the pair keep the accumulator's bits; the others change."""
    config = SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=16)
    geometry = AttentionGeometry(DilationConfig((16, 64), (1, 4), "split"), 64, 2)
    q, k, v, _ = make_inputs(3, 1, 64, 2, 2, 16, torch.float32, 0.0)
    plan = CallPlan(geometry, config, False, 0.25, (0, 64), (0, 32))
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    own_out, own_lse = triton_backend.partial_forward(dev(q), dev(k[:, :32]), dev(v[:, :32]), None, plan)
    before = (torch.randn(1, 64, 2, 16, device=DEVICE), torch.randn(1, 2, 64, device=DEVICE))
    after = tuple(t.clone() for t in before)
    triton_backend.partial_forward(dev(q), dev(k[:, :32]), dev(v[:, :32]), None, plan, into=after)
    unreached = torch.isneginf(own_lse)
    assert bool(unreached.any()) and not bool(unreached.all())
    assert torch.equal(after[1][unreached], before[1][unreached])
    rows = unreached.transpose(1, 2)  # (B, N, H)
    assert torch.equal(after[0][rows], before[0][rows])
    assert not torch.equal(after[1][~unreached], before[1][~unreached])


@pytest.mark.parametrize(
    "into, error, words",
    [
        ([torch.zeros(1, 8, 2, 16), torch.zeros(1, 2, 8)], TypeError, "into must be a tuple"),
        (
            (torch.zeros(1, 8, 2, 16, dtype=torch.float16), torch.zeros(1, 2, 8)),
            ValueError,
            "into's out must be float32",
        ),
        (
            (torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2)),
            ValueError,
            r"into's lse must be float32 of shape \(1, 2, 8\)",
        ),
    ],
)
def test_bad_accumulator_is_refused_by_name(into, error, words):
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    geometry = AttentionGeometry(DilationConfig((8,), (1,), "split"), 8, 2)
    q, k, v, _ = make_inputs(1, 1, 8, 2, 2, 16, torch.float32, 0.0)
    plan = CallPlan(geometry, config, False, 0.25, (0, 8), (0, 8))
    into = into if isinstance(into, list) else tuple(t.to(DEVICE) for t in into)
    with pytest.raises(error, match=words):
        triton_backend.partial_forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), None, plan, into=into)
