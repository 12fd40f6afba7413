"""Pool trees: all-or-none reservations along a chain, the completion clamp, money caps,
owners, leases and their expiry policy, admin calls, and the directory every replica
keeps in memory. On the single node and on the cluster (the ``store`` fixture)."""

from __future__ import annotations

import asyncio
import random

import pytest
from hoosh_metering.errors import (
    BudgetExhausted,
    InvalidArgument,
    NotOwner,
    PoolExists,
    PoolInUse,
    PoolNotFound,
)
from hoosh_metering.pools import UNSET, BudgetStore, PoolSpec, PoolView, cost_micros
from hoosh_metering.redis import RedisClient, connect_redis


def counts(view: PoolView | None) -> tuple[int, int, int]:
    assert view is not None
    return view.capacity, view.used, view.reserved


async def tree(store: BudgetStore, org: int = 1000, team: int = 500, key: int = 300) -> None:
    """org -> team -> key."""
    await store.create_pool(PoolSpec("org", org))
    await store.create_pool(PoolSpec("team", team, parent="org"))
    await store.create_pool(PoolSpec("key", key, parent="team"))


async def counters(store: BudgetStore) -> dict[str, tuple[int, int, int]]:
    return {view.name: counts(view) for view in await store.list_pools()}


async def test_a_reservation_is_made_in_every_ancestor(store: BudgetStore) -> None:
    await tree(store)
    reservation = await store.reserve("key", 100, "r1")
    assert reservation.chain == ("key", "team", "org")
    assert reservation.pool.chain == ("key", "team", "org")
    assert await counters(store) == {"org": (1000, 0, 100), "team": (500, 0, 100), "key": (300, 0, 100)}
    await store.commit("r1", 60, pool="key")
    assert await counters(store) == {"org": (1000, 60, 0), "team": (500, 60, 0), "key": (300, 60, 0)}
    assert await store.chain("key") == ("key", "team", "org")


async def test_all_or_none_when_any_level_cannot_cover(store: BudgetStore) -> None:
    await tree(store, org=1000, team=150, key=300)
    await store.create_pool(PoolSpec("key2", 300, parent="team"))
    await store.reserve("key2", 100, "r0")
    # key could afford 200, team only 50: nothing is reserved anywhere.
    with pytest.raises(BudgetExhausted) as info:
        await store.reserve("key", 200, "r1")
    assert info.value.pool == "team" and info.value.available == 50 and info.value.requested == 200
    assert await counters(store) == {
        "org": (1000, 0, 100),
        "team": (150, 0, 100),
        "key": (300, 0, 0),
        "key2": (300, 0, 100),
    }
    # The root as the tightest level.
    await store.update_pool("org", capacity=120)
    with pytest.raises(BudgetExhausted) as info:
        await store.reserve("key", 30, "r2")
    assert info.value.pool == "org" and info.value.available == 20
    assert (await store.get_pool("key")).reserved == 0


async def test_completion_is_clamped_to_what_the_tightest_level_affords(store: BudgetStore) -> None:
    await tree(store, org=1000, team=400, key=300)
    await store.reserve("team", 200, "other")  # the team has 200 left; the key 300
    granted = await store.reserve("key", 50, "r1", completion_tokens=1000, min_completion_tokens=1)
    assert granted.completion_tokens == 150 and granted.tokens == 200
    assert await counters(store) == {"org": (1000, 0, 400), "team": (400, 0, 400), "key": (300, 0, 200)}
    # Without a minimum below the full completion there is no clamp.
    with pytest.raises(BudgetExhausted) as info:
        await store.reserve("key", 0, "r2", completion_tokens=10)
    assert info.value.pool == "team" and info.value.requested == 10
    # A minimum the tightest level cannot meet fails all or none.
    await store.release("other", pool="team")
    with pytest.raises(BudgetExhausted) as info:
        await store.reserve("key", 50, "r3", completion_tokens=100, min_completion_tokens=60)
    assert info.value.pool == "key" and info.value.available == 100 and info.value.requested == 110
    exact = await store.reserve("key", 50, "r4", completion_tokens=100, min_completion_tokens=50)
    assert exact.completion_tokens == 50


