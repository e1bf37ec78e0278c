"""bench serve: drive a running OpenAI-compatible server and measure TTFT, TPOT, inter-token latency, throughput.

Works against highspeed or any OpenAI-compatible server (vLLM, SGLang, ...). Requests stream; arrivals follow
a Poisson process at ``--request-rate`` (inf = all at once) and ``--max-concurrency`` caps requests in flight.
Prompts come from a ShareGPT-format JSON file or are synthesized. Writes a JSON record and a PNG plot.

    highspeed bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 8
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

# Common short English words: nearly all are one token (with their leading space) in BPE vocabularies, so a
# synthetic prompt of N words is about N tokens on any server, without needing its tokenizer.
_WORDS = ("the of and to in is was for on that with as by at from his her it an are were which be this has "
          "had not but or have they one you their all also been new can more its after who first two would she "
          "time there other into when some only most over many years about up out no than then these them may "
          "made city world used such school part state called between people where well year same while under "
          "during each team high war later film found both three because through being before last did will "
          "what just any now long like over old small off good how make way down see game work life name day").split()


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int        # estimated tokens (exact ones come back in usage)
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    start: float = 0.0      # seconds since the benchmark started
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- workloads


def _estimate_tokens(text: str, tokenizer: Any) -> int:
    if tokenizer is not None:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return max(1, len(text) // 4)   # ~4 characters per token in English BPE vocabularies


def sharegpt_requests(path: str, num: int, rng: random.Random, tokenizer: Any,
                      output_len: int | None) -> list[BenchRequest]:
    """First human turn as the prompt, the reply's length as the output length (as vLLM's benchmark does)."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    convs = [d["conversations"] for d in data if len(d.get("conversations", [])) >= 2]
    rng.shuffle(convs)
    out: list[BenchRequest] = []
    for conv in convs:
        prompt, reply = conv[0].get("value", ""), conv[1].get("value", "")
        if not prompt:
            continue
        plen = _estimate_tokens(prompt, tokenizer)
        olen = output_len or _estimate_tokens(reply, tokenizer)
        if plen < 4 or olen < 4 or plen > 1024 or plen + olen > 2048:   # vLLM's filter for ShareGPT
            continue
        out.append(BenchRequest(prompt, plen, olen))
        if len(out) == num:
            break
    if not out:
        raise ValueError(f"{path}: no usable ShareGPT conversations")
    return out


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float,
                    rng: random.Random) -> list[BenchRequest]:
    def length(mean: int) -> int:
        lo = max(1, int(mean * (1 - range_ratio)))
        hi = max(lo, int(mean * (1 + range_ratio)))
        return rng.randint(lo, hi)

    out = []
    for i in range(num):
        n_in = length(input_len)
        # A distinct first word per request keeps the prefix cache from turning the benchmark into a cache test.
        words = [f"r{i}"] + [rng.choice(_WORDS) for _ in range(n_in - 1)]
        out.append(BenchRequest(" ".join(words), n_in, length(output_len)))
    return out


# ---------------------------------------------------------------- one streaming request


def _payload(args: argparse.Namespace, model: str, req: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.output_len, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": args.temperature}
    if args.ignore_eos:
        body["ignore_eos"] = True   # vLLM/SGLang/highspeed extra: makes output lengths what was asked
    if args.endpoint.endswith("chat/completions"):
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or []:
        if "text" in choice:
            text += choice.get("text") or ""
        else:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


async def send_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], t0: float) -> RequestResult:
    res = RequestResult(start=time.perf_counter() - t0)
    start = time.perf_counter()
    last = start
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"].get("message", chunk["error"]))
                    return res
                now = time.perf_counter()
                if _chunk_text(chunk):
                    if chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
                usage = chunk.get("usage")
                if usage:
                    res.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    res.output_tokens = int(usage.get("completion_tokens", 0))
        res.latency = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks   # servers without include_usage: one token a chunk
        res.ok = chunks > 0
        if not res.ok:
            res.error = "the stream carried no tokens"
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


# ---------------------------------------------------------------- the run


async def _arrivals(n: int, rate: float, rng: random.Random):
    for i in range(n):
        yield i
        if rate != math.inf and i + 1 < n:
            await asyncio.sleep(rng.expovariate(rate))


async def benchmark(args: argparse.Namespace, requests: list[BenchRequest], model: str) -> tuple[list[RequestResult], float]:
    url = args.base_url.rstrip("/") + args.endpoint
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    rng = random.Random(args.seed + 1)
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        warm = await send_request(client, url, _payload(args, model, BenchRequest(requests[0].prompt, 0, 4)),
                                  time.perf_counter())
        if not warm.ok:
            raise RuntimeError(f"the warm-up request to {url} failed: {warm.error}")
        t0 = time.perf_counter()

        async def one(req: BenchRequest) -> RequestResult:
            if sem is None:
                return await send_request(client, url, _payload(args, model, req), t0)
            async with sem:
                return await send_request(client, url, _payload(args, model, req), t0)

        tasks = []
        async for i in _arrivals(len(requests), args.request_rate, rng):
            tasks.append(asyncio.create_task(one(requests[i])))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.latency for r in ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration > 0 else 0.0,
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2e)):
        summary[f"mean_{name}_ms"] = 1000 * sum(values) / len(values) if values else float("nan")
        for q in (50, 90, 99):
            summary[f"p{q}_{name}_ms"] = 1000 * _pct(values, q)
    errors = [r.error for r in results if not r.ok]
    summary["errors"] = sorted(set(errors))[:10]
    return summary


