"""The budget's part of live reload (``hoosh_common.reload``): the ``pools:`` of hoosh.yaml.

**The rule: the file wins for the pools it changes.** A reload compares the file with
the one this replica last applied (at start, or by the last reload), pool by pool, and
with the store as it is now:

- a pool the file adds, or whose entry (capacity, period, time zone, money cap) the file
  changed, is applied as start-up applies it (``apply_pool``): created, or its settings
  set, its counters (usage, reservations in flight) kept;
- a pool whose entry the file did not change is left as the store has it: a resize
  through the admin API (``hoosh pools resize``, ``PATCH /v1/admin/pools/{name}``)
  survives the reload. A configured pool missing from the store (deleted through the
  admin API) is created again, as at start; remove it from the file to keep it deleted;
- a pool removed from the file is left as it is (deleting one is the admin API's
  ``DELETE /v1/admin/pools/{name}``).

A start still applies every configured pool (``provision_pools``). ``unchanged``: the
file is the one last applied and the store needs no write. What changed is reported
against the store: ``added`` (created), ``changed`` (its settings set), ``kept`` (the
file did not change it and the store differs from it: an admin's change, kept),
``unlisted`` (no longer in the file, left as it is).

Before anything is applied the whole section is checked, against the store too: every
parent must be configured or exist, and a pool's parent cannot change (it is fixed at
creation). Pools are applied one by one, parents first (each write is atomic in Redis):
if the store fails on the first, nothing changed and the reload is refused; if it fails
later, the pools before it are applied and the reload answers ``partial``, saying which
were and which were not. Running it again completes it: the pools applied count as the
file's, the others are still to apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

from hoosh_common.reload import ConfigPartlyApplied, ConfigRefused
from hoosh_metering.errors import BudgetError
from hoosh_metering.pools import BudgetStore, PoolSpec, PoolView

from .config import DEFAULT_POOL, BudgetSettings, ConfigError, configured_pools


def _matches(view: PoolView, spec: PoolSpec) -> bool:
    """The store already has the pool as ``spec`` says."""
    return (view.capacity, view.parent, view.period, view.timezone, view.cap_usd_micros) == (
        spec.capacity,
        spec.parent,
        spec.period,
        spec.timezone,
        spec.cap_usd_micros,
    )


@dataclass(slots=True)
class _Plan:
    """What applying a file does to the store now."""

    specs: list[PoolSpec]
    writes: list[PoolSpec] = field(default_factory=list)  # parents first
    created: set[str] = field(default_factory=set)
    kept: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    default: PoolSpec | None = None  # ``default`` to create: the file does not configure it and it is missing

    def changes(self, written: list[PoolSpec], default_created: bool) -> dict[str, Any]:
        added = [spec.name for spec in written if spec.name in self.created]
        if default_created and self.default is not None:
            added.append(self.default.name)
        return {
            "pools": {
                "added": sorted(added),
                "changed": sorted(spec.name for spec in written if spec.name not in self.created),
                "kept": sorted(self.kept),
                "unlisted": sorted(self.unlisted),
            }
        }


class BudgetPools:
    """The budget's ``ConfigTarget``: the configured pools, parents first."""

    service = "budget"

    def __init__(self, store: BudgetStore, settings: BudgetSettings, applied: list[PoolSpec]) -> None:
        self._store = store
        self._settings = settings
        # The file's pools as last applied, by name (what start-up applied, then each reload).
        self.applied: dict[str, PoolSpec] = {spec.name: spec for spec in applied}

    def parse(self, data: bytes) -> list[PoolSpec]:
        """In a worker thread (``ConfigReloader``): the file's pools, validated, parents first."""
        try:
            return configured_pools(self._settings, data)
        except ConfigError as error:
            raise ConfigRefused(str(error)) from error

    async def _plan(self, specs: list[PoolSpec]) -> _Plan:
        names = {spec.name for spec in specs}
        wanted = names | {spec.parent for spec in specs if spec.parent} | {DEFAULT_POOL}
        try:
            existing = {view.name: view for view in await self._store.list_pools(sorted(wanted))}
        except BudgetError as error:
            raise ConfigRefused(f"cannot check the pools against the budget store: {error.message}") from error
        plan = _Plan(specs, unlisted=sorted(set(self.applied) - names))
        for spec in specs:
            if spec.parent is not None and spec.parent not in names and spec.parent not in existing:
                raise ConfigRefused(
                    f"pool '{spec.name}' names parent '{spec.parent}', which is neither configured nor an existing pool"
                )
            view = existing.get(spec.name)
            if view is not None and view.parent != spec.parent:
                raise ConfigRefused(
                    f"pool '{spec.name}' exists with parent {view.parent or 'none'!r}, the file says "
                    f"{spec.parent or 'none'!r}: a pool's parent is fixed when it is created"
                )
            if view is None:
                plan.writes.append(spec)
                plan.created.add(spec.name)
            elif _matches(view, spec):
                continue
            elif self.applied.get(spec.name) == spec:
                plan.kept.append(spec.name)  # the file did not change it: the store's settings stay
            else:
                plan.writes.append(spec)
        if DEFAULT_POOL not in names and DEFAULT_POOL not in existing:
            plan.default = PoolSpec(DEFAULT_POOL, self._settings.budget_default_capacity)
        return plan

    async def check(self, config: list[PoolSpec]) -> bool:
        plan = await self._plan(config)
        file_changed = {spec.name: spec for spec in config} != self.applied
        return bool(plan.writes or plan.default or file_changed)

    async def apply(self, config: list[PoolSpec]) -> dict[str, Any]:
        plan = await self._plan(config)
        pending = {spec.name for spec in plan.writes}
        written: list[PoolSpec] = []
        for spec in plan.writes:
            try:
                await self._store.apply_pool(spec)
            except BudgetError as error:
                self._failed(
                    plan, written, sorted(pending), f"pool '{spec.name}' could not be applied: {error.message}"
                )
            written.append(spec)
            pending.discard(spec.name)
        default_created = False
        if plan.default is not None:
            try:
                await self._store.ensure_pool(plan.default)
            except BudgetError as error:
                self._failed(
                    plan, written, [DEFAULT_POOL], f"pool '{DEFAULT_POOL}' could not be created: {error.message}"
                )
            default_created = True
        self.applied = {spec.name: spec for spec in config}
        return plan.changes(written, default_created)

    def _failed(self, plan: _Plan, written: list[PoolSpec], pending: list[str], reason: str) -> NoReturn:
        """The store failed midway: refused when nothing was written, else partial (what
        was written now counts as applied; the rest stays to apply on the next reload)."""
        if not written:
            raise ConfigRefused(f"{reason}; nothing was changed: run the reload again")
        for spec in plan.specs:
            if spec.name not in pending:  # written, or needing no write
                self.applied[spec.name] = spec
        done = ", ".join(spec.name for spec in written)
        raise ConfigPartlyApplied(
            f"{reason}; applied before it: {done}; not applied: {', '.join(pending)}: run the reload again",
            plan.changes(written, False),
        )
