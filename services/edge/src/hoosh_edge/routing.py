"""What every route module shares: the per-process state, body parsing, gRPC metadata,
the documented error responses."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import orjson
from hoosh_common.telemetry import request_metadata
from opentelemetry import trace
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .auth import Tenancy
from .clients import Clients
from .config import Settings
from .errors import INVALID_JSON_MESSAGE, InvalidRequestError, MappedError, to_api_error, validation_error
from .json_depth import DEFAULT_MAX_JSON_DEPTH, exceeds_depth
from .protocol import ErrorResponse
from .responses_store import ResponsesStore
from .serving_chat import ServingChat
from .serving_embeddings import ServingEmbeddings
from .serving_responses import ServingResponses
from .serving_transcription import ServingTranscription
from .uploads import UploadSpool

M = TypeVar("M", bound=BaseModel)

ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Invalid request: a bad JSON body, field, parameter or model id (`param` names it)",
    401: "Missing, wrong, revoked or expired API key",
    403: "The key's scope does not hold this pool, model or route",
    404: "Unknown model, pool, key, reservation or URL",
    409: "Conflicts with the current state (the code says which)",
    413: "Body over the size limit",
    429: "Budget exhausted or rate limited (see Retry-After)",
    500: "An unexpected error inside the gateway (never a traceback)",
    502: "A backend failed",
    503: "A backend or the key and budget store (Redis) is unavailable (`budget_unavailable`)",
    504: "A backend timed out",
}
BACKEND = (502, 503, 504)  # what any route that calls a backend can answer


def errors(*statuses: int, **descriptions: str) -> dict[int | str, dict[str, Any]]:
    """``responses`` of a route: each status with the error envelope. The statuses every
    route can answer (413, 500; and 401, 503 where a key is needed) are added to the
    document by openapi.py. ``descriptions`` override by status (``s503=...``)."""
    return {
        status: {
            "model": ErrorResponse,
            "description": descriptions.get(f"s{status}", ERROR_DESCRIPTIONS[status]),
        }
        for status in sorted(set(statuses))
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
    responses: ServingResponses = field(init=False)
    uploads: UploadSpool = field(init=False)

    def __post_init__(self) -> None:
        self.uploads = UploadSpool(self.settings.edge_upload_dir, self.settings.edge_upload_max_spool_bytes)
        timeout = self.settings.edge_request_timeout_seconds
        self.chat = ServingChat(self.clients.router, timeout=timeout, tunnel=self.clients.tunnel)
        self.transcription = ServingTranscription(self.clients.stt, timeout=timeout)
        self.embeddings = ServingEmbeddings(self.clients.router, timeout=timeout)
        # Stored responses live in the budget's Redis (HOOSH_REDIS_URL), with the edge's user.
        store = ResponsesStore(
            self.tenancy.limits_redis, self.settings.responses_key_prefix, self.settings.responses_ttl_seconds
        )
        self.responses = ServingResponses(
            self.chat,
            store,
            self.settings.responses_background_poll_seconds,
            self.settings.responses_max_conversation_bytes,
            background_lease_seconds=self.settings.responses_background_lease_seconds,
            max_background=self.settings.responses_max_background,
            max_background_per_key=self.settings.responses_max_background_per_key,
        )


def edge(request: Request) -> EdgeState:
    state: EdgeState = request.app.state.edge
    return state


def request_id(request: Request) -> str:
    return str(request.state.request_id)


def grpc_metadata(request: Request) -> tuple[tuple[str, str], ...]:
    return request_metadata(request_id(request))


def annotate_span(**attributes: str) -> None:
    """Add hoosh attributes to the request's span."""
    trace.get_current_span().set_attributes(attributes)


async def parse_body(request: Request, model: type[M]) -> M:
    """Read and validate a JSON body; bad JSON or a bad field is a 400 naming the field."""
    return validate_json(await request.body(), model, max_depth=edge(request).settings.edge_max_json_depth)


def too_deep(limit: int) -> InvalidRequestError:
    return InvalidRequestError(
        f"The JSON body nests arrays and objects more than {limit} levels deep.", code="json_too_deep"
    )


def validate_json(body: bytes, model: type[M], *, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> M:
    """Validate a JSON body; bad JSON, a body nested deeper than ``max_depth`` or a bad
    field is a 400 (the last naming the field)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in exc.msg:  # orjson stops at 1,024 levels
            raise too_deep(max_depth) from None
        raise InvalidRequestError(INVALID_JSON_MESSAGE) from None
    if exceeds_depth(body, max_depth):
        raise too_deep(max_depth)
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
