"""BudgetService through a real in-process grpc.aio server on a free port, on the real
Redis: every RPC, and every error as its status code and ``hoosh-error-*`` trailers."""

from __future__ import annotations

from collections.abc import Awaitable

import grpc
import pytest
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh.events.v1 import events_pb2
from hoosh_budget.resets import ResetAnnouncer
from hoosh_common.grpc_server import internal_channel
from hoosh_metering.pools import BudgetStore
from hoosh_metering.redis import connect_redis
from nats.js.api import ConsumerConfig, DeliverPolicy

from .conftest import Bus, start_server

Stub = budget_pb2_grpc.BudgetServiceStub


def trailers(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: str(value) for key, value in (error.trailing_metadata() or ())}


def counters(pool: budget_pb2.Pool) -> tuple[int, int, int]:
    return pool.used, pool.reserved, pool.available


async def refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def tree(stub: Stub) -> None:
    """org (100) <- team (1000) <- key (1000): org is the tightest."""
    await stub.CreatePool(budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="org", capacity=100)))
    await stub.CreatePool(
        budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="team", parent="org", capacity=1000))
    )
    await stub.CreatePool(
        budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="key", parent="team", capacity=1000))
    )


async def test_reserve_commit_and_exactly_once(stub: Stub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="p", capacity=1000))
    reserved = await stub.Reserve(
        budget_pb2.ReserveRequest(pool="p", tokens=300, reservation_id="req-1", owner="key_a", kind="chat")
    )
    assert (reserved.reservation_id, reserved.tokens, list(reserved.chain)) == ("req-1", 300, ["p"])
    assert reserved.lease_expires_at_ms > 0
    assert reserved.pool.name == "p" and counters(reserved.pool) == (0, 300, 700)
    assert (reserved.pool.period, reserved.pool.timezone, reserved.pool.parent) == ("none", "UTC", "")
    assert not reserved.pool.HasField("cap_usd_micros")

    committed = await stub.Commit(
        budget_pb2.CommitRequest(reservation_id="req-1", used_tokens=120, pool="p", owner="key_a", kind="chat")
    )
    assert (committed.already_ended, committed.state) == (False, "committed")
    assert counters(committed.pool) == (120, 0, 880)

    again = await stub.Commit(budget_pb2.CommitRequest(reservation_id="req-1", used_tokens=120, pool="p"))
    assert (again.already_ended, again.state, again.pool.used) == (True, "committed", 120)
    released = await stub.Release(budget_pb2.ReleaseRequest(reservation_id="req-1", pool="p"))
    assert (released.already_ended, released.state) == (True, "committed")

    unknown = await stub.Release(budget_pb2.ReleaseRequest(reservation_id="never", pool="p"))
    assert (unknown.already_ended, unknown.state) == (True, "unknown") and not unknown.HasField("pool")


async def test_release_and_renew(stub: Stub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="p", capacity=100))
    first = await stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=60, reservation_id="r", lease_seconds=30))
    renewed = await stub.Renew(budget_pb2.RenewRequest(reservation_id="r", pool="p", lease_seconds=600))
    assert renewed.active and renewed.lease_expires_at_ms >= first.lease_expires_at_ms + 500_000

    released = await stub.Release(budget_pb2.ReleaseRequest(reservation_id="r", pool="p"))
    assert (released.already_ended, released.state) == (False, "released")
    assert counters(released.pool) == (0, 0, 100)
    ended = await stub.Renew(budget_pb2.RenewRequest(reservation_id="r", pool="p"))
    assert (ended.active, ended.lease_expires_at_ms) == (False, 0)


