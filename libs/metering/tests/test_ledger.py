"""The cost ledger the budget scripts keep beside the pool counters: one line per
(UTC day, provider, model, pool, key), written in the same script as the charge, on
the single node and on the three-master cluster."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, timedelta

import pytest
from hoosh_metering.errors import InvalidArgument
from hoosh_metering.pools import BudgetStore, CostLine, LedgerLine, PoolSpec
from hoosh_metering.redis import RedisClient


def today() -> date:
    return datetime.now(UTC).date()


async def tree(store: BudgetStore) -> None:
    await store.create_pool(PoolSpec("org", 10**9))
    await store.create_pool(PoolSpec("team", 10**6, parent="org"))


async def test_a_commit_writes_its_line_and_a_release_none(store: BudgetStore) -> None:
    await tree(store)
    await store.reserve("team", 10, "a", completion_tokens=50, owner="key_a", kind="chat")
    await store.commit("a", 40, pool="team", owner="key_a", used_usd_micros=17, ledger=LedgerLine("p1", "m1", 10, 30))
    await store.reserve("team", 10, "b", completion_tokens=50, owner="key_a", kind="chat")
    await store.commit("b", 25, pool="team", used_usd_micros=8, ledger=LedgerLine("p1", "m1", 10, 15))
    await store.reserve("team", 10, "c", completion_tokens=50, owner="key_b", kind="chat")
    await store.release("c", pool="team")
    day = today().isoformat()
    assert await store.costs(today(), today()) == [
        CostLine(day, "p1", "m1", "team", "key_a", requests=2, prompt_tokens=20, completion_tokens=45, usd_micros=25)
    ]


async def test_a_repeated_commit_is_counted_once(store: BudgetStore) -> None:
    await tree(store)
    await store.reserve("team", 5, "once", completion_tokens=5, owner="k", kind="chat")
    for _ in range(3):
        await store.commit("once", 9, pool="team", used_usd_micros=3, ledger=LedgerLine("p", "m", 5, 4))
    (line,) = await store.costs(today(), today())
    assert (line.requests, line.prompt_tokens, line.completion_tokens, line.usd_micros) == (1, 5, 4, 3)


async def test_without_a_line_the_charge_is_prompt_of_provider_and_model_unknown(store: BudgetStore) -> None:
    await tree(store)
    await store.reserve("team", 30, "manual", owner="key_m", input_price_micros=10**6)  # 30 micro-dollars held
    await store.commit("manual", 12, pool="team", used_usd_micros=2)
    await store.report("team", 7, usd_micros=1)
    lines = {(line.provider, line.model, line.key_id): line for line in await store.costs(today(), today())}
    assert lines[("", "", "key_m")].prompt_tokens == 12 and lines[("", "", "key_m")].usd_micros == 2
    assert lines[("", "", "")].prompt_tokens == 7 and lines[("", "", "")].usd_micros == 1


async def test_an_expired_lease_settled_by_commit_is_in_the_ledger(store: BudgetStore) -> None:
    await tree(store)
    await store.reserve("team", 40, "dead", lease_seconds=0.3, owner="key_d", kind="chat", input_price_micros=10**6)
    await asyncio.sleep(0.5)
    assert await store.reap_expired() == 1
    (line,) = await store.costs(today(), today())
    assert (line.provider, line.pool, line.key_id, line.prompt_tokens, line.usd_micros) == ("", "team", "key_d", 40, 40)


async def test_a_counter_past_int64_never_stops_the_charge(store: BudgetStore, client: RedisClient) -> None:
    await tree(store)
    day = (today() - date(1970, 1, 1)).days
    field = "p\tm\tteam\tk\tp"
    await client.hset(f"{store.tree_base('org')}costs:{day}", field, str(2**63 - 10))
    await store.reserve("team", 100, "big", owner="k", kind="chat")
    result = await store.commit("big", 100, pool="team", ledger=LedgerLine("p", "m", 100, 0))
    assert result.state == "committed" and result.pool is not None and result.pool.used == 100


async def test_days_outside_the_range_are_left_out_and_ranges_are_bounded(store: BudgetStore) -> None:
    await tree(store)
    await store.reserve("team", 3, "x", owner="k", kind="chat")
    await store.commit("x", 3, pool="team", ledger=LedgerLine("p", "m", 3, 0))
    assert await store.costs(today() - timedelta(days=9), today() - timedelta(days=1)) == []
    assert len(await store.costs(today() - timedelta(days=9), today())) == 1
    with pytest.raises(InvalidArgument):
        await store.costs(today(), today() - timedelta(days=1))
    with pytest.raises(InvalidArgument):
        await store.costs(today() - timedelta(days=400), today())


async def test_a_deleted_pools_costs_remain(store: BudgetStore) -> None:
    await store.create_pool(PoolSpec("gone", 1000))
    await store.reserve("gone", 3, "x", owner="k", kind="chat")
    await store.commit("x", 3, pool="gone", used_usd_micros=5, ledger=LedgerLine("p", "m", 3, 0))
    await store.delete_pool("gone")
    (line,) = await store.costs(today(), today())
    assert line.pool == "gone" and line.usd_micros == 5


async def test_a_line_with_whitespace_never_stops_the_charge(store: BudgetStore) -> None:
    await tree(store)
    await store.reserve("team", 3, "x", owner="k", kind="chat")
    result = await store.commit("x", 3, pool="team", used_usd_micros=4, ledger=LedgerLine("a provider", "m\tx", 3, 0))
    assert result.state == "committed" and result.pool is not None and result.pool.used == 3
    (line,) = await store.costs(today(), today())
    assert (line.provider, line.model, line.usd_micros) == ("a_provider", "m_x", 4)


async def test_a_days_ledger_expires(store: BudgetStore, client: RedisClient) -> None:
    await tree(store)
    for index, line in enumerate((LedgerLine("p", "m", 1, 0), LedgerLine("p", "other", 1, 0))):
        await store.reserve("team", 1, f"x{index}", owner="k", kind="chat")
        await store.commit(f"x{index}", 1, pool="team", ledger=line)
    day = (today() - date(1970, 1, 1)).days
    ttl = await client.ttl(f"{store.tree_base('org')}costs:{day}")
    assert 399 * 86400 < ttl <= 400 * 86400


async def test_costs_of_some_pools_read_only_their_trees(store: BudgetStore) -> None:
    await tree(store)
    await store.create_pool(PoolSpec("elsewhere", 1000))
    for pool, key in (("team", "k1"), ("team", "k2"), ("elsewhere", "k1")):
        rid = f"{pool}-{key}"
        await store.reserve(pool, 2, rid, owner=key, kind="chat")
        await store.commit(rid, 2, pool=pool, ledger=LedgerLine("p", "m", 2, 0))
    mine = await store.costs(today(), today(), pools=["team"], key_id="k1")
    assert [(line.pool, line.key_id) for line in mine] == [("team", "k1")]
    assert {(line.pool, line.key_id) for line in await store.costs(today(), today(), key_id="k1")} == {
        ("team", "k1"),
        ("elsewhere", "k1"),
    }
    assert await store.costs(today(), today(), pools=["no-such-pool"]) == []
