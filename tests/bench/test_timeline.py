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
    assert rows["c"]["idle_us_per_replay"] == pytest.approx(1.0)          # nothing ran from 14 to 15
    assert rows["a"]["idle_us_per_replay"] == pytest.approx(42.0)         # 16 -> 100 between the replays, / 2
    assert rows["b"]["idle_us_per_replay"] == 0.0
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
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 11.0, "dur": 1.0},
    ]}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    kernels = _kernels_from_trace(str(path))
    assert kernels == [("k1", 5.0, 2.0), ("k2", 6.0, 4.0), ("Memcpy HtoD", 11.0, 1.0)]   # not the host call
    text = layer_listing(kernels, 0, 2)
    assert "k2" in text and "3.00" in text     # k2 ends at 10, 3 us after k1's end


def test_write_timeline_runs_real_steps_and_cleans_up(tmp_path, monkeypatch):
    """``bench latency --timeline-out``'s writer on the CPU, the profiler stubbed: the graph table, the layer
    listing, then real decode steps of the batch (each profiled step is one engine.step), and the engine is left
    with no requests."""
    from highspeed.bench import latency, timeline
    from tests.engine.fake_model import make_engine

    engine = make_engine(tmp_path)
    calls = []

    def fake_activity(fn, repeats):
        for _ in range(repeats):
            fn()
        calls.append(repeats)
        return [("k", 10.0 * i, 4.0) for i in range(2 * repeats)]    # 6 us idle before every op but the first

    monkeypatch.setattr(timeline, "device_activity", fake_activity)
    replayed = []

    class Graph:
        def replay(self):
            replayed.append(1)

    path = tmp_path / "tl.txt"
    latency._write_timeline(engine, Graph(), [[1, 2, 3], [4, 5]], str(path), 0.05, steps=3)
    text = path.read_text()
    assert len(replayed) == 5 and calls == [5, 3]
    assert "per replay" in text and "real decode steps, batch 2" in text and "per step" in text
    assert "with the device idle" in text
    assert text.count("start us") == 2      # the layer listing and the seam between two replays
    assert not engine.has_unfinished_requests()