async def test_only_the_owner_ends_a_reservation(stub: Stub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="p", capacity=100))
    await stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=50, reservation_id="r", owner="key_a"))
    for call in (
        stub.Commit(budget_pb2.CommitRequest(reservation_id="r", used_tokens=0, pool="p", owner="key_b")),
        stub.Release(budget_pb2.ReleaseRequest(reservation_id="r", pool="p", owner="key_b")),
        stub.Commit(budget_pb2.CommitRequest(reservation_id="r", used_tokens=0, pool="p", owner="key_a", kind="chat")),
        stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=50, reservation_id="r", owner="key_b")),
    ):
        error = await refused(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        meta = trailers(error)
        assert (meta["hoosh-error-type"], meta["hoosh-error-code"]) == (
            "invalid_request_error",
            "reservation_not_owned",
        )
    pool = (await stub.GetPool(budget_pb2.GetPoolRequest(pool="p"))).pool
    assert counters(pool) == (0, 50, 50)  # none of them touched it

    committed = await stub.Commit(
        budget_pb2.CommitRequest(reservation_id="r", used_tokens=30, pool="p", owner="key_a", kind="manual")
    )
    assert committed.state == "committed" and counters(committed.pool) == (30, 0, 70)


async def test_a_chain_is_reserved_whole_and_the_tightest_pool_decides(stub: Stub) -> None:
    await tree(stub)
    check = await stub.Check(budget_pb2.CheckRequest(pool="key", tokens=150))
    assert not check.allowed and check.available == 100 and check.pool.available == 1000
    assert list(check.pool.chain) == ["key", "team", "org"] and check.pool.parent == "team"

    reserved = await stub.Reserve(budget_pb2.ReserveRequest(pool="key", tokens=80, reservation_id="r1"))
    assert list(reserved.chain) == ["key", "team", "org"]
    listed = await stub.ListPools(budget_pb2.ListPoolsRequest())
    assert [(pool.name, pool.reserved) for pool in listed.pools] == [("key", 80), ("org", 80), ("team", 80)]

    error = await refused(stub.Reserve(budget_pb2.ReserveRequest(pool="key", tokens=21, reservation_id="r2")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'org'" in (error.details() or "")
    await stub.Commit(budget_pb2.CommitRequest(reservation_id="r1", used_tokens=70, pool="key"))
    report = await stub.Report(budget_pb2.ReportRequest(pool="team", actual=5, usd_micros=9))
    assert counters(report.pool) == (75, 0, 925) and report.pool.used_usd_micros == 9
    org = (await stub.GetPool(budget_pb2.GetPoolRequest(pool="org"))).pool
    assert counters(org) == (75, 0, 25) and org.used_usd_micros == 9


async def test_exhausted_is_resource_exhausted_with_retry_after(stub: Stub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="x", capacity=125))
    await stub.Reserve(budget_pb2.ReserveRequest(pool="x", tokens=120, reservation_id="a", lease_seconds=20))
    error = await refused(stub.Reserve(budget_pb2.ReserveRequest(pool="x", tokens=120, reservation_id="b")))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "Token budget exceeded: pool 'x' has 5 tokens available, 120 requested"
    meta = trailers(error)
    assert (meta["hoosh-error-type"], meta["hoosh-error-code"]) == ("insufficient_quota", "budget_exhausted")
    assert 1 <= int(meta["retry-after"]) <= 20


async def test_exhausted_beyond_leases_uses_default_retry_after(stub: Stub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="x", capacity=10))
    error = await refused(stub.Reserve(budget_pb2.ReserveRequest(pool="x", tokens=11, reservation_id="b")))
    assert trailers(error)["retry-after"] == "42"


async def test_unknown_pool_is_not_found(stub: Stub) -> None:
    calls = [
        stub.Reserve(budget_pb2.ReserveRequest(pool="ghost", tokens=1, reservation_id="r")),
        stub.Check(budget_pb2.CheckRequest(pool="ghost", tokens=1)),
        stub.GetPool(budget_pb2.GetPoolRequest(pool="ghost")),
        stub.Report(budget_pb2.ReportRequest(pool="ghost", actual=1)),
        stub.UpdatePool(budget_pb2.UpdatePoolRequest(name="ghost", capacity=1)),
        stub.DeletePool(budget_pb2.DeletePoolRequest(name="ghost")),
        stub.ResetPool(budget_pb2.ResetPoolRequest(name="ghost")),
    ]
    for call in calls:
        error = await refused(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "Token pool 'ghost' not found"
        assert trailers(error)["hoosh-error-code"] == "pool_not_found"
    error = await refused(
        stub.CreatePool(budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="c", parent="ghost", capacity=1)))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and "'ghost'" in (error.details() or "")


async def test_bad_arguments_are_invalid_argument(stub: Stub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="p", capacity=10))
    await stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=2, reservation_id="held"))
    calls = [
        stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=-1, reservation_id="r")),
        stub.Reserve(budget_pb2.ReserveRequest(pool="", tokens=1, reservation_id="r")),
        stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=1, reservation_id="")),
        stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=1, reservation_id="r", lease_seconds=-1)),
        stub.Reserve(budget_pb2.ReserveRequest(pool="a b", tokens=1, reservation_id="r")),
        # A manual reservation of nothing (its commit is capped at what it reserves).
        stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=0, reservation_id="r", kind="manual")),
        stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=0, reservation_id="r")),
        stub.Commit(budget_pb2.CommitRequest(reservation_id="held", used_tokens=-1, pool="p")),
        stub.Check(budget_pb2.CheckRequest(pool="p", tokens=-1)),
        stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="", capacity=1)),
        stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="p", capacity=-1)),
        # A bare count can never end someone's reservation.
        stub.Report(budget_pb2.ReportRequest(pool="p", reserved=2, actual=0)),
        stub.CreatePool(budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="q", capacity=1, period="yearly"))),
        stub.CreatePool(
            budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="q", capacity=1, timezone="Mars/Olympus"))
        ),
        stub.UpdatePool(budget_pb2.UpdatePoolRequest(name="p", cap_usd_micros=5, clear_cap_usd=True)),
        stub.UpdatePool(budget_pb2.UpdatePoolRequest(name="p", period="fortnightly")),
    ]
    for call in calls:
        error = await refused(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert trailers(error)["hoosh-error-code"] == "invalid_request"
    pool = (await stub.GetPool(budget_pb2.GetPoolRequest(pool="p"))).pool
    assert (pool.capacity, pool.used, pool.reserved, pool.period) == (10, 0, 2, "none")


async def test_pool_admin_rpcs(stub: Stub) -> None:
    spec = budget_pb2.PoolSpec(
        name="org", capacity=5000, period="daily", timezone="Europe/Berlin", cap_usd_micros=2_500_000
    )
    created = (await stub.CreatePool(budget_pb2.CreatePoolRequest(spec=spec))).pool
    assert (created.name, created.capacity, created.period, created.timezone) == ("org", 5000, "daily", "Europe/Berlin")
    assert created.cap_usd_micros == 2_500_000 and list(created.chain) == ["org"]
    assert 0 < created.period_start_ms < created.period_end_ms
    assert 23 * 3_600_000 <= created.period_end_ms - created.period_start_ms <= 25 * 3_600_000

    error = await refused(stub.CreatePool(budget_pb2.CreatePoolRequest(spec=spec)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert trailers(error)["hoosh-error-code"] == "pool_exists"

    child = (
        await stub.CreatePool(
            budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="team", parent="org", capacity=300))
        )
    ).pool
    assert (child.parent, list(child.chain), child.period, child.timezone) == ("org", ["team", "org"], "none", "UTC")

    updated = (
        await stub.UpdatePool(
            budget_pb2.UpdatePoolRequest(
                name="team", capacity=400, period="hourly", timezone="Asia/Tokyo", cap_usd_micros=7
            )
        )
    ).pool
    assert (updated.capacity, updated.period, updated.timezone, updated.cap_usd_micros) == (
        400,
        "hourly",
        "Asia/Tokyo",
        7,
    )
    kept = (await stub.UpdatePool(budget_pb2.UpdatePoolRequest(name="team", capacity=450))).pool
    assert (kept.capacity, kept.period, kept.cap_usd_micros) == (450, "hourly", 7)  # unset fields keep
    cleared = (await stub.UpdatePool(budget_pb2.UpdatePoolRequest(name="team", clear_cap_usd=True))).pool
    assert not cleared.HasField("cap_usd_micros") and cleared.capacity == 450

    upserted = (await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="team", capacity=500))).pool
    assert (upserted.capacity, upserted.parent, upserted.period) == (500, "org", "hourly")

    listed = await stub.ListPools(budget_pb2.ListPoolsRequest(names=["team", "nobody"]))
    assert [pool.name for pool in listed.pools] == ["team"]
    everything = await stub.ListPools(budget_pb2.ListPoolsRequest())
    assert [pool.name for pool in everything.pools] == ["org", "team"]

    error = await refused(stub.DeletePool(budget_pb2.DeletePoolRequest(name="org")))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert trailers(error)["hoosh-error-code"] == "pool_in_use"
    await stub.DeletePool(budget_pb2.DeletePoolRequest(name="team"))
    await stub.DeletePool(budget_pb2.DeletePoolRequest(name="org"))
    assert list((await stub.ListPools(budget_pb2.ListPoolsRequest())).pools) == []
    assert (await refused(stub.GetPool(budget_pb2.GetPoolRequest(pool="org")))).code() == grpc.StatusCode.NOT_FOUND


