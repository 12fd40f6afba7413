"""Fixtures: the edge app over httpx's ASGI transport, its gRPC channels pointed at a
closed port (a real channel to nothing: every backend call fails as UNAVAILABLE) or at
the real hoosh services running in-process (``stack``: budget, router and audit, and
``stt`` when a test asks for it; see tests/inprocess.py), its key store in the real
Redis under a fresh prefix.

The stack is the production servicers on loopback gRPC servers, on the real Redis
(the test's fresh key prefix) and the real NATS JetStream (a fresh stream per test);
the router's only provider is the OpenAI-wire stand-in of bench/upstream.py, whose
behaviour a model name chooses (``mock-fail-429``, ``mock-stall``, ...).

``make_edge`` runs open auth unless told otherwise (the tests of validation, limits and
mapping do not need keys); the tenancy tests pass ``auth="keys"`` and an admin key."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from hoosh.router.v1 import router_pb2_grpc
from hoosh_edge.app import create_app
from hoosh_edge.auth import Tenancy
from hoosh_edge.clients import Clients
from hoosh_edge.config import Settings
from hoosh_metering.pools import PoolSpec, PoolView
from hoosh_router.config import Catalogue

from bench.upstream import OpenAIUpstream
from tests.inprocess import (
    Bus,
    RunningAudit,
    RunningBudget,
    RunningRouter,
    RunningStt,
    load_stt_engine,
    start_audit,
    start_budget,
    start_router,
    start_stt,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
ADMIN_KEY = "test-admin-key-0123456789abcdef0123456789"
AUDIT_KEY = b"edge-test-audit-key-0123456789abcdef"
# The pools every stack starts with: flat (each its own root); default is roomy (the
# transcription tests charge it by audio seconds), the others hold 1000 tokens each.
POOLS = (
    PoolSpec("default", 1_000_000),
    PoolSpec("org", 1000),
    PoolSpec("team-a", 1000),
    PoolSpec("team-b", 1000),
)
# What the router lists (GET /v1/models), in its order: the exact chat names, the
# explicit route, the embedding model. Patterns (gpt-*, mock-*, gpt-embed-*) route
# without being listed.
MODELS = ("gpt-4o-mini", "gpt-4o", "slow-1", "local/llama-3", "text-embedding-3-small")
STT_MODEL = "whisper-tiny.en"
REPLY = "Hello from the upstream stand-in."  # what the stand-in answers every chat
LATE_TIMEOUT = 0.2  # the ``late`` provider's timeout; its stand-in answers after 10 s


# The ``down`` provider's port: bound for the whole session and never listened on, so a
# connection there is refused at once and no other test's server can take the port (a
# port merely found free could be, under the parallel suite, and then answer).
_down_socket = socket.socket()
_down_socket.bind(("127.0.0.1", 0))
DOWN_PORT: int = _down_socket.getsockname()[1]
atexit.register(_down_socket.close)


def free_port() -> int:
    """A port nothing listens on (bound once by the OS, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Edge:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings
    tenancy: Tenancy


@pytest.fixture
async def tenancy_prefix() -> AsyncIterator[str]:
    """A fresh key prefix in the real Redis (the key limit windows under it too), emptied after the test."""
    prefix = f"hoosh:test:edge:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = aioredis.Redis.from_url(REDIS_URL)
    async for key in client.scan_iter(match=f"{prefix}*"):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def closed_addr() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def make_settings(closed_addr: str, tenancy_prefix: str) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "router_addr": closed_addr,
            "budget_addr": closed_addr,
            "audit_addr": closed_addr,
            "stt_addr": closed_addr,
            "auth": "open",
            "redis_url": REDIS_URL,
            "tenancy_key_prefix": tenancy_prefix,
            "budget_key_prefix": f"{tenancy_prefix}budget:",  # the key limit windows; emptied with the rest
            "edge_rpc_timeout_seconds": 5.0,
            "edge_request_timeout_seconds": 5.0,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


MakeEdge = Callable[..., Awaitable[Edge]]


@pytest.fixture
async def make_edge(make_settings: Callable[..., Settings]) -> AsyncIterator[MakeEdge]:
    """Build edges (each a replica with its own key cache) with setting overrides; every
    channel, cache and client is closed after the test."""
    opened: list[tuple[Clients, Tenancy, httpx.AsyncClient]] = []

    async def make(**overrides: object) -> Edge:
        settings = make_settings(**overrides)
        clients = Clients.connect(settings)
        tenancy = Tenancy.connect(settings)
        await tenancy.start(wait_seconds=2.0)
        app = create_app(settings, clients, tenancy)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge")
        opened.append((clients, tenancy, client))
        return Edge(app, client, settings, tenancy)

    yield make
    for clients, tenancy, client in opened:
        await client.aclose()
        await clients.close()
        await tenancy.close()


@pytest.fixture
async def client(make_edge: MakeEdge) -> httpx.AsyncClient:
    return (await make_edge()).client


def catalogue(upstream_url: str, late_url: str) -> Catalogue:
    """The router's providers, all OpenAI-compatible: ``upstream`` (the stand-in, whose
    ``mock-*`` models fail as their names say), ``late`` (a stand-in slower than its
    timeout) and ``down`` (nothing listens there)."""
    return Catalogue.model_validate(
        {
            "providers": [
                {
                    "name": "upstream",
                    "type": "openai",
                    "base_url": upstream_url,
                    "api_key": "sk-test",
                    "models": ["gpt-4o-mini", "gpt-4o", "slow-1", "gpt-*", "mock-*"],
                    "embedding_models": ["text-embedding-3-small", "gpt-embed-*"],
                    "default_max_tokens": 16,
                },
                {
                    "name": "late",
                    "type": "openai",
                    "base_url": late_url,
                    "api_key": "sk-test",
                    "models": ["late-*"],
                    "timeout_seconds": LATE_TIMEOUT,
                },
                {
                    "name": "down",
                    "type": "openai",
                    "base_url": f"http://127.0.0.1:{DOWN_PORT}/v1",
                    "api_key": "sk-test",
                    "models": ["down-*"],
                },
            ],
            "routes": [{"match": "local/llama-3", "targets": [{"provider": "upstream", "model": "llama-3"}]}],
            "routing": {"retry": {"max_attempts": 1}},
            "health": {"failure_threshold": 1000, "probe_interval_seconds": 0},
        }
    )


@dataclass
class Stack:
    """The real budget, router and audit services in-process (and stt once started),
    sharing one Redis key prefix and one event stream."""

    upstream: OpenAIUpstream
    late: OpenAIUpstream
    bus: Bus
    budget_key_prefix: str
    budget: RunningBudget
    router: RunningRouter
    audit: RunningAudit
    stt: RunningStt | None = None
    extra: list[Any] = field(default_factory=list)  # more services, stopped with the stack

    def addresses(self) -> dict[str, str]:
        """Settings that point an edge at this stack."""
        addresses = {
            "router_addr": self.router.address,
            "budget_addr": self.budget.address,
            "audit_addr": self.audit.address,
            "budget_key_prefix": self.budget_key_prefix,
        }
        if self.stt is not None:
            addresses["stt_addr"] = self.stt.address
        return addresses

    async def pool(self, name: str) -> PoolView:
        """The pool as the budget's store reads it from Redis."""
        return await self.budget.store.get_pool(name)

    async def router_events(self) -> list[tuple[str, Any]]:
        """Every inference event published so far, once the router settled what it served."""
        await self.router.settled()
        if self.stt is not None:
            await self.stt.publisher.drain(10)
        return [event for event in await self.bus.events() if event[0].startswith("inference.")]

    def upstream_requests(self) -> int:
        """Chat and embedding calls the provider stand-in received."""
        return self.upstream.stats.requests


@pytest.fixture
async def stack(tenancy_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    """Budget, router and audit, real and in-process, on the test's Redis prefix and a fresh stream."""
    budget_prefix = f"{tenancy_prefix}budget:"
    upstream, late = OpenAIUpstream(), OpenAIUpstream(latency_ms=10_000)
    await upstream.start()
    await late.start()
    bus = await Bus.create(name="TEST_EDGE")
    started: list[Any] = []
    try:
        budget = await start_budget(bus, key_prefix=budget_prefix, pools=list(POOLS))
        started.append(budget)
        router = await start_router(
            catalogue(upstream.base_url, late.base_url),
            bus,
            key_prefix=f"{tenancy_prefix}router:",
            budget_key_prefix=budget_prefix,
        )
        started.append(router)
        audit = await start_audit(bus, tmp_path_factory.mktemp("audit"), key=AUDIT_KEY)
        started.append(audit)
        running = Stack(upstream, late, bus, budget_prefix, budget, router, audit)
        yield running
        started.extend(running.extra)
        if running.stt is not None:
            started.append(running.stt)
    finally:
        for service in reversed(started):
            await service.stop()
        await bus.close()
        await upstream.close()
        await late.close()


@pytest.fixture(scope="session")
def stt_engine() -> Iterator[Any]:
    """Whisper tiny.en, loaded once for every STT server of the session."""
    engine = load_stt_engine()
    yield engine
    engine.close()


@pytest.fixture
async def stt(stack: Stack, stt_engine: Any) -> RunningStt:
    """The real STT service in-process on the stack (its budget prefix and stream); one
    engine thread, so a test holding it (``stt.queue``) holds every transcription."""
    stack.stt = await start_stt(stt_engine, stack.bus, budget_key_prefix=stack.budget_key_prefix)
    return stack.stt


def open_files() -> list[str]:
    """The paths this process has open (Linux: /proc/self/fd), deleted temporary files included."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    return paths


async def eventually(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds (the deadline only stops a hung test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def served(make_settings: Callable[..., Settings]) -> AsyncIterator[str]:
    """The app under a real uvicorn (httptools) on a free port; its lifespan owns the channels."""
    port = free_port()
    config = uvicorn.Config(
        create_app(make_settings()),
        host="127.0.0.1",
        port=port,
        loop="none",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@contextlib.asynccontextmanager
async def uvicorn_serving(app: FastAPI, host: str = "127.0.0.1", **options: Any) -> AsyncIterator[int]:
    """``app`` under a real uvicorn on a free port, for what the ASGI transport cannot do
    (it hands the body over only once the response ends); yields the port."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="none",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
            **options,
        )
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        await task


@pytest.fixture
def router_servicers(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The RouterServicer of every router started after it (the real servicer, recorded
    on its way to its server), so that a test can drain its tunnels or serve it again."""
    captured: list[Any] = []
    register = router_pb2_grpc.add_RouterServiceServicer_to_server

    def recording(servicer: Any, server: grpc.aio.Server) -> None:
        captured.append(servicer)
        register(servicer, server)

    monkeypatch.setattr(router_pb2_grpc, "add_RouterServiceServicer_to_server", recording)
    return captured
