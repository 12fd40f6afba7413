"""Keys and scopes at the edge, through the official openai client and plain HTTP.

Keys live in the real Redis (a fresh prefix per test); router, budget and audit are
in-process gRPC fakes that record what the edge sends (backends.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from hoosh_tenancy import hash_key

from .backends import Backends
from .conftest import ADMIN_KEY, Edge, MakeEdge, free_port
from .test_edge_app import CHAT, USER, assert_envelope

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def edge_on(make_edge: MakeEdge, backends: Backends, **overrides: Any) -> Edge:
    values: dict[str, Any] = {
        "auth": "keys",
        "admin_key": ADMIN_KEY,
        "router_addr": backends.address,
        "budget_addr": backends.address,
        "audit_addr": backends.address,
    }
    values.update(overrides)
    return await make_edge(**values)


async def create_key(edge: Edge, **fields: Any) -> tuple[str, dict[str, Any]]:
    response = await edge.client.post("/v1/admin/keys", json={"name": "k", **fields}, headers=ADMIN)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["key"], body["record"]


@pytest.fixture
async def edge(make_edge: MakeEdge, backends: Backends) -> Edge:
    return await edge_on(make_edge, backends)


def openai_client(edge: Edge, key: str) -> openai.AsyncOpenAI:
    transport = httpx.ASGITransport(app=edge.app)
    return openai.AsyncOpenAI(
        base_url="http://edge/v1",
        api_key=key,
        max_retries=0,
        http_client=httpx.AsyncClient(transport=transport, base_url="http://edge"),
    )


@pytest.fixture
async def team_a(edge: Edge) -> AsyncIterator[tuple[str, dict[str, Any], openai.AsyncOpenAI]]:
    """A user key of team A: pools team-a (default) and org, models gpt-* and local/llama-3."""
    key, record = await create_key(
        edge, team="a", user="ann", pools=["team-a", "org"], models=["gpt-*", "local/llama-3"], rpm=60, tpm=1000
    )
    client = openai_client(edge, key)
    yield key, record, client
    await client.close()


# --------------------------------------------------------------------------- keys


async def test_wrong_missing_and_malformed_keys_are_401_in_openai_shape(edge: Edge) -> None:
    for key in ("sk-hoosh-" + "x" * 43, "nonsense", ADMIN_KEY + "x"):
        client = openai_client(edge, key)
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model="gpt-4o", messages=[USER])  # type: ignore[list-item]
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"
        assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]
        await client.close()
    error = assert_envelope(await edge.client.get("/v1/models"), 401)
    assert error["code"] == "invalid_api_key" and "Missing" in error["message"]


async def test_key_lifecycle_create_use_revoke(edge: Edge, backends: Backends) -> None:
    key, record = await create_key(edge, pools=["team-a"])
    assert key.startswith("sk-hoosh-") and record["id"].startswith("key_")
    client = openai_client(edge, key)
    reply = await client.chat.completions.create(model="gpt-4o", messages=[USER])  # type: ignore[list-item]
    assert reply.choices[0].message.content == "ok"
    revoked = await edge.client.delete(f"/v1/admin/keys/{record['id']}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=[USER])  # type: ignore[list-item]
    assert "revoked" in caught.value.message
    await client.close()


async def test_a_second_edge_refuses_a_revoked_key_within_a_second(
    make_edge: MakeEdge, backends: Backends, edge: Edge
) -> None:
    other = await edge_on(make_edge, backends)  # another replica: its own key cache and Redis client
    key, record = await create_key(edge)
    body = {"model": "gpt-4o", "messages": [USER]}
    assert (await other.client.post(CHAT, json=body, headers=bearer(key))).status_code == 200
    assert (await edge.client.delete(f"/v1/admin/keys/{record['id']}", headers=ADMIN)).status_code == 200
    start = time.monotonic()
    while (await other.client.post(CHAT, json=body, headers=bearer(key))).status_code != 401:
        assert time.monotonic() - start < 1.0, "the other replica still admits the revoked key"
        await asyncio.sleep(0.005)


async def test_an_expired_key_is_401(edge: Edge) -> None:
    expires_at = int(time.time()) + 2
    key, _ = await create_key(edge, expires_at=expires_at)
    assert (await edge.client.get("/v1/models", headers=bearer(key))).status_code == 200
    await asyncio.sleep(expires_at - time.time() + 0.01)
    error = assert_envelope(await edge.client.get("/v1/models", headers=bearer(key)), 401)
    assert "expired" in error["message"]


async def test_a_warm_request_costs_no_redis_lookup(edge: Edge) -> None:
    key, _ = await create_key(edge)
    for _ in range(20):
        assert (await edge.client.get("/v1/models", headers=bearer(key))).status_code == 200
    assert edge.tenancy.cache.redis_lookups <= 1  # at most the first use, before its notice arrived


async def test_key_store_down_is_503_not_an_admit(make_edge: MakeEdge, backends: Backends) -> None:
    edge = await edge_on(make_edge, backends, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    key = "sk-hoosh-" + "k" * 43
    error = assert_envelope(await edge.client.get("/v1/models", headers=bearer(key)), 503)
    assert error["code"] == "budget_unavailable"
    # The bootstrap admin key needs no Redis; creating a key does.
    assert (await edge.client.get("/v1/models", headers=ADMIN)).status_code == 200
    assert_envelope(await edge.client.post("/v1/admin/keys", json={"name": "x"}, headers=ADMIN), 503)


async def test_open_mode_serves_anonymous_and_still_checks_known_keys(make_edge: MakeEdge, backends: Backends) -> None:
    edge = await edge_on(make_edge, backends, auth="open")
    body = {"model": "anything", "messages": [USER], "pool": "team-b"}
    assert (await edge.client.post(CHAT, json=body)).status_code == 200
    assert (await edge.client.post(CHAT, json=body, headers=bearer("no-key-needed"))).status_code == 200
    assert backends.recorder.last("Chat").caller.key_id == ""
    # Anonymous is a user: no admin routes.
    assert_envelope(await edge.client.get("/v1/admin/keys"), 403)
    key, record = await create_key(edge, pools=["team-a"])
    error = assert_envelope(await edge.client.post(CHAT, json=body, headers=bearer(key)), 403, param="pool")
    assert error["code"] == "pool_not_allowed"
    await edge.client.delete(f"/v1/admin/keys/{record['id']}", headers=ADMIN)
    assert_envelope(await edge.client.post(CHAT, json=body, headers=bearer(key)), 401)


def outward_address() -> str | None:
    """A non-loopback address of this machine (the interface a default route uses), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback else address