async def test_reset_pool_zeroes_usage_keeps_reservations_and_announces_it(stub: Stub, bus: Bus) -> None:
    await tree(stub)
    await stub.Reserve(budget_pb2.ReserveRequest(pool="key", tokens=20, reservation_id="held"))
    await stub.Report(budget_pb2.ReportRequest(pool="team", actual=30))

    reset = (await stub.ResetPool(budget_pb2.ResetPoolRequest(name="team", key_id="key_admin"))).pool
    assert (reset.name, reset.used, reset.reserved) == ("team", 0, 20)
    org = (await stub.GetPool(budget_pb2.GetPoolRequest(pool="org"))).pool
    assert (org.used, org.reserved) == (30, 20)  # only the named pool starts again

    [(msg_id, event)] = await bus.resets(1)
    assert msg_id == event.event_id and msg_id.startswith("reset:team:admin:")
    assert (event.pool, list(event.pool_chain), event.reason, event.key_id) == (
        "team",
        ["team", "org"],
        "admin",
        "key_admin",
    )
    assert (event.used, event.capacity, event.period) == (30, 1000, "none")
    assert event.timestamp_ms > 0

    # Two resets are two events, the reservation still ends exactly once.
    await stub.ResetPool(budget_pb2.ResetPoolRequest(name="team"))
    assert len(await bus.resets(2)) == 2
    committed = await stub.Commit(budget_pb2.CommitRequest(reservation_id="held", used_tokens=15, pool="key"))
    assert committed.state == "committed"
    team = (await stub.GetPool(budget_pb2.GetPoolRequest(pool="team"))).pool
    assert (team.used, team.reserved) == (15, 0)


