"""The edge's end of the router's Tunnel stream: blocking Chat / Respond calls as frames
on one long-lived stream per edge worker (see ``hoosh_common.tunnel`` for why).

A :class:`TunnelCall` behaves as the grpc.aio unary call it replaces: awaiting it gives
the ChatResponse or raises ``grpc.aio.AioRpcError`` with the status, details and
trailing metadata the router set (so the edge's error mapping is the same);
``cancel()`` makes the awaiting task see ``CancelledError`` and tells the router to
cancel the call (so does cancelling the task that awaits it); the timeout ends it with
DEADLINE_EXCEEDED and cancels it at the router.

The stream opens on first use. When it breaks (the router went away), every call open
on it fails as a unary call would (UNAVAILABLE, or the stream's status), and the next
call opens a new one. When the router says it is draining (it is stopping), new calls
go on a new stream and the old one is closed once its calls are answered. Calls whose
request is large go as plain unary calls; so do all calls while spans are exported
(the router's per-call server span comes from its gRPC interceptor).

Where the router has a local link (``HOOSH_ROUTER_LINK_SOCKET``: an edge on the same
host or in the same pod), the same frames go over its Unix socket instead
(``hoosh_common.link``: no gRPC machinery, ~0.17 ms less per call); when the link
cannot be opened, the calls waiting on it go again as unary calls and new ones use
Tunnel streams for ``LINK_RETRY_SECONDS``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Generator
from typing import Any

import grpc
from hoosh.router.v1 import router_pb2
from hoosh_common import internal_auth, link
from hoosh_common.link import LinkWriter
from hoosh_common.tunnel import (
    DRAINING,
    MAX_OPEN_CALLS,
    MAX_TUNNEL_REQUEST_BYTES,
    TUNNEL_METHOD,
    FrameSink,
    FrameWriter,
    metadata_pairs,
    status_of,
)

log = logging.getLogger(__name__)

# A stream takes this many calls, then new ones go on a fresh stream: a service mesh
# balancing per HTTP/2 stream spreads the tunnels over router replicas as they come.
CALLS_PER_STREAM = 1000
# How long the edge keeps to unary calls after a router answered that it has no Tunnel.
UNSUPPORTED_BACKOFF_SECONDS = 60.0
# How long the edge keeps to the gRPC channel after the router's link could not be opened.
LINK_RETRY_SECONDS = 5.0

UnaryCall = grpc.aio.UnaryUnaryCall[router_pb2.ChatRequest, router_pb2.ChatResponse]


def _rpc_error(code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, str], ...] = ()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details, None)


class TunnelRefused(grpc.aio.AioRpcError):
    """The router does not serve Tunnel (an older router, mid-upgrade): the call never
    ran there and goes again as a unary call."""


class TunnelCall:
    """One call on a tunnel stream: awaitable, cancellable (see the module docstring)."""

    __slots__ = ("_cancelled", "_fallback", "_future", "_stream", "_unary", "call_id")

    def __init__(
        self,
        stream: _Stream,
        call_id: int,
        future: asyncio.Future[router_pb2.ChatResponse],
        fallback: Callable[[], UnaryCall] | None = None,
    ) -> None:
        self._stream = stream
        self.call_id = call_id
        self._future = future
        self._fallback = fallback
        self._unary: UnaryCall | None = None
        self._cancelled = False

    def __await__(self) -> Generator[Any, None, router_pb2.ChatResponse]:
        return self._result().__await__()

    async def _result(self) -> router_pb2.ChatResponse:
        try:
            return await self._future
        except TunnelRefused:
            if self._fallback is None:
                raise
            if self._cancelled:  # cancelled once refused, before this task resumed
                raise asyncio.CancelledError from None
            self._unary = self._fallback()
            return await self._unary

    def cancel(self) -> bool:
        if self._unary is not None:
            return self._unary.cancel()
        if self._future.done():
            if self._cancelled or self._future.cancelled() or not isinstance(self._future.exception(), TunnelRefused):
                return False
            self._cancelled = True  # refused, not yet sent again as a unary call: it never will be
            return True
        self._future.cancel()
        self._stream.abandon(self.call_id)
        return True

    def _expire(self) -> None:
        if not self._future.done():
            self._future.set_exception(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            self._stream.abandon(self.call_id)


class _Stream:
    """One open tunnel (a Tunnel stream, or a link connection) and the calls waiting on it."""

    def __init__(self, tunnel: RouterTunnel, writer: FrameSink) -> None:
        self._tunnel = tunnel
        self.pending: dict[int, asyncio.Future[router_pb2.ChatResponse]] = {}
        self.calls = 0  # calls started on this stream
        self.accepting = True
        self._closing = False
        self._closer: asyncio.Task[None] | None = None  # held: the loop keeps tasks only weakly
        self._writer = writer

    def send_call(self, call_id: int, frame: router_pb2.TunnelFrame, future: asyncio.Future[Any]) -> None:
        self.pending[call_id] = future
        self._writer.send(frame)

    def abandon(self, call_id: int) -> None:
        """The caller gave up on the call: the router cancels it (its answer is ignored)."""
        if self.pending.pop(call_id, None) is not None:
            frame = router_pb2.TunnelFrame(call_id=call_id)
            frame.cancel.SetInParent()
            self._writer.send(frame)
            self._close_if_done()

    def retire(self) -> None:
        """No new calls here; close the stream once the open ones are answered."""
        self.accepting = False
        self._close_if_done()

    def _close_if_done(self) -> None:
        if not self.accepting and not self.pending and not self._closing:
            self._closing = True
            self._closer = asyncio.get_running_loop().create_task(self._half_close())

    async def _half_close(self) -> None:
        raise NotImplementedError

    def _deliver(self, batch: router_pb2.TunnelBatch) -> None:
        """The router's frames: each answers its call."""
        for frame in batch.frames:
            kind = frame.WhichOneof("kind")
            if kind == "draining":
                self._tunnel.draining(self)
                continue
            future = self.pending.pop(frame.call_id, None)
            if future is None or future.done():
                continue  # abandoned: its answer is not wanted
            if kind == "reply":
                future.set_result(frame.reply)
            elif kind == "error":
                error = frame.error
                trailing = metadata_pairs(error.trailing_metadata)
                future.set_exception(_rpc_error(status_of(error.code), error.message, trailing))
        self._close_if_done()

    def _end(self, failure: grpc.aio.AioRpcError | None) -> None:
        """The stream is over: every call still waiting on it fails with ``failure``."""
        self.accepting = False
        self._writer.close()
        self._tunnel.ended(self)
        if self.pending:
            ending = failure or _rpc_error(grpc.StatusCode.UNAVAILABLE, "The router closed the tunnel")
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ending)
            self.pending.clear()