async def test_money_caps_bound_the_completion(store: BudgetStore) -> None:
    await store.create_pool(PoolSpec("org", 10**9, cap_usd_micros=10_000))
    await store.create_pool(PoolSpec("team", 10**9, parent="org", cap_usd_micros=5_000))
    # $1 / Mtok in, $3 / Mtok out: 1 and 3 micro-dollars per token.
    granted = await store.reserve(
        "team",
        1_000,
        "r1",
        completion_tokens=10_000,
        min_completion_tokens=1,
        input_price_micros=1_000_000,
        output_price_micros=3_000_000,
    )
    assert granted.completion_tokens == 1_333  # (5000 - 1000) // 3
    assert granted.usd_micros == 1_000 + cost_micros(1_333, 3_000_000) == 4_999
    team = await store.get_pool("team")
    assert team.reserved_usd_micros == 4_999 and team.available_usd_micros == 1
    with pytest.raises(BudgetExhausted) as info:
        await store.reserve("team", 10, "r2", input_price_micros=1_000_000)
    assert info.value.reason == "usd" and info.value.pool == "team"
    assert info.value.available == 1 and info.value.requested == 10
    assert "micro-dollars" in str(info.value)
    # The commit charges the real cost; the cap then has room again.
    await store.commit("r1", 1_500, pool="team", used_usd_micros=2_500)
    org = await store.get_pool("org")
    assert (org.used_usd_micros, org.reserved_usd_micros) == (2_500, 0)
    # Free tokens (no price) never touch the money cap.
    free = await store.reserve("team", 10, "r3", completion_tokens=5)
    assert free.usd_micros == 0


def test_cost_is_rounded_up_to_the_micro_dollar() -> None:
    assert cost_micros(0, 5_000_000) == 0
    assert cost_micros(1, 1) == 1
    assert cost_micros(1_000_000, 1) == 1
    assert cost_micros(1_000_001, 1) == 2
    assert cost_micros(3, 333_334) == 2


async def test_price_arithmetic_stays_exact_near_the_limits(store: BudgetStore) -> None:
    # tokens * price here is about 2**63: the scripts must not form it.
    price = 9_000_000_000
    tokens = 10**9
    cap = cost_micros(tokens, price) + cost_micros(10**6, price) - 1
    await store.create_pool(PoolSpec("p", 2**52, cap_usd_micros=cap))
    granted = await store.reserve(
        "p",
        tokens,
        "r1",
        completion_tokens=10**6,
        min_completion_tokens=0,
        input_price_micros=price,
        output_price_micros=price,
    )
    assert granted.completion_tokens == 10**6 - 1
    assert granted.usd_micros == cost_micros(tokens, price) + cost_micros(10**6 - 1, price)
    assert granted.usd_micros <= cap


async def test_only_the_owner_and_kind_may_end_a_reservation(store: BudgetStore) -> None:
    await tree(store)
    await store.reserve("key", 50, "r1", owner="key_a", kind="chat")
    with pytest.raises(NotOwner):
        await store.commit("r1", 0, pool="key", owner="key_b")
    with pytest.raises(NotOwner):
        await store.release("r1", pool="key", owner="key_a", kind="manual")
    with pytest.raises(NotOwner):  # the same id from another owner is not theirs to reuse
        await store.reserve("key", 50, "r1", owner="key_b")
    assert (await store.get_pool("key")).reserved == 50
    result = await store.commit("r1", 40, pool="key", owner="key_a", kind="chat")
    assert result.state == "committed" and not result.already_ended
    # Not giving owner/kind (the service itself settling) is always allowed.
    await store.reserve("key", 5, "r2", owner="key_a")
    assert (await store.release("r2", pool="key")).state == "released"


async def test_renew_extends_an_active_lease(store: BudgetStore) -> None:
    await tree(store)
    first = await store.reserve("key", 10, "r1", lease_seconds=0.5, on_expiry="release")
    renewed = await store.renew("r1", pool="key", lease_seconds=5)
    assert renewed is not None and renewed >= first.lease_expires_at_ms + 4_000
    await asyncio.sleep(0.7)
    assert (await store.get_pool("key")).reserved == 10  # still held
    assert (await store.commit("r1", 8, pool="key")).state == "committed"
    assert await store.renew("r1", pool="key") is None
    assert await store.renew("never", pool="key") is None
    assert await store.renew("r1", pool="gone") is None


