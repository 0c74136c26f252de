"""Measured memory peaks: one call, or a sweep over methods, patterns and N.

How a peak is measured (``peak_bytes``):
- CUDA: ``torch.cuda.max_memory_allocated`` after a reset, minus the bytes allocated before the
  call: the caching allocator's high-water of live tensors the call created.
- CPU: the same quantity from torch's CPU allocator, read from ``torch.profiler`` memory events
  (``profile_memory=True``): every allocation and free of a tensor is an event with its size, so a
  running sum in time order gives the live bytes, and its maximum is the peak. Python objects,
  the allocator's own caching and freed-but-not-returned pages are not counted (``tracemalloc``
  does not see torch's allocations at all, and the process RSS mixes in all of that).
  ``check_cpu_peak_measurement`` verifies the method on allocations of known size.
In both cases the inputs q, k, v exist before the call and are not part of the peak; what the
call returns (out, weights) is. Each row also carries the exact bytes of ``experiments.analytic``.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from reference import PATTERN_TYPES

from .analytic import analytic_bytes, estimated_peak_bytes
from .methods import FULL_ATTENTION_METHODS, make_inputs, method_callable, resolved_backend
from .settings import MemorySetting


@dataclass(frozen=True)
class Measurement:
    peak_bytes: int
    seconds: float
    how: str


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's native code prints a line at every start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _cpu_allocator_peak(fn):
    """(result, peak live bytes of torch CPU tensors created during ``fn()``)."""
    with CpuPeakRecorder() as recorder:
        result, label = recorder.run(fn)
    return result, recorder.peaks[label]


class CpuPeakRecorder:
    """Many CPU peak measurements in ONE profiler session (starting a session costs ~0.4 s).

    Each ``run(fn)`` is wrapped in a ``record_function`` range; after the session closes, the
    allocator events inside each range give that call's peak of live bytes above those live at
    its start (frees of older tensors inside the range count, as on CUDA).
    """

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._labels: list[str] = []
        self.peaks: dict[str, int] = {}
        self.seconds: dict[str, float] = {}

    def __enter__(self) -> CpuPeakRecorder:
        with _native_stderr_silenced():
            self._profile.__enter__()
        return self

    def run(self, fn):
        """(result, label): ``fn()`` run inside a labeled range; its peak is known after the session."""
        from torch.profiler import record_function

        label = f"experiments.memory.run.{len(self._labels)}"
        self._labels.append(label)
        start = time.perf_counter()
        with record_function(label):
            result = fn()
        self.seconds[label] = time.perf_counter() - start
        return result, label

    def __exit__(self, *exc) -> None:
        from torch.autograd import DeviceType

        with _native_stderr_silenced():
            self._profile.__exit__(*exc)
        if exc[0] is not None:
            return
        events = self._profile.profiler.kineto_results.events()
        wanted = set(self._labels)
        ranges = sorted((e.start_ns(), e.end_ns(), e.name()) for e in events if e.name() in wanted)
        allocations = sorted(
            (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        )
        position = 0
        for start, stop, label in ranges:
            while position < len(allocations) and allocations[position][0] < start:
                position += 1
            live = peak = 0
            index = position
            while index < len(allocations) and allocations[index][0] <= stop:
                live += allocations[index][1]
                peak = max(peak, live)
                index += 1
            self.peaks[label] = peak


CPU_HOW = "torch CPU allocator events (torch.profiler profile_memory)"


def peak_bytes(fn, device: torch.device | str):
    """Run ``fn()`` once; return (result, Measurement) with the peak bytes of tensors it created."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) - before
        return result, Measurement(int(peak), seconds, "cuda max_memory_allocated - allocated before")
    start = time.perf_counter()
    result, peak = _cpu_allocator_peak(fn)
    seconds = time.perf_counter() - start
    return result, Measurement(int(peak), seconds, CPU_HOW)


def check_cpu_peak_measurement() -> list[dict]:
    """The CPU method on allocations of known size: (expected, measured) for a few cases."""

    def three_live():
        a = torch.empty(1 << 20, dtype=torch.float32)  # 4 MiB
        b = torch.empty(1 << 20, dtype=torch.float32)
        c = torch.empty(1 << 19, dtype=torch.float64)  # 4 MiB
        return (a.sum() + b.sum() + c.sum()).item()

    def one_at_a_time():
        for _ in range(4):
            torch.empty(1 << 20, dtype=torch.float32)  # freed before the next one
        return 0

    def matmul_chain():
        x = torch.randn(1024, 1024)
        y = x @ x  # x and y live: 8 MiB
        del x
        return (y @ y).sum().item()  # y and the product live: 8 MiB

    cases = [
        ("three live tensors", three_live, 12 << 20),
        ("four in turn", one_at_a_time, 4 << 20),
        ("matmul chain", matmul_chain, 8 << 20),
    ]
    rows = []
    for name, fn, expected in cases:
        _, measured = _cpu_allocator_peak(fn)
        rows.append({"case": name, "expected_bytes": expected, "measured_bytes": measured})
    return rows


