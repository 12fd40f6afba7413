"""hoosh_metering's BudgetServiceClient against this service in-process on the real
Redis: the same calls, results and errors as the in-process BudgetStore."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hoosh_budget.resets import ResetAnnouncer
from hoosh_common.grpc_server import internal_channel
from hoosh_metering import errors
from hoosh_metering.client import BudgetServiceClient
from hoosh_metering.pools import BudgetStore, PoolSpec

from .conftest import start_server
from .test_main import free_port


@pytest.fixture
async def client(store: BudgetStore, announcer: ResetAnnouncer) -> AsyncIterator[BudgetServiceClient]:
    server, port = await start_server(store, announcer)
    channel = internal_channel(f"127.0.0.1:{port}")
    yield BudgetServiceClient(channel)
    await channel.close()
    await server.stop(None)


async def test_reserve_commit_release_renew_match_the_store(client: BudgetServiceClient, store: BudgetStore) -> None:
    await store.create_pool(PoolSpec("org", 1000))
    await store.create_pool(PoolSpec("p", 100, parent="org"))
    reservation = await client.reserve("p", 40, "r1", 60, owner="key_a", kind="chat")
    assert (reservation.tokens, reservation.chain, reservation.created) == (40, ("p", "org"), True)
    assert (await store.get_pool("org")).reserved == 40
    assert await client.renew("r1", pool="p", lease_seconds=120) is not None

    committed = await client.commit("r1", 25, pool="p", owner="key_a", kind="chat")
    assert not committed.already_ended and committed.state == "committed"
    assert committed.pool is not None and (committed.pool.used, committed.pool.reserved) == (25, 0)
    again = await client.commit("r1", 25, pool="p")  # exactly once
    assert again.already_ended and again.state == "committed"
    assert await client.renew("r1", pool="p") is None

    await client.reserve("p", 10, "r2")
    released = await client.release("r2", pool="p")
    assert not released.already_ended and released.state == "released"
    assert released.pool is not None and released.pool.reserved == 0
    assert (await client.release("r2", pool="p")).already_ended
    view = await client.get_pool("p")
    assert (view.used, view.parent, view.chain) == (25, "org", ("p", "org"))


async def test_errors_are_the_librarys_own(client: BudgetServiceClient, store: BudgetStore) -> None:
    await store.upsert_pool("small", 10)
    with pytest.raises(errors.PoolNotFound):
        await client.reserve("nope", 1, "r3")
    with pytest.raises(errors.BudgetExhausted) as exhausted:
        await client.reserve("small", 11, "r4")
    assert exhausted.value.retry_after_seconds == 42 and "small" in exhausted.value.message
    with pytest.raises(errors.InvalidArgument):
        await client.reserve("small", -1, "r5")
    await client.reserve("small", 5, "r6", owner="key_a")
    with pytest.raises(errors.NotOwner):
        await client.commit("r6", 5, pool="small", owner="key_b")
    with pytest.raises(errors.NotOwner):
        await client.release("r6", pool="small", owner="key_b")


async def test_an_unreachable_service_is_budget_unavailable() -> None:
    channel = internal_channel(f"127.0.0.1:{free_port()}")
    client = BudgetServiceClient(channel, timeout=2)
    try:
        with pytest.raises(errors.BudgetUnavailable):
            await client.reserve("p", 1, "r7")
        with pytest.raises(errors.BudgetUnavailable):
            await client.commit("r7", 1, pool="p")
    finally:
        await channel.close()
