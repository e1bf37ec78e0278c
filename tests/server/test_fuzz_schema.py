"""Fuzz the live server from its own OpenAPI schema (schemathesis, valid and invalid inputs): never a 5xx, every
error in OpenAI's format, and the server is healthy and whole afterwards."""
from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from highspeed.engine.async_engine import AsyncLLMEngine
from highspeed.server.app import build_app
from tests.server.conftest import MODEL_NAME, LiveServer, wait_idle_and_whole

# Per operation and phase; with schemathesis' coverage phase (boundary values of every field) this is a few
# hundred requests per POST route, about a minute on two cores. Raise it for a deeper run.
MAX_EXAMPLES = int(os.environ.get("HIGHSPEED_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def fuzz_engine(make_engine):
    # A short context bounds the work of any fuzzed request (n up to 128 x at most 64 tokens) on a CPU model.
    aengine = AsyncLLMEngine(make_engine(max_model_len=64, num_kv_blocks=640, max_num_seqs=128))
    yield aengine
    aengine.shutdown()


@pytest.fixture(scope="module")
def fuzz_server(fuzz_engine):
    live = LiveServer(build_app(fuzz_engine, MODEL_NAME))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_dict(fuzz_server.app.openapi())


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fuzz_server):
    response = case.call(base_url=fuzz_server.url, timeout=60)
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}, body


def test_whole_after_fuzzing(fuzz_server, fuzz_engine):
    assert httpx.get(fuzz_server.url + "/health").status_code == 200
    wait_idle_and_whole(fuzz_engine, timeout=60)
