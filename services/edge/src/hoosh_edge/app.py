"""The edge's FastAPI application, assembled: route modules, error handlers, the OpenAPI
document, and EdgeMiddleware (request ids, auth, body limits, the chat fast path).

``create_app(settings, clients, tenancy)`` builds the app. What is not given the
lifespan opens at start (inside the server's event loop) and closes at shutdown; what
is given (tests, embedding) the caller owns.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from hoosh_tenancy import TenancyError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from . import (
    admin_keys,
    admin_pools,
    admin_reload,
    admin_status,
    routes_costs,
    routes_hardware,
    routes_inference,
    routes_operations,
    routes_responses,
    routes_tokens,
)
from .admin_keys import KeyCreateRequest, KeyUpdateRequest
from .admin_pools import PoolCreateRequest, PoolUpdateRequest
from .auth import Authenticator, Tenancy
from .clients import Clients
from .config import Settings
from .errors import ClientClosedRequestError, EdgeError, MethodNotAllowedError, NotFoundError, to_api_error
from .metrics import RouteLabels
from .middleware import EdgeMiddleware
from .openapi import install_openapi
from .protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    EmbeddingRequest,
    ErrorResponse,
    TokenCheckRequest,
    TokenReportRequest,
    TokenReserveRequest,
    TranscriptionResponse,
    TranscriptionVerboseResponse,
)
from .protocol_responses import ResponseCreateRequest
from .responses import OrjsonResponse, error_response
from .routes_inference import serve_chat
from .routes_operations import VERSION
from .routing import EdgeState
from .serving_transcription import TRANSCRIPTIONS_PATH

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"

# Bodies are parsed by hand (orjson + pydantic) to control the errors; their schemas (and
# the SSE chunk's) are added to the OpenAPI document here.
_SCHEMA_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    ChatCompletionChunk,
    TokenCheckRequest,
    TokenReserveRequest,
    TokenReportRequest,
    TranscriptionResponse,
    TranscriptionVerboseResponse,
    EmbeddingRequest,
    ResponseCreateRequest,
    KeyCreateRequest,
    KeyUpdateRequest,
    PoolCreateRequest,
    PoolUpdateRequest,
    ErrorResponse,
)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves on the request's path (several routes may share a path)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, BaseRoute) and route.matches(request.scope)[0] != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _handle_error(request: Request, exc: Exception) -> Response:
    """Every exception handler: one mapping (errors.to_api_error), one envelope."""
    if isinstance(exc, StarletteHTTPException) and exc.status_code == 404:
        exc = NotFoundError(f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")
    elif isinstance(exc, StarletteHTTPException) and exc.status_code == 405:
        exc = MethodNotAllowedError(
            f"Method {request.method} is not allowed on {request.url.path}",
            headers={"Allow": ", ".join(_allowed_methods(request))},
        )
    error = to_api_error(exc)
    if error.status >= 500:
        log.warning(
            "request failed",
            extra={"status": error.status, "code": error.code, "detail": error.log_detail or error.message},
        )
    return error_response(error)


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
    ahead of the framework's routing and middleware: the same validation, scope checks,
    serving code, errors and OpenAPI schema as the documented route, for less CPU per
    request."""

    async def chat(scope: Scope, receive: Receive, send: Send) -> None:
        state = scope["state"]
        response = await serve_chat(
            app.state.edge, await _read_body(receive), state["request_id"], receive, state["principal"]
        )
        await response(scope, receive, send)

    return chat


class EdgeApp(FastAPI):
    """FastAPI with hoosh's EdgeMiddleware outermost: request ids, auth and body limits
    for every route, and the hot chat route served before the framework's layers."""

    edge_middleware_options: dict[str, Any]

    def build_middleware_stack(self) -> ASGIApp:
        return EdgeMiddleware(
            super().build_middleware_stack(), route_labels=RouteLabels.of_app(self), **self.edge_middleware_options
        )


def create_app(
    settings: Settings | None = None, clients: Clients | None = None, tenancy: Tenancy | None = None
) -> FastAPI:
    """Build the edge app.

    ``settings`` defaults to the environment (invalid auth settings raise here: fail
    fast). ``clients`` / ``tenancy`` given: the caller owns them (and must close them;
    a given tenancy must be started). Not given: the lifespan builds them at start and
    closes them at shutdown.
    """
    settings = settings or Settings()
    authenticator = Authenticator(
        open_mode=settings.auth == "open",
        admin_keys=settings.admin_keys,
        cache=tenancy.cache if tenancy is not None else None,
    )
    if settings.auth == "open":
        log.warning("HOOSH_AUTH=open: requests without a known key are served as anonymous (loopback only)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if clients is not None and tenancy is not None:
            try:
                yield
            finally:
                await app.state.edge.responses.background.close()
            return
        active_clients = clients if clients is not None else Clients.connect(settings)
        active_tenancy = tenancy if tenancy is not None else Tenancy.connect(settings)
        try:
            if tenancy is None:
                await active_tenancy.start()
                authenticator.cache = active_tenancy.cache
            app.state.edge = EdgeState(settings, active_clients, active_tenancy)
            try:
                yield
            finally:
                # Background responses still running here are marked failed while Redis is open.
                await app.state.edge.responses.background.close()
        finally:
            if clients is None:
                await active_clients.close(grace=1.0)
            if tenancy is None:
                await active_tenancy.close()

    app = EdgeApp(
        title="hoosh",
        version=VERSION,
        description="OpenAI-compatible AI inference gateway. Send `Authorization: Bearer <key>`; errors use "
        'OpenAI\'s envelope `{"error": {"message", "type", "param", "code"}}`.',
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        default_response_class=OrjsonResponse,
        # EdgeMiddleware continues the caller's trace context for every request (a real
        # server span only when spans are exported); the framework's own telemetry
        # layer would cost about a sixth of the edge's CPU per request.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    if clients is not None and tenancy is not None:
        app.state.edge = EdgeState(settings, clients, tenancy)
    for module in (
        routes_inference,
        routes_responses,
        routes_tokens,
        routes_operations,
        routes_costs,
        routes_hardware,
        admin_keys,
        admin_pools,
        admin_reload,
        admin_status,
    ):
        app.include_router(module.router)
    # Anything else reaches EdgeMiddleware, which answers 500 with the same envelope.
    # Exception covers the unexpected too: the envelope, not the framework's plain text 500.
    for exc_class in (
        EdgeError,
        TenancyError,
        RequestValidationError,
        StarletteHTTPException,
        grpc.aio.AioRpcError,
        Exception,
    ):
        app.add_exception_handler(exc_class, _handle_error)
    app.edge_middleware_options = {
        "max_body_bytes": settings.edge_max_body_bytes,
        "authenticator": authenticator,
        "body_limits": {TRANSCRIPTIONS_PATH: settings.edge_max_audio_bytes},
        "fast_routes": {("POST", CHAT_PATH): chat_fast_path(app)},
        "access_log": settings.edge_access_log,
        "trust_traceparent": settings.edge_trust_traceparent,
    }
    install_openapi(app, _SCHEMA_MODELS)
    return app


def serve_app() -> FastAPI:
    """uvicorn's factory in each worker process: logging and tracing once, then the app."""
    from hoosh_common.logs import configure_logging
    from hoosh_common.telemetry import configure_tracing

    configure_logging("edge")
    configure_tracing("edge")
    return create_app()
