"""Property tests: every optimized backend against the float64 reference.

The contract: docs/semantics.md sections 4-6 and docs/numerics.md.

Each test draws whole attention cases (shapes with primes and GQA, dilations with segments
longer than N, every layout, causal, key padding) and goes through ``helpers.check_backend``.
Sizes and example counts follow the hypothesis profile (ci / dev / gpu).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from . import strategies as s
from .helpers import case_sizes, check_backend, default_device, differentiable_reference, example_count

DEVICE = default_device()
ON_CUDA = DEVICE.type == "cuda"


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


# --------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------


@settings(max_examples=example_count(40))
@given(case=s.attention_cases(**case_sizes("torch").case_kwargs()))
def test_torch_backend_float32(case):
    check_backend(case, "torch", torch.float32, DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@settings(max_examples=example_count(15))
@given(case=s.attention_cases(**case_sizes("torch").case_kwargs()))
def test_torch_backend_low_precision(case, dtype):
    check_backend(case, "torch", dtype, DEVICE)


@settings(max_examples=example_count(10))
@given(case=s.attention_cases(**case_sizes("torch").case_kwargs()), work_size=st.integers(1, 12))
def test_torch_backend_small_work_size(case, work_size):
    """A work size of a few blocks cuts every table into many row groups: same result."""
    check_backend(case, "torch", torch.float32, DEVICE, module_options={"work_size": work_size})


# --------------------------------------------------------------------------------------------
# Sparse attention weights
# --------------------------------------------------------------------------------------------


@settings(max_examples=example_count(25))
@given(case=s.attention_cases(**case_sizes("torch").case_kwargs()), dtype=s.dtypes((torch.float32, torch.bfloat16)))
def test_sparse_weights_match_reference_probabilities(case, dtype):
    """to_dense() equals the reference's probabilities; rows sum to 1, or 0 when empty."""
    check_backend(case, "torch", dtype, DEVICE, check_weights=True)


# --------------------------------------------------------------------------------------------
# The differentiable reference of the gradient tests is the reference's forward
# --------------------------------------------------------------------------------------------


@settings(max_examples=example_count(10))
@given(case=s.attention_cases(**case_sizes("gradients").case_kwargs()))
def test_differentiable_reference_is_the_reference(case):
    import reference

    q, k, v, mask = s.make_inputs(case, torch.float64, "cpu")
    out, lse = differentiable_reference(q, k, v, case, mask)
    ref_out, ref_lse = reference.BlockSparseRingDilatedAttention(**s.module_kwargs(case))(
        q, k, v, is_causal=case.is_causal, key_padding_mask=mask, return_lse=True
    )
    # Same float64 operations on the rows that have keys; empty rows are 0 / -inf in both.
    assert torch.equal(out, ref_out), case.describe()
    assert torch.equal(lse, ref_lse), case.describe()


# --------------------------------------------------------------------------------------------
# flex (eager on the CPU: small sizes, few examples; compiled on CUDA, blocks of 16 multiples)
# --------------------------------------------------------------------------------------------

needs_flex = pytest.mark.skipif(
    not _has_module("optimized.flex_backend"), reason="optimized/flex_backend.py is not there"
)
FLEX_BLOCK_SIZES = (16, 32) if ON_CUDA else None  # compiled flex tiles blocks of 16
# On CUDA flex is torch.compile'd per shape (tens of seconds each): few examples whatever the profile.
FLEX_EXAMPLES = 3 if ON_CUDA else example_count(5)


@needs_flex
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=FLEX_EXAMPLES)
@given(case=s.attention_cases(**case_sizes("flex").case_kwargs(), block_sizes=FLEX_BLOCK_SIZES))
def test_flex_backend(case, dtype):
    check_backend(case, "flex", dtype, DEVICE)


@needs_flex
@settings(max_examples=1 if ON_CUDA else example_count(2))
@given(case=s.attention_cases(**case_sizes("flex").case_kwargs(), block_sizes=FLEX_BLOCK_SIZES))
def test_flex_backend_sparse_weights(case):
    check_backend(case, "flex", torch.float32, DEVICE, check_weights=True)


# --------------------------------------------------------------------------------------------
# triton (the interpreter on the CPU under TRITON_INTERPRET=1: tiny sizes, few examples)
# --------------------------------------------------------------------------------------------

