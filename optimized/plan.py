"""What one partial-attention call computes, as the backends receive it.

A ``CallPlan`` is hashable and carries everything but the tensors: the geometry, the layout,
causal, the scale and the [lo, hi) global position ranges of the query chunk and key chunk.
Backends ask it (and through it ``reference.semantics``) which blocks are active. A ``StepPair``
is a plan placed in tensors that hold several chunks (the pairs of one ring step, computed in one
launch by backends that can).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from reference.config import SparsePatternConfig
from reference.semantics import AttentionGeometry, BlockTable, block_tables


@dataclass(frozen=True)
class CallPlan:
    geometry: AttentionGeometry
    sparse_config: SparsePatternConfig
    is_causal: bool
    scale: float
    query_range: tuple[int, int]
    key_range: tuple[int, int]

    @classmethod
    def whole(cls, geometry, sparse_config, is_causal, scale) -> CallPlan:
        full = (0, geometry.seq_len)
        return cls(geometry, sparse_config, bool(is_causal), float(scale), full, full)

    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        # Computed once: the block-table caches hash a plan at every call (a ring step hashes one per chunk pair).
        return hash((self.geometry, self.sparse_config, self.is_causal, self.scale, self.query_range, self.key_range))

    @property
    def block_size(self) -> int:
        return self.sparse_config.block_size

    @property
    def query_start(self) -> int:
        return self.query_range[0]

    @property
    def key_start(self) -> int:
        return self.key_range[0]

    @functools.cached_property
    def tables(self) -> tuple[BlockTable, ...]:
        """One table per (branch, offset), restricted to this call's chunks."""
        return block_tables(self.geometry, self.sparse_config, self.is_causal, self.query_range, self.key_range)


@dataclass(frozen=True)
class StepPair:
    """One (query chunk, key chunk) pair of a ring step: its plan, and where its chunks sit in the step's tensors.

    Global position p is row ``p - query_shift`` of the step's q and accumulator, and row
    ``p - key_shift`` of its k, v and key padding mask.
    """

    plan: CallPlan
    query_shift: int
    key_shift: int

    @property
    def query_rows(self) -> tuple[int, int]:
        lo, hi = self.plan.query_range
        return lo - self.query_shift, hi - self.query_shift

    @property
    def key_rows(self) -> tuple[int, int]:
        lo, hi = self.plan.key_range
        return lo - self.key_shift, hi - self.key_shift
