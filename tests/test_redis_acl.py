"""Redis with one ACL user per service, against a real redis-server of the test's own.

The ACL comes from the two places it is deployed from: deploy/redis/users.acl rendered
by deploy/redis/render-acl.sh (docker compose) and the users of
deploy/helm/valkey-values.yaml written the way Valkey's chart writes them. Each
service's real code (the budget store, the key limiter, the key store and cache, the
router's breakers, provider limits and cache, stt's reservations, the audit's
checkpoints) works with its own user, and no user reaches the keys of another.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
import yaml
from hoosh.router.v1 import router_pb2
from hoosh_audit.checkpoint import Checkpoint, CheckpointStore, checkpoint_key, read_checkpoint_sync
from hoosh_audit.keys import Keyring
from hoosh_cli.stack import free_port
from hoosh_edge.responses_store import ResponsesStore, StoredResponse
from hoosh_metering import connect_redis
from hoosh_metering.limits import KeyLimiter, KeyLimits
from hoosh_metering.pools import BudgetStore, LedgerLine, PoolSpec
from hoosh_router.cache import ResponseCache
from hoosh_router.config import CacheConfig, HealthConfig, ProviderConfig
from hoosh_router.health import HealthBoard
from hoosh_router.ratelimit import RateLimiter
from hoosh_stt.budget import SttBudget
from hoosh_tenancy import KeyCache, KeyStore, TenancyUnavailable
from hoosh_tenancy import connect_redis as connect_key_store
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

ROOT = Path(__file__).resolve().parents[1]
ACL_SOURCE = ROOT / "deploy" / "redis" / "users.acl"
RENDER = ROOT / "deploy" / "redis" / "render-acl.sh"
VALKEY_VALUES = ROOT / "deploy" / "helm" / "valkey-values.yaml"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

USERS = ("ops", "edge", "router", "budget", "stt", "audit")
# The compose services whose HOOSH_REDIS_URL names a user, and which one.
COMPOSE_USERS = {
    "edge": "edge",
    "router": "router",
    "budget": "budget",
    "stt": "stt",
    "stt-gpu": "stt",
    "audit": "audit",
}
PASSWORDS = {user: secrets.token_hex(16) for user in USERS}

BUDGET = "hoosh:budget:"
TENANCY = "hoosh:tenancy:"
ROUTER = "hoosh:router:"
AUDIT = "hoosh:audit:"
RESPONSES = "hoosh:responses:"


# ------------------------------------------------------------------ the two ACL files


def render_compose_acl(target: Path, passwords: dict[str, str] = PASSWORDS) -> subprocess.CompletedProcess[str]:
    """deploy/redis/render-acl.sh, as the compose redis service runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_PASSWORD_")}
    env.update({f"REDIS_PASSWORD_{user.upper()}": password for user, password in passwords.items()})
    return subprocess.run(["sh", str(RENDER), str(ACL_SOURCE), str(target)], env=env, capture_output=True, text=True)


def render_helm_acl(target: Path) -> None:
    """The ACL file Valkey's chart (0.11) writes from auth.aclUsers: one line per user,
    ``user <name> on #<sha256 of the password> <permissions>``, the password read from
    auth.usersExistingSecret under ``passwordKey``."""
    auth = yaml.safe_load(VALKEY_VALUES.read_text())["auth"]
    assert auth["enabled"] is True and auth["usersExistingSecret"] == "hoosh-secrets"
    lines = []
    for name, user in auth["aclUsers"].items():
        key = user["passwordKey"]
        assert key.startswith("redis-password-"), key
        password = PASSWORDS[key.removeprefix("redis-password-")]
        digest = hashlib.sha256(password.encode()).hexdigest()
        lines.append(f"user {name} on #{digest} {user['permissions']}")
    target.write_text("\n".join(lines) + "\n")


