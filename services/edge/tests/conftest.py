"""Fixtures: the edge app over httpx's ASGI transport, its gRPC channels pointed at a
closed port (a real channel to nothing: every backend call fails as UNAVAILABLE)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from hoosh_edge.app import create_app
from hoosh_edge.clients import Clients
from hoosh_edge.config import Settings


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


@pytest.fixture
def closed_addr() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def make_settings(closed_addr: str) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "router_addr": closed_addr,
            "budget_addr": closed_addr,
            "audit_addr": closed_addr,
            "stt_addr": closed_addr,
            "api_keys": "",
            "edge_rpc_timeout_seconds": 5.0,
            "edge_request_timeout_seconds": 5.0,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
async def make_edge(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Edge]]:
    """Build edges with setting overrides; every channel and client is closed after the test."""
    opened: list[tuple[Clients, httpx.AsyncClient]] = []

    def make(**overrides: object) -> Edge:
        settings = make_settings(**overrides)
        clients = Clients.connect(settings)
        app = create_app(settings, clients)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge")
        opened.append((clients, client))
        return Edge(app, client, settings)

    yield make
    for clients, client in opened:
        await client.aclose()
        await clients.close()


@pytest.fixture
async def client(make_edge: Callable[..., Edge]) -> httpx.AsyncClient:
    return make_edge().client


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
