"""The requests- and tokens-per-minute Lua limiter against the real Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as redis
from hoosh_router.config import ProviderConfig
from hoosh_router.ratelimit import RateLimiter


def provider(rpm: int | None = None, tpm: int | None = None, name: str = "p") -> ProviderConfig:
    return ProviderConfig(name=name, type="openai", rpm=rpm, tpm=tpm)


async def _window_state(client: redis.Redis, limiter: RateLimiter, name: str, window: int) -> dict[bytes, bytes]:
    """One window's counters, as {b"r": ..., b"t": ...} (they live in the provider's one hash)."""
    fields = await client.hgetall(limiter.key(name))
    suffix = f":{window}".encode()
    return {name_[:1]: value for name_, value in fields.items() if name_.endswith(suffix)}


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


class Clock:
    """Seconds since the epoch, set by the test (given to the limiter's constructor)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("elapsed", "current", "allowed", "retry_after"),
    [
        # rpm 10, the whole previous minute at 10: 10 * (1 - elapsed) + current + 1 must fit under 10.
        (0.00, 0, False, 6),
        (0.05, 0, False, 3),
        (0.10, 0, True, 0),
        (0.45, 4, False, 3),
        (0.55, 4, True, 0),
        (0.95, 8, True, 0),
        (0.97, 9, False, 2),  # only the end of this minute makes room
    ],
)
@pytest.mark.parametrize("minute", [0, 11, 12, 37, 59])
async def test_the_previous_window_still_weighs(
    redis_client: redis.Redis,
    prefix: str,
    minute: int,
    elapsed: float,
    current: int,
    allowed: bool,
    retry_after: int,
) -> None:
    """Exact at any minute of the hour: the clock comes in through the constructor."""
    hour = 1_900_000_800  # an hour boundary (a multiple of 3600)
    window = (hour + minute * 60) // 60
    clock = Clock(window * 60 + elapsed * 60)
    limiter = RateLimiter(redis_client, prefix, clock=clock)
    limited = provider(rpm=10)
    fields = {f"r:{window - 1}": 10, f"t:{window - 1}": 0}
    if current:
        fields[f"r:{window}"] = current
    await redis_client.hset(limiter.key("p"), mapping=fields)
    admission = await limiter.admit(limited, 0)
    assert (admission.allowed, admission.retry_after, admission.window) == (allowed, retry_after, window)
    state = await _window_state(redis_client, limiter, "p", window)
    assert int(state.get(b"r", 0)) == current + (1 if allowed else 0)


async def test_the_previous_window_weighs_on_redis_time(redis_client: redis.Redis, prefix: str) -> None:
    """Without a clock the script reads Redis' TIME; a huge previous window refuses at any instant."""
    limiter = RateLimiter(redis_client, prefix)
    limited = provider(rpm=10)
    probe = await limiter.admit(limited, 0)  # learn the current window (counts 1)
    await redis_client.hset(limiter.key("p"), mapping={f"r:{probe.window - 1}": 10**12})
    refused = await limiter.admit(limited, 0)
    if refused.window == probe.window:  # not across a minute boundary
        assert not refused.allowed and refused.retry_after >= 1


async def test_old_windows_are_dropped(redis_client: redis.Redis, prefix: str) -> None:
    clock = Clock(1_900_000_800.0)
    limiter = RateLimiter(redis_client, prefix, clock=clock)
    limited = provider(rpm=100)
    for _ in range(4):
        await limiter.admit(limited, 1)
        clock.now += 60
    fields = await redis_client.hgetall(limiter.key("p"))
    windows = sorted({int(name.split(b":")[1]) for name in fields})
    assert windows == [31_666_682, 31_666_683]  # the two newest minutes only


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
