"""What each backend declares, and the facts a Case reads from a call (optimized/dispatch.py).

The backend tests run calls; the declarations that only steer a choice (a flag no test of a call
reads, a reason given for a device the CPU suite never asks about, a Case field that matches by
coincidence because every test tensor has the same size on two axes) passed every one of them
when ``make mutation`` (experiments/mutation.py) changed them.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from optimized import dispatch
from optimized.dispatch import REGISTRY, Case, Choice, FlexOptions, TorchOptions, choose, resolve_backend

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_a_case_reads_the_head_dim_from_the_last_axis_and_the_grad_need_from_the_call():
    q = torch.randn(2, 5, 3, 4)  # every axis a different size
    k = v = torch.randn(2, 5, 3, 4)
    case = Case.of_call(q, k, v, block_size=8)
    assert (case.device, case.dtype, case.head_dim, case.block_size, case.needs_grad) == (
        CPU,
        torch.float32,
        4,
        8,
        False,
    )
    assert Case.of_call(q.transpose(1, 2), k, v, block_size=8).head_dim == 4  # bhnd: D is still last
    leaf = q.clone().requires_grad_()
    assert Case.of_call(leaf, k, v, block_size=8).needs_grad
    assert Case.of_call(q, k, v.clone().requires_grad_(), block_size=8).needs_grad
    with torch.no_grad():
        assert not Case.of_call(leaf, k, v, block_size=8).needs_grad
    assert Case(CPU).needs_grad is False  # a case says nothing about gradients unless told


def test_flex_reasons_name_only_what_the_device_refuses():
    flex = REGISTRY["flex"]
    # the CPU runs eager FlexAttention: float64, any block size, no gradients
    assert flex.unsupported_reasons(Case(CPU, torch.float64, 8, 24)) == []
    assert flex.unsupported_reasons(Case(CPU)) == []
    assert len(flex.unsupported_reasons(Case(CPU, torch.float32, 8, 16, needs_grad=True))) == 1
    # compiled on CUDA: float64 and block sizes off the tile multiple are refused, each with its reason
    assert flex.unsupported_reasons(Case(CUDA, torch.float16, 64, 128)) == []
    (float64,) = flex.unsupported_reasons(Case(CUDA, torch.float64, 64, 128))
    assert "float64" in float64
    (tiles,) = flex.unsupported_reasons(Case(CUDA, torch.float32, 64, 24))
    assert "block_size=24" in tiles
    assert len(flex.unsupported_reasons(Case(CUDA, torch.float64, 64, 24))) == 2


def test_every_backend_is_differentiable_and_only_triton_is_graph_capturable():
    assert all(backend.differentiable for backend in REGISTRY.values())
    assert [name for name, backend in REGISTRY.items() if backend.graph_capturable] == ["triton"]
    assert dispatch.Backend.graph_capturable is False


@pytest.mark.parametrize("work_size", [0, -3, True, 2.0, "8"], ids=repr)
def test_the_torch_work_size_is_a_positive_int(work_size):
    with pytest.raises(ValueError, match="work_size"):
        TorchOptions(work_size=work_size)


def test_the_torch_options_default_and_smallest_work_size():
    assert TorchOptions().work_size == 4096
    assert TorchOptions(work_size=1).work_size == 1


def test_options_cases_and_choices_are_frozen_values():
    """They key caches (the CUDA-graph cache keys on options): equal ones must hash alike and never change."""
    assert FlexOptions() == FlexOptions() and hash(FlexOptions()) == hash(FlexOptions())
    assert Case(CPU, torch.float32, 8, 16) == Case(CPU, torch.float32, 8, 16)
    assert hash(Case(CPU, torch.float32, 8, 16)) == hash(Case(CPU, torch.float32, 8, 16))
    choice = choose("auto", Case(CPU, torch.float32, 8, 16))
    assert choice == choose("auto", Case(CPU, torch.float32, 8, 16))
    for record, name in [(FlexOptions(), "extra"), (Case(CPU), "dtype"), (choice, "backend")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, name, None)


def test_resolve_backend_takes_the_facts_by_keyword():
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("flex", "cpu", head_dim=8, dtype=torch.float64) == "flex"
    with pytest.raises(TypeError):
        resolve_backend("auto", "cpu", None)
    assert isinstance(choose("torch", Case(CPU)), Choice)


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
    reason="the triton backend needs CUDA or TRITON_INTERPRET=1 (as `make test` sets)",
)
def test_triton_rings_merge_on_write_unless_told_not_to(monkeypatch):
    """By default a ring hands the kernel each step's pairs at once (forward_step, then forward_step_into);
    ring_launch="pair" merges pair by pair (forward_partial_into after a chunk's first pair);
    merge_on_write=False does neither."""
    import optimized
    from optimized.dispatch import TritonOptions
    from reference import SparsePatternConfig

    backend_type = type(REGISTRY["triton"])
    calls = []

    def counting(name):
        original = getattr(backend_type, name)

        def counted(self, *args):
            calls.append(name)
            return original(self, *args)

        return counted

    for name in ("forward_partial_into", "forward_step", "forward_step_into"):
        monkeypatch.setattr(backend_type, name, counting(name))
    device = CUDA if torch.cuda.is_available() else CPU
    q = torch.randn(1, 32, 2, 16, device=device)
    config = SparsePatternConfig(pattern_type="dense", block_size=16)
    expected_calls = {
        TritonOptions(): ["forward_step", "forward_step_into"],  # step 0: each chunk with itself; 1: the other
        TritonOptions(ring_launch="pair"): ["forward_partial_into"] * 2,  # each chunk's second pair
        TritonOptions(merge_on_write=False): [],
    }
    for options, expected in expected_calls.items():
        calls.clear()
        # A 32-token segment over two 16-token chunks (not causal): each chunk meets both.
        module = optimized.BlockSparseRingDilatedAttention(
            [16, 32], [1, 2], config, backend="triton", ring_size=2, backend_options=options
        )
        with torch.no_grad():
            module(q, q, q)
        assert calls == expected, options


def test_only_triton_takes_a_ring_step_at_once_unless_told_pair_by_pair():
    """What a backend declares to the rings: only triton has forward_step_into (and backward_steps), so only it
    says a ring may hand it a whole step; ring_launch="pair" takes that back, and an unknown value is refused."""
    from optimized.dispatch import RING_LAUNCHES, TritonOptions

    takes_steps = [name for name, backend in REGISTRY.items() if backend.launches_per_step(backend.default_options())]
    assert takes_steps == ["triton"]
    assert not REGISTRY["triton"].launches_per_step(TritonOptions(ring_launch="pair"))
    assert [name for name, backend in REGISTRY.items() if backend.backward_steps is not None] == ["triton"]
    assert RING_LAUNCHES == ("step", "pair") and TritonOptions().ring_launch == "step"
    with pytest.raises(ValueError, match=r"ring_launch='steps' is not one of \('step', 'pair'\)"):
        TritonOptions(ring_launch="steps")
