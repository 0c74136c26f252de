"""Memory of attention: measured peaks and analytic bytes, for the sweeps and the notebooks.

Every number the notebooks plot comes from a function here (the notebooks only call and draw).

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
call returns (out, weights) is.

Analytic bytes (``analytic_bytes``) are exact sizes of named tensors, not fitted numbers:
one dense N x N weight tensor ``B*H*N*N*s``, the outputs ``out`` (+ ``lse``), and the sparse
weights (``sparse_weights_bytes``, the same tensors ``SparseAttentionWeights.nbytes`` counts).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from reference import PATTERN_TYPES, AttentionGeometry, DilationConfig, SparsePatternConfig, active_block_count

SEED_SEGMENTS = (2048, 4096, 8192)
SEED_RATES = (1, 2, 4)
SEED_BLOCK = 128
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

METHODS = {
    "dense_nxn": "softmax(Q K^T) V materializing the B x H x N x N weights (the seed's 'Original')",
    "sdpa": "torch scaled_dot_product_attention, full attention, no mask (a fused kernel: the anchor)",
    "reference": "reference.BlockSparseRingDilatedAttention (dense float64 ground truth)",
    "optimized": "optimized.BlockSparseRingDilatedAttention, no weights",
    "optimized+weights": "optimized.BlockSparseRingDilatedAttention, return_attention_weights=True",
}
QUADRATIC_METHODS = ("dense_nxn", "reference")

# The seed document's memory claims (its batch, heads and head dim are not stated).
SEED_CLAIMS = (
    {"seq_len": 8192, "quantity": "forward (no weights)", "seed_original": "40.1 MB", "seed_v2": "16.0 MB"},
    {"seq_len": 8192, "quantity": "forward (with weights)", "seed_original": "out of memory", "seed_v2": "16.0 MB"},
    {"seq_len": 8192, "quantity": "attention storage", "seed_original": "2+ GB (attempted)", "seed_v2": "9.8 MB"},
    {"seq_len": 4096, "quantity": "dense attention weights", "seed_original": "256.0 MB", "seed_v2": "-"},
    {"seq_len": 4096, "quantity": "sparse attention weights", "seed_original": "-", "seed_v2": "5.1 MB"},
)


@dataclass(frozen=True)
class MemorySetting:
    """Shapes and configuration of one memory measurement (everything but N and the pattern)."""

    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    dtype: str = "float32"
    segment_lengths: tuple[int, ...] = SEED_SEGMENTS
    dilation_rates: tuple[int, ...] = SEED_RATES
    block_size: int = SEED_BLOCK
    backend: str = "auto"
    work_size: int = 4096
    head_mode: str = "split"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def element_size(self) -> int:
        return torch.empty(0, dtype=self.torch_dtype).element_size()

    def scaled_down(self, factor: int) -> "MemorySetting":
        """Segments and block size divided by ``factor``: the seed's shape at sizes a CPU runs live."""
        return replace(
            self,
            segment_lengths=tuple(max(1, w // factor) for w in self.segment_lengths),
            block_size=max(1, self.block_size // factor),
        )

    def geometry(self, seq_len: int) -> AttentionGeometry:
        return AttentionGeometry(DilationConfig(self.segment_lengths, self.dilation_rates, self.head_mode), seq_len,
                                 self.heads)

    def describe(self) -> str:
        return (
            f"B={self.batch}, H={self.heads}, D={self.head_dim}, {self.dtype}, segments {list(self.segment_lengths)}, "
            f"rates {list(self.dilation_rates)}, block {self.block_size}"
            + ("" if self.head_mode == "split" else f", head_mode {self.head_mode}")
        )


def pattern_config(pattern: str, setting: MemorySetting) -> SparsePatternConfig:
    """The seed's settings of each pattern type, with token sizes scaled with the block size.

    At block 128: local window 512 tokens, 128 global tokens, sparsity 0.1 (the seed's examples);
    ``custom`` is a band of width 3 blocks, large enough for every segment.
    """
    b = setting.block_size
    overrides = {}
    if pattern == "custom":
        nb = -(-max(setting.segment_lengths) // b)
        band = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).abs() <= 1
        overrides["block_layout"] = band
    return SparsePatternConfig(
        pattern_type=pattern, sparsity_ratio=0.1, block_size=b, local_window_size=4 * b, global_tokens=b, **overrides
    )


# ------------------------------------------------------------------------------------------------
# Analytic bytes
# ------------------------------------------------------------------------------------------------


def dense_weights_bytes(seq_len: int, setting: MemorySetting) -> int:
    """One dense (B, H, N, N) tensor in the setting's dtype: what the seed's 'Original' returned."""
    return setting.batch * setting.heads * seq_len * seq_len * setting.element_size


def output_bytes(seq_len: int, setting: MemorySetting) -> int:
    """out (B, N, H, D) in the input dtype plus lse (B, H, N) float32: what any exact method must write."""
    s = setting
    return s.batch * seq_len * s.heads * (s.head_dim * s.element_size + 4)


def sparse_weights_blocks(seq_len: int, setting: MemorySetting, pattern: str, is_causal: bool = False) -> int:
    """Stored blocks of the sparse weights: active (query block, key block) pairs summed over heads."""
    return active_block_count(setting.geometry(seq_len), pattern_config(pattern, setting), is_causal)


def sparse_weights_bytes(seq_len: int, setting: MemorySetting, pattern: str, is_causal: bool = False) -> int:
    """Bytes of ``SparseAttentionWeights``: float32 values (B, NBLK, b, b) plus per-block int64 indices
    (query block, key block, head, branch) and int64 query and key positions (NBLK, b) each."""
    blocks = sparse_weights_blocks(seq_len, setting, pattern, is_causal)
    b = setting.block_size
    return blocks * (setting.batch * b * b * 4 + 8 * (4 + 2 * b))


def analytic_bytes(method: str, seq_len: int, setting: MemorySetting, pattern: str | None) -> dict:
    """The exact sizes of the named tensors a method must hold (see the module docstring)."""
    record = {"nxn_bytes": dense_weights_bytes(seq_len, setting), "output_bytes": output_bytes(seq_len, setting)}
    if method == "optimized+weights":
        record["weights_bytes"] = sparse_weights_bytes(seq_len, setting, pattern)
    return record


def estimated_peak_bytes(method: str, seq_len: int, setting: MemorySetting) -> int:
    """A generous upper estimate, used only to skip runs that would not fit (never plotted)."""
    s = setting
    nxn = s.batch * s.heads * seq_len * seq_len
    if method == "dense_nxn":
        return 3 * nxn * max(4, s.element_size)
    if method == "reference":
        return nxn * (3 * 8 + 8) + 2 * s.heads * seq_len * seq_len * 8
    return 0


# ------------------------------------------------------------------------------------------------
# Measuring a peak
# ------------------------------------------------------------------------------------------------


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

    def __enter__(self) -> "CpuPeakRecorder":
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
            (e.start_ns(), e.nbytes())
            for e in events
            if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
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

    cases = [("three live tensors", three_live, 12 << 20), ("four in turn", one_at_a_time, 4 << 20),
             ("matmul chain", matmul_chain, 8 << 20)]
    rows = []
    for name, fn, expected in cases:
        _, measured = _cpu_allocator_peak(fn)
        rows.append({"case": name, "expected_bytes": expected, "measured_bytes": measured})
    return rows


# ------------------------------------------------------------------------------------------------
# The methods
# ------------------------------------------------------------------------------------------------


def make_inputs(seq_len: int, setting: MemorySetting, device, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (setting.batch, seq_len, setting.heads, setting.head_dim)
    return tuple(torch.randn(shape, generator=generator).to(device, setting.torch_dtype) for _ in range(3))


def _dense_nxn(q, k, v):
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v), weights


def method_callable(method: str, q, k, v, setting: MemorySetting, pattern: str | None):
    """A zero-argument callable running ``method`` on (q, k, v); built outside the measurement."""
    match method:
        case "dense_nxn":
            return lambda: _dense_nxn(q, k, v)
        case "sdpa":
            sdpa = torch.nn.functional.scaled_dot_product_attention
            return lambda: sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        case "reference":
            from reference import BlockSparseRingDilatedAttention as Reference

            module = Reference(setting.segment_lengths, setting.dilation_rates, pattern_config(pattern, setting),
                               head_mode=setting.head_mode)
            return lambda: module(q, k, v)
        case "optimized" | "optimized+weights":
            from optimized import BlockSparseRingDilatedAttention as Optimized

            module = Optimized(
                setting.segment_lengths, setting.dilation_rates, pattern_config(pattern, setting),
                head_mode=setting.head_mode, backend=setting.backend, work_size=setting.work_size,
                use_cuda_graphs=False,
            )
            with_weights = method == "optimized+weights"
            return lambda: module(q, k, v, return_attention_weights=with_weights)
        case other:
            raise ValueError(f"method must be one of {tuple(METHODS)}, got {other!r}")


def measure(method: str, seq_len: int, setting: MemorySetting, pattern: str | None = None, device="cpu",
            memory_limit_bytes: int | None = None, seed: int = 0, recorder: CpuPeakRecorder | None = None) -> dict:
    """One row: the measured peak of ``method`` at ``seq_len`` next to its analytic bytes.

    Runs whose generous estimate exceeds ``memory_limit_bytes`` are not run; the row says so.
    ``pattern`` is ignored (None) for dense_nxn and sdpa, which do not depend on it. With a
    ``recorder`` (CPU) the peak is filled in by ``fill_peaks`` once the recorder's session closed.
    """
    device = torch.device(device)
    if method in ("dense_nxn", "sdpa"):
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
        from optimized import resolve_backend

        row["backend"] = resolve_backend(setting.backend, device)
    del result, fn, q, k, v
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _patterns_of(method: str, patterns) -> tuple:
    """SDPA and dense_nxn ignore the pattern; the reference's memory does not depend on it (it builds
    the dense N x N multiplicity for every pattern), so it is measured on one pattern only."""
    if method in ("dense_nxn", "sdpa"):
        return (None,)
    if method == "reference":
        return ("dilated_sparse",) if "dilated_sparse" in patterns else tuple(patterns)[:1]
    return tuple(patterns)


def sweep(methods, seq_lens, patterns, setting: MemorySetting, device="cpu", memory_limit_bytes=None,
          max_seq_len: dict | None = None, progress: bool = False) -> list[dict]:
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
    with recorder if recorder is not None else _nothing():
        for method, pattern, seq_len in jobs:
            if progress:
                jobs.set_postfix_str(f"{method} {pattern or ''} N={seq_len}")
            rows.append(measure(method, seq_len, setting, pattern, device, memory_limit_bytes, recorder=recorder))
    return fill_peaks(rows, recorder) if recorder is not None else rows


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def fill_peaks(rows, recorder: CpuPeakRecorder) -> list[dict]:
    """Rows measured through ``recorder`` get their peak and seconds (after its session closed)."""
    for row in rows:
        label = row.pop("pending", None)
        if label is not None:
            row["peak_bytes"] = recorder.peaks[label]
            row["seconds"] = recorder.seconds[label]
    return rows


# ------------------------------------------------------------------------------------------------
# Reading the rows
# ------------------------------------------------------------------------------------------------


def fit_loglog_slope(seq_lens, values) -> float:
    """Least-squares slope of log(value) against log(N): 1 for linear memory, 2 for quadratic."""
    points = [(math.log(n), math.log(v)) for n, v in zip(seq_lens, values) if v and v > 0]
    if len(points) < 2:
        return float("nan")
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return sxy / sxx


def series(rows, value: str = "peak_bytes", min_seq_len: int = 0) -> dict:
    """{(method, pattern): (seq_lens, values)} of the measured (not skipped) rows, N ascending."""
    grouped: dict = {}
    for row in sorted(rows, key=lambda r: r["seq_len"]):
        if row.get(value) is None or row["seq_len"] < min_seq_len:
            continue
        ns, vs = grouped.setdefault((row["method"], row["pattern"]), ([], []))
        ns.append(row["seq_len"])
        vs.append(row[value])
    return grouped


def slopes(rows, value: str = "peak_bytes", min_seq_len: int = 0, last: int | None = None) -> list[dict]:
    """Fitted log-log slope per (method, pattern), over N >= ``min_seq_len`` and the ``last`` largest N.

    The largest N show the asymptotic growth; at small N a fixed work set (the torch backend's
    ``work_size`` blocks) still weighs and flattens the curve.
    """
    fitted = []
    for (method, pattern), (ns, vs) in series(rows, value, min_seq_len).items():
        ns, vs = (ns[-last:], vs[-last:]) if last else (ns, vs)
        fitted.append({"method": method, "pattern": pattern, "points": len(ns), "from_N": ns[0], "to_N": ns[-1],
                       "slope": fit_loglog_slope(ns, vs)})
    return fitted


def same_setting(row: dict, setting: MemorySetting) -> bool:
    """Was ``row`` measured with ``setting``? (backend and work size aside)"""
    as_list = lambda value: list(value) if isinstance(value, (tuple, list)) else value  # noqa: E731
    return all(
        as_list(row.get(name)) == as_list(value)
        for name, value in asdict(setting).items()
        if name not in ("backend", "work_size")
    )


def seed_comparison(setting: MemorySetting, rows=None, pattern: str = "dilated_sparse") -> list[dict]:
    """The seed's claims beside ours at the same N (analytic, and measured where ``rows`` has them)."""
    rows = [row for row in rows or () if same_setting(row, setting)]
    measured = {(r["method"], r["pattern"], r["seq_len"]): r for r in rows if r.get("peak_bytes") is not None}

    def peak(method, seq_len, pat):
        row = measured.get((method, pat, seq_len))
        return None if row is None else row["peak_bytes"]

    mib = lambda n: None if n is None else n / 2**20  # noqa: E731
    ours = {
        (8192, "forward (no weights)"): (mib(output_bytes(8192, setting)), mib(peak("optimized", 8192, pattern))),
        (8192, "forward (with weights)"): (
            mib(output_bytes(8192, setting) + sparse_weights_bytes(8192, setting, pattern)),
            mib(peak("optimized+weights", 8192, pattern)),
        ),
        (8192, "attention storage"): (mib(sparse_weights_bytes(8192, setting, pattern)), None),
        (4096, "dense attention weights"): (
            mib(dense_weights_bytes(4096, setting)), mib(peak("dense_nxn", 4096, None))
        ),
        (4096, "sparse attention weights"): (mib(sparse_weights_bytes(4096, setting, pattern)), None),
    }
    for row in rows:
        if row["method"] == "optimized+weights" and row["pattern"] == pattern and row.get("weights_nbytes"):
            key = (row["seq_len"], "attention storage" if row["seq_len"] == 8192 else "sparse attention weights")
            if key in ours:
                ours[key] = (ours[key][0], mib(row["weights_nbytes"]))
    table = []
    for claim in SEED_CLAIMS:
        analytic, live = ours[(claim["seq_len"], claim["quantity"])]
        table.append({**claim, "ours_analytic_MiB": analytic, "ours_measured_MiB": live})
    return table


# ------------------------------------------------------------------------------------------------
# Result files
# ------------------------------------------------------------------------------------------------


def save_results(path: str, rows, environment: dict, extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump({"environment": environment, **(extra or {}), "rows": rows}, handle, indent=1)


def load_results(pattern: str = "memory_*.json", results_dir: str = RESULTS_DIR, device_type: str | None = None):
    """[(file name, document)] of result files matching ``pattern``; optionally only one device type."""
    found = []
    for path in sorted(glob.glob(os.path.join(results_dir, pattern))):
        try:
            with open(path) as handle:
                document = json.load(handle)
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(document, dict) or "rows" not in document:
            continue
        if device_type is not None and document.get("environment", {}).get("device_type") != device_type:
            continue
        found.append((os.path.basename(path), document))
    return found


def save_csv(path: str, rows) -> None:
    """Rows as CSV (the union of their keys as columns; lists written as space-separated values)."""
    import csv

    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in row.items()})


# ------------------------------------------------------------------------------------------------
# Time of one call (the throughput sweep)
# ------------------------------------------------------------------------------------------------


def time_call(fn, device, repeats: int = 5, warmup: int = 1) -> dict:
    """Median and minimum wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    device = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "repeats": repeats}


def useful_flops(method: str, seq_len: int, setting: MemorySetting, pattern: str | None) -> int:
    """4 x (allowed query-key pairs) x D x B: the work a method must do (full attention for SDPA/dense)."""
    from reference import active_pair_count

    if method in ("dense_nxn", "sdpa"):
        pairs = setting.heads * seq_len * seq_len
    else:
        pairs = active_pair_count(setting.geometry(seq_len), pattern_config(pattern, setting))
    return 4 * pairs * setting.head_dim * setting.batch


def throughput(method: str, seq_len: int, setting: MemorySetting, pattern: str | None = None, device="cpu",
               repeats: int = 5, seed: int = 0) -> dict:
    """One row of the throughput sweep: time, tokens per second and useful TFLOP/s."""
    device = torch.device(device)
    if method in ("dense_nxn", "sdpa"):
        pattern = None
    q, k, v = make_inputs(seq_len, setting, device, seed)
    fn = method_callable(method, q, k, v, setting, pattern)
    with torch.no_grad():
        timing = time_call(fn, device, repeats=repeats)
    flops = useful_flops(method, seq_len, setting, pattern)
    row = {"method": method, "pattern": pattern, "seq_len": seq_len, "device": device.type, **asdict(setting), **timing}
    row["segment_lengths"] = list(setting.segment_lengths)
    row["dilation_rates"] = list(setting.dilation_rates)
    row["useful_flops"] = flops
    row["useful_tflops"] = flops / timing["median_s"] / 1e12
    row["tokens_per_s"] = setting.batch * seq_len / timing["median_s"]
    if method.startswith("optimized"):
        from optimized import resolve_backend

        row["backend"] = resolve_backend(setting.backend, device)
    return row


# ------------------------------------------------------------------------------------------------
# Plots (matplotlib is imported only here, so the library works without it)
# ------------------------------------------------------------------------------------------------

_METHOD_STYLE = {
    "dense_nxn": dict(color="black", marker="s"),
    "sdpa": dict(color="tab:gray", marker="D"),
    "reference": dict(color="tab:red", marker="^"),
    "optimized": dict(color="tab:blue", marker="o"),
    "optimized+weights": dict(marker="."),
}


def plot_peaks(rows, ax=None, value: str = "peak_bytes", min_fit_seq_len: int = 0, title: str | None = None,
               show_nxn: bool = True, methods=None, fit_last: int | None = None):
    """Log-log plot of ``value`` (bytes) against N, one line per (method, pattern), fitted slope in the legend."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 5))
    for (method, pattern), (ns, vs) in series(rows, value).items():
        if methods is not None and method not in methods:
            continue
        fit_ns = [n for n in ns if n >= min_fit_seq_len]
        fit_vs = [v for n, v in zip(ns, vs) if n >= min_fit_seq_len]
        if fit_last:
            fit_ns, fit_vs = fit_ns[-fit_last:], fit_vs[-fit_last:]
        slope = fit_loglog_slope(fit_ns, fit_vs)
        label = method if pattern is None else f"{method} [{pattern}]"
        label += ": one point" if math.isnan(slope) else f": slope {slope:.2f}"
        style = dict(_METHOD_STYLE.get(method, {}))
        if method == "optimized" and pattern != "dilated_sparse":
            style.update(alpha=0.35)  # all patterns give the same forward memory; one stands out
        ax.loglog(ns, [v / 2**20 for v in vs], label=label, **style)
    if show_nxn:
        nxn = {}
        for row in rows:
            nxn[row["seq_len"]] = row["nxn_bytes"]
        ns = sorted(nxn)
        ax.loglog(ns, [nxn[n] / 2**20 for n in ns], "k--", lw=1, label="analytic: one B·H·N·N tensor (slope 2)")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("MiB")
    return _finish_axes(ax, title)


def _finish_axes(ax, title: str | None):
    """Grid, legend outside the plot on the right, optional title: the look of every plot here."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_throughput(rows, ax=None, title: str | None = None):
    """Useful TFLOP/s against N, one line per (method, pattern)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 5))
    for (method, pattern), (ns, vs) in series(rows, "useful_tflops").items():
        label = method if pattern is None else f"{method} [{pattern}]"
        ax.semilogx(ns, vs, label=label, **_METHOD_STYLE.get(method, {}))
    ax.set_xlabel("sequence length N")
    ax.set_ylabel("useful TFLOP/s (4 x allowed pairs x D / time)")
    return _finish_axes(ax, title)


