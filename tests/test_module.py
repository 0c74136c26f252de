"""The public module API of the fast path (docs/semantics.md section 8, issue 3 section 2).

Return conventions, defaults, the seed's aliases, backend selection (auto records what it ran;
an explicit backend never falls back), the nn.MultiheadAttention-style multihead module, its
initialisation, and the bad-input catalogue applied to the optimized module.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import optimized
import reference
from optimized import BlockSparseRingDilatedAttention, BlockSparseRingMultiheadDilatedAttention, SparsePatternConfig
from reference.verification import assert_within_budget, compare

SEGMENTS, RATES = [8, 16], [1, 2]
LOCAL = SparsePatternConfig(pattern_type="local_window", block_size=4, local_window_size=8)


def _randn(*shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _qkv(batch=2, seq_len=40, heads=4, kv_heads=2, head_dim=8, dtype=torch.float32):
    return (
        _randn(batch, seq_len, heads, head_dim, seed=11, dtype=dtype),
        _randn(batch, seq_len, kv_heads, head_dim, seed=12, dtype=dtype),
        _randn(batch, seq_len, kv_heads, head_dim, seed=13, dtype=dtype),
    )


def _padding(batch=2, seq_len=40) -> torch.Tensor:
    mask = torch.zeros(batch, seq_len, dtype=torch.bool)
    mask[0, 30:] = True  # a padded tail
    mask[1, ::7] = True  # scattered padding
    return mask


def _assert_matches_reference(name, actual, inputs, sparse_config, call=None, head_mode="split"):
    """``actual`` (out of the call ``call`` on ``inputs``) within docs/numerics.md's budget."""
    call = call or {}
    kwargs = dict(segment_lengths=SEGMENTS, dilation_rates=RATES, sparse_config=sparse_config, head_mode=head_mode)
    out64, lse64 = reference.BlockSparseRingDilatedAttention(**kwargs)(*inputs, **call, return_lse=True)
    out_lowp = reference.BlockSparseRingDilatedAttention(**kwargs, compute_dtype=None)(*inputs, **call)
    empty = torch.isneginf(lse64).transpose(1, 2).unsqueeze(-1)
    verdict = compare(name, actual, out64, out_lowp, inputs[0].dtype, empty=empty)
    assert_within_budget(verdict, f"{kwargs}, call {call}")


# --------------------------------------------------------------------------------------------
# Return conventions and defaults
# --------------------------------------------------------------------------------------------


def test_return_conventions():
    q, k, v = _qkv()
    attention = BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=LOCAL, backend="torch")
    out = attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype

    out_w, weights = attention(q, k, v, return_attention_weights=True)
    out_l, lse = attention(q, k, v, return_lse=True)
    out_wl, weights_wl, lse_wl = attention(q, k, v, return_attention_weights=True, return_lse=True)
    for other in (out_w, out_l, out_wl):
        assert torch.equal(other, out)
    assert lse.shape == (2, 4, 40) and lse.dtype == torch.float32
    assert torch.equal(lse_wl, lse)
    for w in (weights, weights_wl):
        assert not isinstance(w, torch.Tensor), "weights must be the sparse dict-like, not a dense tensor"
        assert {"block_indices", "block_values", "shape", "block_size"} <= set(w.keys())
        assert tuple(w["shape"]) == (2, 4, 40, 40) and w["block_size"] == LOCAL.block_size
    assert torch.equal(weights.to_dense(), weights_wl.to_dense())
    _assert_matches_reference("out", out, (q, k, v), LOCAL)


def test_sparse_config_none_means_dense():
    q, k, v = _qkv()
    attention = BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=None, backend="torch")
    assert attention.sparse_config.pattern_type == "dense"
    out = attention(q, k, v, is_causal=True)
    _assert_matches_reference(
        "out", out, (q, k, v), SparsePatternConfig(pattern_type="dense", block_size=5), call={"is_causal": True}
    )


def test_head_mode_all_and_key_padding_pass_through():
    q, k, v = _qkv()
    mask = _padding()
    attention = BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=LOCAL, head_mode="all", backend="torch")
    out = attention(q, k, v, key_padding_mask=mask)
    _assert_matches_reference("out", out, (q, k, v), LOCAL, call={"key_padding_mask": mask}, head_mode="all")


def test_seed_aliases_are_exported():
    assert optimized.BlockSparseRingDilatedAttentionV2 is optimized.BlockSparseRingDilatedAttention
    assert optimized.BlockSparseRingMultiheadDilatedAttentionV2 is optimized.BlockSparseRingMultiheadDilatedAttention
    assert optimized.SparsePatternConfig is reference.SparsePatternConfig
    for name in (
        "BlockSparseRingDilatedAttentionV2",
        "BlockSparseRingMultiheadDilatedAttentionV2",
        "SparsePatternConfig",
        "BlockSparseRingDilatedAttention",
        "BlockSparseRingMultiheadDilatedAttention",
    ):
        assert name in optimized.__all__


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


