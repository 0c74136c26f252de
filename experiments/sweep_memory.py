"""Peak memory against sequence length: dense N x N, SDPA, the reference, our path with and without weights.

    python -m experiments.sweep_memory --work-size 256      # CPU, scaled-down seed configuration
    python -m experiments.sweep_memory --device cuda --seq-lens 8192 16384 32768 65536 131072 \\
        --segments 2048 4096 8192 --block-size 128 --dtype bfloat16 --max-dense-seq-len 32768

Writes experiments/results/memory_<device>.json (rows + environment), .csv and .png (log-log,
fitted slopes). How peaks are measured: see experiments/memory.py.
"""

from __future__ import annotations

import os

from reference import PATTERN_TYPES

from . import analysis, cli, memory, plots, result_files
from .env import describe, environment
from .methods import METHODS


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    cli.add_setting_arguments(
        parser,
        methods=METHODS,
        default_methods=METHODS,
        default_patterns=PATTERN_TYPES,
        default_seq_lens=[1024, 2048, 4096, 8192, 16384],
    )
    parser.add_argument("--max-dense-seq-len", type=cli.positive_int, default=4096, help="largest N for dense_nxn")
    parser.add_argument(
        "--max-reference-seq-len", type=cli.positive_int, default=2048, help="largest N for the reference"
    )
    parser.add_argument(
        "--memory-limit-gib", type=cli.positive_float, default=8.0, help="skip runs estimated above this"
    )
    parser.add_argument(
        "--fit-from",
        type=cli.non_negative_int,
        default=None,
        help="fit slopes on N >= this (default: the largest segment length)",
    )
    parser.add_argument(
        "--fit-last", type=cli.non_negative_int, default=3, help="fit each line over its largest N only (0: all)"
    )
    parser.add_argument("--out", default=None, help="output stem (default experiments/results/memory_<device>)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setting = cli.setting_from_args(parser, args)
    cli.check_output_stem(parser, args.out)
    plots.use_file_backend()

    env = environment(args.device)
    print(f"{describe(env)}\n{setting.describe()}")
    rows = memory.sweep(
        args.methods,
        sorted(args.seq_lens),
        args.patterns,
        setting,
        args.device,
        memory_limit_bytes=int(args.memory_limit_gib * 2**30),
        max_seq_len={"dense_nxn": args.max_dense_seq_len, "reference": args.max_reference_seq_len},
        progress=True,
    )
    fit_from = args.fit_from if args.fit_from is not None else max(args.segments)
    fitted = analysis.slopes(rows, min_seq_len=fit_from, last=args.fit_last or None)
    stem = args.out or os.path.join(result_files.RESULTS_DIR, f"memory_{args.device}")
    result_files.save_results(
        f"{stem}.json",
        rows,
        env,
        {"setting": setting.describe(), "slopes": fitted, "fit_from_seq_len": fit_from, "arguments": vars(args)},
    )
    result_files.save_csv(f"{stem}.csv", rows)
    title = f"{describe(env)}\n{setting.describe()}, work_size {setting.work_size}"
    ax = plots.plot_peaks(rows, min_fit_seq_len=fit_from, fit_last=args.fit_last or None, title=title)
    plots.save_figure(ax.figure, f"{stem}.png")
    for fit in fitted:
        label = fit["method"] if fit["pattern"] is None else f"{fit['method']} [{fit['pattern']}]"
        print(f"{label:<36} slope {fit['slope']:.2f} over N {fit['from_N']}..{fit['to_N']} ({fit['points']} points)")
    print(f"wrote {stem}.json, .csv, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
