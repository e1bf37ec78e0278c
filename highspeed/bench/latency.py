"""Decode latency at a published model shape: tokens/s per user, bytes per token, share of copy bandwidth.

Batch-1 decode is bound by memory bandwidth, so the figure that matters is how close a step comes to reading
its bytes at the card's copy bandwidth, measured in the same run. Bytes per step = every non-expert weight
(read once per step) + the distinct routed experts the step's tokens chose (counted on a probe step) + the KV
cache each sequence attends over.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from typing import Any

import torch

from highspeed.bench.records import base_record, device_name, write_record

PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")


def presets() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=presets(), help="a published model shape (random weights)")
    p.add_argument("--model", default=None, help="a checkpoint folder instead of a preset")
    p.add_argument("--random-weights", action="store_true", help="random weights at the shape (presets always are)")
    p.add_argument("--num-layers", type=int, default=None, help="override the layer count (e.g. glm-5 on one GPU)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--baseline", choices=["none", "eager"], default="none",
                   help="eager: the plain-torch path (no Triton, no CUDA graphs) for the speedup")
    p.add_argument("--warmup-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (seeded) instead of greedy: times the sampling kernels too")
    p.add_argument("--output-json", default=None, help="write the record here (default: benchmarks/results/...)")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--profile-out", default=None, help="write a per-kernel device-time table of decode steps here")
    p.add_argument("--timeline-out", default=None,
                   help="write what each kernel adds to the replayed decode graph (PDL overlap included) here")


def preset_config(name: str, num_layers: int | None) -> dict[str, Any]:
    with open(os.path.join(PRESET_DIR, f"{name}.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.pop("_note", None)
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
        for key in ("mlp_layer_types", "layer_types", "indexer_types"):
            if key in cfg:
                cfg[key] = cfg[key][:num_layers]
    return cfg


def copy_bandwidth(device: torch.device, nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        nbytes = 256 * 2**20
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for i in range(15):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            torch.cuda.synchronize()
            t = a.elapsed_time(b) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            t = time.perf_counter() - t0
        if i >= 3:
            times.append(t)
    return 2 * nbytes / statistics.median(times)


def weight_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(non-expert bytes read per step, bytes of one routed expert, embedding bytes not read)."""
    expert_bytes, other, embed = 0, 0, 0
    n_experts = 0
    for name, p in model.named_parameters():
        b = p.numel() * p.element_size()
        if name.endswith(("experts.w13", "experts.w2", "experts.gate_up_proj", "experts.down_proj")) and p.dim() == 3:
            expert_bytes += b
            n_experts += p.shape[0]
        elif "embed_tokens" in name:
            embed += b
        else:
            other += b
    per_expert = expert_bytes // max(1, n_experts // 2) if n_experts else 0   # w13 and w2 each count E
    return other, per_expert, embed


def count_distinct_experts(model: torch.nn.Module, run_probe: Any) -> int:
    """Run one probe step with the MoE op wrapped to record the distinct routed experts each layer reads (the
    routing is recomputed from the same router inputs, so the count does not depend on how the op is fused)."""
    import highspeed.ops.moe as moe_ops
    from highspeed.ops.norm import DeferredNorm, materialize

    seen: list[int] = []
    original = moe_ops.fused_moe

    def recording(x: torch.Tensor | DeferredNorm, gate_weight: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  top_k: int, *args: Any, **kwargs: Any) -> Any:
        scoring, renormalize, bias, n_group, topk_group, scaling = args[:6]
        # A DeferredNorm (the layer's post-attention norm) runs here, unfused (a probe step); the op then reuses it.
        xn = materialize(x)
        logits = torch.nn.functional.linear(xn.float(), gate_weight.float())
        _, ids = moe_ops.select_experts(logits, top_k, scoring, renormalize, bias, n_group, topk_group, scaling)
        seen.append(int(torch.unique(ids).numel()))
        return original(x, gate_weight, w13, w2, top_k, *args, **kwargs)

    patched = []
    for mod in list(__import__("sys").modules.values()):
        if getattr(mod, "__name__", "").startswith("highspeed.models") and getattr(mod, "fused_moe", None) is original:
            mod.fused_moe = recording
            patched.append(mod)
    moe_ops.fused_moe = recording
    try:
        run_probe()
    finally:
        moe_ops.fused_moe = original
        for mod in patched:
            mod.fused_moe = original
    return sum(seen)


