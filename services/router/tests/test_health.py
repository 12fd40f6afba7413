"""The circuit breaker and prober, with their shared state in the real Redis."""

from __future__ import annotations

import time

import redis.asyncio as redis
from hoosh_cli.stack import free_port
from hoosh_router.backends.base import Backend
from hoosh_router.config import BreakerOverrides, HealthConfig, ProviderConfig
from hoosh_router.errors import UpstreamUnavailable
from hoosh_router.health import HealthBoard
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


class ProbedBackend:
    """Only ``probe`` is used by the board; it fails while ``down``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.down = False
        self.probes = 0

    async def probe(self) -> None:
        self.probes += 1
        if self.down:
            raise UpstreamUnavailable(f"Provider '{self.name}' is unreachable")


def board_for(
    client: redis.Redis, prefix: str, *backends: ProbedBackend, threshold: int = 3, cooldown: float = 30.0
) -> HealthBoard:
    providers: list[tuple[ProviderConfig, Backend]] = [
        (ProviderConfig(name=b.name, type="openai", base_url="http://x/v1"), b)  # type: ignore[misc]
        for b in backends
    ]
    config = HealthConfig(failure_threshold=threshold, cooldown_seconds=cooldown, probe_interval_seconds=0)
    return HealthBoard(client, prefix, providers, config, latency_alpha=0.5)


async def _expire_cooldown(client: redis.Redis, board: HealthBoard, name: str) -> None:
    """Move the shared open_until into the past, as if the cooldown had elapsed."""
    await client.hset(board.key(name), "open_until_ms", int(time.time() * 1000) - 1)
    await board.sync()


async def test_consecutive_failures_open_the_breaker_for_every_replica(redis_client: redis.Redis, prefix: str) -> None:
    backend = ProbedBackend("p")
    one, two = board_for(redis_client, prefix, backend), board_for(redis_client, prefix, backend)
    await one.record_failure("p", UpstreamUnavailable("connect refused"))
    await one.record_failure("p", "boom")
    assert one.state_of("p") == "closed" and one.available("p")
    await one.record_failure("p", "boom again")
    assert one.state_of("p") == "open"
    assert not one.available("p") and not one.acquire("p")
    stored = await redis_client.hgetall(one.key("p"))
    assert stored[b"state"] == b"open" and stored[b"failures"] == b"3" and stored[b"last_error"] == b"boom again"

    assert two.state_of("p") == "closed"  # until it re-reads the shared state
    await two.sync()
    assert two.state_of("p") == "open" and two.view("p").failures == 3


async def test_a_success_resets_the_count(redis_client: redis.Redis, prefix: str) -> None:
    board = board_for(redis_client, prefix, ProbedBackend("p"))
    await board.record_failure("p", "x")
    await board.record_failure("p", "x")
    await board.record_success("p", 10.0)
    await board.record_failure("p", "x")
    await board.record_failure("p", "x")
    assert board.state_of("p") == "closed" and board.view("p").failures == 2
    assert (await redis_client.hgetall(board.key("p")))[b"failures"] == b"2"


async def test_the_healthy_hot_path_writes_nothing(redis_client: redis.Redis, prefix: str) -> None:
    board = board_for(redis_client, prefix, ProbedBackend("p"))
    for latency in (100.0, 50.0):
        await board.record_success("p", latency)
    assert await redis_client.exists(board.key("p")) == 0
    assert board.latency("p") == 75.0  # moving average, alpha 0.5


async def test_half_open_admits_one_trial_then_closes_or_reopens(redis_client: redis.Redis, prefix: str) -> None:
    board = board_for(redis_client, prefix, ProbedBackend("p"), threshold=1)
    await board.record_failure("p", "down")
    assert board.state_of("p") == "open"
    await _expire_cooldown(redis_client, board, "p")
    assert board.state_of("p") == "half_open" and board.available("p")
    assert board.acquire("p")
    assert not board.acquire("p") and not board.available("p")  # one trial at a time
    before = time.time()
    await board.record_failure("p", "still down")  # the trial failed: open for another cooldown
    board.release("p")
    assert board.state_of("p") == "open" and board.view("p").open_until >= before + 29

    await _expire_cooldown(redis_client, board, "p")
    assert board.acquire("p")
    await board.record_success("p", 5.0)
    board.release("p")
    assert board.state_of("p") == "closed" and board.view("p").failures == 0
    stored = await redis_client.hgetall(board.key("p"))
    assert stored[b"state"] == b"closed" and stored[b"failures"] == b"0"


async def test_per_provider_overrides(redis_client: redis.Redis, prefix: str) -> None:
    config = ProviderConfig(name="p", type="openai", breaker=BreakerOverrides(failure_threshold=1, cooldown_seconds=2))
    board = HealthBoard(redis_client, prefix, [(config, ProbedBackend("p"))], HealthConfig())  # type: ignore[list-item]
    before = time.time()
    await board.record_failure("p", "x")
    assert board.state_of("p") == "open" and board.view("p").open_until <= before + 3


async def test_the_prober_counts_failures_and_closes_a_half_open_breaker(
    redis_client: redis.Redis, prefix: str
) -> None:
    sick, fine = ProbedBackend("sick"), ProbedBackend("fine")
    board = board_for(redis_client, prefix, sick, fine, threshold=2)
    sick.down = True
    await board.probe_once()
    await board.probe_once()
    assert board.state_of("sick") == "open" and board.view("sick").last_error.startswith("probe:")
    assert board.state_of("fine") == "closed"
    await board.probe_once()
    assert sick.probes == 2 and fine.probes == 3  # a cooling-down breaker is not probed

    sick.down = False
    await _expire_cooldown(redis_client, board, "sick")
    await board.probe_once()
    assert board.state_of("sick") == "closed"


async def test_report_reads_the_shared_state(redis_client: redis.Redis, prefix: str) -> None:
    board = board_for(redis_client, prefix, ProbedBackend("a"), ProbedBackend("b"), threshold=1)
    other = board_for(redis_client, prefix, ProbedBackend("a"), ProbedBackend("b"), threshold=1)
    await other.record_failure("b", "503 from b")
    await board.record_success("a", 12.5)
    reports = {item.name: item for item in await board.report()}
    assert reports["a"].state == "closed" and reports["a"].latency_ms == 12.5 and reports["a"].failures == 0
    assert reports["b"].state == "open" and reports["b"].last_error == "503 from b"
    assert reports["b"].open_until_ms > time.time() * 1000 and reports["b"].last_error_at_ms > 0


async def test_without_redis_the_breaker_still_works_locally(prefix: str) -> None:
    client = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    try:
        board = board_for(client, prefix, ProbedBackend("p"), threshold=2)
        await board.start()  # a failed first sync is logged, not raised
        await board.record_failure("p", "x")
        await board.record_failure("p", "x")
        assert board.state_of("p") == "open"
        await board.record_success("p", 1.0)
        assert board.state_of("p") == "closed"
        await board.stop()
    finally:
        await client.aclose()
