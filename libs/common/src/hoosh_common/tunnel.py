"""Frames of the router's Tunnel stream (``hoosh.router.v1.RouterService/Tunnel``), the
part both ends share: the writer that coalesces frames into batches, and the mapping
between a failed call and its error frame.

Why a tunnel: a unary grpc.aio call costs a few hundred microseconds of CPU on each side
(call objects, metadata, the completion queue round trips of a whole RPC); a message on
an open stream costs about half of that, and messages queued while one is on the wire
go out together in the next, so under load a frame costs a few tens of microseconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

import grpc
from hoosh.router.v1 import router_pb2

log = logging.getLogger(__name__)

# A batch holds frames up to this many bytes (one bigger frame goes alone); far below
# the channel's message limit, so a batch never exceeds it.
MAX_BATCH_BYTES = 1 << 20
# A call whose request is bigger than this does not ride the tunnel (the edge sends it
# as its own unary call): one hostile prompt cannot make a message the stream refuses.
MAX_TUNNEL_REQUEST_BYTES = 256 * 1024
# Calls one stream may have open at once: the router refuses more (UNAVAILABLE), the
# edge sends them as unary calls before reaching it.
MAX_OPEN_CALLS = 4096

TUNNEL_METHOD = "/hoosh.router.v1.RouterService/Tunnel"
# Frame 0's ``draining``: from the router, "open a new stream for new calls"; on the
# local link, from the edge too, "no more calls here" (hoosh_common.link).
DRAINING = router_pb2.TunnelFrame(call_id=0)
DRAINING.draining.SetInParent()

_STATUS_BY_VALUE = {status.value[0]: status for status in grpc.StatusCode}


def next_batch(queue: deque[router_pb2.TunnelFrame]) -> router_pb2.TunnelBatch:
    """The frames at the head of ``queue`` (taken from it) as one batch: up to
    MAX_BATCH_BYTES, or one bigger frame alone."""
    batch = router_pb2.TunnelBatch()
    size = 0
    while queue:
        frame_size = queue[0].ByteSize()
        if batch.frames and size + frame_size > MAX_BATCH_BYTES:
            break
        batch.frames.append(queue.popleft())
        size += frame_size
    return batch


class FrameSink(Protocol):
    """Where one tunnel's outgoing frames go: a :class:`FrameWriter` on a gRPC stream,
    or a ``hoosh_common.link.LinkWriter`` on a link connection."""

    def send(self, frame: router_pb2.TunnelFrame) -> None: ...

    async def flush(self) -> None: ...

    def close(self) -> None: ...


class FrameWriter:
    """Writes one stream's frames from one task (grpc.aio allows one write at a time):
    every frame queued while a write is in flight goes in the next batch."""

    def __init__(self, write: Callable[[router_pb2.TunnelBatch], Awaitable[None]], *, name: str) -> None:
        self._write = write
        self._queue: deque[router_pb2.TunnelFrame] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # nothing queued, nothing being written
        self._idle.set()
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=name)

    def send(self, frame: router_pb2.TunnelFrame) -> None:
        if self._closed:
            return
        self._queue.append(frame)
        self._idle.clear()
        self._wake.set()

    async def flush(self) -> None:
        """Wait until every frame queued so far is written (or the writer stopped)."""
        if self._idle.is_set() or self._task.done():
            return
        idle = asyncio.ensure_future(self._idle.wait())
        try:
            await asyncio.wait({idle, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()

    def close(self) -> None:
        """Stop writing (what is queued is dropped)."""
        self._closed = True
        self._queue.clear()
        self._task.cancel()

    async def _run(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    await self._write(next_batch(self._queue))
                self._idle.set()
        except Exception:  # the stream broke: its reader sees the same and ends the calls
            self._closed = True
            self._queue.clear()
            log.debug("tunnel write failed", exc_info=True)


def error_frame(
    call_id: int, status: grpc.StatusCode, message: str, trailing: Iterable[tuple[str, str]] = ()
) -> router_pb2.TunnelFrame:
    frame = router_pb2.TunnelFrame(call_id=call_id)
    frame.error.code = status.value[0]
    frame.error.message = message
    for key, value in trailing:
        frame.error.trailing_metadata.add(key=key, value=value)
    return frame


def status_of(code: int) -> grpc.StatusCode:
    """The status a frame's code names (UNKNOWN for a number gRPC does not define)."""
    return _STATUS_BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)


def metadata_pairs(entries: Iterable[router_pb2.MetadataEntry]) -> tuple[tuple[str, str], ...]:
    return tuple((entry.key, entry.value) for entry in entries)