class AclRedis:
    """redis-server on a free loopback port with an ACL file."""

    def __init__(self, directory: Path, acl_file: Path) -> None:
        self.directory = directory
        self.acl_file = acl_file
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, user: str, password: str | None = None) -> str:
        return f"redis://{user}:{PASSWORDS[user] if password is None else password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.directory), "--aclfile", str(self.acl_file),
        ]  # fmt: skip
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.directory / 'redis.log').read_text()[-2000:]}")
            with contextlib.suppress(redis.exceptions.ConnectionError), self.sync("ops") as client:
                if client.ping():
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server with the ACL did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def sync(self, user: str, password: str | None = None) -> redis.Redis:
        return redis.Redis.from_url(self.url(user, password), socket_timeout=5)

    def rules(self) -> dict[str, list[str]]:
        """ACL LIST without the password hashes, by user: what each may do (the rules
        sorted: every user's are one -@all, then grants only)."""
        with self.sync("ops") as client:
            listed = client.acl_list()
        return {
            line.split()[1]: sorted(token for token in line.split()[2:] if not re.fullmatch(r"#[0-9a-f]{64}", token))
            for line in listed
        }


@contextlib.contextmanager
def acl_redis(directory: Path, source: str) -> Iterator[AclRedis]:
    directory.mkdir(parents=True, exist_ok=True)
    acl_file = directory / "users.acl"
    if source == "compose":
        rendered = render_compose_acl(acl_file)
        assert rendered.returncode == 0, rendered.stderr
    else:
        render_helm_acl(acl_file)
    server = AclRedis(directory, acl_file)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module", params=["compose", "helm"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    with acl_redis(tmp_path_factory.mktemp(f"redis-acl-{request.param}"), request.param) as started:
        yield started


@pytest.fixture(autouse=True)
def _empty(request: pytest.FixtureRequest) -> None:
    if "server" in request.fixturenames:
        with request.getfixturevalue("server").sync("ops") as client:
            client.flushall()


@pytest.fixture
async def clients(server: AclRedis) -> AsyncIterator[dict[str, aioredis.Redis]]:
    """One client per user, made the way the services make theirs (hoosh_metering's)."""
    made = {user: connect_redis(server.url(user)) for user in USERS}
    try:
        yield made  # type: ignore[misc]
    finally:
        for client in made.values():
            await client.aclose()


async def provision(client: aioredis.Redis) -> BudgetStore:
    """The budget service's store (its own user) with a small tree: org > team, and two
    roots whose names start with k (the budget user's patterns must cover them)."""
    store = BudgetStore(client, BUDGET, 30)
    await store.start()
    await store.ensure_pool(PoolSpec("org", 10_000))
    await store.ensure_pool(PoolSpec("team", 5_000, parent="org"))
    await store.ensure_pool(PoolSpec("k", 100))
    await store.ensure_pool(PoolSpec("kitchen", 100, period="daily"))
    return store


async def hears_pool_changes(client: aioredis.Redis) -> None:
    """The store's directory listener can subscribe to the pool change notices."""
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(f"{BUDGET}changes")
        confirmed = await pubsub.get_message(timeout=2)
        assert confirmed is not None and confirmed["type"] == "subscribe", confirmed
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


async def refused(call: object) -> str:
    """The NOPERM a call ends with."""
    with pytest.raises(NoPermissionError) as caught:
        await call  # type: ignore[misc]
    return str(caught.value)


# ------------------------------------------------------------------ the files agree


def test_the_chart_grants_exactly_what_compose_grants(tmp_path: Path) -> None:
    with acl_redis(tmp_path / "compose", "compose") as compose, acl_redis(tmp_path / "helm", "helm") as helm:
        assert compose.rules() == helm.rules()
        assert set(compose.rules()) == {"default", *USERS}


