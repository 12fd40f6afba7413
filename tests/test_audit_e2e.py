"""The audit record through the whole stack: admin actions recorded like requests
(never a key), and GET /v1/audit's filters and cursor paging."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import RunningStack
from .test_tenancy_e2e import admin_client, make_key, make_pool

pytestmark = pytest.mark.slow


@pytest.fixture
def admin(hoosh: RunningStack) -> Iterator[httpx.Client]:
    with admin_client(hoosh.base_url, hoosh.admin_key) as client:
        yield client


def entries_of(client: httpx.Client, attempts: int = 150, expect: int = 1, **query: Any) -> list[dict[str, Any]]:
    """The matching audit entries, once at least ``expect`` are there (events reach the
    log asynchronously: bounded poll)."""
    for _ in range(attempts):
        response = client.get("/v1/audit", params=query)
        assert response.status_code == 200, response.text
        found: list[dict[str, Any]] = response.json()["entries"]
        if len(found) >= expect:
            return found
        time.sleep(0.1)
    raise AssertionError(f"fewer than {expect} audit entries for {query}")


def entries_for(client: httpx.Client, kind: str, target: str, attempts: int = 150) -> list[dict[str, Any]]:
    """The ``kind`` entries whose payload names ``target``, once there is one (bounded poll:
    other tests' actions of the same kind may be in the log already)."""
    for _ in range(attempts):
        found = [e for e in entries_of(client, kind=kind, limit=1000) if e["payload"].get("target") == target]
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no {kind} entry for {target}")


def test_admin_actions_are_recorded_and_never_the_key(hoosh: RunningStack, admin: httpx.Client) -> None:
    team = make_pool(admin, 1000)
    key, key_id = make_key(admin, [team])
    assert admin.patch(f"/v1/admin/keys/{key_id}", json={"rpm": 30}).status_code == 200
    assert admin.delete(f"/v1/admin/keys/{key_id}").status_code == 200
    report = admin.post("/v1/tokens/report", json={"pool": team, "actual": 7, "reserved": 0})
    assert report.status_code == 200, report.text
    assert admin.delete(f"/v1/admin/pools/{team}").status_code == 200

    def one(kind: str, target: str) -> dict[str, Any]:
        found = entries_for(admin, kind, target)
        assert len(found) == 1, (kind, target, found)
        return found[0]

    created = one("admin.key.created", key_id)
    assert created["payload"]["action"] == "key.created"
    assert "pools" in created["payload"]["details_json"]
    assert one("admin.key.updated", key_id)["payload"]["details_json"] == '{"changes":{"rpm":30}}'
    assert one("admin.key.revoked", key_id)["subject"].endswith(".admin.key.revoked")
    assert one("admin.pool.created", team)
    assert one("admin.tokens.reported", team)["payload"]["details_json"] == '{"actual":7}'
    assert one("admin.pool.deleted", team)
    # The key itself appears nowhere in the log.
    audit_dir = hoosh.audit_file.parent
    assert all(key not in path.read_text() for path in audit_dir.glob("seg-*.jsonl"))


def test_audit_pages_filter_and_follow_a_cursor(hoosh: RunningStack, admin: httpx.Client) -> None:
    team = make_pool(admin, 1_000_000)
    key, key_id = make_key(admin, [team])
    other, _ = make_key(admin, [team])
    user = httpx.Client(base_url=hoosh.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    request_ids = []
    for _ in range(5):
        response = user.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        request_ids.append(response.headers["x-request-id"])
    entries_of(admin, key_id=key_id, expect=5)

    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):
        query: dict[str, Any] = {"key_id": key_id, "limit": 2, "kind": "chat", "outcome": "completed"}
        if cursor:
            query["cursor"] = cursor
        page = admin.get("/v1/audit", params=query).json()
        assert page["total"] == 5 and page["chain_valid"] is True
        seen = [entry["event_id"] for entry in page["entries"]] + seen  # each page oldest first
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert seen == request_ids  # every entry once, in order, across three pages

    # The key sees its own entries (also by pool and model), never another key's.
    mine = user.get("/v1/audit", params={"pool": team, "model": "gpt-4o-mini"}).json()
    assert [entry["event_id"] for entry in mine["entries"]] == request_ids
    refused = user.get("/v1/audit", params={"key_id": "key_someone_else"})
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "key_id"
    onlooker = httpx.get(f"{hoosh.base_url}/v1/audit", headers={"Authorization": f"Bearer {other}"}).json()
    assert onlooker["entries"] == []
    user.close()


def test_a_large_admin_action_is_still_recorded(hoosh: RunningStack, admin: httpx.Client) -> None:
    team = make_pool(admin, 1000)
    # About 13 KB of patterns: past the bound of an event's details.
    models = [f"vendor-{index:03d}/a-rather-long-model-family-name-{index:03d}-*" for index in range(250)]
    _, key_id = make_key(admin, [team], models=models)
    (entry,) = entries_for(admin, "admin.key.created", key_id)
    details = json.loads(entry["payload"]["details_json"])
    assert details["models"]["length"] == 250 and len(details["models"]["sha256"]) == 64
    assert details["pools"] == [team]