async def test_an_expired_lease_is_settled_in_every_level_by_its_policy(store: BudgetStore) -> None:
    await tree(store)
    await store.reserve("key", 40, "charged", lease_seconds=0.5)  # the store's default: commit
    await store.reserve("key", 25, "given-back", lease_seconds=0.5, on_expiry="release")
    await asyncio.sleep(0.7)
    assert await store.reap_expired() == 2
    assert await counters(store) == {"org": (1000, 40, 0), "team": (500, 40, 0), "key": (300, 40, 0)}
    assert (await store.commit("charged", 1, pool="key")).state == "expired"


async def test_a_release_store_policy_applies_when_the_reservation_names_none(
    backend: tuple[str, RedisClient, str],
) -> None:
    _, client, prefix = backend
    store = BudgetStore(client, prefix, 300, expiry_policy="release")
    await store.create_pool(PoolSpec("p", 100))
    await store.reserve("p", 40, "r1", lease_seconds=0.5)
    await asyncio.sleep(0.7)
    assert await store.reap_expired() == 1
    assert counts(await store.get_pool("p")) == (100, 0, 0)


async def test_pool_admin(store: BudgetStore) -> None:
    await tree(store)
    with pytest.raises(PoolExists):
        await store.create_pool(PoolSpec("team", 1))
    with pytest.raises(PoolExists):  # names are unique across trees
        await store.create_pool(PoolSpec("key", 1, parent=None))
    with pytest.raises(PoolNotFound, match="'ghost'"):
        await store.create_pool(PoolSpec("x", 1, parent="ghost"))
    with pytest.raises(InvalidArgument):
        await store.create_pool(PoolSpec("bad name", 1))
    with pytest.raises(InvalidArgument):
        await store.create_pool(PoolSpec("x" * 65, 1))
    with pytest.raises(InvalidArgument):
        await store.create_pool(PoolSpec("x", 1, period="fortnightly"))
    with pytest.raises(InvalidArgument):
        await store.create_pool(PoolSpec("x", 1, period="daily", timezone="Mars/Olympus"))
    with pytest.raises(InvalidArgument):  # a parent is fixed at creation
        await store.apply_pool(PoolSpec("key", 300, parent="org"))
    with pytest.raises(InvalidArgument):
        await store.apply_pool(PoolSpec("key", 300))
    # ensure_pool leaves an existing pool as it is, whatever the spec says.
    assert (await store.ensure_pool(PoolSpec("key", 1, parent="org"))).chain == ("key", "team", "org")
    assert (await store.ensure_pool(PoolSpec("key", 1))).capacity == 300

    await store.reserve("key", 10, "r1")
    with pytest.raises(PoolInUse):
        await store.delete_pool("team")
    applied = await store.apply_pool(
        PoolSpec("team", 900, parent="org", period="daily", timezone="Europe/Berlin", cap_usd_micros=50)
    )
    assert (applied.capacity, applied.period, applied.timezone, applied.cap_usd_micros) == (
        900,
        "daily",
        "Europe/Berlin",
        50,
    )
    assert applied.reserved == 10 and applied.period_start_ms < applied.period_end_ms
    updated = await store.update_pool("team", capacity=800, cap_usd_micros=None)
    assert (updated.capacity, updated.period, updated.cap_usd_micros) == (800, "daily", None)
    kept = await store.update_pool("team", cap_usd_micros=UNSET)
    assert kept.cap_usd_micros is None and kept.capacity == 800
    with pytest.raises(PoolNotFound):
        await store.update_pool("ghost", capacity=1)

    await store.delete_pool("key")
    with pytest.raises(PoolNotFound):
        await store.get_pool("key")
    # Its open reservation still ends in the levels that remain.
    assert (await store.get_pool("team")).reserved == 10
    await store.delete_pool("team")
    await store.delete_pool("org")
    assert await store.list_pools() == []
    with pytest.raises(PoolNotFound):
        await store.delete_pool("org")
    # The name is free again, in another tree.
    await store.create_pool(PoolSpec("root2", 5))
    assert (await store.create_pool(PoolSpec("team", 5, parent="root2"))).chain == ("team", "root2")


async def test_depth_is_at_most_eight(store: BudgetStore) -> None:
    await store.create_pool(PoolSpec("l1", 100))
    for level in range(2, 9):
        await store.create_pool(PoolSpec(f"l{level}", 100, parent=f"l{level - 1}"))
    assert len(await store.chain("l8")) == 8
    with pytest.raises(InvalidArgument, match="deeper"):
        await store.create_pool(PoolSpec("l9", 100, parent="l8"))
    reservation = await store.reserve("l8", 10, "deep")
    assert len(reservation.chain) == 8
    assert all(view.reserved == 10 for view in await store.list_pools())


