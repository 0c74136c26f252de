"""Time, tokens/s and useful TFLOP/s against sequence length, per method and pattern type.

    python -m experiments.sweep_throughput                  # CPU, small sizes
    python -m experiments.sweep_throughput --device cuda --dtype bfloat16 --seq-lens 8192 32768 131072 \
        --segments 2048 4096 8192 --block-size 128 --methods sdpa optimized

Useful FLOPs are 4 x (allowed query-key pairs) x D x B (full attention for SDPA and dense_nxn), so
the sparse path and the dense anchors are on one scale. Writes
experiments/results/throughput_<device>.json, .csv and .png.
"""

from __future__ import annotations

import argparse
import os

from reference import PATTERN_TYPES

from . import memory
from .env import describe, environment

DEFAULT_METHODS = ["sdpa", "dense_nxn", "optimized"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(memory.METHODS))
    parser.add_argument("--patterns", nargs="+", default=["dense", "local_window", "dilated_sparse", "random"],
                        choices=list(PATTERN_TYPES))
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--segments", nargs="+", type=int, default=[256, 512, 1024])
    parser.add_argument("--rates", nargs="+", type=int, default=list(memory.SEED_RATES))
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-dense-seq-len", type=int, default=4096)
    parser.add_argument("--max-reference-seq-len", type=int, default=1024)
    parser.add_argument("--out", default=None, help="output stem (default experiments/results/throughput_<device>)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setting = memory.MemorySetting(
        batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
        segment_lengths=tuple(args.segments), dilation_rates=tuple(args.rates), block_size=args.block_size,
        backend=args.backend,
    )
    env = environment(args.device)
    print(f"{describe(env)}\n{setting.describe()}")
    caps = {"dense_nxn": args.max_dense_seq_len, "reference": args.max_reference_seq_len}
    jobs = [
        (method, pattern, n)
        for method in args.methods
        for n in sorted(args.seq_lens)
        if n <= caps.get(method, n)
        for pattern in ((None,) if method in ("dense_nxn", "sdpa") else args.patterns)
    ]
    from tqdm.auto import tqdm

    rows = []
    progress = tqdm(jobs, desc="throughput", unit="run")
    for method, pattern, n in progress:
        progress.set_postfix_str(f"{method} {pattern or ''} N={n}")
        rows.append(memory.throughput(method, n, setting, pattern, args.device, repeats=args.repeats))
    stem = args.out or os.path.join(memory.RESULTS_DIR, f"throughput_{args.device}")
    memory.save_results(f"{stem}.json", rows, env, {"setting": setting.describe()})
    memory.save_csv(f"{stem}.csv", rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = memory.plot_throughput(rows, title=f"{describe(env)}\n{setting.describe()}")
    ax.figure.tight_layout()
    ax.figure.savefig(f"{stem}.png", dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    for row in rows:
        label = row["method"] if row["pattern"] is None else f"{row['method']} [{row['pattern']}]"
        print(f"{label:<32} N={row['seq_len']:>7} {row['median_s'] * 1e3:9.2f} ms "
              f"{row['tokens_per_s']:12.0f} tok/s {row['useful_tflops']:8.4f} TFLOP/s")
    print(f"wrote {stem}.json, .csv, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
