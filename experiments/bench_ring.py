"""Cost of the in-process ring on one GPU: forward time vs the number of chunks P.

    PYTHONPATH=. python3 -m experiments.bench_ring [--seq-len 65536] [--parts 1,2,4,8] [--out DIR]

For each dilation configuration, layout and causal flag, times (median of
``triton.testing.do_bench``, bf16, B = 1, H = 12, D = 64) the unsplit forward (CUDA graphs on and
off) and the in-process ring with P equal chunks (P = 1 runs the ring code path with one chunk).
The ring's overhead is its time over the unsplit eager time; with the triton backend the ring is
also timed with ``TritonOptions(ring_launch="pair")`` (one launch per chunk pair, each merged into
its query chunk's accumulator, where by default all pairs of a ring step share one launch) and
``TritonOptions(merge_on_write=False)`` (a float32 partial per chunk pair and a separate merge
pass, as before merge on write). ``--training`` also times forward + backward (a loss over out,
its gradient into q, k and v), unsplit and ring. Next to each time: the active chunk
pairs the schedule computes and the bytes a distributed ring of P ranks would send (forward, all
ranks together). "local" keeps every segment <= 8192 tokens, so with chunks >= 8192 no pair crosses
a chunk and nothing would be sent; "global" adds a whole-sequence branch, so every chunk travels.

Writes bench_ring.json under --out (default experiments/results/), after every measurement so a
timeout keeps what was measured, with the GPU name and the torch and triton versions.
"""

from __future__ import annotations

import json
import os
import traceback

import torch

from experiments import cli
from experiments.env import environment
from experiments.ring import equal_chunks
from experiments.timing import time_call
from optimized import BACKENDS, BlockSparseRingDilatedAttention
from optimized.dispatch import TritonOptions
from reference.config import DilationConfig, SparsePatternConfig
from reference.ring_schedule import ring_schedule
from reference.semantics import AttentionGeometry

DILATIONS = {
    "local": dict(segments=(2048, 4096, 8192), rates=(1, 2, 4)),
    "global": dict(segments=(2048, 8192, 65536), rates=(1, 4, 16)),
    # Issue 14's global branch.
    "global_8k_64k": dict(segments=(8192, 65536), rates=(1, 8)),
}


# The ring with the triton backend, also timed the ways before (a key per twin in each ring entry).
TRITON_TWINS = {
    "pair_launch_ms": TritonOptions(ring_launch="pair"),
    "separate_merge_ms": TritonOptions(merge_on_write=False),
}


def layouts(block: int) -> dict[str, SparsePatternConfig]:
    return {
        "dense": SparsePatternConfig(pattern_type="dense", block_size=block),
        "dilated_sparse": SparsePatternConfig(pattern_type="dilated_sparse", sparsity_ratio=0.25, block_size=block),
        "local_window": SparsePatternConfig(pattern_type="local_window", local_window_size=1024, block_size=block),
    }


def time_ms(fn, warmup: int, rep: int) -> float:
    """Median forward time in ms: triton's do_bench on CUDA (``warmup``, ``rep`` in ms), else
    torch.utils.benchmark over ``rep`` ms of calls (a smoke run on the CPU)."""
    if torch.cuda.is_available():
        import triton

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    return time_call(fn, min_run_time=rep / 1e3)["median_s"] * 1e3


