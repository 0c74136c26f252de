"""Validation of call inputs against docs/semantics.md section 1; shared by every implementation.

Inputs come in one of ``LAYOUTS``: "bnhd" (q (B, N, H, D)) or "bhnd" (q (B, H, N, D)). Every
implementation computes on the (B, N, H, D) view of a tensor (``bnhd_view``: a transpose, no
copy) and hands its output back in the caller's layout (``layout_view``).
"""

from __future__ import annotations

import torch

from .config import LAYOUTS

# Where each named axis sits in each layout.
_AXES = {"bnhd": {"B": 0, "N": 1, "H": 2, "D": 3}, "bhnd": {"B": 0, "H": 1, "N": 2, "D": 3}}


def check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def axes_text(layout: str, heads: str = "H") -> str:
    """'(B, N, H, D)' or '(B, H, N, D)': the shape a tensor of ``layout`` has (``heads``: H or H_kv)."""
    names = sorted(_AXES[layout], key=_AXES[layout].get)
    return "(" + ", ".join(heads if name == "H" else name for name in names) + ")"


def bnhd_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The (B, N, H, D) view of a tensor given in ``layout`` (a transpose for "bhnd": no copy)."""
    return t if layout == "bnhd" else t.transpose(1, 2)


def layout_view(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A (B, N, H, D) result viewed in ``layout``: the inverse of ``bnhd_view``, which is its own inverse."""
    return bnhd_view(t, layout)


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def validate_qkv(
    q, k, v, key_padding_mask=None, scale=None, *, layout: str = "bnhd", seq_len_must_match: bool = True
) -> None:
    """Raise TypeError / ValueError naming the argument for every input section 1 rejects.

    Shapes are read in ``layout``; the messages print the caller's shapes and the layout's axis names.
    """
    axes = _AXES[check_layout(layout)]
    for name, t in (("q", q), ("k", k), ("v", v)):
        expected = axes_text(layout, "H" if name == "q" else "H_kv")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {expected}, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions {expected} (layout={layout!r}), got {_describe(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_describe(t)}")
    size = lambda t, axis: t.shape[axes[axis]]  # noqa: E731
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {_describe(t)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {_describe(t)}")
        if size(t, "B") != size(q, "B"):
            raise ValueError(f"{name} must have q's batch size B={size(q, 'B')}, got {_describe(t)}")
        if seq_len_must_match and size(t, "N") != size(q, "N"):
            raise ValueError(
                f"{name} must have q's sequence length N={size(q, 'N')} (layout={layout!r}: "
                f"{axes_text(layout)}), got {_describe(t)}"
            )
        if size(t, "D") != size(q, "D"):
            raise ValueError(f"{name} must have q's head dim D={size(q, 'D')}, got {_describe(t)}")
    if size(k, "N") != size(v, "N") or size(k, "H") != size(v, "H"):
        raise ValueError(f"k and v must have the same (N, H_kv), got k {_describe(k)} and v {_describe(v)}")
    if min(q.shape) == 0 or min(k.shape) == 0:
        raise ValueError(f"q, k and v must be non-empty, got q {_describe(q)} and k {_describe(k)}")
    heads, kv_heads = size(q, "H"), size(k, "H")
    if heads % kv_heads != 0:
        raise ValueError(
            f"q's heads H={heads} must be a multiple of k/v's heads H_kv={kv_heads} (layout={layout!r}: "
            f"{axes_text(layout)})"
        )
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor (B, N), got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool, got {_describe(key_padding_mask)}")
        expected = (size(k, "B"), size(k, "N"))
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(f"key_padding_mask must have shape (B, N) = {expected}, got {_describe(key_padding_mask)}")
        if key_padding_mask.device != k.device:
            raise ValueError(f"key_padding_mask must be on k's device {k.device}, got {_describe(key_padding_mask)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {scale!r}")


def default_scale(head_dim: int, scale: float | None) -> float:
    return float(head_dim) ** -0.5 if scale is None else float(scale)
