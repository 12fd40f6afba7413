"""KeyCache against the real Redis: warm lookups without Redis, changes heard through
pub/sub by another replica within a second, the negative cache and its rate bound, and
a Redis of the test's own stopped and restarted (503, never a stale admit)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from hoosh_tenancy import KeyCache, KeyRecord, KeyStore, TenancyUnavailable, connect_redis, generate_key, hash_key

from .conftest import RedisServer

MakeCache = Callable[..., Awaitable[KeyCache]]


async def eventually(check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until ``check`` holds; fails past ``within``."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < within, f"not within {within}s"
        await asyncio.sleep(0.005)
    return time.monotonic() - start


async def test_warm_lookups_do_not_touch_redis(store: KeyStore, make_cache: MakeCache) -> None:
    record, key = await store.create(name="warm")
    cache = await make_cache()
    assert cache.fresh and len(cache) == 1
    for _ in range(100):
        assert await cache.authenticate(key) == record
    assert cache.redis_lookups == 0


async def test_a_second_replica_sees_a_revocation_within_a_second(store: KeyStore, make_cache: MakeCache) -> None:
    record, key = await store.create(name="revoke-me")
    first, second = await make_cache(), await make_cache()
    assert await first.authenticate(key) == record
    assert await second.authenticate(key) == record
    await store.revoke(record.id)

    async def refused() -> bool:
        return await second.authenticate(key) is None

    elapsed = await eventually(refused, within=1.0)
    assert elapsed < 1.0

    async def refused_by_first() -> bool:
        return await first.authenticate(key) is None

    await eventually(refused_by_first, within=1.0)
    assert (await second.lookup(hash_key(key))).revoked_at is not None  # type: ignore[union-attr]
    assert second.redis_lookups == 0  # heard through the channel, not found by asking


async def test_updates_and_new_keys_reach_other_replicas(store: KeyStore, make_cache: MakeCache) -> None:
    cache = await make_cache()
    record, key = await store.create(name="x", pools=["a"])
    # Used at once: found by one lookup if the notice has not arrived yet.
    assert await cache.authenticate(key) == record
    await store.update(record.id, pools=["b"])

    async def moved() -> bool:
        found = await cache.authenticate(key)
        return found is not None and found.pools == ("b",)

    await eventually(moved, within=1.0)


async def test_expired_and_wrong_keys(store: KeyStore, make_cache: MakeCache) -> None:
    record, key = await store.create(name="old", expires_at=int(time.time()) - 1)
    cache = await make_cache()
    assert await cache.authenticate(key) is None
    assert await cache.lookup(hash_key(key)) == record  # known, but not usable
    assert await cache.authenticate(generate_key()) is None
    assert await cache.authenticate("") is None


async def test_the_negative_cache_asks_redis_once(make_cache: MakeCache) -> None:
    cache = await make_cache()
    wrong = generate_key()
    results = await asyncio.gather(*(cache.authenticate(wrong) for _ in range(50)))
    assert results == [None] * 50
    for _ in range(50):
        assert await cache.authenticate(wrong) is None
    assert cache.redis_lookups == 1


async def test_random_keys_cannot_hammer_redis(make_cache: MakeCache) -> None:
    cache = await make_cache(miss_lookups_per_second=20.0)
    for _ in range(500):
        assert await cache.authenticate(generate_key()) is None
    assert cache.redis_lookups <= 25  # the burst, plus what the rate refilled meanwhile


async def test_a_change_notice_invalidates_the_negative_cache(
    store: KeyStore, redis: aioredis.Redis, make_cache: MakeCache
) -> None:
    cache = await make_cache()
    key = generate_key()
    key_hash = hash_key(key)
    assert await cache.lookup(key_hash) is None  # remembered as absent
    # A record appears under that hash with its notice (what KeyStore.create writes).
    record = KeyRecord(id="key_appeared", name="late", created_at=int(time.time()))
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(store.record_key(key_hash), record.model_dump_json())
        pipe.hset(f"{store.prefix}ids", record.id, key_hash)
        pipe.publish(store.channel, f'{{"op": "create", "id": "{record.id}", "hash": "{key_hash}"}}')
        await pipe.execute()

    async def known() -> bool:
        return await cache.authenticate(key) == record

    await eventually(known, within=1.0)


async def test_redis_down_means_unavailable_not_a_stale_admit(own_redis: RedisServer, make_cache: MakeCache) -> None:
    prefix = "hoosh:test:tenancy:own:"
    client = connect_redis(own_redis.url)
    store = KeyStore(client, prefix)
    record, key = await store.create(name="x")
    cache = await make_cache(url=own_redis.url, key_prefix=prefix)
    assert await cache.authenticate(key) == record

    own_redis.stop()
    # Past a second without the subscription, a known key is not trusted from memory.
    await asyncio.sleep(1.3)
    assert not cache.fresh
    with pytest.raises(TenancyUnavailable):
        await cache.authenticate(key)

    await own_redis.start()  # an empty Redis on the same port: the record is gone
    await client.aclose()
    client = connect_redis(own_redis.url)
    store = KeyStore(client, prefix)
    second, second_key = await store.create(name="after")

    async def resumed() -> bool:
        return cache.fresh and await cache.authenticate(second_key) == second

    await eventually(resumed, within=5.0)
    assert await cache.authenticate(key) is None  # the reload dropped what Redis no longer has
    await client.aclose()


async def test_a_revocation_during_a_lost_subscription_is_seen(own_redis: RedisServer, make_cache: MakeCache) -> None:
    prefix = "hoosh:test:tenancy:own:"
    client = connect_redis(own_redis.url)
    store = KeyStore(client, prefix)
    record, key = await store.create(name="x")
    cache = await make_cache(url=own_redis.url, key_prefix=prefix)
    assert await cache.authenticate(key) == record
    # Drop every subscriber's connection, then revoke while the cache may be reconnecting.
    await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    await store.revoke(record.id)

    async def refused() -> bool:
        return await cache.authenticate(key) is None

    await eventually(refused, within=1.0)
    await client.aclose()
