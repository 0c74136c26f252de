"""Microsoft torchscale's LongNet ``DilatedAttention`` as a ``verify`` target (head_mode "all").

The official LongNet code (``torchscale/component/dilated_attention.py``) is in the torchscale
repository but in no ``torchscale`` release on PyPI (0.3.0, the last, predates it); the PyPI
distribution ``torchscale-gml`` 0.2.3 ships that repository's ``torchscale`` package with it,
and that is what the ``peers`` extra installs (``make install``; without its declared
dependencies, see the Makefile). Target: ``equivalence_tests.peers.torchscale_longnet:factory``.

What the adapter changes, and nothing else:
- Kernel: ``DilatedAttention`` requires ``args.flash_attention`` and calls ``flash_attn_func``
  (flash-attn, CUDA only; ``None`` on a CPU) from ``torchscale.component.multihead_attention``.
  During each call that name is bound to ``kernels.flash_attn_func``, a plain-PyTorch function
  with the same arguments and results, and restored afterwards.
- Layout and projections: the module is a multi-head attention layer on (B, N, H * D) with
  q/k/v/out projections. Its projections are set to the identity (weight I, bias 0: exact in
  floating point), q, k, v (B, N, H, D) are passed as (B, N, H * D), which its own
  ``rearrange('b l (h d) -> ...')`` splits back into the same heads, and the output is reshaped
  to (B, N, H, D). The sub-LayerNorm of the Magneto layer (``subln``) is off: it is part of the
  layer around the attention, not of the attention.
- Arguments: ``key_padding_mask`` and ``is_causal`` go to its ``forward`` under those names.
"""

from __future__ import annotations

import contextlib

import torch

from . import kernels
from .common import distribution_version, require_plain_dilated_attention

PEER = "torchscale DilatedAttention"
HEAD_MODE = "all"  # every head in every branch, its offset j // ceil(H / r) (dense_to_sparse)


@contextlib.contextmanager
def flash_kernel_stand_in():
    """Bind torchscale's ``flash_attn_func`` to the plain-PyTorch stand-in for the duration."""
    from torchscale.component import multihead_attention

    saved = multihead_attention.flash_attn_func
    multihead_attention.flash_attn_func = kernels.flash_attn_func
    try:
        yield
    finally:
        multihead_attention.flash_attn_func = saved


def build_module(segment_lengths, dilation_rates, num_heads: int, head_dim: int, dtype, device):
    """torchscale's ``DilatedAttention`` as LongNet builds it, with identity projections."""
    from torchscale.architecture.config import EncoderConfig
    from torchscale.component.dilated_attention import DilatedAttention

    # The config evaluates segment_length / dilated_ratio from strings (command-line style).
    args = EncoderConfig(
        flash_attention=True,
        segment_length=repr(list(segment_lengths)),
        dilated_ratio=repr(list(dilation_rates)),
        seq_parallel=False,
        xpos_rel_pos=False,
        multiway=False,
    )
    embed_dim = num_heads * head_dim
    module = DilatedAttention(args, embed_dim, num_heads, dropout=0.0, self_attention=True, subln=False)
    with torch.no_grad():
        for projection in (module.q_proj, module.k_proj, module.v_proj, module.out_proj):
            projection.weight.copy_(torch.eye(embed_dim))
            projection.bias.zero_()
    return module.to(device=device, dtype=dtype).eval()


def factory(config):
    """A callable ``(q, k, v, is_causal=False, key_padding_mask=None) -> out`` for ``config``."""
    require_plain_dilated_attention(config, PEER, HEAD_MODE)
    shape = config.case.shape
    dilation = config.case.dilation
    module = build_module(
        dilation.segment_lengths, dilation.dilation_rates, shape.num_heads, shape.head_dim, config.dtype, config.device
    )

    def attention(q, k, v, is_causal=False, key_padding_mask=None):
        batch, seq_len, heads, head_dim = q.shape
        as_embedding = lambda t: t.reshape(batch, seq_len, heads * head_dim)  # noqa: E731
        with flash_kernel_stand_in():
            out, _ = module(
                as_embedding(q),
                as_embedding(k),
                as_embedding(v),
                key_padding_mask=key_padding_mask,
                is_causal=is_causal,
            )
        return out.reshape(batch, seq_len, heads, head_dim)

    return attention


factory.peer_info = {
    "peer": PEER,
    "class": "torchscale.component.dilated_attention.DilatedAttention",
    "distribution": "torchscale-gml",
    "version": distribution_version("torchscale-gml"),
    "head_mode": HEAD_MODE,
    "substituted": "torchscale.component.multihead_attention.flash_attn_func -> "
    "equivalence_tests.peers.kernels.flash_attn_func",
}
