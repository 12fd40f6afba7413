"""Calling backends for one request: candidates in strategy order, breaker and
rate-limit gating, retries with jittered exponential backoff, fallback.

Per candidate: skip it when its breaker is open (a half-open one admits one trial) or
when it is a local worker that says it is overloaded or out of memory;
skip it when its rate limit is full (remembering the Retry-After); else call it up
to ``retry.max_attempts`` times while the failure is retryable (connect errors,
timeouts, 429, 5xx — never another 4xx) and time is left; then, if the failure
allows it (``fallback``), move to the next candidate. On the success path this
costs a dictionary lookup per candidate tried, plus one Lua call when the provider
has limits configured.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from hoosh_common.telemetry import exporting
from opentelemetry import trace

from . import metrics
from .backends.base import CallParams
from .config import RetryConfig
from .errors import NoHealthyBackend, RateLimited, RouterError, UpstreamTimeout
from .health import HealthBoard
from .ratelimit import Admission, RateLimiter
from .routing import Kind, ModelRouter, Route, is_pattern

log = logging.getLogger(__name__)
tracer = trace.get_tracer("hoosh.router")

T = TypeVar("T")


class RetryPolicy:
    """Bounded attempts with "equal jitter" exponential backoff (half fixed, half random)."""

    def __init__(self, config: RetryConfig, rng: Callable[[], float] = random.random) -> None:
        self.max_attempts = config.max_attempts
        self._base = config.backoff_base_ms / 1000
        self._max = config.backoff_max_ms / 1000
        self._rng = rng

    def delay(self, attempt: int, error: RouterError) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (0-based), or None: do not retry here.

        A provider's Retry-After is honoured when it fits under the backoff cap; a longer
        one means "go elsewhere".
        """
        if not error.retryable or attempt + 1 >= self.max_attempts:
            return None
        cap: float = min(self._max, self._base * (2**attempt))
        delay = cap / 2 + self._rng() * cap / 2
        if error.retry_after is not None:
            if error.retry_after > self._max:
                return None
            delay = max(delay, float(error.retry_after))
        return delay


@dataclass(slots=True)
class Attempts:
    """What happened while dispatching one request (for events, commits and corrections)."""

    candidates: list[Route]
    deadline: float  # time.monotonic() by which every attempt must be done
    tokens: int  # estimate charged to TPM limits
    route: Route | None = None  # the candidate that answered, or the last one called
    count: int = 0
    admission: Admission | None = None
    skipped_open: list[str] = field(default_factory=list)
    # Settlement facts: an upstream call is under way (a cancellation now leaves it
    # unanswered), and how many calls were sent and never usably answered (timed out,
    # cancelled, or accepted and then cut, oversized or malformed): the provider may
    # have billed those, so a failed request pays its prompt.
    in_flight: bool = False
    unanswered: int = 0
    kind: Kind = "chat"
    label: str = ""  # the model's metric label (configured name or pattern)
    last_started: float = 0.0  # time.monotonic() when the last upstream call began

    @property
    def maybe_billed(self) -> bool:
        """A call was sent and not answered: the provider may have charged for it."""
        return self.in_flight or self.unanswered > 0


@contextmanager
def attempt_span(route: Route, attempts: Attempts, params: CallParams) -> Iterator[None]:
    """One upstream call as a GenAI client span (``{operation} {model}``) while spans are
    exported; nothing otherwise. A failure sets ``error.type`` to its error code."""
    if not exporting():
        yield
        return
    provider = route.provider
    operation = metrics.GENAI_OPERATION.get(attempts.kind, attempts.kind)
    attributes: dict[str, str | int] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": metrics.genai_provider(provider),
        "gen_ai.request.model": route.upstream_model,
        "gen_ai.request.max_tokens": params.max_tokens,
        "hoosh.provider": provider.name,
        "hoosh.attempt": attempts.count,
    }
    address = urlsplit(provider.base_url) if provider.base_url else None
    if address is not None and address.hostname:
        attributes["server.address"] = address.hostname
        if address.port:
            attributes["server.port"] = address.port
    # A span name must stay bounded: the upstream model when the request matched an exact
    # configured name, else the pattern it matched (the model itself is an attribute).
    named = attempts.label if is_pattern(attempts.label) else route.upstream_model
    with tracer.start_as_current_span(
        f"{operation} {named}", kind=trace.SpanKind.CLIENT, attributes=attributes
    ) as span:
        try:
            yield
        except RouterError as error:
            span.set_attribute("error.type", error.error_code)
            raise
        except TimeoutError:
            span.set_attribute("error.type", "timeout")
            raise


