"""Fixtures on the real Redis at 127.0.0.1:6379 (a unique key prefix per test, deleted
after) and the real NATS at 127.0.0.1:4222 (a unique stream and subject prefix per
test, deleted after); the budget service in-process on a free port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import nats
import nats.errors
import nats.js.errors
import pytest
from hoosh.budget.v1 import budget_pb2_grpc
from hoosh.events.v1 import events_pb2
from hoosh_budget.resets import ResetAnnouncer
from hoosh_budget.server import BudgetServicer, add_to_server
from hoosh_common.eventbus import EventPublisher, ensure_stream
from hoosh_common.grpc_server import internal_channel, new_server
from hoosh_common.metrics import serve_metrics
from hoosh_metering.pools import BudgetStore
from hoosh_metering.redis import RedisClient, connect_redis
from nats.aio.client import Client as NATS
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

REDIS_URL = os.environ.get("HOOSH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
NATS_URL = os.environ.get("HOOSH_TEST_NATS_URL", "nats://127.0.0.1:4222")

Labels = tuple[tuple[str, str], ...]


class Samples(dict[tuple[str, Labels], float]):
    """One scrape: (sample name, sorted labels) -> value."""

    def get_value(self, name: str, **labels: str) -> float | None:
        return self.get((name, tuple(sorted(labels.items()))))

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when it is absent (a counter child not created yet)."""
        return self.get_value(name, **labels) or 0.0

    def labelled(self, name: str) -> dict[Labels, float]:
        return {labels: value for (sample, labels), value in self.items() if sample == name}


def parse_metrics(text: str) -> Samples:
    """Prometheus text format through prometheus_client's own parser."""
    samples = Samples()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return samples


async def scrape(port: int) -> Samples:
    """GET /metrics over HTTP (in a thread: urllib blocks) and parse it."""

    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    return parse_metrics(await asyncio.to_thread(get))


class Clock:
    """The calendar clock a store is given (seconds since the epoch): tests move it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """The process-wide registry served on a free port (a daemon thread, for the session)."""
    port = serve_metrics("127.0.0.1:0")
    assert port is not None
    return port


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[RedisClient]:
    client = connect_redis(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def prefix(redis: RedisClient) -> AsyncIterator[str]:
    key_prefix = f"test:budget:{uuid.uuid4().hex}:"
    yield key_prefix
    keys = [key async for key in redis.scan_iter(match=f"{key_prefix}*", count=1000)]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
async def store(redis: RedisClient, prefix: str) -> AsyncIterator[BudgetStore]:
    budget_store = BudgetStore(redis, prefix, default_lease_seconds=300, default_retry_after_seconds=42)
    yield budget_store
    await budget_store.close()


@dataclass
class Bus:
    nc: NATS
    js: JetStreamContext
    stream: str
    prefix: str
    publisher: EventPublisher

    async def resets(self, expected: int, *, wait: float = 5.0) -> list[tuple[str, events_pb2.BudgetReset]]:
        """Every budget.reset event in the stream as (Nats-Msg-Id, event); at least
        ``expected`` of them are waited for, then whatever else is there is read too."""
        subscription = await self.js.pull_subscribe(
            f"{self.prefix}.budget.>", config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        )
        found: list[tuple[str, events_pb2.BudgetReset]] = []
        try:
            while True:
                try:
                    messages = await subscription.fetch(100, timeout=wait if len(found) < expected else 0.5)
                except TimeoutError:  # nats.errors.TimeoutError, or a bare one nats-py's fetch may raise
                    if len(found) >= expected:
                        break
                    raise
                for message in messages:
                    found.append(
                        (
                            (message.headers or {}).get("Nats-Msg-Id", ""),
                            events_pb2.BudgetReset.FromString(message.data),
                        )
                    )
                    await message.ack()
        finally:
            await subscription.unsubscribe()
        return found


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    nc = await nats.connect(NATS_URL)
    suffix = uuid.uuid4().hex[:12]
    js = nc.jetstream()
    stream, subject_prefix = f"TEST_BUDGET_{suffix}", f"testbudget{suffix}"
    await ensure_stream(js, stream, subject_prefix)
    try:
        yield Bus(nc, js, stream, subject_prefix, EventPublisher(nc, js, stream, subject_prefix))
    finally:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(stream)
        await nc.close()


@pytest.fixture
def announcer(bus: Bus) -> ResetAnnouncer:
    return ResetAnnouncer(bus.publisher)


async def start_server(store: BudgetStore, announcer: ResetAnnouncer) -> tuple[grpc.aio.Server, int]:
    server = new_server()
    add_to_server(BudgetServicer(store, announcer, announcer.sink), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


@pytest.fixture
async def stub(store: BudgetStore, announcer: ResetAnnouncer) -> AsyncIterator[budget_pb2_grpc.BudgetServiceStub]:
    server, port = await start_server(store, announcer)
    channel = internal_channel(f"127.0.0.1:{port}")
    yield budget_pb2_grpc.BudgetServiceStub(channel)
    await channel.close()
    await server.stop(None)
