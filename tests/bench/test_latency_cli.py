"""`highspeed bench latency` end to end on the built-in model (CPU): the record it writes and its byte count."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "highspeed" / "demo" / "model"


def test_bench_latency_record(tmp_path: Path) -> None:
    out = tmp_path / "rec.json"
    subprocess.run(
        [sys.executable, "-m", "highspeed", "bench", "latency", "--model", str(DEMO), "--batch-size", "2",
         "--input-len", "16", "--output-len", "6", "--warmup-tokens", "2", "--output-json", str(out)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    rec = json.loads(out.read_text())
    for key in ("preset", "batch_size", "device", "tok_s", "bytes_per_token", "copy_bandwidth", "bandwidth_fraction",
                "date", "commit", "command"):
        assert key in rec, key
    cfg = json.loads((DEMO / "config.json").read_text())
    moe_layers = cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0)
    # Two tokens each read top_k distinct experts per MoE layer, at most 2 * top_k (and at most all of them).
    k, E = cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    assert moe_layers * k <= rec["distinct_experts_per_step"] <= moe_layers * min(E, 2 * k)
    assert rec["batch_size"] == 2 and rec["tok_s"] > 0
    assert rec["bytes_per_step"] > rec["non_expert_bytes"]
