"""The lifecycle every request shares (chat and embeddings): the key's limits, one
reservation on the pool chain, then exactly one ending — a commit of what was used
or a release — and exactly one event (completed or failed), carrying the key id and
the pool chain.

Settlement rules (the caller decides the amount; this module makes it happen once):
- success: commit the real usage, priced once here in micro-dollars;
- a failure that cost the provider something (a stream cut or abandoned after it
  generated tokens; a call sent and never answered) commits that ``charge`` and
  records ``inference.failed`` with ``charged_tokens``;
- any other failure releases the reservation (charged 0).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from hoosh.chat.v1 import chat_pb2
from hoosh.events.v1 import events_pb2
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_common.eventbus import Publisher
from hoosh_common.events import SUBJECT_COMPLETED, SUBJECT_FAILED
from hoosh_common.telemetry import current_trace_id
from hoosh_metering import errors as metering
from hoosh_metering.limits import KeyGate, KeyLimits
from hoosh_metering.pools import LedgerLine
from hoosh_metering.redis import announce_written

from . import metrics
from .budget_client import UNREACHABLE, Hold, RouterBudget, key_limits
from .config import ProviderConfig
from .errors import (
    BudgetExhausted,
    BudgetUnavailable,
    ClientCancelled,
    EventsUnavailable,
    InvalidRequest,
    RateLimited,
    RouterError,
    UpstreamError,
    http_status_for,
)

log = logging.getLogger(__name__)


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> chat_pb2.Usage:
    return chat_pb2.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        cached_tokens=min(max(cached_tokens, 0), max(prompt_tokens, 0)),
    )


def priced(
    usage: chat_pb2.Usage, provider: ProviderConfig | None, model: str, *, embedding: bool = False
) -> chat_pb2.Usage:
    """Set ``usage.cost_usd_micros``: what ``provider`` charges for it at ``model``'s price
    (the upstream model; see ``ProviderConfig.chat_price``), rounded up per side. The one
    place the router prices a call: the client, the commit, the ledger and the event all
    read this figure."""
    if provider is not None:
        price = provider.embedding_price(model) if embedding else provider.chat_price(model)
        usage.cost_usd_micros = price.cost(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
    return usage


def ledger_line(provider: ProviderConfig | None, model: str, usage: chat_pb2.Usage) -> LedgerLine:
    """The cost ledger's line for a charge of ``usage`` (provider '' when none answered)."""
    return LedgerLine(provider.name if provider else "", model, usage.prompt_tokens, usage.completion_tokens)


@dataclass(slots=True)
class RequestInfo:
    """The facts of one request every event repeats, and where its budget stands."""

    request_id: str
    model: str
    pool: str
    user: str
    stream: bool
    kind: str
    started: float  # time.monotonic()
    key_id: str = ""
    limits: KeyLimits | None = None
    admin: bool = False  # an admin caller may see ancestor pools' names in errors
    # Set just before the reservation is asked for: from then on a failure ends it, even
    # if the reply never arrived (a cancellation mid-call). Ending an id that was never
    # reserved changes nothing. None again after a definitive refusal.
    hold: Hold | None = None
    # The estimate the key's limits were charged at admission (None: not admitted, or no limits).
    admitted_tokens: int | None = None
    # The admission's reply never came: it may or may not have taken a slot.
    admit_unconfirmed: bool = False
    # For metrics and spans: the model the backend answered as, and (streams) when the
    # first content chunk left.
    response_model: str = ""
    first_token_at: float | None = None
    model_label: str = ""  # the configured name or pattern the model matched (``_unrouted``: none)
    upstream_started: float | None = None  # when the call that answered began

    @classmethod
    def of(
        cls, *, request_id: str, model: str, pool: str, user: str, stream: bool, kind: str, caller: tenancy_pb2.Caller
    ) -> RequestInfo:
        return cls(
            request_id=request_id,
            model=model,
            pool=pool or "default",
            user=user,
            stream=stream,
            kind=kind,
            started=time.monotonic(),
            key_id=caller.key_id,
            admin=caller.admin or not caller.key_id,
            limits=key_limits(caller.rpm, caller.tpm, caller.max_concurrency),
        )

    @property
    def chain(self) -> tuple[str, ...]:
        return self.hold.chain if self.hold is not None else ()


