"""The distributed ring's per-rank memory (issue 14): nothing proportional to N, at most two key/value buffers."""

from __future__ import annotations

import json

from experiments import ring_gloo


def test_per_rank_peak_is_flat_in_p_and_buffers_only_what_travels(tmp_path):
    out = tmp_path / "ring_gloo.json"
    assert ring_gloo.main(["--world", "1,2,3", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["world"], r["rank"]) for r in rows} == {(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)}
    assert {(r["dilation"], r["is_causal"], r["ring_layout"]) for r in rows} == set(ring_gloo.SETTINGS)
    local = [r for r in rows if r["dilation"] == "local"]
    # Every segment inside a chunk: nothing sent, and the same peak on every rank whatever P (N = P x chunk).
    assert all(r["bytes_sent"] == 0 for r in local)
    assert len({r["peak_bytes"] for r in local}) == 1
    single = local[0]["peak_bytes"]
    for row in rows:
        if row["dilation"] == "global" and not row["is_causal"] and row["world"] > 1:
            kv_chunk = 2 * row["chunk_bytes"]  # one k and one v chunk (same shape as q here)
            assert row["bytes_sent"] > 0
            # What travels costs at most the two receive buffers of double buffering, never a share of N.
            assert single < row["peak_bytes"] <= single + 2 * kv_chunk, row
        if row["is_causal"]:
            # Causal, whatever the layout: a rank's peak never exceeds its own plus the two buffers.
            assert row["peak_bytes"] <= single + 2 * 2 * row["chunk_bytes"], row
