"""gRPC transport for the router: thin, typed, maps RouterError to statuses."""

from __future__ import annotations

import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import orjson
from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh_common.logs import request_id_var
from hoosh_common.telemetry import extract_context
from hoosh_common.tunnel import FrameSink, FrameWriter
from opentelemetry import context as otel_context

from . import workers
from .cache import ResponseCache
from .chat import ChatService
from .embeddings import EmbeddingService
from .errors import InvalidRequest, RouterError
from .generations import Generation, Generations
from .health import HealthBoard
from .routing import Kind, ModelRouter
from .tunnel import TunnelSession

_KINDS: tuple[Kind, ...] = ("chat", "embedding")


def _request_id(
    request: router_pb2.ChatRequest | router_pb2.EmbedRequest, metadata: Iterable[tuple[str, str | bytes]]
) -> str:
    if request.request_id:
        return request.request_id
    for key, value in metadata:
        if key == "x-request-id" and isinstance(value, str) and value:
            return value
    return uuid.uuid4().hex


def _responses_body(request: router_pb2.ChatRequest) -> dict[str, Any] | None:
    """Respond's Responses API body (None when the caller sent none: chat alone)."""
    if not request.responses_body:
        return None
    try:
        body = orjson.loads(request.responses_body)
    except orjson.JSONDecodeError as error:
        raise InvalidRequest("responses_body is not JSON", param="responses_body") from error
    if not isinstance(body, dict):
        raise InvalidRequest("responses_body must be a JSON object", param="responses_body")
    return body


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Serves ``generations`` (live reload: each call runs on the generation current when
    it starts, to its end), or one fixed generation made of ``chat``, ``router``,
    ``embeddings``, ``health`` and ``cache``."""

    def __init__(
        self,
        chat: ChatService | None = None,
        router: ModelRouter | None = None,
        *,
        embeddings: EmbeddingService | None = None,
        health: HealthBoard | None = None,
        cache: ResponseCache | None = None,
        generations: Generations | None = None,
    ) -> None:
        if generations is None:
            if chat is None or router is None:
                raise TypeError("RouterServicer needs chat and router, or generations")
            generations = Generations(Generation(chat, router, embeddings=embeddings, health=health, cache=cache))
        self._generations = generations
        # ListModels' answer for 30 s, with the generation it came from: a weak reference, so a
        # retired generation (its backends, board, catalogue) is not kept alive by it.
        self._models_cache: tuple[weakref.ref[Generation], float, router_pb2.ListModelsResponse] | None = None
        self._tunnels: set[TunnelSession] = set()
        self._draining = False

    # The current generation's parts (what a call that does not pin a generation reads).
    @property
    def _chat(self) -> ChatService:
        return self._generations.current.chat

    @property
    def _router(self) -> ModelRouter:
        return self._generations.current.router

    @property
    def _embeddings(self) -> EmbeddingService | None:
        return self._generations.current.embeddings

    @property
    def _health(self) -> HealthBoard | None:
        return self._generations.current.health

    @property
    def _cache(self) -> ResponseCache | None:
        return self._generations.current.cache

    async def Chat(
        self,
        request: router_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[router_pb2.ChatRequest, router_pb2.ChatResponse],
    ) -> router_pb2.ChatResponse:
        return await self._unary(request, context, native=False)

    async def ChatStream(
        self,
        request: router_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[router_pb2.ChatRequest, router_pb2.ChatStreamResponse],
    ) -> AsyncIterator[router_pb2.ChatStreamResponse]:
        async for chunk in self._stream(request, context, native=False):
            yield chunk

    async def Respond(
        self,
        request: router_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[router_pb2.ChatRequest, router_pb2.ChatResponse],
    ) -> router_pb2.ChatResponse:
        return await self._unary(request, context, native=True)

    async def RespondStream(
        self,
        request: router_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[router_pb2.ChatRequest, router_pb2.ChatStreamResponse],
    ) -> AsyncIterator[router_pb2.ChatStreamResponse]:
        async for chunk in self._stream(request, context, native=True):
            yield chunk

    async def _unary(
        self,
        request: router_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[router_pb2.ChatRequest, router_pb2.ChatResponse],
        *,
        native: bool,
    ) -> router_pb2.ChatResponse:
        """Chat, or Respond (``native``: the request may carry a Responses API body)."""
        try:
            return await self._serve_call(
                request, context.invocation_metadata() or (), context.time_remaining(), native
            )
        except RouterError as error:
            context.set_trailing_metadata(error.trailing_metadata())
            await context.abort(error.status, error.message)
            raise  # unreachable: abort raises

    async def _serve_call(
        self,
        request: router_pb2.ChatRequest,
        metadata: Iterable[tuple[str, str | bytes]],
        time_remaining: float | None,
        native: bool,
    ) -> router_pb2.ChatResponse:
        """One blocking Chat / Respond, for a unary call or a tunnel frame; raises RouterError."""
        request_id = _request_id(request, metadata)
        request_id_var.set(request_id)
        token = otel_context.attach(extract_context(metadata))
        try:
            body = _responses_body(request) if native else None
            with self._generations.use() as generation:
                return await generation.chat.chat(request, request_id, time_remaining, responses=body)
        finally:
            otel_context.detach(token)

    # The generated base types a streaming method as a generator; this one uses grpc.aio's
    # reader/writer API (context.write from the session's writer task) and returns None.
    async def Tunnel(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[router_pb2.TunnelBatch],
        context: grpc.aio.ServicerContext[router_pb2.TunnelBatch, router_pb2.TunnelBatch],
    ) -> None:
        """Many Chat / Respond calls on one stream (see ``tunnel``)."""
        session = self.open_session(FrameWriter(context.write, name="tunnel-writer"))
        await session.run(request_iterator)  # it ends the session, whatever happens

    def open_session(self, writer: FrameSink) -> TunnelSession:
        """A tunnel's session, its frames to ``writer`` (a Tunnel stream's, or one
        connection's on the router's local link, ``hoosh_common.link``): drained with the
        others while it is open."""
        session = TunnelSession(self._serve_call, writer)
        self._tunnels.add(session)
        session.ended.add_done_callback(lambda _: self._tunnels.discard(session))
        if self._draining:
            session.drain()
        return session

    def drain_tunnels(self) -> None:
        """This process is stopping: every open tunnel's caller is asked to open a new
        stream (to a process that is not) for its new calls."""
        self._draining = True
        for session in list(self._tunnels):
            session.drain()

    async def _stream(
        self,
        request: router_pb2.ChatRequest,
        context: grpc.aio.ServicerContext[router_pb2.ChatRequest, router_pb2.ChatStreamResponse],
        *,
        native: bool,
    ) -> AsyncIterator[router_pb2.ChatStreamResponse]:
        """ChatStream, or RespondStream (``native``: as in ``_unary``)."""
        metadata = context.invocation_metadata() or ()
        request_id = _request_id(request, metadata)
        request_id_var.set(request_id)
        token = otel_context.attach(extract_context(metadata))
        try:
            body = _responses_body(request) if native else None
            with self._generations.use() as generation:
                async for chunk in generation.chat.stream(
                    request, request_id, context.time_remaining(), responses=body
                ):
                    yield chunk
        except RouterError as error:
            context.set_trailing_metadata(error.trailing_metadata())
            await context.abort(error.status, error.message)
        finally:
            otel_context.detach(token)

    async def ListModels(
        self,
        request: router_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[router_pb2.ListModelsRequest, router_pb2.ListModelsResponse],
    ) -> router_pb2.ListModelsResponse:
        now = time.monotonic()
        cached = self._models_cache
        if cached and cached[0]() is self._generations.current and now - cached[1] < 30:
            return cached[2]
        with self._generations.use() as generation:
            reply = await _list_models(generation.router)
        self._models_cache = (weakref.ref(generation), now, reply)
        return reply

    async def Embed(
        self,
        request: router_pb2.EmbedRequest,
        context: grpc.aio.ServicerContext[router_pb2.EmbedRequest, router_pb2.EmbedResponse],
    ) -> router_pb2.EmbedResponse:
        metadata = context.invocation_metadata() or ()
        request_id = _request_id(request, metadata)
        request_id_var.set(request_id)
        token = otel_context.attach(extract_context(metadata))
        try:
            with self._generations.use() as generation:
                if generation.embeddings is None:
                    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "embeddings are not configured")
                assert generation.embeddings is not None
                return await generation.embeddings.embed(request, request_id, context.time_remaining())
        except RouterError as error:
            context.set_trailing_metadata(error.trailing_metadata())
            await context.abort(error.status, error.message)
            raise  # unreachable: abort raises
        finally:
            otel_context.detach(token)

    async def GetProviderHealth(
        self,
        request: router_pb2.GetProviderHealthRequest,
        context: grpc.aio.ServicerContext[router_pb2.GetProviderHealthRequest, router_pb2.GetProviderHealthResponse],
    ) -> router_pb2.GetProviderHealthResponse:
        reply = router_pb2.GetProviderHealthResponse()
        if self._health is None:
            return reply
        for item in await self._health.report():
            reply.providers.add(
                name=item.name,
                type=item.type,
                state=item.state,
                consecutive_failures=item.failures,
                last_error=item.last_error,
                last_error_at_ms=item.last_error_at_ms,
                open_until_ms=item.open_until_ms,
                latency_ms=item.latency_ms,
                base_url=item.base_url,
                rpm_limit=item.rpm,
                tpm_limit=item.tpm,
            )
        reply.workers.extend(self._health.worker_states())
        return reply

    async def GetHardware(
        self,
        request: router_pb2.GetHardwareRequest,
        context: grpc.aio.ServicerContext[router_pb2.GetHardwareRequest, router_pb2.GetHardwareResponse],
    ) -> router_pb2.GetHardwareResponse:
        """Every local worker's hardware, asked now (within the caller's deadline)."""
        if self._health is None:
            return router_pb2.GetHardwareResponse()
        timeout = workers.HARDWARE_TIMEOUT_SECONDS
        remaining = context.time_remaining()
        if remaining is not None:
            # Leave time to answer: a worker that is slow becomes an error entry, not a timeout.
            timeout = max(0.1, min(timeout, remaining - 0.5))
        return await workers.workers_hardware(self._health.entries(), timeout)

    async def GetCacheStats(
        self,
        request: router_pb2.GetCacheStatsRequest,
        context: grpc.aio.ServicerContext[router_pb2.GetCacheStatsRequest, router_pb2.GetCacheStatsResponse],
    ) -> router_pb2.GetCacheStatsResponse:
        if self._cache is None:
            return router_pb2.GetCacheStatsResponse(enabled=False)
        stats = await self._cache.stats()
        return router_pb2.GetCacheStatsResponse(
            enabled=stats.enabled,
            hits=stats.hits,
            misses=stats.misses,
            stores=stats.stores,
            entries=stats.entries,
            ttl_seconds=stats.ttl_seconds,
        )


async def _list_models(router: ModelRouter) -> router_pb2.ListModelsResponse:
    """Every model ``router`` serves: configured names first, then what the backends list
    that their patterns admit."""
    reply = router_pb2.ListModelsResponse()
    seen: set[str] = set()
    for kind in _KINDS:
        for model_id, config in router.exact_models(kind):
            if model_id not in seen:
                seen.add(model_id)
                reply.models.add(id=model_id, owned_by=config.name, provider=config.name, kind=kind)
    for config, backend in router.entries:
        for model in await backend.list_models():
            if model.id in seen:
                continue
            for kind in _KINDS:
                if router.matches_patterns(config, model.id, kind):
                    seen.add(model.id)
                    reply.models.add(
                        id=model.id, owned_by=model.owned_by, created=model.created, provider=config.name, kind=kind
                    )
                    break
    return reply
