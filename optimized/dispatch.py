"""One interface for the backends, and ``auto``'s choice among them.

Every backend declares the same things: its ``name``; ``unsupported_reasons(case)``, every
reason it cannot run a call (an empty list: it runs it); ``forward_partial``, the partial
attention of docs/semantics.md section 5; ``backward_partial`` where it has an explicit one
(else ``differentiable`` says whether autograd can differentiate its forward); ``sparse_weights``
(docs/semantics.md section 6); and a frozen ``options_type`` with its typed options.

``choose(requested, case)`` resolves a request: an explicit name is returned as it is (it never
falls back; the backend's own checks raise at call time with the precise error), and ``"auto"``
walks ``AUTO_PREFERENCE`` and takes the first backend with no reason against the case, recording
every reason a preferred backend was skipped.

The ring and the CUDA-graph cache receive the chosen ``Backend`` object and its options; nothing
here imports the module, the ring or the graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from . import flex_backend, torch_backend, weights
from .plan import CallPlan

try:  # triton is an optional dependency (the ``gpu`` extra); without it the backend says so
    from . import triton_backend, triton_backward
except ImportError as error:  # pragma: no cover - exercised only where triton is not installed
    triton_backend = triton_backward = None
    _TRITON_IMPORT_ERROR = str(error)


# --------------------------------------------------------------------------------------------
# What a backend is asked about
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """What decides whether a backend runs a call. A field left None is not known yet and not checked."""

    device: torch.device
    dtype: torch.dtype | None = None
    head_dim: int | None = None
    block_size: int | None = None
    needs_grad: bool = False

    @classmethod
    def of_call(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> Case:
        """The case of a call with these (validated) inputs; head dim is the last axis in every layout."""
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return cls(q.device, q.dtype, int(q.shape[-1]), int(block_size), bool(needs_grad))


# --------------------------------------------------------------------------------------------
# Options, one frozen type per backend
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchOptions:
    """work_size: active blocks (rows x heads x batch) processed at once; bounds the extra memory."""

    work_size: int = 4096

    def __post_init__(self) -> None:
        torch_backend.check_work_size(self.work_size)


@dataclass(frozen=True)
class FlexOptions:
    """The flex backend has no options; the type exists so that every backend is called alike."""


RING_LAUNCHES = ("step", "pair")


@dataclass(frozen=True)
class TritonOptions:
    """Kernel choices (None: the environment variable, then the default; the output does not depend on them)."""

    variant: str | None = None
    item_order: str | None = None
    index_mode: str | None = None
    # Rings: merge every chunk pair into the query chunk's accumulator inside the kernel (False: a
    # float32 partial per pair and a separate merge pass, the way before merge on write; for A/B runs).
    merge_on_write: bool = True
    # Rings that merge on write: "step" computes every pair of a ring step in one launch (per head
    # layer); "pair" launches once per pair (the way before; for A/B runs).
    ring_launch: str = "step"

    def __post_init__(self) -> None:
        if self.ring_launch not in RING_LAUNCHES:
            raise ValueError(f"ring_launch={self.ring_launch!r} is not one of {RING_LAUNCHES}")


# --------------------------------------------------------------------------------------------
# The interface and the three backends
# --------------------------------------------------------------------------------------------


class Backend:
    """The interface every backend implements (see the module docstring)."""

    name: ClassVar[str]
    options_type: ClassVar[type]
    # Whether autograd differentiates forward_partial's results (a backend with its own
    # backward_partial wires it into autograd itself).
    differentiable: ClassVar[bool]
    # Whether a forward call may be captured in a CUDA graph and replayed (optimized.graphs).
    graph_capturable: ClassVar[bool] = False
    # Whether forward_partial_into merges a chunk pair into a running (out, lse) as it writes (the
    # rings then keep one accumulator per query chunk and run no separate merge pass).
    merges_on_write: ClassVar[bool] = False

    def unsupported_reasons(self, case: Case) -> list[str]:
        raise NotImplementedError

    def auto_reasons(self, case: Case) -> list[str]:
        """Why ``auto`` skips this backend for ``case``: what it cannot run, and what auto leaves to others."""
        return self.unsupported_reasons(case)

    def forward_partial(self, q, k, v, key_padding_mask, plan: CallPlan, options):
        """(out (B, Nq, H, D) float32 or q.dtype, lse (B, H, Nq) float32) of the plan's chunk pair."""
        raise NotImplementedError

    backward_partial = None  # (q, k, v, mask, plan, options, out, lse, grad_out, grad_lse) -> (dq, dk, dv)
    # Optional: (q, k, v, mask, steps, options, out, lse, grad_out, grad_lse) -> (dq, dk, dv) of a ring's
    # steps (StepPairs) from the merged out and lse; None: the rings call backward_partial per pair.
    backward_steps = None
    # With merges_on_write: (accumulated (out, lse), q, k, v, mask, plan, options) -> None, merging the
    # plan's chunk pair into ``accumulated`` in place (no autograd).
    forward_partial_into = None
    # Optional, with merges_on_write: (accumulated, q, k, v, mask, pairs, options) -> None, merging every
    # StepPair of a ring step (chunks at shifted rows of q / k) into ``accumulated`` at once; and
    # forward_step (q, k, v, mask, pairs, options, out_dtype) -> (out, lse) of q's rows for a ring's
    # first step (what forward_step_into gives from an empty accumulator). None: the rings call
    # forward_partial_into per pair.
    forward_step_into = None
    forward_step = None

    def launches_per_step(self, options) -> bool:
        """Whether the rings hand this backend a whole ring step at once (forward_step_into)."""
        return self.forward_step_into is not None

    def sparse_weights(self, q, k, key_padding_mask, lse, plan: CallPlan, options):
        raise NotImplementedError

    def default_options(self):
        return self.options_type()

    def __repr__(self) -> str:
        return f"<backend {self.name!r}>"