def client_from(edge: Edge, host: str) -> httpx.AsyncClient:
    """Requests to the edge's app whose ASGI scope says they come from ``host``."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=edge.app, client=(host, 40000)), base_url="http://edge")


async def test_open_mode_serves_anonymous_only_to_a_loopback_peer(make_edge: MakeEdge, backends: Backends) -> None:
    edge = await edge_on(make_edge, backends, auth="open")
    key, _ = await create_key(edge, pools=["team-b"])
    body = {"pool": "team-b", "tokens": 5}
    for host in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
        async with client_from(edge, host) as client:
            assert (await client.post("/v1/tokens/reserve", json=body)).status_code == 200, host
    for host in ("192.0.2.7", "10.0.0.1", "::ffff:192.0.2.7", "fd00::2", "0.0.0.0", "localhost", ""):
        async with client_from(edge, host) as client:
            for headers in ({}, bearer("not-a-key"), bearer("sk-hoosh-" + "x" * 43)):
                response = await client.post("/v1/tokens/reserve", json=body, headers=headers)
                assert_envelope(response, 401)
                assert response.headers["www-authenticate"] == "Bearer"
            # A known key is served from anywhere, as in keys mode.
            assert (await client.post("/v1/tokens/reserve", json=body, headers=bearer(key))).status_code == 200
    assert backends.recorder.count("Reserve") == 4 + 7


async def test_open_mode_on_all_interfaces_refuses_a_remote_client_without_a_key(
    make_edge: MakeEdge, backends: Backends
) -> None:
    address = outward_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    # Settings validated for loopback, the app then served on 0.0.0.0 by another launcher.
    edge = await edge_on(make_edge, backends, auth="open")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(edge.app, host="0.0.0.0", port=port, loop="none", log_config=None, access_log=False)
    )
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient() as client:
            body = {"pool": "team-b", "tokens": 5}
            remote = await client.post(f"http://{address}:{port}/v1/tokens/reserve", json=body)
            assert_envelope(remote, 401)
            local = await client.post(f"http://127.0.0.1:{port}/v1/tokens/reserve", json=body)
            assert local.status_code == 200, local.text
    finally:
        server.should_exit = True
        await task
    assert backends.recorder.count("Reserve") == 1


async def test_anonymous_reservations_have_an_owner_and_cannot_end_a_keys(
    make_edge: MakeEdge, backends: Backends
) -> None:
    edge = await edge_on(make_edge, backends, auth="open")
    key, record = await create_key(edge, pools=["team-a"])
    mine = await edge.client.post("/v1/tokens/reserve", json={"pool": "team-a", "tokens": 5}, headers=bearer(key))
    theirs = (await edge.client.post("/v1/tokens/reserve", json={"pool": "team-a", "tokens": 5})).json()
    assert backends.recorder.last("Reserve").owner == "anonymous"  # never empty: empty means "any owner"

    # Anonymous cannot commit the key's reservation...
    report = {"pool": "team-a", "actual": 0, "reservation_id": mine.json()["reservation_id"]}
    error = assert_envelope(await edge.client.post("/v1/tokens/report", json=report), 403)
    assert error["code"] == "reservation_not_owned"
    assert backends.recorder.last("Commit").owner == "anonymous"
    # ...nor the key anonymous's; each ends its own.
    other = {"pool": "team-a", "actual": 2, "reservation_id": theirs["reservation_id"]}
    assert_envelope(await edge.client.post("/v1/tokens/report", json=other, headers=bearer(key)), 403)
    assert (await edge.client.post("/v1/tokens/report", json=other)).status_code == 200
    assert (await edge.client.post("/v1/tokens/report", json=report, headers=bearer(key))).status_code == 200
    assert backends.recorder.last("Commit").owner == record["id"]
    # Only an admin sends the empty owner.
    third = (await edge.client.post("/v1/tokens/reserve", json={"pool": "team-a", "tokens": 5})).json()
    admin_report = {"pool": "team-a", "actual": 1, "reservation_id": third["reservation_id"]}
    assert (await edge.client.post("/v1/tokens/report", json=admin_report, headers=ADMIN)).status_code == 200
    assert backends.recorder.last("Commit").owner == ""


# --------------------------------------------------------------------------- scopes: chat, embeddings, models


async def test_chat_gets_the_default_pool_and_the_caller(team_a: Any, backends: Backends) -> None:
    _, record, client = team_a
    await client.chat.completions.create(model="gpt-4o-mini", messages=[USER])  # type: ignore[list-item]
    sent = backends.recorder.last("Chat")
    assert sent.pool == "team-a"
    caller = sent.caller
    assert (caller.key_id, caller.key_name, caller.team, caller.user, caller.admin) == (
        record["id"],
        "k",
        "a",
        "ann",
        False,
    )
    assert (caller.rpm, caller.tpm, caller.max_concurrency) == (60, 1000, 0)
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[USER], stream=True, extra_body={"pool": "org"}
    )  # type: ignore[call-overload]
    assert [chunk async for chunk in stream]
    assert backends.recorder.last("ChatStream").pool == "org"
    assert backends.recorder.last("ChatStream").caller.key_id == record["id"]


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_outside_the_keys_pools_and_models_is_403(team_a: Any, backends: Backends, stream: bool) -> None:
    _, _, client = team_a
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(
            model="gpt-4o", messages=[USER], stream=stream, extra_body={"pool": "team-b"}
        )  # type: ignore[call-overload]
    assert (caught.value.code, caught.value.body["param"]) == ("pool_not_allowed", "pool")  # type: ignore[index]
    for model in ("claude-3", "slow/gpt-4o", "local/llama-30", "openai/gpt-4o"):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await client.chat.completions.create(model=model, messages=[USER], stream=stream)  # type: ignore[call-overload]
        assert caught.value.code == "model_not_allowed"
        assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert backends.recorder.count("Chat") + backends.recorder.count("ChatStream") == 0


async def test_bad_model_ids_are_400_before_any_backend(team_a: Any, backends: Backends) -> None:
    _, _, client = team_a
    for model in ("gpt-4o mini", "gpt-4o/../../admin?x=1", "upstream/../../admin", "g" * 257, "gpt-\u00e9"):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=model, messages=[USER])  # type: ignore[list-item]
        assert caught.value.body["param"] == "model"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError):
            await client.embeddings.create(model=model, input="x")
    assert not {"Chat", "ChatStream", "Embed"} & set(backends.recorder.calls)


async def test_embeddings_are_scoped_and_carry_the_caller(team_a: Any, backends: Backends) -> None:
    _, record, client = team_a
    with pytest.raises(openai.PermissionDeniedError):
        await client.embeddings.create(model="text-embedding-3-small", input="x")  # not in gpt-* or local/llama-3
    await client.embeddings.create(model="gpt-4o", input="x", extra_body={"pool": "org"})
    sent = backends.recorder.last("Embed")
    assert (sent.pool, sent.caller.key_id) == ("org", record["id"])


async def test_models_are_filtered_by_the_keys_patterns(team_a: Any, edge: Edge) -> None:
    _, _, client = team_a
    ids = [model.id async for model in client.models.list()]
    assert ids == ["gpt-4o-mini", "gpt-4o", "local/llama-3"]
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("slow-1")
    everything = (await edge.client.get("/v1/models", headers=ADMIN)).json()["data"]
    assert len(everything) == 5


async def test_transcriptions_are_scoped(team_a: Any, edge: Edge) -> None:
    key, _, _ = team_a
    files = {"file": ("a.wav", b"RIFF" + b"\x00" * 100)}
    for data, code in (({"model": "whisper-1", "pool": "team-a"}, "model_not_allowed"),):
        response = await edge.client.post("/v1/audio/transcriptions", data=data, files=files, headers=bearer(key))
        assert assert_envelope(response, 403, param="model")["code"] == code
    response = await edge.client.post(
        "/v1/audio/transcriptions", data={"model": "gpt-4o", "pool": "team-b"}, files=files, headers=bearer(key)
    )
    assert assert_envelope(response, 403, param="pool")["code"] == "pool_not_allowed"


# --------------------------------------------------------------------------- scopes: tokens, audit, operations


async def test_token_pools_list_only_the_keys_pools(team_a: Any, edge: Edge, backends: Backends) -> None:
    key, _, _ = team_a
    response = await edge.client.get("/v1/tokens/pools", headers=bearer(key))
    assert [pool["name"] for pool in response.json()] == ["org", "team-a"]
    assert list(backends.recorder.last("ListPools").names) == ["team-a", "org"]
    response = await edge.client.get("/v1/tokens/pools", headers=ADMIN)
    assert len(response.json()) == 4
    assert list(backends.recorder.last("ListPools").names) == []


async def test_check_and_reserve_only_in_the_keys_pools(team_a: Any, edge: Edge, backends: Backends) -> None:
    key, record, _ = team_a
    for path in ("/v1/tokens/check", "/v1/tokens/reserve"):
        response = await edge.client.post(path, json={"pool": "team-b", "tokens": 1}, headers=bearer(key))
        assert assert_envelope(response, 403, param="pool")["code"] == "pool_not_allowed"
    assert backends.recorder.count("Reserve") == 0
    check = await edge.client.post("/v1/tokens/check", json={"pool": "team-a", "tokens": 1}, headers=bearer(key))
    assert check.json() == {"allowed": True, "available": 1000}
    reserved = await edge.client.post("/v1/tokens/reserve", json={"pool": "team-a", "tokens": 5}, headers=bearer(key))
    assert reserved.json()["reserved"] is True
    sent = backends.recorder.last("Reserve")
    assert (sent.pool, sent.owner, sent.kind) == ("team-a", record["id"], "manual")


async def test_report_commits_only_the_keys_own_manual_reservations(
    team_a: Any, edge: Edge, backends: Backends
) -> None:
    key, record, _ = team_a
    other_key, _ = await create_key(edge, pools=["team-a"])
    reserved = await edge.client.post("/v1/tokens/reserve", json={"pool": "team-a", "tokens": 5}, headers=bearer(key))
    reservation = reserved.json()["reservation_id"]
    report = {"pool": "team-a", "actual": 0, "reservation_id": reservation}

    # Another key of the same team cannot commit it.
    error = assert_envelope(await edge.client.post("/v1/tokens/report", json=report, headers=bearer(other_key)), 403)
    assert error["code"] == "reservation_not_owned"
    # A chat's reservation is never committed here.
    backends.budget.reservations["chat-1"] = backends.budget.reservations[reservation].__class__(
        "team-a", 5, record["id"], "chat"
    )
    chat_report = {**report, "reservation_id": "chat-1"}
    assert_envelope(await edge.client.post("/v1/tokens/report", json=chat_report, headers=bearer(key)), 403)

    ok = await edge.client.post("/v1/tokens/report", json={**report, "actual": 3}, headers=bearer(key))
    assert ok.status_code == 200, ok.text
    sent = backends.recorder.last("Commit")
    assert (sent.pool, sent.owner, sent.kind, sent.used_tokens) == ("team-a", record["id"], "manual", 3)
    # Admin commits any manual reservation (no owner check), still never a chat's.
    assert_envelope(await edge.client.post("/v1/tokens/report", json=chat_report, headers=ADMIN), 403)
    assert (backends.recorder.last("Commit").owner, backends.recorder.last("Commit").kind) == ("", "manual")


async def test_report_without_a_reservation_is_admin_only(team_a: Any, edge: Edge, backends: Backends) -> None:
    key, _, _ = team_a
    body = {"pool": "team-a", "actual": 10}
    response = await edge.client.post("/v1/tokens/report", json=body, headers=bearer(key))
    assert assert_envelope(response, 403, param="reservation_id")["code"] == "insufficient_scope"
    assert backends.recorder.count("Report") == 0
    assert (await edge.client.post("/v1/tokens/report", json=body, headers=ADMIN)).status_code == 200
    assert backends.recorder.last("Report").actual == 10


async def test_audit_is_filtered_by_key_id(team_a: Any, edge: Edge, backends: Backends) -> None:
    key, record, _ = team_a
    assert (await edge.client.get("/v1/audit", headers=bearer(key))).status_code == 200
    assert backends.recorder.last("ListEntries").key_id == record["id"]
    assert (await edge.client.get("/v1/audit", headers=ADMIN)).status_code == 200
    assert backends.recorder.last("ListEntries").key_id == ""


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/health/providers"),
        ("GET", "/v1/cache/stats"),
        ("GET", "/v1/admin/keys"),
        ("POST", "/v1/admin/keys"),
        ("GET", "/v1/admin/keys/key_x"),
        ("PATCH", "/v1/admin/keys/key_x"),
        ("DELETE", "/v1/admin/keys/key_x"),
        ("GET", "/v1/admin/pools"),
        ("POST", "/v1/admin/pools"),
        ("POST", "/v1/admin/pools/team-a/reset"),
        ("DELETE", "/v1/admin/pools/team-a"),
    ],
)
async def test_admin_routes_refuse_user_keys(team_a: Any, edge: Edge, method: str, path: str) -> None:
    key, _, _ = team_a
    response = await edge.client.request(method, path, json={}, headers=bearer(key))
    assert assert_envelope(response, 403)["code"] == "insufficient_scope"
    assert (await edge.client.request(method, path, json={}, headers=ADMIN)).status_code != 403


async def test_an_admin_key_created_through_the_api_is_admin(edge: Edge, backends: Backends) -> None:
    key, record = await create_key(edge, scope="admin")
    assert record["scope"] == "admin"
    assert (await edge.client.get("/v1/health/providers", headers=bearer(key))).status_code == 200
    body = {"model": "anything/at-all", "messages": [USER], "pool": "team-b"}
    assert (await edge.client.post(CHAT, json=body, headers=bearer(key))).status_code == 200
    assert backends.recorder.last("Chat").caller.admin is True


async def test_keys_are_never_logged_or_listed(edge: Edge, caplog: pytest.LogCaptureFixture) -> None:
    key, record = await create_key(edge)
    await edge.client.get("/v1/models", headers=bearer(key))
    listed = (await edge.client.get("/v1/admin/keys", headers=ADMIN)).text
    fetched = (await edge.client.get(f"/v1/admin/keys/{record['id']}", headers=ADMIN)).text
    for text in (listed, fetched, caplog.text):
        assert key not in text and ADMIN_KEY not in text
        assert hash_key(key) not in text
