"""The dense reference: docs/semantics.md section 4 computed literally from the dense multiplicity matrix.

Slow and small on purpose. Float64 on the CPU by default (the ground truth); in the input
dtype when asked, which is the baseline error of docs/numerics.md.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import DilationConfig, SparsePatternConfig
from .inputs import bnhd_view, check_layout, default_scale, layout_view, validate_qkv
from .semantics import AttentionGeometry, dense_multiplicity


def _expand_kv_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    # Grouped-query: query head h reads key/value head h // (H // H_kv).
    return t.repeat_interleave(num_heads // t.shape[2], dim=2)


def partial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    geometry: AttentionGeometry,
    sparse_config: SparsePatternConfig,
    *,
    query_start: int = 0,
    key_start: int = 0,
    is_causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    compute_dtype: torch.dtype | None = torch.float64,
    return_weights: bool = False,
    layout: str = "bnhd",
):
    """Partial attention of a query chunk against a key chunk (docs/semantics.md section 5).

    ``q`` holds global positions [query_start, query_start + Nq), ``k``/``v`` (and the chunk's
    ``key_padding_mask`` (B, Nk)) hold [key_start, key_start + Nk). Returns ``(out, lse)`` or
    ``(out, lse, weights)``: out (B, Nq, H, D), lse (B, H, Nq), weights (B, H, Nq, Nk), all in
    ``compute_dtype`` (the input dtype when None), on the CPU. Empty rows: out 0, lse -inf.
    ``layout="bhnd"`` takes q, k, v as (B, H, N, D) and returns out that way (section 1).
    Differentiable in q, k, v (the gradients of docs/semantics.md section 4's formula; empty rows give 0).
    """
    dtype = q.dtype if compute_dtype is None else compute_dtype
    q, k, v = (bnhd_view(t, check_layout(layout)) for t in (q, k, v))
    num_heads = q.shape[2]
    q_range = (query_start, query_start + q.shape[1])
    k_range = (key_start, key_start + k.shape[1])
    counts = dense_multiplicity(geometry, sparse_config, is_causal, None, q_range, k_range)
    if key_padding_mask is not None:
        counts = counts.masked_fill(key_padding_mask.to("cpu")[:, None, None, :], 0)
    # Casts and moves are differentiable: gradients of the formula flow back to the inputs.
    qf = q.to("cpu", dtype)
    kf = _expand_kv_heads(k.to("cpu", dtype), num_heads)
    vf = _expand_kv_heads(v.to("cpu", dtype), num_heads)
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * default_scale(q.shape[3], scale)
    # A key allowed in c branches contributes c * exp(score): add log(c), -inf where c = 0.
    # Rows with no key at all are known from the counts; their logits become 0 before the
    # log-sum-exp (whose gradient on an all -inf row is NaN) and their results are set after.
    row_empty = (counts.sum(-1) == 0).unsqueeze(-1)
    logits = (scores + torch.log(counts.to(dtype))).masked_fill(row_empty, 0.0)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.unsqueeze(-1)).masked_fill(row_empty, 0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vf)
    lse = lse.masked_fill(row_empty.squeeze(-1), float("-inf"))
    out = layout_view(out, layout)
    return (out, lse, probs) if return_weights else (out, lse)


class BlockSparseRingDilatedAttention(nn.Module):
    """Ground truth for docs/semantics.md section 8: the dense reference as a module.

    ``compute_dtype=torch.float64`` (default) computes and returns float64 on the CPU;
    ``compute_dtype=None`` computes in the input dtype (docs/numerics.md's baseline).
    """

    def __init__(
        self,
        segment_lengths,
        dilation_rates,
        sparse_config: SparsePatternConfig | None = None,
        head_mode: str = "split",
        compute_dtype: torch.dtype | None = torch.float64,
        layout: str = "bnhd",
    ) -> None:
        super().__init__()
        self.layout = check_layout(layout)
        self.dilation = DilationConfig(tuple(segment_lengths), tuple(dilation_rates), head_mode)
        if sparse_config is None:
            sparse_config = SparsePatternConfig(pattern_type="dense")
        if not isinstance(sparse_config, SparsePatternConfig):
            raise TypeError(f"sparse_config must be a SparsePatternConfig or None, got {type(sparse_config).__name__}")
        self.sparse_config = sparse_config
        if compute_dtype is not None and not (
            isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
        ):
            raise TypeError(f"compute_dtype must be a floating torch.dtype or None, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype

    def geometry(self, seq_len: int, num_heads: int) -> AttentionGeometry:
        return AttentionGeometry(self.dilation, seq_len, num_heads)

    def forward(
        self,
        q,
        k,
        v,
        is_causal: bool = False,
        key_padding_mask=None,
        return_attention_weights: bool = False,
        return_lse: bool = False,
        scale: float | None = None,
    ):
        validate_qkv(q, k, v, key_padding_mask, scale, layout=self.layout)
        seq_len, num_heads = bnhd_view(q, self.layout).shape[1:3]
        out, lse, weights = partial_attention(
            q,
            k,
            v,
            self.geometry(seq_len, num_heads),
            self.sparse_config,
            is_causal=bool(is_causal),
            key_padding_mask=key_padding_mask,
            scale=scale,
            compute_dtype=self.compute_dtype,
            return_weights=True,
            layout=self.layout,
        )
        results = (out,)
        if return_attention_weights:
            results += (weights,)
        if return_lse:
            results += (lse,)
        return results[0] if len(results) == 1 else results

    def extra_repr(self) -> str:
        layout = "" if self.layout == "bnhd" else f", layout={self.layout!r}"
        return f"{self.dilation}, {self.sparse_config}, compute_dtype={self.compute_dtype}{layout}"
