"""Autograd: dq, dk, dv of the torch and flex backends against the float64 reference (k = 3).

The upstream gradient is fresh random values, the same for the optimized module and the
reference; the baseline is the reference's gradient computed in the tested dtype. The triton
backend is forward-only and must say so when an input requires grad.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import assume, given, settings

from . import strategies as s
from .helpers import case_sizes, check_gradients, default_device, example_count, gradient_case_kwargs, some_row_has_two_keys

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

    q, k, v = (torch.randn(1, 12, 2, 4, generator=torch.Generator().manual_seed(i), requires_grad=True)
               for i in range(3))
    attention = optimized.BlockSparseRingDilatedAttention([4, 8], [1, 2], backend="flex")
    with pytest.raises((NotImplementedError, ValueError, RuntimeError), match="grad"):
        attention(q, k, v)
    # The same call on inputs that do not require grad runs.
    assert attention(q.detach(), k.detach(), v.detach()).shape == q.shape


@pytest.mark.skipif(not _backend_available("triton"), reason="optimized/triton_backend.py is not there")
@pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="triton needs CUDA or TRITON_INTERPRET=1 (as `make test` sets)",
)
def test_triton_backend_refuses_inputs_that_require_grad():
    """The kernel is forward-only: a clear error instead of gradients that silently do not flow."""
    import optimized

    device = default_device()
    q, k, v = (torch.randn(1, 32, 2, 16, generator=torch.Generator().manual_seed(i)).to(device).requires_grad_()
               for i in range(3))
    config = optimized.SparsePatternConfig(pattern_type="local_window", block_size=16, local_window_size=32)
    attention = optimized.BlockSparseRingDilatedAttention([16, 32], [1, 2], sparse_config=config, backend="triton")
    with pytest.raises((NotImplementedError, ValueError, RuntimeError), match="grad"):
        attention(q, k, v)
    # The same call on inputs that do not require grad runs.
    assert attention(q.detach(), k.detach(), v.detach()).shape == q.shape
