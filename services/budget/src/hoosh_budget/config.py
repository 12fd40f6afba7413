"""Budget settings (environment, prefix HOOSH_) and the pools to create at start."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from hoosh_budget.pools import MAX_TOKENS

DEFAULT_POOL = "default"


class BudgetSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore")

    budget_listen: str = "127.0.0.1:50052"
    redis_url: str = "redis://127.0.0.1:6379/0"
    budget_key_prefix: str = "hoosh:budget:"
    budget_lease_seconds: int = Field(default=300, gt=0)
    budget_default_capacity: int = Field(default=10_000_000, ge=0, le=MAX_TOKENS)
    budget_retry_after_seconds: int = Field(default=60, gt=0)
    budget_reap_interval_seconds: float = Field(default=5.0, gt=0)
    # Bursts wait for a free connection instead of failing (redis-py's default pool raises).
    budget_redis_max_connections: int = Field(default=64, gt=0)
    # JSON object in the environment, e.g. {"team-a": 500000}.
    budget_pools: dict[str, int] = Field(default_factory=dict)
    config: Path | None = Field(default=None, description="Path of the shared hoosh YAML config")
    log_level: str = "INFO"


class PoolConfig(BaseModel):
    name: str = Field(min_length=1)
    capacity: int = Field(ge=0, le=MAX_TOKENS)


class _PoolsSection(BaseModel):
    pools: list[PoolConfig] = Field(default_factory=list)


class ConfigError(Exception):
    """The configured pools cannot be read; the service refuses to start."""


def configured_pools(settings: BudgetSettings) -> dict[str, int]:
    """Pools to upsert at start: the YAML file's ``pools:``, then HOOSH_BUDGET_POOLS
    (which wins on a name clash). The caller adds ``default`` when neither names it.

    Only the top-level ``pools:`` list of the shared config is read; other services
    own the rest of that file.
    """
    pools: dict[str, int] = {}
    if settings.config is not None:
        try:
            raw = yaml.safe_load(settings.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read HOOSH_CONFIG {settings.config}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"HOOSH_CONFIG {settings.config} is not a mapping")
        try:
            section = _PoolsSection.model_validate({"pools": raw.get("pools") or []})
        except ValidationError as exc:
            raise ConfigError(f"bad pools in HOOSH_CONFIG {settings.config}: {exc}") from exc
        pools.update({pool.name: pool.capacity for pool in section.pools})
    for name, capacity in settings.budget_pools.items():
        try:
            PoolConfig(name=name, capacity=capacity)
        except ValidationError as exc:
            raise ConfigError(f"bad pool in HOOSH_BUDGET_POOLS: {exc}") from exc
        pools[name] = capacity
    return pools
