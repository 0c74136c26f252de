"""Execute the notebooks (notebooks/*.ipynb) with papermill; at full size, save them with their outputs.

    python -m experiments.run_notebooks                        # all four at full size, saved in place
    python -m experiments.run_notebooks patterns ring_splits   # only these
    python -m experiments.run_notebooks --size ci --output-dir /tmp/notebooks   # CI's small sizes, elsewhere

Each notebook has a cell tagged "parameters" holding ``SIZE = "full"``; for another size papermill
injects ``SIZE = ...`` after it. Execution runs in notebooks/ with the ``python3`` kernel (the
venv's ipykernel). A notebook saves only once every cell ran: a failing cell leaves the committed
file untouched and ends with papermill's error naming the cell. experiments/tests/test_notebooks.py
runs all four at ``--size ci`` without saving.
"""

from __future__ import annotations

import os

from . import cli

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = ("memory_scaling", "patterns", "ring_splits", "training")
SIZES = ("full", "ci")
DEFAULT_SIZE = "full"  # the value of SIZE in each notebook's parameters cell


def execute(name: str, size: str = DEFAULT_SIZE, timeout: int | None = None):
    """Execute notebooks/<name>.ipynb at ``size`` in the notebooks folder; return the executed notebook."""
    import papermill

    return papermill.execute_notebook(
        os.path.join(NOTEBOOK_DIR, f"{name}.ipynb"),
        None,
        parameters={} if size == DEFAULT_SIZE else {"SIZE": size},
        kernel_name="python3",
        cwd=NOTEBOOK_DIR,
        progress_bar=False,
        execution_timeout=timeout,
    )


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument(
        "names", nargs="*", metavar="NOTEBOOK", help=f"notebooks to run (default all): {', '.join(NOTEBOOKS)}"
    )
    parser.add_argument("--size", choices=SIZES, default=DEFAULT_SIZE, help="the notebooks' SIZE parameter")
    parser.add_argument(
        "--output-dir",
        default=None,
        help="where to save the executed notebooks (default: in place, only for --size full)",
    )
    parser.add_argument("--timeout", type=cli.positive_int, default=None, help="seconds allowed per cell")
    return parser


def main(argv=None) -> int:
    import nbformat

    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in NOTEBOOKS]
    if unknown:
        parser.error(f"NOTEBOOK: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(NOTEBOOKS)}")
    if args.size != DEFAULT_SIZE and args.output_dir is None:
        parser.error(
            f"--size {args.size}: the committed notebooks hold full-size outputs; "
            f"give --output-dir for the executed copies"
        )
    if args.output_dir is not None:
        cli.check_output_stem(parser, os.path.join(args.output_dir, "notebook.ipynb"), "--output-dir")
    folder = args.output_dir or NOTEBOOK_DIR
    os.makedirs(folder, exist_ok=True)
    for name in args.names or NOTEBOOKS:
        notebook = execute(name, args.size, args.timeout)
        path = os.path.join(folder, f"{name}.ipynb")
        nbformat.write(notebook, path)
        print(f"executed notebooks/{name}.ipynb at size {args.size}, saved {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
