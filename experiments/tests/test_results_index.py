"""experiments/results/INDEX.md names every result, and no result file is a byte-for-byte copy of another."""

from __future__ import annotations

import hashlib
import os
import re

EXPERIMENTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(EXPERIMENTS, "results")


def test_index_lists_every_result_folder_and_file():
    with open(os.path.join(RESULTS, "INDEX.md")) as handle:
        index = handle.read()
    named = set(re.findall(r"`([^`\s]+)`", index))
    missing = []
    for entry in sorted(os.listdir(RESULTS)):
        if entry == "INDEX.md":
            continue
        if os.path.isdir(os.path.join(RESULTS, entry)):
            if f"{entry}/" not in named:
                missing.append(f"{entry}/")
            continue
        stem, suffix = os.path.splitext(entry)
        # "memory_cpu.json", ".csv", ".png" name three files of one stem
        if entry not in named and not (f"{stem}.json" in named and suffix in {".csv", ".png"}):
            missing.append(entry)
    assert not missing, f"not in experiments/results/INDEX.md: {missing}"


def test_no_two_result_files_are_identical():
    by_digest: dict[str, list[str]] = {}
    for folder in (RESULTS, os.path.join(EXPERIMENTS, "baselines")):
        for root, _, files in os.walk(folder):
            for name in files:
                path = os.path.join(root, name)
                with open(path, "rb") as handle:
                    digest = hashlib.md5(handle.read()).hexdigest()
                by_digest.setdefault(digest, []).append(os.path.relpath(path, EXPERIMENTS))
    copies = [paths for paths in by_digest.values() if len(paths) > 1]
    assert not copies, f"identical files (keep one, point to it): {copies}"
