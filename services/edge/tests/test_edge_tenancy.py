"""Keys and scopes at the edge, through the official openai client and plain HTTP.

Keys live in the real Redis (a fresh prefix per test); router, budget and audit are the
real services in-process (conftest's ``stack``), so what the edge passes on is checked
by what they do with it: the pool a chat was charged to, the key id in its event and
audit entry, the reservations and their owners in the budget.
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
from hoosh.events.v1 import events_pb2
from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_edge.protocol import ChatCompletionRequest, EmbeddingRequest
from hoosh_edge.serving_chat import to_router_request
from hoosh_edge.serving_embeddings import to_embed_request
from hoosh_tenancy import KeyRecord, hash_key

from .conftest import ADMIN_KEY, MODELS, REPLY, Edge, MakeEdge, Stack, eventually, free_port, uvicorn_serving
from .test_edge_app import CHAT, USER, assert_envelope

ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def edge_on(make_edge: MakeEdge, stack: Stack, **overrides: Any) -> Edge:
    """An edge in keys mode (the bootstrap admin key set) on the stack's services."""
    values: dict[str, Any] = {"auth": "keys", "admin_key": ADMIN_KEY, **stack.addresses()}
    values.update(overrides)
    return await make_edge(**values)


async def create_key(edge: Edge, **fields: Any) -> tuple[str, dict[str, Any]]:
    response = await edge.client.post("/v1/admin/keys", json={"name": "k", **fields}, headers=ADMIN)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["key"], body["record"]


@pytest.fixture
async def edge(make_edge: MakeEdge, stack: Stack) -> Edge:
    return await edge_on(make_edge, stack)


async def completed_events(stack: Stack) -> dict[str, Any]:
    """The router's completed events so far, by request id."""
    return {event.request_id: event for name, event in await stack.router_events() if name == "inference.completed"}


def request_id_of(chat_id: str) -> str:
    """The request id inside a chat completion's id (``chatcmpl-<request id>``)."""
    assert chat_id.startswith("chatcmpl-"), chat_id
    return chat_id.removeprefix("chatcmpl-")


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


