"""Budget settings (environment, prefix HOOSH_) and the pools to apply at start."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from hoosh_common.eventbus_settings import EventBusSettings
from hoosh_common.events import DEFAULT_STREAM, SUBJECT_PREFIX
from hoosh_common.internal_plane import InternalPlaneSettings
from hoosh_common.reload import describe_validation_error, describe_yaml_error
from hoosh_metering.errors import InvalidArgument
from hoosh_metering.periods import validate_period
from hoosh_metering.pools import PoolSpec
from pydantic import BaseModel, Field, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

try:  # libyaml's parser: several times faster on a large file (same types; errors at the same place)
    from yaml import CSafeLoader as SafeLoader
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    from yaml import SafeLoader  # type: ignore[assignment]

DEFAULT_POOL = "default"
# Lua numbers are doubles: every amount stays where integers are exact.
MAX_AMOUNT = 2**53 - 1
MICROS_PER_USD = 1_000_000
# Pool names appear inside Redis hash tags ({root}): a small, safe alphabet.
POOL_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"


class BudgetSettings(EventBusSettings, InternalPlaneSettings):
    """The budget service's environment (prefix ``HOOSH_``), the event bus's included."""

    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore")

    budget_listen: str = "127.0.0.1:50052"
    budget_metrics_listen: str = Field(
        default="127.0.0.1:9462", description="Prometheus /metrics listen address (host:port); empty: not served"
    )
    budget_metrics_interval_seconds: float = Field(
        default=5.0, gt=0, description="How often the per-pool gauges are read from Redis (one snapshot)"
    )
    # Pools with a series of their own; the rest are summed into pool="_other".
    metrics_max_pools: int = Field(default=500, ge=1)
    # Open reservations read per tree for the per-pool counts (the tree's total stays exact).
    budget_metrics_max_leases: int = Field(default=10_000, ge=0)
    # redis://host:port/db, or redis+cluster://host:port for a Redis Cluster.
    redis_url: str = "redis://127.0.0.1:6379/0"
    budget_key_prefix: str = "hoosh:budget:"
    budget_lease_seconds: int = Field(default=300, gt=0)
    budget_default_capacity: int = Field(default=10_000_000, ge=0, le=MAX_AMOUNT)
    budget_retry_after_seconds: int = Field(default=60, gt=0)
    budget_reap_interval_seconds: float = Field(default=5.0, gt=0)
    budget_period_tick_seconds: float = Field(
        default=1.0, gt=0, description="How often pools due for a new period are rolled and announced"
    )
    # commit: the provider may have billed a reservation whose holder died; release: give it back.
    budget_expiry_policy: Literal["commit", "release"] = "commit"
    # Bursts wait for a free connection instead of failing (redis-py's default pool raises).
    budget_redis_max_connections: int = Field(default=64, gt=0)
    # JSON object in the environment, e.g. {"team-a": 500000}: root pools, or new
    # capacities for pools the YAML file configures.
    budget_pools: dict[str, int] = Field(default_factory=dict)
    # The event bus (budget.reset events), as the router's settings name it.
    nats_url: str = "nats://127.0.0.1:4222"
    nats_stream: str = DEFAULT_STREAM
    subject_prefix: str = SUBJECT_PREFIX
    config: Path | None = Field(default=None, description="Path of the shared hoosh YAML config")
    log_level: str = "INFO"


class PoolConfig(BaseModel):
    """One entry of ``pools:`` in hoosh.yaml."""

    name: str = Field(pattern=POOL_NAME_PATTERN)
    capacity: int = Field(ge=0, le=MAX_AMOUNT)
    parent: str | None = Field(default=None, pattern=POOL_NAME_PATTERN)
    period: str = "none"
    timezone: str = "UTC"
    cap_usd: float | None = Field(default=None, ge=0, description="money cap in dollars (stored as micro-dollars)")

    @model_validator(mode="after")
    def _check(self) -> PoolConfig:
        if self.parent == self.name:
            raise ValueError(f"pool '{self.name}' cannot be its own parent")
        try:
            validate_period(self.period, self.timezone)
        except InvalidArgument as exc:
            raise ValueError(exc.message) from exc
        if self.cap_usd is not None and round(self.cap_usd * MICROS_PER_USD) > MAX_AMOUNT:
            raise ValueError("cap_usd is too large")
        return self

    def spec(self) -> PoolSpec:
        cap = None if self.cap_usd is None else round(self.cap_usd * MICROS_PER_USD)
        return PoolSpec(
            name=self.name,
            capacity=self.capacity,
            parent=self.parent,
            period=self.period,
            timezone=self.timezone,
            cap_usd_micros=cap,
        )


class _PoolsSection(BaseModel):
    pools: list[PoolConfig] = Field(default_factory=list)


class ConfigError(Exception):
    """The configured pools cannot be read; the service refuses to start."""


def parse_pools(data: bytes, source: str) -> list[PoolConfig]:
    """The ``pools:`` of the shared config file's bytes, each validated (the file's other
    sections belong to other services). The one parser, at start and on every reload."""
    try:
        raw = yaml.load(data, Loader=SafeLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"HOOSH_CONFIG {source}: {describe_yaml_error(exc)}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"HOOSH_CONFIG {source}: the file is not a mapping (providers:, routes:, pools: ...)")
    try:
        return _PoolsSection.model_validate({"pools": raw.get("pools") or []}).pools
    except ValidationError as exc:
        raise ConfigError(f"bad pools in HOOSH_CONFIG {source}: {describe_validation_error(exc)}") from exc


def _read_yaml_pools(path: Path) -> list[PoolConfig]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read HOOSH_CONFIG {path}: {exc.strerror or exc}") from exc
    return parse_pools(data, str(path))


def parent_first(pools: dict[str, PoolConfig]) -> list[PoolConfig]:
    """The pools ordered so that every configured parent comes before its children.

    A parent that is not configured here must already exist (created through the
    admin API); a cycle is a configuration error.
    """
    ordered: list[PoolConfig] = []
    placed: set[str] = set()

    def place(name: str, path: tuple[str, ...]) -> None:
        if name in placed:
            return
        if name in path:
            raise ConfigError(f"pool parents form a cycle: {' -> '.join((*path, name))}")
        pool = pools[name]
        if pool.parent is not None and pool.parent in pools:
            place(pool.parent, (*path, name))
        placed.add(name)
        ordered.append(pool)

    for name in pools:
        place(name, ())
    return ordered


def configured_pools(settings: BudgetSettings, data: bytes | None = None) -> list[PoolSpec]:
    """Pools to apply at start (and on a reload), parents first: the YAML file's
    ``pools:`` (``data``: the file's bytes, already read), then HOOSH_BUDGET_POOLS (whose
    capacity wins on a name clash). The caller adds ``default`` when neither names it.

    Only the top-level ``pools:`` list of the shared config is read; other services
    own the rest of that file.
    """
    pools: dict[str, PoolConfig] = {}
    if settings.config is not None:
        listed = parse_pools(data, str(settings.config)) if data is not None else _read_yaml_pools(settings.config)
        for pool in listed:
            if pool.name in pools:
                raise ConfigError(f"pool '{pool.name}' is configured twice in HOOSH_CONFIG {settings.config}")
            pools[pool.name] = pool
    for name, capacity in settings.budget_pools.items():
        try:
            if name in pools:
                pools[name] = PoolConfig.model_validate({**pools[name].model_dump(), "capacity": capacity})
            else:
                pools[name] = PoolConfig(name=name, capacity=capacity)
        except ValidationError as exc:
            raise ConfigError(f"bad pool in HOOSH_BUDGET_POOLS: {exc}") from exc
    return [pool.spec() for pool in parent_first(pools)]
