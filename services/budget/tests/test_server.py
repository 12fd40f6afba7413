"""BudgetService through a real in-process grpc.aio server on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh_budget.pools import BudgetStore
from hoosh_budget.server import BudgetServicer, add_to_server
from hoosh_common.grpc_server import insecure_channel, new_server


async def start(store: BudgetStore) -> tuple[grpc.aio.Server, int]:
    server = new_server()
    add_to_server(BudgetServicer(store), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def stub(store: BudgetStore) -> AsyncIterator[budget_pb2_grpc.BudgetServiceStub]:
    server, port = await start(store)
    channel = insecure_channel(f"127.0.0.1:{port}")
    yield budget_pb2_grpc.BudgetServiceStub(channel)
    await channel.close()
    await server.stop(None)


def trailers(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: str(value) for key, value in (error.trailing_metadata() or ())}


async def test_reserve_commit_and_exactly_once(stub: budget_pb2_grpc.BudgetServiceStub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="p", capacity=1000))
    reserved = await stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=300, reservation_id="req-1"))
    assert reserved.reservation_id == "req-1"
    assert reserved.pool == budget_pb2.Pool(name="p", capacity=1000, used=0, reserved=300, available=700)

    committed = await stub.Commit(budget_pb2.CommitRequest(reservation_id="req-1", used_tokens=120))
    assert not committed.already_ended
    assert committed.pool == budget_pb2.Pool(name="p", capacity=1000, used=120, reserved=0, available=880)

    again = await stub.Commit(budget_pb2.CommitRequest(reservation_id="req-1", used_tokens=120))
    assert again.already_ended
    assert again.pool.used == 120
    released = await stub.Release(budget_pb2.ReleaseRequest(reservation_id="req-1"))
    assert released.already_ended

    unknown = await stub.Release(budget_pb2.ReleaseRequest(reservation_id="never"))
    assert unknown.already_ended and not unknown.HasField("pool")


async def test_release_through_grpc(stub: budget_pb2_grpc.BudgetServiceStub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="p", capacity=100))
    await stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=60, reservation_id="r", lease_seconds=30))
    released = await stub.Release(budget_pb2.ReleaseRequest(reservation_id="r"))
    assert not released.already_ended
    assert released.pool.available == 100


async def test_exhausted_is_resource_exhausted_with_retry_after(stub: budget_pb2_grpc.BudgetServiceStub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="x", capacity=125))
    await stub.Reserve(budget_pb2.ReserveRequest(pool="x", tokens=120, reservation_id="a", lease_seconds=20))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Reserve(budget_pb2.ReserveRequest(pool="x", tokens=120, reservation_id="b"))
    error = info.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "Token budget exceeded: pool 'x' has 5 tokens available, 120 requested"
    meta = trailers(error)
    assert meta["hoosh-error-code"] == "budget_exhausted"
    assert 1 <= int(meta["retry-after"]) <= 20


async def test_exhausted_beyond_leases_uses_default_retry_after(stub: budget_pb2_grpc.BudgetServiceStub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="x", capacity=10))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Reserve(budget_pb2.ReserveRequest(pool="x", tokens=11, reservation_id="b"))
    assert trailers(info.value)["retry-after"] == "42"


async def test_unknown_pool_is_not_found(stub: budget_pb2_grpc.BudgetServiceStub) -> None:
    calls = [
        stub.Reserve(budget_pb2.ReserveRequest(pool="ghost", tokens=1, reservation_id="r")),
        stub.Check(budget_pb2.CheckRequest(pool="ghost", tokens=1)),
        stub.GetPool(budget_pb2.GetPoolRequest(pool="ghost")),
        stub.Report(budget_pb2.ReportRequest(pool="ghost", reserved=1, actual=1)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == "Token pool 'ghost' not found"
        assert trailers(info.value)["hoosh-error-code"] == "pool_not_found"


async def test_bad_arguments_are_invalid_argument(stub: budget_pb2_grpc.BudgetServiceStub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="p", capacity=10))
    calls = [
        stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=-1, reservation_id="r")),
        stub.Reserve(budget_pb2.ReserveRequest(pool="", tokens=1, reservation_id="r")),
        stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=1, reservation_id="")),
        stub.Reserve(budget_pb2.ReserveRequest(pool="p", tokens=1, reservation_id="r", lease_seconds=-1)),
        stub.Commit(budget_pb2.CommitRequest(reservation_id="r", used_tokens=-1)),
        stub.Check(budget_pb2.CheckRequest(pool="p", tokens=-1)),
        stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="", capacity=1)),
        stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="p", capacity=-1)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert trailers(info.value)["hoosh-error-code"] == "invalid_request"
    pool = await stub.GetPool(budget_pb2.GetPoolRequest(pool="p"))
    assert pool.pool.reserved == 0 and pool.pool.capacity == 10


async def test_pool_rpcs(stub: budget_pb2_grpc.BudgetServiceStub) -> None:
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="b", capacity=50))
    await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="a", capacity=10))
    await stub.Reserve(budget_pb2.ReserveRequest(pool="b", tokens=30, reservation_id="r"))

    check = await stub.Check(budget_pb2.CheckRequest(pool="b", tokens=21))
    assert not check.allowed and check.pool.available == 20

    report = await stub.Report(budget_pb2.ReportRequest(pool="b", reserved=30, actual=45))
    assert report.pool == budget_pb2.Pool(name="b", capacity=50, used=45, reserved=0, available=5)

    upserted = await stub.UpsertPool(budget_pb2.UpsertPoolRequest(pool="b", capacity=100))
    assert upserted.pool.used == 45 and upserted.pool.available == 55

    listed = await stub.ListPools(budget_pb2.ListPoolsRequest())
    assert [pool.name for pool in listed.pools] == ["a", "b"]
    got = await stub.GetPool(budget_pb2.GetPoolRequest(pool="a"))
    assert got.pool == budget_pb2.Pool(name="a", capacity=10, used=0, reserved=0, available=10)


async def test_unreachable_redis_is_unavailable(prefix: str) -> None:
    # A real client aimed at a port where nothing listens.
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    server, port = await start(BudgetStore(dead, prefix, 300))
    channel = insecure_channel(f"127.0.0.1:{port}")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await budget_pb2_grpc.BudgetServiceStub(channel).GetPool(budget_pb2.GetPoolRequest(pool="p"))
    finally:
        await channel.close()
        await server.stop(None)
        await dead.aclose()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert trailers(info.value)["hoosh-error-code"] == "budget_unavailable"
