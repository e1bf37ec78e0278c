"""LLMEngine: the step loop. add_request -> schedule -> run -> sample -> detokenize -> outputs.

Every front end (offline ``LLM``, the async server front) drives this one class.
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from highspeed.config import EngineConfig, HFConfig
from highspeed.engine.kv_cache import BlockPool, cache_bytes_per_token
from highspeed.engine.request import Request, Sequence
from highspeed.engine.runner import InFlight, ModelRunner, SampleResult, SampleSpec
from highspeed.engine.scheduler import Scheduler, SchedulerOutput
from highspeed.outputs import CompletionOutput, Logprob, RequestOutput, Usage
from highspeed.sampling import SamplingParams
from highspeed.tokenizer import IncrementalDetokenizer, load_tokenizer

log = logging.getLogger("highspeed")


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound; the server answers 503."""


def builtin_model_path() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "demo", "model")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, hf: HFConfig, device: torch.device) -> torch.dtype:
    """The loader's rule (a name, a torch.dtype, or the checkpoint's own for "auto"), except that "auto" on the
    CPU means float32: half-precision matmuls there are slow and lossy."""
    from highspeed.models.loader import resolve_dtype as checkpoint_dtype

    if isinstance(dtype, str) and dtype.lower() == "auto" and device.type == "cpu":
        return torch.float32
    return checkpoint_dtype(dtype, hf)


def _mix_seed(seed: int, index: int) -> int:
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


@dataclass
class Subscriber:
    """One caller's view of a computation: what it has been sent so far (for deltas)."""
    request_id: str
    prompt: str | None
    sent_tokens: dict[int, int] = field(default_factory=dict)
    sent_chars: dict[int, int] = field(default_factory=dict)
    merged: bool = False          # joined a computation someone else started


class _NullDetokenizer:
    text = ""

    def add(self, ids: list[int]) -> str:
        return ""

    def flush(self) -> str:
        return ""


