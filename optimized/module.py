"""The public modules of the fast path (docs/semantics.md section 8).

Entry points validate once, then dispatch explicitly on the chosen backend
(``optimized.dispatch``). An explicit backend never falls back to another one; ``"auto"``
picks by the call's case and records what it picked and why it skipped the others.
"""

from __future__ import annotations

import torch
from torch import nn

from reference.config import DilationConfig, SparsePatternConfig
from reference.inputs import bnhd_view, check_layout, default_scale, layout_view, validate_qkv
from reference.semantics import AttentionGeometry

from . import graphs, ring
from .dispatch import REGISTRY, Case, Choice, TorchOptions, check_backend_name, choose, options_for
from .plan import CallPlan

# How a process_group's ranks share the sequence: one contiguous chunk each, or two pieces each
# (reference.zigzag_pieces) so that causal masks give every rank the same work.
RING_LAYOUTS = ("contiguous", "zigzag")


def _backend_options(work_size: int, given) -> dict:
    """Backend name -> its options: the defaults, ``work_size`` for torch, then each typed option in ``given``."""
    options = {name: backend.default_options() for name, backend in REGISTRY.items()}
    options["torch"] = TorchOptions(work_size)
    by_type = {backend.options_type: name for name, backend in REGISTRY.items()}
    if type(given) in by_type:
        given = (given,)  # one options object alone
    for option in given:
        if type(option) not in by_type:
            allowed = ", ".join(t.__name__ for t in by_type)
            raise TypeError(f"backend_options must hold options of the types {allowed}; got {type(option).__name__}")
        name = by_type[type(option)]
        options[name] = options_for(REGISTRY[name], option)
    return options


def _check_ring(ring_size, ring_chunk_lengths, process_group):
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
    if process_group is not None and (ring_chunk_lengths is not None or ring_size not in (None, 1)):
        raise ValueError(
            "give process_group or an in-process ring (ring_size / ring_chunk_lengths), not both; got "
            f"ring_size={ring_size!r}, ring_chunk_lengths={ring_chunk_lengths!r}"
        )
    return ring_size, ring_chunk_lengths


