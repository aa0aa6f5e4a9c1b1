"""The OpenAI wire format: request bodies (validated with pydantic) and the JSON the server answers.

Unknown fields are accepted and ignored, as most OpenAI-compatible servers do; fields we cannot honour (n > 1,
logprobs, echo, best_of, suffix, tools) are refused with a 400 rather than silently ignored.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from upcycle.serving.errors import InvalidRequest, ServingError
from upcycle.serving.sampling import SEED_MAX, SEED_MIN


def lone_surrogate_at(value: Any) -> str | None:
    """Dotted path of the first string in a parsed JSON value that holds a lone surrogate, or None.

    JSON may escape one ("\\ud800") though it is no Unicode character: the tokenizer and the UTF-8 encoder both refuse
    it, so it is refused at the edge. Iterative, so a deeply nested body cannot exhaust the stack.
    """
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                # a key on the path may hold one too: the path itself must be printable
                return (where or "the body").encode("ascii", "backslashreplace").decode()
        elif isinstance(item, dict):
            stack.extend((_child(where, key), v) for key, v in item.items())
            stack.extend((f"a key of {where or 'the body'}", key) for key in item)
        elif isinstance(item, list):
            stack.extend((_child(where, i), v) for i, v in enumerate(item))
    return None


def _child(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        where = lone_surrogate_at(data)
        if where is not None:
            raise PydanticCustomError("unicode", "{where} holds a lone surrogate (\\ud800-\\udfff), which is not "
                                      "valid Unicode text; send UTF-8 text", {"where": where})
        return data

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    n: int = 1
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks, load tests)
    top_k: int | None = Field(default=None, ge=1)  # ours: experts mixed by model "auto" (None: the server's default)

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise InvalidRequest("stop takes up to 4 non-empty strings", param="stop")
        return stops

    def refuse_unsupported(self, *names: str) -> None:
        """400 for n > 1 and for any of `names` (extra fields) set to something we would have to ignore."""
        if self.n != 1:
            raise InvalidRequest("only n=1 is supported", param="n")
        extra = self.model_extra or {}
        for name in names:
            value = extra.get(name)
            if value in (None, False, 0, "", [], {}) or (name == "best_of" and value == 1):
                continue
            raise InvalidRequest(f"'{name}' is not supported by this server", param=name)


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of texts or token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt given as token ids
        if not p:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return list(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (text parts of a multi-part content joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise InvalidRequest(f"content parts of type {part.get('type')!r} are not supported",
                                     param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- answers --------------------------------------------------------------------------------------------------------
def error_body(error: ServingError) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(model_id: str, kind: str) -> dict[str, Any]:
    """An entry of GET /v1/models; `kind` (base, auto, expert) is our extra field."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "upcycle", "kind": kind}


def now() -> int:
    return int(time.time())


FALLBACK_CHAT_STOP = "\nuser:"


def render_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[str], bool]:
    """(prompt text, extra stop strings, templated): the tokenizer's chat template, or the fallback
    "{role}: {content}\\n" per message then "assistant:", which also stops at "\\nuser:"."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), [], True
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return text, [FALLBACK_CHAT_STOP], False


def completion_body(meta: dict[str, Any], results: list[tuple[str, str, int, int]], chat: bool) -> dict[str, Any]:
    """The non-streaming answer: one choice per result (text, finish reason, prompt tokens, completion tokens)."""
    prompt_tokens = sum(r[2] for r in results)
    completion_tokens = sum(r[3] for r in results)
    if chat:
        text, reason = results[0][0], results[0][1]
        choices = [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                    "logprobs": None}]
        return {**meta, "object": "chat.completion", "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens)}
    choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
               for i, (text, reason, _, _) in enumerate(results)]
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def stream_chunk(meta: dict[str, Any], chat: bool, text: str | None, reason: str | None, first: bool = False) -> str:
    """One server-sent event of a stream (the first chat chunk carries the assistant role)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
        if text:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        body = {**meta, "object": "chat.completion.chunk", "choices": [choice]}
    else:
        body = {**meta, "object": "text_completion",
                "choices": [{"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}]}
    return f"data: {json.dumps(body)}\n\n"

