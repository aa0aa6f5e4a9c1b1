"""OpenAI-compatible HTTP server over the batching engine (FastAPI + uvicorn): the wiring and the HTTP edges.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE when `stream`), GET /health, /ready,
/metrics (Prometheus, under the API key), and /admin/experts (list, add, remove at runtime; see `admin_check`).
/docs, /redoc and /openapi.json exist only with `ServerConfig.docs`.

The /v1 request path (which expert, sampling parameters, the answer) is `upcycle.serving.completions.Completions`;
this module adds what surrounds it: body limit, metrics, keys, error objects, health, and a draining shutdown.

Chat prompts use the tokenizer's chat template when it has one; otherwise this documented fallback:
    "{role}: {content}\n" per message, then "assistant:", and generation also stops at "\nuser:".

Errors are OpenAI error objects with the status of `upcycle.serving.errors` (400 malformed / too long, 401 key,
403 forbidden path, 404 unknown model, 410 expert removed, 413 body too large, 429 queue full, 500 corrupt adapter,
503 shutting down / engine stopped / auto chose a removed expert, 504 timeout). No answer carries a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from upcycle.serving.admin import admin_routes
from upcycle.serving.completions import (
    AUTO,
    BASE,
    CONFIDENCE_HEADER,
    EXPERT_HEADER,
    IN_DOMAIN_HEADER,
    Completions,
    completion_routes,
)
from upcycle.serving.config import ServerConfig
from upcycle.serving.engine import Engine
from upcycle.serving.errors import BodyTooLarge, InvalidRequest, NotFound, ServingError, Unauthorized
from upcycle.serving.metrics import make_registry
from upcycle.serving.protocol import error_body
from upcycle.serving.router import ExpertRouter
from upcycle.serving.watch import ExpertDirectoryWatcher

log = logging.getLogger(__name__)
__all__ = ["AUTO", "BASE", "CONFIDENCE_HEADER", "EXPERT_HEADER", "IN_DOMAIN_HEADER", "ServerConfig", "admin_check",
           "create_app", "make_server"]


class _HttpMetrics:
    """Pure ASGI middleware counting responses by route and status (works for streaming responses too)."""

    ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/admin/experts", "/health", "/ready",
              "/metrics")

    def __init__(self, app, counter) -> None:
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = next((r for r in self.ROUTES if scope["path"].startswith(r)), "other")

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class _BodyLimit:
    """Pure ASGI middleware answering 413 to a body over `max_bytes`, before the app parses (or buffers) any of it.

    It reads the body itself (ours are small JSON) and replays it to the app, so the limit holds with or without a
    Content-Length. Past the limit the rest is read and dropped, up to `DISCARD_BYTES`, so that the client, which
    is still sending, gets to read the 413 instead of a reset connection.
    """

    DISCARD_BYTES = 64 << 20

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more and size <= self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        if size > self.max_bytes:
            chunks.clear()
            while more and size <= self.DISCARD_BYTES:
                message = await receive()
                size += len(message.get("body", b""))
                more = message["type"] == "http.request" and message.get("more_body", False)
            error = BodyTooLarge(f"the request body is larger than this server's limit of {self.max_bytes} bytes "
                                 "(upcycle serve --server.max_body_bytes)")
            await _error_response(error)(scope, receive, send)
            return
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later calls wait for a disconnect, as they would without us
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class _AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message quoting a client's string can never fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error_response(error: ServingError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return _AsciiJSONResponse(error_body(error), status_code=error.status, headers=headers)


def _bearer_check(key: str | None, what: str) -> Callable[[Request], None]:
    """A FastAPI dependency accepting `Authorization: Bearer <key>` (anything when `key` is None)."""

    def check(http: Request) -> None:
        if key is None:
            return
        scheme, _, token = http.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise Unauthorized(f"missing or incorrect {what} (send 'Authorization: Bearer <key>')")

    return check


def admin_check(config: ServerConfig) -> Callable[[Request], None] | None:
    """The dependency guarding /admin, or None when /admin must not be served.

    With `admin_key` it takes that key only. Without it, admin is served only to a server listening on localhost,
    and takes the API key as before (none when there is none): elsewhere, anyone with an inference key could
    otherwise delete experts or point one at any file the server can read.
    """
    if not config.enable_admin:
        return None
    if config.admin_key:
        return _bearer_check(config.admin_key, "admin key")
    if config.local_only:
        return _bearer_check(config.api_key, "API key")
    return None


def _install_error_handlers(app: FastAPI) -> None:
    """Every error becomes an OpenAI error object; unexpected ones a 500 naming the exception type, never a trace."""

    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, error: ServingError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        if first.get("type") == "json_invalid":
            return _error_response(InvalidRequest(f"the body is not valid JSON: {first.get('ctx', {}).get('error')}"))
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "the body is invalid")
        return _error_response(InvalidRequest(message, param=where or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            return _error_response(NotFound("no such route"))
        detail = str(error.detail)
        if error.status_code == 400 and "parsing the body" in detail:  # FastAPI's answer to e.g. a RecursionError
            detail = "the body could not be parsed as JSON (nested too deeply?)"
        body = ServingError(detail)
        body.status, body.type = error.status_code, "invalid_request_error"
        return _error_response(body)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error_response(ServingError(f"internal error: {type(error).__name__}"))


def _health_routes(app: FastAPI, engine: Engine, registry, require_key: Callable) -> None:
    """/health (is the engine alive?), /ready (may traffic come?) and /metrics (under the API key)."""

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.is_dead:
            reason = engine.failure or "the engine thread is not running"
            return JSONResponse({"status": "error", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if engine.is_dead:
            return JSONResponse({"status": "dead", "reason": engine.failure or "the engine thread is not running"},
                                status_code=503)
        if app.state.draining or not engine.is_running:
            return JSONResponse({"status": "draining" if app.state.draining else "starting"}, status_code=503)
        return JSONResponse({"status": "ready", "queue_depth": engine.queue_depth, "running": len(engine.running)})

    @app.get("/metrics", dependencies=[Depends(require_key)])
    async def metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _lifespan(engine: Engine, watcher: ExpertDirectoryWatcher | None, drain_timeout_s: float):
    """Start the engine (and the watcher) with the app; on shutdown, drain the engine for `drain_timeout_s`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.draining = False
        engine.start()
        if watcher is not None:
            watcher.start()
        yield
        app.state.draining = True
        if watcher is not None:
            watcher.stop()
        await asyncio.to_thread(engine.stop, True, drain_timeout_s)

    return lifespan


