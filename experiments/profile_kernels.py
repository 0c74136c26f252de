"""Launch our triton kernel variants and compiled FlexAttention on one layout, for Nsight Compute.

    ncu --clock-control none --kernel-name regex:'_forward_kernel|triton_tem' \\
        --section SpeedOfLight --section WarpStateStats ... \\
        python3 -m experiments.profile_kernels --n 65536 --d 128 --patterns dense,dilated_sparse

Each method runs twice (the first call compiles and warms up); the launch order is printed, so
the second launch of each method in ncu's report is the one to read. Inputs and layouts are
those of experiments/bench_gpu.py (bf16, B = 1, the seed's segments and rates, block 128).
"""

from __future__ import annotations

import argparse

import torch

from experiments import cli
from experiments.bench_gpu import (
    DILATIONS,
    compacted_flex_inputs,
    compiled_flex,
    parse_choice,
    pattern_configs,
    randn,
    run_choice,
)
from optimized.plan import CallPlan
from reference.config import PATTERN_TYPES, DilationConfig
from reference.semantics import AttentionGeometry


def kernel_choice(label: str) -> str:
    """A label as experiments.bench_gpu.ab_label writes it ("v3+by_lattice"), checked by parse_choice."""
    from optimized import triton_backend

    try:
        choice = parse_choice(label)
    except ValueError:  # a part that is no order, index mode or integer tile
        choice = {"variant": None}
    tile_ok = "tile" not in choice or len(choice["tile"]) == len(triton_backend.TileConfig.__dataclass_fields__)
    if choice["variant"] not in triton_backend.VARIANTS or not tile_ok:
        raise argparse.ArgumentTypeError(
            f"{label!r} is not a kernel choice: VARIANT[+ORDER][+INDEX][+TILE] with VARIANT one of "
            f"{', '.join(triton_backend.VARIANTS)}, ORDER one of {', '.join(triton_backend.ITEM_ORDERS)}, "
            f"INDEX one of {', '.join(triton_backend.INDEX_MODES)}, TILE like 128x64x8x3"
        )
    return label


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument("--n", type=cli.positive_int, default=65536, help="tokens")
    parser.add_argument("--d", type=int, default=128, choices=sorted(DILATIONS), help="head dim")
    parser.add_argument("--patterns", type=cli.comma_list(choices=PATTERN_TYPES), default="dense,dilated_sparse")
    parser.add_argument(
        "--choices",
        type=cli.comma_list(item=kernel_choice),
        default="auto,v2,v3,v3tma",
        help="kernel choices as experiments.bench_gpu.ab_label writes them",
    )
    parser.add_argument("--no-flex", action="store_true")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.require_cuda(parser, "experiments.profile_kernels")
    spec = DILATIONS[args.d]
    heads = spec["heads"]
    q, k, v = (randn(1, args.n, heads, args.d) for _ in range(3))
    geometry = AttentionGeometry(DilationConfig(spec["segments"], spec["rates"], "split"), args.n, heads)
    launch = 0
    for name in args.patterns:
        config = pattern_configs()[name]
        plan = CallPlan.whole(geometry, config, False, args.d**-0.5)
        methods = {}
        for label in args.choices:
            methods[f"triton_{label}"] = lambda cand=parse_choice(label): run_choice(q, k, v, plan, cand)
        if not args.no_flex:
            calls = compacted_flex_inputs(q, k, v, geometry, config)
            flex = compiled_flex()
            methods["flex_compacted"] = lambda calls=calls: [
                flex(Q, K, V, block_mask=m, scale=args.d**-0.5) for Q, K, V, m in calls
            ]
        for method, fn in methods.items():
            for attempt in range(2):
                with torch.no_grad():
                    fn()
                torch.cuda.synchronize()
                print(f"launch group {launch}: {name} {method} call {attempt}", flush=True)
                launch += 1


if __name__ == "__main__":
    main()
