"""The local link's LinkWriter on a real socket pair: the first frame of a turn of the
event loop is on the wire before the turn ends; the frames sent after it in the same
turn follow together, as one message, in order."""

from __future__ import annotations

import asyncio
import socket

from hoosh.router.v1 import router_pb2
from hoosh_common.link import FrameBuffer, LinkWriter


def _frame(call_id: int) -> router_pb2.TunnelFrame:
    return router_pb2.TunnelFrame(call_id=call_id)


def _read(sock: socket.socket, buffer: FrameBuffer) -> list[list[int]]:
    """Every whole message waiting on ``sock``, each as its frames' call ids."""
    messages = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return messages
        for message in buffer.feed(data):
            batch = router_pb2.TunnelBatch.FromString(message)
            messages.append([frame.call_id for frame in batch.frames])


async def test_the_first_frame_of_a_turn_leaves_at_once_and_the_rest_follow_in_one_message() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, ours)
    try:
        writer = LinkWriter(transport)  # type: ignore[arg-type]
        buffer = FrameBuffer(1 << 20)
        writer.send(_frame(1))
        assert _read(theirs, buffer) == [[1]]  # written inside send: no turn of the loop passed
        writer.send(_frame(2))
        writer.send(_frame(3))
        assert _read(theirs, buffer) == []  # the turn's later frames wait for its end...
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert _read(theirs, buffer) == [[2, 3]]  # ...and leave together
        writer.send(_frame(4))  # a new turn: at once again
        assert _read(theirs, buffer) == [[4]]
    finally:
        transport.close()
        theirs.close()


async def test_frames_sent_before_the_connection_is_attached_keep_their_order() -> None:
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, ours)
    try:
        writer = LinkWriter()
        buffer = FrameBuffer(1 << 20)
        writer.send(_frame(1))
        writer.send(_frame(2))
        writer.attach(transport)  # type: ignore[arg-type]
        writer.send(_frame(3))  # after the waiting ones, not before them
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert [call for message in _read(theirs, buffer) for call in message] == [1, 2, 3]
    finally:
        transport.close()
        theirs.close()