class TorchBackend(Backend):
    """Portable block-sparse attention in vectorized PyTorch: any device, any dtype, autograd."""

    name = "torch"
    options_type = TorchOptions
    differentiable = True

    def unsupported_reasons(self, case: Case) -> list[str]:
        return []

    def forward_partial(self, q, k, v, key_padding_mask, plan, options: TorchOptions):
        return torch_backend.partial_forward(q, k, v, key_padding_mask, plan, work_size=options.work_size)

    def backward_partial(self, q, k, v, key_padding_mask, plan, options: TorchOptions, out, lse, grad_out, grad_lse):
        return torch_backend.partial_backward(
            q, k, v, key_padding_mask, plan, options.work_size, out, lse, grad_out, grad_lse
        )

    def sparse_weights(self, q, k, key_padding_mask, lse, plan, options: TorchOptions):
        return weights.attention_weights(q, k, key_padding_mask, lse, plan, work_size=options.work_size)


class FlexBackend(Backend):
    """FlexAttention BlockMasks in compacted coordinates: compiled on CUDA, eager (small sizes) elsewhere."""

    name = "flex"
    options_type = FlexOptions
    differentiable = True

    def unsupported_reasons(self, case: Case) -> list[str]:
        reasons = []
        if case.device.type != "cuda" and case.needs_grad:
            reasons.append("flex on the CPU runs eager FlexAttention, which has no backward")
        if case.device.type == "cuda" and case.dtype == torch.float64:
            reasons.append("compiled FlexAttention computes in float32 at most: float64 needs backend='torch'")
        if case.device.type == "cuda" and case.block_size is not None:
            if case.block_size % flex_backend.CUDA_BLOCK_MULTIPLE:
                reasons.append(
                    f"block_size={case.block_size} is not a multiple of {flex_backend.CUDA_BLOCK_MULTIPLE} "
                    "(compiled FlexAttention tiles)"
                )
        return reasons

    def forward_partial(self, q, k, v, key_padding_mask, plan, options: FlexOptions):
        return flex_backend.partial_forward(q, k, v, key_padding_mask, plan)

    def sparse_weights(self, q, k, key_padding_mask, lse, plan, options: FlexOptions):
        return weights.attention_weights(q, k, key_padding_mask, lse, plan)


