"""The edge's router tunnel end to end: the real edge app (conftest's ``make_edge``)
against the real router, budget and audit in-process (conftest's ``stack``: the
production servicers on loopback grpc.aio servers, the real Redis and NATS), whose only
provider is the OpenAI-wire stand-in of bench/upstream.py.

Which path a call took is read from the router's own gRPC server metrics
(``grpc_server_started_total``: a ``Tunnel`` bidi stream, or a unary ``Chat`` /
``Respond`` call) and from the edge's RouterTunnel. Each behaviour is compared with an
edge built with ``edge_router_tunnel=False`` (every call its own unary call) on the same
stack: the tunnel must not change what a client sees.

A slow provider is the stand-in with a latency (``slow``): a request already sleeping
in it keeps its latency when the latency is put back to 0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh_common import telemetry
from hoosh_common.grpc_server import SERVER_OPTIONS, new_server
from hoosh_common.metrics import GrpcMetricsInterceptor
from hoosh_edge import tunnel as edge_tunnel
from hoosh_edge.clients import Clients
from hoosh_edge.config import Settings
from hoosh_edge.tunnel import RouterTunnel
from hoosh_metering.pools import PoolSpec
from prometheus_client import REGISTRY

from bench.upstream import REPLY_WORDS, OpenAIUpstream

from .conftest import LATE_TIMEOUT, REPLY, Edge, MakeEdge, Stack, eventually, uvicorn_serving
from .test_edge_app import CHAT, assert_envelope

ROUTER_SERVICE = "hoosh.router.v1.RouterService"
SLOW_SECONDS = 3.0  # a slow provider's latency: far longer than any wait of the test before it answers


# --------------------------------------------------------------------------- helpers


def started(method: str) -> float:
    """RPCs of ``method`` the router's servers have started (this process, every server)."""
    kind = "bidi_stream" if method == "Tunnel" else "unary"
    labels = {"grpc_type": kind, "grpc_service": ROUTER_SERVICE, "grpc_method": method}
    return REGISTRY.get_sample_value("grpc_server_started_total", labels) or 0.0


def handled(method: str, code: str) -> float:
    kind = "bidi_stream" if method == "Tunnel" else "unary"
    labels = {"grpc_type": kind, "grpc_service": ROUTER_SERVICE, "grpc_method": method, "grpc_code": code}
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0


class RouterCalls:
    """The router's Tunnel streams and unary Chat / Respond calls since it was made."""

    METHODS = ("Tunnel", "Chat", "Respond")

    def __init__(self) -> None:
        self._before = {method: started(method) for method in self.METHODS}

    def since(self) -> dict[str, int]:
        return {method: int(started(method) - self._before[method]) for method in self.METHODS}


def tunnel_of(edge: Edge) -> RouterTunnel:
    tunnel = edge.app.state.edge.clients.tunnel
    assert isinstance(tunnel, RouterTunnel)
    return tunnel


def open_calls(tunnel: RouterTunnel) -> int:
    return sum(len(stream.pending) for stream in tunnel._streams)


@contextlib.contextmanager
def slow(upstream: OpenAIUpstream, seconds: float = SLOW_SECONDS) -> Iterator[None]:
    """The provider answers after ``seconds`` (requests that reach it meanwhile)."""
    upstream.latency = seconds
    try:
        yield
    finally:
        upstream.latency = 0.0


async def reaches_provider(stack: Stack, before: int, count: int = 1) -> None:
    async def arrived() -> bool:
        return stack.upstream_requests() >= before + count

    await eventually(arrived, "the request to reach the provider")


async def router_records_the_cancel(stack: Stack) -> Any:
    """Wait for the router to record a call cancelled by its caller; the one event it
    recorded (checked to be that cancel)."""

    async def cancelled() -> bool:
        return any(name == "inference.failed" for name, _ in await stack.bus.events())

    await eventually(cancelled, "the router to record the cancelled call")
    [(name, event)] = await stack.router_events()
    assert (name, event.error_code) == ("inference.failed", "client_disconnected")
    return event