def test_compose_gives_each_service_its_own_user_and_password() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    redis_env = services["redis"]["environment"]
    acl_users = {line.split()[1] for line in ACL_SOURCE.read_text().splitlines() if line.startswith("user ")}
    assert acl_users == {"default", *USERS}
    # The server gets every user's password, each required (compose refuses to start without).
    for user in USERS:
        name = f"REDIS_PASSWORD_{user.upper()}"
        assert redis_env[name].startswith(f"${{{name}:?"), redis_env[name]
    for service, user in COMPOSE_USERS.items():
        url = services[service]["environment"]["HOOSH_REDIS_URL"]
        name = f"REDIS_PASSWORD_{user.upper()}"
        assert re.fullmatch(rf"redis://{user}:\$\{{{name}:\?[^}}]+\}}@redis:6379/0", url), (service, url)
    # No other service carries a Redis URL (local-inference has no Redis).
    with_redis = {name for name, svc in services.items() if "HOOSH_REDIS_URL" in (svc.get("environment") or {})}
    assert with_redis == set(COMPOSE_USERS)
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    for user in USERS:
        assert example[f"REDIS_PASSWORD_{user.upper()}"].strip(), user


def test_render_refuses_a_missing_password(tmp_path: Path) -> None:
    target = tmp_path / "users.acl"
    missing = render_compose_acl(target, {u: p for u, p in PASSWORDS.items() if u != "stt"})
    assert missing.returncode != 0 and "REDIS_PASSWORD_STT" in missing.stderr
    spaced = render_compose_acl(target, {**PASSWORDS, "edge": "two words"})
    assert spaced.returncode != 0
    assert not target.exists()


# ------------------------------------------------------------------ who may connect


def test_no_credentials_a_wrong_password_or_an_unknown_user_get_nothing(server: AclRedis) -> None:
    with redis.Redis(port=server.port, socket_timeout=5) as anonymous, pytest.raises(AuthenticationError):
        anonymous.ping()
    with server.sync("router", "not-the-password") as wrong, pytest.raises(AuthenticationError):
        wrong.ping()
    with (
        redis.Redis.from_url(f"redis://intruder:{PASSWORDS['ops']}@127.0.0.1:{server.port}/0") as unknown,
        pytest.raises(AuthenticationError),
    ):
        unknown.ping()
    # A service's password is its own: edge's does not open router.
    with server.sync("router", PASSWORDS["edge"]) as swapped, pytest.raises(AuthenticationError):
        swapped.ping()


@pytest.mark.parametrize("user", ["edge", "router", "budget", "stt", "audit"])
def test_no_service_user_can_administer_the_server(server: AclRedis, user: str) -> None:
    with server.sync(user) as client:
        for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*"), ("ACL", "LIST")):
            with pytest.raises(NoPermissionError):
                client.execute_command(*command)
        with pytest.raises(NoPermissionError):
            client.execute_command("FUNCTION", "FLUSH")
        with pytest.raises(NoPermissionError):
            client.execute_command("SCRIPT", "FLUSH")


# ------------------------------------------------------------------ budget


async def test_budget_runs_the_pools_with_its_own_user(clients: dict[str, aioredis.Redis]) -> None:
    store = await provision(clients["budget"])
    try:
        held = await store.reserve("team", 100, "r-1", completion_tokens=50, owner="key_1", kind="chat")
        assert held.chain == ("team", "org")
        await store.renew("r-1", pool="team")
        await store.commit(
            "r-1", 120, pool="team", owner="key_1", kind="chat", ledger=LedgerLine("local", "m", 100, 20)
        )
        await store.reserve("k", 10, "r-2")
        await store.release("r-2", pool="k")
        await store.report("kitchen", 7, report_id="rep-1")
        assert (await store.check("org", 1)).allowed
        assert (await store.get_pool("org")).used == 120
        today = datetime.now(UTC).date()
        assert sum(line.prompt_tokens for line in await store.costs(today, today)) >= 100  # the ledger is read
        state = await store.read_state()
        assert {pool.name for pool in state.pools} >= {"org", "team", "k", "kitchen"}
        await store.roll_periods()
        await store.reap_expired()
        await store.reset_pool("kitchen")
        await store.update_pool("team", capacity=6_000)
        await store.delete_pool("kitchen")
        assert {view.name for view in await store.list_pools()} == {"org", "team", "k"}
        await hears_pool_changes(clients["budget"])
    finally:
        await store.close()


