"""`make demo`: the seed's configuration under every pattern type, then a verification run.

    python -m experiments.demo                     # CUDA when there is one, else the CPU
    python -m experiments.demo --device cpu --seq-len 4096

Prints, for segments [2048, 4096, 8192], rates [1, 2, 4], 12 heads and block 128, each pattern's
allowed pairs, block density and the bytes of its sparse weights against one dense B x H x N x N
tensor; checks the reference against masked softmax; then runs the optimized path against the
float64 reference (sampled query chunks) and prints each pattern's error against its budget
(docs/numerics.md), pass or fail, time and peak memory. Exit status 1 when any pattern fails.
"""

from __future__ import annotations

import time

import torch

from reference import (
    PATTERN_TYPES,
    AttentionGeometry,
    BlockSparseRingDilatedAttention,
    DilationConfig,
    SparsePatternConfig,
    active_block_count,
    active_pair_count,
)

from . import cli
from .analytic import dense_weights_bytes, sparse_weights_bytes
from .settings import SEED_BLOCK, SEED_RATES, SEED_SEGMENTS, MemorySetting, pattern_config
from .tables import format_table

SEED_HEADS = 12
SEED_SETTING = MemorySetting(heads=SEED_HEADS)  # B = 1, the seed's segments, rates and block 128
VERIFY_CHUNK = 128  # query rows per sampled chunk of the float64 reference


def seed_pattern(pattern_type: str) -> SparsePatternConfig:
    """The seed document's settings for each pattern type (custom: a banded layout)."""
    return pattern_config(pattern_type, SEED_SETTING)


def layout_table(seq_len: int = 16384) -> list[dict]:
    """Per pattern: allowed pairs, block density against the dense layout, bytes of the sparse weights (all heads)
    and of one dense B x H x N x N tensor (experiments/analytic.py)."""
    geometry = AttentionGeometry(DilationConfig(SEED_SEGMENTS, SEED_RATES), seq_len, SEED_HEADS)
    all_blocks = active_block_count(geometry, seed_pattern("dense"))
    return [
        {
            "pattern": pattern,
            "allowed pairs": active_pair_count(geometry, seed_pattern(pattern)),
            "block density": active_block_count(geometry, seed_pattern(pattern)) / all_blocks,
            "weights MiB": sparse_weights_bytes(seq_len, SEED_SETTING, pattern) / 2**20,
            "dense NxN MiB": dense_weights_bytes(seq_len, SEED_SETTING) / 2**20,
        }
        for pattern in PATTERN_TYPES
    ]


def print_layout_table(seq_len: int = 16384) -> None:
    print(
        f"Seed configuration: segments {list(SEED_SEGMENTS)}, rates {list(SEED_RATES)}, H={SEED_HEADS}, "
        f"block {SEED_BLOCK}, N={seq_len}, B=1, float32"
    )
    print(format_table(layout_table(seq_len), floats=("", ",d", ".4f", ",.1f", ",.1f")))


def check_reference_against_masked_softmax() -> bool:
    """The reference against plain masked softmax (SDPA, boolean mask) on a small input."""
    torch.manual_seed(0)
    attention = BlockSparseRingDilatedAttention(
        [16, 32], [1, 2], SparsePatternConfig("local_window", block_size=4, local_window_size=8), head_mode="split"
    )
    q, k, v = (torch.randn(2, 48, 4, 8, dtype=torch.float64) for _ in range(3))
    out, weights = attention(q, k, v, return_attention_weights=True)
    allowed = weights > 0  # split mode: no key counts twice, so weights > 0 is the mask
    reference = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed
    ).transpose(1, 2)
    rows_with_keys = allowed.any(-1).transpose(1, 2).unsqueeze(-1)
    error = float(((out - reference) * rows_with_keys).abs().max())
    ok = error < 1e-12
    print(f"reference vs masked softmax (SDPA, float64): max |diff| = {error:.2e} -> {'PASS' if ok else 'FAIL'}")
    return ok


