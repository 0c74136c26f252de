"""The catalogue of inputs docs/semantics.md does not admit (issue 2, section 3).

Every entry must raise ValueError or TypeError whose message names the offending argument.
The module catalogue runs against every factory in ``MODULE_FACTORIES``; another module class
with the same constructor and call joins the catalogue by one line there.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

import reference
from reference import AttentionGeometry, DilationConfig, SparsePatternConfig

# Module classes under test: called with the constructor keywords of docs/semantics.md section 8.
MODULE_FACTORIES = [
    pytest.param(reference.BlockSparseRingDilatedAttention, id="reference"),
]

BATCH, SEQ_LEN, HEADS, KV_HEADS, HEAD_DIM = 2, 8, 4, 2, 4

VALID_MODULE = dict(
    segment_lengths=[4, 8],
    dilation_rates=[1, 2],
    sparse_config=SparsePatternConfig(pattern_type="dense", block_size=2),
    head_mode="split",
)


def valid_call() -> dict:
    """Keyword arguments of a call the module accepts: fresh random tensors."""
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(shape, generator=generator)  # noqa: E731
    return dict(
        q=randn(BATCH, SEQ_LEN, HEADS, HEAD_DIM),
        k=randn(BATCH, SEQ_LEN, KV_HEADS, HEAD_DIM),
        v=randn(BATCH, SEQ_LEN, KV_HEADS, HEAD_DIM),
        key_padding_mask=torch.zeros(BATCH, SEQ_LEN, dtype=torch.bool),
    )


@dataclass(frozen=True)
class BadInput:
    """One inadmissible input: constructor and call changes against the valid defaults.

    ``call`` maps an argument name to its replacement, or to a function of the valid call's
    arguments returning it. ``names``: words the error message must contain (the argument).
    """

    id: str
    names: tuple[str, ...]
    module: dict = field(default_factory=dict)
    call: dict[str, object | Callable[[dict], object]] = field(default_factory=dict)


def _with(name, change):
    """A call change that rewrites the valid tensor ``name`` with ``change(tensor)``."""
    return {name: lambda args: change(args[name])}


CATALOGUE = [
    # Tensor ranks.
    BadInput("q-rank-3", ("q",), call=_with("q", lambda t: t[0])),
    BadInput("k-rank-5", ("k",), call=_with("k", lambda t: t.unsqueeze(0))),
    BadInput("v-rank-2", ("v",), call=_with("v", lambda t: t[0, 0])),
    BadInput("q-not-a-tensor", ("q",), call=_with("q", lambda t: t.tolist())),
    # Mismatched sizes, dtype, device.
    BadInput("k-batch", ("k", "batch"), call=_with("k", lambda t: t[:1])),
    BadInput("v-batch", ("v", "batch"), call=_with("v", lambda t: t[:1])),
    BadInput("k-length", ("k", "sequence length"), call=_with("k", lambda t: t[:, :-1])),
    BadInput(
        "k-and-v-length", ("k", "sequence length"), call={"k": lambda a: a["k"][:, :-1], "v": lambda a: a["v"][:, :-1]}
    ),
    BadInput("v-length", ("v",), call=_with("v", lambda t: t[:, :-1])),
    BadInput("k-head-dim", ("k", "head dim"), call=_with("k", lambda t: t[..., :-1])),
    BadInput("v-head-dim", ("v", "head dim"), call=_with("v", lambda t: t[..., :-1])),
    BadInput("v-heads-differ-from-k", ("k", "v"), call=_with("v", lambda t: t[:, :, :1])),
    BadInput("k-dtype", ("k", "dtype"), call=_with("k", lambda t: t.double())),
    BadInput("v-dtype", ("v", "dtype"), call=_with("v", lambda t: t.half())),
    BadInput("k-device", ("k", "device"), call=_with("k", lambda t: t.to("meta"))),
    BadInput("v-device", ("v", "device"), call=_with("v", lambda t: t.to("meta"))),
    BadInput(
        "heads-not-a-multiple-of-kv-heads",
        ("H_kv",),
        call={
            "k": lambda a: a["k"][:, :, :1].expand(-1, -1, 3, -1),
            "v": lambda a: a["v"][:, :, :1].expand(-1, -1, 3, -1),
        },
    ),
    BadInput(
        "empty-sequence",
        ("q", "non-empty"),
        call={name: (lambda a, name=name: a[name][:, :0]) for name in ("q", "k", "v")} | {"key_padding_mask": None},
    ),
    # Non-floating inputs.
    BadInput("q-integer", ("q", "floating"), call=_with("q", lambda t: t.long())),
    BadInput("k-bool", ("k", "floating"), call=_with("k", lambda t: t > 0)),
    BadInput("v-integer", ("v", "floating"), call=_with("v", lambda t: t.int())),
    # key_padding_mask.
    BadInput("mask-float", ("key_padding_mask", "dtype"), call=_with("key_padding_mask", lambda t: t.float())),
    BadInput("mask-long", ("key_padding_mask", "dtype"), call=_with("key_padding_mask", lambda t: t.long())),
    BadInput(
        "mask-too-long",
        ("key_padding_mask", "shape"),
        call=_with("key_padding_mask", lambda t: torch.zeros(BATCH, SEQ_LEN + 1, dtype=torch.bool)),
    ),
    BadInput("mask-per-head", ("key_padding_mask", "shape"), call=_with("key_padding_mask", lambda t: t.unsqueeze(1))),
    BadInput("mask-batch", ("key_padding_mask", "shape"), call=_with("key_padding_mask", lambda t: t[:1])),
    BadInput("mask-not-a-tensor", ("key_padding_mask",), call=_with("key_padding_mask", lambda t: t.tolist())),
    BadInput("mask-device", ("key_padding_mask", "device"), call=_with("key_padding_mask", lambda t: t.to("meta"))),
    BadInput("scale-not-a-number", ("scale",), call={"scale": "0.5"}),
    # Dilation configuration.
    BadInput("fewer-rates-than-segments", ("segment_lengths", "dilation_rates"), module=dict(dilation_rates=[1])),
    BadInput("more-rates-than-segments", ("segment_lengths", "dilation_rates"), module=dict(dilation_rates=[1, 2, 4])),
    BadInput("no-branch", ("segment_lengths",), module=dict(segment_lengths=[], dilation_rates=[])),
    BadInput("zero-segment", ("segment_lengths",), module=dict(segment_lengths=[0, 8])),
    BadInput("negative-segment", ("segment_lengths",), module=dict(segment_lengths=[4, -8])),
    BadInput("float-segment", ("segment_lengths",), module=dict(segment_lengths=[4.0, 8])),
    BadInput("zero-rate", ("dilation_rates",), module=dict(dilation_rates=[0, 2])),
    BadInput("negative-rate", ("dilation_rates",), module=dict(dilation_rates=[1, -2])),
    BadInput("unknown-head-mode", ("head_mode",), module=dict(head_mode="interleaved")),
    BadInput(
        "fewer-heads-than-branches-in-split-mode",
        ("head_mode", "num_heads"),
        module=dict(segment_lengths=[2, 4, 8, 8, 8], dilation_rates=[1, 1, 1, 2, 2]),
    ),
    # Sparse configuration.
    BadInput("sparse-config-not-a-config", ("sparse_config",), module=dict(sparse_config="dense")),
    BadInput(
        "custom-layout-smaller-than-a-segment-needs",
        ("block_layout",),  # segment 8, rate 1: 4 blocks
        module=dict(
            dilation_rates=[1, 1],
            sparse_config=SparsePatternConfig(
                pattern_type="custom", block_size=2, block_layout=torch.ones(3, 3, dtype=torch.bool)
            ),
        ),
    ),
]


def _run(factory, bad: BadInput):
    module = factory(**(VALID_MODULE | bad.module))
    args = valid_call()
    args |= {name: change(args) if callable(change) else change for name, change in bad.call.items()}
    module(**args)


def _assert_names(exc: BaseException, names):
    message = str(exc)
    for name in names:
        assert re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", message), f"{name!r} is not named in: {message}"


@pytest.mark.parametrize("factory", MODULE_FACTORIES)
def test_the_valid_defaults_are_accepted(factory):
    # The catalogue changes one thing at a time from these; they must be valid themselves.
    factory(**VALID_MODULE)(**valid_call())


@pytest.mark.parametrize("bad", CATALOGUE, ids=[bad.id for bad in CATALOGUE])
@pytest.mark.parametrize("factory", MODULE_FACTORIES)
def test_module_rejects_inadmissible_input_naming_the_argument(factory, bad):
    with pytest.raises((ValueError, TypeError)) as info:
        _run(factory, bad)
    _assert_names(info.value, bad.names)


# --------------------------------------------------------------------------------------------
# The configurations on their own
# --------------------------------------------------------------------------------------------


def _bool(n, m=None):
    return torch.ones(n, n if m is None else m, dtype=torch.bool)


CONFIG_CATALOGUE = [
    # (id, constructor, keyword arguments, names the message must contain)
    ("ratio-zero", SparsePatternConfig, dict(sparsity_ratio=0.0), ("sparsity_ratio",)),
    ("ratio-negative", SparsePatternConfig, dict(sparsity_ratio=-0.1), ("sparsity_ratio",)),
    ("ratio-above-one", SparsePatternConfig, dict(sparsity_ratio=1.5), ("sparsity_ratio",)),
    ("ratio-nan", SparsePatternConfig, dict(sparsity_ratio=math.nan), ("sparsity_ratio",)),
    ("ratio-inf", SparsePatternConfig, dict(sparsity_ratio=math.inf), ("sparsity_ratio",)),
    ("ratio-string", SparsePatternConfig, dict(sparsity_ratio="0.5"), ("sparsity_ratio",)),
    ("ratio-bool", SparsePatternConfig, dict(sparsity_ratio=True), ("sparsity_ratio",)),
    ("unknown-pattern", SparsePatternConfig, dict(pattern_type="banded"), ("pattern_type",)),
    ("pattern-not-a-string", SparsePatternConfig, dict(pattern_type=None), ("pattern_type",)),
    ("block-size-zero", SparsePatternConfig, dict(block_size=0), ("block_size",)),
    ("block-size-float", SparsePatternConfig, dict(block_size=16.0), ("block_size",)),
    ("window-negative", SparsePatternConfig, dict(local_window_size=-1), ("local_window_size",)),
    ("global-negative", SparsePatternConfig, dict(global_tokens=-1), ("global_tokens",)),
    ("seed-negative", SparsePatternConfig, dict(seed=-1), ("seed",)),
    ("custom-without-layout", SparsePatternConfig, dict(pattern_type="custom"), ("block_layout",)),
    (
        "custom-layout-not-a-tensor",
        SparsePatternConfig,
        dict(pattern_type="custom", block_layout=[[True]]),
        ("block_layout",),
    ),
    (
        "custom-layout-not-bool",
        SparsePatternConfig,
        dict(pattern_type="custom", block_layout=torch.ones(3, 3)),
        ("block_layout",),
    ),
    (
        "custom-layout-not-square",
        SparsePatternConfig,
        dict(pattern_type="custom", block_layout=_bool(3, 4)),
        ("block_layout",),
    ),
    (
        "custom-layout-3d",
        SparsePatternConfig,
        dict(pattern_type="custom", block_layout=torch.ones(2, 2, 2, dtype=torch.bool)),
        ("block_layout",),
    ),
    ("custom-layout-empty", SparsePatternConfig, dict(pattern_type="custom", block_layout=_bool(0)), ("block_layout",)),
    (
        "layout-without-custom",
        SparsePatternConfig,
        dict(pattern_type="dense", block_layout=_bool(2)),
        ("block_layout",),
    ),
    (
        "rates-length",
        DilationConfig,
        dict(segment_lengths=(4, 8), dilation_rates=(1,)),
        ("segment_lengths", "dilation_rates"),
    ),
    ("no-branch", DilationConfig, dict(segment_lengths=(), dilation_rates=()), ("segment_lengths",)),
    ("segment-zero", DilationConfig, dict(segment_lengths=(0,), dilation_rates=(1,)), ("segment_lengths",)),
    ("rate-zero", DilationConfig, dict(segment_lengths=(4,), dilation_rates=(0,)), ("dilation_rates",)),
    ("rate-float", DilationConfig, dict(segment_lengths=(4,), dilation_rates=(1.5,)), ("dilation_rates",)),
    ("rate-bool", DilationConfig, dict(segment_lengths=(4,), dilation_rates=(True,)), ("dilation_rates",)),
    ("segments-a-string", DilationConfig, dict(segment_lengths="48", dilation_rates=(1, 2)), ("segment_lengths",)),
    ("rates-an-int", DilationConfig, dict(segment_lengths=(4,), dilation_rates=2), ("dilation_rates",)),
    (
        "unknown-head-mode",
        DilationConfig,
        dict(segment_lengths=(4,), dilation_rates=(1,), head_mode="mixed"),
        ("head_mode",),
    ),
    (
        "fewer-heads-than-branches",
        AttentionGeometry,
        dict(dilation=DilationConfig((4, 8), (1, 2), "split"), seq_len=8, num_heads=1),
        ("num_heads", "head_mode"),
    ),
    (
        "seq-len-zero",
        AttentionGeometry,
        dict(dilation=DilationConfig((4,), (1,)), seq_len=0, num_heads=1),
        ("seq_len",),
    ),
]


@pytest.mark.parametrize(
    "constructor, kwargs, names", [case[1:] for case in CONFIG_CATALOGUE], ids=[case[0] for case in CONFIG_CATALOGUE]
)
def test_config_rejects_inadmissible_values_naming_the_field(constructor, kwargs, names):
    with pytest.raises((ValueError, TypeError)) as info:
        constructor(**kwargs)
    _assert_names(info.value, names)


def test_custom_layout_too_small_is_accepted_until_a_call_needs_more_blocks():
    config = SparsePatternConfig(pattern_type="custom", block_size=2, block_layout=_bool(3))
    module = reference.BlockSparseRingDilatedAttention([8], [1], config)
    args = valid_call()
    module(**{name: t[:, :6] for name, t in args.items()})  # N = 6: 3 blocks of 2, enough
    with pytest.raises(ValueError) as info:
        module(**args)  # 4 blocks of 2 needed
    _assert_names(info.value, ("block_layout",))