def create_app(engine: Engine, config: ServerConfig | None = None, router: ExpertRouter | None = None,
               on_expert: Callable[[str], Awaitable[None]] | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; its lifespan starts and drains the engine (and the directory watcher).

    `router` enables model "auto". `on_expert(expert)` is awaited once a request's expert is known, before it is
    queued (the Ray Serve deployment uses it to load the expert through Serve's model multiplexing).
    """
    config = config or ServerConfig()
    registry, http_counter = make_registry(engine)
    watcher = ExpertDirectoryWatcher(config.watch_dir, engine.cache, config.watch_interval_s) \
        if config.watch_dir and engine.cache is not None else None
    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="upcycle experts", lifespan=_lifespan(engine, watcher, config.drain_timeout_s), **docs)
    app.state.draining = False
    app.state.engine = engine
    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(_HttpMetrics, counter=http_counter)  # outermost: it also counts the 413s
    _install_error_handlers(app)
    require_key = _bearer_check(config.api_key, "API key")
    _health_routes(app, engine, registry, require_key)
    app.include_router(completion_routes(Completions(engine, config, router, on_expert), require_key))
    admin = admin_check(config)
    if admin is not None:
        app.include_router(admin_routes(engine, admin, config.adapter_roots))
    return app


SHUTDOWN_GRACE_S = 5
"""Seconds uvicorn waits beyond the drain timeout, so the 503s of requests cut by the drain reach their clients."""


class UpcycleServer(uvicorn.Server):
    """uvicorn.Server whose shutdown (SIGTERM, Ctrl-C, `begin_shutdown`) drains the engine itself.

    /ready turns 503 at once; running requests get `drain_timeout_s` to finish; then the engine fails what is left
    with a 503 (a JSON body, or a last SSE error event on a stream), which is written before uvicorn's own, later
    deadline would cut the connections (a bare plain-text 500, or a stream ending without a word).
    """

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._app = app
        self.drain_timeout_s = drain_timeout_s
        self._drain: threading.Thread | None = None

    def handle_exit(self, sig, frame) -> None:
        self._begin_drain()
        super().handle_exit(sig, frame)

    def begin_shutdown(self) -> None:
        """What SIGTERM does, callable from another thread (tests, embedding)."""
        self._begin_drain()
        self.should_exit = True

    def _begin_drain(self) -> None:
        self._app.state.draining = True
        if self._drain is None:  # a second signal must not start a second drain
            engine: Engine = self._app.state.engine
            self._drain = threading.Thread(target=engine.stop, args=(True, self.drain_timeout_s), daemon=True,
                                           name="upcycle-drain")
            self._drain.start()


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, drain_timeout_s: float = 30.0,
                log_level: str = "info") -> UpcycleServer:
    """A uvicorn server for `app` that drains in-flight requests for up to `drain_timeout_s` on shutdown."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=math.ceil(drain_timeout_s) + SHUTDOWN_GRACE_S)
    return UpcycleServer(config, app, drain_timeout_s)
