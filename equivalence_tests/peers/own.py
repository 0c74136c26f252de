"""This project's fast path as a ``verify`` target: ``equivalence_tests.peers.own:factory``.

``factory`` builds ``optimized.BlockSparseRingDilatedAttention`` for the drawn configuration
(segments, rates, head mode, block layout, ring chunks) with backend "auto";
``torch_factory`` / ``flex_factory`` / ``triton_factory`` pin a backend. The call returns
``(out, lse)`` so that both are judged.
"""

from __future__ import annotations

import functools

import optimized
from equivalence_tests import strategies as s


def factory(config, backend: str = "auto"):
    """A callable ``(q, k, v, is_causal=False, key_padding_mask=None) -> (out, lse)`` for ``config``."""
    module = optimized.BlockSparseRingDilatedAttention(
        **s.module_kwargs(config.case), backend=backend, ring_chunk_lengths=config.ring_chunk_lengths
    )

    def attention(q, k, v, is_causal=False, key_padding_mask=None):
        return module(q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, return_lse=True)

    return attention


torch_factory = functools.partial(factory, backend="torch")
flex_factory = functools.partial(factory, backend="flex")
triton_factory = functools.partial(factory, backend="triton")
