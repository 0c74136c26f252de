"""The distributed ring on CPU processes (gloo): per-rank peak memory against P, ring time against compute alone.

    python -m experiments.ring_gloo --out experiments/results/ring_gloo_cpu.json
    python -m experiments.ring_gloo --world 2,4 --chunk-len 1024 --repeats 5

Weak scaling: every rank holds ``--chunk-len`` tokens, so N = P x chunk-len. For each world size P and
dilation ("local": segments [256, 512, 1024], each inside one chunk, so nothing is sent; "global":
segments [256, N], rates [1, 4], a branch over the whole sequence, so every key/value chunk travels),
P processes (one thread each, gloo) run ``BlockSparseRingDilatedAttention(process_group=WORLD)``
forward on their chunk (float32, torch backend, dense layout, no gradients) and report:
- ``ring_s``: the median wall time of the call (each started after a barrier);
- ``compute_s``: the same rank's chunk pairs (the schedule's) computed from local copies of the key
  chunks and merged the same way, with no communication: what the ring adds over it is transfer and
  waiting that the double buffering did not hide;
- the causal global setting twice, with contiguous chunks and with ``ring_layout="zigzag"`` (two
  pieces per rank): the spread of ``ring_s`` over the ranks shows the balance;
- ``peak_bytes``: the peak of torch's CPU allocator during the call (``experiments.memory``: tensors
  the call creates; the inputs exist before), against ``chunk_bytes``, the bytes of one of the rank's
  q, k, v chunks. With a fixed chunk, a peak that stays flat as P grows holds nothing proportional to N.
Writes one JSON (environment, settings, one row per (P, dilation, rank)) and prints a table.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from experiments import cli
from experiments.env import environment
from experiments.memory import peak_bytes
from optimized import BlockSparseRingDilatedAttention
from optimized.dispatch import REGISTRY
from optimized.plan import CallPlan
from reference.config import DilationConfig, SparsePatternConfig
from reference.merge import merge_partials
from reference.ring_schedule import ring_schedule, zigzag_schedule
from reference.semantics import AttentionGeometry

BATCH, HEADS, HEAD_DIM, BLOCK = 1, 4, 32, 64
# (dilation, causal, ring layout): the first two measure memory and overlap, the causal pair the balance.
SETTINGS = (
    ("local", False, "contiguous"),
    ("global", False, "contiguous"),
    ("global", True, "contiguous"),
    ("global", True, "zigzag"),
)


def dilation(name: str, seq_len: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if name == "local":
        return (256, 512, 1024), (1, 2, 4)
    return (256, seq_len), (1, 4)


def _compute_alone(q_local, k, v, geometry, config, is_causal: bool, schedule, rank: int, scale: float):
    """This rank's active piece pairs from the whole k, v, merged per query piece; no communication."""
    backend = REGISTRY["torch"]
    options = backend.default_options()
    merged = {}
    for step in range(schedule.num_chunks):
        chunk = schedule.chunk_at(rank, step)
        for a, b in schedule.piece_pairs[rank][chunk]:
            (q0, q1), (k0, k1) = schedule.pieces[rank][a], schedule.pieces[chunk][b]
            plan = CallPlan(geometry, config, is_causal, scale, (q0, q1), (k0, k1))
            rows = slice(*schedule.local_piece_range(rank, a))
            out, lse = backend.forward_partial(q_local[:, rows], k[:, k0:k1], v[:, k0:k1], None, plan, options)
            merged[a] = (out, lse) if a not in merged else merge_partials(*merged[a], out, lse)
    return merged


