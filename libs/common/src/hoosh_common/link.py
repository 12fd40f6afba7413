"""The router's local link: the Tunnel's frames over a Unix domain socket, for an edge
on the same host or in the same pod as its router.

Why: a frame on a grpc.aio stream crosses threads several times on each side (the
EventEngine's poller and workers, the completion queue's poller, the event loop); a
round trip of one small message costs ~0.26 ms of wall time on a 2-core VM against
~0.10 ms for the same bytes on a socket the event loop reads itself (both measured
alone, uvloop, server in another process). The link carries the same messages as the
Tunnel stream (``hoosh.router.v1``), framed as a 4-byte big-endian length and the
message:

1. the edge sends a ``TunnelHello`` with its internal token (``Bearer <token>``);
2. the router checks it with the caller policy every gRPC call of its meets (the
   Tunnel method's) and answers a ``TunnelWelcome``: code 0, or the refusal's status
   (then it closes the connection);
3. then ``TunnelBatch`` messages both ways, as on the stream. When the edge wants no
   more calls there it sends a ``draining`` frame (call_id 0) instead of half-closing
   (on a Unix socket a half-close and a closed peer read the same): the router answers
   what is still running, then closes. A connection that ends otherwise (an end of
   file included) ends its calls, like a cancelled stream.

Only a Unix socket: it never crosses a network, so no TLS is needed, and the socket
file is made owner-only (0600) before the router listens. The token is checked as
well. A connection that has not said hello within ``HELLO_TIMEOUT_SECONDS``, or sends
a message over the bound for its stage, is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import stat
import struct
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

import grpc
from hoosh.router.v1 import router_pb2

from .internal_auth import AUTHORIZATION, CallerPolicy
from .tunnel import MAX_BATCH_BYTES, TUNNEL_METHOD, next_batch, status_of

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
HELLO_TIMEOUT_SECONDS = 5.0
# How long the edge waits for the router's welcome before its calls go another way: a
# router on the same host answers in microseconds.
WELCOME_TIMEOUT_SECONDS = 1.0
# A hello or a welcome is a token or a short message.
MAX_HANDSHAKE_BYTES = 8 * 1024
# The edge's batches: frames up to MAX_BATCH_BYTES, or one frame alone whose request
# is at most hoosh_common.tunnel.MAX_TUNNEL_REQUEST_BYTES (plus its metadata).
MAX_CALLER_MESSAGE_BYTES = MAX_BATCH_BYTES + 64 * 1024
# The router's batches: one reply may be up to the channel's 32 MiB bound.
MAX_ROUTER_MESSAGE_BYTES = 33 * 1024 * 1024
# Connections open at once (said hello or not): an edge holds one per worker process.
MAX_CONNECTIONS = 256
# sockaddr_un's sun_path holds 108 bytes with the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


def check_socket_path(path: str) -> str:
    """``path`` if a Unix socket can bind it, else ValueError saying why."""
    if not path.startswith("/"):
        raise ValueError(f"the router's link socket must be an absolute path: {path!r}")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(f"the router's link socket path is longer than {MAX_SOCKET_PATH_BYTES} bytes: {path!r}")
    return path


def encode(message: router_pb2.TunnelBatch | router_pb2.TunnelHello | router_pb2.TunnelWelcome) -> bytes:
    data = message.SerializeToString()
    return _LENGTH.pack(len(data)) + data


class MessageTooLarge(Exception):
    pass


class FrameBuffer:
    """Splits a byte stream into length-prefixed messages, each at most ``limit`` bytes."""

    __slots__ = ("_buffer", "limit")

    def __init__(self, limit: int) -> None:
        self._buffer = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        """The whole messages ``data`` completes (raises MessageTooLarge)."""
        buffer = self._buffer
        if not buffer and len(data) >= 4:
            # The common case: the read holds whole messages only; no copy into the buffer.
            (size,) = _LENGTH.unpack_from(data)
            if size > self.limit:
                raise MessageTooLarge(size)
            if len(data) == 4 + size:
                return [data[4:]]
        buffer += data
        messages = []
        offset = 0
        while len(buffer) - offset >= 4:
            (size,) = _LENGTH.unpack_from(buffer, offset)
            if size > self.limit:
                raise MessageTooLarge(size)
            end = offset + 4 + size
            if len(buffer) < end:
                break
            messages.append(bytes(buffer[offset + 4 : end]))
            offset = end
        if offset:
            del buffer[:offset]
        return messages


class LinkWriter:
    """Frames to one link connection, without a task of its own: the first frame sent
    in a turn of the event loop goes out at once (a loop iteration sooner: a lone call
    does not wait for the turn to end), the turn's later frames in one batch (one
    write) on the next. Before the connection is attached (the edge is still saying
    hello) frames wait."""

    __slots__ = ("_closed", "_frames", "_loop", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = transport
        self._frames: deque[router_pb2.TunnelFrame] = deque()
        self._scheduled = False
        self._closed = False

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        if self._frames and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._write)

    def send(self, frame: router_pb2.TunnelFrame) -> None:
        if self._closed:
            return
        transport = self._transport
        if self._scheduled or self._frames or transport is None:
            self._frames.append(frame)  # after the frames before it
            return
        self._scheduled = True  # this turn's later frames: one batch on the next
        self._loop.call_soon(self._write)
        if not transport.is_closing():
            batch = router_pb2.TunnelBatch()
            batch.frames.append(frame)
            transport.write(encode(batch))

    def _write(self) -> None:
        self._scheduled = False
        transport = self._transport
        if self._closed or transport is None or not self._frames:
            return
        if transport.is_closing():
            self._frames.clear()
            return
        chunks = []
        while self._frames:
            chunks.append(encode(next_batch(self._frames)))
        transport.writelines(chunks)

    async def flush(self) -> None:
        """Hand every frame sent so far to the transport (which writes its buffer out
        before a close or an EOF)."""
        if self._frames and self._transport is not None:
            self._write()

    def close(self) -> None:
        """Stop writing (what is not yet handed to the transport is dropped)."""
        self._closed = True
        self._frames.clear()


class LinkSession(Protocol):
    """What the router runs on one link connection (a ``TunnelSession``)."""

    def feed(self, batch: router_pb2.TunnelBatch) -> None: ...

    async def finish(self) -> None: ...

    def abort(self) -> None: ...


# Makes the session of one accepted connection, given the writer its frames go to.
SessionFactory = Callable[[LinkWriter], LinkSession]


class _ServerConnection(asyncio.Protocol):
    """The router's end of one link connection."""

    def __init__(self, server: LinkServer) -> None:
        self._server = server
        self._buffer = FrameBuffer(MAX_HANDSHAKE_BYTES)
        self._transport: asyncio.Transport | None = None
        self._session: LinkSession | None = None
        self._finishing: asyncio.Task[None] | None = None
        self._hello_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if len(self._server.connections) >= MAX_CONNECTIONS:
            # An edge holds one per worker (two while it moves on): this is no edge.
            log.warning("router link: too many connections; closing the new one")
            self._transport.abort()
            return
        self._server.connections.add(self)
        loop = asyncio.get_running_loop()
        self._hello_timer = loop.call_later(HELLO_TIMEOUT_SECONDS, self._too_slow)

    def _too_slow(self) -> None:
        if self._session is None and self._transport is not None:
            log.warning("router link: no hello in time; closing the connection")
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._buffer.feed(data)
        except MessageTooLarge as error:
            log.warning("router link: message over the bound; closing the connection", extra={"bytes": error.args[0]})
            self.abort()
            return
        for message in messages:
            if self._transport is None or self._transport.is_closing():
                return
            try:
                if self._session is None:
                    self._hello(router_pb2.TunnelHello.FromString(message))
                else:
                    batch = router_pb2.TunnelBatch.FromString(message)
                    self._session.feed(batch)
                    if batch.frames and batch.frames[-1].WhichOneof("kind") == "draining":
                        self._wind_down()
            except Exception:  # a message that does not parse: the peer is not an edge of ours
                log.warning("router link: a malformed message; closing the connection")
                self.abort()
                return

    def _hello(self, hello: router_pb2.TunnelHello) -> None:
        assert self._transport is not None
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        policy = self._server.policy
        denial = policy.check(TUNNEL_METHOD, ((AUTHORIZATION, hello.authorization),)) if policy is not None else None
        if denial is not None:
            log.warning("router link: caller refused", extra={"code": denial.code.name})
            self._refuse(denial.code, denial.message)
            return
        if self._server.closing:
            self._refuse(grpc.StatusCode.UNAVAILABLE, "The router is stopping")
            return
        self._transport.write(encode(router_pb2.TunnelWelcome(code=0)))
        self._buffer.limit = MAX_CALLER_MESSAGE_BYTES
        self._session = self._server.sessions(LinkWriter(self._transport))

    def _refuse(self, code: grpc.StatusCode, message: str) -> None:
        """The welcome that says why not, then the end of the connection."""
        assert self._transport is not None
        self._transport.write(encode(router_pb2.TunnelWelcome(code=code.value[0], message=message)))
        self._transport.close()

    def _wind_down(self) -> None:
        # The edge's ``draining`` frame: no more calls from it here; answer what is
        # running, then close.
        if self._session is not None and self._finishing is None:
            self._finishing = asyncio.get_running_loop().create_task(self._finish(self._session))

    def eof_received(self) -> bool:
        # The edge never half-closes (it says ``draining``): an end of file is an edge
        # gone (closed, killed), whose calls no one waits for. connection_lost cancels them.
        return False

    async def _finish(self, session: LinkSession) -> None:
        try:
            await session.finish()
        finally:
            if self._transport is not None:
                self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._server.forget(self)
        if self._finishing is not None and not self._finishing.done():
            self._finishing.cancel()
        if self._session is not None:
            self._session.abort()  # the caller is gone: its calls end, as on a cancelled stream
        self._transport = None


