"""Time of one call and the throughput sweep's rows (tokens/s, useful TFLOP/s).

Timing is ``torch.utils.benchmark.Timer``: it warms up, picks how many calls to time per block so
the timer's own overhead is negligible, and synchronizes the accelerator before reading the clock.
The GPU benchmarks (experiments/bench_gpu.py, bench_ring.py) use triton's ``do_bench`` instead.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from .analytic import useful_flops
from .methods import FULL_ATTENTION_METHODS, make_inputs, method_callable, resolved_backend
from .settings import MemorySetting


def time_call(fn, min_run_time: float = 0.2, threads: int | None = None) -> dict:
    """Median and best per-call time of ``fn()`` over blocks of calls lasting ``min_run_time`` seconds in all.

    ``threads`` defaults to the process's intra-op thread count (Timer alone would use one).
    """
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads or torch.get_num_threads())
    measured = timer.blocked_autorange(min_run_time=min_run_time)
    return {
        "median_s": measured.median,
        "min_s": min(measured.times),
        "runs": len(measured.raw_times) * measured.number_per_run,
        "calls_per_block": measured.number_per_run,
    }


def throughput(
    method: str,
    seq_len: int,
    setting: MemorySetting,
    pattern: str | None = None,
    device="cpu",
    min_run_time: float = 0.2,
    seed: int = 0,
) -> dict:
    """One row of the throughput sweep: time, tokens per second and useful TFLOP/s."""
    device = torch.device(device)
    if method in FULL_ATTENTION_METHODS:
        pattern = None
    q, k, v = make_inputs(seq_len, setting, device, seed)
    fn = method_callable(method, q, k, v, setting, pattern)
    with torch.no_grad():
        timing = time_call(fn, min_run_time=min_run_time)
    flops = useful_flops(method, seq_len, setting, pattern)
    row = {"method": method, "pattern": pattern, "seq_len": seq_len, "device": device.type, **asdict(setting), **timing}
    row["segment_lengths"] = list(setting.segment_lengths)
    row["dilation_rates"] = list(setting.dilation_rates)
    row["useful_flops"] = flops
    row["useful_tflops"] = flops / timing["median_s"] / 1e12
    row["tokens_per_s"] = setting.batch * seq_len / timing["median_s"]
    if method.startswith("optimized"):
        row["backend"] = resolved_backend(setting, device)
    return row
