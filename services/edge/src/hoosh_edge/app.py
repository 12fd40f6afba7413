"""FastAPI application: thin routes over the serving code and the gRPC clients.

``create_app(settings, clients)`` builds the app. Without ``clients`` the lifespan opens
the gRPC channels at start and closes them at shutdown; with them (tests, embedding)
the caller owns them.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from grpc_health.v1 import health_pb2
from hoosh.audit.v1 import audit_pb2
from hoosh.budget.v1 import budget_pb2
from hoosh.router.v1 import router_pb2
from hoosh.stt.v1 import stt_pb2
from hoosh_common.telemetry import inject_metadata
from opentelemetry import trace
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .clients import Clients, HealthTarget
from .config import Settings
from .errors import (
    INVALID_JSON_MESSAGE,
    ClientClosedRequestError,
    ConflictError,
    EdgeError,
    InvalidRequestError,
    MappedError,
    MethodNotAllowedError,
    NotFoundError,
    to_api_error,
    validation_error,
)
from .middleware import EdgeMiddleware
from .protocol import (
    AuditListResponse,
    CacheStats,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    PoolInfo,
    ProviderHealthList,
    ReadinessResponse,
    TokenCheckRequest,
    TokenCheckResponse,
    TokenReportRequest,
    TokenReportResponse,
    TokenReserveRequest,
    TokenReserveResponse,
    TranscriptionResponse,
    TranscriptionVerboseResponse,
)
from .responses import EventStreamResponse, OrjsonResponse, error_response
from .serving_chat import ChatStream, ServingChat, cache_headers
from .serving_embeddings import ServingEmbeddings, cache_stats_to_dict, provider_health_to_dict
from .serving_transcription import TRANSCRIPTIONS_PATH, ServingTranscription, openapi_body, read_form, validate_form

tracer = trace.get_tracer("hoosh.edge")
log = logging.getLogger(__name__)

try:
    VERSION = importlib.metadata.version("hoosh-edge")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a bare source tree
    VERSION = "0.0.0"

# Kubernetes' default probe timeout is 1 s: a readiness answer must come before it.
HEALTH_CHECK_TIMEOUT_SECONDS = 0.9

M = TypeVar("M", bound=BaseModel)

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request",
        401: "Missing or wrong API key",
        404: "Unknown model, pool or URL",
        413: "Body over the size limit",
        429: "Budget exhausted or rate limited (see Retry-After)",
        502: "A backend failed",
        503: "No backend available",
        504: "A backend timed out",
    }.items()
}

# Bodies are parsed by hand (orjson + pydantic) to control the errors; their schemas (and
# the SSE chunk's) are added to the OpenAPI document here.
_SCHEMA_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    ChatCompletionChunk,
    TokenCheckRequest,
    TokenReserveRequest,
    TokenReportRequest,
    TranscriptionVerboseResponse,
    EmbeddingRequest,
)


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
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
    chat: ServingChat
    transcription: ServingTranscription = field(init=False)
    embeddings: ServingEmbeddings = field(init=False)

    def __post_init__(self) -> None:
        self.transcription = ServingTranscription(self.clients.stt, timeout=self.settings.edge_request_timeout_seconds)
        self.embeddings = ServingEmbeddings(self.clients.router, timeout=self.settings.edge_request_timeout_seconds)


def _edge(request: Request) -> EdgeState:
    state: EdgeState = request.app.state.edge
    return state


def _request_id(request: Request) -> str:
    return str(request.state.request_id)


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


def _metadata(request: Request) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", _request_id(request)), *inject_metadata())


def _annotate_span(**attributes: str) -> None:
    """Add hoosh attributes to the HTTP server span (FastAPI's native telemetry starts it,
    continuing the caller's W3C trace context)."""
    trace.get_current_span().set_attributes(attributes)


async def _call_budget(call: Awaitable[Any]) -> Any:
    """Await a budget RPC; an unknown pool is ``pool_not_found`` (404)."""
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise MappedError(to_api_error(exc, not_found_code="pool_not_found")) from exc


def _pool(pool: budget_pb2.Pool) -> dict[str, Any]:
    return {
        "name": pool.name,
        "capacity": pool.capacity,
        "used": pool.used,
        "reserved": pool.reserved,
        "available": pool.available,
    }


def _model_card(model: router_pb2.Model | stt_pb2.Model) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by or "hoosh"}


