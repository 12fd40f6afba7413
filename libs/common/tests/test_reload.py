"""The reload protocol between the edge and the replicas (hoosh_common.reload) on the real
NATS: the rounds' outcomes — ok, refused, conflict, partial — and the one-line reasons;
the file parsed once per reload off the loop; requests answered concurrently; an apply
only for the replicas that answered the check, and only of the file each checked.
The replicas are real ConfigReloaders and ReloadResponders; what each one swaps is a
small target holding the file's bytes (the router's and the budget's own targets are
tested in their services, and end to end in tests/test_reload_e2e.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
import yaml
from hoosh_cli.infra import nats_binary
from hoosh_common.reload import (
    ConfigPartlyApplied,
    ConfigRefused,
    ConfigReloader,
    NoReplicas,
    ReloadResponder,
    _round_trip,
    coordinate_reload,
    describe_validation_error,
    describe_yaml_error,
    file_sha256,
    reload_subject,
)
from nats.aio.client import Client as NATS
from pydantic import BaseModel, ValidationError

NATS_URL = "nats://127.0.0.1:4222"


class Bytes:
    """A target that takes any file but one starting with ``bad`` and, when told, refuses
    or stalls while checking or applying."""

    def __init__(
        self,
        service: str,
        *,
        refuse_apply: bool = False,
        apply_delay: float = 0.0,
        check_delay: float = 0.0,
        parse_seconds: float = 0.0,
    ) -> None:
        self.service = service
        self.running: bytes | None = None
        self.refuse_apply = refuse_apply
        self.apply_delay = apply_delay
        self.check_delay = check_delay
        self.parse_seconds = parse_seconds
        self.parsed: list[bytes] = []
        self.parse_threads: set[int] = set()
        self.applying = asyncio.Event()

    def parse(self, data: bytes) -> bytes:
        self.parsed.append(data)
        self.parse_threads.add(threading.get_ident())
        time.sleep(self.parse_seconds)  # CPU-bound work, as YAML and validation are
        if data.startswith(b"bad"):
            raise ConfigRefused(f"{self.service} cannot use it")
        return data

    async def check(self, config: bytes) -> bool:
        await asyncio.sleep(self.check_delay)
        return config != self.running

    async def apply(self, config: bytes) -> dict[str, Any]:
        self.applying.set()
        await asyncio.sleep(self.apply_delay)
        if self.refuse_apply:
            raise ConfigRefused("the store is away")
        self.running = config
        return {}


@pytest.fixture
async def nc() -> AsyncIterator[NATS]:
    client = await nats.connect(NATS_URL)
    yield client
    await client.close()


async def replicas(nc: NATS, prefix: str, paths: list[Path], targets: list[Bytes]) -> list[ReloadResponder]:
    started = []
    for index, (path, target) in enumerate(zip(paths, targets, strict=True)):
        reloader = ConfigReloader(target, path, running_sha256=None, instance=f"{target.service}-{index}")
        responder = ReloadResponder(nc, prefix, reloader)
        await responder.start()
        started.append(responder)
    return started


def prefix() -> str:
    return f"testreload{uuid.uuid4().hex[:10]}"


async def test_ok_refused_and_conflict(nc: NATS, tmp_path: Path) -> None:
    name = prefix()
    path = tmp_path / "hoosh.yaml"
    path.write_bytes(b"first")
    targets = [Bytes("router"), Bytes("router"), Bytes("budget")]
    responders = await replicas(nc, name, [path, path, path], targets)
    try:
        report = await coordinate_reload(nc, name, reload_id="r1", gather_seconds=0.3)
        assert (report.status, report.reason) == ("ok", None)
        assert [(o.service, o.instance, o.status) for o in report.services] == [
            ("budget", "budget-2", "reloaded"),
            ("router", "router-0", "reloaded"),
            ("router", "router-1", "reloaded"),
        ]
        assert {o.config_sha256 for o in report.services} == {file_sha256(b"first")}
        assert report.to_json()["reload_id"] == "r1"

        path.write_bytes(b"bad file")
        report = await coordinate_reload(nc, name, reload_id="r2", gather_seconds=0.3)
        assert report.status == "refused" and not report.conflict
        # Each service's reason once, with the services that gave it.
        assert set((report.reason or "").split("; ")) == {
            "router: router cannot use it",
            "budget: budget cannot use it",
        }
        assert {o.status for o in report.services} == {"refused"}
        assert all(t.running == b"first" for t in targets)

        other = tmp_path / "other.yaml"
        other.write_bytes(b"second")
        path.write_bytes(b"third")
        targets.append(Bytes("budget"))
        responders += await replicas(nc, name, [other], targets[3:])
        report = await coordinate_reload(nc, name, reload_id="r3", gather_seconds=0.3)
        assert report.status == "refused" and report.conflict and "different files" in (report.reason or "")
        assert all(t.running in (b"first", None) for t in targets)
    finally:
        for responder in responders:
            await responder.stop()


async def test_partial_when_a_replica_refuses_to_apply_or_does_not_answer(nc: NATS, tmp_path: Path) -> None:
    name = prefix()
    path = tmp_path / "hoosh.yaml"
    path.write_bytes(b"good")
    targets = [Bytes("router"), Bytes("budget", refuse_apply=True), Bytes("router", apply_delay=2.0)]
    responders = await replicas(nc, name, [path] * 3, targets)
    try:
        report = await coordinate_reload(nc, name, reload_id="p1", gather_seconds=0.3, timeout_seconds=0.8)
        assert report.status == "partial", report
        assert "the store is away" in (report.reason or "") and "no answer within 0.8 s from router router-2" in (
            report.reason or ""
        )
        assert [(o.instance, o.status) for o in report.services] == [("budget-1", "refused"), ("router-0", "reloaded")]
    finally:
        await asyncio.sleep(2.0)  # let the slow one finish before its subscription goes
        for responder in responders:
            await responder.stop()


async def test_nobody_listening_is_known_at_once(nc: NATS) -> None:
    started = time.monotonic()
    with pytest.raises(NoReplicas, match="no service replica answered"):
        await coordinate_reload(nc, prefix(), reload_id="n1", gather_seconds=120)
    # The server's no-responders status ends it, not the two-minute window.
    assert time.monotonic() - started < 60


def test_the_subject_is_outside_the_event_stream() -> None:
    subject = reload_subject("hoosh")
    assert subject == "hoosh-control.hoosh.reload" and not subject.startswith("hoosh.")


def test_reasons_are_one_line() -> None:
    class Pool(BaseModel):
        name: str
        capacity: int

    class File(BaseModel):
        pools: list[Pool]

    with pytest.raises(ValidationError) as invalid:
        File.model_validate({"pools": [{"name": "a", "capacity": 1}, {"name": "b", "capacity": "lots"}]})
    assert describe_validation_error(invalid.value) == (
        "pools[1].capacity: Input should be a valid integer, unable to parse string as an integer"
    )
    with pytest.raises(yaml.YAMLError) as bad:
        yaml.safe_load("providers: [\n  - a\n")
    described = describe_yaml_error(bad.value)
    assert described.startswith("YAML syntax error at line 2, column 3: ") and "\n" not in described
    assert ConfigRefused("two\n  lines").reason == "two lines"


# -- the rounds' edge cases ------------------------------------------------------------------


async def test_the_file_is_parsed_once_per_reload_off_the_event_loop(nc: NATS, tmp_path: Path) -> None:
    """Check and apply (and an abort) reuse one parse of the file, run in a worker thread:
    a slow parse never holds the loop."""
    name = prefix()
    path = tmp_path / "hoosh.yaml"
    path.write_bytes(b"good")
    target = Bytes("router", parse_seconds=0.6)
    responders = await replicas(nc, name, [path], [target])
    try:
        report = await coordinate_reload(nc, name, reload_id="once", gather_seconds=1.5)
        assert report.status == "ok" and [o.status for o in report.services] == ["reloaded"], report
        assert target.parsed == [b"good"]  # the check's parse served the apply
        assert threading.get_ident() not in target.parse_threads

        path.write_bytes(b"bad again")
        report = await coordinate_reload(nc, name, reload_id="once-bad", gather_seconds=1.5)
        assert report.status == "refused"
        assert target.parsed == [b"good", b"bad again"]  # check and abort: one parse, its refusal kept
    finally:
        for responder in responders:
            await responder.stop()


async def test_a_replica_busy_applying_still_answers_another_reloads_check(nc: NATS, tmp_path: Path) -> None:
    """nats-py runs a subscription's callbacks one at a time: each request must be a task
    of its own, or a second edge's check misses its window while an apply runs."""
    name = prefix()
    path = tmp_path / "hoosh.yaml"
    path.write_bytes(b"one")
    target = Bytes("budget", apply_delay=1.5)
    responders = await replicas(nc, name, [path], [target])
    try:
        first = asyncio.create_task(coordinate_reload(nc, name, reload_id="busy-1", gather_seconds=0.3))
        await asyncio.wait_for(target.applying.wait(), 5)
        second = await coordinate_reload(nc, name, reload_id="busy-2", gather_seconds=0.3)
        # Its apply waited for the first one's (applies are serialised), then found the file on.
        assert (second.status, [o.status for o in second.services]) == ("ok", ["unchanged"]), second
        report = await first
        assert (report.status, [o.status for o in report.services]) == ("ok", ["reloaded"]), report
    finally:
        for responder in responders:
            await responder.stop()


