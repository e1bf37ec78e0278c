"""AsyncLLMEngine on a real engine: streaming, abort on cancel/close, per-request errors, a loop that survives."""
from __future__ import annotations

import asyncio
from typing import Any

import pytest

from highspeed.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineStepError, QueueFullError
from highspeed.sampling import SamplingParams
from tests.server.conftest import MAX_MODEL_LEN, GatedEngine, wait_idle_and_whole


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture
def aengine(make_engine):
    a = AsyncLLMEngine(make_engine())
    yield a
    a.shutdown()


async def collect(a: AsyncLLMEngine, prompt: Any, params: SamplingParams, rid: str) -> list:
    return [out async for out in a.generate(prompt, params, rid)]


def test_stream_deltas_add_up(aengine):
    outs = asyncio.run(collect(aengine, "Hello there", greedy(12), "a"))
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    final = outs[-1].outputs[0]
    assert "".join(o.outputs[0].delta_text for o in outs) == final.text
    assert sum(len(o.outputs[0].delta_token_ids) for o in outs) == len(final.token_ids) == 12
    wait_idle_and_whole(aengine)


def test_many_concurrent_requests(aengine):
    async def main() -> list:
        return await asyncio.gather(*(collect(aengine, f"prompt number {i}", greedy(4 + i % 5), f"r{i}")
                                      for i in range(16)))

    results = asyncio.run(main())
    for i, outs in enumerate(results):
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4 + i % 5
    wait_idle_and_whole(aengine)


@pytest.mark.parametrize("how", ["cancel", "aclose"])
def test_leaving_early_aborts(aengine, how):
    async def main() -> None:
        gen = aengine.generate("A long story", greedy(MAX_MODEL_LEN - 16), "long")
        first = await gen.__anext__()
        assert not first.finished
        if how == "aclose":
            await gen.aclose()
        else:
            async def consume() -> None:
                async for _ in gen:
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    stats = wait_idle_and_whole(aengine)
    assert stats["frontend_in_flight"] == 0


def test_bad_request_fails_alone(aengine):
    async def main() -> None:
        good = asyncio.create_task(collect(aengine, "fine", greedy(6), "good"))
        with pytest.raises(ValueError, match="context"):
            await collect(aengine, [1] * (MAX_MODEL_LEN + 5), greedy(4), "too-long")
        with pytest.raises(ValueError, match="already in flight"):
            await asyncio.gather(collect(aengine, "x", greedy(30), "dup"), collect(aengine, "y", greedy(3), "dup"))
        assert (await good)[-1].finished

    asyncio.run(main())
    wait_idle_and_whole(aengine)


class FlakyEngine:
    """The real engine, whose next step raises once when armed."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.armed = False

    def step(self) -> Any:
        if self.armed:
            self.armed = False
            raise RuntimeError("simulated device fault")
        return self._engine.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def test_step_error_surfaces_and_loop_lives(make_engine):
    flaky = FlakyEngine(make_engine())
    a = AsyncLLMEngine(flaky)  # type: ignore[arg-type]
    try:
        async def main() -> None:
            gen = a.generate("doomed", greedy(40), "doomed")
            await gen.__anext__()
            flaky.armed = True
            with pytest.raises(EngineStepError, match="simulated device fault"):
                async for _ in gen:
                    pass
            outs = await collect(a, "afterwards", greedy(5), "after")
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5

        asyncio.run(main())
        assert a.is_running
        wait_idle_and_whole(a)
    finally:
        a.shutdown()


def test_queue_full_and_shutdown(make_engine):
    gated = GatedEngine(make_engine())
    a = AsyncLLMEngine(gated, max_waiting_requests=1)  # type: ignore[arg-type]

    async def main() -> None:
        waiting = asyncio.create_task(collect(a, "first", greedy(3), "first"))
        while a.num_waiting < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError):
            await collect(a, "second", greedy(3), "second")
        gated.gate.set()
        assert (await waiting)[-1].finished
        gated.gate.clear()
        stuck = asyncio.create_task(collect(a, "third", greedy(3), "third"))
        while a.num_waiting < 1:
            await asyncio.sleep(0.01)
        gated.gate.set()   # let the loop leave its step so shutdown can join it
        await asyncio.to_thread(a.shutdown)
        with pytest.raises(EngineDeadError):
            await collect(a, "late", greedy(3), "late")
        try:
            outs = await asyncio.wait_for(stuck, 10)   # it may have finished before the shutdown...
            assert outs[-1].finished
        except EngineDeadError:                         # ...or be told the engine is gone: never hang
            pass

    asyncio.run(main())
    assert not a.is_running
