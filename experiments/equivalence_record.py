"""Summarize a recorded run of the equivalence suite: examples and worst error / budget per test.

    EQUIVALENCE_RECORD=verdicts.jsonl HYPOTHESIS_PROFILE=gpu python3 -m pytest equivalence_tests \\
        --junitxml junit.xml
    python3 -m experiments.equivalence_record verdicts.jsonl --junit junit.xml --out summary.json

``equivalence_tests.helpers`` appends one JSON line per verdict (out, lse, weights, row sums,
dq, dk, dv) when EQUIVALENCE_RECORD names a file. This groups them by (test, backend, dtype,
quantity) and keeps the count, the failures and the worst error / budget with its case; the
junit file adds pytest's pass / fail / skip counts. The environment (GPU, torch, triton) is recorded.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ElementTree

from experiments import cli
from experiments.env import environment


def _ratio(row: dict) -> float:
    if row["budget"] > 0:
        return row["error"] / row["budget"]
    return 0.0 if row["error"] == 0 else float("inf")


def summarize(lines: list[dict]) -> dict:
    groups: dict[tuple, dict] = {}
    for row in lines:
        key = (row["test"], row["backend"], row["dtype"], row["quantity"])
        group = groups.setdefault(
            key,
            {
                "test": row["test"],
                "backend": row["backend"],
                "dtype": row["dtype"],
                "device": row["device"],
                "quantity": row["quantity"],
                "verdicts": 0,
                "failed": 0,
                "worst_ratio": -1.0,
            },
        )
        group["verdicts"] += 1
        group["failed"] += 0 if row["passed"] else 1
        ratio = _ratio(row)
        if ratio > group["worst_ratio"]:
            group.update(
                worst_ratio=ratio, worst_error=row["error"], worst_budget=row["budget"], worst_case=row["case"]
            )
    return {
        "groups": sorted(groups.values(), key=lambda g: (g["test"], g["dtype"], g["quantity"])),
        "verdicts": len(lines),
        "failed_verdicts": sum(not row["passed"] for row in lines),
        "worst_ratio": max((_ratio(row) for row in lines), default=None),
    }


def junit_counts(path: str) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0}
    for suite in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(suite.get(key, 0))
        counts["time_s"] += float(suite.get("time", 0.0))
    return counts


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument(
        "record",
        nargs="+",
        help="JSON-lines files written under EQUIVALENCE_RECORD (a missing one counts as no verdicts: "
        "a suite cut short by its timeout may have written none)",
    )
    parser.add_argument(
        "--junit",
        nargs="*",
        default=[],
        help="pytest --junitxml files of the same run (a missing one is left out: pytest writes none "
        "when its timeout kills it)",
    )
    parser.add_argument("--out", required=True, help="the summary JSON to write")
    parser.add_argument("--note", default="")
    parser.add_argument(
        "--device-info", type=cli.existing_file, help="the run's nvidia_smi.txt, when summarizing on another machine"
    )
    return parser


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli.check_output_stem(parser, args.out)
    lines = []
    for path in args.record:
        if not os.path.exists(path):
            print(f"{path}: missing, no verdicts from it")
            continue
        with open(path) as handle:
            lines.extend(json.loads(line) for line in handle if line.strip())
    summary = summarize(lines)
    summary["pytest"] = {os.path.basename(path): junit_counts(path) for path in args.junit if os.path.exists(path)}
    summary["profile"] = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    summary["note"] = args.note
    if args.device_info:
        with open(args.device_info) as handle:
            summary["environment"] = {"recorded_on_the_device": handle.read()}
    else:
        summary["environment"] = environment()
    with open(args.out, "w") as handle:
        json.dump(summary, handle, indent=1)
    print(
        f"{summary['verdicts']} verdicts, {summary['failed_verdicts']} failed, worst error/budget "
        f"{summary['worst_ratio']}"
    )
    for group in summary["groups"]:
        print(
            f"  {group['test'][-60:]:>60} {group['dtype']:>9} {group['quantity']:>9} n={group['verdicts']:>4} "
            f"worst {group['worst_ratio']:.3f} fails {group['failed']}"
        )
    for name, counts in summary["pytest"].items():
        print(f"  {name}: {counts}")
    return summary


if __name__ == "__main__":
    main()
