"""Exact sizes and counts, computed, never measured: bytes of named tensors, useful FLOPs, block densities.

Analytic bytes are exact sizes of named tensors, not fitted numbers: one dense N x N weight tensor
``B*H*N*N*s``, the outputs ``out`` (+ ``lse``), and the sparse weights (``sparse_weights_bytes``, the
same tensors ``SparseAttentionWeights.nbytes`` counts). Pair and block counts come from
``reference.semantics`` (docs/semantics.md sections 2 and 3).
"""

from __future__ import annotations

from reference import active_block_count, active_pair_count

from .methods import FULL_ATTENTION_METHODS
from .settings import MemorySetting, pattern_config


def dense_weights_bytes(seq_len: int, setting: MemorySetting) -> int:
    """One dense (B, H, N, N) tensor in the setting's dtype: what the seed's 'Original' returned."""
    return setting.batch * setting.heads * seq_len * seq_len * setting.element_size


def output_bytes(seq_len: int, setting: MemorySetting) -> int:
    """out (B, N, H, D) in the input dtype plus lse (B, H, N) float32: what any exact method must write."""
    s = setting
    return s.batch * seq_len * s.heads * (s.head_dim * s.element_size + 4)


def sparse_weights_blocks(seq_len: int, setting: MemorySetting, pattern: str, is_causal: bool = False) -> int:
    """Stored blocks of the sparse weights: active (query block, key block) pairs summed over heads."""
    return active_block_count(setting.geometry(seq_len), pattern_config(pattern, setting), is_causal)


def sparse_weights_bytes(seq_len: int, setting: MemorySetting, pattern: str, is_causal: bool = False) -> int:
    """Bytes of ``SparseAttentionWeights``: float32 values (B, NBLK, b, b) plus per-block int64 indices
    (query block, key block, head, branch) and int64 query and key positions (NBLK, b) each."""
    blocks = sparse_weights_blocks(seq_len, setting, pattern, is_causal)
    b = setting.block_size
    return blocks * (setting.batch * b * b * 4 + 8 * (4 + 2 * b))


def analytic_bytes(method: str, seq_len: int, setting: MemorySetting, pattern: str | None) -> dict:
    """The exact sizes of the named tensors a method must hold (see the module docstring)."""
    record = {"nxn_bytes": dense_weights_bytes(seq_len, setting), "output_bytes": output_bytes(seq_len, setting)}
    if method == "optimized+weights":
        record["weights_bytes"] = sparse_weights_bytes(seq_len, setting, pattern)
    return record


def estimated_peak_bytes(method: str, seq_len: int, setting: MemorySetting) -> int:
    """A generous upper estimate, used only to skip runs that would not fit (never plotted)."""
    s = setting
    nxn = s.batch * s.heads * seq_len * seq_len
    if method == "dense_nxn":
        return 3 * nxn * max(4, s.element_size)
    if method == "reference":
        return nxn * (3 * 8 + 8) + 2 * s.heads * seq_len * seq_len * 8
    return 0


def useful_flops(method: str, seq_len: int, setting: MemorySetting, pattern: str | None) -> int:
    """4 x (allowed query-key pairs) x D x B: the work a method must do (full attention for SDPA/dense)."""
    if method in FULL_ATTENTION_METHODS:
        pairs = setting.heads * seq_len * seq_len
    else:
        pairs = active_pair_count(setting.geometry(seq_len), pattern_config(pattern, setting))
    return 4 * pairs * setting.head_dim * setting.batch


def density_rows(setting: MemorySetting, patterns, seq_lens, is_causal: bool = False) -> list[dict]:
    """Per (pattern, N): active blocks and pairs, their fraction of dilated-dense and of full N x N, weights MiB."""
    rows = []
    for seq_len in seq_lens:
        geometry = setting.geometry(seq_len)
        dense_blocks = active_block_count(geometry, pattern_config("dense", setting), is_causal)
        for pattern in patterns:
            config = pattern_config(pattern, setting)
            blocks = active_block_count(geometry, config, is_causal)
            pairs = active_pair_count(geometry, config, is_causal)
            rows.append(
                {
                    "pattern": pattern,
                    "seq_len": seq_len,
                    "active_blocks": blocks,
                    "block_density": blocks / dense_blocks,
                    "pairs_over_full_NxN": pairs / (setting.heads * seq_len * seq_len),
                    "weights_MiB": sparse_weights_bytes(seq_len, setting, pattern, is_causal) / 2**20,
                    "dense_NxN_MiB": dense_weights_bytes(seq_len, setting) / 2**20,
                }
            )
    return rows
