"""The chain-cost arithmetic of ``bench latency --timeline-out`` on hand-made kernel records."""
from __future__ import annotations

import json

import pytest

from highspeed.bench.timeline import _kernels_from_trace, chain_costs, format_table, layer_listing


def test_increments_count_only_what_moves_the_end():
    # Two replays of [a, b, c]: b starts under a (PDL) and ends 4 us after it; c runs after a gap.
    one = [("a", 0.0, 10.0), ("b", 2.0, 12.0), ("c", 15.0, 1.0)]
    kernels = one + [(n, s + 100.0, d) for n, s, d in one]
    rows = {r["kernel"]: r for r in chain_costs(kernels, replays=2)}
    assert rows["b"]["inc_us"] == pytest.approx(4.0)
    assert rows["b"]["mean_us"] == pytest.approx(12.0)
    assert rows["b"]["start_after_prev_end_us"] == pytest.approx(-8.0)   # started 8 us before a ended
    assert rows["c"]["inc_us"] == pytest.approx(2.0)                      # 14 -> 16
    # a: nothing before it in replay 1; 110 - 16 = 94 us in replay 2 (the gap between replays).
    assert rows["a"]["inc_us_per_replay"] == pytest.approx(47.0)
    total = sum(r["inc_us_per_replay"] for r in rows.values()) * 2
    assert total == pytest.approx(116.0 - 10.0)      # last end minus the first kernel's end
    assert "per replay" in format_table(list(rows.values()), 0.05)


def test_a_kernel_ending_inside_an_earlier_one_adds_nothing():
    rows = {r["kernel"]: r for r in chain_costs([("long", 0.0, 20.0), ("short", 1.0, 2.0), ("next", 19.0, 3.0)], 1)}
    assert rows["short"]["inc_us"] == 0.0
    assert rows["next"]["inc_us"] == pytest.approx(2.0)


def test_trace_parsing_and_listing(tmp_path):
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 5.0, "dur": 2.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 1.0, "dur": 9.0},
        {"ph": "X", "cat": "kernel", "name": "k2", "ts": 6.0, "dur": 4.0},
    ]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    kernels = _kernels_from_trace(str(path))
    assert kernels == [("k1", 5.0, 2.0), ("k2", 6.0, 4.0)]
    text = layer_listing(kernels, 0, 2)
    assert "k2" in text and "3.00" in text     # k2 ends at 10, 3 us after k1's end
