"""The end of every request: exactly one event (completed or failed), and on failure
the release of the reservation. Shared by chat and embeddings."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import Message
from hoosh.chat.v1 import chat_pb2
from hoosh.events.v1 import events_pb2
from hoosh_common.events import SUBJECT_COMPLETED, SUBJECT_FAILED
from hoosh_common.telemetry import current_trace_id

from .budget_client import Budget
from .config import ProviderConfig
from .errors import ClientCancelled, RouterError, UpstreamError, http_status_for

log = logging.getLogger(__name__)


class Publisher(Protocol):
    def publish_background(self, name: str, message: Message, event_id: str) -> object: ...


def cost_usd(provider: ProviderConfig | None, prompt_tokens: int, completion_tokens: int) -> float:
    if provider is None:
        return 0.0
    pricing = provider.pricing
    return (prompt_tokens * pricing.input_per_mtok + completion_tokens * pricing.output_per_mtok) / 1_000_000


@dataclass(slots=True)
class RequestInfo:
    """The facts of one request every event repeats."""

    request_id: str
    model: str
    pool: str
    user: str
    stream: bool
    kind: str
    started: float  # time.monotonic()
    # Set just before the reservation is asked for: from then on a failure releases it,
    # even if the reply never arrived (a cancellation mid-call). Releasing an id that
    # was never reserved changes nothing.
    reserve_started: bool = False


class Recorder:
    def __init__(self, budget: Budget, publisher: Publisher) -> None:
        self.budget = budget
        self._publisher = publisher
        self._tails: set[asyncio.Future[None]] = set()

    async def reserve(self, info: RequestInfo, tokens: int) -> None:
        """Reserve the request's tokens; see ``RequestInfo.reserve_started``."""
        info.reserve_started = True
        await self.budget.reserve(info.pool, tokens, info.request_id)

    async def end_completed(self, info: RequestInfo, used_tokens: int, record: Callable[[], None]) -> None:
        """Commit ``used_tokens``, then ``record()`` the completion — shielded from
        cancellation: the backend's work is done, so it is charged and recorded exactly
        once even if the client goes away meanwhile."""

        async def tail() -> None:
            await self.budget.commit(info.request_id, used_tokens)
            record()

        task = asyncio.ensure_future(tail())
        self._tails.add(task)
        task.add_done_callback(self._tails.discard)
        await asyncio.shield(task)

    def completed(
        self,
        info: RequestInfo,
        *,
        provider: ProviderConfig | None,
        usage: chat_pb2.Usage,
        finish_reason: str,
        attempts: int,
        cached: bool = False,
    ) -> None:
        event = events_pb2.InferenceCompleted(
            request_id=info.request_id,
            trace_id=current_trace_id(),
            timestamp_ms=int(time.time() * 1000),
            model=info.model,
            provider=provider.name if provider else "",
            pool=info.pool,
            usage=usage,
            latency_ms=int((time.monotonic() - info.started) * 1000),
            stream=info.stream,
            user=info.user,
            finish_reason=finish_reason,
            # A cache hit costs nothing upstream; its usage stays the original one, for reference.
            cost_usd=0.0 if cached else cost_usd(provider, usage.prompt_tokens, usage.completion_tokens),
            kind=info.kind,
            cached=cached,
            attempts=attempts,
        )
        self._publisher.publish_background(SUBJECT_COMPLETED, event, info.request_id)

    def failed(self, info: RequestInfo, *, provider: str, error: RouterError, attempts: int) -> None:
        event = events_pb2.InferenceFailed(
            request_id=info.request_id,
            trace_id=current_trace_id(),
            timestamp_ms=int(time.time() * 1000),
            model=info.model,
            provider=provider,
            pool=info.pool,
            error_code=error.error_code,
            error_message=error.message[:500],
            http_status=http_status_for(error),
            latency_ms=int((time.monotonic() - info.started) * 1000),
            stream=info.stream,
            user=info.user,
            kind=info.kind,
            attempts=attempts,
        )
        self._publisher.publish_background(SUBJECT_FAILED, event, info.request_id)

    async def end_failed(
        self, info: RequestInfo, error: BaseException, *, reserved: bool, provider: str, attempts: int
    ) -> RouterError:
        """Release the reservation (if one was made) and record the failure; returns the error to raise."""
        task = asyncio.current_task()
        if isinstance(error, asyncio.CancelledError | GeneratorExit) or (task is not None and task.cancelling()):
            router_error: RouterError = ClientCancelled("The client cancelled the request")
        elif isinstance(error, RouterError):
            router_error = error
        else:
            log.exception("unexpected failure", exc_info=error)
            router_error = UpstreamError(f"Internal failure: {type(error).__name__}")
        if reserved or info.reserve_started:
            await asyncio.shield(self.budget.release(info.request_id))
        self.failed(info, provider=provider, error=router_error, attempts=attempts)
        return router_error
