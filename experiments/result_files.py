"""Result files under experiments/results/: JSON rows with their environment, CSV, and reading them back.

experiments/results/INDEX.md says what each committed file and run folder is.
"""

from __future__ import annotations

import csv
import glob
import json
import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def save_results(path: str, rows, environment: dict, extra: dict | None = None) -> None:
    """``{"environment": ..., **extra, "rows": rows}`` as indented JSON (folders created as needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"environment": environment, **(extra or {}), "rows": rows}, handle, indent=1)


def load_results(pattern: str = "memory_*.json", results_dir: str = RESULTS_DIR, device_type: str | None = None):
    """[(file name, document)] of result files matching ``pattern``; optionally only one device type."""
    found = []
    for path in sorted(glob.glob(os.path.join(results_dir, pattern))):
        try:
            with open(path) as handle:
                document = json.load(handle)
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(document, dict) or "rows" not in document:
            continue
        if device_type is not None and document.get("environment", {}).get("device_type") != device_type:
            continue
        found.append((os.path.basename(path), document))
    return found


def save_csv(path: str, rows) -> None:
    """Rows as CSV (the union of their keys as columns; lists written as space-separated values)."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in row.items()})


def load_bench_gpu_peaks(results_dir: str = RESULTS_DIR, name: str = "bench_gpu.json"):
    """Peak rows of the newest H200 benchmark file that has any (experiments/bench_gpu.py, by its recorded
    start time; in ``results_dir`` or one folder below it) in the memory sweep's row format, or None.

    Its rows hold ``peak_extra`` (cuda max_memory_allocated above the bytes allocated before the
    call, outputs included: the same quantity as ``experiments.memory.peak_bytes``) per method,
    pattern, N and D. Returns (environment-like info, rows with method names suffixed by the head dim).
    """
    candidates = glob.glob(os.path.join(results_dir, name)) + glob.glob(os.path.join(results_dir, "*", name))
    newest = None  # (started, path, document, rows): file times mean nothing in a fresh clone
    for path in candidates:
        try:
            with open(path) as handle:
                document = json.load(handle)
        except (OSError, json.JSONDecodeError):
            continue
        rows = [
            {
                "method": f"{row['method']} D={row.get('D')}",
                "pattern": row.get("pattern"),
                "seq_len": row["N"],
                "peak_bytes": row["peak_extra"],
                "heads": row.get("H"),
                "head_dim": row.get("D"),
                "qkv_out_bytes": row.get("qkv_out_bytes"),
            }
            for row in document.get("rows", [])
            if row.get("peak_extra") is not None
        ]
        started = str(document.get("info", {}).get("started", ""))
        if rows and (newest is None or started > newest[0]):
            newest = (started, path, document, rows)
    if newest is None:
        return None
    _, path, document, rows = newest
    info = {
        "info": document.get("info", {}),
        "huge": document.get("huge") or None,
        "file": os.path.relpath(path, os.path.dirname(results_dir)),
    }
    return info, rows
