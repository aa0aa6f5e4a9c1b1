"""The request path of the OpenAI API: /v1/models, /v1/completions and /v1/chat/completions (SSE when `stream`).

A request goes: encode the prompt (off the event loop) -> `resolve` the expert its `model` names -> `sampling`
parameters per prompt -> `submit` to the engine -> `respond` with one JSON body or a stream of server-sent events.

`model` picks the adapter: "base" uses none, "auto" asks the `ExpertRouter` (whole request text), an expert name
forces that expert. With "auto" the request field `top_k` (default: the server's --routing.top_k, 1) mixes the k
nearest experts when the router can (`MixingRouter`), and the router's out-of-domain guard may send the request to the
base model or a mixture. Every answer says where it went: header `x-upcycle-expert` and body field `expert` (the
experts comma-separated, or "base"), headers `x-upcycle-in-domain` and `x-upcycle-confidence` (when the router gives
one), and body fields `experts`, `weights`, `in_domain` and `confidence`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from upcycle.serving.config import ServerConfig
from upcycle.serving.engine import Delta, Engine, Event, Failed, Finished
from upcycle.serving.errors import (
    Cancelled,
    ExpertUnavailable,
    InvalidRequest,
    Overloaded,
    PromptTooLong,
    RequestTimeout,
    ServingError,
    UnknownModel,
)
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
from upcycle.serving.router import AUTO, BASE, ExpertRouter, RouteDecision, route_requests
from upcycle.serving.sampling import SamplingParams

log = logging.getLogger(__name__)

EXPERT_HEADER = "x-upcycle-expert"
IN_DOMAIN_HEADER = "x-upcycle-in-domain"
CONFIDENCE_HEADER = "x-upcycle-confidence"
Body = CompletionRequest | ChatCompletionRequest


class Completions:
    """Answers the /v1 requests of one server: which expert, which sampling parameters, and the response."""

    def __init__(self, engine: Engine, config: ServerConfig, router: ExpertRouter | None = None,
                 on_expert: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.engine, self.config, self.router, self.on_expert = engine, config, router, on_expert
        if router is not None:
            unserved = sorted(set(router.experts) - set(self.experts()))
            if unserved:  # not fatal: an expert can still be added through /admin or the watched directory
                log.warning("model 'auto' can choose %d experts this server does not serve (%s)", len(unserved),
                            ", ".join(unserved[:3]) + (", ..." if len(unserved) > 3 else ""))

    # -- models -------------------------------------------------------------------------------------------------------
    def experts(self) -> list[str]:
        """The expert names served now."""
        return self.engine.cache.experts() if self.engine.cache is not None else []

    def is_served(self, expert: str) -> bool:
        return self.engine.cache is not None and self.engine.cache.is_registered(expert)

    def models(self) -> dict[str, Any]:
        """The /v1/models list: base, auto (with a router), then every expert."""
        cards = [model_card(BASE, "base")] + ([model_card(AUTO, "auto")] if self.router is not None else [])
        return {"object": "list", "data": cards + [model_card(e, "expert") for e in self.experts()]}

    def model(self, model_id: str) -> dict[str, Any]:
        """The card of one model, or UnknownModel."""
        if model_id == BASE or (model_id == AUTO and self.router is not None):
            return model_card(model_id, model_id)
        if self.is_served(model_id):
            return model_card(model_id, "expert")
        raise UnknownModel(f"the model '{model_id}' does not exist", param="model")

    async def resolve(self, model: str, text: str, top_k: int | None = None) -> RouteDecision:
        """Where `model` sends this text: no expert (base), one, or (model "auto") the router's decision."""
        if model != AUTO and top_k not in (None, 1):
            raise InvalidRequest(f"top_k applies to model 'auto' only; model '{model}' is a single model, so leave "
                                 "top_k out or send model 'auto'", param="top_k")
        if model == BASE:
            return RouteDecision(())
        if model == AUTO:
            if self.router is None:
                raise UnknownModel("model 'auto' needs a router and this server was started without one",
                                   param="model")
            [decision] = await asyncio.to_thread(route_requests, self.router, [text], top_k)
            for expert in decision.experts:
                if not self.is_served(expert):
                    raise _routed_to_removed(expert)
            return decision
        if self.is_served(model):
            return RouteDecision((model,), (1.0,))
        raise UnknownModel(f"the model '{model}' does not exist", param="model")

    # -- the two endpoints --------------------------------------------------------------------------------------------
    async def complete(self, http: Request, body: CompletionRequest):
        """POST /v1/completions."""
        body.refuse_unsupported("logprobs", "echo", "best_of", "suffix", "logit_bias")
        prompts = body.prompts()
        if body.stream and len(prompts) != 1:
            raise InvalidRequest("streaming takes a single prompt", param="prompt")
        ids, route_text = await asyncio.to_thread(_encode_completion, self.engine, prompts)  # keeps /health live
        return await self.run(http, body, ids, route_text, [], chat=False)

    async def chat(self, http: Request, body: ChatCompletionRequest):
        """POST /v1/chat/completions."""
        body.refuse_unsupported("logprobs", "top_logprobs", "tools", "tool_choice", "logit_bias", "functions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids, extra_stop, route_text = await asyncio.to_thread(_encode_chat, self.engine, messages)
        return await self.run(http, body, [ids], route_text, extra_stop, chat=True)

    # -- generation ---------------------------------------------------------------------------------------------------
    def sampling(self, body: Body, max_tokens: int | None, prompt_len: int, extra_stop: list[str]) -> SamplingParams:
        """The sampling parameters of one prompt, after the server's limits on prompt and answer length."""
        limit = self.config.max_prompt_tokens or self.engine.max_seq_len - 1
        if prompt_len > limit:
            raise PromptTooLong(f"the prompt has {prompt_len} tokens; this server accepts at most {limit}",
                                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt")
        if max_tokens is not None and max_tokens > self.config.max_tokens_limit:
            raise InvalidRequest(f"max_tokens may be at most {self.config.max_tokens_limit}", param="max_tokens")
        if max_tokens is None:
            max_tokens = max(1, min(self.engine.config.default_max_tokens, self.engine.room_for(prompt_len)))
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                              stop=body.stop_list() + extra_stop, seed=body.seed, ignore_eos=body.ignore_eos)

    async def run(self, http: Request, body: Body, prompts: list[list[int]], route_text: str, extra_stop: list[str],
                  chat: bool):
        """Resolve the experts, queue every prompt, and answer (all prompts share the experts and the deadline)."""
        if http.app.state.draining:
            raise Overloaded("the server is shutting down")
        decision = await self.resolve(body.model, route_text, body.top_k)
        for expert in decision.experts if self.on_expert is not None else ():
            await self.on_expert(expert)
        max_tokens = body.token_limit() if chat else body.max_tokens
        params = [self.sampling(body, max_tokens, len(p), extra_stop) for p in prompts]
        deadline = time.monotonic() + self.config.request_timeout_s
        clients: list[_Client] = []
        try:
            for ids, p in zip(prompts, params, strict=True):
                clients.append(self.submit(ids, decision, p, body.model))
            meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": now(),
                    "model": body.model, **_routing_fields(decision)}
            headers = _routing_headers(decision)
            if body.stream:
                response = await _stream(http, clients[0], deadline, meta, chat, body, headers)
                clients = []  # the stream owns the request now
                return response
            results = [await _collect(http, c, deadline) for c in clients]
            return JSONResponse(completion_body(meta, results, chat), headers=headers)
        finally:
            for client in clients:
                client.cancel()

    def submit(self, ids: list[int], decision: RouteDecision, params: SamplingParams, model: str) -> _Client:
        """Queue one prompt; its events arrive in the returned client's queue."""
        client = _Client(asyncio.get_running_loop())
        try:
            client.request = self.engine.submit(ids, decision.experts or None, params, client.sink,
                                                decision.weights or None)
        except UnknownModel:
            removed = [e for e in decision.experts if not self.is_served(e)]
            if model == AUTO and removed:  # removed between routing and queueing
                raise _routed_to_removed(removed[0]) from None
            raise
        return client


