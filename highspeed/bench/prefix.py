"""Shared-system-prompt workload: prompt tokens computed and wall time with prefix cache + merging on vs off."""
from __future__ import annotations

import argparse
import random
import time
from typing import Any

from highspeed.bench.records import base_record, device_name, write_record


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint folder (default: the built-in demo model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--system-len", type=int, default=384, help="tokens of the shared system prompt")
    p.add_argument("--user-len", type=int, default=32, help="tokens of each request's own part")
    p.add_argument("--duplicates", type=float, default=0.25, help="share of requests that repeat an earlier one")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", default=None)


def _workload(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    system = [rng.randrange(10, vocab) for _ in range(args.system_len)]
    prompts: list[list[int]] = []
    for _ in range(args.num_requests):
        if prompts and rng.random() < args.duplicates:
            prompts.append(list(rng.choice(prompts)))
        else:
            prompts.append(system + [rng.randrange(10, vocab) for _ in range(args.user_len)])
    return prompts


def _run(args: argparse.Namespace, on: bool) -> dict[str, Any]:
    from highspeed.llm import LLM
    from highspeed.sampling import SamplingParams

    llm = LLM(args.model, device=args.device, enable_prefix_caching=on, enable_request_merging=on,
              load_progress=False, seed=args.seed)
    eng = llm.engine
    prompts = _workload(args, eng.vocab_size)
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    s = eng.stats()
    return {
        "prefix_cache_and_merging": on,
        "wall_s": round(wall, 4),
        "prompt_tokens": sum(len(p) for p in prompts),
        "prompt_tokens_computed": s["prompt_tokens_computed"],
        "cached_tokens_reported": sum(o.usage.cached_tokens for o in outs),
        "prefix_cache_hit_rate": round(s["prefix_cache_hit_rate"], 4),
        "merged_requests": s["merged_requests"],
        "tokens": [o.outputs[0].token_ids for o in outs],
    }


def run(args: argparse.Namespace) -> int:
    off = _run(args, on=False)
    on = _run(args, on=True)
    same = off.pop("tokens") == on.pop("tokens")
    rec = base_record(bench="prefix", device=device_name(), model=args.model or "built-in", num_requests=args.num_requests,
                      system_len=args.system_len, user_len=args.user_len, output_len=args.output_len,
                      off=off, on=on, greedy_outputs_identical=same,
                      compute_saved=round(1 - on["prompt_tokens_computed"] / off["prompt_tokens_computed"], 4),
                      speedup=round(off["wall_s"] / on["wall_s"], 3))
    for row in (off, on):
        print(f"prefix cache + merging {'on ' if row['prefix_cache_and_merging'] else 'off'}: "
              f"{row['prompt_tokens_computed']:>7} of {row['prompt_tokens']} prompt tokens computed, "
              f"wall {row['wall_s']:.3f}s, hit rate {row['prefix_cache_hit_rate']:.2%}, merged {row['merged_requests']}")
    print(f"compute saved {rec['compute_saved']:.1%}, speedup x{rec['speedup']}, identical greedy outputs: {same}")
    write_record(rec, args.output_json)
    return 0 if same else 1
