"""Settings, the pools read from HOOSH_CONFIG / HOOSH_BUDGET_POOLS, and start-up provisioning."""

from __future__ import annotations

from pathlib import Path

import pytest
from hoosh_budget.__main__ import provision_pools
from hoosh_budget.config import BudgetSettings, ConfigError, configured_pools
from hoosh_metering.pools import BudgetStore, PoolSpec, PoolView

ENV = (
    "HOOSH_CONFIG",
    "HOOSH_BUDGET_POOLS",
    "HOOSH_BUDGET_DEFAULT_CAPACITY",
    "HOOSH_BUDGET_LISTEN",
    "HOOSH_BUDGET_EXPIRY_POLICY",
    "HOOSH_NATS_URL",
    "HOOSH_NATS_STREAM",
    "HOOSH_SUBJECT_PREFIX",
    "HOOSH_REDIS_URL",
    "HOOSH_BUDGET_KEY_PREFIX",
    "HOOSH_BUDGET_METRICS_LISTEN",
    "HOOSH_BUDGET_METRICS_INTERVAL_SECONDS",
    "HOOSH_BUDGET_METRICS_MAX_LEASES",
    "HOOSH_METRICS_MAX_POOLS",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    path = tmp_path / "hoosh.yaml"
    path.write_text(text)
    monkeypatch.setenv("HOOSH_CONFIG", str(path))


def summary(views: list[PoolView]) -> list[tuple[str, int, int, int, str | None]]:
    return [(view.name, view.capacity, view.used, view.reserved, view.parent) for view in views]


def test_defaults() -> None:
    settings = BudgetSettings()
    assert settings.budget_listen == "127.0.0.1:50052"
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.budget_key_prefix == "hoosh:budget:"
    assert settings.budget_lease_seconds == 300
    assert settings.budget_default_capacity == 10_000_000
    assert settings.budget_expiry_policy == "commit"
    # The same event bus settings (names and defaults) as the router's.
    assert (settings.nats_url, settings.nats_stream, settings.subject_prefix) == (
        "nats://127.0.0.1:4222",
        "HOOSH_EVENTS",
        "hoosh",
    )
    assert configured_pools(settings) == []


def test_metrics_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = BudgetSettings()
    assert settings.budget_metrics_listen == "127.0.0.1:9462"
    assert (settings.budget_metrics_interval_seconds, settings.metrics_max_pools) == (5.0, 500)
    assert settings.budget_metrics_max_leases == 10_000
    monkeypatch.setenv("HOOSH_BUDGET_METRICS_LISTEN", "")
    monkeypatch.setenv("HOOSH_BUDGET_METRICS_INTERVAL_SECONDS", "0.5")
    monkeypatch.setenv("HOOSH_METRICS_MAX_POOLS", "20")
    settings = BudgetSettings()
    assert (settings.budget_metrics_listen, settings.budget_metrics_interval_seconds) == ("", 0.5)
    assert settings.metrics_max_pools == 20
    monkeypatch.setenv("HOOSH_METRICS_MAX_POOLS", "0")
    with pytest.raises(ValueError, match="metrics_max_pools"):
        BudgetSettings()


def test_expiry_policy_is_commit_or_release(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_BUDGET_EXPIRY_POLICY", "release")
    assert BudgetSettings().budget_expiry_policy == "release"
    monkeypatch.setenv("HOOSH_BUDGET_EXPIRY_POLICY", "forget")
    with pytest.raises(ValueError, match="budget_expiry_policy"):
        BudgetSettings()


def test_pools_from_yaml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Children listed before their parents: applied parents first all the same.
    config_file(
        tmp_path,
        monkeypatch,
        "providers:\n  - name: local\n    type: local\n"
        "pools:\n"
        "  - name: key-1\n    capacity: 100\n    parent: team-a\n"
        "  - name: team-a\n    capacity: 5000\n    parent: org\n    period: daily\n    timezone: Europe/Berlin\n"
        "    cap_usd: 12.5\n"
        "  - name: org\n    capacity: 10000\n    period: monthly\n    cap_usd: 0.000001\n"
        "  - name: team-b\n    capacity: 10\n",
    )
    monkeypatch.setenv("HOOSH_BUDGET_POOLS", '{"team-b": 20, "team-c": 30, "team-a": 6000}')
    assert configured_pools(BudgetSettings()) == [
        PoolSpec("org", 10000, period="monthly", cap_usd_micros=1),
        PoolSpec("team-a", 6000, parent="org", period="daily", timezone="Europe/Berlin", cap_usd_micros=12_500_000),
        PoolSpec("key-1", 100, parent="team-a"),
        PoolSpec("team-b", 20),
        PoolSpec("team-c", 30),
    ]


@pytest.mark.parametrize(
    ("pools", "match"),
    [
        ("  - name: team-a\n    capacity: -5\n", r"team-a|capacity"),
        ("  - name: 'a b'\n    capacity: 5\n", r"name"),
        ("  - name: a\n    capacity: 5\n    period: yearly\n", r"period"),
        ("  - name: a\n    capacity: 5\n    period: daily\n    timezone: Mars/Olympus\n", r"Mars/Olympus"),
        ("  - name: a\n    capacity: 5\n    cap_usd: -1\n", r"cap_usd"),
        ("  - name: a\n    capacity: 5\n    parent: a\n", r"own parent"),
        ("  - name: a\n    capacity: 5\n  - name: a\n    capacity: 6\n", r"twice"),
        ("  - name: a\n    capacity: 5\n    parent: b\n  - name: b\n    capacity: 5\n    parent: a\n", r"cycle"),
    ],
    ids=["negative", "name", "period", "timezone", "cap", "self-parent", "duplicate", "cycle"],
)
def test_bad_pool_config_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pools: str, match: str) -> None:
    config_file(tmp_path, monkeypatch, "pools:\n" + pools)
    with pytest.raises(ConfigError, match=match):
        configured_pools(BudgetSettings())


def test_missing_or_bad_files_and_env_fail_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match=r"missing\.yaml"):
        configured_pools(BudgetSettings())
    monkeypatch.delenv("HOOSH_CONFIG")
    monkeypatch.setenv("HOOSH_BUDGET_POOLS", '{"a": -1}')
    with pytest.raises(ConfigError, match="HOOSH_BUDGET_POOLS"):
        configured_pools(BudgetSettings())


