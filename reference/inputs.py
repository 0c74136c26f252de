"""Validation of call inputs against SPEC section 1; shared by every implementation."""

from __future__ import annotations

import torch


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def validate_qkv(q, k, v, key_padding_mask=None, scale=None, *, seq_len_must_match: bool = True) -> None:
    """Raise TypeError / ValueError naming the argument for every input SPEC section 1 rejects."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, H, D), got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, N, H, D), got {_describe(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_describe(t)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {_describe(t)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {_describe(t)}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} must have q's batch size B={q.shape[0]}, got {_describe(t)}")
        if seq_len_must_match and t.shape[1] != q.shape[1]:
            raise ValueError(f"{name} must have q's sequence length N={q.shape[1]}, got {_describe(t)}")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"{name} must have q's head dim D={q.shape[3]}, got {_describe(t)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same (N, H_kv), got k {_describe(k)} and v {_describe(v)}")
    heads, kv_heads = q.shape[2], k.shape[2]
    if heads % kv_heads != 0:
        raise ValueError(f"q's heads H={heads} must be a multiple of k/v's heads H_kv={kv_heads}")
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise ValueError(f"q, k and v must be non-empty, got q {_describe(q)} and k {_describe(k)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor (B, N), got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool, got {_describe(key_padding_mask)}")
        expected = (k.shape[0], k.shape[1])
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(f"key_padding_mask must have shape (B, N) = {expected}, got {_describe(key_padding_mask)}")
        if key_padding_mask.device != k.device:
            raise ValueError(f"key_padding_mask must be on k's device {k.device}, got {_describe(key_padding_mask)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {scale!r}")


def default_scale(head_dim: int, scale: float | None) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)
