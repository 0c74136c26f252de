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


def main() -> int:
    print_layout_table()
    ok = check_reference_against_masked_softmax()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
