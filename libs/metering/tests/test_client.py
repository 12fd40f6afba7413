"""BudgetServiceClient against a real gRPC server in this process: a minimal
BudgetService over BudgetStore (the budget service proper lives in services/budget;
a library's tests do not import a service), so the client's calls, results and error
mapping are checked end to end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any, NoReturn, TypeVar

import grpc
import pytest
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh_common.grpc_errors import error_metadata
from hoosh_metering.client import BudgetServiceClient, pool_view
from hoosh_metering.errors import (
    BudgetError,
    BudgetExhausted,
    BudgetUnavailable,
    InvalidArgument,
    NotOwner,
    PoolNotFound,
)
from hoosh_metering.pools import BudgetStore, PoolSpec, PoolView

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

STATUS = {
    BudgetExhausted: (grpc.StatusCode.RESOURCE_EXHAUSTED, "budget_exhausted"),
    PoolNotFound: (grpc.StatusCode.NOT_FOUND, "pool_not_found"),
    NotOwner: (grpc.StatusCode.PERMISSION_DENIED, "reservation_not_owned"),
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
}


def message(view: PoolView) -> budget_pb2.Pool:
    pool = budget_pb2.Pool(
        name=view.name,
        capacity=view.capacity,
        used=view.used,
        reserved=view.reserved,
        available=view.available,
        parent=view.parent or "",
        period=view.period,
        timezone=view.timezone,
        used_usd_micros=view.used_usd_micros,
        reserved_usd_micros=view.reserved_usd_micros,
        period_start_ms=view.period_start_ms,
        period_end_ms=view.period_end_ms,
        chain=list(view.chain),
    )
    if view.cap_usd_micros is not None:
        pool.cap_usd_micros = view.cap_usd_micros
    return pool


async def call(context: Context, operation: Awaitable[T]) -> T:
    try:
        return await operation
    except BudgetError as error:
        status, code = next((v for k, v in STATUS.items() if isinstance(error, k)), (grpc.StatusCode.INTERNAL, ""))
        retry = error.retry_after_seconds if isinstance(error, BudgetExhausted) else None
        await abort(context, status, error.message, error_metadata("x", code, None, retry))


async def abort(context: Context, status: grpc.StatusCode, text: str, metadata: Any) -> NoReturn:
    await context.abort(status, text, trailing_metadata=metadata)


class Servicer(budget_pb2_grpc.BudgetServiceServicer):
    def __init__(self, store: BudgetStore) -> None:
        self.store = store
        self.down = False

    async def Reserve(self, request: budget_pb2.ReserveRequest, context: Context) -> budget_pb2.ReserveResponse:
        if self.down:
            await abort(context, grpc.StatusCode.UNAVAILABLE, "redis away", ())
        reservation = await call(
            context,
            self.store.reserve(
                request.pool,
                request.tokens,
                request.reservation_id,
                request.lease_seconds or None,
                completion_tokens=request.completion_tokens,
                min_completion_tokens=(
                    request.min_completion_tokens if request.HasField("min_completion_tokens") else None
                ),
                input_price_micros=request.input_price_micros,
                output_price_micros=request.output_price_micros,
                owner=request.owner,
                kind=request.kind or "manual",
                on_expiry={"commit": "commit", "release": "release"}.get(request.on_expiry),  # type: ignore[arg-type]
            ),
        )
        return budget_pb2.ReserveResponse(
            reservation_id=reservation.reservation_id,
            pool=message(reservation.pool),
            tokens=reservation.tokens,
            lease_expires_at_ms=reservation.lease_expires_at_ms,
            chain=list(reservation.chain),
            completion_tokens=reservation.completion_tokens,
            usd_micros=reservation.usd_micros,
            created=reservation.created,
        )

    async def Commit(self, request: budget_pb2.CommitRequest, context: Context) -> budget_pb2.CommitResponse:
        result = await call(
            context,
            self.store.commit(
                request.reservation_id,
                request.used_tokens,
                pool=request.pool,
                used_usd_micros=request.used_usd_micros,
                owner=request.owner or None,
                kind=request.kind or None,
            ),
        )
        reply = budget_pb2.CommitResponse(already_ended=result.already_ended, state=result.state)
        if result.pool is not None:
            reply.pool.CopyFrom(message(result.pool))
        return reply

    async def Release(self, request: budget_pb2.ReleaseRequest, context: Context) -> budget_pb2.ReleaseResponse:
        result = await call(
            context,
            self.store.release(
                request.reservation_id, pool=request.pool, owner=request.owner or None, kind=request.kind or None
            ),
        )
        reply = budget_pb2.ReleaseResponse(already_ended=result.already_ended, state=result.state)
        if result.pool is not None:
            reply.pool.CopyFrom(message(result.pool))
        return reply

    async def Renew(self, request: budget_pb2.RenewRequest, context: Context) -> budget_pb2.RenewResponse:
        expires = await call(
            context,
            self.store.renew(request.reservation_id, pool=request.pool, lease_seconds=request.lease_seconds or None),
        )
        return budget_pb2.RenewResponse(active=expires is not None, lease_expires_at_ms=expires or 0)

    async def GetPool(self, request: budget_pb2.GetPoolRequest, context: Context) -> budget_pb2.GetPoolResponse:
        return budget_pb2.GetPoolResponse(pool=message(await call(context, self.store.get_pool(request.pool))))


@pytest.fixture
async def service(redis: Any, prefix: str) -> AsyncIterator[tuple[BudgetServiceClient, Servicer]]:
    store = BudgetStore(redis, prefix, 300, default_retry_after_seconds=42)
    await store.create_pool(PoolSpec("org", 1000))
    await store.create_pool(PoolSpec("team", 100, parent="org"))
    servicer = Servicer(store)
    server = grpc.aio.server()
    budget_pb2_grpc.add_BudgetServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield BudgetServiceClient(channel, timeout=5), servicer
    await channel.close()
    await server.stop(None)


async def test_the_client_speaks_the_stores_language(service: tuple[BudgetServiceClient, Servicer]) -> None:
    client, _ = service
    reservation = await client.reserve("team", 30, "r1", owner="key_a", kind="chat")
    assert (reservation.tokens, reservation.chain, reservation.created) == (30, ("team", "org"), True)
    assert reservation.pool.reserved == 30 and reservation.pool.parent == "org"
    expires = await client.renew("r1", pool="team", lease_seconds=60)
    assert expires is not None and expires >= reservation.lease_expires_at_ms
    with pytest.raises(NotOwner):
        await client.commit("r1", 10, pool="team", owner="key_b")
    result = await client.commit("r1", 20, pool="team", owner="key_a", kind="chat")
    assert (result.state, result.already_ended) == ("committed", False)
    assert result.pool is not None and (result.pool.used, result.pool.reserved) == (20, 0)
    again = await client.release("r1", pool="team")
    assert (again.state, again.already_ended) == ("committed", True)
    assert await client.renew("r1", pool="team") is None
    unknown = await client.commit("never", 1, pool="team")
    assert (unknown.state, unknown.already_ended, unknown.pool) == ("unknown", True, None)
    assert (await client.get_pool("org")).used == 20


async def test_the_clamp_and_prices_travel(service: tuple[BudgetServiceClient, Servicer]) -> None:
    client, _ = service
    reservation = await client.reserve("team", 10, "r1", completion_tokens=50, min_completion_tokens=1)
    assert (reservation.tokens, reservation.completion_tokens) == (60, 50)
    clamped = await client.reserve(
        "team", 10, "r2", completion_tokens=50, min_completion_tokens=1, output_price_micros=2_000_000
    )
    assert (clamped.completion_tokens, clamped.usd_micros) == (30, 60)
    again = await client.reserve("team", 10, "r2", completion_tokens=50, min_completion_tokens=1)
    assert not again.created and again.completion_tokens == 30
    with pytest.raises(BudgetExhausted):  # no minimum: the whole completion or nothing
        await client.reserve("team", 0, "r3", completion_tokens=5)


async def test_errors_map_back(service: tuple[BudgetServiceClient, Servicer]) -> None:
    client, servicer = service
    with pytest.raises(PoolNotFound) as missing:
        await client.reserve("ghost", 1, "r1")
    assert missing.value.pool == "ghost"
    await client.reserve("team", 90, "big", lease_seconds=30)
    with pytest.raises(BudgetExhausted) as exhausted:
        await client.reserve("team", 50, "r2")
    assert exhausted.value.retry_after_seconds <= 30 and exhausted.value.pool == "team"
    with pytest.raises(InvalidArgument):
        await client.reserve("team", 1, "")
    servicer.down = True
    with pytest.raises(BudgetUnavailable):
        await client.reserve("team", 1, "r3")


def test_pool_view_of_a_wire_pool() -> None:
    wire = budget_pb2.Pool(name="p", capacity=10, used=1, reserved=2, period="daily", timezone="UTC")
    assert pool_view(wire) == PoolView("p", 10, 1, 2, period="daily", chain=("p",))
    wire.cap_usd_micros = 0
    assert pool_view(wire).cap_usd_micros == 0
