"""Soak: many concurrent streaming clients, a share of them hanging up mid-stream. Afterwards every completed
stream is well formed, the KV pool is whole (free blocks == total), /health answers, and the server still serves."""
from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field

import httpx

from tests.server.conftest import MODEL_NAME, wait_idle_and_whole

NUM_CLIENTS = 32
DISCONNECT_EVERY = 4          # clients 0, 4, 8, ... hang up after a few chunks
LONG = 150                    # what the hanging-up clients ask for: far more steps than the others need


@dataclass
class StreamRecord:
    client: int
    chat: bool
    n: int
    max_tokens: int
    disconnect: bool
    status: int = 0
    events: list[str] = field(default_factory=list)


def _body(rec: StreamRecord, rng: random.Random) -> dict:
    common = {"model": MODEL_NAME, "max_tokens": rec.max_tokens, "stream": True, "n": rec.n,
              "stream_options": {"include_usage": True}, "ignore_eos": True,
              "temperature": rng.choice([0.0, 0.7, 1.0]), "seed": rec.client}
    # Half the prompts share a long prefix, so prefix-cache hits and misses are both exercised.
    prefix = "Shared system preamble for the soak test. " * 4 if rec.client % 2 else ""
    text = f"{prefix}Client {rec.client} asks question {rng.randrange(1000)}."
    if rec.chat:
        return {**common, "messages": [{"role": "user", "content": text}]}
    return {**common, "prompt": text}


async def _run_client(http: httpx.AsyncClient, rec: StreamRecord, rng: random.Random) -> StreamRecord:
    path = "/v1/chat/completions" if rec.chat else "/v1/completions"
    async with http.stream("POST", path, json=_body(rec, rng)) as resp:
        rec.status = resp.status_code
        buffer = ""
        async for text in resp.aiter_text():
            buffer += text
            while "\n\n" in buffer:
                event, buffer = buffer.split("\n\n", 1)
                rec.events.append(event)
            if rec.disconnect and len(rec.events) >= 3:
                return rec           # leaving the block closes the connection mid-stream
        assert buffer == "", f"client {rec.client}: trailing bytes after the last event: {buffer!r}"
    return rec


def _check_stream(rec: StreamRecord) -> None:
    assert rec.status == 200, rec
    assert rec.events and rec.events[-1] == "data: [DONE]", f"client {rec.client}: no [DONE] at the end"
    chunks = []
    for event in rec.events[:-1]:
        assert event.startswith("data: "), event
        chunks.append(json.loads(event[len("data: "):]))
    assert all("error" not in c for c in chunks), chunks
    assert len({c["id"] for c in chunks}) == 1
    kind = "chat.completion.chunk" if rec.chat else "text_completion"
    assert all(c["object"] == kind and c["model"] == MODEL_NAME for c in chunks)
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == rec.n * rec.max_tokens
    finished: dict[int, str] = {}
    for c in chunks[:-1]:
        assert c["usage"] is None and len(c["choices"]) == 1
        choice = c["choices"][0]
        assert choice["index"] not in finished, "a chunk after its choice finished"
        if choice["finish_reason"] is not None:
            finished[choice["index"]] = choice["finish_reason"]
    assert finished == {i: "length" for i in range(rec.n)}


def test_soak(server, shared_engine):
    rng = random.Random(0)
    records = [StreamRecord(client=i, chat=i % 3 == 0, n=2 if i % 5 == 0 else 1,
                            max_tokens=LONG if i % DISCONNECT_EVERY == 0 else rng.randrange(8, 33),
                            disconnect=i % DISCONNECT_EVERY == 0)
               for i in range(NUM_CLIENTS)]

    def aborts() -> float:
        for line in httpx.get(server.url + "/metrics").text.splitlines():
            if line.startswith('highspeed:request_success_total{finished_reason="abort"}'):
                return float(line.split()[-1])
        return 0.0

    aborted_before = aborts()
    wait_idle_and_whole(shared_engine)
    steps_before = shared_engine.stats()["num_steps"]

    async def main() -> list[StreamRecord]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS * 2)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            return await asyncio.wait_for(
                asyncio.gather(*(_run_client(http, r, random.Random(r.client)) for r in records)), 240)

    done = asyncio.run(main())
    for rec in done:
        if not rec.disconnect:
            _check_stream(rec)
    stats = wait_idle_and_whole(shared_engine)
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    # The others need at most 32 decode steps (+ prefill): had the hung-up requests run on, it would be ~LONG.
    assert stats["num_steps"] - steps_before < LONG * 2 // 3, "requests ran on after their clients left"
    # The hung-up streams were aborted (not run to the end): each counts as an abort.
    hung_up = sum(r.disconnect for r in records)
    assert aborts() - aborted_before >= hung_up // 2
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    after = httpx.post(server.url + "/v1/completions", json={"prompt": "after the storm", "max_tokens": 4},
                       timeout=60)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1
    wait_idle_and_whole(shared_engine)
