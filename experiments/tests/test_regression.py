"""The regression check on the committed baselines: itself passes, a slowed copy fails."""

from __future__ import annotations

import copy
import json
import os

import pytest

from experiments import regression

BASELINE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "baselines")
BASELINES = (
    sorted(name for name in os.listdir(BASELINE_DIR) if name.endswith(".json")) if os.path.isdir(BASELINE_DIR) else []
)


def load(name: str) -> dict:
    with open(os.path.join(BASELINE_DIR, name)) as handle:
        return json.load(handle)


def slowed(document: dict, case: str, factor: float) -> dict:
    """A copy in which ``case`` took ``factor`` times as long (every statistic)."""
    changed = copy.deepcopy(document)
    for bench in changed["benchmarks"]:
        if (bench.get("extra_info") or {}).get("case") == case:
            for name in regression.STATISTICS:
                bench["stats"][name] *= factor
    return changed


def test_cpu_baseline_is_committed():
    assert "cpu.json" in BASELINES, f"experiments/baselines/cpu.json is missing (found {BASELINES})"


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_against_itself_passes(name):
    document = load(name)
    report = regression.compare(document, document)
    assert report.passed(strict=True), report.describe()
    assert report.comparisons, f"{name}: no case with an anchor"
    assert all(c.change == pytest.approx(1.0) for c in report.comparisons)


@pytest.mark.parametrize("name", BASELINES)
def test_slowed_case_fails(name):
    document = load(name)
    case = regression.compare(document, document).comparisons[0].case
    report = regression.compare(document, slowed(document, case, 2.0), threshold=1.5)
    assert [c.case for c in report.regressions] == [case], report.describe()
    # Slower by less than the threshold is not a regression.
    assert regression.compare(document, slowed(document, case, 1.3), threshold=1.5).passed()


@pytest.mark.parametrize("name", BASELINES)
def test_slower_machine_is_not_a_regression(name):
    """Every case and anchor 3x slower: the ratios are unchanged, so nothing fails."""
    document = load(name)
    slower = copy.deepcopy(document)
    for bench in slower["benchmarks"]:
        for statistic in regression.STATISTICS:
            bench["stats"][statistic] *= 3.0
    assert regression.compare(document, slower).passed(strict=True)


def test_faster_case_is_not_a_regression():
    """A faster case (its anchor slowed) is an improvement, never a failure."""
    document = load("cpu.json")
    anchors = {c.anchor for c in regression.compare(document, document).comparisons}
    faster = document
    for anchor in anchors:
        faster = slowed(faster, anchor, 2.0)
    report = regression.compare(document, faster)
    assert report.passed()
    assert all(c.change == pytest.approx(0.5) for c in report.comparisons)


def test_cli_exit_status(tmp_path):
    document = load("cpu.json")
    case = regression.compare(document, document).comparisons[0].case
    base = tmp_path / "base.json"
    bad = tmp_path / "bad.json"
    base.write_text(json.dumps(document))
    bad.write_text(json.dumps(slowed(document, case, 4.0)))
    assert regression.main(["--baseline", str(base), "--current", str(base)]) == 0
    assert regression.main(["--baseline", str(base), "--current", str(bad)]) == 1


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="benchmarks"):
        regression.load_cases({"no": "benchmarks"})
    with pytest.raises(ValueError, match="statistic"):
        regression.load_cases({"benchmarks": []}, statistic="max")
    with pytest.raises(ValueError, match="threshold"):
        regression.compare({"benchmarks": []}, {"benchmarks": []}, threshold=0.9)
    orphan = {"benchmarks": [{"name": "x", "stats": {"min": 1.0}, "extra_info": {"case": "x", "anchor": "gone"}}]}
    with pytest.raises(ValueError, match="anchor 'gone'"):
        regression.ratios(regression.load_cases(orphan))


def test_merge_keeps_the_best_run(tmp_path):
    document = load("cpu.json")
    case = regression.compare(document, document).comparisons[0].case
    slow = slowed(document, case, 3.0)
    merged = regression.merge_runs([slow, document])
    assert regression.compare(document, merged).passed(strict=True)
    assert not regression.compare(document, regression.merge_runs([slow])).passed()
    runs = [tmp_path / "a.json", tmp_path / "b.json"]
    runs[0].write_text(json.dumps(slow))
    runs[1].write_text(json.dumps(document))
    out = tmp_path / "merged.json"
    assert regression.main(["--merge", str(out), *map(str, runs)]) == 0
    assert regression.main(["--baseline", str(out), "--current", str(runs[0]), str(runs[1])]) == 0
    assert regression.main(["--baseline", str(out), "--current", str(runs[0])]) == 1
