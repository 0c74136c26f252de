"""Input layout "bhnd" (q (B, H, N, D), the order of SDPA and FlexAttention) beside the default
"bnhd": read and written through strides, validated in the caller's axis names."""

from __future__ import annotations

import pytest
import torch

import optimized
import reference
from optimized.dispatch import REGISTRY
from reference import SparsePatternConfig

SEGMENTS, RATES = [8, 16], [1, 2]
CONFIG = SparsePatternConfig("local_window", block_size=4, local_window_size=8)


def _bnhd(seed=0, B=2, N=16, H=4, H_kv=2, D=8):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=generator)
    k, v = (torch.randn(B, N, H_kv, D, generator=generator) for _ in range(2))
    return q, k, v


def _as_bhnd(*tensors):
    return tuple(t.transpose(1, 2).contiguous() for t in tensors)


def test_reference_in_bhnd_is_the_transpose_of_bnhd():
    q, k, v = _bnhd(1)
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) < 0.2
    bnhd = reference.BlockSparseRingDilatedAttention(SEGMENTS, RATES, CONFIG)
    bhnd = reference.BlockSparseRingDilatedAttention(SEGMENTS, RATES, CONFIG, layout="bhnd")
    out, lse = bnhd(q, k, v, key_padding_mask=mask, is_causal=True, return_lse=True)
    out_t, lse_t = bhnd(*_as_bhnd(q, k, v), key_padding_mask=mask, is_causal=True, return_lse=True)
    assert out_t.shape == (2, 4, 16, 8)
    assert torch.equal(out_t, out.transpose(1, 2)) and torch.equal(lse_t, lse)


@pytest.mark.parametrize("ring", [None, [5, 11]])
def test_optimized_bhnd_equals_bnhd_and_reads_the_callers_memory(monkeypatch, ring):
    """The backend receives views of the caller's tensors (same storage: no copy), and out is a view too."""
    q, k, v = _bnhd(3)
    backend = REGISTRY["torch"]
    original, seen = backend.forward_partial, []

    def spy(q_, k_, v_, *rest):
        seen.append((q_.untyped_storage().data_ptr(), k_.untyped_storage().data_ptr()))
        return original(q_, k_, v_, *rest)

    monkeypatch.setattr(backend, "forward_partial", spy)
    kwargs = dict(sparse_config=CONFIG, backend="torch", ring_chunk_lengths=ring)
    out = optimized.BlockSparseRingDilatedAttention(SEGMENTS, RATES, **kwargs)(q, k, v, is_causal=True)
    q_t, k_t, v_t = _as_bhnd(q, k, v)
    seen.clear()
    module = optimized.BlockSparseRingDilatedAttention(SEGMENTS, RATES, layout="bhnd", **kwargs)
    out_t, lse_t = module(q_t, k_t, v_t, is_causal=True, return_lse=True)
    assert seen and all(
        pointers == (q_t.untyped_storage().data_ptr(), k_t.untyped_storage().data_ptr()) for pointers in seen
    )
    assert out_t.shape == q_t.shape and torch.equal(out_t, out.transpose(1, 2))
    assert lse_t.shape == (2, 4, 16)


def test_weights_and_multihead_do_not_depend_on_the_layout():
    q, k, v = _bnhd(4)
    config = dict(sparse_config=CONFIG, backend="torch")
    _, weights = optimized.BlockSparseRingDilatedAttention(SEGMENTS, RATES, **config)(
        q, k, v, return_attention_weights=True
    )
    _, weights_t = optimized.BlockSparseRingDilatedAttention(SEGMENTS, RATES, layout="bhnd", **config)(
        *_as_bhnd(q, k, v), return_attention_weights=True
    )
    assert torch.equal(weights.to_dense(), weights_t.to_dense())


def test_validation_speaks_the_callers_layout():
    q, k, v = _as_bhnd(*_bnhd(5))  # (2, 4, 16, 8) and (2, 2, 16, 8)
    module = optimized.BlockSparseRingDilatedAttention(SEGMENTS, RATES, CONFIG, layout="bhnd")
    with pytest.raises(ValueError, match=r"sequence length N=16 \(layout='bhnd': \(B, H, N, D\)\)"):
        module(q, k[:, :, :12], v[:, :, :12])
    with pytest.raises(ValueError, match=r"4 dimensions \(B, H, N, D\)"):
        module(q[0], k, v)
    with pytest.raises(ValueError, match="H=4 must be a multiple of k/v's heads H_kv=3"):
        module(q, k[:, :1].expand(2, 3, 16, 8), v[:, :1].expand(2, 3, 16, 8))


@pytest.mark.parametrize("layout", ["BHND", "bnh", "", None, 0])
def test_bad_layouts_are_refused_naming_layout(layout):
    for make in (optimized.BlockSparseRingDilatedAttention, reference.BlockSparseRingDilatedAttention):
        with pytest.raises(ValueError, match="layout must be one of") as error:
            make(SEGMENTS, RATES, layout=layout)
        assert repr(layout) in str(error.value)


def test_kv_with_zero_heads_is_a_value_error_naming_k():
    """Empty inputs are refused before the head rule divides by H_kv (was a ZeroDivisionError)."""
    q, k, v = _bnhd(6)
    with pytest.raises(ValueError, match="non-empty"):
        optimized.BlockSparseRingDilatedAttention(SEGMENTS, RATES, CONFIG)(q, k[:, :, :0], v[:, :, :0])
