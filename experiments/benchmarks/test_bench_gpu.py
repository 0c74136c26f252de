"""pytest-benchmark suite on CUDA: the triton path against its peers measured in the same run.

Forward: the triton path against dense SDPA (flash) on the same shape. Training (forward + backward
with autograd): the module with ``backend="auto"`` (triton) against gather + SDPA + scatter on the
dense layout, and against compiled FlexAttention on pre-gathered lattices with a cached BlockMask
(the kernel-level peer) on sparse layouts; the flex backend's module call against that peer.

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


def run(benchmark, fn, case: str, anchor: str | None, grad: bool = False):
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
    with torch.enable_grad() if grad else torch.no_grad():
        return benchmark.pedantic(synchronized, rounds=20, warmup_rounds=3, iterations=1)


def training_inputs(seq_len: int):
    """q, k, v leaves that require grad and a fixed dout (bf16, CUDA)."""
    q, k, v = (t.requires_grad_() for t in inputs(seq_len, "cuda", torch.bfloat16))
    return q, k, v, torch.randn_like(q)


def forward_backward(fn, q, k, v, dout):
    """One training step of ``fn``: returns the gradients (checked like outputs)."""

    def step():
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(dout)
        return q.grad

    return step


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


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_gather_sdpa_training_anchor(benchmark, seq_len):
    from experiments.bench_gpu import gather_sdpa
    from reference.config import DilationConfig
    from reference.semantics import AttentionGeometry

    benchmark.group = f"cuda training N={seq_len}"
    q, k, v, dout = training_inputs(seq_len)
    geometry = AttentionGeometry(DilationConfig(SEGMENTS, RATES, "split"), seq_len, HEADS)
    step = forward_backward(lambda *x: gather_sdpa(*x, geometry), q, k, v, dout)
    check_output(run(benchmark, step, f"gather_sdpa_train/N{seq_len}", None, grad=True), q, "gather_sdpa")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("name", PATTERNS)
def test_triton_training(benchmark, name, seq_len):
    benchmark.group = f"cuda training N={seq_len}"
    q, k, v, dout = training_inputs(seq_len)
    attention = Optimized(SEGMENTS, RATES, sparse_config=pattern(name), backend="auto")
    case = f"triton_train/{name}/N{seq_len}"
    anchor = f"gather_sdpa_train/N{seq_len}" if name == "dense" else f"flex_peer_train/{name}/N{seq_len}"
    check_output(run(benchmark, forward_backward(attention, q, k, v, dout), case, anchor, grad=True), q, case)
    assert attention.last_backend == "triton", case


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("name", [p for p in PATTERNS if p != "dense"])
def test_flex_peer_training_anchor(benchmark, name, seq_len):
    """Compiled flex on pre-gathered lattices with a cached BlockMask: the kernel-level peer."""
    from experiments.bench_gpu import compacted_flex_inputs, compiled_flex
    from reference.config import DilationConfig
    from reference.semantics import AttentionGeometry

    benchmark.group = f"cuda training N={seq_len}"
    geometry = AttentionGeometry(DilationConfig(SEGMENTS, RATES, "split"), seq_len, HEADS)
    calls = [
        (*(t.detach().requires_grad_() for t in (Q, K, V)), mask)
        for Q, K, V, mask in compacted_flex_inputs(*inputs(seq_len, "cuda", torch.bfloat16), geometry, pattern(name))
    ]
    flex = compiled_flex()

    def step():
        for Q, K, V, mask in calls:
            flex(Q, K, V, block_mask=mask).backward(torch.ones_like(Q))
        return calls[0][0].grad

    case = f"flex_peer_train/{name}/N{seq_len}"
    grad = run(benchmark, step, case, None, grad=True)
    assert torch.isfinite(grad).all(), case


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("name", [p for p in PATTERNS if p != "dense"])
def test_flex_module_training(benchmark, name, seq_len):
    benchmark.group = f"cuda training N={seq_len}"
    q, k, v, dout = training_inputs(seq_len)
    attention = Optimized(SEGMENTS, RATES, sparse_config=pattern(name), backend="flex")
    case = f"flex_module_train/{name}/N{seq_len}"
    anchor = f"flex_peer_train/{name}/N{seq_len}"
    check_output(run(benchmark, forward_backward(attention, q, k, v, dout), case, anchor, grad=True), q, case)


@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="the interpreter twin of the CUDA training cases runs on the CPU with TRITON_INTERPRET=1",
)
def test_triton_training_in_interpreter():
    q, k, v = (t.requires_grad_() for t in inputs(256, "cpu", torch.float32, heads=4, head_dim=32))
    attention = Optimized((64, 128, 256), RATES, sparse_config=pattern("local_window", block=16), backend="triton")
    forward_backward(attention, q, k, v, torch.randn_like(q))()
    for tensor in (q, k, v):
        check_output(tensor.grad, tensor, "triton-interpreter/training")


# The ring: a global branch [8192, 65536] / [1, 8] crosses all 8 chunks of 64K tokens (every step computes);
# the seed's branches fit in a chunk (one step). Anchor: the same module unsplit.
RING_SEQ_LEN, RING_PARTS = 65536, 8
RING_DILATIONS = {"seed": (SEGMENTS, RATES), "global": ((8192, 65536), (1, 8))}


def ring_module(dilation: str, parts: int | None, block: int = BLOCK, seq_len: int = RING_SEQ_LEN):
    segments, rates = RING_DILATIONS[dilation]
    chunks = None if parts is None else [seq_len // parts] * parts
    return Optimized(
        [min(s, seq_len) for s in segments], rates, sparse_config=pattern("dense", block), backend="triton",
        ring_chunk_lengths=chunks,
    )  # fmt: skip


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("training", [False, True], ids=["forward", "train"])
@pytest.mark.parametrize("parts", [None, RING_PARTS], ids=["unsplit", f"ring{RING_PARTS}"])
@pytest.mark.parametrize("dilation", list(RING_DILATIONS))
def test_triton_ring(benchmark, dilation, parts, training):
    benchmark.group = f"cuda ring N={RING_SEQ_LEN}" + (" training" if training else "")
    kind = "train" if training else "forward"
    case = f"ring_{kind}/{dilation}/P{parts or 1}/N{RING_SEQ_LEN}"
    anchor = None if parts is None else f"ring_{kind}/{dilation}/P1/N{RING_SEQ_LEN}"
    attention = ring_module(dilation, parts)
    if training:
        q, k, v, dout = training_inputs(RING_SEQ_LEN)
        check_output(run(benchmark, forward_backward(attention, q, k, v, dout), case, anchor, grad=True), q, case)
    else:
        q, k, v = inputs(RING_SEQ_LEN, "cuda", torch.bfloat16)
        check_output(run(benchmark, lambda: attention(q, k, v), case, anchor), q, case)
    assert attention.last_backend == "triton", case


@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="the interpreter twin of the CUDA ring cases runs on the CPU with TRITON_INTERPRET=1",
)
@pytest.mark.parametrize("dilation", list(RING_DILATIONS))
def test_triton_ring_in_interpreter(dilation):
    q, k, v = (t.requires_grad_() for t in inputs(256, "cpu", torch.float32, heads=4, head_dim=32))
    attention = ring_module(dilation, 4, block=16, seq_len=256)
    with torch.no_grad():
        check_output(attention(q, k, v), q, f"triton-interpreter/ring/{dilation}")
    forward_backward(attention, q, k, v, torch.randn_like(q))()
    for tensor in (q, k, v):
        check_output(tensor.grad, tensor, f"triton-interpreter/ring/{dilation}/training")