# ------------------------------------------------------------------------------------------------
# Layouts, lattices and densities (the patterns notebook): read from reference.semantics only
# ------------------------------------------------------------------------------------------------


def lattice_membership(geometry: AttentionGeometry) -> torch.Tensor:
    """(G, H, N) int: the lattice offset + 1 where position i is on head h's lattice in branch g, else 0.

    A head outside branch g (head_mode "split") has no lattice there: its row stays 0.
    """
    n = geometry.seq_len
    positions = torch.arange(n)
    member = torch.zeros(len(geometry.branches), geometry.num_heads, n, dtype=torch.long)
    for geo in geometry.branches:
        for head in geo.heads:
            on_lattice, _ = geo.compacted_index(positions, head)
            member[geo.branch, head] = on_lattice.long() * (geo.offset_of(head) + 1)
    return member


def head_table(geometry: AttentionGeometry) -> list[dict]:
    """Per (branch, head): segment length, rate, offset and lattice length of the first segment."""
    rows = []
    for geo in geometry.branches:
        for head in geo.heads:
            offset = geo.offset_of(head)
            rows.append({"branch": geo.branch, "head": head, "segment_length": geo.segment_length,
                         "dilation_rate": geo.dilation_rate, "offset": offset,
                         "lattice_length": geo.lattice_length(0, offset)})
    return rows


