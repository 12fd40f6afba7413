"""The outbox end to end against a NATS server of the test's own: NATS goes away, a
publisher process keeps its events in the outbox and is killed with SIGKILL, NATS
comes back, a new publisher process on the same outbox drains it, and every event is
in the stream exactly once.

Run as a module (``python -m tests.test_outbox_crash``), this file is that publisher
process (``child_main``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import nats
from hoosh.events.v1 import events_pb2
from hoosh_common import events
from hoosh_common.eventbus import EventPublisher, StreamPolicy, ensure_stream
from hoosh_common.outbox import TEMP_PREFIX, Outbox
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from .nats_log import RANDOM_PORT, log_size, wait_ready

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def nats_binary() -> str:
    from hoosh_cli.infra import nats_binary as find

    return find()


class OwnNats:
    """A nats-server of the test's own on loopback: JetStream on, its store in a
    directory of the test's; optionally one node of a cluster (routes to the others)."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "n1",
        port: int | None = None,
        cluster_port: int | None = None,
        routes: Sequence[int] = (),
        cluster_name: str | None = None,
    ) -> None:
        self.directory = directory
        self.name = name
        # The kernel's pick at the first start unless given (a cluster's routes name
        # theirs beforehand); a restart keeps it.
        self.port = port if port is not None else RANDOM_PORT
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.cluster_name = cluster_name
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        assert self.port != RANDOM_PORT, "the port is known once the server has started"
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [
            nats_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
            "-sd", str(self.directory / "store"), "--server_name", self.name,
        ]  # fmt: skip
        if self.cluster_port is not None:
            command += [
                "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                "--cluster_name", self.cluster_name or "hoosh-test",
                "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes),
            ]  # fmt: skip
        log_path = self.directory / "server.log"
        offset = log_size(log_path)
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
        self.port = wait_ready(self.process, log_path, offset).port

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients or peers (a crashed node)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


