"""``BudgetStore.read_state``: every pool's counters and open reservations exactly as
Redis holds them, read without settling or rolling anything. On the single node and
on the cluster (the ``store`` fixture)."""

from __future__ import annotations

import asyncio

from hoosh_metering.pools import BudgetStore, PoolSpec, PoolState, StoreState, TreeState
from hoosh_metering.redis import RedisClient

FIELDS = ["capacity", "used", "reserved", "cap_usd", "used_usd", "reserved_usd"]


async def stored(client: RedisClient, store: BudgetStore, name: str, root: str) -> tuple[int | None, ...]:
    """The pool hash's counters, read straight from Redis."""
    raw = await client.hmget(store.pool_key(name, root), FIELDS)
    return tuple(int(value) if value else None for value in raw)


def held(pool: PoolState) -> tuple[int | None, ...]:
    return (
        pool.capacity,
        pool.used,
        pool.reserved,
        pool.cap_usd_micros,
        pool.used_usd_micros,
        pool.reserved_usd_micros,
    )


def by_name(state: StoreState) -> dict[str, PoolState]:
    return {pool.name: pool for pool in state.pools}


def trees(state: StoreState) -> dict[str, TreeState]:
    return {tree.root: tree for tree in state.trees}


async def forest(store: BudgetStore) -> None:
    """org (USD cap) <- team <- key, org <- team2; and a second tree ``solo``."""
    await store.create_pool(PoolSpec("org", 10_000, cap_usd_micros=5_000_000))
    await store.create_pool(PoolSpec("team", 5_000, parent="org", period="daily"))
    await store.create_pool(PoolSpec("key", 3_000, parent="team"))
    await store.create_pool(PoolSpec("team2", 2_000, parent="org"))
    await store.create_pool(PoolSpec("solo", 700))


async def test_counters_and_open_reservations_match_redis(store: BudgetStore, client: RedisClient) -> None:
    await forest(store)
    await store.reserve("key", 100, "r1", input_price_micros=1_000_000)
    await store.reserve("key", 40, "r2", kind="chat")
    await store.reserve("team2", 30, "r3")
    await store.reserve("solo", 20, "r4")
    await store.commit("r2", 25, pool="key", used_usd_micros=7)

    state = await store.read_state()
    assert state.unreachable == ()
    pools = by_name(state)
    assert sorted(pools) == ["key", "org", "solo", "team", "team2"]
    for pool in pools.values():
        assert held(pool) == await stored(client, store, pool.name, pool.root)
    assert held(pools["org"]) == (10_000, 25, 130, 5_000_000, 7, 100)
    assert (pools["team"].parent, pools["team"].period, pools["team"].root) == ("org", "daily", "org")
    assert (pools["org"].parent, pools["org"].period) == (None, "none")
    # An open reservation counts in every pool that holds its tokens, as reserved does.
    assert {name: pool.open_reservations for name, pool in pools.items()} == {
        "org": 2,
        "team": 1,
        "key": 1,
        "team2": 1,
        "solo": 1,
    }
    assert {root: (tree.open_reservations, tree.complete) for root, tree in trees(state).items()} == {
        "org": (2, True),
        "solo": (1, True),
    }

    # One tree per round trip reads the same; a lease bound keeps the tree totals exact.
    assert sorted(by_name(await store.read_state(trees_per_batch=1)).items()) == sorted(pools.items())
    bounded = await store.read_state(max_leases=1)
    assert trees(bounded)["org"].open_reservations == 2 and not trees(bounded)["org"].complete
    assert by_name(bounded)["org"].open_reservations == 1
    assert trees(bounded)["solo"] == trees(state)["solo"]


async def test_reading_settles_nothing(store: BudgetStore, client: RedisClient) -> None:
    await store.create_pool(PoolSpec("p", 100))
    await store.reserve("p", 60, "short", lease_seconds=0.05)
    await asyncio.sleep(0.1)
    before = await stored(client, store, "p", "p")
    pool = by_name(await store.read_state())["p"]
    # The lease is past its expiry: still reserved and open until something settles it.
    assert (pool.reserved, pool.open_reservations) == (60, 1)
    assert await stored(client, store, "p", "p") == before
    assert await client.zcard(f"{store.tree_base('p')}lease") == 1
    assert await store.reap_expired() == 1
    pool = by_name(await store.read_state())["p"]
    assert (pool.used, pool.reserved, pool.open_reservations) == (60, 0, 0)


async def test_a_pool_created_again_is_not_held_by_old_reservations(store: BudgetStore) -> None:
    await store.create_pool(PoolSpec("org", 1000))
    await store.create_pool(PoolSpec("leaf", 500, parent="org"))
    await store.reserve("leaf", 50, "old")
    await store.delete_pool("leaf")
    await store.create_pool(PoolSpec("leaf", 500, parent="org"))
    pools = by_name(await store.read_state())
    # The old reservation still holds tokens in org, not in the new leaf.
    assert (pools["org"].reserved, pools["org"].open_reservations) == (50, 1)
    assert (pools["leaf"].reserved, pools["leaf"].open_reservations) == (0, 0)


async def test_an_empty_store_reads_empty(store: BudgetStore) -> None:
    assert await store.read_state() == StoreState(())