def allowed_pairs(geometry: AttentionGeometry, config: SparsePatternConfig, head: int, is_causal: bool = False):
    """(N, N) int: how many branches let query i of ``head`` attend to key j (small N only)."""
    from reference import dense_multiplicity

    return dense_multiplicity(geometry, config, is_causal)[0, head]


def density_rows(setting: MemorySetting, patterns, seq_lens, is_causal: bool = False) -> list[dict]:
    """Per (pattern, N): active blocks and pairs, their fraction of dilated-dense and of full N x N, weights MiB."""
    from reference import active_pair_count

    rows = []
    for seq_len in seq_lens:
        geometry = setting.geometry(seq_len)
        dense_config = pattern_config("dense", setting)
        dense_blocks = active_block_count(geometry, dense_config, is_causal)
        for pattern in patterns:
            config = pattern_config(pattern, setting)
            blocks = active_block_count(geometry, config, is_causal)
            pairs = active_pair_count(geometry, config, is_causal)
            rows.append({
                "pattern": pattern, "seq_len": seq_len, "active_blocks": blocks,
                "block_density": blocks / dense_blocks,
                "pairs_over_full_NxN": pairs / (setting.heads * seq_len * seq_len),
                "weights_MiB": sparse_weights_bytes(seq_len, setting, pattern, is_causal) / 2**20,
                "dense_NxN_MiB": dense_weights_bytes(seq_len, setting) / 2**20,
            })
    return rows


