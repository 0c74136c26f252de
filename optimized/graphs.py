"""CUDA graph capture and replay of a whole partial forward (module option ``use_cuda_graphs``).

A call's host work (plan lookup, output allocation, one or a few kernel launches) costs tens of
microseconds, as much as the kernels themselves at small N. Replaying a captured graph costs a few.

Per key (input shapes, strides, dtype, device, plan, padding-mask presence and layout, backend)
one ``torch.cuda.CUDAGraph`` is captured after a warm-up run on a side stream (compiles the
kernels, builds the cached device tables: nothing inside the capture syncs with the host). Each
call copies the inputs into the graph's static buffers, replays, and returns clones of the
static outputs, so a returned tensor never changes when a later call replays the same graph.
The cache is a bounded LRU (``GRAPH_CACHE_SIZE`` graphs); dropping an entry frees its memory pool.

Copying the inputs in costs launches and bandwidth (at 8K tokens as much as the replay saves).
So when a call passes the very tensors of the previous call with that key (a loop over static
buffers, a benchmark), a second graph is captured that reads those tensors in place, keyed by
their addresses; it holds references to them, so their memory cannot be reused while it is cached,
and it reads whatever they hold at replay time (in-place updates included).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

GRAPH_CACHE_SIZE = 8
# Above this many q elements a call runs eagerly: its launch overhead is noise next to the kernel,
# while a graph still pays the clone of its outputs (measured on the H200: 1M tokens, D=128,
# 21.9 ms eager against 23.9 ms replayed; see experiments/NOTES_gpu.md).
GRAPH_MAX_ELEMENTS = 1 << 24


@dataclass
class CapturedForward:
    graph: torch.cuda.CUDAGraph
    static_inputs: tuple  # q, k, v, key_padding_mask or None
    static_outputs: tuple  # out, lse


_graphs: OrderedDict = OrderedDict()


def _layout(t):
    return None if t is None else (tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device))


def graph_key(backend, q, k, v, key_padding_mask, plan, options) -> tuple:
    return (backend.name, _layout(q), _layout(k), _layout(v), _layout(key_padding_mask), plan, options)


def _pointers(tensors) -> tuple:
    return tuple(None if t is None else t.data_ptr() for t in tensors)


def _copy_in(statics, given) -> None:
    pairs = [(s, g) for s, g in zip(statics, given) if s is not None]
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_([s for s, _ in pairs], [g for _, g in pairs])  # one launch for all inputs
    else:  # pragma: no cover - older torch
        for s, g in pairs:
            s.copy_(g)


def _static_like(t):
    if t is None:
        return None
    static = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    static.copy_(t)
    return static


def _capture(run, inputs, in_place: bool = False) -> CapturedForward:
    static_inputs = tuple(inputs) if in_place else tuple(_static_like(t) for t in inputs)
    side = torch.cuda.Stream(device=inputs[0].device)
    side.wait_stream(torch.cuda.current_stream(inputs[0].device))
    with torch.cuda.stream(side):
        run(*static_inputs)  # warm-up: compiles kernels and fills the table caches outside the capture
    torch.cuda.current_stream(inputs[0].device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = run(*static_inputs)
    return CapturedForward(graph, static_inputs, tuple(static_outputs))


def _remember(key, entry) -> None:
    _graphs[key] = entry
    while len(_graphs) > GRAPH_CACHE_SIZE:
        _graphs.popitem(last=False)


_last_pointers: dict = {}  # layout key -> input addresses of its last call (bounded with the cache)


def graphed_partial(backend, q, k, v, key_padding_mask, plan, options):
    """(out, lse) of ``backend.forward_partial(...)`` through a cached CUDA graph; same values bit for bit.

    ``backend`` is an ``optimized.dispatch.Backend`` and ``options`` its (frozen, hashable) options.
    """
    if not q.is_cuda:
        raise ValueError(f"CUDA graphs need CUDA tensors, got q on {q.device}")
    if q.numel() > GRAPH_MAX_ELEMENTS:
        return backend.forward_partial(q, k, v, key_padding_mask, plan, options)
    inputs = (q, k, v, key_padding_mask)
    key = graph_key(backend, q, k, v, key_padding_mask, plan, options)
    pointers = _pointers(inputs)

    def run(q_, k_, v_, mask_):
        return backend.forward_partial(q_, k_, v_, mask_, plan, options)

    direct_key = key + (pointers,)
    entry = _graphs.get(direct_key)
    if entry is None and _last_pointers.get(key) == pointers and key in _graphs:
        # Second call in a row with the same tensors: capture a graph that reads them in place.
        entry = _capture(run, inputs, in_place=True)
        _remember(direct_key, entry)
    if entry is not None:
        _graphs.move_to_end(direct_key)
    else:
        entry = _graphs.get(key)
        if entry is None:
            entry = _capture(run, inputs)
            _remember(key, entry)
        else:
            _graphs.move_to_end(key)
            _copy_in(entry.static_inputs, inputs)
        _last_pointers[key] = pointers
        while len(_last_pointers) > 4 * GRAPH_CACHE_SIZE:
            _last_pointers.pop(next(iter(_last_pointers)))
    entry.graph.replay()
    return tuple(t.clone() for t in entry.static_outputs)


def cached_graph_count() -> int:
    return len(_graphs)


def clear_graphs() -> None:
    _graphs.clear()
    _last_pointers.clear()
