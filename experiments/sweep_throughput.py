"""Time, tokens/s and useful TFLOP/s against sequence length, per method and pattern type.

    python -m experiments.sweep_throughput                  # CPU, small sizes
    python -m experiments.sweep_throughput --device cuda --dtype bfloat16 --seq-lens 8192 32768 131072 \\
        --segments 2048 4096 8192 --block-size 128 --methods sdpa optimized

Useful FLOPs are 4 x (allowed query-key pairs) x D x B (full attention for SDPA and dense_nxn), so
the sparse path and the dense anchors are on one scale. Times: torch.utils.benchmark.Timer
(experiments/timing.py). Writes experiments/results/throughput_<device>.json, .csv and .png.
"""

from __future__ import annotations

import os

from . import cli, plots, result_files, timing
from .env import describe, environment
from .methods import FULL_ATTENTION_METHODS, METHODS

DEFAULT_METHODS = ["sdpa", "dense_nxn", "optimized"]


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    cli.add_setting_arguments(
        parser,
        methods=METHODS,
        default_methods=DEFAULT_METHODS,
        default_patterns=["dense", "local_window", "dilated_sparse", "random"],
        default_seq_lens=[1024, 2048, 4096, 8192],
    )
    parser.add_argument(
        "--min-run-time",
        type=cli.positive_float,
        default=0.2,
        help="seconds of timed calls per measurement (torch.utils.benchmark blocked_autorange)",
    )
    parser.add_argument("--max-dense-seq-len", type=cli.positive_int, default=4096)
    parser.add_argument("--max-reference-seq-len", type=cli.positive_int, default=1024)
    parser.add_argument("--out", default=None, help="output stem (default experiments/results/throughput_<device>)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setting = cli.setting_from_args(parser, args)
    cli.check_output_stem(parser, args.out)
    plots.use_file_backend()

    env = environment(args.device)
    print(f"{describe(env)}\n{setting.describe()}")
    caps = {"dense_nxn": args.max_dense_seq_len, "reference": args.max_reference_seq_len}
    jobs = [
        (method, pattern, n)
        for method in args.methods
        for n in sorted(args.seq_lens)
        if n <= caps.get(method, n)
        for pattern in ((None,) if method in FULL_ATTENTION_METHODS else args.patterns)
    ]
    from tqdm.auto import tqdm

    rows = []
    progress = tqdm(jobs, desc="throughput", unit="run")
    for method, pattern, n in progress:
        progress.set_postfix_str(f"{method} {pattern or ''} N={n}")
        rows.append(timing.throughput(method, n, setting, pattern, args.device, min_run_time=args.min_run_time))
    stem = args.out or os.path.join(result_files.RESULTS_DIR, f"throughput_{args.device}")
    result_files.save_results(f"{stem}.json", rows, env, {"setting": setting.describe(), "arguments": vars(args)})
    result_files.save_csv(f"{stem}.csv", rows)
    ax = plots.plot_throughput(rows, title=f"{describe(env)}\n{setting.describe()}")
    plots.save_figure(ax.figure, f"{stem}.png")
    for row in rows:
        label = row["method"] if row["pattern"] is None else f"{row['method']} [{row['pattern']}]"
        print(
            f"{label:<32} N={row['seq_len']:>7} {row['median_s'] * 1e3:9.2f} ms "
            f"{row['tokens_per_s']:12.0f} tok/s {row['useful_tflops']:8.4f} TFLOP/s"
        )
    print(f"wrote {stem}.json, .csv, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
