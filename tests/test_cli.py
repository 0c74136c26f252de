"""Every command-line tool of ``experiments`` answers --help without doing work, and refuses bad settings
with argparse's one-line error naming the option (exit status 2), before printing anything else.

The tools are discovered, not listed: every module under ``experiments`` whose source runs itself
(``if __name__ == "__main__":``) is one, so a new tool is covered the day it is added. Each runs
in a subprocess, ``python -m experiments.X``, as a user starts it.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import pytest
import torch

import experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What torchrun hands each rank; removed so that ring_example sees a plain start.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def cli_modules() -> list[str]:
    """Modules of the experiments package (subpackages included) whose source has a ``__main__`` guard."""
    found = []
    for module in pkgutil.walk_packages(experiments.__path__, prefix="experiments."):
        if module.ispkg:
            continue
        with open(importlib.util.find_spec(module.name).origin) as handle:
            if 'if __name__ == "__main__":' in handle.read():
                found.append(module.name)
    return sorted(found)


CLI_MODULES = cli_modules()

# (module, arguments, what the error line must name)
BAD_SETTINGS = [
    ("experiments.sweep_memory", ("--backend", "fast"), "--backend"),
    ("experiments.sweep_memory", ("--segments", "256", "512", "--rates", "1", "2", "4"), "--rates"),
    ("experiments.sweep_throughput", ("--seq-lens", "1024", "0"), "--seq-lens"),
    ("experiments.sweep_throughput", ("--heads", "2"), "--heads"),
    ("experiments.sweep_ring", ("--seq-len", "32", "--parts", "2", "64"), "--parts"),
    ("experiments.regression", ("--baseline", "no/such/baseline.json", "--current", "no/such/now.json"), "--baseline"),
    ("experiments.regression", ("--baseline", "README.md", "--current", "README.md"), "--baseline"),
    ("experiments.run_notebooks", ("--size", "huge"), "--size"),
    ("experiments.bench_gpu", ("--only", "main,everything"), "--only"),
    ("experiments.ab_row_groups", ("--sizes", "1024,32"), "--sizes"),
    ("experiments.ring_example", (), "torchrun --nproc_per_node=2 -m experiments.ring_example"),
]
# The same, on a machine without CUDA: the message says so and names the option (or the tool).
NO_CUDA_SETTINGS = [
    ("experiments.demo", ("--device", "cuda"), "--device"),
    ("experiments.sweep_memory", ("--device", "cuda"), "--device"),
    ("experiments.bench_gpu", (), "needs a CUDA device"),
]
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
RUNS = [(module, ("--help",)) for module in CLI_MODULES]
RUNS += [(module, arguments) for module, arguments, _ in BAD_SETTINGS + NO_CUDA_SETTINGS]


def _run(module: str, arguments: tuple) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name not in TORCHRUN_VARIABLES}
    return subprocess.run(
        [sys.executable, "-m", module, *arguments],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


@cache
def runs() -> dict:
    """Every subprocess of this file, started together (each is mostly Python's and torch's start-up)."""
    calls = list(dict.fromkeys(RUNS))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        return dict(zip(calls, pool.map(lambda call: _run(*call), calls)))


def test_the_tools_are_discovered():
    # A broken discovery would pass every test below vacuously.
    expected = {
        "experiments.demo",
        "experiments.ring_example",
        "experiments.sweep_memory",
        "experiments.regression",
        "experiments.run_notebooks",
        "experiments.bench_gpu",
    }
    assert expected <= set(CLI_MODULES), CLI_MODULES
    assert not any(".tests." in name or ".benchmarks." in name for name in CLI_MODULES)


@pytest.mark.parametrize("module", CLI_MODULES)
def test_help_prints_usage_and_exits_0(module):
    result = runs()[(module, ("--help",))]
    assert result.returncode == 0, result.stderr
    # usage comes first: nothing (a header, a table, a progress bar) ran before the help
    assert result.stdout.startswith(f"usage: python -m {module}"), result.stdout[:300]
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("module", "arguments", "names"),
    BAD_SETTINGS + [pytest.param(*case, marks=needs_no_cuda) for case in NO_CUDA_SETTINGS],
)
def test_bad_setting_is_one_error_line_naming_it(module, arguments, names):
    result = runs()[(module, arguments)]
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == "", f"work started before the settings were checked: {result.stdout[:300]}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"python -m {module}: error: "), errors[0]
    assert result.stderr.rstrip("\n").endswith(errors[0]), "the error line is not the last one"
    assert names in errors[0], errors[0]