async def test_a_replica_whose_check_answer_came_late_gets_no_apply(nc: NATS, tmp_path: Path) -> None:
    """The edge counts on the replicas that answered the check in time; one that answered
    late is not named in the apply and keeps its configuration (the next reload brings it)."""
    name = prefix()
    path = tmp_path / "hoosh.yaml"
    path.write_bytes(b"good")
    targets = [Bytes("router"), Bytes("router", check_delay=0.8)]
    responders = await replicas(nc, name, [path, path], targets)
    try:
        report = await coordinate_reload(nc, name, reload_id="late", gather_seconds=0.3, timeout_seconds=3)
        assert report.status == "ok" and [(o.instance, o.status) for o in report.services] == [
            ("router-0", "reloaded")
        ], report
        await asyncio.sleep(1.5)  # its check has ended, and any apply it took would have too
        assert targets[0].running == b"good" and targets[1].running is None
    finally:
        for responder in responders:
            await responder.stop()


async def test_an_apply_must_name_the_file_this_replica_checked(nc: NATS, tmp_path: Path) -> None:
    """A replica applies only the exact SHA-256 its own check of that reload found valid:
    never whatever is on disk."""
    name = prefix()
    path = tmp_path / "hoosh.yaml"
    path.write_bytes(b"good")
    sha = file_sha256(b"good")
    target = Bytes("router")
    responders = await replicas(nc, name, [path], [target])
    subject = reload_subject(name)

    async def ask(request: dict[str, Any]) -> dict[str, Any]:
        reply = await nc.request(subject, orjson.dumps(request), timeout=5)
        answer: dict[str, Any] = orjson.loads(reply.data)
        return answer

    try:
        refused = await ask({"op": "apply", "reload_id": "no-sha"})
        assert refused["status"] == "refused" and "no checked SHA-256" in refused["reason"]
        refused = await ask({"op": "apply", "reload_id": "short", "expected_sha256": sha[:40]})
        assert refused["status"] == "refused" and "no checked SHA-256" in refused["reason"]
        refused = await ask({"op": "apply", "reload_id": "unchecked", "expected_sha256": sha})
        assert refused["status"] == "refused" and "did not take part" in refused["reason"]
        assert (await ask({"op": "check", "reload_id": "other"}))["config_sha256"] == sha
        refused = await ask({"op": "apply", "reload_id": "other", "expected_sha256": file_sha256(b"else")})
        assert refused["status"] == "refused" and "checked another file" in refused["reason"]
        assert target.running is None

        assert (await ask({"op": "check", "reload_id": "right"}))["valid"]
        applied = await ask({"op": "apply", "reload_id": "right", "expected_sha256": sha})
        assert (applied["status"], applied["config_sha256"]) == ("reloaded", sha)
        assert target.running == b"good"
    finally:
        for responder in responders:
            await responder.stop()