def _audit_entry(entry: audit_pb2.AuditEntry) -> dict[str, Any]:
    payload: Any = None
    if entry.payload_json:
        try:
            payload = orjson.loads(entry.payload_json)
        except orjson.JSONDecodeError:
            payload = entry.payload_json  # shown as recorded rather than dropped
    return {
        "seq": entry.seq,
        "timestamp_ms": entry.timestamp_ms,
        "event_id": entry.event_id,
        "subject": entry.subject,
        "stream_seq": entry.stream_seq,
        "payload": payload,
        "prev_mac": entry.prev_mac,
        "mac": entry.mac,
    }


async def _health_of(target: HealthTarget) -> str:
    try:
        reply = await target.stub.Check(
            health_pb2.HealthCheckRequest(service=target.service), timeout=HEALTH_CHECK_TIMEOUT_SECONDS
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        return "UNREACHABLE"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# --------------------------------------------------------------------------- routes

api = APIRouter()


@api.post(
    "/v1/chat/completions",
    response_model=ChatCompletionResponse,
    responses={
        **_ERRORS,
        200: {
            "description": "A chat.completion, or with stream=true an SSE stream of chat.completion.chunk "
            "events ending with `data: [DONE]`",
            "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}}},
        },
    },
    openapi_extra=_json_body(ChatCompletionRequest),
    tags=["chat"],
)
async def create_chat_completion(request: Request) -> Response:
    """Create a chat completion (OpenAI wire format), blocking or streamed.

    Served by ``chat_fast_path`` ahead of the framework; this route documents it."""
    return await serve_chat(_edge(request), await request.body(), _request_id(request), request.receive)


async def serve_chat(state: EdgeState, raw_body: bytes, request_id: str, receive: Receive) -> Response:
    """Validate the body, run the completion, and build its (JSON or SSE) response."""
    body = validate_json(raw_body, ChatCompletionRequest)
    _annotate_span(**{"hoosh.model": body.model, "hoosh.pool": body.pool})
    result = await state.chat.create(body, request_id, receive)
    if isinstance(result, ChatStream):
        return EventStreamResponse(result, headers=cache_headers(result.cache))
    return OrjsonResponse(result.body, headers=cache_headers(result.cache))


@api.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    responses=_ERRORS,
    openapi_extra=_json_body(EmbeddingRequest),
    tags=["embeddings"],
)
async def create_embeddings(request: Request) -> Response:
    """Embed text through any provider that offers embeddings (OpenAI wire format)."""
    body = await parse_body(request, EmbeddingRequest)
    _annotate_span(**{"hoosh.model": body.model, "hoosh.pool": body.pool})
    return OrjsonResponse(await _edge(request).embeddings.create(body, _request_id(request), request.receive))


@api.get("/v1/health/providers", response_model=ProviderHealthList, responses=_ERRORS, tags=["health"])
async def provider_health(request: Request) -> Response:
    """Every backend's circuit breaker as all router replicas share it: state, consecutive
    failures, last error, observed latency and rate limits."""
    edge = _edge(request)
    reply = await edge.clients.router.GetProviderHealth(
        router_pb2.GetProviderHealthRequest(),
        metadata=_metadata(request),
        timeout=edge.settings.edge_rpc_timeout_seconds,
    )
    return OrjsonResponse({"object": "list", "data": [provider_health_to_dict(item) for item in reply.providers]})


@api.get("/v1/cache/stats", response_model=CacheStats, responses=_ERRORS, tags=["cache"])
async def cache_stats(request: Request) -> Response:
    """Response-cache counters (shared by all router replicas)."""
    edge = _edge(request)
    reply = await edge.clients.router.GetCacheStats(
        router_pb2.GetCacheStatsRequest(), metadata=_metadata(request), timeout=edge.settings.edge_rpc_timeout_seconds
    )
    return OrjsonResponse(cache_stats_to_dict(reply))


async def _all_models(request: Request) -> list[router_pb2.Model | stt_pb2.Model]:
    """The router's models, then the speech-to-text ones (an absent STT service adds none)."""
    edge = _edge(request)
    reply, speech = await asyncio.gather(
        edge.clients.router.ListModels(
            router_pb2.ListModelsRequest(), metadata=_metadata(request), timeout=edge.settings.edge_rpc_timeout_seconds
        ),
        edge.transcription.models(),
    )
    models: list[router_pb2.Model | stt_pb2.Model] = list(reply.models)
    seen = {model.id for model in models}
    models += [model for model in speech if model.id not in seen]
    return models


