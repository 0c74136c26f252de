"""The environment a result was measured in, recorded next to every sweep and benchmark result.

A number without its machine is not comparable to anything; every file under
``experiments/results/`` carries this record so a reader can tell an H200 figure from a laptop one.
The system facts (OS, Python, torch and its CUDA, driver, GPU models, CPU model) come from
``torch.utils.collect_env`` (what PyTorch asks for in bug reports); this module adds what it does
not know: the device measured, the thread count, the git commit and the time.
"""

from __future__ import annotations

import datetime
import functools
import os
import re
import subprocess
from importlib import metadata

import torch


@functools.cache
def _system() -> dict:
    """The facts of ``torch.utils.collect_env.get_env_info()`` that a result depends on (once per process:
    it runs lscpu, pip and nvidia-smi)."""
    from torch.utils import collect_env

    info = collect_env.get_env_info()
    cpu = re.search(r"^Model name:\s*(.+)$", info.cpu_info or "", re.MULTILINE)
    return {
        "python": info.python_version.split()[0],
        "torch": info.torch_version,
        "cuda": info.cuda_compiled_version,
        "cuda_runtime": info.cuda_runtime_version,
        "nvidia_driver": info.nvidia_driver_version,
        "gpu_models": info.nvidia_gpu_models,
        "cudnn": info.cudnn_version,
        "os": info.os,
        "platform": info.python_platform,
        "cpu": cpu.group(1).strip() if cpu else None,
    }


def _triton_version() -> str | None:
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:  # the CPU-only install may lack it; the record says so
        return None


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


def environment(device: torch.device | str | None = None) -> dict:
    """A JSON-able record: versions, device name, CPU, thread count, commit and time."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    system = _system()
    record = {
        **system,
        "triton": _triton_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device_type": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else system["cpu"],
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