class _GrpcStream(_Stream):
    """A Tunnel stream on the router's gRPC channel."""

    def __init__(self, tunnel: RouterTunnel, call: Any) -> None:
        super().__init__(tunnel, FrameWriter(call.write, name="edge-tunnel-writer"))
        self._call = call
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="edge-tunnel-reader")

    async def _half_close(self) -> None:
        try:
            await self._writer.flush()
            self._writer.close()
            await self._call.done_writing()
        except Exception:  # the stream is already gone: nothing to close
            log.debug("closing a tunnel stream failed", exc_info=True)

    async def _read(self) -> None:
        failure: grpc.aio.AioRpcError | None = None
        try:
            while True:
                batch = await self._call.read()
                if batch is grpc.aio.EOF:
                    break
                self._deliver(batch)
            status = await self._call.code()
            if status != grpc.StatusCode.OK:
                failure = _rpc_error(status, await self._call.details() or "The router ended the tunnel")
        except grpc.aio.AioRpcError as error:
            failure = error
        except asyncio.CancelledError:
            failure = _rpc_error(grpc.StatusCode.UNAVAILABLE, "The tunnel was closed")
            raise
        except Exception as error:
            log.exception("tunnel stream failed")
            self._call.cancel()  # the router's end of it goes too
            failure = _rpc_error(grpc.StatusCode.UNAVAILABLE, f"The tunnel failed: {type(error).__name__}")
        finally:
            if failure is not None and failure.code() == grpc.StatusCode.UNIMPLEMENTED:
                # An older router: these calls never ran; they go again as unary calls.
                self._tunnel.unsupported()
                failure = TunnelRefused(
                    grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata(), failure.details()
                )
            self._end(failure)


