"""A/B of the torch backend's row grouping (optimized.blocks.row_groups) on the CPU, in one process.

Three settings of ``STEP_OVERHEAD_BLOCKS``, interleaved round by round, best time each:
  one_group     a huge overhead: rows by count in plain chunks of the work size, never cut
  every_bucket  no overhead: a cut at every factor-2 change of the key-block count
  cost_model    the default: cuts where the modelled saving beats a step's overhead

    python -m experiments.ab_row_groups --out experiments/results/row_groups_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from experiments import cli
from experiments.env import environment
from optimized import BlockSparseRingDilatedAttention, SparsePatternConfig, blocks, torch_backend

SETTINGS = {"one_group": 1e18, "every_bucket": 0.0, "cost_model": blocks.STEP_OVERHEAD_BLOCKS}
PATTERNS = ("dense", "local_window", "dilated_sparse", "global_local", "random")
SEGMENTS, RATES = (256, 512, 1024), (1, 2, 4)


def best_times(module, q, k, v, rounds: int) -> dict[str, float]:
    best = {name: float("inf") for name in SETTINGS}
    with torch.no_grad():
        for _ in range(rounds):
            for name, overhead in SETTINGS.items():
                blocks.STEP_OVERHEAD_BLOCKS = overhead
                torch_backend._grouping.cache_clear()
                module(q, k, v)  # groups built outside the timed call, as in steady use
                start = time.perf_counter()
                module(q, k, v)
                best[name] = min(best[name], time.perf_counter() - start)
    blocks.STEP_OVERHEAD_BLOCKS = SETTINGS["cost_model"]
    torch_backend._grouping.cache_clear()
    return best


def sizes(text: str) -> list[tuple[int, int, int]]:
    """ "N,D,rounds;N,D,rounds" -> [(N, D, rounds), ...], each a positive integer."""
    parsed = []
    for part in text.split(";"):
        fields = part.split(",")
        if len(fields) != 3:
            raise argparse.ArgumentTypeError(f"each size is N,D,rounds (three integers), got {part!r}")
        parsed.append(tuple(cli.positive_int(field) for field in fields))
    return parsed


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument(
        "--sizes",
        type=sizes,
        default="1024,32,15;8192,64,5",
        help="N,D,rounds;... (B=1, H=4, float32; default %(default)s)",
    )
    parser.add_argument("--threads", type=cli.positive_int, default=1)
    parser.add_argument("--out", help="JSON file for the rows and the environment")
    return parser


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_output_stem(parser, args.out)
    torch.set_num_threads(args.threads)
    rows = []
    for seq_len, head_dim, rounds in args.sizes:
        generator = torch.Generator().manual_seed(seq_len)
        q, k, v = (torch.randn(1, seq_len, 4, head_dim, generator=generator) for _ in range(3))
        for name in PATTERNS:
            config = SparsePatternConfig(
                pattern_type=name, sparsity_ratio=0.1, block_size=16, local_window_size=64, global_tokens=16
            )
            module = BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=config, backend="torch")
            best = best_times(module, q, k, v, rounds)
            row = dict(
                seq_len=seq_len,
                head_dim=head_dim,
                pattern=name,
                rounds=rounds,
                **{f"{setting}_ms": best[setting] * 1e3 for setting in SETTINGS},
                cost_model_over_one_group=best["cost_model"] / best["one_group"],
                every_bucket_over_one_group=best["every_bucket"] / best["one_group"],
            )
            rows.append(row)
            print(
                f"N={seq_len:>5} {name:>14}: "
                + "  ".join(f"{s} {best[s] * 1e3:7.2f} ms" for s in SETTINGS)
                + f"  cost_model/one_group {row['cost_model_over_one_group']:.2f}"
                + f"  every_bucket/one_group {row['every_bucket_over_one_group']:.2f}",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"environment": environment("cpu"), "threads": args.threads, "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