@api.get("/v1/models", response_model=ModelList, responses=_ERRORS, tags=["models"])
async def list_models(request: Request) -> Response:
    """Every model the router can serve, and the speech-to-text models."""
    return OrjsonResponse({"object": "list", "data": [_model_card(model) for model in await _all_models(request)]})


@api.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS, tags=["models"])
async def retrieve_model(request: Request, model: str) -> Response:
    """One model by id (ids may contain '/')."""
    for candidate in await _all_models(request):
        if candidate.id == model:
            return OrjsonResponse(_model_card(candidate))
    raise NotFoundError(f"The model '{model}' does not exist", param="model", code="model_not_found")


@api.post(
    TRANSCRIPTIONS_PATH,
    response_model=TranscriptionResponse,
    responses={
        **_ERRORS,
        200: {
            "description": "response_format json (default) or verbose_json: JSON; text, srt and vtt: text/plain",
            "content": {
                "application/json": {
                    "schema": {"$ref": "#/components/schemas/TranscriptionVerboseResponse"},
                },
                "text/plain": {"schema": {"type": "string"}},
            },
        },
        503: {"model": ErrorResponse, "description": "Speech-to-text is at capacity (see Retry-After) or down"},
    },
    openapi_extra=openapi_body(),
    tags=["audio"],
)
async def create_transcription(request: Request) -> Response:
    """Transcribe audio into the input language (OpenAI's multipart form; files up to 25 MB).

    hoosh's extension: a ``pool`` form field names the token pool charged for the audio
    seconds (default ``"default"``).
    """
    form = await read_form(request)
    try:
        body, upload = validate_form(form)
        _annotate_span(**{"hoosh.model": body.model, "hoosh.pool": body.pool or "default"})
        return await _edge(request).transcription.create(body, upload, _request_id(request), request.receive)
    finally:
        await form.close()  # removes the spooled upload


@api.get("/v1/health", response_model=HealthResponse, tags=["health"])
async def health() -> Response:
    """Liveness: the edge answers. Checks no backend (cheap; Kubernetes polls it)."""
    return OrjsonResponse({"status": "ok", "service": "edge", "version": VERSION})


@api.get(
    "/v1/health/ready",
    response_model=ReadinessResponse,
    responses={503: {"model": ReadinessResponse, "description": "The router does not serve"}},
    tags=["health"],
)
async def ready(request: Request) -> Response:
    """Readiness: grpc.health.v1 of router, budget, audit and stt (when configured).

    200 ``ok`` when all serve; 200 ``degraded`` when the router serves but budget, audit
    or stt does not (chat still works); 503 ``unavailable`` when the router does not.
    """
    targets = _edge(request).clients.health
    names = list(targets)
    statuses = await asyncio.gather(*(_health_of(targets[name]) for name in names))
    checks = dict(zip(names, statuses, strict=True))
    if checks.get("router") != "SERVING":
        return OrjsonResponse({"status": "unavailable", "checks": checks}, status_code=503)
    status = "ok" if all(value == "SERVING" for value in statuses) else "degraded"
    return OrjsonResponse({"status": status, "checks": checks})


@api.get("/v1/tokens/pools", response_model=list[PoolInfo], responses=_ERRORS, tags=["tokens"])
async def list_pools(request: Request) -> Response:
    """Every token pool with its counters."""
    edge = _edge(request)
    reply = await _call_budget(
        edge.clients.budget.ListPools(
            budget_pb2.ListPoolsRequest(), metadata=_metadata(request), timeout=edge.settings.edge_rpc_timeout_seconds
        )
    )
    return OrjsonResponse([_pool(pool) for pool in reply.pools])


@api.post(
    "/v1/tokens/check",
    response_model=TokenCheckResponse,
    responses=_ERRORS,
    openapi_extra=_json_body(TokenCheckRequest),
    tags=["tokens"],
)
async def check_tokens(request: Request) -> Response:
    """Whether a pool can cover ``tokens`` now (reserves nothing)."""
    body = await parse_body(request, TokenCheckRequest)
    edge = _edge(request)
    reply = await _call_budget(
        edge.clients.budget.Check(
            budget_pb2.CheckRequest(pool=body.pool, tokens=body.tokens),
            metadata=_metadata(request),
            timeout=edge.settings.edge_rpc_timeout_seconds,
        )
    )
    return OrjsonResponse({"allowed": reply.allowed, "available": reply.pool.available})


