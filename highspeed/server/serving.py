"""The OpenAI completions and chat endpoints: request -> token ids -> engine streams -> response or SSE.

Everything a client can get wrong is checked here, before the engine sees it (model name, strings that are not
UTF-8, context length, token ids outside the vocabulary, unsupported options), so the engine only receives
requests it can run. Each engine stream is opened and its first output awaited before any response byte is
sent: a full queue or a refused prompt becomes a proper status code, not an error inside a 200 stream.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from highspeed.engine.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from highspeed.outputs import Logprob, RequestOutput
from highspeed.sampling import SamplingParams
from highspeed.server import protocol as P
from highspeed.server.errors import APIError, bad_request, error_body
from highspeed.server.metrics import ServerMetrics
from highspeed.tokenizer import apply_chat_template

logger = logging.getLogger(__name__)
T = TypeVar("T")

# chat_template_kwargs may tune the template (enable_thinking, ...), never the call itself.
_RESERVED_TEMPLATE_KWARGS = {"tokenize", "return_dict", "return_tensors", "chat_template", "conversation",
                             "messages", "add_generation_prompt", "padding", "truncation", "max_length",
                             "tokenizer_kwargs", "return_assistant_tokens_mask", "continue_final_message"}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    tokenizer: Any
    tokenize: Callable[[str], list[int]]     # the engine's own, so the server counts tokens as the engine does
    max_model_len: int
    vocab_size: int


class _Primed:
    """An engine stream whose first output has already arrived; iterating yields it first."""

    def __init__(self, first: RequestOutput, rest: AsyncIterator[RequestOutput]):
        self._first: RequestOutput | None = first
        self._rest = rest

    def __aiter__(self) -> "_Primed":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._first is not None:
            out, self._first = self._first, None
            return out
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        await self._rest.aclose()  # type: ignore[attr-defined]


async def _merge(streams: list[_Primed]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several engine streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as s:
            async for out in s:
                yield 0, out
        return
    q: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: _Primed) -> None:
        try:
            async with aclosing(s):
                async for out in s:
                    await q.put((i, out))
            await q.put((i, None))
        except Exception as e:
            await q.put((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()   # cancelling a pump cancels its engine stream, which aborts the request
        await asyncio.gather(*tasks, return_exceptions=True)


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always closes its body iterator, so a client disconnect aborts the request
    at once instead of whenever the abandoned generator is garbage-collected."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()


def _sse(obj: P.OpenAIModel | dict[str, Any]) -> str:
    data = obj.model_dump_json() if isinstance(obj, P.OpenAIModel) else json.dumps(obj)
    return f"data: {data}\n\n"


async def _cancel_on_disconnect(raw: Request, work: Awaitable[T]) -> T | None:
    """Run ``work``; if the client goes away first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await raw.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return None   # nobody is listening; the response is never sent
    return task.result()