async def test_budget_cannot_touch_key_limits_key_records_or_checkpoints(
    clients: dict[str, aioredis.Redis],
) -> None:
    budget = clients["budget"]
    limiter = KeyLimiter(budget, BUDGET)
    await refused(limiter.admit("key_1", "req-1", KeyLimits(rpm=10), 1))
    await refused(budget.hset(f"{BUDGET}{{k:key_1}}:w:1", "r", 1))
    await refused(budget.get(f"{TENANCY}version"))
    await refused(budget.get(f"{AUDIT}HOOSH_EVENTS:audit:checkpoint"))
    await refused(budget.hset(f"{ROUTER}health:openai", "state", "open"))


# ------------------------------------------------------------------ router


def provider(name: str, **limits: int) -> ProviderConfig:
    return ProviderConfig(name=name, type="openai", base_url="http://127.0.0.1:9", models=["*"], **limits)


async def test_router_reserves_limits_and_keeps_its_state_with_its_own_user(
    server: AclRedis, clients: dict[str, aioredis.Redis]
) -> None:
    owner = await provision(clients["budget"])
    await owner.close()
    router = clients["router"]
    store = BudgetStore(router, BUDGET, 30)
    await store.start()
    try:
        # The budget in process: reserve, renew, commit, release, in the tree and its root.
        held = await store.reserve(
            "team", 100, "chat-1", completion_tokens=200, min_completion_tokens=1, owner="key_1", kind="chat"
        )
        assert held.chain == ("team", "org") and held.completion_tokens == 200
        assert await store.renew("chat-1", pool="team") is not None
        await store.commit("chat-1", 150, pool="team", owner="key_1", kind="chat", ledger=LedgerLine("p", "m", 100, 50))
        await store.reserve("org", 10, "chat-2", owner="key_1", kind="chat")
        await store.release("chat-2", pool="org", owner="key_1", kind="chat")
        assert (await store.get_pool("team")).used == 150
        assert await store.chain("kitchen") == ("kitchen",)
        await hears_pool_changes(router)
        # ... but not the directory: no pool is created or changed from here.
        await refused(store.create_pool(PoolSpec("rogue", 10**9)))
        await refused(router.hset(f"{BUDGET}pools", "rogue", "{}"))
        await refused(router.publish(f"{BUDGET}changes", "team"))
    finally:
        await store.close()

    # The key's own limits at admission.
    limiter = KeyLimiter(router, BUDGET)
    limits = KeyLimits(rpm=100, tpm=10_000, max_concurrency=2)
    await limiter.admit("key_1", "req-1", limits, 300)
    await limiter.finish("key_1", "req-1", limits, estimated_tokens=300, actual_tokens=120)

    # Breakers: the failure script counts in Redis (not only in memory).
    openai = provider("openai", rpm=100, tpm=100_000)
    board = HealthBoard(router, ROUTER, [(openai, object())], HealthConfig(failure_threshold=2))  # type: ignore[list-item]
    await board.record_failure("openai", "boom")
    await board.record_failure("openai", "boom")
    await board.sync()
    assert board.state_of("openai") == "open"
    await board.record_success("openai", 12.0)
    with server.sync("ops") as ops:
        assert ops.hget(board.key("openai"), "state") == b"closed"

    # Provider limits: admitted from Redis (window -1 would mean "Redis refused, admitted blind").
    limiter_rl = RateLimiter(router, ROUTER)
    admission = await limiter_rl.admit(openai, 500)
    assert admission.allowed and admission.window >= 0
    limiter_rl.correct(openai, admission, 500, 200)
    await limiter_rl.drain()
    with server.sync("ops") as ops:
        assert ops.hget(limiter_rl.key("openai"), f"t:{admission.window}") == b"200"

    # The response cache: stored, found, counted (stats SCANs the entries).
    cache = ResponseCache(router, ROUTER, CacheConfig())
    request = router_pb2.ChatRequest(model="m", pool="team")
    key = cache.key(request)
    cache.put(key, router_pb2.ChatResponse(id="x", model="m"))
    await cache.drain()
    found = await cache.get(key)
    assert found is not None and found.model == "m"
    stats = await cache.stats()
    assert (stats.entries, stats.hits, stats.stores) == (1, 1, 1)