class BlockSparseRingDilatedAttention(nn.Module):
    """Block-sparse ring dilated attention, fast path. Same call as ``reference.BlockSparseRingDilatedAttention``.

    backend: ``"auto"`` (triton on CUDA where the kernel runs the call, torch elsewhere), ``"torch"``,
        ``"flex"``, ``"triton"``. After a call, ``last_backend`` names what ran and ``last_skipped``
        every backend auto preferred but skipped, with all its reasons.
    layout: ``"bnhd"`` (q (B, N, H, D), default) or ``"bhnd"`` (q (B, H, N, D), the order of
        scaled_dot_product_attention); out comes back in the same layout, read and written through
        strides (no copies).
    ring_size / ring_chunk_lengths: split keys and values into contiguous chunks in one process.
    process_group: spread the sequence over the ranks of a torch.distributed group.
    ring_layout: with process_group, "contiguous" (rank r holds the r-th chunk) or "zigzag" (rank r holds
        the rows of ``reference.zigzag_pieces(N, P)[r]``: two pieces, one early and one late, which
        balances causal work; its sparse weights are not available).
    work_size: active blocks the torch backend processes at once (bounds its extra memory).
    backend_options: typed options (``optimized.dispatch.TorchOptions`` / ``FlexOptions`` /
        ``TritonOptions``), at most one per backend; they override ``work_size``.
    use_cuda_graphs: capture and replay the forward on CUDA (backends that support it, forward-only calls).
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
        layout: str = "bnhd",
        backend_options=(),
        ring_layout: str = "contiguous",
    ) -> None:
        super().__init__()
        self.dilation = DilationConfig(tuple(segment_lengths), tuple(dilation_rates), head_mode)
        if sparse_config is None:
            sparse_config = SparsePatternConfig(pattern_type="dense")
        if not isinstance(sparse_config, SparsePatternConfig):
            raise TypeError(f"sparse_config must be a SparsePatternConfig or None, got {type(sparse_config).__name__}")
        self.sparse_config = sparse_config
        self.backend = check_backend_name(backend)
        self.layout = check_layout(layout)
        self.ring_size, self.ring_chunk_lengths = _check_ring(ring_size, ring_chunk_lengths, process_group)
        self.process_group = process_group
        if ring_layout not in RING_LAYOUTS:
            raise ValueError(f"ring_layout must be one of {RING_LAYOUTS}, got {ring_layout!r}")
        if ring_layout != "contiguous" and process_group is None:
            raise ValueError(
                f"ring_layout={ring_layout!r} assigns each rank of a process_group two pieces of the sequence; "
                "give process_group too (an in-process ring's result does not depend on the assignment)"
            )
        self.ring_layout = ring_layout
        self.backend_options = _backend_options(work_size, backend_options)
        self.use_cuda_graphs = bool(use_cuda_graphs)
        self.last_choice: Choice | None = None  # what the last call ran ("auto" resolved) and why
        self.ring_stats: ring.RingStats | None = None  # the last distributed call's transfers on this rank
        self._chunk_lengths_cache: dict = {}  # the distributed ring's all-gathered chunk lengths

    @property
    def work_size(self) -> int:
        return self.backend_options["torch"].work_size

    @property
    def last_backend(self) -> str | None:
        return None if self.last_choice is None else self.last_choice.name

    @property
    def last_skipped(self) -> dict[str, tuple[str, ...]]:
        """Backends ``auto`` preferred but skipped on the last call, each with every reason."""
        return {} if self.last_choice is None else dict(self.last_choice.skipped)

    # ------------------------------------------------------------------------------------
    def geometry(self, seq_len: int, num_heads: int) -> AttentionGeometry:
        return AttentionGeometry(self.dilation, seq_len, num_heads)

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
            if return_attention_weights and self.ring_layout != "contiguous":
                raise ValueError(
                    f"return_attention_weights=True with ring_layout={self.ring_layout!r}: the ring's sparse "
                    "weights are assembled per contiguous chunk; use ring_layout='contiguous' to get them"
                )
            request = ring.RingRequest(
                self.process_group,
                self.dilation,
                self.sparse_config,
                self.backend,
                self.backend_options,
                self.layout,
                self._chunk_lengths_cache,
                self.ring_layout,
            )
            result = ring.distributed_forward(
                request, q, k, v, bool(is_causal), key_padding_mask, return_attention_weights, return_lse, scale
            )
            self.last_choice, self.ring_stats = result.choice, result.stats
            return result.results[0] if len(result.results) == 1 else result.results
        validate_qkv(q, k, v, key_padding_mask, scale, layout=self.layout)
        q, k, v = (bnhd_view(t, self.layout) for t in (q, k, v))
        case = Case.of_call(q, k, v, self.sparse_config.block_size)
        choice = choose(self.backend, case)
        self.last_choice = choice
        backend, options = choice.backend, self.backend_options[choice.name]
        if return_attention_weights and case.needs_grad and backend.name == "triton":
            raise ValueError(
                "return_attention_weights=True with q, k or v requiring grad: the triton backend's sparse weights "
                "come from a forward-only kernel and carry no gradient; leave return_attention_weights=False in the "
                "training step, or ask for the weights under torch.no_grad()"
            )
        geometry = self.geometry(q.shape[1], q.shape[2])
        scale = default_scale(q.shape[3], scale)
        chunks = self.chunk_lengths(q.shape[1])
        if chunks is None:
            plan = CallPlan.whole(geometry, self.sparse_config, is_causal, scale)
            # A call with gradients never replays a graph (a replay records nothing for autograd).
            if backend.graph_capturable and q.is_cuda and self.use_cuda_graphs and not case.needs_grad:
                out, lse = graphs.graphed_partial(backend, q, k, v, key_padding_mask, plan, options)
            else:
                out, lse = backend.forward_partial(q, k, v, key_padding_mask, plan, options)
        else:
            out, lse = ring.in_process_forward(
                backend,
                options,
                q,
                k,
                v,
                key_padding_mask,
                geometry,
                self.sparse_config,
                bool(is_causal),
                scale,
                chunks,
            )
        if torch.is_grad_enabled() and not out.requires_grad and any(t.requires_grad for t in (q, k, v)):
            # No block of the call is active, so out is the constant 0; tie it to the inputs so that
            # backward gives zero gradients, as the reference does, instead of failing.
            out = out + sum(t.sum() for t in (q, k, v)).to(out.dtype) * 0.0
        results = (layout_view(out.to(q.dtype), self.layout),)
        if return_attention_weights:
            plan = CallPlan.whole(geometry, self.sparse_config, is_causal, scale)
            results += (backend.sparse_weights(q, k, key_padding_mask, lse, plan, options),)
        if return_lse:
            results += (lse,)
        return results[0] if len(results) == 1 else results

    def extra_repr(self) -> str:
        picked = f", last_backend={self.last_backend!r}" if self.last_backend else ""
        ring_text = f", ring_size={self.ring_size}" if self.ring_size else ""
        layout = "" if self.layout == "bnhd" else f", layout={self.layout!r}"
        return f"{self.dilation}, {self.sparse_config}, backend={self.backend!r}{picked}{ring_text}{layout}"


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
