"""Autograd: dq, dk, dv of the torch and flex backends against the float64 reference (k = 3).

The upstream gradient is fresh random values, the same for the optimized module and the
reference; the baseline is the reference's gradient computed in the tested dtype. The triton
backend runs its own backward kernels (under TRITON_INTERPRET=1 on the CPU).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from . import strategies as s
from .helpers import (
    case_sizes,
    check_gradients,
    default_device,
    example_count,
    gradient_case_kwargs,
    some_row_has_two_keys,
)

DEVICE = default_device()


def _backend_available(name: str) -> bool:
    return importlib.util.find_spec(f"optimized.{name}_backend") is not None


@settings(max_examples=example_count(25))
@given(case=s.attention_cases(**gradient_case_kwargs()))
def test_torch_backend_gradients_float32(case):
    assume(some_row_has_two_keys(case))
    check_gradients(case, "torch", torch.float32, DEVICE)


@settings(max_examples=example_count(10))
@given(case=s.attention_cases(**gradient_case_kwargs()))
def test_torch_backend_gradients_bfloat16(case):
    assume(some_row_has_two_keys(case))
    check_gradients(case, "torch", torch.bfloat16, DEVICE)


needs_flex = pytest.mark.skipif(not _backend_available("flex"), reason="optimized/flex_backend.py is not there")


@needs_flex
@pytest.mark.skipif(DEVICE.type != "cuda", reason="FlexAttention has no backward on the CPU (torch limitation)")
@settings(max_examples=2)  # compiled per shape on CUDA: tens of seconds each
@given(case=s.attention_cases(**case_sizes("flex").case_kwargs(), block_sizes=(16, 32)))
def test_flex_backend_gradients(case):
    check_gradients(case, "flex", torch.float32, DEVICE)
    check_gradients(case, "flex", torch.bfloat16, DEVICE)


@needs_flex
@pytest.mark.skipif(DEVICE.type == "cuda", reason="on CUDA flex has a backward (tested above)")
def test_flex_backend_on_cpu_refuses_inputs_that_require_grad():
    """Eager FlexAttention has no CPU backward: the backend says so instead of failing later."""
    import optimized

    q, k, v = (
        torch.randn(1, 12, 2, 4, generator=torch.Generator().manual_seed(i), requires_grad=True) for i in range(3)
    )
    attention = optimized.BlockSparseRingDilatedAttention([4, 8], [1, 2], backend="flex")
    with pytest.raises((NotImplementedError, ValueError, RuntimeError), match="grad"):
        attention(q, k, v)
    # The same call on inputs that do not require grad runs.
    assert attention(q.detach(), k.detach(), v.detach()).shape == q.shape


TRITON_RUNS_HERE = _backend_available("triton") and (DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(
    not TRITON_RUNS_HERE, reason="triton needs CUDA or TRITON_INTERPRET=1 (as `make test` sets)"
)
TRITON_GRADIENT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_GRADIENT_DTYPES, ids=str)
@settings(max_examples=example_count(4))
@given(
    case=s.attention_cases(
        **dict(gradient_case_kwargs(), block_sizes=(16, 32) if DEVICE.type == "cuda" else (16,), max_block_size=32)
    ),
    data=st.data(),
)
def test_triton_backend_gradients(case, dtype, data):
    """The triton backward (dq over rows, dk/dv over columns), unsplit or through an in-process ring: from the
    merged out and lse per chunk pair (the default), or through each pair's partial and the merge (ring_launch
    "pair")."""
    from optimized.dispatch import RING_LAUNCHES, TritonOptions

    assume(some_row_has_two_keys(case))
    chunks = data.draw(st.none() | s.ring_splits(case.shape.seq_len, max_parts=3), label="ring_chunk_lengths")
    options = {"backend_options": TritonOptions(ring_launch=data.draw(st.sampled_from(RING_LAUNCHES), label="launch"))}
    check_gradients(case, "triton", dtype, DEVICE, ring_chunk_lengths=chunks, module_options=options)


@needs_triton
def test_triton_backward_is_deterministic():
    """Grouped-query heads over two branches (dk, dv summed over launches, no atomics): same bits twice."""
    import optimized

    config = optimized.SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=32)
    attention = optimized.BlockSparseRingDilatedAttention(
        [32, 64], [1, 2], sparse_config=config, backend="triton", head_mode="all"
    )
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(1, 80, 4, 16, generator=generator).to(DEVICE)
    k, v = (torch.randn(1, 80, 2, 16, generator=generator).to(DEVICE) for _ in range(2))
    grad_out = torch.randn(1, 80, 4, 16, generator=generator).to(DEVICE)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, is_causal=True).backward(grad_out)
        grads.append([leaf.grad for leaf in leaves])
    assert attention.last_backend == "triton"
    for first, second in zip(*grads):
        assert torch.equal(first, second)
        assert bool(first.abs().sum() > 0)


@needs_triton
def test_triton_backend_refuses_what_its_kernels_cannot_do():
    """float64, and gradients through the sparse weights: errors naming the argument, never a fallback."""
    import optimized

    config = optimized.SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=32)
    attention = optimized.BlockSparseRingDilatedAttention([16, 32], [1, 2], sparse_config=config, backend="triton")
    q, k, v = (torch.randn(1, 32, 2, 16, generator=torch.Generator().manual_seed(i)).to(DEVICE) for i in range(3))
    with pytest.raises(TypeError, match="float64"):
        attention(q.double(), k.double(), v.double())
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with pytest.raises(ValueError, match="return_attention_weights"):
        attention(*leaves, return_attention_weights=True)
    # Forward-only calls of both kinds run.
    assert attention(q, k, v, return_attention_weights=True)[0].shape == q.shape
