"""The experiments library's own pieces: slope fit, timing, tables, environment record, settings."""

from __future__ import annotations

import math
import random

import pytest
import torch

from experiments import analysis, analytic, env, tables, timing
from experiments.settings import MemorySetting, pattern_config


@pytest.mark.parametrize("exponent", [1.0, 2.0, random.Random(12).uniform(0.3, 2.7)])
def test_loglog_slope_recovers_a_power_law(exponent):
    rng = random.Random(int(exponent * 1000))
    scale = rng.uniform(0.5, 50.0)
    ns = sorted(rng.sample(range(256, 1 << 20), 5))
    assert analysis.fit_loglog_slope(ns, [scale * n**exponent for n in ns]) == pytest.approx(exponent, rel=1e-9)


def test_loglog_slope_leaves_out_missing_values_and_needs_two_points():
    ns = [1024, 2048, 4096, 8192]
    values = [None, 3.0 * 2048**2, 0, 3.0 * 8192**2]  # a skipped run (None) and an empty one (0) drop out
    assert analysis.fit_loglog_slope(ns, values) == pytest.approx(2.0)
    assert math.isnan(analysis.fit_loglog_slope([1024, 2048], [5.0, None]))
    assert math.isnan(analysis.fit_loglog_slope([1024, 1024], [5.0, 7.0]))  # one N: no slope


def test_slopes_fit_the_largest_n_of_each_line():
    rows = [
        {"method": "m", "pattern": None, "seq_len": n, "peak_bytes": v}
        for n, v in [(512, 1e9), (1024, 1024.0), (2048, 2048.0), (4096, 4096.0)]
    ]  # a flat start, then linear
    fitted = analysis.slopes(rows, last=3)
    assert [(f["from_N"], f["to_N"], f["points"]) for f in fitted] == [(1024, 4096, 3)]
    assert fitted[0]["slope"] == pytest.approx(1.0)


def test_time_call_counts_its_runs_and_keeps_the_thread_count():
    calls = []
    threads = torch.get_num_threads()
    result = timing.time_call(lambda: calls.append(torch.randn(64, 64) @ torch.randn(64, 64)), min_run_time=0.01)
    assert 0 < result["min_s"] <= result["median_s"]
    assert result["runs"] >= result["calls_per_block"] >= 1
    assert len(calls) > result["runs"]  # Timer's warm-up calls come on top of the timed ones
    assert torch.get_num_threads() == threads


def test_table_formats_floats_and_keeps_column_order():
    rows = [{"b": 1.23456, "a": None, "c": "x"}, {"b": 2.0, "a": 7, "c": "yy"}]
    text = tables.format_table(rows, columns=["c", "b", "a"], floats=".2f")
    header, rule, *body = text.splitlines()
    assert header.split() == ["c", "b", "a"]
    assert body[0].split() == ["x", "1.23", "None"]
    assert body[1].split() == ["yy", "2.00", "7"]
    assert tables.format_table([]) == "(no rows)"


def test_environment_record_names_the_device_and_versions():
    record = env.environment("cpu")
    assert record["device_type"] == "cpu"
    assert record["torch"] == torch.__version__
    assert record["torch_threads"] == torch.get_num_threads()
    assert record["python"].count(".") == 2
    assert torch.__version__ in env.describe(record)


def test_analytic_weights_bytes_match_the_stored_weights():
    # The analytic size is what SparseAttentionWeights.nbytes counts, on a small random case.
    from optimized import BlockSparseRingDilatedAttention

    setting = MemorySetting(heads=4, head_dim=8, segment_lengths=(32, 64), dilation_rates=(1, 2), block_size=8)
    generator = torch.Generator().manual_seed(random.getrandbits(31))
    q, k, v = (torch.randn(1, 128, 4, 8, generator=generator) for _ in range(3))
    for pattern in ("local_window", "dilated_sparse"):
        module = BlockSparseRingDilatedAttention(
            setting.segment_lengths, setting.dilation_rates, pattern_config(pattern, setting), backend="torch"
        )
        _, weights = module(q, k, v, return_attention_weights=True)
        assert weights.nbytes == analytic.sparse_weights_bytes(128, setting, pattern)
