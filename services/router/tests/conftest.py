"""Router unit-test fixtures: the real Redis and NATS on this machine (unique key
prefixes and streams per test, cleaned up), and the provider stand-ins from
bench/ as in-process servers on free ports."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats
import nats.js.errors
import pytest
import redis.asyncio as redis
from hoosh.events.v1 import events_pb2
from hoosh_common.eventbus import EventPublisher, ensure_stream
from hoosh_metering.redis import PipeliningRedis, connect_redis
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from bench.upstream import OpenAIUpstream
from bench.upstream_anthropic import AnthropicUpstream
from bench.upstream_gemini import GeminiUpstream

REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"


@pytest.fixture
async def redis_client() -> AsyncIterator[redis.Redis]:
    # The client the router itself runs on (script calls pipelined, writes announced).
    client = connect_redis(REDIS_URL)
    assert isinstance(client, PipeliningRedis)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis_client: redis.Redis) -> AsyncIterator[str]:
    """A fresh key prefix; every key under it is deleted after the test."""
    value = f"hoosh:test:router:{uuid.uuid4().hex[:12]}:"
    yield value
    async for key in redis_client.scan_iter(match=f"{value}*"):
        await redis_client.delete(key)


@dataclass
class Bus:
    nc: NATS
    js: JetStreamContext
    stream: str
    subject_prefix: str
    publisher: EventPublisher

    async def events(self) -> list[tuple[str, events_pb2.InferenceCompleted | events_pb2.InferenceFailed]]:
        """Every event published so far: (subject suffix, decoded payload)."""
        await self.publisher.drain()
        info = await self.js.stream_info(self.stream)
        found = []
        for sequence in range(1, info.state.last_seq + 1):
            message = await self.js.get_msg(self.stream, sequence)
            name = message.subject.removeprefix(self.subject_prefix + ".")
            kind = events_pb2.InferenceCompleted if name.endswith("completed") else events_pb2.InferenceFailed
            found.append((name, kind.FromString(message.data or b"")))
        return found


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    nc = await nats.connect(NATS_URL)
    suffix = uuid.uuid4().hex[:12]
    js = nc.jetstream()
    stream, subject_prefix = f"TEST_ROUTER_{suffix}", f"testrouter{suffix}"
    await ensure_stream(js, stream, subject_prefix)
    publisher = EventPublisher(nc, js, stream, subject_prefix)
    try:
        yield Bus(nc, js, stream, subject_prefix, publisher)
    finally:
        await publisher.drain()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)
        await nc.close()


@pytest.fixture
async def openai_up() -> AsyncIterator[OpenAIUpstream]:
    up = OpenAIUpstream()
    await up.start()
    yield up
    await up.close()


@pytest.fixture
async def anthropic_up() -> AsyncIterator[AnthropicUpstream]:
    up = AnthropicUpstream()
    await up.start()
    yield up
    await up.close()


@pytest.fixture
async def gemini_up() -> AsyncIterator[GeminiUpstream]:
    up = GeminiUpstream()
    await up.start()
    yield up
    await up.close()
