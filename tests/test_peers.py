"""The two third-party dilated attentions against the reference: every finding of
experiments/results/peers/README.md pinned, so that a change upstream (or here) shows.

- torchscale (Microsoft LongNet ``DilatedAttention``, head_mode "all"): agrees to float64
  precision when every segment and lattice is whole, and under causal masking; deviates by
  attending zero-padded keys, by misplacing outputs when the rate does not divide the segment,
  by ignoring ``key_padding_mask``, by dropping a branch whose lse is exactly 0, and in its
  gradients (merge weights detached).
- dilated-attention-pytorch (fkodom, heads split in groups): its per-lattice softmax attention
  agrees to float64 precision, but each branch's output is divided by its sum over the sequence,
  every head of branch i reads lattice i % r, head groups are sliced with the wrong start when
  H % G != 0, and segment lengths must divide N.

"To float64 precision" means within the budget ``verify.judge_quantity`` gives float64 (the
docs/numerics.md rule, with the reference's own float64 error estimated from float32): the
expected values below are built from the reference, once in float64 and once in float32.
Small CPU sizes; the whole file runs in seconds.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

import reference
from equivalence_tests import strategies as s
from equivalence_tests import verify
from equivalence_tests.peers import dilated_attention_pytorch_peer as fkodom
from equivalence_tests.peers import kernels
from equivalence_tests.peers import torchscale_longnet as torchscale
from reference.config import DilationConfig, SparsePatternConfig
from reference.verification import K_GRADIENT, K_OUTPUT

DENSE = SparsePatternConfig(pattern_type="dense")
F64 = torch.float64


def _config(
    batch, seq_len, heads, head_dim, segments, rates, head_mode, is_causal=False, mask=None, seed=0, gradients=False
):
    case = s.AttentionCase(
        s.Shape(batch, seq_len, heads, heads, head_dim),
        DilationConfig(tuple(segments), tuple(rates), head_mode),
        DENSE,
        is_causal,
        mask,
        seed,
    )
    return verify.VerifyCase("pinned", case, F64, "cpu", None, gradients)


def _inputs(config, dtype=F64):
    q, k, v, mask = s.make_inputs(config.case, dtype, "cpu")
    return q, k, v, mask


def _run(peer, config, requires_grad=False):
    q, k, v, mask = _inputs(config)
    if requires_grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    out = peer.factory(config)(q, k, v, is_causal=config.case.is_causal, key_padding_mask=mask)
    return out, (q, k, v)


def _reference(config, dtype=F64, q=None, k=None, v=None, **overrides):
    """The reference's out for ``config`` computed in ``dtype`` (on the config's inputs, or on q, k, v)."""
    kwargs = {**config.module_kwargs(), **overrides}
    if q is None:
        q, k, v, _ = _inputs(config, torch.float32)
    module = reference.BlockSparseRingDilatedAttention(**kwargs, compute_dtype=None)
    return module(
        q.to(dtype),
        k.to(dtype),
        v.to(dtype),
        is_causal=config.case.is_causal,
        key_padding_mask=config.case.key_padding_mask,
    )


def assert_float64_agreement(actual, expected64, expected32, k=K_OUTPUT, what=""):
    verdict = verify.judge_quantity("out", actual, expected64, verify.float64_baseline(expected64, expected32), F64, k)
    assert verdict.passed, f"{what}: {verdict.describe()}"
    return verdict


def assert_deviates(actual, config, what=""):
    """``actual`` is off the reference by far more than the float64 budget."""
    ref64, ref32 = _reference(config, F64), _reference(config, torch.float32)
    verdict = verify.judge_quantity("out", actual, ref64, verify.float64_baseline(ref64, ref32), F64, K_OUTPUT)
    assert not verdict.passed and verdict.error > 1e6 * verdict.budget, f"{what}: {verdict.describe()}"
    return verdict


# ============================================================================================
# torchscale
# ============================================================================================

TORCHSCALE_WHOLE = [  # (N, H, D, segments, rates): every segment whole, every rate dividing its segment
    (16, 4, 8, (4, 8, 16), (1, 2, 4)),  # LongNet's geometric shape, scaled down
    (12, 3, 4, (6, 12), (3, 2)),  # H not a multiple of the rate: torchscale pads heads, the reference spreads them
    (8, 1, 4, (8, 4), (4, 2)),  # fewer heads than offsets: positions on no head's lattice
    (24, 6, 2, (3, 24, 24), (1, 4, 4)),  # two identical branches: keys counted twice
]


@pytest.mark.parametrize("is_causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("geometry", TORCHSCALE_WHOLE, ids=str)
def test_torchscale_agrees_to_float64_precision_on_whole_segments(geometry, is_causal):
    n, heads, head_dim, segments, rates = geometry
    config = _config(2, n, heads, head_dim, segments, rates, "all", is_causal, seed=11)
    out, _ = _run(torchscale, config)
    assert_float64_agreement(out, _reference(config), _reference(config, torch.float32), what=str(geometry))


def test_torchscale_verify_search_agrees_on_whole_segments():
    """verify's own search (whole segments, head_mode all): every area passes, nothing unsupported."""
    options = verify.VerifyOptions(
        patterns=("dense",),
        head_modes=("all",),
        padding=False,
        gqa=False,
        ring=False,
        gradients=False,
        whole_segments=True,
        dtype=F64,
        examples=8,
        max_seq_len=24,
    )
    report = verify.verify(torchscale.factory, options)
    assert [(a.name, a.status) for a in report.areas] == [
        ("pattern dense", "pass"),
        ("head_mode all", "pass"),
        ("causal", "pass"),
        ("combined", "pass"),
    ]
    assert all(area.judged == area.examples > 0 for area in report.areas)


