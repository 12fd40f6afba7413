"""Live reload of the router's catalogue (hoosh_router.reload and generations through the
shared ConfigReloader): a file is validated whole by the parser the router starts with
and refused with its reason, changing nothing; a good one is swapped in atomically —
a stream in flight finishes on the generation it started with, its provider's HTTP
session open until it ends, while new requests see the new providers — and every
outcome is published as a config.reload event. The RouterService over gRPC, the real
Redis and NATS, the OpenAI-wire stand-ins as providers."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import grpc
import hoosh_router.reload
import pytest
import redis.asyncio as redis
from hoosh.events.v1 import events_pb2
from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh_cli.stack import free_port
from hoosh_common.grpc_server import new_server
from hoosh_common.reload import (
    ConfigRefused,
    ConfigReloader,
    ReloadResponder,
    coordinate_reload,
    file_sha256,
    install_sighup,
)
from hoosh_metering.limits import KeyGate, KeyLimiter
from hoosh_metering.pools import BudgetStore
from hoosh_router.budget_client import RouterBudget
from hoosh_router.config import Catalogue, RouterSettings, parse_catalogue, read_catalogue
from hoosh_router.generations import Generation, Generations
from hoosh_router.ratelimit import RateLimiter
from hoosh_router.reload import CurrentBreakers, RouterConfig, Shared, build_generation
from hoosh_router.server import RouterServicer
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest

import bench.upstream
from bench.upstream import OpenAIUpstream

from .conftest import Bus
from .helpers import chat_request, user

POOL = "team"
REPLY = "Hello from the upstream stand-in."
GRACE_SECONDS = 0.2

OLD = """
providers:
  - name: changing
    type: openai
    base_url: {a}
    api_key: sk-a
    models: ["slow-stream-*", "mock-*"]
  - name: steady
    type: openai
    base_url: {b}
    api_key: sk-b
    models: ["steady-*"]
  - name: leaving
    type: openai
    base_url: {b}
    models: ["leaving-one", "leaving-*"]
routes:
  - match: "alias-*"
    targets: [{{provider: leaving, model: leaving-one}}]
health: {{probe_interval_seconds: 0}}
"""

NEW = """
providers:
  - name: changing
    type: openai
    base_url: {a}
    api_key: sk-a
    models: ["slow-stream-*", "mock-*"]
    pricing: {{input_per_mtok: 1, output_per_mtok: 2}}
  - name: steady
    type: openai
    base_url: {b}
    api_key: sk-b
    models: ["steady-*"]
  - name: arriving
    type: openai
    base_url: {b}
    models: ["arriving-one", "arriving-*"]
