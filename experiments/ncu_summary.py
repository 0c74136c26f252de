"""A side-by-side table of the Nsight Compute metrics that explain our kernel against flex.

    python3 -m experiments.ncu_summary RUN/ncu_details.csv --labels RUN/ncu.log [--raw RUN/ncu_raw.csv] --out T.txt

Input: ``ncu --import profile.ncu-rep --page details --csv`` (one row per kernel launch and metric),
optionally ``--page raw --csv`` for the warp stall breakdown, and the log of
experiments/profile_kernels.py, whose "launch group" lines name each launch in order (a method's
second call is the warm one). Launches are matched to those names by their order in the report.
"""

from __future__ import annotations

import csv
import re
from collections import OrderedDict

from experiments import cli

# (section-independent) metric names of the details page worth a row, in print order
DETAIL_METRICS = (
    "Duration",
    "Compute (SM) Throughput",
    "Memory Throughput",
    "DRAM Throughput",
    "L1/TEX Hit Rate",
    "L2 Hit Rate",
    "Executed Ipc Active",
    "Issue Slots Busy",
    "No Eligible",
    "Warp Cycles Per Issued Instruction",
    "Registers Per Thread",
    "Dynamic Shared Memory Per Block",
    "Theoretical Occupancy",
    "Achieved Occupancy",
    "Block Limit Registers",
    "Block Limit Shared Mem",
    "Grid Size",
    "Block Size",
    "Waves Per SM",
    "Executed Instructions",
)
STALL = re.compile(r"smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio")


def read_details(path: str):
    """{launch id: {"kernel": name, metric: "value unit"}} in launch order."""
    launches: OrderedDict = OrderedDict()
    with open(path, newline="") as handle:
        lines = [line for line in handle if line.startswith('"')]
    for row in csv.DictReader(lines):
        launch = launches.setdefault(row["ID"], {"kernel": row.get("Kernel Name", "")})
        name = row.get("Metric Name")
        if name in DETAIL_METRICS and name not in launch:
            launch[name] = f"{row.get('Metric Value', '')} {row.get('Metric Unit', '') or ''}".strip()
    return launches


def read_stalls(path: str):
    """[{stall reason: warps stalled per issued instruction}] per launch, from the raw page."""
    with open(path, newline="") as handle:
        lines = [line for line in handle if line.startswith('"')]
    rows = list(csv.reader(lines))
    if len(rows) < 3:
        return []
    header, body = rows[0], rows[2:]  # the second row holds units
    columns = {index: STALL.match(name).group(1) for index, name in enumerate(header) if STALL.match(name)}
    stalls = []
    for row in body:
        values = {}
        for index, reason in columns.items():
            try:
                values[reason] = float(row[index].replace(",", ""))
            except (ValueError, IndexError):
                continue
        stalls.append(values)
    return stalls


def read_labels(path: str):
    labels = []
    with open(path) as handle:
        for line in handle:
            match = re.search(r"launch group \d+: (.*)", line)
            if match:
                labels.append(match.group(1).strip())
    return labels


def label_launches(launches, labels):
    """Our kernel and flex's launch once per call here, in the logged order."""
    names = list(launches)
    return {
        launch_id: (labels[index] if index < len(labels) else launches[launch_id]["kernel"][:30])
        for index, launch_id in enumerate(names)
    }


def main(argv=None) -> str:
    parser = cli.parser_for(__doc__, __spec__)
    parser.add_argument("details", type=cli.existing_file, help="ncu --page details --csv output")
    parser.add_argument("--raw", type=cli.existing_file, help="ncu --page raw --csv output (warp stalls)")
    parser.add_argument("--labels", type=cli.existing_file, help="the log of experiments/profile_kernels.py")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--warm-only", action="store_true", help="keep each method's second (warm) call")
    args = parser.parse_args(argv)
    cli.check_output_stem(parser, args.out)
    launches = read_details(args.details)
    stalls = read_stalls(args.raw) if args.raw else []
    names = label_launches(launches, read_labels(args.labels) if args.labels else [])
    ids = [i for i in launches if not (args.warm_only and names[i].endswith("call 0"))]
    width = 24
    out = [f"{'metric':<36}" + "".join(f"{names[i].replace(' call 1', '')[-width:]:>{width + 1}}" for i in ids)]
    for metric in DETAIL_METRICS:
        out.append(f"{metric:<36}" + "".join(f"{launches[i].get(metric, '-')[:width]:>{width + 1}}" for i in ids))
    if stalls:
        order = list(launches)
        reasons = sorted({r for s in stalls for r in s}, key=lambda r: -max(s.get(r, 0.0) for s in stalls))
        for reason in reasons[:10]:
            cells = []
            for i in ids:
                index = order.index(i)
                value = stalls[index].get(reason) if index < len(stalls) else None
                cells.append("-" if value is None else f"{value:.2f}")
            out.append(f"{'stall ' + reason:<36}" + "".join(f"{c:>{width + 1}}" for c in cells))
    text = "\n".join(out)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
