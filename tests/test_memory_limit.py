"""The torch backend never builds an N x N tensor: N = 65536 under an address-space limit.

A subprocess caps its address space (RLIMIT_AS) at what it uses after importing torch plus a
few GiB: a single N x N float32 tensor (16 GiB) cannot be allocated there (asserted), yet the
backend runs the whole sequence. Sampled query rows are checked against the float64 reference
computed for those rows only (a query chunk against the whole key sequence: Nq x N).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

resource = pytest.importorskip("resource", reason="RLIMIT_AS needs the POSIX resource module")

CHILD = textwrap.dedent(
    """
    import resource, torch
    from optimized import torch_backend
    from optimized.plan import CallPlan
    from reference import (AttentionGeometry, DilationConfig, SparsePatternConfig, assert_within_budget, compare,
                           partial_attention)

    def address_space():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmSize in /proc/self/status")

    N, D = 65536, 16
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, N, 1, D) for _ in range(3))
    mask = torch.rand(1, N) < 0.05
    config = SparsePatternConfig(pattern_type="local_window", block_size=64, local_window_size=256)
    # head_mode "all": the single head is in both branches, so the lse merge runs too.
    geometry = AttentionGeometry(DilationConfig((4096, 8192), (1, 2), "all"), N, 1)
    plan = CallPlan.whole(geometry, config, True, D ** -0.5)
    torch_backend.partial_forward(q[:, :256], k[:, :256], v[:, :256], None,
                                  CallPlan(geometry, config, True, D ** -0.5, (0, 256), (0, 256)))  # warm up
    limit = address_space() + 4 * 2**30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        torch.empty(N, N)
    except RuntimeError:
        pass
    else:
        raise AssertionError(f"an N x N float32 tensor fit under the {limit / 2**30:.1f} GiB limit")

    out, lse = torch_backend.partial_forward(q, k, v, mask, plan)
    assert out.shape == (1, N, 1, D) and lse.shape == (1, 1, N)
    for q0 in (4080, N - 32):  # 64 sampled rows; the first chunk straddles a segment boundary
        rows = slice(q0, q0 + 32)
        kwargs = dict(query_start=q0, is_causal=True, key_padding_mask=mask, scale=D ** -0.5)
        ref64 = partial_attention(q[:, rows], k, v, geometry, config, **kwargs)
        ref32 = partial_attention(q[:, rows], k, v, geometry, config, compute_dtype=None, **kwargs)
        empty = torch.isneginf(ref64[1])
        assert_within_budget(compare("lse", lse[:, :, rows], ref64[1], ref32[1], torch.float32, empty=empty,
                                     empty_value=float("-inf")), f"rows {q0}..{q0 + 32}")
        assert_within_budget(compare("out", out[:, rows], ref64[0], ref32[0], torch.float32,
                                     empty=empty.transpose(1, 2).unsqueeze(-1)), f"rows {q0}..{q0 + 32}")
    print("ok", round(limit / 2**30, 2))
    """
)


def test_torch_backend_runs_n65536_under_an_address_space_limit():
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc/self/status to measure the address space")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, f"child failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    assert result.stdout.startswith("ok"), result.stdout
