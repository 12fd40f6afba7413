"""Tenancy through the whole stack, as users and an operator meet it: keys made with the
admin API and used with the official openai client, scopes, a pool hierarchy shared by
two edges and two routers, streams that pay for what they generated, a router killed
mid-stream, a one-minute period, and a Redis outage."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import redis

from .conftest import LOCAL_MODEL, RunningStack
from .replicas import OwnRedis, Replicas

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- helpers


def admin_client(base_url: str, admin_key: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)


def make_pool(admin: httpx.Client, capacity: int, parent: str | None = None, **extra: object) -> str:
    name = f"p-{uuid.uuid4().hex[:10]}"
    response = admin.post("/v1/admin/pools", json={"name": name, "parent": parent, "capacity": capacity, **extra})
    assert response.status_code == 200, response.text
    return name


def make_key(
    admin: httpx.Client, pools: list[str], models: list[str] | None = None, **extra: object
) -> tuple[str, str]:
    """(the key, its id)."""
    body = {"name": f"k-{uuid.uuid4().hex[:6]}", "pools": pools, "models": models or ["*"], **extra}
    response = admin.post("/v1/admin/keys", json=body)
    assert response.status_code == 200, response.text
    created = response.json()
    return created["key"], created["record"]["id"]


def pool(admin: httpx.Client, name: str) -> dict:
    response = admin.get(f"/v1/admin/pools/{name}")
    assert response.status_code == 200, response.text
    return response.json()


def chat_body(model: str = "mock-tenancy", **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8, **extra}


def as_key(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0)


def audit_entry(admin: httpx.Client, request_id: str, attempts: int = 150) -> dict:
    """The audit entry of one request (events reach the log asynchronously: bounded poll)."""
    for _ in range(attempts):
        entries = admin.get("/v1/audit", params={"request_id": request_id}).json()["entries"]
        if entries:
            return entries[-1]
        time.sleep(0.1)
    raise AssertionError(f"no audit entry for {request_id}")


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture
def admin(hoosh: RunningStack) -> Iterator[httpx.Client]:
    with admin_client(hoosh.base_url, hoosh.admin_key) as client:
        yield client


@pytest.fixture
def replicas(hoosh: RunningStack, tmp_path: Path) -> Iterator[Replicas]:
    assert hoosh.stack_config is not None
    started = Replicas(hoosh.stack_config, tmp_path / "replica-logs")
    try:
        yield started
    finally:
        started.stop_all()


# --------------------------------------------------------------------------- keys


def test_key_lifecycle_and_a_revocation_reaches_a_second_edge_within_a_second(
    hoosh: RunningStack, admin: httpx.Client, replicas: Replicas
) -> None:
    second = replicas.start("hoosh_edge", {"HOOSH_AUTH": "keys"})
    team = make_pool(admin, 100_000)
    key, key_id = make_key(admin, [team], ["mock-*"])

    for base_url in (hoosh.base_url, second.base_url):
        reply = as_key(base_url, key).chat.completions.with_raw_response.create(**chat_body())
        assert reply.http_response.status_code == 200
    request_id = reply.http_response.headers["x-request-id"]
    payload = audit_entry(admin, request_id)["payload"]
    # The key's id (never the key) and the pool chain reach the audit record; its first pool is its default.
    assert payload["key_id"] == key_id and payload["pool_chain"] == [team]
    assert key not in str(payload)
    assert pool(admin, team)["used"] > 0

    assert admin.delete(f"/v1/admin/keys/{key_id}").status_code == 200
    revoked_at = time.monotonic()
    with httpx.Client(base_url=second.base_url, headers={"Authorization": f"Bearer {key}"}) as client:
        while True:
            response = client.post("/v1/chat/completions", json=chat_body())
            if response.status_code == 401:
                break
            assert response.status_code == 200
            assert time.monotonic() - revoked_at < 1.0, "the second edge still accepts a key revoked a second ago"
            time.sleep(0.02)
    assert_openai_error(response, 401, "invalid_api_key")


def test_wrong_missing_and_expired_keys_get_401_in_openai_shape(
    hoosh: RunningStack, admin: httpx.Client, replicas: Replicas
) -> None:
    closed = replicas.start("hoosh_edge", {"HOOSH_AUTH": "keys"})
    team = make_pool(admin, 100_000)
    key, _ = make_key(admin, [team], expires_at=int(time.time()) + 2)
    url = f"{closed.base_url}/v1/chat/completions"
    assert httpx.post(url, json=chat_body(), headers={"Authorization": f"Bearer {key}"}).status_code == 200
    missing = httpx.post(url, json=chat_body())
    assert_openai_error(missing, 401)
    assert missing.headers.get("www-authenticate", "").lower().startswith("bearer")
    wrong = httpx.post(url, json=chat_body(), headers={"Authorization": "Bearer sk-hoosh-" + "x" * 43})
    assert_openai_error(wrong, 401, "invalid_api_key")
    time.sleep(3)
    expired = httpx.post(url, json=chat_body(), headers={"Authorization": f"Bearer {key}"})
    assert_openai_error(expired, 401, "invalid_api_key")
    # Probes never need a key.
    assert httpx.get(f"{closed.base_url}/v1/health").status_code == 200


# --------------------------------------------------------------------------- scopes


def test_a_user_key_is_confined_to_its_pools_models_and_audit_entries(hoosh: RunningStack, admin: httpx.Client) -> None:
    org = make_pool(admin, 1_000_000)
    team_a = make_pool(admin, 100_000, parent=org)
    team_b = make_pool(admin, 100_000, parent=org)
    key_a, id_a = make_key(admin, [team_a], ["mock-*"])
    key_b, _ = make_key(admin, [team_b])
    a = httpx.Client(base_url=hoosh.base_url, headers={"Authorization": f"Bearer {key_a}"}, timeout=30)
    b = httpx.Client(base_url=hoosh.base_url, headers={"Authorization": f"Bearer {key_b}"}, timeout=30)

    # Pools: A cannot charge, check, reserve into or list B's pool (or the org's).
    assert_openai_error(a.post("/v1/chat/completions", json=chat_body(pool=team_b)), 403, "pool_not_allowed")
    assert_openai_error(a.post("/v1/chat/completions", json=chat_body(pool=org)), 403, "pool_not_allowed")
    for path in ("/v1/tokens/check", "/v1/tokens/reserve"):
        assert_openai_error(a.post(path, json={"pool": team_b, "tokens": 1}), 403, "pool_not_allowed")
    assert [p["name"] for p in a.get("/v1/tokens/pools").json()] == [team_a]
    # Models: outside its patterns, `provider/model` included.
    for model in ("gpt-4o-mini", "upstream/gpt-4o-mini", "upstream/mock-x"):
        assert_openai_error(a.post("/v1/chat/completions", json=chat_body(model)), 403, "model_not_allowed")
    assert {m["id"] for m in a.get("/v1/models").json()["data"]} <= {
        m["id"] for m in admin.get("/v1/models").json()["data"] if m["id"].startswith("mock-")
    }
    # Admin-only surfaces.
    for path in ("/v1/admin/keys", "/v1/admin/pools", "/v1/health/providers", "/v1/cache/stats"):
        assert_openai_error(a.get(path), 403)
    assert_openai_error(a.post("/v1/tokens/report", json={"pool": team_a, "actual": 5}), 403)

    served_a = a.post("/v1/chat/completions", json=chat_body())
    served_b = b.post("/v1/chat/completions", json=chat_body())
    assert served_a.status_code == 200 and served_b.status_code == 200
    id_of_a, id_of_b = served_a.headers["x-request-id"], served_b.headers["x-request-id"]
    audit_entry(admin, id_of_a), audit_entry(admin, id_of_b)  # both recorded (admin sees everything)
    seen_by_a = a.get("/v1/audit", params={"limit": 10_000}).json()["entries"]
    assert id_of_a in {e["event_id"] for e in seen_by_a}
    assert {e["payload"].get("key_id") for e in seen_by_a} == {id_a}
    assert a.get("/v1/audit", params={"request_id": id_of_b}).json()["entries"] == []
    assert (
        pool(admin, team_b)["used"] > 0
        and pool(admin, org)["used"] == pool(admin, team_a)["used"] + pool(admin, team_b)["used"]
    )
    a.close(), b.close()


def test_provider_slash_model_honours_the_providers_model_list(admin: httpx.Client) -> None:
    # `upstream` lists ["gpt-*", "mock-*"]: naming it directly does not widen that.
    assert_openai_error(
        admin.post("/v1/chat/completions", json=chat_body("upstream/o1-pro-expensive")), 404, "model_not_found"
    )
    assert admin.post("/v1/chat/completions", json=chat_body("upstream/mock-direct")).status_code == 200
    assert_openai_error(admin.post("/v1/chat/completions", json=chat_body("upstream/../../admin")), 400)


async def test_reservations_end_only_by_their_holder_and_never_a_chats(
    hoosh: RunningStack, admin: httpx.Client
) -> None:
    team = make_pool(admin, 100_000)
    key_a, _ = make_key(admin, [team])
    key_c, _ = make_key(admin, [team])
    headers_a = {"Authorization": f"Bearer {key_a}"}
    headers_c = {"Authorization": f"Bearer {key_c}"}
    base = f"{hoosh.base_url}/v1/tokens"
    reserved = httpx.post(f"{base}/reserve", json={"pool": team, "tokens": 50}, headers=headers_a).json()
    assert reserved["reserved"] is True
    report = {"pool": team, "actual": 0, "reservation_id": reserved["reservation_id"]}
    # Another key of the same pool cannot end it (with actual 0, it would erase the usage).
    assert_openai_error(httpx.post(f"{base}/report", json=report, headers=headers_c), 403)
    assert pool(admin, team)["reserved"] == 50
    assert httpx.post(f"{base}/report", json={**report, "actual": 20}, headers=headers_a).status_code == 200
    assert pool(admin, team)["used"] == 20

    # A chat's own reservation cannot be committed through the token endpoint, even by its key.
    body = chat_body(LOCAL_MODEL, stream=True, max_tokens=200, pool=team)
    body["messages"] = [{"role": "user", "content": "Write a long story about a lighthouse."}]
    async with httpx.AsyncClient(timeout=60, headers=headers_a) as client:
        async with client.stream("POST", f"{hoosh.base_url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            chat_id = response.headers["x-request-id"]
            steal = await client.post(f"{base}/report", json={"pool": team, "actual": 0, "reservation_id": chat_id})
            assert_openai_error(steal, 403)
            # Hang up: the chat settles its own reservation (it pays for what it generated).
    deadline = time.monotonic() + 20
    while pool(admin, team)["reserved"] and time.monotonic() < deadline:  # noqa: ASYNC110 - polling another process
        await asyncio.sleep(0.1)
    assert pool(admin, team)["reserved"] == 0 and pool(admin, team)["used"] > 20


# --------------------------------------------------------------------------- the hierarchy, two of everything


async def test_two_edges_two_routers_never_overspend_any_pool_of_the_hierarchy(
    hoosh: RunningStack, admin: httpx.Client, replicas: Replicas
) -> None:
    router2 = replicas.start("hoosh_router")
    edge2 = replicas.start("hoosh_edge", {"HOOSH_ROUTER_ADDR": router2.address})
    org = make_pool(admin, 6_000)
    team_a = make_pool(admin, 5_000, parent=org)  # the teams sum to more than the org
    team_b = make_pool(admin, 5_000, parent=org)
    key_a, _ = make_key(admin, [team_a])
    key_b, _ = make_key(admin, [team_b])
    names = [org, team_a, team_b]
    capacity = {org: 6_000, team_a: 5_000, team_b: 5_000}
    prefix = hoosh.key_prefix

    samples: list[dict[str, tuple[int, int]]] = []
    done = threading.Event()

    def sample() -> None:
        # Its own thread and connection: sampling keeps its pace whatever the test's loop is doing.
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        try:
            while not done.is_set():
                snapshot = {}
                for name in names:
                    used, reserved = client.hmget(f"{prefix}{{{org}}}:pool:{name}", "used", "reserved")
                    snapshot[name] = (int(used or 0), int(reserved or 0))
                samples.append(snapshot)
                time.sleep(0.001)
        finally:
            client.close()

    limits = httpx.Limits(max_connections=600, max_keepalive_connections=600)
    clients = [
        httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60, limits=limits)
        for url in (hoosh.base_url, edge2.base_url)
        for key in (key_a, key_b)
    ]

    async def one(index: int) -> httpx.Response:
        return await clients[index % 4].post("/v1/chat/completions", json=chat_body(max_tokens=20))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        responses = await asyncio.gather(*(one(i) for i in range(500)))
    finally:
        done.set()
        sampler.join()
        for client in clients:
            await client.aclose()

    served = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert served and refused, "the org pool should have run out part-way"
    for response in refused:
        error = assert_openai_error(response, 429, "budget_exhausted")
        assert org not in error["message"]  # a user key never learns the names of pools it does not hold
    seen = sum(r.json()["usage"]["total_tokens"] for r in served)
    assert len(samples) > 10
    for snapshot in samples:
        for name, (used, reserved) in snapshot.items():
            assert used + reserved <= capacity[name], (name, used, reserved)
    final = {name: pool(admin, name) for name in names}
    assert all(final[name]["reserved"] == 0 for name in names)
    assert final[org]["used"] == final[team_a]["used"] + final[team_b]["used"] == seen
    # Exactly what the tightest ancestor affords: requests that committed less than they had
    # reserved left some room; fill it with the smallest request until the org refuses, then
    # the org must be short of exactly that one request, not of anything more.
    # Filled through both teams in turn: however the concurrent phase's refusals fell
    # (they decide how much room each pool has left), the org runs out before either team.
    smallest = [chat_body(max_tokens=1, pool=team) for team in (team_a, team_b)]
    refusal = None
    # Each request is charged at least one token: the org refuses within `room` + 1 of them.
    room = capacity[org] - final[org]["used"]
    for turn in range(room + 1):
        response = await asyncio.to_thread(admin.post, "/v1/chat/completions", json=smallest[turn % 2])
        if response.status_code != 200:
            refusal = response
            break
        seen += response.json()["usage"]["total_tokens"]
    assert refusal is not None
    assert_openai_error(refusal, 429, "budget_exhausted")
    match = re.search(r"pool '([^']+)' has (\d+) tokens available, (\d+) requested", refusal.json()["error"]["message"])
    assert match is not None, refusal.json()
    assert match.group(1) == org  # the org, not a team, is the tightest
    after = pool(admin, org)
    assert after["used"] == seen and after["reserved"] == 0
    assert after["capacity"] - after["used"] == int(match.group(2)) < int(match.group(3))


# --------------------------------------------------------------------------- streams pay for what they used


async def test_a_client_that_leaves_mid_stream_pays_for_what_was_generated(
    hoosh: RunningStack, admin: httpx.Client
) -> None:
    team = make_pool(admin, 1_000_000)
    messages = [{"role": "user", "content": "Write a very long story about a dragon and a lighthouse."}]
    probe = {"model": LOCAL_MODEL, "messages": messages, "max_tokens": 1, "pool": team}
    exact = (await asyncio.to_thread(admin.post, "/v1/chat/completions", json=probe)).json()["usage"]["prompt_tokens"]
    used_before = pool(admin, team)["used"]

    body = {"model": LOCAL_MODEL, "messages": messages, "max_tokens": 400, "stream": True, "pool": team}
    read = 0
    async with httpx.AsyncClient(timeout=60, headers=admin.headers) as client:
        async with client.stream("POST", f"{hoosh.base_url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            async for line in response.aiter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    read += 1
                    if read == 12:
                        break  # hang up mid-answer
    entry = audit_entry(admin, request_id)
    payload = entry["payload"]
    charged = pool(admin, team)["used"] - used_before
    assert pool(admin, team)["reserved"] == 0
    # Never 0: the prompt (counted exactly by the local worker) plus every token generated,
    # at least the ones the client read.
    assert charged >= exact + read
    assert charged < exact + 400
    if entry["subject"].endswith("inference.failed"):
        assert payload["error_code"] == "client_disconnected"
        assert int(payload["charged_tokens"]) == charged
    else:
        assert int(payload["usage"]["total_tokens"]) == charged


async def test_a_router_killed_mid_stream_leaves_no_reservation_after_its_lease(
    hoosh: RunningStack, admin: httpx.Client, replicas: Replicas
) -> None:
    router = replicas.start("hoosh_router", {"HOOSH_ROUTER_LEASE_SECONDS": "3"})
    edge = replicas.start("hoosh_edge", {"HOOSH_ROUTER_ADDR": router.address})
    team = make_pool(admin, 1_000_000)
    body = {
        "model": LOCAL_MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "max_tokens": 400,
        "stream": True,
        "pool": team,
    }
    async with httpx.AsyncClient(timeout=60, headers=admin.headers) as client:
        async with client.stream("POST", f"{edge.base_url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break
            held = pool(admin, team)["reserved"]
            assert held > 0
            router.kill()  # no release, no commit: only the lease and its policy remain
    deadline = time.monotonic() + 30
    while pool(admin, team)["reserved"] and time.monotonic() < deadline:  # noqa: ASYNC110 - polling another process
        await asyncio.sleep(0.25)
    state = pool(admin, team)
    assert state["reserved"] == 0
    # The default policy is commit: the provider may have billed the whole reservation.
    assert state["used"] == held


# --------------------------------------------------------------------------- periods


async def test_a_one_minute_pool_resets_on_time_while_requests_run(hoosh: RunningStack, admin: httpx.Client) -> None:
    team = make_pool(admin, 10_000_000, period="minute")
    start = pool(admin, team)
    boundary = start["period_end_ms"]
    assert boundary - start["period_start_ms"] == 60_000 and boundary % 60_000 == 0
    seen = 0
    async with httpx.AsyncClient(base_url=hoosh.base_url, headers=admin.headers, timeout=30) as client:

        async def worker() -> int:
            total = 0
            while time.time() * 1000 < boundary + 2_000:
                response = await client.post("/v1/chat/completions", json=chat_body(pool=team))
                assert response.status_code == 200, response.text
                total += response.json()["usage"]["total_tokens"]
            return total

        seen = sum(await asyncio.gather(*(worker() for _ in range(4))))
    after = pool(admin, team)
    assert after["period_start_ms"] == boundary and after["reserved"] == 0
    resets = []
    for _ in range(100):
        entries = (await asyncio.to_thread(admin.get, "/v1/audit", params={"limit": 10_000})).json()["entries"]
        resets = [e for e in entries if e["subject"].endswith("budget.reset") and e["payload"]["pool"] == team]
        if resets:
            break
        await asyncio.sleep(0.1)
    assert len(resets) == 1, resets
    reset = resets[0]["payload"]
    assert int(reset["period_start_ms"]) == boundary and reset["reason"] == "period"
    assert abs(int(reset["timestamp_ms"]) - boundary) < 5_000  # on time: the ticker rolls every second
    # Nothing lost, nothing counted twice across the boundary.
    assert int(reset["used"]) + after["used"] == seen
    assert after["used"] > 0 and int(reset["used"]) > 0


# --------------------------------------------------------------------------- Redis away


def test_redis_away_means_503_and_never_a_free_answer(tmp_path: Path, upstream_url: str) -> None:
    import secrets

    from hoosh_cli.stack import Ports, Stack, StackConfig

    own = OwnRedis(tmp_path / "redis")
    own.start()
    run_id = uuid.uuid4().hex[:8]
    config_file = tmp_path / "hoosh.yaml"
    config_file.write_text(
        f"providers:\n  - name: upstream\n    type: openai\n    base_url: {upstream_url}\n"
        f"    api_key: sk-test\n    models: ['mock-*']\npools:\n  - name: default\n    capacity: 1000000\n"
    )
    admin_key = "sk-hoosh-" + secrets.token_urlsafe(32)
    config = StackConfig(
        state_dir=tmp_path / "state",
        ports=Ports.free(),
        config_file=config_file,
        redis_url=own.url,
        nats_stream=f"HOOSH_TEST_REDIS_{run_id}",
        subject_prefix=f"hoosh_test_redis_{run_id}",
        audit_key=secrets.token_hex(32),
        audit_consumer=f"audit_{run_id}",
        with_inference=False,
        with_stt=False,
        admin_key=admin_key,
        auth="keys",
    )
    stack = Stack(config)
    asyncio.run(stack.start(timeout=120))
    try:
        with admin_client(stack.base_url, admin_key) as admin:
            key, _ = make_key(admin, ["default"])
            user = {"Authorization": f"Bearer {key}"}
            url = f"{stack.base_url}/v1/chat/completions"
            assert httpx.post(url, json=chat_body(), headers=user).status_code == 200

            for outage in ("stopped", "hung"):
                if outage == "stopped":
                    own.stop()
                else:
                    own.pause()
                try:
                    for _ in range(3):
                        response = httpx.post(url, json=chat_body(), headers=user, timeout=30)
                        assert_openai_error(response, 503, "budget_unavailable")
                finally:
                    if outage == "stopped":
                        own.start()
                    else:
                        own.resume()
                deadline = time.monotonic() + 20
                while True:
                    response = httpx.post(url, json=chat_body(), headers=user, timeout=30)
                    if response.status_code == 200 or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                assert response.status_code == 200, response.text
            # A reservation whose reply was lost in the outage is released by the router's
            # background retry once Redis answers again: nothing stays held.
            deadline = time.monotonic() + 20
            while pool(admin, "default")["reserved"] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert pool(admin, "default")["reserved"] == 0
    finally:
        stack.stop()
        own.stop()


# --------------------------------------------------------------------------- the CLI


def test_the_cli_manages_pools_and_keys_through_the_admin_api(hoosh: RunningStack, admin: httpx.Client) -> None:
    import json
    import subprocess
    import sys

    def hoosh_cli(*args: str) -> dict:
        done = subprocess.run(
            [sys.executable, "-m", "hoosh_cli", *args, "--url", hoosh.base_url, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"HOOSH_ADMIN_KEY": hoosh.admin_key, "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 0, done.stderr
        assert hoosh.admin_key not in done.stdout + done.stderr
        return json.loads(done.stdout)

    org = f"cli-{uuid.uuid4().hex[:8]}"
    hoosh_cli("pools", "create", org, "--capacity", "5000", "--period", "daily", "--timezone", "Europe/Berlin")
    team = hoosh_cli("pools", "create", f"{org}-a", "--capacity", "1000", "--parent", org)
    assert team["chain"] == [f"{org}-a", org]
    created = hoosh_cli("keys", "create", "--name", "cli", "--pool", f"{org}-a", "--model", "mock-*", "--rpm", "30")
    key, key_id = created["key"], created["record"]["id"]
    assert key.startswith("sk-hoosh-") and created["record"]["rpm"] == 30
    reply = as_key(hoosh.base_url, key).chat.completions.create(**chat_body())
    assert reply.usage is not None and pool(admin, org)["used"] == reply.usage.total_tokens
    assert hoosh_cli("keys", "revoke", key_id)["revoked_at"]
    with pytest.raises(openai.AuthenticationError):
        as_key(hoosh.base_url, key).chat.completions.create(**chat_body())
    assert hoosh_cli("pools", "reset", org)["used"] == 0
