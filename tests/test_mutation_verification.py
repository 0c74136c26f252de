"""docs/numerics.md's budget recomputed by hand, and every way ``reference.verification.compare`` can fail.

Every backend test passes its comparisons, so the failing branches (a shape mismatch, a wrong empty
row, a non-finite value) and the exact budget were reached by no test until ``make mutation``
(experiments/mutation.py) changed them unnoticed. The numbers here are chosen so that each term of
the budget, and its factor, shows.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reference import Verdict, assert_within_budget, compare, verification, weights_inherited_budget
from reference.verification import K_GRADIENT, K_OUTPUT


def test_the_factors_are_docs_numerics():
    """docs/numerics.md: k = 2 for out and lse, k = 3 for the gradients."""
    assert (K_OUTPUT, K_GRADIENT) == (2.0, 3.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [None, 3.0])
def test_the_budget_is_k_reference_errors_plus_two_roundings_of_the_largest_value(dtype, k):
    reference64 = torch.tensor([[0.5, -2.5], [1.25, 0.0]], dtype=torch.float64)
    reference_lowp = reference64 + torch.tensor([[3e-4, 0.0], [-7e-4, 1e-4]], dtype=torch.float64)
    actual = reference64 + torch.tensor([[0.0, 1e-3], [0.0, -2e-4]], dtype=torch.float64)
    verdict = compare("out", actual, reference64, reference_lowp, dtype, **({} if k is None else {"k": k}))
    factor = 2.0 if k is None else k
    eps = torch.finfo(dtype).eps
    assert verdict.reference_error == pytest.approx(7e-4, rel=1e-9)
    assert verdict.budget == pytest.approx(factor * 7e-4 + 2 * eps * 2.5, rel=1e-9)
    assert verdict.error == pytest.approx(1e-3, rel=1e-9)
    assert verdict.worst_index == (0, 1)
    assert verdict.passed == (verdict.error <= verdict.budget)
    assert verdict.problem is None


def test_the_worked_example_of_docs_numerics():
    """float32, max|ref| = 2.0, max|ref_T - ref| = 3e-7: the budget is 1.077e-6."""
    reference64 = torch.tensor([2.0, -1.0], dtype=torch.float64)
    verdict = compare(
        "out", reference64, reference64, reference64 + torch.tensor([0.0, 3e-7], dtype=torch.float64), torch.float32
    )
    assert verdict.budget == pytest.approx(1.077e-6, rel=1e-3)
    assert verdict.error == 0.0 and verdict.passed


def test_inherited_is_added_to_the_budget_and_an_error_at_the_budget_passes():
    reference64 = torch.tensor([1.0, 0.25], dtype=torch.float64)
    base = compare("p", reference64, reference64, reference64, torch.float32)
    assert base.budget == 2 * torch.finfo(torch.float32).eps * 1.0 and base.reference_error == 0.0
    with_inherited = compare("p", reference64, reference64, reference64, torch.float32, inherited=1e-3)
    assert with_inherited.budget == pytest.approx(base.budget + 1e-3, rel=1e-12)
    at_budget = compare(
        "p",
        reference64 + torch.tensor([base.budget, 0.0], dtype=torch.float64),
        reference64,
        reference64,
        torch.float32,
    )
    assert at_budget.error <= at_budget.budget and at_budget.passed
    over = compare(
        "p",
        reference64 + torch.tensor([0.0, 3 * base.budget], dtype=torch.float64),
        reference64,
        reference64,
        torch.float32,
    )
    assert not over.passed and over.worst_index == (1,)


def test_a_shape_mismatch_is_a_problem_not_a_number():
    verdict = compare(
        "lse",
        torch.zeros(2, 3),
        torch.zeros(3, 2, dtype=torch.float64),
        torch.zeros(3, 2, dtype=torch.float64),
        torch.float32,
    )
    assert verdict.problem == "shape (2, 3) != (3, 2)"
    assert (verdict.error, verdict.budget, verdict.reference_error, verdict.worst_index) == (
        float("inf"),
        0.0,
        0.0,
        None,
    )
    assert not verdict.passed


def test_empty_rows_must_hold_exactly_the_empty_value_and_are_left_out_of_the_error():
    reference64 = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, -4.0]], dtype=torch.float64)
    empty = torch.tensor([[False], [True], [False]])
    good = compare("out", reference64.float(), reference64, reference64, torch.float32, empty=empty)
    assert good.passed and good.problem is None
    # a huge value in the reference's empty row does not count towards the scale or the error
    reference_with_junk = reference64.clone()
    reference_with_junk[1] = 1e6
    assert compare("out", reference64, reference_with_junk, reference64, torch.float32, empty=empty).budget == (
        2 * torch.finfo(torch.float32).eps * 4.0
    )
    wrong = reference64.clone()
    wrong[1] = torch.tensor([0.0, 1e-30], dtype=torch.float64)
    wrong[2, 0] = 1e-30  # not in an empty row: a numeric difference, not a problem
    verdict = compare("out", wrong, reference64, reference64, torch.float32, empty=empty)
    assert verdict.problem == "empty row not exactly 0.0 at (1, 1): 1e-30"
    assert not verdict.passed
    twice = reference64.clone()
    twice[1] = torch.tensor([5.0, 6.0], dtype=torch.float64)
    assert compare("out", twice, reference64, reference64, torch.float32, empty=empty).problem == (
        "empty row not exactly 0.0 at (1, 0): 5.0"
    )
    lse64 = torch.tensor([0.5, float("-inf"), 1.5], dtype=torch.float64)
    lse_empty = torch.isneginf(lse64)
    ok = compare("lse", lse64.clone(), lse64, lse64, torch.float32, empty=lse_empty, empty_value=float("-inf"))
    assert ok.passed and ok.error == 0.0
    not_empty = compare(
        "lse",
        torch.tensor([0.5, 0.0, 1.5], dtype=torch.float64),
        lse64,
        lse64,
        torch.float32,
        empty=lse_empty,
        empty_value=float("-inf"),
    )
    assert not_empty.problem == "empty row not exactly -inf at (1,): 0.0"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_fails_whatever_its_size(bad):
    reference64 = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    actual = reference64.clone()
    actual[1, 0] = bad
    actual[1, 1] = bad
    verdict = compare("out", actual, reference64, reference64, torch.float32)
    assert verdict.problem == f"non-finite value {bad} at (1, 0)"
    assert verdict.error >= 1e308 and not verdict.passed
    assert verdict.describe().endswith(f"; non-finite value {bad} at (1, 0)")


def test_nothing_to_compare_passes_with_no_worst_index():
    nothing = torch.zeros(0, 3, dtype=torch.float64)
    verdict = compare("lse", nothing, nothing, nothing, torch.float32)
    assert (verdict.error, verdict.budget, verdict.reference_error, verdict.worst_index) == (0.0, 0.0, 0.0, None)
    assert verdict.passed


def test_describe_says_ok_or_fail_with_the_numbers_and_the_problem():
    passing = Verdict("dq", 1e-7, 2e-7, 5e-8, (0, 3))
    assert passing.passed
    assert passing.describe() == (
        "dq: ok error=1.000e-07 budget=2.000e-07 (reference's own error in this dtype 5.000e-08; worst at (0, 3))"
    )
    failing = Verdict("dq", 3e-7, 2e-7, 5e-8, (0, 3))
    assert not failing.passed
    assert failing.describe() == (
        "dq: FAIL error=3.000e-07 budget=2.000e-07 (reference's own error in this dtype 5.000e-08; worst at (0, 3))"
    )
    problem = Verdict("dq", 0.0, 2e-7, 5e-8, None, "shape (1,) != (2,)")
    assert not problem.passed
    assert problem.describe().startswith("dq: FAIL") and problem.describe().endswith("; shape (1,) != (2,)")
    with pytest.raises(dataclasses.FrozenInstanceError):
        passing.error = 1.0


def test_assert_within_budget_raises_with_the_context_only_when_failing():
    assert_within_budget(Verdict("out", 1e-7, 2e-7, 5e-8, (0,)), "never shown")
    with pytest.raises(AssertionError) as info:
        assert_within_budget(Verdict("out", 3e-7, 2e-7, 5e-8, (0,)), "B=1 N=7")
    assert str(info.value).startswith("out: FAIL") and str(info.value).endswith("\n  configuration: B=1 N=7")


def test_weights_inherit_the_largest_probability_times_the_lse_budget():
    lse_verdict = Verdict("lse", 0.0, 4e-6, 1e-6, None)
    probabilities = torch.tensor([[0.25, -0.0], [0.75, 0.5]], dtype=torch.float64)
    assert weights_inherited_budget(lse_verdict, probabilities) == 0.75 * 4e-6
    assert weights_inherited_budget(lse_verdict, -probabilities) == 0.75 * 4e-6
    assert weights_inherited_budget(lse_verdict, torch.zeros(0, 4, dtype=torch.float64)) == 0.0


def test_float64_baseline_moves_the_reference_by_its_float32_deviation_times_the_eps_ratio():
    # eps(float64) / eps(float32) = 2^-52 / 2^-23 = 2^-29: every value below is exact in float64.
    ref64 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    ref32 = torch.tensor([1.0 + 2.0**-20, -2.0, 0.5 - 2.0**-21], dtype=torch.float32)
    expected = torch.tensor([1.0 + 2.0**-49, -2.0, 0.5 - 2.0**-50], dtype=torch.float64)
    assert torch.equal(verification.float64_baseline(ref64, ref32), expected)


def test_float64_baseline_keeps_the_float64_value_where_either_run_is_not_finite():
    ref64 = torch.tensor([float("-inf"), 3.0, float("-inf"), 1.0], dtype=torch.float64)
    ref32 = torch.tensor([float("-inf"), float("inf"), 0.25, float("nan")], dtype=torch.float32)
    baseline = verification.float64_baseline(ref64, ref32)
    assert torch.equal(baseline[:3], ref64[:3]) and baseline[3].item() == 1.0


def test_compare_in_float64_adds_the_reference_error_once_more_and_not_in_float32():
    ref = torch.tensor([1.0], dtype=torch.float64)
    baseline = torch.tensor([1.0 + 2.0**-40], dtype=torch.float64)  # reference error 2^-40
    eps64, eps32 = torch.finfo(torch.float64).eps, torch.finfo(torch.float32).eps
    verdict64 = verification.compare("out", ref, ref, baseline, torch.float64, k=2.0)
    assert verdict64.budget == 3 * 2.0**-40 + 2 * eps64
    verdict32 = verification.compare("out", ref, ref, baseline, torch.float32, k=2.0)
    assert verdict32.budget == 2 * 2.0**-40 + 2 * eps32
