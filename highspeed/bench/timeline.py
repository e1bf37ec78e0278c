"""What each kernel costs inside the replayed decode graph, where PDL overlaps neighbours.

A kernel's own duration means little under programmatic dependent launch: its programs start early, load what
they can and park in ``gdc_wait`` until the previous kernel ends, so eager profiles (PDL off) and kernels timed
alone can rank changes the wrong way (benchmarks/KERNEL_NOTES.md, runs 8-11). What a kernel adds to the step is
how far it moves the chain's end: ``end_i - max(end_j, j < i)`` in launch order. Those increments sum to the
step's device time, so the table says where a step's time goes with the overlap counted as it happens.

``bench latency --timeline-out PATH`` records a few graph replays with the CUDA profiler (CUPTI reports each
kernel of a graph) and writes the table; then the same for a few real decode steps (the graph plus everything
the engine runs around it, copies included), where a positive gap before an operation is device idle time --
the step spent waiting for the host.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch


def _increments(kernels: list[tuple[str, float, float]], last_end: float | None = None
                ) -> Iterator[tuple[str, float, float, float, float]]:
    """(name, start, duration, end increment, idle before it) in start order: how far each operation moves the
    chain's end past every earlier one (``last_end``: the end before the first), and how long nothing ran before
    it started."""
    for name, start, dur in sorted(kernels, key=lambda k: k[1]):
        end = start + dur
        inc = 0.0 if last_end is None else max(0.0, end - last_end)
        idle = 0.0 if last_end is None else max(0.0, start - last_end)
        last_end = end if last_end is None else max(last_end, end)
        yield name, start, dur, inc, idle


def chain_costs(kernels: list[tuple[str, float, float]], replays: int) -> list[dict[str, Any]]:
    """Per kernel name, from (name, start_us, duration_us) records of ``replays`` back-to-back replays: calls per
    replay, mean duration, mean end increment per call and per replay (us), and the mean gap from the previous
    kernel's end to this one's start (negative: it started early, under PDL). Sorted by cost per replay."""
    stats: dict[str, dict[str, float]] = defaultdict(lambda: dict(calls=0, dur=0.0, inc=0.0, lead=0.0, idle=0.0))
    prev_end = None
    for name, start, dur, inc, idle in _increments(kernels):
        s = stats[name]
        s["calls"] += 1
        s["dur"] += dur
        s["inc"] += inc
        s["idle"] += idle
        s["lead"] += 0.0 if prev_end is None else start - prev_end
        prev_end = start + dur
    rows = [dict(kernel=name, calls_per_replay=s["calls"] / replays, mean_us=s["dur"] / s["calls"],
                 inc_us=s["inc"] / s["calls"], inc_us_per_replay=s["inc"] / replays,
                 idle_us_per_replay=s["idle"] / replays, start_after_prev_end_us=s["lead"] / s["calls"])
            for name, s in stats.items()]
    return sorted(rows, key=lambda r: -r["inc_us_per_replay"])


def format_table(rows: list[dict[str, Any]], replay_ms: float | None = None, unit: str = "replay") -> str:
    total = sum(r["inc_us_per_replay"] for r in rows)
    idle = sum(r["idle_us_per_replay"] for r in rows)
    head = (f"per {unit}: {total:.1f} us of end increments, {idle:.1f} us of it with the device idle"
            + (f" (replay timed alone {replay_ms * 1e3:.1f} us)" if replay_ms else ""))
    lines = [head, f"{'kernel':<48} {'calls':>6} {'mean us':>8} {'inc us':>7} {'inc/' + unit:>10} "
                   f"{'start-prev end':>14}"]
    for r in rows:
        lines.append(f"{r['kernel'][:48]:<48} {r['calls_per_replay']:>6.1f} {r['mean_us']:>8.2f} {r['inc_us']:>7.2f} "
                     f"{r['inc_us_per_replay']:>10.1f} {r['start_after_prev_end_us']:>14.2f}")
    return "\n".join(lines)


DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def _kernels_from_trace(path: str) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of every device operation (kernels, copies, memsets) in a chrome trace."""
    with open(path, encoding="utf-8") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [(e["name"], float(e["ts"]), float(e.get("dur", 0.0))) for e in events
            if e.get("cat") in DEVICE_CATEGORIES and e.get("ph") == "X"]


def device_activity(fn: Callable[[], Any], repeats: int) -> list[tuple[str, float, float]]:
    """Run ``fn`` ``repeats`` times under the CUDA profiler; the device operations it caused."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        return _kernels_from_trace(path)


def graph_timeline(graph: Any, replays: int = 5) -> tuple[list[tuple[str, float, float]], list[dict[str, Any]]]:
    """Replay ``graph`` (a torch.cuda.CUDAGraph, already warm) under the profiler; (kernel records, chain costs)."""
    kernels = device_activity(graph.replay, replays)
    return kernels, chain_costs(kernels, replays)


def layer_listing(kernels: list[tuple[str, float, float]], first: int, count: int) -> str:
    """``count`` consecutive kernels from index ``first`` (in start order): start offset, duration, end
    increment -- one decoder layer's chain in detail."""
    ks = sorted(kernels, key=lambda k: k[1])
    out = [f"{'#':>4} {'kernel':<40} {'start us':>9} {'dur us':>7} {'end inc us':>10}"]
    last_end = max((s + d for _, s, d in ks[:first]), default=None)
    t0 = ks[first][1] if first < len(ks) else 0.0
    for i, (name, start, dur, inc, _) in enumerate(_increments(ks[first:first + count], last_end)):
        out.append(f"{first + i:>4} {name[:40]:<40} {start - t0:>9.2f} {dur:>7.2f} {inc:>10.2f}")
    return "\n".join(out)
