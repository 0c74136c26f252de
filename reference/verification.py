"""docs/numerics.md in one place: is an optimized result within the budget of its dtype?

error(opt)  <=  k * error(reference run in opt's dtype) + 2 * eps(dtype) * max|ref64|

with k = 2 for out and lse, 3 for gradients. Rows the float64 reference leaves empty
(lse = -inf) must be exactly out = 0 / lse = -inf; everything else must be finite.

In float64 the reference run in the path's dtype is the float64 reference itself, whose own error
is then part of the measured difference: a path summing in another order (blocks, an online
softmax, merges) differs from it in the last bits (seen under the dev profile: the torch backend 6
ulp off with 17 blocks of one key, against a flat budget of 2 eps). So in float64 the baseline is
``float64_baseline``: the reference's float32 deviation scaled by eps(float64) / eps(float32), and
that estimate enters the budget once more as inherited error (docs/numerics.md, "float64").

docs/numerics.md names no budget for the sparse weights of section 6. They are p = exp(s - lse)
from the path's own lse, so an lse error d (allowed up to lse's budget) moves p by p * d: the
weights and their row sums get the budget above (k = 2) plus ``inherited = max|p| * lse budget``.
Without that term a path whose lse passes could not pass its weights (seen under the dev
profile: 2.5 ulp on a weight of exactly 1, 7 ulp on 0.77 from flex's float32 lse).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

K_OUTPUT = 2.0
K_GRADIENT = 3.0


@dataclass(frozen=True)
class Verdict:
    name: str
    error: float
    budget: float
    reference_error: float
    worst_index: tuple[int, ...] | None
    problem: str | None = None  # a non-numeric failure: non-finite values, wrong empty rows

    @property
    def passed(self) -> bool:
        return self.problem is None and self.error <= self.budget

    def describe(self) -> str:
        status = "ok" if self.passed else "FAIL"
        text = (
            f"{self.name}: {status} error={self.error:.3e} budget={self.budget:.3e} "
            f"(reference's own error in this dtype {self.reference_error:.3e}; worst at {self.worst_index})"
        )
        return text if self.problem is None else f"{text}; {self.problem}"


def _max_abs(diff: torch.Tensor) -> tuple[float, tuple[int, ...] | None]:
    if diff.numel() == 0:
        return 0.0, None
    flat = int(torch.argmax(diff))
    return float(diff.reshape(-1)[flat]), tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))


def compare(
    name: str,
    actual: torch.Tensor,
    reference64: torch.Tensor,
    reference_lowp: torch.Tensor,
    dtype: torch.dtype,
    k: float = K_OUTPUT,
    empty: torch.Tensor | None = None,
    empty_value: float = 0.0,
    inherited: float = 0.0,
) -> Verdict:
    """Compare ``actual`` with the float64 reference by docs/numerics.md's budget.

    ``empty`` is a bool mask broadcastable to the tensors marking entries of empty rows, which
    must equal ``empty_value`` exactly (0 for out, -inf for lse) and are left out of the error.
    ``inherited`` is added to the budget: the error a quantity computed from another checked one
    inherits from it (``weights_inherited_budget``); 0 for everything docs/numerics.md names.
    """
    if tuple(actual.shape) != tuple(reference64.shape):
        return Verdict(name, float("inf"), 0.0, 0.0, None, f"shape {tuple(actual.shape)} != {tuple(reference64.shape)}")
    actual = actual.detach().to("cpu", torch.float64)
    ref = reference64.detach().to("cpu", torch.float64)
    lowp = reference_lowp.detach().to("cpu", torch.float64)
    keep = torch.ones_like(ref, dtype=torch.bool)
    problem = None
    if empty is not None:
        empty = empty.to("cpu").expand_as(ref)
        keep = ~empty
        wrong = empty & ~(actual == empty_value)
        if bool(wrong.any()):
            index = tuple(int(i) for i in wrong.nonzero()[0])
            problem = f"empty row not exactly {empty_value} at {index}: {float(actual[index])}"
    if problem is None and not bool(torch.isfinite(actual[keep]).all()):
        index = tuple(int(i) for i in (~torch.isfinite(actual) & keep).nonzero()[0])
        problem = f"non-finite value {float(actual[index])} at {index}"
    zero = torch.zeros((), dtype=torch.float64)
    diff = torch.where(keep, (actual - ref).abs(), zero).nan_to_num(nan=float("inf"))
    lowp_diff = torch.where(keep, (lowp - ref).abs(), zero).nan_to_num(nan=float("inf"))
    error, worst = _max_abs(diff)
    reference_error, _ = _max_abs(lowp_diff)
    scale = float(torch.where(keep, ref.abs(), zero).max()) if ref.numel() else 0.0
    if dtype == torch.float64:
        inherited += reference_error  # the float64 reference's own error, in the measured difference too
    budget = k * reference_error + 2.0 * torch.finfo(dtype).eps * scale + inherited
    return Verdict(name, error, budget, reference_error, worst, problem)


def float64_baseline(reference64: torch.Tensor, reference32: torch.Tensor) -> torch.Tensor:
    """The reference's own float64 error, estimated: its float32 deviation scaled to float64's eps.

    Returned as a tensor whose difference from ``reference64`` is that estimate, so that ``compare``
    takes it as the baseline run in float64 (non-finite entries, e.g. lse = -inf of empty rows, keep
    the float64 value). ``reference32`` must be computed from the same values (inputs drawn in
    float32 and cast, as ``equivalence_tests.strategies.make_inputs`` does).
    """
    ratio = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    ref64 = reference64.detach().to("cpu", torch.float64)
    ref32 = reference32.detach().to("cpu", torch.float64)
    scaled = ref64 + (ref32 - ref64) * ratio
    return torch.where(torch.isfinite(ref64) & torch.isfinite(ref32), scaled, ref64)


def weights_inherited_budget(lse_verdict: Verdict, probabilities64: torch.Tensor) -> float:
    """What the weights p = exp(s - lse) inherit from lse's budget: max|p| * (lse budget)."""
    largest = float(probabilities64.detach().abs().max()) if probabilities64.numel() else 0.0
    return largest * lse_verdict.budget


def assert_within_budget(verdict: Verdict, context: str = "") -> None:
    if not verdict.passed:
        raise AssertionError(f"{verdict.describe()}\n  configuration: {context}")
