"""Fixtures for the audit tests: the real NATS at 127.0.0.1:4222, one stream per test."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

NATS_URL = "nats://127.0.0.1:4222"
KEY = b"test-key-0123456789abcdef0123456789"


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
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit" / "audit.jsonl"