def build_engine(args: argparse.Namespace, hf: dict[str, Any], dtype: torch.dtype, device: torch.device,
                 eager: bool) -> Any:
    from highspeed.config import EngineConfig, HFConfig
    from highspeed.engine.engine import LLMEngine
    from highspeed.models.loader import build_model, load_model

    tmp = tempfile.mkdtemp(prefix="highspeed-bench-")
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f)
    if args.model and not args.random_weights:
        model, _ = load_model(args.model, dtype=dtype, device=device)
    else:
        model = build_model(HFConfig(hf), dtype=dtype, device=device, random_init=True)
    bs = 16
    ctx_len = args.input_len + args.output_len + args.warmup_tokens + bs
    cfg = EngineConfig(model=tmp, dtype=str(dtype).replace("torch.", ""), device=str(device), block_size=bs,
                       max_model_len=ctx_len, num_kv_blocks=args.batch_size * (-(-ctx_len // bs)) + 2,
                       max_num_seqs=max(args.batch_size, 1), max_num_batched_tokens=max(2048, args.input_len),
                       enforce_eager=eager, use_triton=not eager, enable_prefix_caching=False,
                       enable_request_merging=False, load_progress=False)
    return LLMEngine(cfg, model=model, tokenizer=False)


def run(args: argparse.Namespace) -> int:
    from highspeed.engine.engine import resolve_device, resolve_dtype
    from highspeed.config import HFConfig

    if not args.preset and not args.model:
        raise SystemExit("give --preset NAME or --model PATH")
    if args.preset:
        hf = preset_config(args.preset, args.num_layers)
    else:
        with open(os.path.join(args.model, "config.json"), encoding="utf-8") as f:
            hf = json.load(f)
        if args.num_layers:
            hf["num_hidden_layers"] = args.num_layers
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, HFConfig(hf), device)
    eager = args.baseline == "eager"
    bw = copy_bandwidth(device)
    t0 = time.perf_counter()
    engine = build_engine(args, hf, dtype, device, eager)
    build_s = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = int(hf["vocab_size"])

    def prompts(n: int, length: int) -> list[list[int]]:
        return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]

    def generate(batch: list[list[int]], out_len: int) -> tuple[float, list[float], int]:
        _add_requests(engine, batch, f"b{time.monotonic_ns()}", out_len, args.temperature)
        # Step time = the interval between consecutive step() returns, as a serving loop sees it. No device
        # synchronize per step: the engine enqueues step N+1 before reading step N's tokens, and a synchronize here
        # would serialise the host's preparation with the device's work (records up to run 5 did that, so their
        # step time is graph replay + host time). step() itself blocks on the tokens it returns.
        step_times, first = [], None
        start = last = time.perf_counter()
        while engine.has_unfinished_requests():
            outs = engine.step()
            now = time.perf_counter()
            if first is None:
                if outs and all(o.outputs[0].token_ids for o in outs):
                    first = now - start
            else:
                step_times.append(now - last)
            last = now
        if device.type == "cuda":
            torch.cuda.synchronize()
        return first or 0.0, step_times, sum(1 for _ in batch)

    # Warm up: compile kernels, touch every code path once.
    generate(prompts(args.batch_size, args.input_len), args.warmup_tokens)
    # Distinct experts read by one decode step of this batch (eager probe step).
    distinct = 0
    if any(n.endswith(("w13", "gate_up_proj")) for n, _ in engine.model.named_parameters()):
        probe = prompts(args.batch_size, args.input_len)
        distinct = _distinct_experts_decode(engine, probe)
    ttft, steps, _ = generate(prompts(args.batch_size, args.input_len), args.output_len)
    device_ms = _graph_replay_ms(engine, args.batch_size)
    # The replayed step's own expert count: its inputs are not the probe's (run 21: Qwen3-30B-A3B batch 32 replayed
    # its expert kernels faster than 4.8 TB/s would allow at the probe's count).
    replay_distinct = _distinct_experts_replay(engine, args.batch_size) if distinct and device_ms else None
    if args.timeline_out and device_ms:
        graphs = engine.runner.graphs
        _write_timeline(engine, graphs.graphs[graphs.size_for(args.batch_size)],
                        prompts(args.batch_size, args.input_len), args.timeline_out, device_ms)
    if args.profile_out and device.type == "cuda":
        _profile_decode(engine, prompts(args.batch_size, args.input_len), args.profile_out)
    step_s = statistics.median(steps)
    decode_s = sum(steps)
    tok_s_user = len(steps) / decode_s if decode_s else 0.0
    other, per_expert, _ = weight_bytes(engine.model)
    from highspeed.engine.kv_cache import cache_bytes_per_token

    kv_tok = cache_bytes_per_token(engine.model, dtype)
    avg_ctx = args.input_len + args.output_len / 2
    bytes_step = other + distinct * per_expert + args.batch_size * kv_tok * avg_ctx
    bytes_replay = bytes_step + ((replay_distinct - distinct) * per_expert if replay_distinct is not None else 0)
    achieved = bytes_step / step_s
    host = (engine.runner.host_time_s + engine.host_time_s) / max(1, engine.num_steps)
    rec = base_record(
        bench="latency", preset=args.preset or os.path.basename(os.path.normpath(args.model)),
        num_layers=int(hf["num_hidden_layers"]), batch_size=args.batch_size, input_len=args.input_len,
        output_len=args.output_len, temperature=args.temperature, dtype=str(dtype).replace("torch.", ""),
        device=device_name(device),
        path="eager-torch" if eager else ("cuda-graphs+triton" if engine.cuda_graphs else
                                          "triton-eager" if device.type == "cuda" else "torch-cpu"),
        tok_s=round(tok_s_user * args.batch_size, 2), tok_s_per_user=round(tok_s_user, 2),
        ms_per_token=round(step_s * 1e3, 4), step_timing="interval between engine.step() returns, no per-step sync",
        ttft_s=round(ttft, 4), bytes_per_token=int(bytes_step / args.batch_size),
        bytes_per_step=int(bytes_step), distinct_experts_per_step=distinct, expert_bytes=per_expert,
        non_expert_bytes=other, kv_bytes_per_token=kv_tok, achieved_gb_s=round(achieved / 1e9, 2),
        copy_bandwidth=round(bw / 1e9, 2), bandwidth_fraction=round(achieved / bw, 4),
        host_ms_per_step=round(host * 1e3, 4) if host is not None else None, build_s=round(build_s, 1),
        cuda_graphs=engine.cuda_graphs, device_ms_per_step=device_ms, replay_distinct_experts_per_step=replay_distinct,
        # The replay's share counts the replayed step's own experts (the probe's before this field existed).
        device_bandwidth_fraction=round(bytes_replay / (device_ms / 1e3) / bw, 4) if device_ms else None,
    )
    temp = f" T={args.temperature:g}" if args.temperature else ""
    print(f"{rec['preset']} b={args.batch_size}{temp} [{rec['path']}]: {rec['tok_s_per_user']:.1f} tok/s/user, "
          f"{rec['tok_s']:.1f} tok/s total, {rec['ms_per_token']:.3f} ms/step, {bytes_step / 1e9:.3f} GB/step, "
          f"{rec['achieved_gb_s']:.0f} GB/s = {rec['bandwidth_fraction']:.1%} of copy bw {rec['copy_bandwidth']:.0f} GB/s, "
          f"ttft {ttft * 1e3:.1f} ms; host {rec['host_ms_per_step']} ms/step"
          + (f", graph replay alone {device_ms:.3f} ms = {rec['device_bandwidth_fraction']:.1%}" if device_ms else "")
          + (f" (replayed step: {replay_distinct} experts, probe step {distinct})"
             if replay_distinct is not None and replay_distinct != distinct else ""))
    if not args.no_record:
        path = args.output_json or os.path.join(
            "benchmarks", "results", f"latency-{rec['preset']}-b{args.batch_size}-{rec['path']}.json")
        write_record(rec, path)
    return 0