def _pad_segments(t, segment, rate):
    """torchscale's padding of one branch: the sequence to whole segments of min(w, N), each segment
    to a multiple of the rate, with zeros (gathering and dense_to_sparse, F.pad(value=0.))."""
    batch, n, heads, dim = t.shape
    length = min(segment, n)
    count = -(-n // length)
    padded_length = -(-length // rate) * rate
    padded = t.new_zeros(batch, count, padded_length, heads, dim)
    for index in range(count):
        chunk = t[:, index * length : (index + 1) * length]
        padded[:, index, : chunk.shape[1]] = chunk
    return padded.reshape(batch, count * padded_length, heads, dim), padded_length


def _torchscale_one_branch_model(config, dtype):
    """What torchscale computes for one branch: the reference on the zero-padded sequence, cropped to N.

    The crop keeps the first N positions of the padded layout (scattering: o[:, offset:offset+seq_len]),
    so when the rate does not divide the segment, segment s's outputs land at the wrong positions.
    """
    (segment,), (rate,) = config.case.dilation.segment_lengths, config.case.dilation.dilation_rates
    q, k, v, _ = _inputs(config, torch.float32)
    padded = [_pad_segments(t, segment, rate) for t in (q, k, v)]
    padded_length = padded[0][1]
    out = _reference(config, dtype, *(p for p, _ in padded), segment_lengths=[padded_length])
    return out[:, : config.case.shape.seq_len]


@pytest.mark.parametrize("is_causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(
    "geometry",
    [
        (10, 2, 4, 1),  # short last segment (N % w != 0)
        (12, 4, 5, 1),  # short last segment, rate 1
        (12, 4, 6, 4),  # rate does not divide the segment (6 -> 8), two segments
        (9, 3, 4, 3),  # both
        (7, 2, 20, 2),  # one segment (w > N acts as N = 7), padded to 8
    ],
    ids=str,
)
def test_torchscale_is_the_reference_on_its_zero_padded_sequence(geometry, is_causal):
    """One branch: torchscale == crop(reference(zero-padded segments)) to float64 precision."""
    n, heads, segment, rate = geometry
    config = _config(1, n, heads, 4, (segment,), (rate,), "all", is_causal, seed=3)
    out, _ = _run(torchscale, config)
    assert_float64_agreement(
        out,
        _torchscale_one_branch_model(config, F64),
        _torchscale_one_branch_model(config, torch.float32),
        what=str(geometry),
    )


def test_torchscale_attends_zero_padded_keys_without_causal_masking():
    """N = 10, w = 4, r = 1: the last segment [8, 10) is padded with two zero keys; each adds exp(0)
    to the softmax denominator and 0 to the numerator. Causal masking hides them (they follow
    every real query of the segment), so the causal result agrees."""
    config = _config(1, 10, 2, 4, (4,), (1,), "all", False, seed=3)
    out, _ = _run(torchscale, config)
    ref = _reference(config)
    assert torch.allclose(out[:, :8], ref[:, :8], rtol=0, atol=1e-14)  # whole segments: right
    assert_deviates(out, config, "zero-padded keys")
    q, k, _, _ = _inputs(config, F64)
    # Position 8 sees keys 8, 9 and two zero keys: its weights are exp(s_j) / (exp(s_8) + exp(s_9) + 2).
    scores = torch.einsum("bqhd,bkhd->bhqk", q[:, 8:10], k[:, 8:10]) * 0.5
    shrink = scores.exp().sum(-1) / (scores.exp().sum(-1) + 2)  # (B, H, 2)
    assert torch.allclose(out[:, 8:10], ref[:, 8:10] * shrink.transpose(1, 2).unsqueeze(-1), rtol=0, atol=1e-14)
    causal = _config(1, 10, 2, 4, (4,), (1,), "all", True, seed=3)
    out_causal, _ = _run(torchscale, causal)
    assert_float64_agreement(out_causal, _reference(causal), _reference(causal, torch.float32))


@pytest.mark.parametrize(
    "geometry",
    [
        (10, (4,), (1,)),  # short last segment
        (10, (4,), (2,)),  # short last segment, rate dividing the segment
        (7, (20,), (2,)),  # one segment (w > N acts as N = 7), the rate not dividing it
        (10, (4, 20), (2, 2)),  # two branches, both of the kinds above
    ],
    ids=str,
)
def test_torchscale_causal_agrees_wherever_no_output_is_misplaced(geometry):
    """Under causal masking the zero keys torchscale pads with come after every real query of their
    lattice, so it agrees with the reference to float64 precision whenever no output is misplaced:
    the rate divides min(w, N), or the branch has a single segment."""
    n, segments, rates = geometry
    config = _config(2, n, 2, 4, segments, rates, "all", True, seed=13)
    out, _ = _run(torchscale, config)
    assert_float64_agreement(out, _reference(config), _reference(config, torch.float32), what=str(geometry))
    noncausal = dataclasses.replace(config, case=dataclasses.replace(config.case, is_causal=False))
    assert_deviates(_run(torchscale, noncausal)[0], noncausal, "the same without causal masking")


def test_torchscale_misplaces_outputs_when_the_rate_does_not_divide_the_segment():
    """verify's minimal counterexample: N = 2, w = 1, r = 2. The segment of length 1 is padded to 2,
    so the padded layout is [seg 0, pad, seg 1, pad] and the crop to N = 2 returns [seg 0, pad]:
    position 1 gets 0 (causal or not) where the reference has v[1] (position 1 attends itself)."""
    for is_causal in (False, True):
        config = _config(1, 2, 1, 1, (1,), (2,), "all", is_causal)
        out, (_, _, v) = _run(torchscale, config)
        assert out[0, 0, 0, 0] == v[0, 0, 0, 0] and out[0, 1, 0, 0] == 0.0
        assert _reference(config)[0, 1, 0, 0] == v[0, 1, 0, 0] != 0.0


def test_torchscale_ignores_key_padding_mask():
    """DilatedAttention.forward hands key_padding_mask to attention_ops, whose flash branch (which
    DilatedAttention asserts, args.flash_attention) never reads it: padded keys are attended, and a
    fully padded row gets a value instead of 0. verify's minimal counterexample: N = 1, mask [[1]]."""
    mask = torch.tensor([[False, True, True, False, False, True, False, False]])
    config = _config(1, 8, 2, 4, (4, 8), (1, 2), "all", mask=mask, seed=5)
    unmasked = _config(1, 8, 2, 4, (4, 8), (1, 2), "all", seed=5)
    out, _ = _run(torchscale, config)
    assert torch.equal(out, _run(torchscale, unmasked)[0])  # bitwise: the mask changes nothing
    assert_deviates(out, config, "key padding ignored")
    single = _config(1, 1, 1, 1, (1,), (1,), "all", mask=torch.tensor([[True]]))
    out, (_, _, v) = _run(torchscale, single)
    assert out.item() == v.item() != 0.0 and _reference(single).item() == 0.0


def test_torchscale_drops_a_branch_whose_lse_is_exactly_zero():
    """sparse_to_dense marks positions off a head's lattice by lse = 0 -> -1e8
    (``lse.masked_fill_(lse==0, -1e8)``), so a real lse of exactly 0 is taken for 'off the lattice'
    and that branch gets weight 0 in the merge. Here position 0 of branch w = 1 has one key with
    score q0 . k0 = 0 (lse = 0): torchscale returns branch w = 2 alone, the reference counts key 0 in both."""
    generator = torch.Generator().manual_seed(7)
    a, b, c = (float(x) + 0.5 for x in torch.rand(3, generator=generator))
    q = torch.tensor([[[[a, 0.0]], [[b, c]]]], dtype=F64)  # (1, 2, 1, 2)
    k = torch.tensor([[[[0.0, b]], [[c, a]]]], dtype=F64)  # q0 . k0 = 0 exactly
    v = torch.randn(1, 2, 1, 2, generator=generator, dtype=F64)
    config = _config(1, 2, 1, 2, (1, 2), (1, 1), "all")
    out = torchscale.factory(config)(q, k, v)
    branch_w2 = reference.BlockSparseRingDilatedAttention([2], [1], head_mode="all")(q, k, v)
    full = reference.BlockSparseRingDilatedAttention([1, 2], [1, 1], head_mode="all")(q, k, v)
    assert torch.allclose(out[:, 0], branch_w2[:, 0], rtol=0, atol=1e-15)
    assert (out[:, 0] - full[:, 0]).abs().max() > 0.01


def _detached_merge_model(q, k, v, config):
    """LongNet's merge with the weights held constant: sum_g out_g * stop_gradient(softmax_g(lse_g))."""
    n, heads = q.shape[1], q.shape[2]
    outs, lses = [], []
    for segment, rate in zip(config.case.dilation.segment_lengths, config.case.dilation.dilation_rates):
        geometry = reference.AttentionGeometry(DilationConfig((segment,), (rate,), "all"), n, heads)
        out, lse = reference.partial_attention(
            q, k, v, geometry, DENSE, is_causal=config.case.is_causal, compute_dtype=None
        )
        outs.append(out)
        lses.append(lse)
    with torch.no_grad():
        weights = torch.softmax(torch.stack(lses), dim=0).nan_to_num(0.0)  # (G, B, H, N); no lattice anywhere -> 0
    return sum(out * weight.transpose(1, 2).unsqueeze(-1) for out, weight in zip(outs, weights))


@pytest.mark.parametrize("geometry", [(16, 2, (4, 16), (1, 2)), (12, 3, (12, 6, 3), (2, 3, 1))], ids=str)
def test_torchscale_gradients_hold_the_merge_weights_constant(geometry):
    """scattering computes the branch weights under torch.no_grad(): with two or more branches the
    gradients are those of the merge with constant weights (docs/semantics.md section 4 asks for the
    gradients of the formula), to float64 precision; with one branch they agree with the reference."""
    n, heads, segments, rates = geometry
    config = _config(1, n, heads, 8, segments, rates, "all", seed=9)
    grad_out = torch.randn(1, n, heads, 8, generator=torch.Generator().manual_seed(1), dtype=F64)

    def grads(function, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in _inputs(config, torch.float32)[:3]]
        function(*leaves).backward(grad_out.to(dtype))
        return [leaf.grad for leaf in leaves]

    peer = grads(torchscale.factory(config), F64)
    model64 = grads(lambda q, k, v: _detached_merge_model(q, k, v, config), F64)
    model32 = grads(lambda q, k, v: _detached_merge_model(q, k, v, config), torch.float32)
    for name, got, want64, want32 in zip(("dq", "dk", "dv"), peer, model64, model32):
        assert_float64_agreement(got, want64, want32, k=K_GRADIENT, what=name)
    exact = grads(lambda q, k, v: verify.differentiable_reference(q, k, v, config.case)[0], F64)
    assert not torch.allclose(peer[0], exact[0], rtol=0, atol=1e-6)  # dq misses the weights' term
    assert torch.allclose(peer[2], exact[2], rtol=0, atol=1e-13)  # dv does not depend on the weights


def test_torchscale_gradients_agree_with_one_branch():
    options = verify.VerifyOptions(
        patterns=("dense",),
        head_modes=("all",),
        causal=False,
        padding=False,
        gqa=False,
        ring=False,
        whole_segments=True,
        dtype=F64,
        examples=4,
        max_seq_len=40,
        max_branches=1,
    )
    area = verify.search_area(
        torchscale.factory, verify.FeatureArea("gradients", ("dense",), ("all",), gradients=True), options
    )
    assert area.status == "pass" and area.passed > 0, area


def test_torchscale_unsupported_configurations_say_why():
    config = _config(1, 8, 4, 4, (4, 8), (1, 2), "split")
    with pytest.raises(NotImplementedError, match="head_mode 'all'"):
        torchscale.factory(config)
    gqa = verify.VerifyCase(
        "x",
        s.AttentionCase(s.Shape(1, 8, 4, 2, 4), DilationConfig((8,), (1,), "all"), DENSE, False, None, 0),
        F64,
        "cpu",
    )
    with pytest.raises(NotImplementedError, match="grouped-query"):
        torchscale.factory(gqa)
    layout = verify.VerifyCase(
        "x",
        s.AttentionCase(
            s.Shape(1, 8, 2, 2, 4),
            DilationConfig((8,), (1,), "all"),
            SparsePatternConfig(pattern_type="local_window", block_size=2),
            False,
            None,
            0,
        ),
        F64,
        "cpu",
    )
    for peer in (torchscale, fkodom):
        with pytest.raises(NotImplementedError, match="block layout 'local_window' is not supported"):
            peer.factory(layout)
    ring = dataclasses.replace(_config(1, 8, 4, 4, (8,), (1,), "all"), ring_chunk_lengths=(4, 4))
    with pytest.raises(NotImplementedError, match="no ring split"):
        torchscale.factory(ring)
    # The stand-in is bound only during a call: torchscale's own name is untouched afterwards.
    from torchscale.component import multihead_attention

    before = multihead_attention.flash_attn_func
    _run(torchscale, _config(1, 4, 1, 2, (4,), (1,), "all"))
    assert multihead_attention.flash_attn_func is before


# ============================================================================================
# dilated-attention-pytorch
# ============================================================================================


def _fkodom_model(config, dtype):
    """What dilated-attention-pytorch 0.2.0 computes, built from the reference.

    Branch i (group size g_i = H // G, plus one for the first H % G branches) covers heads
    [i * g_i, (i + 1) * g_i) (``hmin = i * g``), all of them on lattice o = i % r_i
    (``offset = i % r``); each head's attention A (the reference's, with that offset) is divided
    by its sum over the sequence (``x / x.sum(dim=(1, 2))``), the branches are summed and the sum
    divided by G (``out / num_groups``).
    """
    q, k, v, _ = _inputs(config, torch.float32)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    batch, n, heads, dim = q.shape
    segments, rates = config.case.dilation.segment_lengths, config.case.dilation.dilation_rates
    groups = len(segments)
    sizes = [heads // groups + (1 if i < heads % groups else 0) for i in range(groups)]
    out = torch.zeros_like(q)
    for i, (size, segment, rate) in enumerate(zip(sizes, segments, rates)):
        offset = i % rate
        # head_mode "all" with `rate` copies of one head: copy j sits on lattice j // ceil(rate / rate) = j.
        module = reference.BlockSparseRingDilatedAttention([segment], [rate], head_mode="all", compute_dtype=None)
        for head in range(i * size, min((i + 1) * size, heads)):
            copies = [t[:, :, head : head + 1].expand(batch, n, rate, dim) for t in (q, k, v)]
            attention = module(*copies, is_causal=config.case.is_causal)[:, :, offset]
            out[:, :, head] += attention / attention.sum(dim=1, keepdim=True)
    return out / groups


@pytest.mark.parametrize("is_causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize(
    "geometry",
    [
        (8, 1, (8,), (1,)),  # plain attention, normalised
        (8, 2, (8,), (2,)),  # both heads on lattice 0
        (12, 4, (4, 12), (1, 2)),  # branch 1 on lattice 1
        (12, 3, (6, 12), (2, 3)),  # H % G != 0: groups [0, 1] and [1]; head 2 never written
        (24, 5, (4, 8, 24), (1, 2, 4)),  # three groups of sizes 2, 2, 1 -> heads [0, 1], [2, 3], [2]; head 4 empty
    ],
    ids=str,
)
def test_fkodom_is_its_model_to_float64_precision(geometry, is_causal):
    """Its per-lattice attention (softmax, D ** -0.5, causal on the lattice) is right to float64
    precision; what it does with it is the model above."""
    n, heads, segments, rates = geometry
    config = _config(2, n, heads, 4, segments, rates, "split", is_causal, seed=21)
    out, _ = _run(fkodom, config)
    assert_float64_agreement(out, _fkodom_model(config, F64), _fkodom_model(config, torch.float32), what=str(geometry))
    assert_deviates(out, config, str(geometry))


def test_fkodom_normalises_each_branch_by_its_sum_over_the_sequence():
    """verify's minimal counterexample: N = 2, w = 1, r = 1, one head of size 1. Each position attends
    itself (attention = v), which ``x / x.sum(dim=(1, 2))`` turns into v_i / (v_0 + v_1)."""
    config = _config(1, 2, 1, 1, (1,), (1,), "split")
    out, (_, _, v) = _run(fkodom, config)
    expected = v / v.sum(dim=1, keepdim=True)
    assert torch.allclose(out, expected, rtol=1e-15, atol=0)
    assert torch.equal(_reference(config), v)


def test_fkodom_puts_every_head_of_a_branch_on_one_lattice():
    """``offset = i % r``: with one branch of rate 2 both heads read lattice 0; the reference gives
    head 1 the odd positions (offset j // ceil(H_g / r) = 1)."""
    config = _config(1, 8, 2, 4, (8,), (2,), "split", seed=4)
    out, _ = _run(fkodom, config)
    ref = _reference(config)
    nonzero = lambda t, head: (t[0, :, head].abs().sum(-1) > 0).nonzero().flatten().tolist()  # noqa: E731
    assert nonzero(out, 0) == nonzero(out, 1) == [0, 2, 4, 6]
    assert nonzero(ref, 0) == [0, 2, 4, 6] and nonzero(ref, 1) == [1, 3, 5, 7]


def test_fkodom_slices_head_groups_from_the_wrong_start():
    """``hmin = i * g`` uses the current group's size: H = 3, G = 2 (groups of 2 and 1) gives heads
    [0, 1] and [1]; head 1 gets both branches and head 2 is never written (out 0)."""
    config = _config(1, 12, 3, 4, (6, 12), (1, 1), "split", seed=8)
    out, _ = _run(fkodom, config)
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
    assert bool((_reference(config)[:, :, 2] != 0).any())


def test_fkodom_needs_segment_lengths_that_divide_the_sequence():
    config = _config(1, 10, 2, 4, (4,), (1,), "split")
    with pytest.raises(Exception, match="can't divide axis of length 10 in chunks of 4"):
        _run(fkodom, config)
    longer = _config(1, 10, 2, 4, (16,), (1,), "split")  # docs/semantics.md: w > N acts as N
    with pytest.raises(Exception, match="can't divide axis of length 10 in chunks of 16"):
        _run(fkodom, longer)


def test_fkodom_has_no_key_padding_mask():
    from equivalence_tests.peers.dilated_attention_pytorch_peer import peer_module

    assert list(inspect.signature(peer_module().DilatedAttention.forward).parameters) == [
        "self",
        "query",
        "key",
        "value",
        "is_causal",
    ]
    config = _config(1, 4, 1, 2, (4,), (1,), "split", mask=torch.tensor([[False, True, False, False]]))
    with pytest.raises(NotImplementedError, match="no key_padding_mask"):
        _run(fkodom, config)


def test_fkodom_verify_search_fails_every_area_it_runs():
    options = verify.VerifyOptions(
        patterns=("dense",),
        head_modes=("split",),
        padding=False,
        gradients=False,
        whole_segments=True,
        dtype=F64,
        examples=6,
        max_seq_len=16,
    )
    report = verify.verify(fkodom.factory, options)
    statuses = {area.name: area.status for area in report.areas}
    assert statuses == {
        "pattern dense": "fail",
        "head_mode split": "fail",
        "causal": "fail",
        "grouped-query heads": "unsupported",
        "ring split": "unsupported",
        "combined": "fail",
    }
    minimal = report.area("pattern dense").counterexample["fields"]
    assert minimal["shape"] == {"batch": 1, "seq_len": 2, "num_heads": 1, "num_kv_heads": 1, "head_dim": 1}
    assert minimal["segment_lengths"] == [1] and minimal["dilation_rates"] == [1]


# ============================================================================================
# The stand-in kernels are the kernels' semantics
# ============================================================================================


def test_stand_in_kernels_are_softmax_attention():
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 5, 3, 4, generator=generator, dtype=F64) for _ in range(3))
    for is_causal in (False, True):
        mask = torch.ones(5, 5, dtype=torch.bool).tril() if is_causal else None
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
        ).transpose(1, 2)
        out, lse = kernels.flash_attn_func(q, k, v, is_causal=is_causal)
        assert torch.allclose(out, expected, rtol=0, atol=1e-14) and not lse.requires_grad
        bias = kernels.LowerTriangularMask() if is_causal else None
        assert torch.allclose(kernels.memory_efficient_attention(q, k, v, attn_bias=bias), expected, rtol=0, atol=1e-14)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        assert torch.allclose(lse, torch.logsumexp(scores, -1), rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="Incompatible shapes"):
        kernels.memory_efficient_attention(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(NotImplementedError, match="dropout"):
        kernels.flash_attn_func(q, k, v, dropout=0.1)
