"""close() ends the directory listener every time (redis-py's get_message can swallow a
cancellation: a service's shutdown must never hang on it)."""

from __future__ import annotations

import asyncio

from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_metering.redis import RedisClient


async def test_close_always_ends_the_listener(client: RedisClient, prefix: str) -> None:
    for index in range(30):
        store = BudgetStore(client, f"{prefix}{index}:", 30)
        await store.start()
        await store.apply_pool(PoolSpec("a", 10))
        await asyncio.wait_for(store.close(), 10)
