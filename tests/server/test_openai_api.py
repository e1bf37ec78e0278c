"""The server through the official ``openai`` client: completions and chat, streaming or not, n, logprobs, stop,
seed, usage, models; and the server's greedy output equals the engine's own."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from highspeed.sampling import SamplingParams
from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, wait_idle_and_whole

PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy(client: openai.OpenAI, **kw):
    return client.completions.create(model=MODEL_NAME, prompt=PROMPT, temperature=0, **kw)


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_completion_matches_engine(client, make_engine):
    resp = _greedy(client, max_tokens=12, extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert resp.object == "text_completion" and resp.model == MODEL_NAME and resp.id.startswith("cmpl-")
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 12
    # The same request straight into a fresh engine (no server, no thread) gives the same text.
    engine = make_engine()
    engine.add_request("ref", PROMPT, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    assert final is not None and choice.text == final.outputs[0].text
    assert resp.usage.prompt_tokens == len(final.prompt_token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


def test_streaming_equals_non_streaming(client):
    full = _greedy(client, max_tokens=10, extra_body={"ignore_eos": True})
    chunks = list(_greedy(client, max_tokens=10, stream=True, stream_options={"include_usage": True},
                          extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert len({c.id for c in chunks}) == 1
    token_chunks = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in token_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens


def test_cached_tokens_reported(client):
    prompt = "A long shared preamble that the prefix cache should keep around for the next request. " * 3
    client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL_NAME, prompt=prompt + " More.", max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16   # at least one full block came from the cache


def test_n_and_batch_prompts(client):
    resp = client.completions.create(model=MODEL_NAME, prompt=["Hello", "The quick brown fox"], n=3,
                                     max_tokens=6, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == list(range(6))
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.usage.completion_tokens == 6 * 6


def test_seed_reproducible(client):
    kw = dict(max_tokens=8, temperature=1.0, seed=1234, extra_body={"ignore_eos": True})
    a = client.completions.create(model=MODEL_NAME, prompt=PROMPT, **kw).choices[0].text
    b = client.completions.create(model=MODEL_NAME, prompt=PROMPT, **kw).choices[0].text
    assert a == b


def test_completion_logprobs(client):
    resp = _greedy(client, max_tokens=5, logprobs=3, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    if "\ufffd" not in "".join(lp.tokens):
        assert "".join(lp.tokens) == resp.choices[0].text
    for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0.0
        assert 1 <= len(top) <= 3
        # Greedy: the chosen token is the most likely one.
        assert max(top.values()) == pytest.approx(value, abs=1e-4)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_stop_string(client):
    full = _greedy(client, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].text
    assert len(full) > 3
    stop = full[2:4]
    resp = _greedy(client, max_tokens=16, stop=[stop], extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop
    assert choice.text == full[:full.index(stop)]
    streamed = "".join(c.choices[0].text for c in _greedy(client, max_tokens=16, stop=stop, stream=True,
                                                          extra_body={"ignore_eos": True}))
    assert streamed == choice.text


def test_echo(client):
    resp = _greedy(client, max_tokens=3, echo=True)
    assert resp.choices[0].text.startswith(PROMPT)


def test_chat(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"}]
    resp = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=8,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    msg = resp.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 8
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == msg.content
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens


def test_chat_n_and_logprobs(client):
    resp = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], n=2,
                                          max_tokens=4, temperature=0.8, seed=3, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1]
    for c in resp.choices:
        content = c.logprobs.content
        assert len(content) == 4
        joined = "".join(t.token for t in content)
        if "\ufffd" not in joined:   # a character split over byte tokens decodes to one U+FFFD per token
            assert joined == c.message.content
        for t in content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 2 and bytes(t.bytes).decode() == t.token
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=4, temperature=0.8, seed=3,
        stream=True, extra_body={"ignore_eos": True}))
    for i in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == resp.choices[i].message.content   # same seed, same samples


def _engine_greedy_ids(make_engine, max_tokens: int) -> list[int]:
    engine = make_engine()
    engine.add_request("ref", PROMPT, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    return final.outputs[0].token_ids


def test_stop_token_ids_and_extras(client, make_engine):
    ids = _engine_greedy_ids(make_engine, 8)
    target = ids[3]
    first = ids.index(target)   # the earliest occurrence is where generation must stop
    resp = _greedy(client, max_tokens=8, extra_body={"ignore_eos": True, "stop_token_ids": [target]})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == target
    assert resp.usage.completion_tokens == first + 1
    # top_k / min_p are accepted; with greedy decoding they change nothing.
    full = _greedy(client, max_tokens=8, extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.01})
    assert full.choices[0].text == _greedy(client, max_tokens=8, extra_body={"ignore_eos": True}).choices[0].text


def test_server_left_whole(shared_engine, client):
    _greedy(client, max_tokens=2)
    wait_idle_and_whole(shared_engine)


def test_streaming_n_and_continuous_usage(server):
    body = {"model": MODEL_NAME, "prompt": ["Hello", "Goodbye"], "n": 2, "max_tokens": 5, "stream": True,
            "ignore_eos": True, "temperature": 0.9, "seed": 11,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.Client(base_url=server.url, timeout=60) as c:
        events = [e for e in c.post("/v1/completions", json=body).text.split("\n\n") if e]
        full = c.post("/v1/completions", json={**body, "stream": False, "stream_options": None}).json()
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for ch in chunks[:-1]:
        assert ch["usage"]["total_tokens"] == ch["usage"]["prompt_tokens"] + ch["usage"]["completion_tokens"]
        (choice,) = ch["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert finishes == {i: "length" for i in range(4)}
    assert texts == {c["index"]: c["text"] for c in full["choices"]}   # same seed, same samples
    assert chunks[-1]["usage"]["completion_tokens"] == 4 * 5 == full["usage"]["completion_tokens"]
