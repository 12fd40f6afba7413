"""Fixtures for the audit tests: the real NATS at 127.0.0.1:4222 and Redis at
127.0.0.1:6379, one stream and one checkpoint key prefix per test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.js.errors
import pytest
import redis
import redis.asyncio as aioredis
from hoosh_audit.checkpoint import CheckpointStore
from hoosh_audit.keys import Keyring
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/0"
KEY = b"test-key-0123456789abcdef0123456789"
# A publisher's event-signing key, as HOOSH_AUDIT_PUBLISHER_KEYS names it.
PUBLISHER_KEY_ID = "test-publisher"
PUBLISHER_KEY = bytes(range(100, 132))  # production refuses a key with few distinct bytes
PUBLISHER_KEYS_ENV = f"{PUBLISHER_KEY_ID}={PUBLISHER_KEY.hex()}"


@dataclass
class Bus:
    nc: NATS
    js: JetStreamContext
    stream: str
    prefix: str


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    """A connection plus a unique stream name and subject prefix; the stream is deleted after."""
    nc = await nats.connect(NATS_URL)
    suffix = uuid.uuid4().hex[:12]
    b = Bus(nc=nc, js=nc.jetstream(), stream=f"TEST_AUDIT_{suffix}", prefix=f"test{suffix}")
    try:
        yield b
    finally:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await b.js.delete_stream(b.stream)
        await nc.close()


@pytest.fixture
def key() -> bytes:
    return KEY


@pytest.fixture
def keyring(key: bytes) -> Keyring:
    return Keyring.single(key)


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "audit"


@pytest.fixture
def log_path(log_dir: Path) -> Path:
    """The link to the head segment (``audit.jsonl``)."""
    return log_dir / "audit.jsonl"


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A fresh key prefix; every key under it is deleted after the test."""
    prefix = f"hoosh:test:audit:{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for name in client.scan_iter(match=f"{prefix}*"):
            client.delete(name)
    finally:
        client.close()


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def store(redis_client: aioredis.Redis, redis_prefix: str) -> CheckpointStore:
    return CheckpointStore(redis_client, f"{redis_prefix}checkpoint")
