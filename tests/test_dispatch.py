"""The backend interface (optimized/dispatch.py): every backend declares the same things, auto
walks its preference list and records every reason it skipped a backend, options are typed."""

from __future__ import annotations

import pytest
import torch

import optimized
from optimized import dispatch
from optimized.dispatch import AUTO_PREFERENCE, REGISTRY, Case, TorchOptions, TritonOptions, choose
from reference import SparsePatternConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_every_backend_declares_the_interface():
    assert set(REGISTRY) == {"torch", "flex", "triton"} and optimized.BACKENDS == ("auto", *REGISTRY)
    for name, backend in REGISTRY.items():
        assert backend.name == name
        assert isinstance(backend.unsupported_reasons(Case(CPU)), list)
        for method in ("forward_partial", "sparse_weights"):
            assert callable(getattr(backend, method))
        options = backend.default_options()
        assert isinstance(options, backend.options_type)
        hash(options)  # options key the CUDA-graph cache: they must be frozen and hashable
    assert REGISTRY["torch"].backward_partial is not None  # the torch backend has an explicit backward


def test_auto_on_the_cpu_takes_torch_and_records_why_triton_was_skipped():
    choice = choose("auto", Case(CPU, torch.float32, 16, 16))
    assert choice.name == "torch"
    skipped = dict(choice.skipped)
    assert list(skipped) == ["triton"] and any("CUDA" in reason for reason in skipped["triton"])
    assert "skipped 'triton'" in choice.explain()


def test_auto_on_cuda_takes_triton_when_the_kernel_runs_the_case():
    choice = choose("auto", Case(CUDA, torch.float16, 64, 64))
    assert choice.name == "triton" and choice.skipped == ()


def test_auto_records_every_reason_not_only_the_first():
    """float64, a block size of 3 and head dim 300: three reasons against triton, all kept."""
    choice = choose("auto", Case(CUDA, torch.float64, 300, 3, needs_grad=True))
    assert choice.name == "torch"
    reasons = dict(choice.skipped)["triton"]
    assert len(reasons) == 3, reasons
    text = " | ".join(reasons)
    for fact in ("block_size=3", "head_dim=300", "float64"):
        assert fact in text, (fact, reasons)


def test_auto_on_cuda_takes_triton_for_training_too():
    """The triton backend has backward kernels: gradients no longer send auto to the portable path."""
    choice = choose("auto", Case(CUDA, torch.bfloat16, 64, 128, needs_grad=True))
    assert choice.name == "triton" and choice.skipped == ()
    assert REGISTRY["triton"].differentiable and REGISTRY["triton"].backward_partial is not None


def test_auto_preference_lists_only_registered_backends():
    assert AUTO_PREFERENCE[-1] == "torch" and set(AUTO_PREFERENCE) <= set(REGISTRY)
    assert REGISTRY["torch"].unsupported_reasons(Case(CUDA, torch.float64, 300, 3, needs_grad=True)) == []


def test_explicit_names_are_returned_unchanged():
    for name in REGISTRY:
        for device in (CPU, CUDA):
            assert choose(name, Case(device, torch.float64, 300, 3, needs_grad=True)).name == name


@pytest.mark.parametrize("name", ["cuda", "Torch", "", None, 3])
def test_bad_names_raise_naming_backend(name):
    with pytest.raises(ValueError, match="backend must be one of") as error:
        choose(name, Case(CPU))
    assert repr(name) in str(error.value)


def test_flex_declares_what_it_cannot_run():
    assert REGISTRY["flex"].unsupported_reasons(Case(CPU, torch.float32, 16, 8, needs_grad=True))
    assert REGISTRY["flex"].unsupported_reasons(Case(CUDA, torch.float32, 16, 8))  # 8 is not a multiple of 16
    assert REGISTRY["flex"].unsupported_reasons(Case(CUDA, torch.float32, 16, 32, needs_grad=True)) == []


def test_options_are_typed():
    with pytest.raises(ValueError, match="work_size"):
        TorchOptions(work_size=0)
    with pytest.raises(TypeError, match="TorchOptions"):
        dispatch.options_for(REGISTRY["torch"], {"work_size": 4})
    module = optimized.BlockSparseRingDilatedAttention([8], [1], backend_options=(TorchOptions(work_size=5),))
    assert module.work_size == 5 and module.backend_options["torch"] == TorchOptions(5)
    with pytest.raises(TypeError, match="backend_options"):
        optimized.BlockSparseRingDilatedAttention([8], [1], backend_options=({"work_size": 5},))
    single = optimized.BlockSparseRingDilatedAttention([8], [1], backend_options=TritonOptions(merge_on_write=False))
    assert single.backend_options["triton"].merge_on_write is False  # one options object alone is accepted
    module = optimized.BlockSparseRingDilatedAttention([8], [1], backend_options=(TritonOptions(variant="v2"),))
    assert module.backend_options["triton"].variant == "v2" and module.work_size == 4096


def test_the_module_records_its_choice_and_the_skipped_reasons():
    config = SparsePatternConfig("local_window", block_size=4, local_window_size=8)
    module = optimized.BlockSparseRingDilatedAttention([8, 16], [1, 2], config)
    assert module.last_backend is None and module.last_skipped == {}
    q = torch.randn(1, 16, 2, 8)
    module(q, q, q)
    assert module.last_backend == "torch"
    assert "triton" in module.last_skipped and any("block_size=4" in r for r in module.last_skipped["triton"])


def test_an_explicit_backend_runs_the_chosen_object(monkeypatch):
    """The module calls the registry's backend object: replacing its forward shows up in the result."""
    calls = []
    torch_backend = REGISTRY["torch"]
    original = torch_backend.forward_partial

    def spy(*args, **kwargs):
        calls.append(args[4])  # the plan
        return original(*args, **kwargs)

    monkeypatch.setattr(torch_backend, "forward_partial", spy)
    module = optimized.BlockSparseRingDilatedAttention([8], [1], backend="torch", ring_size=2)
    q = torch.randn(1, 8, 1, 4)
    module(q, q, q)
    # One segment over both chunks, dense, not causal: every one of the 2 x 2 chunk pairs is active.
    assert sorted((plan.query_range, plan.key_range) for plan in calls) == [
        ((0, 4), (0, 4)),
        ((0, 4), (4, 8)),
        ((4, 8), (0, 4)),
        ((4, 8), (4, 8)),
    ]
