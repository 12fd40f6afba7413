"""``python -m hoosh_audit`` as a real process: serve, stop on SIGTERM, verify offline."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc
from hoosh.events.v1 import events_pb2
from hoosh_audit.chain import AuditLog, NewEntry
from hoosh_common.eventbus import EventPublisher, ensure_stream
from hoosh_common.grpc_server import insecure_channel

DEADLINE_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def audit_env(key: bytes, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOSH_")}
    env.update({"HOOSH_AUDIT_HMAC_KEY": key.decode(), **extra})
    return env


def run_verify(key: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hoosh_audit", "verify", *args],
        env=audit_env(key),
        capture_output=True,
        text=True,
        check=False,
    )


async def test_verify_command(log_path: Path, key: bytes) -> None:
    audit_log = await AuditLog.open(log_path, key)
    await audit_log.append_batch([NewEntry(f"r{i}", "hoosh.inference.completed", i, {"i": i}) for i in range(1, 4)])
    audit_log.close()

    ok = await asyncio.to_thread(run_verify, key, "--file", str(log_path))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {
        "file": str(log_path),
        "valid": True,
        "entries": 3,
        "first_bad_seq": 0,
        "error": "",
    }

    log_path.write_bytes(log_path.read_bytes().replace(b'"i":2', b'"i":3'))
    bad = await asyncio.to_thread(run_verify, key, "--file", str(log_path))
    assert bad.returncode == 1
    result = json.loads(bad.stdout)
    assert (result["valid"], result["entries"], result["first_bad_seq"]) == (False, 1, 2)


async def test_missing_key_stops_the_service_with_a_clear_message() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOSH_")}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "hoosh_audit"], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert "HOOSH_AUDIT_HMAC_KEY: is required" in done.stderr


async def test_service_records_events_and_stops_gracefully(bus, tmp_path: Path, key: bytes) -> None:
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    publisher = EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix)
    for i in range(5):
        await publisher.publish("inference.completed", events_pb2.InferenceCompleted(request_id=f"r{i}"), f"r{i}")

    port = free_port()
    env = audit_env(
        key,
        HOOSH_AUDIT_LISTEN=f"127.0.0.1:{port}",
        HOOSH_NATS_STREAM=bus.stream,
        HOOSH_SUBJECT_PREFIX=bus.prefix,
        HOOSH_AUDIT_DIR=str(tmp_path / "audit"),
        HOOSH_AUDIT_CONSUMER="audit-test",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hoosh_audit", env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    channel = insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = audit_pb2_grpc.AuditServiceStub(channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        total = -1
        while total < 5:
            assert loop.time() < deadline, "the service never recorded the events"
            try:
                total = (await stub.ListEntries(audit_pb2.ListEntriesRequest(), timeout=2)).total
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        listed = await stub.ListEntries(audit_pb2.ListEntriesRequest())
        assert [e.event_id for e in listed.entries] == [f"r{i}" for i in range(5)]
        assert listed.chain_valid
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="hoosh.audit.v1.AuditService")
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await channel.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b'"audit stopped"' in stderr

    ok = await asyncio.to_thread(run_verify, key, "--file", str(tmp_path / "audit" / "audit.jsonl"))
    assert ok.returncode == 0 and json.loads(ok.stdout)["entries"] == 5
    info = await bus.js.consumer_info(bus.stream, "audit-test")
    assert info.num_ack_pending == 0