def completion_routes(service: Completions, require_key: Callable[[Request], None]) -> APIRouter:
    """The /v1 routes, each under the API key, each handled by `service`."""
    routes = APIRouter(dependencies=[Depends(require_key)])

    @routes.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return service.models()

    @routes.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        return service.model(model_id)

    @routes.post("/v1/completions")
    async def completions(http: Request, body: CompletionRequest):
        return await service.complete(http, body)

    @routes.post("/v1/chat/completions")
    async def chat_completions(http: Request, body: ChatCompletionRequest):
        return await service.chat(http, body)

    return routes


# -- prompts ----------------------------------------------------------------------------------------------------------
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


def _routing_fields(decision: RouteDecision) -> dict[str, Any]:
    """The body's fields saying where the request went (beside the OpenAI ones)."""
    return {"expert": decision.label, "experts": list(decision.experts),
            "weights": list(decision.mixture_weights),
            "in_domain": decision.in_domain, "confidence": decision.confidence}


def _routing_headers(decision: RouteDecision) -> dict[str, str]:
    """The response headers saying where the request went."""
    headers = {EXPERT_HEADER: decision.label, IN_DOMAIN_HEADER: "true" if decision.in_domain else "false"}
    if decision.confidence is not None:
        headers[CONFIDENCE_HEADER] = f"{decision.confidence:.4f}"
    return headers


def _routed_to_removed(expert: str) -> ExpertUnavailable:
    return ExpertUnavailable(f"model 'auto' chose '{expert}', which this server no longer serves (it was removed); "
                             "send the request to another model, such as 'base', or add the expert back",
                             param="model")


# -- one engine request, seen from the event loop ---------------------------------------------------------------------
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


# -- responses --------------------------------------------------------------------------------------------------------
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


async def _stream(http: Request, client: _Client, deadline: float, meta: dict[str, Any], chat: bool, body: Body,
                  headers: dict[str, str]) -> StreamingResponse:
    """The SSE response of one request; an error before its first event still gets a status code."""
    first = await client.next(http, deadline)
    if isinstance(first, Failed):
        raise first.error
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _sse(http, client, first, deadline, meta, chat, include_usage)
    return _EventStream(events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})


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
