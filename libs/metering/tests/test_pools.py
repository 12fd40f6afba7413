"""BudgetStore on one pool, against the real Redis (single node and cluster): arithmetic,
exactly-once ends, leases, concurrency. Ported from the budget service's first store."""

from __future__ import annotations

import asyncio

import pytest
from hoosh_metering.errors import BudgetExhausted, InvalidAmount, InvalidArgument, PoolNotFound
from hoosh_metering.pools import MAX_AMOUNT, BudgetStore, PoolSpec, PoolView, reap_forever
from hoosh_metering.redis import RedisClient, connect_redis


def counts(view: PoolView | None) -> tuple[int, int, int]:
    """(capacity, used, reserved) of a view."""
    assert view is not None
    return view.capacity, view.used, view.reserved


async def test_reserve_then_commit_moves_tokens_from_reserved_to_used(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    reservation = await store.reserve("p", 300, "r1")
    assert reservation.created
    assert reservation.tokens == 300
    assert reservation.chain == ("p",)
    assert reservation.pool == PoolView("p", capacity=1000, used=0, reserved=300, chain=("p",))
    assert reservation.pool.available == 700

    result = await store.commit("r1", 250, pool="p")
    assert not result.already_ended
    assert result.state == "committed"
    assert counts(result.pool) == (1000, 250, 0)
    assert (await store.get_pool("p")).available == 750


async def test_release_returns_the_reservation(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    await store.reserve("p", 400, "r1")
    await store.reserve("p", 100, "r2")
    result = await store.release("r1", pool="p")
    assert not result.already_ended
    assert result.state == "released"
    assert counts(result.pool) == (1000, 0, 100)


async def test_commit_may_exceed_reservation_and_capacity(store: BudgetStore) -> None:
    # Metered usage (a chat's) is charged honestly, even past the reservation.
    await store.upsert_pool("p", 100)
    await store.reserve("p", 50, "r1", kind="chat")
    result = await store.commit("r1", 180, pool="p")
    assert counts(result.pool) == (100, 180, 0)
    assert result.pool is not None and result.pool.available == 0
    with pytest.raises(BudgetExhausted) as info:
        await store.reserve("p", 1, "r2")
    assert info.value.available == 0
    assert info.value.pool == "p" and info.value.reason == "tokens"


async def test_commit_is_exactly_once(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    await store.reserve("p", 100, "r1")
    await store.reserve("p", 100, "other")
    first = await store.commit("r1", 80, pool="p")
    second = await store.commit("r1", 80, pool="p")
    release_after = await store.release("r1", pool="p")
    assert not first.already_ended
    assert second.already_ended and second.state == "committed"
    assert release_after.already_ended and release_after.state == "committed"
    assert counts(second.pool) == (1000, 80, 100)
    assert counts(release_after.pool) == (1000, 80, 100)
    assert counts(await store.get_pool("p")) == (1000, 80, 100)


async def test_release_is_exactly_once(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    await store.reserve("p", 100, "r1")
    await store.reserve("p", 30, "other")
    first = await store.release("r1", pool="p")
    second = await store.release("r1", pool="p")
    commit_after = await store.commit("r1", 50, pool="p")
    assert not first.already_ended
    assert second.already_ended and second.state == "released"
    assert commit_after.already_ended and commit_after.state == "released"
    assert counts(await store.get_pool("p")) == (1000, 0, 30)


async def test_ending_an_unknown_reservation_changes_nothing(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    await store.reserve("p", 10, "r1")
    result = await store.commit("never-reserved", 5, pool="p")
    assert result.already_ended and result.state == "unknown" and result.pool is None
    assert (await store.release("never-reserved", pool="p")).already_ended
    # An unknown pool cannot hold it either: the same answer, nothing to retry.
    assert (await store.commit("r1", 5, pool="nope")).state == "unknown"
    assert counts(await store.get_pool("p")) == (1000, 0, 10)


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


async def test_concurrent_reserves_never_overdraw(backend: tuple[str, RedisClient, str]) -> None:
    # Two stores on two clients stand for two replicas sharing one Redis (or cluster).
    url, client, prefix = backend
    other = connect_redis(url)
    try:
        stores = [BudgetStore(client, prefix, 300), BudgetStore(other, prefix, 300)]
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
    assert pool.available == 1000 - granted * 7


async def test_expired_lease_is_released_by_the_release_policy(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 80, "dead-holder", lease_seconds=0.5, on_expiry="release")
    with pytest.raises(BudgetExhausted):
        await store.reserve("p", 80, "r2")
    await asyncio.sleep(0.7)
    granted = await store.reserve("p", 80, "r2")
    assert counts(granted.pool) == (100, 0, 80)
    # The dead holder's late commit changes nothing.
    late = await store.commit("dead-holder", 80, pool="p")
    assert late.already_ended and late.state == "expired"
    assert counts(await store.get_pool("p")) == (100, 0, 80)


async def test_expired_lease_is_charged_by_the_default_commit_policy(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 30, "dead-holder", lease_seconds=0.5)
    await asyncio.sleep(0.7)
    # The next reserve settles it: the provider may have billed it, so it is used.
    granted = await store.reserve("p", 70, "r2")
    assert counts(granted.pool) == (100, 30, 70)
    late = await store.release("dead-holder", pool="p")
    assert late.already_ended and late.state == "expired"
    assert counts(await store.get_pool("p")) == (100, 30, 70)


async def test_commit_after_lease_expiry_is_already_ended(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 60, "r1", lease_seconds=0.5, on_expiry="release")
    await asyncio.sleep(0.7)
    # No reserve or reap has run since: commit itself notices the lease is over.
    late = await store.commit("r1", 60, pool="p")
    assert late.already_ended and late.state == "expired"
    assert counts(late.pool) == (100, 0, 0)


async def test_reap_expired_settles_every_tree(store: BudgetStore) -> None:
    await store.upsert_pool("a", 100)
    await store.upsert_pool("b", 100)
    await store.reserve("a", 10, "a1", lease_seconds=0.5, on_expiry="release")
    await store.reserve("b", 20, "b1", lease_seconds=0.5)
    await store.reserve("b", 30, "b2")
    await asyncio.sleep(0.7)
    assert await store.reap_expired() == 2
    assert await store.reap_expired() == 0
    assert [counts(view) for view in await store.list_pools()] == [(100, 0, 0), (100, 20, 30)]


async def test_reaper_task_settles_without_any_reserve(store: BudgetStore, client: RedisClient) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 70, "r1", lease_seconds=0.5, on_expiry="release")
    task = asyncio.create_task(reap_forever(store, interval_seconds=0.2))
    try:
        reserved_raw: bytes | None = b"70"
        for _ in range(100):  # bounded wait, read without reclaiming (HGET, not get_pool)
            reserved_raw = await client.hget(store.pool_key("p", "p"), "reserved")
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
        await store.reserve("p{x}", 1, "r1")
    with pytest.raises(InvalidArgument):
        await store.reserve("p", 1, "")
    with pytest.raises(InvalidArgument):
        await store.reserve("p", 1, "r1", completion_tokens=5, min_completion_tokens=6)
    with pytest.raises(InvalidAmount):
        await store.reserve("p", 1, "r1", output_price_micros=2**53)
    with pytest.raises(InvalidAmount):
        await store.commit("r1", -3, pool="p")
    assert (await store.get_pool("p")).reserved == 0


async def test_report_is_untracked_usage(store: BudgetStore) -> None:
    await store.upsert_pool("p", 1000)
    await store.reserve("p", 100, "r1")
    view = await store.report("p", 25, usd_micros=7)
    assert counts(view) == (1000, 25, 100)
    assert view.used_usd_micros == 7
    with pytest.raises(PoolNotFound):
        await store.report("nope", 1)


async def test_check_reserves_nothing(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    await store.reserve("p", 60, "r1")
    yes = await store.check("p", 40)
    no = await store.check("p", 41)
    assert yes.allowed and not no.allowed
    assert no.available == 40
    assert counts(no.pool) == (100, 0, 60)
    with pytest.raises(PoolNotFound):
        await store.check("nope", 1)


async def test_upsert_changes_capacity_and_keeps_counters(store: BudgetStore) -> None:
    from hoosh_metering.pools import PoolSpec

    await store.upsert_pool("p", 100)
    await store.reserve("p", 30, "r1")
    await store.commit("r1", 20, pool="p")
    await store.reserve("p", 10, "r2")
    assert counts(await store.upsert_pool("p", 500)) == (500, 20, 10)
    # ensure_pool leaves an existing pool alone and creates a missing one.
    assert (await store.ensure_pool(PoolSpec("p", 7))).capacity == 500
    assert counts(await store.ensure_pool(PoolSpec("q", 7))) == (7, 0, 0)
    assert [pool.name for pool in await store.list_pools()] == ["p", "q"]
    assert [pool.name for pool in await store.list_pools(["q", "gone"])] == ["q"]
    with pytest.raises(InvalidAmount):
        await store.upsert_pool("p", -1)


async def test_large_counts_stay_exact(store: BudgetStore) -> None:
    big = 2**53 - 1
    await store.upsert_pool("big", big)
    await store.reserve("big", 10**15 + 1, "r1", kind="chat")
    result = await store.commit("r1", 10**15 + 3, pool="big")
    assert counts(result.pool) == (big, 10**15 + 3, 0)
    with pytest.raises(InvalidAmount):
        await store.upsert_pool("big", 2**53)


async def test_a_manual_commit_is_capped_at_its_reservation(store: BudgetStore) -> None:
    """Self-reported usage (kind manual, /v1/tokens/report) charges at most what was reserved."""
    await store.create_pool(PoolSpec("org", 10_000, cap_usd_micros=10**12))
    await store.create_pool(PoolSpec("team-a", 1_000, parent="org"))
    await store.create_pool(PoolSpec("team-b", 1_000, parent="org"))
    await store.reserve("team-a", 10, "m1", owner="key_a", kind="manual", input_price_micros=1_000_000)
    result = await store.commit("m1", MAX_AMOUNT, pool="team-a", used_usd_micros=MAX_AMOUNT, owner="key_a")
    assert result.state == "committed" and counts(result.pool) == (1_000, 10, 0)
    org = await store.get_pool("org")
    assert (org.used, org.used_usd_micros) == (10, 10)  # 10 tokens at $1 per million: 10 micro-dollars
    # The sibling's shared org is untouched by the attempt.
    assert (await store.reserve("team-b", 1_000, "b1", kind="chat")).tokens == 1_000
    # Below the reservation, the report is what is charged.
    await store.reserve("team-a", 10, "m2", kind="manual")
    assert counts((await store.commit("m2", 3, pool="team-a")).pool) == (1_000, 13, 0)


async def test_a_manual_reservation_must_reserve_something(store: BudgetStore) -> None:
    await store.upsert_pool("p", 100)
    with pytest.raises(InvalidAmount, match="nothing to reserve"):
        await store.reserve("p", 0, "m0", kind="manual")
    with pytest.raises(InvalidAmount, match="nothing to reserve"):
        await store.reserve("p", 0, "m0")  # manual is the default kind
    assert (await store.reserve("p", 0, "m1", completion_tokens=5)).tokens == 5
    assert (await store.reserve("p", 0, "c1", kind="chat")).tokens == 0  # metered kinds may start at 0
    assert (await store.get_pool("p")).reserved == 5


async def test_counters_saturate_instead_of_wrapping(store: BudgetStore, client: RedisClient) -> None:
    """However much is committed or reported, no counter passes 2**53 - 1 or goes negative."""
    await store.create_pool(PoolSpec("org", 1_000))
    await store.create_pool(PoolSpec("team", 1_000, parent="org"))
    for i in range(4):
        await store.reserve("team", 1, f"c{i}", kind="chat")
    for i in range(4):
        await store.commit(f"c{i}", MAX_AMOUNT, pool="team", used_usd_micros=MAX_AMOUNT)
        await store.report("org", MAX_AMOUNT, usd_micros=MAX_AMOUNT)
    for name in ("team", "org"):
        raw = {
            key.decode(): int(value)
            for key, value in (await client.hgetall(store.pool_key(name, "org"))).items()
            if value.lstrip(b"-").isdigit()
        }
        assert (raw["used"], raw["used_usd"], raw["reserved"], raw["reserved_usd"]) == (MAX_AMOUNT, MAX_AMOUNT, 0, 0)
    view = await store.get_pool("team")
    assert (view.used, view.available) == (MAX_AMOUNT, 0)
    with pytest.raises(BudgetExhausted):
        await store.reserve("team", 1, "after", kind="chat")
    # A counter already out of range (written by an older script) is read as saturated.
    await client.hset(store.pool_key("team", "org"), mapping={"used": "-9223372036854775808", "reserved": "-5"})
    await client.hset(store.pool_key("org", "org"), "used", "0")
    reservation = await store.reserve("team", 10, "r1", kind="chat")
    assert (reservation.pool.used, reservation.pool.reserved) == (0, 10)
    await store.commit("r1", 4, pool="team")
    raw = await client.hmget(store.pool_key("team", "org"), ["used", "reserved"])
    assert [int(value) for value in raw] == [4, 0]


def run_twice(script):  # type: ignore[no-untyped-def]
    """What redis-py's retry does after a reply is lost: the same command, sent again."""

    async def call(keys: list, args: list) -> object:  # type: ignore[type-arg]
        await script(keys=keys, args=args)
        return await script(keys=keys, args=args)

    return call


async def test_report_is_counted_once_per_id_and_a_retried_call_once(store: BudgetStore) -> None:
    await store.create_pool(PoolSpec("org", 1_000))
    await store.create_pool(PoolSpec("team", 1_000, parent="org"))
    assert (await store.report("team", 7, report_id="rep-1")).used == 7
    assert (await store.report("team", 7, report_id="rep-1")).used == 7  # the same report again
    assert (await store.report("team", 5, report_id="rep-2")).used == 12
    assert (await store.report("team", 1)).used == 13  # without an id every call counts
    assert (await store.report("team", 1)).used == 14
    store._lua_report = run_twice(store._lua_report)  # type: ignore[method-assign]
    assert (await store.report("team", 10)).used == 24  # the client's retry ran the script again
    assert (await store.get_pool("org")).used == 24
    with pytest.raises(InvalidArgument):
        await store.report("team", 1, report_id="")
