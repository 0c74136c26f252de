"""The torch backend's backward at its numerical edges, and the bound of its row groups.

The backward recomputes P = exp(scale q.k - lse) from the forward's lse and normalises it by the
row's mass M = sum_j P (optimized.torch_backend.partial_backward). With the forward's own lse, M is
1 up to rounding, so the gradient tests cannot see a P scaled by M instead of 1 / M, a mass taken
from the wrong row, or P = exp(s + lse) (every row scaled by one constant, which M cancels): only an
lse that is off by more than rounding, and scores large enough to overflow, can. And rows_per_group
keeps its bound rows x heads x batch <= work_size, which no result depends on. Found by
``make mutation`` (experiments/mutation.py).
"""

from __future__ import annotations

import pytest
import torch
from random_inputs import make_inputs

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
from reference.verification import K_GRADIENT

CONFIG = SparsePatternConfig(pattern_type="local_window", block_size=4, local_window_size=16)
GEOMETRY = AttentionGeometry(DilationConfig((16, 24), (1, 2), "all"), 37, 4)


def _reference_gradients(q, k, v, mask, scale, grad_out, compute_dtype):
    """(dq, dk, dv) of sum(out * grad_out) by autograd through the dense reference."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = partial_attention(
        *leaves, GEOMETRY, CONFIG, is_causal=True, key_padding_mask=mask, scale=scale, compute_dtype=compute_dtype
    )
    (out * grad_out.to(out.dtype)).sum().backward()
    return [t.grad for t in leaves]


def _check_gradients(actual, q, k, v, mask, scale, grad_out, context):
    exact = _reference_gradients(q, k, v, mask, scale, grad_out, torch.float64)
    lowp = _reference_gradients(q, k, v, mask, scale, grad_out, None)
    for name, got, want, base in zip(("dq", "dk", "dv"), actual, exact, lowp):
        assert_within_budget(compare(name, got, want, base, torch.float32, k=K_GRADIENT), context)


def test_backward_takes_the_exact_softmax_of_the_recomputed_scores_whatever_the_lse():
    """partial_backward given an lse shifted per row (here by up to +-0.5, far beyond rounding) still
    gives the gradients of docs/semantics.md section 4: P / M is the softmax of the recomputed scores,
    so a shift of a row's lse cancels between P and its mass."""
    q, k, v, mask = make_inputs(23, 2, 37, 4, 2, 8, torch.float32, 0.15, True)
    scale = 8**-0.5
    plan = CallPlan.whole(GEOMETRY, CONFIG, True, scale)
    with torch.no_grad():
        out, lse = torch_backend.partial_forward(q, k, v, mask, plan, work_size=5)
    assert bool(torch.isneginf(lse).any()), "the case should hold an empty row"
    generator = torch.Generator().manual_seed(29)
    shifted = lse + (torch.rand(lse.shape, generator=generator) - 0.5)  # -inf (empty rows) stays -inf
    grad_out = torch.randn(out.shape, generator=generator)
    actual = torch_backend.partial_backward(q, k, v, mask, plan, 5, out, shifted, grad_out, None)
    _check_gradients(actual, q, k, v, mask, scale, grad_out, "lse shifted per row")


def test_backward_with_scores_near_the_float32_range_stays_finite_and_within_budget():
    """Scores of tens (a large scale): exp(score + lse) would overflow float32 where exp(score - lse)
    <= 1 cannot, so the gradients must come out finite and match the reference."""
    q, k, v, mask = make_inputs(31, 1, 37, 4, 2, 8, torch.float32, 0.1, False)
    scale = 6.0
    plan = CallPlan.whole(GEOMETRY, CONFIG, True, scale)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = torch_backend.partial_forward(*leaves, mask, plan, work_size=7)
    assert float(lse.detach()[torch.isfinite(lse)].max()) > 45.0, "the case should hold scores near exp's float32 range"
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(37))
    (out * grad_out).sum().backward()
    _check_gradients([t.grad for t in leaves], q, k, v, mask, scale, grad_out, f"scale {scale}")


@pytest.mark.parametrize("work_size", [1, 5, 12, 13, 4096])
@pytest.mark.parametrize("batch, num_heads", [(1, 1), (2, 3), (3, 4)])
def test_rows_per_group_is_the_most_rows_within_work_size_and_at_least_one(work_size, batch, num_heads):
    """docs: rows x heads x batch score blocks stay within work_size; one row at least, when a single
    row already exceeds it."""
    rows = torch_backend.rows_per_group(work_size, batch, num_heads)
    per_row = batch * num_heads
    if per_row > work_size:
        assert rows == 1
    else:
        assert rows * per_row <= work_size < (rows + 1) * per_row
