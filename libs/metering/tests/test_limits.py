"""KeyLimiter against the real Redis (single node and cluster). The clock is injected, so
every test places itself at a chosen point of a minute: they check the sliding-window
arithmetic whatever minute of the hour the suite runs in."""

from __future__ import annotations

import time

import pytest
from hoosh_metering.errors import BudgetUnavailable, RateLimited
from hoosh_metering.limits import KeyLimiter, KeyLimits
from hoosh_metering.redis import RedisClient, connect_redis


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def window_start() -> float:
    """The start of the current minute (near real time, so Redis key expiries hold)."""
    return (time.time() // 60) * 60


@pytest.fixture
def clock() -> Clock:
    return Clock(window_start())


@pytest.fixture
def limiter(backend: tuple[str, RedisClient, str], clock: Clock) -> KeyLimiter:
    _, client, prefix = backend
    return KeyLimiter(client, prefix, inflight_ttl_seconds=30, clock=clock)


async def admitted(limiter: KeyLimiter, limits: KeyLimits, count: int, *, tokens: int = 0, key: str = "k1") -> int:
    """How many of ``count`` fresh requests are admitted, stopping at the first refusal."""
    for i in range(count):
        try:
            await limiter.admit(key, f"req-{time.monotonic_ns()}-{i}", limits, tokens)
        except RateLimited:
            return i
    return count


async def test_rpm_counts_the_current_window_and_says_when_to_retry(limiter: KeyLimiter, clock: Clock) -> None:
    clock.now += 30  # half way through the minute, nothing before it
    limits = KeyLimits(rpm=10)
    assert await admitted(limiter, limits, 20) == 10
    with pytest.raises(RateLimited) as info:
        await limiter.admit("k1", "one-more", limits, 0)
    # 10 in this window: one frees when 1/10 of them has slid out of the next one:
    # (1 - 0.5 + 0.1) * 60 s.
    assert info.value.limit == "rpm" and info.value.retry_after_seconds == 36


async def test_the_previous_window_still_weighs(limiter: KeyLimiter, clock: Clock) -> None:
    limits = KeyLimits(rpm=10)
    clock.now += 50  # fill the first minute
    assert await admitted(limiter, limits, 10) == 10
    clock.now += 25  # 15 s into the next: the previous 10 weigh 0.75 -> 7.5
    assert await admitted(limiter, limits, 10) == 2  # 7.5 + 2 <= 10 < 7.5 + 3
    clock.now += 30  # 45 s in: weight 0.25 -> 2.5 + 2 admitted, room for 5 more
    assert await admitted(limiter, limits, 10) == 5
    clock.now += 60  # two minutes on: only the 7 of the last window weigh, by 0.25
    assert await admitted(limiter, limits, 20) == 8  # 1.75 + 8 <= 10


async def test_tpm_is_corrected_by_the_real_usage(limiter: KeyLimiter, clock: Clock) -> None:
    clock.now += 10
    limits = KeyLimits(tpm=1000)
    await limiter.admit("k1", "a", limits, 600)
    with pytest.raises(RateLimited) as info:
        await limiter.admit("k1", "b", limits, 500)
    assert info.value.limit == "tpm"
    await limiter.finish("k1", "a", limits, estimated_tokens=600, actual_tokens=100)
    await limiter.admit("k1", "b", limits, 500)  # 100 + 500 now
    with pytest.raises(RateLimited):
        await limiter.admit("k1", "c", limits, 401)
    # The correction goes to the window the estimate went to, even a minute later.
    await limiter.finish("k1", "b", limits, estimated_tokens=500, actual_tokens=0)
    await limiter.admit("k1", "c", limits, 401)
    # A request bigger than the whole TPM still fits an empty window.
    await limiter.admit("k2", "huge", limits, 5000)


async def test_concurrency_frees_on_finish_and_when_a_holder_dies(limiter: KeyLimiter, clock: Clock) -> None:
    limits = KeyLimits(max_concurrency=2)
    await limiter.admit("k1", "a", limits, 0)
    await limiter.admit("k1", "b", limits, 0)
    await limiter.admit("k1", "b", limits, 0)  # the same request again is counted once
    with pytest.raises(RateLimited) as info:
        await limiter.admit("k1", "c", limits, 0)
    assert info.value.limit == "concurrency" and info.value.retry_after_seconds >= 1
    await limiter.finish("k1", "a", limits, estimated_tokens=0, actual_tokens=0)
    await limiter.admit("k1", "c", limits, 0)
    with pytest.raises(RateLimited):
        await limiter.admit("k1", "d", limits, 0)
    clock.now += 31  # past inflight_ttl_seconds: b and c never finished; their slots come back
    await limiter.admit("k1", "d", limits, 0)
    await limiter.admit("k1", "e", limits, 0)
    # Keys are separate.
    await limiter.admit("k2", "a", limits, 0)


async def test_every_limit_of_one_key_lives_in_one_slot(
    limiter: KeyLimiter, backend: tuple[str, RedisClient, str]
) -> None:
    _, client, prefix = backend
    limits = KeyLimits(rpm=5, tpm=100, max_concurrency=3)
    await limiter.admit("key_abc", "a", limits, 10)
    keys = sorted([key.decode() async for key in client.scan_iter(match=f"{prefix}*")])
    assert keys and all(key.startswith(f"{prefix}{{k:key_abc}}:") for key in keys)
    assert {key.rsplit(":", 1)[-1] for key in keys} >= {"inflight", "admitted"}


async def test_redis_clock_mode(backend: tuple[str, RedisClient, str]) -> None:
    _, client, prefix = backend
    limiter = KeyLimiter(client, prefix)  # no clock: Redis TIME
    limits = KeyLimits(rpm=3)
    # Whatever the minute, at most 3 requests fit the sliding window at once.
    assert await admitted(limiter, limits, 10) <= 3


async def test_no_limits_cost_no_round_trip() -> None:
    nowhere = connect_redis("redis://127.0.0.1:1/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        limiter = KeyLimiter(nowhere, "unused:")
        await limiter.admit("k1", "a", KeyLimits(), 100)
        await limiter.finish("k1", "a", KeyLimits(), estimated_tokens=100, actual_tokens=5)
        await limiter.finish("k1", "a", KeyLimits(rpm=5), estimated_tokens=100, actual_tokens=5)  # nothing tracked
        with pytest.raises(BudgetUnavailable):  # with limits, an unreachable Redis admits nothing
            await limiter.admit("k1", "a", KeyLimits(rpm=5), 100)
        # finish is best effort: it never raises.
        await limiter.finish("k1", "a", KeyLimits(max_concurrency=1), estimated_tokens=1, actual_tokens=1)
    finally:
        await nowhere.aclose()


def run_twice(script):  # type: ignore[no-untyped-def]
    """What redis-py's retry does after a reply is lost: the same command, sent again."""

    async def call(keys: list, args: list) -> object:  # type: ignore[type-arg]
        await script(keys=keys, args=args)
        return await script(keys=keys, args=args)

    return call


@pytest.mark.parametrize("limits", [KeyLimits(rpm=3), KeyLimits(rpm=3, tpm=1_000), KeyLimits(rpm=3, max_concurrency=9)])
async def test_a_retried_admission_counts_once(limiter: KeyLimiter, clock: Clock, limits: KeyLimits) -> None:
    clock.now += 10
    limiter._admit = run_twice(limiter._admit)  # type: ignore[method-assign]
    for i in range(3):
        await limiter.admit("k1", f"req-{i}", limits, 10)
    with pytest.raises(RateLimited) as info:
        await limiter.admit("k1", "req-3", limits, 10)
    assert info.value.limit == "rpm"
    # A refused request is not remembered as admitted: its retry is refused too.
    with pytest.raises(RateLimited):
        await limiter.admit("k1", "req-3", limits, 10)


async def test_huge_token_counts_saturate(
    limiter: KeyLimiter, clock: Clock, backend: tuple[str, RedisClient, str]
) -> None:
    client = backend[1]
    clock.now += 10
    limits = KeyLimits(tpm=100)
    await limiter.admit("k1", "big", limits, 10**30)  # one request bigger than the TPM fits an empty window
    # The correction past 2**53 saturates instead of wrapping the window's count negative.
    await limiter.finish("k1", "big", limits, estimated_tokens=0, actual_tokens=10**30)
    window = int(clock.now // 60)
    value = await client.hget(f"{limiter.key_base('k1')}w:{window}", "t")
    assert value is not None and int(value) == 2**53 - 1
    with pytest.raises(RateLimited):
        await limiter.admit("k1", "next", limits, 1)
