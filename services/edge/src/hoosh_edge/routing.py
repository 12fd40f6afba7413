"""What every route module shares: the per-process state, body parsing, gRPC metadata,
the documented error responses."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import orjson
from hoosh_common.telemetry import inject_metadata
from opentelemetry import trace
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .auth import Tenancy
from .clients import Clients
from .config import Settings
from .errors import INVALID_JSON_MESSAGE, InvalidRequestError, MappedError, to_api_error, validation_error
from .protocol import ErrorResponse
from .serving_chat import ServingChat
from .serving_embeddings import ServingEmbeddings
from .serving_transcription import ServingTranscription

M = TypeVar("M", bound=BaseModel)

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request",
        401: "Missing, wrong, revoked or expired API key",
        403: "The key's scope does not hold this pool, model or route",
        404: "Unknown model, pool or URL",
        413: "Body over the size limit",
        429: "Budget exhausted or rate limited (see Retry-After)",
        502: "A backend failed",
        503: "No backend available",
        504: "A backend timed out",
    }.items()
}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is parsed by hand."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


@dataclass(slots=True)
class EdgeState:
    """What the routes need, built once per process."""

    settings: Settings
    clients: Clients
    tenancy: Tenancy
    chat: ServingChat = field(init=False)
    transcription: ServingTranscription = field(init=False)
    embeddings: ServingEmbeddings = field(init=False)

    def __post_init__(self) -> None:
        timeout = self.settings.edge_request_timeout_seconds
        self.chat = ServingChat(self.clients.router, timeout=timeout)
        self.transcription = ServingTranscription(self.clients.stt, timeout=timeout)
        self.embeddings = ServingEmbeddings(self.clients.router, timeout=timeout)


def edge(request: Request) -> EdgeState:
    state: EdgeState = request.app.state.edge
    return state


def request_id(request: Request) -> str:
    return str(request.state.request_id)


def grpc_metadata(request: Request) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id(request)), *inject_metadata())


def annotate_span(**attributes: str) -> None:
    """Add hoosh attributes to the request's span."""
    trace.get_current_span().set_attributes(attributes)


async def parse_body(request: Request, model: type[M]) -> M:
    """Read and validate a JSON body; bad JSON or a bad field is a 400 naming the field."""
    return validate_json(await request.body(), model)


def validate_json(body: bytes, model: type[M]) -> M:
    """Validate a JSON body; bad JSON or a bad field is a 400 naming the field."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequestError(INVALID_JSON_MESSAGE) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise MappedError(validation_error(exc.errors(include_url=False), data)) from None


async def call_budget(
    call: Awaitable[Any], *, overrides: Mapping[grpc.StatusCode, tuple[int, str | None]] | None = None
) -> Any:
    """Await a budget RPC; an unknown pool is ``pool_not_found`` (404)."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise MappedError(to_api_error(exc, not_found_code="pool_not_found", overrides=overrides)) from exc
