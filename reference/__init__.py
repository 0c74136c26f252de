"""The slow, obviously-correct reference, and the single home of the semantics of docs/semantics.md."""

from .config import HEAD_MODES, PATTERN_TYPES, DilationConfig, SparsePatternConfig
from .dense import BlockSparseRingDilatedAttention, partial_attention
from .merge import merge_all, merge_partials
from .ring_schedule import zigzag_pieces
from .semantics import (
    AttentionGeometry,
    BlockList,
    BlockTable,
    BranchGeometry,
    active_block_count,
    active_pair_count,
    block_list,
    block_table,
    block_tables,
    dense_multiplicity,
    layout_mask,
)
from .verification import Verdict, assert_within_budget, compare, weights_inherited_budget

BlockSparseRingDilatedAttentionV2 = BlockSparseRingDilatedAttention

__all__ = [
    "HEAD_MODES",
    "PATTERN_TYPES",
    "DilationConfig",
    "SparsePatternConfig",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingDilatedAttentionV2",
    "merge_all",
    "merge_partials",
    "partial_attention",
    "AttentionGeometry",
    "BlockList",
    "BlockTable",
    "BranchGeometry",
    "active_block_count",
    "active_pair_count",
    "block_list",
    "block_table",
    "block_tables",
    "dense_multiplicity",
    "layout_mask",
    "Verdict",
    "assert_within_budget",
    "compare",
    "weights_inherited_budget",
    "zigzag_pieces",
]
