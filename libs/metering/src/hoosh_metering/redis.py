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

T = TypeVar("T")

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


# Script calls are what the hot path sends (a reservation, a settlement); they are
# batched. Everything else goes out as it comes.
_PIPELINED = frozenset({"EVALSHA", "EVAL"})
# Commands per pipeline: a bound on one batch's size, not a tuning knob.
_MAX_BATCH = 256
# One script call waiting for its batch: the command, its options, its caller's future,
# and the future that learns when it was written (see ``announce_written``).
_Entry = tuple[tuple[Any, ...], dict[str, Any], asyncio.Future[Any], asyncio.Future[None] | None]

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


def _announce(written: asyncio.Future[None] | None) -> None:
    if written is not None and not written.done():
        written.set_result(None)


class PipeliningRedis(aioredis.Redis):
    """A Redis client that sends the script calls issued in the same turn of the event
    loop as one pipeline: one connection, one write, the replies read in order.

    redis-py spends ~150-200 us of CPU on each command (connection pool, retry wrapper,
    a socket write, the reply); under concurrency the router issues dozens of script
    calls per loop turn, and as one pipeline each costs a quarter of that, the Redis
    server too saving a read and a write per call. A lone call takes the ordinary path.
    Each caller gets its own reply or error (a script error stays its own; a connection
    failure fails the calls whose replies had not come, as it would each of them), and a
    caller that stops waiting changes nothing for the others; one that stopped before the
    batch left is not sent at all. A call under ``announce_written`` learns when it was
    written (a lone one then goes as a batch of one, without the lone path's retry).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch: list[_Entry] = []
        self._batches: set[asyncio.Task[None]] = set()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if not args or args[0] not in _PIPELINED:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._batch:
            loop.call_soon(self._send_batch)
        written = _ANNOUNCE.get()
        if written is not None and written.done():
            written = None  # announced already (a later call from a task that inherited the block)
        self._batch.append((args, options, future, written))
        return await future

    def _send_batch(self) -> None:
        batch, self._batch = self._batch, []
        for start in range(0, len(batch), _MAX_BATCH):
            task = asyncio.get_running_loop().create_task(self._run(batch[start : start + _MAX_BATCH]))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    async def _run(self, batch: list[_Entry]) -> None:
        # A caller that stopped waiting before the batch left: its call never runs, as a
        # call cancelled before its write never did.
        waiting = []
        for entry in batch:
            if entry[2].done():
                _announce(entry[3])  # nothing of it will be written: its caller need not wait
            else:
                waiting.append(entry)
        batch = waiting
        if len(batch) == 1 and batch[0][3] is None:
            args, options, future, _ = batch[0]
            try:
                result = await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
            except BaseException as error:  # to its caller (a cancelled batch: as a lost connection)
                _fail(future, error)
                if not isinstance(error, Exception):
                    raise
                return
            if not future.done():
                future.set_result(result)
        elif batch:
            await self._pipelined(batch)

    async def _pipelined(self, batch: list[_Entry]) -> None:
        """One write, the replies read in order, each to its caller. Never retried: a
        replay would run again the scripts whose replies were already read (a breaker's
        failure count, a provider's RPM), where a lone call's retry repeats only itself."""
        pool = self.connection_pool
        connection = None
        try:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            await connection.send_packed_command(connection.pack_commands([entry[0] for entry in batch]))
            for entry in batch:
                _announce(entry[3])
            for args, options, future, _ in batch:
                try:
                    result = await self.parse_response(connection, args[0], **options)
                except ResponseError as error:  # this script's own error
                    _fail(future, error)
                    continue
                if not future.done():
                    future.set_result(result)
        except BaseException as error:
            if connection is not None:
                await connection.disconnect(nowait=True)  # the replies still due would be no one's
            for _, _, future, written in batch:
                _fail(future, error)
                _announce(written)
            if not isinstance(error, Exception):
                raise
        finally:
            if connection is not None:
                await pool.release(connection)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    """The caller's error; a batch cancelled under it (shutdown) reads as a lost connection."""
    if not future.done():
        future.set_exception(error if isinstance(error, Exception) else RedisConnectionError("Redis call cancelled"))


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
