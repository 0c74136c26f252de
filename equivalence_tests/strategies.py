"""Hypothesis strategies for block-sparse ring dilated attention, one per concern.

Exported so that the equivalence suite, the unit tests and anyone testing a variant draw
the same kinds of cases. Sizes are small by default (N <= 64, D <= 16) so that the dense
float64 reference stays fast; every strategy takes arguments to restrict what it draws
(e.g. a backend that needs power-of-two block sizes passes ``block_sizes=(16, 32)``).

Usage::

    from hypothesis import given, strategies as st
    from equivalence_tests import strategies as s

    @given(case=s.attention_cases(), seed=st.integers(0, 2**31 - 1))
    def test_something(case, seed):
        q, k, v, key_padding_mask = s.make_inputs(case, torch.float32, "cpu", seed)
        module = MyModule(**s.module_kwargs(case))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from hypothesis import strategies as st

from reference.config import HEAD_MODES, LAYOUTS, PATTERN_TYPES, DilationConfig, SparsePatternConfig

__all__ = [
    "DEFAULT_MAX_SEQ_LEN",
    "DEFAULT_MAX_HEAD_DIM",
    "AttentionCase",
    "AttentionInputs",
    "Shape",
    "attention_cases",
    "block_sizes",
    "causal_flags",
    "dilations",
    "dtypes",
    "head_modes",
    "input_layouts",
    "key_padding_masks",
    "layouts",
    "make_inputs",
    "module_kwargs",
    "ring_splits",
    "shapes",
    "sparsity_ratios",
]

DEFAULT_MAX_SEQ_LEN = 64
DEFAULT_MAX_HEAD_DIM = 16
_DEFAULT_MAX_BLOCK_SIZE = 8


def _primes_up_to(n: int) -> list[int]:
    return [p for p in range(2, n + 1) if all(p % d for d in range(2, math.isqrt(p) + 1))]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# --------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """Tensor sizes of one call: q (B, N, H, D), k and v (B, N, H_kv, D)."""

    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.seq_len, self.num_heads, self.head_dim)

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.seq_len, self.num_kv_heads, self.head_dim)


def _seq_lens(min_seq_len: int, max_seq_len: int) -> st.SearchStrategy[int]:
    """Lengths that are a multiple of nothing (primes) are drawn as often as arbitrary ones."""
    primes = [p for p in _primes_up_to(max_seq_len) if p >= min_seq_len]
    anything = st.integers(min_seq_len, max_seq_len)
    return st.one_of(st.sampled_from(primes), anything) if primes else anything


@st.composite
def shapes(
    draw,
    max_batch: int = 2,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    min_seq_len: int = 1,
    max_heads: int = 6,
    min_heads: int = 1,
    max_head_dim: int = DEFAULT_MAX_HEAD_DIM,
    head_dims=None,
    gqa: bool = True,
) -> Shape:
    """A :class:`Shape`: B in [1, max_batch], N (primes included), H, H_kv dividing H, D.

    ``head_dims`` restricts D to the given values (e.g. a kernel's supported head dims);
    ``gqa=False`` forces H_kv = H.
    """
    batch = draw(st.integers(1, max_batch))
    seq_len = draw(_seq_lens(min_seq_len, max_seq_len))
    num_heads = draw(st.integers(min_heads, max_heads))
    num_kv_heads = draw(st.sampled_from(_divisors(num_heads))) if gqa else num_heads
    head_dim = draw(st.sampled_from(tuple(head_dims)) if head_dims is not None else st.integers(1, max_head_dim))
    return Shape(batch, seq_len, num_heads, num_kv_heads, head_dim)


# --------------------------------------------------------------------------------------------
# Dilation branches
# --------------------------------------------------------------------------------------------


def head_modes() -> st.SearchStrategy[str]:
    """``"split"`` or ``"all"`` (docs/semantics.md section 2)."""
    return st.sampled_from(HEAD_MODES)


@st.composite
def dilations(
    draw,
    num_heads: int,
    seq_len: int,
    head_mode: str | None = None,
    max_branches: int = 3,
    max_rate: int = 4,
) -> DilationConfig:
    """A :class:`reference.DilationConfig` valid for ``num_heads`` heads.

    Segment lengths range over [1, 2N + 2] (so some exceed N and act as N); rates over
    [1, max_rate] (so some do not divide the segment, and with few heads some positions lie on
    no lattice). ``head_mode=None`` draws it; "split" keeps G <= H.
    """
    mode = draw(head_modes()) if head_mode is None else head_mode
    most = max_branches if mode == "all" else min(max_branches, num_heads)
    num_branches = draw(st.integers(1, max(1, most)))
    segment = st.one_of(st.integers(1, seq_len), st.integers(seq_len + 1, 2 * seq_len + 2))
    segment_lengths = draw(st.lists(segment, min_size=num_branches, max_size=num_branches))
    rates = draw(st.lists(st.integers(1, max_rate), min_size=num_branches, max_size=num_branches))
    return DilationConfig(tuple(segment_lengths), tuple(rates), mode)


# --------------------------------------------------------------------------------------------
# Block layouts
# --------------------------------------------------------------------------------------------


def block_sizes(max_block_size: int = _DEFAULT_MAX_BLOCK_SIZE, allowed=None) -> st.SearchStrategy[int]:
    """Block sizes: 1 and non-powers of two included, or one of ``allowed`` when given."""
    if allowed is not None:
        return st.sampled_from(tuple(allowed))
    return st.one_of(st.just(1), st.integers(1, max_block_size))


def sparsity_ratios() -> st.SearchStrategy[float]:
    """Values in (0, 1]: round ones (1, 1/2, 1/3, ...) and arbitrary ones."""
    return st.one_of(
        st.sampled_from((1.0, 0.5, 1.0 / 3.0, 0.25, 0.1)),
        st.floats(min_value=0.01, max_value=1.0, allow_nan=False),
    )


@st.composite
def layouts(
    draw,
    max_block_size: int = _DEFAULT_MAX_BLOCK_SIZE,
    block_sizes=None,  # noqa: F811  (the argument shadows the strategy of the same name on purpose)
    pattern_types=None,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
) -> SparsePatternConfig:
    """A :class:`reference.SparsePatternConfig` of any pattern type (or one of ``pattern_types``).

    ``block_sizes`` restricts the block size to the given values. A custom layout gets
    NB = ceil(max_seq_len / b) + 1 blocks, enough for every segment of a sequence of at most
    ``max_seq_len`` tokens; it is a seeded random bool matrix, sometimes with empty rows.
    """
    pattern_type = draw(st.sampled_from(tuple(pattern_types) if pattern_types is not None else PATTERN_TYPES))
    block_size = draw(_block_size_strategy(max_block_size, block_sizes))
    most_blocks = -(-max_seq_len // block_size) + 1
    fields = dict(pattern_type=pattern_type, block_size=block_size)
    if pattern_type in ("dilated_sparse", "random"):
        fields["sparsity_ratio"] = draw(sparsity_ratios())
    if pattern_type in ("local_window", "global_local"):
        fields["local_window_size"] = draw(st.integers(0, 2 * block_size * most_blocks))
    if pattern_type == "global_local":
        fields["global_tokens"] = draw(st.integers(0, max_seq_len))
    if pattern_type == "random":
        fields["seed"] = draw(st.integers(0, 2**16))
    if pattern_type == "custom":
        density = draw(st.sampled_from((0.0, 0.2, 0.5, 0.9, 1.0)))
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        layout = torch.rand((most_blocks, most_blocks), generator=generator) < density
        if draw(st.booleans()):
            layout |= torch.eye(most_blocks, dtype=torch.bool)
        fields["block_layout"] = layout
    return SparsePatternConfig(**fields)


def _block_size_strategy(max_block_size: int, allowed) -> st.SearchStrategy[int]:
    return block_sizes(max_block_size, allowed)


# --------------------------------------------------------------------------------------------
# Call flags, masks, dtypes, ring splits
# --------------------------------------------------------------------------------------------


def causal_flags() -> st.SearchStrategy[bool]:
    """``is_causal``: True or False."""
    return st.booleans()


@st.composite
def _padding_mask_tensors(draw, batch: int, seq_len: int) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        kind = draw(st.sampled_from(("none", "full", "tail", "head", "scattered")))
        if kind == "none":
            row = [False] * seq_len
        elif kind == "full":
            row = [True] * seq_len
        elif kind == "tail":  # right padding, the usual batch layout
            keep = draw(st.integers(0, seq_len))
            row = [False] * keep + [True] * (seq_len - keep)
        elif kind == "head":
            pad = draw(st.integers(0, seq_len))
            row = [True] * pad + [False] * (seq_len - pad)
        else:
            row = draw(st.lists(st.booleans(), min_size=seq_len, max_size=seq_len))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(batch, seq_len)


def key_padding_masks(batch: int, seq_len: int, allow_none: bool = True) -> st.SearchStrategy:
    """``None`` or a CPU bool (B, N) mask (True = padding): per row no padding, full padding,
    a padded tail or head, or scattered padding."""
    tensors = _padding_mask_tensors(batch, seq_len)
    return st.one_of(st.none(), tensors) if allow_none else tensors


def input_layouts() -> st.SearchStrategy[str]:
    """The axis order q, k, v are stored in: "bnhd" or "bhnd" (docs/semantics.md section 1)."""
    return st.sampled_from(LAYOUTS)


def dtypes(allowed=(torch.float32, torch.bfloat16, torch.float16)) -> st.SearchStrategy[torch.dtype]:
    """One of the ``allowed`` floating dtypes."""
    return st.sampled_from(tuple(allowed))


@st.composite
def ring_splits(draw, seq_len: int, max_parts: int = 8, allow_empty: bool = False, min_parts: int = 1) -> list[int]:
    """Chunk lengths of a ring split of ``seq_len`` tokens: P in [min_parts, max_parts] contiguous
    chunks of uneven sizes summing to ``seq_len`` (chunks shorter than a block included).

    Zero-length chunks appear only with ``allow_empty=True``; without it P <= seq_len.
    """
    most = max_parts if allow_empty else min(max_parts, seq_len)
    parts = draw(st.integers(min(min_parts, most), most))
    if parts == 1:
        cuts = []
    elif allow_empty:
        cuts = draw(st.lists(st.integers(0, seq_len), min_size=parts - 1, max_size=parts - 1))
    else:
        cuts = draw(st.lists(st.integers(1, seq_len - 1), min_size=parts - 1, max_size=parts - 1, unique=True))
    bounds = [0, *sorted(cuts), seq_len]
    return [bounds[i + 1] - bounds[i] for i in range(parts)]


# --------------------------------------------------------------------------------------------
# Whole cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionCase:
    """Everything but the tensor values of one attention call."""

    shape: Shape
    dilation: DilationConfig
    sparse_config: SparsePatternConfig
    is_causal: bool
    key_padding_mask: torch.Tensor | None  # CPU bool (B, N) or None
    input_seed: int

    def describe(self) -> str:
        """One line for assertion messages (the custom layout prints as its fingerprint)."""
        mask = None if self.key_padding_mask is None else self.key_padding_mask.int().tolist()
        return (
            f"{self.shape}, {self.dilation}, {self.sparse_config} "
            f"(layout {self.sparse_config.layout_fingerprint}), is_causal={self.is_causal}, "
            f"key_padding_mask={mask}, input_seed={self.input_seed}"
        )


@st.composite
def attention_cases(
    draw,
    max_batch: int = 2,
    max_seq_len: int = 48,
    min_seq_len: int = 1,
    max_heads: int = 6,
    max_head_dim: int = DEFAULT_MAX_HEAD_DIM,
    head_dims=None,
    head_mode: str | None = None,
    max_branches: int = 3,
    max_rate: int = 4,
    max_block_size: int = _DEFAULT_MAX_BLOCK_SIZE,
    block_sizes=None,  # noqa: F811
    pattern_types=None,
    is_causal: bool | None = None,
    padding: bool = True,
    gqa: bool = True,
) -> AttentionCase:
    """A whole :class:`AttentionCase` at small sizes: shape, dilation (with head mode), layout,
    causal flag, key padding mask and a seed for the input values.

    Fix ``head_mode`` / ``is_causal`` to a value, or leave None to draw them; ``padding=False``
    never draws a key padding mask. The other arguments pass through to the strategies above.
    """
    shape = draw(
        shapes(
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            min_seq_len=min_seq_len,
            max_heads=max_heads,
            max_head_dim=max_head_dim,
            head_dims=head_dims,
            gqa=gqa,
        )
    )
    dilation = draw(dilations(shape.num_heads, shape.seq_len, head_mode, max_branches, max_rate))
    sparse_config = draw(
        layouts(
            max_block_size=max_block_size,
            block_sizes=block_sizes,
            pattern_types=pattern_types,
            max_seq_len=shape.seq_len,
        )
    )
    causal = draw(causal_flags()) if is_causal is None else bool(is_causal)
    mask = draw(key_padding_masks(shape.batch, shape.seq_len)) if padding else None
    seed = draw(st.integers(0, 2**31 - 1))
    return AttentionCase(shape, dilation, sparse_config, causal, mask, seed)


class AttentionInputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None


def make_inputs(case: AttentionCase, dtype=torch.float32, device="cpu", seed: int | None = None) -> AttentionInputs:
    """Fresh random q, k, v (standard normal, never zeros) for ``case``, and its mask on ``device``.

    Values are drawn in float32 on the CPU from a generator seeded with ``seed`` (default
    ``case.input_seed``) and then cast, so one seed gives the same inputs in every dtype and
    on every device.
    """
    generator = torch.Generator().manual_seed(case.input_seed if seed is None else int(seed))
    shape = case.shape
    tensors = [
        torch.randn(size, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
        for size in (shape.q_shape, shape.kv_shape, shape.kv_shape)
    ]
    mask = None if case.key_padding_mask is None else case.key_padding_mask.to(device)
    return AttentionInputs(*tensors, mask)


def module_kwargs(case: AttentionCase) -> dict:
    """Constructor arguments of a BlockSparseRingDilatedAttention module (either package) for ``case``."""
    return dict(
        segment_lengths=list(case.dilation.segment_lengths),
        dilation_rates=list(case.dilation.dilation_rates),
        sparse_config=case.sparse_config,
        head_mode=case.dilation.head_mode,
    )
