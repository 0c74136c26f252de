"""Backend "flex" (FlexAttention BlockMask over the compacted lattices) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import optimized
from optimized import flex_backend
from optimized.plan import CallPlan
from random_inputs import make_inputs
from reference import (
    AttentionGeometry,
    BlockSparseRingDilatedAttention as ReferenceAttention,
    DilationConfig,
    SparsePatternConfig,
    assert_within_budget,
    compare,
    partial_attention,
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
    assert_within_budget(compare("out", out, out64, out_lowp, q.dtype, empty=empty.transpose(1, 2).unsqueeze(-1)),
                         context)
    return empty


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
    empty = check_partial(q, k, v, mask, geometry, config, False, (0, 32), (0, 32), "empty rows")
    assert bool(empty[0].all()) and not bool(empty[1].any())


def test_module_end_to_end():
    config = SparsePatternConfig(pattern_type="dilated_sparse", block_size=4, sparsity_ratio=0.5)
    args = ([16, 32], [1, 2])
    q, k, v, mask = make_inputs(31, 2, 45, 4, 2, 8, torch.float32, 0.1, pad_first=True)
    module = optimized.BlockSparseRingDilatedAttention(*args, sparse_config=config, backend="flex")
    out, weights, lse = module(q, k, v, is_causal=True, key_padding_mask=mask, return_attention_weights=True,
                               return_lse=True)
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
# CUDA: compiled flex, gradients, the block-size rule
# ---------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(
    not CUDA, reason="needs CUDA (compiled FlexAttention; the CPU runs the same comparisons eagerly above)")


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
    scale = 16 ** -0.5
    generator = torch.Generator().manual_seed(5)
    out_weight = torch.randn(2, 150, 4, 16, generator=generator)
    lse_weight = torch.randn(2, 4, 150, generator=generator)
    plan = CallPlan.whole(geometry, config, True, scale)
    actual = gradients(lambda a, b, c: flex_backend.partial_forward(a, b, c, mask, plan),
                       q, k, v, out_weight, lse_weight, torch.float32)
    exact = gradients(lambda a, b, c: partial_attention(a, b, c, geometry, config, is_causal=True,
                                      key_padding_mask=mask.cpu(), scale=scale, compute_dtype=torch.float64),
                      q, k, v, out_weight, lse_weight, torch.float64)
    lowp = gradients(lambda a, b, c: partial_attention(a, b, c, geometry, config, is_causal=True,
                                      key_padding_mask=mask.cpu(), scale=scale, compute_dtype=dtype),
                     q, k, v, out_weight, lse_weight, dtype)
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

    with pytest.raises(ValueError, match="block_size=3"):
        flex_backend._check_inputs(FakeCuda(), FakeCuda(), FakeCuda(), plan)


def test_head_dim_padding_for_compiled_flex_changes_nothing():
    """Compiled flex (CUDA) pads head dims below 16 with zeros; the same padding on eager flex (CPU) gives
    the unpadded result in the first D columns, zeros after, and the same lse."""
    from optimized import flex_backend
    from torch.nn.attention.flex_attention import create_block_mask

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
