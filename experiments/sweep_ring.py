"""The ring schedule across configurations: which chunk pairs compute, what travels, bytes per step.

    python -m experiments.sweep_ring                                   # defaults below, CPU only
    python -m experiments.sweep_ring --seq-len 65536 --parts 2 4 8 16 32 --patterns dilated_sparse

Everything comes from ``reference.ring_schedule`` (experiments/ring.py turns schedules into rows);
nothing is timed, so the numbers are exact and any machine gives the same ones. "Naive" is a ring
that passes every key/value chunk around all P - 1 steps. Writes experiments/results/ring_schedule.json,
.csv and .png.
"""

from __future__ import annotations

import os

from reference.config import PATTERN_TYPES

from . import cli, plots, result_files, ring
from .env import environment

CAUSAL = {"both": (False, True), "yes": (True,), "no": (False,)}


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument("--dilations", nargs="+", default=list(ring.DILATIONS), choices=list(ring.DILATIONS))
    parser.add_argument("--seq-len", type=cli.positive_int, default=32768)
    parser.add_argument(
        "--parts",
        nargs="+",
        type=cli.positive_int,
        default=[2, 4, 8, 16],
        help="ring sizes P (equal chunks; each P <= --seq-len)",
    )
    parser.add_argument(
        "--patterns", nargs="+", default=["dilated_sparse", "local_window"], choices=list(PATTERN_TYPES)
    )
    parser.add_argument("--causal", choices=list(CAUSAL), default="both")
    parser.add_argument("--heads", type=cli.positive_int, default=12)
    parser.add_argument("--kv-heads", type=cli.positive_int, default=12)
    parser.add_argument("--head-dim", type=cli.positive_int, default=64)
    parser.add_argument("--element-size", type=int, default=2, choices=[1, 2, 4, 8], help="bytes per element (2: bf16)")
    parser.add_argument("--block-size", type=cli.positive_int, default=128)
    parser.add_argument("--out", default=None, help="output stem (default experiments/results/ring_schedule)")
    return parser


def validate(parser, args) -> None:
    too_many = [p for p in args.parts if p > args.seq_len]
    if too_many:
        parser.error(f"--parts {' '.join(map(str, too_many))}: more chunks than tokens (--seq-len {args.seq_len})")
    if args.heads % args.kv_heads:
        parser.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads} (grouped-query attention)")
    for dilation in args.dilations:
        try:
            ring.geometry_of(dilation, args.seq_len, args.heads)
        except (TypeError, ValueError) as error:
            parser.error(f"--heads {args.heads} with --dilations {dilation}: {error}")
    cli.check_output_stem(parser, args.out)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    plots.use_file_backend()

    rows = ring.sweep(
        args.dilations,
        args.seq_len,
        args.parts,
        args.patterns,
        CAUSAL[args.causal],
        args.heads,
        args.kv_heads,
        args.head_dim,
        args.element_size,
        args.block_size,
        progress=True,
    )
    stem = args.out or os.path.join(result_files.RESULTS_DIR, "ring_schedule")
    result_files.save_results(f"{stem}.json", rows, environment("cpu"), {"arguments": vars(args)})
    result_files.save_csv(f"{stem}.csv", rows)
    ax = plots.plot_ring_sweep(rows)
    ax.set_title(
        f"N={args.seq_len}, H={args.heads}, H_kv={args.kv_heads}, D={args.head_dim}, block {args.block_size}",
        fontsize=9,
    )
    plots.save_figure(ax.figure, f"{stem}.png")
    for row in rows:
        print(
            f"{row['dilation']:<7}{row['pattern']:<16}{'causal' if row['is_causal'] else '':<7} P={row['parts']:<3}"
            f" active {row['active_pairs']:>4}/{row['all_pairs']:<4} last step {row['last_step']:>3}"
            f"  sent {row['total_bytes'] / 2**20:9.1f} MiB ({row['sent_over_naive']:.2f} of naive)"
        )
    print(f"wrote {stem}.json, .csv, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
