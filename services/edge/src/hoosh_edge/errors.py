"""The one error envelope and the one function that maps every exception onto it.

Every failure a client sees is ``{"error": {"message", "type", "param", "code"}}`` with
the HTTP status an OpenAI client expects. :func:`to_api_error` is the single mapping:
the edge's own errors, request validation, gRPC statuses from the router, budget and
audit services (with the ``hoosh-error-*`` trailing metadata overriding type, code and
param), Starlette's 404/405, and anything unexpected (500, never a traceback).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
from fastapi.exceptions import RequestValidationError
from hoosh_common.grpc_errors import metadata_dict
from hoosh_metering.errors import BudgetUnavailable, RateLimited
from hoosh_tenancy import InvalidKeyRecord, KeyNotFound, TenancyUnavailable
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

INVALID_REQUEST = "invalid_request_error"
API_ERROR = "api_error"  # the router's type for 5xx, kept for one vocabulary across services
RATE_LIMIT = "rate_limit_error"
BUDGET_UNAVAILABLE = "budget_unavailable"  # Redis (budget or key store) unreachable or too slow

INVALID_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. The body must be valid JSON (Content-Type: application/json)."
)
INTERNAL_MESSAGE = "The server had an error while processing your request."


class EdgeError(Exception):
    """An error the edge raises itself; subclasses fix the status, type and code."""

    status_code: int = 500
    error_type: str = API_ERROR
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})


class InvalidRequestError(EdgeError):
    status_code = 400
    error_type = INVALID_REQUEST
    code = None


class AuthenticationError(EdgeError):
    status_code = 401
    error_type = INVALID_REQUEST
    code = "invalid_api_key"


class PermissionDeniedError(EdgeError):
    """A valid key asked for something its scope does not hold: a pool, a model, an admin
    route. OpenAI answers 403 with ``invalid_request_error``; the code says which."""

    status_code = 403
    error_type = INVALID_REQUEST
    code = "insufficient_scope"


class RateLimitError(EdgeError):
    """Too much at once from this key (or on this replica): 429, OpenAI's rate_limit_error."""

    status_code = 429
    error_type = RATE_LIMIT
    code = "rate_limit_exceeded"


class ServiceUnavailableError(EdgeError):
    status_code = 503
    error_type = API_ERROR
    code = "service_unavailable"


class NotFoundError(EdgeError):
    status_code = 404
    error_type = INVALID_REQUEST
    code = None


class ConflictError(EdgeError):
    status_code = 409
    error_type = INVALID_REQUEST
    code = "conflict"


class MethodNotAllowedError(EdgeError):
    status_code = 405
    error_type = INVALID_REQUEST
    code = "method_not_allowed"


class RequestTooLargeError(EdgeError):
    status_code = 413
    error_type = INVALID_REQUEST
    code = "request_too_large"


class ClientClosedRequestError(EdgeError):
    """The client went away before the reply; nobody reads this answer, it ends the request."""

    status_code = 499
    error_type = INVALID_REQUEST
    code = "client_closed_request"


class MappedError(EdgeError):
    """An already mapped error, raised again (a route that maps a gRPC error its own way)."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message, param=error.param, code=error.code, headers=error.headers)
        self.error = error


@dataclass(slots=True)
class APIError:
    """A failure as the client sees it, plus what only the log sees."""

    status: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    log_detail: str | None = None  # internal detail (transport errors), never sent

    def body(self) -> dict[str, dict[str, Any]]:
        """The OpenAI error envelope."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json(self) -> bytes:
        return orjson.dumps(self.body())

    def sse_event(self) -> bytes:
        """The envelope as one SSE event (a failure after a stream started)."""
        return b"data: " + self.json() + b"\n\n"


