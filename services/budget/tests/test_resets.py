"""The period ticker: every roll of a pool with a period is announced once, as one
``budget.reset`` event in a real JetStream stream; an event NATS refuses is kept and
published on a later tick. The store's calendar clock is injected, so a 'minute' pool
crosses its boundary when the test says so."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import nats.js.errors
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh_budget.resets import ResetAnnouncer, period_event_id, tick, tick_forever
from hoosh_common.eventbus import EventPublisher, ensure_stream
from hoosh_common.grpc_server import internal_channel
from hoosh_metering.periods import period_bounds_ms
from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_metering.redis import RedisClient

from .conftest import Bus, Clock, start_server

# 20 s into a minute: the next boundary is 40 s of test clock away.
T0 = 1_767_225_620.0  # 2026-01-01T00:00:20Z
MINUTE_MS = 60_000


async def minute_tree(store: BudgetStore) -> None:
    """org (no period) <- team (minute): only team rolls."""
    await store.create_pool(PoolSpec("org", 10_000))
    await store.create_pool(PoolSpec("team", 1_000, parent="org", period="minute"))


async def test_each_roll_is_announced_once_even_with_two_replicas(
    redis: RedisClient, prefix: str, bus: Bus, announcer: ResetAnnouncer
) -> None:
    clock = Clock(T0)
    store = BudgetStore(redis, prefix, 300, clock=clock)
    replica = BudgetStore(redis, prefix, 300, clock=clock)
    try:
        await minute_tree(store)
        first_start, first_end = period_bounds_ms("minute", "UTC", int(T0 * 1000))
        assert await tick(store, announcer) == 0  # still the first period

        held = await store.reserve("team", 50, "held")
        await store.report("team", 30)
        clock.now += 60  # the boundary passes
        assert await tick(store, announcer) == 1
        assert await tick(store, announcer) == 0
        assert await tick(replica, ResetAnnouncer(bus.publisher)) == 0  # the other replica sees it announced

        team = await store.get_pool("team")
        assert (team.used, team.reserved, team.period_start_ms) == (0, 50, first_end)
        assert (await store.get_pool("org")).used == 30  # a pool without a period keeps counting
        # The reservation made before the boundary ends in the new period, once.
        await store.commit(held.reservation_id, 40, pool="team")
        team = await store.get_pool("team")
        assert (team.used, team.reserved) == (40, 0)

        [(msg_id, event)] = await bus.resets(1)
        assert msg_id == event.event_id == period_event_id("team", first_end) == f"reset:team:{first_end}"
        assert (event.pool, list(event.pool_chain), event.reason, event.period) == (
            "team",
            ["team", "org"],
            "period",
            "minute",
        )
        assert (event.period_start_ms, event.previous_period_start_ms) == (first_end, first_start)
        assert (event.used, event.capacity, event.key_id) == (30, 1_000, "")
    finally:
        await store.close()
        await replica.close()


async def test_the_ticker_announces_every_boundary_on_time(
    redis: RedisClient, prefix: str, bus: Bus, announcer: ResetAnnouncer
) -> None:
    clock = Clock(T0)
    store = BudgetStore(redis, prefix, 300, clock=clock)
    await minute_tree(store)
    ticker = asyncio.create_task(tick_forever(store, announcer, 0.02))
    try:
        starts = []
        for boundary in range(1, 3):
            await store.report("team", 10 * boundary)
            clock.now = T0 + 60 * boundary
            starts.append(period_bounds_ms("minute", "UTC", int(clock.now * 1000))[0])
            found = await bus.resets(boundary)
            assert len(found) == boundary
            await asyncio.sleep(0.1)  # more ticks on the same period add nothing
        found = await bus.resets(2)
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        await store.close()
    assert [msg_id for msg_id, _ in found] == [f"reset:team:{start}" for start in starts]
    assert [event.used for _, event in found] == [10, 20]
    assert starts[1] - starts[0] == MINUTE_MS


async def test_an_event_nats_refuses_is_kept_and_published_on_a_later_tick(store: BudgetStore, bus: Bus) -> None:
    # A publisher aimed at a stream that does not exist yet: every publish fails.
    stream, subject_prefix = f"TEST_BUDGET_LATE_{uuid.uuid4().hex[:8]}", f"testlate{uuid.uuid4().hex[:8]}"
    publisher = EventPublisher(bus.nc, bus.js, stream, subject_prefix, max_attempts=1, ack_timeout=0.5)
    announcer = ResetAnnouncer(publisher)
    await store.create_pool(PoolSpec("p", 100))
    server, port = await start_server(store, announcer)
    channel = internal_channel(f"127.0.0.1:{port}")
    try:
        stub = budget_pb2_grpc.BudgetServiceStub(channel)
        await stub.Report(budget_pb2.ReportRequest(pool="p", actual=60))
        # The reset happened whatever NATS says; its event waits.
        reset = await stub.ResetPool(budget_pb2.ResetPoolRequest(name="p", key_id="key_admin"))
        assert reset.pool.used == 0
        assert announcer.pending == 1
        await tick(store, announcer)
        assert announcer.pending == 1  # still nowhere to publish

        await ensure_stream(bus.js, stream, subject_prefix)
        await tick(store, announcer)
        assert announcer.pending == 0
        late = Bus(bus.nc, bus.js, stream, subject_prefix, publisher)
        [(msg_id, event)] = await late.resets(1)
        assert msg_id.startswith("reset:p:admin:") and (event.used, event.key_id) == (60, "key_admin")
    finally:
        await channel.close()
        await server.stop(None)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await bus.js.delete_stream(stream)
