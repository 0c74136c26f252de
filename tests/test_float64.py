"""float64 inputs are computed in float64 (docs/numerics.md): the portable backend and the ring agree
with the float64 reference to float64 precision, and autograd's numerical checks pass on them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optimized
import reference
from equivalence_tests import strategies as s
from equivalence_tests.helpers import case_sizes, check_backend
from reference import DilationConfig, SparsePatternConfig
from reference.verification import compare, float64_baseline

CONFIG = SparsePatternConfig("local_window", block_size=2, local_window_size=4)


@settings(max_examples=10)
@given(case=s.attention_cases(**case_sizes("torch").case_kwargs()), data=st.data())
def test_torch_backend_and_ring_are_exact_in_float64(case, data):
    """The float64 budget (a few eps max|ref|, docs/numerics.md): a float32 step anywhere (1e-7) fails it by 10^7."""
    chunks = data.draw(st.none() | s.ring_splits(case.shape.seq_len), label="chunks")
    verdicts = check_backend(
        case,
        "torch",
        torch.float64,
        "cpu",
        ring_chunk_lengths=chunks,
        check_weights=data.draw(st.booleans(), label="weights"),
    )
    assert verdicts["out"].budget < 1e-13


def test_many_blocks_of_one_key_pass_and_a_float32_step_still_fails():
    # Found by the dev profile: 17 blocks of one key, merged one at a time by the online softmax, put the
    # torch backend 6 ulp off the float64 reference, past a flat 2 eps max|ref|. The reference's own
    # float64 error (estimated from its float32 run) is part of that difference and of the budget now.
    case = s.AttentionCase(
        shape=s.Shape(batch=1, seq_len=17, num_heads=1, num_kv_heads=1, head_dim=1),
        dilation=DilationConfig((18,), (1,), "split"),
        sparse_config=SparsePatternConfig("dense", block_size=1),
        is_causal=False,
        key_padding_mask=None,
        input_seed=0,
    )
    verdict = check_backend(case, "torch", torch.float64, "cpu")["out"]
    assert verdict.passed and verdict.budget < 1e-13
    q, k, v, _ = s.make_inputs(case, torch.float64)
    module = optimized.BlockSparseRingDilatedAttention(**s.module_kwargs(case), backend="torch")
    out64 = reference.BlockSparseRingDilatedAttention(**s.module_kwargs(case))(q, k, v)
    out32 = reference.BlockSparseRingDilatedAttention(**s.module_kwargs(case), compute_dtype=None)(
        q.float(), k.float(), v.float()
    )
    rounded = module(q, k, v).float().double()  # one float32 rounding of the output
    assert not compare("out", rounded, out64, float64_baseline(out64, out32), torch.float64).passed


def _inputs(seed, heads=2, kv_heads=1, seq_len=8, head_dim=2):
    # Small: gradcheck runs two forwards per input element, gradgradcheck many more.
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seq_len, heads, head_dim, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (
        torch.randn(1, seq_len, kv_heads, head_dim, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(2)
    )
    mask = torch.zeros(1, seq_len, dtype=torch.bool)
    mask[0, 3] = True
    return q, k, v, mask


@pytest.mark.parametrize(
    "ring, head_mode, second_order",
    [(None, "split", True), ([3, 5], "split", True), ([3, 5], "all", False), ([0, 2, 6], "all", False)],
    ids=["unsplit split", "ring 3+5 split", "ring 3+5 all", "ring 0+2+6 all"],
)
def test_gradcheck_and_gradgradcheck_pass(ring, head_mode, second_order):
    module = optimized.BlockSparseRingDilatedAttention(
        [4, 8], [1, 2], CONFIG, backend="torch", ring_chunk_lengths=ring, head_mode=head_mode
    )
    q, k, v, mask = _inputs(1)

    def attention(q_, k_, v_):
        out, lse = module(q_, k_, v_, is_causal=True, key_padding_mask=mask, return_lse=True)
        return out, lse.masked_fill(torch.isneginf(lse), 0.0)  # -inf rows have no gradient to check

    assert torch.autograd.gradcheck(attention, (q, k, v))
    if second_order:
        assert torch.autograd.gradgradcheck(attention, (q, k, v))


def test_lse_and_weights_are_float64_for_float64_inputs():
    q, k, v, mask = _inputs(2)
    module = optimized.BlockSparseRingDilatedAttention([8, 12], [1, 2], CONFIG, backend="torch")
    out, weights, lse = module(q, k, v, return_attention_weights=True, return_lse=True)
    assert out.dtype == lse.dtype == weights["block_values"].dtype == torch.float64


def test_auto_never_picks_a_float32_kernel_for_float64():
    case = optimized.Case(torch.device("cuda"), torch.float64, 64, 64)
    choice = optimized.choose("auto", case)
    assert choice.name == "torch" and any("float64" in r for r in dict(choice.skipped)["triton"])


@settings(max_examples=5)
@given(case=s.attention_cases(**case_sizes("flex").case_kwargs()))
def test_eager_flex_on_the_cpu_is_exact_in_float64(case):
    verdicts = check_backend(case, "flex", torch.float64, "cpu")
    assert verdicts["out"].budget < 1e-13


def test_compiled_flex_refuses_float64_and_auto_never_picks_it():
    case = optimized.Case(torch.device("cuda"), torch.float64, 64, 64)
    assert any("float64" in r for r in optimized.dispatch.REGISTRY["flex"].unsupported_reasons(case))