async def test_key_lifecycle_create_use_revoke(edge: Edge) -> None:
    key, record = await create_key(edge, pools=["team-a"])
    assert key.startswith("sk-hoosh-") and record["id"].startswith("key_")
    client = openai_client(edge, key)
    reply = await client.chat.completions.create(model="gpt-4o", messages=[USER])  # type: ignore[list-item]
    assert reply.choices[0].message.content == REPLY
    revoked = await edge.client.delete(f"/v1/admin/keys/{record['id']}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    with pytest.raises(openai.AuthenticationError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=[USER])  # type: ignore[list-item]
    assert "revoked" in caught.value.message
    await client.close()


async def test_a_second_edge_refuses_a_revoked_key_within_a_second(
    make_edge: MakeEdge, stack: Stack, edge: Edge
) -> None:
    other = await edge_on(make_edge, stack)  # another replica: its own key cache and Redis client
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


async def test_key_store_down_is_503_not_an_admit(make_edge: MakeEdge, stack: Stack) -> None:
    edge = await edge_on(make_edge, stack, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    key = "sk-hoosh-" + "k" * 43
    error = assert_envelope(await edge.client.get("/v1/models", headers=bearer(key)), 503)
    assert error["code"] == "budget_unavailable"
    # The bootstrap admin key needs no Redis; creating a key does.
    assert (await edge.client.get("/v1/models", headers=ADMIN)).status_code == 200
    assert_envelope(await edge.client.post("/v1/admin/keys", json={"name": "x"}, headers=ADMIN), 503)


async def test_open_mode_serves_anonymous_and_still_checks_known_keys(make_edge: MakeEdge, stack: Stack) -> None:
    edge = await edge_on(make_edge, stack, auth="open")
    body = {"model": "slow-1", "messages": [USER], "pool": "team-b"}
    served = [await edge.client.post(CHAT, json=body), await edge.client.post(CHAT, json=body, headers=bearer("x"))]
    assert [response.status_code for response in served] == [200, 200], served[-1].text
    events = await completed_events(stack)
    for response in served:  # charged to team-b, as nobody: no key id
        event = events[request_id_of(response.json()["id"])]
        assert (event.pool, event.key_id) == ("team-b", "")
    assert (await stack.pool("team-b")).used == sum(response.json()["usage"]["total_tokens"] for response in served)
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


async def test_open_mode_serves_anonymous_only_to_a_loopback_peer(make_edge: MakeEdge, stack: Stack) -> None:
    edge = await edge_on(make_edge, stack, auth="open")
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
    assert (await stack.pool("team-b")).reserved == (4 + 7) * 5  # the refused ones reserved nothing


async def test_open_mode_on_all_interfaces_refuses_a_remote_client_without_a_key(
    make_edge: MakeEdge, stack: Stack
) -> None:
    address = outward_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    # Settings validated for loopback, the app then served on 0.0.0.0 by another launcher.
    edge = await edge_on(make_edge, stack, auth="open")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            edge.app,
            host="0.0.0.0",
            port=port,
            loop="none",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=5,
        )
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
    assert (await stack.pool("team-b")).reserved == 5  # only the local one


async def test_anonymous_reservations_have_an_owner_and_cannot_end_a_keys(make_edge: MakeEdge, stack: Stack) -> None:
    edge = await edge_on(make_edge, stack, auth="open")
    key, _ = await create_key(edge, pools=["team-a"])
    mine = await edge.client.post("/v1/tokens/reserve", json={"pool": "team-a", "tokens": 5}, headers=bearer(key))
    theirs = (await edge.client.post("/v1/tokens/reserve", json={"pool": "team-a", "tokens": 5})).json()

    # Anonymous cannot commit the key's reservation (its owner is never empty: an empty
    # owner would mean "any owner" to the budget)...
    report = {"pool": "team-a", "actual": 0, "reservation_id": mine.json()["reservation_id"]}
    error = assert_envelope(await edge.client.post("/v1/tokens/report", json=report), 403)
    assert error["code"] == "reservation_not_owned"
    # ...nor the key anonymous's; each ends its own.
    other = {"pool": "team-a", "actual": 2, "reservation_id": theirs["reservation_id"]}
    assert_envelope(await edge.client.post("/v1/tokens/report", json=other, headers=bearer(key)), 403)
    assert (await edge.client.post("/v1/tokens/report", json=other)).status_code == 200
    assert (await edge.client.post("/v1/tokens/report", json=report, headers=bearer(key))).status_code == 200
    # An admin ends anyone's manual reservation.
    third = (await edge.client.post("/v1/tokens/reserve", json={"pool": "team-a", "tokens": 5})).json()
    admin_report = {"pool": "team-a", "actual": 1, "reservation_id": third["reservation_id"]}
    assert (await edge.client.post("/v1/tokens/report", json=admin_report, headers=ADMIN)).status_code == 200
    pool = await stack.pool("team-a")
    assert (pool.used, pool.reserved) == (0 + 2 + 1, 0)  # each committed once, by the one allowed to


# --------------------------------------------------------------------------- scopes: chat, embeddings, models


async def test_chat_gets_the_default_pool_and_the_caller(team_a: Any, stack: Stack) -> None:
    _, record, client = team_a
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=[USER])  # type: ignore[list-item]
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=[USER], stream=True, extra_body={"pool": "org"}
    )  # type: ignore[call-overload]
    chunks = [chunk async for chunk in stream]
    events = await completed_events(stack)
    blocking, streamed = events[request_id_of(reply.id)], events[request_id_of(chunks[0].id)]
    assert (blocking.pool, list(blocking.pool_chain), blocking.key_id) == ("team-a", ["team-a"], record["id"])
    assert (streamed.pool, streamed.key_id, streamed.stream) == ("org", record["id"], True)
    assert reply.usage is not None
    assert (await stack.pool("team-a")).used == reply.usage.total_tokens == blocking.usage.total_tokens
    assert (await stack.pool("org")).used == streamed.usage.total_tokens > 0


