"""NATS away for two minutes under load, and a router killed with SIGKILL meanwhile:
every request a client was served is in the audit log exactly once, and the log
verifies (issue 10). The stack runs against a NATS of the test's own, which the test
stops and starts again with the same store."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis
from hoosh_audit.chain import verify
from hoosh_cli.stack import Ports, Stack, StackConfig

from .test_outbox_crash import OwnNats

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 120.0
RATE = 50.0  # requests per second, throughout
KILL_AFTER = 40.0  # seconds into the outage: the router is SIGKILLed, its outbox full of events


def audited(audit_dir: Path) -> Counter[str]:
    """How many entries each request id has among the inference events in the log."""
    counts: Counter[str] = Counter()
    for segment in sorted(audit_dir.glob("seg-*.jsonl")):
        for line in segment.read_text().splitlines():
            entry = json.loads(line)
            if entry["subject"].endswith((".inference.completed", ".inference.failed")):
                counts[entry["event_id"]] += 1
    return counts


async def test_nats_away_two_minutes_and_a_router_killed_lose_no_served_request(
    tmp_path: Path, upstream_url: str
) -> None:
    nats = OwnNats(tmp_path / "nats")
    nats.start()
    run_id = uuid.uuid4().hex[:8]
    config_file = tmp_path / "hoosh.yaml"
    config_file.write_text(
        "providers:\n"
        f"  - {{name: upstream, type: openai, base_url: '{upstream_url}', api_key: sk-test, models: ['gpt-*']}}\n"
        "pools:\n  - {name: default, capacity: 1000000000}\n"
    )
    config = StackConfig(
        state_dir=tmp_path / "stack",
        ports=Ports.free(),
        config_file=config_file,
        nats_url=nats.url,
        nats_stream=f"HOOSH_OUTAGE_{run_id}",
        subject_prefix=f"hoosh_outage_{run_id}",
        budget_key_prefix=f"hoosh:outage:{run_id}:",
        router_key_prefix=f"hoosh:outage:{run_id}:router:",
        audit_key=secrets.token_hex(32),
        audit_consumer=f"audit_{run_id}",
        tenancy_key_prefix=f"hoosh:outage:{run_id}:tenancy:",
        with_inference=False,
        with_stt=False,
    )
    stack = Stack(config)
    served: list[str] = []
    refused = 0
    try:
        await stack.start(timeout=120)
        router = next(service for service in stack.services if service.name == "router")
        stop = asyncio.Event()

        async def one(client: httpx.AsyncClient) -> None:
            nonlocal refused
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            try:
                response = await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError:
                refused += 1
                return
            if response.status_code == 200:
                served.append(response.headers["x-request-id"])
            else:
                refused += 1

        async def load() -> None:
            async with httpx.AsyncClient(base_url=stack.base_url, timeout=15) as client:
                tasks: set[asyncio.Task[None]] = set()
                while not stop.is_set():
                    task = asyncio.create_task(one(client))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    await asyncio.sleep(1 / RATE)
                await asyncio.gather(*tasks)

        loader = asyncio.create_task(load())
        await asyncio.sleep(3)
        nats.stop()  # NATS away: events go to the router's outbox
        await asyncio.sleep(KILL_AFTER)
        served_in_outage = len(served)
        assert router.process is not None
        router.process.kill()  # no chance to publish or settle anything
        router.process.wait(10)
        await asyncio.sleep(OUTAGE_SECONDS - KILL_AFTER)
        nats.start()  # the same store: the stream is still there
        env = {**os.environ, **config.environment("router")}
        with open(stack.log_dir / "router-restarted.log", "ab") as log_file:
            router.process = subprocess.Popen(
                [sys.executable, "-m", "hoosh_router"], env=env, stdout=log_file, stderr=subprocess.STDOUT
            )
        await stack._wait_healthy(router, 60)  # its outbox, left by the killed one, drains
        await asyncio.sleep(5)
        stop.set()
        await loader
        assert served_in_outage > RATE * KILL_AFTER * 0.5  # the outage really was under load

        audit_dir = config.state_dir / "audit"
        deadline = time.monotonic() + 90
        counts = audited(audit_dir)
        while any(counts[request_id] < 1 for request_id in served) and time.monotonic() < deadline:
            await asyncio.sleep(1)
            counts = audited(audit_dir)
        missing = [request_id for request_id in served if counts[request_id] < 1]
        assert not missing, f"{len(missing)} of {len(served)} served requests are not in the audit log"
        assert all(counts[request_id] == 1 for request_id in served)
        assert max(counts.values()) == 1  # nothing recorded twice
        result = verify(audit_dir, config.audit_key.encode())
        assert result.valid, result
    finally:
        stack.stop()
        nats.stop()
        client = redis.Redis.from_url(config.redis_url)
        for key in client.scan_iter(match=f"{config.budget_key_prefix}*", count=1000):
            client.delete(key)
        client.close()
