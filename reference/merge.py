"""The merge rule of SPEC section 5: how partials over disjoint key chunks combine.

Part of the contract, not of the dense math, so the optimized paths and the ring use it too.
"""

from __future__ import annotations

import torch


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merge two partials over disjoint key chunks (SPEC section 5); empty partials change nothing.

    out (B, Nq, H, D), lse (B, H, Nq). Two empty partials merge to an empty partial (0, -inf).
    """
    # Normalise by the larger lse before exponentiating: the two weights then sum to 1 up to one
    # rounding, whatever the magnitude of lse (exp(lse_a - logaddexp(...)) would carry the
    # rounding of the merged lse, about eps * |lse|, into every output).
    larger = torch.maximum(lse_a, lse_b)
    empty = torch.isneginf(larger)
    shift = torch.where(empty, torch.zeros_like(larger), larger)
    weight_a, weight_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)
    total = weight_a + weight_b  # in [1, 2] unless both partials are empty
    lse = torch.where(empty, larger, shift + torch.log(total))
    total = torch.where(empty, torch.ones_like(total), total)
    weight_a = (weight_a / total).transpose(1, 2).unsqueeze(-1)
    weight_b = (weight_b / total).transpose(1, 2).unsqueeze(-1)
    return weight_a.to(out_a.dtype) * out_a + weight_b.to(out_b.dtype) * out_b, lse
