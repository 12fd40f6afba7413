"""The admin API: /v1/admin/keys over the real Redis, /v1/admin/pools over the real
budget service in-process (what reaches the pools, how the edge maps its statuses)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hoosh.events.v1 import events_pb2

from tests.inprocess import start_budget

from .conftest import Edge, MakeEdge, Stack, free_port
from .test_edge_app import assert_envelope
from .test_edge_tenancy import ADMIN, bearer, edge_on


@pytest.fixture
async def edge(make_edge: MakeEdge, stack: Stack) -> Edge:
    return await edge_on(make_edge, stack)


# --------------------------------------------------------------------------- keys


async def test_create_returns_the_key_once_and_the_record(edge: Edge) -> None:
    response = await edge.client.post(
        "/v1/admin/keys",
        json={
            "name": "ci",
            "team": "a",
            "user": "bot",
            "pools": ["team-a", "org"],
            "models": ["gpt-*"],
            "rpm": 10,
            "tpm": 1000,
            "max_concurrency": 2,
            "expires_at": int(time.time()) + 3600,
        },
        headers=ADMIN,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    key, record = body["key"], body["record"]
    assert key.startswith("sk-hoosh-") and len(key) == 52
    assert record["pools"] == ["team-a", "org"] and record["models"] == ["gpt-*"]
    assert (record["rpm"], record["tpm"], record["max_concurrency"], record["scope"]) == (10, 1000, 2, "user")
    assert record["revoked_at"] is None and record["created_at"] > 0
    listed = (await edge.client.get("/v1/admin/keys", headers=ADMIN)).json()
    assert listed["object"] == "list" and [r["id"] for r in listed["data"]] == [record["id"]]
    assert "key" not in listed["data"][0]
    assert (await edge.client.get(f"/v1/admin/keys/{record['id']}", headers=ADMIN)).json() == record


async def test_a_user_key_without_pools_gets_default(edge: Edge) -> None:
    response = await edge.client.post("/v1/admin/keys", json={"name": "x"}, headers=ADMIN)
    assert response.json()["record"]["pools"] == ["default"]


async def test_update_changes_only_what_is_sent(edge: Edge) -> None:
    created = (
        await edge.client.post("/v1/admin/keys", json={"name": "x", "tpm": 5, "team": "a"}, headers=ADMIN)
    ).json()
    key, key_id = created["key"], created["record"]["id"]
    response = await edge.client.patch(
        f"/v1/admin/keys/{key_id}", json={"pools": ["team-b"], "tpm": None}, headers=ADMIN
    )
    assert response.status_code == 200, response.text
    record = response.json()
    assert (record["pools"], record["tpm"], record["team"], record["name"]) == (["team-b"], None, "a", "x")
    # The change reaches the key cache: the key now charges team-b by default.
    assert (await edge.client.get("/v1/tokens/pools", headers=bearer(key))).status_code == 200


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"name": "x", "pools": ["nope"]}, "pools[0]", "pool_not_found"),
        ({"name": "x", "pools": ["team-a", "nope"]}, "pools[1]", "pool_not_found"),
        ({"name": "x", "pools": ["bad name"]}, "pools[0]", "invalid_value"),
        ({"name": "x", "models": ["a b"]}, "models[0]", "invalid_value"),
        ({"name": "x", "models": []}, "models", "invalid_value"),
        ({"name": ""}, "name", "invalid_value"),
        ({"name": "x", "scope": "root"}, "scope", None),
        ({"name": "x", "rpm": 0}, "rpm", "invalid_value"),
        ({"name": "x", "expires_at": 1}, "expires_at", "invalid_value"),
        ({"name": "x", "admin": True}, "admin", None),
    ],
)
async def test_create_refuses_bad_keys(edge: Edge, body: dict[str, Any], param: str, code: str | None) -> None:
    status = 404 if code == "pool_not_found" else 400  # an unknown pool, as on every other route
    error = assert_envelope(await edge.client.post("/v1/admin/keys", json=body, headers=ADMIN), status, param=param)
    if code is not None:
        assert error["code"] == code
    assert (await edge.client.get("/v1/admin/keys", headers=ADMIN)).json()["data"] == []


async def test_update_refuses_unknown_pools_and_null_labels(edge: Edge) -> None:
    key_id = (await edge.client.post("/v1/admin/keys", json={"name": "x"}, headers=ADMIN)).json()["record"]["id"]
    response = await edge.client.patch(f"/v1/admin/keys/{key_id}", json={"pools": ["nope"]}, headers=ADMIN)
    assert assert_envelope(response, 404, param="pools[0]")["code"] == "pool_not_found"
    assert_envelope(await edge.client.patch(f"/v1/admin/keys/{key_id}", json={"name": None}, headers=ADMIN), 400)
    response = await edge.client.patch(f"/v1/admin/keys/{key_id}", json={"scope": "admin"}, headers=ADMIN)
    assert_envelope(response, 400, param="scope")  # the scope of a key never changes


async def test_unknown_key_ids_are_404(edge: Edge) -> None:
    for method in ("GET", "PATCH", "DELETE"):
        response = await edge.client.request(method, "/v1/admin/keys/key_nope", json={"name": "y"}, headers=ADMIN)
        assert assert_envelope(response, 404)["code"] == "key_not_found"


async def test_revoke_is_idempotent(edge: Edge) -> None:
    key_id = (await edge.client.post("/v1/admin/keys", json={"name": "x"}, headers=ADMIN)).json()["record"]["id"]
    first = (await edge.client.delete(f"/v1/admin/keys/{key_id}", headers=ADMIN)).json()
    second = (await edge.client.delete(f"/v1/admin/keys/{key_id}", headers=ADMIN)).json()
    assert first["revoked_at"] is not None and first == second


# --------------------------------------------------------------------------- pools


async def test_pool_lifecycle(edge: Edge, stack: Stack) -> None:
    created = await edge.client.post(
        "/v1/admin/pools",
        json={"name": "team-c", "parent": "org", "capacity": 500, "period": "daily", "timezone": "Europe/Berlin",
              "cap_usd": 12.5},
        headers=ADMIN,
    )  # fmt: skip
    assert created.status_code == 200, created.text
    pool = created.json()
    assert (pool["name"], pool["parent"], pool["chain"], pool["capacity"]) == ("team-c", "org", ["team-c", "org"], 500)
    assert (pool["cap_usd"], pool["cap_usd_micros"]) == (12.5, 12_500_000)
    stored = await stack.pool("team-c")
    assert (stored.parent, stored.period, stored.timezone, stored.cap_usd_micros) == (
        "org",
        "daily",
        "Europe/Berlin",
        12_500_000,
    )

    got = await edge.client.get("/v1/admin/pools/team-c", headers=ADMIN)
    assert got.json()["capacity"] == 500
    listed = (await edge.client.get("/v1/admin/pools", headers=ADMIN)).json()
    assert "team-c" in [p["name"] for p in listed["data"]]

    resized = await edge.client.patch("/v1/admin/pools/team-c", json={"capacity": 900, "cap_usd": None}, headers=ADMIN)
    assert resized.json()["capacity"] == 900 and resized.json()["cap_usd"] is None
    stored = await stack.pool("team-c")  # only what was sent changed
    assert (stored.capacity, stored.cap_usd_micros, stored.period, stored.timezone) == (
        900,
        None,
        "daily",
        "Europe/Berlin",
    )

    used = await edge.client.post("/v1/tokens/report", json={"pool": "team-c", "actual": 40}, headers=ADMIN)
    assert used.json()["used"] == 40
    reset = await edge.client.post("/v1/admin/pools/team-c/reset", headers=ADMIN)
    assert reset.status_code == 200 and reset.json()["used"] == 0
    assert (await stack.pool("team-c")).used == 0
    [(_, event)] = [(name, event) for name, event in await stack.bus.events() if name == "budget.reset"]
    assert isinstance(event, events_pb2.BudgetReset)
    assert (event.pool, event.reason, event.used, event.key_id) == ("team-c", "admin", 40, "admin")

    deleted = await edge.client.delete("/v1/admin/pools/team-c", headers=ADMIN)
    assert deleted.json() == {"name": "team-c", "deleted": True}
    assert_envelope(await edge.client.get("/v1/admin/pools/team-c", headers=ADMIN), 404)


async def test_pool_errors_are_mapped(edge: Edge, make_edge: MakeEdge, stack: Stack) -> None:
    body = {"name": "team-a", "capacity": 1}
    assert assert_envelope(await edge.client.post("/v1/admin/pools", json=body, headers=ADMIN), 409)["code"] == (
        "pool_exists"
    )
    orphan = {"name": "x", "parent": "nope", "capacity": 1}
    error = assert_envelope(await edge.client.post("/v1/admin/pools", json=orphan, headers=ADMIN), 404)
    assert error["code"] == "pool_not_found"
    await edge.client.post("/v1/admin/pools", json={"name": "child", "parent": "org", "capacity": 1}, headers=ADMIN)
    assert assert_envelope(await edge.client.delete("/v1/admin/pools/org", headers=ADMIN), 409)["code"] == (
        "pool_in_use"
    )
    both = {"name": "y", "capacity": 1, "cap_usd": 1, "cap_usd_micros": 1}
    assert_envelope(await edge.client.post("/v1/admin/pools", json=both, headers=ADMIN), 400)
    bad_period = {"name": "y", "capacity": 1, "period": "fortnightly"}
    assert_envelope(await edge.client.post("/v1/admin/pools", json=bad_period, headers=ADMIN), 400, param="period")
    # A budget service whose Redis cannot be reached answers UNAVAILABLE budget_unavailable.
    cut_off = await start_budget(
        stack.bus, key_prefix=stack.budget_key_prefix, redis_url=f"redis://127.0.0.1:{free_port()}/0", start_store=False
    )
    stack.extra.append(cut_off)
    other = await edge_on(make_edge, stack, budget_addr=cut_off.address)
    error = assert_envelope(await other.client.get("/v1/admin/pools/org", headers=ADMIN), 503)
    assert (error["code"], error["type"]) == ("budget_unavailable", "api_error")
