"""What the inference service answers with when a request cannot be served.

Engines raise these; ``server.py`` maps each class to a gRPC status and puts
``code`` / ``error_type`` into trailing metadata (``hoosh-error-code``,
``hoosh-error-type``) the same way the router does, so the edge can build an
OpenAI error envelope without parsing messages.
"""

from __future__ import annotations


class InferenceError(Exception):
    """Base class: an error a client may see. ``message`` is safe to show."""

    error_type: str = "api_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidRequest(InferenceError):
    """The request can never succeed as sent (bad parameter, unsupported content)."""

    error_type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus max_tokens does not fit the model's context window."""

    code = "context_length_exceeded"


class ModelNotFound(InferenceError):
    error_type = "invalid_request_error"
    code = "model_not_found"


class QueueFull(InferenceError):
    """Too many requests are already waiting for the engine; retry later."""

    error_type = "rate_limit_error"
    code = "queue_full"


class EngineUnavailable(InferenceError):
    """The engine is shutting down or not loaded."""

    code = "engine_unavailable"


class EngineFailure(InferenceError):
    """The engine broke while generating; the message does not leak internals."""

    code = "engine_error"
