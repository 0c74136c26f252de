"""Text tables of dict rows (the notebooks', the demo's and the CLIs' printed tables), drawn by tabulate."""

from __future__ import annotations


def format_table(rows, columns=None, floats=".3g", headers: dict | None = None) -> str:
    """Rows (dicts) as an aligned plain-text table: ``columns`` picks and orders the keys (default: the
    first row's), ``floats`` is the format spec of float cells (one, or one per column), ``headers`` renames columns."""
    from tabulate import tabulate

    rows = list(rows)
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    names = [(headers or {}).get(column, column) for column in columns]
    body = [[row.get(column) for column in columns] for row in rows]
    return tabulate(body, headers=names, floatfmt=floats, missingval="None")


def print_table(rows, columns=None, floats=".3g", headers: dict | None = None) -> None:
    """Print ``format_table(rows, columns, floats, headers)``."""
    print(format_table(rows, columns, floats, headers))
