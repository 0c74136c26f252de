# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a GPU, take the CPU build of torch that lies on this machine's disk.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC := $(if $(HAS_GPU),torch>=2.6,torch==2.13.0)
export HYPOTHESIS_PROFILE ?= ci

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,notebooks,gpu]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m experiments.demo

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest -q

clean:
	rm -rf $(VENV)