async def test_unreachable_redis_is_unavailable(prefix: str, announcer: ResetAnnouncer) -> None:
    # A real client aimed at a port where nothing listens.
    dead = connect_redis("redis://127.0.0.1:1/0", socket_timeout=1, socket_connect_timeout=1)
    store = BudgetStore(dead, prefix, 300)
    server, port = await start_server(store, announcer)
    channel = internal_channel(f"127.0.0.1:{port}")
    stub = Stub(channel)
    try:
        for call in (
            stub.GetPool(budget_pb2.GetPoolRequest(pool="p")),
            stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=1, reservation_id="r")),
            stub.ListPools(budget_pb2.ListPoolsRequest()),
        ):
            error = await refused(call)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            meta = trailers(error)
            assert (meta["hoosh-error-type"], meta["hoosh-error-code"]) == ("api_error", "budget_unavailable")
    finally:
        await channel.close()
        await server.stop(None)
        await store.close()
        await dead.aclose()


async def test_manual_commits_are_capped_and_metered_ones_saturate(stub: Stub) -> None:
    await tree(stub)
    await stub.UpdatePool(budget_pb2.UpdatePoolRequest(name="org", capacity=10_000))
    top = 2**53 - 1
    await stub.Reserve(budget_pb2.ReserveRequest(pool="key", tokens=5, reservation_id="m", owner="key_a"))
    manual = await stub.Commit(
        budget_pb2.CommitRequest(reservation_id="m", used_tokens=top, pool="key", owner="key_a", kind="manual")
    )
    assert manual.state == "committed" and manual.pool.used == 5
    for rid in ("c1", "c2"):
        await stub.Reserve(budget_pb2.ReserveRequest(pool="key", tokens=1, reservation_id=rid, kind="chat"))
    for rid in ("c1", "c2"):
        await stub.Commit(budget_pb2.CommitRequest(reservation_id=rid, used_tokens=top, pool="key", kind="chat"))
    await stub.Report(budget_pb2.ReportRequest(pool="org", actual=top))
    pools = {pool.name: pool for pool in (await stub.ListPools(budget_pb2.ListPoolsRequest())).pools}
    assert {name: counters(pool) for name, pool in pools.items()} == {
        name: (top, 0, 0) for name in ("org", "team", "key")
    }


