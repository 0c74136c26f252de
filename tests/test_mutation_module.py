"""The optimized module's own rules: its checks, options, routing and conventions, apart from the backends.

tests/test_module.py checks what a call computes; what the module itself decides went partly
unseen (found by ``make mutation``, experiments/mutation.py): which ring sizes, chunk lengths and
process-group combinations it accepts, that typed backend_options take effect, when a forward goes
through the CUDA-graph cache, what a distributed call returns, that a call with no active block
still backpropagates zeros without spoiling other rows, what last_skipped and repr report, and the
multihead module's defaults. The distributed ring and the graph cache are stand-ins here (their own
tests run them); q reports ``is_cuda`` through a subclass, as in tests/test_mutation_graphs.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from random_inputs import make_inputs
from torch import nn

from optimized import graphs, ring, torch_backend
from optimized import module as module_api
from optimized.dispatch import REGISTRY, TorchOptions
from reference import BlockSparseRingDilatedAttention as ReferenceAttention
from reference import SparsePatternConfig, assert_within_budget, compare

Attention = module_api.BlockSparseRingDilatedAttention
Multihead = module_api.BlockSparseRingMultiheadDilatedAttention
SEGMENTS, RATES = (8, 16), (1, 2)
LOCAL = SparsePatternConfig(pattern_type="local_window", block_size=4, local_window_size=8)


def _assert_matches_reference(out, q, k, v, config=LOCAL):
    out64, lse64 = ReferenceAttention(SEGMENTS, RATES, config)(q, k, v, return_lse=True)
    out_lowp = ReferenceAttention(SEGMENTS, RATES, config, compute_dtype=None)(q, k, v)
    empty = torch.isneginf(lse64).transpose(1, 2).unsqueeze(-1)
    assert_within_budget(compare("out", out, out64, out_lowp, q.dtype, empty=empty))


# --------------------------------------------------------------------------------------------
# Construction: options, rings, process groups
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", [TorchOptions(7), (TorchOptions(7),), [TorchOptions(7)]])
def test_typed_backend_options_override_work_size(given):
    module = Attention(SEGMENTS, RATES, backend="torch", work_size=9, backend_options=given)
    assert module.work_size == 7 and module.backend_options["torch"] == TorchOptions(7)
    assert Attention(SEGMENTS, RATES, work_size=9).work_size == 9


def test_backend_options_of_an_unknown_type_are_refused_naming_the_argument():
    with pytest.raises(TypeError, match="backend_options"):
        Attention(SEGMENTS, RATES, backend_options=(TorchOptions(7), object()))


@pytest.mark.parametrize("ring_size", [0, -2, 2.5, "2", True])
def test_ring_size_must_be_an_int_of_at_least_one(ring_size):
    with pytest.raises(ValueError, match="ring_size"):
        Attention(SEGMENTS, RATES, ring_size=ring_size)


@pytest.mark.parametrize("chunks", [(), (20, -1), (20, 2.5), (True, 20), ("20",)])
def test_ring_chunk_lengths_must_be_ints_of_at_least_zero(chunks):
    with pytest.raises(ValueError, match="ring_chunk_lengths"):
        Attention(SEGMENTS, RATES, ring_chunk_lengths=chunks)


@pytest.mark.parametrize(
    "ring_options, chunks",
    [
        (dict(), None),
        (dict(ring_size=1), None),  # a ring of one is no split
        (dict(ring_size=2), (20, 20)),
        (dict(ring_size=3), (14, 13, 13)),
        (dict(ring_chunk_lengths=(0, 40)), (0, 40)),  # an empty chunk is allowed
        (dict(ring_chunk_lengths=(40,)), (40,)),
    ],
)
def test_accepted_rings_split_as_asked_and_match_the_reference(ring_options, chunks):
    module = Attention(SEGMENTS, RATES, LOCAL, backend="torch", **ring_options)
    assert module.chunk_lengths(40) == chunks
    q, k, v, _ = make_inputs(3, 2, 40, 4, 2, 8)
    _assert_matches_reference(module(q, k, v), q, k, v)


def test_a_process_group_goes_with_no_in_process_ring_but_a_ring_of_one():
    group = object()
    assert Attention(SEGMENTS, RATES, process_group=group).process_group is group
    assert Attention(SEGMENTS, RATES, process_group=group, ring_size=1).ring_size == 1
    assert Attention(SEGMENTS, RATES, process_group=group, ring_layout="zigzag").ring_layout == "zigzag"
    for ring_options in (dict(ring_size=2), dict(ring_chunk_lengths=(20, 20))):
        with pytest.raises(ValueError, match="not both"):
            Attention(SEGMENTS, RATES, process_group=group, **ring_options)
    with pytest.raises(ValueError, match="process_group"):
        Attention(SEGMENTS, RATES, ring_layout="zigzag")


# --------------------------------------------------------------------------------------------
# Routing: the distributed ring and the CUDA-graph cache (stand-ins)
# --------------------------------------------------------------------------------------------


def _stand_in_ring(monkeypatch, results):
    """Replace ring.distributed_forward; returns the list of its calls' return_attention_weights."""
    calls = []
    choice, stats = SimpleNamespace(name="torch", skipped=()), object()

    def distributed_forward(request, q, k, v, is_causal, mask, return_attention_weights, return_lse, scale):
        calls.append(return_attention_weights)
        return SimpleNamespace(results=results, choice=choice, stats=stats)

    monkeypatch.setattr(ring, "distributed_forward", distributed_forward)
    return calls, choice, stats