async def test_nothing_is_applied_when_a_check_answer_lacks_the_sha256(nc: NATS, tmp_path: Path) -> None:
    """A check answer without the file's SHA-256 (a replica of another version) leaves the
    edge nothing to name in the apply: refused, and no apply is sent."""
    name = prefix()
    seen: list[str] = []

    async def old_replica(msg: Any) -> None:
        request = orjson.loads(msg.data)
        seen.append(request["op"])
        if request["op"] == "check":
            await msg.respond(orjson.dumps({"service": "router", "instance": "old-1", "valid": True}))
        else:
            await msg.respond(orjson.dumps({"service": "router", "instance": "old-1", "status": "refused"}))

    subscription = await nc.subscribe(reload_subject(name), cb=old_replica)
    try:
        report = await coordinate_reload(nc, name, reload_id="nosha", gather_seconds=0.3, timeout_seconds=1)
        assert report.status == "refused" and report.conflict, report
        assert "without the file's SHA-256" in (report.reason or "")
        assert seen == ["check", "abort"]
    finally:
        await subscription.unsubscribe()


class Halfway(Bytes):
    """Applies part of the file, then fails (the budget's store going away midway)."""

    async def apply(self, config: bytes) -> dict[str, Any]:
        raise ConfigPartlyApplied("pool 'b' could not be applied: the store is away; applied before it: a", {"a": 1})


async def test_a_replica_that_applied_part_of_the_file_is_partial_not_refused(nc: NATS, tmp_path: Path) -> None:
    name = prefix()
    path = tmp_path / "hoosh.yaml"
    path.write_bytes(b"good")
    targets = [Halfway("budget")]
    responders = await replicas(nc, name, [path], targets)
    try:
        report = await coordinate_reload(nc, name, reload_id="half", gather_seconds=0.3)
        assert report.status == "partial" and not report.conflict, report
        assert "applied before it: a" in (report.reason or "")
        [outcome] = report.services
        assert (outcome.status, outcome.config_sha256) == ("partial", file_sha256(b"good"))
        assert report.to_json()["services"][0]["status"] == "partial"
        # The file is not the running one: the next reload tries again.
        assert responders[0]._reloader.running_sha256 is None
    finally:
        for responder in responders:
            await responder.stop()


