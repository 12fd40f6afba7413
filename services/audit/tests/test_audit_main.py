"""``python -m hoosh_audit`` as a real process: serve, checkpoint, survive SIGKILL, stop on
SIGTERM, refuse a log that lost entries; then the offline verifier agrees."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc
from hoosh.events.v1 import events_pb2
from hoosh_audit.checkpoint import CheckpointStore, checkpoint_key
from hoosh_audit.keys import Keyring
from hoosh_audit.log import AuditLog
from hoosh_common.eventbus import SIGNATURE_HEADER, EventPublisher, EventSigner, ensure_stream
from hoosh_common.grpc_server import internal_channel
from prometheus_client.parser import text_string_to_metric_families

from .conftest import NATS_URL, PUBLISHER_KEY, PUBLISHER_KEY_ID, PUBLISHER_KEYS_ENV, REDIS_URL, Bus
from .helpers import DEADLINE_S, entries, read_entries, rewrite_lines, segment_files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


EDGE_TOKEN = "edge-internal-token-0123456789"


def audit_env(key: bytes, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOSH_")}
    env.update(
        {
            "HOOSH_AUDIT_HMAC_KEY": key.decode(),
            "HOOSH_REDIS_URL": REDIS_URL,
            # Production (the default) needs the publishers' keys; the publisher fixture signs.
            "HOOSH_AUDIT_PUBLISHER_KEYS": PUBLISHER_KEYS_ENV,
            # ... and its callers (the edge), as production requires.
            "HOOSH_INTERNAL_CALLERS": f"edge={EDGE_TOKEN}",
            "HOOSH_INTERNAL_PLAINTEXT": "allow",  # no certificates in these tests
            **extra,
        }
    )
    return env


class Service:
    """One audit process on a stream, a directory and a checkpoint key prefix."""

    def __init__(self, bus: Bus, directory: Path, key: bytes, prefix: str, **extra: str) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.env = audit_env(
            key,
            HOOSH_AUDIT_LISTEN=f"127.0.0.1:{self.port}",
            HOOSH_AUDIT_METRICS_LISTEN=f"127.0.0.1:{self.metrics_port}",
            HOOSH_NATS_STREAM=bus.stream,
            HOOSH_SUBJECT_PREFIX=bus.prefix,
            HOOSH_AUDIT_DIR=str(directory),
            HOOSH_AUDIT_CONSUMER="audit-test",
            HOOSH_AUDIT_CHECKPOINT_PREFIX=prefix,
            **extra,
        )
        self.checkpoint_key = checkpoint_key(prefix, bus.stream, "audit-test")
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> asyncio.subprocess.Process:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "hoosh_audit",
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return self.proc

    async def list(self, **fields: Any) -> audit_pb2.ListEntriesResponse:
        channel = internal_channel(f"127.0.0.1:{self.port}")
        try:
            stub = audit_pb2_grpc.AuditServiceStub(channel)
            return await stub.ListEntries(
                audit_pb2.ListEntriesRequest(**fields), timeout=2, metadata=(("authorization", f"Bearer {EDGE_TOKEN}"),)
            )
        finally:
            await channel.close()

    async def wait_for(self, total: int) -> audit_pb2.ListEntriesResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while True:
            assert self.proc is not None and self.proc.returncode is None, "the service died"
            try:
                reply = await self.list(limit=1)
                if reply.total >= total:
                    return reply
            except grpc.aio.AioRpcError:
                pass
            assert loop.time() < deadline, f"the service never recorded {total} entries"
            await asyncio.sleep(0.05)

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Its ``/metrics``, parsed: (sample name, sorted labels) -> value."""

        def get() -> str:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                return str(reply.read().decode("utf-8"))

        text = await asyncio.to_thread(get)
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    async def stop(self) -> tuple[int, str]:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(self.proc.communicate(), DEADLINE_S)
        assert self.proc.returncode is not None
        return self.proc.returncode, stderr.decode()

    async def exited(self) -> tuple[int, str]:
        """Wait for the process to end on its own."""
        assert self.proc is not None
        _, stderr = await asyncio.wait_for(self.proc.communicate(), DEADLINE_S)
        assert self.proc.returncode is not None
        return self.proc.returncode, stderr.decode()

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()  # SIGKILL: no cleanup of any kind
        await self.proc.communicate()


@pytest.fixture
async def publisher(bus: Bus) -> EventPublisher:
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    return EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix, signer=EventSigner(PUBLISHER_KEY, PUBLISHER_KEY_ID))


@pytest.fixture
async def services() -> AsyncIterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        if service.proc is not None and service.proc.returncode is None:
            service.proc.kill()
            await service.proc.communicate()


