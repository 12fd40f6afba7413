"""Fixtures: the edge app over httpx's ASGI transport, its gRPC channels pointed at a
closed port (a real channel to nothing: every backend call fails as UNAVAILABLE) or at
in-process fakes (backends.py), its key store in the real Redis under a fresh prefix.

``make_edge`` runs open auth unless told otherwise (the tests of validation, limits and
mapping do not need keys); the tenancy tests pass ``auth="keys"`` and an admin key."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI
from hoosh_edge.app import create_app
from hoosh_edge.auth import Tenancy
from hoosh_edge.clients import Clients
from hoosh_edge.config import Settings

from .backends import Backends, start_backends

REDIS_URL = "redis://127.0.0.1:6379/0"
ADMIN_KEY = "test-admin-key-0123456789abcdef0123456789"


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


@pytest.fixture
async def backends() -> AsyncIterator[Backends]:
    """Router, budget and audit fakes on one in-process gRPC server (pools: default, team-a, team-b)."""
    started = await start_backends()
    for pool in ("default", "org", "team-a", "team-b"):
        started.budget.add_pool(pool)
    yield started
    await started.server.stop(None)


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
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task
