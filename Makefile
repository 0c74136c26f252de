# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a GPU, pin the CPU build of torch (torch==2.13.0) instead of the multi-GB CUDA wheels.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_GPU),torch>=2.6,torch==2.13.0)
export HYPOTHESIS_PROFILE ?= ci

.PHONY: demo test install clean mutation

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,notebooks,gpu,peers]"
# The peers under test, without their declared dependencies: xformers / flash-attn are CUDA-only
# (equivalence_tests/peers substitutes plain PyTorch for those calls) and torchscale's timm pulls
# torchvision, which replaces torch. torchscale-gml ships Microsoft torchscale's LongNet code, which
# no `torchscale` release on PyPI has. What they need on a CPU comes with the peers extra.
	$(PY) -m pip install -q --no-deps torchscale-gml==0.2.3 dilated-attention-pytorch==0.2.0
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m experiments.demo

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# Not part of `make test` (hours on 2 cores): cosmic-ray's mutants of reference/ and optimized/, each run
# against the fast tests of its module; the score and every survivor go to experiments/results/mutation.json.
# MUTATION_ARGS passes options, e.g. MUTATION_ARGS="--modules reference/merge.py --budget 1800".
mutation: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[mutation]"
	TRITON_INTERPRET=1 $(PY) -m experiments.mutation $(MUTATION_ARGS)

clean:
	rm -rf $(VENV)