@api.post(
    "/v1/tokens/reserve",
    response_model=TokenReserveResponse,
    responses=_ERRORS,
    openapi_extra=_json_body(TokenReserveRequest),
    tags=["tokens"],
)
async def reserve_tokens(request: Request) -> Response:
    """Reserve tokens in a pool; 200 with ``reserved: false`` when they do not fit.

    The reservation id is the request id (a retried request with the same X-Request-Id
    reserves once); it is leased, so it returns to the pool if never reported.
    """
    body = await parse_body(request, TokenReserveRequest)
    edge = _edge(request)
    timeout = edge.settings.edge_rpc_timeout_seconds
    try:
        reply = await edge.clients.budget.Reserve(
            budget_pb2.ReserveRequest(pool=body.pool, tokens=body.tokens, reservation_id=_request_id(request)),
            metadata=_metadata(request),
            timeout=timeout,
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise MappedError(to_api_error(exc, not_found_code="pool_not_found")) from exc
        current = await _call_budget(
            edge.clients.budget.GetPool(
                budget_pb2.GetPoolRequest(pool=body.pool), metadata=_metadata(request), timeout=timeout
            )
        )
        return OrjsonResponse({"reserved": False, "available": current.pool.available, "reservation_id": None})
    return OrjsonResponse({"reserved": True, "available": reply.pool.available, "reservation_id": reply.reservation_id})


@api.post(
    "/v1/tokens/report",
    response_model=TokenReportResponse,
    responses=_ERRORS,
    openapi_extra=_json_body(TokenReportRequest),
    tags=["tokens"],
)
async def report_tokens(request: Request) -> Response:
    """Record usage. With ``reservation_id``: commit that reservation with ``actual``
    (exactly once; 409 if it already ended). Without: add ``actual`` as untracked usage.

    A leased reservation can only be ended by its id: subtracting a bare ``reserved``
    count (the seed's report) would free it twice once its lease also expires."""
    body = await parse_body(request, TokenReportRequest)
    edge = _edge(request)
    timeout = edge.settings.edge_rpc_timeout_seconds
    if body.reservation_id is not None:
        reply = await _call_budget(
            edge.clients.budget.Commit(
                budget_pb2.CommitRequest(reservation_id=body.reservation_id, used_tokens=body.actual),
                metadata=_metadata(request),
                timeout=timeout,
            )
        )
        if reply.already_ended:
            raise ConflictError(
                f"Reservation '{body.reservation_id}' has already ended (committed, released or expired) "
                "or does not exist",
                param="reservation_id",
            )
        return OrjsonResponse({"used": reply.pool.used, "available": reply.pool.available})
    if body.reserved:
        raise InvalidRequestError(
            "reservation_id is required to end a reservation; without it only untracked usage can be reported "
            "(reserved must be 0)",
            param="reservation_id",
        )
    reply = await _call_budget(
        edge.clients.budget.Report(
            budget_pb2.ReportRequest(pool=body.pool, reserved=0, actual=body.actual),
            metadata=_metadata(request),
            timeout=timeout,
        )
    )
    return OrjsonResponse({"used": reply.pool.used, "available": reply.pool.available})


@api.get("/v1/audit", response_model=AuditListResponse, responses=_ERRORS, tags=["audit"])
async def list_audit(
    request: Request,
    limit: int = Query(100, ge=1, le=10_000, description="Most recent N entries"),
    request_id: str | None = Query(None, max_length=128, description="Only the entries of this request id"),
) -> Response:
    """The most recent audit entries (payloads decoded) and whether the whole chain verifies."""
    edge = _edge(request)
    reply = await edge.clients.audit.ListEntries(
        audit_pb2.ListEntriesRequest(limit=limit, event_id=request_id or ""),
        metadata=_metadata(request),
        timeout=edge.settings.edge_rpc_timeout_seconds,
    )
    body: dict[str, Any] = {
        "entries": [_audit_entry(entry) for entry in reply.entries],
        "total": reply.total,
        "chain_valid": reply.chain_valid,
    }
    if reply.verify_error:
        body["verify_error"] = reply.verify_error
    return OrjsonResponse(body)


# --------------------------------------------------------------------------- the app


async def _handle_error(request: Request, exc: Exception) -> Response:
    """Every exception handler: one mapping (errors.to_api_error), one envelope."""
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 404:
        exc = NotFoundError(f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")
    elif isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
        exc = MethodNotAllowedError(f"Method {request.method} is not allowed on {request.url.path}")
    error = to_api_error(exc)
    if error.status >= 500:
        log.warning(
            "request failed",
            extra={"status": error.status, "code": error.code, "detail": error.log_detail or error.message},
        )
    return error_response(error)


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _SCHEMA_MODELS:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                for name, definition in model_schema.pop("$defs", {}).items():
                    components.setdefault(name, definition)
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientClosedRequestError("The client closed the connection.")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def chat_fast_path(app: FastAPI) -> ASGIApp:
    """POST /v1/chat/completions as a plain ASGI handler, served by EdgeMiddleware
    ahead of the framework's routing and middleware: the same validation, serving
    code, errors and OpenAPI schema as the route above (which stays for the docs),
    for less CPU per request."""

    async def chat(scope: Scope, receive: Receive, send: Send) -> None:
        response = await serve_chat(app.state.edge, await _read_body(receive), scope["state"]["request_id"], receive)
        await response(scope, receive, send)

    return chat


class EdgeApp(FastAPI):
    """FastAPI with hoosh's EdgeMiddleware outermost: request ids, auth and body limits
    for every route, and the hot chat route served before the framework's layers."""

    edge_middleware_options: dict[str, Any]

    def build_middleware_stack(self) -> ASGIApp:
        return EdgeMiddleware(super().build_middleware_stack(), **self.edge_middleware_options)


def create_app(settings: Settings | None = None, clients: Clients | None = None) -> FastAPI:
    """Build the edge app.

    ``settings`` defaults to the environment. ``clients`` given: the caller owns the
    channels (and must close them). Not given: the lifespan opens them at start (inside
    the server's event loop) and closes them at shutdown.
    """
    settings = settings or Settings()
    api_keys = settings.api_key_list
    if not api_keys:
        log.warning("HOOSH_API_KEYS is empty: authentication is off")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if clients is not None:
            yield
            return
        owned = Clients.connect(settings)
        app.state.edge = EdgeState(
            settings, owned, ServingChat(owned.router, timeout=settings.edge_request_timeout_seconds)
        )
        try:
            yield
        finally:
            await owned.close(grace=1.0)

    app = EdgeApp(
        title="hoosh",
        version=VERSION,
        description="OpenAI-compatible AI inference gateway. Errors use OpenAI's envelope "
        '`{"error": {"message", "type", "param", "code"}}`.',
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        default_response_class=OrjsonResponse,
        # EdgeMiddleware continues the caller's trace context for every request (a real
        # server span only when spans are exported); the framework's own telemetry
        # layer would cost about a sixth of the edge's CPU per request.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    if clients is not None:
        app.state.edge = EdgeState(
            settings, clients, ServingChat(clients.router, timeout=settings.edge_request_timeout_seconds)
        )
    app.include_router(api)
    # Anything else reaches EdgeMiddleware, which answers 500 with the same envelope.
    # Exception covers the unexpected too: the envelope, not the framework's plain text 500.
    for exc_class in (EdgeError, RequestValidationError, StarletteHTTPException, grpc.aio.AioRpcError, Exception):
        app.add_exception_handler(exc_class, _handle_error)
    app.edge_middleware_options = {
        "max_body_bytes": settings.edge_max_body_bytes,
        "api_keys": api_keys,
        "body_limits": {TRANSCRIPTIONS_PATH: settings.edge_max_audio_bytes},
        "fast_routes": {("POST", "/v1/chat/completions"): chat_fast_path(app)},
    }
    _install_openapi(app)
    return app


def serve_app() -> FastAPI:
    """uvicorn's factory in each worker process: logging and tracing once, then the app."""
    from hoosh_common.logs import configure_logging
    from hoosh_common.telemetry import configure_tracing

    configure_logging("edge")
    configure_tracing("edge")
    return create_app()