def hoosh_verify(service: Service, directory: Path) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hoosh_cli",
            "audit",
            "verify",
            str(directory),
            "--checkpoint-key",
            service.checkpoint_key,
        ],
        env=service.env,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {"stderr": done.stderr}


async def test_missing_key_stops_the_service_with_a_clear_message() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOSH_")}
    env["HOOSH_INTERNAL_CALLERS"] = f"edge={EDGE_TOKEN}"
    env["HOOSH_INTERNAL_PLAINTEXT"] = "allow"
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "hoosh_audit"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "HOOSH_AUDIT_HMAC_KEY: is required" in done.stderr


async def test_a_taken_metrics_port_stops_the_service_with_a_clear_message(key: bytes, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        env = audit_env(key, HOOSH_AUDIT_METRICS_LISTEN=address, HOOSH_AUDIT_DIR=str(tmp_path / "audit"))
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "hoosh_audit"], env=env, capture_output=True, text=True, check=False
        )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"HOOSH_AUDIT_METRICS_LISTEN='{address}'" in done.stderr


async def test_service_records_events_checkpoints_and_stops_gracefully(
    bus: Bus, publisher: EventPublisher, tmp_path: Path, key: bytes, redis_prefix: str, services: list[Service]
) -> None:
    for i in range(5):
        await publisher.publish("inference.completed", events_pb2.InferenceCompleted(request_id=f"r{i}"), f"r{i}")
    service = Service(bus, tmp_path / "audit", key, redis_prefix)
    services.append(service)
    await service.start()
    await service.wait_for(5)
    listed = await service.list()
    assert [e.event_id for e in listed.entries] == [f"r{i}" for i in range(5)]
    assert listed.chain_valid
    channel = internal_channel(f"127.0.0.1:{service.port}")
    try:
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="hoosh.audit.v1.AuditService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()
    metrics = await service.metrics()  # served by the process on HOOSH_AUDIT_METRICS_LISTEN
    assert metrics[("hoosh_audit_events_written_total", (("kind", "inference.completed"),))] == 5
    assert metrics[("hoosh_audit_written_stream_seq", ())] == 5
    assert metrics[("hoosh_audit_log_seq", ())] == 5
    listed_ok = ("grpc_server_handled_total", (("grpc_code", "OK"), ("grpc_method", "ListEntries")))
    assert any(name == listed_ok[0] and set(listed_ok[1]) <= set(labels) for name, labels in metrics)
    code, stderr = await service.stop()
    assert code == 0, stderr[-2000:]
    assert '"audit stopped"' in stderr

    verified, report = await asyncio.to_thread(hoosh_verify, service, tmp_path / "audit")
    assert verified == 0, report
    assert (report["entries"], report["checkpoint"]["seq"]) == (5, 5)
    info = await bus.js.consumer_info(bus.stream, "audit-test")
    assert info.num_ack_pending == 0


async def test_sigkill_at_random_moments_loses_and_repeats_nothing(
    bus: Bus, publisher: EventPublisher, tmp_path: Path, key: bytes, redis_prefix: str, services: list[Service]
) -> None:
    directory = tmp_path / "audit"
    service = Service(bus, directory, key, redis_prefix, HOOSH_AUDIT_SEGMENT_MAX_BYTES="4096")
    services.append(service)
    # Every ack the server receives, seen from a second connection.
    watcher = await nats.connect(NATS_URL)
    acked: set[int] = set()

    async def on_ack(msg: Any) -> None:
        tokens = msg.subject.split(".")
        if bus.stream in tokens and msg.data in (b"", b"+ACK"):
            acked.add(int(tokens[tokens.index(bus.stream) + 3]))

    await watcher.subscribe("$JS.ACK.>", cb=on_ack)
    await watcher.flush()
    published = 0
    stop_publishing = asyncio.Event()

    async def publish_steadily() -> None:
        nonlocal published
        while not stop_publishing.is_set():
            for _ in range(5):
                request_id = f"r{published}"
                await publisher.publish(
                    "inference.completed",
                    events_pb2.InferenceCompleted(request_id=request_id, model="m", pool="p"),
                    request_id,
                )
                published += 1
            await asyncio.sleep(0.005)

    rng = random.Random(11)
    feeder = asyncio.create_task(publish_steadily())
    try:
        for _ in range(3):
            await service.start()
            await service.wait_for(1)
            await asyncio.sleep(rng.uniform(0.3, 0.9))
            await service.kill()
        stop_publishing.set()
        await feeder
        await service.start()
        await service.wait_for(published)
        code, stderr = await service.stop()
        assert code == 0, stderr[-2000:]
    finally:
        stop_publishing.set()
        await watcher.close()

    found = read_entries(directory)
    assert [e["event_id"] for e in found] == [f"r{i}" for i in range(published)]  # each once, in order
    assert [e["stream_seq"] for e in found] == list(range(1, published + 1))
    assert acked <= {e["stream_seq"] for e in found}  # nothing acked was lost
    assert len(segment_files(directory)) > 3
    verified, report = await asyncio.to_thread(hoosh_verify, service, directory)
    assert verified == 0, report
    assert report["checkpoint"]["seq"] == published