class _LinkStream(_Stream):
    """A connection on the router's local link (``hoosh_common.link``): the same frames
    on a Unix socket the event loop reads itself. Calls sent while it says hello wait;
    if the link cannot be opened they never ran, and go again as unary calls."""

    def __init__(self, tunnel: RouterTunnel, path: str) -> None:
        self._link_writer = LinkWriter()
        super().__init__(tunnel, self._link_writer)
        self._transport: asyncio.Transport | None = None
        self._opener = asyncio.get_running_loop().create_task(self._open(path), name="edge-link-open")

    async def _open(self, path: str) -> None:
        authorization = dict(internal_auth.outgoing_metadata()).get(internal_auth.AUTHORIZATION, "")
        try:
            transport = await link.open_link(path, authorization, self._deliver, self._closed)
        except link.LinkRefused as refused:
            self._refused(refused)
            return
        except asyncio.CancelledError:
            self._end(_rpc_error(grpc.StatusCode.UNAVAILABLE, "The tunnel was closed"))
            raise
        except Exception as error:  # a bug of ours: nothing was sent, the calls go as unary calls
            log.exception("opening the router's link failed")
            self._refused(link.LinkRefused(grpc.StatusCode.UNAVAILABLE, f"opening the link failed: {error!r}"))
            return
        if transport.is_closing():  # it closed right after the welcome: nothing was sent on it
            self._refused(link.LinkRefused(grpc.StatusCode.UNAVAILABLE, "the router closed the link at once"))
            return
        self._tunnel.link_up()
        self._transport = transport
        self._link_writer.attach(transport)
        self._close_if_done()

    def _refused(self, refused: link.LinkRefused) -> None:
        """The link did not open: its calls never ran (they go again as unary calls)."""
        self._tunnel.link_down(refused)
        self._end(TunnelRefused(refused.code, grpc.aio.Metadata(), grpc.aio.Metadata(), refused.message))

    def _closed(self, reason: BaseException | None) -> None:
        if self._transport is None:
            return  # ended while saying hello: ``_open`` answers for it
        failure = None
        if reason is not None:
            failure = _rpc_error(grpc.StatusCode.UNAVAILABLE, f"The router's link failed: {type(reason).__name__}")
        self._end(failure)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # connection_lost ends the calls
        else:
            self._opener.cancel()

    async def _half_close(self) -> None:
        if self._transport is None:  # still saying hello: close once it is open
            try:
                await self._opener
            except BaseException:
                return
            if self._transport is None:
                return
        # No more calls here: the router answers what runs (nothing, by now), then closes.
        self._writer.send(DRAINING)
        await self._writer.flush()
        self._writer.close()