def _bad_string_path(obj: Any, path: str = "") -> str | None:
    """The path of the first string that cannot be encoded as UTF-8 (JSON's lone surrogates), or None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = _bad_string_path(key, path) if isinstance(key, str) else None
        found = found or _bad_string_path(value, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def map_engine_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(503, str(e), code="server_overloaded")
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), code="engine_unavailable")
    if isinstance(e, ValueError):
        return bad_request(str(e))
    logger.error("request failed inside the engine", exc_info=e)
    return APIError(500, f"internal error: {e}", code="internal_error")


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, info: ModelInfo, metrics: ServerMetrics):
        self.engine = engine
        self.info = info
        self.metrics = metrics

    # ------------------------------------------------------------------ shared checks

    def _check_request(self, req: P.SamplingFields) -> None:
        if req.model is not None and req.model != self.info.name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {self.info.name!r}",
                           param="model", code="model_not_found")
        bad = _bad_string_path(req.model_dump())
        if bad:
            raise bad_request(f"{bad}: the string is not valid UTF-8 (lone surrogate)", param=bad,
                              code="invalid_encoding")
        if req.presence_penalty or req.frequency_penalty:
            raise bad_request("presence_penalty and frequency_penalty are not supported (only 0)",
                              param="presence_penalty" if req.presence_penalty else "frequency_penalty",
                              code="unsupported_value")
        if req.logit_bias:
            raise bad_request("logit_bias is not supported", param="logit_bias", code="unsupported_value")
        for tid in req.stop_token_ids or []:
            if tid >= self.info.vocab_size:
                raise bad_request(f"stop token id {tid} is outside the vocabulary (size {self.info.vocab_size})",
                                  param="stop_token_ids")

    def _check_prompt_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise bad_request("the prompt is empty", param=param)
        top = max(ids)
        if top >= self.info.vocab_size:
            raise bad_request(f"token id {top} is outside the vocabulary (size {self.info.vocab_size})",
                              param=param)

    def _params(self, req: P.SamplingFields, prompt_len: int, max_tokens: int | None, logprobs: int | None,
                param: str) -> SamplingParams:
        limit = self.info.max_model_len
        if prompt_len >= limit:
            raise bad_request(f"this model's maximum context length is {limit} tokens, but the prompt has "
                              f"{prompt_len} tokens", param=param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = limit - prompt_len
        elif prompt_len + max_tokens > limit:
            raise bad_request(f"this model's maximum context length is {limit} tokens; {prompt_len} prompt tokens "
                              f"+ {max_tokens} max_tokens = {prompt_len + max_tokens}; reduce the prompt or "
                              f"max_tokens", param="max_tokens", code="context_length_exceeded")
        if req.min_tokens > max_tokens:
            raise bad_request(f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens})",
                              param="min_tokens")
        top_k = req.top_k or 0
        if top_k >= self.info.vocab_size:
            top_k = 0   # keeping the whole vocabulary is no top-k at all
        try:
            return SamplingParams(
                n=req.n, max_tokens=max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=top_k, min_p=req.min_p or 0.0, seed=req.seed,
                stop=req.stop, stop_token_ids=list(req.stop_token_ids or []), ignore_eos=req.ignore_eos,
                logprobs=logprobs, min_tokens=req.min_tokens, skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output)
        except ValueError as e:
            raise bad_request(str(e)) from e

    async def _tracked(self, ids: list[int], params: SamplingParams, rid: str,
                       priority: int) -> AsyncIterator[RequestOutput]:
        """One engine request; records its metrics when it ends, however it ends."""
        last: RequestOutput | None = None
        refused = False
        try:
            async with aclosing(self.engine.generate(ids, params, rid, priority=priority)) as gen:
                async for out in gen:
                    last = out
                    yield out
        except Exception:
            refused = last is None   # queue full, bad prompt: an error response, not a served request
            raise
        finally:
            if last is not None:
                self.metrics.observe_finished(last, None if last.finished else "abort")
            elif not refused:
                self.metrics.observe_abort()   # the client left before the first token

    async def _open(self, prompts: list[list[int]], params: list[SamplingParams], base_id: str,
                    priority: int) -> list[_Primed]:
        gens = [self._tracked(ids, p, f"{base_id}-{i}", priority)
                for i, (ids, p) in enumerate(zip(prompts, params))]
        firsts = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
        failed = [r for r in firsts if isinstance(r, BaseException)]
        if failed:
            await asyncio.gather(*(g.aclose() for g in gens), return_exceptions=True)
            if isinstance(failed[0], StopAsyncIteration):
                raise APIError(500, "the engine ended the request without output", code="internal_error")
            raise map_engine_error(failed[0])
        return [_Primed(first, g) for first, g in zip(firsts, gens)]  # type: ignore[arg-type]

    async def _tokenize(self, text: str) -> list[int]:
        return await asyncio.to_thread(self.info.tokenize, text)

    # ------------------------------------------------------------------ logprobs

    def _token_text(self, token_id: int, lp: Logprob | None) -> str:
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self.info.tokenizer.decode([token_id])

    def _top(self, entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
        return sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:k]

    def _completion_logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]] | None, k: int,
                             offset: int) -> tuple[P.CompletionLogprobs, int]:
        lp = P.CompletionLogprobs()
        for tid, entry in zip(token_ids, entries or []):
            text = self._token_text(tid, entry.get(tid))
            lp.tokens.append(text)
            lp.token_logprobs.append(entry[tid].logprob if tid in entry else None)
            top: dict[str, float] | None = None
            if k:
                top = {}
                for t, l in self._top(entry, k):
                    # Different ids can decode to the same text (partial UTF-8 bytes): the likeliest one keeps it.
                    top.setdefault(self._token_text(t, l), l.logprob)
            lp.top_logprobs.append(top)
            lp.text_offset.append(offset)
            offset += len(text)
        return lp, offset

    def _chat_logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]] | None,
                       k: int) -> P.ChatLogprobs:
        content = []
        for tid, entry in zip(token_ids, entries or []):
            text = self._token_text(tid, entry.get(tid))
            top = [P.ChatTopLogprob(token=(t_text := self._token_text(t, l)), logprob=l.logprob,
                                    bytes=list(t_text.encode("utf-8")))
                   for t, l in self._top(entry, k)]
            content.append(P.ChatTokenLogprob(token=text, logprob=entry[tid].logprob if tid in entry else -9999.0,
                                              bytes=list(text.encode("utf-8")), top_logprobs=top))
        return P.ChatLogprobs(content=content)

    @staticmethod
    def _usage(outs: list[RequestOutput | None]) -> P.UsageInfo:
        prompt = sum(o.usage.prompt_tokens for o in outs if o)
        completion = sum(o.usage.completion_tokens for o in outs if o)
        cached = sum(o.usage.cached_tokens for o in outs if o)
        return P.UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                           prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))

    # ------------------------------------------------------------------ /v1/completions

    async def completions(self, req: P.CompletionRequest, raw: Request) -> Response:
        self._check_request(req)
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix", code="unsupported_value")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of must equal n (beam-style best_of is not supported)", param="best_of")
        if req.echo and req.logprobs is not None:
            raise bad_request("echo together with logprobs is not supported (no prompt logprobs)", param="echo")
        raw_prompts: list[str | list[int]]
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            raw_prompts = [p]  # type: ignore[list-item]
        else:
            raw_prompts = list(p)  # type: ignore[arg-type]
        if len(raw_prompts) * req.n > P.MAX_N:
            raise bad_request(f"prompts x n must be <= {P.MAX_N}", param="n")
        prompts: list[list[int]] = []
        texts: list[str] = []
        for i, rp in enumerate(raw_prompts):
            param = "prompt" if len(raw_prompts) == 1 else f"prompt.{i}"
            if isinstance(rp, str):
                if not rp:
                    raise bad_request("the prompt is empty", param=param)
                ids = await self._tokenize(rp)
                texts.append(rp)
            else:
                ids = list(rp)
                texts.append("")
            self._check_prompt_ids(ids, param)
            prompts.append(ids)
        params = [self._params(req, len(ids), req.max_tokens, req.logprobs, "prompt") for ids in prompts]
        if req.echo:
            texts = [t or self.info.tokenizer.decode(ids) for t, ids in zip(texts, prompts)]
        base_id = P.random_id("cmpl")
        if req.stream:
            streams = await self._open(prompts, params, base_id, req.priority)
            return SSEResponse(self._completion_stream(req, streams, base_id, texts))
        return await self._respond(raw, self._completion_full(req, prompts, params, base_id, texts))

    async def _completion_full(self, req: P.CompletionRequest, prompts: list[list[int]],
                               params: list[SamplingParams], base_id: str, texts: list[str]) -> Response:
        streams = await self._open(prompts, params, base_id, req.priority)
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for i, out in _merge(streams):
            finals[i] = out
        choices = []
        for i, out in enumerate(finals):
            assert out is not None
            for c in out.outputs:
                lp = None
                if req.logprobs is not None:
                    lp, _ = self._completion_logprobs(c.token_ids, c.logprobs, req.logprobs, 0)
                text = (texts[i] if req.echo else "") + c.text
                choices.append(P.CompletionChoice(index=i * req.n + c.index, text=text, logprobs=lp,
                                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        choices.sort(key=lambda c: c.index)
        body = P.CompletionResponse(id=base_id, model=self.info.name, choices=choices, usage=self._usage(finals))
        return JSONResponse(body.model_dump())

    async def _completion_stream(self, req: P.CompletionRequest, streams: list[_Primed], base_id: str,
                                 texts: list[str]) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        last: list[RequestOutput | None] = [None] * len(streams)
        offsets: dict[int, int] = {}
        done: set[int] = set()
        merged = _merge(streams)
        try:
            async for i, out in merged:
                last[i] = out
                for c in out.outputs:
                    idx = i * req.n + c.index
                    if idx in done:
                        continue
                    text = c.delta_text
                    if req.echo and idx not in offsets:
                        text = texts[i] + text
                    # Tokens whose text is held back (a partial character, a possible stop string) make no
                    # chunk unless their logprobs must be sent.
                    if not text and not c.finished and (req.logprobs is None or not c.delta_token_ids):
                        continue
                    lp = None
                    if req.logprobs is not None:
                        lp, offsets[idx] = self._completion_logprobs(c.delta_token_ids, c.delta_logprobs,
                                                                     req.logprobs, offsets.get(idx, 0))
                    else:
                        offsets[idx] = offsets.get(idx, 0) + len(text)
                    if c.finished:
                        done.add(idx)
                    chunk = P.CompletionResponse(
                        id=base_id, created=created, model=self.info.name,
                        choices=[P.CompletionChoice(index=idx, text=text, logprobs=lp, finish_reason=c.finish_reason,
                                                    stop_reason=c.stop_reason)],
                        usage=self._usage([out]) if continuous else None)
                    yield _sse(chunk)
            if include_usage:
                yield _sse(P.CompletionResponse(id=base_id, created=created, model=self.info.name, choices=[],
                                                usage=self._usage(last)))
        except Exception as e:  # headers are out: the error travels in the stream, then the stream ends
            yield _sse(error_body(map_engine_error(e)))
        finally:
            await merged.aclose()
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ /v1/chat/completions

    async def chat(self, req: P.ChatCompletionRequest, raw: Request) -> Response:
        self._check_request(req)
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                    for m in req.messages]
        kwargs = dict(req.chat_template_kwargs or {})
        reserved = sorted(set(kwargs) & _RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")

        def render() -> list[int]:
            return apply_chat_template(self.info.tokenizer, messages, add_generation_prompt=req.add_generation_prompt,
                                       **kwargs)

        try:
            ids = await asyncio.to_thread(render)
        except Exception as e:  # template errors (roles out of order, missing template) are the request's fault
            raise bad_request(f"cannot apply the chat template: {e}", param="messages",
                              code="chat_template_error") from e
        self._check_prompt_ids(ids, "messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        k = req.top_logprobs or 0
        params = self._params(req, len(ids), max_tokens, k if req.logprobs else None, "messages")
        base_id = P.random_id("chatcmpl")
        if req.stream:
            streams = await self._open([ids], [params], base_id, req.priority)
            return SSEResponse(self._chat_stream(req, streams[0], base_id))
        return await self._respond(raw, self._chat_full(req, ids, params, base_id))

    async def _chat_full(self, req: P.ChatCompletionRequest, ids: list[int], params: SamplingParams,
                         base_id: str) -> Response:
        streams = await self._open([ids], [params], base_id, req.priority)
        final: RequestOutput | None = None
        async for _, out in _merge(streams):
            final = out
        assert final is not None
        choices = [
            P.ChatChoice(index=c.index, message=P.ChatResponseMessage(content=c.text),
                         logprobs=self._chat_logprobs(c.token_ids, c.logprobs, req.top_logprobs or 0)
                         if req.logprobs else None,
                         finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for c in sorted(final.outputs, key=lambda c: c.index)]
        body = P.ChatCompletionResponse(id=base_id, model=self.info.name, choices=choices,
                                        usage=self._usage([final]))
        return JSONResponse(body.model_dump())

    async def _chat_stream(self, req: P.ChatCompletionRequest, stream: _Primed, base_id: str) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)

        def chunk(choice: P.ChatStreamChoice, out: RequestOutput | None = None) -> str:
            return _sse(P.ChatCompletionChunk(id=base_id, created=created, model=self.info.name, choices=[choice],
                                              usage=self._usage([out]) if continuous and out else None))

        last: RequestOutput | None = None
        done: set[int] = set()
        try:
            # The role comes first, once per choice, as OpenAI sends it.
            for idx in range(req.n):
                yield chunk(P.ChatStreamChoice(index=idx, delta=P.DeltaMessage(role="assistant", content="")))
            async with aclosing(stream):
                async for out in stream:
                    last = out
                    for c in out.outputs:
                        if c.index in done or (not c.delta_text and not c.finished
                                               and (not req.logprobs or not c.delta_token_ids)):
                            continue
                        if c.finished:
                            done.add(c.index)
                        lp = (self._chat_logprobs(c.delta_token_ids, c.delta_logprobs, req.top_logprobs or 0)
                              if req.logprobs else None)
                        yield chunk(P.ChatStreamChoice(index=c.index, delta=P.DeltaMessage(content=c.delta_text),
                                                       logprobs=lp, finish_reason=c.finish_reason,
                                                       stop_reason=c.stop_reason), out)
            if include_usage:
                yield _sse(P.ChatCompletionChunk(id=base_id, created=created, model=self.info.name, choices=[],
                                                 usage=self._usage([last])))
        except Exception as e:
            yield _sse(error_body(map_engine_error(e)))
        finally:
            await stream.aclose()
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ helpers

    async def _respond(self, raw: Request, work: Awaitable[Response]) -> Response:
        try:
            response = await _cancel_on_disconnect(raw, work)
        except Exception as e:
            raise map_engine_error(e) from e
        # A client that left gets nothing; 499 is nginx's "client closed request", never seen by anyone.
        return response if response is not None else Response(status_code=499)