def verification_run(seq_len: int | None = None, device: str | None = None) -> bool:
    """Reference against the optimized path for the seed configuration and every pattern type.

    The float64 reference is dense, so it is evaluated on sampled query chunks (each against the
    whole key sequence); the optimized path runs once on the whole sequence on ``device``.
    """
    from optimized import BlockSparseRingDilatedAttention as Optimized
    from reference import compare, partial_attention

    from .memory import peak_bytes

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq_len = seq_len or (16384 if device.type == "cuda" else 8192)
    batch, heads, head_dim, chunk = 1, SEED_HEADS, 64, VERIFY_CHUNK
    sample_starts = (0, seq_len // 2 - chunk // 2, seq_len - chunk)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, seq_len, heads, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    geometry = AttentionGeometry(DilationConfig(SEED_SEGMENTS, SEED_RATES), seq_len, heads)
    print(
        f"\nVerification on {device} ({dtype}): B={batch}, N={seq_len}, H={heads}, D={head_dim}; reference in "
        f"float64 on query rows {', '.join(f'[{s}, {s + chunk})' for s in sample_starts)}"
    )
    print(
        f"{'pattern':<16}{'backend':>8}{'out error':>12}{'budget':>12}{'lse error':>12}{'budget':>12}"
        f"{'verdict':>9}{'time':>10}{'peak mem':>12}"
    )
    all_ok = True
    for pattern in PATTERN_TYPES:
        config = seed_pattern(pattern)
        attention = Optimized(SEED_SEGMENTS, SEED_RATES, sparse_config=config)
        # Time an unprofiled call; take the peak from a second call (the CPU measurement profiles).
        start = time.perf_counter()
        attention(q, k, v)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        (out, lse), memory = peak_bytes(lambda: attention(q, k, v, return_lse=True), device)
        verdicts = []
        for start in sample_starts:
            rows = slice(start, start + chunk)
            reference = [
                partial_attention(q[:, rows], k, v, geometry, config, query_start=start, compute_dtype=precision)
                for precision in (torch.float64, None)
            ]
            (out64, lse64), (out_lowp, lse_lowp) = reference
            empty = torch.isneginf(lse64)
            verdicts.append(
                (
                    compare("out", out[:, rows], out64, out_lowp, dtype, empty=empty.transpose(1, 2).unsqueeze(-1)),
                    compare("lse", lse[:, :, rows], lse64, lse_lowp, dtype, empty=empty, empty_value=float("-inf")),
                )
            )
        worst_out = max((pair[0] for pair in verdicts), key=lambda verdict: verdict.error - verdict.budget)
        worst_lse = max((pair[1] for pair in verdicts), key=lambda verdict: verdict.error - verdict.budget)
        ok = all(verdict.passed for pair in verdicts for verdict in pair)
        all_ok &= ok
        print(
            f"{pattern:<16}{attention.last_backend:>8}{worst_out.error:>12.2e}{worst_out.budget:>12.2e}"
            f"{worst_lse.error:>12.2e}{worst_lse.budget:>12.2e}{'PASS' if ok else 'FAIL':>9}"
            f"{seconds * 1e3:>8.1f}ms{memory.peak_bytes / 2**20:>9.1f}MiB"
        )
    print(f"(peak memory: {memory.how}; time: one call without the profiler)")
    print(
        f"VERDICT: {'PASS' if all_ok else 'FAIL'}: every pattern type {'within' if all_ok else 'NOT within'} "
        f"the error budget (docs/numerics.md) against the float64 reference"
    )
    return all_ok


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument(
        "--device",
        choices=cli.DEVICES,
        default=None,
        help="where the optimized path runs (default: cuda when there is one, else cpu)",
    )
    parser.add_argument(
        "--seq-len",
        type=cli.positive_int,
        default=None,
        help=f"N of the verification run (default 16384 on CUDA, 8192 on the CPU; >= {VERIFY_CHUNK})",
    )
    parser.add_argument("--table-seq-len", type=cli.positive_int, default=16384, help="N of the layout table")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device is not None:
        cli.check_device(parser, args.device)
    if args.seq_len is not None and args.seq_len < VERIFY_CHUNK:
        parser.error(
            f"--seq-len {args.seq_len}: the reference checks chunks of {VERIFY_CHUNK} query rows; "
            f"give --seq-len >= {VERIFY_CHUNK}"
        )
    print_layout_table(args.table_seq_len)
    ok = check_reference_against_masked_softmax()
    ok &= verification_run(args.seq_len, args.device)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
