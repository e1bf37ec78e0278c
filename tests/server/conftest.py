"""Fixtures for the server tests: a tiny checkpoint, real LLMEngines on it, and live uvicorn servers on loopback."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Iterator

import pytest
import uvicorn

from highspeed.config import EngineConfig
from highspeed.engine.async_engine import AsyncLLMEngine
from highspeed.engine.engine import LLMEngine
from highspeed.server.app import build_app

ARCH = "glm4_moe"
MODEL_NAME = "tiny-moe"
MAX_MODEL_LEN = 256
ENGINE_OPTIONS: dict[str, Any] = dict(device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=16,
                                      num_kv_blocks=256, max_num_seqs=64, max_num_batched_tokens=1024,
                                      load_progress=False)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A GLM-4 MoE checkpoint (shared expert, grouped routing, QK-norm) with its tokenizer and chat template."""
    from tests.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(ARCH, tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture(scope="session")
def make_engine(tiny_checkpoint: str) -> Callable[..., LLMEngine]:
    def make(**overrides: Any) -> LLMEngine:
        return LLMEngine(EngineConfig(model=tiny_checkpoint, **{**ENGINE_OPTIONS, **overrides}))

    return make


class LiveServer:
    """uvicorn on 127.0.0.1 (a free port chosen by the OS) in a daemon thread."""

    def __init__(self, app: Any):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3, limit_concurrency=1000)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="session")
def shared_engine(make_engine: Callable[..., LLMEngine]) -> Iterator[AsyncLLMEngine]:
    aengine = AsyncLLMEngine(make_engine())
    yield aengine
    aengine.shutdown()


@pytest.fixture(scope="session")
def server(shared_engine: AsyncLLMEngine) -> Iterator[LiveServer]:
    live = LiveServer(build_app(shared_engine, MODEL_NAME))
    yield live
    live.stop()


class GatedEngine:
    """The real engine, but each step waits for the test to open a gate: requests pile up deterministically."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.gate = threading.Event()

    def step(self) -> Any:
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return self._engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def wait_idle_and_whole(aengine: AsyncLLMEngine, timeout: float = 20.0) -> dict[str, Any]:
    """Wait for every request to be gone, then check that no KV block leaked; returns the final stats."""
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        stats = aengine.stats()
        if (stats["frontend_in_flight"] == 0 and not aengine.engine.has_unfinished_requests()
                and stats.get("num_free_kv_blocks") == stats.get("num_kv_blocks")
                and stats.get("num_requests_running") == 0 and stats.get("num_requests_waiting") == 0):
            aengine.engine.pool.check_whole()   # the loop thread is idle: reading the pool is safe
            return stats
        time.sleep(0.05)
    raise AssertionError(f"the engine did not come back whole: {stats}")
