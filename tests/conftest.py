"""Cross-service fixtures: the real hoosh stack as processes, against the real
Redis and NATS on this machine, with a fresh stream, subject prefix and key
prefix per test session, and stand-ins speaking the paid providers' wire formats
(OpenAI, Anthropic, Gemini)."""

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

import grpc
import httpx
import pytest
from hoosh_cli.stack import Ports, Stack, StackConfig, free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL_MODEL = "smollm2-135m-instruct"
STT_MODEL = "whisper-tiny.en"
STT_WORKERS = 1
STT_MAX_QUEUE = 3
STT_PRICE_PER_MINUTE_USD = "0.006"

# The providers and routes test_providers_e2e.py exercises (after `local` and `upstream`).
PROVIDERS_YAML = """
  - name: anthropic
    type: anthropic
    base_url: {stand_ins.anthropic}
    api_key: $HOOSH_TEST_UPSTREAM_KEY
    models: ["claude-*"]
    pricing: {{input_per_mtok: 0.8, output_per_mtok: 4}}
  - name: gemini
    type: gemini
    base_url: {stand_ins.gemini}/v1beta
    api_key: $HOOSH_TEST_UPSTREAM_KEY
    models: ["gemini-*"]
    embedding_models: ["text-embedding-004", "gemini-embedding-*"]
  - name: flaky
    type: openai
    base_url: {stand_ins.flaky}/v1
    api_key: sk-flaky
    breaker: {{failure_threshold: 3, cooldown_seconds: 3}}
  - name: down
    type: openai
    base_url: {stand_ins.down}/v1
    api_key: sk-down
  - name: rl-shared
    type: openai
    base_url: {upstream_url}
    api_key: sk-limited
    models: ["limited-*"]
    rpm: 60
  - name: rl-one
    type: openai
    base_url: {upstream_url}
    api_key: sk-limited
    rpm: 1
  - name: rl-solo
    type: openai
    base_url: {upstream_url}
    api_key: sk-limited
    models: ["solo-*"]
    rpm: 1
  - name: native
    type: openai
    base_url: {upstream_url}
    api_key: $HOOSH_TEST_UPSTREAM_KEY
    models: ["native-*"]
    responses_api: native
    pricing: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}
routes:
  - match: "breaker-*"
    targets: [{{provider: flaky, priority: 1}}, {{provider: upstream, priority: 2}}]
  - match: "fallback-*"
    targets: [{{provider: down, priority: 1}}, {{provider: upstream, priority: 2}}]
  - match: "ratefall-*"
    targets: [{{provider: rl-one, priority: 1}}, {{provider: upstream, priority: 2}}]
  - match: "nativefall-*"
    targets: [{{provider: down, priority: 1}}, {{provider: native, model: native-mapped, priority: 2}}]
  - match: "nativeback-*"
    targets:
      - {{provider: native, model: native-fail-503, priority: 1}}
      - {{provider: upstream, model: gpt-4o-mini, priority: 2}}
routing:
  retry: {{max_attempts: 3, backoff_base_ms: 20, backoff_max_ms: 200}}
health:
  failure_threshold: 1000  # only `flaky` (3) may open in the shared stack
  probe_interval_seconds: 1
"""


@dataclass
class RunningStack:
    stack: Stack
    base_url: str
    upstream_url: str
    audit_key: str
    audit_file: Path
    budget_addr: str
    stt_addr: str
    key_prefix: str
    stream: str
    admin_key: str = ""
    router_addr: str = ""
    stack_config: StackConfig | None = None
    stand_ins: StandIns | None = None

    def channel(self, address: str) -> grpc.aio.Channel:
        """A channel to one of the stack's gRPC services (mutual TLS when the stack has it)."""
        return self.stack.channel(address)

    def credentials(self, service: str = "edge") -> tuple[tuple[str, str], ...]:
        """Call metadata that lets a direct call through as ``service``."""
        return self.stack.config.credentials(service)


def admin_headers(hoosh: RunningStack) -> dict[str, str]:
    """The bootstrap admin key, for the admin-only routes."""
    return {"Authorization": f"Bearer {hoosh.admin_key}"}


@dataclass
class StandIns:
    """Root URLs of the provider stand-ins (``/control`` lives there)."""

    anthropic: str
    gemini: str
    flaky: str  # an OpenAI-wire stand-in the breaker tests switch on and off
    down: str  # nothing listens here


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
def stand_ins() -> Iterator[StandIns]:
    """Anthropic, Gemini and a second OpenAI stand-in, each its own process."""
    processes: list[subprocess.Popen[bytes]] = []
    urls: dict[str, str] = {}
    try:
        for name, dialect, probe in (
            ("anthropic", "anthropic", "/control/stats"),
            ("gemini", "gemini", "/control/stats"),
            ("flaky", "openai", "/v1/models"),
        ):
            port = free_port()
            command = [sys.executable, "-m", "bench.upstream", "--port", str(port), "--dialect", dialect]
            processes.append(subprocess.Popen(command, cwd=ROOT))
            urls[name] = f"http://127.0.0.1:{port}"
            _wait_http(urls[name] + probe, 20)
        yield StandIns(**urls, down=f"http://127.0.0.1:{free_port()}")
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


@pytest.fixture(scope="session")
def hoosh(tmp_path_factory: pytest.TempPathFactory, upstream_url: str, stand_ins: StandIns) -> Iterator[RunningStack]:
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
    embedding_models: ["text-embedding-*"]
    pricing: {{input_per_mtok: 0.15, output_per_mtok: 0.6}}
{PROVIDERS_YAML.format(upstream_url=upstream_url, stand_ins=stand_ins)}
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
        router_key_prefix=f"hoosh:test:{run_id}:router:",  # under the budget prefix: one cleanup
        audit_key=audit_key,
        audit_consumer=f"audit_{run_id}",
        # As `hoosh up` runs: open on loopback for keyless requests, keys still checked and
        # scoped when presented, admin routes only with the admin key.
        admin_key="sk-hoosh-" + secrets.token_urlsafe(32),
        auth="open",
        # The internal plane as `hoosh up` runs it: mutual TLS from a development CA and
        # a token per calling service (fresh ones, StackConfig's default).
        tls_dir=state_dir / "tls",
        tenancy_key_prefix=f"hoosh:test:{run_id}:tenancy:",  # under the budget prefix: one cleanup
        extra_env={
            "HOOSH_TEST_UPSTREAM_KEY": "sk-test-upstream",
            # One transcription at a time and three waiting: test_stt_e2e fills the queue.
            "HOOSH_STT_WORKERS": str(STT_WORKERS),
            "HOOSH_STT_MAX_QUEUE": str(STT_MAX_QUEUE),
            # The local Whisper priced like OpenAI's whisper-1, so transcriptions have a cost.
            "HOOSH_STT_PRICE_PER_MINUTE_USD": STT_PRICE_PER_MINUTE_USD,
            # The audit's checkpoint under the run's prefix: the cleanup removes it.
            "HOOSH_AUDIT_CHECKPOINT_PREFIX": f"hoosh:test:{run_id}:audit:",
            # Stored responses (/v1/responses) under the run's prefix too.
            "HOOSH_RESPONSES_KEY_PREFIX": f"hoosh:test:{run_id}:responses:",
        },
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
            stt_addr=f"127.0.0.1:{config.ports.stt}",
            key_prefix=config.budget_key_prefix,
            stream=config.nats_stream,
            router_addr=f"127.0.0.1:{config.ports.router}",
            admin_key=config.admin_key,
            stack_config=config,
            stand_ins=stand_ins,
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
