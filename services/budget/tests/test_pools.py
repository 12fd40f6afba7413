"""BudgetStore against the real Redis: arithmetic, exactly-once ends, leases, concurrency."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from hoosh_budget.errors import BudgetExhausted, InvalidAmount, InvalidArgument, PoolNotFound
from hoosh_budget.pools import BudgetStore, PoolView, reap_forever


def rid() -> str:
    return uuid.uuid4().hex


async def test_reserve_then_commit_moves_tokens_from_reserved_to_used(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    reservation = await store.reserve("p", 300, "r1")
    assert reservation.created
    assert reservation.tokens == 300
    assert reservation.pool == PoolView("p", capacity=1000, used=0, reserved=300)
    assert reservation.pool.available == 700

    result = await store.commit("r1", 250)
    assert not result.already_ended
    assert result.state == "committed"
    assert result.pool == PoolView("p", capacity=1000, used=250, reserved=0)
    assert (await store.get_pool("p")).available == 750


async def test_release_returns_the_reservation(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    await store.reserve("p", 400, "r1")
    await store.reserve("p", 100, "r2")
    result = await store.release("r1")
    assert not result.already_ended
    assert result.state == "released"
    assert result.pool == PoolView("p", capacity=1000, used=0, reserved=100)


async def test_commit_may_exceed_reservation_and_capacity(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 50, "r1")
    result = await store.commit("r1", 180)
    assert result.pool == PoolView("p", capacity=100, used=180, reserved=0)
    assert result.pool.available == 0
    with pytest.raises(BudgetExhausted) as info:
        await store.reserve("p", 1, "r2")
    assert info.value.available == 0


async def test_commit_is_exactly_once(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    await store.reserve("p", 100, "r1")
    await store.reserve("p", 100, "other")
    first = await store.commit("r1", 80)
    second = await store.commit("r1", 80)
    release_after = await store.release("r1")
    assert not first.already_ended
    assert second.already_ended and second.state == "committed"
    assert release_after.already_ended and release_after.state == "committed"
    expected = PoolView("p", capacity=1000, used=80, reserved=100)
    assert second.pool == expected
    assert release_after.pool == expected
    assert await store.get_pool("p") == expected


async def test_release_is_exactly_once(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    await store.reserve("p", 100, "r1")
    await store.reserve("p", 30, "other")
    first = await store.release("r1")
    second = await store.release("r1")
    commit_after = await store.commit("r1", 50)
    assert not first.already_ended
    assert second.already_ended and second.state == "released"
    assert commit_after.already_ended and commit_after.state == "released"
    assert await store.get_pool("p") == PoolView("p", capacity=1000, used=0, reserved=30)


async def test_ending_an_unknown_reservation_changes_nothing(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    await store.reserve("p", 10, "r1")
    result = await store.commit("never-reserved", 5)
    assert result.already_ended and result.state == "unknown" and result.pool is None
    assert (await store.release("never-reserved")).already_ended
    assert await store.get_pool("p") == PoolView("p", capacity=1000, used=0, reserved=10)


async def test_reserve_is_idempotent_per_reservation_id(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    first = await store.reserve("p", 300, "r1")
    again = await store.reserve("p", 300, "r1")
    assert first.created and not again.created
    assert again.tokens == 300
    assert again.lease_expires_at_ms == first.lease_expires_at_ms
    assert again.pool.reserved == 300
    # A retry that asks for more than is left still finds its reservation.
    retried = await store.reserve("p", 900, "r1")
    assert not retried.created and retried.tokens == 300
    assert (await store.get_pool("p")).reserved == 300


async def test_concurrent_reserves_never_overdraw(redis: aioredis.Redis, redis_url: str, prefix: str) -> None:
    # Two stores on two clients stand for two replicas sharing one Redis.
    other = aioredis.Redis.from_url(redis_url)
    try:
        stores = [BudgetStore(redis, prefix, 300), BudgetStore(other, prefix, 300)]
        await stores[0].upsert_pool("p", 1000)

        async def attempt(i: int) -> bool:
            try:
                await stores[i % 2].reserve("p", 7, f"r{i}")
            except BudgetExhausted:
                return False
            return True

        outcomes = await asyncio.gather(*(attempt(i) for i in range(200)))
    finally:
        await other.aclose()
    granted = sum(outcomes)
    assert granted == 1000 // 7
    pool = await stores[0].get_pool("p")
    assert pool.reserved == granted * 7
    assert pool.capacity - pool.used - pool.reserved >= 0
    assert pool.available == 1000 - granted * 7


async def test_expired_lease_returns_tokens_on_next_reserve(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 80, "dead-holder", lease_seconds=1)
    with pytest.raises(BudgetExhausted):
        await store.reserve("p", 80, "r2")
    await asyncio.sleep(2)
    granted = await store.reserve("p", 80, "r2")
    assert granted.pool == PoolView("p", capacity=100, used=0, reserved=80)
    # The dead holder's late commit changes nothing.
    late = await store.commit("dead-holder", 80)
    assert late.already_ended and late.state == "expired"
    assert await store.get_pool("p") == PoolView("p", capacity=100, used=0, reserved=80)


async def test_commit_after_lease_expiry_is_already_ended(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 60, "r1", lease_seconds=1)
    await asyncio.sleep(2)
    # No reserve or reap has run since: commit itself notices the lease is over.
    late = await store.commit("r1", 60)
    assert late.already_ended and late.state == "expired"
    assert late.pool == PoolView("p", capacity=100, used=0, reserved=0)


async def test_reap_expired_returns_tokens_of_every_pool(store: BudgetStore) -> None:
    await store.upsert_pool("a", 100)
    await store.upsert_pool("b", 100)
    await store.reserve("a", 10, "a1", lease_seconds=1)
    await store.reserve("b", 20, "b1", lease_seconds=1)
    await store.reserve("b", 30, "b2")
    await asyncio.sleep(2)
    assert await store.reap_expired() == 2
    assert await store.reap_expired() == 0
    assert await store.list_pools() == [
        PoolView("a", capacity=100, used=0, reserved=0),
        PoolView("b", capacity=100, used=0, reserved=30),
    ]


async def test_reaper_task_reclaims_without_any_reserve(store: BudgetStore, redis: aioredis.Redis) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 70, "r1", lease_seconds=1)
    task = asyncio.create_task(reap_forever(store, interval_seconds=0.2))
    try:
        reserved_raw = b"70"
        for _ in range(100):  # bounded wait, read without reclaiming (HGET, not get_pool)
            reserved_raw = await redis.hget(f"{store.key_prefix}pool:p", "reserved")
            if reserved_raw == b"0":
                break
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert reserved_raw == b"0"


async def test_exhausted_gives_retry_after_of_the_covering_lease(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 80, "long", lease_seconds=30)
    with pytest.raises(BudgetExhausted) as info:
        await store.reserve("p", 50, "r2")
    exc = info.value
    assert exc.available == 20
    assert exc.requested == 50
    assert 1 <= exc.retry_after_seconds <= 30
    assert str(exc) == "Token budget exceeded: pool 'p' has 20 tokens available, 50 requested"
    assert (await store.get_pool("p")).reserved == 80


async def test_exhausted_beyond_outstanding_leases_gives_default_retry_after(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 80, "long", lease_seconds=30)
    with pytest.raises(BudgetExhausted) as info:
        await store.reserve("p", 101, "r2")
    assert info.value.retry_after_seconds == 42  # the store's configured default


async def test_reserve_errors(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    with pytest.raises(PoolNotFound, match="'nope'"):
        await store.reserve("nope", 1, "r1")
    with pytest.raises(InvalidAmount):
        await store.reserve("p", -1, "r1")
    with pytest.raises(InvalidAmount):
        await store.reserve("p", 1, "r1", lease_seconds=-5)
    with pytest.raises(InvalidArgument):
        await store.reserve("", 1, "r1")
    with pytest.raises(InvalidArgument):
        await store.reserve("p", 1, "")
    with pytest.raises(InvalidAmount):
        await store.commit("r1", -3)
    assert (await store.get_pool("p")).reserved == 0


async def test_report_is_the_seeds_untracked_accounting(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    await store.reserve("p", 100, "r1")
    view = await store.report("p", 40, 25)
    assert view == PoolView("p", capacity=1000, used=25, reserved=60)
    # reserved saturates at zero.
    view = await store.report("p", 500, 0)
    assert view == PoolView("p", capacity=1000, used=25, reserved=0)
    with pytest.raises(PoolNotFound):
        await store.report("nope", 1, 1)


async def test_check_reserves_nothing(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 60, "r1")
    yes = await store.check("p", 40)
    no = await store.check("p", 41)
    assert yes.allowed and not no.allowed
    assert no.pool == PoolView("p", capacity=100, used=0, reserved=60)
    with pytest.raises(PoolNotFound):
        await store.check("nope", 1)


async def test_upsert_changes_capacity_and_keeps_counters(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 30, "r1")
    await store.commit("r1", 20)
    await store.reserve("p", 10, "r2")
    view = await store.upsert_pool("p", 500)
    assert view == PoolView("p", capacity=500, used=20, reserved=10)
    # ensure_pool leaves an existing pool alone and creates a missing one.
    assert (await store.ensure_pool("p", 7)).capacity == 500
    assert (await store.ensure_pool("q", 7)) == PoolView("q", capacity=7, used=0, reserved=0)
    assert [pool.name for pool in await store.list_pools()] == ["p", "q"]
    with pytest.raises(InvalidAmount):
        await store.upsert_pool("p", -1)


async def test_large_counts_stay_exact(store: BudgetStore) -> None:
    big = 2**53 - 1
    await store.upsert_pool("big", big)
    await store.reserve("big", 10**15 + 1, "r1")
    result = await store.commit("r1", 10**15 + 3)
    assert result.pool == PoolView("big", capacity=big, used=10**15 + 3, reserved=0)
    with pytest.raises(InvalidAmount):
        await store.upsert_pool("big", 2**53)