TRITON_RUNS_HERE = ON_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(
    not (_has_module("triton") and _has_module("optimized.triton_backend") and TRITON_RUNS_HERE),
    reason="needs triton, optimized/triton_backend.py and CUDA or TRITON_INTERPRET=1 (as `make test` sets)",
)
TRITON_BLOCK_SIZES = (16, 32, 64) if ON_CUDA else (16,)
TRITON_HEAD_DIMS = (16, 32, 64, 128) if ON_CUDA else (16,)
TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16] if ON_CUDA else [torch.float32, torch.float16]


def _triton_cases():
    return s.attention_cases(
        **case_sizes("triton").case_kwargs(), block_sizes=TRITON_BLOCK_SIZES, head_dims=TRITON_HEAD_DIMS
    )


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@settings(max_examples=example_count(6))
@given(case=_triton_cases())
def test_triton_backend(case, dtype):
    from optimized.triton_backend import unsupported_reasons

    assume(not unsupported_reasons(case.sparse_config.block_size, case.shape.head_dim, dtype, DEVICE))
    check_backend(case, "triton", dtype, DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@settings(max_examples=example_count(4))
@given(case=_triton_cases(), data=st.data())
def test_triton_ring_merges_on_write(case, dtype, data):
    """The in-process ring with triton: every chunk pair merged into its query chunk's accumulator by the kernel,
    a ring step's pairs in one launch or pair by pair."""
    from optimized.triton_backend import unsupported_reasons

    assume(not unsupported_reasons(case.sparse_config.block_size, case.shape.head_dim, dtype, DEVICE))
    from optimized.dispatch import RING_LAUNCHES, TritonOptions

    chunks = data.draw(s.ring_splits(case.shape.seq_len, allow_empty=data.draw(st.booleans())), label="chunks")
    # False: a float32 partial per pair and a separate merge (the A/B twin of merge on write).
    options = TritonOptions(
        merge_on_write=data.draw(st.booleans(), label="merge_on_write"),
        ring_launch=data.draw(st.sampled_from(RING_LAUNCHES), label="ring_launch"),
    )
    check_backend(case, "triton", dtype, DEVICE, ring_chunk_lengths=chunks, module_options={"backend_options": options})


@needs_triton
@settings(max_examples=example_count(3))
@given(case=_triton_cases())
def test_triton_backend_sparse_weights(case):
    from optimized.triton_backend import unsupported_reasons

    assume(not unsupported_reasons(case.sparse_config.block_size, case.shape.head_dim, torch.float32, DEVICE))
    check_backend(case, "triton", torch.float32, DEVICE, check_weights=True)


# --------------------------------------------------------------------------------------------
# Ring splits simulated in one process (docs/semantics.md section 5)
# --------------------------------------------------------------------------------------------

needs_ring = pytest.mark.skipif(not _has_module("optimized.ring"), reason="optimized/ring.py is not there")


@needs_ring
@settings(max_examples=example_count(12))
@given(case=s.attention_cases(**case_sizes("torch").case_kwargs()), data=st.data())
def test_ring_split_gives_the_unsplit_result(case, data):
    chunks = data.draw(s.ring_splits(case.shape.seq_len, allow_empty=data.draw(st.booleans())), label="chunks")
    check_backend(case, "torch", torch.float32, DEVICE, ring_chunk_lengths=chunks)


@needs_ring
@settings(max_examples=example_count(8))
@given(case=s.attention_cases(**case_sizes("torch").case_kwargs()), data=st.data())
def test_bhnd_input_layout(case, data):
    """Inputs stored (B, H, N, D) are read through strides: the same contract, split or not, weights too."""
    chunks = data.draw(st.none() | s.ring_splits(case.shape.seq_len), label="chunks")
    check_backend(
        case,
        "torch",
        torch.float32,
        DEVICE,
        ring_chunk_lengths=chunks,
        check_weights=data.draw(st.booleans(), label="weights"),
        layout="bhnd",
    )


@needs_ring
@settings(max_examples=example_count(4))
@given(case=s.attention_cases(**case_sizes("torch").case_kwargs()), data=st.data())
def test_ring_split_low_precision_and_weights(case, data):
    chunks = data.draw(s.ring_splits(case.shape.seq_len), label="chunks")
    check_backend(case, "torch", torch.bfloat16, DEVICE, ring_chunk_lengths=chunks, check_weights=True)