async def test_reset_pool_starts_usage_again_and_keeps_reservations(store: BudgetStore) -> None:
    await tree(store)
    await store.reserve("key", 100, "r1")
    await store.report("key", 70)
    roll = await store.reset_pool("team")
    assert (roll.pool, roll.reason, roll.used, roll.capacity, roll.chain) == ("team", "admin", 70, 500, ("team", "org"))
    assert roll.period_start_ms > 0
    assert await counters(store) == {"org": (1000, 70, 100), "team": (500, 0, 100), "key": (300, 70, 100)}
    # The reserved tokens commit into the new span.
    await store.commit("r1", 90, pool="key")
    assert (await store.get_pool("team")).used == 90
    assert await store.roll_periods() == []  # an admin reset is its caller's to announce
    with pytest.raises(PoolNotFound):
        await store.reset_pool("ghost")


async def test_concurrent_reserves_over_a_three_level_tree_never_exceed_any_capacity(
    backend: tuple[str, RedisClient, str],
) -> None:
    url, client, prefix = backend
    other = connect_redis(url)
    stores = [BudgetStore(client, prefix, 300), BudgetStore(other, prefix, 300)]
    try:
        await stores[0].create_pool(PoolSpec("org", 1000))
        for team in ("t1", "t2"):
            await stores[0].create_pool(PoolSpec(team, 700, parent="org"))  # teams sum past the org
            for k in range(3):
                await stores[0].create_pool(PoolSpec(f"{team}-k{k}", 300, parent=team))
        leaves = [f"{team}-k{k}" for team in ("t1", "t2") for k in range(3)]
        rng = random.Random(8)
        sizes = [rng.randint(1, 40) for _ in range(400)]

        async def attempt(i: int) -> int:
            try:
                reservation = await stores[i % 2].reserve(
                    leaves[i % len(leaves)], sizes[i], f"r{i}", completion_tokens=20, min_completion_tokens=0
                )
            except BudgetExhausted:
                return 0
            return reservation.tokens

        granted = await asyncio.gather(*(attempt(i) for i in range(len(sizes))))
        views = {view.name: view for view in await stores[1].list_pools()}
    finally:
        await other.aclose()
    assert sum(granted) == views["org"].reserved
    assert views["org"].reserved <= 1000
    assert views["org"].reserved >= 1000 - 40  # the root, not a team, is what ran out
    for view in views.values():
        assert view.used + view.reserved <= view.capacity
    for team in ("t1", "t2"):
        assert views[team].reserved == sum(views[f"{team}-k{k}"].reserved for k in range(3))


async def test_another_replica_finds_a_new_pool(backend: tuple[str, RedisClient, str]) -> None:
    url, client, prefix = backend
    other = connect_redis(url)
    try:
        writer = BudgetStore(client, prefix, 300)
        reader = BudgetStore(other, prefix, 300, directory_refresh_seconds=3600)
        await writer.create_pool(PoolSpec("org", 100))
        assert await reader.chain("org") == ("org",)
        # A pool the reader has not seen: found on the miss, without waiting for a refresh.
        await writer.create_pool(PoolSpec("team", 50, parent="org"))
        assert (await reader.reserve("team", 10, "r1")).chain == ("team", "org")
    finally:
        await other.aclose()


async def test_change_notices_reach_a_started_replica(backend: tuple[str, RedisClient, str]) -> None:
    url, client, prefix = backend
    other = connect_redis(url)
    writer = BudgetStore(client, prefix, 300)
    reader = BudgetStore(other, prefix, 300, directory_refresh_seconds=3600)
    try:
        await writer.create_pool(PoolSpec("org", 100))
        await reader.start()
        await reader.reserve("org", 1, "r1")
        await writer.update_pool("org", period="hourly", timezone="Asia/Kolkata")
        for _ in range(50):  # the reader hears of it well within a second, without a miss
            if reader._dir.entries["org"].period == "hourly":
                break
            await asyncio.sleep(0.02)
        assert reader._dir.entries["org"].timezone == "Asia/Kolkata"
        view = await reader.get_pool("org")
        assert (view.period, view.timezone, view.reserved) == ("hourly", "Asia/Kolkata", 1)
    finally:
        await reader.close()
        await other.aclose()


