"""Exact-match response cache in Redis for deterministic chat requests.

A request is cacheable when the cache is enabled and its temperature is 0, or its
model is opted in (``cache.always``). The key is a SHA-256 of the request with
everything that does not change the answer cleared (request id, user, caller,
include_usage), so a streamed and a blocking request share entries. The **pool stays
in the key**: the cache is partitioned by pool, and no tenant ever sees an answer
cached for another pool. The value is the finished ``ChatResponse`` (message, finish
reason, original usage, provider).

Budget rule (``cache.charge_hits``, default true): a hit makes no upstream call and
commits the original usage's tokens to its pool (capped by what the reservation
holds), at USD cost 0; its event is ``inference.completed`` with ``cached = true``.

Redis layout: 16 shards, chosen by the key's first hex digit; a shard's entries
``{prefix}cache:{<d>}:e:<sha256>`` and counters ``{prefix}cache:{<d>}:stats`` share
one hash tag, so the lookup script (entry + counters) runs on Redis Cluster while
entries still spread over the cluster. The stats sum the 16 counter hashes.

One Redis round trip per lookup (a Lua script that also counts the hit or miss);
a store happens off the response path.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
from dataclasses import dataclass

import redis.asyncio as redis
from hoosh.router.v1 import router_pb2
from redis.exceptions import RedisError

from .config import CacheConfig

log = logging.getLogger(__name__)

# KEYS[1] the entry, KEYS[2] its shard's stats hash (same hash tag). Returns the entry or nil.
GET_SCRIPT = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('HINCRBY', KEYS[2], 'hits', 1)
else
  redis.call('HINCRBY', KEYS[2], 'misses', 1)
end
return value
"""

MAX_COUNTED_ENTRIES = 100_000
SHARDS = "0123456789abcdef"


@dataclass(slots=True, frozen=True)
class CacheStats:
    enabled: bool
    hits: int
    misses: int
    stores: int
    entries: int
    ttl_seconds: int


class ResponseCache:
    def __init__(self, client: redis.Redis | redis.RedisCluster, key_prefix: str, config: CacheConfig) -> None:
        self._redis = client
        self._prefix = f"{key_prefix}cache:"
        self._config = config
        self._get = client.register_script(GET_SCRIPT)
        self._background: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    @property
    def charge_hits(self) -> bool:
        return self._config.charge_hits

    def _stats_key(self, shard: str) -> str:
        return f"{self._prefix}{{{shard}}}:stats"

    def _stats_key_of(self, key: str) -> str:
        # The entry key is "{prefix}cache:{d}:e:<digest>": its shard is the tag's digit.
        return self._stats_key(key[len(self._prefix) + 1])

    def cacheable(self, request: router_pb2.ChatRequest) -> bool:
        if not self._config.enabled:
            return False
        sampling = request.sampling
        if sampling.HasField("temperature") and sampling.temperature == 0:
            return True
        return any(fnmatch.fnmatchcase(request.model, pattern) for pattern in self._config.always)

    def key(self, request: router_pb2.ChatRequest) -> str:
        """The entry key: the request's answer-shaping fields and its pool ("" = "default")."""
        canonical = router_pb2.ChatRequest()
        canonical.CopyFrom(request)
        canonical.ClearField("request_id")
        canonical.ClearField("user")
        canonical.ClearField("caller")
        canonical.ClearField("include_usage")
        canonical.pool = request.pool or "default"
        digest = hashlib.sha256(canonical.SerializeToString(deterministic=True)).hexdigest()
        return f"{self._prefix}{{{digest[0]}}}:e:{digest}"

    async def get(self, key: str) -> router_pb2.ChatResponse | None:
        """The cached response, or None (a miss, or Redis trouble)."""
        try:
            value = await self._get(keys=[key, self._stats_key_of(key)])
        except (RedisError, OSError) as error:
            log.warning("cache lookup failed", extra={"error": str(error)})
            return None
        if value is None:
            return None
        try:
            return router_pb2.ChatResponse.FromString(value)
        except Exception:  # a corrupt entry is a miss
            log.warning("corrupt cache entry", extra={"key": key})
            return None

    def put(self, key: str, response: router_pb2.ChatResponse) -> None:
        """Store a finished response, in the background."""
        stored = router_pb2.ChatResponse()
        stored.CopyFrom(response)
        stored.ClearField("id")
        stored.ClearField("created")
        stored.ClearField("cache")
        task = asyncio.create_task(self._put(key, stored.SerializeToString()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _put(self, key: str, value: bytes) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(key, value, ex=self._config.ttl_seconds)
                pipe.hincrby(self._stats_key_of(key), "stores", 1)
                await pipe.execute()
        except (RedisError, OSError) as error:
            log.warning("cache store failed", extra={"error": str(error)})

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def stats(self) -> CacheStats:
        """The counters of every shard, summed, and the live entries (counted up to a bound)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for shard in SHARDS:
                pipe.hgetall(self._stats_key(shard))
            shards = await pipe.execute()
        totals = {b"hits": 0, b"misses": 0, b"stores": 0}
        for fields in shards:
            for name in totals:
                totals[name] += int(fields.get(name, 0))
        entries = 0
        async for _ in self._redis.scan_iter(match=f"{self._prefix}{{*}}:e:*", count=1000):
            entries += 1
            if entries >= MAX_COUNTED_ENTRIES:
                break
        return CacheStats(
            enabled=self._config.enabled,
            hits=totals[b"hits"],
            misses=totals[b"misses"],
            stores=totals[b"stores"],
            entries=entries,
            ttl_seconds=self._config.ttl_seconds,
        )
