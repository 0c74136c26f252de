"""`make demo`: the seed's configuration under every pattern type, then a verification run."""

from __future__ import annotations

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

SEED_SEGMENTS = (2048, 4096, 8192)
SEED_RATES = (1, 2, 4)
SEED_HEADS = 12
SEED_BLOCK = 128


def seed_pattern(pattern_type: str, block_size: int = SEED_BLOCK, **overrides) -> SparsePatternConfig:
    """The seed document's settings for each pattern type (custom: a banded layout)."""
    if pattern_type == "custom":
        nb = 64
        band = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).abs() <= 1
        overrides.setdefault("block_layout", band)
    return SparsePatternConfig(pattern_type=pattern_type, block_size=block_size, **overrides)


def layout_table(seq_len: int = 16384) -> list[dict]:
    geometry = AttentionGeometry(DilationConfig(SEED_SEGMENTS, SEED_RATES), seq_len, SEED_HEADS)
    rows = []
    for pattern in PATTERN_TYPES:
        config = seed_pattern(pattern)
        blocks = active_block_count(geometry, config)
        all_blocks = active_block_count(geometry, SparsePatternConfig(pattern_type="dense", block_size=SEED_BLOCK))
        rows.append(
            {
                "pattern": pattern,
                "pairs": active_pair_count(geometry, config),
                "density": blocks / all_blocks,
                # float32 block values plus two int64 indices per active block, per batch element
                "weights_bytes": blocks * (SEED_BLOCK * SEED_BLOCK * 4 + 16),
                "dense_bytes": seq_len * seq_len * 4,
            }
        )
    return rows


def print_layout_table(seq_len: int = 16384) -> None:
    print(
        f"Seed configuration: segments {list(SEED_SEGMENTS)}, rates {list(SEED_RATES)}, H={SEED_HEADS}, "
        f"block {SEED_BLOCK}, N={seq_len}, B=1"
    )
    print(f"{'pattern':<16}{'allowed pairs':>16}{'block density':>15}{'weights, all H':>16}{'one dense NxN':>15}")
    for row in layout_table(seq_len):
        print(
            f"{row['pattern']:<16}{row['pairs']:>16,}{row['density']:>15.4f}"
            f"{row['weights_bytes'] / 2**20:>13.1f}MiB{row['dense_bytes'] / 2**20:>12.1f}MiB"
        )


def check_reference_against_masked_softmax() -> bool:
    """The reference against plain masked softmax (SDPA, boolean mask) on a small input."""
    torch.manual_seed(0)
    attention = BlockSparseRingDilatedAttention([16, 32], [1, 2], SparsePatternConfig("local_window", block_size=4,
                                                local_window_size=8), head_mode="split")
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

    import time

    from .memory import peak_bytes

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq_len = seq_len or (16384 if device.type == "cuda" else 8192)
    batch, heads, head_dim, chunk = 1, SEED_HEADS, 64, 128
    sample_starts = (0, seq_len // 2 - chunk // 2, seq_len - chunk)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, seq_len, heads, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    geometry = AttentionGeometry(DilationConfig(SEED_SEGMENTS, SEED_RATES), seq_len, heads)
    print(
        f"\nVerification on {device} ({dtype}): B={batch}, N={seq_len}, H={heads}, D={head_dim}; reference in "
        f"float64 on query rows {', '.join(f'[{s}, {s + chunk})' for s in sample_starts)}"
    )
    print(f"{'pattern':<16}{'backend':>8}{'out error':>12}{'budget':>12}{'lse error':>12}{'budget':>12}"
          f"{'verdict':>9}{'time':>10}{'peak mem':>12}")
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
            verdicts.append((
                compare("out", out[:, rows], out64, out_lowp, dtype, empty=empty.transpose(1, 2).unsqueeze(-1)),
                compare("lse", lse[:, :, rows], lse64, lse_lowp, dtype, empty=empty, empty_value=float("-inf")),
            ))
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
    print(f"VERDICT: {'PASS' if all_ok else 'FAIL'}: every pattern type {'within' if all_ok else 'NOT within'} "
          f"the SPEC section 7 budget against the float64 reference")
    return all_ok


def main() -> int:
    print_layout_table()
    ok = check_reference_against_masked_softmax()
    ok &= verification_run()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