def _add_requests(engine: Any, batch: list[list[int]], prefix: str, max_tokens: int,
                temperature: float = 0.0) -> list[str]:
    """Add the prompts as requests that ignore EOS, greedy (or sampled at ``temperature``, seeded); their ids."""
    from highspeed.sampling import SamplingParams

    ids = [f"{prefix}-{i}" for i in range(len(batch))]
    for i, (rid, p) in enumerate(zip(ids, batch)):
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i, ignore_eos=True)
        engine.add_request(rid, p, params)
    return ids


def _finish_prefill(engine: Any) -> None:
    """Step the engine until no request waits or is still in its (chunked) prefill: the next step decodes."""
    sched = engine.scheduler
    while sched.waiting or any(s.in_prefill for s in sched.running):
        engine.step()


def _distinct_experts_decode(engine: Any, probe: list[list[int]]) -> int:
    """Prefill the probe prompts, then count distinct experts over one eager decode step of the whole batch."""
    ids = _add_requests(engine, probe, "probe", 8)   # 8 tokens: alive through a chunked prefill
    graphs, engine.runner.graphs = engine.runner.graphs, None
    overlap, engine.overlap = engine.overlap, False
    try:
        _finish_prefill(engine)
        assert len(engine.scheduler.running) == len(probe), "the probe batch did not fit in one decode step"
        count = count_distinct_experts(engine.model, engine.step)
    finally:
        for rid in ids:
            engine.abort_request(rid)
        engine.runner.graphs = graphs
        engine.overlap = overlap
    return count


