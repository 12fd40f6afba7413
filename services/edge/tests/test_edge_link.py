"""The router's local link (``hoosh_common.link``) end to end: the real edge app against
the real router servicer (conftest's in-process ``stack``) serving a real
:class:`~hoosh_common.link.LinkServer` on a Unix socket, beside its gRPC server.

Which path a call took: the link server's open connections, and the router's gRPC
server metrics (a ``Tunnel`` stream or a unary ``Chat``), which must not move while
the link carries the calls. Each answer is compared with an edge that makes unary
calls on the same stack: the link must not change what a client sees.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import stat
import struct
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from hoosh.router.v1 import router_pb2
from hoosh_common import link
from hoosh_common.internal_auth import CallerPolicy, token_digest
from hoosh_edge import tunnel as edge_tunnel
from hoosh_edge.config import Settings
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from .conftest import REPLY, Edge, MakeEdge, Stack, eventually
from .test_edge_app import CHAT, assert_envelope
from .test_edge_tunnel import (
    RouterCalls,
    chat_body,
    open_calls,
    reaches_provider,
    router_records_the_cancel,
    slow,
    tunnel_of,
    without_ids,
)

EDGE_TOKEN = "edge-token-for-the-link-tests-0123456789"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory short enough for a Unix socket path (pytest's tmp_path may not be)."""
    directory = Path(tempfile.mkdtemp(prefix="hoosh-link-", dir="/tmp"))
    yield directory
    for child in directory.iterdir():
        child.unlink()
    directory.rmdir()


@dataclass
class LinkRig:
    stack: Stack
    servicer: Any
    path: str
    server: link.LinkServer
    edge: Edge  # tunnel on, the link at ``path``
    unary: Edge  # every call its own unary call

    async def serve_again(self, policy: CallerPolicy | None = None) -> link.LinkServer:
        self.server = link.LinkServer(self.path, self.servicer.open_session, policy)
        await self.server.start()
        return self.server


@pytest.fixture
async def rig(
    router_servicers: list[Any], stack: Stack, make_edge: MakeEdge, socket_dir: Path
) -> AsyncIterator[LinkRig]:
    [servicer] = router_servicers
    path = str(socket_dir / "router.sock")
    server = link.LinkServer(path, servicer.open_session, None)
    await server.start()
    edge = await make_edge(router_link_socket=path, **stack.addresses())
    unary = await make_edge(edge_router_tunnel=False, **stack.addresses())
    running = LinkRig(stack, servicer, path, server, edge, unary)
    yield running
    running.server.abort()


async def on_link(edge: Edge, count: int = 1) -> list[Any]:
    """``count`` chats through ``edge``, each answered 200 with the provider's reply."""
    responses = []
    for _ in range(count):
        response = await edge.client.post(CHAT, json=chat_body())
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == REPLY
        responses.append(response)
    return responses


# --------------------------------------------------------------------------- the path and the answer


async def test_a_blocking_chat_goes_over_the_link_and_answers_as_a_unary_call(rig: LinkRig) -> None:
    tunnel = tunnel_of(rig.edge)
    calls = RouterCalls()
    [via_link] = await on_link(rig.edge)
    assert calls.since() == {"Tunnel": 0, "Chat": 0, "Respond": 0}  # no gRPC call at all
    assert len(rig.server.connections) == 1
    [stream] = tunnel._streams
    assert isinstance(stream, edge_tunnel._LinkStream) and stream.accepting and not stream.pending

    via_unary = await rig.unary.client.post(CHAT, json=chat_body())
    assert via_unary.status_code == 200
    assert without_ids(via_link.json()) == without_ids(via_unary.json())
    for header in ("x-hoosh-cache", "x-hoosh-cost-usd-micros", "content-type"):
        assert via_link.headers.get(header) == via_unary.headers.get(header), header

    # The next calls ride the same connection.
    calls = RouterCalls()
    await on_link(rig.edge, 3)
    assert calls.since() == {"Tunnel": 0, "Chat": 0, "Respond": 0}
    assert tunnel._streams == {stream} and len(rig.server.connections) == 1
    events = await rig.stack.router_events()
    assert [name for name, _ in events] == ["inference.completed"] * 5