def chat_body(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


def without_ids(body: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion minus what differs between any two requests (its id, its time)."""
    return {key: value for key, value in body.items() if key not in ("id", "created")}


@dataclass
class Rig:
    stack: Stack
    servicer: Any  # hoosh_router.server.RouterServicer: the one the stack's router serves
    tunnel: Edge  # the default edge: blocking calls on the tunnel
    unary: Edge  # edge_router_tunnel=False: every call its own unary call


@pytest.fixture
async def rig(router_servicers: list[Any], stack: Stack, make_edge: MakeEdge) -> Rig:
    [servicer] = router_servicers  # router_servicers is set up before the stack starts its router
    tunnel = await make_edge(**stack.addresses())
    unary = await make_edge(edge_router_tunnel=False, **stack.addresses())
    assert unary.app.state.edge.clients.tunnel is None
    return Rig(stack, servicer, tunnel, unary)


# --------------------------------------------------------------------------- the path and the answer


async def test_a_blocking_chat_goes_over_the_tunnel_and_answers_as_a_unary_call(rig: Rig) -> None:
    tunnel = tunnel_of(rig.tunnel)
    assert not tunnel._streams  # opened on first use

    calls = RouterCalls()
    via_tunnel = await rig.tunnel.client.post(CHAT, json=chat_body())
    assert via_tunnel.status_code == 200, via_tunnel.text
    assert calls.since() == {"Tunnel": 1, "Chat": 0, "Respond": 0}
    [stream] = tunnel._streams  # still open for the next calls
    assert stream.accepting and not stream.pending

    calls = RouterCalls()
    via_unary = await rig.unary.client.post(CHAT, json=chat_body())
    assert via_unary.status_code == 200, via_unary.text
    assert calls.since() == {"Tunnel": 0, "Chat": 1, "Respond": 0}

    body = via_tunnel.json()
    assert body["choices"][0]["message"]["content"] == REPLY
    assert body["id"] == f"chatcmpl-{via_tunnel.headers['x-request-id']}"
    assert without_ids(body) == without_ids(via_unary.json())
    for header in ("x-hoosh-cache", "x-hoosh-cost-usd-micros", "content-type"):
        assert via_tunnel.headers.get(header) == via_unary.headers.get(header), header

    # The next calls ride the same stream: no new one.
    calls = RouterCalls()
    for _ in range(3):
        assert (await rig.tunnel.client.post(CHAT, json=chat_body())).status_code == 200
    assert calls.since() == {"Tunnel": 0, "Chat": 0, "Respond": 0}
    assert tunnel._streams == {stream}
    assert rig.stack.upstream_requests() == 5


async def test_a_blocking_response_goes_over_the_tunnel_as_respond(rig: Rig) -> None:
    body = {"model": "gpt-4o-mini", "input": "Say hello", "store": False}
    calls = RouterCalls()
    via_tunnel = await rig.tunnel.client.post("/v1/responses", json=body)
    assert via_tunnel.status_code == 200, via_tunnel.text
    assert calls.since() == {"Tunnel": 1, "Chat": 0, "Respond": 0}
    calls = RouterCalls()
    via_unary = await rig.unary.client.post("/v1/responses", json=body)
    assert via_unary.status_code == 200, via_unary.text
    assert calls.since() == {"Tunnel": 0, "Chat": 0, "Respond": 1}

    tunnelled, direct = via_tunnel.json(), via_unary.json()
    assert tunnelled["status"] == direct["status"] == "completed"
    texts = [
        [part["text"] for item in response["output"] for part in item.get("content") or []]
        for response in (tunnelled, direct)
    ]
    assert texts[0] == texts[1] == [REPLY]
    assert tunnelled["usage"] == direct["usage"]


async def test_many_concurrent_chats_each_get_their_own_answer(rig: Rig) -> None:
    """64 chats at once on one stream: request i has i + 1 words (the provider counts them
    as prompt tokens, plus 4) and asks for (i % 7) + 1 tokens (the provider answers that
    many of its words): each answer must be its own request's."""
    count = 64
    tunnel = tunnel_of(rig.tunnel)
    calls = RouterCalls()
    peak = 0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, open_calls(tunnel))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    try:
        with slow(rig.stack.upstream, 0.2):  # they overlap on the stream
            responses = await asyncio.gather(
                *(
                    rig.tunnel.client.post(
                        CHAT, json=chat_body(" ".join(["word"] * (i + 1)), max_tokens=i % 7 + 1, user=f"user-{i}")
                    )
                    for i in range(count)
                )
            )
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    assert calls.since() == {"Tunnel": 1, "Chat": 0, "Respond": 0}
    assert peak > 1  # the calls really were open on the one stream together
    ids = set()
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        body = response.json()
        words = i % 7 + 1
        assert body["usage"]["prompt_tokens"] == i + 1 + 4, i
        assert body["usage"]["completion_tokens"] == words, i
        assert body["choices"][0]["message"]["content"] == "".join(REPLY_WORDS[:words]), i
        assert body["id"] == f"chatcmpl-{response.headers['x-request-id']}"
        ids.add(body["id"])
    assert len(ids) == count
    assert open_calls(tunnel) == 0
    # The router charged each request its own usage: the default pool's use is their sum.
    await rig.stack.router.settled()
    pool = await rig.stack.pool("default")
    expected = sum((i + 1 + 4) + (i % 7 + 1) for i in range(count))
    assert (pool.used, pool.reserved) == (expected, 0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("model", "pool", "status", "code"),
    [
        ("no-such-model", None, 404, "model_not_found"),
        ("gpt-4o", "tiny", 429, "budget_exhausted"),
        ("gpt-4o", "no-such-pool", 400, "pool_not_found"),
        ("mock-fail-429", None, 429, "rate_limit_exceeded"),
        ("mock-fail-400", None, 400, "invalid_request"),
        ("mock-bad-json", None, 502, "upstream_error"),
        ("down-1", None, 503, "upstream_unavailable"),
        ("late-1", None, 504, "upstream_timeout"),
    ],
    ids=["model", "budget", "pool", "provider-429", "provider-400", "bad-json", "down", "timeout"],
)
async def test_the_routers_errors_are_the_same_over_the_tunnel(
    rig: Rig, model: str, pool: str | None, status: int, code: str
) -> None:
    await rig.stack.budget.store.create_pool(PoolSpec("tiny", 3))  # less than any prompt
    body = chat_body(model=model)
    if pool is not None:
        body["pool"] = pool
    calls = RouterCalls()
    via_tunnel = await rig.tunnel.client.post(CHAT, json=body)
    assert calls.since() == {"Tunnel": 1, "Chat": 0, "Respond": 0}
    via_unary = await rig.unary.client.post(CHAT, json=body)
    assert calls.since() == {"Tunnel": 1, "Chat": 1, "Respond": 0}

    param = via_unary.json()["error"]["param"]
    assert_envelope(via_unary, status, param=param)
    error = assert_envelope(via_tunnel, status, param=param)
    assert error["code"] == code
    if code == "upstream_timeout":
        # The router words a provider's timeout by where it struck (connecting, reading):
        # that race is the provider's, not the path's.
        bodies = [response.json()["error"] for response in (via_tunnel, via_unary)]
        assert all(f"{LATE_TIMEOUT:g}s" in body.pop("message") for body in bodies)
        assert bodies[0] == bodies[1]
    else:
        assert via_tunnel.json() == via_unary.json()
    assert via_tunnel.headers.get("retry-after") == via_unary.headers.get("retry-after")
    # Each failure was recorded by the router once, its reservation ended.
    events = await rig.stack.router_events()
    assert [(name, event.error_code) for name, event in events] == [("inference.failed", code)] * 2
    for name in ("default", "tiny"):
        assert (await rig.stack.pool(name)).reserved == 0
    # The stream outlives its calls' errors.
    assert tunnel_of(rig.tunnel)._current is not None
    assert (await rig.tunnel.client.post(CHAT, json=chat_body())).status_code == 200
    assert calls.since()["Tunnel"] == 1


# --------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("path", ["tunnel", "unary"])
async def test_a_client_that_hangs_up_cancels_the_router_call(rig: Rig, path: str) -> None:
    """A real HTTP client (the edge under uvicorn) goes away while the provider is slow:
    the router's call is cancelled (it records client_disconnected and releases the
    reservation at once), on the tunnel as with a unary call."""
    edge = rig.tunnel if path == "tunnel" else rig.unary
    calls = RouterCalls()
    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream):
        async with uvicorn_serving(edge.app) as port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                request = asyncio.create_task(http.post(CHAT, json=chat_body(), timeout=30))
                await reaches_provider(rig.stack, before)
                if path == "tunnel":
                    assert open_calls(tunnel_of(edge)) == 1
                request.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await request

            # Before the provider answers: the router heard of the cancel.
            event = await router_records_the_cancel(rig.stack)
    assert calls.since() == (
        {"Tunnel": 1, "Chat": 0, "Respond": 0} if path == "tunnel" else {"Tunnel": 0, "Chat": 1, "Respond": 0}
    )
    pool = await rig.stack.pool("default")
    assert (pool.used, pool.reserved) == (event.charged_tokens, 0)
    if path == "tunnel":
        assert open_calls(tunnel_of(edge)) == 0


