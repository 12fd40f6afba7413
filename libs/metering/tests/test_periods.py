"""Calendar periods: boundaries in the pool's time zone, DST included; and pools with a
one-minute period rolling over while reservations are in flight (the store's clock is
injected, so the test decides when the minute ends)."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hoosh_metering.errors import BudgetExhausted, InvalidArgument
from hoosh_metering.periods import PERIODS, PeriodClock, period_bounds_ms, period_start_ms, validate_period
from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_metering.redis import RedisClient


def ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def local(value: int, zone: str) -> str:
    return datetime.fromtimestamp(value / 1000, ZoneInfo(zone)).isoformat()


@pytest.mark.parametrize(
    ("period", "zone", "now", "start", "end"),
    [
        ("minute", "UTC", "2024-05-10T10:20:30+00:00", "2024-05-10T10:20:00+00:00", "2024-05-10T10:21:00+00:00"),
        (
            "hourly",
            "Asia/Kathmandu",
            "2024-05-10T10:20:30+05:45",
            "2024-05-10T10:00:00+05:45",
            "2024-05-10T11:00:00+05:45",
        ),
        (
            "daily",
            "America/New_York",
            "2024-05-10T23:59:59-04:00",
            "2024-05-10T00:00:00-04:00",
            "2024-05-11T00:00:00-04:00",
        ),
        # DST starts (23 h day) and ends (25 h day) in Berlin.
        (
            "daily",
            "Europe/Berlin",
            "2024-03-31T12:00:00+02:00",
            "2024-03-31T00:00:00+01:00",
            "2024-04-01T00:00:00+02:00",
        ),
        (
            "daily",
            "Europe/Berlin",
            "2024-10-27T12:00:00+01:00",
            "2024-10-27T00:00:00+02:00",
            "2024-10-28T00:00:00+01:00",
        ),
        # The repeated hour is two periods.
        (
            "hourly",
            "Europe/Berlin",
            "2024-10-27T02:30:00+02:00",
            "2024-10-27T02:00:00+02:00",
            "2024-10-27T02:00:00+01:00",
        ),
        (
            "hourly",
            "Europe/Berlin",
            "2024-10-27T02:30:00+01:00",
            "2024-10-27T02:00:00+01:00",
            "2024-10-27T03:00:00+01:00",
        ),
        # Midnight does not exist in Santiago that day: the day starts at the transition.
        (
            "daily",
            "America/Santiago",
            "2024-09-08T12:00:00-03:00",
            "2024-09-08T01:00:00-03:00",
            "2024-09-09T00:00:00-03:00",
        ),
        # Weeks start on Monday 00:00, across a DST change too.
        (
            "weekly",
            "Europe/Berlin",
            "2024-10-27T12:00:00+01:00",
            "2024-10-21T00:00:00+02:00",
            "2024-10-28T00:00:00+01:00",
        ),
        ("weekly", "UTC", "2024-05-13T00:00:00+00:00", "2024-05-13T00:00:00+00:00", "2024-05-20T00:00:00+00:00"),
        ("monthly", "UTC", "2024-02-29T23:59:59+00:00", "2024-02-01T00:00:00+00:00", "2024-03-01T00:00:00+00:00"),
        (
            "monthly",
            "Australia/Sydney",
            "2024-12-31T23:00:00+11:00",
            "2024-12-01T00:00:00+11:00",
            "2025-01-01T00:00:00+11:00",
        ),
    ],
)
def test_period_bounds(period: str, zone: str, now: str, start: str, end: str) -> None:
    bounds = period_bounds_ms(period, zone, ms(now))
    assert bounds == (ms(start), ms(end)), (local(bounds[0], zone), local(bounds[1], zone))
    assert period_start_ms(period, zone, ms(now)) == ms(start)


def test_every_instant_of_a_year_lies_in_exactly_one_period() -> None:
    # Walk a year in New York hour by hour: periods tile time, no gaps, no overlaps.
    for period in ("hourly", "daily", "weekly", "monthly"):
        now = ms("2024-01-01T00:00:00-05:00")
        end_of_year = ms("2025-01-01T00:00:00-05:00")
        start, end = period_bounds_ms(period, "America/New_York", now)
        while now < end_of_year:
            assert start <= now < end
            now += 3_600_000
            if now >= end:
                start, end = period_bounds_ms(period, "America/New_York", now)
                assert start == period_bounds_ms(period, "America/New_York", now - 1)[1]


def test_none_and_validation() -> None:
    assert period_bounds_ms("none", "UTC", ms("2024-05-10T10:20:30+00:00")) == (0, 0)
    assert PERIODS == ("none", "minute", "hourly", "daily", "weekly", "monthly")
    validate_period("weekly", "Europe/Paris")
    with pytest.raises(InvalidArgument):
        validate_period("yearly", "UTC")
    with pytest.raises(InvalidArgument):
        validate_period("daily", "Nowhere/Atlantis")
    with pytest.raises(InvalidArgument):
        validate_period("daily", "../../etc/passwd")
    with pytest.raises(InvalidArgument):
        period_bounds_ms("daily", "Nowhere/Atlantis", 0)


def test_the_period_clock_caches_until_the_period_ends() -> None:
    clock = PeriodClock()
    now = ms("2024-05-10T10:20:30+00:00")
    assert clock.bounds("minute", "UTC", now) == period_bounds_ms("minute", "UTC", now)
    assert clock.bounds("minute", "UTC", now + 29_000) == period_bounds_ms("minute", "UTC", now)
    assert clock.bounds("minute", "UTC", now + 30_000) == period_bounds_ms("minute", "UTC", now + 30_000)


class Clock:
    """A settable clock for the store's period computation (leases keep the Redis clock)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def minute_start() -> float:
    return (time.time() // 60) * 60


def past_minute() -> float:
    """The start of a minute far enough back that the test's clock, moved on a few
    minutes, is still behind Redis's: a period start later than the Redis clock is
    refused (a replica whose clock runs ahead cannot end a period early)."""
    return minute_start() - 300


async def test_a_minute_pool_rolls_over_without_losing_or_double_counting(
    backend: tuple[str, RedisClient, str],
) -> None:
    _, client, prefix = backend
    base = past_minute()
    clock = Clock(base + 10)
    store = BudgetStore(client, prefix, 300, clock=clock)
    replica = BudgetStore(client, prefix, 300, clock=clock)
    await store.create_pool(PoolSpec("org", 1000, period="minute"))
    await store.create_pool(PoolSpec("team", 1000, parent="org"))  # no period: counts on
    await store.create_pool(PoolSpec("key", 500, parent="team", period="minute"))

    await store.reserve("key", 100, "in-flight")
    await store.reserve("key", 50, "done")
    await store.commit("done", 30, pool="key")
    first = int(base * 1000)
    assert (await store.get_pool("org")).period_start_ms == first

    clock.now = base + 70  # the next minute
    rolls = await store.roll_periods()
    assert sorted((roll.pool, roll.used, roll.reason) for roll in rolls) == [
        ("key", 30, "period"),
        ("org", 30, "period"),
    ]
    assert {(roll.previous_period_start_ms, roll.period_start_ms) for roll in rolls} == {(first, first + 60_000)}
    assert {roll.chain for roll in rolls} == {("org",), ("key", "team", "org")}
    # Each roll is announced once, whoever asks next.
    assert await store.roll_periods() == []
    assert await replica.roll_periods() == []

    views = {view.name: view for view in await store.list_pools()}
    assert (views["org"].used, views["org"].reserved) == (0, 100)
    assert (views["team"].used, views["team"].reserved) == (30, 100)
    assert (views["key"].used, views["key"].reserved) == (0, 100)
    assert views["key"].period_start_ms == first + 60_000 and views["key"].period_end_ms == first + 120_000

    # The reservation made last minute commits into this one, once.
    await store.commit("in-flight", 80, pool="key")
    views = {view.name: view for view in await store.list_pools()}
    assert [(views[name].used, views[name].reserved) for name in ("org", "team", "key")] == [
        (80, 0),
        (110, 0),
        (80, 0),
    ]

    # A commit is the first call after the next boundary: it rolls before it charges.
    await store.reserve("key", 40, "late")
    clock.now = base + 130
    await store.commit("late", 40, pool="key")
    assert (await store.get_pool("key")).used == 40
    rolls = await replica.roll_periods()
    assert sorted((roll.pool, roll.used) for roll in rolls) == [("key", 80), ("org", 80)]
    assert await store.roll_periods() == []

    # A replica whose clock is behind cannot roll a pool back.
    behind = BudgetStore(client, prefix, 300, clock=Clock(base + 70))
    await behind.reserve("key", 1, "skewed")
    assert (await store.get_pool("key")).used == 40


async def test_an_exhausted_minute_pool_says_to_retry_at_the_boundary(
    backend: tuple[str, RedisClient, str],
) -> None:
    _, client, prefix = backend
    base = minute_start()
    store = BudgetStore(client, prefix, 300, default_retry_after_seconds=3600, clock=Clock(base + 45))
    await store.create_pool(PoolSpec("p", 10, period="minute"))
    await store.report("p", 10)
    with pytest.raises(BudgetExhausted) as info:
        await store.reserve("p", 1, "r1")
    assert info.value.retry_after_seconds == 15


async def test_changing_the_period_keeps_the_usage_so_far(backend: tuple[str, RedisClient, str]) -> None:
    _, client, prefix = backend
    clock = Clock(past_minute() + 5)
    store = BudgetStore(client, prefix, 300, clock=clock)
    await store.create_pool(PoolSpec("p", 100))
    await store.report("p", 60)
    view = await store.update_pool("p", period="minute")
    assert view.used == 60 and view.period == "minute"
    assert await store.roll_periods() == []  # no boundary has passed: nothing to announce
    clock.now += 60
    assert [(roll.pool, roll.used) for roll in await store.roll_periods()] == [("p", 60)]


@pytest.mark.parametrize("settled_by", ["reaper", "sibling reserve", "renew", "list"])
async def test_an_expired_lease_is_charged_to_the_period_in_which_it_is_settled(
    backend: tuple[str, RedisClient, str], settled_by: str
) -> None:
    """A holder died; its lease ran out after the boundary: the charge is the new period's."""
    _, client, prefix = backend
    base = past_minute()
    clock = Clock(base + 10)
    store = BudgetStore(client, prefix, 300, clock=clock)
    await store.create_pool(PoolSpec("org", 1000))
    await store.create_pool(PoolSpec("a", 1000, parent="org", period="minute"))
    await store.create_pool(PoolSpec("b", 1000, parent="org", period="minute", timezone="Asia/Kolkata"))
    await store.reserve("b", 400, "dead", lease_seconds=0.2, kind="chat")
    await store.report("b", 7)
    clock.now = base + 70  # the next minute has begun...
    await asyncio.sleep(0.3)  # ...and the lease has run out
    if settled_by == "reaper":
        assert await store.reap_expired() == 1
    elif settled_by == "sibling reserve":
        await store.reserve("a", 1, "other", kind="chat")  # reclaims the tree's expired leases
    elif settled_by == "renew":
        assert await store.renew("dead", pool="b") is None
    else:
        await store.list_pools(["a"])
    raw = await client.hmget(store.pool_key("b", "org"), ["used", "reserved", "prev_used", "period_start"])
    assert [int(value) for value in raw] == [400, 0, 7, int((base + 60) * 1000)]
    b = await store.get_pool("b")
    assert (b.used, b.reserved) == (400, 0)
    assert sorted((roll.pool, roll.used) for roll in await store.roll_periods()) == [("a", 0), ("b", 7)]


async def test_a_clock_ahead_of_redis_cannot_start_a_period_early(backend: tuple[str, RedisClient, str]) -> None:
    _, client, prefix = backend
    store = BudgetStore(client, prefix, 300, clock=Clock(past_minute()))
    await store.create_pool(PoolSpec("org", 1000, period="minute"))
    await store.create_pool(PoolSpec("team", 1000, parent="org", period="minute"))
    await store.reserve("team", 100, "r1", kind="chat")
    await store.commit("r1", 80, pool="team")
    start = (await store.get_pool("team")).period_start_ms

    ahead = BudgetStore(client, prefix, 300, clock=Clock(time.time() + 120))  # two minutes fast
    await ahead.reserve("team", 10, "r2", kind="chat")
    await ahead.commit("r2", 10, pool="team")
    await ahead.report("team", 5)
    assert await ahead.roll_periods() == []
    await ahead.list_pools()
    raw = await client.hmget(store.pool_key("team", "org"), ["used", "period_start"])
    assert [int(value) for value in raw] == [95, start]  # nothing rolled: the usage stays in its period

    # A replica on time rolls (its clock is at or behind Redis's).
    on_time = BudgetStore(client, prefix, 300, clock=Clock(time.time() - 1))
    rolls = await on_time.roll_periods()
    assert sorted((roll.pool, roll.used) for roll in rolls) == [("org", 95), ("team", 95)]
    assert all(roll.period_start_ms > start for roll in rolls)
