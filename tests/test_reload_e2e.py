"""Live reload of hoosh.yaml against the real stack (issue 14, "Must show": a reload
during 50 concurrent streams: all 50 finish, new requests see the new provider list, and
a malformed file changes nothing).

A stack of its own (edge, router, budget, audit as processes, on the real Redis and
NATS, with a hoosh.yaml the tests rewrite) plus a second router replica, and two
OpenAI-wire stand-ins: the session's fast one and a slow streaming one (0.6 s between
pieces). ``POST /v1/admin/reload`` through the edge reaches every router and budget
replica over NATS; SIGHUP reloads the one process it is sent to. Every reload, refused
ones included, is in the audit log (``kind=config.reload``)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh_cli.stack import Ports, Stack, StackConfig, free_port

from .conftest import ROOT, _wait_http
from .replicas import Replica, Replicas

pytestmark = pytest.mark.slow

REPLY = "Hello from the upstream stand-in."
STREAMS = 50
STREAM_GAP_SECONDS = 0.6  # 7 pieces: a stream lasts about 4 s

OLD = """
providers:
  - name: slow
    type: openai
    base_url: {slow}/v1
    api_key: sk-slow
    models: ["slow-stream-*"]
  - name: old
    type: openai
    base_url: {fast}
    api_key: sk-old
    models: ["old-model"]
health:
  probe_interval_seconds: 0
pools:
  - name: default
    capacity: 100000000
"""

# slow changes (so its backend is replaced while its streams run), old goes, new comes,
# and a pool is added.
NEW = """
providers:
  - name: slow
    type: openai
    base_url: {slow}/v1
    api_key: sk-slow
    models: ["slow-stream-*"]
    pricing: {{input_per_mtok: 0.5, output_per_mtok: 1.5}}
  - name: new
    type: openai
    base_url: {fast}
    api_key: sk-new
    models: ["new-model"]
health:
  probe_interval_seconds: 0
pools:
  - name: default
    capacity: 100000000
  - name: reloaded-pool
    capacity: 4242
"""

# NEW plus a provider and a pool, for SIGHUP.
HUP = (
    NEW
    + """  - name: hup-pool
    capacity: 77
"""
).replace(
    """health:""",
    """  - name: hup
    type: openai
    base_url: {fast}
    api_key: sk-hup
    models: ["hup-model"]