def plot_layouts(setting: MemorySetting, patterns, num_blocks: int, is_causal: bool = False):
    """One picture per pattern: the (query block, key block) layout of a lattice with ``num_blocks`` blocks."""
    import matplotlib.pyplot as plt

    from reference import layout_mask

    columns = min(3, len(patterns))
    rows = -(-len(patterns) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for ax, pattern in zip(axes.flat, patterns):
        mask = layout_mask(pattern_config(pattern, setting), num_blocks, is_causal)
        ax.imshow(mask.float().numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{pattern}: {int(mask.sum())}/{num_blocks * num_blocks} blocks", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    for ax in list(axes.flat)[len(patterns):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_lattices(geometry: AttentionGeometry, title: str = ""):
    """Per branch: which positions (columns) are on each head's lattice (rows), colored by offset."""
    import matplotlib.pyplot as plt

    member = lattice_membership(geometry)
    branches = geometry.branches
    fig, axes = plt.subplots(len(branches), 1, figsize=(10, 1.0 + 0.35 * geometry.num_heads * len(branches)),
                             squeeze=False)
    top = int(member.max()) or 1
    for ax, geo in zip(axes[:, 0], branches):
        ax.imshow(member[geo.branch].numpy(), cmap="viridis", vmin=0, vmax=top, aspect="auto",
                  interpolation="nearest")
        for boundary in range(geo.segment_length, geometry.seq_len, geo.segment_length):
            ax.axvline(boundary - 0.5, color="red", lw=1)
        ax.set_ylabel("head")
        ax.set_yticks(range(geometry.num_heads))
        ax.set_title(f"branch {geo.branch}: segment {geo.segment_length}, rate {geo.dilation_rate}, "
                     f"heads {geo.heads.start}..{geo.heads.stop - 1} (color = offset + 1; red = segment edge)",
                     fontsize=9)
    axes[-1, 0].set_xlabel("position")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_head_views(geometry: AttentionGeometry, config: SparsePatternConfig, heads, is_causal: bool = False):
    """Which keys each query sees, for a few heads (color = number of branches allowing the pair)."""
    import matplotlib.pyplot as plt

    counts = [allowed_pairs(geometry, config, head, is_causal) for head in heads]
    top = max(int(c.max()) for c in counts) or 1
    fig, axes = plt.subplots(1, len(heads), figsize=(3.3 * len(heads), 3.4), squeeze=False)
    for ax, head, count in zip(axes[0], heads, counts):
        ax.imshow(count.numpy(), cmap="magma_r", vmin=0, vmax=top, interpolation="nearest")
        ax.set_title(f"head {head}: {int((count > 0).sum())} pairs", fontsize=9)
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    fig.tight_layout()
    return fig


def print_table(rows, columns=None, floats: str = "{:.3g}") -> None:
    """Print dict rows as an aligned text table (the notebooks' tables; no pandas needed)."""
    rows = list(rows)
    if not rows:
        print("(no rows)")
        return
    columns = columns or list(rows[0])
    cells = [[floats.format(r.get(c)) if isinstance(r.get(c), float) else str(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for line in cells:
        print("  ".join(value.rjust(w) for value, w in zip(line, widths)))


def load_bench_gpu_peaks(results_dir: str = RESULTS_DIR, name: str = "bench_gpu.json"):
    """Peak rows of the newest H200 benchmark file that has any (experiments/bench_gpu.py, by its recorded
    start time; in ``results_dir`` or one folder below it) in this module's row format, or None.

    Its rows hold ``peak_extra`` (cuda max_memory_allocated above the bytes allocated before the
    call, outputs included: the same quantity as ``peak_bytes`` here) per method, pattern, N and D.
    Returns (environment-like info, rows with method names prefixed by the head dim).
    """
    candidates = glob.glob(os.path.join(results_dir, name)) + glob.glob(os.path.join(results_dir, "*", name))
    newest = None  # (started, path, document, rows): file times mean nothing in a fresh clone
    for path in candidates:
        try:
            with open(path) as handle:
                document = json.load(handle)
        except (OSError, json.JSONDecodeError):
            continue
        rows = [
            {"method": f"{row['method']} D={row.get('D')}", "pattern": row.get("pattern"), "seq_len": row["N"],
             "peak_bytes": row["peak_extra"], "heads": row.get("H"), "head_dim": row.get("D"),
             "qkv_out_bytes": row.get("qkv_out_bytes")}
            for row in document.get("rows", []) if row.get("peak_extra") is not None
        ]
        started = str(document.get("info", {}).get("started", ""))
        if rows and (newest is None or started > newest[0]):
            newest = (started, path, document, rows)
    if newest is None:
        return None
    _, path, document, rows = newest
    info = {"info": document.get("info", {}), "huge": document.get("huge") or None,
            "file": os.path.relpath(path, os.path.dirname(results_dir))}
    return info, rows
