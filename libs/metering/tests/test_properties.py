"""Property-based test of the Lua: any interleaving of reserve, commit, release, lease
expiry and reset over a three-level tree keeps ``used + reserved <= capacity`` in every
pool of the chain at each admission, never lets a counter go negative, and keeps the
books: ``reserved`` is exactly what the active reservations through a pool hold, and
``used`` exactly what ended reservations charged there since the pool's last reset."""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from hoosh_metering.errors import BudgetExhausted
from hoosh_metering.pools import BudgetStore, PoolSpec
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

REDIS_URL = os.environ.get("HOOSH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# org -> team-a -> (a1, a2), org -> team-b -> b1; the teams sum past the org.
TREE = [
    PoolSpec("org", 300),
    PoolSpec("team-a", 200, parent="org"),
    PoolSpec("team-b", 180, parent="org"),
    PoolSpec("a1", 120, parent="team-a"),
    PoolSpec("a2", 150, parent="team-a"),
    PoolSpec("b1", 150, parent="team-b"),
]
POOLS = [spec.name for spec in TREE]
LEAVES = ["a1", "a2", "b1", "team-a"]  # a reservation may start at any level

reserve = st.tuples(
    st.just("reserve"),
    st.sampled_from(LEAVES),
    st.integers(0, 100),  # prompt
    st.integers(0, 100),  # completion asked
    st.integers(0, 100),  # min completion (capped at the completion below)
    st.booleans(),  # a lease so short it is over by the next step
    st.sampled_from(["commit", "release"]),  # on_expiry
)
commit = st.tuples(st.just("commit"), st.integers(0, 40), st.integers(0, 250))  # which, actual (may overshoot)
release = st.tuples(st.just("release"), st.integers(0, 40))
expire = st.tuples(st.just("expire"))
reset = st.tuples(st.just("reset"), st.sampled_from(POOLS))
check = st.tuples(st.just("check"), st.sampled_from(LEAVES))
operations = st.lists(st.one_of(reserve, reserve, commit, release, expire, reset, check), min_size=5, max_size=40)


@dataclass
class Books:
    """What the pools should say, kept from the reservation records' transitions."""

    used: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POOLS, 0))
    states: dict[str, str] = field(default_factory=dict)


async def snapshot(client: aioredis.Redis, store: BudgetStore) -> tuple[dict[str, dict[str, int]], dict[str, dict]]:
    """Raw pool counters and reservation records, read straight from Redis."""
    pools: dict[str, dict[str, int]] = {}
    for name in POOLS:
        raw = await client.hgetall(store.pool_key(name, "org"))
        pools[name] = {key.decode(): int(value) for key, value in raw.items() if value.lstrip(b"-").isdigit()}
    records: dict[str, dict] = {}
    base = store.tree_base("org")
    async for key in client.scan_iter(match=f"{base}res:*", count=1000):
        raw = await client.hgetall(key)
        records[key.decode()[len(base) + 4 :]] = {
            "chain": raw[b"chain"].decode().split(","),
            "tokens": int(raw[b"tokens"]),
            "state": raw[b"state"].decode(),
            "charged": int(raw.get(b"charged", b"0")),
        }
    return pools, records


def audit(pools: dict[str, dict[str, int]], records: dict[str, dict], books: Books) -> None:
    """Every counter non-negative, and the books balance."""
    for name, counters in pools.items():
        for field_name in ("used", "reserved", "used_usd", "reserved_usd"):
            assert counters[field_name] >= 0, (name, field_name, counters)
    # Charges of reservations that ended since the last step land in their chain.
    for rid, record in records.items():
        before = books.states.get(rid, "active")
        if before == "active" and record["state"] != "active":
            for name in record["chain"]:
                books.used[name] += record["charged"]
        books.states[rid] = record["state"]
    for name in POOLS:
        held = sum(r["tokens"] for r in records.values() if r["state"] == "active" and name in r["chain"])
        assert pools[name]["reserved"] == held, (name, pools[name], held)
        assert pools[name]["used"] == books.used[name], (name, pools[name], books.used[name])


async def run(ops: list[tuple]) -> None:
    client = aioredis.Redis.from_url(REDIS_URL)
    prefix = f"test:metering:prop:{uuid.uuid4().hex}:"
    store = BudgetStore(client, prefix, default_lease_seconds=60, ended_retention_seconds=600)
    try:
        for spec in TREE:
            await store.create_pool(spec)
        books = Books()
        made: list[str] = []
        for step, op in enumerate(ops):
            kind = op[0]
            if kind == "reserve":
                _, pool, prompt, completion, minimum, short, policy = op
                rid = f"r{step}"
                try:
                    reservation = await store.reserve(
                        pool,
                        prompt,
                        rid,
                        lease_seconds=0.001 if short else None,
                        completion_tokens=completion,
                        min_completion_tokens=min(minimum, completion),
                        on_expiry=policy,
                    )
                except BudgetExhausted:
                    event("reserve refused")
                else:
                    event("reserve granted" if reservation.completion_tokens == completion else "reserve clamped")
                    made.append(rid)
                    assert min(minimum, completion) <= reservation.completion_tokens <= completion
                    pools, _ = await snapshot(client, store)
                    for name in reservation.chain:  # the admission invariant, in every level
                        counters = pools[name]
                        assert counters["used"] + counters["reserved"] <= counters["capacity"], (name, counters)
            elif kind == "commit" and made:
                result = await store.commit(made[op[1] % len(made)], op[2], pool="a1")  # any pool locates it
                event(f"commit: {result.state}{' (again)' if result.already_ended else ''}")
            elif kind == "release" and made:
                await store.release(made[op[1] % len(made)], pool="b1")
            elif kind == "expire":
                await asyncio.sleep(0.003)
                await store.reap_expired()
            elif kind == "reset":
                pools, records = await snapshot(client, store)
                audit(pools, records, books)
                await store.reset_pool(op[1])
                books.used[op[1]] = 0
            elif kind == "check":
                await store.check(op[1], 0)
            pools, records = await snapshot(client, store)
            audit(pools, records, books)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=operations)
def test_any_interleaving_keeps_the_pools_within_capacity_and_the_books_balanced(ops: list[tuple]) -> None:
    asyncio.run(run(ops))
