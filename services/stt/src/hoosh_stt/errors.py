"""Errors the STT service answers with. Each carries its gRPC status and the
OpenAI-style type/code/param the edge puts in the error envelope (trailing
metadata ``hoosh-error-*``, as the router sends them)."""

from __future__ import annotations

import grpc
from hoosh_common.grpc_errors import error_metadata


class SttError(Exception):
    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    error_type: str = "api_error"
    error_code: str = "internal_error"
    http_status: int = 500  # what a client of the edge sees (recorded in failure events)

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if code is not None:
            self.error_code = code

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return error_metadata(self.error_type, self.error_code, self.param, self.retry_after)


class InvalidRequest(SttError):
    status = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"
    error_code = "invalid_request"
    http_status = 400


class InvalidAudio(InvalidRequest):
    """The upload is empty, not audio, or cut short."""

    error_code = "invalid_value"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, param="file", code=code)


class AudioTooShort(InvalidAudio):
    error_code = "audio_too_short"


class AudioTooLong(InvalidAudio):
    """Longer than the duration limit: 400, refused before the audio is decoded
    (OpenAI answers an over-long file with 400 ``invalid_request_error`` too)."""

    error_code = "audio_too_long"


class AudioTooLarge(InvalidRequest):
    """Over the byte limit; the edge answers 413 for this code."""

    error_code = "request_too_large"
    http_status = 413

    def __init__(self, message: str) -> None:
        super().__init__(message, param="file")


class PoolNotFound(InvalidRequest):
    error_code = "pool_not_found"


class ModelNotFound(SttError):
    status = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"
    error_code = "model_not_found"
    http_status = 404


class BudgetExhausted(SttError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "insufficient_quota"
    error_code = "budget_exhausted"
    http_status = 429


class RateLimited(SttError):
    """The caller's key is over its own RPM, TPM or concurrency limit: 429 with
    Retry-After at the edge (the router's type and code for the same refusal)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"
    error_code = "rate_limit_exceeded"
    http_status = 429


class Overloaded(SttError):
    """The transcription queue is full. RESOURCE_EXHAUSTED on the wire; the edge
    answers 503 for ``stt_overloaded`` (a capacity problem, not the client's quota)."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "api_error"
    error_code = "stt_overloaded"
    http_status = 503


class Unavailable(SttError):
    """A dependency (the budget's Redis) cannot be reached; the budget's own code is ``budget_unavailable``."""

    status = grpc.StatusCode.UNAVAILABLE
    error_type = "api_error"
    error_code = "upstream_unavailable"
    http_status = 503


class EngineFailure(SttError):
    status = grpc.StatusCode.INTERNAL
    error_type = "api_error"
    error_code = "engine_error"
    http_status = 500


class ClientCancelled(SttError):
    status = grpc.StatusCode.CANCELLED
    error_type = "api_error"
    error_code = "client_disconnected"
    http_status = 499


class EngineUnavailable(RuntimeError):
    """An engine cannot start here (whisperx missing, a model path that holds no model)."""
