"""Fixtures on the real Redis at 127.0.0.1:6379: a unique key prefix per test, deleted after."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from hoosh_budget.pools import BudgetStore

REDIS_URL = os.environ.get("HOOSH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: aioredis.Redis) -> AsyncIterator[str]:
    key_prefix = f"test:budget:{uuid.uuid4().hex}:"
    yield key_prefix
    keys = [key async for key in redis.scan_iter(match=f"{key_prefix}*", count=1000)]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
def store(redis: aioredis.Redis, prefix: str) -> BudgetStore:
    return BudgetStore(redis, prefix, default_lease_seconds=300, default_retry_after_seconds=42)
