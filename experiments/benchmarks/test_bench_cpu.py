"""pytest-benchmark suite on the CPU: the reference and the torch backend against torch SDPA, one shape.

Every case records in ``extra_info`` its ``case`` id and the ``anchor`` case it is compared to:
SDPA (full attention, no mask) on the same shape, measured in the same run. experiments/regression.py
compares each case's time ratio to its anchor with the committed baseline's ratio, so a faster or
slower machine cancels out. Under the project's default ``--benchmark-disable`` (CI) each case
runs once, as a test: its output must be finite and have the right shape.

Record a baseline:  .venv/bin/pytest experiments/benchmarks/test_bench_cpu.py --benchmark-enable \
                        --benchmark-json experiments/baselines/cpu.json
"""

from __future__ import annotations

import pytest
import torch

from optimized import BlockSparseRingDilatedAttention as Optimized
from reference import BlockSparseRingDilatedAttention as Reference
from reference import SparsePatternConfig

BATCH, SEQ_LEN, HEADS, HEAD_DIM = 1, 1024, 4, 32
SEGMENTS, RATES, BLOCK = (256, 512, 1024), (1, 2, 4), 16
REFERENCE_SEQ_LEN = 256  # the float64 dense reference is quadratic; it gets its own, smaller anchor
PATTERNS = ("dense", "local_window", "dilated_sparse", "global_local", "random")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: with other load on the machine, a descheduled OpenMP worker stalls the
    whole parallel region and the times scatter by 10x; one thread keeps ratios comparable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pattern(name: str) -> SparsePatternConfig:
    return SparsePatternConfig(
        name, sparsity_ratio=0.1, block_size=BLOCK, local_window_size=4 * BLOCK, global_tokens=BLOCK
    )


def inputs(seq_len: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seq_len)
    return tuple(torch.randn(BATCH, seq_len, HEADS, HEAD_DIM, generator=generator, dtype=dtype) for _ in range(3))


def sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    ).transpose(1, 2)


def run(benchmark, fn, case: str, anchor: str | None, rounds: int = 15):
    benchmark.extra_info.update(case=case, anchor=anchor, device="cpu", threads=torch.get_num_threads())
    with torch.no_grad():
        out = benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all(), f"{case}: non-finite output"
    return out


@pytest.mark.parametrize("seq_len", [SEQ_LEN, REFERENCE_SEQ_LEN])
def test_sdpa_anchor(benchmark, seq_len):
    benchmark.group = f"cpu N={seq_len}"
    q, k, v = inputs(seq_len)
    out = run(benchmark, lambda: sdpa(q, k, v), f"sdpa/N{seq_len}", None)
    assert out.shape == q.shape


@pytest.mark.parametrize("name", PATTERNS)
def test_torch_backend(benchmark, name):
    benchmark.group = f"cpu N={SEQ_LEN}"
    q, k, v = inputs(SEQ_LEN)
    attention = Optimized(SEGMENTS, RATES, sparse_config=pattern(name), backend="torch")
    out = run(benchmark, lambda: attention(q, k, v), f"torch/{name}/N{SEQ_LEN}", f"sdpa/N{SEQ_LEN}")
    assert out.shape == q.shape


def test_torch_backend_with_weights(benchmark):
    benchmark.group = f"cpu N={SEQ_LEN}"
    q, k, v = inputs(SEQ_LEN)
    attention = Optimized(SEGMENTS, RATES, sparse_config=pattern("local_window"), backend="torch")
    out = run(
        benchmark,
        lambda: attention(q, k, v, return_attention_weights=True),
        f"torch+weights/local_window/N{SEQ_LEN}",
        f"sdpa/N{SEQ_LEN}",
    )
    assert out.shape == q.shape


@pytest.mark.parametrize("name", ("local_window", "dilated_sparse"))
def test_reference(benchmark, name):
    benchmark.group = f"cpu N={REFERENCE_SEQ_LEN}"
    q, k, v = inputs(REFERENCE_SEQ_LEN)
    attention = Reference(SEGMENTS, RATES, sparse_config=pattern(name))
    out = run(
        benchmark,
        lambda: attention(q, k, v),
        f"reference/{name}/N{REFERENCE_SEQ_LEN}",
        f"sdpa/N{REFERENCE_SEQ_LEN}",
        rounds=7,
    )
    assert out.shape == q.shape and out.dtype == torch.float64