async def test_a_stale_directory_is_corrected_by_the_script(backend: tuple[str, RedisClient, str]) -> None:
    # The reader's picture says "none"; the pool has a period now. The script notices,
    # the reader reloads and the call succeeds with the right period.
    url, client, prefix = backend
    other = connect_redis(url)
    try:
        writer = BudgetStore(client, prefix, 300)
        reader = BudgetStore(other, prefix, 300, directory_refresh_seconds=3600)
        await writer.create_pool(PoolSpec("org", 100))
        await reader.chain("org")
        await writer.update_pool("org", period="daily")
        reservation = await reader.reserve("org", 5, "r1")
        assert reservation.pool.period == "daily"
        assert reader._dir.entries["org"].period == "daily"
    finally:
        await other.aclose()


async def test_a_pool_created_again_under_a_deleted_name_is_a_new_pool(store: BudgetStore) -> None:
    """Reservations of the deleted pool never touch the new one (its incarnation differs)."""
    await store.create_pool(PoolSpec("org", 1_000_000))
    await store.create_pool(PoolSpec("team", 1_000, parent="org"))
    await store.reserve("team", 900, "old", owner="k", kind="chat")
    await store.reserve("team", 50, "old2", owner="k", kind="chat")
    await store.delete_pool("team")
    await store.create_pool(PoolSpec("team", 1_000, parent="org"))
    await store.reserve("team", 1_000, "new1", owner="k", kind="chat")
    released = await store.release("old", pool="team", owner="k", kind="chat")
    assert released.state == "released" and not released.already_ended
    committed = await store.commit("old2", 30, pool="team", owner="k", kind="chat")
    assert committed.state == "committed"
    assert await counters(store) == {"org": (1_000_000, 30, 1_000), "team": (1_000, 0, 1_000)}
    with pytest.raises(BudgetExhausted):  # new1 still holds the whole new pool
        await store.reserve("team", 900, "new2", owner="k", kind="chat")
    # The same through the lease: the old reservation expires in the old pool's ancestors only.
    await store.release("new1", pool="team")
    await store.reserve("team", 5, "short", owner="k", kind="chat", lease_seconds=0.2)
    await store.reserve("team", 100, "stays", owner="k", kind="chat")
    await store.delete_pool("team")
    await store.create_pool(PoolSpec("team", 1_000, parent="org"))
    await store.reserve("team", 10, "fresh", owner="k", kind="chat")
    await asyncio.sleep(0.3)
    assert await store.reap_expired() == 1
    assert await counters(store) == {"org": (1_000_000, 35, 110), "team": (1_000, 0, 10)}


@pytest.mark.parametrize("end", ["commit", "release", "expire"])
async def test_a_reservation_whose_pool_was_deleted_settles_in_its_ancestors(store: BudgetStore, end: str) -> None:
    await tree(store)
    await store.reserve("key", 100, "r1", lease_seconds=0.3 if end == "expire" else None, owner="k", kind="chat")
    await store.delete_pool("key")
    if end == "commit":
        result = await store.commit("r1", 60, pool="key", owner="k", kind="chat")
        assert (result.state, result.already_ended, result.pool) == ("committed", False, None)
        assert (await store.commit("r1", 60, pool="key")).state == "committed"  # exactly once
    elif end == "release":
        result = await store.release("r1", pool="key", owner="k", kind="chat")
        assert (result.state, result.already_ended) == ("released", False)
    else:
        await asyncio.sleep(0.4)
        assert await store.reap_expired() == 1
    charged = 0 if end == "release" else (60 if end == "commit" else 100)
    assert await counters(store) == {"org": (1000, charged, 0), "team": (500, charged, 0)}
    assert (await store.commit("never", 1, pool="key")).state == "unknown"


async def test_a_deleted_pools_reservation_settles_even_when_its_name_moved_to_another_tree(
    store: BudgetStore,
) -> None:
    await tree(store)
    await store.reserve("key", 100, "r1", owner="k", kind="chat")
    await store.delete_pool("key")
    await store.create_pool(PoolSpec("other", 50))
    await store.create_pool(PoolSpec("key", 50, parent="other"))  # the name now lives elsewhere
    result = await store.commit("r1", 70, pool="key", owner="k", kind="chat")
    assert (result.state, result.already_ended) == ("committed", False)
    assert await counters(store) == {
        "org": (1000, 70, 0),
        "team": (500, 70, 0),
        "other": (50, 0, 0),
        "key": (50, 0, 0),
    }
