"""The configurations the experiments measure: the seed's shape, a measurement setting, each pattern's settings.

Nothing here measures or draws; the measuring modules (``memory``, ``timing``), the exact counts
(``analytic``) and the CLIs build on these.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from reference import AttentionGeometry, DilationConfig, SparsePatternConfig

# The seed project's configuration (its README's examples).
SEED_SEGMENTS = (2048, 4096, 8192)
SEED_RATES = (1, 2, 4)
SEED_BLOCK = 128


@dataclass(frozen=True)
class MemorySetting:
    """Shapes and configuration of one measurement (everything but N and the pattern)."""

    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: str = "float32"
    segment_lengths: tuple[int, ...] = SEED_SEGMENTS
    dilation_rates: tuple[int, ...] = SEED_RATES
    block_size: int = SEED_BLOCK
    backend: str = "auto"
    work_size: int = 4096
    head_mode: str = "split"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=self.torch_dtype).element_size()

    def scaled_down(self, factor: int) -> MemorySetting:
        """Segments and block size divided by ``factor``: the seed's shape at sizes a CPU runs live."""
        return replace(
            self,
            segment_lengths=tuple(max(1, w // factor) for w in self.segment_lengths),
            block_size=max(1, self.block_size // factor),
        )

    def geometry(self, seq_len: int) -> AttentionGeometry:
        return AttentionGeometry(
            DilationConfig(self.segment_lengths, self.dilation_rates, self.head_mode), seq_len, self.heads
        )

    def describe(self) -> str:
        return (
            f"B={self.batch}, H={self.heads}, D={self.head_dim}, {self.dtype}, segments {list(self.segment_lengths)}, "
            f"rates {list(self.dilation_rates)}, block {self.block_size}"
            + ("" if self.head_mode == "split" else f", head_mode {self.head_mode}")
        )


def pattern_config(pattern: str, setting: MemorySetting) -> SparsePatternConfig:
    """The seed's settings of each pattern type, with token sizes scaled with the block size.

    At block 128: local window 512 tokens, 128 global tokens, sparsity 0.1 (the seed's examples);
    ``custom`` is a band of width 3 blocks, large enough for every segment.
    """
    b = setting.block_size
    overrides = {}
    if pattern == "custom":
        nb = -(-max(setting.segment_lengths) // b)
        band = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).abs() <= 1
        overrides["block_layout"] = band
    return SparsePatternConfig(
        pattern_type=pattern, sparsity_ratio=0.1, block_size=b, local_window_size=4 * b, global_tokens=b, **overrides
    )
