"""The ring schedule across configurations: which chunk pairs compute, what travels, bytes per step.

    python -m experiments.sweep_ring                                   # defaults below, CPU only
    python -m experiments.sweep_ring --seq-len 65536 --parts 2 4 8 16 32 --patterns dilated_sparse

Everything comes from ``reference.ring_schedule`` (which asks ``reference.semantics``); nothing is
timed, so the numbers are exact and any machine gives the same ones. "Naive" is a ring that
passes every key/value chunk around all P - 1 steps. Writes experiments/results/ring_schedule.json,
.csv and .png. The functions here also draw the ring_splits notebook.
"""

from __future__ import annotations

import argparse
import os

from reference import AttentionGeometry, DilationConfig, SparsePatternConfig
from reference.ring_schedule import RingSchedule, ring_schedule

from . import memory
from .env import environment

# "local": every segment <= 8192 tokens (the seed's configuration); "global": a branch spanning 32K tokens.
DILATIONS = {
    "local": ((2048, 4096, 8192), (1, 2, 4)),
    "global": ((2048, 8192, 32768), (1, 4, 16)),
}


def equal_chunks(seq_len: int, parts: int) -> tuple[int, ...]:
    base, extra = divmod(seq_len, parts)
    return tuple(base + (1 if p < extra else 0) for p in range(parts))


def bytes_per_token(kv_heads: int, head_dim: int, element_size: int) -> int:
    """Key and value of one token, all key/value heads: what a ring step moves per token."""
    return 2 * kv_heads * head_dim * element_size


def schedule_of(dilation: str, seq_len: int, heads: int, pattern: str, block_size: int, is_causal: bool,
                chunk_lengths) -> RingSchedule:
    segments, rates = DILATIONS[dilation]
    geometry = AttentionGeometry(DilationConfig(segments, rates), seq_len, heads)
    setting = memory.MemorySetting(heads=heads, segment_lengths=segments, dilation_rates=rates, block_size=block_size)
    config: SparsePatternConfig = memory.pattern_config(pattern, setting)
    return ring_schedule(geometry, config, is_causal, tuple(chunk_lengths))


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


def sweep(dilations, seq_len, parts_list, patterns, causal_flags, heads=12, kv_heads=12, head_dim=64,
          element_size=2, block_size=128, progress=False) -> list[dict]:
    token_bytes = bytes_per_token(kv_heads, head_dim, element_size)
    jobs = [(d, p, pat, c) for d in dilations for p in parts_list for pat in patterns for c in causal_flags]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="ring", unit="schedule")
    rows = []
    for dilation, parts, pattern, causal in jobs:
        schedule = schedule_of(dilation, seq_len, heads, pattern, block_size, causal, equal_chunks(seq_len, parts))
        rows.append(schedule_row(schedule, token_bytes, dilation=dilation, seq_len=seq_len, pattern=pattern,
                                 is_causal=causal, bytes_per_token=token_bytes))
    return rows


# ------------------------------------------------------------------------------------------------
# Pictures
# ------------------------------------------------------------------------------------------------


def plot_schedule(schedule: RingSchedule, token_bytes: int, title: str = ""):
    """Three panels: active (query chunk, key chunk) pairs; what each rank does at each step; MiB per step."""
    import matplotlib.pyplot as plt
    import numpy as np

    P = schedule.num_chunks
    fig, (pairs_ax, steps_ax, bytes_ax) = plt.subplots(1, 3, figsize=(15, 4))
    pairs_ax.imshow(np.array(schedule.active, dtype=float), cmap="Blues", vmin=0, vmax=1)
    pairs_ax.set_title("active chunk pairs", fontsize=9)
    pairs_ax.set_xlabel("key chunk")
    pairs_ax.set_ylabel("query chunk (rank)")

    # 2 = computes, 1 = holds the chunk without computing (it only forwards it), 0 = idle.
    grid = np.zeros((P, P))
    for rank in range(P):
        for step in range(P):
            received = step == 0 or schedule.receives(rank, step)
            grid[rank, step] = 2 if schedule.computes(rank, step) else (1 if received else 0)
    steps_ax.imshow(grid, cmap="Greens", vmin=0, vmax=2)
    for rank in range(P):
        for step in range(P):
            steps_ax.text(step, rank, str(schedule.chunk_at(rank, step)), ha="center", va="center", fontsize=7)
            if step >= 1 and schedule.receives(rank, step):
                steps_ax.plot(step - 0.4, rank - 0.3, marker=">", color="tab:red", ms=4)
    steps_ax.set_title("rank x step: key chunk held (dark = computes, > = received)", fontsize=9)
    steps_ax.set_xlabel("step")
    steps_ax.set_ylabel("rank")

    step_bytes = schedule.step_bytes(token_bytes)
    bytes_ax.bar(range(P), [b / 2**20 for b in step_bytes], color="tab:orange")
    bytes_ax.set_title(f"MiB sent per step (total {sum(step_bytes) / 2**20:.0f} MiB)", fontsize=9)
    bytes_ax.set_xlabel("step")
    bytes_ax.set_ylabel("MiB, all ranks")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_sweep(rows, ax=None):
    """Bytes sent against P, relative to the naive ring, one line per (dilation, pattern, causal)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    lines: dict = {}
    for row in sorted(rows, key=lambda r: r["parts"]):
        key = (row["dilation"], row["pattern"], row["is_causal"])
        xs, ys = lines.setdefault(key, ([], []))
        xs.append(row["parts"])
        ys.append(row["sent_over_naive"])
    for (dilation, pattern, causal), (xs, ys) in lines.items():
        label = f"{dilation} {pattern}{' causal' if causal else ''}"
        ax.plot(xs, ys, marker="o", ls="--" if causal else "-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ring size P (equal chunks)")
    ax.set_ylabel("bytes sent / naive ring's bytes")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dilations", nargs="+", default=list(DILATIONS), choices=list(DILATIONS))
    parser.add_argument("--seq-len", type=int, default=32768)
    parser.add_argument("--parts", nargs="+", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--patterns", nargs="+", default=["dilated_sparse", "local_window"],
                        choices=list(memory.PATTERN_TYPES))
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--element-size", type=int, default=2, help="bytes per element (2: bf16)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--out", default=None, help="output stem (default experiments/results/ring_schedule)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    causal_flags = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    rows = sweep(args.dilations, args.seq_len, args.parts, args.patterns, causal_flags, args.heads, args.kv_heads,
                 args.head_dim, args.element_size, args.block_size, progress=True)
    stem = args.out or os.path.join(memory.RESULTS_DIR, "ring_schedule")
    env = environment("cpu")
    memory.save_results(f"{stem}.json", rows, env, {"arguments": vars(args)})
    memory.save_csv(f"{stem}.csv", rows)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ax = plot_sweep(rows)
    ax.set_title(f"N={args.seq_len}, H={args.heads}, H_kv={args.kv_heads}, D={args.head_dim}, block {args.block_size}",
                 fontsize=9)
    ax.figure.savefig(f"{stem}.png", dpi=120, bbox_inches="tight")
    plt.close(ax.figure)
    for row in rows:
        print(f"{row['dilation']:<7}{row['pattern']:<16}{'causal' if row['is_causal'] else '':<7} P={row['parts']:<3}"
              f" active {row['active_pairs']:>4}/{row['all_pairs']:<4} last step {row['last_step']:>3}"
              f"  sent {row['total_bytes'] / 2**20:9.1f} MiB ({row['sent_over_naive']:.2f} of naive)")
    print(f"wrote {stem}.json, .csv, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