def test_a_distributed_call_returns_what_the_ring_returns_as_forward_does(monkeypatch):
    out, lse = torch.randn(1, 8, 2, 4), torch.randn(1, 2, 8)
    q = torch.randn(1, 8, 2, 4)
    calls, choice, stats = _stand_in_ring(monkeypatch, (out,))
    module = Attention(SEGMENTS, RATES, process_group=object())
    assert module(q, q, q) is out
    assert module.last_choice is choice and module.ring_stats is stats
    calls, _, _ = _stand_in_ring(monkeypatch, (out, lse))
    result = module(q, q, q, return_lse=True)
    assert isinstance(result, tuple) and result[0] is out and result[1] is lse


def test_only_zigzag_refuses_sparse_weights(monkeypatch):
    q = torch.randn(1, 8, 2, 4)
    calls, _, _ = _stand_in_ring(monkeypatch, (q,))
    Attention(SEGMENTS, RATES, process_group=object())(q, q, q, return_attention_weights=True)
    Attention(SEGMENTS, RATES, process_group=object(), ring_layout="zigzag")(q, q, q)
    assert calls == [True, False]
    with pytest.raises(ValueError, match="ring_layout='zigzag'"):
        Attention(SEGMENTS, RATES, process_group=object(), ring_layout="zigzag")(q, q, q, return_attention_weights=True)


class ReportsCuda(torch.Tensor):
    """A CPU tensor whose ``is_cuda`` is True: the module's graph rule sees a CUDA call, the work stays on the CPU."""

    @property
    def is_cuda(self):
        return True


def _stand_in_graphs(monkeypatch):
    """Record graphed_partial's calls; the triton backend's forward becomes the torch backend's (same contract)."""
    graphed = []

    def graphed_partial(backend, q, k, v, key_padding_mask, plan, options):
        graphed.append(backend.name)
        return backend.forward_partial(q, k, v, key_padding_mask, plan, options)

    def forward_partial(q, k, v, key_padding_mask, plan, options):
        return torch_backend.partial_forward(q, k, v, key_padding_mask, plan)

    monkeypatch.setattr(graphs, "graphed_partial", graphed_partial)
    monkeypatch.setattr(REGISTRY["triton"], "forward_partial", forward_partial)
    return graphed


