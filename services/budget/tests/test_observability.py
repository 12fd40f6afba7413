"""Observability of the budget service, end to end on the real Redis and a real
in-process gRPC server: ``/metrics`` scraped over HTTP and read with Prometheus' own
parser (pool gauges equal to what Redis holds, counters moved by exactly the calls
made, the pool cap), the server span of a Reserve in the caller's trace with the
``hoosh.*`` attributes, and log lines joined by request id and trace id."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import grpc
import orjson
import pytest
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh_budget.metrics import PoolMetrics, refresh_forever
from hoosh_budget.reaper import reap
from hoosh_budget.resets import ResetAnnouncer, tick
from hoosh_common.logs import JsonFormatter
from hoosh_common.telemetry import capture_spans
from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_metering.redis import RedisClient, connect_redis
from opentelemetry.trace import SpanKind

from .conftest import Clock, Samples, scrape, start_server

Stub = budget_pb2_grpc.BudgetServiceStub
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
FIELDS = ["capacity", "used", "reserved", "cap_usd", "used_usd", "reserved_usd"]


@asynccontextmanager
async def pool_metrics(store: BudgetStore, **options: int) -> AsyncIterator[PoolMetrics]:
    """A PoolMetrics on the process-wide registry for the block (then unregistered, so
    no other test scrapes its series)."""
    metrics = PoolMetrics(store, **options).register()
    try:
        yield metrics
    finally:
        metrics.unregister()


async def raw_pool(redis: RedisClient, store: BudgetStore, name: str, root: str) -> dict[str, int | None]:
    """A pool's counters straight from its Redis hash."""
    values = await redis.hmget(store.pool_key(name, root), FIELDS)
    return {field: int(value) if value else None for field, value in zip(FIELDS, values, strict=True)}


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def create_chain(stub: Stub) -> None:
    """org ($5 cap) <- team (daily) <- key."""
    await stub.CreatePool(
        budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="org", capacity=1000, cap_usd_micros=5_000_000))
    )
    await stub.CreatePool(
        budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="team", parent="org", capacity=500, period="daily"))
    )
    await stub.CreatePool(
        budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="key", parent="team", capacity=300))
    )


