"""Frozen, validated configurations: the sparse block layout and the dilation branches.

Everything that decides *which pairs attend* is a field of one of these two dataclasses, so a
configuration can be hashed, cached on, fingerprinted across ring ranks and printed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

PATTERN_TYPES = ("dense", "local_window", "dilated_sparse", "global_local", "random", "custom")
HEAD_MODES = ("split", "all")
# Axis order of q, k, v and out: (B, N, H, D) as the seed and dilated-attention-pytorch, or
# (B, H, N, D) as scaled_dot_product_attention and FlexAttention (docs/semantics.md section 1).
LAYOUTS = ("bnhd", "bhnd")


def _require_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class SparsePatternConfig:
    """Block layout in the compacted coordinates of one (branch, segment, offset) lattice.

    The layout is a function of the number of blocks ``nb`` alone (docs/semantics.md section 3).
    """

    pattern_type: str = "dilated_sparse"
    sparsity_ratio: float = 0.1
    block_size: int = 128
    local_window_size: int = 512
    global_tokens: int = 128
    seed: int = 0
    # A tensor does not hash or compare by value; ``layout_fingerprint`` stands in for it.
    block_layout: torch.Tensor | None = field(default=None, compare=False, repr=False)
    layout_fingerprint: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.pattern_type, str) or self.pattern_type not in PATTERN_TYPES:
            raise ValueError(f"pattern_type must be one of {PATTERN_TYPES}, got {self.pattern_type!r}")
        if isinstance(self.sparsity_ratio, bool) or not isinstance(self.sparsity_ratio, (int, float)):
            raise TypeError(f"sparsity_ratio must be a float in (0, 1], got {self.sparsity_ratio!r}")
        if not (0.0 < float(self.sparsity_ratio) <= 1.0) or math.isnan(float(self.sparsity_ratio)):
            raise ValueError(f"sparsity_ratio must be in (0, 1], got {self.sparsity_ratio!r}")
        _require_int("block_size", self.block_size, 1)
        _require_int("local_window_size", self.local_window_size, 0)
        _require_int("global_tokens", self.global_tokens, 0)
        _require_int("seed", self.seed, 0)
        if self.pattern_type == "custom":
            layout = self.block_layout
            if not isinstance(layout, torch.Tensor):
                raise TypeError(
                    "block_layout must be a bool tensor (NB, NB) for pattern_type='custom', "
                    f"got {type(layout).__name__}"
                )
            if layout.dtype != torch.bool:
                raise TypeError(f"block_layout must have dtype torch.bool, got {layout.dtype}")
            if layout.dim() != 2 or layout.shape[0] != layout.shape[1] or layout.shape[0] == 0:
                raise ValueError(f"block_layout must be square (NB, NB) with NB >= 1, got shape {tuple(layout.shape)}")
            layout = layout.detach().to("cpu").contiguous()
            object.__setattr__(self, "block_layout", layout)
            digest = hashlib.sha1(layout.numpy().tobytes()).hexdigest()
            object.__setattr__(self, "layout_fingerprint", f"{layout.shape[0]}:{digest}")
        elif self.block_layout is not None:
            raise ValueError(
                f"block_layout is only used with pattern_type='custom', got pattern_type={self.pattern_type!r}"
            )

    @property
    def local_radius_blocks(self) -> int:
        """Blocks on each side of the diagonal that local_window keeps."""
        return self.local_window_size // (2 * self.block_size)

    @property
    def global_blocks(self) -> int:
        return -(-self.global_tokens // self.block_size)

    @property
    def dilated_stride(self) -> int:
        """sigma of dilated_sparse: every sigma-th block diagonal is kept."""
        return max(1, round(1.0 / float(self.sparsity_ratio)))


@dataclass(frozen=True)
class DilationConfig:
    """The dilation branches: one (segment length, dilation rate) pair per branch, and the head mode."""

    segment_lengths: tuple[int, ...]
    dilation_rates: tuple[int, ...]
    head_mode: str = "split"

    def __post_init__(self) -> None:
        for name in ("segment_lengths", "dilation_rates"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise TypeError(f"{name} must be a sequence of ints >= 1, got {value!r}")
            value = tuple(value)
            for index, item in enumerate(value):
                _require_int(f"{name}[{index}]", item, 1)
            object.__setattr__(self, name, value)
        if len(self.segment_lengths) == 0:
            raise ValueError("segment_lengths must hold at least one branch, got ()")
        if len(self.segment_lengths) != len(self.dilation_rates):
            raise ValueError(
                "segment_lengths and dilation_rates must have the same length, got "
                f"segment_lengths={self.segment_lengths} (G={len(self.segment_lengths)}) and "
                f"dilation_rates={self.dilation_rates} (G={len(self.dilation_rates)})"
            )
        if self.head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode must be one of {HEAD_MODES}, got {self.head_mode!r}")

    @property
    def num_branches(self) -> int:
        return len(self.segment_lengths)