class StallsTheEdge(Bytes):
    """A replica (in a thread of its own, with its own loop and connection) that, asked to
    check, stalls the edge's event loop for ``stall`` seconds (as a pause of the edge's
    whole process would: CPU starved, a long collection) and answers while it is stalled.
    It waits ``before`` seconds first, so that the edge has begun its window."""

    def __init__(self, service: str, edge_loop: asyncio.AbstractEventLoop, before: float, stall: float) -> None:
        super().__init__(service)
        self.edge_loop = edge_loop
        self.before = before
        self.stall = stall
        self.stalls: list[float] = []  # when each stall began (time.monotonic)

    def _stall_the_edge(self) -> None:
        self.stalls.append(time.monotonic())
        time.sleep(self.stall)

    async def check(self, config: bytes) -> bool:
        if not self.stalls:  # the check round's (an apply checks again)
            await asyncio.sleep(self.before)
            self.edge_loop.call_soon_threadsafe(self._stall_the_edge)
            await asyncio.sleep(0.1)
        return await super().check(config)


async def test_a_check_answer_on_the_connection_counts_though_the_edge_read_it_late(nc: NATS, tmp_path: Path) -> None:
    """The edge's loop busy past the end of the window while a replica's check answer came
    in: the answer was on the edge's connection in time, so the replica takes part (it
    used to be left out as if it had answered late: NoReplicas here)."""
    name = prefix()
    path = tmp_path / "hoosh.yaml"
    path.write_bytes(b"good")
    window = 1.5
    target = StallsTheEdge("router", asyncio.get_running_loop(), before=0.3, stall=window + 2)
    ready = threading.Event()
    stopping: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    def replica() -> None:
        async def serve() -> None:
            own = await nats.connect(NATS_URL)
            [responder] = await replicas(own, name, [path], [target])
            stop = asyncio.Event()
            stopping.append((asyncio.get_running_loop(), stop))
            ready.set()
            await stop.wait()
            await responder.stop()
            await own.close()

        asyncio.run(serve())

    thread = threading.Thread(target=replica, name="replica", daemon=True)
    thread.start()
    try:
        assert ready.wait(10)
        asked = time.monotonic()
        report = await coordinate_reload(nc, name, reload_id="stalled", gather_seconds=window, timeout_seconds=5)
        # The stall began inside the window and lasted past its end.
        [began] = target.stalls
        assert asked < began < asked + window < began + target.stall
        assert report.status == "ok" and [(o.instance, o.status) for o in report.services] == [
            ("router-0", "reloaded")
        ], report
        assert target.running == b"good"
    finally:
        for loop, stop in stopping:
            loop.call_soon_threadsafe(stop.set)
        thread.join(10)


async def stopped(pid: int, timeout: float = 10.0) -> None:
    """Until every thread of ``pid`` is stopped: SIGSTOP takes effect asynchronously (the
    server once answered a PING after send_signal had returned)."""
    deadline = time.monotonic() + timeout
    while True:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            with contextlib.suppress(OSError):
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return
        assert time.monotonic() < deadline, f"process {pid} not stopped: {states}"
        await asyncio.sleep(0.01)


async def test_a_round_trip_that_gives_up_leaves_the_connection_reading(tmp_path: Path) -> None:
    """A server silent past the edge's bound (SIGSTOPped): the round trip gives up, and
    once the server answers again the connection still reads. nats-py's own flush timeout
    cancels its PONG future, and the late PONG then ends the read loop for good: the
    connection stays open and deaf (every later reload 503 until its pings notice)."""
    server = subprocess.Popen(
        [nats_binary(), "-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client: NATS | None = None
    try:
        ports = tmp_path / f"{Path(nats_binary()).name}_{server.pid}.ports"
        deadline = time.monotonic() + 20
        while not ports.exists():  # written once the server listens
            assert server.poll() is None and time.monotonic() < deadline, "nats-server did not start"
            await asyncio.sleep(0.02)
        client = await nats.connect(orjson.loads(ports.read_bytes())["nats"][0], allow_reconnect=False)
        echo = await client.subscribe("echo")
        server.send_signal(signal.SIGSTOP)
        await stopped(server.pid)
        try:
            assert not await _round_trip(client, 0.5)
        finally:
            server.send_signal(signal.SIGCONT)
        assert await _round_trip(client, 5)
        await client.publish("echo", b"still reading")
        assert (await echo.next_msg(timeout=5)).data == b"still reading"
    finally:
        if client is not None:
            await client.close()
        server.kill()
        server.wait(10)
