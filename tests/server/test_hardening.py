"""Bad input gets an OpenAI-format 4xx and nothing else is disturbed: no 5xx, no hang, no leaked KV block."""
from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from highspeed.engine.async_engine import AsyncLLMEngine
from highspeed.server.app import build_app
from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, GatedEngine, LiveServer, wait_idle_and_whole

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


@pytest.fixture(scope="module")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def post_raw(http: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return http.post(path, content=content, headers={"content-type": "application/json"})


LONG_PROMPT = "word " * (MAX_MODEL_LEN * 2)

# (path, body, status, param, code): each must be refused with exactly this.
BAD_REQUESTS: list[tuple[str, Any, int, str | None, str | None]] = [
    (COMPLETIONS, {"prompt": "hi", "model": "no-such-model"}, 404, "model", "model_not_found"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "model", "model_not_found"),
    (COMPLETIONS, {"prompt": 17}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "n": "two"}, 400, "n", None),
    (COMPLETIONS, {"prompt": "hi", "stop": 5}, 400, "stop", None),
    (COMPLETIONS, {"prompt": [1, True]}, 400, None, None),
    (CHAT, {"messages": "hello"}, 400, "messages", None),
    (COMPLETIONS, {"prompt": "hi", "temperature": -0.5}, 400, "temperature", None),
    (COMPLETIONS, {"prompt": "hi", "temperature": 1e9}, 400, "temperature", None),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p", None),
    (COMPLETIONS, {"prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    (COMPLETIONS, {"prompt": "hi", "top_k": -2}, 400, "top_k", None),
    (COMPLETIONS, {"prompt": "hi", "min_p": 1.5}, 400, "min_p", None),
    (COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n", None),
    (COMPLETIONS, {"prompt": "hi", "n": 100000}, 400, "n", None),
    (COMPLETIONS, {"prompt": ["a"] * 20, "n": 10}, 400, "n", None),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "logprobs", None),
    (COMPLETIONS, {"prompt": "hi", "seed": 2**70}, 400, "seed", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "presence_penalty": 1.0}, 400, "presence_penalty", "unsupported_value"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 3}}, 400, "logit_bias", "unsupported_value"),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of", None),
    (COMPLETIONS, {"prompt": "hi", "min_tokens": 50, "max_tokens": 5}, 400, "min_tokens", None),
    (COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, None, None),
    (COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400, None, None),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [10**9]}, 400, "stop_token_ids", None),
    (COMPLETIONS, {"prompt": LONG_PROMPT}, 400, "prompt", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": [5] * MAX_MODEL_LEN, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens", "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages", "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": MAX_MODEL_LEN * 4}, 400,
     "max_tokens", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": [[]]}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": [10**9]}, 400, "prompt", None),
    (COMPLETIONS, {"prompt": [-1]}, 400, None, None),
    (COMPLETIONS, {}, 400, "prompt", None),
    (CHAT, {"messages": []}, 400, "messages", None),
    (CHAT, {}, 400, "messages", None),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None, None),
    (CHAT, {"messages": [{"content": "hi"}]}, 400, None, None),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     None, None),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, None, None),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 99}, 400,
     "top_logprobs", None),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": False}}, 400,
     "chat_template_kwargs", None),
    (COMPLETIONS, [], 400, None, None),
    (COMPLETIONS, "just a string", 400, None, None),
    (COMPLETIONS, None, 400, None, None),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD_REQUESTS,
                         ids=[f"{i}-{b[0].rsplit('/', 1)[-1]}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_request(http, path, body, status, param, code):
    assert_error(post_raw(http, path, json.dumps(body).encode()), status, param, code)


@pytest.mark.parametrize("raw", [
    b"{", b'{"prompt": "hi",}', b"not json at all", b"", b'{"prompt": "hi"} trailing', b"\x00\x01",
    b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "temperature": Infinity}',
    b'{"prompt": "hi", "max_tokens": 1e999}',
])
def test_malformed_json(http, raw):
    assert_error(post_raw(http, COMPLETIONS, raw), 400)


def test_invalid_utf8_and_lone_surrogates(http):
    assert_error(post_raw(http, COMPLETIONS, b'{"prompt": "caf\xc3("}'), 400, code="invalid_encoding")
    assert_error(post_raw(http, COMPLETIONS, b'{"prompt": "a\\ud800b"}'), 400, "prompt", "invalid_encoding")
    assert_error(post_raw(http, CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}'), 400,
                 "messages.0.content", "invalid_encoding")
    assert_error(post_raw(http, COMPLETIONS, b'{"prompt": "hi", "stop": ["\\ud83d"]}'), 400, "stop")


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nope"), 404)
    assert_error(http.get(COMPLETIONS), 405)
    assert_error(http.delete("/v1/models"), 405)