async def test_a_blocking_response_goes_over_the_link_as_respond(rig: LinkRig) -> None:
    body = {"model": "gpt-4o-mini", "input": "Say hello", "store": False}
    calls = RouterCalls()
    via_link = await rig.edge.client.post("/v1/responses", json=body)
    assert via_link.status_code == 200, via_link.text
    assert calls.since() == {"Tunnel": 0, "Chat": 0, "Respond": 0}
    via_unary = await rig.unary.client.post("/v1/responses", json=body)
    assert via_link.json()["usage"] == via_unary.json()["usage"]
    assert via_link.json()["status"] == via_unary.json()["status"] == "completed"


async def test_many_concurrent_chats_on_one_connection_each_get_their_own_answer(rig: LinkRig) -> None:
    """Request i has i + 1 words (the stand-in counts them, plus 4, as prompt tokens) and
    asks for (i % 7) + 1 tokens: each answer must be its own request's."""
    count = 48
    with slow(rig.stack.upstream, 0.2):  # they overlap on the connection
        responses = await asyncio.gather(
            *(
                rig.edge.client.post(CHAT, json=chat_body(" ".join(["word"] * (i + 1)), max_tokens=i % 7 + 1))
                for i in range(count)
            )
        )
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (i + 5, i % 7 + 1), i
    assert len(rig.server.connections) == 1
    assert open_calls(tunnel_of(rig.edge)) == 0


@pytest.mark.parametrize("model", ["no-such-model", "gpt-4o-mini"])
async def test_the_routers_errors_are_the_same_over_the_link(rig: LinkRig, model: str) -> None:
    body = chat_body(model=model)
    if model == "gpt-4o-mini":
        body["pool"] = "no-such-pool"
    via_link = await rig.edge.client.post(CHAT, json=body)
    via_unary = await rig.unary.client.post(CHAT, json=body)
    assert via_link.status_code == via_unary.status_code >= 400
    assert_envelope(via_link, via_link.status_code, param=via_unary.json()["error"]["param"])
    assert via_link.json() == via_unary.json()
    assert len(rig.server.connections) == 1  # the connection outlives its calls' errors
    await on_link(rig.edge)


async def test_a_cancelled_request_cancels_the_router_call_over_the_link(rig: LinkRig) -> None:
    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream):
        request = asyncio.create_task(rig.edge.client.post(CHAT, json=chat_body()))
        await reaches_provider(rig.stack, before)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await router_records_the_cancel(rig.stack)
    assert (await rig.stack.pool("default")).reserved == 0
    assert open_calls(tunnel_of(rig.edge)) == 0


async def test_the_edges_deadline_ends_a_call_over_the_link(rig: LinkRig, make_edge: MakeEdge) -> None:
    edge = await make_edge(router_link_socket=rig.path, edge_request_timeout_seconds=0.5, **rig.stack.addresses())
    with slow(rig.stack.upstream):
        response = await edge.client.post(CHAT, json=chat_body())
    assert response.status_code == 504, response.text
    await router_records_the_cancel(rig.stack)
    assert (await rig.stack.pool("default")).reserved == 0


# --------------------------------------------------------------------------- when the link is not there


async def test_without_a_link_the_calls_go_over_a_grpc_stream(rig: LinkRig, make_edge: MakeEdge) -> None:
    edge = await make_edge(router_link_socket=rig.path + ".absent", **rig.stack.addresses())
    calls = RouterCalls()
    await on_link(edge)  # its first call: the link failed to open, so it went again as a unary call
    await on_link(edge, 2)  # then a gRPC stream, for LINK_RETRY_SECONDS
    assert calls.since() == {"Tunnel": 1, "Chat": 1, "Respond": 0}
    assert all(isinstance(stream, edge_tunnel._GrpcStream) for stream in tunnel_of(edge)._streams)


