"""CUDA graph capture and replay of a whole partial forward (module option ``use_cuda_graphs``).

A call's host work (plan lookup, output allocation, one or a few kernel launches) costs tens of
microseconds, as much as the kernels themselves at small N. Replaying a captured graph costs a few.

Per key (input shapes, strides, dtype, device, plan, padding-mask presence and layout, backend)
one ``torch.cuda.CUDAGraph`` is captured after a warm-up run on a side stream (compiles the
kernels, builds the cached device tables: nothing inside the capture syncs with the host). Each
call copies the inputs into the graph's static buffers, replays, and returns clones of the
static outputs, so a returned tensor never changes when a later call replays the same graph.
The cache is a bounded LRU (``GRAPH_CACHE_SIZE`` graphs); dropping an entry frees its memory pool.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

GRAPH_CACHE_SIZE = 8


@dataclass
class CapturedForward:
    graph: torch.cuda.CUDAGraph
    static_inputs: tuple  # q, k, v, key_padding_mask or None
    static_outputs: tuple  # out, lse


_graphs: OrderedDict = OrderedDict()


def _layout(t):
    return None if t is None else (tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))


def graph_key(backend, q, k, v, key_padding_mask, plan) -> tuple:
    return (backend, _layout(q), _layout(k), _layout(v), _layout(key_padding_mask), plan)


def _static_like(t):
    if t is None:
        return None
    static = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    static.copy_(t)
    return static


def _capture(run, inputs) -> CapturedForward:
    static_inputs = tuple(_static_like(t) for t in inputs)
    side = torch.cuda.Stream(device=inputs[0].device)
    side.wait_stream(torch.cuda.current_stream(inputs[0].device))
    with torch.cuda.stream(side):
        run(*static_inputs)  # warm-up: compiles kernels and fills the table caches outside the capture
    torch.cuda.current_stream(inputs[0].device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = run(*static_inputs)
    return CapturedForward(graph, static_inputs, tuple(static_outputs))


def graphed_partial(module, backend, q, k, v, key_padding_mask, plan, options):
    """(out, lse) of ``run_partial(backend, ...)`` through a cached CUDA graph; same values bit for bit."""
    from .module import run_partial

    if not q.is_cuda:
        raise ValueError(f"CUDA graphs need CUDA tensors, got q on {q.device}")
    key = graph_key(backend, q, k, v, key_padding_mask, plan) + (tuple(sorted(options.items())),)
    entry = _graphs.get(key)
    if entry is None:

        def run(q_, k_, v_, mask_):
            return run_partial(backend, q_, k_, v_, mask_, plan, options)

        entry = _capture(run, (q, k, v, key_padding_mask))
        _graphs[key] = entry
        while len(_graphs) > GRAPH_CACHE_SIZE:
            _graphs.popitem(last=False)
    else:
        _graphs.move_to_end(key)
        for static, given in zip(entry.static_inputs, (q, k, v, key_padding_mask)):
            if static is not None:
                static.copy_(given)
    entry.graph.replay()
    return tuple(t.clone() for t in entry.static_outputs)


def cached_graph_count() -> int:
    return len(_graphs)


def clear_graphs() -> None:
    _graphs.clear()