async def test_router_cannot_read_key_records_or_checkpoints(clients: dict[str, aioredis.Redis]) -> None:
    router = clients["router"]
    await refused(router.get(f"{TENANCY}key:{'0' * 64}"))
    await refused(router.hvals(f"{TENANCY}ids"))
    await refused(router.get(f"{AUDIT}HOOSH_EVENTS:audit:checkpoint"))
    pubsub = router.pubsub()
    try:
        await pubsub.subscribe(f"{TENANCY}changes")  # the refusal is the reply, read next
        await refused(pubsub.get_message(timeout=2))
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------ stt


async def test_stt_reserves_transcriptions_with_its_own_user(clients: dict[str, aioredis.Redis]) -> None:
    owner = await provision(clients["budget"])
    await owner.close()
    stt = clients["stt"]
    store = BudgetStore(stt, BUDGET, 30)
    await store.start()
    budget = SttBudget(store, 30)
    try:
        assert await budget.reserve("team", 600, "tr-1", owner="key_1", price_micros_per_mtok=1_000) == ("team", "org")
        await budget.commit("tr-1", 500, pool="team", owner="key_1", usd_micros=1)
        await budget.reserve("team", 100, "tr-2", owner="key_1")
        await budget.release("tr-2", pool="team", owner="key_1")
        assert budget.retrying == 0  # nothing left to retry: both ended in Redis
        assert (await store.get_pool("org")).used == 500
        await hears_pool_changes(stt)
        await KeyLimiter(stt, BUDGET).admit("key_1", "tr-3", KeyLimits(tpm=10_000), 600)
        await refused(store.create_pool(PoolSpec("rogue", 1)))
        await refused(stt.hset(f"{ROUTER}health:openai", "state", "open"))
        await refused(stt.get(f"{TENANCY}version"))
    finally:
        await budget.close()
        await store.close()


# ------------------------------------------------------------------ edge


async def test_edge_keeps_the_key_records_and_limits_with_its_own_user(
    server: AclRedis, clients: dict[str, aioredis.Redis]
) -> None:
    edge_store_client = connect_key_store(server.url("edge"))
    store = KeyStore(edge_store_client, TENANCY)
    cache = KeyCache(store, reload_seconds=0.2)
    try:
        assert await cache.start() and cache.fresh  # subscribed to the notices and loaded
        record, key = await store.create(name="team-a", pools=["team"], rpm=10)
        await store.update(record.id, name="team-a2")
        assert (await store.get(record.id)).name == "team-a2"
        for _ in range(100):  # the change notice reaches the cache
            if await cache.authenticate(key) is not None:
                break
            await asyncio.sleep(0.05)
        assert await cache.authenticate(key) is not None
        await store.revoke(record.id)
        assert [r.id for r in await store.list()] == [record.id]
        version, changed = await store.changed_since(0)
        assert version >= 3 and changed
        # /v1/tokens/reserve: the key's own limits.
        limiter = KeyLimiter(clients["edge"], BUDGET)
        limits = KeyLimits(rpm=5, tpm=1_000, max_concurrency=1)
        await limiter.admit(record.id, "res-1", limits, 100)
        await limiter.finish(record.id, "res-1", limits, estimated_tokens=100, actual_tokens=100)
    finally:
        await cache.close()
        await edge_store_client.aclose()


