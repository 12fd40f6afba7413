"""Live reload of the pools of hoosh.yaml (hoosh_budget.reload through the shared
ConfigReloader and its NATS responder): validated whole (against the store too) before
anything is applied, applied as start-up applies them with the counters kept, every
outcome published as a config.reload event. The file wins for the pools it changes, an
admin's resize of the others survives; a store outage midway is partial, not refused.
Real Redis and NATS (a TCP relay to the real Redis stands for the outage)."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
from hoosh.events.v1 import events_pb2
from hoosh_budget.__main__ import provision_pools
from hoosh_budget.config import BudgetSettings, configured_pools
from hoosh_budget.reload import BudgetPools
from hoosh_common.reload import ConfigReloader, ReloadResponder, coordinate_reload, file_sha256, install_sighup
from hoosh_metering.pools import BudgetStore, PoolSpec, PoolView
from hoosh_metering.redis import connect_redis

from .conftest import REDIS_URL, Bus

POOLS = """
pools:
  - name: org
    capacity: 10000
  - name: team
    capacity: 5000
    parent: org
    period: daily
"""


FRESH = "  - name: fresh\n    capacity: 42\n    parent: team\n"


def settings_for(path: Path) -> BudgetSettings:
    return BudgetSettings.model_construct(
        config=path, budget_pools={}, budget_default_capacity=1000, redis_url="", nats_url=""
    )


async def start(
    store: BudgetStore, tmp_path: Path, bus: Bus, instance: str = "budget-test:1"
) -> tuple[ConfigReloader[list[PoolSpec]], Path]:
    """A budget replica as __main__ starts one: the pools provisioned, then its reloader."""
    path = tmp_path / "hoosh.yaml"
    path.write_text(POOLS)
    settings = settings_for(path)
    applied = await provision_pools(store, settings)
    reloader = ConfigReloader(
        BudgetPools(store, settings, applied),
        path,
        running_sha256=file_sha256(path.read_bytes()),
        events=bus.publisher,
        instance=instance,
    )
    return reloader, path


async def reload_events(bus: Bus) -> list[events_pb2.ConfigReload]:
    info = await bus.js.stream_info(bus.stream)
    found = []
    for sequence in range(1, info.state.last_seq + 1):
        message = await bus.js.get_msg(bus.stream, sequence)
        if message.subject == f"{bus.prefix}.config.reload":
            found.append(events_pb2.ConfigReload.FromString(message.data or b""))
    return found


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("pools: [\n  - name: org\n", "YAML syntax error at line"),
        ("pools:\n  - name: org\n    capacity: 10000\n    period: yearly\n", "Unknown period 'yearly'"),
        ("pools:\n  - name: x\n    capacity: 5\n    parent: nowhere\n", "parent 'nowhere'"),
        # team exists under org: a parent is fixed at creation.
        ("pools:\n  - name: other\n    capacity: 5\n  - name: team\n    capacity: 5\n    parent: other\n", "fixed"),
        ("- just\n- a list\n", "not a mapping"),
    ],
    ids=["yaml", "period", "unknown-parent", "parent-change", "not-a-mapping"],
)
async def test_a_bad_file_is_refused_with_its_reason_and_changes_nothing(
    store: BudgetStore, tmp_path: Path, bus: Bus, text: str, reason: str
) -> None:
    reloader, path = await start(store, tmp_path, bus)
    before = {view.name: view for view in await store.list_pools()}
    running = reloader.running_sha256
    path.write_text(text)
    outcome = await reloader.reload(trigger="api", reload_id="r-bad", key_id="key_admin")
    assert outcome.status == "refused" and reason in (outcome.reason or ""), outcome
    assert outcome.config_sha256 == file_sha256(path.read_bytes())
    assert reloader.running_sha256 == running
    assert {view.name: view for view in await store.list_pools()} == before
    [event] = await reload_events(bus)
    assert (event.outcome, event.service, event.trigger, event.key_id) == ("refused", "budget", "api", "key_admin")
    assert event.event_id == "r-bad:budget:budget-test:1" and reason in event.reason


async def test_a_good_file_applies_new_pools_and_capacities_and_keeps_usage(
    store: BudgetStore, tmp_path: Path, bus: Bus
) -> None:
    reloader, path = await start(store, tmp_path, bus)
    spent, held = uuid.uuid4().hex, uuid.uuid4().hex
    await store.reserve("team", 300, reservation_id=spent)
    await store.commit(spent, 120, pool="team")
    await store.reserve("team", 50, reservation_id=held)  # in flight across the reload

    assert (await reloader.reload(trigger="api")).status == "unchanged"

    path.write_text(POOLS.replace("5000", "7000") + "  - name: fresh\n    capacity: 42\n    parent: team\n")
    outcome = await reloader.reload(trigger="api", reload_id="r-good")
    assert outcome.status == "reloaded" and outcome.reason is None
    assert reloader.running_sha256 == outcome.config_sha256 == file_sha256(path.read_bytes())
    team = await store.get_pool("team")
    assert (team.capacity, team.used, team.reserved, team.parent) == (7000, 120, 50, "org")
    fresh = await store.get_pool("fresh")
    assert (fresh.capacity, fresh.chain) == (42, ("fresh", "team", "org"))
    await store.commit(held, 50, pool="team")  # a reservation made before settles after
    assert (await store.get_pool("team")).used == 170

    # A pool removed from the file stays as it is.
    path.write_text(POOLS)
    outcome = await reloader.reload(trigger="signal", reload_id="r-back")
    assert outcome.status == "reloaded"
    assert (await store.get_pool("team")).capacity == 5000
    assert (await store.get_pool("fresh")).capacity == 42

    events = await reload_events(bus)
    assert [(e.outcome, e.trigger) for e in events] == [
        ("unchanged", "api"),
        ("reloaded", "api"),
        ("reloaded", "signal"),
    ]
    assert '"added":["fresh"]' in events[1].changes_json and '"changed":["team"]' in events[1].changes_json
    assert '"unlisted":["fresh"]' in events[2].changes_json
    assert events[2].previous_sha256 == events[1].config_sha256


async def test_every_replica_answers_the_edge_over_nats(store: BudgetStore, tmp_path: Path, bus: Bus) -> None:
    """Two budget replicas on one store: a good file is applied by both, a bad one is
    refused by both with its reason and nothing changes."""
    first, path = await start(store, tmp_path, bus)
    second, _ = await start(store, tmp_path, bus, instance="budget-test:2")
    subject_prefix = f"testreload{uuid.uuid4().hex[:8]}"
    responders = [ReloadResponder(bus.nc, subject_prefix, reloader) for reloader in (first, second)]
    for responder in responders:
        await responder.start()
    try:
        path.write_text(POOLS.replace("5000", "6000"))
        report = await coordinate_reload(bus.nc, subject_prefix, reload_id="r-nats", gather_seconds=0.3)
        assert report.status == "ok" and report.reason is None, report
        assert [(o.service, o.instance, o.status) for o in report.services] == [
            ("budget", "budget-test:1", "reloaded"),
            ("budget", "budget-test:2", "reloaded"),
        ]
        assert {o.config_sha256 for o in report.services} == {file_sha256(path.read_bytes())}
        assert (await store.get_pool("team")).capacity == 6000

        path.write_text("pools:\n  - name: team\n    capacity: -1\n")
        report = await coordinate_reload(bus.nc, subject_prefix, reload_id="r-nats-bad", gather_seconds=0.3)
        assert report.status == "refused" and not report.conflict
        assert "capacity" in (report.reason or "")
        assert {o.status for o in report.services} == {"refused"} and len(report.services) == 2
        assert (await store.get_pool("team")).capacity == 6000
    finally:
        for responder in responders:
            await responder.stop()


async def test_sighup_reloads_through_the_same_path(store: BudgetStore, tmp_path: Path, bus: Bus) -> None:
    reloader, path = await start(store, tmp_path, bus)
    remove = install_sighup(reloader)
    try:
        path.write_text(POOLS.replace("10000", "20000"))
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if (await store.get_pool("org")).capacity == 20000:
                break
            await asyncio.sleep(0.05)
        assert (await store.get_pool("org")).capacity == 20000
    finally:
        remove()
    for _ in range(50):
        events = await reload_events(bus)
        if events:
            break
        await asyncio.sleep(0.05)
    assert [(e.outcome, e.trigger) for e in events] == [("reloaded", "signal")]


# -- the file wins for the pools it changes; the store's state for the others -------------


async def test_an_admin_resize_survives_a_reload_that_changes_other_pools(
    store: BudgetStore, tmp_path: Path, bus: Bus
) -> None:
    reloader, path = await start(store, tmp_path, bus)
    await store.update_pool("team", capacity=9000)  # hoosh pools resize team 9000

    assert (await reloader.reload(trigger="api", reload_id="r-same")).status == "unchanged"
    assert (await store.get_pool("team")).capacity == 9000

    path.write_text(POOLS.replace("10000", "20000"))  # only org changes in the file
    outcome = await reloader.reload(trigger="api", reload_id="r-org")
    assert outcome.status == "reloaded", outcome
    assert (await store.get_pool("org")).capacity == 20000
    assert (await store.get_pool("team")).capacity == 9000  # the admin's resize stays
    assert (await reloader.reload(trigger="api", reload_id="r-again")).status == "unchanged"

    # The file changes team: the file wins for it.
    path.write_text(POOLS.replace("10000", "20000").replace("5000", "6000"))
    assert (await reloader.reload(trigger="api", reload_id="r-team")).status == "reloaded"
    assert (await store.get_pool("team")).capacity == 6000

    events = {e.reload_id: e for e in await reload_events(bus)}
    assert orjson.loads(events["r-org"].changes_json) == {
        "pools": {"added": [], "changed": ["org"], "kept": ["team"], "unlisted": []}
    }
    assert orjson.loads(events["r-team"].changes_json)["pools"]["changed"] == ["team"]


async def test_unchanged_is_judged_against_the_store(store: BudgetStore, tmp_path: Path, bus: Bus) -> None:
    """The same file, but a configured pool is gone from the store (deleted through the
    admin API): the reload creates it again, as a start would."""
    path = tmp_path / "hoosh.yaml"
    text = POOLS + "  - name: extra\n    capacity: 300\n"
    path.write_text(text)
    settings = settings_for(path)
    reloader = ConfigReloader(
        BudgetPools(store, settings, await provision_pools(store, settings)),
        path,
        running_sha256=file_sha256(text.encode()),
    )
    await store.delete_pool("extra")
    checked = await reloader.check()
    assert checked.valid and checked.changed
    outcome = await reloader.reload(trigger="api")
    assert outcome.status == "reloaded"
    assert (await store.get_pool("extra")).capacity == 300


class Proxy:
    """A TCP relay to the real Redis that can be cut (a network outage, mid-reload)."""

    def __init__(self) -> None:
        self.down = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        redis_at = urlsplit(REDIS_URL)
        upstream_reader, upstream_writer = await asyncio.open_connection(redis_at.hostname, redis_at.port or 6379)
        self._writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    @property
    def url(self) -> str:
        """REDIS_URL (its password and database), through this relay."""
        redis_at = urlsplit(REDIS_URL)
        credentials = redis_at.netloc.rpartition("@")[0]
        netloc = f"{credentials}@127.0.0.1:{self.port}" if credentials else f"127.0.0.1:{self.port}"
        return urlunsplit(redis_at._replace(netloc=netloc))

    def cut(self) -> None:
        self.down = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Cutting(BudgetStore):
    """The real store, whose link to Redis is cut as pool ``before`` is about to be
    applied, or once pool ``after`` has been."""

    def __init__(self, *args: Any, proxy: Proxy, before: str = "", after: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.proxy, self.before, self.after = proxy, before, after

    async def apply_pool(self, spec: PoolSpec) -> PoolView:
        if spec.name == self.before:
            self.proxy.cut()
        view = await super().apply_pool(spec)
        if spec.name == self.after:
            self.proxy.cut()
        return view


async def test_a_store_outage_midway_is_partial_and_the_next_reload_completes_it(
    store: BudgetStore, prefix: str, tmp_path: Path, bus: Bus
) -> None:
    """Some pools written, then the store went away: ``partial`` (never ``refused``, which
    says nothing changed), reported as such by the edge and in the audit; the next
    reload applies the rest."""
    _, path = await start(store, tmp_path, bus)
    proxy = Proxy()
    await proxy.start()
    client = connect_redis(proxy.url, socket_timeout=1, socket_connect_timeout=1)
    cutting = Cutting(client, prefix, default_lease_seconds=300, proxy=proxy, after="org")
    settings = settings_for(path)
    reloader = ConfigReloader(
        BudgetPools(cutting, settings, configured_pools(settings)),
        path,
        running_sha256=file_sha256(path.read_bytes()),
        events=bus.publisher,
        instance="budget-test:cut",
    )
    subject_prefix = f"testreload{uuid.uuid4().hex[:8]}"
    responder = ReloadResponder(bus.nc, subject_prefix, reloader)
    await responder.start()
    try:
        # org, team and a new pool change: org is written, then the link goes.
        path.write_text(POOLS.replace("10000", "20000").replace("5000", "6000") + FRESH)
        report = await coordinate_reload(bus.nc, subject_prefix, reload_id="r-cut", gather_seconds=0.5)
        assert report.status == "partial" and not report.conflict, report
        [outcome] = report.services
        assert outcome.status == "partial", outcome
        assert "pool 'team' could not be applied" in (outcome.reason or "")
        assert "applied before it: org" in (outcome.reason or "") and "not applied: fresh, team" in (
            outcome.reason or ""
        )
        assert (await store.get_pool("org")).capacity == 20000
        assert (await store.get_pool("team")).capacity == 5000
        assert reloader.running_sha256 != outcome.config_sha256  # not the running file yet
        [event] = [e for e in await reload_events(bus) if e.reload_id == "r-cut"]
        assert (event.outcome, event.reason) == ("partial", outcome.reason)
        assert orjson.loads(event.changes_json)["pools"]["changed"] == ["org"]

        proxy.down = False  # the store is back
        report = await coordinate_reload(bus.nc, subject_prefix, reload_id="r-after", gather_seconds=0.5)
        assert report.status == "ok" and [o.status for o in report.services] == ["reloaded"], report
        assert (await store.get_pool("team")).capacity == 6000 and (await store.get_pool("fresh")).capacity == 42
        [event] = [e for e in await reload_events(bus) if e.reload_id == "r-after"]
        assert orjson.loads(event.changes_json)["pools"] == {
            "added": ["fresh"],
            "changed": ["team"],
            "kept": [],
            "unlisted": [],
        }
    finally:
        await responder.stop()
        await cutting.close()
        await client.aclose()
        await proxy.close()


async def test_a_store_outage_on_the_first_write_is_refused(
    store: BudgetStore, prefix: str, tmp_path: Path, bus: Bus
) -> None:
    """Nothing was written: that one is ``refused`` (nothing changed), and says so."""
    _, path = await start(store, tmp_path, bus)
    proxy = Proxy()
    await proxy.start()
    client = connect_redis(proxy.url, socket_timeout=1, socket_connect_timeout=1)
    cutting = Cutting(client, prefix, default_lease_seconds=300, proxy=proxy, before="org")
    settings = settings_for(path)
    reloader = ConfigReloader(
        BudgetPools(cutting, settings, configured_pools(settings)), path, running_sha256=file_sha256(path.read_bytes())
    )
    try:
        path.write_text(POOLS.replace("10000", "20000").replace("5000", "6000"))
        outcome = await reloader.reload(trigger="api")
        assert outcome.status == "refused", outcome
        assert "pool 'org' could not be applied" in (outcome.reason or "")
        assert "nothing was changed" in (outcome.reason or "")
        assert (await store.get_pool("org")).capacity == 10000 and (await store.get_pool("team")).capacity == 5000
    finally:
        await cutting.close()
        await client.aclose()
        await proxy.close()
