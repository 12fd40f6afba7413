"""Errors the router answers with. Each carries its gRPC status and the
OpenAI-style type/code the edge puts in the error envelope."""

from __future__ import annotations

import grpc


class RouterError(Exception):
    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    error_type: str = "api_error"
    error_code: str = "internal_error"

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
        pairs = [("hoosh-error-type", self.error_type), ("hoosh-error-code", self.error_code)]
        if self.param:
            pairs.append(("hoosh-error-param", self.param))
        if self.retry_after is not None:
            pairs.append(("retry-after", str(self.retry_after)))
        return tuple(pairs)


class InvalidRequest(RouterError):
    status = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"
    error_code = "invalid_request"


class ModelNotFound(RouterError):
    status = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"
    error_code = "model_not_found"


class PoolNotFound(InvalidRequest):
    error_code = "pool_not_found"


class BudgetExhausted(RouterError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "insufficient_quota"
    error_code = "budget_exhausted"


class RateLimited(RouterError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"
    error_code = "rate_limit_exceeded"


class UpstreamError(RouterError):
    """The backend answered with something broken, or failed."""

    status = grpc.StatusCode.INTERNAL
    error_type = "api_error"
    error_code = "upstream_error"


class UpstreamUnavailable(RouterError):
    status = grpc.StatusCode.UNAVAILABLE
    error_type = "api_error"
    error_code = "upstream_unavailable"


class UpstreamTimeout(RouterError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED
    error_type = "api_error"
    error_code = "upstream_timeout"


class ClientCancelled(RouterError):
    status = grpc.StatusCode.CANCELLED
    error_type = "api_error"
    error_code = "client_disconnected"


def http_status_for(error: RouterError) -> int:
    """The HTTP status a client sees for this error (recorded in failure events)."""
    return {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.CANCELLED: 499,
    }.get(error.status, 502)
