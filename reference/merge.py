"""The merge rule of SPEC section 5: how partials over disjoint key chunks combine.

Part of the contract, not of the dense math, so the optimized paths and the ring use it too.
"""

from __future__ import annotations

import torch


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merge two partials over disjoint key chunks (SPEC section 5); empty partials change nothing.

    out (B, Nq, H, D), lse (B, H, Nq). Two empty partials merge to an empty partial (0, -inf).
    """
    lse = torch.logaddexp(lse_a, lse_b)
    empty = torch.isneginf(lse)
    safe = torch.where(empty, torch.zeros_like(lse), lse)
    weight_a = torch.exp(lse_a - safe).masked_fill(empty, 0.0).transpose(1, 2).unsqueeze(-1)
    weight_b = torch.exp(lse_b - safe).masked_fill(empty, 0.0).transpose(1, 2).unsqueeze(-1)
    return weight_a.to(out_a.dtype) * out_a + weight_b.to(out_b.dtype) * out_b, lse
