"""Targets for ``python -m equivalence_tests.verify``: third-party dilated attention and this project's own.

- ``torchscale_longnet:factory``: Microsoft torchscale's LongNet ``DilatedAttention`` (head_mode "all").
- ``dilated_attention_pytorch_peer:factory``: fkodom's ``dilated-attention-pytorch`` ``DilatedAttention``
  (heads split in groups, head_mode "split").
- ``own:factory``: ``optimized.BlockSparseRingDilatedAttention``.

The peers need CUDA kernels (flash-attn, xformers); ``kernels`` holds plain-PyTorch stand-ins for
exactly those calls, and each adapter's docstring says what it substitutes and what it adapts
(layouts, argument names), never their logic. They are installed by the ``peers`` extra and the
Makefile's install step. Findings: experiments/results/peers/README.md, pinned in tests/test_peers.py.
"""