class LinkServer:
    """The router's listener on its link socket.

    A lock file beside the socket (``<path>.lock``, ``flock``) is held from ``bind`` until
    the socket file is removed: it says which router owns the path. A second router
    finds it held and refuses to start; a socket file whose lock is free was left by a
    router that died and is replaced; only the holder ever removes the socket file."""

    def __init__(self, path: str, sessions: SessionFactory, policy: CallerPolicy | None) -> None:
        self.path = check_socket_path(path)
        self.sessions = sessions
        self.policy = policy
        self.connections: set[_ServerConnection] = set()
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._idle = asyncio.Event()
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None

    def bind(self) -> None:
        """Take the path (RuntimeError or OSError when it cannot be had), owner-only and
        listening before anything else starts; connections wait until ``start``."""
        self._lock_fd, self._sock = _bind_owner_only(self.path)

    async def start(self) -> None:
        """Accept connections (binding first, if ``bind`` was not called)."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                lambda: _ServerConnection(self), sock=self._sock
            )
        except BaseException:
            self._release()
            raise
        self._sock = None  # the server's now: it closes it
        log.info("router link listening", extra={"path": self.path})

    def stop_listening(self) -> None:
        """No new connections (those open go on; their callers are told to move on)."""
        self.closing = True
        if self._server is not None:
            self._server.close()
            self._server = None
        self._release()

    def _release(self) -> None:
        """Remove the socket file, then give the path up (the lock goes last: no other
        router can have bound the path meanwhile)."""
        if self._lock_fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        if self._sock is not None:  # bound, never served
            self._sock.close()
            self._sock = None
        os.close(self._lock_fd)  # closing the descriptor releases the flock
        self._lock_fd = None

    async def wait_idle(self) -> None:
        """Wait until every connection has closed (bound it with ``asyncio.timeout``)."""
        while self.connections:
            self._idle.clear()
            await self._idle.wait()

    def forget(self, connection: _ServerConnection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            self._idle.set()

    def abort(self) -> None:
        """End every connection still open (their calls are cancelled)."""
        self.stop_listening()
        for connection in list(self.connections):
            connection.abort()


def _bind_owner_only(path_text: str) -> tuple[int, socket.socket]:
    """The path's lock (held) and a listening Unix socket there, mode 0600 before it
    listens. RuntimeError when another router holds the path or it is not a socket."""
    path = Path(path_text)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_fd = os.open(path_text + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another process listens on the router's link socket: {path_text}") from None
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise RuntimeError(f"the router's link socket path exists and is not a socket: {path_text}")
            path.unlink()  # left by a router that died: its lock is free
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path_text)
            # Before listening: no one can connect while the mode is still the umask's.
            os.chmod(path_text, 0o600)
            sock.listen(1024)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
    except BaseException:
        os.close(lock_fd)
        raise
    return lock_fd, sock


def _peer_uid(transport: asyncio.BaseTransport) -> int:
    if not hasattr(socket, "SO_PEERCRED"):  # Linux's; the link is not offered elsewhere
        raise LinkRefused(grpc.StatusCode.UNAVAILABLE, "the local link needs SO_PEERCRED (Linux)")
    sock = transport.get_extra_info("socket")
    _pid, uid, _gid = _PEER_CREDENTIALS.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEER_CREDENTIALS.size)
    )
    return int(uid)


class LinkRefused(Exception):
    """The router refused the link (its welcome's status), or it could not be opened."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _ClientConnection(asyncio.Protocol):
    """The edge's end of one link connection: the welcome, then batches to ``on_batch``;
    ``on_end`` once it is closed (with the reason, None for an orderly close)."""

    def __init__(
        self,
        on_batch: Callable[[router_pb2.TunnelBatch], None],
        on_end: Callable[[BaseException | None], None],
    ) -> None:
        self._on_batch = on_batch
        self._on_end = on_end
        self._buffer = FrameBuffer(MAX_HANDSHAKE_BYTES)
        self.welcome: asyncio.Future[router_pb2.TunnelWelcome] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._failure: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            for message in self._buffer.feed(data):
                if not self.welcome.done():
                    self.welcome.set_result(router_pb2.TunnelWelcome.FromString(message))
                    self._buffer.limit = MAX_ROUTER_MESSAGE_BYTES
                else:
                    self._on_batch(router_pb2.TunnelBatch.FromString(message))
        except Exception as error:  # over the bound, or not a message of ours
            self._failure = error
            log.warning("router link: a message that does not parse or is too large; closing the link")
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        failure = self._failure or exc
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("the router closed the link before its welcome"))
        self._on_end(failure)


