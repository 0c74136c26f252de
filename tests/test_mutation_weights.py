"""Properties of optimized/weights.py that the weights-against-reference tests leave open.

``make mutation`` (experiments/mutation.py) changed these and every other test passed: the structure
of weights with no block, a table with one entry, an empty table before a full one, the work-size
slicing, the -1 of slots on no point, ``nbytes`` and the size rule of ``to_dense``.
"""

from __future__ import annotations

import pytest
import torch

from optimized import weights as sparse_weights
from optimized.plan import CallPlan
from reference import AttentionGeometry, DilationConfig, SparsePatternConfig, partial_attention


def _weights(segments, rates, seq_len, heads, block, query_range, key_range, causal=False, work_size=4096, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, seq_len, heads, 8, generator=generator) for _ in range(3))
    geometry = AttentionGeometry(DilationConfig(segments, rates), seq_len, heads)
    config = SparsePatternConfig(pattern_type="dense", block_size=block)
    (q0, q1), (k0, k1) = query_range, key_range
    qc, kc, vc = q[:, q0:q1], k[:, k0:k1], v[:, k0:k1]
    _, lse = partial_attention(qc, kc, vc, geometry, config, query_start=q0, key_start=k0, is_causal=causal)
    plan = CallPlan(geometry, config, causal, 8**-0.5, query_range, key_range)
    return sparse_weights.attention_weights(qc, kc, None, lse.float(), plan, work_size=work_size)


def test_weights_without_a_block_have_the_structure_of_full_ones():
    weights = _weights((16,), (1,), 16, 2, 4, (0, 8), (8, 16), causal=True)  # keys after every query
    assert weights.num_blocks == 0
    expected = {
        "block_indices": (0, 2),
        "block_values": (2, 0, 4, 4),
        "block_heads": (0,),
        "block_branches": (0,),
        "query_positions": (0, 4),
        "key_positions": (0, 4),
    }
    assert {name: tuple(weights[name].shape) for name in expected} == expected
    assert weights["block_values"].dtype == torch.float32 and weights["block_indices"].dtype == torch.long
    assert not bool(weights.to_dense().any())


def test_a_table_with_one_entry_and_an_empty_table_before_a_full_one():
    one = _weights((16,), (1,), 16, 1, 16, (0, 16), (0, 16))  # one query block x one key block
    assert one.num_blocks == 1
    assert torch.allclose(one.to_dense().sum(-1), torch.ones(2, 1, 16))
    # Branch 0 (segments of 8) has no key in [8, 32) for queries [0, 8); branch 1 (segment 32) has.
    later = _weights((8, 32), (1, 2), 32, 2, 4, (0, 8), (8, 32))
    assert later.num_blocks > 0 and set(later["block_branches"].tolist()) == {1}


def test_work_size_slices_change_nothing():
    whole = _weights((16, 32), (1, 2), 32, 2, 4, (0, 32), (0, 32))
    sliced = _weights((16, 32), (1, 2), 32, 2, 4, (0, 32), (0, 32), work_size=1)
    for name in ("block_indices", "block_values", "block_heads", "query_positions", "key_positions"):
        assert torch.equal(whole[name], sliced[name]), name


def test_slots_on_no_point_are_minus_one_and_nbytes_counts_the_tensors():
    weights = _weights((20,), (1,), 20, 1, 16, (0, 20), (0, 20))  # the second block has 4 points of 16
    positions = torch.cat([weights["query_positions"].flatten(), weights["key_positions"].flatten()])
    assert set(positions[positions < 0].tolist()) == {-1}
    tensors = [t for t in weights.values() if isinstance(t, torch.Tensor)]
    assert weights.nbytes == sum(t.numel() * t.element_size() for t in tensors)


def test_to_dense_refuses_more_elements_than_its_limit(monkeypatch):
    weights = _weights((8,), (1,), 8, 2, 4, (0, 8), (0, 8))
    elements = 2 * 2 * 8 * 8  # B x H x N x N
    monkeypatch.setattr(sparse_weights, "DENSE_ELEMENT_LIMIT", elements)
    assert weights.to_dense().shape == (2, 2, 8, 8)  # exactly at the limit: allowed
    monkeypatch.setattr(sparse_weights, "DENSE_ELEMENT_LIMIT", elements - 1)
    with pytest.raises(ValueError, match=f"to_dense would build {elements} elements"):
        weights.to_dense()
    assert weights.to_dense(allow_large=True).shape == (2, 2, 8, 8)
