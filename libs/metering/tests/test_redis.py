"""connect_redis and what the store does when Redis is away or too slow: BudgetUnavailable,
never a hang and never a free admission."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from hoosh_metering.errors import BudgetUnavailable
from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_metering.redis import BoundedRedisCluster, connect_redis, is_cluster_url


async def test_a_plain_url_gives_a_blocking_pool_with_timeouts(redis_url: str) -> None:
    client = connect_redis(redis_url, max_connections=8, socket_timeout=1.5, socket_connect_timeout=0.5)
    try:
        assert isinstance(client, aioredis.Redis)
        pool = client.connection_pool
        assert isinstance(pool, aioredis.BlockingConnectionPool)
        assert pool.max_connections == 8
        assert pool.connection_kwargs["socket_timeout"] == 1.5
        assert pool.connection_kwargs["socket_connect_timeout"] == 0.5
        assert await client.ping()
    finally:
        await client.aclose()


def test_cluster_urls() -> None:
    assert is_cluster_url("redis+cluster://10.0.0.1:7000")
    assert is_cluster_url("REDISS+CLUSTER://h:1")
    assert not is_cluster_url("redis://127.0.0.1:6379/0")
    client = connect_redis("redis+cluster://user:p%40ss@10.0.0.1:7000", socket_timeout=1.0)
    assert isinstance(client, BoundedRedisCluster)  # nothing connects until the first command


async def test_an_unreachable_redis_is_budget_unavailable() -> None:
    client = connect_redis("redis://127.0.0.1:1/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    store = BudgetStore(client, "test:metering:nowhere:", 300)
    try:
        with pytest.raises(BudgetUnavailable):
            await store.reserve("p", 1, "r1")
        with pytest.raises(BudgetUnavailable):
            await store.create_pool(PoolSpec("p", 1))
    finally:
        await client.aclose()


@pytest.fixture
async def silent_server() -> AsyncIterator[int]:
    """A TCP port that accepts connections and never answers: a Redis that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_a_slow_redis_times_out_instead_of_hanging(silent_server: int) -> None:
    client = connect_redis(f"redis://127.0.0.1:{silent_server}/0", socket_timeout=0.3, socket_connect_timeout=0.3)
    store = BudgetStore(client, "test:metering:slow:", 300)
    try:
        async with asyncio.timeout(5):
            with pytest.raises(BudgetUnavailable):
                await store.reserve("p", 1, "r1")
    finally:
        await client.aclose()
