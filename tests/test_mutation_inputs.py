"""Input validation (docs/semantics.md section 1) where the other tests agree by coincidence.

In the bhnd layout a head dim check that reads the sequence axis passes whenever q and k share N,
and an emptiness check on q alone passes whenever k is empty too: these cases differ only where
the shapes differ on exactly one axis (found by ``make mutation``, experiments/mutation.py).
"""

from __future__ import annotations

import pytest
import torch

from reference.inputs import axes_text, validate_qkv


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_a_head_dim_differing_from_q_is_refused_in_either_layout(layout):
    q = _randn(2, 5, 3, 4) if layout == "bnhd" else _randn(2, 3, 5, 4)
    k = _randn(2, 5, 3, 6) if layout == "bnhd" else _randn(2, 3, 5, 6)
    validate_qkv(q, q, q, layout=layout)
    with pytest.raises(ValueError, match=r"k must have q's head dim D=4"):
        validate_qkv(q, k, k, layout=layout)


def test_the_axis_names_follow_the_layout():
    assert axes_text("bnhd") == "(B, N, H, D)" and axes_text("bhnd", "H_kv") == "(B, H_kv, N, D)"


def test_layout_and_the_length_rule_are_keyword_only():
    q = _randn(1, 4, 2, 3)
    validate_qkv(q=q, k=q, v=q, key_padding_mask=None, scale=None, layout="bnhd")
    with pytest.raises(TypeError):
        validate_qkv(q, q, q, None, None, "bnhd")


def test_empty_queries_are_refused_when_keys_are_not():
    """q with no head (H = 0 divides into any H_kv) is empty while k is not."""
    q, k = _randn(1, 4, 0, 3), _randn(1, 4, 1, 3)
    with pytest.raises(ValueError, match="must be non-empty"):
        validate_qkv(q, k, k)


def test_empty_keys_are_refused_when_queries_are_not():
    """A key chunk of length 0 (allowed to differ from q's length in a ring step) is refused."""
    q, k = _randn(1, 4, 1, 3), _randn(1, 0, 1, 3)
    with pytest.raises(ValueError, match="must be non-empty"):
        validate_qkv(q, k, k, seq_len_must_match=False)
