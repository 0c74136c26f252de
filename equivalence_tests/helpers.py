"""Run one attention case on an optimized backend and hold it against the float64 reference.

``check_backend`` is the one place the equivalence suite compares a backend with the reference
(out, lse and optionally the sparse weights); ``check_gradients`` does the same for dq, dk, dv.
Both are exported so that a user can check a variant of their own::

    from equivalence_tests.helpers import check_backend
    from equivalence_tests import strategies as s

    @given(case=s.attention_cases())
    def test_my_variant(case):
        check_backend(case, "torch", torch.float32, module_options={"work_size": 7})

Every tolerance comes from ``reference.verification`` (docs/numerics.md). Sizes and example counts
depend on the hypothesis profile (``HYPOTHESIS_PROFILE``: ci, dev, gpu) through ``case_sizes``
and ``example_count``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

import optimized
import reference
from reference.semantics import AttentionGeometry, dense_multiplicity
from reference.verification import (
    K_GRADIENT,
    K_OUTPUT,
    Verdict,
    assert_within_budget,
    compare,
    float64_baseline,
    weights_inherited_budget,
)

from . import strategies as s

__all__ = [
    "CaseSizes",
    "case_sizes",
    "check_backend",
    "check_gradients",
    "default_device",
    "differentiable_reference",
    "example_count",
    "profile_name",
]


# --------------------------------------------------------------------------------------------
# Profile-dependent sizes
# --------------------------------------------------------------------------------------------


def profile_name() -> str:
    """The hypothesis profile in use (the root conftest.py loads the same variable)."""
    return os.environ.get("HYPOTHESIS_PROFILE", "ci")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class CaseSizes:
    """Upper bounds of the cases one test draws (arguments of ``strategies.attention_cases``)."""

    max_batch: int
    max_seq_len: int
    max_heads: int
    max_head_dim: int
    max_block_size: int

    def case_kwargs(self) -> dict:
        return dict(
            max_batch=self.max_batch,
            max_seq_len=self.max_seq_len,
            max_heads=self.max_heads,
            max_head_dim=self.max_head_dim,
            max_block_size=self.max_block_size,
        )


# Small on the 2-core CI machine (the float64 reference is dense, flex runs eagerly on the CPU,
# triton runs in its interpreter); larger under the gpu profile, where the H200 runs the backends.
_SIZES = {
    "ci": {
        "torch": CaseSizes(max_batch=2, max_seq_len=48, max_heads=6, max_head_dim=16, max_block_size=8),
        "flex": CaseSizes(max_batch=2, max_seq_len=24, max_heads=4, max_head_dim=8, max_block_size=8),
        "triton": CaseSizes(max_batch=2, max_seq_len=64, max_heads=4, max_head_dim=16, max_block_size=16),
        "gradients": CaseSizes(max_batch=2, max_seq_len=64, max_heads=4, max_head_dim=32, max_block_size=8),
    },
    "gpu": {
        "torch": CaseSizes(max_batch=2, max_seq_len=320, max_heads=8, max_head_dim=64, max_block_size=48),
        "flex": CaseSizes(max_batch=2, max_seq_len=256, max_heads=8, max_head_dim=64, max_block_size=32),
        "triton": CaseSizes(max_batch=2, max_seq_len=400, max_heads=8, max_head_dim=128, max_block_size=64),
        "gradients": CaseSizes(max_batch=2, max_seq_len=192, max_heads=6, max_head_dim=32, max_block_size=32),
    },
}
_SIZES["dev"] = _SIZES["ci"]

# Multiplier of the examples a test asks for under the ci profile.
_EXAMPLE_SCALE = {"ci": 1.0, "dev": 10.0, "gpu": 5.0}


def case_sizes(kind: str) -> CaseSizes:
    """Size bounds for ``kind`` ("torch", "flex", "triton", "gradients") under the current profile."""
    table = _SIZES.get(profile_name(), _SIZES["ci"])
    if kind not in table:
        raise ValueError(f"kind must be one of {tuple(table)}, got {kind!r}")
    return table[kind]


# A gradient's rounding error grows with its intermediate terms (sums over keys and over D), not
# with its final size. At N = 2, D = 1 the reference's own float32 error is one or two roundings,
# a sample dominated by luck, and k x (that error) measures nothing; flash-attention's gradient
# tests guard the same way (seqlen >= 113, d >= 32). The forward suite keeps the tiny sizes.
GRADIENT_MIN_SEQ_LEN = 32
GRADIENT_HEAD_DIMS = (16, 32)


def gradient_case_kwargs() -> dict:
    """attention_cases arguments for gradient properties (see GRADIENT_MIN_SEQ_LEN)."""
    return dict(case_sizes("gradients").case_kwargs(), min_seq_len=GRADIENT_MIN_SEQ_LEN, head_dims=GRADIENT_HEAD_DIMS)


def some_row_has_two_keys(case) -> bool:
    """False when no row's softmax has two keys: then dq = dk = 0 exactly (every row's one key gets weight 1).

    The reference's float32 error is 0 there and the budget 2 eps max|dv|, which judges the
    rounding residues of a zero gradient (dS = P (dP - rowsum(dO * O)) with the two terms reduced
    differently) against the scale of another tensor; gradient properties skip such draws
    (assume), the forward suite keeps them.
    """
    geometry = AttentionGeometry(case.dilation, case.shape.seq_len, case.shape.num_heads)
    counts = dense_multiplicity(geometry, case.sparse_config, case.is_causal, case.key_padding_mask)
    return bool((counts.sum(-1) >= 2).any())


def example_count(ci_examples: int) -> int:
    """Examples for a test that runs ``ci_examples`` under ci, scaled to the current profile."""
    return max(1, round(ci_examples * _EXAMPLE_SCALE.get(profile_name(), 1.0)))


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------


def _describe_call(case: s.AttentionCase, backend: str, dtype, device, extra: str = "") -> str:
    text = f"backend={backend!r}, dtype={dtype}, device={device}, {case.describe()}"
    return f"{text}, {extra}" if extra else text


# Where every verdict of a run is appended (one JSON line each) when set: the record of a GPU run
# of the suite (experiments/equivalence_record.py summarizes it into examples and worst error/budget).
RECORD_ENV = "EQUIVALENCE_RECORD"


def _record(verdicts: dict[str, Verdict], backend: str, dtype, device, case: s.AttentionCase) -> None:
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    lines = "".join(
        json.dumps(
            {
                "test": test,
                "backend": backend,
                "dtype": str(dtype).replace("torch.", ""),
                "device": torch.device(device).type,
                "quantity": name,
                "error": verdict.error,
                "budget": verdict.budget,
                "passed": verdict.passed,
                "problem": verdict.problem,
                "case": case.describe(),
            }
        )
        + "\n"
        for name, verdict in verdicts.items()
    )
    # One write of the whole batch: pytest-xdist workers append to the same file, and an O_APPEND
    # write lands whole at the end, so lines of two workers never interleave.
    with open(path, "a") as handle:
        handle.write(lines)


def _require(verdict: Verdict, actual: torch.Tensor, reference64: torch.Tensor, context: str) -> Verdict:
    """assert_within_budget, with the worst element's two values added to the message."""
    if not verdict.passed and verdict.worst_index is not None:
        index = verdict.worst_index
        got = float(actual.detach().to("cpu", torch.float64)[index])
        want = float(reference64.detach().to("cpu", torch.float64)[index])
        context = f"{context}\n  worst element {index}: optimized {got!r}, float64 reference {want!r}"
    assert_within_budget(verdict, context)
    return verdict