async def open_link(
    path: str,
    authorization: str,
    on_batch: Callable[[router_pb2.TunnelBatch], None],
    on_end: Callable[[BaseException | None], None],
) -> asyncio.Transport:
    """Connect to the router's link socket and say hello; the transport once welcomed.
    Raises LinkRefused (the router's status, or UNAVAILABLE when it cannot be reached).
    ``on_end`` is called once the connection ends, also when this raises after the
    connection was made. Bounded by ``WELCOME_TIMEOUT_SECONDS``. The listening process
    must run as this process's user (``SO_PEERCRED``)."""
    loop = asyncio.get_running_loop()
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(WELCOME_TIMEOUT_SECONDS):
            transport, protocol = await loop.create_unix_connection(lambda: _ClientConnection(on_batch, on_end), path)
            # The token goes only to a process of this user (the router): anyone who
            # could bind the path while the router restarts is refused here.
            peer_uid = _peer_uid(transport)
            if peer_uid != os.getuid():
                raise LinkRefused(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the process listening on the router's link runs as uid {peer_uid}, not this one's",
                )
            transport.write(encode(router_pb2.TunnelHello(authorization=authorization)))
            welcome = await protocol.welcome
    except (OSError, TimeoutError) as error:
        if transport is not None:
            transport.abort()
        raise LinkRefused(grpc.StatusCode.UNAVAILABLE, f"the router's link cannot be reached: {error!r}") from error
    except BaseException:  # LinkRefused above, a cancellation
        if transport is not None:
            transport.abort()
        raise
    if welcome.code != 0:
        transport.abort()
        raise LinkRefused(status_of(welcome.code), welcome.message or "the router refused the link")
    return transport