class Recorder:
    def __init__(
        self,
        budget: RouterBudget,
        publisher: Publisher,
        gate: KeyGate | None = None,
        providers: Iterable[ProviderConfig] = (),
    ) -> None:
        self.budget = budget
        # By name, for a failure's metrics (its event carries only the provider's name).
        self._providers = {provider.name: provider for provider in providers}
        self.gate = gate or KeyGate(None)
        self._publisher = publisher
        self._tails: set[asyncio.Future[None]] = set()

    # -- admission ------------------------------------------------------------------------

    async def admit(self, info: RequestInfo, tokens: int) -> None:
        """Refuse every request while its event could not be kept (503, Retry-After);
        then the key's RPM / TPM / concurrency (nothing at all for a key without limits)."""
        if not self._publisher.healthy:
            raise EventsUnavailable()
        if info.limits is None or not info.key_id:
            return
        # Marked before the call: if the ADMIT script ran but its reply was lost (a
        # timeout, a cancellation), the request's ending must still free the slot, or it
        # stays held for the limiter's in-flight TTL. Finishing an id that was never
        # admitted changes nothing.
        info.admitted_tokens = tokens
        try:
            await self.gate.admit(info.key_id, info.request_id, info.limits, tokens)
        except metering.RateLimited as error:
            info.admitted_tokens = None  # refused: nothing was counted, nothing to finish
            raise RateLimited(
                error.message, retry_after=max(1, error.retry_after_seconds), fallback=False, retryable=False
            ) from error
        except BaseException as error:
            info.admit_unconfirmed = True
            if isinstance(error, UNREACHABLE):
                raise BudgetUnavailable() from error
            raise

    async def reserve(
        self,
        info: RequestInfo,
        prompt_tokens: int,
        *,
        completion_tokens: int = 0,
        min_completion_tokens: int | None = None,
        input_price_micros: int = 0,
        output_price_micros: int = 0,
    ) -> Hold:
        """One reservation on the pool chain; see ``RequestInfo.hold``."""
        hold = info.hold = self.budget.placeholder(info.request_id, info.pool, info.key_id, info.kind)
        hold.reveal_ancestors = info.admin
        started = time.perf_counter()
        try:
            return await self.budget.reserve(
                hold,
                prompt_tokens,
                completion_tokens=completion_tokens,
                min_completion_tokens=min_completion_tokens,
                input_price_micros=input_price_micros,
                output_price_micros=output_price_micros,
            )
        except (BudgetExhausted, InvalidRequest):  # refused: nothing was reserved
            info.hold = None
            raise
        finally:
            metrics.BUDGET_RESERVE.observe(time.perf_counter() - started)

    # -- endings --------------------------------------------------------------------------

    async def _tail(
        self, info: RequestInfo, actual_tokens: int, record: Callable[[], None], settle: Callable[[], Awaitable[None]]
    ) -> None:
        """The request's one ending: the key's limits finished (``actual_tokens``) and
        ``settle`` in a task of their own, then ``record``, each exactly once, shielded
        from the caller's cancellation.

        The caller waits until the settlement is written to Redis, not for Redis's
        reply (``hoosh_metering.redis.announce_written``): Redis runs commands in the
        order they reach it, so on the usual path whatever is sent to it after the
        answer (the client reading its pool, its next request) finds the commit done,
        and the answer does not wait a round trip for it (best effort: a settlement
        that needs a second call, after NOSCRIPT or a changed chain, lands a round
        trip later; see docs/DESIGN.md). It then records (metrics, the log line, the event:
        published a moment later, after the answer left). A caller cancelled meanwhile
        leaves the recording to the task, once the settlement is done."""
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        recorded = False

        def record_once() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                record()

        async def tail() -> None:
            try:
                self._finish_key(info, actual_tokens)  # outside the block: its task must not announce the write
                with announce_written(written):
                    await settle()
            finally:
                if not written.done():  # nothing was pipelined (another Redis client, no hold)
                    written.set_result(None)
            record_once()

        self.spawn(tail())
        await asyncio.shield(written)
        record_once()
        if self._publisher.keeping:
            # NATS is away: the event goes to the outbox; answer only once it is on
            # disk, so a router killed now has lost no event it answered for.
            await self._publisher.wait_kept()

    def spawn(self, ending: Coroutine[Any, Any, None]) -> None:
        """Run a request's ending in a task of its own, beyond the request's (a stream
        its client left is drained for the provider's usage first). Tracked like the
        other endings, so shutdown waits for it."""
        task = asyncio.ensure_future(ending)
        self._tails.add(task)
        task.add_done_callback(self._ended_alone)

    def _ended_alone(self, task: asyncio.Future[None]) -> None:
        self._tails.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a request's ending failed", exc_info=task.exception())

    async def end_completed(
        self,
        info: RequestInfo,
        used_tokens: int,
        record: Callable[[], None],
        *,
        usd: int = 0,
        ledger: LedgerLine | None = None,
    ) -> None:
        """Commit ``used_tokens`` (``usd`` micro-dollars; ``ledger`` its cost-ledger line),
        then ``record()`` the completion — shielded from cancellation: the backend's work
        is done, so it is charged and recorded exactly once even if the client goes away
        meanwhile."""

        async def settle() -> None:
            if info.hold is not None:
                started = time.perf_counter()
                await self.budget.commit(info.hold, used_tokens, usd_micros=usd, ledger=ledger)
                metrics.BUDGET_COMMIT.observe(time.perf_counter() - started)

        await self._tail(info, used_tokens, record, settle)

    async def end_failed(
        self,
        info: RequestInfo,
        error: BaseException,
        *,
        provider: str,
        attempts: int,
        charge: chat_pb2.Usage | None = None,
        model: str = "",
    ) -> RouterError:
        """End a failed request: commit ``charge`` (priced: its ``cost_usd_micros``) when it
        is not empty (the provider did work for it), else release; record the failure;
        return the error to raise. ``model``: the upstream model, for the cost ledger."""
        task = asyncio.current_task()
        if isinstance(error, asyncio.CancelledError | GeneratorExit) or (task is not None and task.cancelling()):
            router_error: RouterError = ClientCancelled("The client cancelled the request")
        elif isinstance(error, RouterError):
            router_error = error
        else:
            log.exception("unexpected failure", exc_info=error)
            router_error = UpstreamError(f"Internal failure: {type(error).__name__}")
        charged = charge.total_tokens if charge is not None and info.hold is not None else 0

        async def settle() -> None:
            if info.hold is not None:
                if charged > 0 and charge is not None:
                    ledger = LedgerLine(provider, model, charge.prompt_tokens, charge.completion_tokens)
                    await self.budget.commit(info.hold, charged, usd_micros=charge.cost_usd_micros, ledger=ledger)
                else:
                    await self.budget.release(info.hold)

        def record() -> None:
            self.failed(
                info,
                provider=provider,
                error=router_error,
                attempts=attempts,
                charge=charge if charged else None,
            )

        await self._tail(info, charged, record, settle)
        return router_error

    def _finish_key(self, info: RequestInfo, actual_tokens: int) -> None:
        limits = info.limits
        # The gate finishes only what is tracked (TPM, concurrency); RPM alone needs no finish.
        if info.admitted_tokens is not None and limits is not None:
            self.gate.finish_later(
                info.key_id,
                info.request_id,
                limits,
                estimated=info.admitted_tokens,
                actual=actual_tokens,
                unconfirmed=info.admit_unconfirmed,
            )
        info.admitted_tokens = None  # exactly once

    # -- events ---------------------------------------------------------------------------

    def completed(
        self,
        info: RequestInfo,
        *,
        provider: ProviderConfig | None,
        usage: chat_pb2.Usage,
        finish_reason: str,
        attempts: int,
        usd: int = 0,
        cached: bool = False,
        settlement: str = "",
        charged_tokens: int = 0,
    ) -> None:
        """``charged_tokens``: for a cache hit, what the pool paid (0 when hits are free)."""
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
            cost_usd=0.0 if cached else usd / 1_000_000,
            cost_usd_micros=0 if cached else usd,
            kind=info.kind,
            cached=cached,
            attempts=attempts,
            key_id=info.key_id,
            pool_chain=info.chain,
            settlement=settlement,
        )
        self._publisher.publish_background(SUBJECT_COMPLETED, event, info.request_id)
        metrics.observe_completed(
            info, provider, usage, event.cost_usd_micros, cached=cached, charged_tokens=charged_tokens
        )
        metrics.span_outcome(info, provider, usage, finish_reason=finish_reason, attempts=attempts, cached=cached)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "inference completed",
                extra={
                    "model": info.model,
                    "provider": event.provider,
                    "pool": info.pool,
                    "key_id": info.key_id,
                    "stream": info.stream,
                    "prompt_tokens": usage.prompt_tokens,
                    "completion_tokens": usage.completion_tokens,
                    "cost_usd_micros": event.cost_usd_micros,
                    "latency_ms": event.latency_ms,
                    "attempts": attempts,
                    "cached": cached,
                },
            )

    def failed(
        self,
        info: RequestInfo,
        *,
        provider: str,
        error: RouterError,
        attempts: int,
        charge: chat_pb2.Usage | None = None,
    ) -> None:
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
            key_id=info.key_id,
            pool_chain=info.chain,
            charged_tokens=charge.total_tokens if charge is not None else 0,
            cost_usd_micros=charge.cost_usd_micros if charge is not None else 0,
        )
        if charge is not None:
            event.usage.CopyFrom(charge)
        self._publisher.publish_background(SUBJECT_FAILED, event, info.request_id)
        metrics.observe_failed(info, provider, self._providers.get(provider), error.error_code, charge)
        metrics.span_outcome(
            info, self._providers.get(provider), charge, error_type=error.error_code, attempts=attempts
        )
        if log.isEnabledFor(logging.INFO):
            log.info(
                "inference failed",
                extra={
                    "model": info.model,
                    "provider": provider,
                    "pool": info.pool,
                    "key_id": info.key_id,
                    "stream": info.stream,
                    "error_code": error.error_code,
                    "http_status": event.http_status,
                    "charged_tokens": event.charged_tokens,
                    "latency_ms": event.latency_ms,
                    "attempts": attempts,
                },
            )

    async def drain(self, commit_timeout: float) -> None:
        """Shutdown: endings under way, then settlements being retried, then key finishes."""
        while self._tails:  # an ending may start another (a stream's left settlement)
            await asyncio.gather(*list(self._tails), return_exceptions=True)
        await self.budget.drain(commit_timeout)
        await self.gate.drain(commit_timeout)