@pytest.mark.parametrize("path", ["tunnel", "unary"])
async def test_a_cancelled_request_task_cancels_the_router_call(rig: Rig, path: str) -> None:
    """The task serving a request is cancelled (not a client disconnect: say the server
    cancels its requests' tasks as it shuts down): the router's call is cancelled too, as
    a grpc.aio unary call is when the task awaiting it is cancelled."""
    edge = rig.tunnel if path == "tunnel" else rig.unary
    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream):
        # The ASGI transport runs the app in the caller's task: cancelling it cancels the app.
        request = asyncio.create_task(edge.client.post(CHAT, json=chat_body()))
        await reaches_provider(rig.stack, before)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await router_records_the_cancel(rig.stack)
    assert (await rig.stack.pool("default")).reserved == 0
    if path == "tunnel":
        assert open_calls(tunnel_of(edge)) == 0


# --------------------------------------------------------------------------- large requests


async def test_a_request_too_large_for_the_tunnel_goes_as_a_unary_call(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge_tunnel, "MAX_TUNNEL_REQUEST_BYTES", 512)
    calls = RouterCalls()
    small = await rig.tunnel.client.post(CHAT, json=chat_body("hi"))
    assert small.status_code == 200, small.text
    assert calls.since() == {"Tunnel": 1, "Chat": 0, "Respond": 0}
    large = await rig.tunnel.client.post(CHAT, json=chat_body(" ".join(["word"] * 200)))
    assert large.status_code == 200, large.text
    assert calls.since() == {"Tunnel": 1, "Chat": 1, "Respond": 0}
    assert large.json()["usage"]["prompt_tokens"] == 200 + 4
    assert large.json()["choices"][0]["message"]["content"] == REPLY
    responses = await rig.tunnel.client.post(
        "/v1/responses", json={"model": "gpt-4o-mini", "input": " ".join(["word"] * 200), "store": False}
    )
    assert responses.status_code == 200, responses.text
    assert calls.since() == {"Tunnel": 1, "Chat": 1, "Respond": 1}