def test_the_caller_carries_the_keys_labels_and_limits() -> None:
    """The Caller the edge puts on each request, as built from the key's record. The
    router acts on the key id, the limits and the admin flag (checked through it in
    test_edge_key_limits.py and above); the labels only travel, so they are checked here."""
    record = KeyRecord.model_validate(
        {"id": "key_1", "key_hash": "0" * 64, "name": "ci", "team": "a", "user": "ann", "pools": ["team-a"],
         "models": ["gpt-*"], "rpm": 60, "tpm": 1000, "max_concurrency": 2, "scope": "user", "created_at": 1}
    )  # fmt: skip
    expected = tenancy_pb2.Caller(
        key_id="key_1", key_name="ci", team="a", user="ann", admin=False, rpm=60, tpm=1000, max_concurrency=2
    )
    chat = ChatCompletionRequest.model_validate({"model": "gpt-4o", "messages": [USER]})
    assert to_router_request(chat, "rid", pool="team-a", caller=record.caller()).caller == expected
    embed = EmbeddingRequest.model_validate({"model": "gpt-embed-1", "input": "x"})
    assert to_embed_request(embed, "rid", pool="team-a", caller=record.caller()).caller == expected
    admin = record.model_copy(update={"scope": "admin", "rpm": None, "tpm": None, "max_concurrency": None})
    assert KeyRecord.model_validate(admin.model_dump()).caller().admin is True


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_outside_the_keys_pools_and_models_is_403(team_a: Any, stack: Stack, stream: bool) -> None:
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
    assert await stack.router_events() == [] and stack.upstream_requests() == 0  # none reached the router


async def test_bad_model_ids_are_400_before_any_backend(team_a: Any, stack: Stack) -> None:
    _, _, client = team_a
    for model in ("gpt-4o mini", "gpt-4o/../../admin?x=1", "upstream/../../admin", "g" * 257, "gpt-\u00e9"):
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=model, messages=[USER])  # type: ignore[list-item]
        assert caught.value.body["param"] == "model"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError):
            await client.embeddings.create(model=model, input="x")
    assert await stack.router_events() == [] and stack.upstream_requests() == 0


async def test_embeddings_are_scoped_and_carry_the_caller(team_a: Any, stack: Stack) -> None:
    _, record, client = team_a
    with pytest.raises(openai.PermissionDeniedError):
        await client.embeddings.create(model="text-embedding-3-small", input="x")  # not in gpt-* or local/llama-3
    reply = await client.embeddings.create(model="gpt-embed-1", input="some words", extra_body={"pool": "org"})
    assert len(reply.data[0].embedding) == 8  # the stand-in's vector came back
    [(name, event)] = await stack.router_events()
    assert (name, event.kind, event.pool, event.key_id) == ("inference.completed", "embedding", "org", record["id"])
    assert (await stack.pool("org")).used == reply.usage.total_tokens > 0


async def test_models_are_filtered_by_the_keys_patterns(team_a: Any, edge: Edge) -> None:
    _, _, client = team_a
    ids = [model.id async for model in client.models.list()]
    assert ids == ["gpt-4o-mini", "gpt-4o", "local/llama-3"]
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("slow-1")
    everything = (await edge.client.get("/v1/models", headers=ADMIN)).json()["data"]
    assert [model["id"] for model in everything] == list(MODELS)  # the router's own list


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


