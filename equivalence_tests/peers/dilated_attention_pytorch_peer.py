"""fkodom's ``dilated-attention-pytorch`` ``DilatedAttention`` as a ``verify`` target (head_mode "split").

Target: ``equivalence_tests.peers.dilated_attention_pytorch_peer:factory``. The ``peers`` extra
installs the PyPI distribution ``dilated-attention-pytorch`` (0.2.0) without its declared
dependencies (xformers, and torchscale for its ``long_net`` module, which is not used here).

What the adapter changes, and nothing else:
- Kernel: ``dilated_attention_pytorch/dilated_attention.py`` runs ``import xformers.ops as xops``
  at import time and calls ``xops.memory_efficient_attention`` (CUDA kernels). The module is
  imported while ``sys.modules`` holds a stand-in ``xformers.ops`` (``kernels.xformers_modules``:
  ``memory_efficient_attention``, ``LowerTriangularMask``, ``AttentionOp``, plain PyTorch, same
  arguments and results); ``sys.modules`` is restored right after, so nothing else sees it.
- Layout: none; its ``DilatedAttention.forward(query, key, value, is_causal)`` takes
  (B, N, H, D) like this project.
- Arguments: it has no ``key_padding_mask``; a mask that pads some key is reported as not
  supported (an all-False mask is no padding and the call runs).
"""

from __future__ import annotations

import functools

from . import kernels
from .common import distribution_version, require_plain_dilated_attention

PEER = "dilated-attention-pytorch DilatedAttention"
HEAD_MODE = "split"  # heads cut into one contiguous group per branch


@functools.cache
def peer_module():
    """``dilated_attention_pytorch.dilated_attention``, imported against the xformers stand-in."""
    return kernels.import_with_stand_ins("dilated_attention_pytorch.dilated_attention", kernels.xformers_modules())


def factory(config):
    """A callable ``(q, k, v, is_causal=False, key_padding_mask=None) -> out`` for ``config``."""
    require_plain_dilated_attention(config, PEER, HEAD_MODE)
    dilation = config.case.dilation
    module = (
        peer_module()
        .DilatedAttention(segment_lengths=list(dilation.segment_lengths), dilation_rates=list(dilation.dilation_rates))
        .to(config.device)
    )

    def attention(q, k, v, is_causal=False, key_padding_mask=None):
        if key_padding_mask is not None and bool(key_padding_mask.any()):
            raise NotImplementedError(f"{PEER}.forward takes no key_padding_mask (got one that pads keys)")
        return module(q, k, v, is_causal=is_causal)

    return attention


factory.peer_info = {
    "peer": PEER,
    "class": "dilated_attention_pytorch.dilated_attention.DilatedAttention",
    "distribution": "dilated-attention-pytorch",
    "version": distribution_version("dilated-attention-pytorch"),
    "head_mode": HEAD_MODE,
    "substituted": "xformers.ops (memory_efficient_attention, LowerTriangularMask, AttentionOp) -> "
    "equivalence_tests.peers.kernels",
}
