"""Connection bounds through the real server: uvicorn (httptools) on a loopback port with
the edge's protocol (server.py), raw sockets for the hostile clients, httpx for the
normal one; router, budget and audit are the real services in-process (conftest's
``stack``): what reached the router is read off its event stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import orjson
import pytest
import uvicorn
from hoosh_edge.app import create_app
from hoosh_edge.config import Settings
from hoosh_edge.server import uvicorn_options

from .conftest import REPLY, Stack, free_port
from .test_edge_app import CHAT, USER

HOST = "127.0.0.1"
HEADER_TIMEOUT = 1.5
SLOW_CLIENTS = 200

Serve = Callable[..., Awaitable[int]]


@pytest.fixture
async def serve(make_settings: Callable[..., Settings], stack: Stack) -> AsyncIterator[Serve]:
    """Start the edge under a real uvicorn with the given setting overrides; returns its port."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(**overrides: object) -> int:
        settings = make_settings(**{**stack.addresses(), **overrides})
        port = free_port()
        config = uvicorn.Config(
            create_app(settings),
            host=HOST,
            port=port,
            loop="none",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            **uvicorn_options(settings),
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        servers.append((server, task))
        return port

    yield start
    for server, task in servers:
        server.should_exit = True
        await task


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed the connection."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


async def trickle_headers(port: int, gone: list[float], started: asyncio.Event) -> float:
    """Open a connection, send a partial request, then one header byte every 0.2 s until the
    server closes it; the seconds it stayed open."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(HOST, port)
    opened = loop.time()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\ncontent-type: application/json\r\nx-slow: ")
    closed = asyncio.ensure_future(closed_by_server(reader))
    started.set()
    try:
        while not closed.done():
            writer.write(b"a")
            await asyncio.wait({closed}, timeout=0.2)
        gone.append(loop.time())
        return loop.time() - opened
    finally:
        writer.close()


async def test_slow_header_clients_are_dropped_while_a_chat_is_served(serve: Serve, stack: Stack) -> None:
    port = await serve(edge_header_timeout_seconds=HEADER_TIMEOUT)
    gone: list[float] = []
    started = [asyncio.Event() for _ in range(SLOW_CLIENTS)]
    slow = [asyncio.create_task(trickle_headers(port, gone, event)) for event in started]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), 10)

    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=10) as client:
        response = await client.post(CHAT, json={"model": "gpt-4o-mini", "messages": [USER]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == REPLY
    assert not gone, "the chat was served while every slow client was still connected"

    lifetimes = await asyncio.wait_for(asyncio.gather(*slow), HEADER_TIMEOUT + 20)
    assert len(lifetimes) == SLOW_CLIENTS
    # Each kept sending bytes, and each was dropped at its header deadline, not before.
    assert min(lifetimes) >= HEADER_TIMEOUT - 0.2, min(lifetimes)
    assert max(lifetimes) <= HEADER_TIMEOUT + 5, max(lifetimes)
    # None of the slow requests reached the router: it saw one request, the chat.
    assert [name for name, _ in await stack.router_events()] == ["inference.completed"]


async def test_a_silent_connection_is_dropped_at_the_header_deadline(serve: Serve) -> None:
    port = await serve(edge_header_timeout_seconds=0.5)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        assert await asyncio.wait_for(closed_by_server(reader), 5) == b""
    finally:
        writer.close()


async def test_blank_lines_do_not_keep_a_connection_open(serve: Serve) -> None:
    port = await serve(edge_header_timeout_seconds=0.5, edge_keep_alive_timeout_seconds=0.5)
    reader, writer = await asyncio.open_connection(HOST, port)
    closed = asyncio.ensure_future(closed_by_server(reader))
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nhost: edge\r\n\r\n")  # one request, kept alive
        for _ in range(20):
            if closed.done():
                break
            writer.write(b"\r\n")
            await asyncio.wait({closed}, timeout=0.2)
        assert closed.done(), "a client sending only blank lines kept its connection"
        assert (await closed).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_a_slow_body_is_dropped_and_reaches_nothing(serve: Serve, stack: Stack) -> None:
    port = await serve(edge_body_timeout_seconds=0.5)
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [USER]})
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: edge\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body[:10])
        )
        assert await asyncio.wait_for(closed_by_server(reader), 5) == b""
    finally:
        writer.close()
    assert await stack.router_events() == [] and stack.upstream_requests() == 0


async def test_kept_alive_requests_each_get_the_header_deadline(serve: Serve) -> None:
    port = await serve(edge_header_timeout_seconds=1.0, edge_keep_alive_timeout_seconds=5.0)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as client:
        for _ in range(3):  # one connection, reused after more than a header timeout
            assert (await client.get("/v1/health")).status_code == 200
            await asyncio.sleep(0.3)


async def test_connections_over_the_bound_get_503(serve: Serve) -> None:
    port = await serve(edge_max_connections=3, edge_header_timeout_seconds=5.0)
    held = [await asyncio.open_connection(HOST, port) for _ in range(3)]
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        answer = await asyncio.wait_for(closed_by_server(reader), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert b"retry-after: 1" in head.lower()
    assert orjson.loads(body)["error"]["code"] == "server_busy"
    for _, held_writer in held:
        held_writer.close()
    await asyncio.sleep(0.1)
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as client:  # room again
        assert (await client.get("/v1/health")).status_code == 200


async def test_oversized_headers_get_431(serve: Serve) -> None:
    port = await serve(edge_max_header_bytes=4096)
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"GET /v1/health HTTP/1.1\r\nhost: edge\r\n" + b"x-big: " + b"a" * 8192 + b"\r\n\r\n")
        answer = await asyncio.wait_for(closed_by_server(reader), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), answer
    assert orjson.loads(body)["error"]["code"] == "request_headers_too_large"


async def test_malformed_http_gets_the_envelope(serve: Serve) -> None:
    port = await serve()
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        answer = await asyncio.wait_for(closed_by_server(reader), 5)
    finally:
        with contextlib.suppress(Exception):
            writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"
