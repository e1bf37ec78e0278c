"""The OpenAI-compatible HTTP server: ``build_app`` (FastAPI factory) and ``serve`` (``highspeed serve``).

Request path: ASGI guard (body size, API key) -> FastAPI validation (protocol.py) -> OpenAIServing
(serving.py) -> AsyncLLMEngine (its own thread) -> response or SSE stream. Every error leaves as OpenAI's error
JSON with a 4xx status (503 when the queue is full); nothing a client sends should produce a 5xx.
"""
from __future__ import annotations

import argparse
import hmac
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from highspeed.engine.async_engine import AsyncLLMEngine
from highspeed.server import protocol as P
from highspeed.server.errors import APIError, error_body, error_response, from_http_status, from_validation_error
from highspeed.server.metrics import ServerMetrics
from highspeed.server.serving import ModelInfo, OpenAIServing

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 8 * 2**20
_ERRORS = {code: {"model": P.ErrorResponse} for code in (400, 401, 404, 413, 503)}


class GuardMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware, which breaks streaming and disconnect detection).

    Refuses bodies over ``max_body_bytes`` with 413 before the app parses them (by Content-Length, or by
    counting a chunked body while buffering it), and checks the API key on /v1/ routes.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, api_key: str | None, on_error: Any):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key
        self.on_error = on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.api_key is not None and scope["path"].startswith("/v1/") and not self._authorized(scope):
            await self._reject(scope, receive, send, APIError(401, "invalid or missing API key; send "
                                                              "'Authorization: Bearer <key>'", code="invalid_api_key"),
                               {"WWW-Authenticate": "Bearer"})
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_big = APIError(413, f"the request body exceeds {self.max_body_bytes} bytes", code="request_too_large")
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await self._reject(scope, receive, send, too_big)
            return
        # Buffer the body (the JSON parser needs all of it anyway) so a chunked upload can be cut off too.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._reject(scope, receive, send, too_big)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")   # JSON on the wire is UTF-8 (RFC 8259); say so instead of a parser error
        except UnicodeDecodeError as e:
            await self._reject(scope, receive, send, APIError(
                400, f"the request body is not valid UTF-8 (byte {e.start})", code="invalid_encoding"))
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # after the body: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    def _authorized(self, scope: Scope) -> bool:
        auth = _header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    async def _reject(self, scope: Scope, receive: Receive, send: Send, err: APIError,
                      headers: dict[str, str] | None = None) -> None:
        self.on_error(err.status)
        # Connection: close, because the unread rest of a refused body would otherwise be parsed as the next request.
        await error_response(err, headers={**(headers or {}), "Connection": "close"})(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def build_app(engine: Any, served_model_name: str | None = None, api_key: str | None = None,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_waiting_requests: int | None = None,
              shutdown_engine: bool = False) -> FastAPI:
    """The FastAPI app over ``engine`` (an ``LLMEngine``, or an ``AsyncLLMEngine`` already wrapping one).

    ``max_waiting_requests`` bounds requests waiting for their first token (beyond it: 503). With
    ``shutdown_engine`` the app stops the engine loop when it shuts down (``serve`` does; tests that share one
    engine between apps do not).
    """
    aengine = engine if isinstance(engine, AsyncLLMEngine) else AsyncLLMEngine(engine, max_waiting_requests)
    if max_waiting_requests is not None:
        aengine.max_waiting_requests = max_waiting_requests
    core = aengine.engine
    name = served_model_name or getattr(core, "model_path", None) or "highspeed"
    info = ModelInfo(name=name, tokenizer=core.tokenizer, tokenize=core.tokenize, max_model_len=int(core.max_model_len),
                     vocab_size=int(core.vocab_size))
    metrics = ServerMetrics(aengine.stats)
    serving = OpenAIServing(aengine, info, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if shutdown_engine:
            aengine.shutdown()

    app = FastAPI(title="highspeed", summary="OpenAI-compatible server for Mixture-of-Experts LLMs",
                  lifespan=lifespan)
    app.state.engine = aengine
    app.state.metrics = metrics
    app.state.model_info = info

    def fail(err: APIError) -> JSONResponse:
        metrics.observe_error(err.status)
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return error_response(err, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return fail(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return fail(from_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return fail(from_http_status(exc.status_code, exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return fail(APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))

    @app.get("/health", responses={503: {"model": P.ErrorResponse}})
    async def health() -> Response:
        if not aengine.is_running:
            return fail(APIError(503, "the engine loop is not running", code="engine_unavailable"))
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=Response)
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=P.ModelList, responses=_ERRORS)
    async def models() -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=info.name, root=getattr(core, "model_path", None),
                                             max_model_len=info.max_model_len)])

    @app.post("/v1/completions", response_model=P.CompletionResponse, responses=_ERRORS)
    async def completions(body: P.CompletionRequest, raw: Request) -> Response:
        return await serving.completions(body, raw)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse, responses=_ERRORS)
    async def chat_completions(body: P.ChatCompletionRequest, raw: Request) -> Response:
        return await serving.chat(body, raw)

    # Before routing: a refused body never reaches FastAPI's parser.
    app.add_middleware(GuardMiddleware, max_body_bytes=max_body_bytes, api_key=api_key,
                       on_error=metrics.observe_error)
    return app


def serve(args: argparse.Namespace) -> int:
    """``highspeed serve``: build the engine from the CLI's engine flags and run uvicorn until interrupted."""
    import uvicorn

    from highspeed.cli import engine_options
    from highspeed.config import EngineConfig
    from highspeed.engine.engine import LLMEngine

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = engine_options(args)
    options["max_waiting_requests"] = args.max_waiting_requests
    engine = LLMEngine(EngineConfig.from_options(**options))
    app = build_app(engine, served_model_name=args.served_model_name or args.model or "highspeed",
                    api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                    max_waiting_requests=args.max_waiting_requests, shutdown_engine=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
