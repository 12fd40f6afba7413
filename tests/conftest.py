"""Cross-service fixtures: the real hoosh stack as processes, against the real
Redis and NATS on this machine, with a fresh stream, subject prefix and key
prefix per test session, and an OpenAI-wire stand-in for the paid provider."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hoosh_cli.stack import Ports, Stack, StackConfig, free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL_MODEL = "smollm2-135m-instruct"


@dataclass
class RunningStack:
    stack: Stack
    base_url: str
    upstream_url: str
    audit_key: str
    audit_file: Path
    budget_addr: str
    key_prefix: str
    stream: str


def _wait_http(url: str, deadline: float) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@pytest.fixture(scope="session")
def upstream_url() -> Iterator[str]:
    """The OpenAI-compatible stand-in as its own process (no latency)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.upstream", "--port", str(port)], cwd=ROOT)
    try:
        _wait_http(f"http://127.0.0.1:{port}/v1/models", 20)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="session")
def hoosh(tmp_path_factory: pytest.TempPathFactory, upstream_url: str) -> Iterator[RunningStack]:
    """Every hoosh service, started the way `hoosh up` starts them."""
    state_dir = tmp_path_factory.mktemp("hoosh")
    run_id = uuid.uuid4().hex[:10]
    config_file = state_dir / "hoosh.yaml"
    config_file.write_text(
        f"""
providers:
  - name: local
    type: local
    models: [{LOCAL_MODEL}]
    default_max_tokens: 48
  - name: upstream
    type: openai
    base_url: {upstream_url}
    api_key: $HOOSH_TEST_UPSTREAM_KEY
    models: ["gpt-*", "mock-*"]
    pricing: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}
pools:
  - name: default
    capacity: 100000000
"""
    )
    audit_key = secrets.token_hex(32)
    config = StackConfig(
        state_dir=state_dir,
        ports=Ports.free(),
        config_file=config_file,
        nats_stream=f"HOOSH_TEST_{run_id}",
        subject_prefix=f"hoosh_test_{run_id}",
        budget_key_prefix=f"hoosh:test:{run_id}:",
        audit_key=audit_key,
        audit_consumer=f"audit_{run_id}",
        extra_env={"HOOSH_TEST_UPSTREAM_KEY": "sk-test-upstream"},
    )
    stack = Stack(config)
    asyncio.run(stack.start(timeout=120))
    try:
        yield RunningStack(
            stack=stack,
            base_url=stack.base_url,
            upstream_url=upstream_url,
            audit_key=audit_key,
            audit_file=state_dir / "audit" / "audit.jsonl",
            budget_addr=f"127.0.0.1:{config.ports.budget}",
            key_prefix=config.budget_key_prefix,
            stream=config.nats_stream,
        )
    finally:
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
