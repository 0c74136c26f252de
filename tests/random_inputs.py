"""Fresh random inputs for the example-based backend tests (never zeros)."""

from __future__ import annotations

import torch


def make_inputs(seed, B, N, H, H_kv, D, dtype=torch.float32, pad_fraction=0.0, pad_first=False, device="cpu"):
    """q (B, N, H, D), k and v (B, N, H_kv, D) from a seeded generator, and a padding mask or None.

    ``pad_fraction`` > 0 pads about that share of keys; ``pad_first`` also pads key 0 of batch 0,
    so that with is_causal query 0 of batch 0 has no key: an empty row.
    """
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, H, D, generator=generator).to(device, dtype)
    k = torch.randn(B, N, H_kv, D, generator=generator).to(device, dtype)
    v = torch.randn(B, N, H_kv, D, generator=generator).to(device, dtype)
    mask = None
    if pad_fraction > 0:
        mask = torch.rand(B, N, generator=generator) < pad_fraction
        if pad_first:
            mask[0, 0] = True
        mask = mask.to(device)
    return q, k, v, mask