# --------------------------------------------------------------------------- the router going away


async def serve_again(rig: Rig) -> None:
    """A new server for the stack's router servicer on the same port (the router restarted)."""
    host, port = rig.stack.router.address.rsplit(":", 1)
    server = new_server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(rig.servicer, server)
    assert server.add_insecure_port(f"{host}:{port}") == int(port)
    await server.start()
    rig.stack.router.server = server  # the stack's teardown stops this one


async def test_a_call_in_flight_when_the_router_stops_fails_and_later_calls_use_a_new_stream(rig: Rig) -> None:
    tunnel = tunnel_of(rig.tunnel)
    assert (await rig.tunnel.client.post(CHAT, json=chat_body())).status_code == 200
    [old] = tunnel._streams

    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream):
        in_flight = asyncio.create_task(rig.tunnel.client.post(CHAT, json=chat_body()))
        await reaches_provider(rig.stack, before)
        await rig.stack.router.server.stop(None)  # no grace: the router is gone now
        response = await asyncio.wait_for(in_flight, 10)
    error = assert_envelope(response, response.status_code)
    assert 500 <= response.status_code < 600, response.text
    assert error["type"] == "api_error"
    assert old not in tunnel._streams and open_calls(tunnel) == 0

    # Meanwhile (the router down) a call fails at once as unavailable, as a unary one does.
    down = await rig.tunnel.client.post(CHAT, json=chat_body())
    assert assert_envelope(down, 503)["code"] == "service_unavailable"
    assert down.json() == (await rig.unary.client.post(CHAT, json=chat_body())).json()

    await serve_again(rig)
    # Once the edge's channel has reconnected (gRPC's backoff after the failed connects,
    # the same for unary calls), the next calls succeed on a new stream.
    await asyncio.wait_for(rig.tunnel.app.state.edge.clients.channels[0].channel_ready(), 15)
    calls = RouterCalls()
    for _ in range(3):
        response = await rig.tunnel.client.post(CHAT, json=chat_body())
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == REPLY
    assert calls.since() == {"Tunnel": 1, "Chat": 0, "Respond": 0}
    [new] = tunnel._streams
    assert new is not old and new.accepting


