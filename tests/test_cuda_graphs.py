"""CUDA graph replay of the triton forward (optimized/graphs.py): bitwise equal to eager, no aliasing."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import optimized  # noqa: E402
from optimized import graphs  # noqa: E402
from reference import SparsePatternConfig  # noqa: E402

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def make_qkv(seed, N=256, H=4, D=32, dtype=torch.float16, device="cuda"):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, N, H, D, generator=generator).to(device=device, dtype=dtype) for _ in range(3))


def make_module(use_cuda_graphs=True, pattern="local_window"):
    config = SparsePatternConfig(pattern_type=pattern, block_size=32, local_window_size=64, sparsity_ratio=0.5)
    return optimized.BlockSparseRingDilatedAttention(
        [64, 128], [1, 2], config, backend="triton", use_cuda_graphs=use_cuda_graphs
    )


def test_cpu_module_with_graphs_on_takes_the_eager_path(monkeypatch):
    q, k, v = make_qkv(1, N=32, H=2, D=16, dtype=torch.float32, device="cpu")
    called = []
    monkeypatch.setattr(graphs, "graphed_partial", lambda *a, **kw: called.append(1))
    attention = make_module(use_cuda_graphs=True)
    attention.sparse_config = SparsePatternConfig(pattern_type="dense", block_size=16)
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # A CUDA machine without the interpreter: the eager kernel path refuses CPU tensors itself.
        with pytest.raises(ValueError, match="needs a CUDA device"):
            attention(q, k, v)
        assert not called
        return
    out = attention(q, k, v)
    assert not called and out.shape == q.shape and bool(torch.isfinite(out).all())


@needs_cuda
@pytest.mark.parametrize("causal, padded", [(False, False), (True, True)])
def test_replay_equals_eager_bitwise(causal, padded):
    graphs.clear_graphs()
    q, k, v = make_qkv(2)
    mask = (torch.rand(2, 256, generator=torch.Generator().manual_seed(3)) < 0.1).cuda() if padded else None
    eager = make_module(use_cuda_graphs=False)(q, k, v, is_causal=causal, key_padding_mask=mask, return_lse=True)
    graphed_module = make_module(use_cuda_graphs=True)
    first = graphed_module(q, k, v, is_causal=causal, key_padding_mask=mask, return_lse=True)  # captures
    second = graphed_module(q, k, v, is_causal=causal, key_padding_mask=mask, return_lse=True)  # in place
    third = graphed_module(q, k, v, is_causal=causal, key_padding_mask=mask, return_lse=True)  # replays
    assert graphs.cached_graph_count() == 2  # the copy-in graph and the in-place graph
    for a, b, c, d in zip(eager, first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


@needs_cuda
def test_output_of_call_one_survives_call_two():
    graphs.clear_graphs()
    attention = make_module()
    q1, k1, v1 = make_qkv(4)
    q2, k2, v2 = make_qkv(5)
    out1 = attention(q1, k1, v1)
    kept = out1.clone()
    out2 = attention(q2, k2, v2)  # same shapes: same graph, new inputs
    torch.cuda.synchronize()
    assert torch.equal(out1, kept) and not torch.equal(out1, out2)
    assert torch.equal(out2, make_module(use_cuda_graphs=False)(q2, k2, v2))


@needs_cuda
def test_cache_is_bounded():
    graphs.clear_graphs()
    attention = make_module()
    for n in range(graphs.GRAPH_CACHE_SIZE + 3):
        q, k, v = make_qkv(n, N=64 + 32 * n, H=2, D=16)
        attention(q, k, v)
    assert graphs.cached_graph_count() == graphs.GRAPH_CACHE_SIZE


@needs_cuda
def test_flag_off_captures_nothing():
    graphs.clear_graphs()
    q, k, v = make_qkv(6)
    make_module(use_cuda_graphs=False)(q, k, v)
    assert graphs.cached_graph_count() == 0


@needs_cuda
def test_repeated_tensors_replay_in_place_and_see_updates():
    """Same tensors twice: a graph that reads them in place; an in-place update is seen, eager-equal."""
    graphs.clear_graphs()
    attention = make_module()
    eager = make_module(use_cuda_graphs=False)
    q, k, v = make_qkv(7)
    first = attention(q, k, v)  # copy graph
    second = attention(q, k, v)  # in-place graph captured
    assert graphs.cached_graph_count() == 2 and torch.equal(first, second)
    q.copy_(make_qkv(8)[0])
    third = attention(q, k, v)
    assert torch.equal(third, eager(q, k, v)) and not torch.equal(third, second)


@needs_cuda
def test_large_inputs_run_eagerly():
    graphs.clear_graphs()
    N = graphs.GRAPH_MAX_ELEMENTS // (4 * 32) + 64  # just above the size limit
    q, k, v = make_qkv(9, N=N, H=4, D=32)
    out = make_module()(q, k, v)
    assert graphs.cached_graph_count() == 0 and torch.equal(out, make_module(use_cuda_graphs=False)(q, k, v))


def _flood_table_cache(monkeypatch, device):
    """Build the tables of many other plans with a zero byte budget: every unpinned entry is evicted."""
    from optimized import triton_backend
    from optimized.plan import CallPlan
    from reference import AttentionGeometry, DilationConfig

    monkeypatch.setattr(triton_backend, "TABLE_CACHE_BYTES", 0)
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    for n in range(4):
        geometry = AttentionGeometry(DilationConfig((32,), (1,), "split"), 32 + 16 * n, 2)
        triton_backend.device_tables(CallPlan.whole(geometry, config, False, 1.0), device)
    return triton_backend


@needs_cuda
def test_graph_keeps_its_tables_when_the_table_cache_evicts(monkeypatch):
    """A replayed graph reads the block tables at their captured addresses: eviction must not free them."""
    graphs.clear_graphs()
    attention = make_module()
    q, k, v = make_qkv(8)
    expected = make_module(use_cuda_graphs=False)(q, k, v)
    attention(q, k, v)  # captures
    triton_backend = _flood_table_cache(monkeypatch, q.device)
    assert len(triton_backend._table_cache) <= 1
    garbage = [torch.full((1 << 20,), -1, dtype=torch.int32, device=q.device) for _ in range(8)]  # reuse freed memory
    again = attention(q.clone(), k.clone(), v.clone())  # replays (copy-in)
    del garbage
    assert torch.equal(again, expected)


def test_evicted_tables_are_rebuilt_on_the_next_call(monkeypatch):
    """The same eviction on any device (CPU: the interpreter): the next call rebuilds the tables, same result."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    attention = make_module(use_cuda_graphs=False)
    q, k, v = make_qkv(9, N=128, H=2, D=16, dtype=torch.float32, device=device)
    first = attention(q, k, v)
    _flood_table_cache(monkeypatch, device)
    assert torch.equal(attention(q, k, v), first)