def reference_baseline(reference64, run, dtype: torch.dtype) -> list[torch.Tensor]:
    """docs/numerics.md's baseline for each tensor of ``reference64``: ``run(dtype)``, the reference in ``dtype``.

    In float64 that run would be ``reference64`` itself, so the reference's own float64 error is
    estimated from ``run(torch.float32)`` instead (``float64_baseline``). ``run`` maps a dtype to the
    reference's tensors computed in it, in ``reference64``'s order.
    """
    if dtype == torch.float64:
        return [float64_baseline(a, b) for a, b in zip(reference64, run(torch.float32))]
    return list(run(dtype))


def _empty_rows(lse64: torch.Tensor) -> torch.Tensor:
    """(B, H, N) rows the float64 reference leaves empty."""
    return torch.isneginf(lse64)


def check_backend(
    case: s.AttentionCase,
    backend: str,
    dtype: torch.dtype,
    device=None,
    *,
    seed: int | None = None,
    ring_chunk_lengths=None,
    check_weights: bool = False,
    module_options: dict | None = None,
    layout: str = "bnhd",
) -> dict[str, Verdict]:
    """Run ``case`` on ``backend`` in ``dtype`` and check it against the float64 reference.

    Draws fresh inputs (``strategies.make_inputs``, seeded by ``seed`` or the case), runs
    ``optimized.BlockSparseRingDilatedAttention(backend=...)`` with ``return_lse=True`` (and the
    sparse weights when ``check_weights``), the reference in float64 and the reference in
    ``dtype`` (docs/numerics.md's baseline), and asserts out and lse within budget; rows the float64
    reference leaves empty must be exactly out = 0 and lse = -inf. With ``check_weights`` the
    weights' ``to_dense()`` is held against the reference probabilities and every row must sum to
    1 (0 for empty rows). ``layout="bhnd"`` stores the inputs as (B, H, N, D) tensors and runs both
    the module and the reference with that layout. Returns the verdicts by name.
    """
    device = torch.device(device) if device is not None else default_device()
    q, k, v, mask = s.make_inputs(case, dtype, device, seed)
    if layout == "bhnd":  # the same values, stored in the other axis order
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    kwargs = dict(s.module_kwargs(case), layout=layout)
    module = optimized.BlockSparseRingDilatedAttention(
        **kwargs, backend=backend, ring_chunk_lengths=ring_chunk_lengths, **(module_options or {})
    )
    call = dict(
        is_causal=case.is_causal, key_padding_mask=mask, return_attention_weights=check_weights, return_lse=True
    )
    results = module(q, k, v, **call)
    out, lse = results[0], results[-1]
    ref64 = reference.BlockSparseRingDilatedAttention(**kwargs)(q, k, v, **call)
    ref_lowp = reference_baseline(
        ref64,
        lambda d: reference.BlockSparseRingDilatedAttention(**kwargs, compute_dtype=None)(
            *(t.to(d) for t in (q, k, v)), **call
        ),
        dtype,
    )
    out64, lse64 = ref64[0], ref64[-1]
    out_lowp, lse_lowp = ref_lowp[0], ref_lowp[-1]

    context = _describe_call(case, backend, dtype, device, f"ring_chunk_lengths={ring_chunk_lengths}, layout={layout}")
    assert out.dtype == dtype and out.device.type == device.type, (
        f"out must be {dtype} on {device}, got {out.dtype} on {out.device}; {context}"
    )
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # docs/semantics.md section 1
    assert lse.dtype == lse_dtype and lse.device.type == device.type, (
        f"lse must be {lse_dtype} on {device}, got {lse.dtype} on {lse.device}; {context}"
    )
    empty = _empty_rows(lse64)
    empty_out = (empty if layout == "bhnd" else empty.transpose(1, 2)).unsqueeze(-1)  # out's axis order
    verdicts = {
        "out": compare("out", out, out64, out_lowp, dtype, k=K_OUTPUT, empty=empty_out),
        "lse": compare("lse", lse, lse64, lse_lowp, dtype, k=K_OUTPUT, empty=empty, empty_value=float("-inf")),
    }
    _record(verdicts, backend, dtype, device, case)
    _require(verdicts["out"], out, out64, context)
    _require(verdicts["lse"], lse, lse64, context)

    if check_weights:
        weights = results[1]
        for key in ("block_indices", "block_values", "shape", "block_size"):
            assert key in weights, f"weights lacks the seed's key {key!r}; {context}"
        assert tuple(weights["shape"]) == (
            case.shape.batch,
            case.shape.num_heads,
            case.shape.seq_len,
            case.shape.seq_len,
        ), f"weights shape {weights['shape']}; {context}"
        dense = weights.to_dense()
        assert dense.device.type == device.type, f"weights on {dense.device}, expected {device}; {context}"
        probs64, probs_lowp = ref64[1], ref_lowp[1]
        row_empty = empty.unsqueeze(-1)
        # The weights are exp(s - lse) from the path's own lse: they inherit its budget (verification.py).
        inherited = weights_inherited_budget(verdicts["lse"], probs64)
        verdicts["weights"] = compare(
            "weights", dense, probs64, probs_lowp, dtype, empty=row_empty, inherited=inherited
        )
        # Rows sum to 1, or to 0 for empty rows (then exactly: every entry of such a row is 0).
        expected_sums = (~empty).to(torch.float64)
        verdicts["row sums"] = compare(
            "row sums",
            dense.sum(-1),
            expected_sums,
            probs_lowp.sum(-1),
            dtype,
            empty=empty,
            inherited=weights_inherited_budget(verdicts["lse"], expected_sums),
        )
        _record({key: verdicts[key] for key in ("weights", "row sums")}, backend, dtype, device, case)
        _require(verdicts["weights"], dense, probs64, context)
        _require(verdicts["row sums"], dense.sum(-1), expected_sums, context)
        coo = weights.to_sparse_coo()
        assert coo.is_sparse and tuple(coo.shape) == tuple(dense.shape), f"to_sparse_coo {coo.shape}; {context}"
        # docs/semantics.md section 6: both forms equal the reference. Not bitwise equal to each other: where a key
        # counts in several branches, coalesce and to_dense add the terms in different orders.
        coo_dense = coo.to_dense()
        verdicts["weights (coo)"] = compare(
            "weights (coo)", coo_dense, probs64, probs_lowp, dtype, empty=row_empty, inherited=inherited
        )
        _record({"weights (coo)": verdicts["weights (coo)"]}, backend, dtype, device, case)
        _require(verdicts["weights (coo)"], coo_dense, probs64, context)
    return verdicts


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def differentiable_reference(q, k, v, case: s.AttentionCase, key_padding_mask=None, scale: float | None = None):
    """``reference.partial_attention`` of the whole sequence for ``case``, in q's dtype: (out, lse), differentiable."""
    geometry = reference.AttentionGeometry(case.dilation, q.shape[1], q.shape[2])
    return reference.partial_attention(
        q,
        k,
        v,
        geometry,
        case.sparse_config,
        is_causal=case.is_causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        compute_dtype=None,
    )


