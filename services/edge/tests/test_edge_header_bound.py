"""The header-size bound holds while a header is still arriving: one endless header
value is cut at the bound (431), not buffered until the header deadline."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket

import uvicorn
from hoosh_cli.stack import free_port
from hoosh_edge.server import ConnectionLimits, EdgeHttpToolsProtocol


class CountingProtocol(EdgeHttpToolsProtocol):
    """The edge's protocol, counting the bytes the server took in (what it may hold)."""

    received = 0

    def data_received(self, data: bytes) -> None:
        CountingProtocol.received += len(data)
        super().data_received(data)


async def ok_app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


def send_endless_header(port: int, limit: int) -> tuple[int, bytes]:
    """Bytes the server took before it answered and closed, and what it answered."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        chunk = b"a" * 16384
        try:
            while sent < 64 * limit:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        answer = b""
        with contextlib.suppress(OSError):
            answer = sock.recv(4096)
    return sent, answer


async def test_an_endless_header_is_cut_at_the_bound() -> None:
    limit = 64 * 1024
    port = free_port()
    config = uvicorn.Config(
        ok_app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http=functools.partial(CountingProtocol, limits=ConnectionLimits(max_header_bytes=limit)),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        CountingProtocol.received = 0
        sent, answer = await asyncio.to_thread(send_endless_header, port, limit)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
        # The server stopped reading within one read (<= 256 KiB) of the bound, whatever
        # the client went on sending into the socket buffers.
        assert CountingProtocol.received <= limit + 256 * 1024, (CountingProtocol.received, sent)
        # A normal request on a new connection is still served.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        server.should_exit = True
        await task