def test_auto_backend_resolves_by_device_and_is_recorded():
    assert optimized.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert optimized.resolve_backend("auto", torch.device("cuda")) == "triton"
    for explicit in ("torch", "flex", "triton"):
        assert optimized.resolve_backend(explicit, torch.device("cpu")) == explicit
        assert optimized.resolve_backend(explicit, torch.device("cuda")) == explicit
    attention = BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=LOCAL)
    assert attention.backend == "auto" and attention.last_backend is None
    q, k, v = _qkv()
    attention(q, k, v)
    assert attention.last_backend == "torch"  # this suite's device is the CPU
    assert "last_backend='torch'" in repr(attention)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (auto = triton there)")
def test_auto_backend_on_cuda_runs_triton():
    q, k, v = (t.cuda() for t in _qkv(head_dim=16))
    attention = BlockSparseRingDilatedAttention(
        SEGMENTS, RATES, sparse_config=SparsePatternConfig("local_window", block_size=16, local_window_size=32)
    )
    attention(q, k, v)
    assert attention.last_backend == "triton" and "last_backend='triton'" in repr(attention)


@pytest.mark.parametrize("name", ["cuda", "Torch", "", "fast", None, 3])
def test_bad_backend_names_raise_naming_backend(name):
    with pytest.raises(ValueError, match="backend") as error:
        BlockSparseRingDilatedAttention(SEGMENTS, RATES, backend=name)
    assert repr(name) in str(error.value)
    with pytest.raises(ValueError, match="backend"):
        optimized.resolve_backend(name, torch.device("cpu"))
    with pytest.raises(ValueError, match="backend"):
        BlockSparseRingMultiheadDilatedAttention(16, 2, SEGMENTS, RATES, backend=name)


def _has_triton_backend() -> bool:
    return importlib.util.find_spec("optimized.triton_backend") is not None


@pytest.mark.skipif(not _has_triton_backend(), reason="optimized/triton_backend.py is not there yet")
def test_explicit_triton_never_falls_back_to_torch():
    """block_size=3 is outside what the kernel handles: the triton error, not a silent torch run."""
    from optimized import triton_backend

    config = SparsePatternConfig(pattern_type="local_window", block_size=3, local_window_size=6)
    reasons = triton_backend.unsupported_reasons(config.block_size, 8, torch.float32)
    assert any("block_size" in reason for reason in reasons)
    q, k, v = _qkv()
    attention = BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=config, backend="triton")
    with pytest.raises((ValueError, TypeError, RuntimeError), match="block_size"):
        attention(q, k, v)
    assert attention.last_backend in (None, "triton")


def test_explicit_torch_is_what_runs():
    q, k, v = _qkv()
    attention = BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=LOCAL, backend="torch")
    attention(q, k, v)
    assert attention.last_backend == "torch" and "backend='torch'" in repr(attention)


# --------------------------------------------------------------------------------------------
# The multihead module
# --------------------------------------------------------------------------------------------

EMBED, HEADS = 32, 4


def _multihead(**overrides) -> BlockSparseRingMultiheadDilatedAttention:
    torch.manual_seed(5)
    options = dict(
        embed_dim=EMBED,
        num_heads=HEADS,
        segment_lengths=SEGMENTS,
        dilation_rates=RATES,
        sparse_config=LOCAL,
        backend="torch",
    )
    options.update(overrides)
    return BlockSparseRingMultiheadDilatedAttention(**options)


def _mha_inputs(batch=2, seq_len=40, dtype=torch.float32):
    return tuple(_randn(batch, seq_len, EMBED, seed=s, dtype=dtype) for s in (21, 22, 23))


def _by_hand(mha, query, key, value, key_padding_mask=None, is_causal=False):
    """Projections, the optimized attention, layer norm and out_proj, written out."""
    batch, seq_len, _ = query.shape
    heads = lambda x: x.reshape(batch, seq_len, HEADS, EMBED // HEADS)  # noqa: E731
    q = heads(F.linear(query, mha.q_proj.weight, mha.q_proj.bias))
    k = heads(F.linear(key, mha.k_proj.weight, mha.k_proj.bias))
    v = heads(F.linear(value, mha.v_proj.weight, mha.v_proj.bias))
    attention = BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=LOCAL, backend="torch")
    out = attention(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask).reshape(batch, seq_len, EMBED)
    out = F.layer_norm(out, (EMBED,), mha.norm.weight, mha.norm.bias, mha.norm.eps)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


