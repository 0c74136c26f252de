"""pytest-benchmark suite on CUDA: the triton path against dense SDPA (flash) on the same shape.

Needs a CUDA device; on the CPU the CUDA cases skip with that reason, and the same check (the
triton path's output is finite, has the input's shape and dtype) runs on a tiny shape in the
Triton CPU interpreter (``TRITON_INTERPRET=1``, as ``make test`` sets it).

Anchors and regression: as in experiments/benchmarks/test_bench_cpu.py (``extra_info`` names ``case`` and ``anchor``;
experiments/regression.py compares ratios). Record a baseline on the GPU machine:
    pytest experiments/benchmarks/test_bench_gpu.py --benchmark-enable --benchmark-json experiments/baselines/gpu.json
"""

from __future__ import annotations

import os

import pytest
import torch

from optimized import BlockSparseRingDilatedAttention as Optimized
from reference import SparsePatternConfig

SEGMENTS, RATES, BLOCK = (2048, 4096, 8192), (1, 2, 4), 128
BATCH, HEADS, HEAD_DIM = 1, 12, 64
SEQ_LENS = (16384, 65536)
PATTERNS = ("dense", "local_window", "dilated_sparse", "random")

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the triton path's benchmark)"
)


def pattern(name: str, block: int = BLOCK) -> SparsePatternConfig:
    return SparsePatternConfig(
        name, sparsity_ratio=0.1, block_size=block, local_window_size=4 * block, global_tokens=block
    )


def inputs(seq_len: int, device, dtype, heads=HEADS, head_dim=HEAD_DIM):
    generator = torch.Generator().manual_seed(seq_len)
    return tuple(torch.randn(BATCH, seq_len, heads, head_dim, generator=generator).to(device, dtype) for _ in range(3))


def check_output(out: torch.Tensor, q: torch.Tensor, case: str) -> None:
    assert out.shape == q.shape and out.dtype == q.dtype, f"{case}: {tuple(out.shape)} {out.dtype}"
    assert torch.isfinite(out).all(), f"{case}: non-finite output"


def run(benchmark, fn, case: str, anchor: str | None):
    def synchronized():
        result = fn()
        torch.cuda.synchronize()
        return result

    import triton

    benchmark.extra_info.update(
        case=case,
        anchor=anchor,
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
    )
    with torch.no_grad():
        return benchmark.pedantic(synchronized, rounds=20, warmup_rounds=3, iterations=1)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_sdpa_anchor(benchmark, seq_len):
    benchmark.group = f"cuda N={seq_len}"
    q, k, v = inputs(seq_len, "cuda", torch.bfloat16)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    check_output(run(benchmark, sdpa, f"sdpa/N{seq_len}", None), q, "sdpa")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("name", PATTERNS)
def test_triton_path(benchmark, name, seq_len):
    benchmark.group = f"cuda N={seq_len}"
    q, k, v = inputs(seq_len, "cuda", torch.bfloat16)
    attention = Optimized(SEGMENTS, RATES, sparse_config=pattern(name), backend="triton")
    case = f"triton/{name}/N{seq_len}"
    check_output(run(benchmark, lambda: attention(q, k, v), case, f"sdpa/N{seq_len}"), q, case)


@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="the interpreter twin of the CUDA cases runs on the CPU with TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("name", ("local_window", "dilated_sparse"))
def test_triton_path_in_interpreter(name):
    q, k, v = inputs(256, "cpu", torch.float32, heads=4, head_dim=32)
    attention = Optimized((64, 128, 256), RATES, sparse_config=pattern(name, block=16), backend="triton")
    with torch.no_grad():
        check_output(attention(q, k, v), q, f"triton-interpreter/{name}")