def test_only_a_capturable_backend_on_cuda_without_grad_and_with_graphs_on_replays_a_graph(monkeypatch):
    graphed = _stand_in_graphs(monkeypatch)
    q, k, v, _ = make_inputs(5, 1, 40, 4, 2, 8)
    cuda_q, cuda_k, cuda_v = (t.as_subclass(ReportsCuda) for t in (q, k, v))
    out = Attention(SEGMENTS, RATES, LOCAL, backend="triton")(cuda_q, cuda_k, cuda_v)  # use_cuda_graphs by default
    assert graphed == ["triton"]
    _assert_matches_reference(torch.Tensor(out), q, k, v)
    Attention(SEGMENTS, RATES, LOCAL, backend="triton", use_cuda_graphs=False)(cuda_q, cuda_k, cuda_v)
    Attention(SEGMENTS, RATES, LOCAL, backend="torch")(cuda_q, cuda_k, cuda_v)  # torch captures no graph
    Attention(SEGMENTS, RATES, LOCAL, backend="triton")(q, k, v)  # not on CUDA
    leaves = [t.detach().clone().as_subclass(ReportsCuda).requires_grad_(True) for t in (q, k, v)]
    out = Attention(SEGMENTS, RATES, LOCAL, backend="triton")(*leaves)  # a replay records no graph for autograd
    assert graphed == ["triton"]
    out.sum().backward()
    assert all(leaf.grad is not None for leaf in leaves)


# --------------------------------------------------------------------------------------------
# Results: calls without active blocks, rows kept apart, what the module reports
# --------------------------------------------------------------------------------------------


def test_a_ring_call_without_any_active_block_gives_zeros_and_zero_gradients():
    nothing = SparsePatternConfig(pattern_type="custom", block_size=4, block_layout=torch.zeros(8, 8, dtype=torch.bool))
    module = Attention(SEGMENTS, RATES, nothing, backend="torch", ring_size=2)
    leaves = [t.requires_grad_(True) for t in make_inputs(7, 1, 16, 2, 2, 4)[:3]]
    out = module(*leaves)
    assert torch.equal(out, torch.zeros_like(out)) and out.requires_grad
    out.backward(torch.randn(out.shape))
    assert all(torch.equal(leaf.grad, torch.zeros_like(leaf)) for leaf in leaves)


def test_a_non_finite_query_row_leaves_every_other_row_unchanged():
    """docs/semantics.md section 4: each (query, head) row is its own softmax. A NaN in one query row of
    inputs that require grad must not reach the other rows."""
    q, k, v, _ = make_inputs(9, 2, 40, 4, 2, 8)
    spoiled = q.clone()
    spoiled[1, 17, 2, 3] = float("nan")
    module = Attention(SEGMENTS, RATES, LOCAL, backend="torch")
    expected = module(q, k, v)
    out = module(*(t.requires_grad_(True) for t in (spoiled, k, v)))
    others = torch.ones(out.shape, dtype=torch.bool)
    others[1, 17, 2] = False
    assert torch.equal(out.detach()[others], expected[others])


def test_last_skipped_is_empty_before_a_call_and_the_choice_after_one():
    module = Attention(SEGMENTS, RATES, LOCAL)  # auto
    assert module.last_skipped == {} and module.last_backend is None
    q, k, v, _ = make_inputs(11, 1, 16, 2, 2, 4, torch.float64)
    module(q, k, v)
    assert module.last_skipped == dict(module.last_choice.skipped) and module.last_skipped  # float64: no kernel


def test_repr_names_the_ring_size_and_the_layout_only_when_set():
    text = repr(Attention(SEGMENTS, RATES))
    assert "ring_size" not in text and ", layout=" not in text
    text = repr(Attention(SEGMENTS, RATES, ring_size=3, layout="bhnd"))
    assert ", ring_size=3" in text and ", layout='bhnd'" in text


# --------------------------------------------------------------------------------------------
# The multihead module's defaults
# --------------------------------------------------------------------------------------------


def _multihead(**overrides):
    torch.manual_seed(13)
    return Multihead(**{**dict(embed_dim=16, num_heads=2, segment_lengths=SEGMENTS, dilation_rates=RATES), **overrides})


def test_multihead_defaults_are_plain_xavier_and_torchs_layer_norm():
    default, explicit = _multihead(), _multihead(gamma_init=1.0)
    for name, parameter in default.named_parameters():
        assert torch.equal(parameter, dict(explicit.named_parameters())[name]), name
    assert default.norm.eps == nn.LayerNorm(16).eps


def test_multihead_of_one_head_and_one_channel_is_accepted():
    mha = _multihead(embed_dim=1, num_heads=1, segment_lengths=(8,), dilation_rates=(1,))
    query = torch.randn(1, 8, 1)
    out, weights = mha(query, query, query)
    assert out.shape == query.shape and weights is None and bool(torch.isfinite(out).all())
