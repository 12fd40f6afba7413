"""One multiplexed connection to a single Redis node for the hot path's script calls.

redis-py spends ~280 us of CPU on a lone ``EVALSHA`` on this repository's 2-core VMs
(a pool checkout under a lock and a timeout, a socket check per checkout, the retry
wrapper, a pure-Python encoder, a read task); a protocol the event loop calls back
with the bytes, hiredis to pack the command and parse the reply, takes ~110 us and a
loop iteration less (``BENCHMARKS.md``). Script calls are what every request sends
twice (the reservation, the settlement), so they take this road; everything else
stays on redis-py.

- Writes: a call finding nothing written in this turn of the event loop goes out at
  once; the calls that follow in the same turn go out together as one write on the
  next turn (under load dozens of calls share a write and Redis reads them at once).
- Replies come back in the order of the writes; each resolves its caller's future.
  A caller that stopped waiting changes nothing for the others.
- Nothing hangs: a reply overdue by ``timeout`` seconds closes the connection and
  fails every call waiting on it (Redis answers in order: the ones behind it would
  wait as long); opening the connection (TCP or Unix socket, TLS, AUTH, SELECT) is
  bounded by ``connect_timeout``, and a call tries it once: a server that refuses
  (max clients, protected mode) fails the call with its own message. A lost
  connection fails the calls whose replies had not come (ConnectionError; their
  scripts may or may not have run, as with any client) and the next call opens a new
  one. No call is ever sent twice.
- A reply error stays its caller's own (redis-py's exception classes, NOSCRIPT
  included, so ``register_script`` loads a flushed script and calls again); one that
  says the connection itself is unusable (NOAUTH, LOADING, READONLY after a
  failover) also retires the connection, as redis-py disconnects on it.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from dataclasses import dataclass, field
from typing import Any

import hiredis
from redis._parsers import BaseParser
from redis.asyncio.connection import AbstractConnection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import AuthenticationError, InvalidResponse, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Told when its command is written (or will never be): see hoosh_metering.redis.announce_written.
Written = asyncio.Future[None] | None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how to connect: read from a redis-py connection's settings (the pool's
    URL and options), so both roads reach the same server as the same user."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""  # a Unix socket: host and port unused
    ssl_context: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    client_name: str | None = None
    encoding: str | None = None  # None: replies as bytes (decode_responses off)
    encoding_errors: str = "strict"

    @classmethod
    def of(cls, connection: AbstractConnection) -> Endpoint | None:
        """The connection's endpoint; None for a credential provider (this road knows
        only the URL's user and password): the caller keeps redis-py's road for scripts
        too. The connection speaks RESP2 whatever the pool speaks (redis-py 8: RESP3);
        a script's reply reads the same in both unless the script calls
        ``redis.setresp(3)``, which hoosh's scripts do not."""
        if connection.credential_provider is not None:
            return None
        encoder = connection.encoder
        common: dict[str, Any] = {
            "username": connection.username,
            "password": connection.password,
            "db": int(connection.db or 0),
            "client_name": connection.client_name,
            "encoding": encoder.encoding if encoder.decode_responses else None,
            "encoding_errors": encoder.encoding_errors,
        }
        if isinstance(connection, UnixDomainSocketConnection):
            return cls(path=connection.path, **common)
        context = connection.ssl_context.get() if isinstance(connection, SSLConnection) else None
        return cls(host=connection.host, port=connection.port, ssl_context=context, **common)  # type: ignore[attr-defined]

    def describe(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"

    def lost(self) -> RedisConnectionError:
        """What a call waiting on a connection that went away gets."""
        return RedisConnectionError(f"Connection to Redis at {self.describe()} lost")


class _Pending:
    __slots__ = ("deadline", "future")

    def __init__(self, future: asyncio.Future[Any], deadline: float) -> None:
        self.future = future
        self.deadline = deadline


def _announce(written: Written) -> None:
    if written is not None and not written.done():
        written.set_result(None)


def _closed() -> RedisConnectionError:
    """What a call gets once the client is closed (and a call waiting on its connection)."""
    return RedisConnectionError("the Redis client is closed")


def _fail(future: asyncio.Future[Any], error: Exception) -> None:
    if not future.done():
        future.set_exception(error)


class _Wire(asyncio.Protocol):
    """One open connection: its transport, its reply parser, the calls it owes replies."""

    def __init__(self, endpoint: Endpoint, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.ready = False  # connected, and the handshake answered
        self.lost = False
        self.error: Exception | None = None  # why it was lost
        self.replies: collections.deque[_Pending] = collections.deque()
        self.watchdog: asyncio.TimerHandle | None = None
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=BaseParser.parse_error,
            **({"encoding": endpoint.encoding, "errors": endpoint.encoding_errors} if endpoint.encoding else {}),
        )

    def write(self, data: bytes, futures: list[asyncio.Future[Any]]) -> None:
        if self.lost or self.transport is None:  # lost since: as if lost just after the write
            for future in futures:
                _fail(future, self.error or self.endpoint.lost())
            return
        deadline = self.loop.time() + self.timeout
        for future in futures:
            self.replies.append(_Pending(future, deadline))
        self.transport.write(data)
        if self.watchdog is None:
            self.watchdog = self.loop.call_at(deadline, self._check_overdue)

    def _check_overdue(self) -> None:
        self.watchdog = None
        if not self.replies:
            return
        loop = self.loop
        head = self.replies[0].deadline
        if head <= loop.time():
            self.lose(
                RedisTimeoutError(f"Redis at {self.endpoint.describe()} did not answer within {self.timeout:g} s")
            )
        else:
            self.watchdog = loop.call_at(head, self._check_overdue)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        replies = self.replies
        while True:
            try:
                reply = reader.gets()
            except UnicodeDecodeError as error:  # decode_responses: this reply's caller alone
                if replies:
                    _fail(replies.popleft().future, error)
                continue
            except InvalidResponse as error:
                self.lose(RedisConnectionError(f"Redis at {self.endpoint.describe()}: {error}"))
                return
            if reply is False:
                return
            if not replies:  # e.g. "-ERR max number of clients reached" before closing
                self.lose(
                    reply
                    if isinstance(reply, RedisConnectionError)
                    else RedisConnectionError(f"Redis at {self.endpoint.describe()} said, unasked: {reply!r}")
                )
                return
            future = replies.popleft().future
            if isinstance(reply, Exception):  # an error reply (redis-py's class for its code)
                _fail(future, reply)
                if isinstance(reply, RedisConnectionError | ReadOnlyError):
                    self.lose(reply)  # the connection itself is unusable: the next call opens another
                    return
            elif not future.done():  # else its caller stopped waiting
                future.set_result(reply)

    def eof_received(self) -> bool | None:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lose(self.endpoint.lost())

    def lose(self, error: Exception) -> None:
        """This connection is done: every call still waiting on it fails with ``error``."""
        self.ready = False
        if not self.lost:
            self.lost = True
            self.error = error
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        replies, self.replies = self.replies, collections.deque()
        for pending in replies:
            _fail(pending.future, error)
        if self.transport is not None:
            try:
                self.transport.abort()  # no-op once closed
            except Exception:  # a transport of a closed event loop: nothing left to close
                pass


class ScriptConnection:
    """See the module's docstring. ``call`` from one event loop only."""

    def __init__(self, endpoint: Endpoint, *, timeout: float, connect_timeout: float) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._wire: _Wire | None = None
        self._opening: asyncio.Task[_Wire] | None = None
        # Calls of this turn after its first write: (packed, future, written).
        self._queued: list[tuple[bytes, asyncio.Future[Any], Written]] = []
        self._turn_open = False
        self._closed = False

    def span_attributes(self, command: str) -> dict[str, str | int]:
        """A script call's span attributes, as OpenTelemetry's Redis instrumentation
        names them (no arguments: they name pools and reservations)."""
        endpoint = self.endpoint
        attributes: dict[str, str | int] = {
            "db.system": "redis",
            "db.operation.name": command,
            "db.redis.database_index": endpoint.db,
        }
        if endpoint.path:
            attributes["server.address"] = endpoint.path
        else:
            attributes["server.address"] = endpoint.host
            attributes["server.port"] = endpoint.port
        return attributes

    async def call(self, args: tuple[Any, ...], written: Written = None) -> Any:
        """Send one command and return its reply (a reply error is raised)."""
        loop = asyncio.get_running_loop()
        try:
            packed = hiredis.pack_command(args)
            wire = self._wire
            if wire is None or not wire.ready or wire.loop is not loop:
                wire = await self._open()  # once: a server that refuses fails the call
                if not wire.ready:
                    raise wire.error or self.endpoint.lost()
        except BaseException:
            _announce(written)
            raise
        future: asyncio.Future[Any] = loop.create_future()
        if self._turn_open:
            self._queued.append((packed, future, written))
        else:
            self._turn_open = True
            loop.call_soon(self._end_turn)
            wire.write(packed, [future])
            _announce(written)
        return await future

    def _end_turn(self) -> None:
        self._turn_open = False
        queued, self._queued = self._queued, []
        sending = []
        futures = []
        for packed, future, _ in queued:
            if not future.done():  # its caller left before it was written: never sent
                sending.append(packed)
                futures.append(future)
        if futures:
            wire = self._wire
            if wire is not None and wire.loop is asyncio.get_running_loop():
                wire.write(b"".join(sending), futures)
            else:
                for future in futures:
                    _fail(future, self.endpoint.lost())
        for _, _, written in queued:
            _announce(written)

    async def _open(self) -> _Wire:
        """Open a connection, or wait for the opening under way (shared by every caller:
        one that stops waiting does not stop it for the others)."""
        if self._closed:
            raise _closed()
        opening, loop = self._opening, asyncio.get_running_loop()
        if opening is None or opening.get_loop() is not loop:
            opening = self._opening = loop.create_task(self._connect())
            opening.add_done_callback(self._opened)
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if opening.cancelled() and not (task is not None and task.cancelling()):
                raise _closed() from None  # close() stopped the opening
            raise

    def _opened(self, task: asyncio.Task[_Wire]) -> None:
        if self._opening is task:
            self._opening = None
        if not task.cancelled() and task.exception() is None:
            self._wire = task.result()

    async def _connect(self) -> _Wire:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        wire = _Wire(endpoint, self.timeout, loop)
        try:
            async with asyncio.timeout(self.connect_timeout):
                if endpoint.path:
                    await loop.create_unix_connection(lambda: wire, endpoint.path)
                else:
                    await loop.create_connection(lambda: wire, endpoint.host, endpoint.port, ssl=endpoint.ssl_context)
                await self._handshake(wire)
        except TimeoutError as error:
            wire.lose(RedisTimeoutError("Timeout connecting to Redis"))
            raise RedisTimeoutError(f"Timeout connecting to Redis at {endpoint.describe()}") from error
        except AuthenticationError:
            wire.lose(RedisConnectionError("authentication refused"))
            raise
        except (OSError, RedisConnectionError) as error:
            wire.lose(RedisConnectionError(str(error)))
            raise RedisConnectionError(f"Error connecting to Redis at {endpoint.describe()}: {error}") from error
        except BaseException:
            wire.lose(RedisConnectionError("connecting to Redis was stopped"))
            raise
        if self._closed:
            wire.lose(_closed())
            raise _closed()
        if wire.lost:  # closed (or refused) while the handshake was read
            raise wire.error or endpoint.lost()
        wire.ready = True
        return wire

    async def _handshake(self, wire: _Wire) -> None:
        """AUTH, CLIENT SETNAME and SELECT as redis-py sends them, written at once."""
        endpoint = self.endpoint
        commands: list[tuple[Any, ...]] = []
        if endpoint.password is not None:
            commands.append(
                ("AUTH", endpoint.username, endpoint.password) if endpoint.username else ("AUTH", endpoint.password)
            )
        if endpoint.client_name:
            commands.append(("CLIENT", "SETNAME", endpoint.client_name))
        if endpoint.db:
            commands.append(("SELECT", endpoint.db))
        if not commands:
            return
        futures = [wire.loop.create_future() for _ in commands]
        wire.write(b"".join(hiredis.pack_command(command) for command in commands), futures)
        try:
            for command, future in zip(commands, futures, strict=True):
                try:
                    await future
                except AuthenticationError:
                    raise
                except ResponseError as error:
                    if command[0] == "AUTH":
                        raise AuthenticationError(str(error)) from error
                    raise RedisConnectionError(f"{command[0]} refused: {error}") from error
        finally:
            for future in futures:  # the replies after a refusal: seen, so asyncio does not log them
                if future.done() and not future.cancelled():
                    future.exception()

    async def close(self) -> None:
        """Close the connection; calls still waiting fail, later calls are refused."""
        self._closed = True
        opening = self._opening
        if opening is not None:
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.lose(_closed())