@pytest.mark.parametrize("is_causal", [False, True])
def test_multihead_is_called_like_nn_multihead_attention(is_causal):
    mha = _multihead()
    query, key, value = _mha_inputs()
    mask = _padding()
    out, weights = mha(query, key, value, key_padding_mask=mask, need_weights=False, is_causal=is_causal)
    assert weights is None
    assert out.shape == query.shape and out.dtype == query.dtype
    # Positional arguments in nn.MultiheadAttention's order give the same call.
    out_positional, _ = mha(query, key, value, mask, False, is_causal=is_causal)
    assert torch.equal(out_positional, out)
    # The same operations written out give bit-identical results.
    assert torch.equal(out, _by_hand(mha, query, key, value, mask, is_causal))

    out_w, weights = mha(query, key, value, key_padding_mask=mask, need_weights=True, is_causal=is_causal)
    assert torch.equal(out_w, out)
    assert tuple(weights["shape"]) == (2, HEADS, 40, 40)


def test_multihead_with_the_reference_attention_substituted():
    """The multihead module around the float64 reference attention: within docs/numerics.md's budget."""
    mha = _multihead()
    query, key, value = _mha_inputs()
    mask = _padding()
    out, _ = mha(query, key, value, key_padding_mask=mask, is_causal=True)

    kwargs = dict(segment_lengths=SEGMENTS, dilation_rates=RATES, sparse_config=LOCAL)
    mha64 = copy.deepcopy(mha).double()
    mha64.attention = reference.BlockSparseRingDilatedAttention(**kwargs)
    out64, _ = mha64(*(t.double() for t in (query, key, value)), key_padding_mask=mask, is_causal=True)
    mha_lowp = copy.deepcopy(mha)
    mha_lowp.attention = reference.BlockSparseRingDilatedAttention(**kwargs, compute_dtype=None)
    out_lowp, _ = mha_lowp(query, key, value, key_padding_mask=mask, is_causal=True)
    assert_within_budget(compare("multihead out", out, out64, out_lowp, torch.float32), f"{kwargs}, causal, padded")


def test_multihead_gradients_reach_every_parameter():
    mha = _multihead()
    query, key, value = _mha_inputs()
    out, _ = mha(query, key, value)
    (out * _randn(*out.shape, seed=31)).sum().backward()
    for name, parameter in mha.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_gamma_init_scales_value_and_out_projections(gamma):
    plain, scaled = _multihead(gamma_init=1.0), _multihead(gamma_init=gamma)
    # Same seed, same draws: q/k untouched, v/out scaled exactly (gamma is a power of two).
    assert torch.equal(scaled.q_proj.weight, plain.q_proj.weight)
    assert torch.equal(scaled.k_proj.weight, plain.k_proj.weight)
    assert torch.equal(scaled.v_proj.weight, gamma * plain.v_proj.weight)
    assert torch.equal(scaled.out_proj.weight, gamma * plain.out_proj.weight)
    for proj in (scaled.q_proj, scaled.k_proj, scaled.v_proj, scaled.out_proj):
        assert torch.count_nonzero(proj.bias) == 0


def test_multihead_without_layer_norm_or_bias():
    mha = _multihead(layer_norm=False, bias=False)
    assert mha.norm is None and mha.q_proj.bias is None
    query, key, value = _mha_inputs()
    out, _ = mha(query, key, value)
    batch, seq_len, _ = query.shape
    heads = lambda x: x.reshape(batch, seq_len, HEADS, EMBED // HEADS)  # noqa: E731
    attention = BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=LOCAL, backend="torch")
    inner = attention(
        heads(query @ mha.q_proj.weight.T), heads(key @ mha.k_proj.weight.T), heads(value @ mha.v_proj.weight.T)
    )
    assert torch.equal(out, inner.reshape(batch, seq_len, EMBED) @ mha.out_proj.weight.T)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embed_dim=30, num_heads=4), "embed_dim"),
        (dict(embed_dim=0, num_heads=1), "embed_dim"),
        (dict(embed_dim=32, num_heads=0), "num_heads"),
        (dict(embed_dim=32, num_heads=True), "num_heads"),
    ],
)
def test_multihead_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockSparseRingMultiheadDilatedAttention(**kwargs, segment_lengths=SEGMENTS, dilation_rates=RATES)