def _worker(rank: int, world: int, init_file: str, result_dir: str, chunk_len: int, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rows = []
        seq_len = world * chunk_len
        chunks = [chunk_len] * world
        generator = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(BATCH, seq_len, HEADS, HEAD_DIM, generator=generator) for _ in range(3))
        config = SparsePatternConfig(pattern_type="dense", block_size=BLOCK)
        for name, is_causal, ring_layout in SETTINGS:
            segments, rates = dilation(name, seq_len)
            geometry = AttentionGeometry(DilationConfig(segments, rates), seq_len, HEADS)
            if ring_layout == "zigzag":
                schedule = zigzag_schedule(geometry, config, is_causal, world)
            else:
                schedule = ring_schedule(geometry, config, is_causal, chunks)
            ranges = schedule.pieces[rank]
            local = [torch.cat([t[:, a:b] for a, b in ranges], dim=1) for t in (q, k, v)]
            module = BlockSparseRingDilatedAttention(
                list(segments),
                list(rates),
                config,
                backend="torch",
                process_group=dist.group.WORLD,
                ring_layout=ring_layout,
            )
            scale = HEAD_DIM**-0.5
            call = lambda: module(*local, is_causal=is_causal)  # noqa: E731
            with torch.no_grad():
                call()  # warm-up (layouts, plans)
                ring_times, compute_times = [], []
                for _ in range(repeats):
                    dist.barrier()
                    began = time.perf_counter()
                    call()
                    ring_times.append(time.perf_counter() - began)
                for _ in range(repeats):
                    began = time.perf_counter()
                    _compute_alone(local[0], k, v, geometry, config, is_causal, schedule, rank, scale)
                    compute_times.append(time.perf_counter() - began)
                dist.barrier()
                _, measurement = peak_bytes(call, "cpu")
            rows.append(
                dict(
                    world=world,
                    dilation=name,
                    is_causal=is_causal,
                    ring_layout=ring_layout,
                    segments=list(segments),
                    rates=list(rates),
                    rank=rank,
                    seq_len=seq_len,
                    chunk_len=chunk_len,
                    ring_s=statistics.median(ring_times),
                    compute_s=statistics.median(compute_times),
                    peak_bytes=measurement.peak_bytes,
                    chunk_bytes=local[0].numel() * local[0].element_size(),
                    bytes_sent=sum(module.ring_stats.forward_bytes),
                    active_pairs=sum(schedule.active[rank]),
                )
            )
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as handle:
            json.dump(rows, handle)
    finally:
        dist.destroy_process_group()


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument("--world", type=cli.comma_list(item=cli.positive_int), default="1,2,4", help="world sizes P")
    parser.add_argument("--chunk-len", type=cli.positive_int, default=1024, help="tokens per rank (default 1024)")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="timed calls per setting (median)")
    parser.add_argument("--out", help="write the rows here as JSON")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.chunk_len % 1024:
        parser.error(f"--chunk-len must be a multiple of 1024 (the local segments' longest), got {args.chunk_len}")
    rows = []
    for world in args.world:
        with tempfile.TemporaryDirectory() as folder:
            init_file = os.path.join(folder, "init")
            mp.spawn(_worker, args=(world, init_file, folder, args.chunk_len, args.repeats), nprocs=world, join=True)
            for rank in range(world):
                with open(os.path.join(folder, f"rank{rank}.json")) as handle:
                    rows.extend(json.load(handle))
    for row in rows:
        row["ring_over_compute"] = row["ring_s"] / row["compute_s"]
        row["peak_over_chunk"] = row["peak_bytes"] / row["chunk_bytes"]
    print(
        f"{'P':>2} {'dilation':<8} {'rank':>4} {'ring ms':>8} {'compute ms':>10} {'ring/compute':>12} "
        f"{'peak MiB':>8} {'peak/chunk':>10} {'sent MiB':>8}"
    )
    for row in rows:
        print(
            f"{row['world']:>2} {row['dilation']:<8} {int(row['is_causal']):>6} {row['ring_layout']:<10} "
            f"{row['rank']:>4} {1e3 * row['ring_s']:>8.1f} "
            f"{1e3 * row['compute_s']:>10.1f} {row['ring_over_compute']:>12.2f} {row['peak_bytes'] / 2**20:>8.2f} "
            f"{row['peak_over_chunk']:>10.2f} {row['bytes_sent'] / 2**20:>8.2f}"
        )
    if args.out:
        record = dict(
            environment=environment("cpu"),
            settings=dict(vars(args), batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, block=BLOCK, dtype="float32"),
            command="python -m experiments.ring_gloo " + " ".join(sys.argv[1:] if argv is None else argv),
            rows=rows,
        )
        with open(args.out, "w") as handle:
            json.dump(record, handle, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