async def test_a_log_behind_its_checkpoint_stops_the_service(
    bus: Bus,
    tmp_path: Path,
    key: bytes,
    keyring: Keyring,
    redis_prefix: str,
    redis_client: aioredis.Redis,
    services: list[Service],
) -> None:
    directory = tmp_path / "audit"
    service = Service(bus, directory, key, redis_prefix)
    services.append(service)
    audit_log = await AuditLog.open(directory, keyring, subject_prefix=bus.prefix)
    await audit_log.append_batch(entries(10))
    checkpoint = audit_log.checkpoint()
    audit_log.close()
    assert checkpoint is not None
    store = CheckpointStore(redis_client, service.checkpoint_key)
    await store.write(checkpoint)
    rewrite_lines(segment_files(directory)[0], lambda lines: lines[:-3])

    await service.start()
    code, stderr = await service.exited()
    assert code == 2
    assert "entries 8..10 are missing" in stderr
    assert await store.read() == checkpoint  # the evidence stays

    # An operator accepts the loss: the checkpoint is moved aside and the log goes on.
    accepting = Service(bus, directory, key, redis_prefix, HOOSH_AUDIT_ACCEPT_CHECKPOINT_LOSS="true")
    services.append(accepting)
    await accepting.start()
    reply = await accepting.wait_for(7)
    assert reply.chain_valid
    code, stderr = await accepting.stop()
    assert code == 0, stderr[-2000:]
    assert "the loss is accepted" in stderr
    moved = [k async for k in redis_client.scan_iter(match=f"{service.checkpoint_key}:superseded:*")]
    assert len(moved) == 1


async def test_production_without_publisher_keys_refuses_to_start(key: bytes, tmp_path: Path) -> None:
    env = audit_env(key, HOOSH_AUDIT_DIR=str(tmp_path / "audit"), HOOSH_AUDIT_METRICS_LISTEN="")
    del env["HOOSH_AUDIT_PUBLISHER_KEYS"]
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "hoosh_audit"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "HOOSH_AUDIT_PUBLISHER_KEYS is required outside HOOSH_ENV=development" in done.stderr


async def test_the_service_records_a_forgery_as_rejected_counts_it_and_still_verifies(
    bus: Bus, publisher: EventPublisher, tmp_path: Path, key: bytes, redis_prefix: str, services: list[Service]
) -> None:
    subject = f"{bus.prefix}.inference.completed"
    forged = events_pb2.InferenceCompleted(request_id="forged", model="m", cost_usd=0.0).SerializeToString()
    await bus.js.publish(subject, forged, headers={"Nats-Msg-Id": "forged"})
    await bus.js.publish(
        subject, forged, headers={"Nats-Msg-Id": "forged-2", SIGNATURE_HEADER: "v1:router:" + "0" * 64}
    )
    await publisher.publish("inference.completed", events_pb2.InferenceCompleted(request_id="real"), "real")
    service = Service(bus, tmp_path / "audit", key, redis_prefix)
    services.append(service)
    await service.start()
    listed = await service.wait_for(3)
    assert [(e.subject, e.event_id) for e in (await service.list()).entries] == [
        (f"{bus.prefix}.audit.rejected", "rejected:forged"),
        (f"{bus.prefix}.audit.rejected", "rejected:forged-2"),
        (subject, "real"),
    ]
    assert listed.chain_valid
    rejected = await service.list(kind="audit.rejected")
    assert rejected.total == 2 and json.loads(rejected.entries[0].payload_json)["reason"] == "missing"
    metrics = await service.metrics()
    assert metrics[("hoosh_audit_events_rejected_total", (("reason", "missing"),))] == 1
    assert metrics[("hoosh_audit_events_rejected_total", (("reason", "unknown_key"),))] == 1
    assert metrics[("hoosh_audit_events_rejected_total", (("reason", "mismatch"),))] == 0
    code, stderr = await service.stop()
    assert code == 0, stderr[-2000:]
    assert "event rejected: not signed by a known publisher" in stderr
    verified, report = await asyncio.to_thread(hoosh_verify, service, tmp_path / "audit")
    assert verified == 0, report
    assert report["entries"] == 3
