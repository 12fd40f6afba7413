"""A backend stream read by a task of its own, so that the client leaving can never cut
the upstream read.

A cancellation that passes through an async generator finishes it: were the request's
own task reading the backend stream, a client hanging up while the router waits for the
next piece would close the upstream connection, and the provider's usage — sent only at
the end — would never be seen, though the provider goes on generating and bills it
(hidden reasoning included). Here a pump task reads the stream into a small queue; the
request reads the queue. When the client leaves, whatever is left can still be drained
(``drain``) for the provider's own usage, within a bound, in the background. The cost on
the hot path is one task per stream and one queue hand-off per piece.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from .backends.base import StreamPiece

# Pieces read ahead of the consumer: enough to hide the hand-off, small enough that a
# client that reads slowly still slows the upstream read (back-pressure) instead of
# piling the answer up in memory.
QUEUE_PIECES = 64


@dataclass(slots=True, frozen=True)
class _End:
    error: BaseException | None


class UpstreamStream:
    """One backend stream, read by its own task; iterate it for its pieces."""

    __slots__ = ("_end", "_head", "_queue", "_task", "bills_when_left")

    def __init__(self, stream: AsyncIterator[StreamPiece], *, bills_when_left: bool) -> None:
        # Whether the provider keeps generating (and billing) after hoosh hangs up, so a
        # stream the client left should be drained rather than cut.
        self.bills_when_left = bills_when_left
        self._queue: asyncio.Queue[StreamPiece | _End] = asyncio.Queue(QUEUE_PIECES)
        self._head: deque[StreamPiece] = deque()  # read ahead by start()
        self._end: _End | None = None
        self._task = asyncio.ensure_future(self._pump(stream))
        self._task.add_done_callback(_retrieve)

    async def _pump(self, stream: AsyncIterator[StreamPiece]) -> None:
        try:
            async for piece in stream:
                await self._queue.put(piece)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the stream's failure goes to whoever reads it
            await self._queue.put(_End(error))
        else:
            await self._queue.put(_End(None))
        finally:
            if isinstance(stream, AsyncGenerator):
                await stream.aclose()  # cancelled while it waited on the queue: close it here

    async def start(self) -> None:
        """Read ahead up to the first piece that reaches the client (or the end).

        Failures until then raise here, as ordinary attempt failures (retried, failed
        over); a cancellation leaves the stream running (the caller closes or drains it).
        """
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                self._end = item
                if item.error is not None:
                    raise item.error
                return
            self._head.append(item)
            if item.content is not None or item.tool_calls:
                return

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __anext__(self) -> StreamPiece:
        if self._head:
            return self._head.popleft()
        if self._end is None:
            item = await self._queue.get()  # cancellation-safe: no piece is lost
            if not isinstance(item, _End):
                return item
            self._end = item
            if item.error is not None:
                raise item.error
        raise StopAsyncIteration

    @property
    def ended(self) -> bool:
        """The stream's end (or failure) has been read."""
        return self._end is not None

    async def drain(self, take: Callable[[StreamPiece], bool], seconds: float, max_pieces: int) -> bool:
        """Read what is left into ``take`` for at most ``seconds`` and ``max_pieces``
        pieces for which ``take`` answers True (those that carry generated tokens); out
        of time, what has already arrived is still taken.

        True when the stream reached its end; False when it failed, or a bound ran out
        first. Closes the stream either way."""
        try:
            return await self._drain(take, seconds, max_pieces)
        finally:
            await self.close()

    async def _drain(self, take: Callable[[StreamPiece], bool], seconds: float, max_pieces: int) -> bool:
        taken = 0
        if seconds > 0:
            try:
                async with asyncio.timeout(seconds):
                    async for piece in self:
                        if take(piece):
                            taken += 1
                            if taken > max_pieces:
                                return False  # more than it was granted: stop paying for the read
                    return True
            except TimeoutError:
                pass
            except Exception:  # the stream's own failure
                return False
        try:
            while (arrived := self._arrived()) is not None:
                take(arrived)
        except Exception:
            return False
        return self._end is not None and self._end.error is None

    def _arrived(self) -> StreamPiece | None:
        """The next piece already read, without waiting; None when there is none (or at the end)."""
        if self._head:
            return self._head.popleft()
        if self._end is None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not isinstance(item, _End):
                return item
            self._end = item
            if item.error is not None:
                raise item.error
        return None

    async def close(self) -> None:
        """Stop reading and wait until the upstream call is closed (the pump's
        cancellation closes it); idempotent. A cancellation of the caller meanwhile
        still propagates (the pump then finishes on its own)."""
        self.close_soon()
        await asyncio.wait({self._task})

    def close_soon(self) -> None:
        """Stop reading without waiting (the pump finishes on its own)."""
        if not self._task.done():
            self._task.cancel()


def _retrieve(task: asyncio.Future[None]) -> None:
    """A pump that failed while closing has nobody left to tell: mark it seen."""
    if not task.cancelled():
        task.exception()