def _distinct_experts_replay(engine: Any, batch: int) -> int | None:
    """Distinct experts of the step ``_graph_replay_ms`` replays: the graph's static inputs (its random token ids,
    the last step's positions, context and cache) run once eagerly, the MoE op wrapped (``count_distinct_experts``).
    That forward writes the same cache rows as a replay does."""
    from highspeed.context import use_context

    graphs = engine.runner.graphs
    if graphs is None or graphs.size_for(batch) is None:
        return None
    b = graphs.size_for(batch)
    model = engine.model
    with torch.inference_mode(), use_context(graphs._ctx(b)):
        return count_distinct_experts(model, lambda: model(graphs.ids[:b], graphs.pos[:b]))


def _graph_replay_ms(engine: Any, batch: int) -> float | None:
    """Device time of one decode step: the captured graph replayed back to back (no host work in between)."""
    graphs = engine.runner.graphs
    if graphs is None or graphs.size_for(batch) is None:
        return None
    g = graphs.graphs[graphs.size_for(batch)]
    # Random token ids in the static input: the graph replays the last step's inputs, and after a long greedy run
    # on random weights the sequences' last tokens can coincide and route to far fewer experts than a real batch
    # (a suspected cause of Qwen3-30B-A3B batch 32 replaying in 14.2 ms while its steps took 17.3 ms, run 7).
    graphs.ids.random_(0, engine.vocab_size)
    # Every row as padding: the back-to-back replays here and in the timeline then write no cache row and leave
    # the positions where they are (a graph that ends in greedy_advance moves live rows one token on per replay,
    # past the context the graph and the cache were sized for). The replays still read the whole context; from the
    # second on, the ids are the previous replay's argmax.
    graphs.freeze()
    for _ in range(3):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / 20, 4)


def _write_timeline(engine: Any, graph: Any, batch: list[list[int]], path: str, replay_ms: float,
                    steps: int = 5) -> None:
    """The chain-cost table of the decode graph for this batch (``highspeed.bench.timeline``), one layer's
    kernels listed in launch order from the middle of a replay, and the same table for real decode steps of the
    batch (the graph and everything the engine runs around it; device idle time shows the host's share)."""
    from highspeed.bench import timeline

    replays = 5
    kernels, rows = timeline.graph_timeline(graph, replays)
    per_replay = len(kernels) // replays
    with open(path, "w", encoding="utf-8") as f:
        if not kernels:
            f.write("the profiler recorded no kernels of the graph replays\n")
            return
        f.write(timeline.format_table(rows, replay_ms) + "\n\n")
        f.write(timeline.layer_listing(kernels, 2 * per_replay + per_replay // 2, 40) + "\n\n")
        # And the seam between two replays: the step's head and tail kernels (embedding, lm_head, greedy tail) in
        # launch order, which the table above sorts away.
        f.write(timeline.layer_listing(kernels, max(0, 3 * per_replay - 8), 16) + "\n\n")
        _add_requests(engine, batch, "timeline", steps + 8)
        _finish_prefill(engine)
        engine.step()   # one decode step in flight, as in the serving loop
        f.write(f"real decode steps, batch {len(batch)}:\n")
        real = timeline.device_activity(engine.step, steps)
        f.write(timeline.format_table(timeline.chain_costs(real, steps), unit="step") + "\n")
        while engine.has_unfinished_requests():
            engine.step()


def _profile_decode(engine: Any, batch: list[list[int]], path: str, steps: int = 8) -> None:
    """Kernel-by-kernel device time of eager decode steps (the same kernels a graph replays), for finding where a
    step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    _add_requests(engine, batch, "prof", steps + 4)
    graphs, engine.runner.graphs = engine.runner.graphs, None
    try:
        _finish_prefill(engine)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{steps} eager decode steps, batch {len(batch)}\n{table}\n")
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        engine.runner.graphs = graphs
