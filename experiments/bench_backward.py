"""GPU benchmark of training: forward + backward of the triton path against its peers, one process.

    python3 -m experiments.bench_backward --out DIR [--sizes 65536,1048576] [--budget-s 300]

Measures, with triton.testing.do_bench medians (bf16, B = 1, block 128, segments [2048, 4096, 8192],
rates [1, 2, 4]; D = 128 adds [16384] / [8]):
- forward + backward of the module (backend "auto": triton on CUDA) against the gather + SDPA +
  scatter peer with autograd, dense layout;
- forward + backward against compiled FlexAttention on pre-gathered lattices with a cached BlockMask
  (the kernel-level peer), on sparse layouts, without and with its gather and scatter;
- the backward kernels alone (triton_backward.partial_backward): TFLOP/s on active blocks, counted as
  2.5 x the forward's 4 x pairs x D, against a bf16 matmul measured in the same run;
- peak memory of forward + backward against the bytes of q, k, v, out, dout, dq, dk, dv and lse;
- the flex backend's module call (forward, forward + backward) against the kernel-level flex peer
  including its gathers (BlockMasks cached), on sparse layouts.
Writes bench_backward.json (after every row, so a timeout keeps what was measured) under --out.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch

from experiments import cli
from experiments.bench_gpu import (
    DILATIONS,
    attempt,
    bench,
    compacted_flex_inputs,
    compiled_flex,
    gather_sdpa,
    pattern_configs,
    randn,
    tflops,
)
from optimized import BlockSparseRingDilatedAttention, triton_backend, triton_backward
from optimized.plan import CallPlan
from reference.config import DilationConfig
from reference.semantics import AttentionGeometry, active_pair_count

BACKWARD_FLOP_FACTOR = 2.5  # dq, dk, dv and the recomputed scores: 5 matmuls against the forward's 2


class _Rows:
    def __init__(self, out_dir: str) -> None:
        self.path = os.path.join(out_dir, "bench_backward.json")
        self.data = {"info": {}, "rows": [], "errors": []}

    def save(self) -> None:
        with open(self.path, "w") as handle:
            json.dump(self.data, handle, indent=1, default=str)

    def add(self, row: dict) -> None:
        print(json.dumps(row), flush=True)
        self.data["rows"].append(row)
        self.save()

    def error(self, where, exc) -> None:
        text = f"{where}: {type(exc).__name__}: {str(exc)[:400]}"
        print("ERROR", text, flush=True)
        self.data["errors"].append(text)
        self.save()


def _leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


def _fwd_bwd(fn, leaves, dout):
    def step():
        out = fn(*leaves)
        out.backward(dout)

    return step


def _flex_step(calls):
    flex = compiled_flex()

    def step():
        for Q, K, V, mask in calls:
            out = flex(Q, K, V, block_mask=mask)
            out.backward(torch.ones_like(out))

    return step


def measure(rows: _Rows, head_dim: int, seq_len: int, patterns, deadline: float) -> None:
    setting = DILATIONS[head_dim]
    heads = setting["heads"]
    dilation = DilationConfig(setting["segments"], setting["rates"], "split")
    configs = pattern_configs()
    q, k, v, dout = (randn(1, seq_len, heads, head_dim) for _ in range(4))
    geometry = AttentionGeometry(dilation, seq_len, heads)
    for pattern in patterns:
        if time.monotonic() > deadline:
            rows.error(f"D={head_dim} N={seq_len} {pattern}", RuntimeError("budget spent"))
            return
        config = configs[pattern]
        pairs = active_pair_count(geometry, config)
        row = dict(head_dim=head_dim, seq_len=seq_len, heads=heads, pattern=pattern, pairs=pairs)
        module = BlockSparseRingDilatedAttention(setting["segments"], setting["rates"], config)
        leaves = _leaves(q, k, v)
        step = _fwd_bwd(lambda *x: module(*x), leaves, dout)
        row["ours_fwd_bwd_ms"] = attempt(rows, "ours fwd+bwd", lambda: bench(step))
        row["backend"] = module.last_backend
        with torch.no_grad():
            row["ours_fwd_ms"] = attempt(rows, "ours fwd", lambda: bench(lambda: module(q, k, v)))
        # The backward kernels alone, from a saved forward.
        plan = CallPlan.whole(geometry, config, False, head_dim**-0.5)
        with torch.no_grad():
            out, lse = triton_backend.partial_forward(q, k, v, None, plan)
        ms = attempt(
            rows,
            "backward kernels",
            lambda: bench(lambda: triton_backward.partial_backward(q, k, v, None, plan, out, lse, dout, None)),
        )
        if ms:
            row["backward_kernels_ms"] = ms
            row["backward_tflops"] = BACKWARD_FLOP_FACTOR * tflops(pairs, head_dim, ms)
        if pattern == "dense":
            peer = _leaves(q, k, v)
            peer_step = _fwd_bwd(lambda *x: gather_sdpa(*x, geometry), peer, dout)
            row["sdpa_peer_fwd_bwd_ms"] = attempt(rows, "sdpa peer", lambda: bench(peer_step))
        else:
            calls = attempt(rows, "flex inputs", lambda: compacted_flex_inputs(q, k, v, geometry, config))
            if calls:
                calls = [(*_leaves(Q, K, V), mask) for Q, K, V, mask in calls]
                row["flex_peer_fwd_bwd_ms"] = attempt(rows, "flex peer", lambda: bench(_flex_step(calls)))

                masks = [mask for *_, mask in calls]

                def with_gather(grad=True):
                    # The gathers (and their scatter in the backward) per call; the BlockMasks are cached.
                    gathered = compacted_flex_inputs(*_leaves(q, k, v), geometry, config, block_masks=masks)
                    for Q, K, V, mask in gathered:
                        out = compiled_flex()(Q, K, V, block_mask=mask)
                        if grad:
                            out.sum().backward()

                row["flex_peer_with_gather_fwd_bwd_ms"] = attempt(
                    rows, "flex peer + gather", lambda: bench(with_gather)
                )
                with torch.no_grad():
                    row["flex_peer_with_gather_fwd_ms"] = attempt(
                        rows, "flex peer + gather fwd", lambda: bench(lambda: with_gather(False))
                    )
                # The flex backend's module call (its cached layout, one gather per call) against that peer.
                flex_module = BlockSparseRingDilatedAttention(
                    setting["segments"], setting["rates"], config, backend="flex"
                )
                flex_step = _fwd_bwd(lambda *x: flex_module(*x), _leaves(q, k, v), dout)
                row["flex_module_fwd_bwd_ms"] = attempt(rows, "flex module fwd+bwd", lambda: bench(flex_step))
                with torch.no_grad():
                    row["flex_module_fwd_ms"] = attempt(
                        rows, "flex module fwd", lambda: bench(lambda: flex_module(q, k, v))
                    )
            del calls
        # Peak memory of one forward + backward above its inputs (q, k, v, dout allocated before).
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        leaves = _leaves(q, k, v)
        out = module(*leaves)
        out.backward(dout)
        torch.cuda.synchronize()
        element = q.element_size() * q.numel()
        lse_bytes = 4 * seq_len * heads
        # q, k, v, dout exist before; out, dq, dk, dv (and lse) are what a step must hold.
        needed = 4 * element + 4 * element + lse_bytes
        row["peak_bytes"] = torch.cuda.max_memory_allocated() - base + 4 * element
        row["peak_over_needed"] = row["peak_bytes"] / needed
        del out, leaves
        for key, peer in (
            ("sdpa_peer_fwd_bwd_ms", "vs_sdpa_peer"),
            ("flex_peer_fwd_bwd_ms", "vs_flex_peer"),
            ("flex_peer_with_gather_fwd_bwd_ms", "vs_flex_peer_with_gather"),
        ):
            if row.get(key) and row.get("ours_fwd_bwd_ms"):
                row[peer] = row[key] / row["ours_fwd_bwd_ms"]
        for mode in ("fwd", "fwd_bwd"):  # the flex module's cost over its kernel-level peer with gathers
            if row.get(f"flex_module_{mode}_ms") and row.get(f"flex_peer_with_gather_{mode}_ms"):
                row[f"flex_module_over_peer_{mode}"] = (
                    row[f"flex_module_{mode}_ms"] / row[f"flex_peer_with_gather_{mode}_ms"]
                )
        rows.add(row)
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument("--out", required=True, help="folder for bench_backward.json")
    parser.add_argument("--sizes", default="65536,1048576", help="comma-separated sequence lengths")
    parser.add_argument("--head-dims", default="64,128", help="comma-separated head dims (64, 128)")
    parser.add_argument(
        "--patterns", default="dense,local_window,dilated_sparse,random", help="comma-separated layouts"
    )
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting new rows after this")
    args = parser.parse_args(argv)
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
        head_dims = [int(x) for x in args.head_dims.split(",")]
    except ValueError:
        parser.error(f"--sizes and --head-dims take comma-separated ints, got {args.sizes!r} / {args.head_dims!r}")
    if any(d not in DILATIONS for d in head_dims):
        parser.error(f"--head-dims must be among {sorted(DILATIONS)}, got {head_dims}")
    patterns = args.patterns.split(",")
    unknown = [p for p in patterns if p not in pattern_configs()]
    if unknown:
        parser.error(f"--patterns: unknown {unknown}; use {sorted(pattern_configs())}")
    if any(n < 8192 or n % 8192 for n in sizes):
        parser.error(f"--sizes must be multiples of 8192 (whole segments for the peers), got {sizes}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (this benchmark times GPU kernels)")
    os.makedirs(args.out, exist_ok=True)
    rows = _Rows(args.out)
    import triton

    a, b = randn(8192, 8192), randn(8192, 8192)
    ceiling_ms = bench(lambda: a @ b)
    del a, b
    rows.data["info"] = dict(
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        matmul_bf16_tflops=2 * 8192**3 / (ceiling_ms * 1e-3) / 1e12,
        git_commit=os.environ.get("BSRDA_GIT_COMMIT"),
        command="python3 -m experiments.bench_backward " + " ".join(argv or []),
    )
    rows.save()
    deadline = time.monotonic() + args.budget_s
    for head_dim in head_dims:
        for seq_len in sizes:
            attempt(rows, f"D={head_dim} N={seq_len}", lambda: measure(rows, head_dim, seq_len, patterns, deadline))
    ceiling = rows.data["info"]["matmul_bf16_tflops"]
    print(f"\nmatmul ceiling {ceiling:.0f} TFLOP/s")
    print(
        f"{'D':>4} {'N':>8} {'pattern':<15} {'ours f+b':>9} {'peer':>9} {'x':>6} {'bwd TF':>7} {'%mm':>5} "
        f"{'peak/need':>9} {'flexmod/peer f, f+b':>19}"
    )
    for row in rows.data["rows"]:
        peer = row.get("sdpa_peer_fwd_bwd_ms") or row.get("flex_peer_fwd_bwd_ms") or float("nan")
        ours = row.get("ours_fwd_bwd_ms") or float("nan")
        tf = row.get("backward_tflops") or float("nan")
        print(
            f"{row['head_dim']:>4} {row['seq_len']:>8} {row['pattern']:<15} {ours:>9.3f} {peer:>9.3f} "
            f"{peer / ours:>6.2f} {tf:>7.0f} {100 * tf / ceiling:>5.0f} {row.get('peak_over_needed', 0):>9.3f} "
            f"{row.get('flex_module_over_peer_fwd', float('nan')):>9.2f} "
            f"{row.get('flex_module_over_peer_fwd_bwd', float('nan')):>9.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
