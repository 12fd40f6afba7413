"""The STT's budget adapter on the metering store in-process, against real Redis: the
caller's key owns the reservation, the whole chain is charged, an unreachable Redis
admits nothing, and a settlement Redis could not take is retried until it lands."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import grpc
import pytest
import redis.asyncio as aioredis
from hoosh_metering.errors import NotOwner
from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_metering.redis import connect_redis
from hoosh_stt.budget import SttBudget
from hoosh_stt.errors import BudgetExhausted, PoolNotFound, Unavailable

from .conftest import REDIS_URL

DEADLINE_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


async def _cleanup(redis: aioredis.Redis | aioredis.RedisCluster, prefix: str) -> None:
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.delete(*keys)


@pytest.fixture
async def store() -> AsyncIterator[BudgetStore]:
    prefix = f"test:sttbudget:{uuid.uuid4().hex}:"
    redis = connect_redis(REDIS_URL)
    budget_store = BudgetStore(redis, prefix, default_lease_seconds=300)
    await budget_store.start()
    yield budget_store
    await budget_store.close()
    await _cleanup(redis, prefix)
    await redis.aclose()


async def test_the_callers_key_owns_the_reservation_in_every_pool_of_the_chain(store: BudgetStore) -> None:
    await store.create_pool(PoolSpec("org", 1000))
    await store.create_pool(PoolSpec("team", 100, parent="org"))
    budget = SttBudget(store, lease_seconds=60)

    assert await budget.reserve("team", 40, "tr-1", owner="key_a") == ("team", "org")
    assert [(await store.get_pool(name)).reserved for name in ("team", "org")] == [40, 40]
    # Only the same key, for a transcription, may end it.
    with pytest.raises(NotOwner):
        await store.commit("tr-1", 1, pool="team", owner="key_b", kind="transcription")
    with pytest.raises(NotOwner):
        await store.release("tr-1", pool="team", owner="key_a", kind="chat")
    await budget.commit("tr-1", 40, pool="team", owner="key_a")
    for name in ("team", "org"):
        view = await store.get_pool(name)
        assert (view.used, view.reserved) == (40, 0)

    await budget.reserve("team", 10, "tr-2", owner="key_a")
    await budget.release("tr-2", pool="team", owner="key_a")
    assert (await store.get_pool("org")).reserved == 0
    assert await budget.chain("team") == ("team", "org")
    assert await budget.chain("nowhere") == ()
    assert budget.retrying == 0


async def test_refusals_are_the_stt_services_errors(store: BudgetStore) -> None:
    await store.create_pool(PoolSpec("org", 50))
    await store.create_pool(PoolSpec("team", 100, parent="org"))
    budget = SttBudget(store, lease_seconds=60)
    with pytest.raises(PoolNotFound) as missing:
        await budget.reserve("ghost", 1, "tr-3", owner="")
    assert (missing.value.error_code, missing.value.param) == ("pool_not_found", "pool")
    with pytest.raises(BudgetExhausted) as exhausted:  # the parent is the tightest
        await budget.reserve("team", 60, "tr-4", owner="")
    assert exhausted.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert exhausted.value.retry_after is not None and exhausted.value.retry_after > 0
    assert (await store.get_pool("team")).reserved == 0


async def test_an_unreachable_redis_admits_nothing() -> None:
    dead = connect_redis(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5, socket_connect_timeout=0.5)
    budget = SttBudget(BudgetStore(dead, f"test:sttbudget:{uuid.uuid4().hex}:", 60), lease_seconds=60)
    try:
        with pytest.raises(Unavailable) as raised:
            await budget.reserve("default", 10, "tr-5", owner="key_a")
    finally:
        await dead.aclose()
    assert raised.value.status == grpc.StatusCode.UNAVAILABLE
    assert raised.value.error_code == "budget_unavailable" and raised.value.http_status == 503


@pytest.fixture
def private_redis() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A Redis of the test's own (it is frozen with SIGSTOP), on a free port."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            ready = subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True, check=False
            ).stdout.strip()
            if ready == "PONG":
                break
            time.sleep(0.05)
        yield process, f"redis://127.0.0.1:{port}/0"
    finally:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize("action", ["commit", "release"])
async def test_a_settlement_redis_could_not_take_is_retried_until_it_lands(
    private_redis: tuple[subprocess.Popen[bytes], str], action: str
) -> None:
    process, url = private_redis
    redis = connect_redis(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    store = BudgetStore(redis, "test:sttbudget:", default_lease_seconds=300)
    budget = SttBudget(store, lease_seconds=300, retry_initial_seconds=0.05, retry_max_seconds=0.2)
    try:
        await store.start()
        await store.create_pool(PoolSpec("p", 100))
        await budget.reserve("p", 40, "tr-6", owner="key_a")

        process.send_signal(signal.SIGSTOP)  # Redis stops answering: every call times out
        if action == "commit":
            await budget.commit("tr-6", 40, pool="p", owner="key_a")
        else:
            await budget.release("tr-6", pool="p", owner="key_a")
        assert budget.retrying == 1  # not dropped with a log line
        await asyncio.sleep(1.0)
        assert budget.retrying == 1
        process.send_signal(signal.SIGCONT)
        await wait_until(lambda: budget.retrying == 0, "the settlement to land")

        view = await store.get_pool("p")
        assert (view.used, view.reserved) == ((40, 0) if action == "commit" else (0, 0))
    finally:
        process.send_signal(signal.SIGCONT)
        await budget.close()
        await store.close()
        await redis.aclose()