def _reference_grads(q, k, v, grad_out, case, mask, dtype):
    leaves = [t.detach().to("cpu", dtype).requires_grad_(True) for t in (q, k, v)]
    out, _ = differentiable_reference(*leaves, case, mask)
    out.backward(grad_out.to("cpu", dtype))
    return [leaf.grad for leaf in leaves]


def check_gradients(
    case: s.AttentionCase,
    backend: str,
    dtype: torch.dtype,
    device=None,
    *,
    seed: int | None = None,
    module_options: dict | None = None,
    ring_chunk_lengths=None,
) -> dict[str, Verdict]:
    """dq, dk, dv of ``backend`` against the float64 reference's gradients (docs/numerics.md, k = 3).

    The same upstream gradient (fresh random values) flows into the optimized module's out and into
    the reference's; the baseline is the reference's gradients computed in ``dtype``. With
    ``ring_chunk_lengths`` the module runs the in-process ring (its backward through every chunk pair).
    """
    device = torch.device(device) if device is not None else default_device()
    q, k, v, mask = s.make_inputs(case, dtype, device, seed)
    generator = torch.Generator().manual_seed(case.input_seed + 1 if seed is None else seed + 1)
    grad_out = torch.randn(case.shape.q_shape, generator=generator, dtype=torch.float32)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    module = optimized.BlockSparseRingDilatedAttention(
        **s.module_kwargs(case), backend=backend, ring_chunk_lengths=ring_chunk_lengths, **(module_options or {})
    )
    out = module(*leaves, is_causal=case.is_causal, key_padding_mask=mask)
    assert module.last_backend == backend, f"ran {module.last_backend!r}, asked for {backend!r}"
    out.backward(grad_out.to(device, dtype))
    grads64 = _reference_grads(q, k, v, grad_out, case, mask, torch.float64)
    grads_lowp = reference_baseline(grads64, lambda d: _reference_grads(q, k, v, grad_out, case, mask, d), dtype)

    context = _describe_call(case, backend, dtype, device, f"ring_chunk_lengths={ring_chunk_lengths}")
    verdicts = {}
    for name, leaf, g64, glowp in zip(("dq", "dk", "dv"), leaves, grads64, grads_lowp):
        assert leaf.grad is not None, f"{name}: no gradient reached the input; {context}"
        assert leaf.grad.dtype == dtype, f"{name} must be {dtype}, got {leaf.grad.dtype}; {context}"
        if bool((g64 == 0).all()) and bool((glowp == 0).all()):
            # Every row has one key (or none), so this gradient is exactly 0 and the per-tensor budget
            # is 0: rounding in any other summation order fails it. Judge it as part of the whole
            # gradient (dq, dk, dv), whose scale is that of the nonzero parts.
            whole = lambda parts: torch.cat([p.detach().to("cpu", torch.float64).reshape(-1) for p in parts])  # noqa: E731
            actual = whole([x.grad for x in leaves])
            verdicts[name] = compare(
                f"{name} (as part of (dq, dk, dv))", actual, whole(grads64), whole(grads_lowp), dtype, k=K_GRADIENT
            )
            _record({name: verdicts[name]}, backend, dtype, device, case)
            _require(verdicts[name], actual, whole(grads64), context)
            continue
        verdicts[name] = compare(name, leaf.grad, g64, glowp, dtype, k=K_GRADIENT)
        _record({name: verdicts[name]}, backend, dtype, device, case)
        _require(verdicts[name], leaf.grad, g64, context)
    return verdicts