async def test_provision_creates_default_and_keeps_its_later_capacity(
    store: BudgetStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOOSH_BUDGET_POOLS", '{"team": 77}')
    monkeypatch.setenv("HOOSH_BUDGET_DEFAULT_CAPACITY", "1000")
    settings = BudgetSettings()
    await provision_pools(store, settings)
    assert summary(await store.list_pools()) == [("default", 1000, 0, 0, None), ("team", 77, 0, 0, None)]
    await store.upsert_pool("default", 5)
    await store.upsert_pool("team", 5)
    await store.reserve("team", 3, "r1")
    await provision_pools(store, settings)  # a restart
    assert summary(await store.list_pools()) == [
        ("default", 5, 0, 0, None),  # not configured: left alone
        ("team", 77, 0, 3, None),  # configured: capacity restored, counters kept
    ]


async def test_provision_applies_a_tree_and_its_changes_on_restart(
    store: BudgetStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file(
        tmp_path,
        monkeypatch,
        "pools:\n"
        "  - name: team\n    capacity: 500\n    parent: org\n    period: hourly\n"
        "  - name: org\n    capacity: 1000\n    cap_usd: 2\n"
        "  - name: default\n    capacity: 12\n",
    )
    await provision_pools(store, BudgetSettings())
    team, org = await store.get_pool("team"), await store.get_pool("org")
    assert (team.parent, team.period, team.chain, team.cap_usd_micros) == ("org", "hourly", ("team", "org"), None)
    assert (org.capacity, org.cap_usd_micros) == (1000, 2_000_000)
    assert (await store.get_pool("default")).capacity == 12  # configured: upserted, not the default capacity
    await store.report("team", 40)

    config_file(
        tmp_path,
        monkeypatch,
        "pools:\n  - name: team\n    capacity: 600\n    parent: org\n    period: daily\n"
        "  - name: org\n    capacity: 1000\n",
    )
    await provision_pools(store, BudgetSettings())  # a restart with a changed file
    team, org = await store.get_pool("team"), await store.get_pool("org")
    assert (team.capacity, team.period, team.used) == (600, "daily", 40)
    assert org.cap_usd_micros is None and org.used == 40
