"""optimized/graphs.py's cache logic on the CPU, through a stand-in for CUDA graph capture and replay.

tests/test_cuda_graphs.py runs real graphs on a CUDA device; off CUDA only its refusal runs, so
``make mutation`` (experiments/mutation.py) found every rule of the cache untested on the CPU. Here
``torch.cuda``'s graph and stream calls are replaced by a stand-in with a CUDA graph's contract: a
capture records what the backend launches, and a replay runs it again on the tensors it was
captured with, writing into the same outputs. The backend is the real torch backend (wrapped to
record its launches) and q is a CPU tensor that reports ``is_cuda``. What is pinned: a replay equals
the eager call bit for bit; a later call never changes an earlier call's results or inputs; the
same tensors twice get a second, in-place graph that sees in-place updates; the key tells apart
shapes, strides, the mask's presence, the plan, the options and the backend; the cache and the
record of last addresses are bounded, least recently used first out; calls above the size limit
run eagerly; CPU tensors are refused.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from optimized import graphs
from optimized.dispatch import REGISTRY, TorchOptions
from optimized.plan import CallPlan
from reference import AttentionGeometry, DilationConfig, SparsePatternConfig

TORCH = REGISTRY["torch"]
GEOMETRY = AttentionGeometry(DilationConfig((8, 16), (1, 2), "split"), 16, 2)
CONFIG = SparsePatternConfig(pattern_type="local_window", block_size=4, local_window_size=8)


def plan(causal=False):
    return CallPlan.whole(GEOMETRY, CONFIG, causal, 0.25)


class ReportsCuda(torch.Tensor):
    """A CPU tensor whose ``is_cuda`` is True: graphed_partial's device check passes, the work stays on the CPU."""

    @property
    def is_cuda(self):
        return True


class StandInGraph:
    """A CUDA graph's contract: capture records the launches, replay reruns them on the captured tensors."""

    capturing: StandInGraph | None = None

    def __init__(self):
        self.launches = []

    def replay(self):
        for launch in self.launches:
            launch()


class StandInStream:
    def __init__(self, device=None):
        self.device = device

    def wait_stream(self, other):
        assert isinstance(other, StandInStream)


@contextlib.contextmanager
def capture(graph):
    StandInGraph.capturing = graph
    try:
        yield
    finally:
        StandInGraph.capturing = None


class RecordingBackend:
    """The torch backend, counting its launches; under a capture, its launch is recorded in the graph."""

    def __init__(self, name="torch"):
        self.name = name
        self.launches = 0

    def forward_partial(self, q, k, v, key_padding_mask, plan, options):
        q = q.as_subclass(torch.Tensor)  # the same memory, a plain tensor

        def launch():
            self.launches += 1
            return TORCH.forward_partial(q, k, v, key_padding_mask, plan, options)

        out, lse = launch()
        graph = StandInGraph.capturing
        if graph is not None:

            def replay():  # writes into the outputs the capture returned, like a replayed kernel
                new_out, new_lse = launch()
                out.copy_(new_out)
                lse.copy_(new_lse)

            graph.launches.append(replay)
        return out, lse


@pytest.fixture(autouse=True)
def stand_in_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "CUDAGraph", StandInGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", StandInStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: StandInStream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    graphs.clear_graphs()
    yield
    graphs.clear_graphs()


def inputs(seed, padded=False, batch=2):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, 16, 2, 8, generator=generator) for _ in range(3))
    mask = torch.rand(batch, 16, generator=generator) < 0.3 if padded else None
    return q.as_subclass(ReportsCuda), k, v, mask


def eager(q, k, v, mask, plan_=None, options=TorchOptions()):
    return TORCH.forward_partial(q.as_subclass(torch.Tensor), k, v, mask, plan_ or plan(), options)


def graphed(backend, q, k, v, mask, plan_=None, options=TorchOptions()):
    return graphs.graphed_partial(backend, q, k, v, mask, plan_ or plan(), options)


def assert_equal(got, expected):
    assert len(got) == len(expected) == 2
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_cpu_tensors_are_refused():
    q, k, v, _ = inputs(0)
    with pytest.raises(ValueError, match="CUDA graphs need CUDA tensors, got q on cpu"):
        graphs.graphed_partial(RecordingBackend(), q.as_subclass(torch.Tensor), k, v, None, plan(), TorchOptions())
    assert graphs.cached_graph_count() == 0