def print_summary(s: dict[str, Any]) -> None:
    print("=" * 16 + " serving benchmark " + "=" * 16)
    print(f"{'successful requests':<36}{s['completed']:>14}")
    print(f"{'failed requests':<36}{s['failed']:>14}")
    print(f"{'duration (s)':<36}{s['duration_s']:>14.2f}")
    print(f"{'input / output tokens':<36}{s['total_input_tokens']:>7} / {s['total_output_tokens']}")
    print(f"{'request throughput (req/s)':<36}{s['request_throughput']:>14.2f}")
    print(f"{'output token throughput (tok/s)':<36}{s['output_throughput']:>14.2f}")
    print(f"{'total token throughput (tok/s)':<36}{s['total_token_throughput']:>14.2f}")
    for name, title in (("ttft", "time to first token"), ("tpot", "time per output token"),
                        ("itl", "inter-token latency"), ("e2el", "end-to-end latency")):
        print(f"-- {title} (ms): mean {s[f'mean_{name}_ms']:.2f}  p50 {s[f'p50_{name}_ms']:.2f}  "
              f"p90 {s[f'p90_{name}_ms']:.2f}  p99 {s[f'p99_{name}_ms']:.2f}")
    for e in s["errors"]:
        print(f"error: {e}")


def plot(results: list[RequestResult], summary: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    ax = axes[0][0]
    ax.hist([1000 * r.ttft for r in ok], bins=30, color="tab:blue")
    ax.set(title="time to first token", xlabel="ms", ylabel="requests")
    ax = axes[0][1]
    tpot = [1000 * (r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    ax.hist(tpot, bins=30, color="tab:orange")
    ax.set(title="time per output token", xlabel="ms", ylabel="requests")
    ax = axes[1][0]
    itl = sorted(1000 * x for r in ok for x in r.itl)
    if itl:
        ax.plot(itl, [(i + 1) / len(itl) for i in range(len(itl))], color="tab:green")
    ax.set(title="inter-token latency (CDF)", xlabel="ms", ylabel="fraction", xscale="log" if itl else "linear")
    ax = axes[1][1]
    ax.scatter([r.start for r in ok], [r.latency for r in ok], s=8, label="end-to-end")
    ax.scatter([r.start for r in ok], [r.ttft for r in ok], s=8, label="TTFT")
    ax.set(title="latency by arrival", xlabel="arrival (s)", ylabel="s")
    ax.legend()
    fig.suptitle(f"{title}\n{summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.1f} output tok/s, "
                 f"p50 TTFT {summary['p50_ttft_ms']:.1f} ms, p50 TPOT {summary['p50_tpot_ms']:.1f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _served_model(args: argparse.Namespace) -> str:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    r = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


# ---------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--dataset", default=None, help="ShareGPT-format JSON; synthetic random prompts when absent")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer to measure ShareGPT lengths (default: chars/4)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help="lengths uniform in mean*(1 +- ratio)")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="override the replies' lengths")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so outputs run to max_tokens")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="free text stored in the record (e.g. the card)")
    p.add_argument("--result-dir", default="benchmarks/results")
    p.add_argument("--result-name", default=None, help="file stem (default: serve-<date>-<time>)")
    p.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.dataset:
        requests = sharegpt_requests(args.dataset, args.num_prompts, rng, tokenizer, args.sharegpt_output_len)
    else:
        requests = random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                                   args.random_range_ratio, rng)
    model = args.model or _served_model(args)
    results, duration = asyncio.run(benchmark(args, requests, model))
    summary = summarize(results, duration)
    print_summary(summary)

    now = dt.datetime.now(dt.timezone.utc)
    stem = args.result_name or f"serve-{now.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(args.result_dir, exist_ok=True)
    record = {
        "benchmark": "serve", "date": now.isoformat(), "commit": _commit(), "label": args.label,
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "client_host": platform.node(), "base_url": args.base_url, "endpoint": args.endpoint, "model": model,
        "config": {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                   for k, v in vars(args).items() if k not in ("api_key", "func")},
        "results": {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in summary.items()},
        "requests": [asdict(r) for r in results],
    }
    json_path = os.path.join(args.result_dir, stem + ".json")
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, default=str)
    print(f"record: {json_path}")
    if not args.no_plot:
        png = os.path.join(args.result_dir, stem + ".png")
        plot(results, summary, png, f"highspeed bench serve: {model} {args.label}".strip())
        print(f"plot: {png}")
    return 0 if summary["completed"] else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="highspeed bench serve", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
