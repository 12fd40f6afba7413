"""One way to build the Redis client every metering user shares: a single node or a
Redis Cluster (or Valkey cluster), always with socket timeouts.

A slow Redis must be an error the caller turns into 503, never a hang that holds a
request (and its reservation) open. The retry is small on purpose: one more try on a
connection error (a pooled connection the server closed), none on a timeout, where
the command may already have run.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable, Iterator
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from hoosh_common.telemetry import exporting
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError

from .errors import BudgetUnavailable
from .script_connection import Endpoint, ScriptConnection

T = TypeVar("T")

_tracer = trace.get_tracer("hoosh.metering")

RedisClient = aioredis.Redis | aioredis.RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS


class BoundedRedisCluster(aioredis.RedisCluster):
    """A RedisCluster whose callers wait for a free connection instead of failing.

    redis-py's cluster pool raises MaxConnectionsError at once when a node's
    connections are all busy; a burst of requests must queue, as on a
    BlockingConnectionPool, for at most ``wait_timeout`` seconds (then a
    ConnectionError, which the store reports as BudgetUnavailable).
    """

    def __init__(self, *args: Any, max_commands: int, wait_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._commands = asyncio.Semaphore(max_commands)
        self._wait_timeout = wait_timeout

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(self._wait_timeout):
                await self._commands.acquire()
        except TimeoutError as error:
            raise RedisConnectionError("no free Redis Cluster connection in time") from error
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._commands.release()


# Script calls are what the hot path sends (a reservation, a settlement); they take the
# script connection. Everything else goes out through redis-py as it comes.
_SCRIPT_COMMANDS = frozenset({"EVALSHA", "EVAL"})
# Without a socket timeout in the URL's options, a script reply is still overdue after this.
_DEFAULT_SCRIPT_TIMEOUT = 5.0

_ANNOUNCE: contextvars.ContextVar[asyncio.Future[None] | None] = contextvars.ContextVar(
    "hoosh_metering_announce_written", default=None
)


@contextlib.contextmanager
def announce_written(written: asyncio.Future[None]) -> Iterator[None]:
    """Script calls issued inside this block (this task's context) resolve ``written``
    once their command is written to Redis, before its reply is read; or once it failed.

    A single Redis runs commands in the order they reach it, so a command anyone sends
    after that (a client reading its pool on another connection) is usually run after
    the script: a caller can answer on ``written`` and leave the reply to the script's
    own task. Best effort, not a guarantee: "written" means handed to the socket (a
    full socket buffer holds it back), and a call that must go again (NOSCRIPT: redis-py
    loads the script and sends it once more) runs a round trip later. Only
    :class:`PipeliningRedis` knows the moment; with another client (a cluster) the
    caller resolves ``written`` itself once the call is done. A task created inside
    the block inherits it, but only until ``written`` is resolved.
    """
    token = _ANNOUNCE.set(written)
    try:
        yield
    finally:
        _ANNOUNCE.reset(token)


class PipeliningRedis(aioredis.Redis):
    """A Redis client whose script calls (``EVALSHA``, ``EVAL``) take one multiplexed
    connection (:class:`~hoosh_metering.script_connection.ScriptConnection`): the first
    call of a turn of the event loop is written at once, the others of that turn
    together on the next, replies read in order by the event loop's own callback.

    redis-py spends ~280 us of CPU on a lone script call (pool checkout, retry wrapper,
    a pure-Python encoder, a read task); this road ~110 us, and under concurrency dozens
    of calls share one write, the Redis server too saving a read and a write per call.
    Each caller gets its own reply or error; a caller that stops waiting changes
    nothing for the others, and one that stopped before its call was written is not
    sent at all. A call under ``announce_written`` learns when it was written. Script
    calls are never retried (a lost connection fails the calls whose replies had not
    come: their scripts may have run); other commands go through redis-py's pool with
    its retry, as before. The connection shares the pool's URL, credentials, TLS,
    database and timeouts (it speaks RESP2: see ``Endpoint.of``); with a credential
    provider, script calls stay on redis-py too, one at a time.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        pool = self.connection_pool
        settings = pool.connection_class(**pool.connection_kwargs)
        endpoint = Endpoint.of(settings)
        self._scripts = (
            None
            if endpoint is None
            else ScriptConnection(
                endpoint,
                timeout=settings.socket_timeout or _DEFAULT_SCRIPT_TIMEOUT,
                connect_timeout=settings.socket_connect_timeout or _DEFAULT_SCRIPT_TIMEOUT,
            )
        )

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if not args or args[0] not in _SCRIPT_COMMANDS or self._scripts is None:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        written = _ANNOUNCE.get()
        if written is not None and written.done():
            written = None  # announced already (a later call from a task that inherited the block)
        if exporting():  # the span OpenTelemetry's Redis instrumentation gives redis-py's calls
            with _tracer.start_as_current_span(
                str(args[0]), kind=SpanKind.CLIENT, attributes=self._scripts.span_attributes(str(args[0]))
            ):
                return await self._scripts.call(args, written)
        return await self._scripts.call(args, written)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self._scripts is not None:
            await self._scripts.close()
        await super().aclose(close_connection_pool)


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1, supported_errors=(RedisConnectionError,))


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return urlsplit(url).scheme.lower() in CLUSTER_SCHEMES


def connect_redis(
    url: str,
    *,
    max_connections: int = 64,
    socket_timeout: float = 2.0,
    socket_connect_timeout: float = 2.0,
) -> RedisClient:
    """A client for ``url``; no connection is made until the first command.

    ``redis+cluster://host:port`` (or ``rediss+cluster://`` for TLS) gives a
    :class:`redis.asyncio.RedisCluster` that discovers the other nodes from that one;
    anything else (``redis://``, ``rediss://``, ``unix://``) a :class:`PipeliningRedis`
    on a :class:`BlockingConnectionPool` of ``max_connections``, where a caller waits
    at most ``socket_timeout`` for a free connection. Raises ValueError for a cluster
    URL without a host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in CLUSTER_SCHEMES:
        if not parts.hostname:
            raise ValueError(f"Redis Cluster URL needs a host: {url!r}")
        return BoundedRedisCluster(
            max_commands=max_connections,
            wait_timeout=socket_timeout,
            host=parts.hostname,
            port=parts.port or 6379,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            ssl=CLUSTER_SCHEMES[scheme],
            # A few more than the commands in flight: pub/sub borrows from the same pools.
            max_connections=max_connections + 4,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_connect_timeout,
            retry=_retry(),
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=socket_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_connect_timeout,
        retry=_retry(),
    )
    return PipeliningRedis.from_pool(pool)  # the client owns the pool: aclose() closes it


def is_unavailable(error: BaseException) -> bool:
    """Whether a Redis error means "Redis cannot serve now" (a 503), not a bug of ours."""
    if isinstance(error, ClusterDownError | TryAgainError | ReadOnlyError | RedisOutOfMemoryError | BusyLoadingError):
        return True
    if isinstance(error, ResponseError):  # e.g. a script error: a bug, let it surface
        return str(error).startswith(("BUSY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN"))
    return isinstance(error, RedisError | RedisClusterException | OSError | TimeoutError)


async def guard(call: Awaitable[T]) -> T:
    """Await a Redis call; Redis unreachable, too slow or failing over becomes BudgetUnavailable."""
    try:
        return await call
    except (RedisError, RedisClusterException, OSError, TimeoutError) as error:
        if is_unavailable(error):
            raise BudgetUnavailable(f"Budget store unavailable: {type(error).__name__}: {error}") from error
        raise
