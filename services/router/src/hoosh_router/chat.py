"""One chat completion, end to end: resolve, reserve, call, commit, publish.

Every reservation ends exactly once: committed with the real usage on success,
released on any failure or cancellation (client disconnect)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import Message
from hoosh.chat.v1 import chat_pb2
from hoosh.events.v1 import events_pb2
from hoosh.router.v1 import router_pb2
from hoosh_common.events import SUBJECT_COMPLETED, SUBJECT_FAILED
from hoosh_common.telemetry import current_trace_id

from .backends.base import CallParams, StreamPiece
from .budget_client import Budget
from .errors import ClientCancelled, InvalidRequest, RouterError, UpstreamError, http_status_for
from .routing import ModelRouter, Route

log = logging.getLogger(__name__)


class Publisher(Protocol):
    def publish_background(self, name: str, message: Message, event_id: str) -> object: ...


@dataclass(slots=True)
class Plan:
    route: Route
    pool: str
    prompt_tokens: int
    max_tokens: int
    reserved: int


class ChatService:
    def __init__(
        self,
        router: ModelRouter,
        budget: Budget,
        publisher: Publisher,
        *,
        upstream_timeout: float,
    ) -> None:
        self._router = router
        self._budget = budget
        self._publisher = publisher
        self._upstream_timeout = upstream_timeout

    # -- planning -----------------------------------------------------------------

    async def _plan(self, request: router_pb2.ChatRequest, request_id: str) -> Plan:
        if not request.model:
            raise InvalidRequest("model is required", param="model")
        if not request.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        route = self._router.resolve(request.model)[0]
        provider = route.provider
        prompt_tokens = await route.backend.count_prompt_tokens(request, route.upstream_model)
        requested = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None
        if requested is not None and requested < 1:
            raise InvalidRequest("max_tokens must be at least 1", param="max_tokens")
        max_tokens = requested or provider.default_max_tokens
        if provider.max_tokens_limit:
            max_tokens = min(max_tokens, provider.max_tokens_limit)
        context_length = route.backend.context_length(route.upstream_model)
        if context_length:
            if requested is None:
                max_tokens = min(max_tokens, context_length - prompt_tokens)
            if max_tokens < 1 or prompt_tokens + max_tokens > context_length:
                raise InvalidRequest(
                    f"This model's maximum context length is {context_length} tokens. However, you requested "
                    f"{prompt_tokens + max(max_tokens, 0)} tokens ({prompt_tokens} in the messages, "
                    f"{max(max_tokens, 0)} in the completion). Please reduce the length of the messages or completion.",
                    param="messages",
                    code="context_length_exceeded",
                )
        pool = request.pool or "default"
        reserved = prompt_tokens + max_tokens
        await self._budget.reserve(pool, reserved, request_id)
        return Plan(route=route, pool=pool, prompt_tokens=prompt_tokens, max_tokens=max_tokens, reserved=reserved)

    def _params(self, plan: Plan, request_id: str) -> CallParams:
        return CallParams(
            upstream_model=plan.route.upstream_model,
            max_tokens=plan.max_tokens,
            request_id=request_id,
            timeout=plan.route.provider.timeout_seconds or self._upstream_timeout,
        )

    # -- events ---------------------------------------------------------------------

    def _cost(self, plan: Plan, prompt_tokens: int, completion_tokens: int) -> float:
        pricing = plan.route.provider.pricing
        return (prompt_tokens * pricing.input_per_mtok + completion_tokens * pricing.output_per_mtok) / 1_000_000

    def _completed(
        self,
        request: router_pb2.ChatRequest,
        request_id: str,
        plan: Plan,
        usage: chat_pb2.Usage,
        finish_reason: str,
        started: float,
        stream: bool,
    ) -> None:
        event = events_pb2.InferenceCompleted(
            request_id=request_id,
            trace_id=current_trace_id(),
            timestamp_ms=int(time.time() * 1000),
            model=request.model,
            provider=plan.route.provider.name,
            pool=plan.pool,
            usage=usage,
            latency_ms=int((time.monotonic() - started) * 1000),
            stream=stream,
            user=request.user,
            finish_reason=finish_reason,
            cost_usd=self._cost(plan, usage.prompt_tokens, usage.completion_tokens),
            kind="chat",
        )
        self._publisher.publish_background(SUBJECT_COMPLETED, event, request_id)

    def _failed(
        self,
        request: router_pb2.ChatRequest,
        request_id: str,
        plan: Plan | None,
        error: RouterError,
        started: float,
        stream: bool,
    ) -> None:
        event = events_pb2.InferenceFailed(
            request_id=request_id,
            trace_id=current_trace_id(),
            timestamp_ms=int(time.time() * 1000),
            model=request.model,
            provider=plan.route.provider.name if plan else "",
            pool=request.pool or "default",
            error_code=error.error_code,
            error_message=error.message[:500],
            http_status=http_status_for(error),
            latency_ms=int((time.monotonic() - started) * 1000),
            stream=stream,
            user=request.user,
            kind="chat",
        )
        self._publisher.publish_background(SUBJECT_FAILED, event, request_id)

    async def _end_failed(
        self,
        request: router_pb2.ChatRequest,
        request_id: str,
        plan: Plan | None,
        error: BaseException,
        started: float,
        stream: bool,
    ) -> RouterError:
        """Release the reservation (if any) and record the failure; returns the error to raise."""
        task = asyncio.current_task()
        if isinstance(error, asyncio.CancelledError | GeneratorExit) or (task is not None and task.cancelling()):
            router_error = ClientCancelled("The client cancelled the request")
        elif isinstance(error, RouterError):
            router_error = error
        else:
            log.exception("unexpected failure in chat", exc_info=error)
            router_error = UpstreamError(f"Internal failure: {type(error).__name__}")
        if plan is not None:
            await asyncio.shield(self._budget.release(request_id))
        self._failed(request, request_id, plan, router_error, started, stream)
        return router_error

    # -- blocking -------------------------------------------------------------------

    async def chat(self, request: router_pb2.ChatRequest, request_id: str) -> router_pb2.ChatResponse:
        started = time.monotonic()
        plan: Plan | None = None
        try:
            plan = await self._plan(request, request_id)
            completion = await plan.route.backend.chat(request, self._params(plan, request_id))
        except BaseException as error:
            router_error = await self._end_failed(request, request_id, plan, error, started, stream=False)
            if isinstance(error, asyncio.CancelledError):
                raise
            raise router_error from error
        usage = chat_pb2.Usage(
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            total_tokens=completion.prompt_tokens + completion.completion_tokens,
        )
        await self._budget.commit(request_id, usage.total_tokens)
        self._completed(request, request_id, plan, usage, completion.finish_reason, started, stream=False)
        return router_pb2.ChatResponse(
            id=f"chatcmpl-{request_id}",
            model=completion.model or request.model,
            created=int(time.time()),
            choices=[chat_pb2.Choice(index=0, message=completion.message, finish_reason=completion.finish_reason)],
            usage=usage,
            provider=plan.route.provider.name,
            system_fingerprint=completion.system_fingerprint,
        )

    # -- streaming ------------------------------------------------------------------

    async def stream(
        self, request: router_pb2.ChatRequest, request_id: str
    ) -> AsyncIterator[router_pb2.ChatStreamResponse]:
        started = time.monotonic()
        plan: Plan | None = None
        chat_id = f"chatcmpl-{request_id}"
        created = int(time.time())
        finish_reason = ""
        prompt_tokens: int | None = None
        completion_tokens: int | None = None
        pieces = 0
        try:
            plan = await self._plan(request, request_id)
            provider = plan.route.provider.name

            def chunk(delta: chat_pb2.Delta, finish: str = "") -> router_pb2.ChatStreamResponse:
                return router_pb2.ChatStreamResponse(
                    id=chat_id,
                    model=request.model,
                    created=created,
                    provider=provider,
                    choices=[chat_pb2.ChunkChoice(index=0, delta=delta, finish_reason=finish)],
                )

            first = True
            piece: StreamPiece
            async with aclosing(plan.route.backend.stream(request, self._params(plan, request_id))) as backend_stream:
                async for piece in backend_stream:
                    if piece.prompt_tokens is not None:
                        prompt_tokens, completion_tokens = piece.prompt_tokens, piece.completion_tokens
                    if piece.finish_reason:
                        finish_reason = piece.finish_reason
                    if piece.content is None and not piece.tool_calls:
                        continue
                    delta = chat_pb2.Delta(tool_calls=piece.tool_calls)
                    if piece.content is not None:
                        delta.content = piece.content
                    if first:
                        delta.role = "assistant"
                        first = False
                    pieces += 1
                    yield chunk(delta)
            if first:  # nothing generated: still open the assistant turn
                yield chunk(chat_pb2.Delta(role="assistant", content=""))
            yield chunk(chat_pb2.Delta(), finish_reason or "stop")
        except BaseException as error:
            router_error = await self._end_failed(request, request_id, plan, error, started, stream=True)
            if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
                raise
            raise router_error from error
        if prompt_tokens is None or completion_tokens is None:
            # The provider sent no usage: charge the reservation's prompt bound and one token per piece.
            log.warning("stream ended without usage; estimating", extra={"provider": plan.route.provider.name})
            prompt_tokens, completion_tokens = plan.prompt_tokens, pieces
        usage = chat_pb2.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        await self._budget.commit(request_id, usage.total_tokens)
        self._completed(request, request_id, plan, usage, finish_reason or "stop", started, stream=True)
        if request.include_usage:
            yield router_pb2.ChatStreamResponse(
                id=chat_id, model=request.model, created=created, usage=usage, provider=plan.route.provider.name
            )
