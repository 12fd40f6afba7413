"""Retries, fallback, breaker and rate-limit gating of one request's attempts
(health and limits in the real Redis; calls scripted per provider)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as redis
from hoosh_router.backends.base import Backend, CallParams
from hoosh_router.config import Catalogue, ProviderConfig, RetryConfig
from hoosh_router.dispatch import Attempts, Dispatcher, RetryPolicy
from hoosh_router.errors import (
    InvalidRequest,
    ModelNotFound,
    NoHealthyBackend,
    RateLimited,
    RouterError,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from hoosh_router.health import HealthBoard
from hoosh_router.ratelimit import RateLimiter
from hoosh_router.routing import ModelRouter, Route

# --------------------------------------------------------------------------- the retry policy


def test_backoff_grows_with_jitter_and_is_capped() -> None:
    config = RetryConfig(max_attempts=10, backoff_base_ms=100, backoff_max_ms=1000)
    low, high = RetryPolicy(config, rng=lambda: 0.0), RetryPolicy(config, rng=lambda: 0.999999)
    error = UpstreamUnavailable("x")
    assert [low.delay(n, error) for n in range(5)] == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.5])
    assert [high.delay(n, error) for n in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0], rel=1e-4)


def test_what_is_not_retried() -> None:
    policy = RetryPolicy(RetryConfig(max_attempts=3, backoff_base_ms=100, backoff_max_ms=2000), rng=lambda: 0.5)
    assert policy.delay(0, InvalidRequest("bad")) is None
    assert policy.delay(0, UpstreamError("malformed")) is None  # not retryable (but may fall back)
    assert policy.delay(2, UpstreamUnavailable("x")) is None  # the last attempt
    assert policy.delay(0, RateLimited("slow down", retry_after=1)) == 1.0  # Retry-After honoured
    assert policy.delay(0, RateLimited("come back later", retry_after=30)) is None  # too long: go elsewhere


# --------------------------------------------------------------------------- the dispatcher

Outcome = RouterError | str | float  # raise it / answer it / hang this many seconds


class Scripts:
    """Per provider, the outcomes of its successive calls."""

    def __init__(self, **scripts: list[Outcome]) -> None:
        self.scripts = scripts
        self.calls: dict[str, int] = dict.fromkeys(scripts, 0)

    async def __call__(self, route: Route, params: CallParams) -> str:
        name = route.provider.name
        outcome = self.scripts[name][min(self.calls[name], len(self.scripts[name]) - 1)]
        self.calls[name] += 1
        if isinstance(outcome, RouterError):
            raise outcome
        if isinstance(outcome, float):
            await asyncio.sleep(outcome)
        return f"{name}:{params.upstream_model}"


class Named:
    def __init__(self, name: str) -> None:
        self.name = name


def dispatcher_for(
    client: redis.Redis,
    prefix: str,
    providers: list[dict],
    *,
    threshold: int = 5,
    fallback: bool = True,
    request_timeout: float = 30.0,
) -> Dispatcher:
    catalogue = Catalogue.model_validate(
        {
            "providers": [{"type": "openai", "models": ["m"], **p} for p in providers],
            "health": {"failure_threshold": threshold, "probe_interval_seconds": 0},
        }
    )
    entries: list[tuple[ProviderConfig, Backend]] = [(p, Named(p.name)) for p in catalogue.providers]  # type: ignore[misc]
    health = HealthBoard(client, prefix, entries, catalogue.health)
    return Dispatcher(
        ModelRouter(entries),
        health,
        RateLimiter(client, prefix),
        RetryPolicy(RetryConfig(max_attempts=3, backoff_base_ms=1, backoff_max_ms=5)),
        upstream_timeout=10.0,
        request_timeout=request_timeout,
        fallback=fallback,
    )


async def run(dispatcher: Dispatcher, call: Callable[[Route, CallParams], Awaitable[str]]) -> tuple[str, Attempts]:
    attempts = Attempts(candidates=dispatcher.candidates("m"), deadline=dispatcher.deadline(None), tokens=10)
    return await dispatcher.run(attempts, "req", 16, call), attempts


TWO = [{"name": "p", "priority": 1}, {"name": "q", "priority": 2}]


async def test_a_transient_failure_is_retried(redis_client: redis.Redis, prefix: str) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, TWO)
    scripts = Scripts(p=[UpstreamError("503", retryable=True), UpstreamUnavailable("refused"), "ok"], q=["ok"])
    result, attempts = await run(dispatcher, scripts)
    assert result == "p:m" and attempts.count == 3 and scripts.calls == {"p": 3, "q": 0}
    assert dispatcher.health.view("p").failures == 0  # the success cleared them


async def test_a_client_error_is_neither_retried_nor_failed_over(redis_client: redis.Redis, prefix: str) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, TWO)
    scripts = Scripts(p=[InvalidRequest("bad field")], q=["ok"])
    with pytest.raises(InvalidRequest):
        await run(dispatcher, scripts)
    assert scripts.calls == {"p": 1, "q": 0}
    assert dispatcher.health.view("p").failures == 0  # not the backend's fault


async def test_exhausted_retries_fall_back_to_the_next_candidate(redis_client: redis.Redis, prefix: str) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, TWO)
    scripts = Scripts(p=[UpstreamUnavailable("refused")], q=["ok"])
    result, attempts = await run(dispatcher, scripts)
    assert result == "q:m" and attempts.route is not None and attempts.route.provider.name == "q"
    assert attempts.count == 4 and scripts.calls == {"p": 3, "q": 1}
    assert dispatcher.health.view("p").failures == 3


async def test_provider_faults_fall_back_without_retrying(redis_client: redis.Redis, prefix: str) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, TWO)
    scripts = Scripts(p=[ModelNotFound("unknown here", fallback=True)], q=["ok"])
    assert (await run(dispatcher, scripts))[0] == "q:m" and scripts.calls == {"p": 1, "q": 1}
    scripts = Scripts(p=[UpstreamError("malformed JSON")], q=["ok"])
    assert (await run(dispatcher, scripts))[0] == "q:m" and scripts.calls == {"p": 1, "q": 1}


async def test_the_last_error_surfaces_when_everything_fails(redis_client: redis.Redis, prefix: str) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, TWO)
    with pytest.raises(UpstreamError, match="q broke"):
        await run(dispatcher, Scripts(p=[UpstreamUnavailable("p down")], q=[UpstreamError("q broke")]))


async def test_an_open_breaker_is_skipped(redis_client: redis.Redis, prefix: str) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, TWO, threshold=2)
    scripts = Scripts(p=[UpstreamUnavailable("down")], q=["ok"])
    result, _ = await run(dispatcher, scripts)
    # The breaker opened after two failures: no third try, straight to q.
    assert result == "q:m" and scripts.calls == {"p": 2, "q": 1}
    assert dispatcher.health.state_of("p") == "open"
    assert [route.provider.name for route in dispatcher.candidates("m")] == ["q"]
    await run(dispatcher, scripts)
    assert scripts.calls == {"p": 2, "q": 2}

    for _ in range(2):
        await dispatcher.health.record_failure("q", "down too")
    with pytest.raises(NoHealthyBackend) as raised:
        dispatcher.candidates("m")
    assert raised.value.retry_after is not None and raised.value.retry_after >= 1


async def test_rate_limited_candidates_are_skipped_then_429(redis_client: redis.Redis, prefix: str) -> None:
    dispatcher = dispatcher_for(
        redis_client, prefix, [{"name": "p", "priority": 1, "rpm": 1}, {"name": "q", "priority": 2, "rpm": 1}]
    )
    scripts = Scripts(p=["ok"], q=["ok"])
    assert (await run(dispatcher, scripts))[0] == "p:m"
    assert (await run(dispatcher, scripts))[0] == "q:m"
    with pytest.raises(RateLimited) as raised:
        await run(dispatcher, scripts)
    assert raised.value.retry_after is not None and raised.value.retry_after >= 1
    assert scripts.calls == {"p": 1, "q": 1}


async def test_per_provider_timeout_then_fallback(redis_client: redis.Redis, prefix: str) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, [{"name": "p", "priority": 1, "timeout_seconds": 0.05}, TWO[1]])
    scripts = Scripts(p=[5.0], q=["ok"])
    result, _ = await run(dispatcher, scripts)
    assert result == "q:m" and scripts.calls == {"p": 3, "q": 1}
    assert "timed out" in dispatcher.health.view("p").last_error


async def test_the_request_deadline_bounds_all_attempts(redis_client: redis.Redis, prefix: str) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, TWO, request_timeout=0.1)
    scripts = Scripts(p=[5.0], q=[5.0])
    with pytest.raises(UpstreamTimeout):
        await run(dispatcher, scripts)
    assert scripts.calls["p"] >= 1 and sum(scripts.calls.values()) <= 3


async def test_fallback_can_be_turned_off(redis_client: redis.Redis, prefix: str) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, TWO, fallback=False)
    with pytest.raises(UpstreamUnavailable):
        await run(dispatcher, Scripts(p=[UpstreamUnavailable("down")], q=["ok"]))


async def test_failed_attempts_take_their_tokens_back_out_of_the_tpm_window(
    redis_client: redis.Redis, prefix: str
) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, [{"name": "p", "tpm": 1000}])
    scripts = Scripts(p=[UpstreamUnavailable("refused"), UpstreamUnavailable("refused"), "ok"])
    result, attempts = await run(dispatcher, scripts)
    assert result == "p:m" and attempts.count == 3
    await dispatcher.limiter.drain()
    counters = await redis_client.hgetall(dispatcher.limiter.key("p"))
    charged = sum(int(value) for field, value in counters.items() if field.startswith(b"t:"))
    assert charged == attempts.tokens  # only the attempt that answered; the chat path then settles it


async def test_an_upstream_404_for_an_unknown_model_does_not_trip_the_breaker(
    redis_client: redis.Redis, prefix: str
) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, TWO, threshold=1)
    for _ in range(3):
        scripts = Scripts(p=[ModelNotFound("unknown here", fallback=True)], q=["ok"])
        assert (await run(dispatcher, scripts))[0] == "q:m"  # the next candidate may know it
    assert dispatcher.health.state_of("p") == "closed" and dispatcher.health.view("p").failures == 0
    # A real fault still counts: one opens it at this threshold.
    await run(dispatcher, Scripts(p=[UpstreamUnavailable("down")], q=["ok"]))
    assert dispatcher.health.state_of("p") == "open"


async def test_attempts_know_when_a_call_went_unanswered(redis_client: redis.Redis, prefix: str) -> None:
    dispatcher = dispatcher_for(redis_client, prefix, [{"name": "p"}], request_timeout=30.0)
    answered = Attempts(candidates=dispatcher.candidates("m"), deadline=dispatcher.deadline(None), tokens=10)
    with pytest.raises(InvalidRequest):
        await dispatcher.run(answered, "req", 16, Scripts(p=[InvalidRequest("bad")]))
    assert not answered.maybe_billed  # answered (with an error): nothing to pay
    hanging = Attempts(candidates=dispatcher.candidates("m"), deadline=dispatcher.deadline(None), tokens=10)
    task = asyncio.create_task(dispatcher.run(hanging, "req", 16, Scripts(p=[5.0])))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hanging.in_flight and hanging.maybe_billed  # sent, never answered
