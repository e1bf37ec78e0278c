"""Plot tokens/s against batch size from latency records:
python benchmarks/plot_latency.py OUT.png [GLOB ...]   (default GLOB: benchmarks/results/latency-*.json)
Where several default records have the same preset and batch size, the latest (by its ``date``) is plotted."""
from __future__ import annotations

import glob
import json
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, *patterns: str) -> None:
    latest: dict[tuple[str, int], dict] = {}
    paths = sorted({p for pattern in (patterns or ("benchmarks/results/latency-*.json",)) for p in glob.glob(pattern)})
    for path in paths:
        with open(path, encoding="utf-8") as f:
            r = json.load(f)
        if r.get("path") != "cuda-graphs+triton" or "HIGHSPEED_" in r.get("command", "") or r.get("temperature"):
            continue   # greedy, default configuration only (A/B records carry their switch in the command)
        key = (r["preset"], r["batch_size"])
        if key not in latest or r.get("date", "") > latest[key].get("date", ""):
            latest[key] = r
    series: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for (preset, batch), r in latest.items():
        series[preset].append((batch, r["tok_s"], r["tok_s_per_user"]))
    series = {k: v for k, v in series.items() if len(v) > 1}   # a curve needs several batch sizes
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in sorted(series.items()):
        pts.sort()
        a.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        b.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    for ax, title in ((a, "total tokens/s"), (b, "tokens/s per user")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    a.legend()
    fig.suptitle("highspeed decode, bf16, random weights at published shapes (128 prompt tokens)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/latency.png", *sys.argv[2:])