class Lines(logging.Handler):
    """Log records formatted as the service writes them (JSON, request id, trace)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter("budget"))
        self.entries: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(orjson.loads(self.format(record)))

    def find(self, msg: str, **fields: object) -> list[dict[str, object]]:
        return [e for e in self.entries if e["msg"] == msg and all(e.get(k) == v for k, v in fields.items())]


@contextmanager
def server_log_lines() -> Iterator[Lines]:
    logger = logging.getLogger("hoosh_budget.server")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_pool_gauges_equal_redis_and_counters_move_by_exactly_the_calls(
    stub: Stub, store: BudgetStore, redis: RedisClient, metrics_port: int
) -> None:
    before = await scrape(metrics_port)
    await create_chain(stub)
    for i in range(3):
        await stub.Reserve(
            budget_pb2.ReserveRequest(
                pool="key", tokens=20, reservation_id=f"r{i}", owner="key_a", kind="chat", input_price_micros=1_000_000
            )
        )
    for i in range(2):
        await stub.Commit(
            budget_pb2.CommitRequest(reservation_id=f"r{i}", used_tokens=15, used_usd_micros=11, pool="key")
        )
    await stub.Commit(budget_pb2.CommitRequest(reservation_id="r0", used_tokens=15, pool="key"))  # a retry
    await stub.Release(budget_pb2.ReleaseRequest(reservation_id="never", pool="key"))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Reserve(budget_pb2.ReserveRequest(pool="key", tokens=10_000, reservation_id="big", kind="chat"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetPool(budget_pb2.GetPoolRequest(pool="nowhere"))

    async with pool_metrics(store) as metrics:
        assert await metrics.refresh()
        after = await scrape(metrics_port)

    # Every gauge equals the pool's hash in Redis.
    for name, parent, period in (("org", "", "none"), ("team", "org", "daily"), ("key", "team", "none")):
        raw = await raw_pool(redis, store, name, "org")
        assert after.get_value("hoosh_pool_capacity_tokens", pool=name, parent=parent, period=period) == raw["capacity"]
        assert after.get_value("hoosh_pool_used_tokens", pool=name) == raw["used"]
        assert after.get_value("hoosh_pool_reserved_tokens", pool=name) == raw["reserved"]
        assert after.get_value("hoosh_pool_open_reservations", pool=name) == 1  # r2, held along the chain
        if raw["cap_usd"] is None:
            assert after.get_value("hoosh_pool_capacity_usd_micros", pool=name) is None
            assert after.get_value("hoosh_pool_used_usd_micros", pool=name) is None
        else:
            assert after.get_value("hoosh_pool_capacity_usd_micros", pool=name) == raw["cap_usd"]
            assert after.get_value("hoosh_pool_used_usd_micros", pool=name) == raw["used_usd"]
            assert after.get_value("hoosh_pool_reserved_usd_micros", pool=name) == raw["reserved_usd"]
    assert (await raw_pool(redis, store, "org", "org"))["used"] == 30  # the counters did move
    assert after.get_value("hoosh_pool_reserved_usd_micros", pool="org") == 20  # r2's price: 20 tokens at $1/M
    assert after.get_value("hoosh_budget_open_reservations") == await redis.zcard(f"{store.tree_base('org')}lease")
    assert after.get_value("hoosh_budget_open_reservations") == 1
    assert after.get_value("hoosh_budget_pools") == 3
    age = after.get_value("hoosh_budget_snapshot_age_seconds")
    assert age is not None and 0 <= age < 5
    assert delta(after, before, "hoosh_budget_snapshot_errors_total") == 0

    operations = {
        ("create_pool", "ok"): 3,
        ("reserve", "ok"): 3,
        ("reserve", "exhausted"): 1,
        ("commit", "ok"): 2,
        ("commit", "already_ended"): 1,
        ("release", "already_ended"): 1,
        ("get_pool", "not_found"): 1,
    }
    moved = {
        (dict(labels)["operation"], dict(labels)["result"]): value
        - before.value("hoosh_budget_operations_total", **dict(labels))
        for labels, value in after.labelled("hoosh_budget_operations_total").items()
    }
    assert {key: value for key, value in moved.items() if value} == operations
    # The shared interceptor counted the same calls by status code.
    method = {"grpc_type": "unary", "grpc_service": "hoosh.budget.v1.BudgetService"}
    assert delta(after, before, "grpc_server_handled_total", **method, grpc_method="Reserve", grpc_code="OK") == 3
    reserve_refused = {"grpc_method": "Reserve", "grpc_code": "RESOURCE_EXHAUSTED"}
    assert delta(after, before, "grpc_server_handled_total", **method, **reserve_refused) == 1
    assert delta(after, before, "grpc_server_handling_seconds_count", **method, grpc_method="Commit") == 3


async def test_pools_past_the_cap_are_summed_into_other(
    stub: Stub, store: BudgetStore, redis: RedisClient, metrics_port: int
) -> None:
    await create_chain(stub)
    await stub.CreatePool(budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="solo", capacity=70)))
    await stub.Reserve(budget_pb2.ReserveRequest(pool="key", tokens=9, reservation_id="a", kind="chat"))
    await stub.Reserve(budget_pb2.ReserveRequest(pool="team", tokens=4, reservation_id="b", kind="chat"))
    await stub.Commit(budget_pb2.CommitRequest(reservation_id="b", used_tokens=3, pool="team"))

    async with pool_metrics(store, max_pools=2) as metrics:
        assert await metrics.refresh()
        samples = await scrape(metrics_port)

    # The roots keep their own series; the levels below them share one.
    capacity = samples.labelled("hoosh_pool_capacity_tokens")
    assert {dict(labels)["pool"] for labels in capacity} == {"org", "solo", "_other"}
    assert samples.get_value("hoosh_pool_capacity_tokens", pool="_other", parent="", period="") == 500 + 300
    team, key = await raw_pool(redis, store, "team", "org"), await raw_pool(redis, store, "key", "org")
    assert samples.get_value("hoosh_pool_used_tokens", pool="_other") == team["used"] + key["used"] == 3
    assert samples.get_value("hoosh_pool_reserved_tokens", pool="_other") == team["reserved"] + key["reserved"] == 18
    assert samples.get_value("hoosh_pool_open_reservations", pool="_other") == 2  # "a" in team and in key
    assert samples.get_value("hoosh_pool_reserved_tokens", pool="org") == 9
    assert samples.get_value("hoosh_pool_capacity_tokens", pool="solo", parent="", period="none") == 70
    # Neither capped pool below the roots has a money cap: no USD series for _other.
    assert samples.get_value("hoosh_pool_capacity_usd_micros", pool="_other") is None
    assert samples.get_value("hoosh_budget_pools") == 4


async def test_the_refresher_keeps_the_snapshot_current(store: BudgetStore, metrics_port: int) -> None:
    await store.create_pool(PoolSpec("p", 100))
    async with pool_metrics(store) as metrics:
        refresher = asyncio.create_task(refresh_forever(metrics, 0.05))
        try:
            await store.reserve("p", 40, "x", kind="chat")
            for _ in range(100):
                samples = await scrape(metrics_port)
                if samples.get_value("hoosh_pool_reserved_tokens", pool="p") == 40:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the snapshot never showed the reservation")
        finally:
            refresher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await refresher


async def test_a_refresh_that_cannot_reach_redis_is_counted(metrics_port: int) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    dead = f"redis://127.0.0.1:{holder.getsockname()[1]}/0"  # bound, never listening: refused
    client = connect_redis(dead, socket_connect_timeout=0.5)
    unreachable = BudgetStore(client, "test:budget:unreachable:", 300)
    try:
        before = await scrape(metrics_port)
        async with pool_metrics(unreachable) as metrics:
            assert not await metrics.refresh()
            after = await scrape(metrics_port)
    finally:
        await unreachable.close()
        await client.aclose()
        holder.close()
    assert delta(after, before, "hoosh_budget_snapshot_errors_total") == 1
    # Nothing read yet: no gauge at all rather than zeros that look real.
    assert after.get_value("hoosh_budget_snapshot_age_seconds") is None
    assert after.get_value("hoosh_budget_pools") is None


async def test_reaper_and_ticker_counters(
    redis: RedisClient, prefix: str, store: BudgetStore, announcer: ResetAnnouncer, metrics_port: int
) -> None:
    await store.create_pool(PoolSpec("p", 100))
    await store.reserve("p", 30, "dead", lease_seconds=0.05, kind="chat")
    await asyncio.sleep(0.1)
    before = await scrape(metrics_port)
    assert await reap(store) == 1
    after = await scrape(metrics_port)
    assert delta(after, before, "hoosh_budget_expired_leases_total", policy="commit") == 1

    clock = Clock(1_767_225_620.0)  # 20 s into a minute
    minutes = BudgetStore(redis, f"{prefix}ticker:", 300, clock=clock)
    try:
        await minutes.create_pool(PoolSpec("m", 10, period="minute"))
        assert await tick(minutes, announcer) == 0
        clock.now += 60
        assert await tick(minutes, announcer) == 1
    finally:
        await minutes.close()
    assert delta(await scrape(metrics_port), after, "hoosh_budget_period_resets_total") == 1


async def test_reserve_span_joins_the_callers_trace_with_hoosh_attributes(
    store: BudgetStore, announcer: ResetAnnouncer
) -> None:
    with capture_spans() as exporter, server_log_lines() as lines:
        server, port = await start_server(store, announcer)  # built while exporting: traced
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")  # no client interceptor: our traceparent
        try:
            stub = Stub(channel)
            await create_chain(stub)
            metadata = (("traceparent", TRACEPARENT), ("x-request-id", "req-obs-1"))
            await stub.Reserve(
                budget_pb2.ReserveRequest(
                    pool="key", tokens=25, completion_tokens=5, reservation_id="res-1", owner="key_a", kind="chat"
                ),
                metadata=metadata,
            )
            await stub.Commit(
                budget_pb2.CommitRequest(reservation_id="res-1", used_tokens=12, pool="key"), metadata=metadata
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Reserve(
                    budget_pb2.ReserveRequest(pool="key", tokens=5000, reservation_id="res-2", kind="chat"),
                    metadata=(("traceparent", TRACEPARENT),),
                )
        finally:
            await channel.close()
            await server.stop(None)

    spans = [
        span
        for span in exporter.get_finished_spans()
        if span.kind == SpanKind.SERVER and f"{span.context.trace_id:032x}" == TRACE_ID
    ]
    by_name = {span.name: [s for s in spans if s.name == span.name] for span in spans}
    [reserve, refused] = by_name["hoosh.budget.v1.BudgetService/Reserve"]
    [commit] = by_name["hoosh.budget.v1.BudgetService/Commit"]
    assert reserve.parent is not None and f"{reserve.parent.span_id:016x}" == PARENT_SPAN_ID
    attributes = dict(reserve.attributes or {})
    assert attributes["hoosh.pool"] == "key"
    assert list(attributes["hoosh.pool_chain"]) == ["key", "team", "org"]  # type: ignore[arg-type]
    assert attributes["hoosh.key_id"] == "key_a"
    assert attributes["hoosh.tokens"] == 30
    assert attributes["hoosh.reservation_id"] == "res-1"
    assert attributes["hoosh.budget.result"] == "ok"
    commit_attributes = dict(commit.attributes or {})
    assert (commit_attributes["hoosh.tokens"], commit_attributes["hoosh.budget.result"]) == (12, "ok")
    assert list(commit_attributes["hoosh.pool_chain"]) == ["key", "team", "org"]  # type: ignore[arg-type]
    refused_attributes = dict(refused.attributes or {})
    assert refused_attributes["hoosh.budget.result"] == "exhausted"
    assert refused_attributes["hoosh.budget.exhausted_pool"] == "key"

    # Log lines of the same calls: the request id, this trace, the server span.
    [line] = lines.find("budget operation", operation="reserve", result="ok")
    assert (line["request_id"], line["trace_id"], line["span_id"]) == (
        "req-obs-1",
        TRACE_ID,
        f"{reserve.context.span_id:016x}",
    )
    [exhausted] = lines.find("budget exhausted", operation="reserve")
    assert (exhausted["level"], exhausted["request_id"], exhausted["trace_id"]) == ("info", "res-2", TRACE_ID)
    assert (exhausted["exhausted_pool"], exhausted["requested"], exhausted["available"]) == ("key", 5000, 288)
    [created] = lines.find("budget admin action", operation="create_pool", pool="org")
    assert (created["level"], created["result"]) == ("info", "ok")


async def test_logs_join_the_callers_trace_without_an_exporter(stub: Stub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="p", capacity=100))
    with server_log_lines() as lines:
        await stub.Reserve(
            budget_pb2.ReserveRequest(pool="p", tokens=5, reservation_id="res-7", kind="chat"),
            metadata=(("traceparent", TRACEPARENT),),
        )
        await stub.GetPool(budget_pb2.GetPoolRequest(pool="p"), metadata=(("x-request-id", "req-8"),))
        await stub.GetPool(budget_pb2.GetPoolRequest(pool="p"))
    [reserve] = lines.find("budget operation", operation="reserve")
    assert (reserve["request_id"], reserve["trace_id"], reserve["level"]) == ("res-7", TRACE_ID, "debug")
    first, second = lines.find("budget operation", operation="get_pool")
    assert first["request_id"] == "req-8" and "trace_id" not in first
    # Each call runs in its own context: nothing of an earlier call is left behind.
    assert "request_id" not in second and "trace_id" not in second
