"""Time and peak memory of one call, on CUDA (allocator high-water) or the CPU (sampled RSS)."""

from __future__ import annotations

import os
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * _PAGE


def peak_memory(fn, device: torch.device | str):
    """Run ``fn()`` once; return (result, seconds, peak extra bytes over the memory in use before).

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (exact, allocator view). CPU: the
    process's resident set sampled every 0.5 ms by a thread (an estimate: it includes allocator
    caching and can miss spikes shorter than the interval).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return result, seconds, torch.cuda.max_memory_allocated(device) - before
    before = _rss_bytes()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    return result, seconds, peak[0] - before
