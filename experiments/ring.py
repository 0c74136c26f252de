"""The ring schedule as rows: which chunk pairs compute, what travels, bytes per step (exact, nothing timed).

Everything comes from ``reference.ring_schedule`` (which asks ``reference.semantics``;
docs/semantics.md section 5). "Naive" is a ring that passes every key/value chunk around all
P - 1 steps. The sweep_ring CLI and the ring_splits notebook use these; the pictures are in
``experiments.plots``.
"""

from __future__ import annotations

from reference import AttentionGeometry, DilationConfig
from reference.ring_schedule import RingSchedule, ring_schedule

from .settings import MemorySetting, pattern_config

# "local": every segment <= 8192 tokens (the seed's configuration); "global": a branch spanning 32K tokens.
DILATIONS = {
    "local": ((2048, 4096, 8192), (1, 2, 4)),
    "global": ((2048, 8192, 32768), (1, 4, 16)),
}


def equal_chunks(seq_len: int, parts: int) -> tuple[int, ...]:
    """``parts`` contiguous chunk lengths summing to ``seq_len``, the first ``seq_len % parts`` one longer."""
    base, extra = divmod(seq_len, parts)
    return tuple(base + (1 if p < extra else 0) for p in range(parts))


def bytes_per_token(kv_heads: int, head_dim: int, element_size: int) -> int:
    """Key and value of one token, all key/value heads: what a ring step moves per token."""
    return 2 * kv_heads * head_dim * element_size


def geometry_of(dilation: str, seq_len: int, heads: int) -> AttentionGeometry:
    segments, rates = DILATIONS[dilation]
    return AttentionGeometry(DilationConfig(segments, rates), seq_len, heads)


def schedule_of(
    dilation: str, seq_len: int, heads: int, pattern: str, block_size: int, is_causal: bool, chunk_lengths
) -> RingSchedule:
    segments, rates = DILATIONS[dilation]
    setting = MemorySetting(heads=heads, segment_lengths=segments, dilation_rates=rates, block_size=block_size)
    config = pattern_config(pattern, setting)
    return ring_schedule(geometry_of(dilation, seq_len, heads), config, is_causal, tuple(chunk_lengths))


def schedule_row(schedule: RingSchedule, token_bytes: int, **labels) -> dict:
    """One row: active chunk pairs, steps each rank computes, last transfer step, bytes per step and total."""
    P = schedule.num_chunks
    seq_len = sum(schedule.chunk_lengths)
    step_bytes = schedule.step_bytes(token_bytes)
    naive = (P - 1) * seq_len * token_bytes
    total = sum(step_bytes)
    return {
        **labels,
        "parts": P,
        "chunk_lengths": list(schedule.chunk_lengths),
        "active_pairs": sum(map(sum, schedule.active)),
        "all_pairs": P * P,
        "max_compute_steps": max(len(schedule.compute_steps(r)) for r in range(P)),
        "last_step": schedule.last_step,
        "step_bytes": list(step_bytes),
        "total_bytes": total,
        "naive_bytes": naive,
        "sent_over_naive": total / naive if naive else 0.0,
    }


def sweep(
    dilations,
    seq_len,
    parts_list,
    patterns,
    causal_flags,
    heads=12,
    kv_heads=12,
    head_dim=64,
    element_size=2,
    block_size=128,
    progress=False,
) -> list[dict]:
    """A row per (dilation, P, pattern, causal) with P equal chunks."""
    token_bytes = bytes_per_token(kv_heads, head_dim, element_size)
    jobs = [(d, p, pat, c) for d in dilations for p in parts_list for pat in patterns for c in causal_flags]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="ring", unit="schedule")
    rows = []
    for dilation, parts, pattern, causal in jobs:
        schedule = schedule_of(dilation, seq_len, heads, pattern, block_size, causal, equal_chunks(seq_len, parts))
        rows.append(
            schedule_row(
                schedule,
                token_bytes,
                dilation=dilation,
                seq_len=seq_len,
                pattern=pattern,
                is_causal=causal,
                bytes_per_token=token_bytes,
            )
        )
    return rows
