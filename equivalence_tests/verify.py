"""``python -m equivalence_tests.verify TARGET``: hold any attention implementation against the float64 reference.

TARGET is ``package.module:factory``: a callable that takes the drawn configuration (a
:class:`VerifyCase`) and returns something called like the module,
``attention(q, k, v, is_causal=..., key_padding_mask=...)`` with q (B, N, H, D) and k, v
(B, N, H_kv, D), returning ``out`` or ``(out, lse)``. Examples::

    python -m equivalence_tests.verify equivalence_tests.peers.own:factory
    python -m equivalence_tests.verify equivalence_tests.peers.torchscale_longnet:factory \\
        --patterns dense --dtype float64 --examples 200 --json report.json

For every feature area (each pattern type, each head mode, causal, key padding, grouped-query
heads, ring splits, gradients, and all of them drawn together) it runs a hypothesis search over
the suite's exported strategies (``equivalence_tests.strategies``), judges every example with
the error budget of docs/numerics.md (``reference.verification.compare``, in :func:`judge`), and
prints a table: pass, fail, or not supported by the target. A target that raises on a
configuration reports it as "unsupported: <its message>", not as a failure. Every failing area
gets its shrunk minimal counterexample: the configuration, the shapes, which heads and positions
differ, and by how much. The exit status is 1 when any area fails, 2 for bad arguments.

Budget in float64. docs/numerics.md states the budget for float32, float16 and bfloat16: k times
the reference's own error in the path's dtype, plus two roundings. In float64 the reference *is*
the float64 run, so that term would be 0 and a path computing the same formula in another order
would fail on its last bits. For float64 the
reference's own error is estimated from its float32 run, scaled by eps(float64) / eps(float32)
(:func:`float64_baseline`; the inputs are drawn in float32 by ``strategies.make_inputs``, so the
float32 run sees the same values). ``compare`` adds that estimate once more in float64: against
float32 or lower the float64 reference's own error is negligible, in float64 it is part of the
measured difference (seen: on one case the reference was 5.7 eps off an 80-bit evaluation,
torchscale 3.9 eps). The project's own paths are judged by the same rule (reference/verification.py).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import json
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, Verbosity, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

import reference
from reference.config import HEAD_MODES, PATTERN_TYPES, DilationConfig
from reference.verification import K_GRADIENT, K_OUTPUT, Verdict, compare, float64_baseline

from . import strategies as s
from .helpers import (
    GRADIENT_HEAD_DIMS,
    GRADIENT_MIN_SEQ_LEN,
    differentiable_reference,
    reference_baseline,
    some_row_has_two_keys,
)

__all__ = [
    "AreaReport",
    "FeatureArea",
    "Outcome",
    "Report",
    "VerifyCase",
    "VerifyOptions",
    "feature_areas",
    "float64_baseline",
    "judge",
    "judge_quantity",
    "load_target",
    "main",
    "verify",
    "verify_cases",
]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# What is drawn
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerifyOptions:
    """What a run draws and how much: the CLI's options."""

    patterns: tuple[str, ...] = PATTERN_TYPES
    head_modes: tuple[str, ...] = HEAD_MODES
    causal: bool = True
    padding: bool = True
    gqa: bool = True
    ring: bool = True
    gradients: bool = True
    # Only segment lengths that divide N and rates that divide the segment: every segment and
    # every lattice complete (for a target that needs it, e.g. to reshape into segments).
    whole_segments: bool = False
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    examples: int = 50  # per feature area
    seed: int = 0
    max_batch: int = 2
    max_seq_len: int = 48
    max_heads: int = 6
    max_head_dim: int = 16
    max_branches: int = 3
    max_rate: int = 4
    max_block_size: int = 8

    def __post_init__(self) -> None:
        for name, allowed in (("patterns", PATTERN_TYPES), ("head_modes", HEAD_MODES)):
            value = tuple(getattr(self, name))
            if not value or any(item not in allowed for item in value):
                raise ValueError(f"{name} must be a non-empty selection of {allowed}, got {value!r}")
            object.__setattr__(self, name, value)
        if self.dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in (
            "examples",
            "max_batch",
            "max_seq_len",
            "max_heads",
            "max_head_dim",
            "max_branches",
            "max_rate",
            "max_block_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    def as_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        fields["dtype"] = str(self.dtype).replace("torch.", "")
        return fields


@dataclass(frozen=True)
class FeatureArea:
    """One row of the table: which features its examples exercise.

    ``causal``, ``padding``, ``gqa``, ``ring``: "off" (never), "on" (always) or "drawn".
    """

    name: str
    patterns: tuple[str, ...]
    head_modes: tuple[str, ...]
    causal: str = "off"
    padding: str = "off"
    gqa: str = "off"
    ring: str = "off"
    gradients: bool = False


def feature_areas(options: VerifyOptions) -> list[FeatureArea]:
    """The areas a run checks: each pattern and head mode with every other feature off, each
    selected feature switched on alone, and everything selected drawn together."""
    plain = dict(patterns=options.patterns, head_modes=options.head_modes)
    areas = [FeatureArea(f"pattern {p}", (p,), options.head_modes) for p in options.patterns]
    areas += [FeatureArea(f"head_mode {m}", options.patterns, (m,)) for m in options.head_modes]
    if options.causal:
        areas.append(FeatureArea("causal", **plain, causal="on"))
    if options.padding:
        areas.append(FeatureArea("key padding", **plain, padding="on"))
    if options.gqa:
        areas.append(FeatureArea("grouped-query heads", **plain, gqa="on"))
    if options.ring:
        areas.append(FeatureArea("ring split", **plain, ring="on"))
    if options.gradients:
        areas.append(FeatureArea("gradients", **plain, gradients=True))
    drawn = {name: "drawn" if getattr(options, name) else "off" for name in ("causal", "padding", "gqa", "ring")}
    areas.append(FeatureArea("combined", **plain, **drawn))
    return areas


@dataclass(frozen=True)
class VerifyCase:
    """The drawn configuration a TARGET factory receives.

    ``case`` holds the shape (B, N, H, H_kv, D), the dilation (segment lengths, rates, head
    mode), the block layout, ``is_causal``, the key padding mask and the seed of the input
    values; ``module_kwargs()`` gives the module constructor's arguments. ``ring_chunk_lengths``
    is a ring split to run (None: unsplit); ``gradients`` says whether backward is checked.
    """

    area: str
    case: s.AttentionCase
    dtype: torch.dtype
    device: str
    ring_chunk_lengths: tuple[int, ...] | None = None
    gradients: bool = False

    def module_kwargs(self) -> dict:
        return s.module_kwargs(self.case)

    def describe(self) -> str:
        ring = f", ring_chunk_lengths={list(self.ring_chunk_lengths)}" if self.ring_chunk_lengths is not None else ""
        grads = ", gradients checked" if self.gradients else ""
        return f"{self.case.describe()}, dtype={str(self.dtype).replace('torch.', '')}{ring}{grads}"

    def summary(self) -> str:
        """The configuration in one line, with only the layout fields its pattern type uses."""
        case, shape, dilation, layout = self.case, self.case.shape, self.case.dilation, self.case.sparse_config
        used = {
            "dilated_sparse": ("sparsity_ratio",),
            "random": ("sparsity_ratio", "seed"),
            "local_window": ("local_window_size",),
            "global_local": ("local_window_size", "global_tokens"),
            "custom": ("layout_fingerprint",),
        }.get(layout.pattern_type, ())
        layout_text = ", ".join(
            [f"block_size={layout.block_size}", *(f"{name}={getattr(layout, name)!r}" for name in used)]
        )
        mask = None if case.key_padding_mask is None else case.key_padding_mask.int().tolist()
        ring = "" if self.ring_chunk_lengths is None else f", ring_chunk_lengths={list(self.ring_chunk_lengths)}"
        return (
            f"B={shape.batch} N={shape.seq_len} H={shape.num_heads} H_kv={shape.num_kv_heads} D={shape.head_dim}; "
            f"segment_lengths={list(dilation.segment_lengths)} dilation_rates={list(dilation.dilation_rates)} "
            f"head_mode={dilation.head_mode!r}; layout {layout.pattern_type!r} ({layout_text}); "
            f"is_causal={case.is_causal}; key_padding_mask={mask}{ring}; input_seed={case.input_seed}; "
            f"dtype={str(self.dtype).replace('torch.', '')}{'; gradients' if self.gradients else ''}"
        )

    def fields(self) -> dict:
        """JSON-ready fields of the configuration."""
        case, layout = self.case, self.case.sparse_config
        layout_fields = {
            f.name: getattr(layout, f.name) for f in dataclasses.fields(layout) if f.name != "block_layout"
        }
        if layout.block_layout is not None:
            layout_fields["block_layout"] = layout.block_layout.int().tolist()
        mask = None if case.key_padding_mask is None else case.key_padding_mask.int().tolist()
        return {
            "shape": dataclasses.asdict(case.shape),
            "segment_lengths": list(case.dilation.segment_lengths),
            "dilation_rates": list(case.dilation.dilation_rates),
            "head_mode": case.dilation.head_mode,
            "sparse_config": layout_fields,
            "is_causal": case.is_causal,
            "key_padding_mask": mask,
            "ring_chunk_lengths": None if self.ring_chunk_lengths is None else list(self.ring_chunk_lengths),
            "gradients": self.gradients,
            "input_seed": case.input_seed,
            "dtype": str(self.dtype).replace("torch.", ""),
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _whole_segment_dilations(draw, num_heads: int, seq_len: int, head_mode: str, max_branches: int, max_rate: int):
    most = max_branches if head_mode == "all" else min(max_branches, num_heads)
    count = draw(st.integers(1, max(1, most)))
    lengths = [draw(st.sampled_from(_divisors(seq_len))) for _ in range(count)]
    rates = [draw(st.sampled_from([r for r in _divisors(w) if r <= max_rate])) for w in lengths]
    return DilationConfig(tuple(lengths), tuple(rates), head_mode)


def _switch(draw, mode: str, on, off=None):
    """Draw from ``on`` when the feature is on, take ``off`` when off, either when drawn."""
    if mode == "off":
        return off
    if mode == "on":
        return draw(on)
    return draw(st.one_of(st.just(off), on))


@st.composite
def verify_cases(draw, area: FeatureArea, options: VerifyOptions) -> VerifyCase:
    """A :class:`VerifyCase` of ``area``, drawn with the exported strategies of the suite."""
    min_seq_len, head_dims = 1, None
    if area.gradients:
        # As in the suite's gradient properties (helpers.GRADIENT_MIN_SEQ_LEN): at tiny sizes a
        # gradient's own rounding error is luck, and k x (that error) measures nothing.
        min_seq_len = min(GRADIENT_MIN_SEQ_LEN, options.max_seq_len)
        head_dims = [d for d in GRADIENT_HEAD_DIMS if d <= options.max_head_dim] or None
    if area.ring == "on":
        min_seq_len = max(min_seq_len, min(2, options.max_seq_len))
    gqa_on = area.gqa == "on" and options.max_heads >= 2
    shape = draw(
        s.shapes(
            max_batch=options.max_batch,
            max_seq_len=options.max_seq_len,
            min_seq_len=min_seq_len,
            max_heads=options.max_heads,
            min_heads=2 if gqa_on else 1,
            max_head_dim=options.max_head_dim,
            head_dims=head_dims,
            gqa=area.gqa == "drawn",
        )
    )
    if gqa_on:
        proper = [d for d in _divisors(shape.num_heads) if d < shape.num_heads]
        shape = dataclasses.replace(shape, num_kv_heads=draw(st.sampled_from(proper)))
    head_mode = draw(st.sampled_from(area.head_modes))
    if options.whole_segments:
        dilation = draw(
            _whole_segment_dilations(shape.num_heads, shape.seq_len, head_mode, options.max_branches, options.max_rate)
        )
    else:
        dilation = draw(s.dilations(shape.num_heads, shape.seq_len, head_mode, options.max_branches, options.max_rate))
    layout = draw(
        s.layouts(max_block_size=options.max_block_size, pattern_types=area.patterns, max_seq_len=shape.seq_len)
    )
    is_causal = _switch(draw, area.causal, st.just(True), False)
    mask = _switch(draw, area.padding, s.key_padding_masks(shape.batch, shape.seq_len, allow_none=False))
    if area.ring == "on":
        ring = draw(s.ring_splits(shape.seq_len, min_parts=2, allow_empty=draw(st.booleans())))
    else:
        ring = _switch(draw, area.ring, s.ring_splits(shape.seq_len))
    seed = draw(st.integers(0, 2**31 - 1))
    case = s.AttentionCase(shape, dilation, layout, is_causal, mask, seed)
    return VerifyCase(
        area.name, case, options.dtype, options.device, None if ring is None else tuple(ring), area.gradients
    )


# --------------------------------------------------------------------------------------------
# Judging one example
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """The verdict on one example: ``status`` is "pass", "fail", "unsupported" or "skipped"."""

    status: str
    message: str | None = None
    verdicts: dict[str, Verdict] = field(default_factory=dict)
    # error / (eps(dtype) * max|reference|) per quantity: the error in units of the last bit
    ulps: dict[str, float] = field(default_factory=dict)
    # where a failing quantity differs (``locate_differences``), by name
    differences: dict[str, dict] = field(default_factory=dict)


# One rule for every path (reference/verification.py): in float64, ``compare`` adds the reference's own
# error estimate once more; the names stay importable from here.
judge_quantity = compare


def _reference_forward(config: VerifyCase, q, k, v, mask):
    """(out, lse) of the float64 reference and of the baseline run in the judged dtype."""
    kwargs = config.module_kwargs()
    call = dict(is_causal=config.case.is_causal, key_padding_mask=mask, return_lse=True)
    ref64 = reference.BlockSparseRingDilatedAttention(**kwargs)(q.detach(), k.detach(), v.detach(), **call)
    baseline = reference_baseline(
        ref64,
        lambda d: reference.BlockSparseRingDilatedAttention(**kwargs, compute_dtype=None)(
            *(t.detach().to(d) for t in (q, k, v)), **call
        ),
        config.dtype,
    )
    return ref64, tuple(baseline)


def _reference_gradients(config: VerifyCase, q, k, v, mask, grad_out):
    """dq, dk, dv of the float64 reference and of the baseline in the judged dtype (CPU)."""

    def grads(dtype):
        leaves = [t.detach().to("cpu", dtype).requires_grad_(True) for t in (q, k, v)]
        out, _ = differentiable_reference(*leaves, config.case, None if mask is None else mask.cpu())
        out.backward(grad_out.to("cpu", dtype))
        return [leaf.grad for leaf in leaves]

    grads64 = grads(torch.float64)
    return grads64, reference_baseline(grads64, grads, config.dtype)


def _unpack(result):
    """(out, lse or None) from what a target returned, or a problem text."""
    if isinstance(result, torch.Tensor):
        return result, None, None
    if isinstance(result, (tuple, list)) and len(result) == 2 and all(isinstance(t, torch.Tensor) for t in result):
        return result[0], result[1], None
    return None, None, f"the target returned {type(result).__name__}; expected out or (out, lse) tensors"


def _scale(ref: torch.Tensor, empty: torch.Tensor | None) -> float:
    ref = ref.detach().to("cpu", torch.float64)
    keep = torch.isfinite(ref) if empty is None else torch.isfinite(ref) & ~empty.expand_as(ref)
    return float(ref[keep].abs().max()) if bool(keep.any()) else 0.0


def locate_differences(
    name: str, actual, reference64, verdict: Verdict, axes: tuple[str, ...], empty=None, max_listed: int = 24
) -> dict:
    """Which entries of ``actual`` are off: over the budget, non-finite, or a wrong empty row.

    ``axes`` names the dimensions (e.g. batch, position, head, channel); the summary lists the
    heads that differ and, per head, the positions (both ``max_listed`` at most), and the worst entry.
    """
    got = actual.detach().to("cpu", torch.float64)
    want = reference64.detach().to("cpu", torch.float64)
    if got.shape != want.shape:
        return {"quantity": name, "problem": verdict.problem}
    same = got == want  # also -inf == -inf on empty rows
    diff = (got - want).abs().nan_to_num(nan=math.inf).masked_fill(same, 0.0)
    off = diff > verdict.budget
    if empty is not None:
        off |= empty.to("cpu").expand_as(want) & ~same
    summary = {
        "quantity": name,
        "error": verdict.error,
        "budget": verdict.budget,
        "problem": verdict.problem,
        "entries_off": int(off.sum()),
        "entries": off.numel(),
    }
    if bool(off.any()):
        worst = tuple(int(i) for i in torch.unravel_index(torch.argmax(torch.where(off, diff, -1.0)), diff.shape))
        summary["worst"] = {
            "at": dict(zip(axes, worst)),
            "target": float(got[worst]),
            "reference": float(want[worst]),
            "difference": float(diff[worst]),
        }
    if "head" in axes and "position" in axes:
        head_axis, position_axis = axes.index("head"), axes.index("position")
        others = tuple(i for i in range(off.dim()) if i not in (head_axis, position_axis))
        by_head_position = off.any(dim=others) if others else off
        if head_axis > position_axis:
            by_head_position = by_head_position.transpose(0, 1)
        heads = [h for h in range(by_head_position.shape[0]) if bool(by_head_position[h].any())]
        summary["heads"] = heads[:max_listed]
        summary["positions_by_head"] = {
            str(h): by_head_position[h].nonzero().flatten().tolist()[:max_listed] for h in heads[:max_listed]
        }
    return summary


def _unsupported(error: Exception) -> Outcome:
    # One line (einops and others raise multi-line messages), so that equal messages count together.
    return Outcome("unsupported", " ".join(f"{type(error).__name__}: {error}".split()))


def judge(factory: Callable, config: VerifyCase) -> Outcome:
    """Run ``factory(config)`` on fresh inputs and judge it against the reference (docs/numerics.md).

    out (and lse when returned) get k = 2, gradients k = 3; rows the float64 reference leaves
    empty must be exactly out = 0 / lse = -inf; out must be in q's dtype. Anything the target
    raises, building or running (backward included), makes the example "unsupported".
    """
    case, dtype = config.case, config.dtype
    q, k, v, mask = s.make_inputs(case, dtype, config.device)
    grad_out = None
    if config.gradients:
        if not some_row_has_two_keys(case):
            return Outcome("skipped", "no row has two keys (dq = dk = 0 exactly)")
        generator = torch.Generator().manual_seed(case.input_seed + 1)
        grad_out = torch.randn(case.shape.q_shape, generator=generator, dtype=torch.float32)
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    try:
        target = factory(config)
    except Exception as error:  # noqa: BLE001 (whatever the target raises is its "not supported")
        return _unsupported(error)
    (out64, lse64), (out_base, lse_base) = _reference_forward(config, q, k, v, mask)
    try:
        with torch.set_grad_enabled(config.gradients):
            result = target(q, k, v, is_causal=case.is_causal, key_padding_mask=mask)
        out, lse, problem = _unpack(result)
        if problem is None and config.gradients and out.requires_grad:
            out.backward(grad_out.to(out.device, out.dtype))
    except Exception as error:  # noqa: BLE001
        return _unsupported(error)

    verdicts: dict[str, Verdict] = {}
    located: dict[str, tuple] = {}
    if problem is not None:
        verdicts["result"] = Verdict("result", math.inf, 0.0, 0.0, None, problem)
        return Outcome("fail", problem, verdicts)
    empty = torch.isneginf(lse64)  # (B, H, N)
    empty_out = empty.transpose(1, 2).unsqueeze(-1)
    verdicts["out"] = judge_quantity("out", out, out64, out_base, dtype, K_OUTPUT, empty=empty_out)
    located["out"] = (out, out64, ("batch", "position", "head", "channel"), empty_out)
    if out.dtype != dtype:
        verdicts["out dtype"] = Verdict(
            "out dtype", 0.0, 0.0, 0.0, None, f"out is {out.dtype}, expected q's dtype {dtype}"
        )
    if lse is not None:
        verdicts["lse"] = judge_quantity(
            "lse", lse, lse64, lse_base, dtype, K_OUTPUT, empty=empty, empty_value=-math.inf
        )
        located["lse"] = (lse, lse64, ("batch", "head", "position"), empty)
    if config.gradients:
        grads64, grads_base = _reference_gradients(config, q, k, v, mask, grad_out)
        for name, leaf, g64, gbase in zip(("dq", "dk", "dv"), (q, k, v), grads64, grads_base):
            if leaf.grad is None:
                verdicts[name] = Verdict(name, math.inf, 0.0, 0.0, None, f"{name}: no gradient reached the input")
                continue
            if bool((g64 == 0).all()) and bool((gbase == 0).all()):
                # Exactly zero (every row has one key or none): a per-tensor budget of 0 would judge
                # rounding residues; judge it as part of (dq, dk, dv), as helpers.check_gradients does.
                def whole(parts):
                    return torch.cat([p.detach().to("cpu", torch.float64).reshape(-1) for p in parts])

                grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in (q, k, v)]
                verdicts[name] = judge_quantity(
                    f"{name} (as part of (dq, dk, dv))",
                    whole(grads),
                    whole(grads64),
                    whole(grads_base),
                    dtype,
                    K_GRADIENT,
                )
                located[name] = (whole(grads), whole(grads64), ("entry",), None)
                continue
            verdicts[name] = judge_quantity(name, leaf.grad, g64, gbase, dtype, K_GRADIENT)
            located[name] = (leaf.grad, g64, ("batch", "position", "head", "channel"), None)

    eps = torch.finfo(dtype).eps
    ulps = {}
    for name, (actual, ref, _, empty_mask) in located.items():
        scale = _scale(ref, empty_mask)
        ulps[name] = verdicts[name].error / (eps * scale) if scale > 0 else 0.0
    failed = [name for name, verdict in verdicts.items() if not verdict.passed]
    if not failed:
        return Outcome("pass", None, verdicts, ulps)
    differences = {}
    for name in failed:
        if name in located:
            actual, ref, axes, empty_mask = located[name]
            differences[name] = locate_differences(name, actual, ref, verdicts[name], axes, empty_mask)
        else:
            differences[name] = {"quantity": name, "problem": verdicts[name].problem}
    message = "; ".join(verdicts[name].describe() for name in failed)
    return Outcome("fail", message, verdicts, ulps, differences)


# --------------------------------------------------------------------------------------------
# Searching an area
# --------------------------------------------------------------------------------------------


@dataclass
class AreaReport:
    """What one feature area found."""

    name: str
    status: str = "pass"  # "pass", "fail" or "unsupported"
    examples: int = 0  # drawn and run (shrinking not counted)
    judged: int = 0  # of those, the ones the target ran
    passed: int = 0  # of those, the ones within budget
    skipped: int = 0  # not judged (e.g. a gradient case whose gradients are exactly 0)
    unsupported: dict[str, int] = field(default_factory=dict)  # message -> count
    worst_error_over_budget: float = 0.0  # over the judged examples that passed
    worst_ulps: float = 0.0  # error / (eps * max|ref|), over the judged examples that passed
    shrink_steps: int = 0
    counterexample: dict | None = None

    def summary(self) -> str:
        if self.status == "unsupported":
            return f"unsupported: {self.main_unsupported_message()}"
        return self.status

    def main_unsupported_message(self) -> str | None:
        if not self.unsupported:
            return None
        return max(self.unsupported.items(), key=lambda item: item[1])[0]

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _counterexample(config: VerifyCase, outcome: Outcome) -> dict:
    shape = config.case.shape
    return {
        "configuration": config.summary(),
        "fields": config.fields(),
        "shapes": {"q": list(shape.q_shape), "k": list(shape.kv_shape), "v": list(shape.kv_shape)},
        "message": outcome.message,
        "differences": list(outcome.differences.values()),
    }


def search_area(factory: Callable, area: FeatureArea, options: VerifyOptions, on_example=None) -> AreaReport:
    """Hypothesis search of ``area`` for a failing example, shrunk to a minimal one.

    ``on_example(shrinking: bool)`` is called after every example (for a progress bar).
    """
    report = AreaReport(area.name)
    unsupported = collections.Counter()
    failure: list[tuple[VerifyCase, Outcome]] = []

    def fails(config: VerifyCase) -> bool:
        shrinking = bool(failure)
        outcome = judge(factory, config)
        if shrinking:
            report.shrink_steps += 1
        else:
            report.examples += 1
            if outcome.status == "unsupported":
                unsupported[outcome.message] += 1
            elif outcome.status == "skipped":
                report.skipped += 1
            else:
                report.judged += 1
            if outcome.status == "pass":
                report.passed += 1
                for name, verdict in outcome.verdicts.items():
                    if verdict.budget > 0:
                        report.worst_error_over_budget = max(
                            report.worst_error_over_budget, verdict.error / verdict.budget
                        )
                report.worst_ulps = max([report.worst_ulps, *outcome.ulps.values()])
        if on_example is not None:
            on_example(shrinking)
        if outcome.status == "fail":
            failure.append((config, outcome))
            return True
        return False

    search_settings = settings(
        max_examples=options.examples,
        database=None,
        deadline=None,
        derandomize=False,
        print_blob=False,
        phases=(Phase.generate, Phase.shrink),
        verbosity=Verbosity.quiet,
        suppress_health_check=list(HealthCheck),
    )
    try:
        minimal = find(
            verify_cases(area, options),
            fails,
            settings=search_settings,
            random=random.Random(f"{options.seed}:{area.name}"),
        )
    except NoSuchExample:
        minimal = None
    report.unsupported = dict(unsupported.most_common())
    if minimal is not None:
        # find returns the example of the last call that failed: the minimal one, replayed last.
        config, outcome = failure[-1]
        report.status = "fail"
        report.counterexample = _counterexample(config, outcome)
    elif report.judged == 0 and unsupported:
        report.status = "unsupported"
    return report


# --------------------------------------------------------------------------------------------
# A whole run
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    target: str
    options: VerifyOptions
    areas: list[AreaReport]
    target_info: dict | None = None

    @property
    def passed(self) -> bool:
        return all(area.status != "fail" for area in self.areas)

    def area(self, name: str) -> AreaReport:
        for area in self.areas:
            if area.name == name:
                return area
        raise KeyError(f"no area {name!r}; areas: {[a.name for a in self.areas]}")

    def as_dict(self) -> dict:
        import hypothesis

        return {
            "target": self.target,
            "target_info": self.target_info,
            "options": self.options.as_dict(),
            "passed": self.passed,
            "versions": {
                "torch": torch.__version__,
                "hypothesis": hypothesis.__version__,
                "python": sys.version.split()[0],
            },
            "budget": "docs/numerics.md: error <= k * (reference's own error in the dtype) + 2 eps(dtype) max|ref|, "
            "k = 2 for out and lse, 3 for gradients; in float64 the reference's own error is its "
            "float32 error scaled by eps(float64) / eps(float32)",
            "areas": [area.as_dict() for area in self.areas],
        }


def verify(
    factory: Callable, options: VerifyOptions = VerifyOptions(), target: str | None = None, progress: bool = False
) -> Report:
    """Search every feature area of ``options`` for a counterexample of ``factory``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    areas = feature_areas(options)
    reports = []
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("examples"),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True, emoji=False), disable=not progress, transient=False) as bar:
        task = bar.add_task("", total=options.examples * len(areas), note="")
        for area in areas:
            bar.update(task, description=area.name, note="")

            shrinks = [0]

            def on_example(shrinking: bool):
                if shrinking:
                    shrinks[0] += 1
                    bar.update(task, note=f"failed; shrinking ({shrinks[0]})")
                else:
                    bar.advance(task)

            report = search_area(factory, area, options, on_example)
            # An area that stopped early (a failure found, or nothing left to draw) ran fewer examples.
            bar.update(task, total=bar.tasks[0].total - (options.examples - report.examples))
            reports.append(report)
    return Report(
        target or getattr(factory, "__qualname__", repr(factory)), options, reports, getattr(factory, "peer_info", None)
    )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _format_difference(item: dict) -> str:
    if "error" not in item:
        return f"{item['quantity']}: {item.get('problem')}"
    reason = item["problem"] or f"error {item['error']:.3e} > budget {item['budget']:.3e}"
    text = f"{item['quantity']}: {reason}; {item['entries_off']} of {item['entries']} entries off"
    if item.get("heads"):
        positions = "; ".join(f"head {h}: {p}" for h, p in item["positions_by_head"].items())
        text += f"\n      heads {item['heads']}; positions by head: {positions}"
    if "worst" in item:
        worst = item["worst"]
        where = ", ".join(f"{axis} {index}" for axis, index in worst["at"].items())
        text += (
            f"\n      worst at ({where}): target {worst['target']!r}, reference {worst['reference']!r} "
            f"(|difference| {worst['difference']:.3e})"
        )
    return text


def render(report: Report, console) -> None:
    """Print the table of areas and the minimal counterexample of every failure."""
    from rich.table import Table
    from rich.text import Text

    info = report.target_info or {}
    title = f"verify {report.target}"
    if info:
        title += f"  ({info.get('distribution')} {info.get('version')})"
    options = report.options
    table = Table(
        title=Text(title),
        caption=f"dtype {str(options.dtype).replace('torch.', '')}, "
        f"{options.examples} examples per area, seed {options.seed}",
    )
    for column in (
        "feature area",
        "result",
        "judged / run",
        "worst error / budget",
        "worst error / (eps max|ref|)",
        "not supported by the target",
    ):
        table.add_column(column, overflow="fold")
    styles = {"pass": "green", "fail": "bold red", "unsupported": "yellow"}
    for area in report.areas:
        unsupported = sum(area.unsupported.values())
        note = ""
        if unsupported:
            message = area.main_unsupported_message()
            message = message if len(message) <= 110 else message[:109] + "..."
            kinds = f", {len(area.unsupported)} distinct messages" if len(area.unsupported) > 1 else ""
            note = f"{unsupported} of {area.examples}{kinds}; most common: {message}"
        table.add_row(
            area.name,
            Text(area.status.upper() if area.status == "fail" else area.status, style=styles[area.status]),
            f"{area.judged} / {area.examples}",
            f"{area.worst_error_over_budget:.3g}" if area.passed else "",
            f"{area.worst_ulps:.3g}" if area.passed else "",
            Text(note),
        )
    console.print(table)
    for area in report.areas:
        if area.counterexample is None:
            continue
        example = area.counterexample
        console.print(
            f"\n[bold red]FAIL[/] {area.name}: minimal counterexample ({area.shrink_steps} shrink steps)",
            highlight=False,
        )
        console.print(f"  configuration: {example['configuration']}", highlight=False, markup=False)
        shapes = example["shapes"]
        console.print(
            f"  shapes: q {tuple(shapes['q'])}, k {tuple(shapes['k'])}, v {tuple(shapes['v'])}", highlight=False
        )
        for item in example["differences"]:
            console.print(f"    {_format_difference(item)}", highlight=False, markup=False)
    verdict = "all areas pass or are not supported" if report.passed else "FAILED"
    console.print(f"\n{report.target}: {verdict}", highlight=False, markup=False)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def load_target(spec: str) -> Callable:
    """The factory named by ``package.module:attribute`` (ValueError saying what is wrong)."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"TARGET must be 'package.module:factory', got {spec!r}")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"TARGET {spec!r}: cannot import {module_name!r} ({error})") from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"TARGET {spec!r}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"TARGET {spec!r} is not callable: {type(target).__name__}")
    return target


