"""KeyCache against the real Redis: warm lookups without Redis, changes heard through
pub/sub by another replica within a second, the negative cache and its rate bound, and
a Redis of the test's own stopped and restarted (503, never a stale admit)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
import redis.asyncio as aioredis
from hoosh_tenancy import KeyCache, KeyRecord, KeyStore, TenancyUnavailable, connect_redis, generate_key, hash_key

from .conftest import REDIS_URL, RedisServer

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


class CountingStore(KeyStore):
    """The real store, counting the cache's reads of records (full loads and partial reads)."""

    full_loads = 0
    partial_reads: list[list[str]]

    async def load_all(self) -> tuple[int, dict[str, KeyRecord]]:
        self.full_loads += 1
        return await super().load_all()

    async def by_hashes(self, hashes: Sequence[str]) -> dict[str, KeyRecord | None]:
        self.partial_reads.append(list(hashes))
        return await super().by_hashes(hashes)


@pytest.fixture
async def counting(prefix: str, redis: aioredis.Redis) -> AsyncIterator[tuple[KeyStore, CountingStore, KeyCache]]:
    """A writer store, and a cache (checking the version every 50 ms) over a counting
    store with its own client (another replica); the ``redis`` fixture empties the prefix."""
    reader_client = connect_redis(REDIS_URL)
    reader = CountingStore(reader_client, prefix)
    reader.partial_reads = []
    cache = KeyCache(reader, reload_seconds=0.05)
    yield KeyStore(redis, prefix), reader, cache
    await cache.close()
    await reader_client.aclose()


async def write_unannounced(redis: aioredis.Redis, store: KeyStore, key_hash: str, record: KeyRecord) -> None:
    """Write a record with its version bump but no notice: a notice this cache missed."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(store.record_key(key_hash), record.model_dump_json())
        pipe.hset(f"{store.prefix}ids", record.id, key_hash)
        pipe.incr(f"{store.prefix}version")
        await pipe.execute()
    version = int(await redis.get(f"{store.prefix}version"))
    await redis.zadd(f"{store.prefix}changed", {key_hash: version})


async def test_an_unchanged_version_reads_no_record_and_keeps_the_cache_fresh(
    counting: tuple[KeyStore, CountingStore, KeyCache],
) -> None:
    writer, reader, cache = counting
    keys = [(await writer.create(name=f"k{n}"))[1] for n in range(3)]
    assert await cache.start(wait_seconds=5.0)
    deadline = time.monotonic() + 0.6  # about a dozen version checks
    while time.monotonic() < deadline:
        assert cache.fresh
        await asyncio.sleep(0.01)
    assert (reader.full_loads, reader.partial_reads) == (1, [])
    # A write this cache hears of: the notice applies it and its version. (A check that
    # ran between the write and its notice reads that one record; nothing else, once.)
    record, key = await writer.create(name="heard")
    await eventually(lambda: _known(cache, key, record), within=1.0)
    await asyncio.sleep(0.3)
    assert reader.full_loads == 1
    assert reader.partial_reads in ([], [[hash_key(key)]])
    reads = len(reader.partial_reads)
    await asyncio.sleep(0.3)
    assert len(reader.partial_reads) == reads  # settled: the version holds still
    for known in keys:
        assert await cache.authenticate(known) is not None
    assert cache.redis_lookups <= 1  # at most the new key, used before its notice arrived


async def _known(cache: KeyCache, key: str, record: KeyRecord | None) -> bool:
    return await cache.authenticate(key) == record


async def test_a_missed_notice_is_caught_up_by_reading_only_what_changed(
    counting: tuple[KeyStore, CountingStore, KeyCache],
) -> None:
    writer, reader, cache = counting
    record, key = await writer.create(name="x")
    others = [(await writer.create(name=f"other{n}"))[0] for n in range(5)]
    assert await cache.start(wait_seconds=5.0)
    assert await cache.authenticate(key) == record and len(cache) == 6
    # Revoked and a new key written, both without a notice.
    revoked = KeyRecord.model_validate({**record.model_dump(), "revoked_at": int(time.time())})
    await write_unannounced(writer.redis, writer, hash_key(key), revoked)
    new_key = generate_key()
    created = KeyRecord(id="key_unannounced", name="new", created_at=int(time.time()))
    await write_unannounced(writer.redis, writer, hash_key(new_key), created)

    async def caught_up() -> bool:
        return len(cache) == 7  # (asking for the new key would look it up in Redis)

    await eventually(caught_up, within=1.0)
    await eventually(lambda: _known(cache, key, None), within=1.0)
    assert await cache.authenticate(new_key) == created
    assert reader.full_loads == 1
    read = [h for hashes in reader.partial_reads for h in hashes]
    assert sorted(set(read)) == sorted({hash_key(key), hash_key(new_key)})  # not the others
    assert len(cache) == 1 + len(others) + 1
    assert cache.redis_lookups == 0


async def test_a_version_that_went_backwards_reloads_everything(
    counting: tuple[KeyStore, CountingStore, KeyCache],
) -> None:
    writer, reader, cache = counting
    record, key = await writer.create(name="x")
    await writer.update(record.id, name="y")
    assert await cache.start(wait_seconds=5.0)
    # Redis lost its version and change log (replaced, restored): what changed is unknown.
    revoked = KeyRecord.model_validate({**record.model_dump(), "name": "y", "revoked_at": int(time.time())})
    async with writer.redis.pipeline(transaction=True) as pipe:
        pipe.delete(f"{writer.prefix}version", f"{writer.prefix}changed")
        pipe.set(writer.record_key(hash_key(key)), revoked.model_dump_json())
        await pipe.execute()
    await eventually(lambda: _known(cache, key, None), within=1.0)
    assert reader.full_loads == 2