@pytest.mark.parametrize("padded", [False, True])
def test_capture_copy_in_and_in_place_graphs_replay_the_eager_results(padded):
    backend = RecordingBackend()
    first = inputs(1, padded)
    kept_first = tuple(None if t is None else t.clone() for t in first)
    out1 = graphed(backend, *first)  # warm-up, capture, replay: three launches, one graph
    assert backend.launches == 3 and graphs.cached_graph_count() == 1
    assert_equal(out1, eager(*first))
    kept_out1 = tuple(t.clone() for t in out1)

    second = inputs(2, padded)
    out2 = graphed(backend, *second)  # new tensors, same key: copied in, replayed
    assert backend.launches == 4 and graphs.cached_graph_count() == 1
    assert_equal(out2, eager(*second))
    assert_equal(out1, kept_out1)  # the first call's results are its own
    for given, kept in zip(first, kept_first):  # and its inputs were never written
        assert (given is None and kept is None) or torch.equal(given, kept)

    out3 = graphed(backend, *second)  # the same tensors again: an in-place graph is captured
    assert backend.launches == 7 and graphs.cached_graph_count() == 2
    assert_equal(out3, out2)

    second[0].copy_(inputs(3)[0])  # an in-place update the in-place graph reads at replay
    out4 = graphed(backend, *second)
    assert backend.launches == 8 and graphs.cached_graph_count() == 2
    assert_equal(out4, eager(*second))
    assert not torch.equal(out4[0], out3[0])

    out5 = graphed(backend, *first)  # other tensors: back to the copy-in graph
    assert backend.launches == 9 and graphs.cached_graph_count() == 2
    assert_equal(out5, kept_out1)


def test_the_key_tells_apart_what_a_graph_depends_on():
    backend = RecordingBackend()
    q, k, v, _ = inputs(4)
    graphed(backend, q, k, v, None)
    others = [
        (backend, inputs(5, batch=3), plan(), TorchOptions()),  # shapes
        (backend, (q, k.transpose(1, 2).contiguous().transpose(1, 2), v, None), plan(), TorchOptions()),  # strides
        (backend, inputs(6, padded=True), plan(), TorchOptions()),  # a mask
        (backend, (q, k, v, None), plan(causal=True), TorchOptions()),  # the plan
        (backend, (q, k, v, None), plan(), TorchOptions(work_size=8)),  # the options
        (RecordingBackend("other"), (q, k, v, None), plan(), TorchOptions()),  # the backend
    ]
    for count, (other_backend, call, other_plan, options) in enumerate(others, start=2):
        result = graphed(other_backend, *call, plan_=other_plan, options=options)
        assert graphs.cached_graph_count() == count
        assert_equal(result, eager(*call, plan_=other_plan, options=options))


def test_the_cache_drops_the_least_recently_used_graph(monkeypatch):
    monkeypatch.setattr(graphs, "GRAPH_CACHE_SIZE", 2)
    backend = RecordingBackend()
    calls = {n: inputs(10 + n, batch=n) for n in (1, 2, 3)}  # three keys (batch sizes)
    graphed(backend, *calls[1])
    graphed(backend, *calls[2])
    # Inputs stay referenced while later ones are drawn: were they freed, the allocator could hand their
    # addresses to the next draw, which the cache would rightly take for "the same tensors again".
    hit = inputs(20, batch=1)
    graphed(backend, *hit)  # a hit on key 1 (copy-in): now the most recent
    assert backend.launches == 7 and graphs.cached_graph_count() == 2
    graphed(backend, *calls[3])  # evicts key 2, the least recently used
    assert backend.launches == 10 and graphs.cached_graph_count() == 2
    later_hit = inputs(21, batch=1)
    assert_equal(graphed(backend, *later_hit), eager(*later_hit))  # key 1: still cached
    assert backend.launches == 11
    graphed(backend, *calls[2])  # key 2: captured again
    assert backend.launches == 14 and graphs.cached_graph_count() == 2


def test_the_record_of_last_addresses_is_bounded_oldest_first_out(monkeypatch):
    monkeypatch.setattr(graphs, "GRAPH_CACHE_SIZE", 1)
    backend = RecordingBackend()
    calls = [inputs(30 + n, batch=n) for n in range(1, 7)]  # six keys
    for call in calls:
        graphed(backend, *call)
    assert len(graphs._last_pointers) == 4 * graphs.GRAPH_CACHE_SIZE
    assert graphs.cached_graph_count() == 1
    launches = backend.launches
    graphed(backend, *calls[-1])  # the same tensors twice: an in-place graph, the address record kept it
    assert backend.launches == launches + 3 and graphs.cached_graph_count() == 1


@pytest.mark.parametrize("over", [False, True])
def test_calls_above_the_size_limit_run_eagerly(monkeypatch, over):
    q, k, v, mask = inputs(40, padded=True)
    monkeypatch.setattr(graphs, "GRAPH_MAX_ELEMENTS", q.numel() - 1 if over else q.numel())
    backend = RecordingBackend()
    result = graphed(backend, q, k, v, mask)
    assert_equal(result, eager(q, k, v, mask))
    assert graphs.cached_graph_count() == (0 if over else 1)
    assert backend.launches == (1 if over else 3)


def test_clear_graphs_empties_the_cache_and_the_address_record():
    backend = RecordingBackend()
    call = inputs(50)
    graphed(backend, *call)
    graphed(backend, *call)
    assert graphs.cached_graph_count() == 2
    graphs.clear_graphs()
    assert graphs.cached_graph_count() == 0 and not graphs._last_pointers
