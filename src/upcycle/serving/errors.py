"""Errors a serving request can end with, each carrying the HTTP status and OpenAI error type the server answers.

They are raised in the cache and the engine (no HTTP there); the server maps them to OpenAI-style bodies
`{"error": {"message", "type", "param", "code"}}` using `status`, `type` and `code`.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: a request failed for a reason worth telling the client."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServingError):
    """The request itself is malformed or asks for something the server does not do."""

    status, type, code = 400, "invalid_request_error", None


class PromptTooLong(ServingError):
    """The prompt (plus max_tokens) does not fit the context the server allows."""

    status, type, code = 400, "invalid_request_error", "context_length_exceeded"


class UnknownModel(ServingError):
    """The `model` names neither base, auto, nor a registered expert."""

    status, type, code = 404, "invalid_request_error", "model_not_found"


class ExpertRemoved(ServingError):
    """The expert was unregistered while the request waited for it."""

    status, type, code = 410, "invalid_request_error", "expert_removed"


class AdapterError(ServingError):
    """An adapter on disk is missing, corrupt or of a kind the server cannot serve; only its requests fail."""

    status, type, code = 500, "server_error", "adapter_load_failed"


class QueueFull(ServingError):
    """Too many requests are waiting; the client should retry later."""

    status, type, code = 429, "rate_limit_error", "queue_full"


class Overloaded(ServingError):
    """The server is shutting down or not ready."""

    status, type, code = 503, "server_error", "unavailable"


class RequestTimeout(ServingError):
    """The request did not finish within the server's time limit."""

    status, type, code = 504, "timeout_error", "timeout"


class Cancelled(ServingError):
    """The client went away; nobody reads this error, it only ends the request."""

    status, type, code = 499, "cancelled", "client_disconnected"


class Unauthorized(ServingError):
    """Missing or wrong API key."""

    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class NotFound(ServingError):
    """No such route or resource."""

    status, type, code = 404, "invalid_request_error", "not_found"


class Forbidden(ServingError):
    """The caller may not do this (e.g. add an adapter from outside the server's adapter roots)."""

    status, type, code = 403, "permission_error", "forbidden"


class ExpertUnavailable(ServingError):
    """`auto` chose an expert this server no longer serves (removed); another model may still answer."""

    status, type, code = 503, "server_error", "expert_unavailable"


class BodyTooLarge(ServingError):
    """The request body exceeds the server's limit."""

    status, type, code = 413, "invalid_request_error", "body_too_large"
