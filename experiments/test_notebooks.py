"""The three notebooks execute top to bottom at small sizes (NOTEBOOK_SIZE=ci) with the venv's kernel.

A notebook's own checks (fitted slopes, analytic bytes equal to the stored bytes) raise inside
it, so a failing cell fails the test. The committed notebooks (with outputs from a full-size
run) are not rewritten: execution happens on an in-memory copy.

To re-execute and save the committed outputs (full sizes):
    .venv/bin/python -m experiments.test_notebooks
"""

from __future__ import annotations

import os
import sys

import pytest

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = ("memory_scaling.ipynb", "patterns.ipynb", "ring_splits.ipynb")


def execute(name: str, size: str, timeout: int = 600):
    """Execute notebooks/<name> in the notebooks folder with NOTEBOOK_SIZE=size; return the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    path = os.path.join(NOTEBOOK_DIR, name)
    notebook = nbformat.read(path, as_version=4)
    previous = os.environ.get("NOTEBOOK_SIZE")
    os.environ["NOTEBOOK_SIZE"] = size  # the kernel inherits this process's environment
    try:
        client = NotebookClient(
            notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": NOTEBOOK_DIR}}
        )
        client.execute()
    finally:
        if previous is None:
            os.environ.pop("NOTEBOOK_SIZE", None)
        else:
            os.environ["NOTEBOOK_SIZE"] = previous
    return notebook


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name):
    pytest.importorskip("nbclient", reason="the notebooks extra (nbclient, ipykernel) is not installed")
    pytest.importorskip("ipykernel", reason="the notebooks extra (nbclient, ipykernel) is not installed")
    notebook = execute(name, "ci", timeout=120)
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not any(output.get("output_type") == "error" for output in outputs)
    # Every notebook draws at least one figure: a PNG must be among the outputs.
    assert any("image/png" in output.get("data", {}) for output in outputs), f"{name} produced no figure"


def main(argv=None) -> int:
    """Execute the notebooks at full size and save them with their outputs (for committing)."""
    import nbformat

    names = (argv if argv is not None else sys.argv[1:]) or list(NOTEBOOKS)
    for name in names:
        name = name if name.endswith(".ipynb") else f"{name}.ipynb"
        notebook = execute(name, "full")
        nbformat.write(notebook, os.path.join(NOTEBOOK_DIR, name))
        print(f"executed and saved notebooks/{name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
