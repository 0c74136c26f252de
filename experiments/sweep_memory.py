"""Peak memory against sequence length: dense N x N, SDPA, the reference, our path with and without weights.

    python -m experiments.sweep_memory --work-size 256      # CPU, scaled-down seed configuration
    python -m experiments.sweep_memory --device cuda --seq-lens 8192 16384 32768 65536 131072 \
        --segments 2048 4096 8192 --block-size 128 --dtype bfloat16 --max-dense-seq-len 32768

Writes experiments/results/memory_<device>.json (rows + environment), .csv and .png (log-log,
fitted slopes). How peaks are measured: see experiments/memory.py.
"""

from __future__ import annotations

import argparse
import os

from reference import PATTERN_TYPES

from . import memory
from .env import describe, environment


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--methods", nargs="+", default=list(memory.METHODS), choices=list(memory.METHODS))
    parser.add_argument("--patterns", nargs="+", default=list(PATTERN_TYPES), choices=list(PATTERN_TYPES))
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--segments", nargs="+", type=int, default=[256, 512, 1024],
                        help="segment lengths (default: the seed's [2048, 4096, 8192] / 8)")
    parser.add_argument("--rates", nargs="+", type=int, default=list(memory.SEED_RATES))
    parser.add_argument("--block-size", type=int, default=16, help="default: the seed's 128 / 8")
    parser.add_argument("--backend", default="auto", help="optimized backend: auto, torch, flex, triton")
    parser.add_argument("--head-mode", default="split", choices=["split", "all"],
                        help="split: each head one branch; all: every head every branch (merged)")
    parser.add_argument("--work-size", type=int, default=4096,
                        help="blocks the torch backend and the weights process at once (the module's default 4096)")
    parser.add_argument("--max-dense-seq-len", type=int, default=4096, help="largest N for dense_nxn")
    parser.add_argument("--max-reference-seq-len", type=int, default=2048, help="largest N for the reference")
    parser.add_argument("--memory-limit-gib", type=float, default=8.0, help="skip runs estimated above this")
    parser.add_argument("--fit-from", type=int, default=None,
                        help="fit slopes on N >= this (default: the largest segment length)")
    parser.add_argument("--fit-last", type=int, default=3, help="fit each line over its largest N only (0: all)")
    parser.add_argument("--out", default=None, help="output stem (default experiments/results/memory_<device>)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    setting = memory.MemorySetting(
        batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
        segment_lengths=tuple(args.segments), dilation_rates=tuple(args.rates), block_size=args.block_size,
        backend=args.backend, work_size=args.work_size, head_mode=args.head_mode,
    )
    env = environment(args.device)
    print(f"{describe(env)}\n{setting.describe()}")
    rows = memory.sweep(
        args.methods, sorted(args.seq_lens), args.patterns, setting, args.device,
        memory_limit_bytes=int(args.memory_limit_gib * 2**30),
        max_seq_len={"dense_nxn": args.max_dense_seq_len, "reference": args.max_reference_seq_len},
        progress=True,
    )
    fit_from = args.fit_from if args.fit_from is not None else max(args.segments)
    fitted = memory.slopes(rows, min_seq_len=fit_from, last=args.fit_last or None)
    stem = args.out or os.path.join(memory.RESULTS_DIR, f"memory_{args.device}")
    memory.save_results(f"{stem}.json", rows, env, {"setting": setting.describe(), "slopes": fitted,
                                                     "fit_from_seq_len": fit_from, "arguments": vars(args)})
    memory.save_csv(f"{stem}.csv", rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title = f"{describe(env)}\n{setting.describe()}, work_size {setting.work_size}"
    ax = memory.plot_peaks(rows, min_fit_seq_len=fit_from, fit_last=args.fit_last or None, title=title)
    ax.figure.tight_layout()
    ax.figure.savefig(f"{stem}.png", dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    for fit in fitted:
        label = fit["method"] if fit["pattern"] is None else f"{fit['method']} [{fit['pattern']}]"
        print(f"{label:<36} slope {fit['slope']:.2f} over N {fit['from_N']}..{fit['to_N']} ({fit['points']} points)")
    print(f"wrote {stem}.json, .csv, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