# gRPC status -> (HTTP status, type, code). Anything missing maps to 502 upstream_error.
_GRPC_MAP: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, INVALID_REQUEST, None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, INVALID_REQUEST, None),
    grpc.StatusCode.OUT_OF_RANGE: (400, INVALID_REQUEST, None),
    grpc.StatusCode.NOT_FOUND: (404, INVALID_REQUEST, "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, INVALID_REQUEST, "conflict"),
    grpc.StatusCode.ABORTED: (409, INVALID_REQUEST, "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, RATE_LIMIT, "rate_limit_exceeded"),
    grpc.StatusCode.UNAUTHENTICATED: (401, INVALID_REQUEST, "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: (403, INVALID_REQUEST, "permission_denied"),
    grpc.StatusCode.CANCELLED: (499, INVALID_REQUEST, "client_closed_request"),
    grpc.StatusCode.UNAVAILABLE: (503, API_ERROR, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, API_ERROR, "timeout"),
    grpc.StatusCode.INTERNAL: (502, API_ERROR, "upstream_error"),
    grpc.StatusCode.UNKNOWN: (502, API_ERROR, "upstream_error"),
    grpc.StatusCode.DATA_LOSS: (502, API_ERROR, "upstream_error"),
    grpc.StatusCode.UNIMPLEMENTED: (502, API_ERROR, "upstream_error"),
}

# Said instead of the gRPC details when the status came from the transport (no
# hoosh-error-* metadata): those details name internal addresses.
_TRANSPORT_MESSAGES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: "The service is unavailable: an internal backend could not be reached.",
    grpc.StatusCode.DEADLINE_EXCEEDED: "The request timed out inside the gateway.",
    grpc.StatusCode.INTERNAL: "An internal backend failed.",
    grpc.StatusCode.UNKNOWN: "An internal backend failed.",
    grpc.StatusCode.DATA_LOSS: "An internal backend failed.",
    grpc.StatusCode.UNIMPLEMENTED: "An internal backend does not implement this call.",
    grpc.StatusCode.CANCELLED: "The request was cancelled.",
}


# Application codes (hoosh-error-code) whose HTTP status is not their gRPC status's:
# a full STT queue is RESOURCE_EXHAUSTED on the wire but a capacity problem (503), not
# the client's quota (429); an STT upload over its limit is 413.
_CODE_STATUS: dict[str, int] = {"stt_overloaded": 503, "request_too_large": 413}


def _from_rpc_error(
    exc: grpc.aio.AioRpcError, not_found_code: str, overrides: Mapping[grpc.StatusCode, tuple[int, str | None]]
) -> APIError:
    code = exc.code()
    status, error_type, error_code = _GRPC_MAP.get(code, (502, API_ERROR, "upstream_error"))
    if code in overrides:
        status, error_code = overrides[code]
    if code == grpc.StatusCode.NOT_FOUND:
        error_code = not_found_code
    metadata = metadata_dict(exc.trailing_metadata())
    details = exc.details() or ""
    from_application = "hoosh-error-code" in metadata or "hoosh-error-type" in metadata
    message = details
    log_detail = None
    if not from_application and code in _TRANSPORT_MESSAGES:
        message, log_detail = _TRANSPORT_MESSAGES[code], details
    if not message:
        message = f"The request failed ({code.name.lower()})."
    headers: dict[str, str] = {}
    retry_after = metadata.get("retry-after")
    if retry_after:
        headers["Retry-After"] = retry_after
    application_code = metadata.get("hoosh-error-code")
    if application_code in _CODE_STATUS:
        status = _CODE_STATUS[application_code]
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not from_application and "message larger than max" in details:
        # gRPC's own message-size bound (32 MiB), not anyone's quota: a request too large
        # to send is the client's (413); a reply too large to receive is the backend's (502).
        if details.startswith("Sent"):
            status, error_type, error_code = 413, INVALID_REQUEST, "request_too_large"
            message = "The request is too large to forward (over 32 MiB once encoded)."
        else:
            status, error_type, error_code = 502, API_ERROR, "upstream_error"
            message = "An internal backend's reply was too large."
        log_detail = details
    return APIError(
        status=status,
        message=message,
        type=metadata.get("hoosh-error-type") or error_type,
        param=metadata.get("hoosh-error-param") or None,
        code=application_code or error_code,
        headers=headers,
        log_detail=log_detail,
    )


def _format_loc(loc: Sequence[int | str], data: Any, extra_field: str | None, missing: bool) -> str | None:
    """Turn a pydantic error location into OpenAI's ``messages[0].content`` form.

    pydantic puts union labels in locations (a discriminator tag such as ``user``, a
    member such as ``str``); walking the input drops every step that is not a real key
    or index. The last step is kept when it names a missing field.
    """
    parts: list[str] = []
    current: Any = data
    walkable = data is not None
    for position, item in enumerate(loc):
        last = position == len(loc) - 1
        if isinstance(item, int):
            parts.append(f"[{item}]")
            if walkable and isinstance(current, list) and 0 <= item < len(current):
                current = current[item]
            else:
                walkable = False
            continue
        if walkable:
            if isinstance(current, dict) and item in current:
                current = current[item]
            elif last and missing and not extra_field and isinstance(current, dict):
                walkable = False  # a missing field: keep its name
            else:
                continue  # a union label
        elif not item.isidentifier():
            continue  # no input to walk: drop what cannot be a field name (list[...], literal[...])
        parts.append(item if not parts else f".{item}")
    if extra_field:
        parts.append(extra_field if not parts else f".{extra_field}")
    text = "".join(parts)
    return text or None


def _code_for(error_type: str) -> str:
    if error_type in ("missing", "union_tag_not_found"):
        return "missing_required_parameter"
    if error_type.endswith(("_type", "_parsing")) or error_type in ("model_attributes_type", "union_tag_invalid"):
        return "invalid_type"
    return "invalid_value"


def validation_error(errors: Sequence[Mapping[str, Any]], data: Any = None, *, skip_prefix: bool = False) -> APIError:
    """A 400 naming the first invalid parameter.

    ``data`` is the decoded body, used to tell field names from union labels in error
    locations. ``skip_prefix`` drops FastAPI's leading ``body``/``query``/``path`` step.
    Several errors on the same parameter (one per union member) are joined.
    """
    if not errors:
        return APIError(400, "Invalid request.", INVALID_REQUEST)
    formatted: list[tuple[str | None, Mapping[str, Any]]] = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if skip_prefix and loc and loc[0] in ("body", "query", "path", "header", "cookie"):
            loc = loc[1:]
        ctx = error.get("ctx") or {}
        extra = ctx.get("field")
        if error.get("type") in ("union_tag_not_found", "union_tag_invalid"):
            extra = str(ctx.get("discriminator", "")).strip("'") or None
        formatted.append((_format_loc(loc, data, extra, error.get("type") == "missing"), error))
    # A union reports one error per member: prefer the deepest one under the first
    # error's parameter (a missing part field says more than "not a string").
    param = formatted[0][0]
    if param is not None:
        related = [
            p for p, _ in formatted if p is not None and (p == param or p.startswith((param + ".", param + "[")))
        ]
        param = max(related, key=len)
    same = [error for p, error in formatted if p == param]
    # Of a union's errors, those about the value beat "should be a <type>" ones.
    by_value = [error for error in same if _code_for(str(error.get("type", ""))) != "invalid_type"]
    same = by_value or same
    first = same[0]
    messages: list[str] = []
    for error in same:
        text = str(error["msg"]).removeprefix("Value error, ")
        if text not in messages:
            messages.append(text)
    if first.get("type") in ("missing", "union_tag_not_found"):
        message = f"Missing required parameter: '{param}'." if param else "Missing required parameter."
    else:
        joined = "; or ".join(messages)
        message = f"Invalid value for '{param}': {joined}." if param else f"Invalid request body: {joined}."
    return APIError(400, message, INVALID_REQUEST, param=param, code=_code_for(str(first.get("type", ""))))


KEY_STORE_UNAVAILABLE = "The key store (Redis) is unavailable; try again shortly."
BUDGET_STORE_UNAVAILABLE = "The budget store (Redis) is unavailable; try again shortly."


def to_api_error(
    exc: BaseException,
    *,
    not_found_code: str = "model_not_found",
    overrides: Mapping[grpc.StatusCode, tuple[int, str | None]] | None = None,
) -> APIError:
    """Map any exception to the client-facing error (status, envelope fields, headers).

    ``not_found_code`` is the code of a gRPC NOT_FOUND without hoosh-error-code metadata
    (a model for the router; the budget routes pass ``pool_not_found``). ``overrides``
    changes the (HTTP status, default code) of some gRPC statuses for one route group
    (the admin pool routes answer FAILED_PRECONDITION with 409).
    """
    if isinstance(exc, MappedError):
        return exc.error
    if isinstance(exc, EdgeError):
        return APIError(exc.status_code, exc.message, exc.error_type, exc.param, exc.code, dict(exc.headers))
    if isinstance(exc, grpc.aio.AioRpcError):
        return _from_rpc_error(exc, not_found_code, overrides or {})
    if isinstance(exc, RateLimited):  # a key's RPM / TPM / concurrency, checked at the edge
        return APIError(
            429,
            exc.message,
            RATE_LIMIT,
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, exc.retry_after_seconds))},
        )
    if isinstance(exc, BudgetUnavailable):
        return APIError(503, BUDGET_STORE_UNAVAILABLE, API_ERROR, code=BUDGET_UNAVAILABLE, log_detail=exc.message)
    if isinstance(exc, TenancyUnavailable):
        # The same Redis outage the budget answers with budget_unavailable: one code for clients.
        return APIError(503, KEY_STORE_UNAVAILABLE, API_ERROR, code=BUDGET_UNAVAILABLE, log_detail=exc.message)
    if isinstance(exc, KeyNotFound):
        return APIError(404, exc.message, INVALID_REQUEST, code="key_not_found")
    if isinstance(exc, InvalidKeyRecord):
        return APIError(400, exc.message, INVALID_REQUEST, code="invalid_value")
    if isinstance(exc, RequestValidationError):
        return validation_error(exc.errors(), getattr(exc, "body", None), skip_prefix=True)
    if isinstance(exc, ValidationError):
        return validation_error(exc.errors())
    if isinstance(exc, orjson.JSONDecodeError):
        return APIError(400, INVALID_JSON_MESSAGE, INVALID_REQUEST)
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return APIError(404, str(exc.detail), INVALID_REQUEST, code="unknown_url")
        if exc.status_code == 405:
            return APIError(405, str(exc.detail), INVALID_REQUEST, code="method_not_allowed")
        error_type = INVALID_REQUEST if exc.status_code < 500 else API_ERROR
        return APIError(exc.status_code, str(exc.detail), error_type, headers=dict(exc.headers or {}))
    return APIError(500, INTERNAL_MESSAGE, API_ERROR, code="internal_error", log_detail=repr(exc))
