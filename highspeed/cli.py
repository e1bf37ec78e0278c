"""The ``highspeed`` command: generate | serve | bench."""
from __future__ import annotations

import argparse
import sys
from typing import Any, Callable


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HuggingFace checkpoint folder (default: the built-in demo model)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size (default: from free memory)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-request-merging", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    p.add_argument("--no-triton", action="store_true", help="plain torch ops even on CUDA")
    p.add_argument("--seed", type=int, default=0)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        model=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        num_kv_blocks=args.num_kv_blocks, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=not args.no_prefix_caching,
        enable_request_merging=not args.no_request_merging, enforce_eager=args.enforce_eager,
        use_triton=not args.no_triton, seed=args.seed,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from highspeed.llm import LLM
    from highspeed.sampling import SamplingParams

    opts = engine_options(args)
    llm = LLM(**opts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sample_seed)
    prompt: Any = args.prompt
    if args.chat:
        from highspeed.tokenizer import apply_chat_template

        prompt = apply_chat_template(llm.tokenizer, [{"role": "user", "content": args.prompt}])
    final = None
    for out in llm.generate_stream(prompt, params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
        final = out
    sys.stdout.write("\n")
    if final is not None and args.verbose:
        m, u = final.metrics, final.usage
        tpot = m.time_per_output_token(u.completion_tokens)
        print(f"[{u.prompt_tokens} prompt + {u.completion_tokens} output tokens, finish={final.outputs[0].finish_reason}, "
              f"ttft={m.time_to_first_token:.3f}s" + (f", {1 / tpot:.1f} tok/s" if tpot else "") + "]", file=sys.stderr)
    return 0


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(module), func)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="highspeed", description="Fast inference for Mixture-of-Experts LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="complete one prompt, streaming to stdout")
    add_engine_args(g)
    g.add_argument("prompt", nargs="?", default="Once upon a time")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--sample-seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("-v", "--verbose", action="store_true", help="print token counts and speed to stderr")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_engine_args(s)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None)
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--max-waiting-requests", type=int, default=4096)
    s.add_argument("--max-body-bytes", type=int, default=8 * 2**20)
    s.set_defaults(func=_lazy("highspeed.server.app", "serve"))

    b = sub.add_parser("bench", help="benchmarks: latency | serve | prefix")
    bsub = b.add_subparsers(dest="bench", required=True)
    for name, module in (("latency", "highspeed.bench.latency"), ("serve", "highspeed.bench.serve"),
                         ("prefix", "highspeed.bench.prefix")):
        try:
            import importlib

            mod = importlib.import_module(module)
        except ImportError:
            continue
        p = bsub.add_parser(name, help=(mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else None)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def _cpu_threads(args: argparse.Namespace) -> None:
    """Small models on the CPU run many tiny ops: extra OpenMP threads cost more in synchronisation than they
    save (25x slower decode of the demo model with 2 threads on a busy 2-core machine). Large models keep them."""
    import os

    if getattr(args, "device", "auto") == "cuda" or os.environ.get("OMP_NUM_THREADS"):
        return
    import torch

    if getattr(args, "model", None) is None and not torch.cuda.is_available():
        torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cpu_threads(args)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
