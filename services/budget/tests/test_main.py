"""``python -m hoosh_budget`` as a real process on the real Redis and NATS: pools from
the config file applied at start, ResetPool announced on the stream, its ``/metrics``
and JSON log lines, and a clean stop on SIGTERM; a bad config stops it before it binds."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh_common.grpc_server import internal_channel

from .conftest import NATS_URL, REDIS_URL, Bus, scrape

DEADLINE_S = 30.0
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def budget_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HOOSH_", "OTEL_"))}
    # No fixed metrics port: a test passes a free one when it scrapes.
    env.update({"HOOSH_REDIS_URL": REDIS_URL, "HOOSH_NATS_URL": NATS_URL, "HOOSH_BUDGET_METRICS_LISTEN": "", **extra})
    return env


async def test_bad_config_stops_the_service_before_it_binds(tmp_path: Path) -> None:
    config = tmp_path / "hoosh.yaml"
    config.write_text("pools:\n  - name: a\n    capacity: 5\n    period: yearly\n")
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "hoosh_budget"],
        env=budget_env(HOOSH_CONFIG=str(config)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "hoosh-budget: bad pools in HOOSH_CONFIG" in done.stderr and "yearly" in done.stderr


async def test_service_applies_pools_announces_resets_and_stops_gracefully(
    tmp_path: Path, prefix: str, bus: Bus
) -> None:
    config = tmp_path / "hoosh.yaml"
    config.write_text(
        "pools:\n"
        "  - name: team\n    capacity: 500\n    parent: org\n    period: minute\n"
        "  - name: org\n    capacity: 1000\n    cap_usd: 1.5\n"
    )
    port, metrics_port = free_port(), free_port()
    env = budget_env(
        HOOSH_BUDGET_LISTEN=f"127.0.0.1:{port}",
        HOOSH_BUDGET_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
        HOOSH_BUDGET_METRICS_INTERVAL_SECONDS="0.2",
        HOOSH_BUDGET_KEY_PREFIX=prefix,
        HOOSH_BUDGET_DEFAULT_CAPACITY="42",
        HOOSH_NATS_STREAM=bus.stream,
        HOOSH_SUBJECT_PREFIX=bus.prefix,
        HOOSH_CONFIG=str(config),
        HOOSH_BUDGET_EXPIRY_POLICY="release",
        HOOSH_BUDGET_REAP_INTERVAL_SECONDS="0.2",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hoosh_budget", env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    channel = internal_channel(f"127.0.0.1:{port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while True:
            assert loop.time() < deadline and proc.returncode is None, "the service never became healthy"
            try:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service="hoosh.budget.v1.BudgetService"), timeout=2
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)

        stub = budget_pb2_grpc.BudgetServiceStub(channel)
        pools = {pool.name: pool for pool in (await stub.ListPools(budget_pb2.ListPoolsRequest())).pools}
        assert sorted(pools) == ["default", "org", "team"]
        assert pools["default"].capacity == 42
        assert (pools["team"].parent, pools["team"].period, list(pools["team"].chain)) == (
            "org",
            "minute",
            ["team", "org"],
        )
        assert pools["org"].cap_usd_micros == 1_500_000

        request_metadata = (("x-request-id", "req-main-1"), ("traceparent", TRACEPARENT))
        await stub.Report(budget_pb2.ReportRequest(pool="org", actual=7), metadata=request_metadata)
        await stub.ResetPool(budget_pb2.ResetPoolRequest(name="org", key_id="key_admin"))
        # (A minute boundary may pass meanwhile: team's period event is not this one.)
        [(msg_id, event)] = [found for found in await bus.resets(1) if found[1].reason == "admin"]
        assert msg_id.startswith("reset:org:admin:") and (event.used, event.key_id) == (7, "key_admin")

        # budget_expiry_policy=release: an expired lease (a dead holder) is given back, uncharged.
        await stub.Reserve(
            budget_pb2.ReserveRequest(pool="org", tokens=30, reservation_id="dead", lease_seconds=1, kind="chat")
        )
        while True:
            org = (await stub.GetPool(budget_pb2.GetPoolRequest(pool="org"))).pool
            if org.reserved == 0:
                break
            assert loop.time() < deadline, "the reaper never settled the expired lease"
            await asyncio.sleep(0.1)
        assert org.used == 0
        ended = await stub.Commit(budget_pb2.CommitRequest(reservation_id="dead", used_tokens=30, pool="org"))
        assert (ended.already_ended, ended.state) == (True, "expired")

        # /metrics of the process: the pools as configured, and exactly the calls made.
        while True:
            samples = await scrape(metrics_port)
            if (
                samples.get_value("hoosh_pool_used_tokens", pool="org") == 0
                and samples.get_value("hoosh_budget_open_reservations") == 0
            ):
                break
            assert loop.time() < deadline, "the pool snapshot never caught up"
            await asyncio.sleep(0.1)
        assert samples.get_value("hoosh_pool_capacity_tokens", pool="org", parent="", period="none") == 1000
        assert samples.get_value("hoosh_pool_capacity_tokens", pool="team", parent="org", period="minute") == 500
        assert samples.get_value("hoosh_pool_capacity_tokens", pool="default", parent="", period="none") == 42
        assert samples.get_value("hoosh_pool_capacity_usd_micros", pool="org") == 1_500_000
        assert samples.get_value("hoosh_budget_pools") == 3
        for operation, result, count in (
            ("list_pools", "ok", 1),
            ("report", "ok", 1),
            ("reset_pool", "ok", 1),
            ("reserve", "ok", 1),
            ("commit", "already_ended", 1),
        ):
            assert samples.get_value("hoosh_budget_operations_total", operation=operation, result=result) == count
        assert samples.get_value("hoosh_events_healthy", service="budget") == 1
    finally:
        await channel.close()
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), DEADLINE_S)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    # The Report's log line carries the caller's request id and trace id.
    entries = [orjson.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    [report] = [entry for entry in entries if entry.get("operation") == "report"]
    assert (report["msg"], report["level"], report["service"]) == ("budget admin action", "info", "budget")
    assert (report["request_id"], report["trace_id"], report["pool"]) == ("req-main-1", TRACE_ID, "org")
    assert any(entry["msg"] == "metrics listening" for entry in entries)