async def test_a_router_stopping_gracefully_answers_the_calls_on_the_tunnel(rig: Rig) -> None:
    """As the router stops (``before_stop``: drain its tunnels, then stop with a grace):
    the call in flight is answered, the edge closes the stream once it is, so the stop
    does not wait out its grace."""
    tunnel = tunnel_of(rig.tunnel)
    ended_ok = handled("Tunnel", "OK")
    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream, 1.0):
        in_flight = asyncio.create_task(rig.tunnel.client.post(CHAT, json=chat_body()))
        await reaches_provider(rig.stack, before)
        [stream] = tunnel._streams
        rig.servicer.drain_tunnels()
        stopping = asyncio.ensure_future(rig.stack.router.server.stop(60))
        response = await asyncio.wait_for(in_flight, 10)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == REPLY
        await asyncio.wait_for(stopping, 10)  # long before its 60 s grace
    assert not stream.accepting

    async def ended() -> bool:
        return stream not in tunnel._streams

    await eventually(ended, "the edge to see its stream end")
    assert stream._reader.exception() is None
    assert handled("Tunnel", "OK") - ended_ok == 1  # the edge half-closed it: not cut at the grace
    [(name, _)] = await rig.stack.router_events()
    assert name == "inference.completed"


async def test_a_draining_router_moves_new_calls_to_a_new_stream(rig: Rig) -> None:
    tunnel = tunnel_of(rig.tunnel)
    assert (await rig.tunnel.client.post(CHAT, json=chat_body())).status_code == 200
    [old] = tunnel._streams
    ended_ok = handled("Tunnel", "OK")

    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream, 4.0):  # it outlasts the calls below (the edge gives up at 5 s)
        in_flight = asyncio.create_task(rig.tunnel.client.post(CHAT, json=chat_body("still going")))
        await reaches_provider(rig.stack, before)
    # The provider answers that one in 4 s; the next ones at once.
    assert len(old.pending) == 1

    rig.servicer.drain_tunnels()

    async def retired() -> bool:
        return not old.accepting

    await eventually(retired, "the edge to hear that the router drains")
    assert tunnel._current is None
    assert old in tunnel._streams and len(old.pending) == 1  # open while its call runs

    calls = RouterCalls()
    for _ in range(3):
        response = await rig.tunnel.client.post(CHAT, json=chat_body())
        assert response.status_code == 200, response.text
    # New streams (this router drains each one it is offered too: every call its own).
    assert calls.since()["Tunnel"] >= 1 and calls.since()["Chat"] == 0
    assert len(old.pending) == 1 and not in_flight.done()

    response = await asyncio.wait_for(in_flight, 10)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 2 + 4

    async def closed() -> bool:
        return old not in tunnel._streams and not tunnel._streams

    await eventually(closed, "the drained streams to close")
    # Each ended with OK: the edge half-closed it once its calls were answered.
    assert old._reader.done() and old._reader.exception() is None
    assert handled("Tunnel", "OK") - ended_ok == 1 + calls.since()["Tunnel"]
    assert not rig.servicer._tunnels


# --------------------------------------------------------------------------- timeouts


async def test_the_edges_timeout_is_the_same_over_the_tunnel(rig: Rig, make_edge: MakeEdge) -> None:
    addresses = rig.stack.addresses()
    tunnelled = await make_edge(edge_request_timeout_seconds=0.3, **addresses)
    direct = await make_edge(edge_request_timeout_seconds=0.3, edge_router_tunnel=False, **addresses)
    calls = RouterCalls()
    with slow(rig.stack.upstream):
        via_tunnel, via_unary = await asyncio.gather(
            tunnelled.client.post(CHAT, json=chat_body()), direct.client.post(CHAT, json=chat_body())
        )
    assert calls.since() == {"Tunnel": 1, "Chat": 1, "Respond": 0}
    errors = [assert_envelope(response, 504) for response in (via_tunnel, via_unary)]
    for error in errors:
        # The edge's deadline or the router's (the same one, passed along): which fires first is a race.
        assert error["type"] == "api_error" and error["code"] in ("timeout", "upstream_timeout"), error
    assert via_tunnel.status_code == via_unary.status_code
    assert open_calls(tunnel_of(tunnelled)) == 0
    # The router's calls ended too: nothing stays reserved.
    await rig.stack.router.settled()

    async def released() -> bool:
        return (await rig.stack.pool("default")).reserved == 0

    await eventually(released, "the timed-out calls' reservations to end")


