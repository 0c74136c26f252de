"""The fast path: block-sparse torch / flex / triton backends, the ring and the nn.Module API."""

from reference.config import DilationConfig, SparsePatternConfig

from .module import (
    BACKENDS,
    BlockSparseRingDilatedAttention,
    BlockSparseRingMultiheadDilatedAttention,
    resolve_backend,
)
from .plan import CallPlan

# The seed project's names.
BlockSparseRingDilatedAttentionV2 = BlockSparseRingDilatedAttention
BlockSparseRingMultiheadDilatedAttentionV2 = BlockSparseRingMultiheadDilatedAttention

__all__ = [
    "BACKENDS", "BlockSparseRingDilatedAttention", "BlockSparseRingDilatedAttentionV2",
    "BlockSparseRingMultiheadDilatedAttention", "BlockSparseRingMultiheadDilatedAttentionV2",
    "CallPlan", "DilationConfig", "SparsePatternConfig", "resolve_backend",
]
