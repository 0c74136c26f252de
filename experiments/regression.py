"""Benchmark regression check: each case's time relative to its anchor, now against the baseline.

    python -m experiments.regression --baseline experiments/baselines/cpu.json --current new.json

Both files are pytest-benchmark JSON (``--benchmark-json``). Every case names in its
``extra_info`` a ``case`` id and the ``anchor`` case (e.g. torch SDPA on the same shape) measured
in the same run. The ratio ``case / anchor`` cancels the speed of the machine; a case fails when
its current ratio exceeds the baseline's ratio by more than ``--threshold`` (default 1.5x). The
statistic defaults to the minimum over rounds, the one least disturbed by other load. Cases only
in one file are reported, not failed (``--strict`` fails them). Exit status 1 on a regression.

On a busy machine one run can be slow throughout; give several runs and each case keeps its best
(minimum) time over them, for the current side (``--current a.json b.json c.json``) and, when
recording, for the baseline (``--merge experiments/baselines/cpu.json a.json b.json c.json``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

from . import cli

STATISTICS = ("min", "median", "mean")


@dataclass(frozen=True)
class CaseComparison:
    case: str
    anchor: str
    baseline_ratio: float
    current_ratio: float

    @property
    def change(self) -> float:
        """current ratio / baseline ratio: > 1 means slower relative to the anchor than in the baseline."""
        return self.current_ratio / self.baseline_ratio

    def failed(self, threshold: float) -> bool:
        return self.change > threshold


@dataclass(frozen=True)
class Report:
    comparisons: tuple[CaseComparison, ...]
    only_in_baseline: tuple[str, ...]
    only_in_current: tuple[str, ...]
    threshold: float
    statistic: str

    @property
    def regressions(self) -> tuple[CaseComparison, ...]:
        return tuple(c for c in self.comparisons if c.failed(self.threshold))

    def passed(self, strict: bool = False) -> bool:
        if self.regressions:
            return False
        return not (strict and (self.only_in_baseline or self.only_in_current))

    def describe(self) -> str:
        lines = [
            f"{'case':<40}{'anchor':<16}{'baseline':>10}{'current':>10}{'change':>9}  verdict",
        ]
        for c in sorted(self.comparisons, key=lambda c: -c.change):
            verdict = "REGRESSION" if c.failed(self.threshold) else "ok"
            lines.append(
                f"{c.case:<40}{c.anchor:<16}{c.baseline_ratio:>10.3f}{c.current_ratio:>10.3f}"
                f"{c.change:>8.2f}x  {verdict}"
            )
        for case in self.only_in_baseline:
            lines.append(f"{case:<40} only in the baseline (not run now)")
        for case in self.only_in_current:
            lines.append(f"{case:<40} only in the current run (no baseline)")
        lines.append(
            f"{len(self.regressions)} regression(s) past {self.threshold}x of the baseline's ratio "
            f"to the anchor ({self.statistic} times)"
        )
        return "\n".join(lines)


def load_cases(document: dict, statistic: str = "min") -> dict[str, tuple[str | None, float]]:
    """{case id: (anchor id or None, time in seconds)} from a pytest-benchmark JSON document."""
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if not isinstance(document, dict) or not isinstance(document.get("benchmarks"), list):
        raise ValueError("not a pytest-benchmark JSON document: no 'benchmarks' list")
    cases = {}
    for bench in document["benchmarks"]:
        info = bench.get("extra_info") or {}
        case = info.get("case") or bench.get("fullname") or bench["name"]
        stats = bench.get("stats") or {}
        if statistic not in stats:
            raise ValueError(f"benchmark {case!r} has no '{statistic}' statistic (was it run with --benchmark-enable?)")
        cases[case] = (info.get("anchor"), float(stats[statistic]))
    return cases


def merge_runs(documents) -> dict:
    """One pytest-benchmark document whose every case holds, per statistic, the minimum over ``documents``
    (the first document supplies everything else: machine info, options, the case list order)."""
    documents = list(documents)
    if not documents:
        raise ValueError("merge_runs needs at least one pytest-benchmark document")
    merged = json.loads(json.dumps(documents[0]))
    by_case = {}
    for document in documents:
        load_cases(document)  # validates the format
        for bench in document["benchmarks"]:
            case = (bench.get("extra_info") or {}).get("case") or bench.get("fullname") or bench["name"]
            by_case.setdefault(case, []).append(bench["stats"])
    for bench in merged["benchmarks"]:
        case = (bench.get("extra_info") or {}).get("case") or bench.get("fullname") or bench["name"]
        for statistic in STATISTICS:
            values = [stats[statistic] for stats in by_case[case] if statistic in stats]
            if values:
                bench["stats"][statistic] = min(values)
        bench.setdefault("extra_info", {})["merged_runs"] = len(by_case[case])
    return merged


def ratios(cases: dict[str, tuple[str | None, float]]) -> dict[str, tuple[str, float]]:
    """{case: (anchor, case time / anchor time)} for cases whose anchor was measured in the same run."""
    result = {}
    for case, (anchor, seconds) in cases.items():
        if anchor is None:
            continue
        if anchor not in cases:
            raise ValueError(f"case {case!r} names anchor {anchor!r}, which is not in the same run")
        anchor_seconds = cases[anchor][1]
        if anchor_seconds <= 0:
            raise ValueError(f"anchor {anchor!r} has a non-positive time {anchor_seconds}")
        result[case] = (anchor, seconds / anchor_seconds)
    return result


def compare(baseline: dict, current: dict, threshold: float = 1.5, statistic: str = "min") -> Report:
    """Compare two pytest-benchmark documents case by case (ratios to their anchors)."""
    if not threshold > 1.0:
        raise ValueError(f"threshold must be > 1.0 (a factor of the baseline's ratio), got {threshold!r}")
    base = ratios(load_cases(baseline, statistic))
    now = ratios(load_cases(current, statistic))
    comparisons = tuple(
        CaseComparison(case, base[case][0], base[case][1], now[case][1]) for case in sorted(base.keys() & now.keys())
    )
    return Report(
        comparisons=comparisons,
        only_in_baseline=tuple(sorted(base.keys() - now.keys())),
        only_in_current=tuple(sorted(now.keys() - base.keys())),
        threshold=threshold,
        statistic=statistic,
    )


def _read(parser, option: str, path: str) -> dict:
    """The JSON document at ``path``, or ``parser.error`` naming ``option`` when it is not one."""
    try:
        with open(path) as handle:
            document = json.load(handle)
    except OSError as error:
        parser.error(f"{option} {path}: cannot read it ({error.strerror})")
    except json.JSONDecodeError as error:
        parser.error(f"{option} {path}: not JSON ({error})")
    try:
        load_cases(document)
    except ValueError as error:
        parser.error(f"{option} {path}: {error}")
    return document


def build_parser():
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument("--baseline", type=cli.existing_file, help="committed pytest-benchmark JSON")
    parser.add_argument(
        "--current", nargs="+", type=cli.existing_file, help="pytest-benchmark JSON of the run(s) to check"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar=("OUT", "RUN"),
        help="write OUT: the per-case best of the RUN files (to record a baseline), then exit",
    )
    parser.add_argument("--threshold", type=float, default=1.5, help="allowed factor over the baseline's ratio (> 1)")
    parser.add_argument("--statistic", default="min", choices=STATISTICS)
    parser.add_argument("--strict", action="store_true", help="also fail on cases present in only one file")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.threshold > 1.0:
        parser.error(f"--threshold must be > 1.0 (a factor of the baseline's ratio), got {args.threshold}")
    if args.merge:
        if len(args.merge) < 2:
            parser.error("--merge needs OUT and at least one RUN file")
        out, runs = args.merge[0], args.merge[1:]
        missing = [path for path in runs if not os.path.isfile(path)]
        if missing:
            parser.error(f"--merge: no such RUN file: {', '.join(missing)}")
        cli.check_output_stem(parser, out, "--merge OUT")
        merged = merge_runs([_read(parser, "--merge", path) for path in runs])
        with open(out, "w") as handle:
            json.dump(merged, handle, indent=2)
        print(f"wrote {out}: best of {len(runs)} run(s)")
        return 0
    if not args.baseline or not args.current:
        parser.error("give --baseline and --current (or --merge)")
    baseline = _read(parser, "--baseline", args.baseline)
    current = merge_runs([_read(parser, "--current", path) for path in args.current])
    report = compare(baseline, current, args.threshold, args.statistic)
    print(report.describe())
    ok = report.passed(args.strict)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