# --------------------------------------------------------------------------- when there is no tunnel


@pytest.mark.parametrize(
    ("enabled", "exporting", "built"),
    [(True, False, True), (True, True, False), (False, False, False)],
    ids=["default", "spans-exported", "turned-off"],
)
async def test_clients_build_a_tunnel_unless_off_or_spans_are_exported(
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
    enabled: bool,
    exporting: bool,
    built: bool,
) -> None:
    monkeypatch.setattr(telemetry, "_exporting", exporting)
    assert telemetry.exporting() is exporting
    clients = Clients.connect(make_settings(edge_router_tunnel=enabled))
    try:
        assert (clients.tunnel is not None) is built
        if built:
            assert isinstance(clients.tunnel, RouterTunnel)
    finally:
        await clients.close()
    if built:
        assert clients.tunnel is not None and clients.tunnel._closed


# --------------------------------------------------------------------------- a router without Tunnel


class _Registered:
    """Stands in for a server to keep the method handlers the generated
    ``add_RouterServiceServicer_to_server`` registers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        assert service == ROUTER_SERVICE
        self.handlers.update(handlers)


class _MethodLog(grpc.aio.ServerInterceptor):
    """Every method a server was asked for, known to it or not (its metrics count only
    the methods it serves)."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation: Any, handler_call_details: grpc.HandlerCallDetails) -> Any:
        self.methods.append(handler_call_details.method.rsplit("/", 1)[-1])
        return await continuation(handler_call_details)

    def taken(self) -> list[str]:
        taken, self.methods = self.methods, []
        return taken


@dataclass
class OlderRouter:
    address: str
    seen: _MethodLog


@pytest.fixture
async def older_router(rig: Rig) -> Any:
    """The stack's RouterServicer served by a router from before Tunnel: the handlers
    the generated code registers, all but Tunnel (an older router, mid-upgrade)."""
    registered = _Registered()
    router_pb2_grpc.add_RouterServiceServicer_to_server(rig.servicer, registered)
    handlers = {name: handler for name, handler in registered.handlers.items() if name != "Tunnel"}
    assert set(registered.handlers) - set(handlers) == {"Tunnel"}
    seen = _MethodLog()
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[seen, GrpcMetricsInterceptor()])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ROUTER_SERVICE, handlers),))
    server.add_registered_method_handlers(ROUTER_SERVICE, handlers)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield OlderRouter(f"127.0.0.1:{port}", seen)
    finally:
        await server.stop(None)


