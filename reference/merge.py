"""The merge rule of docs/semantics.md section 5: how partials over disjoint key chunks combine.

Part of the contract, not of the dense math, so the optimized paths and the ring use it too.
"""

from __future__ import annotations

import torch


def merge_partials(out_a, lse_a, out_b, lse_b):
    """Merge two partials over disjoint key chunks (docs/semantics.md section 5); empty partials change nothing.

    out (B, Nq, H, D), lse (B, H, Nq). Two empty partials merge to an empty partial (0, -inf).
    """
    # Normalise by the larger lse before exponentiating: the two weights then sum to 1 up to one
    # rounding, whatever the magnitude of lse (exp(lse_a - logaddexp(...)) would carry the
    # rounding of the merged lse, about eps * |lse|, into every output).
    larger = torch.maximum(lse_a, lse_b)
    empty = torch.isneginf(larger)
    # The result does not depend on the shift (its derivative is exactly 0), so it is detached:
    # autograd would otherwise add two large, cancelling terms through it and keep the rounding.
    shift = torch.where(empty, torch.zeros_like(larger), larger).detach()
    weight_a, weight_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)
    # In [1, 2] unless both partials are empty; 1 there, so that neither log nor its gradient
    # (which torch.where would multiply by 0, giving NaN from inf) ever sees a 0.
    total = torch.where(empty, torch.ones_like(larger), weight_a + weight_b)
    lse = torch.where(empty, larger, shift + torch.log(total))
    weight_a = (weight_a / total).transpose(1, 2).unsqueeze(-1)
    weight_b = (weight_b / total).transpose(1, 2).unsqueeze(-1)
    return weight_a.to(out_a.dtype) * out_a + weight_b.to(out_b.dtype) * out_b, lse


def merge_all(outs, lses):
    """Merge any number of partials over disjoint key sets at once (docs/semantics.md section 5).

    One normalisation for all of them, rather than a chain of pairwise merges: fewer roundings
    in the result and in its gradient. outs: list of (B, Nq, H, D); lses: list of (B, H, Nq).
    """
    if len(outs) == 1:
        return outs[0], lses[0]
    lse_stack = torch.stack(lses)  # (P, B, H, Nq)
    larger = lse_stack.max(dim=0).values
    empty = torch.isneginf(larger)
    # The result does not depend on the shift (its derivative is exactly 0): detached, see above.
    shift = torch.where(empty, torch.zeros_like(larger), larger).detach()
    weights = torch.exp(lse_stack - shift)  # (P, B, H, Nq), the largest is 1
    total = torch.where(empty, torch.ones_like(larger), weights.sum(dim=0))  # 1 where all are empty, as above
    lse = torch.where(empty, larger, shift + torch.log(total))
    weights = weights / total
    out = sum(w.transpose(1, 2).unsqueeze(-1).to(o.dtype) * o for w, o in zip(weights, outs))
    return out, lse