def test_oversized_body(shared_engine):
    live = LiveServer(build_app(shared_engine, MODEL_NAME, max_body_bytes=2048))
    try:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            big = json.dumps({"prompt": "x" * 4096}).encode()
            assert_error(c.post(COMPLETIONS, content=big, headers={"content-type": "application/json"}), 413,
                         code="request_too_large")

            def chunks():   # no Content-Length: the server must count while reading
                for _ in range(8):
                    yield b" " * 1024
                yield b'{"prompt": "hi"}'

            assert_error(c.post(COMPLETIONS, content=chunks(), headers={"content-type": "application/json"}), 413)
            ok = c.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
            assert ok.status_code == 200, ok.text
    finally:
        live.stop()


def test_api_key(shared_engine):
    live = LiveServer(build_app(shared_engine, MODEL_NAME, api_key="s3cret"))
    try:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            body = {"prompt": "hi", "max_tokens": 2}
            assert_error(c.post(COMPLETIONS, json=body), 401, code="invalid_api_key")
            assert_error(c.post(COMPLETIONS, json=body, headers={"Authorization": "Bearer wrong"}), 401)
            assert_error(c.get("/v1/models", headers={"Authorization": "s3cret"}), 401)
            ok = c.post(COMPLETIONS, json=body, headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200, ok.text
            assert c.get("/health").status_code == 200   # probes need no key
            assert c.get("/metrics").status_code == 200
    finally:
        live.stop()


@pytest.fixture
def gated(make_engine):
    engine = GatedEngine(make_engine())
    aengine = AsyncLLMEngine(engine, max_waiting_requests=2)  # type: ignore[arg-type]
    live = LiveServer(build_app(aengine, MODEL_NAME))
    yield engine, aengine, live
    engine.gate.set()
    live.stop()
    aengine.shutdown()


def test_queue_full_is_503_not_a_hang(gated):
    engine, aengine, live = gated
    results: dict[int, httpx.Response] = {}

    def stream(i: int) -> None:
        with httpx.Client(base_url=live.url, timeout=60) as c:
            results[i] = c.post(COMPLETIONS, json={"prompt": f"request {i}", "max_tokens": 3, "stream": True})

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while aengine.num_waiting < 2:
        assert time.monotonic() < deadline, "the two requests never reached the engine front"
        time.sleep(0.01)
    t0 = time.monotonic()
    with httpx.Client(base_url=live.url, timeout=10) as c:
        r = c.post(COMPLETIONS, json={"prompt": "one too many", "max_tokens": 3})
        assert time.monotonic() - t0 < 5
        assert_error(r, 503, code="server_overloaded")
        assert r.headers.get("retry-after") == "1"
        assert c.get("/health").status_code == 200
    engine.gate.set()
    for t in threads:
        t.join(60)
    for i in range(2):
        assert results[i].status_code == 200
        assert results[i].text.rstrip().endswith("data: [DONE]")
    metrics = httpx.get(live.url + "/metrics").text
    assert 'highspeed:request_errors_total{status="503"} 1.0' in metrics
    wait_idle_and_whole(aengine)


def test_non_streaming_disconnect_aborts(gated):
    engine, aengine, live = gated
    with httpx.Client(base_url=live.url, timeout=0.5) as c:
        with pytest.raises(httpx.TimeoutException):
            c.post(COMPLETIONS, json={"prompt": "long one", "max_tokens": 200, "ignore_eos": True})
    engine.gate.set()
    stats = wait_idle_and_whole(aengine)
    assert stats["num_steps"] < 50, "the abandoned request ran on instead of being aborted"
    metrics = httpx.get(live.url + "/metrics").text
    assert 'highspeed:request_success_total{finished_reason="abort"}' in metrics


def test_still_serving_after_abuse(server, shared_engine, http):
    for path, body, *_ in BAD_REQUESTS[:10]:
        post_raw(http, path, json.dumps(body).encode())
    r = http.post(COMPLETIONS, json={"prompt": "still alive?", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
    assert http.get("/health").status_code == 200
    wait_idle_and_whole(shared_engine)


def test_unparsable_bodies(http):
    # Nesting deeper than the parser's recursion limit, and an integer too long to convert.
    assert_error(post_raw(http, COMPLETIONS, b"[" * 100_000 + b"]" * 100_000), 400)
    assert_error(post_raw(http, COMPLETIONS, b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"), 400)
    r = http.post(COMPLETIONS, content=b"prompt=hi", headers={"content-type": "application/x-www-form-urlencoded"})
    assert_error(r, 400)


def test_streaming_disconnect_aborts_at_once(server, shared_engine):
    wait_idle_and_whole(shared_engine)
    steps_before = shared_engine.stats()["num_steps"]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        with c.stream("POST", COMPLETIONS, json={"prompt": "tell me everything", "max_tokens": 200,
                                                 "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i >= 4:
                    break    # hang up with ~195 tokens still to go
    stats = wait_idle_and_whole(shared_engine)
    assert stats["num_steps"] - steps_before < 100, "the stream's request kept running after the client left"
