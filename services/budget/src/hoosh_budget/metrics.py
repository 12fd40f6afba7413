"""The budget service's Prometheus metrics (the process-wide registry, served on
``HOOSH_BUDGET_METRICS_LISTEN`` by ``python -m hoosh_budget``).

Counters of the service's own work, incremented where it happens:

- ``hoosh_budget_operations_total{operation, result}``: every RPC (``operation`` is the
  method in snake case: reserve, commit, release, renew, report, check, get_pool, ...);
  ``result`` is one of :data:`RESULTS`.
- ``hoosh_budget_period_resets_total``: period rolls this replica announced (each roll
  is handed to exactly one replica, so the sum over replicas counts every roll once).
- ``hoosh_budget_expired_leases_total{policy}``: leases this replica's reaper settled.
  The reaper's script returns a count only, so ``policy`` is the service's expiry
  policy (``HOOSH_BUDGET_EXPIRY_POLICY``); a reservation that chose its own
  ``on_expiry`` is counted under it too. Leases that a reserve or a read settles on
  its way are not counted here.

Per pool gauges come from a snapshot (:class:`PoolMetrics`) the event loop refreshes
every ``HOOSH_BUDGET_METRICS_INTERVAL_SECONDS`` (default 5) with
:meth:`hoosh_metering.pools.BudgetStore.read_state`: two pipelined round trips per 64
trees, no key scan, nothing settled. The scrape thread only formats the last snapshot;
it never touches Redis.

- ``hoosh_pool_capacity_tokens{pool, parent, period}``, ``hoosh_pool_used_tokens{pool}``,
  ``hoosh_pool_reserved_tokens{pool}``: the counters as Redis holds them.
- ``hoosh_pool_capacity_usd_micros{pool}``, ``hoosh_pool_used_usd_micros{pool}``,
  ``hoosh_pool_reserved_usd_micros{pool}``: only for pools with a money cap.
- ``hoosh_pool_open_reservations{pool}``: open reservations holding tokens in the pool
  (its own and those of the pools below it, as ``reserved`` counts them).
- ``hoosh_budget_open_reservations``: open leases in every tree (exact, even past the
  per-tree read bound ``HOOSH_BUDGET_METRICS_MAX_LEASES``).
- ``hoosh_budget_pools``: pools in the snapshot (all of them, not only those with a series).
- ``hoosh_budget_snapshot_age_seconds``: age of the oldest data in the snapshot (a tree
  that could not be read keeps its last values).
- ``hoosh_budget_snapshot_errors_total``: refreshes that failed in whole or in part.
- ``hoosh_budget_reset_events_pending``: ``budget.reset`` events not published yet.

Cardinality: at most ``HOOSH_METRICS_MAX_POOLS`` pools (default 500) get series of
their own: roots first, then each level down, by name within a level. The rest are
summed into ``pool="_other"`` (``parent`` and ``period`` empty), so a deployment with
thousands of per-key pools costs a bounded number of series.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from hoosh_common.metrics import OTHER, SnapshotCollector, register_collector
from hoosh_metering.errors import (
    BudgetError,
    BudgetExhausted,
    BudgetUnavailable,
    InvalidArgument,
    NotOwner,
    PoolExists,
    PoolInUse,
    PoolNotFound,
    RateLimited,
)
from hoosh_metering.pools import BudgetStore, PoolState, TreeState
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

if TYPE_CHECKING:  # resets counts its rolls here: no import cycle at run time
    from hoosh_budget.resets import ResetAnnouncer

log = logging.getLogger(__name__)

DEFAULT_MAX_POOLS: Final = 500
DEFAULT_MAX_LEASES: Final = 10_000

# The values ``result`` takes: a bounded set.
RESULTS: Final = (
    "ok",
    "already_ended",  # commit/release of a reservation that had ended (or was never seen)
    "inactive",  # renew of a reservation that is not active
    "exhausted",
    "rate_limited",
    "not_found",
    "not_owner",
    "conflict",  # the pool exists already, or still has children
    "invalid",
    "unavailable",
    "error",
)

OPERATIONS = Counter(
    "hoosh_budget_operations",
    "Budget operations handled over gRPC, by operation and result.",
    ["operation", "result"],
)
PERIOD_RESETS = Counter(
    "hoosh_budget_period_resets", "Pools rolled into a new period and announced by this replica's ticker."
)
EXPIRED_LEASES = Counter(
    "hoosh_budget_expired_leases",
    "Expired leases this replica's reaper settled, under the service's expiry policy.",
    ["policy"],
)

# (operation, result) -> counter child: resolved once, not on every call.
_children: dict[tuple[str, str], Counter] = {}


def count_operation(operation: str, result: str) -> None:
    child = _children.get((operation, result))
    if child is None:
        child = _children[(operation, result)] = OPERATIONS.labels(operation, result)
    child.inc()


def result_of(error: BaseException) -> str:
    """The ``result`` label of a failed operation."""
    if isinstance(error, BudgetExhausted):
        return "exhausted"
    if isinstance(error, RateLimited):
        return "rate_limited"
    if isinstance(error, PoolNotFound):
        return "not_found"
    if isinstance(error, NotOwner):
        return "not_owner"
    if isinstance(error, PoolExists | PoolInUse):
        return "conflict"
    if isinstance(error, InvalidArgument):  # InvalidAmount too
        return "invalid"
    if isinstance(error, BudgetUnavailable | RedisError):
        return "unavailable"
    return "error"


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """What a scrape formats: built in the event loop, replaced whole (one reference)."""

    rows: tuple[PoolState, ...]
    pools: int
    open_reservations: int
    oldest: float  # time.monotonic() of the oldest tree read in it


def _ordered(pools: list[PoolState]) -> list[PoolState]:
    """Roots first, then each level down; by name within a level."""
    parents = {pool.name: pool.parent for pool in pools}

    def depth(pool: PoolState) -> int:
        level, parent = 0, pool.parent
        while parent is not None and level <= len(parents):
            level, parent = level + 1, parents.get(parent)
        return level

    return sorted(pools, key=lambda pool: (depth(pool), pool.name))


def _rows(pools: list[PoolState], max_pools: int) -> tuple[PoolState, ...]:
    """The first ``max_pools`` pools (roots first), and the rest summed as ``_other``."""
    ordered = _ordered(pools)
    rest = ordered[max_pools:]
    if not rest:
        return tuple(ordered)
    capped = [pool for pool in rest if pool.cap_usd_micros is not None]
    other = PoolState(
        name=OTHER,
        root="",
        parent=None,
        period="",
        capacity=sum(pool.capacity for pool in rest),
        used=sum(pool.used for pool in rest),
        reserved=sum(pool.reserved for pool in rest),
        cap_usd_micros=sum(pool.cap_usd_micros or 0 for pool in capped) if capped else None,
        used_usd_micros=sum(pool.used_usd_micros for pool in capped),
        reserved_usd_micros=sum(pool.reserved_usd_micros for pool in capped),
        open_reservations=sum(pool.open_reservations for pool in rest),
    )
    return (*ordered[:max_pools], other)


class PoolMetrics:
    """The per pool gauges: :meth:`refresh` reads Redis (in the event loop), the
    collector formats the last snapshot (on the scrape thread)."""

    def __init__(
        self,
        store: BudgetStore,
        *,
        max_pools: int = DEFAULT_MAX_POOLS,
        max_leases: int = DEFAULT_MAX_LEASES,
        announcer: ResetAnnouncer | None = None,
    ) -> None:
        if max_pools < 1:
            raise ValueError("max_pools must be at least 1")
        self._store = store
        self.max_pools = max_pools
        self.max_leases = max_leases
        self._announcer = announcer
        self._trees: dict[str, tuple[TreeState, float]] = {}
        self._snapshot: _Snapshot | None = None
        self.errors = 0
        self.collector: Collector = SnapshotCollector(self.families)
        self._registry: CollectorRegistry | None = None

    def register(self, registry: CollectorRegistry = REGISTRY) -> PoolMetrics:
        register_collector(self.collector, registry)
        self._registry = registry
        return self

    def unregister(self) -> None:
        if self._registry is not None:
            self._registry.unregister(self.collector)
            self._registry = None

    async def refresh(self) -> bool:
        """Read every tree once and replace the snapshot; False when something could not
        be read (a tree that could not keeps its last values)."""
        try:
            state = await self._store.read_state(max_leases=self.max_leases)
        except (BudgetError, RedisError) as exc:
            self.errors += 1
            log.warning("pool metrics not refreshed", extra={"error": str(exc)})
            return False
        now = time.monotonic()
        trees = {tree.root: (tree, now) for tree in state.trees}
        for root in state.unreachable:
            kept = self._trees.get(root)
            if kept is not None:
                trees[root] = kept
        self._trees = trees
        pools = [pool for tree, _ in trees.values() for pool in tree.pools]
        self._snapshot = _Snapshot(
            rows=_rows(pools, self.max_pools),
            pools=len(pools),
            open_reservations=sum(tree.open_reservations for tree, _ in trees.values()),
            oldest=min((at for _, at in trees.values()), default=now),
        )
        if state.unreachable:
            self.errors += 1
            return False
        return True

    def families(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The metric families of the last snapshot (memory only: safe on the scrape thread)."""
        errors = CounterMetricFamily(
            "hoosh_budget_snapshot_errors", "Pool snapshot refreshes that failed in whole or in part."
        )
        errors.add_metric([], self.errors)
        yield errors
        if self._announcer is not None:
            pending = GaugeMetricFamily(
                "hoosh_budget_reset_events_pending", "budget.reset events not published yet (retried each tick)."
            )
            pending.add_metric([], self._announcer.pending)
            yield pending
        snapshot = self._snapshot
        if snapshot is None:  # nothing read yet: no gauge rather than a false zero
            return
        age = GaugeMetricFamily("hoosh_budget_snapshot_age_seconds", "Age of the oldest data in the pool snapshot.")
        age.add_metric([], max(0.0, time.monotonic() - snapshot.oldest))
        yield age
        count = GaugeMetricFamily("hoosh_budget_pools", "Pools in the snapshot.")
        count.add_metric([], snapshot.pools)
        yield count
        total = GaugeMetricFamily("hoosh_budget_open_reservations", "Open reservations (leases) in every pool tree.")
        total.add_metric([], snapshot.open_reservations)
        yield total
        capacity = GaugeMetricFamily(
            "hoosh_pool_capacity_tokens", "The pool's capacity in tokens.", labels=["pool", "parent", "period"]
        )
        used = GaugeMetricFamily("hoosh_pool_used_tokens", "Tokens used in the current period.", labels=["pool"])
        reserved = GaugeMetricFamily("hoosh_pool_reserved_tokens", "Tokens held by open reservations.", labels=["pool"])
        open_reservations = GaugeMetricFamily(
            "hoosh_pool_open_reservations",
            "Open reservations holding tokens in the pool (its own and its descendants').",
            labels=["pool"],
        )
        cap_usd = GaugeMetricFamily(
            "hoosh_pool_capacity_usd_micros", "The pool's money cap in micro-dollars.", labels=["pool"]
        )
        used_usd = GaugeMetricFamily(
            "hoosh_pool_used_usd_micros", "Micro-dollars used in the current period.", labels=["pool"]
        )
        reserved_usd = GaugeMetricFamily(
            "hoosh_pool_reserved_usd_micros", "Micro-dollars held by open reservations.", labels=["pool"]
        )
        for row in snapshot.rows:
            capacity.add_metric([row.name, row.parent or "", row.period], row.capacity)
            used.add_metric([row.name], row.used)
            reserved.add_metric([row.name], row.reserved)
            open_reservations.add_metric([row.name], row.open_reservations)
            if row.cap_usd_micros is not None:
                cap_usd.add_metric([row.name], row.cap_usd_micros)
                used_usd.add_metric([row.name], row.used_usd_micros)
                reserved_usd.add_metric([row.name], row.reserved_usd_micros)
        yield from (capacity, used, reserved, open_reservations, cap_usd, used_usd, reserved_usd)


async def refresh_forever(metrics: PoolMetrics, interval_seconds: float) -> None:
    """Refresh the snapshot every ``interval_seconds`` until cancelled. Metrics never
    stop the service: any failure is counted, logged and tried again next time."""
    while True:
        try:
            await metrics.refresh()
        except Exception:
            metrics.errors += 1
            log.exception("pool metrics refresh failed")
        await asyncio.sleep(interval_seconds)
