"""Settings, the pools read from HOOSH_CONFIG / HOOSH_BUDGET_POOLS, and start-up provisioning."""

from __future__ import annotations

from pathlib import Path

import pytest
from hoosh_budget.__main__ import provision_pools
from hoosh_budget.config import BudgetSettings, ConfigError, configured_pools
from hoosh_budget.pools import BudgetStore, PoolView


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOOSH_CONFIG", "HOOSH_BUDGET_POOLS", "HOOSH_BUDGET_DEFAULT_CAPACITY", "HOOSH_BUDGET_LISTEN"):
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    settings = BudgetSettings()
    assert settings.budget_listen == "127.0.0.1:50052"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.budget_key_prefix == "hoosh:budget:"
    assert settings.budget_lease_seconds == 300
    assert settings.budget_default_capacity == 10_000_000
    assert configured_pools(settings) == {}


def test_pools_from_yaml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hoosh.yaml"
    config.write_text(
        "providers:\n  - name: local\n    type: local\n"
        "pools:\n  - name: team-a\n    capacity: 5000\n  - name: team-b\n    capacity: 10\n"
    )
    monkeypatch.setenv("HOOSH_CONFIG", str(config))
    monkeypatch.setenv("HOOSH_BUDGET_POOLS", '{"team-b": 20, "team-c": 30}')
    assert configured_pools(BudgetSettings()) == {"team-a": 5000, "team-b": 20, "team-c": 30}


def test_bad_pool_config_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "hoosh.yaml"
    config.write_text("pools:\n  - name: team-a\n    capacity: -5\n")
    monkeypatch.setenv("HOOSH_CONFIG", str(config))
    with pytest.raises(ConfigError, match=r"team-a|capacity"):
        configured_pools(BudgetSettings())
    monkeypatch.setenv("HOOSH_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        configured_pools(BudgetSettings())


async def test_provision_creates_default_and_keeps_its_later_capacity(
    store: BudgetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOSH_BUDGET_POOLS", '{"team": 77}')
    monkeypatch.setenv("HOOSH_BUDGET_DEFAULT_CAPACITY", "1000")
    settings = BudgetSettings()
    await provision_pools(store, settings)
    assert await store.list_pools() == [
        PoolView("default", capacity=1000, used=0, reserved=0),
        PoolView("team", capacity=77, used=0, reserved=0),
    ]
    await store.upsert_pool("default", 5)
    await store.upsert_pool("team", 5)
    await store.reserve("team", 3, "r1")
    await provision_pools(store, settings)  # a restart
    assert await store.list_pools() == [
        PoolView("default", capacity=5, used=0, reserved=0),  # not configured: left alone
        PoolView("team", capacity=77, used=0, reserved=3),  # configured: capacity restored
    ]


async def test_configured_default_pool_is_upserted(store: BudgetStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_BUDGET_POOLS", '{"default": 12}')
    await provision_pools(store, BudgetSettings())
    assert await store.list_pools() == [PoolView("default", capacity=12, used=0, reserved=0)]
