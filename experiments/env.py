"""The environment a result was measured in, recorded next to every sweep and benchmark result.

A number without its machine is not comparable to anything; every file under
``experiments/results/`` carries this record so a reader can tell an H200 figure from a laptop one.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

import torch


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:  # the CPU-only install may lack it; the record says so
        return None
    return getattr(triton, "__version__", "unknown")


def _git_commit() -> str | None:
    # The device machine's copy of the tree can carry stale git metadata: a caller that knows the commit
    # (experiments/gpu_check.sh is handed it) says so through BSRDA_GIT_COMMIT.
    if os.environ.get("BSRDA_GIT_COMMIT"):
        return os.environ["BSRDA_GIT_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        result = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str | None = None) -> dict:
    """A JSON-able record: versions, device name, CPU, thread count, commit and time."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    record = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "git_commit": _git_commit(),
        "utc_time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        record["device_memory_bytes"] = int(props.total_memory)
    return record


def describe(record: dict) -> str:
    """One line for a plot title or a notebook cell."""
    triton = record.get("triton") or "none"
    return (
        f"{record['device_name']} ({record['device_type']}), torch {record['torch']}, triton {triton}, "
        f"{record.get('torch_threads')} threads"
    )
