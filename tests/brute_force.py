"""docs/semantics.md sections 2-4 recomputed from the text alone, with Python loops and Python floats.

Written apart from ``reference.semantics`` and ``reference.dense`` on purpose: it imports only
the config dataclasses, so a misreading of the contract (docs/semantics.md) in the reference shows up as a disagreement
here instead of being shared. Tiny sizes only (every pair of every head of every branch is a
Python loop iteration).
"""

from __future__ import annotations

import math

import torch

from reference.config import DilationConfig, SparsePatternConfig


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


# --------------------------------------------------------------------------------------------
# docs/semantics.md section 3: the block layout of nb blocks, without the causal rule
# --------------------------------------------------------------------------------------------


def layout_rows(config: SparsePatternConfig, nb: int) -> list[list[bool]]:
    """``allowed[qb][kb]`` for one lattice of ``nb`` blocks, straight from docs/semantics.md section 3."""
    b = config.block_size
    kind = config.pattern_type
    if kind == "random":
        generator = torch.Generator().manual_seed(config.seed)
        draws = torch.rand((nb, nb), generator=generator).tolist()
    if kind == "custom":
        if config.block_layout.shape[0] < nb:
            raise ValueError(f"custom layout of {config.block_layout.shape[0]} blocks is smaller than nb={nb}")
        custom = config.block_layout.tolist()
    rows = []
    for qb in range(nb):
        row = []
        for kb in range(nb):
            if kind == "dense":
                allowed = True
            elif kind == "local_window":
                allowed = abs(qb - kb) <= config.local_window_size // (2 * b)
            elif kind == "global_local":
                global_blocks = ceil_div(config.global_tokens, b)
                allowed = (
                    abs(qb - kb) <= config.local_window_size // (2 * b) or kb < global_blocks or qb < global_blocks
                )
            elif kind == "dilated_sparse":
                sigma = max(1, round(1 / config.sparsity_ratio))
                allowed = (qb - kb) % sigma == 0
            elif kind == "random":
                allowed = draws[qb][kb] < config.sparsity_ratio or qb == kb
            elif kind == "custom":
                allowed = bool(custom[qb][kb])
            else:
                raise AssertionError(f"pattern type {kind!r} is not in docs/semantics.md section 3")
            row.append(bool(allowed))
        rows.append(row)
    return rows


def layout_rows_causal(config: SparsePatternConfig, nb: int) -> list[list[bool]]:
    """The layout with the contract's causal rule on blocks: every kb > qb removed."""
    rows = layout_rows(config, nb)
    return [[rows[qb][kb] and kb <= qb for kb in range(nb)] for qb in range(nb)]


# --------------------------------------------------------------------------------------------
# docs/semantics.md section 2: heads, offsets, lattices
# --------------------------------------------------------------------------------------------


def heads_of_branch(num_heads: int, num_branches: int, head_mode: str, branch: int) -> list[int]:
    """Query heads in a branch: every head ("all"), or the branch's group of tensor_split ("split")."""
    if head_mode == "all":
        return list(range(num_heads))
    groups = [[] for _ in range(num_branches)]
    # tensor_split: the first H % G groups hold one extra head; walk the heads in order.
    sizes = [num_heads // num_branches + (1 if g < num_heads % num_branches else 0) for g in range(num_branches)]
    head = 0
    for g, size in enumerate(sizes):
        for _ in range(size):
            groups[g].append(head)
            head += 1
    return groups[branch]


def offset_of(index_in_branch: int, heads_in_branch: int, rate: int) -> int:
    """o = j // ceil(H_g / r_g)."""
    return index_in_branch // ceil_div(heads_in_branch, rate)


def multiplicity(
    seq_len: int,
    num_heads: int,
    dilation: DilationConfig,
    config: SparsePatternConfig,
    is_causal: bool,
    padded_keys: list[bool] | None = None,
) -> list[list[list[int]]]:
    """``count[h][i][j]``: in how many branches query ``i`` of head ``h`` may attend key ``j``."""
    count = [[[0] * seq_len for _ in range(seq_len)] for _ in range(num_heads)]
    num_branches = len(dilation.segment_lengths)
    b = config.block_size
    layouts = {}  # nb -> layout, so the random draw is made once per size
    for g in range(num_branches):
        w = min(dilation.segment_lengths[g], seq_len)
        r = dilation.dilation_rates[g]
        heads = heads_of_branch(num_heads, num_branches, dilation.head_mode, g)
        for j_index, h in enumerate(heads):
            o = offset_of(j_index, len(heads), r)
            for i in range(seq_len):
                seg_i, u_i = divmod(i, w)
                if u_i % r != o:
                    continue
                seg_start = seg_i * w
                seg_len = min(seg_start + w, seq_len) - seg_start
                lattice_len = sum(1 for u in range(seg_len) if u % r == o)
                nb = ceil_div(lattice_len, b)
                if nb not in layouts:
                    layouts[nb] = layout_rows(config, nb)
                layout = layouts[nb]
                t_i = (u_i - o) // r
                for j in range(seq_len):
                    seg_j, u_j = divmod(j, w)
                    if seg_j != seg_i or u_j % r != o:
                        continue
                    t_j = (u_j - o) // r
                    if not layout[t_i // b][t_j // b]:
                        continue
                    if is_causal and j > i:
                        continue
                    if padded_keys is not None and padded_keys[j]:
                        continue
                    count[h][i][j] += 1
    return count


# --------------------------------------------------------------------------------------------
# docs/semantics.md section 4: the output
# --------------------------------------------------------------------------------------------


def attention(q, k, v, dilation, config, is_causal=False, key_padding_mask=None, scale=None):
    """(out (B, N, H, D), lse (B, H, N), weights (B, H, N, N)) as float64 tensors.

    Python floats throughout; a key allowed in c branches contributes c * exp(score).
    """
    batch, seq_len, num_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = num_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    qs, ks, vs = (t.detach().to(torch.float64).tolist() for t in (q, k, v))
    out = [[[[0.0] * head_dim for _ in range(num_heads)] for _ in range(seq_len)] for _ in range(batch)]
    lse = [[[-math.inf] * seq_len for _ in range(num_heads)] for _ in range(batch)]
    weights = [[[[0.0] * seq_len for _ in range(seq_len)] for _ in range(num_heads)] for _ in range(batch)]
    for bi in range(batch):
        padded = None if key_padding_mask is None else [bool(x) for x in key_padding_mask[bi].tolist()]
        count = multiplicity(seq_len, num_heads, dilation, config, is_causal, padded)
        for h in range(num_heads):
            hk = h // group
            for i in range(seq_len):
                terms = []  # (log of the term's weight, key)
                for j in range(seq_len):
                    c = count[h][i][j]
                    if c == 0:
                        continue
                    score = scale * sum(a * b for a, b in zip(qs[bi][i][h], ks[bi][j][hk]))
                    terms.append((score + math.log(c), j))
                if not terms:
                    continue
                peak = max(t for t, _ in terms)
                total = math.fsum(math.exp(t - peak) for t, _ in terms)
                row_lse = peak + math.log(total)
                lse[bi][h][i] = row_lse
                for t, j in terms:
                    p = math.exp(t - row_lse)
                    weights[bi][h][i][j] = p
                    for d in range(head_dim):
                        out[bi][i][h][d] += p * vs[bi][j][hk][d]
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return as_tensor(out), as_tensor(lse), as_tensor(weights)
