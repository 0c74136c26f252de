"""Tile sweep of the Triton backward kernels on the GPU (experiments/NOTES_gpu.md), one process.

    python3 -m experiments.tune_backward --out DIR

For each setting (head dim, N, layout; bf16, B = 1, block 128, the seed's dilation) it times the whole
backward (triton_backward.partial_backward, do_bench median) with the default tiles, then over dq tiles
with the default dk/dv tile, then over dk/dv tiles with the best dq tile, splits the best tile's time
between the two kernels (torch.profiler) and writes tune_backward.json.
"""

from __future__ import annotations

import json
import os

import torch

from experiments import cli
from experiments.bench_gpu import DILATIONS, bench, pattern_configs, randn, tflops
from optimized import triton_backend, triton_backward
from optimized.plan import CallPlan
from optimized.triton_backward import BackwardTile, KernelTile, default_backward_tile
from reference.config import DilationConfig
from reference.semantics import AttentionGeometry, active_pair_count

SETTINGS = ((64, 65536, "dense"), (128, 65536, "dense"), (64, 65536, "local_window"))
# (rows, step, warps, stages): rows = the points a program owns (queries for dq, keys for dk/dv).
DQ_CANDIDATES = ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2))
KV_CANDIDATES = (
    (64, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 128, 8, 3),
    (128, 64, 8, 3),
    (128, 64, 8, 2),
    (128, 32, 4, 3),
    (64, 32, 4, 3),
)


def kernel_split(run) -> dict:
    """CUDA milliseconds per backward kernel of one call (torch.profiler), e.g. {"_dq_kernel": 1.2, ...}."""
    run()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run()
        torch.cuda.synchronize()
    split = {}
    for event in profile.key_averages():
        if event.key in ("_dq_kernel", "_dkdv_kernel"):
            split[event.key] = getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)) / 1e3
    return split


def main(argv=None) -> int:
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument("--out", required=True, help="folder for tune_backward.json")
    parser.add_argument("--only", help="comma-separated settings to run, as D/pattern (e.g. 64/dense,128/dense)")
    args = parser.parse_args(argv)
    names = [f"{head_dim}/{pattern}" for head_dim, _, pattern in SETTINGS]
    chosen = names if args.only is None else args.only.split(",")
    if any(name not in names for name in chosen):
        parser.error(f"--only takes settings among {names}, got {args.only!r}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (this sweep times GPU kernels)")
    os.makedirs(args.out, exist_ok=True)
    rows = []
    settings = [s for s, name in zip(SETTINGS, names) if name in chosen]
    for head_dim, seq_len, pattern in settings:
        setting = DILATIONS[head_dim]
        heads = setting["heads"]
        geometry = AttentionGeometry(DilationConfig(setting["segments"], setting["rates"], "split"), seq_len, heads)
        config = pattern_configs()[pattern]
        plan = CallPlan.whole(geometry, config, False, head_dim**-0.5)
        pairs = active_pair_count(geometry, config)
        q, k, v, dout = (randn(1, seq_len, heads, head_dim) for _ in range(4))
        out, lse = triton_backend.partial_forward(q, k, v, None, plan)

        def time_tile(tile):
            try:
                return bench(
                    lambda: triton_backward.partial_backward(q, k, v, None, plan, out, lse, dout, None, tile=tile)
                )
            except Exception as error:  # noqa: BLE001 - a tile that does not compile or fit is skipped
                print("skip", tile, type(error).__name__, str(error)[:120], flush=True)
                return float("inf")

        default = default_backward_tile(128, max(16, head_dim), torch.bfloat16)
        results = [(time_tile(default), default)]
        for candidate in DQ_CANDIDATES:
            tile = BackwardTile(KernelTile(*candidate), default.kv)
            results.append((time_tile(tile), tile))
        best_dq = min(results, key=lambda r: r[0])[1].dq
        for candidate in KV_CANDIDATES:
            tile = BackwardTile(best_dq, KernelTile(*candidate))
            results.append((time_tile(tile), tile))
        best_tile = min(results, key=lambda r: r[0])[1]
        split = kernel_split(
            lambda: triton_backward.partial_backward(q, k, v, None, plan, out, lse, dout, None, tile=best_tile)
        )
        for ms, tile in results:
            row = dict(
                head_dim=head_dim,
                seq_len=seq_len,
                pattern=pattern,
                dq=tile.dq.__dict__,
                kv=tile.kv.__dict__,
                ms=ms,
                backward_tflops=2.5 * tflops(pairs, head_dim, ms) if ms < float("inf") else None,
                default=tile == default,
                kernel_ms=split if tile == best_tile else None,
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "tune_backward.json"), "w") as handle:
            json.dump(
                {
                    "gpu": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "triton": __import__("triton").__version__,
                    "rows": rows,
                },
                handle,
                indent=1,
            )
        del q, k, v, dout, out, lse
        torch.cuda.empty_cache()
    print(
        f"\n{'D':>4} {'pattern':<13} {'best dq (rows,step,warps,stages)':<34} {'best kv':<22} {'ms':>8} {'TF':>6} "
        f"{'default ms':>10} {'dq / dkdv ms':>14}"
    )
    for head_dim, seq_len, pattern in settings:
        mine = [r for r in rows if (r["head_dim"], r["pattern"]) == (head_dim, pattern)]
        best = min(mine, key=lambda r: r["ms"])
        default = next(r for r in mine if r["default"])
        split = best["kernel_ms"] or {}
        fmt = lambda t: f"({t['rows']},{t['step']},{t['num_warps']},{t['num_stages']})"  # noqa: E731
        print(
            f"{head_dim:>4} {pattern:<13} {fmt(best['dq']):<34} {fmt(best['kv']):<22} {best['ms']:>8.3f} "
            f"{best['backward_tflops']:>6.0f} {default['ms']:>10.3f} "
            f"{split.get('_dq_kernel', 0):>6.3f}/{split.get('_dkdv_kernel', 0):.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