def _selection(allowed: tuple[str, ...], what: str):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        wrong = [item for item in items if item not in allowed]
        if not items or wrong:
            raise argparse.ArgumentTypeError(
                f"{what} must be a comma-separated selection of {', '.join(allowed)}; got {text!r}"
            )
        return items

    return parse


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m equivalence_tests.verify",
        description="Hold an attention implementation against the float64 reference, feature area by feature "
        "area, with hypothesis; print pass / fail / unsupported and minimal counterexamples.",
    )
    parser.add_argument(
        "target",
        metavar="TARGET",
        help="package.module:factory; factory(VerifyCase) returns attention(q, k, v, is_causal=..., "
        "key_padding_mask=...) -> out or (out, lse)",
    )
    defaults = VerifyOptions()
    parser.add_argument(
        "--patterns",
        type=_selection(PATTERN_TYPES, "patterns"),
        default=defaults.patterns,
        help=f"block layouts to draw (default: all of {', '.join(PATTERN_TYPES)})",
    )
    parser.add_argument(
        "--head-modes",
        type=_selection(HEAD_MODES, "head modes"),
        default=defaults.head_modes,
        help="head modes to draw (default: split,all)",
    )
    for name, what in (
        ("causal", "is_causal=True"),
        ("padding", "key padding masks"),
        ("gqa", "grouped-query heads (H_kv < H)"),
        ("ring", "ring splits of the sequence"),
        ("gradients", "gradients (dq, dk, dv)"),
    ):
        parser.add_argument(
            f"--{name}", action=argparse.BooleanOptionalAction, default=True, help=f"draw {what} (default: on)"
        )
    parser.add_argument(
        "--whole-segments",
        action="store_true",
        help="draw only segment lengths dividing N and rates dividing the segment length",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="dtype of q, k, v (default float32)")
    parser.add_argument("--device", default="cpu", help="device of q, k, v (default cpu)")
    parser.add_argument(
        "--examples",
        type=_int_at_least(1),
        default=defaults.examples,
        help=f"examples per feature area (default {defaults.examples})",
    )
    parser.add_argument("--seed", type=_int_at_least(0), default=defaults.seed, help="seed of the search (default 0)")
    for name in ("max_batch", "max_seq_len", "max_heads", "max_head_dim", "max_branches", "max_rate", "max_block_size"):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=_int_at_least(1),
            default=getattr(defaults, name),
            help=f"upper bound of the drawn {name[4:].replace('_', ' ')} (default {getattr(defaults, name)})",
        )
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON to PATH")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        factory = load_target(args.target)
    except ValueError as error:
        parser.error(f"argument TARGET: {error}")
    try:
        torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"argument --device: {error}")
    options = VerifyOptions(
        patterns=args.patterns,
        head_modes=args.head_modes,
        causal=args.causal,
        padding=args.padding,
        gqa=args.gqa,
        ring=args.ring,
        gradients=args.gradients,
        whole_segments=args.whole_segments,
        dtype=DTYPES[args.dtype],
        device=args.device,
        examples=args.examples,
        seed=args.seed,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        max_heads=args.max_heads,
        max_head_dim=args.max_head_dim,
        max_branches=args.max_branches,
        max_rate=args.max_rate,
        max_block_size=args.max_block_size,
    )
    report = verify(factory, options, target=args.target, progress=not args.no_progress)
    from rich.console import Console

    render(report, Console(width=None if sys.stdout.isatty() else 160, emoji=False))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report.as_dict(), handle, indent=1)
            handle.write("\n")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
