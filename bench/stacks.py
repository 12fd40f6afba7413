"""Processes under test: upstream stand-ins, hoosh (as `hoosh up` runs it), LiteLLM's proxy."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh_cli.stack import Ports, Stack, StackConfig, free_port

ROOT = Path(__file__).resolve().parents[1]
BENCH_ORG, BENCH_TEAM = "bench-org", "bench-team"
LITELLM_VERSION = "1.108.7"
LITELLM_MASTER_KEY = "sk-bench-" + "7f3a9c1e5b2d4086"


def wait_http(url: str, deadline: float, headers: dict[str, str] | None = None) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            httpx.get(url, timeout=2.0, headers=headers)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up within {deadline:.0f}s")


def peak_rss_bytes(pids: list[int]) -> int:
    """Sum of each process's peak resident set (VmHWM)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    """user + system CPU time a process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pids_by_command(fragment: str) -> list[int]:
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if fragment in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [pid], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


class Upstream:
    def __init__(self, latency_ms: float) -> None:
        self.port = free_port()
        self.latency_ms = latency_ms
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.upstream", "--port", str(self.port), "--latency-ms", str(latency_ms)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
        )
        wait_http(f"{self.base_url}/models", 30)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@dataclass
class HooshUnderTest:
    """hoosh with governance on: auth (a user key), a two-level pool chain (team -> org)."""

    stack: Stack
    config: StackConfig
    pool: str
    key: str = ""

    @property
    def headers(self) -> dict[str, str]:
        """The user key every measured request carries."""
        return {"Authorization": f"Bearer {self.key}"}

    def admin(self, method: str, path: str, body: dict[str, object]) -> dict[str, object]:
        response = httpx.request(
            method,
            f"{self.stack.base_url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.config.admin_key}"},
            timeout=30,
        )
        response.raise_for_status()
        result: dict[str, object] = response.json()
        return result

    def new_key(self, pools: list[str]) -> str:
        created = self.admin("POST", "/v1/admin/keys", {"name": f"bench-{uuid.uuid4().hex[:6]}", "pools": pools})
        return str(created["key"])

    @property
    def base_url(self) -> str:
        return f"{self.stack.base_url}/v1"

    def pids(self) -> list[int]:
        return [s.process.pid for s in self.stack.services if s.process is not None]

    def processes(self) -> dict[str, int]:
        """Every process a request touches, for CPU-per-request accounting."""
        found = {s.name: s.process.pid for s in self.stack.services if s.process is not None}
        for name in ("redis-server", "valkey-server", "nats-server"):
            pids = pids_by_command(name)
            if pids:
                found[name] = pids[0]
        return found

    async def new_pool(self, capacity: int = 10**12) -> tuple[str, str]:
        """A fresh team pool under the org, and a user key that may charge it."""
        name = f"bench-{uuid.uuid4().hex[:8]}"
        body = {"name": name, "parent": BENCH_ORG, "capacity": capacity}
        await asyncio.to_thread(self.admin, "POST", "/v1/admin/pools", body)
        return name, await asyncio.to_thread(self.new_key, [name])

    async def pool_state(self, name: str) -> budget_pb2.Pool:
        async with self.stack.channel(f"127.0.0.1:{self.config.ports.budget}") as channel:
            reply = await budget_pb2_grpc.BudgetServiceStub(channel).GetPool(
                budget_pb2.GetPoolRequest(pool=name), metadata=self.config.credentials()
            )
        return reply.pool

    @property
    def audit_file(self) -> Path:
        return self.config.state_dir / "audit" / "audit.jsonl"

    def stop(self) -> None:
        self.stack.stop()
        asyncio.run(self._cleanup())

    async def _cleanup(self) -> None:
        import nats
        import redis.asyncio as redis

        client = redis.Redis.from_url(self.config.redis_url)
        async for key in client.scan_iter(match=f"{self.config.budget_key_prefix}*"):
            await client.delete(key)
        await client.aclose()
        nc = await nats.connect(self.config.nats_url)
        try:
            await nc.jetstream().delete_stream(self.config.nats_stream)
        except Exception:
            pass
        await nc.close()


