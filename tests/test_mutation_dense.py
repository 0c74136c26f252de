"""The dense reference's call conventions: its defaults against the brute force, and what it refuses or prints.

The reference tests pass every option explicitly, so a default turned around (a causal call, the
lse returned, a one-element tuple instead of out), keyword-only options that became positional, an
integer compute_dtype let through, or a repr naming the wrong layout went unseen (found by
``make mutation``, experiments/mutation.py). The values are checked against tests/brute_force.py,
written apart from the reference.
"""

from __future__ import annotations

import brute_force
import pytest
import torch
from random_inputs import make_inputs

from reference import (
    AttentionGeometry,
    BlockSparseRingDilatedAttention,
    DilationConfig,
    SparsePatternConfig,
    assert_within_budget,
    compare,
    partial_attention,
)

DILATION = DilationConfig((4, 8), (1, 2), "split")
CONFIG = SparsePatternConfig(pattern_type="local_window", block_size=2, local_window_size=4)


def _assert_same(name, actual, expected, empty_rows):
    """Two float64 computations of one quantity agree to float32's rounding budget (a semantic error
    moves a value by O(1)); ``empty_rows`` (B, H, N) must be exactly out 0, lse -inf, weights 0."""
    empty, empty_value = {
        "lse": (empty_rows, float("-inf")),
        "out": (empty_rows.transpose(1, 2).unsqueeze(-1), 0.0),
        "weights": (empty_rows.unsqueeze(-1), 0.0),
    }[name]
    verdict = compare(name, actual, expected, expected, torch.float32, empty=empty, empty_value=empty_value)
    assert_within_budget(verdict, "defaults")


def _brute_force(q, k, v):
    """(out, lse, weights, empty rows) of the whole non-causal call without padding, at the default scale.

    Head 1 reads the rate-2 branch, so its odd positions lie on no lattice: empty rows."""
    out, lse, weights = brute_force.attention(q, k, v, DILATION, CONFIG)
    return out, lse, weights, torch.isneginf(lse)


def test_partial_attention_defaults_are_the_whole_non_causal_call_in_float64():
    q, k, v, _ = make_inputs(3, 2, 12, 2, 1, 4)
    out, lse = partial_attention(q, k, v, AttentionGeometry(DILATION, 12, 2), CONFIG)
    assert out.dtype == lse.dtype == torch.float64
    expected_out, expected_lse, _, empty = _brute_force(q, k, v)
    _assert_same("lse", lse, expected_lse, empty)
    _assert_same("out", out, expected_out, empty)


def test_partial_attention_takes_its_chunk_options_by_keyword_only():
    q, k, v, _ = make_inputs(4, 1, 8, 2, 2, 4)
    geometry = AttentionGeometry(DILATION, 8, 2)
    with pytest.raises(TypeError):
        partial_attention(q, k, v, geometry, CONFIG, 0)  # query_start given by position


def test_module_defaults_return_out_alone_of_the_non_causal_call():
    q, k, v, _ = make_inputs(5, 2, 12, 2, 1, 4)
    module = BlockSparseRingDilatedAttention(DILATION.segment_lengths, DILATION.dilation_rates, CONFIG)
    out = module(q, k, v)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    expected_out, expected_lse, expected_weights, empty = _brute_force(q, k, v)
    _assert_same("out", out, expected_out, empty)
    out, lse = module(q, k, v, return_lse=True)
    _assert_same("lse", lse, expected_lse, empty)
    out, weights = module(q, k, v, return_attention_weights=True)
    _assert_same("weights", weights, expected_weights, empty)


@pytest.mark.parametrize("compute_dtype", [torch.int64, torch.bool, torch.complex128, "float64"])
def test_module_refuses_a_compute_dtype_that_is_not_a_floating_torch_dtype(compute_dtype):
    with pytest.raises(TypeError, match="compute_dtype"):
        BlockSparseRingDilatedAttention((4,), (1,), compute_dtype=compute_dtype)


def test_repr_names_the_layout_only_when_it_is_not_the_default():
    assert ", layout=" not in repr(BlockSparseRingDilatedAttention((4,), (1,)))
    assert "layout='bhnd'" in repr(BlockSparseRingDilatedAttention((4,), (1,), layout="bhnd"))
