"""Property-based test of the Lua: any interleaving of reserve, commit (of any size, up
to 2**53 - 1), release, lease expiry, reset and deleting a pool to create it again over
a three-level tree keeps ``used + reserved <= capacity`` in every pool of the chain at
each admission, never lets a counter go negative or past 2**53 - 1, charges a manual
reservation at most what it reserved, and keeps the books: ``reserved`` is exactly
what the active reservations made in a pool's current incarnation hold, and ``used``
exactly what ended reservations charged there (saturating) since the pool's last reset
or creation."""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from hoosh_metering.errors import BudgetExhausted, InvalidAmount, PoolInUse
from hoosh_metering.pools import MAX_AMOUNT, BudgetStore, PoolSpec
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
SPECS = {spec.name: spec for spec in TREE}
LEAVES = ["a1", "a2", "b1", "team-a"]  # a reservation may start at any level

reserve = st.tuples(
    st.just("reserve"),
    st.sampled_from(LEAVES),
    st.integers(0, 100),  # prompt
    st.integers(0, 100),  # completion asked
    st.integers(0, 100),  # min completion (capped at the completion below)
    st.booleans(),  # a lease so short it is over by the next step
    st.sampled_from(["commit", "release"]),  # on_expiry
    st.sampled_from(["chat", "manual"]),  # kind: manual commits are capped at the reservation
)
# which, actual: may overshoot the reservation, up to the largest amount accepted
commit = st.tuples(st.just("commit"), st.integers(0, 40), st.one_of(st.integers(0, 250), st.just(MAX_AMOUNT)))
release = st.tuples(st.just("release"), st.integers(0, 40))
expire = st.tuples(st.just("expire"))
reset = st.tuples(st.just("reset"), st.sampled_from(POOLS))
check = st.tuples(st.just("check"), st.sampled_from(LEAVES))
recreate = st.tuples(st.just("recreate"), st.sampled_from(LEAVES))  # team-a has children: refused
operations = st.lists(
    st.one_of(reserve, reserve, commit, release, expire, reset, check, recreate), min_size=5, max_size=40
)


@dataclass
class Books:
    """What the pools should say, kept from the reservation records' transitions."""

    used: dict[str, int] = field(default_factory=lambda: dict.fromkeys(POOLS, 0))
    states: dict[str, str] = field(default_factory=dict)


async def snapshot(client: aioredis.Redis, store: BudgetStore) -> tuple[dict[str, dict[str, int]], dict[str, dict]]:
    """Raw pool counters (and incarnation) and reservation records, read straight from Redis."""
    pools: dict[str, dict[str, int]] = {}
    for name in POOLS:
        raw = await client.hgetall(store.pool_key(name, "org"))
        pools[name] = {key.decode(): int(value) for key, value in raw.items() if value.lstrip(b"-").isdigit()}
    records: dict[str, dict] = {}
    base = store.tree_base("org")
    async for key in client.scan_iter(match=f"{base}res:*", count=1000):
        raw = await client.hgetall(key)
        chain = raw[b"chain"].decode().split(",")
        records[key.decode()[len(base) + 4 :]] = {
            "chain": chain,
            "incs": [int(inc) for inc in raw[b"incs"].decode().split(",")] if b"incs" in raw else [0] * len(chain),
            "tokens": int(raw[b"tokens"]),
            "state": raw[b"state"].decode(),
            "kind": raw[b"kind"].decode(),
            "charged": int(raw.get(b"charged", b"0")),
        }
    return pools, records


def holds(record: dict, name: str, pools: dict[str, dict[str, int]]) -> bool:
    """Whether the record was made in the current incarnation of pool ``name``."""
    current = pools[name].get("inc", 0)
    return any(pool == name and inc == current for pool, inc in zip(record["chain"], record["incs"], strict=True))


def audit(pools: dict[str, dict[str, int]], records: dict[str, dict], books: Books) -> None:
    """Every counter within [0, 2**53 - 1], and the books balance."""
    for name, counters in pools.items():
        for field_name in ("used", "reserved", "used_usd", "reserved_usd"):
            assert 0 <= counters[field_name] <= MAX_AMOUNT, (name, field_name, counters)
    # Charges of reservations that ended since the last step land in their chain,
    # in each pool that is still the one they were made in; counters saturate.
    for rid, record in records.items():
        before = books.states.get(rid, "active")
        if before == "active" and record["state"] != "active":
            if record["kind"] == "manual":
                assert record["charged"] <= record["tokens"], record
            for name in record["chain"]:
                if holds(record, name, pools):
                    books.used[name] = min(MAX_AMOUNT, books.used[name] + record["charged"])
        books.states[rid] = record["state"]
    for name in POOLS:
        held = sum(r["tokens"] for r in records.values() if r["state"] == "active" and holds(r, name, pools))
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
                _, pool, prompt, completion, minimum, short, policy, kind_of = op
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
                        kind=kind_of,
                    )
                except BudgetExhausted:
                    event("reserve refused")
                except InvalidAmount:
                    assert kind_of == "manual" and prompt + completion == 0
                    event("manual reserve of nothing refused")
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
                if op[2] == MAX_AMOUNT:
                    event("huge commit")
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
            elif kind == "recreate":
                try:
                    await store.delete_pool(op[1])
                except PoolInUse:
                    event("delete refused: children")
                else:
                    await store.create_pool(SPECS[op[1]])
                    books.used[op[1]] = 0
                    event("pool deleted and created again")
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
