"""OpenAI-compatible HTTP server over the batching engine (FastAPI + uvicorn).

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE when `stream`), GET /health, /ready,
/metrics (Prometheus, under the API key), and /admin/experts (list, add, remove at runtime; see `admin_check`).
/docs, /redoc and /openapi.json exist only with `ServerConfig.docs`.

`model` picks the adapter: "base" uses none, "auto" asks the `SequenceRouter` (whole request text, one expert),
an expert id forces that expert. Every answer names the expert that produced it: header `x-upcycle-expert` and the
body field `expert` ("base" when none).

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
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from upcycle.serving.admin import admin_routes
from upcycle.serving.engine import Delta, Engine, Event, Failed, Finished
from upcycle.serving.errors import (
    BodyTooLarge,
    Cancelled,
    ExpertUnavailable,
    InvalidRequest,
    NotFound,
    Overloaded,
    PromptTooLong,
    RequestTimeout,
    ServingError,
    Unauthorized,
    UnknownModel,
)
from upcycle.serving.metrics import make_registry
from upcycle.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    completion_body,
    error_body,
    model_card,
    now,
    render_chat,
    stream_chunk,
    usage,
)
from upcycle.serving.router import AUTO, BASE, SequenceRouter
from upcycle.serving.sampling import SamplingParams
from upcycle.serving.watch import ExpertDirectoryWatcher

log = logging.getLogger(__name__)

EXPERT_HEADER = "x-upcycle-expert"


@dataclass
class ServerConfig:
    """HTTP-side limits and switches (the engine has its own: batch, queue, context)."""

    api_key: str | None = None
    """Bearer key required on /v1 and /metrics; None disables auth (allowed only on localhost)."""
    admin_key: str | None = None
    """Bearer key of /admin (a separate key: an inference client must not manage experts). Without it /admin is
    served only when `local_only`, under `api_key`."""
    local_only: bool = True
    """The server listens on a loopback interface only (`upcycle serve` sets it from --host)."""
    adapter_roots: tuple[str, ...] = ()
    """Directories /admin/experts may add adapters from (symlinks leading out are refused); empty: none."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted; a bigger one gets 413 before any of it is parsed."""
    docs: bool = False
    """Serve /docs, /redoc and /openapi.json (they list every route, admin included)."""
    max_prompt_tokens: int | None = None
    """Longest prompt accepted (tokens); None: the engine's context minus one."""
    max_tokens_limit: int = 4096
    """Largest max_tokens a request may ask for."""
    request_timeout_s: float = 300.0
    """A request unfinished after this long is cancelled and answered 504."""
    enable_admin: bool = True
    """Serve /admin/experts (add / remove experts at runtime), subject to `admin_key` / `local_only`."""
    watch_dir: str | None = None
    """Directory of expert dirs to keep in sync with (new ones registered, removed ones unregistered)."""
    watch_interval_s: float = 2.0
    """How often `watch_dir` is scanned."""
    drain_timeout_s: float = 30.0
    """On shutdown, how long running requests may take to finish."""


class _Client:
    """The asyncio side of one engine request: the sink pushes events into a queue from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.request = None
        self.done = False

    def sink(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next(self, http: Request, deadline: float) -> Event:
        """The next event; raises RequestTimeout past `deadline` and Cancelled if the client disconnected."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RequestTimeout("the request did not finish in time")
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=min(1.0, remaining))
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    raise Cancelled("client disconnected") from None
                continue
            if isinstance(event, Failed | Finished):
                self.done = True
            return event

    def cancel(self) -> None:
        if self.request is not None and not self.done:
            self.request.cancel()


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
                                 "(upcycle serve --max_body_bytes)")
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