@pytest.mark.parametrize(
    "which, value, match",
    [
        ("query", torch.zeros(2, 40, 31), "query"),
        ("key", torch.zeros(2, 40), "key"),
        ("value", "not a tensor", "value"),
    ],
)
def test_multihead_bad_inputs_name_the_argument(which, value, match):
    mha = _multihead()
    inputs = dict(zip(("query", "key", "value"), _mha_inputs()))
    inputs[which] = value
    with pytest.raises(ValueError, match=match):
        mha(**inputs)


# --------------------------------------------------------------------------------------------
# Bad inputs: ValueError / TypeError naming the argument (checked on the optimized module)
# --------------------------------------------------------------------------------------------


def _load_bad_input_catalogue():
    """tests/test_bad_inputs.py's catalogue, loaded by path (tests/ is not a package)."""
    path = Path(__file__).with_name("test_bad_inputs.py")
    spec = importlib.util.spec_from_file_location("bad_input_catalogue", path)
    catalogue = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = catalogue  # dataclasses look their module up while it executes
    spec.loader.exec_module(catalogue)
    return catalogue


_BAD = _load_bad_input_catalogue()
OPTIMIZED_FACTORIES = [
    pytest.param(BlockSparseRingDilatedAttention, id="optimized-auto"),
    pytest.param(functools.partial(BlockSparseRingDilatedAttention, backend="torch"), id="optimized-torch"),
    pytest.param(
        functools.partial(BlockSparseRingDilatedAttention, backend="torch", ring_size=3),
        id="optimized-torch-ring3",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("optimized.ring") is None, reason="optimized/ring.py is not there"
        ),
    ),
]


@pytest.mark.parametrize("factory", OPTIMIZED_FACTORIES)
def test_optimized_module_accepts_the_catalogues_valid_defaults(factory):
    factory(**_BAD.VALID_MODULE)(**_BAD.valid_call())


@pytest.mark.parametrize("bad", _BAD.CATALOGUE, ids=[bad.id for bad in _BAD.CATALOGUE])
@pytest.mark.parametrize("factory", OPTIMIZED_FACTORIES)
def test_optimized_module_rejects_the_bad_input_catalogue(factory, bad):
    """Every entry of tests/test_bad_inputs.py: ValueError / TypeError naming the argument."""
    with pytest.raises((ValueError, TypeError)) as info:
        _BAD._run(factory, bad)
    _BAD._assert_names(info.value, bad.names)


# Constructor arguments only the optimized module has (and the shared ones once more).
BAD_CONSTRUCTIONS = [
    ("rates shorter", dict(dilation_rates=[1]), ValueError, "dilation_rates"),
    ("no branch", dict(segment_lengths=[], dilation_rates=[]), ValueError, "segment_lengths"),
    ("zero segment", dict(segment_lengths=[0, 16]), ValueError, "segment_lengths"),
    ("float rate", dict(dilation_rates=[1, 2.0]), TypeError, "dilation_rates"),
    ("head mode", dict(head_mode="some"), ValueError, "head_mode"),
    ("sparse_config a dict", dict(sparse_config={"pattern_type": "dense"}), TypeError, "sparse_config"),
    ("ring_size 0", dict(ring_size=0), ValueError, "ring_size"),
    ("ring_size and chunks", dict(ring_size=2, ring_chunk_lengths=[20, 20]), ValueError, "ring_size"),
    ("negative chunk", dict(ring_chunk_lengths=[50, -10]), ValueError, "ring_chunk_lengths"),
    ("work_size 0", dict(work_size=0), ValueError, "work_size"),
]


@pytest.mark.parametrize(
    "changes, error, match", [case[1:] for case in BAD_CONSTRUCTIONS], ids=[case[0] for case in BAD_CONSTRUCTIONS]
)
def test_optimized_module_rejects_bad_construction(changes, error, match):
    kwargs = dict(segment_lengths=SEGMENTS, dilation_rates=RATES, sparse_config=LOCAL)
    kwargs.update(changes)
    with pytest.raises(error, match=match):
        BlockSparseRingDilatedAttention(**kwargs)


def test_ring_chunks_must_cover_the_sequence():
    attention = BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=LOCAL, ring_chunk_lengths=[10, 20])
    with pytest.raises(ValueError, match="ring_chunk_lengths"):
        attention(*_qkv())


def test_custom_layout_too_small_for_a_segment_is_named():
    config = SparsePatternConfig(pattern_type="custom", block_size=4, block_layout=torch.ones(1, 1, dtype=torch.bool))
    # Every lattice here has 8 points, 2 blocks of 4: a 1 x 1 layout is too small.
    attention = BlockSparseRingDilatedAttention(SEGMENTS, RATES, sparse_config=config, backend="torch")
    with pytest.raises(ValueError, match="block_layout"):
        attention(*_qkv())