health:""",
)


@dataclass
class ReloadStack:
    stack: Stack
    config_file: Path
    urls: dict[str, str]
    admin_key: str
    second_router: Replica

    @property
    def base_url(self) -> str:
        return self.stack.base_url

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def write(self, template: str) -> str:
        """Write the config file; its SHA-256."""
        text = template.format(**self.urls)
        self.config_file.write_text(text)
        return hashlib.sha256(text.encode()).hexdigest()

    def process(self, name: str) -> subprocess.Popen[bytes]:
        service = next(service for service in self.stack.services if service.name == name)
        assert service.process is not None
        return service.process


@pytest.fixture(scope="module")
def slow_url() -> Iterator[str]:
    """The OpenAI-wire stand-in whose *slow-stream* models pause between pieces."""
    port = free_port()
    code = (
        "import asyncio, sys, bench.upstream as up\n"
        f"up.STREAM_GAP_SECONDS = {STREAM_GAP_SECONDS}\n"
        "asyncio.run(up._main(int(sys.argv[1]), 0.0, 'openai'))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(port)], cwd=ROOT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", 20)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def reload_stack(tmp_path_factory: pytest.TempPathFactory, upstream_url: str, slow_url: str) -> Iterator[ReloadStack]:
    state_dir = tmp_path_factory.mktemp("reload")
    run_id = uuid.uuid4().hex[:10]
    config_file = state_dir / "hoosh.yaml"
    urls = {"slow": slow_url, "fast": upstream_url}
    config_file.write_text(OLD.format(**urls))
    config = StackConfig(
        state_dir=state_dir,
        ports=Ports.free(),
        config_file=config_file,
        nats_stream=f"HOOSH_RELOAD_{run_id}",
        subject_prefix=f"hoosh_reload_{run_id}",
        budget_key_prefix=f"hoosh:reload:{run_id}:",
        router_key_prefix=f"hoosh:reload:{run_id}:router:",
        audit_key=secrets.token_hex(32),
        audit_consumer=f"audit_{run_id}",
        admin_key="sk-hoosh-" + secrets.token_urlsafe(32),
        auth="open",
        tenancy_key_prefix=f"hoosh:reload:{run_id}:tenancy:",
        with_inference=False,
        with_stt=False,
        extra_env={
            "HOOSH_AUDIT_CHECKPOINT_PREFIX": f"hoosh:reload:{run_id}:audit:",
            "HOOSH_RESPONSES_KEY_PREFIX": f"hoosh:reload:{run_id}:responses:",
            "HOOSH_EDGE_RELOAD_GATHER_SECONDS": "0.5",
        },
    )
    stack = Stack(config)
    asyncio.run(stack.start(timeout=120))
    replicas = Replicas(config, state_dir / "replica-logs")
    try:
        second = replicas.start("hoosh_router")
        yield ReloadStack(stack, config_file, urls, config.admin_key, second)
    finally:
        replicas.stop_all()
        stack.stop()
        asyncio.run(_cleanup(config))


async def _cleanup(config: StackConfig) -> None:
    import nats
    import redis.asyncio as redis

    client = redis.Redis.from_url(config.redis_url)
    async for key in client.scan_iter(match=f"{config.budget_key_prefix}*"):
        await client.delete(key)
    await client.aclose()
    nc = await nats.connect(config.nats_url)
    try:
        await nc.jetstream().delete_stream(config.nats_stream)
    except Exception:  # the stream may not exist if start-up failed early
        pass
    await nc.close()


def client_for(hoosh: ReloadStack, key: str = "no-key-needed") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{hoosh.base_url}/v1", api_key=key, max_retries=0, timeout=60)


async def reload(hoosh: ReloadStack, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(base_url=hoosh.base_url, timeout=60) as http:
        return await http.post("/v1/admin/reload", headers=hoosh.admin() if headers is None else headers)


async def chat(hoosh: ReloadStack, model: str) -> str:
    async with client_for(hoosh) as client:
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=16
        )
    return reply.choices[0].message.content or ""


async def not_found(hoosh: ReloadStack, model: str) -> bool:
    try:
        await chat(hoosh, model)
    except openai.NotFoundError as error:
        return error.code == "model_not_found"
    return False


async def model_ids(hoosh: ReloadStack) -> set[str]:
    async with client_for(hoosh) as client:
        return {model.id async for model in client.models.list()}


async def replica_models(hoosh: ReloadStack) -> set[str]:
    """What the second router replica serves (asked directly, as the edge would)."""
    stack = hoosh.stack
    async with stack.channel(hoosh.second_router.address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        reply = await stub.ListModels(
            router_pb2.ListModelsRequest(), metadata=stack.config.credentials("edge"), timeout=10
        )
    return {model.id for model in reply.models}


async def pool_capacity(hoosh: ReloadStack, name: str) -> int | None:
    async with httpx.AsyncClient(base_url=hoosh.base_url, timeout=10) as http:
        response = await http.get(f"/v1/admin/pools/{name}", headers=hoosh.admin())
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    return int(response.json()["capacity"])


async def audited(hoosh: ReloadStack, reload_ids: set[str], count: int, attempts: int = 100) -> list[dict[str, Any]]:
    """The config.reload entries of these reloads, once ``count`` of them are in the log."""
    found: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=hoosh.base_url, timeout=10) as http:
        for _ in range(attempts):
            response = await http.get(
                "/v1/audit", params={"kind": "config.reload", "limit": 1000}, headers=hoosh.admin()
            )
            assert response.status_code == 200, response.text
            found = [e for e in response.json()["entries"] if e["payload"].get("reload_id") in reload_ids]
            if len(found) >= count:
                assert response.json()["chain_valid"]
                return found
            await asyncio.sleep(0.2)
    raise AssertionError(f"{len(found)} of {count} reload entries in the audit log: {found}")


def instances(body: dict[str, Any]) -> list[tuple[str, str]]:
    return sorted((service["service"], service["status"]) for service in body["services"])


# --------------------------------------------------------------------------- access


async def test_only_an_admin_key_may_reload(reload_stack: ReloadStack) -> None:
    hoosh = reload_stack
    response = await reload(hoosh, headers={})  # open mode: an anonymous user
    assert response.status_code == 403 and response.json()["error"]["code"] == "insufficient_scope"
    async with httpx.AsyncClient(base_url=hoosh.base_url, timeout=10) as http:
        created = await http.post(
            "/v1/admin/keys", json={"name": "reload-user", "pools": ["default"]}, headers=hoosh.admin()
        )
    assert created.status_code == 200, created.text
    response = await reload(hoosh, headers={"Authorization": f"Bearer {created.json()['key']}"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "insufficient_scope"
    assert await not_found(hoosh, "new-model")  # nothing was reloaded


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("text", "reason", "refused_by"),
    [
        ("providers: [\n  - name: broken\n", "YAML syntax error at line", {"router", "budget"}),
        ("providers:\n  - {name: odd, type: nonsense, models: [odd-model]}\n", "providers[0].type", {"router"}),
        (
            "providers:\n  - {name: a, type: openai, models: [a-model]}\n"
            "routes:\n  - {match: ghost-route, targets: [{provider: ghost}]}\n",
            "route 'ghost-route' names unknown provider 'ghost'",
            {"router"},
        ),
        ("pools:\n  - {name: orphan, capacity: 5, parent: nowhere}\n", "parent 'nowhere'", {"budget"}),
    ],
    ids=["yaml-syntax", "unknown-provider-type", "route-to-unknown-provider", "pool-with-unknown-parent"],
)
async def test_a_malformed_file_is_refused_with_its_reason_and_changes_nothing(
    reload_stack: ReloadStack, text: str, reason: str, refused_by: set[str]
) -> None:
    hoosh = reload_stack
    hoosh.write(OLD)
    assert (await reload(hoosh)).json()["status"] == "ok"
    before = await model_ids(hoosh)

    hoosh.config_file.write_text(text)
    response = await reload(hoosh)
    body = response.json()
    assert response.status_code == 400, body
    assert body["status"] == "refused" and reason in body["reason"], body
    assert body["error"]["code"] == "config_refused" and body["error"]["message"] == body["reason"]
    # Every replica of both services answered, and refused: nothing was applied anywhere.
    assert instances(body) == [("budget", "refused"), ("router", "refused"), ("router", "refused")]
    for service in body["services"]:
        own = service["reason"]
        assert (reason in own) if service["service"] in refused_by else own.startswith("not applied: "), service

    # The running configuration stays: the old models still work, no pool appeared.
    assert await chat(hoosh, "old-model") == REPLY
    assert await not_found(hoosh, "odd-model") and await not_found(hoosh, "a-model")
    assert await model_ids(hoosh) == before
    assert "old-model" in await replica_models(hoosh)
    assert await pool_capacity(hoosh, "orphan") is None

    entries = await audited(hoosh, {body["reload_id"]}, 3)
    assert {(e["payload"]["service"], e["payload"]["outcome"]) for e in entries} == {
        ("router", "refused"),
        ("budget", "refused"),
    }
    assert all(e["payload"]["trigger"] == "api" for e in entries)


# --------------------------------------------------------------------------- during streams


async def test_a_reload_during_50_streams_drops_none_and_new_requests_see_the_new_providers(
    reload_stack: ReloadStack,
) -> None:
    hoosh = reload_stack
    hoosh.write(OLD)
    assert (await reload(hoosh)).status_code == 200
    assert await chat(hoosh, "old-model") == REPLY and await not_found(hoosh, "new-model")

    started: set[int] = set()
    finished: dict[int, float] = {}
    client = client_for(hoosh)
    try:
        await _during_streams(hoosh, client, started, finished)
    finally:
        await client.close()


async def _during_streams(
    hoosh: ReloadStack, client: openai.AsyncOpenAI, started: set[int], finished: dict[int, float]
) -> None:

    async def one(index: int) -> str:
        stream = await client.chat.completions.create(
            model=f"slow-stream-{index}", messages=[{"role": "user", "content": "hi"}], max_tokens=32, stream=True
        )
        pieces = []
        async for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                    started.add(index)
        finished[index] = time.monotonic()
        return "".join(pieces)

    streams = [asyncio.create_task(one(index)) for index in range(STREAMS)]
    deadline = time.monotonic() + 30
    while len(started) < STREAMS:  # every stream has its first piece: all are mid-way
        assert time.monotonic() < deadline, f"{len(started)} of {STREAMS} streams started"
        assert not any(task.done() for task in streams), [t.exception() for t in streams if t.done()]
        await asyncio.sleep(0.05)

    sha = hoosh.write(NEW)
    response = await reload(hoosh)
    reloaded_at = time.monotonic()
    body = response.json()
    assert response.status_code == 200, body
    assert body["status"] == "ok" and body["reason"] is None
    # Every replica: both routers and the budget, on the new file.
    assert instances(body) == [("budget", "reloaded"), ("router", "reloaded"), ("router", "reloaded")]
    assert {service["config_sha256"] for service in body["services"]} == {sha}
    assert not finished, "a stream ended before the reload was answered: it did not happen mid-stream"

    # New requests see the new provider list at once, while the streams still run.
    assert await chat(hoosh, "new-model") == REPLY
    assert await not_found(hoosh, "old-model")
    listed = await model_ids(hoosh)
    assert "new-model" in listed and "old-model" not in listed
    assert {"new-model"} <= await replica_models(hoosh) and "old-model" not in await replica_models(hoosh)
    assert await pool_capacity(hoosh, "reloaded-pool") == 4242

    # All 50 finish, each with its whole answer (on the backend it started on, whose
    # HTTP session the swap did not close under it).
    answers = await asyncio.wait_for(asyncio.gather(*streams), 60)
    assert answers == [REPLY] * STREAMS
    assert min(finished.values()) > reloaded_at

    entries = await audited(hoosh, {body["reload_id"]}, 3)
    assert sorted((e["payload"]["service"], e["payload"]["outcome"]) for e in entries) == [
        ("budget", "reloaded"),
        ("router", "reloaded"),
        ("router", "reloaded"),
    ]
    router_entry = next(e for e in entries if e["payload"]["service"] == "router")
    assert '"removed":["old"]' in router_entry["payload"]["changes_json"]
    assert {e["payload"]["config_sha256"] for e in entries} == {sha}
    # One trace: the edge's request, carried to every replica in the NATS headers.
    traces = {e["payload"].get("trace_id", "") for e in entries}
    assert len(traces) == 1 and len(traces.pop()) == 32


# --------------------------------------------------------------------------- SIGHUP


async def test_sighup_reloads_the_process_it_is_sent_to(reload_stack: ReloadStack) -> None:
    hoosh = reload_stack
    hoosh.write(NEW)
    assert (await reload(hoosh)).status_code == 200
    since = int(time.time() * 1000)
    sha = hoosh.write(HUP)
    hoosh.process("router").send_signal(signal.SIGHUP)
    hoosh.process("budget").send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while await not_found(hoosh, "hup-model") or await pool_capacity(hoosh, "hup-pool") is None:
        assert time.monotonic() < deadline, "SIGHUP did not reload"
        await asyncio.sleep(0.2)
    assert await chat(hoosh, "hup-model") == REPLY and await pool_capacity(hoosh, "hup-pool") == 77
    # Only the processes signalled: the second router still runs the earlier file.
    assert "hup-model" not in await replica_models(hoosh)
    assert hoosh.second_router.process.poll() is None and hoosh.process("router").poll() is None

    # The reload through the edge brings the rest: the signalled ones are already on it.
    response = await reload(hoosh)
    body = response.json()
    assert response.status_code == 200, body
    statuses = {(s["service"], s["instance"]): s["status"] for s in body["services"]}
    router_pid = hoosh.process("router").pid
    assert [status for (service, instance), status in statuses.items() if instance.endswith(f":{router_pid}")] == [
        "unchanged"
    ]
    assert sorted(statuses.values()) == ["reloaded", "unchanged", "unchanged"]
    assert "hup-model" in await replica_models(hoosh)

    # The signals are audited too (trigger "signal"), with the file they loaded.
    async with httpx.AsyncClient(base_url=hoosh.base_url, timeout=10) as http:
        for _ in range(100):
            entries = (
                await http.get(
                    "/v1/audit",
                    params={"kind": "config.reload", "since_ms": since, "limit": 1000},
                    headers=hoosh.admin(),
                )
            ).json()["entries"]
            signals = [e["payload"] for e in entries if e["payload"].get("trigger") == "signal"]
            if len(signals) >= 2:
                break
            await asyncio.sleep(0.2)
    assert sorted((p["service"], p["outcome"]) for p in signals) == [("budget", "reloaded"), ("router", "reloaded")]
    assert {p["config_sha256"] for p in signals} == {sha}


# --------------------------------------------------------------------------- pools an admin changed


async def test_an_admin_resize_survives_a_reload_that_does_not_change_that_pool(reload_stack: ReloadStack) -> None:
    """The file wins for the pools it changes; a pool it leaves as it was keeps what the
    admin API set (``hoosh pools resize``)."""
    hoosh = reload_stack
    hoosh.write(NEW)
    assert (await reload(hoosh)).status_code == 200
    async with httpx.AsyncClient(base_url=hoosh.base_url, timeout=10) as http:
        resized = await http.patch("/v1/admin/pools/reloaded-pool", json={"capacity": 5000}, headers=hoosh.admin())
    assert resized.status_code == 200, resized.text

    hoosh.write(NEW.replace("capacity: 100000000", "capacity: 100000001"))  # default changes, not reloaded-pool
    response = await reload(hoosh)
    body = response.json()
    assert response.status_code == 200, body
    assert await pool_capacity(hoosh, "default") == 100000001
    assert await pool_capacity(hoosh, "reloaded-pool") == 5000
    [entry] = [e for e in await audited(hoosh, {body["reload_id"]}, 3) if e["payload"]["service"] == "budget"]
    assert '"changed":["default"]' in entry["payload"]["changes_json"]
    assert '"kept":["reloaded-pool"]' in entry["payload"]["changes_json"]

    hoosh.write(NEW.replace("4242", "4343"))  # now the file changes it: the file wins
    assert (await reload(hoosh)).status_code == 200
    assert await pool_capacity(hoosh, "reloaded-pool") == 4343


# --------------------------------------------------------------------------- the audit


async def test_the_audit_lists_reloads_by_kind_and_outcome(reload_stack: ReloadStack) -> None:
    hoosh = reload_stack
    hoosh.config_file.write_text("providers: [\n")
    refused = (await reload(hoosh)).json()
    assert refused["status"] == "refused"
    await audited(hoosh, {refused["reload_id"]}, 3)
    async with httpx.AsyncClient(base_url=hoosh.base_url, timeout=10) as http:
        response = await http.get(
            "/v1/audit", params={"kind": "config.reload", "outcome": "refused", "limit": 1000}, headers=hoosh.admin()
        )
    entries = response.json()["entries"]
    assert entries and all(e["payload"]["outcome"] == "refused" for e in entries)
    mine = [e for e in entries if e["payload"]["reload_id"] == refused["reload_id"]]
    assert len(mine) == 3 and all(e["subject"].endswith(".config.reload") for e in mine)
    assert all(e["event_id"].startswith(refused["reload_id"] + ":") for e in mine)
    hoosh.write(NEW)
    assert (await reload(hoosh)).status_code == 200
