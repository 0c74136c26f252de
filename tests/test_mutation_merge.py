"""The merge rule of docs/semantics.md section 5 at its edges: one partial, and partials given in any order.

The backends merge two or more partials and the ring merges what it holds; a single partial (a
ring of one rank, a query chunk that meets one key chunk) takes ``merge_all``'s shortcut, which no
other test reaches (found by ``make mutation``, experiments/mutation.py).
"""

from __future__ import annotations

import itertools

import torch

from reference import merge_all, merge_partials


def _partial(generator, empty_rows=()):
    out = torch.randn(2, 5, 3, 4, generator=generator, dtype=torch.float64)
    lse = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    for b, h, i in empty_rows:  # an empty row: out 0, lse -inf
        out[b, i, h] = 0.0
        lse[b, h, i] = float("-inf")
    return out, lse


def test_merging_one_partial_returns_it():
    out, lse = _partial(torch.Generator().manual_seed(0), empty_rows=[(0, 1, 2)])
    merged_out, merged_lse = merge_all([out], [lse])
    assert torch.equal(merged_out, out) and torch.equal(merged_lse, lse)


def test_merge_all_is_the_chain_of_pairwise_merges_in_any_order():
    generator = torch.Generator().manual_seed(1)
    partials = [_partial(generator, empty_rows=[(1, 0, 4)]), _partial(generator), _partial(generator, [(1, 0, 4)])]
    for order in itertools.permutations(partials):
        out, lse = order[0]
        for other_out, other_lse in order[1:]:
            out, lse = merge_partials(out, lse, other_out, other_lse)
        merged_out, merged_lse = merge_all([o for o, _ in order], [s for _, s in order])
        torch.testing.assert_close(merged_out, out, rtol=1e-12, atol=0)
        torch.testing.assert_close(merged_lse, lse, rtol=1e-12, atol=0)
