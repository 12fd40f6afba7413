"""The router's end of the Tunnel stream: many blocking Chat / Respond calls on one
long-lived stream from an edge worker (see ``hoosh_common.tunnel`` for why), or on one
connection of the router's local link (``hoosh_common.link``), with the same frames.

Each ``call`` frame runs as its own task, exactly as the unary method would run it
(same request id, trace context, deadline, errors); its answer goes back as one
``reply`` or ``error`` frame. A ``cancel`` frame cancels the task, as a unary call's
cancellation would (the settlement rules of ``chat`` apply). When the caller half-closes
the stream, the calls still running finish and are answered, then the stream ends; when
the stream is cancelled (the caller is gone), every call still running is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from hoosh.router.v1 import router_pb2
from hoosh_common import tunnel
from hoosh_common.metrics import method_metrics
from hoosh_common.tunnel import DRAINING, FrameSink, error_frame, metadata_pairs, status_of

from .errors import RouterError

log = logging.getLogger(__name__)

# Each call is counted, and (while spans are exported) has a SERVER span, as the unary
# call it stands for: dashboards and alerts on the router's Chat / Respond calls see
# every call, tunneled or not (grpc_type "tunneled").
_CHAT_METRICS = method_metrics("tunneled", "/hoosh.router.v1.RouterService/Chat", {"hoosh.tunnel": True})
_RESPOND_METRICS = method_metrics("tunneled", "/hoosh.router.v1.RouterService/Respond", {"hoosh.tunnel": True})

# Calls one stream may have open at once; more are refused (UNAVAILABLE) rather
# than queued without bound.
MAX_OPEN_CALLS = tunnel.MAX_OPEN_CALLS
# A reply bigger than this could not travel in one message (the channel's bound is
# 32 MiB): it fails alone, as a unary call's would, instead of breaking the stream.
MAX_REPLY_BYTES = 32 * 1024 * 1024 - 1024

ServeCall = Callable[[router_pb2.ChatRequest, tuple[tuple[str, str], ...], float | None, bool], Awaitable[Any]]


class TunnelSession:
    """One open Tunnel stream. ``serve(request, metadata, time_remaining, respond)``
    answers one call (a ChatResponse) or raises RouterError."""

    def __init__(self, serve: ServeCall, writer: FrameSink) -> None:
        self._serve = serve
        self._calls: dict[int, asyncio.Task[None]] = {}
        self._left: set[int] = set()  # calls their caller cancelled (a cancel frame)
        self._writer = writer
        self.draining = False
        self.ended = asyncio.get_running_loop().create_future()  # done once finished or aborted

    def drain(self) -> None:
        """Ask the caller to open a new stream for new calls (this process is stopping).
        Calls that arrive meanwhile are still served."""
        if not self.draining:
            self.draining = True
            self._writer.send(DRAINING)

    async def run(self, requests: Any) -> None:
        """Serve a gRPC stream's batches until it ends."""
        try:
            async for batch in requests:
                self.feed(batch)
            # The caller half-closed (or went away: then gRPC cancels this task and the
            # calls are cancelled below). Answer what is still running, then end.
            await self.finish()
        finally:
            self.abort()

    def feed(self, batch: router_pb2.TunnelBatch) -> None:
        """Start or cancel the calls of one batch from the caller."""
        for frame in batch.frames:
            kind = frame.WhichOneof("kind")
            if kind == "call":
                self._start(frame.call_id, frame.call)
            elif kind == "cancel":
                task = self._calls.get(frame.call_id)
                if task is not None:
                    self._left.add(frame.call_id)
                    task.cancel()

    async def finish(self) -> None:
        """The caller wants no more calls: answer those still running."""
        while self._calls:
            await asyncio.wait(set(self._calls.values()))
        await self._writer.flush()

    def abort(self) -> None:
        """The session is over: calls still running are cancelled, nothing more is written."""
        for task in self._calls.values():
            task.cancel()
        self._writer.close()
        if not self.ended.done():
            self.ended.set_result(None)

    def _start(self, call_id: int, call: router_pb2.TunnelCall) -> None:
        if call_id in self._calls:
            self._writer.send(error_frame(call_id, grpc.StatusCode.INVALID_ARGUMENT, "call_id is already open"))
            return
        if len(self._calls) >= MAX_OPEN_CALLS:
            self._writer.send(error_frame(call_id, grpc.StatusCode.UNAVAILABLE, "too many calls open on this tunnel"))
            return
        task = asyncio.get_running_loop().create_task(self._answer(call_id, call))
        self._calls[call_id] = task
        task.add_done_callback(lambda _: self._ended(call_id))

    def _ended(self, call_id: int) -> None:
        self._calls.pop(call_id, None)
        self._left.discard(call_id)

    async def _answer(self, call_id: int, call: router_pb2.TunnelCall) -> None:
        metadata = metadata_pairs(call.metadata)
        counted = _RESPOND_METRICS if call.respond else _CHAT_METRICS
        started = counted.begin()
        # The call's own span, child of the trace context its frame carries (the
        # interceptor's span here is the stream's, no request's); ``serve`` continues it.
        with counted.server_span(metadata) as span:
            try:
                frame = await self._outcome(call_id, call, metadata)
            except asyncio.CancelledError:
                counted.finish("CANCELLED", started, span=span)
                if call_id not in self._left:
                    # Cancelled here, not by its caller (this process stopping): the
                    # caller must not wait for its deadline to learn it.
                    cancelled = error_frame(call_id, grpc.StatusCode.UNAVAILABLE, "The router cancelled the call")
                    self._writer.send(cancelled)
                raise  # a caller that cancelled expects no answer
            code = grpc.StatusCode.OK if frame.HasField("reply") else status_of(frame.error.code)
            counted.finish(code.name, started, span=span)
        self._writer.send(frame)

    async def _outcome(
        self, call_id: int, call: router_pb2.TunnelCall, metadata: tuple[tuple[str, str], ...]
    ) -> router_pb2.TunnelFrame:
        """The call's answer: its reply frame, or its error frame."""
        timeout = call.timeout_seconds if call.timeout_seconds > 0 else None
        try:
            async with asyncio.timeout(timeout):
                reply = await self._serve(call.request, metadata, timeout, call.respond)
        except RouterError as error:
            return error_frame(call_id, error.status, error.message, error.trailing_metadata())
        except TimeoutError:
            return error_frame(call_id, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        except Exception as error:  # (a cancellation is no Exception: it goes on up)
            # What gRPC answers for a unary handler's unexpected exception, without the details.
            log.exception("tunnel call failed", extra={"call_id": call_id})
            return error_frame(call_id, grpc.StatusCode.UNKNOWN, f"Unexpected {type(error).__name__}")
        size = reply.ByteSize()
        if size > MAX_REPLY_BYTES:
            message = f"Received message larger than max ({size} vs. {MAX_REPLY_BYTES})"
            return error_frame(call_id, grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        frame = router_pb2.TunnelFrame(call_id=call_id)
        frame.reply.CopyFrom(reply)
        return frame
