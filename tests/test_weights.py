"""Sparse attention weights (docs/semantics.md section 6) of the torch / flex path against the reference's
dense weights."""

from __future__ import annotations

import pytest
import torch
from random_inputs import make_inputs

import optimized
from optimized import torch_backend
from optimized import weights as sparse_weights
from optimized.plan import CallPlan
from reference import (
    AttentionGeometry,
    DilationConfig,
    SparsePatternConfig,
    active_block_count,
    assert_within_budget,
    compare,
)
from reference import (
    BlockSparseRingDilatedAttention as ReferenceAttention,
)

CASES = [
    ("local_window", "split", True, dict(pattern_type="local_window", block_size=3, local_window_size=12)),
    ("dense-all", "all", False, dict(pattern_type="dense", block_size=4)),
    ("random-all", "all", True, dict(pattern_type="random", block_size=4, sparsity_ratio=0.3)),
    (
        "global_local",
        "split",
        False,
        dict(pattern_type="global_local", block_size=5, global_tokens=3, local_window_size=10),
    ),
    ("dilated_sparse-all", "all", True, dict(pattern_type="dilated_sparse", block_size=1, sparsity_ratio=0.5)),
]


@pytest.mark.parametrize("name, head_mode, causal, config_kwargs", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_match_reference(name, head_mode, causal, config_kwargs, dtype):
    config = SparsePatternConfig(**config_kwargs)
    args = ([16, 24], [1, 2])
    q, k, v, mask = make_inputs(len(name), 2, 43, 4, 2, 8, dtype, pad_fraction=0.1, pad_first=True)
    module = optimized.BlockSparseRingDilatedAttention(
        *args, sparse_config=config, head_mode=head_mode, backend="torch"
    )
    out, weights, lse = module(
        q, k, v, is_causal=causal, key_padding_mask=mask, return_attention_weights=True, return_lse=True
    )
    kwargs = dict(is_causal=causal, key_padding_mask=mask, return_attention_weights=True)
    _, w64 = ReferenceAttention(*args, sparse_config=config, head_mode=head_mode)(q, k, v, **kwargs)
    _, w_lowp = ReferenceAttention(*args, sparse_config=config, head_mode=head_mode, compute_dtype=None)(
        q, k, v, **kwargs
    )

    for key in ("block_indices", "block_values", "shape", "block_size"):
        assert key in weights  # the seed's keys
    assert weights["shape"] == (2, 4, 43, 43) and weights["block_size"] == config.block_size
    assert weights["block_values"].device == out.device
    dense = weights.to_dense()
    assert_within_budget(compare("weights", dense, w64, w_lowp, dtype), name)
    from_coo = weights.to_sparse_coo()
    assert from_coo.is_coalesced()
    assert_within_budget(compare("coo", from_coo.to_dense(), dense.double(), dense, torch.float32), name)
    # Rows sum to 1, or 0 exactly for empty rows.
    empty = torch.isneginf(lse)
    assert bool(empty.any()) or not causal  # under is_causal the padded key 0 empties query 0
    sums = dense.sum(dim=-1)
    assert bool((sums[empty] == 0).all())
    expected = (~empty).double()
    assert_within_budget(compare("row sums", sums, expected, w_lowp.sum(dim=-1), dtype), name)


def test_weights_are_sparse_at_moderate_length(monkeypatch):
    config = SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=64)
    geometry = AttentionGeometry(DilationConfig((512, 1024), (1, 2), "split"), 2048, 2)
    q, k, _, mask = make_inputs(3, 1, 2048, 2, 2, 8, pad_fraction=0.1, pad_first=True)
    plan = CallPlan.whole(geometry, config, False, 8**-0.5)
    lse = torch_backend.partial_forward(q, k, k, mask, plan)[1]
    weights = sparse_weights.attention_weights(q, k, mask, lse, plan)
    blocks = active_block_count(geometry, config)
    assert weights.num_blocks == blocks
    b = config.block_size
    # Values b*b float32 per block and batch element, plus per block two position rows and three ids.
    assert weights.nbytes <= blocks * (b * b * 4 + 2 * b * 8 + 5 * 8)
    assert weights.nbytes * 20 < 1 * 2 * 2048 * 2048 * 4

    # to_dense is for small N: it refuses a large dense tensor unless told otherwise.
    monkeypatch.setattr(sparse_weights, "DENSE_ELEMENT_LIMIT", 1000)
    with pytest.raises(ValueError, match="allow_large"):
        weights.to_dense()


def test_chunk_of_coo_matches_rows_of_the_whole():
    # Key positions of stored blocks are global: the sparse tensor's rows agree with dense rows.
    config = SparsePatternConfig(pattern_type="dilated_sparse", block_size=4, sparsity_ratio=0.5)
    geometry = AttentionGeometry(DilationConfig((20,), (3,), "split"), 41, 3)
    q, k, _, mask = make_inputs(9, 1, 41, 3, 1, 8, pad_fraction=0.1, pad_first=True)
    plan = CallPlan.whole(geometry, config, True, 0.3)
    lse = torch_backend.partial_forward(q, k, k, mask, plan)[1]
    weights = sparse_weights.attention_weights(q, k, mask, lse, plan, work_size=2)
    qp, kp = weights["query_positions"], weights["key_positions"]
    heads = weights["block_heads"]
    # Every stored position is on its head's lattice: (position % 20) % 3 == offset of the head.
    offsets = torch.tensor([geometry.branches[0].offset_of(h) for h in range(3)])
    for positions in (qp, kp):
        on = positions >= 0
        assert bool((((positions % 20) % 3) == offsets[heads].unsqueeze(1))[on].all())
    dense = weights.to_dense()
    assert dense.shape == (1, 3, 41, 41)
    assert_within_budget(compare("coo", weights.to_sparse_coo().to_dense(), dense.double(), dense, torch.float32))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the CPU run is test_weights_match_reference)"
)
def test_weights_stay_on_the_cuda_device():
    config = SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=64)
    q, k, v, mask = (t.cuda() for t in make_inputs(4, 1, 96, 2, 2, 16, pad_fraction=0.1, pad_first=True))
    module = optimized.BlockSparseRingDilatedAttention([32, 64], [1, 2], sparse_config=config, backend="torch")
    out, weights = module(q, k, v, key_padding_mask=mask, return_attention_weights=True)
    for key in ("block_values", "query_positions", "key_positions", "block_heads"):
        assert weights[key].device == out.device
    _, w64 = ReferenceAttention([32, 64], [1, 2], sparse_config=config)(
        q, k, v, key_padding_mask=mask, return_attention_weights=True
    )
    _, w32 = ReferenceAttention([32, 64], [1, 2], sparse_config=config, compute_dtype=None)(
        q, k, v, key_padding_mask=mask, return_attention_weights=True
    )
    assert_within_budget(compare("weights", weights.to_dense(), w64, w32, torch.float32))