class RouterTunnel:
    """Blocking Chat / Respond calls to the router over Tunnel streams (one at a time
    takes new calls)."""

    def __init__(self, channel: grpc.aio.Channel, *, link_path: str = "") -> None:
        self._link_path = link_path
        self._link_down_until = 0.0  # loop time: gRPC streams only until then
        self._link_warned = False
        self._method = channel.stream_stream(
            TUNNEL_METHOD,
            request_serializer=router_pb2.TunnelBatch.SerializeToString,
            response_deserializer=router_pb2.TunnelBatch.FromString,
        )
        self._current: _Stream | None = None
        self._streams: set[_Stream] = set()
        self._ids = itertools.count(1)
        self._closed = False
        self._unsupported_until = 0.0  # loop time: unary calls only until then

    def call(
        self,
        request: router_pb2.ChatRequest,
        metadata: tuple[tuple[str, str], ...],
        timeout: float | None,
        *,
        respond: bool = False,
        fallback: Callable[[], UnaryCall] | None = None,
    ) -> TunnelCall | None:
        """Start a call; None when this one should go as a unary call instead (see the
        module docstring). ``fallback`` makes the unary call, should the router turn out
        not to serve Tunnel."""
        loop = asyncio.get_running_loop()
        if self._closed or loop.time() < self._unsupported_until or request.ByteSize() > MAX_TUNNEL_REQUEST_BYTES:
            return None
        stream = self._current
        if isinstance(stream, _GrpcStream) and self._link_path and loop.time() >= self._link_down_until:
            stream.retire()  # the link's retry time is up: try it again
            stream = self._current = None
        if stream is None or not stream.accepting:
            stream = self._open()
        if len(stream.pending) >= MAX_OPEN_CALLS:
            return None  # the router refuses more on one stream: this one goes alone
        stream.calls += 1
        if stream.calls >= CALLS_PER_STREAM:
            self._current = None
            stream.retire()  # after this call: the next opens a fresh stream
        call_id = next(self._ids)
        frame = router_pb2.TunnelFrame(call_id=call_id)
        body = frame.call
        body.request.CopyFrom(request)
        body.respond = respond
        for key, value in metadata:
            if key != internal_auth.AUTHORIZATION:  # the stream's own metadata carries the token
                body.metadata.add(key=key, value=value)
        if timeout is not None:
            body.timeout_seconds = timeout
        future: asyncio.Future[router_pb2.ChatResponse] = loop.create_future()
        call = TunnelCall(stream, call_id, future, fallback)
        stream.send_call(call_id, frame, future)
        timer = loop.call_later(timeout, call._expire) if timeout is not None else None

        def done(future: asyncio.Future[router_pb2.ChatResponse]) -> None:
            if timer is not None:
                timer.cancel()
            if future.cancelled():
                # The task awaiting the call was cancelled (or cancel() was called): as
                # with a grpc.aio unary call, the router cancels it too.
                stream.abandon(call_id)

        future.add_done_callback(done)
        return call

    def _open(self) -> _Stream:
        stream: _Stream
        if self._link_path and asyncio.get_running_loop().time() >= self._link_down_until:
            stream = _LinkStream(self, self._link_path)
        else:
            stream = _GrpcStream(self, self._method(metadata=internal_auth.outgoing_metadata()))
        self._current = stream
        self._streams.add(stream)
        return stream

    def unsupported(self) -> None:
        """The router has no Tunnel method (an older one): unary calls for a while."""
        if self._unsupported_until == 0.0:
            log.warning("the router does not serve Tunnel: unary calls for now")
        self._unsupported_until = asyncio.get_running_loop().time() + UNSUPPORTED_BACKOFF_SECONDS

    def link_down(self, refused: link.LinkRefused) -> None:
        """The link could not be opened: Tunnel streams on the channel for a while."""
        if not self._link_warned:
            self._link_warned = True
            log.warning(
                "the router's link is not open: calls go over gRPC for now",
                extra={"code": refused.code.name, "detail": refused.message},
            )
        self._link_down_until = asyncio.get_running_loop().time() + LINK_RETRY_SECONDS

    def link_up(self) -> None:
        if self._link_warned:
            self._link_warned = False
            log.info("the router's link is open again")

    def draining(self, stream: _Stream) -> None:
        if stream is self._current:
            self._current = None
        stream.retire()

    def ended(self, stream: _Stream) -> None:
        self._streams.discard(stream)
        if stream is self._current:
            self._current = None

    async def wait_for_link_calls(self, grace: float | None) -> None:
        """Wait at most ``grace`` seconds (None: not at all) for the calls open on link
        connections (the channel's close waits for the gRPC ones)."""
        pending = {
            future for stream in self._streams if isinstance(stream, _LinkStream) for future in stream.pending.values()
        }
        if grace and pending:
            await asyncio.wait(pending, timeout=grace)

    def abort(self) -> None:
        """End the link connections now (their open calls fail UNAVAILABLE); the
        channel's close ends the gRPC streams."""
        self._closed = True
        self._current = None
        for stream in list(self._streams):
            if isinstance(stream, _LinkStream):
                stream.abort()

    def close(self) -> None:
        """No new calls; each stream closes once its calls are answered (the channel's
        own close, with its grace, bounds how long that may take; ``abort`` then ends
        the link's)."""
        self._closed = True
        self._current = None
        for stream in list(self._streams):
            stream.retire()
