"""The exact-match response cache against the real Redis."""

from __future__ import annotations

import redis.asyncio as redis
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2
from hoosh_router.cache import ResponseCache
from hoosh_router.config import CacheConfig

from .helpers import chat_request, user


def deterministic(text: str = "hi", **fields: object) -> router_pb2.ChatRequest:
    request = chat_request(user(text), model="gpt-x")
    request.sampling.temperature = 0
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def test_what_is_cacheable(redis_client: redis.Redis) -> None:
    cache = ResponseCache(redis_client, "p:", CacheConfig(always=["house-*"]))
    assert cache.cacheable(deterministic())
    sampled = chat_request(user("hi"), model="gpt-x")
    assert not cache.cacheable(sampled)  # no temperature: the provider's default sampling
    sampled.sampling.temperature = 0.7
    assert not cache.cacheable(sampled)
    opted_in = chat_request(user("hi"), model="house-model")
    opted_in.sampling.temperature = 0.9
    assert cache.cacheable(opted_in)
    assert not ResponseCache(redis_client, "p:", CacheConfig(enabled=False)).cacheable(deterministic())


def test_the_key_ignores_who_asks_but_not_what(redis_client: redis.Redis) -> None:
    cache = ResponseCache(redis_client, "p:", CacheConfig())
    base = cache.key(deterministic())
    asker = deterministic(request_id="other", user="bob", include_usage=True)
    asker.caller.key_id, asker.caller.rpm = "key_b", 5
    assert cache.key(asker) == base
    assert cache.key(deterministic("hello")) != base
    seeded = deterministic()
    seeded.sampling.seed = 1
    assert cache.key(seeded) != base
    assert base.startswith("p:cache:{")


def test_the_key_keeps_the_pool(redis_client: redis.Redis) -> None:
    """The cache is partitioned by pool: no tenant sees another pool's cached answer."""
    cache = ResponseCache(redis_client, "p:", CacheConfig())
    assert cache.key(deterministic(pool="team-a")) != cache.key(deterministic(pool="team-b"))
    assert cache.key(deterministic(pool="default")) == cache.key(deterministic())  # "" is "default"


def test_entry_and_counters_share_a_hash_tag(redis_client: redis.Redis) -> None:
    """The lookup script touches the entry and its shard's counters: one slot on a cluster."""
    from redis.crc import key_slot

    cache = ResponseCache(redis_client, "p:", CacheConfig())
    slots = set()
    for text in ("a", "b", "c", "d", "e", "f", "g", "h"):
        key = cache.key(deterministic(text))
        assert key_slot(key.encode()) == key_slot(cache._stats_key_of(key).encode())
        slots.add(key_slot(key.encode()))
    assert len(slots) > 1  # entries still spread over the cluster


async def test_miss_store_hit_and_stats(redis_client: redis.Redis, prefix: str) -> None:
    cache = ResponseCache(redis_client, prefix, CacheConfig(ttl_seconds=60))
    key = cache.key(deterministic())
    assert await cache.get(key) is None
    response = router_pb2.ChatResponse(
        id="chatcmpl-1",
        created=5,
        model="gpt-x",
        provider="up",
        cache="miss",
        choices=[chat_pb2.Choice(message=chat_pb2.ChatMessage(role="assistant", text="hello"), finish_reason="stop")],
        usage=chat_pb2.Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4),
    )
    cache.put(key, response)
    await cache.drain()
    hit = await cache.get(key)
    assert hit is not None
    assert hit.choices[0].message.text == "hello" and hit.usage.total_tokens == 4 and hit.provider == "up"
    assert (hit.id, hit.created, hit.cache) == ("", 0, "")  # per-request fields are not stored
    assert 0 < await redis_client.ttl(key) <= 60
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.stores, stats.entries, stats.ttl_seconds) == (1, 1, 1, 1, 60)


async def test_a_corrupt_entry_is_a_miss(redis_client: redis.Redis, prefix: str) -> None:
    cache = ResponseCache(redis_client, prefix, CacheConfig())
    key = cache.key(deterministic())
    await redis_client.set(key, b"\xff\xfe not a proto")
    assert await cache.get(key) is None