async def test_a_router_without_tunnel_gets_unary_calls_with_the_same_answers(
    rig: Rig, older_router: OlderRouter, make_edge: MakeEdge
) -> None:
    """The first blocking call's stream is refused (UNIMPLEMENTED): the call goes again as
    its unary call, and the edge keeps to unary calls for UNSUPPORTED_BACKOFF_SECONDS."""
    edge = await make_edge(**{**rig.stack.addresses(), "router_addr": older_router.address})
    tunnel = tunnel_of(edge)
    calls = RouterCalls()
    via_older = await edge.client.post(CHAT, json=chat_body())
    assert via_older.status_code == 200, via_older.text
    assert older_router.seen.taken() == ["Tunnel", "Chat"]  # refused, then again as Chat
    assert calls.since() == {"Tunnel": 0, "Chat": 1, "Respond": 0}
    loop = asyncio.get_running_loop()
    assert tunnel._unsupported_until > loop.time() + edge_tunnel.UNSUPPORTED_BACKOFF_SECONDS / 2
    assert not tunnel._streams and tunnel._current is None

    via_unary = await rig.unary.client.post(CHAT, json=chat_body())
    assert via_unary.status_code == 200, via_unary.text
    assert via_older.json()["choices"][0]["message"]["content"] == REPLY
    assert via_older.json()["id"] == f"chatcmpl-{via_older.headers['x-request-id']}"
    assert without_ids(via_older.json()) == without_ids(via_unary.json())
    for header in ("x-hoosh-cache", "x-hoosh-cost-usd-micros", "content-type"):
        assert via_older.headers.get(header) == via_unary.headers.get(header), header

    # Meanwhile: unary calls straight away, Respond for the Responses API.
    body = {"model": "gpt-4o-mini", "input": "Say hello", "store": False}
    calls = RouterCalls()
    responded = await edge.client.post("/v1/responses", json=body)
    assert responded.status_code == 200, responded.text
    assert (await edge.client.post(CHAT, json=chat_body())).status_code == 200
    assert older_router.seen.taken() == ["Respond", "Chat"]
    assert calls.since() == {"Tunnel": 0, "Chat": 1, "Respond": 1}
    assert not tunnel._streams
    direct = await rig.unary.client.post("/v1/responses", json=body)
    assert direct.status_code == 200, direct.text
    tunnelled, unary = responded.json(), direct.json()
    assert tunnelled["status"] == unary["status"] == "completed"
    assert tunnelled["usage"] == unary["usage"]
    assert [part["text"] for item in tunnelled["output"] for part in item.get("content") or []] == [REPLY]

    # Once the backoff is over, the edge asks again (refused again: unary again).
    tunnel._unsupported_until = loop.time()
    responded = await edge.client.post("/v1/responses", json=body)
    assert responded.status_code == 200, responded.text
    assert older_router.seen.taken() == ["Tunnel", "Respond"]
    assert tunnel._unsupported_until > loop.time()
    assert [name for name, _ in await rig.stack.router_events()] == ["inference.completed"] * 6


async def test_calls_open_on_a_refused_stream_all_go_again_as_unary_calls(
    rig: Rig, older_router: OlderRouter, make_edge: MakeEdge
) -> None:
    """Calls started together, before the refusal came, each go again as their own unary
    call; each gets its own answer."""
    edge = await make_edge(**{**rig.stack.addresses(), "router_addr": older_router.address})
    count = 5
    responses = await asyncio.gather(
        *(edge.client.post(CHAT, json=chat_body(" ".join(["word"] * (i + 1)))) for i in range(count))
    )
    for i, response in enumerate(responses):
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == i + 1 + 4
    methods = older_router.seen.taken()
    assert methods.count("Chat") == count and set(methods) == {"Tunnel", "Chat"}
    assert open_calls(tunnel_of(edge)) == 0 and not tunnel_of(edge)._streams


async def test_a_call_cancelled_once_refused_does_not_go_again(rig: Rig, older_router: OlderRouter) -> None:
    """The caller cancels after the refusal came but before its task resumed: the unary
    call is never made."""
    channel = grpc.aio.insecure_channel(older_router.address)
    try:
        tunnel = RouterTunnel(channel)
        made: list[int] = []

        def fallback() -> Any:
            made.append(1)
            raise AssertionError("the cancelled call went again")

        call = tunnel.call(router_pb2.ChatRequest(model="gpt-4o-mini"), (), 10.0, fallback=fallback)
        assert call is not None
        await asyncio.wait_for(asyncio.wait({call._future}), 10)  # refused, not yet awaited
        assert isinstance(call._future.exception(), edge_tunnel.TunnelRefused)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert made == []
    finally:
        await channel.close()


# --------------------------------------------------------------------------- how many calls a stream takes


async def test_a_stream_takes_calls_per_stream_calls_then_a_fresh_one_opens(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge_tunnel, "CALLS_PER_STREAM", 3)
    tunnel = tunnel_of(rig.tunnel)
    ended_ok = handled("Tunnel", "OK")
    streams: list[Any] = []  # every stream the edge opens, in order
    open_stream = tunnel._open

    def recording() -> Any:
        streams.append(open_stream())
        return streams[-1]

    monkeypatch.setattr(tunnel, "_open", recording)
    calls = RouterCalls()
    for i in range(7):
        response = await rig.tunnel.client.post(CHAT, json=chat_body(" ".join(["word"] * (i + 1))))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == i + 1 + 4
    assert calls.since() == {"Tunnel": 3, "Chat": 0, "Respond": 0}
    assert [stream.calls for stream in streams] == [3, 3, 1]
    first, second, last = streams
    assert not first.accepting and not second.accepting
    assert tunnel._current is last and last.accepting

    async def retired() -> bool:
        return tunnel._streams == {last}

    await eventually(retired, "the full streams to close")
    # Each ended OK: the edge half-closed it once its last call was answered.
    for stream in (first, second):
        assert stream._reader.done() and stream._reader.exception() is None

    async def counted() -> bool:
        return handled("Tunnel", "OK") - ended_ok == 2

    await eventually(counted, "the router to count the two streams ended OK")