async def test_a_deleted_pools_reservation_settles_in_its_ancestors(stub: Stub) -> None:
    await tree(stub)
    await stub.Reserve(budget_pb2.ReserveRequest(pool="key", tokens=40, reservation_id="r", kind="chat"))
    await stub.DeletePool(budget_pb2.DeletePoolRequest(name="key"))
    await stub.CreatePool(
        budget_pb2.CreatePoolRequest(spec=budget_pb2.PoolSpec(name="key", parent="team", capacity=1000))
    )
    committed = await stub.Commit(budget_pb2.CommitRequest(reservation_id="r", used_tokens=25, pool="key"))
    assert (committed.already_ended, committed.state) == (False, "committed")
    pools = {pool.name: pool for pool in (await stub.ListPools(budget_pb2.ListPoolsRequest())).pools}
    # The pool created again under the name is a new pool: the old reservation never touches it.
    assert {name: counters(pool)[:2] for name, pool in pools.items()} == {
        "org": (25, 0),
        "team": (25, 0),
        "key": (0, 0),
    }


async def admin_actions(bus: Bus, expected: int) -> list[tuple[str, str, events_pb2.AdminAction]]:
    """(subject, Nats-Msg-Id, event) of every admin action in the stream."""
    subscription = await bus.js.pull_subscribe(
        f"{bus.prefix}.admin.>", config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
    )
    found: list[tuple[str, str, events_pb2.AdminAction]] = []
    try:
        while len(found) < expected:
            for message in await subscription.fetch(10, timeout=5):
                headers = message.headers or {}
                found.append(
                    (message.subject, headers.get("Nats-Msg-Id", ""), events_pb2.AdminAction.FromString(message.data))
                )
                await message.ack()
    finally:
        await subscription.unsubscribe()
    return found


async def test_an_admin_action_is_published_as_an_event(stub: budget_pb2_grpc.BudgetServiceStub, bus: Bus) -> None:
    action = events_pb2.AdminAction(
        event_id="req-admin-1", action="key.revoked", actor_key_id="key_admin", target="key_x", details_json="{}"
    )
    await stub.RecordAdminAction(action)
    ((subject, msg_id, event),) = await admin_actions(bus, 1)
    assert subject == f"{bus.prefix}.admin.key.revoked" and msg_id == "req-admin-1"
    assert (event.action, event.actor_key_id, event.target) == ("key.revoked", "key_admin", "key_x")
    assert event.timestamp_ms > 0


@pytest.mark.parametrize(
    "action",
    [
        events_pb2.AdminAction(event_id="e", action="key.stolen"),
        events_pb2.AdminAction(event_id="", action="key.created"),
        events_pb2.AdminAction(event_id="e", action="pool.created", details_json="x" * 20_000),
    ],
)
async def test_a_malformed_admin_action_is_refused(
    stub: budget_pb2_grpc.BudgetServiceStub, action: events_pb2.AdminAction
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.RecordAdminAction(action)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
