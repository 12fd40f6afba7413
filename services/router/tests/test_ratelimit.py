"""The requests- and tokens-per-minute Lua limiter against the real Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis
from hoosh_router.config import ProviderConfig
from hoosh_router.ratelimit import RateLimiter


def provider(rpm: int | None = None, tpm: int | None = None, name: str = "p") -> ProviderConfig:
    return ProviderConfig(name=name, type="openai", rpm=rpm, tpm=tpm)


async def _window_state(client: redis.Redis, limiter: RateLimiter, name: str, window: int) -> dict[bytes, bytes]:
    return await client.hgetall(f"{limiter.key(name)}:{window}")


def test_only_configured_providers_are_limited() -> None:
    assert not RateLimiter.applies(provider())
    assert RateLimiter.applies(provider(rpm=1)) and RateLimiter.applies(provider(tpm=1))


async def test_rpm_admits_up_to_the_limit_then_says_when(redis_client: redis.Redis, prefix: str) -> None:
    limiter = RateLimiter(redis_client, prefix)
    limited = provider(rpm=5)
    results = [await limiter.admit(limited, 10) for _ in range(8)]
    assert [r.allowed for r in results] == [True] * 5 + [False] * 3
    assert all(1 <= r.retry_after <= 120 for r in results[5:])
    state = await _window_state(redis_client, limiter, "p", results[0].window)
    assert state == {b"r": b"5", b"t": b"50"}  # refused requests are not counted


async def test_replicas_racing_hold_one_limit(redis_client: redis.Redis, prefix: str) -> None:
    other_client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        replicas = [RateLimiter(redis_client, prefix), RateLimiter(other_client, prefix)]
        limited = provider(rpm=20)
        results = await asyncio.gather(*(replicas[i % 2].admit(limited, 1) for i in range(60)))
        assert sum(r.allowed for r in results) == 20
    finally:
        await other_client.aclose()


async def test_tpm_counts_estimates_and_takes_corrections(redis_client: redis.Redis, prefix: str) -> None:
    limiter = RateLimiter(redis_client, prefix)
    limited = provider(tpm=1000)
    first = await limiter.admit(limited, 900)
    assert first.allowed
    assert not (await limiter.admit(limited, 200)).allowed  # 900 + 200 > 1000
    limiter.correct(limited, first, estimated=900, actual=150)  # the real usage was much lower
    await limiter.drain()
    assert (await _window_state(redis_client, limiter, "p", first.window))[b"t"] == b"150"
    assert (await limiter.admit(limited, 200)).allowed


async def test_a_request_bigger_than_tpm_runs_alone(redis_client: redis.Redis, prefix: str) -> None:
    limiter = RateLimiter(redis_client, prefix)
    limited = provider(tpm=100)
    assert (await limiter.admit(limited, 5000)).allowed  # an empty window admits it
    refused = await limiter.admit(limited, 1)
    assert not refused.allowed and refused.retry_after >= 1


async def test_both_limits_together(redis_client: redis.Redis, prefix: str) -> None:
    limiter = RateLimiter(redis_client, prefix)
    limited = provider(rpm=3, tpm=100)
    assert (await limiter.admit(limited, 60)).allowed
    assert not (await limiter.admit(limited, 60)).allowed  # tokens
    assert (await limiter.admit(limited, 10)).allowed
    assert (await limiter.admit(limited, 10)).allowed
    assert not (await limiter.admit(limited, 1)).allowed  # requests


async def test_the_previous_window_still_weighs(redis_client: redis.Redis, prefix: str) -> None:
    limiter = RateLimiter(redis_client, prefix, window_seconds=3600)
    limited = provider(rpm=10)
    probe = await limiter.admit(limited, 0)  # learn the current window number (counts 1)
    # The whole previous hour ran at the limit; the part of it that still overlaps the last
    # hour counts: 10 * (1 - elapsed) + 1 (the probe) + 1 (this one) must fit under 10.
    await redis_client.hset(f"{limiter.key('p')}:{probe.window - 1}", mapping={"r": 10, "t": 0})

    async def elapsed() -> float:
        seconds, micros = await redis_client.time()
        return ((seconds % 3600) + micros / 1e6) / 3600

    before = await elapsed()
    second = await limiter.admit(limited, 0)
    after = await elapsed()
    fits = [10 * (1 - e) + 2 <= 10 for e in (before, after)]
    if fits[0] == fits[1]:  # not straddling the exact instant the answer changes
        assert second.allowed == fits[0]
    if not second.allowed:
        assert second.retry_after >= 1


async def test_redis_down_admits(prefix: str) -> None:
    from hoosh_cli.stack import free_port
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    try:
        admission = await RateLimiter(client, prefix).admit(provider(rpm=1), 1)
        assert admission.allowed and admission.window == -1
    finally:
        await client.aclose()
