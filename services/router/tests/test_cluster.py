"""Every Redis call the router makes runs on a Redis Cluster: a three-master cluster on
loopback, started here (``redis-server --cluster-enabled yes``, then
``redis-cli --cluster create``), reached through ``connect_redis`` with a
``redis+cluster://`` URL. Each Lua call declares keys of one hash tag (one slot)."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hoosh.chat.v1 import chat_pb2
from hoosh.router.v1 import router_pb2
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_cli.stack import free_port
from hoosh_metering.limits import KeyGate, KeyLimiter
from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_metering.redis import RedisClient, connect_redis
from hoosh_router.backends.factory import build_backend
from hoosh_router.budget_client import RouterBudget
from hoosh_router.cache import ResponseCache
from hoosh_router.chat import ChatService
from hoosh_router.config import CacheConfig, Catalogue, ProviderConfig
from hoosh_router.dispatch import Dispatcher, RetryPolicy
from hoosh_router.health import HealthBoard
from hoosh_router.ratelimit import RateLimiter
from hoosh_router.recording import Recorder
from hoosh_router.routing import ModelRouter

from bench.upstream import OpenAIUpstream

from .conftest import Bus
from .helpers import user


def _cluster_ports() -> list[int]:
    """Three free ports whose cluster-bus ports (+10000) are free too."""
    ports: list[int] = []
    while len(ports) < 3:
        port = free_port()
        if port + 10000 < 65536 and port not in ports:
            ports.append(port)
    return ports


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base: Path = tmp_path_factory.mktemp("cluster")
    ports = _cluster_ports()
    processes = [
        subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--dir",
                str(base),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port in ports:
            for _ in range(200):
                if (
                    subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip()
                    == b"PONG"
                ):
                    break
                time.sleep(0.025)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports), "--cluster-yes"],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 30
        while True:
            states = [
                subprocess.run(["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True).stdout
                for port in ports
            ]
            if all(b"cluster_state:ok" in state for state in states):
                break
            assert time.monotonic() < deadline, "the cluster never became ready"
            time.sleep(0.1)
        yield f"redis+cluster://127.0.0.1:{ports[0]}"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)


@pytest.fixture
async def cluster(cluster_url: str) -> AsyncIterator[RedisClient]:
    client = connect_redis(cluster_url)
    yield client
    await client.aclose()


def provider(**fields: object) -> ProviderConfig:
    return ProviderConfig.model_validate({"name": "p", "type": "openai", **fields})


async def test_provider_limits_on_a_cluster(cluster: RedisClient) -> None:
    prefix = f"t:{uuid.uuid4().hex[:8]}:"
    limiter = RateLimiter(cluster, prefix)
    limited = provider(rpm=2, tpm=1000)
    results = [await limiter.admit(limited, 10) for _ in range(3)]
    assert [r.allowed for r in results] == [True, True, False]
    limiter.correct(limited, results[0], estimated=10, actual=4)
    await limiter.drain()
    assert int(await cluster.hget(limiter.key("p"), f"t:{results[0].window}")) == 14


async def test_the_cache_on_a_cluster(cluster: RedisClient) -> None:
    cache = ResponseCache(cluster, f"t:{uuid.uuid4().hex[:8]}:", CacheConfig(ttl_seconds=60))
    keys = []
    for text in ("one", "two", "three", "four"):
        request = router_pb2.ChatRequest(model="m", messages=[user(text)], pool="team")
        request.sampling.temperature = 0
        key = cache.key(request)
        keys.append(key)
        assert await cache.get(key) is None
        cache.put(key, router_pb2.ChatResponse(model="m", choices=[chat_pb2.Choice(finish_reason="stop")]))
    await cache.drain()
    assert all([await cache.get(key) is not None for key in keys])
    stats = await cache.stats()
    assert (stats.hits, stats.misses, stats.stores, stats.entries) == (4, 4, 4, 4)


async def test_health_on_a_cluster(cluster: RedisClient) -> None:
    config = provider()
    backend = build_backend(config, "")
    try:
        board = HealthBoard(cluster, f"t:{uuid.uuid4().hex[:8]}:", [(config, backend)], Catalogue().health)
        for _ in range(5):
            await board.record_failure("p", "down")
        await board.sync()
        assert board.state_of("p") == "open"
        await board.record_success("p", 1.0)
        await board.sync()
        assert board.state_of("p") == "closed"
    finally:
        await backend.close()


async def test_a_chat_with_key_limits_and_a_pool_chain_on_a_cluster(
    cluster: RedisClient, bus: Bus, openai_up: OpenAIUpstream
) -> None:
    prefix = f"t:{uuid.uuid4().hex[:8]}:"
    catalogue = Catalogue.model_validate(
        {
            "providers": [{"name": "up", "type": "openai", "base_url": openai_up.base_url, "models": ["mock-*"]}],
            "health": {"probe_interval_seconds": 0},
        }
    )
    entries = [(config, build_backend(config, "")) for config in catalogue.providers]
    store = BudgetStore(cluster, f"{prefix}budget:", 60)
    await store.create_pool(PoolSpec(name="org", capacity=1_000_000))
    await store.create_pool(PoolSpec(name="team", capacity=1_000_000, parent="org"))
    recorder = Recorder(RouterBudget(store, 60), bus.publisher, KeyGate(KeyLimiter(cluster, f"{prefix}budget:")))
    cache = ResponseCache(cluster, prefix, catalogue.cache)
    chat = ChatService(
        Dispatcher(
            ModelRouter(entries),
            HealthBoard(cluster, prefix, entries, catalogue.health),
            RateLimiter(cluster, prefix),
            RetryPolicy(catalogue.routing.retry),
            upstream_timeout=10,
            request_timeout=30,
        ),
        recorder,
        cache,
    )
    try:
        who = tenancy_pb2.Caller(key_id="key_c", rpm=10, tpm=10_000, max_concurrency=2)
        request = router_pb2.ChatRequest(model="mock-x", messages=[user("hi")], pool="team", caller=who)
        request.sampling.temperature = 0
        first = await chat.chat(request, uuid.uuid4().hex)
        await cache.drain()  # the answer is stored after it is sent (it lost that race once under load)
        streamed = [chunk async for chunk in chat.stream(request, uuid.uuid4().hex)]  # a cache hit
        assert streamed[0].cache == "hit"
        await recorder.drain(10)
        for name in ("team", "org"):
            pool = await store.get_pool(name)
            assert (pool.used, pool.reserved) == (2 * first.usage.total_tokens, 0)
        events = await bus.events()
        assert [list(event.pool_chain) for _, event in events] == [["team", "org"], ["team", "org"]]
    finally:
        await store.close()
        for _, backend in entries:
            await backend.close()
