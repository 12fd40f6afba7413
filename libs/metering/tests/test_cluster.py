"""The store on a three-master Redis Cluster: trees whose roots land on different
masters, reserved into concurrently by two replicas. (The core store, hierarchy,
period and limiter tests also run on this cluster through the ``backend`` fixture.)"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from typing import Protocol

import pytest
from hoosh_metering.errors import BudgetExhausted
from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_metering.redis import BoundedRedisCluster, connect_redis, is_cluster_url


class Cluster(Protocol):
    url: str


def roots_on_distinct_masters(client: BoundedRedisCluster, prefix: str, count: int) -> list[str]:
    """Root names whose trees live on ``count`` different masters."""
    chosen: dict[str, str] = {}
    for i in itertools.count():
        name = f"org{i}"
        node = client.get_node_from_key(f"{prefix}{{{name}}}:lease")
        assert node is not None
        chosen.setdefault(node.name, name)
        if len(chosen) == count:
            return sorted(chosen.values())
    raise AssertionError("unreachable")


async def test_trees_on_three_masters_hold_under_two_concurrent_replicas(redis_cluster: Cluster) -> None:
    assert is_cluster_url(redis_cluster.url)
    prefix = f"test:metering:{uuid.uuid4().hex}:"
    first, second = connect_redis(redis_cluster.url), connect_redis(redis_cluster.url)
    assert isinstance(first, BoundedRedisCluster) and isinstance(second, BoundedRedisCluster)
    try:
        await first.initialize()
        roots = roots_on_distinct_masters(first, prefix, 3)
        stores = [BudgetStore(first, prefix, 300), BudgetStore(second, prefix, 300)]
        await stores[1].start()
        leaves: list[str] = []
        for root in roots:
            await stores[0].create_pool(PoolSpec(root, 500))
            for team in ("a", "b"):
                await stores[0].create_pool(PoolSpec(f"{root}-{team}", 300, parent=root))
                for key in range(2):
                    leaf = f"{root}-{team}{key}"
                    await stores[0].create_pool(PoolSpec(leaf, 200, parent=f"{root}-{team}"))
                    leaves.append(leaf)

        async def attempt(i: int) -> int:
            try:
                reservation = await stores[i % 2].reserve(
                    leaves[i % len(leaves)], 5 + i % 11, f"r{i}", completion_tokens=10, min_completion_tokens=0
                )
            except BudgetExhausted:
                return 0
            if i % 3 == 0:  # some end while others still reserve
                await stores[(i + 1) % 2].commit(f"r{i}", reservation.tokens // 2, pool=leaves[i % len(leaves)])
            return reservation.tokens

        granted = await asyncio.gather(*(attempt(i) for i in range(600)))
        assert sum(granted) > 0
        views = {view.name: view for view in await stores[1].list_pools()}
        assert len(views) == 3 * 7
        for view in views.values():
            assert view.used + view.reserved <= view.capacity, view
        for root in roots:
            assert views[root].used + views[root].reserved >= 500 - 25  # each root ran out, separately
            teams = [views[f"{root}-{team}"] for team in ("a", "b")]
            assert views[root].reserved == sum(team.reserved for team in teams)
            assert views[root].used == sum(team.used for team in teams)
        # Each tree's keys share one slot, on its own master.
        nodes = set()
        for root in roots:
            keys = [key async for key in first.scan_iter(match=f"{prefix}{{{root}}}:*", count=1000)]
            assert {first.keyslot(key) for key in keys} == {first.keyslot(f"{prefix}{{{root}}}:lease")}
            nodes.add(first.get_node_from_key(keys[0]).name)  # type: ignore[union-attr]
        assert len(nodes) == 3
        await stores[1].close()
    finally:
        keys = [key async for key in first.scan_iter(match=f"{prefix}*", count=1000)]
        for key in keys:
            await first.delete(key)
        await first.aclose()
        await second.aclose()


@pytest.mark.parametrize("url", ["redis+cluster://", "rediss+cluster://:6379"])
def test_a_cluster_url_needs_a_host(url: str) -> None:
    with pytest.raises(ValueError, match="host"):
        connect_redis(url)