@contextlib.contextmanager
def own_nats(directory: Path) -> Iterator[OwnNats]:
    server = OwnNats(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def with_retries(make: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """Await ``make()`` until it succeeds (a server still electing its leaders)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await make()
        except (nats.errors.Error, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def read_all_ids(js: JetStreamContext, stream: str, durable: str = "reader") -> list[str]:
    """Every event id in the stream, in stream order, read with a pull consumer."""
    expected = (await js.stream_info(stream)).state.messages
    await js.add_consumer(
        stream, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL)
    )
    sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
    ids: list[str] = []
    try:
        while len(ids) < expected:
            for msg in await sub.fetch(500, timeout=5):
                ids.append((msg.headers or {})["Nats-Msg-Id"])
                await msg.ack()
    finally:
        await sub.unsubscribe()
    return ids


STREAM_POLICY = StreamPolicy(max_bytes=64 * 1024 * 1024)


# -- the publisher process -------------------------------------------------------------


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def child_main(mode: str, url: str, stream: str, prefix: str, outbox_dir: str) -> None:
    nc = await nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2)
    js = nc.jetstream()
    publisher = EventPublisher(
        nc, js, stream, prefix, outbox=Outbox(outbox_dir), max_attempts=2, ack_timeout=0.5, drain_backoff_max=0.2
    )
    await publisher.start()
    if mode == "drain":
        outbox = publisher.outbox
        assert outbox is not None
        for _ in range(3000):  # a minute at most
            if not outbox.count:
                break
            await asyncio.sleep(0.02)
        say(f"drained {publisher.stats.drained}")
        await publisher.close()
        await nc.close()
        return

    for i in range(10):  # NATS is up: the direct path
        ack = await publisher.publish(
            events.SUBJECT_COMPLETED, events_pb2.InferenceCompleted(request_id=f"pre-{i}"), f"pre-{i}"
        )
        assert ack is not None
    say("ready")
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # NATS is killed now

    def report(event_id: str, task: asyncio.Task[object]) -> None:
        say(f"{'kept' if task.result() is None else 'acked'} {event_id}")

    i = 0
    while True:  # until SIGKILL
        event_id = f"out-{i}"
        task = publisher.publish_background(
            events.SUBJECT_COMPLETED, events_pb2.InferenceCompleted(request_id=event_id), event_id
        )
        task.add_done_callback(lambda t, e=event_id: report(e, t))
        i += 1
        await asyncio.sleep(0.002)


# -- the test ----------------------------------------------------------------------------


async def read_line(stream: asyncio.StreamReader, timeout: float = 20.0, stderr: Path | None = None) -> str:
    line = await asyncio.wait_for(stream.readline(), timeout)
    if not line:
        said = stderr.read_text(errors="replace")[-2000:] if stderr is not None and stderr.exists() else ""
        raise AssertionError(f"the publisher process ended early: {said}")
    return line.decode().strip()


async def test_events_kept_through_an_outage_and_a_sigkill_reach_the_stream_once(tmp_path: Path) -> None:
    suffix = uuid.uuid4().hex[:10]
    stream, prefix, outbox_dir = f"OUTBOX_CRASH_{suffix}", f"outboxcrash{suffix}", tmp_path / "outbox"
    server = OwnNats(tmp_path / "nats")
    server.start()
    nc: NATS | None = None
    child: asyncio.subprocess.Process | None = None
    try:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
        js = nc.jetstream()
        await with_retries(lambda: ensure_stream(js, stream, prefix, policy=STREAM_POLICY))

        # A module of the tests package (it imports its siblings), run from the repository.
        args = [sys.executable, "-m", "tests.test_outbox_crash", "publish", server.url, stream, prefix, str(outbox_dir)]
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        stderr = tmp_path / "publisher.err"
        with stderr.open("ab") as err:
            child = await asyncio.create_subprocess_exec(
                *args,
                cwd=ROOT,
                env=environment,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        assert child.stdout is not None and child.stdin is not None
        assert await read_line(child.stdout, stderr=stderr) == "ready"

        server.kill()  # NATS goes away
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        kept: list[str] = []
        acked: list[str] = []
        while len(kept) < 300:
            verdict, event_id = (await read_line(child.stdout, stderr=stderr)).split()
            (kept if verdict == "kept" else acked).append(event_id)
        child.send_signal(signal.SIGKILL)  # the publisher dies during the outage
        await child.wait()
        child = None
        assert acked == []  # NATS was away: nothing could have been acked

        # What the dead process left: complete entries (it reported each only once durable).
        (outbox_dir / f"{TEMP_PREFIX}999999999").write_bytes(b"HOOSHOB1 half")  # as if killed mid-write
        left = Outbox(outbox_dir)
        await left.open()
        loaded = await left.read(left.head(1_000_000))
        await left.close()
        assert [c.damaged for c in loaded] == [None] * len(loaded)  # every segment checks out
        in_outbox = [e.event_id for content in loaded for e in content.entries]
        assert len(in_outbox) == len(set(in_outbox)) == left.count
        assert not (outbox_dir / f"{TEMP_PREFIX}999999999").exists()  # the half-written one is gone
        assert set(kept) <= set(in_outbox)

        server.start()  # NATS comes back (same store)
        args[3] = "drain"
        with stderr.open("ab") as err:
            drainer = await asyncio.create_subprocess_exec(
                *args, cwd=ROOT, env=environment, stdout=asyncio.subprocess.PIPE, stderr=err
            )
        assert drainer.stdout is not None
        assert await read_line(drainer.stdout, timeout=40, stderr=stderr) == f"drained {len(in_outbox)}"
        assert await drainer.wait() == 0
        assert not list(outbox_dir.glob("*.seg"))

        ids = await with_retries(lambda: read_all_ids(js, stream))
        counts = collections.Counter(ids)
        assert [i for i, n in counts.items() if n > 1] == []  # nothing twice
        assert set(ids) == {f"pre-{i}" for i in range(10)} | set(in_outbox)  # nothing lost, nothing else
    finally:
        if child is not None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
        if nc is not None:
            await nc.close()
        server.stop()


if __name__ == "__main__":
    asyncio.run(child_main(*sys.argv[1:]))
