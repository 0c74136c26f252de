"""The distributed ring on a small input: every rank prints its error against the float64 reference.

    torchrun --nproc_per_node=2 -m experiments.ring_example

gloo on the CPU, NCCL (one GPU per rank) when CUDA is available. Each rank builds the same full
input from one seed, keeps its own contiguous chunk (chunk lengths deliberately uneven), runs
``BlockSparseRingDilatedAttention(process_group=...)`` and compares its rows (out and lse) with
the dense float64 reference. Exits non-zero on any rank whose result is out of its error budget
(docs/numerics.md). It takes no options: torchrun starts the ranks and hands each its place.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist

import reference
from experiments import cli
from optimized import BlockSparseRingDilatedAttention, SparsePatternConfig
from reference.verification import K_OUTPUT, compare

SEGMENT_LENGTHS = [16, 32, 64]
DILATION_RATES = [1, 2, 4]
BATCH, HEADS, KV_HEADS, HEAD_DIM = 2, 6, 3, 16


def chunk_lengths(seq_len: int, world_size: int) -> list[int]:
    """Uneven on purpose: rank r gets a share proportional to r + 1."""
    weights = [r + 1 for r in range(world_size)]
    lengths = [seq_len * w // sum(weights) for w in weights]
    lengths[-1] += seq_len - sum(lengths)
    return lengths


# What torchrun hands every rank; without them init_process_group has nowhere to meet.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
COMMAND = "torchrun --nproc_per_node=2 -m experiments.ring_example"


def build_parser():
    return cli.parser_for(__doc__, __spec__)


def main(argv=None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        parser.error(f"not started by torchrun ({', '.join(missing)} unset): run it with {COMMAND}")
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=60))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    seq_len = 48 * world_size + 5

    generator = torch.Generator().manual_seed(0)
    q = torch.randn(BATCH, seq_len, HEADS, HEAD_DIM, generator=generator)
    k = torch.randn(BATCH, seq_len, KV_HEADS, HEAD_DIM, generator=generator)
    v = torch.randn(BATCH, seq_len, KV_HEADS, HEAD_DIM, generator=generator)
    key_padding_mask = torch.rand(BATCH, seq_len, generator=generator) < 0.1
    lengths = chunk_lengths(seq_len, world_size)
    start = sum(lengths[:rank])
    rows = slice(start, start + lengths[rank])

    config = SparsePatternConfig(pattern_type="dilated_sparse", sparsity_ratio=0.5, block_size=16)
    backend = "auto" if use_cuda else "torch"
    attention = BlockSparseRingDilatedAttention(
        SEGMENT_LENGTHS, DILATION_RATES, config, backend=backend, process_group=dist.group.WORLD
    )
    local = [t[:, rows].to(device, dtype) for t in (q, k, v)]
    out, lse = attention(*local, is_causal=True, key_padding_mask=key_padding_mask[:, rows].to(device), return_lse=True)

    call = dict(is_causal=True, key_padding_mask=key_padding_mask, return_lse=True)
    kwargs = dict(segment_lengths=SEGMENT_LENGTHS, dilation_rates=DILATION_RATES, sparse_config=config)
    low = [t.to(dtype) for t in (q, k, v)]
    out64, lse64 = reference.BlockSparseRingDilatedAttention(**kwargs)(*low, **call)
    out_low, lse_low = reference.BlockSparseRingDilatedAttention(**kwargs, compute_dtype=None)(*low, **call)
    empty = torch.isneginf(lse64[:, :, rows])
    verdicts = [
        compare(
            "out", out, out64[:, rows], out_low[:, rows], dtype, K_OUTPUT, empty=empty.transpose(1, 2).unsqueeze(-1)
        ),
        compare(
            "lse", lse, lse64[:, :, rows], lse_low[:, :, rows], dtype, K_OUTPUT, empty=empty, empty_value=float("-inf")
        ),
    ]
    stats = attention.ring_stats
    lines = [
        f"rank {rank}/{world_size} ({attention.last_backend} on {device}, {dtype}): rows [{rows.start}, {rows.stop}) "
        f"of N={seq_len}, computed steps {stats.computed_steps}, bytes sent per step {stats.forward_bytes}",
        *(f"  {verdict.describe()}" for verdict in verdicts),
    ]
    print("\n".join(lines), flush=True)
    passed = all(verdict.passed for verdict in verdicts)
    everyone = [None] * world_size
    dist.all_gather_object(everyone, passed)
    dist.destroy_process_group()
    if rank == 0:
        print(f"all ranks within budget: {all(everyone)}", flush=True)
    return 0 if all(everyone) else 1


if __name__ == "__main__":
    sys.exit(main())
