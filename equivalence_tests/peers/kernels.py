"""Plain-PyTorch stand-ins for the two CUDA attention kernels the peers call.

Both peers hand the attention of each (segment, lattice) to a fused CUDA kernel that does not run
on a CPU (and not in float64): torchscale's LongNet calls ``flash_attn_func`` (its wrapper around
flash-attn, ``torchscale/component/flash_attention.py``), dilated-attention-pytorch calls
``xformers.ops.memory_efficient_attention``. The functions here take the same arguments and
return the same results, computed by an explicit softmax: in float64 for float64 inputs, in
float32 otherwise (what the fused kernels accumulate in). Only these calls are replaced; the
peers' own dilation, offsets, padding and merge code runs unchanged.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softmax_attention(q, k, v, scale: float, causal_shift: int | None):
    """Softmax attention of q (B, M, H, K) over k (B, L, H, K), v (B, L, H, Kv).

    ``causal_shift=None``: every key; otherwise key j is allowed for query i iff j <= i + shift.
    Returns out (B, M, H, Kv) in q's dtype and lse (B, H, M) in the compute dtype; a row without
    keys gets out 0 and lse -inf.
    """
    compute = _compute_dtype(q.dtype)
    scores = torch.einsum("bmhk,blhk->bhml", q.to(compute), k.to(compute)) * scale
    if causal_shift is not None:
        rows = torch.arange(q.shape[1], device=q.device)[:, None]
        cols = torch.arange(k.shape[1], device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + causal_shift, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = torch.isneginf(lse).unsqueeze(-1)
    probs = torch.exp(scores - lse.unsqueeze(-1).masked_fill(empty, 0.0)).masked_fill(empty, 0.0)
    out = torch.einsum("bhml,blhv->bmhv", probs, v.to(compute))
    return out.to(q.dtype), lse


# --------------------------------------------------------------------------------------------
# flash-attn, as torchscale's flash_attention.flash_attn_func wraps it
# --------------------------------------------------------------------------------------------


def flash_attn_func(q, k, v, dropout=0.0, bias=None, softmax_scale=None, is_causal=False):
    """Stand-in for ``torchscale.component.flash_attention.flash_attn_func`` (the flash-attn branch).

    Same signature and results: q, k, v (B, L, H, D); returns ``(out, lse)`` with out (B, L, H, D)
    and lse (B, H, L), the natural-log softmax denominator, which flash-attn returns without a
    gradient (its backward ignores it), so it is detached here. ``softmax_scale=None`` means
    D ** -0.5; ``is_causal`` aligns the mask to the bottom-right corner as flash-attn >= 2.1 does
    (the same as top-left when, as in torchscale, queries and keys have one length).
    """
    assert bias is None  # torchscale's wrapper asserts the same: flash-attn takes no bias
    if dropout != 0.0:
        raise NotImplementedError(f"the flash-attn stand-in runs without dropout, got dropout={dropout}")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    shift = k.shape[1] - q.shape[1] if is_causal else None
    out, lse = softmax_attention(q, k, v, scale, shift)
    return out, lse.detach()


# --------------------------------------------------------------------------------------------
# xformers.ops, as dilated-attention-pytorch imports it
# --------------------------------------------------------------------------------------------


class LowerTriangularMask:
    """xformers' causal bias: query i attends key j iff j <= i (top-left aligned)."""


def memory_efficient_attention(query, key, value, attn_bias=None, p: float = 0.0, scale=None, *, op=None):
    """Stand-in for ``xformers.ops.memory_efficient_attention`` on BMHK inputs (B, M, H, K).

    Validates shapes as xformers does (same batch and heads in query, key and value, same K in
    query and key, same length in key and value) and supports what dilated-attention-pytorch
    passes: ``attn_bias`` None or a ``LowerTriangularMask``, ``p = 0``, ``op = None``.
    """
    if op is not None:
        raise NotImplementedError(f"the xformers stand-in has one implementation, got op={op!r}")
    if p != 0.0:
        raise NotImplementedError(f"the xformers stand-in runs without dropout, got p={p}")
    if attn_bias is not None and not isinstance(attn_bias, LowerTriangularMask):
        raise NotImplementedError(
            f"the xformers stand-in supports attn_bias None or LowerTriangularMask, got {attn_bias!r}"
        )
    if not (query.dim() == key.dim() == value.dim() == 4):
        raise ValueError(
            "query, key and value must be BMHK (4 dimensions), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    batch, heads = query.shape[0], query.shape[2]
    if (key.shape[0], key.shape[2], value.shape[0], value.shape[2]) != (batch, heads, batch, heads) or (
        key.shape[1] != value.shape[1] or key.shape[3] != query.shape[3]
    ):
        raise ValueError(
            "Incompatible shapes for attention inputs: "
            f"query.shape: {tuple(query.shape)}, key.shape: {tuple(key.shape)}, value.shape: {tuple(value.shape)}"
        )
    softmax_scale = query.shape[-1] ** -0.5 if scale is None else scale
    out, _ = softmax_attention(query, key, value, softmax_scale, 0 if attn_bias is not None else None)
    return out


def xformers_modules() -> dict[str, types.ModuleType]:
    """``xformers`` and ``xformers.ops`` modules holding the stand-ins, for ``sys.modules``."""
    ops = types.ModuleType("xformers.ops")
    ops.__doc__ = "Stand-in (equivalence_tests.peers.kernels): plain-PyTorch memory_efficient_attention."
    ops.memory_efficient_attention = memory_efficient_attention
    ops.LowerTriangularMask = LowerTriangularMask
    ops.AttentionOp = Any  # only used in annotations (``Optional[xops.AttentionOp]``)
    package = types.ModuleType("xformers")
    package.__doc__ = ops.__doc__
    package.__path__ = []  # a package, so that ``import xformers.ops`` resolves the submodule
    package.ops = ops
    return {"xformers": package, "xformers.ops": ops}


def import_with_stand_ins(module_name: str, stand_ins: dict[str, types.ModuleType]) -> types.ModuleType:
    """Import ``module_name`` afresh while ``stand_ins`` take the place of those modules.

    ``sys.modules`` is restored afterwards (a real ``xformers``, where installed, stays what
    everyone else imports); the returned module keeps the names it bound to the stand-ins.
    """
    import importlib

    touched = [*stand_ins, module_name]
    saved = {name: sys.modules.get(name) for name in touched}
    try:
        sys.modules.pop(module_name, None)
        sys.modules.update(stand_ins)
        module = importlib.import_module(module_name)
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
    return module
