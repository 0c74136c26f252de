"""The Triton backend's refusals at the edges of what the kernels accept (optimized/triton_backend.py).

``make mutation`` (experiments/mutation.py) ran a sample of the kernel module's mutants: a refusal
of head_dim 0 that only caught negative head dims passed every other test.
"""

from __future__ import annotations

import pytest
import torch

from optimized import triton_backend


@pytest.mark.parametrize("head_dim", [0, -1, triton_backend.MAX_HEAD_DIM + 1])
def test_a_head_dim_outside_one_to_the_maximum_is_refused(head_dim):
    reasons = triton_backend.unsupported_reasons(block_size=16, head_dim=head_dim, dtype=torch.float32)
    assert len(reasons) == 1 and f"head_dim={head_dim}" in reasons[0]


@pytest.mark.parametrize("head_dim", [1, triton_backend.MAX_HEAD_DIM])
def test_the_head_dims_at_the_ends_of_the_range_run(head_dim):
    assert triton_backend.unsupported_reasons(block_size=16, head_dim=head_dim, dtype=torch.float32) == []
