"""The Redis client of the key store: one plain node (records and the change channel
need no cluster), with socket timeouts so a slow Redis is an error, not a hang."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

DEFAULT_KEY_PREFIX = "hoosh:tenancy:"


def connect_redis(
    url: str,
    *,
    max_connections: int = 32,
    socket_timeout: float = 1.0,
    socket_connect_timeout: float = 1.0,
) -> aioredis.Redis:
    """A client for ``url`` (``redis://`` or ``rediss://``); connects lazily.

    One retry (no backoff) survives a pooled connection that Redis closed; more would
    turn a Redis outage into seconds of waiting before the 503.
    A ``+cluster`` URL is refused: key records live on one node.
    """
    scheme = url.split("://", 1)[0]
    if scheme.endswith("+cluster"):
        raise ValueError(
            "the key store needs a single Redis node, not a cluster URL; "
            "set HOOSH_TENANCY_REDIS_URL to one node (or a Redis outside the cluster)"
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,  # waiting for a free connection is bounded too
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        retry=Retry(NoBackoff(), 1),
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it
