"""The public modules of the fast path (SPEC section 8).

Entry points validate once, then dispatch explicitly on the backend. An explicit backend never
falls back to another one; ``"auto"`` picks by device and says what it picked.
"""

from __future__ import annotations


import torch
from torch import nn

from reference.config import DilationConfig, SparsePatternConfig
from reference.inputs import default_scale, validate_qkv
from reference.semantics import AttentionGeometry

from .plan import CallPlan

BACKENDS = ("auto", "torch", "flex", "triton")


def resolve_backend(
    backend: str, device: torch.device, *, sparse_config=None, head_dim=None, dtype=None, needs_grad=False
) -> str:
    """The backend a call on ``device`` runs.

    ``auto`` is triton on CUDA and torch elsewhere; on CUDA, a call the triton kernel cannot run
    (given the case: block size, head dim, dtype, or gradients needed) gets torch instead. That is
    auto's choice, recorded in ``last_backend``; an explicit backend is returned unchanged.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "torch"
    if needs_grad:
        return "torch"
    if sparse_config is not None:
        from . import triton_backend

        if triton_backend.supports(sparse_config, head_dim, dtype, device) is not None:
            return "torch"
    return "triton"


def run_partial(backend: str, q, k, v, key_padding_mask, plan: CallPlan, options: dict):
    """One partial attention (SPEC section 5) on the named backend: (out float32 or q.dtype, lse float32)."""
    match backend:
        case "torch":
            from . import torch_backend

            return torch_backend.partial_forward(q, k, v, key_padding_mask, plan, work_size=options["work_size"])
        case "flex":
            from . import flex_backend

            return flex_backend.partial_forward(q, k, v, key_padding_mask, plan)
        case "triton":
            from . import triton_backend

            return triton_backend.partial_forward(q, k, v, key_padding_mask, plan)
        case other:
            raise ValueError(f"backend must be one of {BACKENDS[1:]} here, got {other!r}")


def sparse_weights(backend: str, q, k, key_padding_mask, lse, plan: CallPlan, options: dict | None = None):
    """The sparse attention weights (SPEC section 6) from the final lse."""
    match backend:
        case "triton":
            from . import triton_backend

            return triton_backend.attention_weights(q, k, key_padding_mask, lse, plan)
        case "torch" | "flex":
            from . import weights

            return weights.attention_weights(q, k, key_padding_mask, lse, plan, **(options or {}))
        case other:
            raise ValueError(f"backend must be one of {BACKENDS[1:]} here, got {other!r}")


class BlockSparseRingDilatedAttention(nn.Module):
    """Block-sparse ring dilated attention, fast path. Same call as ``reference.BlockSparseRingDilatedAttention``.

    backend: ``"auto"`` (triton on CUDA, torch elsewhere), ``"torch"``, ``"flex"``, ``"triton"``.
    ring_size / ring_chunk_lengths: split keys and values into contiguous chunks in one process.
    process_group: spread the sequence over the ranks of a torch.distributed group.
    work_size: active blocks the torch backend processes at once (bounds its extra memory).
    use_cuda_graphs: capture and replay the forward on CUDA.
    """

    def __init__(
        self,
        segment_lengths,
        dilation_rates,
        sparse_config: SparsePatternConfig | None = None,
        head_mode: str = "split",
        backend: str = "auto",
        ring_size: int | None = None,
        ring_chunk_lengths=None,
        process_group=None,
        work_size: int = 4096,
        use_cuda_graphs: bool = True,
    ) -> None:
        super().__init__()
        self.dilation = DilationConfig(tuple(segment_lengths), tuple(dilation_rates), head_mode)
        if sparse_config is None:
            sparse_config = SparsePatternConfig(pattern_type="dense")
        if not isinstance(sparse_config, SparsePatternConfig):
            raise TypeError(f"sparse_config must be a SparsePatternConfig or None, got {type(sparse_config).__name__}")
        self.sparse_config = sparse_config
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.last_backend: str | None = None  # what the last call ran ("auto" resolved)
        if ring_size is not None and (isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size < 1):
            raise ValueError(f"ring_size must be an int >= 1 or None, got {ring_size!r}")
        if ring_size is not None and ring_chunk_lengths is not None:
            raise ValueError("give ring_size or ring_chunk_lengths, not both")
        if ring_chunk_lengths is not None:
            ring_chunk_lengths = tuple(ring_chunk_lengths)
            if not ring_chunk_lengths or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in ring_chunk_lengths
            ):
                raise ValueError(f"ring_chunk_lengths must be ints >= 0, got {ring_chunk_lengths!r}")
        self.ring_size = ring_size
        self.ring_chunk_lengths = ring_chunk_lengths
        self.process_group = process_group
        if isinstance(work_size, bool) or not isinstance(work_size, int) or work_size < 1:
            raise ValueError(f"work_size must be an int >= 1, got {work_size!r}")
        self.work_size = work_size
        self.use_cuda_graphs = bool(use_cuda_graphs)

    # ------------------------------------------------------------------------------------
    def geometry(self, seq_len: int, num_heads: int) -> AttentionGeometry:
        return AttentionGeometry(self.dilation, seq_len, num_heads)

    def pick_backend(self, q, k, v) -> str:
        """The backend this call runs (``auto`` resolved for these inputs)."""
        return resolve_backend(
            self.backend, q.device, sparse_config=self.sparse_config, head_dim=q.shape[3], dtype=q.dtype,
            needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)),
        )

    def chunk_lengths(self, seq_len: int) -> tuple[int, ...] | None:
        """Key chunk lengths of the in-process ring, or None for no split."""
        if self.ring_chunk_lengths is not None:
            if sum(self.ring_chunk_lengths) != seq_len:
                raise ValueError(
                    f"ring_chunk_lengths {self.ring_chunk_lengths} sum to {sum(self.ring_chunk_lengths)}, "
                    f"but the sequence has N={seq_len}"
                )
            return self.ring_chunk_lengths
        if self.ring_size is None or self.ring_size == 1:
            return None
        base, extra = divmod(seq_len, self.ring_size)
        return tuple(base + (1 if p < extra else 0) for p in range(self.ring_size))

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
        if self.process_group is not None:
            from . import ring

            return ring.distributed_forward(
                self, q, k, v, bool(is_causal), key_padding_mask, return_attention_weights, return_lse, scale
            )
        validate_qkv(q, k, v, key_padding_mask, scale)
        backend = self.pick_backend(q, k, v)
        self.last_backend = backend
        geometry = self.geometry(q.shape[1], q.shape[2])
        scale = default_scale(q.shape[3], scale)
        options = {"work_size": self.work_size}
        chunks = self.chunk_lengths(q.shape[1])
        if chunks is None:
            plan = CallPlan.whole(geometry, self.sparse_config, is_causal, scale)
            out, lse = self._whole_forward(backend, q, k, v, key_padding_mask, plan, options)
        else:
            from . import ring

            out, lse = ring.in_process_forward(
                backend, q, k, v, key_padding_mask, geometry, self.sparse_config, bool(is_causal), scale,
                chunks, options,
            )
        if torch.is_grad_enabled() and not out.requires_grad and any(t.requires_grad for t in (q, k, v)):
            # No block of the call is active, so out is the constant 0; tie it to the inputs so that
            # backward gives zero gradients, as the reference does, instead of failing.
            out = out + sum(t.sum() for t in (q, k, v)).to(out.dtype) * 0.0
        results = (out.to(q.dtype),)
        if return_attention_weights:
            plan = CallPlan.whole(geometry, self.sparse_config, is_causal, scale)
            results += (sparse_weights(backend, q, k, key_padding_mask, lse, plan, options),)
        if return_lse:
            results += (lse,)
        return results[0] if len(results) == 1 else results

    def _whole_forward(self, backend, q, k, v, key_padding_mask, plan, options):
        if backend == "triton" and q.is_cuda and self.use_cuda_graphs:
            from . import graphs

            return graphs.graphed_partial(self, backend, q, k, v, key_padding_mask, plan, options)
        return run_partial(backend, q, k, v, key_padding_mask, plan, options)

    def extra_repr(self) -> str:
        picked = f", last_backend={self.last_backend!r}" if self.last_backend else ""
        ring = f", ring_size={self.ring_size}" if self.ring_size else ""
        return f"{self.dilation}, {self.sparse_config}, backend={self.backend!r}{picked}{ring}"


class BlockSparseRingMultiheadDilatedAttention(nn.Module):
    """Called like ``nn.MultiheadAttention(batch_first=True)``: (query, key, value) -> (out, weights or None).

    q, k, v and out projections; ``layer_norm=True`` puts a LayerNorm before ``out_proj``
    (LongNet / MAGNETO sub-LN); ``gamma_init`` scales the Xavier init of the value and output
    projections.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths,
        dilation_rates,
        sparse_config: SparsePatternConfig | None = None,
        head_mode: str = "split",
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        device=None,
        dtype=None,
        **attention_options,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.gamma_init = float(gamma_init)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if layer_norm else None
        self.attention = BlockSparseRingDilatedAttention(
            segment_lengths, dilation_rates, sparse_config=sparse_config, head_mode=head_mode, **attention_options
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.q_proj.weight)
        nn.init.xavier_normal_(self.k_proj.weight)
        nn.init.xavier_normal_(self.v_proj.weight, gain=self.gamma_init)
        nn.init.xavier_normal_(self.out_proj.weight, gain=self.gamma_init)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = False, is_causal: bool = False):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.embed_dim:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be (B, N, embed_dim={self.embed_dim}), got {shape}")
        batch, seq_len, _ = query.shape
        split = lambda x: x.reshape(batch, x.shape[1], self.num_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value))
        result = self.attention(
            q, k, v, is_causal=is_causal, key_padding_mask=key_padding_mask, return_attention_weights=need_weights
        )
        out, weights = result if need_weights else (result, None)
        out = out.reshape(batch, seq_len, self.embed_dim)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out), weights