async def test_token_pools_list_only_the_keys_pools(team_a: Any, edge: Edge) -> None:
    key, _, _ = team_a
    response = await edge.client.get("/v1/tokens/pools", headers=bearer(key))
    assert sorted(pool["name"] for pool in response.json()) == ["org", "team-a"]
    assert response.json()[0] == {"name": response.json()[0]["name"], "capacity": 1000, "used": 0, "reserved": 0,
                                  "available": 1000}  # fmt: skip
    response = await edge.client.get("/v1/tokens/pools", headers=ADMIN)
    assert sorted(pool["name"] for pool in response.json()) == ["default", "org", "team-a", "team-b"]


async def test_check_and_reserve_only_in_the_keys_pools(team_a: Any, edge: Edge, stack: Stack) -> None:
    key, _, _ = team_a
    for path in ("/v1/tokens/check", "/v1/tokens/reserve"):
        response = await edge.client.post(path, json={"pool": "team-b", "tokens": 1}, headers=bearer(key))
        assert assert_envelope(response, 403, param="pool")["code"] == "pool_not_allowed"
    assert (await stack.pool("team-b")).reserved == 0
    check = await edge.client.post("/v1/tokens/check", json={"pool": "team-a", "tokens": 1}, headers=bearer(key))
    assert check.json() == {"allowed": True, "available": 1000}
    reserved = await edge.client.post("/v1/tokens/reserve", json={"pool": "team-a", "tokens": 5}, headers=bearer(key))
    assert reserved.json() == {"reserved": True, "available": 995, "reservation_id": reserved.headers["x-request-id"]}
    assert (await stack.pool("team-a")).reserved == 5
    too_much = await edge.client.post("/v1/tokens/check", json={"pool": "team-a", "tokens": 996}, headers=bearer(key))
    assert too_much.json() == {"allowed": False, "available": 995}


