"""AsyncLLMEngine: the engine's step loop in its own thread, asyncio iterators in front of it.

The step loop never waits for HTTP handling, tokenization or detokenization of the front end: those run on the
event loop while this thread keeps calling ``LLMEngine.step()``. The engine itself is single-threaded, so every
call into it (add, abort, step, stats) happens on the loop thread; the event loop talks to it only through a
command queue, and outputs come back through each request's ``asyncio.Queue`` via ``call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

# One exception for "queue full" whether the front end or the engine's own admission bound refuses a request.
from highspeed.engine.engine import QueueFullError
from highspeed.outputs import RequestOutput
from highspeed.sampling import SamplingParams

if TYPE_CHECKING:
    from highspeed.config import EngineConfig
    from highspeed.engine.engine import LLMEngine

__all__ = ["AsyncLLMEngine", "EngineDeadError", "EngineStepError", "QueueFullError"]

logger = logging.getLogger(__name__)

# How often the loop refreshes its stats snapshot while busy (stats() walks the scheduler, not free per step).
_STATS_PERIOD_S = 0.05
# How long the idle loop blocks on the command queue before it rechecks the stop flag.
_IDLE_POLL_S = 0.5


class EngineDeadError(RuntimeError):
    """The engine loop has stopped (shut down, or crashed outside a step); nothing more can be served."""


class EngineStepError(RuntimeError):
    """A step failed while this request was in flight; the request was aborted, the loop lives on."""


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False   # set by the loop thread once the first output arrived (no longer "waiting")


class AsyncLLMEngine:
    """Thread-safe asyncio front of one ``LLMEngine``.

    ``generate`` yields ``RequestOutput``s as steps produce them; leaving the iterator early (client disconnect,
    ``aclose``, task cancellation) aborts the request so its KV blocks are freed on the next loop turn.
    """

    def __init__(self, engine: "LLMEngine", max_waiting_requests: int | None = None, start: bool = True):
        self.engine = engine
        cfg = getattr(engine, "config", None)
        if max_waiting_requests is None:
            max_waiting_requests = getattr(cfg, "max_waiting_requests", 4096)
        self.max_waiting_requests = int(max_waiting_requests)
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._stats: dict[str, Any] = {}
        self._stats_time = 0.0
        self._steps = 0
        self._thread: threading.Thread | None = None
        if start:
            self.start()

    @classmethod
    def from_config(cls, config: "EngineConfig", max_waiting_requests: int | None = None) -> "AsyncLLMEngine":
        from highspeed.engine.engine import LLMEngine

        return cls(LLMEngine(config), max_waiting_requests=max_waiting_requests)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._refresh_stats()
        self._thread = threading.Thread(target=self._run, name="highspeed-engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; every request still in flight gets ``EngineDeadError``."""
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)
        if self._dead is None:
            self._dead = EngineDeadError("the engine was shut down")
        self._fail_all(lambda: EngineDeadError("the engine was shut down"), abort=False)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    @property
    def num_waiting(self) -> int:
        """Requests accepted by the front end that have not produced their first output yet."""
        with self._lock:
            return sum(1 for s in self._streams.values() if not s.started)

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def stats(self) -> dict[str, Any]:
        """The latest snapshot of ``LLMEngine.stats()`` (taken on the loop thread) plus front-end counts."""
        snap = dict(self._stats)
        snap["frontend_waiting"] = self.num_waiting
        snap["frontend_in_flight"] = self.num_in_flight
        snap["engine_steps"] = self._steps
        return snap

    # ------------------------------------------------------------------ requests

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Submit one request and yield its outputs until it finishes.

        Raises ``QueueFullError`` at once when too many requests wait, ``EngineDeadError`` when the loop is
        gone, and the engine's own exception (e.g. ``ValueError`` for a prompt it refuses) per request.
        """
        if not self.is_running:
            raise EngineDeadError(f"the engine loop is not running ({self._dead or 'not started'})")
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in flight")
            waiting = sum(1 for s in self._streams.values() if not s.started)
            if waiting >= self.max_waiting_requests:
                raise QueueFullError(
                    f"the server is overloaded: {waiting} requests are waiting "
                    f"(limit {self.max_waiting_requests}); retry later")
            self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt, params, priority))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True   # the loop already dropped it from the engine
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                # Cancelled, closed early or the consumer stopped: free the sequences and their KV blocks.
                self._commands.put(("abort", request_id))

    def abort(self, request_id: str) -> None:
        """Thread-safe; a request that already finished is ignored."""
        with self._lock:
            self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))

    # ------------------------------------------------------------------ the loop thread

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.engine.has_unfinished_requests():
                    self._refresh_stats()   # idle: the snapshot is exact (the soak test reads the KV pool from it)
                    self._drain_commands(block=True)
                    continue
                self._drain_commands(block=False)
                if self.engine.has_unfinished_requests() and not self._stop.is_set():
                    self._step()
        except BaseException as e:  # a bug outside step(): stop serving loudly rather than hang clients
            logger.exception("engine loop crashed")
            self._dead = EngineDeadError(f"the engine loop crashed: {e!r}")
            self._fail_all(lambda: EngineDeadError(f"the engine loop crashed: {e!r}"), abort=False)

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=_IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, cmd: tuple[Any, ...]) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, prompt, params, priority = cmd
            if self._stream(rid) is None:
                return   # cancelled before the loop saw it
            try:
                self.engine.add_request(rid, prompt, params, priority=priority)
            except Exception as e:  # bad input the engine refused: that request fails, nobody else notices
                self._deliver(rid, e, final=True)
        elif kind == "abort":
            try:
                self.engine.abort_request(cmd[1])
            except Exception:  # unknown or already finished: nothing to free
                logger.debug("abort of %s ignored", cmd[1], exc_info=True)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            # We cannot tell which request broke the step: fail every request in flight (each sees the error)
            # and abort them so the engine's state and KV pool are clean for the next request.
            logger.exception("engine step failed; aborting the requests in flight")
            self._fail_all(lambda: EngineStepError(f"the engine failed while running this request: {e!r}"),
                           abort=True)
            self._refresh_stats()
            return
        self._steps += 1
        for out in outputs:
            self._deliver(out.request_id, out, final=out.finished)
        now = time.monotonic()
        if now - self._stats_time >= _STATS_PERIOD_S:
            self._refresh_stats(now)

    def _stream(self, rid: str) -> _Stream | None:
        with self._lock:
            return self._streams.get(rid)

    def _deliver(self, rid: str, item: RequestOutput | BaseException, final: bool) -> None:
        with self._lock:
            stream = self._streams.pop(rid, None) if final else self._streams.get(rid)
            if stream is not None:
                stream.started = True
        if stream is None:
            return   # the consumer left; its abort is queued
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            if not final:
                self._commands.put(("abort", rid))

    def _fail_all(self, make_error: Any, abort: bool) -> None:
        with self._lock:
            rids = list(self._streams)
        for rid in rids:
            if abort:
                try:
                    self.engine.abort_request(rid)
                except Exception:
                    logger.debug("abort of %s after a failed step ignored", rid, exc_info=True)
            self._deliver(rid, make_error(), final=True)

    def _refresh_stats(self, now: float | None = None) -> None:
        stats_fn = getattr(self.engine, "stats", None)
        if stats_fn is None:
            return
        try:
            self._stats = dict(stats_fn())
        except Exception:
            logger.debug("engine.stats() failed", exc_info=True)
        self._stats_time = time.monotonic() if now is None else now