health: {{probe_interval_seconds: 0}}
"""


@dataclass
class Replica:
    path: Path
    urls: dict[str, str]
    generations: Generations
    reloader: ConfigReloader[Catalogue]
    stub: router_pb2_grpc.RouterServiceStub
    shared: Shared

    def write(self, template: str) -> None:
        self.path.write_text(template.format(**self.urls))


@pytest.fixture
async def second_up() -> AsyncIterator[OpenAIUpstream]:
    up = OpenAIUpstream()
    await up.start()
    yield up
    await up.close()


async def start_replica(
    redis_client: redis.Redis, prefix: str, bus: Bus, path: Path, instance: str
) -> tuple[ConfigReloader[Catalogue], Generations, Shared]:
    """A router replica as __main__ builds one (budget in-process on Redis)."""
    settings = RouterSettings(
        config=path, router_key_prefix=prefix, budget_key_prefix=f"{prefix}budget:", router_lease_seconds=60
    )
    catalogue, sha = read_catalogue(path)
    store = BudgetStore(redis_client, f"{prefix}budget:", 60)
    await store.upsert_pool(POOL, 10_000_000)
    shared = Shared(
        settings,
        redis_client,
        RateLimiter(redis_client, prefix),
        bus.publisher,
        RouterBudget(store, 60),
        KeyGate(KeyLimiter(redis_client, f"{prefix}budget:")),
    )
    generations = Generations(await build_generation(catalogue, shared), grace_seconds=GRACE_SECONDS)
    reloader = ConfigReloader(
        RouterConfig(shared, generations), path, running_sha256=sha, events=bus.publisher, instance=instance
    )
    return reloader, generations, shared


async def stop_replica(generations: Generations) -> None:
    live = await generations.close()
    for generation in live:
        if generation.health is not None:
            await generation.health.stop()
        if generation.recorder is not None:
            await generation.recorder.drain(5)
    closed: set[int] = set()
    for generation in live:
        for backend in generation.backends():
            if id(backend) not in closed:
                closed.add(id(backend))
                await backend.close()


@pytest.fixture
async def replica(
    redis_client: redis.Redis,
    prefix: str,
    bus: Bus,
    openai_up: OpenAIUpstream,
    second_up: OpenAIUpstream,
    tmp_path: Path,
) -> AsyncIterator[Replica]:
    path = tmp_path / "hoosh.yaml"
    urls = {"a": openai_up.base_url, "b": second_up.base_url}
    path.write_text(OLD.format(**urls))
    reloader, generations, shared = await start_replica(redis_client, prefix, bus, path, "router-test:1")
    server = new_server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(generations=generations), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Replica(path, urls, generations, reloader, router_pb2_grpc.RouterServiceStub(channel), shared)
    finally:
        await channel.close()
        await server.stop(None)
        await stop_replica(generations)


def request_for(model: str) -> router_pb2.ChatRequest:
    request = chat_request(user("hi"), model=model)
    request.pool = POOL
    request.request_id = uuid.uuid4().hex
    return request


async def answer(replica: Replica, model: str) -> str:
    reply = await replica.stub.Chat(request_for(model), timeout=10)
    return reply.choices[0].message.text


async def status_of(replica: Replica, model: str) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await replica.stub.Chat(request_for(model), timeout=10)
    return raised.value.code()


def session_closed(generation: Generation, name: str) -> bool:
    backend = next(backend for config, backend in generation.entries if config.name == name)
    return bool(backend._client.closed)  # type: ignore[attr-defined]


async def reload_events(bus: Bus) -> list[events_pb2.ConfigReload]:
    await bus.publisher.drain()
    info = await bus.js.stream_info(bus.stream)
    found = []
    for sequence in range(1, info.state.last_seq + 1):
        message = await bus.js.get_msg(bus.stream, sequence)
        if message.subject == f"{bus.subject_prefix}.config.reload":
            found.append(events_pb2.ConfigReload.FromString(message.data or b""))
    return found


# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("providers: [\n  - name: a\n", "YAML syntax error at line 2, column 3"),
        ("providers:\n  - {name: a, type: nonsense}\n", "providers[0].type: Input should be 'local'"),
        (
            "providers:\n  - {name: a, type: openai}\nroutes:\n  - {match: x, targets: [{provider: ghost}]}\n",
            "route 'x' names unknown provider 'ghost'",
        ),
        ("providers:\n  - {name: a, type: openai}\n  - {name: a, type: openai}\n", "provider names must be unique"),
        ("providers:\n  - {name: 'a b', type: openai}\n", "providers[0].name"),
        ("providers:\n  - {name: a, type: anthropic, responses_api: native}\n", "responses_api: native"),
        ("- a list\n", "not a mapping"),
    ],
    ids=["yaml", "type", "route", "duplicate", "name", "native", "list"],
)
def test_the_parser_refuses_a_bad_file_naming_the_problem(text: str, reason: str) -> None:
    with pytest.raises(ConfigRefused) as refused:
        parse_catalogue(text.encode(), "/etc/hoosh/hoosh.yaml")
    assert refused.value.reason.startswith("HOOSH_CONFIG /etc/hoosh/hoosh.yaml: ")
    assert reason in refused.value.reason and "\n" not in refused.value.reason


def test_the_router_starts_with_the_same_parser(tmp_path: Path) -> None:
    path = tmp_path / "hoosh.yaml"
    path.write_text("providers:\n  - {name: a, type: openai, models: [m]}\n")
    catalogue, sha = read_catalogue(path)
    assert [p.name for p in catalogue.providers] == ["a"] and sha == file_sha256(path.read_bytes())
    assert read_catalogue(None)[1] is None
    with pytest.raises(ConfigRefused, match="cannot read HOOSH_CONFIG"):
        read_catalogue(tmp_path / "missing.yaml")


async def test_a_bad_file_is_refused_and_changes_nothing(replica: Replica, bus: Bus) -> None:
    before = replica.generations.current
    running = replica.reloader.running_sha256
    for text, reason in (
        ("providers: [\n", "YAML syntax error"),
        ("providers:\n  - {name: x, type: nonsense}\n", "providers[0].type"),
        ("providers:\n  - {name: x, type: openai}\nroutes:\n  - {match: y, targets: [{provider: z}]}\n", "'z'"),
    ):
        replica.path.write_text(text)
        outcome = await replica.reloader.reload(trigger="api", reload_id=f"bad-{uuid.uuid4().hex[:6]}")
        assert (outcome.service, outcome.status) == ("router", "refused")
        assert reason in (outcome.reason or ""), outcome
        assert outcome.config_sha256 == file_sha256(text.encode())
        assert replica.generations.current is before and replica.reloader.running_sha256 == running
        assert await answer(replica, "mock-ok") == REPLY  # the old providers serve on
        assert await answer(replica, "alias-1") == REPLY
    replica.path.unlink()
    outcome = await replica.reloader.reload(trigger="signal")
    assert outcome.status == "refused" and "cannot read HOOSH_CONFIG" in (outcome.reason or "")
    assert replica.generations.current is before
    events = await reload_events(bus)
    assert [(e.service, e.outcome, e.trigger) for e in events] == [
        ("router", "refused", "api"),
        ("router", "refused", "api"),
        ("router", "refused", "api"),
        ("router", "refused", "signal"),
    ]
    assert all(e.previous_sha256 == running for e in events)


# -- the swap ---------------------------------------------------------------------------


async def test_a_stream_in_flight_finishes_on_its_generation_while_new_requests_see_the_new_one(
    replica: Replica, bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.upstream, "STREAM_GAP_SECONDS", 0.25)  # 7 pieces: about 2 s
    old = replica.generations.current
    assert (await replica.reloader.reload(trigger="api")).status == "unchanged"
    assert replica.generations.current is old

    listed = {model.id for model in (await replica.stub.ListModels(router_pb2.ListModelsRequest())).models}
    assert "leaving-one" in listed and "arriving-one" not in listed
    call = replica.stub.ChatStream(request_for("slow-stream-1"), timeout=30)
    text = []
    while not text:  # until the first piece of content has left
        message = await call.read()
        assert message is not grpc.aio.EOF
        text += [choice.delta.content for choice in message.choices if choice.delta.HasField("content")]
    assert old.active == 1

    replica.write(NEW)
    outcome = await replica.reloader.reload(trigger="api", reload_id="swap-1", key_id="key_admin")
    assert outcome.status == "reloaded", outcome
    new = replica.generations.current
    assert new is not old and old.retired and old.active == 1

    # New requests: the new provider list, at once.
    assert await answer(replica, "arriving-1") == REPLY
    assert await status_of(replica, "leaving-1") == grpc.StatusCode.NOT_FOUND
    assert await status_of(replica, "alias-1") == grpc.StatusCode.NOT_FOUND
    listed = {model.id for model in (await replica.stub.ListModels(router_pb2.ListModelsRequest())).models}
    assert "arriving-one" in listed and "leaving-one" not in listed
    # The unchanged provider kept its backend; the changed one got a new one; the old
    # generation's sessions stay open while its stream runs.
    kept = {config.name: backend for config, backend in old.entries}
    now = {config.name: backend for config, backend in new.entries}
    assert now["steady"] is kept["steady"] and now["changing"] is not kept["changing"]
    assert not session_closed(old, "changing") and not session_closed(old, "leaving")

    while (message := await call.read()) is not grpc.aio.EOF:
        text += [choice.delta.content for choice in message.choices if choice.delta.HasField("content")]
    assert "".join(text) == REPLY  # every piece, from the backend it started on
    assert await call.code() == grpc.StatusCode.OK

    # Its last request ended: after the grace, the replaced backends close, the kept one not.
    for _ in range(100):
        if session_closed(old, "changing") and session_closed(old, "leaving"):
            break
        await asyncio.sleep(0.05)
    assert session_closed(old, "changing") and session_closed(old, "leaving")
    assert not session_closed(new, "steady") and not session_closed(new, "changing")
    assert replica.generations.live == [new]
    assert await answer(replica, "steady-1") == REPLY

    [event] = [e for e in await reload_events(bus) if e.reload_id == "swap-1"]
    assert (event.outcome, event.key_id, event.config_sha256) == ("reloaded", "key_admin", outcome.config_sha256)
    assert '"added":["arriving"]' in event.changes_json and '"removed":["leaving"]' in event.changes_json
    assert '"changed":["changing"]' in event.changes_json and "sk-" not in event.changes_json


async def test_many_streams_across_a_reload_all_finish(replica: Replica, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench.upstream, "STREAM_GAP_SECONDS", 0.15)

    async def one(index: int) -> str:
        pieces = []
        async for message in replica.stub.ChatStream(request_for(f"slow-stream-{index}"), timeout=30):
            pieces += [choice.delta.content for choice in message.choices if choice.delta.HasField("content")]
        return "".join(pieces)

    streams = [asyncio.create_task(one(index)) for index in range(20)]
    old = replica.generations.current
    for _ in range(100):
        if old.active == len(streams):
            break
        await asyncio.sleep(0.02)
    replica.write(NEW)
    assert (await replica.reloader.reload(trigger="api")).status == "reloaded"
    assert old.active > 0  # the reload happened while they ran
    assert await asyncio.gather(*streams) == [REPLY] * len(streams)


# -- every replica ----------------------------------------------------------------------


async def test_the_edge_reloads_every_replica_or_none(
    replica: Replica, redis_client: redis.Redis, prefix: str, bus: Bus, tmp_path: Path
) -> None:
    """Two replicas answer over NATS: a good file reloads both; a file one of them cannot
    read is refused by all and nothing changes; replicas that read different files
    refuse it as a conflict."""
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_path = other_dir / "hoosh.yaml"
    other_path.write_bytes(replica.path.read_bytes())
    second, second_generations, _ = await start_replica(redis_client, prefix, bus, other_path, "router-test:2")
    subject_prefix = f"testreload{uuid.uuid4().hex[:8]}"
    responders = [ReloadResponder(bus.nc, subject_prefix, r) for r in (replica.reloader, second)]
    for responder in responders:
        await responder.start()
    try:
        for path in (replica.path, other_path):
            path.write_text(NEW.format(**replica.urls))
        report = await coordinate_reload(bus.nc, subject_prefix, reload_id="all-1", gather_seconds=0.3)
        assert report.status == "ok", report
        assert [(o.instance, o.status) for o in report.services] == [
            ("router-test:1", "reloaded"),
            ("router-test:2", "reloaded"),
        ]
        # Again: idempotent.
        report = await coordinate_reload(bus.nc, subject_prefix, reload_id="all-2", gather_seconds=0.3)
        assert (report.status, {o.status for o in report.services}) == ("ok", {"unchanged"})

        # One replica's file is bad: refused by both, with the reason; nothing changes.
        current = (replica.generations.current, second_generations.current)
        replica.path.write_text(OLD.format(**replica.urls))
        other_path.write_text("providers:\n  - {name: x, type: nonsense}\n")
        report = await coordinate_reload(bus.nc, subject_prefix, reload_id="all-3", gather_seconds=0.3)
        assert report.status == "refused" and not report.conflict
        assert "providers[0].type" in (report.reason or "")
        by_instance = {o.instance: o for o in report.services}
        assert by_instance["router-test:2"].reason == report.reason
        assert (by_instance["router-test:1"].reason or "").startswith("not applied: ")
        assert {o.status for o in report.services} == {"refused"}
        assert (replica.generations.current, second_generations.current) == current

        # Both valid, but different files: a conflict, nothing changes.
        other_path.write_text(OLD.format(**replica.urls) + "\n# another revision\n")
        report = await coordinate_reload(bus.nc, subject_prefix, reload_id="all-4", gather_seconds=0.3)
        assert report.status == "refused" and report.conflict and "different files" in (report.reason or "")
        assert (replica.generations.current, second_generations.current) == current
        events = [e for e in await reload_events(bus) if e.reload_id in ("all-3", "all-4")]
        assert sorted((e.reload_id, e.instance, e.outcome) for e in events) == [
            ("all-3", "router-test:1", "refused"),
            ("all-3", "router-test:2", "refused"),
            ("all-4", "router-test:1", "refused"),
            ("all-4", "router-test:2", "refused"),
        ]
    finally:
        for responder in responders:
            await responder.stop()
        await stop_replica(second_generations)


async def test_sighup_reloads_through_the_same_path(replica: Replica) -> None:
    remove = install_sighup(replica.reloader)
    try:
        replica.write(NEW)
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if replica.reloader.running_sha256 == file_sha256(replica.path.read_bytes()):
                break
            await asyncio.sleep(0.05)
        assert await answer(replica, "arriving-2") == REPLY
    finally:
        remove()


async def test_a_generation_assembled_by_hand_still_serves(replica: Replica) -> None:
    """RouterServicer(chat, router, ...) as before live reload: one fixed generation."""
    current = replica.generations.current
    servicer = RouterServicer(current.chat, current.router, health=current.health, cache=current.cache)
    server = new_server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub: Any = router_pb2_grpc.RouterServiceStub(channel)
            reply = await stub.Chat(request_for("mock-ok"), timeout=10)
            assert reply.choices[0].message.text == REPLY
    finally:
        with contextlib.suppress(Exception):
            await server.stop(None)


async def test_the_breaker_gauges_follow_the_current_generation(replica: Replica, bus: Bus) -> None:
    registry = CollectorRegistry()
    breakers = CurrentBreakers(replica.generations)
    breakers.register(registry)
    reloader = ConfigReloader(  # as __main__ wires it
        RouterConfig(replica.shared, replica.generations, breakers),
        replica.path,
        running_sha256=replica.reloader.running_sha256,
    )
    before = generate_latest(registry).decode()
    assert 'hoosh_provider_breaker_state{provider="leaving"} 0.0' in before and '"arriving"' not in before
    replica.write(NEW)
    assert (await reloader.reload(trigger="api")).status == "reloaded"
    after = generate_latest(registry).decode()
    assert 'hoosh_provider_breaker_state{provider="arriving"} 0.0' in after and '"leaving"' not in after
    assert breakers.view("leaving").state == "closed"  # removed: read as closed, never an error


# -- what a reload carries, and what it lets go ------------------------------------------


async def test_a_kept_provider_keeps_its_breaker_across_a_reload(replica: Replica, redis_client: redis.Redis) -> None:
    """A provider whose entry did not change keeps its breaker view (state, failures, last
    error, the half-open trial in flight): a reload closes no open breaker, even when
    Redis, where breakers are shared, cannot be read as the new board starts."""
    old = replica.generations.current
    board = old.health
    assert board is not None and old.catalogue is not None
    for _ in range(5):  # the default threshold
        await board.record_failure("steady", "upstream said 500")
    assert board.state_of("steady") == "open"
    # Half-open (here and in Redis, which the old board re-reads every second)...
    await redis_client.hset(board.key("steady"), "open_until_ms", int((time.time() - 1) * 1000))
    board.view("steady").open_until = time.time() - 1
    assert board.acquire("steady")  # ...with this replica's one trial in flight, on the old generation

    unreachable = redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        new = await build_generation(old.catalogue, replace(replica.shared, redis=unreachable), previous=old)
        health = new.health
        assert health is not None
        try:
            view = health.view("steady")
            assert (view.state, view.failures, view.last_error) == ("open", 5, "upstream said 500")
            assert not health.acquire("steady")  # no second trial while the old generation's runs
            board.release("steady")  # its request ends, on the old generation's board
            assert health.acquire("steady")
            health.release("steady")
        finally:
            await health.stop()
    finally:
        await unreachable.aclose()

    # Through a reload: the kept provider is watched through the same view; the changed
    # one starts from Redis with its latency carried over.
    board.view("changing").latency_ms = 123.0
    replica.write(NEW)
    assert (await replica.reloader.reload(trigger="api")).status == "reloaded"
    current = replica.generations.current.health
    assert current is not None
    assert current.view("steady") is board.view("steady") and current.state_of("steady") == "half_open"
    assert current.view("changing") is not board.view("changing")
    assert current.view("changing").latency_ms == 123.0


async def test_the_models_cache_does_not_keep_a_retired_generation_alive(replica: Replica) -> None:
    listed = await replica.stub.ListModels(router_pb2.ListModelsRequest())
    assert "leaving-one" in {model.id for model in listed.models}
    old = weakref.ref(replica.generations.current)
    replica.write(NEW)
    assert (await replica.reloader.reload(trigger="api")).status == "reloaded"
    for _ in range(100):  # it retires (its last call ended), its backends close...
        gc.collect()
        if old() is None:  # ...and nothing holds it any more
            break
        await asyncio.sleep(0.05)
    assert old() is None


class Closing:
    def __init__(self, fails: bool = False) -> None:
        self.fails = fails
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        if self.fails:
            raise RuntimeError("close failed")


class Failing:
    """A health board that cannot stop and a cache that cannot drain."""

    async def stop(self) -> None:
        raise RuntimeError("stop failed")

    async def drain(self) -> None:
        raise RuntimeError("drain failed")


async def test_retiring_closes_every_backend_whatever_fails_before(caplog: pytest.LogCaptureFixture) -> None:
    backends = [Closing(), Closing(fails=True), Closing()]
    old = Generation(
        chat=cast(Any, None),
        router=cast(Any, None),
        health=cast(Any, Failing()),
        cache=cast(Any, Failing()),
        entries=[(cast(Any, None), cast(Any, backend)) for backend in backends],
    )
    generations = Generations(old, grace_seconds=0)
    new = Generation(chat=cast(Any, None), router=cast(Any, None))
    generations.swap(new)
    for _ in range(100):
        if generations.live == [new]:
            break
        await asyncio.sleep(0.01)
    assert generations.live == [new]
    assert all(backend.closed for backend in backends)
    failures = {record.getMessage() for record in caplog.records if record.levelname == "WARNING"}
    assert {
        "stopping a replaced health board failed",
        "draining a replaced response cache failed",
        "closing a replaced backend failed",
    } <= failures


def big_catalogue(size: int = 152_000) -> bytes:
    lines = ["providers:"]
    count = 0
    while sum(len(line) + 1 for line in lines) < size:
        models = ", ".join(f'"m{count}-{index}"' for index in range(20))
        lines += [
            f"  - name: p{count}",
            "    type: openai",
            f"    base_url: http://127.0.0.1:{9000 + count}/v1",
            f"    models: [{models}]",
            "    pricing: {input_per_mtok: 1, output_per_mtok: 2}",
        ]
        count += 1
    lines.append("routes:")
    for index in range(count):
        lines += [f"  - match: alias-{index}", f"    targets: [{{provider: p{index}, model: m{index}-1}}]"]
    return "\n".join(lines).encode()


async def test_the_catalogue_is_parsed_once_per_reload_off_the_event_loop(
    replica: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed_in: list[int] = []

    def counting(data: bytes, source: str) -> Catalogue:
        parsed_in.append(threading.get_ident())
        return parse_catalogue(data, source)

    monkeypatch.setattr(hoosh_router.reload, "parse_catalogue", counting)
    replica.write(NEW)
    checked = await replica.reloader.check("parse-1")
    assert checked.valid and checked.changed
    outcome = await replica.reloader.reload(
        trigger="api", reload_id="parse-1", expected_sha256=checked.config_sha256, require_check=True
    )
    assert outcome.status == "reloaded"
    assert len(parsed_in) == 1 and parsed_in[0] != threading.get_ident()  # once, in a worker thread

    # A large file (1.5 s of YAML and validation on the loop before): parsed in a worker
    # thread too (how long the loop is held is measured, not asserted: speed is the bench's).
    replica.path.write_bytes(big_catalogue())
    checked = await replica.reloader.check("parse-2")
    assert checked.valid and checked.changed, checked
    assert len(parsed_in) == 2 and parsed_in[1] != threading.get_ident()