async def test_report_commits_only_the_keys_own_manual_reservations(
    team_a: Any, edge: Edge, make_edge: MakeEdge, stack: Stack
) -> None:
    key, _, _ = team_a
    other_key, _ = await create_key(edge, pools=["team-a"])
    reserved = await edge.client.post("/v1/tokens/reserve", json={"pool": "team-a", "tokens": 5}, headers=bearer(key))
    reservation = reserved.json()["reservation_id"]
    report = {"pool": "team-a", "actual": 0, "reservation_id": reservation}

    # Another key of the same team cannot commit it.
    error = assert_envelope(await edge.client.post("/v1/tokens/report", json=report, headers=bearer(other_key)), 403)
    assert error["code"] == "reservation_not_owned"
    assert (await stack.pool("team-a")).reserved == 5

    # A chat's reservation (its id is the chat's request id) is never committed here,
    # not even by the key that made the chat nor by an admin: one held open by a stream
    # the provider keeps alive, served over a real socket so the headers come first. (A
    # stream its client left is settled once the provider's usage arrives, which this
    # provider never sends: the other replica's short request deadline bounds the wait.)
    replica = await edge_on(make_edge, stack, edge_request_timeout_seconds=1.0)
    async with uvicorn_serving(replica.app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        body = {"model": "gpt-4o-stall", "messages": [USER], "stream": True}
        async with http.stream("POST", CHAT, json=body, headers=bearer(key)) as chat:
            assert chat.status_code == 200
            async for line in chat.aiter_lines():
                if line.startswith("data: "):
                    break  # the stream is under way: its reservation is held
            held = (await stack.pool("team-a")).reserved
            assert held > 5
            chat_report = {**report, "reservation_id": chat.headers["x-request-id"]}
            for headers in (bearer(key), ADMIN):
                response = await edge.client.post("/v1/tokens/report", json=chat_report, headers=headers)
                assert assert_envelope(response, 403)["code"] == "reservation_not_owned"
            assert (await stack.pool("team-a")).reserved == held  # still the stream's

    ok = await edge.client.post("/v1/tokens/report", json={**report, "actual": 3}, headers=bearer(key))
    assert ok.status_code == 200, ok.text
    again = await edge.client.post("/v1/tokens/report", json=report, headers=bearer(key))
    assert_envelope(again, 409, param="reservation_id")  # exactly once

    async def settled() -> bool:  # the stream the client left is settled by the router
        return (await stack.pool("team-a")).reserved == 0

    await eventually(settled, "the abandoned stream's settlement")
    [(_, event)] = await stack.router_events()
    charged = event.charged_tokens if isinstance(event, events_pb2.InferenceFailed) else event.usage.total_tokens
    assert charged > 0  # it streamed tokens before the client left: they are paid for
    assert (await stack.pool("team-a")).used == 3 + charged


async def test_report_without_a_reservation_is_admin_only(team_a: Any, edge: Edge, stack: Stack) -> None:
    key, _, _ = team_a
    body = {"pool": "team-a", "actual": 10}
    response = await edge.client.post("/v1/tokens/report", json=body, headers=bearer(key))
    assert assert_envelope(response, 403, param="reservation_id")["code"] == "insufficient_scope"
    assert (await stack.pool("team-a")).used == 0
    response = await edge.client.post("/v1/tokens/report", json=body, headers=ADMIN)
    assert response.json() == {"used": 10, "available": 990}
    assert (await stack.pool("team-a")).used == 10


async def test_audit_is_filtered_by_key_id(team_a: Any, edge: Edge) -> None:
    key, record, client = team_a
    mine = await client.chat.completions.create(model="gpt-4o", messages=[USER])  # type: ignore[list-item]
    body = {"model": "slow-1", "messages": [USER]}
    admins = (await edge.client.post(CHAT, json=body, headers=ADMIN)).json()
    chats = {request_id_of(mine.id), request_id_of(admins["id"])}

    async def both_recorded() -> bool:
        entries = (await edge.client.get("/v1/audit", headers=ADMIN)).json()["entries"]
        return chats <= {entry["event_id"] for entry in entries}

    # (generous: the audit consumer pauses a few seconds after a bare TimeoutError from nats-py)
    await eventually(both_recorded, "the audit consumer to record both chats", timeout=20)
    everything = (await edge.client.get("/v1/audit", headers=ADMIN)).json()
    assert everything["chain_valid"] is True
    own = (await edge.client.get("/v1/audit", headers=bearer(key))).json()
    assert own["entries"] and all(entry["payload"]["key_id"] == record["id"] for entry in own["entries"])
    assert [e["event_id"] for e in own["entries"] if ".inference." in e["subject"]] == [request_id_of(mine.id)]
    one = await edge.client.get("/v1/audit", params={"request_id": request_id_of(admins["id"])}, headers=ADMIN)
    assert [entry["payload"]["model"] for entry in one.json()["entries"]] == ["slow-1"]


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


async def test_an_admin_key_created_through_the_api_is_admin(edge: Edge, stack: Stack) -> None:
    key, record = await create_key(edge, scope="admin", models=["nothing-*"], pools=["default"])
    assert record["scope"] == "admin"
    providers = await edge.client.get("/v1/health/providers", headers=bearer(key))
    assert {p["name"]: p["state"] for p in providers.json()["data"]}["upstream"] == "closed"
    body = {"model": "slow-1", "messages": [USER], "pool": "team-b"}  # outside its own lists: admin reaches all
    response = await edge.client.post(CHAT, json=body, headers=bearer(key))
    assert response.status_code == 200, response.text
    event = (await completed_events(stack))[request_id_of(response.json()["id"])]
    assert (event.pool, event.key_id) == ("team-b", record["id"])


async def test_keys_are_never_logged_or_listed(edge: Edge, caplog: pytest.LogCaptureFixture) -> None:
    key, record = await create_key(edge)
    await edge.client.get("/v1/models", headers=bearer(key))
    listed = (await edge.client.get("/v1/admin/keys", headers=ADMIN)).text
    fetched = (await edge.client.get(f"/v1/admin/keys/{record['id']}", headers=ADMIN)).text
    for text in (listed, fetched, caplog.text):
        assert key not in text and ADMIN_KEY not in text
        assert hash_key(key) not in text