LAYOUTS = ("dense", "dilated_sparse", "local_window")


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument("--seq-len", type=cli.positive_int, default=65536)
    parser.add_argument("--heads", type=cli.positive_int, default=12)
    parser.add_argument("--kv-heads", type=cli.positive_int, default=12)
    parser.add_argument("--head-dim", type=cli.positive_int, default=64)
    parser.add_argument("--block", type=cli.positive_int, default=128)
    parser.add_argument(
        "--parts", type=cli.comma_list(item=cli.positive_int), default="1,2,4,8", help="ring sizes P, comma-separated"
    )
    parser.add_argument("--dilations", type=cli.comma_list(choices=tuple(DILATIONS)), default="local,global")
    parser.add_argument("--layouts", type=cli.comma_list(choices=LAYOUTS), default=",".join(LAYOUTS))
    parser.add_argument(
        "--causal",
        type=cli.comma_list(item=int, choices=(0, 1)),
        default="0,1",
        help="0 (non-causal), 1 (causal) or both",
    )
    parser.add_argument("--backend", default="auto", choices=list(BACKENDS))
    parser.add_argument("--training", action="store_true", help="also time forward + backward")
    parser.add_argument("--warmup", type=cli.positive_int, default=10, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=cli.positive_int, default=50, help="do_bench repetitions, ms")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
        help="folder for bench_ring.json",
    )
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads} (grouped-query attention)")
    too_many = [p for p in args.parts if p > args.seq_len]
    if too_many:
        parser.error(f"--parts {','.join(map(str, too_many))}: more chunks than tokens (--seq-len {args.seq_len})")
    cli.check_output_stem(parser, os.path.join(args.out, "bench_ring.json"), "--out")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    N, H, H_kv, D = args.seq_len, args.heads, args.kv_heads, args.head_dim
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, N, H, D, device=device, dtype=dtype, generator=generator)
    k = torch.randn(1, N, H_kv, D, device=device, dtype=dtype, generator=generator)
    v = torch.randn(1, N, H_kv, D, device=device, dtype=dtype, generator=generator)
    bytes_per_token = 2 * H_kv * D * q.element_size()  # k and v of one token, B = 1, no padding mask

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_ring.json")
    record = {
        "environment": environment(device),
        "settings": dict(
            seq_len=N,
            heads=H,
            kv_heads=H_kv,
            head_dim=D,
            block=args.block,
            dtype=str(dtype),
            backend=args.backend,
            warmup=args.warmup,
            rep=args.rep,
            training=args.training,
        ),
        "results": [],
    }
    parts = args.parts
    all_layouts = layouts(args.block)
    for dilation_name in args.dilations:
        dilation = DILATIONS[dilation_name]
        segments = tuple(min(s, N) for s in dilation["segments"])
        for layout_name in args.layouts:
            config = all_layouts[layout_name]
            for is_causal in map(bool, args.causal):
                row = dict(
                    dilation=dilation_name,
                    segments=segments,
                    rates=dilation["rates"],
                    layout=layout_name,
                    is_causal=is_causal,
                    ring={},
                )
                try:
                    make = lambda **kw: BlockSparseRingDilatedAttention(  # noqa: E731
                        segments, dilation["rates"], config, backend=args.backend, **kw
                    )
                    with torch.no_grad():
                        graphed, eager = make(use_cuda_graphs=True), make(use_cuda_graphs=False)
                        row["unsplit_graphs_ms"] = time_ms(
                            lambda: graphed(q, k, v, is_causal=is_causal), args.warmup, args.rep
                        )
                        row["unsplit_eager_ms"] = time_ms(
                            lambda: eager(q, k, v, is_causal=is_causal), args.warmup, args.rep
                        )
                        row["backend"] = eager.last_backend
                        geometry = AttentionGeometry(DilationConfig(segments, dilation["rates"]), N, H)
                        for P in parts:
                            chunks = equal_chunks(N, P)
                            schedule = ring_schedule(geometry, config, is_causal, chunks)
                            ring = make(ring_chunk_lengths=chunks, use_cuda_graphs=False)
                            ms = time_ms(lambda: ring(q, k, v, is_causal=is_causal), args.warmup, args.rep)
                            row["ring"][P] = entry = dict(
                                ms=ms,
                                overhead=ms / row["unsplit_eager_ms"] - 1.0,
                                active_pairs=sum(map(sum, schedule.active)),
                                last_step=schedule.last_step,
                                distributed_bytes_per_step=list(schedule.step_bytes(bytes_per_token)),
                            )
                            if eager.last_backend == "triton":
                                for name, options in TRITON_TWINS.items():
                                    twin = make(
                                        ring_chunk_lengths=chunks, use_cuda_graphs=False, backend_options=options
                                    )
                                    entry[name] = time_ms(
                                        lambda: twin(q, k, v, is_causal=is_causal), args.warmup, args.rep
                                    )
                            twins = " ".join(f"{name} {entry[name]:.3f}" for name in TRITON_TWINS if name in entry)
                            print(
                                f"{dilation_name:6s} {layout_name:14s} causal={int(is_causal)} P={P}: {ms:8.3f} ms "
                                f"({twins}) (unsplit eager {row['unsplit_eager_ms']:.3f} ms, graphs "
                                f"{row['unsplit_graphs_ms']:.3f} ms), active pairs "
                                f"{entry['active_pairs']}, last step {schedule.last_step}",
                                flush=True,
                            )
                    if args.training:
                        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
                        step = lambda module: module(*leaves, is_causal=is_causal).float().square().mean().backward()  # noqa: E731
                        row["unsplit_training_ms"] = time_ms(lambda: step(eager), args.warmup, args.rep)
                        for P in parts:
                            ring = make(ring_chunk_lengths=equal_chunks(N, P), use_cuda_graphs=False)
                            row["ring"][P]["training_ms"] = time_ms(lambda: step(ring), args.warmup, args.rep)
                            print(
                                f"{dilation_name:6s} {layout_name:14s} causal={int(is_causal)} P={P}: forward + "
                                f"backward {row['ring'][P]['training_ms']:8.3f} ms (unsplit "
                                f"{row['unsplit_training_ms']:.3f} ms)",
                                flush=True,
                            )
                        del leaves
                except Exception as error:  # keep going: one failing configuration must not lose the others
                    row["error"] = f"{type(error).__name__}: {error}"
                    row["traceback"] = traceback.format_exc()
                    print(f"{dilation_name} {layout_name} causal={is_causal}: {row['error']}", flush=True)
                record["results"].append(row)
                with open(path, "w") as handle:
                    json.dump(record, handle, indent=1)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
