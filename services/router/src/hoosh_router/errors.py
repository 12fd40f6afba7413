"""Errors the router answers with. Each carries its gRPC status and the
OpenAI-style type/code the edge puts in the error envelope, and whether it is
worth another attempt on the same backend (``retryable``) or on the next
candidate (``fallback``)."""

from __future__ import annotations

from typing import Any

import grpc
from hoosh_common.grpc_errors import error_metadata


class RouterError(Exception):
    status: grpc.StatusCode = grpc.StatusCode.INTERNAL
    error_type: str = "api_error"
    error_code: str = "internal_error"
    # Class defaults; an instance may override them (a 5xx UpstreamError is retryable, malformed output is not).
    retryable: bool = False
    fallback: bool = False
    # Whether the failure says the backend is sick; None: it is when it is worth another
    # attempt (retryable or fallback). An upstream 404 for a model it does not know may
    # fall back, yet says nothing about the provider's health.
    blames_backend: bool | None = None
    # The provider accepted the call (answered 200) before it failed: a body over
    # hoosh's bounds, malformed output, a connection cut mid-answer. It read the prompt
    # and may bill it, so a request that ends on such a failure pays its prompt.
    accepted: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        code: str | None = None,
        retryable: bool | None = None,
        fallback: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if code is not None:
            self.error_code = code
        if retryable is not None:
            self.retryable = retryable
        if fallback is not None:
            self.fallback = fallback

    @property
    def backend_fault(self) -> bool:
        """Whether this failure counts against the backend's health (breaker)."""
        if self.blames_backend is not None:
            return self.blames_backend
        return self.retryable or self.fallback

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return error_metadata(self.error_type, self.error_code, self.param, self.retry_after)


class InvalidRequest(RouterError):
    status = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"
    error_code = "invalid_request"


class ModelNotFound(RouterError):
    """No backend serves the model, or a provider answered 404 for it (then ``fallback``
    lets the next candidate try). Never counts against a provider's breaker."""

    status = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"
    error_code = "model_not_found"
    blames_backend = False


class PoolNotFound(InvalidRequest):
    error_code = "pool_not_found"


class BudgetExhausted(RouterError):
    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "insufficient_quota"
    error_code = "budget_exhausted"


class BudgetUnavailable(RouterError):
    """Redis (or the budget service) is unreachable or too slow: nothing is admitted free."""

    status = grpc.StatusCode.UNAVAILABLE
    error_type = "api_error"
    error_code = "budget_unavailable"

    def __init__(self, message: str = "The budget store is unavailable; try again shortly", **kwargs: Any) -> None:
        kwargs.setdefault("retry_after", 1)
        super().__init__(message, **kwargs)


class EventsUnavailable(RouterError):
    """Neither NATS nor the local outbox can take more events: a request now could not
    be recorded, so none is admitted until the outbox drains (503, Retry-After)."""

    status = grpc.StatusCode.UNAVAILABLE
    error_type = "api_error"
    error_code = "events_unavailable"

    def __init__(self, message: str = "Events cannot be recorded right now; try again shortly", **kwargs: Any) -> None:
        kwargs.setdefault("retry_after", 5)
        super().__init__(message, **kwargs)


class RateLimited(RouterError):
    """A provider said 429 (retryable there), every candidate is over its hoosh limit, or
    the caller's key is over its own RPM, TPM or concurrency limit."""

    status = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"
    error_code = "rate_limit_exceeded"
    retryable = True
    fallback = True
    # A client always gets a Retry-After with a 429, also when the provider sent none.
    DEFAULT_RETRY_AFTER = 1

    def __init__(self, message: str, *, retry_after: int | None = None, **kwargs: Any) -> None:
        super().__init__(
            message, retry_after=self.DEFAULT_RETRY_AFTER if retry_after is None else retry_after, **kwargs
        )


class UpstreamError(RouterError):
    """The backend answered with something broken, or failed.

    Default: not retried on the same backend (malformed output tends to repeat) but
    the next candidate may answer. A 5xx status is constructed with ``retryable=True``.
    """

    status = grpc.StatusCode.INTERNAL
    error_type = "api_error"
    error_code = "upstream_error"
    fallback = True


class UpstreamUnavailable(RouterError):
    status = grpc.StatusCode.UNAVAILABLE
    error_type = "api_error"
    error_code = "upstream_unavailable"
    retryable = True
    fallback = True


class NoHealthyBackend(UpstreamUnavailable):
    """Every candidate's breaker is open."""

    error_code = "no_healthy_backend"
    retryable = False
    fallback = False


class UpstreamTimeout(RouterError):
    status = grpc.StatusCode.DEADLINE_EXCEEDED
    error_type = "api_error"
    error_code = "upstream_timeout"
    retryable = True
    fallback = True


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