async def test_the_call_that_fills_a_stream_is_answered_while_the_next_opens_a_new_one(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream is retired at its last call, while that call is still open: the next
    call goes on a new stream, the old one closes once its call is answered."""
    monkeypatch.setattr(edge_tunnel, "CALLS_PER_STREAM", 1)
    tunnel = tunnel_of(rig.tunnel)
    calls = RouterCalls()
    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream, 1.0):
        in_flight = asyncio.create_task(rig.tunnel.client.post(CHAT, json=chat_body("still going")))
        await reaches_provider(rig.stack, before)
    [old] = tunnel._streams
    assert not old.accepting and len(old.pending) == 1 and tunnel._current is None
    response = await rig.tunnel.client.post(CHAT, json=chat_body())
    assert response.status_code == 200, response.text
    assert calls.since() == {"Tunnel": 2, "Chat": 0, "Respond": 0}
    response = await asyncio.wait_for(in_flight, 10)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 2 + 4

    async def closed() -> bool:
        return old not in tunnel._streams

    await eventually(closed, "the full stream to close")
    assert old._reader.exception() is None


# --------------------------------------------------------------------------- open calls on one stream


async def test_a_call_over_max_open_calls_goes_as_a_unary_call(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge_tunnel, "MAX_OPEN_CALLS", 2)
    tunnel = tunnel_of(rig.tunnel)
    calls = RouterCalls()
    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream):
        open_ones = [
            asyncio.create_task(rig.tunnel.client.post(CHAT, json=chat_body(" ".join(["word"] * (i + 1)))))
            for i in range(2)
        ]
        await reaches_provider(rig.stack, before, 2)
        assert open_calls(tunnel) == 2
    # The provider answers the two open ones in SLOW_SECONDS; the next one at once.
    alone = await rig.tunnel.client.post(CHAT, json=chat_body("one two three"))
    assert alone.status_code == 200, alone.text
    assert alone.json()["usage"]["prompt_tokens"] == 3 + 4
    assert alone.json()["choices"][0]["message"]["content"] == REPLY
    assert calls.since() == {"Tunnel": 1, "Chat": 1, "Respond": 0}
    for i, response in enumerate(await asyncio.wait_for(asyncio.gather(*open_ones), 15)):
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["prompt_tokens"] == i + 1 + 4
    # Below the cap again: the tunnel.
    assert (await rig.tunnel.client.post(CHAT, json=chat_body())).status_code == 200
    assert calls.since() == {"Tunnel": 1, "Chat": 1, "Respond": 0}


# --------------------------------------------------------------------------- the edge closing its stream


@pytest.mark.parametrize("how", ["channel-closed", "reader-cancelled"])
async def test_a_stream_the_edge_closes_under_a_call_fails_it_as_unavailable(rig: Rig, how: str) -> None:
    """The edge's own end of the stream goes (its channel closed, its reader cancelled)
    while a call is open: the client gets 503, not 499 (it did not hang up), and the
    router cancels the call."""
    tunnel = tunnel_of(rig.tunnel)
    before = rig.stack.upstream_requests()
    with slow(rig.stack.upstream):
        in_flight = asyncio.create_task(rig.tunnel.client.post(CHAT, json=chat_body()))
        await reaches_provider(rig.stack, before)
        [stream] = tunnel._streams
        assert len(stream.pending) == 1
        if how == "channel-closed":
            await rig.tunnel.app.state.edge.clients.channels[0].close(None)
        else:
            stream._reader.cancel()
        response = await asyncio.wait_for(in_flight, 10)
        error = assert_envelope(response, 503)
        assert (error["type"], error["code"]) == ("api_error", "service_unavailable")
        assert not tunnel._streams and open_calls(tunnel) == 0

        # The router's call is cancelled too (before the provider answers): it is not
        # left running for no one.
        await router_records_the_cancel(rig.stack)
    assert (await rig.stack.pool("default")).reserved == 0
