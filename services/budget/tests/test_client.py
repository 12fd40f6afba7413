"""BudgetServiceClient against a real in-process budget service: the same calls and
errors as the in-process BudgetStore."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hoosh_budget import errors
from hoosh_budget.client import BudgetServiceClient
from hoosh_budget.pools import BudgetStore
from hoosh_common.grpc_server import insecure_channel

from .test_server import start


@pytest.fixture
async def client(store: BudgetStore) -> AsyncIterator[BudgetServiceClient]:
    server, port = await start(store)
    channel = insecure_channel(f"127.0.0.1:{port}")
    yield BudgetServiceClient(channel)
    await channel.close()
    await server.stop(None)


async def test_reserve_commit_release_match_the_store(client: BudgetServiceClient, store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await client.reserve("p", 40, "r1", 60)
    assert (await store.get_pool("p")).reserved == 40
    committed = await client.commit("r1", 25)
    assert not committed.already_ended and committed.state == "committed"
    assert committed.pool is not None and (committed.pool.used, committed.pool.reserved) == (25, 0)
    assert (await client.commit("r1", 25)).already_ended  # exactly once
    await client.reserve("p", 10, "r2")
    released = await client.release("r2")
    assert not released.already_ended and released.pool is not None and released.pool.reserved == 0
    assert (await client.release("r2")).already_ended


async def test_errors_are_the_budgets_own(client: BudgetServiceClient, store: BudgetStore) -> None:
    await store.upsert_pool("small", 10)
    with pytest.raises(errors.PoolNotFound):
        await client.reserve("nope", 1, "r3")
    with pytest.raises(errors.BudgetExhausted) as exhausted:
        await client.reserve("small", 11, "r4")
    assert exhausted.value.retry_after_seconds > 0 and "small" in exhausted.value.message
    with pytest.raises(errors.InvalidArgument):
        await client.reserve("small", -1, "r5")


async def test_an_unreachable_service_is_budget_unavailable() -> None:
    from hoosh_cli.stack import free_port

    channel = insecure_channel(f"127.0.0.1:{free_port()}")
    client = BudgetServiceClient(channel, timeout=2)
    with pytest.raises(errors.BudgetUnavailable):
        await client.reserve("p", 1, "r6")
    with pytest.raises(errors.BudgetUnavailable):
        await client.commit("r6", 1)
    await channel.close()
