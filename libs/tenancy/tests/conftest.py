"""Fixtures: the real Redis at 127.0.0.1:6379 under a fresh key prefix per test, and a
Redis server of the test's own (for outages) on a free port."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hoosh_tenancy import KeyCache, KeyStore, connect_redis

REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def prefix() -> str:
    return f"hoosh:test:tenancy:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def redis(prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = connect_redis(REDIS_URL)
    yield client
    async for key in client.scan_iter(match=f"{prefix}*"):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def store(redis: aioredis.Redis, prefix: str) -> KeyStore:
    return KeyStore(redis, prefix)


@pytest.fixture
async def make_cache(prefix: str) -> AsyncIterator[Callable[..., Awaitable[KeyCache]]]:
    """Started caches, each with its own Redis client (a separate replica); all closed after."""
    opened: list[tuple[KeyCache, aioredis.Redis]] = []

    async def make(url: str = REDIS_URL, key_prefix: str | None = None, **options: float) -> KeyCache:
        client = connect_redis(url)
        cache = KeyCache(KeyStore(client, key_prefix or prefix), **options)
        opened.append((cache, client))
        await cache.start(wait_seconds=5.0)
        return cache

    yield make
    for cache, client in opened:
        await cache.close()
        await client.aclose()


class RedisServer:
    """A redis-server process of the test's own, stoppable and restartable on its port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self.process = None


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    yield server
    server.stop()
