"""Router settings: the expiry policy shared with the budget service, and a lease that a
renewal can keep alive."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as redis
from hoosh_metering.pools import PoolSpec
from hoosh_router.__main__ import budget_store
from hoosh_router.config import RouterSettings
from pydantic import ValidationError

ENV = (
    "HOOSH_BUDGET_EXPIRY_POLICY",
    "HOOSH_BUDGET_KEY_PREFIX",
    "HOOSH_ROUTER_LEASE_SECONDS",
    "HOOSH_ROUTER_REDIS_TIMEOUT_SECONDS",
    "HOOSH_ROUTER_BUDGET_MODE",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_the_expiry_policy_is_the_budget_services_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert RouterSettings().budget_expiry_policy == "commit"
    monkeypatch.setenv("HOOSH_BUDGET_EXPIRY_POLICY", "release")
    assert RouterSettings().budget_expiry_policy == "release"
    monkeypatch.setenv("HOOSH_BUDGET_EXPIRY_POLICY", "forget")
    with pytest.raises(ValidationError, match="budget_expiry_policy"):
        RouterSettings()


@pytest.mark.parametrize("policy", ["commit", "release"])
async def test_the_in_process_store_settles_expired_leases_by_the_configured_policy(
    monkeypatch: pytest.MonkeyPatch, redis_client: redis.Redis, prefix: str, policy: str
) -> None:
    monkeypatch.setenv("HOOSH_BUDGET_EXPIRY_POLICY", policy)
    monkeypatch.setenv("HOOSH_BUDGET_KEY_PREFIX", f"{prefix}budget:")
    store = budget_store(RouterSettings(), redis_client)
    try:
        pool = f"p{uuid.uuid4().hex[:10]}"
        await store.create_pool(PoolSpec(name=pool, capacity=1000))
        await store.reserve(pool, 10, uuid.uuid4().hex, 0.2, completion_tokens=90, owner="key_a", kind="chat")
        await asyncio.sleep(0.4)  # its holder died: no commit, no renewal
        assert await store.reap_expired() == 1
        state = await store.get_pool(pool)
        assert (state.used, state.reserved) == (100 if policy == "commit" else 0, 0)
    finally:
        await store.close()


def test_a_lease_must_outlast_a_renewal(monkeypatch: pytest.MonkeyPatch) -> None:
    """Renewed at a third, the renewal may take the store's whole timeout: it must land in time."""
    monkeypatch.setenv("HOOSH_ROUTER_LEASE_SECONDS", "3")
    assert RouterSettings().router_lease_seconds == 3  # 1 s + the default 2 s timeout: just in time
    monkeypatch.setenv("HOOSH_ROUTER_REDIS_TIMEOUT_SECONDS", "2.5")
    with pytest.raises(ValidationError, match="router_lease_seconds"):
        RouterSettings()
    monkeypatch.setenv("HOOSH_ROUTER_LEASE_SECONDS", "4")
    assert RouterSettings().router_lease_seconds == 4
    monkeypatch.setenv("HOOSH_ROUTER_BUDGET_MODE", "grpc")  # a budget RPC may take 10 s
    with pytest.raises(ValidationError, match="at least 15"):
        RouterSettings()
    monkeypatch.setenv("HOOSH_ROUTER_LEASE_SECONDS", "15")
    assert RouterSettings().router_lease_seconds == 15
    monkeypatch.setenv("HOOSH_ROUTER_LEASE_SECONDS", "2")
    with pytest.raises(ValidationError):
        RouterSettings()