def start_hoosh(
    state_dir: Path, fast: Upstream, slow: Upstream | None, *, with_inference: bool = True
) -> HooshUnderTest:
    """hoosh as a user runs it: every service, budgets, events and audit on."""
    run_id = uuid.uuid4().hex[:8]
    state_dir.mkdir(parents=True, exist_ok=True)
    config_file = state_dir / "hoosh.yaml"
    providers = [
        f"  - {{name: fast, type: openai, base_url: '{fast.base_url}', api_key: sk-upstream, models: [bench-fast]}}"
    ]
    if slow is not None:
        providers.append(
            f"  - {{name: slow, type: openai, base_url: '{slow.base_url}', api_key: sk-upstream, models: [bench-slow]}}"
        )
    if with_inference:
        providers.append("  - {name: local, type: local, models: [smollm2-135m-instruct]}")
    # Governance on: every request reserves in its team pool and the org above it.
    config_file.write_text(
        "providers:\n"
        + "\n".join(providers)
        + "\npools:\n  - {name: default, capacity: 1000000000000}\n"
        + f"  - {{name: {BENCH_ORG}, capacity: 1000000000000000}}\n"
        + f"  - {{name: {BENCH_TEAM}, parent: {BENCH_ORG}, capacity: 1000000000000}}\n"
    )
    config = StackConfig(
        state_dir=state_dir,
        ports=Ports.free(),
        config_file=config_file,
        nats_stream=f"HOOSH_BENCH_{run_id}",
        subject_prefix=f"hoosh_bench_{run_id}",
        budget_key_prefix=f"hoosh:bench:{run_id}:",
        router_key_prefix=f"hoosh:bench:{run_id}:router:",  # under the budget prefix: one cleanup
        audit_key=secrets.token_hex(32),
        audit_consumer=f"audit_bench_{run_id}",
        with_inference=with_inference,
        admin_key="sk-hoosh-" + secrets.token_urlsafe(32),
        auth="keys",
        tenancy_key_prefix=f"hoosh:bench:{run_id}:tenancy:",
        # Tokens on the internal plane (StackConfig's default); mutual TLS as `hoosh up`
        # runs it with HOOSH_BENCH_TLS=1 (bench.ab --before-env/--after-env compare them).
        tls_dir=state_dir / "tls" if os.environ.get("HOOSH_BENCH_TLS", "") not in ("", "0") else None,
        # HOOSH_BENCH_OPEN_PLANE=1: no tokens at all, to measure what checking them costs.
        **({"internal_tokens": {}} if os.environ.get("HOOSH_BENCH_OPEN_PLANE", "") not in ("", "0") else {}),
        # HOOSH_BENCH_ROUTER_LINK=0: the edge's tunnel on a gRPC stream, not the local link.
        router_link=os.environ.get("HOOSH_BENCH_ROUTER_LINK", "1") not in ("", "0"),
        extra_env={
            "HOOSH_LOG_LEVEL": os.environ.get("HOOSH_BENCH_LOG_LEVEL", "WARNING"),
            "HOOSH_AUDIT_CHECKPOINT_PREFIX": f"hoosh:bench:{run_id}:audit:",
        },
    )
    stack = Stack(config)
    asyncio.run(stack.start(timeout=180))
    hoosh = HooshUnderTest(stack, config, BENCH_TEAM)
    hoosh.key = hoosh.new_key([BENCH_TEAM])
    return hoosh


class LiteLLM:
    """LiteLLM's proxy in its own virtual environment, routed to the same upstreams."""

    def __init__(self, state_dir: Path, fast: Upstream, slow: Upstream | None, venv: Path) -> None:
        self.port = free_port()
        litellm = venv / "bin" / "litellm"
        if not litellm.exists():
            install_litellm(venv)
        models = [
            {
                "model_name": "bench-fast",
                "litellm_params": {"model": "openai/bench-fast", "api_base": fast.base_url, "api_key": "sk-upstream"},
            }
        ]
        if slow is not None:
            models.append(
                {
                    "model_name": "bench-slow",
                    "litellm_params": {
                        "model": "openai/bench-slow",
                        "api_base": slow.base_url,
                        "api_key": "sk-upstream",
                    },
                }
            )
        config = state_dir / "litellm.yaml"
        config.write_text(json.dumps({"model_list": models, "general_settings": {"master_key": LITELLM_MASTER_KEY}}))
        env = {
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_MASTER_KEY": LITELLM_MASTER_KEY,
            "LITELLM_LOG": "ERROR",
            "DISABLE_SCHEMA_UPDATE": "true",
        }
        self.log = (state_dir / "litellm.log").open("ab")
        self.process = subprocess.Popen(
            [
                str(litellm),
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--num_workers",
                "1",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_http(f"http://127.0.0.1:{self.port}/health/liveliness", 180)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"}

    def pids(self) -> list[int]:
        return descendants(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def install_litellm(venv: Path) -> None:
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} (first run only) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            f"litellm[proxy]=={LITELLM_VERSION}",
        ],
        check=True,
    )