def _encode_completion(engine: Engine, prompts: list[str | list[int]]) -> tuple[list[list[int]], str]:
    """Token ids of each prompt and the text the router reads. Slow for long texts: call it off the event loop."""
    for p in prompts:
        if not isinstance(p, str) and p:
            engine.check_token_ids(p)  # before decode, which cannot take a negative or huge id either
    ids = [engine.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    texts = [p if isinstance(p, str) else engine.tokenizer.decode(p) for p in prompts]
    return ids, "\n".join(texts)


def _encode_chat(engine: Engine, messages: list[dict[str, str]]) -> tuple[list[int], list[str], str]:
    """(prompt ids, extra stop strings, text the router reads) of a chat. Slow: call it off the event loop."""
    prompt, extra_stop, templated = render_chat(engine.tokenizer, messages)
    # a chat template writes its own BOS and role markers; the fallback text gets the usual special tokens
    ids = engine.tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    return ids, extra_stop, "\n".join(m["content"] for m in messages)  # the words, not the template's scaffolding


def create_app(engine: Engine, config: ServerConfig | None = None, router: SequenceRouter | None = None,
               on_expert: Callable[[str], Awaitable[None]] | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; its lifespan starts and drains the engine (and the directory watcher).

    `on_expert(expert)` is awaited once a request's expert is known, before it is queued (the Ray Serve deployment
    uses it to load the expert through Serve's model multiplexing).
    """
    config = config or ServerConfig()
    registry, http_counter = make_registry(engine)
    watcher = ExpertDirectoryWatcher(config.watch_dir, engine.cache, config.watch_interval_s) \
        if config.watch_dir and engine.cache is not None else None

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
        await asyncio.to_thread(engine.stop, True, config.drain_timeout_s)

    docs = {} if config.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="upcycle introvert experts", lifespan=lifespan, **docs)
    app.state.draining = False
    app.state.engine = engine
    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(_HttpMetrics, counter=http_counter)  # outermost: it also counts the 413s
    _install_error_handlers(app)
    require_key = _bearer_check(config.api_key, "API key")
    _health_routes(app, engine, registry, require_key)

    # -- models -----------------------------------------------------------------------------------------------------
    def experts() -> list[str]:
        return engine.cache.experts() if engine.cache is not None else []

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models() -> dict[str, Any]:
        cards = [model_card(BASE, "base")] + ([model_card(AUTO, "auto")] if router is not None else [])
        return {"object": "list", "data": cards + [model_card(e, "expert") for e in experts()]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(require_key)])
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id == BASE or (model_id == AUTO and router is not None):
            return model_card(model_id, model_id)
        if engine.cache is not None and engine.cache.is_registered(model_id):
            return model_card(model_id, "expert")
        raise UnknownModel(f"the model '{model_id}' does not exist", param="model")

    async def resolve(model: str, text: str) -> str | None:
        """The expert answering `model` for this text (None: base)."""
        if model == BASE:
            return None
        if model == AUTO:
            if router is None:
                raise UnknownModel("model 'auto' needs a router and this server was started without one",
                                   param="model")
            [expert] = await asyncio.to_thread(router.route, [text])
            if engine.cache is None or not engine.cache.is_registered(expert):
                raise _routed_to_removed(expert)
            return expert
        if engine.cache is not None and engine.cache.is_registered(model):
            return model
        raise UnknownModel(f"the model '{model}' does not exist", param="model")

    # -- generation -------------------------------------------------------------------------------------------------
    def sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, prompt_len: int,
                 extra_stop: list[str]) -> SamplingParams:
        limit = config.max_prompt_tokens or engine.max_seq_len - 1
        if prompt_len > limit:
            raise PromptTooLong(f"the prompt has {prompt_len} tokens; this server accepts at most {limit}",
                                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt")
        if max_tokens is not None and max_tokens > config.max_tokens_limit:
            raise InvalidRequest(f"max_tokens may be at most {config.max_tokens_limit}", param="max_tokens")
        if max_tokens is None:
            max_tokens = max(1, min(engine.config.default_max_tokens, engine.room_for(prompt_len)))
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              stop=body.stop_list() + extra_stop, seed=body.seed, ignore_eos=body.ignore_eos)

    def submit(ids: list[int], expert: str | None, params: SamplingParams, client: _Client, model: str) -> None:
        try:
            client.request = engine.submit(ids, expert, params, client.sink)
        except UnknownModel:
            if model == AUTO and expert is not None:  # removed between routing and queueing
                raise _routed_to_removed(expert) from None
            raise

    async def run(http: Request, body, prompts: list[list[int]], route_text: str, extra_stop: list[str],
                  chat: bool):
        if app.state.draining:
            raise Overloaded("the server is shutting down")
        expert = await resolve(body.model, route_text)
        if expert is not None and on_expert is not None:
            await on_expert(expert)
        max_tokens = body.token_limit() if chat else body.max_tokens
        params = [sampling(body, max_tokens, len(p), extra_stop) for p in prompts]
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + config.request_timeout_s
        clients = []
        try:
            for ids, p in zip(prompts, params, strict=True):
                client = _Client(loop)
                submit(ids, expert, p, client, body.model)
                clients.append(client)
            headers = {EXPERT_HEADER: expert or BASE}
            meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": now(),
                    "model": body.model, "expert": expert or BASE}
            if body.stream:
                first = await clients[0].next(http, deadline)  # errors before any byte still get a status code
                if isinstance(first, Failed):
                    raise first.error
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                stream = _sse(http, clients[0], first, deadline, meta, chat, include_usage)
                clients = []  # the stream owns the request now
                return _EventStream(stream, media_type="text/event-stream",
                                    headers={**headers, "Cache-Control": "no-cache"})
            results = [await _collect(http, c, deadline) for c in clients]
            return JSONResponse(completion_body(meta, results, chat), headers=headers)
        finally:
            for client in clients:
                client.cancel()

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(http: Request, body: CompletionRequest):
        body.refuse_unsupported("logprobs", "echo", "best_of", "suffix", "logit_bias")
        prompts = body.prompts()
        if body.stream and len(prompts) != 1:
            raise InvalidRequest("streaming takes a single prompt", param="prompt")
        ids, route_text = await asyncio.to_thread(_encode_completion, engine, prompts)  # keeps /health responsive
        return await run(http, body, ids, route_text, [], chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(http: Request, body: ChatCompletionRequest):
        body.refuse_unsupported("logprobs", "top_logprobs", "tools", "tool_choice", "logit_bias", "functions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids, extra_stop, route_text = await asyncio.to_thread(_encode_chat, engine, messages)
        return await run(http, body, [ids], route_text, extra_stop, chat=True)

    admin = admin_check(config)
    if admin is not None:
        app.include_router(admin_routes(engine, admin, config.adapter_roots))

    return app


def _routed_to_removed(expert: str) -> ExpertUnavailable:
    return ExpertUnavailable(f"model 'auto' chose '{expert}', which this server no longer serves (it was removed); "
                             "send the request to another model, such as 'base', or add the expert back",
                             param="model")


async def _collect(http: Request, client: _Client, deadline: float) -> tuple[str, str, int, int]:
    """(text, finish reason, prompt tokens, completion tokens) of a non-streaming request."""
    parts = []
    while True:
        event = await client.next(http, deadline)
        if isinstance(event, Delta):
            parts.append(event.text)
        elif isinstance(event, Failed):
            raise event.error
        else:
            return "".join(parts), event.reason, event.prompt_tokens, event.completion_tokens


async def _sse(http: Request, client: _Client, first: Event, deadline: float, meta: dict[str, Any], chat: bool,
               include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; a disconnecting client cancels the generator, and `finally` frees its batch row."""
    try:
        if chat:
            yield stream_chunk(meta, chat, None, None, first=True)
        event = first
        while True:
            if isinstance(event, Delta):
                if event.text:
                    yield stream_chunk(meta, chat, event.text, None)
            elif isinstance(event, Failed):
                yield f"data: {json.dumps(error_body(event.error))}\n\n"
                return
            else:
                yield stream_chunk(meta, chat, None, event.reason)
                if include_usage:
                    body = {**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
                            "usage": usage(event.prompt_tokens, event.completion_tokens)}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
                return
            try:
                event = await client.next(http, deadline)
            except ServingError as error:
                yield f"data: {json.dumps(error_body(error))}\n\n"
                return
    finally:
        client.cancel()


class _EventStream(StreamingResponse):
    """A StreamingResponse that always closes its generator, so a vanished client's request is cancelled now.

    (With ASGI spec >= 2.4 Starlette just lets the failed send propagate and leaves the generator to the GC.)
    """

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


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
