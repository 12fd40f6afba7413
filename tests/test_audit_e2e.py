"""The audit record through the whole stack: admin actions recorded like requests
(never a key), and GET /v1/audit's filters and cursor paging."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from hoosh.events.v1 import events_pb2
from hoosh_audit.chain import verify

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


async def _publish_forgeries(nats_url: str, stream: str, subject: str, payload: bytes, msg_id: str) -> None:
    """What anyone who can publish on the stream could send: the event without a
    signature, and with one made up under the router's key id."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.publish(subject, payload, stream=stream, headers={"Nats-Msg-Id": msg_id})
        made_up = {"Nats-Msg-Id": f"{msg_id}-2", "hoosh-signature": "v1:router:" + "0" * 64}
        await js.publish(subject, payload, stream=stream, headers=made_up)
    finally:
        await nc.close()


def test_a_forged_inference_event_lands_only_as_a_rejection(hoosh: RunningStack, admin: httpx.Client) -> None:
    assert hoosh.stack_config is not None
    config = hoosh.stack_config
    team = make_pool(admin, 1_000_000)
    key, key_id = make_key(admin, [team])
    user = httpx.Client(base_url=hoosh.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    before = user.post("/v1/chat/completions", json=body)
    assert before.status_code == 200, before.text

    # A made-up chat billed to the user's key and pool, published straight on the stream.
    forged_id = f"forged-{uuid.uuid4().hex[:10]}"
    forged = events_pb2.InferenceCompleted(
        request_id=forged_id, model="gpt-4o-mini", provider="upstream", pool=team, key_id=key_id, cost_usd=1000.0
    )
    subject = f"{config.subject_prefix}.inference.completed"
    asyncio.run(_publish_forgeries(config.nats_url, config.nats_stream, subject, forged.SerializeToString(), forged_id))

    after = user.post("/v1/chat/completions", json=body)
    assert after.status_code == 200, after.text
    chats = [before.headers["x-request-id"], after.headers["x-request-id"]]
    # Real chats still land as themselves (signed by the router).
    found = entries_of(admin, key_id=key_id, kind="chat", expect=2)
    assert [entry["event_id"] for entry in found] == chats
    assert all(entry["subject"] == subject for entry in found)

    # The forgeries are there for an admin, as rejections: never as the chat they claim to be.
    rejected: list[dict[str, Any]] = []
    for _ in range(150):  # bounded poll: events reach the log asynchronously
        page = entries_of(admin, kind="audit.rejected", limit=1000, expect=0)
        rejected = [entry for entry in page if entry["payload"]["msg_id"] in (forged_id, f"{forged_id}-2")]
        if len(rejected) == 2:
            break
        time.sleep(0.1)
    assert [(entry["event_id"], entry["payload"]["reason"]) for entry in rejected] == [
        (f"rejected:{forged_id}", "missing"),
        (f"rejected:{forged_id}-2", "mismatch"),
    ]
    assert all(entry["subject"] == f"{config.subject_prefix}.audit.rejected" for entry in rejected)
    assert rejected[0]["payload"]["claimed_subject"] == subject
    assert admin.get("/v1/audit", params={"request_id": forged_id}).json()["entries"] == []
    page = admin.get("/v1/audit", params={"key_id": key_id}).json()
    assert [entry["event_id"] for entry in page["entries"]] == chats  # nothing billed to the key by the forgery
    assert page["chain_valid"] is True
    # The user never sees the rejections (they carry no key id), and the chain verifies offline.
    assert user.get("/v1/audit", params={"kind": "audit.rejected"}).json()["entries"] == []
    result = verify(hoosh.audit_file.parent, hoosh.audit_key.encode())
    assert result.valid, result
    user.close()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads /proc/<pid>/environ")
def test_each_stack_process_holds_only_its_own_signing_key(hoosh: RunningStack) -> None:
    assert hoosh.stack_config is not None
    keys = hoosh.stack_config.signing_keys
    assert sorted(keys) == ["budget", "router", "stt"] and len(set(keys.values())) == 3
    for service in hoosh.stack.services:
        assert service.process is not None
        env = _environ(service.process.pid)
        if service.name in keys:
            assert env["HOOSH_EVENTS_SIGNING_KEY"] == keys[service.name], service.name
            assert env["HOOSH_EVENTS_SIGNING_KEY_ID"] == service.name
        else:
            assert "HOOSH_EVENTS_SIGNING_KEY" not in env, service.name
        if service.name == "audit":
            assert env["HOOSH_AUDIT_PUBLISHER_KEYS"] == ",".join(f"{n}={keys[n]}" for n in sorted(keys))
        else:
            assert "HOOSH_AUDIT_PUBLISHER_KEYS" not in env, service.name
        # The internal plane likewise: a process holds its own token only, and its
        # callers' digests, never a token that lets it call as another service.
        tokens = hoosh.stack_config.internal_tokens
        assert env.get("HOOSH_INTERNAL_TOKEN") == tokens.get(service.name), service.name
        others = [token for name, token in tokens.items() if name != service.name]
        assert not any(token in value for token in others for value in env.values()), service.name
        for entry in filter(None, env.get("HOOSH_INTERNAL_CALLERS", "").split(",")):
            assert entry.split("=", 1)[1].startswith("sha256:"), (service.name, entry.split("=", 1)[0])


def test_hoosh_up_keeps_one_signing_key_per_publisher(tmp_path: Path) -> None:
    from hoosh_cli.__main__ import signing_keys
    from hoosh_cli.stack import StackConfig

    first = signing_keys(tmp_path)
    assert sorted(first) == ["budget", "router", "stt"] and len(set(first.values())) == 3
    assert all(len(bytes.fromhex(key)) == 32 for key in first.values())
    assert all((tmp_path / "event-keys" / f"{name}.key").stat().st_mode & 0o777 == 0o600 for name in first)
    assert signing_keys(tmp_path) == first  # a restart signs with the same keys
    config = StackConfig(state_dir=tmp_path, signing_keys=first, service_env={"router": {"X": "1"}})
    router, edge, audit = config.environment("router"), config.environment("edge"), config.environment("audit")
    assert (router["HOOSH_EVENTS_SIGNING_KEY"], router["HOOSH_EVENTS_SIGNING_KEY_ID"], router["X"]) == (
        first["router"],
        "router",
        "1",
    )
    assert "HOOSH_EVENTS_SIGNING_KEY" not in edge and "X" not in edge
    assert "HOOSH_EVENTS_SIGNING_KEY" not in audit
    assert (
        audit["HOOSH_AUDIT_PUBLISHER_KEYS"] == f"budget={first['budget']},router={first['router']},stt={first['stt']}"
    )
    # Unsigned (and an audit accepting so, in development) when a caller wants none.
    unsigned = StackConfig(state_dir=tmp_path, signing_keys={})
    assert "HOOSH_EVENTS_SIGNING_KEY" not in unsigned.environment("router")
    assert "HOOSH_AUDIT_PUBLISHER_KEYS" not in unsigned.environment("audit")