def measure(
    method: str,
    seq_len: int,
    setting: MemorySetting,
    pattern: str | None = None,
    device="cpu",
    memory_limit_bytes: int | None = None,
    seed: int = 0,
    recorder: CpuPeakRecorder | None = None,
) -> dict:
    """One row: the measured peak of ``method`` at ``seq_len`` next to its analytic bytes.

    Runs whose generous estimate exceeds ``memory_limit_bytes`` are not run; the row says so.
    ``pattern`` is ignored (None) for dense_nxn and sdpa, which do not depend on it. With a
    ``recorder`` (CPU) the peak is filled in by ``fill_peaks`` once the recorder's session closed.
    """
    device = torch.device(device)
    if method in FULL_ATTENTION_METHODS:
        pattern = None
    elif pattern is None:
        raise ValueError(f"method {method!r} needs a pattern, one of {PATTERN_TYPES}")
    row = {"method": method, "pattern": pattern, "seq_len": seq_len, "device": device.type, **asdict(setting)}
    row["segment_lengths"] = list(setting.segment_lengths)
    row["dilation_rates"] = list(setting.dilation_rates)
    row.update(analytic_bytes(method, seq_len, setting, pattern))
    estimate = estimated_peak_bytes(method, seq_len, setting)
    if memory_limit_bytes is not None and estimate > memory_limit_bytes:
        row.update(peak_bytes=None, seconds=None, skipped=f"estimated {estimate / 2**20:.0f} MiB > limit")
        return row
    q, k, v = make_inputs(seq_len, setting, device, seed)
    fn = method_callable(method, q, k, v, setting, pattern)
    if device.type == "cuda":
        fn()  # compile kernels and fill caches outside the measurement
    with torch.no_grad():
        if recorder is not None and device.type == "cpu":
            result, label = recorder.run(fn)
            row.update(peak_bytes=None, seconds=None, how=CPU_HOW, skipped=None, pending=label)
        else:
            result, measured = peak_bytes(fn, device)
            row.update(peak_bytes=measured.peak_bytes, seconds=measured.seconds, how=measured.how, skipped=None)
    if method == "optimized+weights":
        row["weights_nbytes"] = int(result[1].nbytes)
    if method.startswith("optimized"):
        row["backend"] = resolved_backend(setting, device)
    del result, fn, q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _patterns_of(method: str, patterns) -> tuple:
    """SDPA and dense_nxn ignore the pattern; the reference's memory does not depend on it (it builds
    the dense N x N multiplicity for every pattern), so it is measured on one pattern only."""
    if method in FULL_ATTENTION_METHODS:
        return (None,)
    if method == "reference":
        return ("dilated_sparse",) if "dilated_sparse" in patterns else tuple(patterns)[:1]
    return tuple(patterns)


def sweep(
    methods,
    seq_lens,
    patterns,
    setting: MemorySetting,
    device="cpu",
    memory_limit_bytes=None,
    max_seq_len: dict | None = None,
    progress: bool = False,
) -> list[dict]:
    """Every (method, pattern, N): pattern-free methods once per N. ``max_seq_len`` caps N per method."""
    jobs = []
    for method in methods:
        for seq_len in seq_lens:
            if max_seq_len and seq_len > max_seq_len.get(method, math.inf):
                continue
            for pattern in _patterns_of(method, patterns):
                jobs.append((method, pattern, seq_len))
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="memory", unit="run")
    rows = []
    recorder = CpuPeakRecorder() if torch.device(device).type == "cpu" else None
    with recorder if recorder is not None else contextlib.nullcontext():
        for method, pattern, seq_len in jobs:
            if progress:
                jobs.set_postfix_str(f"{method} {pattern or ''} N={seq_len}")
            rows.append(measure(method, seq_len, setting, pattern, device, memory_limit_bytes, recorder=recorder))
    return fill_peaks(rows, recorder) if recorder is not None else rows


def fill_peaks(rows, recorder: CpuPeakRecorder) -> list[dict]:
    """Rows measured through ``recorder`` get their peak and seconds (after its session closed)."""
    for row in rows:
        label = row.pop("pending", None)
        if label is not None:
            row["peak_bytes"] = recorder.peaks[label]
            row["seconds"] = recorder.seconds[label]
    return rows
