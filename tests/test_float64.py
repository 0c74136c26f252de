"""float64 inputs are computed in float64 (docs/numerics.md): the portable backend and the ring agree
with the float64 reference to float64 precision, and autograd's numerical checks pass on them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import optimized
from equivalence_tests import strategies as s
from equivalence_tests.helpers import case_sizes, check_backend
from reference import SparsePatternConfig

CONFIG = SparsePatternConfig("local_window", block_size=2, local_window_size=4)


@settings(max_examples=10)
@given(case=s.attention_cases(**case_sizes("torch").case_kwargs()), data=st.data())
def test_torch_backend_and_ring_are_exact_in_float64(case, data):
    """The budget in float64 is 2 eps max|ref|: a float32 step anywhere (1e-7) fails it by 10^8."""
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
