"""The fast path: block-sparse torch / flex / triton backends, the ring and the nn.Module API."""

from reference.config import DilationConfig, SparsePatternConfig

from .dispatch import BACKENDS, Case, Choice, FlexOptions, TorchOptions, TritonOptions, choose, resolve_backend
from .module import BlockSparseRingDilatedAttention, BlockSparseRingMultiheadDilatedAttention
from .plan import CallPlan

# The seed project's names.
BlockSparseRingDilatedAttentionV2 = BlockSparseRingDilatedAttention
BlockSparseRingMultiheadDilatedAttentionV2 = BlockSparseRingMultiheadDilatedAttention

__all__ = [
    "BACKENDS",
    "BlockSparseRingDilatedAttention",
    "BlockSparseRingDilatedAttentionV2",
    "BlockSparseRingMultiheadDilatedAttention",
    "BlockSparseRingMultiheadDilatedAttentionV2",
    "CallPlan",
    "Case",
    "Choice",
    "DilationConfig",
    "FlexOptions",
    "SparsePatternConfig",
    "TorchOptions",
    "TritonOptions",
    "choose",
    "resolve_backend",
]
