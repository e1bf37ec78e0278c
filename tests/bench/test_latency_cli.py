"""`highspeed bench latency` end to end on the built-in model (CPU): the record it writes and its byte count."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "highspeed" / "demo" / "model"


def _bench(tmp_path: Path, *args: str) -> dict:
    """Run ``highspeed bench latency`` on the built-in model with these arguments; the record it wrote."""
    out = tmp_path / "rec.json"
    subprocess.run(
        [sys.executable, "-m", "highspeed", "bench", "latency", "--model", str(DEMO), "--warmup-tokens", "2", *args,
         "--output-json", str(out)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return json.loads(out.read_text())


def test_bench_latency_record(tmp_path: Path) -> None:
    rec = _bench(tmp_path, "--batch-size", "2", "--input-len", "16", "--output-len", "6")
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


def test_bench_latency_sampled(tmp_path: Path) -> None:
    """--temperature: the requests sample (seeded), and the record says at what temperature."""
    rec = _bench(tmp_path, "--input-len", "8", "--output-len", "4", "--temperature", "0.8")
    assert rec["temperature"] == 0.8 and rec["tok_s"] > 0


def test_distinct_experts_of_the_replayed_inputs() -> None:
    """``_distinct_experts_replay`` runs the graph's static inputs once, eagerly, under the graph's context, and
    counts what the MoE layers route them to (here a CPU stand-in for the graphs: a cache-less context)."""
    import torch

    from highspeed.bench import latency
    from highspeed.context import AttentionContext
    from highspeed.models.loader import load_model

    model, _ = load_model(str(DEMO), dtype=torch.float32, progress=False)
    cfg = json.loads((DEMO / "config.json").read_text())
    moe_layers = cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0)
    k, E = cfg["num_experts_per_tok"], cfg["n_routed_experts"]

    class Graphs:
        ids = torch.tensor([5, 5, 5, 7])
        pos = torch.zeros(4, dtype=torch.long)

        def size_for(self, b: int) -> int | None:
            return 4 if b <= 4 else None

        def _ctx(self, b: int) -> AttentionContext:   # b one-token sequences, no cache
            return AttentionContext(query_lens=[1] * b, seq_lens=[1] * b,
                                    query_start_loc=torch.arange(b + 1, dtype=torch.int32),
                                    seq_lens_t=torch.ones(b, dtype=torch.int32), max_query_len=1, max_seq_len=1)

    class Engine:
        runner = type("Runner", (), {"graphs": Graphs()})()

    Engine.model = model
    got = latency._distinct_experts_replay(Engine(), 3)
    # The whole graph batch (size 4, not the 3 asked for) runs: tokens 5, 5, 5 route alike, 7 adds its own picks.
    g = Graphs()
    with torch.inference_mode():
        from highspeed.context import use_context

        with use_context(g._ctx(1)):
            one = latency.count_distinct_experts(model, lambda: model(g.ids[:1], g.pos[:1]))
    assert one == moe_layers * k
    assert moe_layers * k < got <= moe_layers * min(E, 2 * k)
    Engine.runner.graphs = None
    assert latency._distinct_experts_replay(Engine(), 3) is None