class LLMEngine:
    def __init__(self, config: EngineConfig, model: Any = None, tokenizer: Any = None):
        self.config = config
        path = config.model or builtin_model_path()
        self.model_path = path
        self.hf_config = HFConfig.from_pretrained(path)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        torch.manual_seed(config.seed)
        if model is None:
            from highspeed.models.loader import load_model

            model, _ = load_model(path, dtype=self.dtype, device=self.device, progress=config.load_progress)
        self.model = model
        if not config.use_triton:
            os.environ["HIGHSPEED_DISABLE_TRITON"] = "1"
        # tokenizer=False: token ids in, token ids out (benchmarks on random weights have no tokenizer).
        self.tokenizer = (None if tokenizer is False else
                          tokenizer if tokenizer is not None else load_tokenizer(config.tokenizer or path))
        self.max_model_len = int(config.max_model_len or self.hf_config.get("max_position_embeddings", 4096))
        self.eos_ids = set(self.hf_config.eos_token_ids)
        gen_cfg = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_cfg):
            import json

            with open(gen_cfg, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                self.eos_ids |= set(eos if isinstance(eos, list) else [eos])
        if self.tokenizer is not None and getattr(self.tokenizer, "eos_token_id", None) is not None:
            self.eos_ids.add(int(self.tokenizer.eos_token_id))
        self.vocab_size = int(self.hf_config.vocab_size)

        self.runner = ModelRunner(self.model, self.device, self.dtype, config.block_size)
        num_blocks = self._size_kv_cache()
        self.runner.allocate_kv_cache(num_blocks)
        self.pool = BlockPool(num_blocks, config.block_size, config.enable_prefix_caching)
        self.cuda_graphs = False
        if self.device.type == "cuda" and not config.enforce_eager:
            self.cuda_graphs = self.runner.capture_cuda_graphs(min(config.max_num_seqs, 512), self.max_model_len)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_wait_steps, config.enable_request_merging)
        self._rng = random.Random(config.seed)
        self.subscribers: dict[str, tuple[Subscriber, Request]] = {}
        self.merge_index: dict[tuple, Request] = {}
        self.num_steps = 0
        self.finished_requests = 0
        self.merged_requests = 0
        self.host_time_s = 0.0   # scheduling and output processing outside the runner, waits on the device excluded
        # Overlap (async scheduling): keep one step in flight. On by default on CUDA, where it hides host time.
        self.overlap = config.async_scheduling if config.async_scheduling is not None else self.device.type == "cuda"
        self._inflight: InFlight | None = None

    # -- KV cache sizing --------------------------------------------------------------------------------------
    def _size_kv_cache(self) -> int:
        cfg = self.config
        per_block = cache_bytes_per_token(self.model, self.dtype) * cfg.block_size
        if per_block == 0:
            raise ValueError("the model declares no KV cache")
        # Never more than every sequence at full length could use.
        cap = self.scheduler_blocks_cap()
        if cfg.num_kv_blocks is not None:
            return int(cfg.num_kv_blocks)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used_by_others = total - free - torch.cuda.memory_allocated(self.device)
            peak = self._profile_peak_activation()
            budget = total * cfg.gpu_memory_utilization - used_by_others - peak
            return max(1, min(cap, int(budget // per_block)))
        return max(1, min(cap, int(cfg.cpu_kv_cache_gib * 2**30 // per_block)))

    def scheduler_blocks_cap(self) -> int:
        per_seq = -(-self.max_model_len // self.config.block_size)
        return per_seq * self.config.max_num_seqs + 1

    def _profile_peak_activation(self) -> int:
        """Run one cache-less forward of a full token budget to learn the activation peak (CUDA only)."""
        from highspeed.context import prefill_context, use_context

        n = min(self.config.max_num_batched_tokens, self.max_model_len)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        with torch.inference_mode(), use_context(prefill_context([n], self.device)):
            h = self.model(ids, torch.arange(n, device=self.device))
            self.model.compute_logits(h[-self.config.max_num_seqs:])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        return int(peak * 1.2)

    # -- requests ---------------------------------------------------------------------------------------------
    def _detokenizer(self, prompt_ids: list[int], skip_special_tokens: bool) -> IncrementalDetokenizer:
        if self.tokenizer is None:
            return _NullDetokenizer()  # type: ignore[return-value]
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens)

    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer: pass token ids")
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        params = params or SamplingParams()
        if request_id in self.subscribers:
            raise ValueError(f"request id {request_id!r} is already in flight")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenize(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        self._validate(ids, params)
        if self.scheduler.num_waiting >= self.config.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting_requests} requests); retry later")

        sub = Subscriber(request_id=request_id, prompt=text)
        key = (tuple(ids), params.merge_key()) if params.deterministic else None
        if key is not None and self.config.enable_request_merging and key in self.merge_index:
            req = self.merge_index[key]
            sub.merged = True
            req.subscribers.append(sub)
            self.subscribers[request_id] = (sub, req)
            self.merged_requests += 1
            return

        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(ids)
        req = Request(request_id=request_id, prompt=text, prompt_token_ids=ids, params=params, priority=priority)
        req.subscribers.append(sub)
        req.merge_key = key
        if key is not None and self.config.enable_request_merging:
            self.merge_index[key] = req
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req.base_seed = base_seed
        self.scheduler.add(req, _mix_seed(base_seed, 0))
        req.seqs[0].detok = self._detokenizer(ids, params.skip_special_tokens)
        req.seqs[0].logprobs = [] if params.logprobs is not None else None
        self.subscribers[request_id] = (sub, req)

    def _validate(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        n = len(ids)
        if n >= self.max_model_len:
            raise ValueError(f"the prompt is {n} tokens; this model's context is {self.max_model_len} tokens "
                             f"and at least one must be left for the output")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) exceeds the context of "
                             f"{self.max_model_len} tokens")
        total = n + (params.max_tokens if params.max_tokens is not None else self.max_model_len - n)
        if self.scheduler.blocks_for(total) > self.pool.num_blocks:
            raise ValueError(f"the request needs up to {total} tokens of KV cache but the pool holds "
                             f"{self.pool.num_blocks * self.pool.block_size}; lower max_tokens or enlarge the cache")

    def abort_request(self, request_id: str) -> None:
        entry = self.subscribers.pop(request_id, None)
        if entry is None:
            return
        sub, req = entry
        req.subscribers.remove(sub)
        if not req.subscribers:
            self.scheduler.abort(req)
            self._forget(req)

    def _forget(self, req: Request) -> None:
        if req.merge_key is not None and self.merge_index.get(req.merge_key) is req:
            del self.merge_index[req.merge_key]

    def has_unfinished_requests(self) -> bool:
        return bool(self.subscribers)

    def drain(self) -> list[RequestOutput]:
        """Read back the step in flight, if any (e.g. before inspecting state in tests)."""
        prev, self._inflight = self._inflight, None
        return self._complete(prev) if prev is not None else []

    # -- the step ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; return the outputs the host learned of in it.

        With overlap on, a pure-decode step is enqueued *before* the previous step's tokens are read back: its
        inputs for those tokens come straight from the device, the host's bookkeeping holds a placeholder (-1)
        until the read, and a stop noticed then drops the one extra token the sequence already ran.
        """
        t0 = time.perf_counter()
        waited = self.runner.wait_time_s
        out = self.scheduler.schedule()
        prev, self._inflight = self._inflight, None
        outs: list[RequestOutput] = []
        if out.is_empty:
            return self._complete(prev) if prev is not None else []
        specs, owners = self._sample_specs(out)
        overlap = prev is not None and len(specs) == len(out.items) and all(
            it.num_new_tokens == 1 for it in out.items)
        if prev is not None and not overlap:
            outs = self._complete(prev)
            out.items = [it for it in out.items if not it.seq.is_finished]
            if out.is_empty:
                return outs
            specs, owners = self._sample_specs(out)
        t1 = time.perf_counter()
        flight = self.runner.launch(out, specs, owners, prev if overlap else None)
        t2 = time.perf_counter()
        self.scheduler.update(out)
        self.num_steps += 1
        if self.overlap:
            for seq in dict.fromkeys(owners):     # one placeholder per sequence, even when it forks
                seq.token_ids.append(-1)
                seq.num_placeholders += 1
            self._inflight = flight
            if overlap:
                outs = self._complete(prev)   # the device is busy with this step meanwhile
        else:
            outs = self._process(flight, self.runner.collect(flight))
        # Host work only: the time blocked reading samples back is the device's, not ours.
        self.host_time_s += (t1 - t0) + (time.perf_counter() - t2) - (self.runner.wait_time_s - waited)
        return outs

    def _complete(self, flight: InFlight) -> list[RequestOutput]:
        return self._process(flight, self.runner.collect(flight))

    def _process(self, flight: InFlight, results: list[SampleResult]) -> list[RequestOutput]:
        specs, owners = flight.specs, flight.owners
        now = time.monotonic()
        touched: dict[int, Request] = {}
        i = 0
        while i < len(specs):
            seq = owners[i]
            req = seq.request
            width = req.params.n if (req.params.n > 1 and not req.forked) else 1
            if seq.is_finished:          # stopped (or aborted) while this step was in flight: drop its token
                i += width
                continue
            touched[id(req)] = req
            if width > 1:
                group = results[i:i + width]
                children = self.scheduler.fork(seq, width, [_mix_seed(req.base_seed, k)
                                                             for k in range(width)])
                for child in children:
                    child.detok = self._detokenizer(req.prompt_token_ids, req.params.skip_special_tokens)
                for s, r in zip([seq] + children, group):
                    self._append(s, r, now)
            else:
                self._append(seq, results[i], now)
            i += width
        return self._outputs(touched.values(), now)

    def _sample_specs(self, out: SchedulerOutput) -> tuple[list[SampleSpec], list[Sequence]]:
        specs: list[SampleSpec] = []
        owners: list[Sequence] = []
        for k, it in enumerate(out.items):
            if not it.samples:
                continue
            seq = it.seq
            req = seq.request
            copies = req.params.n if (req.params.n > 1 and not req.forked) else 1
            for c in range(copies):
                seed = _mix_seed(req.base_seed, c) if copies > 1 else seq.seed
                specs.append(SampleSpec(item=k, params=req.params, seed=seed, step=seq.num_tokens))
                owners.append(seq)
        return specs, owners

    def _append(self, seq: Sequence, r: SampleResult, now: float) -> None:
        req, p = seq.request, seq.request.params
        if seq.num_placeholders:
            idx = len(seq.token_ids) - seq.num_placeholders
            seq.token_ids[idx] = r.token
            seq.num_placeholders -= 1
            self.scheduler.register_full_blocks(seq)
        else:
            idx = len(seq.token_ids)
            seq.token_ids.append(r.token)
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        req.metrics.last_token_time = now
        if seq.logprobs is not None and r.logprob is not None:
            entry = {tid: Logprob(lp, rank=k + 1) for k, (tid, lp) in enumerate(r.top or [])}
            if r.token not in entry:
                entry[r.token] = Logprob(r.logprob, rank=None)
            if self.tokenizer is not None:
                for tid, lp in entry.items():
                    lp.decoded_token = self.tokenizer.decode([tid])
            seq.logprobs.append(entry)
            seq.cumulative_logprob += r.logprob
        # Stop conditions, token-level first.
        t = r.token
        n_out = idx + 1 - seq.num_prompt_tokens
        if n_out >= p.min_tokens:
            if t in p.stop_token_ids:
                seq.detok.flush()
                return self._finish(seq, "stop", t, now)
            if not p.ignore_eos and t in self.eos_ids:
                seq.detok.flush()
                return self._finish(seq, "stop", None, now)
        seq.detok.add([t])
        if p.stop_strings and n_out >= p.min_tokens:
            hit = self._find_stop(seq.detok.text, p)
            if hit is not None:
                cut, s = hit
                seq.detok.text = seq.detok.text[:cut]
                return self._finish(seq, "stop", s, now)
        if n_out >= p.max_tokens or idx + 1 >= self.max_model_len:
            seq.detok.flush()
            return self._finish(seq, "length", None, now)

    @staticmethod
    def _find_stop(text: str, p: SamplingParams) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in p.stop_strings:
            j = text.find(s)
            if j >= 0 and (best is None or j < best[0]):
                best = (j + (len(s) if p.include_stop_str_in_output else 0), s)
        return best

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None, now: float) -> None:
        self.scheduler.finish(seq, reason, stop_reason)   # also drops placeholders of a step still in flight
        if seq.request.is_finished:
            seq.request.metrics.finished_time = now

    # -- outputs ----------------------------------------------------------------------------------------------
    def _visible_text(self, seq: Sequence) -> str:
        text = seq.detok.text
        if seq.is_finished or not seq.request.params.stop_strings:
            return text
        # Hold back what could still turn out to be the start of a stop string.
        hold = max(len(s) for s in seq.request.params.stop_strings) - 1
        return text[:max(0, len(text) - hold)]

    def _outputs(self, reqs: Any, now: float) -> list[RequestOutput]:
        outs = []
        for req in reqs:
            finished = req.is_finished
            for sub in list(req.subscribers):
                outs.append(self._output_for(req, sub, finished))
                if finished:
                    self.subscribers.pop(sub.request_id, None)
            if finished:
                self.finished_requests += len(req.subscribers)
                self._forget(req)
        return outs

    def _output_for(self, req: Request, sub: Subscriber, finished: bool) -> RequestOutput:
        comps = []
        for seq in req.seqs:
            text = self._visible_text(seq)
            sent_t = sub.sent_tokens.get(seq.index, 0)
            sent_c = sub.sent_chars.get(seq.index, 0)
            out_ids = seq.output_ids
            comps.append(CompletionOutput(
                index=seq.index, text=text, token_ids=list(out_ids), finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason, logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                delta_text=text[sent_c:], delta_token_ids=list(out_ids[sent_t:]),
                delta_logprobs=list(seq.logprobs[sent_t:]) if seq.logprobs is not None else None,
            ))
            sub.sent_tokens[seq.index] = len(out_ids)
            sub.sent_chars[seq.index] = len(text)
        n_prompt = len(req.prompt_token_ids)
        usage = Usage(prompt_tokens=n_prompt, completion_tokens=sum(s.num_output_tokens for s in req.seqs),
                      cached_tokens=n_prompt if sub.merged else req.cached_tokens)
        return RequestOutput(request_id=sub.request_id, prompt=sub.prompt, prompt_token_ids=list(req.prompt_token_ids),
                             outputs=comps, finished=finished, usage=usage, metrics=req.metrics)

    # -- introspection ----------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        ps = self.pool.stats
        return {
            "num_requests_running": len({id(s.request) for s in self.scheduler.running}),
            "num_requests_waiting": len({id(s.request) for s in self.scheduler.waiting}),
            "num_kv_blocks": self.pool.num_blocks,
            "num_free_kv_blocks": self.pool.num_free_blocks,
            "kv_cache_usage": self.pool.usage,
            "prefix_cache_queries": ps.queries,
            "prefix_cache_hits": ps.hits,
            "prefix_cache_hit_rate": ps.hit_rate,
            "prefix_cache_evicted_blocks": ps.evicted_blocks,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens_computed": self.scheduler.prompt_tokens_computed,
            "merged_requests": self.merged_requests,
            "num_steps": self.num_steps,
        }
