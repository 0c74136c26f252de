"""Reading measured rows: series per (method, pattern), fitted log-log slopes, the seed's claims beside ours."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .analytic import dense_weights_bytes, output_bytes, sparse_weights_bytes
from .settings import MemorySetting

# The seed document's memory claims (its batch, heads and head dim are not stated).
SEED_CLAIMS = (
    {"seq_len": 8192, "quantity": "forward (no weights)", "seed_original": "40.1 MB", "seed_v2": "16.0 MB"},
    {"seq_len": 8192, "quantity": "forward (with weights)", "seed_original": "out of memory", "seed_v2": "16.0 MB"},
    {"seq_len": 8192, "quantity": "attention storage", "seed_original": "2+ GB (attempted)", "seed_v2": "9.8 MB"},
    {"seq_len": 4096, "quantity": "dense attention weights", "seed_original": "256.0 MB", "seed_v2": "-"},
    {"seq_len": 4096, "quantity": "sparse attention weights", "seed_original": "-", "seed_v2": "5.1 MB"},
)


def fit_loglog_slope(seq_lens, values) -> float:
    """Least-squares slope of log(value) against log(N): 1 for linear memory, 2 for quadratic.

    Points with a missing or non-positive value are left out; fewer than two points give NaN.
    """
    points = [(n, v) for n, v in zip(seq_lens, values) if v and v > 0]
    if len({n for n, _ in points}) < 2:
        return float("nan")
    ns, vs = np.array(points, dtype=float).T
    return float(np.polyfit(np.log(ns), np.log(vs), 1)[0])


def series(rows, value: str = "peak_bytes", min_seq_len: int = 0) -> dict:
    """{(method, pattern): (seq_lens, values)} of the measured (not skipped) rows, N ascending."""
    grouped: dict = {}
    for row in sorted(rows, key=lambda r: r["seq_len"]):
        if row.get(value) is None or row["seq_len"] < min_seq_len:
            continue
        ns, vs = grouped.setdefault((row["method"], row["pattern"]), ([], []))
        ns.append(row["seq_len"])
        vs.append(row[value])
    return grouped


def slopes(rows, value: str = "peak_bytes", min_seq_len: int = 0, last: int | None = None) -> list[dict]:
    """Fitted log-log slope per (method, pattern), over N >= ``min_seq_len`` and the ``last`` largest N.

    The largest N show the asymptotic growth; at small N a fixed work set (the torch backend's
    ``work_size`` blocks) still weighs and flattens the curve.
    """
    fitted = []
    for (method, pattern), (ns, vs) in series(rows, value, min_seq_len).items():
        ns, vs = (ns[-last:], vs[-last:]) if last else (ns, vs)
        fitted.append(
            {
                "method": method,
                "pattern": pattern,
                "points": len(ns),
                "from_N": ns[0],
                "to_N": ns[-1],
                "slope": fit_loglog_slope(ns, vs),
            }
        )
    return fitted


def same_setting(row: dict, setting: MemorySetting) -> bool:
    """Was ``row`` measured with ``setting``? (backend and work size aside)"""
    as_list = lambda value: list(value) if isinstance(value, (tuple, list)) else value  # noqa: E731
    return all(
        as_list(row.get(name)) == as_list(value)
        for name, value in asdict(setting).items()
        if name not in ("backend", "work_size")
    )


def seed_comparison(setting: MemorySetting, rows=None, pattern: str = "dilated_sparse") -> list[dict]:
    """The seed's claims beside ours at the same N (analytic, and measured where ``rows`` has them)."""
    rows = [row for row in rows or () if same_setting(row, setting)]
    measured = {(r["method"], r["pattern"], r["seq_len"]): r for r in rows if r.get("peak_bytes") is not None}

    def peak(method, seq_len, pat):
        row = measured.get((method, pat, seq_len))
        return None if row is None else row["peak_bytes"]

    mib = lambda n: None if n is None else n / 2**20  # noqa: E731
    ours = {
        (8192, "forward (no weights)"): (mib(output_bytes(8192, setting)), mib(peak("optimized", 8192, pattern))),
        (8192, "forward (with weights)"): (
            mib(output_bytes(8192, setting) + sparse_weights_bytes(8192, setting, pattern)),
            mib(peak("optimized+weights", 8192, pattern)),
        ),
        (8192, "attention storage"): (mib(sparse_weights_bytes(8192, setting, pattern)), None),
        (4096, "dense attention weights"): (
            mib(dense_weights_bytes(4096, setting)),
            mib(peak("dense_nxn", 4096, None)),
        ),
        (4096, "sparse attention weights"): (mib(sparse_weights_bytes(4096, setting, pattern)), None),
    }
    for row in rows:
        if row["method"] == "optimized+weights" and row["pattern"] == pattern and row.get("weights_nbytes"):
            key = (row["seq_len"], "attention storage" if row["seq_len"] == 8192 else "sparse attention weights")
            if key in ours:
                ours[key] = (ours[key][0], mib(row["weights_nbytes"]))
    table = []
    for claim in SEED_CLAIMS:
        analytic, live = ours[(claim["seq_len"], claim["quantity"])]
        table.append({**claim, "ours_analytic_MiB": analytic, "ours_measured_MiB": live})
    return table
