"""experiments/mutation.py's record: a run classifies only the modules it ran; --reclassify classifies all.

Two runs over different modules may write one record side by side. A run loads the EQUIVALENT list
when it starts, so if it re-marked every module's survivors it would undo entries added for another
module after it started (this happened: a module's score fell from 1.0 to 0.957 until a --reclassify).
"""

from __future__ import annotations

import json

from experiments import mutation


def _entry(module: str, status: str) -> dict:
    """A record entry of ``module`` with one survivor that no EQUIVALENT entry lists, marked ``status``."""
    survivor = dict(operator="core/NumberReplacer", original="x = 1", mutated="x = 2", status=status)
    if status == "equivalent":
        survivor["reason"] = "listed by a newer EQUIVALENT list than this process has"
    counts = dict(killed=3, timeout=0, survived=int(status == "survived"), equivalent=int(status == "equivalent"))
    counts.update(generated=4, filtered=0, no_mutation=0, not_run=0)
    return dict(sha256="0" * 64, counts=counts, survivors=[survivor])


def test_a_run_keeps_the_classification_of_modules_it_did_not_run(tmp_path):
    out = tmp_path / "mutation.json"
    settings = mutation.load_settings()
    other, ran = "optimized/not_run_here.py", "optimized/ran_here.py"
    out.write_text(json.dumps({"modules": {other: _entry(other, "equivalent")}}))
    record = mutation.write_record(out, {ran: _entry(ran, "equivalent")}, settings, {})
    # The other module's survivor stays equivalent (score 1.0); the module this run wrote is re-marked by
    # this process's list, which does not hold its survivor: survived.
    assert record["modules"][other]["counts"]["equivalent"] == 1 and record["modules"][other]["score"] == 1.0
    assert record["modules"][ran]["counts"]["survived"] == 1 and record["modules"][ran]["score"] == 0.75
    assert json.loads(out.read_text())["modules"][other]["survivors"][0]["status"] == "equivalent"


def test_reclassify_marks_every_module_by_the_list_as_it_is_now(tmp_path):
    out = tmp_path / "mutation.json"
    other = "optimized/not_run_here.py"
    out.write_text(json.dumps({"modules": {other: _entry(other, "equivalent")}}))
    record = mutation.write_record(out, {}, mutation.load_settings(), {}, reclassify_all=True)
    assert record["modules"][other]["survivors"][0]["status"] == "survived"
    assert record["modules"][other]["score"] == 0.75


def test_a_survivors_only_rerun_keeps_the_mutants_the_full_run_never_reached():
    # The full run reached 6 of its 8 sampled mutants; its one survivor is killed by the rerun.
    full = _entry("optimized/x.py", "survived")
    full["counts"].update(generated=10, sampled_out=2, killed=4, not_run=2)
    full.update(killed_by={"tests/a.py": 4}, seconds=10.0)
    rerun = dict(
        counts=dict(full["counts"], killed=1, survived=0, equivalent=0, not_run=0, sampled_out=0),
        killed_by={"tests/b.py": 1},
        survivors=[],
        killed_by_new_tests=[],
        listed_equivalent_but_killed=[],
        tests=["tests/a.py", "tests/b.py"],
        seconds=2.0,
        utc_time="2026-12-01T00:00:00+00:00",
    )
    merged = mutation.merge_survivors_only(full, rerun)
    assert merged["counts"]["not_run"] == 2 and merged["counts"]["killed"] == 5 and merged["counts"]["survived"] == 0
    assert merged["killed_by"] == {"tests/a.py": 4, "tests/b.py": 1}


def test_every_recorded_module_accounts_for_each_of_its_mutants():
    # generated = filtered (an excluded operator) + sampled out + one outcome per mutant tried
    record = json.loads((mutation.ROOT / "experiments" / "results" / "mutation.json").read_text())
    outcomes = ("killed", "timeout", "survived", "equivalent", "no_mutation", "not_run")
    for module, entry in record["modules"].items():
        counts = entry["counts"]
        tried = counts["generated"] - counts["filtered"] - counts.get("sampled_out", 0)
        assert tried == sum(counts[k] for k in outcomes), (module, counts)