async def test_edge_keeps_stored_responses_with_its_own_user(clients: dict[str, aioredis.Redis]) -> None:
    """/v1/responses: save (SET with EX), load (GET), delete (GET, DEL) under the default
    prefix; no other service user reads them."""
    store = ResponsesStore(clients["edge"], RESPONSES, 60)
    stored = StoredResponse("key_1", {"id": "resp_acl", "object": "response"}, [{"id": "msg_1"}], [{"id": "msg_1"}])
    await store.save(stored)
    loaded = await store.load("resp_acl", "key_1")
    assert loaded is not None and loaded.response["id"] == "resp_acl"
    assert await store.load("resp_acl", "key_2") is None
    assert 0 < await clients["ops"].ttl(f"{RESPONSES}resp_acl") <= 60
    for user in ("router", "budget", "stt", "audit"):
        await refused(clients[user].get(f"{RESPONSES}resp_acl"))
    assert not await store.delete("resp_acl", "key_2")
    assert await store.delete("resp_acl", "key_1")
    assert await store.load("resp_acl", "key_1") is None


async def test_edge_cannot_touch_pools_even_from_lua(clients: dict[str, aioredis.Redis]) -> None:
    owner = await provision(clients["budget"])
    await owner.close()
    edge = clients["edge"]
    pool_key = f"{BUDGET}{{org}}:pool:org"
    await refused(edge.hset(pool_key, "capacity", 10**12))
    # A script is checked command by command, keys included, even a key it did not
    # declare in KEYS (the budget scripts build theirs from ARGV): NOPERM, nothing written.
    with pytest.raises(ResponseError, match="can't access at least one of the keys"):
        await edge.eval("return redis.call('HSET', ARGV[1], 'capacity', ARGV[2])", 0, pool_key, 10**12)
    # Declared in KEYS, it is refused before the script runs.
    await refused(edge.eval("return redis.call('HSET', KEYS[1], 'capacity', ARGV[1])", 1, pool_key, 10**12))
    store = BudgetStore(edge, BUDGET, 30)
    await refused(store.reserve("team", 1, "steal"))
    await refused(edge.get(f"{AUDIT}HOOSH_EVENTS:audit:checkpoint"))
    await refused(edge.hset(f"{ROUTER}cache:{{0}}:stats", "hits", 1))
    assert (await owner.get_pool("org")).capacity == 10_000


# ------------------------------------------------------------------ audit


async def test_audit_keeps_its_checkpoints_with_its_own_user(
    server: AclRedis, clients: dict[str, aioredis.Redis]
) -> None:
    keyring = Keyring.single(b"k" * 32)
    key = checkpoint_key(AUDIT, "HOOSH_EVENTS", "audit")
    store = CheckpointStore(clients["audit"], key)
    assert await store.read() is None
    first = Checkpoint.sign(keyring, seq=1, mac="ab" * 32, segment="seg-000000000001.jsonl", ts_ms=1)
    await store.write(first)
    await store.write(Checkpoint.sign(keyring, seq=2, mac="cd" * 32, segment="seg-000000000001.jsonl", ts_ms=2))
    assert (await store.read()) is not None
    # `hoosh audit verify` reads it with the same user.
    stored = read_checkpoint_sync(server.url("audit"), key)
    assert stored is not None and stored.seq == 2
    archived = await store.archive(uuid.uuid4().hex)
    assert archived is not None and archived.startswith(key)
    assert await store.read() is None


async def test_audit_cannot_read_api_keys_or_pools(clients: dict[str, aioredis.Redis]) -> None:
    edge_store = KeyStore(clients["edge"], TENANCY)
    record, _ = await edge_store.create(name="secret-holder")
    key_hash = await edge_store.hash_of(record.id)
    audit = clients["audit"]
    await refused(audit.get(f"{TENANCY}key:{key_hash}"))
    await refused(audit.hgetall(f"{TENANCY}ids"))
    with pytest.raises(TenancyUnavailable) as caught:
        await KeyStore(audit, TENANCY).by_hash(key_hash)
    assert isinstance(caught.value.__cause__, NoPermissionError)
    await refused(audit.hgetall(f"{BUDGET}pools"))
    await refused(audit.set(f"{BUDGET}{{org}}:pool:org", "x"))
    # SCAN would list every key's name: not granted to audit either.
    await refused(audit.scan(0))
