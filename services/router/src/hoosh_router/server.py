"""gRPC transport for the router: thin, typed, maps RouterError to statuses."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import grpc
from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh_common.logs import request_id_var
from hoosh_common.telemetry import extract_context
from opentelemetry import context as otel_context
from opentelemetry import trace

from .chat import ChatService
from .errors import RouterError
from .routing import ModelRouter

tracer = trace.get_tracer("hoosh.router")


def _request_id(request: router_pb2.ChatRequest, metadata: tuple[tuple[str, str | bytes], ...]) -> str:
    if request.request_id:
        return request.request_id
    for key, value in metadata:
        if key == "x-request-id" and isinstance(value, str) and value:
            return value
    return uuid.uuid4().hex


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, chat: ChatService, router: ModelRouter) -> None:
        self._chat = chat
        self._router = router
        self._models_cache: tuple[float, router_pb2.ListModelsResponse] | None = None

    async def Chat(self, request: router_pb2.ChatRequest, context: grpc.aio.ServicerContext) -> router_pb2.ChatResponse:
        metadata = context.invocation_metadata() or ()
        request_id = _request_id(request, metadata)
        request_id_var.set(request_id)
        token = otel_context.attach(extract_context(metadata))
        try:
            with tracer.start_as_current_span("hoosh.router.chat", attributes={"hoosh.model": request.model}):
                return await self._chat.chat(request, request_id)
        except RouterError as error:
            context.set_trailing_metadata(error.trailing_metadata())
            await context.abort(error.status, error.message)
            raise  # unreachable: abort raises
        finally:
            otel_context.detach(token)

    async def ChatStream(
        self, request: router_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.ChatStreamResponse]:
        metadata = context.invocation_metadata() or ()
        request_id = _request_id(request, metadata)
        request_id_var.set(request_id)
        token = otel_context.attach(extract_context(metadata))
        try:
            with tracer.start_as_current_span("hoosh.router.chat_stream", attributes={"hoosh.model": request.model}):
                async for chunk in self._chat.stream(request, request_id):
                    yield chunk
        except RouterError as error:
            context.set_trailing_metadata(error.trailing_metadata())
            await context.abort(error.status, error.message)
        finally:
            otel_context.detach(token)

    async def ListModels(
        self, request: router_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListModelsResponse:
        now = time.monotonic()
        if self._models_cache and now - self._models_cache[0] < 30:
            return self._models_cache[1]
        reply = router_pb2.ListModelsResponse()
        seen: set[str] = set()
        for model_id, config in self._router.exact_models():
            if model_id not in seen:
                seen.add(model_id)
                reply.models.add(id=model_id, owned_by=config.name, provider=config.name, kind="chat")
        for config, backend in self._router.entries:
            for model in await backend.list_models():
                if model.id not in seen and self._router.matches_patterns(config, model.id):
                    seen.add(model.id)
                    reply.models.add(
                        id=model.id, owned_by=model.owned_by, created=model.created, provider=config.name, kind="chat"
                    )
        self._models_cache = (now, reply)
        return reply
