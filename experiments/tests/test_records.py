"""What the GPU runs record about themselves: the verdict record of the suite, and the environment."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

from experiments import env, equivalence_record

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_environment_takes_the_commit_it_is_handed(monkeypatch):
    # The device's copy of .git was seen stale: the commit handed in wins over what git says there.
    handed = f"{random.getrandbits(28):07x}"
    monkeypatch.setenv("BSRDA_GIT_COMMIT", handed)
    assert env.environment("cpu")["git_commit"] == handed
    monkeypatch.delenv("BSRDA_GIT_COMMIT")
    assert env.environment("cpu")["git_commit"] != handed


def test_suite_record_from_two_processes_is_whole(tmp_path):
    """Verdicts appended by two processes at once (pytest-xdist workers) come out as whole lines."""
    record = tmp_path / "verdicts.jsonl"
    env_vars = dict(os.environ, EQUIVALENCE_RECORD=str(record), PYTHONPATH=ROOT, HYPOTHESIS_PROFILE="ci")
    selection = ["-k", "test_torch_backend_float32 or test_torch_backend_small_work_size"]
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        *selection,
        os.path.join(ROOT, "equivalence_tests", "test_equivalence.py"),
    ]
    workers = [
        subprocess.Popen(command, env=env_vars, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [worker.communicate(timeout=600)[0].decode() for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), "\n".join(outputs)
    with open(record) as handle:
        rows = [json.loads(line) for line in handle]  # a torn line would fail to parse here
    summary = equivalence_record.summarize(rows)
    # Both processes ran the same derandomized examples: every group holds an even count, none failed.
    assert summary["failed_verdicts"] == 0
    assert summary["verdicts"] == len(rows) > 0
    assert all(group["verdicts"] % 2 == 0 for group in summary["groups"]), summary["groups"]


def test_row_groups_ab_runs_every_setting_and_restores_the_default(tmp_path):
    from experiments import ab_row_groups
    from optimized import blocks

    default = blocks.STEP_OVERHEAD_BLOCKS
    out = tmp_path / "row_groups.json"
    rows = ab_row_groups.main(["--sizes", "96,8,1", "--out", str(out)])
    assert [row["pattern"] for row in rows] == list(ab_row_groups.PATTERNS)
    assert all(row[f"{setting}_ms"] > 0 for row in rows for setting in ab_row_groups.SETTINGS)
    assert blocks.STEP_OVERHEAD_BLOCKS == default
    with open(out) as handle:
        assert json.load(handle)["environment"]["torch"] == env.environment("cpu")["torch"]