class TritonBackend(Backend):
    """The block-sparse Triton kernels reading the dilated lattice with strided addressing, forward and backward."""

    name = "triton"
    options_type = TritonOptions
    differentiable = True
    graph_capturable = True
    merges_on_write = True

    def unsupported_reasons(self, case: Case) -> list[str]:
        if triton_backend is None:
            return [f"the triton package is not installed ({_TRITON_IMPORT_ERROR})"]
        # A field not known yet is given a value the kernel accepts, so only known facts count against it.
        return triton_backend.unsupported_reasons(
            block_size=case.block_size if case.block_size is not None else triton_backend.MIN_BLOCK_SIZE,
            head_dim=case.head_dim if case.head_dim is not None else triton_backend.MIN_BLOCK_SIZE,
            dtype=case.dtype if case.dtype is not None else torch.float32,
            device=case.device,
        )

    def auto_reasons(self, case: Case) -> list[str]:
        reasons = self.unsupported_reasons(case)
        if case.device.type != "cuda":
            # The Triton interpreter runs the kernel on the CPU for tests; auto never picks it there.
            reasons.append(f"auto runs triton on CUDA devices only, got {case.device}")
        return reasons

    def forward_partial(self, q, k, v, key_padding_mask, plan, options: TritonOptions):
        return triton_backward.differentiable_forward(
            q,
            k,
            v,
            key_padding_mask,
            plan,
            variant=options.variant,
            order=options.item_order,
            index=options.index_mode,
        )

    def forward_partial_into(self, accumulated, q, k, v, key_padding_mask, plan, options: TritonOptions):
        triton_backend.partial_forward(
            q,
            k,
            v,
            key_padding_mask,
            plan,
            variant=options.variant,
            order=options.item_order,
            index=options.index_mode,
            into=accumulated,
        )

    def forward_step_into(self, accumulated, q, k, v, key_padding_mask, pairs, options: TritonOptions):
        triton_backend.step_forward_into(
            accumulated,
            q,
            k,
            v,
            key_padding_mask,
            pairs,
            variant=options.variant,
            order=options.item_order,
            index=options.index_mode,
        )

    def forward_step(self, q, k, v, key_padding_mask, pairs, options: TritonOptions, out_dtype):
        return triton_backend.step_forward(
            q,
            k,
            v,
            key_padding_mask,
            pairs,
            out_dtype,
            variant=options.variant,
            order=options.item_order,
            index=options.index_mode,
        )

    def launches_per_step(self, options: TritonOptions) -> bool:
        return options.ring_launch == "step"

    def backward_steps(self, q, k, v, key_padding_mask, steps, options: TritonOptions, out, lse, grad_out, grad_lse):
        return triton_backward.ring_backward(
            q, k, v, key_padding_mask, steps, out, lse, grad_out, grad_lse, order=options.item_order
        )

    def backward_partial(self, q, k, v, key_padding_mask, plan, options: TritonOptions, out, lse, grad_out, grad_lse):
        return triton_backward.partial_backward(
            q, k, v, key_padding_mask, plan, out, lse, grad_out, grad_lse, order=options.item_order
        )

    def sparse_weights(self, q, k, key_padding_mask, lse, plan, options: TritonOptions):
        return triton_backend.attention_weights(q, k, key_padding_mask, lse, plan)


REGISTRY: dict[str, Backend] = {backend.name: backend for backend in (TorchBackend(), FlexBackend(), TritonBackend())}
# What "auto" tries, most preferred first. Flex is never picked by auto: its first call on a new
# shape compiles for seconds, a cost a user should opt into.
AUTO_PREFERENCE = ("triton", "torch")
BACKENDS = ("auto", *REGISTRY)


# --------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """The backend a call runs, and for ``auto`` every preferred backend it skipped with all its reasons."""

    backend: Backend
    skipped: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())

    @property
    def name(self) -> str:
        return self.backend.name

    def explain(self) -> str:
        lines = [f"runs {self.name!r}"]
        lines += [f"skipped {name!r}: " + "; ".join(reasons) for name, reasons in self.skipped]
        return "\n".join(lines)


def check_backend_name(name) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def choose(requested: str, case: Case) -> Choice:
    """The backend that runs ``case`` when ``requested`` is asked for (explicit names are returned unchanged)."""
    match check_backend_name(requested):
        case "auto":
            skipped = []
            for name in AUTO_PREFERENCE:
                reasons = REGISTRY[name].auto_reasons(case)
                if not reasons:
                    return Choice(REGISTRY[name], tuple(skipped))
                skipped.append((name, tuple(reasons)))
            raise ValueError(f"no backend runs this call: {dict(skipped)}")  # pragma: no cover - torch runs all
        case explicit:
            return Choice(REGISTRY[explicit])


def options_for(backend: Backend, options) -> object:
    """``options`` if it is the backend's options type, the backend's defaults for None; else a TypeError."""
    if options is None:
        return backend.default_options()
    if not isinstance(options, backend.options_type):
        raise TypeError(
            f"options for backend {backend.name!r} must be a {backend.options_type.__name__}, "
            f"got {type(options).__name__}"
        )
    return options


def resolve_backend(backend: str, device, *, sparse_config=None, head_dim=None, dtype=None, needs_grad=False) -> str:
    """The name of the backend ``backend`` resolves to for a call with these facts (unknown ones unchecked)."""
    case = Case(
        torch.device(device),
        dtype,
        head_dim,
        None if sparse_config is None else sparse_config.block_size,
        bool(needs_grad),
    )
    return choose(backend, case).name
