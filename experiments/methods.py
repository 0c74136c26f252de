"""The attention methods the sweeps compare, each as a zero-argument callable on fixed inputs."""

from __future__ import annotations

import torch

from .settings import MemorySetting, pattern_config

METHODS = {
    "dense_nxn": "softmax(Q K^T) V materializing the B x H x N x N weights (the seed's 'Original')",
    "sdpa": "torch scaled_dot_product_attention, full attention, no mask (a fused kernel: the anchor)",
    "reference": "reference.BlockSparseRingDilatedAttention (dense float64 ground truth)",
    "optimized": "optimized.BlockSparseRingDilatedAttention, no weights",
    "optimized+weights": "optimized.BlockSparseRingDilatedAttention, return_attention_weights=True",
}
QUADRATIC_METHODS = ("dense_nxn", "reference")
# Methods that attend to every pair whatever the block layout: they are measured once per N, pattern None.
FULL_ATTENTION_METHODS = ("dense_nxn", "sdpa")


def make_inputs(seq_len: int, setting: MemorySetting, device, seed: int = 0):
    """q, k, v of shape (B, N, H, D), fresh standard normal values from ``seed``, in the setting's dtype."""
    generator = torch.Generator().manual_seed(seed)
    shape = (setting.batch, seq_len, setting.heads, setting.head_dim)
    return tuple(torch.randn(shape, generator=generator).to(device, setting.torch_dtype) for _ in range(3))


def _dense_nxn(q, k, v):
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v), weights


def method_callable(method: str, q, k, v, setting: MemorySetting, pattern: str | None):
    """A zero-argument callable running ``method`` on (q, k, v); built outside the measurement."""
    match method:
        case "dense_nxn":
            return lambda: _dense_nxn(q, k, v)
        case "sdpa":
            sdpa = torch.nn.functional.scaled_dot_product_attention
            return lambda: sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        case "reference":
            from reference import BlockSparseRingDilatedAttention as Reference

            module = Reference(
                setting.segment_lengths,
                setting.dilation_rates,
                pattern_config(pattern, setting),
                head_mode=setting.head_mode,
            )
            return lambda: module(q, k, v)
        case "optimized" | "optimized+weights":
            from optimized import BlockSparseRingDilatedAttention as Optimized

            module = Optimized(
                setting.segment_lengths,
                setting.dilation_rates,
                pattern_config(pattern, setting),
                head_mode=setting.head_mode,
                backend=setting.backend,
                work_size=setting.work_size,
                use_cuda_graphs=False,
            )
            with_weights = method == "optimized+weights"
            return lambda: module(q, k, v, return_attention_weights=with_weights)
        case other:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {other!r}")


def resolved_backend(setting: MemorySetting, device) -> str:
    """The backend an ``optimized`` method runs for ``setting`` on ``device`` (what 'auto' picks)."""
    from optimized import resolve_backend

    return resolve_backend(setting.backend, torch.device(device))
