"""The seed document's two usage examples, run as written with only the imports changed.

The statements between the markers are copied from the seed's "Basic Usage" and "Multihead
Usage" code blocks; only the import lines say ``from optimized import ...``. The inputs the
seed leaves undefined (q, k, v / query, key, value) are defined before them, at N = 8192: the
largest segment length of the basic example, so every branch has whole segments and the
multihead example's 4096 segments appear twice.
"""

from __future__ import annotations

import torch

SEED_WEIGHT_KEYS = ("block_indices", "block_values", "shape", "block_size")
SEQ_LEN = 8192


def _fresh(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _run_basic_usage(q, k, v) -> dict:
    # ---- seed: Basic Usage (imports changed) ----
    from optimized import BlockSparseRingDilatedAttentionV2, SparsePatternConfig

    # Configure sparsity
    sparse_config = SparsePatternConfig(
        pattern_type="dilated_sparse",  # or 'local_window', 'global_local'
        sparsity_ratio=0.1,  # Keep only 10% of blocks
        block_size=128,  # Size of each block
    )

    # Create module
    attention = BlockSparseRingDilatedAttentionV2(
        segment_lengths=[2048, 4096, 8192],
        dilation_rates=[1, 2, 4],
        sparse_config=sparse_config,
    )

    # Forward pass
    output = attention(q, k, v)

    # Get sparse attention weights
    output, weights = attention(q, k, v, return_attention_weights=True)
    # weights is a dict with block indices and values
    # ---- end of seed code ----
    return locals()


def _run_multihead_usage(query, key, value, sparse_config) -> dict:
    # ---- seed: Multihead Usage (imports changed) ----
    from optimized import BlockSparseRingMultiheadDilatedAttentionV2

    multihead_attention = BlockSparseRingMultiheadDilatedAttentionV2(
        embed_dim=768,
        num_heads=12,
        segment_lengths=[2048, 4096],
        dilation_rates=[1, 2],
        sparse_config=sparse_config,
    )

    output = multihead_attention(query, key, value)
    # ---- end of seed code ----
    return locals()


def test_seed_basic_usage_runs_and_returns_sparse_weights():
    batch, heads, head_dim = 1, 3, 16
    q, k, v = (_fresh(batch, SEQ_LEN, heads, head_dim, seed=s) for s in (1, 2, 3))
    result = _run_basic_usage(q, k, v)
    output, weights, attention = result["output"], result["weights"], result["attention"]
    assert attention.last_backend == "torch"  # "auto" on the CPU
    assert output.shape == q.shape and output.dtype == q.dtype
    assert bool(torch.isfinite(output).all())
    for key in SEED_WEIGHT_KEYS:
        assert key in weights, f"weights lacks the seed's key {key!r}"
    assert tuple(weights["shape"]) == (batch, heads, SEQ_LEN, SEQ_LEN)
    assert weights["block_size"] == 128
    assert len(weights["block_indices"]) > 0
    # The call without weights and the call with them compute the same output.
    assert torch.equal(output, attention(q, k, v))


def test_seed_multihead_usage_runs():
    batch, embed_dim = 1, 768
    query, key, value = (_fresh(batch, SEQ_LEN, embed_dim, seed=s) for s in (4, 5, 6))
    # The seed's multihead block reuses the basic block's sparse_config.
    from optimized import SparsePatternConfig

    sparse_config = SparsePatternConfig(pattern_type="dilated_sparse", sparsity_ratio=0.1, block_size=128)
    result = _run_multihead_usage(query, key, value, sparse_config)
    output = result["output"]
    # Called like nn.MultiheadAttention: (out, weights or None).
    out, weights = output
    assert weights is None
    assert out.shape == (batch, SEQ_LEN, embed_dim) and out.dtype == query.dtype
    assert bool(torch.isfinite(out).all())
    assert result["multihead_attention"].attention.last_backend == "torch"