class Dispatcher:
    def __init__(
        self,
        router: ModelRouter,
        health: HealthBoard,
        limiter: RateLimiter,
        retry: RetryPolicy,
        *,
        upstream_timeout: float,
        request_timeout: float,
        fallback: bool = True,
    ) -> None:
        self.router = router
        self.health = health
        self.limiter = limiter
        self.retry = retry
        self._upstream_timeout = upstream_timeout
        self.request_timeout = request_timeout
        self._fallback = fallback

    def candidates(self, model: str, kind: Kind = "chat") -> list[Route]:
        """Strategy-ordered candidates whose breaker lets a call through; NoHealthyBackend if none."""
        ordered = self.router.order(self.router.resolve(model, kind))
        usable = [route for route in ordered if self.health.available(route.provider.name)]
        if not usable:
            names = [route.provider.name for route in ordered]
            raise NoHealthyBackend(
                f"No healthy backend for model '{model}': {self.health.why_unavailable(names)}",
                retry_after=self.health.retry_after(names),
            )
        return usable if self._fallback else usable[:1]

    def deadline(self, time_remaining: float | None) -> float:
        """The monotonic deadline of a request (the caller's gRPC deadline when shorter)."""
        budget = self.request_timeout
        if time_remaining is not None:
            budget = min(budget, time_remaining)
        return time.monotonic() + budget

    async def run(
        self,
        attempts: Attempts,
        request_id: str,
        max_tokens: int,
        call: Callable[[Route, CallParams], Awaitable[T]],
    ) -> T:
        """Call candidates until one answers; raise the error that ended the search."""
        last_error: RouterError | None = None
        limited_after: int | None = None
        for route in attempts.candidates:
            name = route.provider.name
            if not self.health.acquire(name):
                attempts.skipped_open.append(name)
                continue
            try:
                for attempt in range(self.retry.max_attempts):
                    admission = None
                    if RateLimiter.applies(route.provider):
                        admission = await self.limiter.admit(route.provider, attempts.tokens)
                        if not admission.allowed:
                            limited_after = min(limited_after or admission.retry_after, admission.retry_after)
                            break
                    remaining = attempts.deadline - time.monotonic()
                    if remaining <= 0:
                        raise UpstreamTimeout("The request ran out of time before a backend answered")
                    timeout = min(route.provider.timeout_seconds or self._upstream_timeout, remaining)
                    limit = route.provider.max_tokens_limit
                    params = CallParams(
                        upstream_model=route.upstream_model,
                        max_tokens=min(max_tokens, limit) if limit else max_tokens,
                        request_id=request_id,
                        timeout=timeout,
                    )
                    attempts.route, attempts.admission = route, admission
                    attempts.count += 1
                    started = attempts.last_started = time.monotonic()
                    error: RouterError
                    attempts.in_flight = True  # stays set if this task is cancelled mid-call
                    try:
                        with attempt_span(route, attempts, params):
                            async with asyncio.timeout(timeout):
                                result = await call(route, params)
                    except TimeoutError:
                        error = UpstreamTimeout(f"Provider '{name}' timed out after {timeout:.1f}s")
                    except RouterError as raised:
                        error = raised
                    else:
                        attempts.in_flight = False
                        took = time.monotonic() - started
                        metrics.observe_attempt(name, "ok", took)
                        await self.health.record_success(name, took * 1000)
                        return result
                    attempts.in_flight = False
                    metrics.observe_attempt(name, error.error_code, time.monotonic() - started)
                    if isinstance(error, UpstreamTimeout) or error.accepted:
                        attempts.unanswered += 1
                    if error.backend_fault:
                        await self.health.record_failure(name, error)
                    if admission is not None:
                        # The attempt used no tokens: take its estimate back out of the TPM window,
                        # or retries and fallbacks would pile phantom tokens into it.
                        self.limiter.correct(route.provider, admission, attempts.tokens, 0)
                        attempts.admission = None
                    last_error = error
                    delay = self.retry.delay(attempt, error)
                    if delay is None or time.monotonic() + delay >= attempts.deadline:
                        break
                    if self.health.view(name).state == "open":
                        break  # our failures opened the breaker: stop hammering it
                    log.info(
                        "retrying backend",
                        extra={
                            "provider": name,
                            "attempt": attempt + 1,
                            "delay_s": round(delay, 3),
                            "error": error.message,
                        },
                    )
                    await asyncio.sleep(delay)
                if last_error is not None and not last_error.fallback:
                    raise last_error
            finally:
                self.health.release(name)
            if last_error is not None and attempts.route is route:
                log.info("falling back", extra={"provider": name, "error": last_error.message})
        if last_error is not None:
            raise last_error
        if limited_after is not None:
            raise RateLimited(
                "Every backend for this model is over its rate limit; try again later", retry_after=limited_after
            )
        raise NoHealthyBackend(
            f"No healthy backend: {self.health.why_unavailable(attempts.skipped_open)}",
            retry_after=self.health.retry_after(attempts.skipped_open),
        )