async def test_once_the_link_is_back_the_edge_returns_to_it(
    rig: LinkRig, make_edge: MakeEdge, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge_tunnel, "LINK_RETRY_SECONDS", 0.2)
    rig.server.abort()
    calls = RouterCalls()
    await on_link(rig.edge, 2)  # no link: unary (the first), then a gRPC stream
    assert calls.since() == {"Tunnel": 1, "Chat": 1, "Respond": 0}
    await rig.serve_again()
    await asyncio.sleep(0.3)
    calls = RouterCalls()
    await on_link(rig.edge, 2)
    assert calls.since() == {"Tunnel": 0, "Chat": 0, "Respond": 0}
    assert len(rig.server.connections) == 1


async def test_the_token_goes_only_to_a_process_of_the_edges_own_user(
    rig: LinkRig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whoever listens on the path must run as the edge's user (SO_PEERCRED): here the
    edge believes it runs as another uid, so the router (this test's uid) is refused
    before any hello, and the calls are answered over gRPC."""
    real_uid = os.getuid()
    monkeypatch.setattr(link.os, "getuid", lambda: real_uid + 4242)
    calls = RouterCalls()
    await on_link(rig.edge)
    assert calls.since() == {"Tunnel": 0, "Chat": 1, "Respond": 0}
    assert not rig.server.connections
    [warning] = [record for record in caplog.records if "link is not open" in record.getMessage()]
    assert f"uid {real_uid}" in warning.detail  # type: ignore[attr-defined]


async def test_a_listener_that_never_welcomes_costs_the_calls_a_wait_not_an_answer(
    rig: LinkRig, socket_dir: Path
) -> None:
    """Something of the edge's uid accepts on the path and says nothing (a router whose
    loop is stuck): the edge gives up on the welcome and the call goes as a unary call."""
    rig.server.abort()
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(rig.path)
    mute.listen(8)
    try:
        calls = RouterCalls()
        await on_link(rig.edge)
        assert calls.since() == {"Tunnel": 0, "Chat": 1, "Respond": 0}
    finally:
        mute.close()
        os.unlink(rig.path)


async def test_closing_the_edge_gives_link_calls_the_grace_then_ends_them(rig: LinkRig, make_edge: MakeEdge) -> None:
    edge = await make_edge(router_link_socket=rig.path, **rig.stack.addresses())
    clients = edge.app.state.edge.clients
    await on_link(edge)  # the link is open
    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream, 0.5):
        answered = asyncio.create_task(edge.client.post(CHAT, json=chat_body()))
        await reaches_provider(rig.stack, before)
        await clients.close(grace=30)  # returns once the call is answered, not at 30 s
        response = await answered
    assert response.status_code == 200, response.text

    edge = await make_edge(router_link_socket=rig.path, **rig.stack.addresses())
    clients = edge.app.state.edge.clients
    await on_link(edge)
    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream):
        cut = asyncio.create_task(edge.client.post(CHAT, json=chat_body()))
        await reaches_provider(rig.stack, before)
        await clients.close(grace=0.1)  # the grace runs out first: the call is ended
        response = await asyncio.wait_for(cut, 10)
    assert response.status_code == 503, response.text

    async def cancelled() -> bool:  # the router saw its caller go: it cancelled the call
        return any(name == "inference.failed" for name, _ in await rig.stack.bus.events())

    await eventually(cancelled, "the router to cancel the call of the closed edge")
    failed = [event for name, event in await rig.stack.router_events() if name == "inference.failed"]
    assert [event.error_code for event in failed] == ["client_disconnected"]
    assert (await rig.stack.pool("default")).reserved == 0


async def test_a_refused_caller_gets_no_link_and_its_calls_are_answered_over_grpc(
    rig: LinkRig, make_edge: MakeEdge, caplog: pytest.LogCaptureFixture
) -> None:
    rig.server.abort()
    await rig.serve_again(CallerPolicy({token_digest(EDGE_TOKEN): "edge"}))  # the edge presents no token
    calls = RouterCalls()
    await on_link(rig.edge, 2)
    assert calls.since() == {"Tunnel": 1, "Chat": 1, "Respond": 0}
    assert not rig.server.connections
    [warning] = [record for record in caplog.records if "link is not open" in record.getMessage()]
    assert warning.code == "UNAUTHENTICATED"  # type: ignore[attr-defined]
    assert EDGE_TOKEN not in caplog.text


async def test_a_caller_with_the_token_is_welcomed(rig: LinkRig, monkeypatch: pytest.MonkeyPatch) -> None:
    from hoosh_common import internal_auth

    rig.server.abort()
    await rig.serve_again(CallerPolicy({token_digest(EDGE_TOKEN): "edge"}))
    monkeypatch.setattr(internal_auth, "_outgoing", ((internal_auth.AUTHORIZATION, f"Bearer {EDGE_TOKEN}"),))
    calls = RouterCalls()
    await on_link(rig.edge, 2)
    assert calls.since() == {"Tunnel": 0, "Chat": 0, "Respond": 0}
    assert len(rig.server.connections) == 1


async def test_the_link_going_away_fails_the_call_in_flight_and_the_next_call_reconnects(rig: LinkRig) -> None:
    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream):
        in_flight = asyncio.create_task(rig.edge.client.post(CHAT, json=chat_body()))
        await reaches_provider(rig.stack, before)
        rig.server.abort()  # the router's end is gone (its calls are cancelled)
        response = await asyncio.wait_for(in_flight, 10)
    assert response.status_code == 503, response.text
    assert assert_envelope(response, 503)["type"] == "api_error"
    assert open_calls(tunnel_of(rig.edge)) == 0
    assert (await rig.stack.pool("default")).reserved == 0

    await rig.serve_again()
    calls = RouterCalls()
    await on_link(rig.edge)
    assert calls.since() == {"Tunnel": 0, "Chat": 0, "Respond": 0}
    assert len(rig.server.connections) == 1


async def test_a_draining_router_answers_the_call_in_flight_and_the_edge_moves_on(rig: LinkRig) -> None:
    """The router stopping: it drains its tunnels and stops listening; the call in flight
    is answered, the edge half-closes the connection once it is, and its next call
    (the link gone) goes over gRPC."""
    tunnel = tunnel_of(rig.edge)
    await on_link(rig.edge)
    [stream] = tunnel._streams
    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream, 1.0):
        in_flight = asyncio.create_task(rig.edge.client.post(CHAT, json=chat_body()))
        await reaches_provider(rig.stack, before)
        rig.servicer.drain_tunnels()
        rig.server.stop_listening()
        assert not os.path.exists(rig.path)
        response = await asyncio.wait_for(in_flight, 10)
    assert response.status_code == 200, response.text

    async def closed() -> bool:
        return not rig.server.connections and stream not in tunnel._streams

    await eventually(closed, "the edge to close the drained connection")
    calls = RouterCalls()
    await on_link(rig.edge)
    assert calls.since() == {"Tunnel": 0, "Chat": 1, "Respond": 0}  # the link refused: unary, then streams
    rig.servicer._draining = False  # the rest of the stack goes on serving


# --------------------------------------------------------------------------- hostile peers


async def connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_unix_connection(path)


async def closed_by_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """What the server sent before closing (it must close within the test's wait)."""
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_hostile_peers_are_closed_and_the_link_goes_on_serving(
    rig: LinkRig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link, "HELLO_TIMEOUT_SECONDS", 0.3)
    # Garbage where a hello belongs.
    reader, writer = await connect(rig.path)
    writer.write(struct.pack(">I", 5) + b"\xff\xff\xff\xff\xff")
    assert await closed_by_server(reader, writer) == b""
    # A length past the bound: closed before anything that long is read.
    reader, writer = await connect(rig.path)
    writer.write(struct.pack(">I", 1 << 30))
    assert await closed_by_server(reader, writer) == b""
    # Silence: closed once the hello's time is up.
    reader, writer = await connect(rig.path)
    assert await closed_by_server(reader, writer) == b""
    # Welcomed, then a batch over the caller's bound.
    reader, writer = await connect(rig.path)
    writer.write(link.encode(router_pb2.TunnelHello()))
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    assert router_pb2.TunnelWelcome.FromString(await reader.readexactly(size)).code == 0
    writer.write(struct.pack(">I", link.MAX_CALLER_MESSAGE_BYTES + 1))
    assert await closed_by_server(reader, writer) == b""

    async def forgotten() -> bool:
        return not rig.server.connections

    await eventually(forgotten, "the server to forget the closed connections")
    await on_link(rig.edge)  # the real edge is served all along


async def test_connections_beyond_the_bound_are_closed_at_once(rig: LinkRig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(link, "HELLO_TIMEOUT_SECONDS", 60.0)  # only the bound can close one in time
    held = [await connect(rig.path) for _ in range(2)]  # silent, within their hello time

    async def counted() -> bool:
        return len(rig.server.connections) == 2

    await eventually(counted, "the server to count the two connections")
    reader, writer = await connect(rig.path)
    assert await closed_by_server(reader, writer) == b""
    for _, held_writer in held:
        held_writer.close()


async def test_a_wrong_token_is_told_why_and_closed(rig: LinkRig) -> None:
    rig.server.abort()
    await rig.serve_again(CallerPolicy({token_digest(EDGE_TOKEN): "edge"}))
    reader, writer = await connect(rig.path)
    writer.write(link.encode(router_pb2.TunnelHello(authorization="Bearer not-the-token-0123456789")))
    data = await closed_by_server(reader, writer)
    (size,) = struct.unpack_from(">I", data)
    welcome = router_pb2.TunnelWelcome.FromString(data[4 : 4 + size])
    assert welcome.code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    # Frames sent without a welcome are never served.
    reader, writer = await connect(rig.path)
    frame = router_pb2.TunnelFrame(call_id=1)
    frame.call.request.model = "gpt-4o-mini"
    writer.write(link.encode(router_pb2.TunnelBatch(frames=[frame])))
    await closed_by_server(reader, writer)
    assert rig.stack.upstream_requests() == 0


# --------------------------------------------------------------------------- the socket file


async def test_the_socket_is_owner_only_and_a_stale_one_is_replaced(socket_dir: Path) -> None:
    path = str(socket_dir / "r.sock")

    class Nothing:
        def __init__(self, writer: link.LinkWriter) -> None:
            pass

    server = link.LinkServer(path, Nothing, None)  # type: ignore[arg-type]
    await server.start()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # A second router on the same socket: refused while the first listens.
    with pytest.raises(RuntimeError, match="another process listens"):
        await link.LinkServer(path, Nothing, None).start()  # type: ignore[arg-type]
    server.abort()
    assert not os.path.exists(path)
    # The path is free again: a new router takes it, and the stopped one, told to stop
    # again, leaves the new one's socket alone.
    newer = link.LinkServer(path, Nothing, None)  # type: ignore[arg-type]
    await newer.start()
    server.abort()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    newer.abort()
    assert not os.path.exists(path)
    # A socket file left behind by a router that died is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    server = link.LinkServer(path, Nothing, None)  # type: ignore[arg-type]
    await server.start()
    server.abort()
    # Anything but a socket at the path is left alone.
    Path(path).write_text("not a socket")
    with pytest.raises(RuntimeError, match="not a socket"):
        await link.LinkServer(path, Nothing, None).start()  # type: ignore[arg-type]
    assert Path(path).read_text() == "not a socket"


@pytest.mark.parametrize("path", ["relative/router.sock", "/tmp/" + "x" * 120])
def test_a_socket_path_no_socket_can_have_is_refused_by_the_settings(path: str) -> None:
    with pytest.raises(ValidationError, match="link socket"):
        Settings(router_link_socket=path)


# --------------------------------------------------------------------------- framing


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(st.binary(max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=20),
)
def test_framing_survives_any_split_of_the_byte_stream(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(struct.pack(">I", len(message)) + message for message in messages)
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    buffer = link.FrameBuffer(limit=300)
    received: list[bytes] = []
    for start, end in itertools.pairwise(points):
        received.extend(buffer.feed(stream[start:end]))
    assert received == messages


def test_framing_refuses_a_length_over_its_limit() -> None:
    buffer = link.FrameBuffer(limit=10)
    assert buffer.feed(struct.pack(">I", 10)[:3]) == []
    assert buffer.feed(struct.pack(">I", 10)[3:] + b"x" * 10) == [b"x" * 10]
    with pytest.raises(link.MessageTooLarge):
        buffer.feed(struct.pack(">I", 11))
