"""NATS with one user per service, against a real nats-server (JetStream) of the test's own.

The server runs with each of the two configurations hoosh is deployed with:
deploy/nats/nats.conf with the environment docker-compose.yml gives it, and the users of
deploy/helm/nats-values.yaml rendered the way NATS's chart renders `config.merge` and
`container.env`. With the real publisher, stream declaration and audit consumer:
router, stt and budget declare the stream as their settings do (read and create only:
a stream whose settings differ is left to the audit, with a warning) and publish their
own events with acks; audit consumes and acks them and may update the stream; nobody
else reads them, audit publishes none, no user deletes or purges the stream, no
publisher updates it (shrinks it, seals it), and an unknown user or a wrong password
does not get in. The reload broadcast (hoosh_common.reload): the edge alone asks, every
router and budget replica hears it and answers once on the asker's inbox, and records
what it did as a config.reload event; nobody else hears or sends a reload request.
Each user reads its own inbox only (_INBOX_<user>, the prefix every service connects
with): no service sees, acks or pulls the messages the audit pulls. The edge answers a
reload 503 at once while NATS is unreachable or refuses its password, and reaches the
replicas once NATS is there.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest
import yaml
from google.protobuf.message import Message
from hoosh.events.v1 import events_pb2
from hoosh_audit.config import AuditSettings
from hoosh_audit.consumer import AuditConsumer
from hoosh_audit.keys import Keyring
from hoosh_audit.log import AuditLog
from hoosh_budget.config import BudgetSettings
from hoosh_cli.infra import nats_binary
from hoosh_cli.stack import free_port
from hoosh_common.eventbus import (
    DUPLICATE_WINDOW_S,
    EventPublisher,
    EventPublishError,
    StreamPolicy,
    ensure_stream,
    nats_inbox_prefix,
)
from hoosh_common.eventbus_settings import EventBusSettings
from hoosh_common.reload import ConfigReloader, ReloadResponder, coordinate_reload, reload_subject
from hoosh_edge import admin_reload
from hoosh_edge.app import create_app
from hoosh_edge.auth import Tenancy
from hoosh_edge.clients import Clients
from hoosh_edge.config import Settings as EdgeSettings
from hoosh_router.config import RouterSettings
from hoosh_stt.config import SttSettings
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.client import JetStreamContext

from .nats_log import RANDOM_PORT, log_size, wait_ready

ROOT = Path(__file__).resolve().parents[1]
NATS_CONF = ROOT / "deploy" / "nats" / "nats.conf"
NATS_VALUES = ROOT / "deploy" / "helm" / "nats-values.yaml"
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

STREAM = "HOOSH_EVENTS"
PREFIX = "hoosh"
USERS = ("ops", "router", "stt", "budget", "audit", "edge")
PUBLISHERS = ("router", "stt", "budget")
# The services that answer reload requests (they read hoosh.yaml); the edge sends them.
RELOADERS = ("router", "budget")
# The compose services whose HOOSH_NATS_URL names a user, and which one.
COMPOSE_USERS = {
    "router": "router",
    "budget": "budget",
    "stt": "stt",
    "stt-gpu": "stt",
    "audit": "audit",
    "edge": "edge",
}
# Hex passwords; stt's is digits only, which an unquoted NATS variable would read as a
# number (the server would not start), router's one that nats-server 2.9 misread.
PASSWORDS = {
    "ops": secrets.token_hex(16),
    "router": "1e3f" + secrets.token_hex(14),
    "stt": "1234567890" * 3,
    "budget": secrets.token_hex(16),
    "audit": secrets.token_hex(16),
    "edge": secrets.token_hex(16),
}
# Each publisher's events: (name under the prefix, message).
OWN_EVENTS: dict[str, list[tuple[str, Message]]] = {
    "router": [
        ("inference.completed", events_pb2.InferenceCompleted(request_id="r-1", model="m", pool="team")),
        ("inference.failed", events_pb2.InferenceFailed(request_id="r-2", model="m", error_code="upstream_error")),
        ("config.reload", events_pb2.ConfigReload(event_id="r-3", service="router", outcome="reloaded")),
    ],
    "stt": [("inference.completed", events_pb2.InferenceCompleted(request_id="s-1", model="whisper", kind="audio"))],
    "budget": [
        ("budget.reset", events_pb2.BudgetReset(event_id="b-1", pool="team", reason="admin")),
        ("admin.key.created", events_pb2.AdminAction(event_id="b-2", action="key.created", target="key_1")),
        ("config.reload", events_pb2.ConfigReload(event_id="b-3", service="budget", outcome="refused")),
    ],
}
# An event subject each publisher does not own.
FOREIGN_EVENT = {"router": "budget.reset", "stt": "admin.key.created", "budget": "inference.completed"}
API_TIMEOUT = 0.5  # a refused request is never answered: it times out
RELOAD = reload_subject(PREFIX)
# What router and budget may answer: one reply per reload request, for 5 minutes (the
# longest HOOSH_EDGE_RELOAD_TIMEOUT_SECONDS).
RESPONSES = {"max": 1, "expires": "5m"}
POLICY = StreamPolicy(max_bytes=64 << 20)  # as compose declares it (workqueue), smaller
# Each service's own settings class, whose declare_stream the service calls at start.
SETTINGS: dict[str, type[EventBusSettings]] = {
    "router": RouterSettings,
    "stt": SttSettings,
    "budget": BudgetSettings,
    "audit": AuditSettings,
}


# ------------------------------------------------------------------ the two configurations


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        got = env.get(name, "")
        if op == ":?" and not got:
            raise KeyError(f"{name}: {arg}")
        if op == ":-" and not got:
            return arg
        return got

    return re.sub(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:[?-])([^}]*))?\}", one, value)


def dotenv(passwords: dict[str, str] = PASSWORDS) -> dict[str, str]:
    return {f"NATS_PASSWORD_{user.upper()}": password for user, password in passwords.items()}


def compose_server(directory: Path, port: int, http_port: int) -> tuple[Path, dict[str, str]]:
    """deploy/nats/nats.conf, its port, monitoring port and store moved to the test's,
    and the environment docker-compose.yml gives the nats service."""
    text = NATS_CONF.read_text()
    for old, new in (
        ("\nport: 4222\n", f"\nport: {port}\n"),
        ("\nhttp_port: 8222\n", f"\nhttp_port: {http_port}\n"),
        ('store_dir: "/data"', f"store_dir: {json.dumps(str(directory / 'store'))}"),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    conf = directory / "nats.conf"
    conf.write_text(text)
    environment = yaml.safe_load(COMPOSE.read_text())["services"]["nats"]["environment"]
    return conf, {name: interpolate(value, dotenv()) for name, value in environment.items()}


def chart_config_text(config: dict[str, Any]) -> str:
    """The chart's rendering: JSON, with "<< x >>" strings unquoted (variables, units)."""
    return re.sub(r'"<< (.*?) >>"', r"\1", json.dumps(config, indent=2))


def helm_server(directory: Path, port: int, http_port: int) -> tuple[Path, dict[str, str]]:
    """The config NATS's chart renders from nats-values.yaml (config.merge over its own
    base: port, monitoring, JetStream on the PVC) and the container's environment:
    container.env in name order (as the chart emits the map), secretKeyRefs read from
    the Secret, $(VAR) expanded as Kubernetes does (only variables defined earlier)."""
    values = yaml.safe_load(NATS_VALUES.read_text())
    assert values["config"]["jetstream"]["enabled"] and values["config"]["jetstream"]["fileStore"]["pvc"]["enabled"]
    config = {
        "server_name": "<< $SERVER_NAME >>",
        "port": port,
        "http_port": http_port,
        "jetstream": {"store_dir": str(directory / "store"), "max_file_store": "<< 1GB >>"},
        **values["config"]["merge"],
    }
    conf = directory / "nats.conf"
    conf.write_text(chart_config_text(config))
    env = {"SERVER_NAME": "test-nats-0"}
    secret = {f"nats-password-{user}": password for user, password in PASSWORDS.items()}
    for name, value in sorted(values["container"]["env"].items()):
        if isinstance(value, dict):
            ref = value["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "hoosh-secrets", ref
            env[name] = secret[ref["key"]]
        else:
            env[name] = re.sub(r"\$\(([A-Za-z0-9_]+)\)", lambda m: env.get(m.group(1), m.group(0)), value)
    return conf, env


class OwnNats:
    """A nats-server with the compose or the chart config. Its client port is the
    kernel's pick at the first start (``port``: one chosen beforehand, for a test that
    needs the URL before the server is up); a restart keeps it. The monitoring port is
    picked anew at each start."""

    def __init__(self, directory: Path, source: str, port: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.source = source
        self.port = port if port is not None else RANDOM_PORT
        self.http_port = RANDOM_PORT
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, user: str, password: str | None = None) -> str:
        assert self.port != RANDOM_PORT, "the port is known once the server has started"
        return f"nats://{user}:{PASSWORDS[user] if password is None else password}@127.0.0.1:{self.port}"

    def connection_names(self) -> list[str]:
        """The names of the clients connected now (the monitoring port's /connz)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/connz", timeout=5) as answer:
            return [c.get("name", "") for c in json.load(answer).get("connections") or []]

    def log_count(self, text: str) -> int:
        return (self.directory / "server.log").read_text(errors="replace").count(text)

    def start(self) -> None:
        render = compose_server if self.source == "compose" else helm_server
        conf, env = render(self.directory, self.port, RANDOM_PORT)
        log_path = self.directory / "server.log"
        offset = log_size(log_path)
        with log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                [nats_binary(), "--config", str(conf), "--addr", "127.0.0.1"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
            )
        listening = wait_ready(self.process, log_path, offset)
        assert listening.http_port is not None, "the config names a monitoring port"
        self.port, self.http_port = listening.port, listening.http_port

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


@pytest.fixture(params=["compose"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OwnNats]:
    """A fresh server per test: the stream, which nobody may delete, starts anew. The
    behaviour is checked on the compose config; the chart's grants the same
    (test_the_chart_has_the_users_and_permissions_of_the_compose_config) and its
    rendered config runs (test_the_chart_config_serves_each_user): a server each per
    test for both would double this module's time for no new fact."""
    started = OwnNats(tmp_path / f"nats-{request.param}", request.param)
    started.start()
    try:
        yield started
    finally:
        started.stop()


@dataclass
class Conn:
    nc: NATS
    js: JetStreamContext
    errors: list[str] = field(default_factory=list)

    def violations(self) -> list[str]:
        return [e for e in self.errors if "permissions violation" in e]


@pytest.fixture
async def connect(server: OwnNats) -> AsyncIterator[Any]:
    """connect(user) -> Conn: a connection as the service makes it (its user's inbox
    prefix, hoosh_common.eventbus.nats_inbox_prefix), its async errors kept."""
    made: list[Conn] = []

    async def make(user: str) -> Conn:
        errors: list[str] = []

        async def on_error(error: Exception) -> None:
            errors.append(str(error).lower())

        url = server.url(user)
        nc = await nats.connect(
            url, error_cb=on_error, allow_reconnect=False, connect_timeout=5, inbox_prefix=nats_inbox_prefix(url)
        )
        conn = Conn(nc, nc.jetstream(timeout=API_TIMEOUT), errors)
        made.append(conn)
        return conn

    yield make
    for conn in made:
        with contextlib.suppress(Exception):
            await conn.nc.close()


def settings(user: str, policy: StreamPolicy = POLICY, duplicate_window: float | None = None) -> EventBusSettings:
    """The service's settings with the stream's policy (HOOSH_NATS_STREAM_*), the rest
    their defaults (the environment is not read)."""
    fields: dict[str, Any] = {
        "nats_stream_retention": policy.retention,
        "nats_stream_max_bytes": policy.max_bytes,
        "nats_stream_max_msgs": policy.max_msgs,
        "nats_stream_max_age_seconds": policy.max_age,
        "nats_stream_replicas": policy.replicas,
    }
    if duplicate_window is not None:
        fields["nats_duplicate_window_seconds"] = duplicate_window
    made = SETTINGS[user].model_construct(**fields)
    assert made.stream_policy() == policy
    return made


async def declared(conn: Conn, user: str) -> None:
    """The stream declared as the service declares it at start."""
    await settings(user).declare_stream(conn.js, STREAM, PREFIX)


async def publish_own(conn: Conn, user: str) -> int:
    # (EventBusSettings.event_publisher builds the same, and registers its metrics once
    # per process: one service's, so not here, where three services publish.)
    publisher = EventPublisher(conn.nc, conn.js, STREAM, PREFIX, max_attempts=1, ack_timeout=2.0)
    for i, (name, message) in enumerate(OWN_EVENTS[user]):
        ack = await publisher.publish(name, message, f"{user}-{i}-{secrets.token_hex(4)}")
        assert ack is not None and ack.stream == STREAM and ack.seq > 0
    return len(OWN_EVENTS[user])


async def messages(conn: Conn) -> int:
    return (await conn.js.stream_info(STREAM)).state.messages


async def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def refused(conn: Conn, call: Any, subject: str) -> None:
    """The request is never answered, and the server reports the permissions violation."""
    with pytest.raises((nats.errors.TimeoutError, TimeoutError)):
        await call
    await until(lambda: _has(conn, subject), timeout=2)


async def _has(conn: Conn, subject: str) -> bool:
    return any(subject.lower() in e for e in conn.violations())


# ------------------------------------------------------------------ the files agree


def parse_conf(text: str) -> Any:
    """The subset of the NATS config syntax nats.conf uses: maps, arrays, quoted strings,
    bare words and $variables (kept as "$NAME")."""
    text = re.sub(r"#[^\n]*", "", text)
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]]|[^\s{}\[\]:=,"]+', text)
    pos = 0

    def value() -> Any:
        nonlocal pos
        token = tokens[pos]
        pos += 1
        if token == "{":
            return mapping("}")
        if token == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
            pos += 1
            return items
        if token in ("true", "false"):
            return token == "true"
        if token.isdigit():
            return int(token)
        return json.loads(token) if token.startswith('"') else token

    def mapping(end: str | None) -> dict[str, Any]:
        nonlocal pos
        out: dict[str, Any] = {}
        while pos < len(tokens) and tokens[pos] != end:
            key = tokens[pos]
            pos += 1
            out[key] = value()
        pos += 1
        return out

    return mapping(None)


def test_the_chart_has_the_users_and_permissions_of_the_compose_config() -> None:
    conf = parse_conf(NATS_CONF.read_text())
    values = yaml.safe_load(NATS_VALUES.read_text())
    chart_users = values["config"]["merge"]["authorization"]["users"]
    conf_users = conf["authorization"]["users"]
    by_name = {u["user"]: u for u in chart_users}
    assert [u["user"] for u in conf_users] == [u["user"] for u in chart_users]
    assert set(by_name) == set(USERS)
    for user in conf_users:
        name = user["user"]
        assert user["password"] == f"$NATS_QUOTED_PASSWORD_{name.upper()}"
        assert by_name[name]["password"] == f"<< $NATS_QUOTED_PASSWORD_{name.upper()} >>"
        assert user["permissions"] == by_name[name]["permissions"], name
        # Only audit (its declaration reconciles the stream) and operators may update it.
        updates = [s for s in user["permissions"]["publish"]["allow"] if s.startswith("$JS.API.STREAM.UPDATE.")]
        assert bool(updates) == (name in ("audit", "ops")), name
        # The reload broadcast: the edge alone asks; router and budget alone hear it, answer
        # only on the inbox of a request they received, and record it.
        permissions = user["permissions"]
        assert (RELOAD in permissions["subscribe"]["allow"]) == (name in RELOADERS), name
        assert (RELOAD in permissions["publish"]["allow"]) == (name == "edge"), name
        assert permissions.get("allow_responses") == (RESPONSES if name in RELOADERS else None), name
        assert (f"{PREFIX}.config.reload" in permissions["publish"]["allow"]) == (name in RELOADERS), name
        # Its own inbox, no one else's (nor NATS's shared _INBOX.>); only the audit acks.
        inboxes = [s for s in permissions["subscribe"]["allow"] if s.startswith("_INBOX")]
        assert inboxes == [f"_INBOX_{name}.>"], name
        acks = [s for s in permissions["publish"]["allow"] if s.startswith("$JS.ACK")]
        assert acks == ([f"$JS.ACK.{STREAM}.audit.>"] if name == "audit" else []), name
    # JetStream on a volume (compose) and on a PVC (chart), three servers in the chart.
    assert conf["jetstream"]["store_dir"] == "/data"
    assert values["config"]["cluster"]["enabled"] and values["config"]["cluster"]["replicas"] == 3


def test_compose_gives_each_service_its_own_nats_user() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    nats_env = services["nats"]["environment"]
    for user in USERS:
        name = f"NATS_PASSWORD_{user.upper()}"
        # Quoted for the config's parser; required (compose refuses to start without).
        assert re.fullmatch(rf'"\$\{{{name}:\?[^}}]+\}}"', nats_env[f"NATS_QUOTED_PASSWORD_{user.upper()}"])
    assert set(nats_env) == {f"NATS_QUOTED_PASSWORD_{u.upper()}" for u in USERS}
    for node in ("nats", "nats-1", "nats-2", "nats-3"):
        svc = services[node]
        assert svc["command"][:3] == ["nats-server", "--config", "/etc/nats/hoosh.conf"], node
        assert "./deploy/nats/nats.conf:/etc/nats/hoosh.conf:ro" in svc["volumes"], node
        assert svc["environment"] == nats_env, node
    for service, user in COMPOSE_USERS.items():
        url = services[service]["environment"]["HOOSH_NATS_URL"]
        name = f"NATS_PASSWORD_{user.upper()}"
        assert re.fullmatch(rf"nats://{user}:\$\{{{name}:\?[^}}]+\}}@\$\{{HOOSH_NATS_HOST:-nats\}}:4222", url), url
    with_nats = {name for name, svc in services.items() if "HOOSH_NATS_URL" in (svc.get("environment") or {})}
    assert with_nats == set(COMPOSE_USERS)
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if line and not line.startswith("#")
    )
    for user in USERS:
        assert example[f"NATS_PASSWORD_{user.upper()}"].strip(), user


def test_a_missing_password_stops_the_server(tmp_path: Path) -> None:
    conf, env = compose_server(tmp_path, free_port(), free_port())
    env.pop("NATS_QUOTED_PASSWORD_AUDIT")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NATS_QUOTED_PASSWORD_")}
    checked = subprocess.run(
        [nats_binary(), "--config", str(conf), "-t"], env={**clean, **env}, capture_output=True, text=True
    )
    assert checked.returncode != 0 and "NATS_QUOTED_PASSWORD_AUDIT" in checked.stdout + checked.stderr


# ------------------------------------------------------------------ who may connect


async def test_an_unknown_user_a_wrong_password_or_none_cannot_connect(server: OwnNats) -> None:
    for url in (
        f"nats://127.0.0.1:{server.port}",
        server.url("router", "not-the-password"),
        server.url("router", PASSWORDS["audit"]),  # another service's password
        f"nats://intruder:{PASSWORDS['ops']}@127.0.0.1:{server.port}",
        server.url("audit", f'"{PASSWORDS["audit"]}"'),  # the quoted form is the config's, not the password
    ):
        client = NATS()
        try:
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await client.connect(url, allow_reconnect=False, connect_timeout=5)
        finally:
            await client.close()  # a refused connect leaves its socket to close


# ------------------------------------------------------------------ publishers


@pytest.mark.parametrize("user", PUBLISHERS)
async def test_a_publisher_declares_the_stream_and_publishes_its_events_with_acks(connect: Any, user: str) -> None:
    conn: Conn = await connect(user)
    await declared(conn, user)  # creates it (STREAM.CREATE)
    await declared(conn, user)  # idempotent: INFO only
    info = await conn.js.stream_info(STREAM)
    assert (info.config.max_bytes, info.config.retention) == (POLICY.max_bytes, POLICY.retention_policy)
    published = await publish_own(conn, user)
    assert await messages(conn) == published
    assert conn.violations() == []

    # Another service's event subject is refused: not acked, not stored.
    publisher = EventPublisher(conn.nc, conn.js, STREAM, PREFIX, max_attempts=1, ack_timeout=API_TIMEOUT)
    with pytest.raises(EventPublishError):
        await publisher.publish(FOREIGN_EVENT[user], events_pb2.InferenceCompleted(request_id="x"), "forged-1")
    await until(lambda: _has(conn, f"{PREFIX}.{FOREIGN_EVENT[user]}"), timeout=2)
    assert await messages(conn) == published


@pytest.mark.parametrize("user", PUBLISHERS)
async def test_a_publisher_leaves_a_stream_whose_settings_differ_and_still_publishes(
    connect: Any, user: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit declared the stream; this publisher is configured otherwise (a smaller
    count bound, a larger byte bound, another duplicate window). Its declaration, as the
    service makes it at start, names each difference, changes nothing (it does not even
    try STREAM.UPDATE) and its events are stored."""
    audit: Conn = await connect("audit")
    await declared(audit, "audit")
    before = (await audit.js.stream_info(STREAM)).config
    conn: Conn = await connect(user)
    other = StreamPolicy(max_bytes=POLICY.max_bytes * 2, max_msgs=1)
    with caplog.at_level(logging.WARNING, logger="hoosh_common.eventbus"):
        info = await settings(user, other, duplicate_window=30.0).declare_stream(conn.js, STREAM, PREFIX)
    assert info.config == before
    warned = [r.__dict__["differences"] for r in caplog.records if "differences" in r.__dict__]
    assert warned == [
        {
            "duplicate_window": {"stream": DUPLICATE_WINDOW_S, "declared": 30.0},
            "max_bytes": {"stream": POLICY.max_bytes, "declared": other.max_bytes},
            "max_msgs": {"stream": -1, "declared": 1},
        }
    ]
    published = await publish_own(conn, user)
    after = await conn.js.stream_info(STREAM)
    assert after.config == before and after.state.messages == published
    assert conn.violations() == []


@pytest.mark.parametrize("user", PUBLISHERS)
async def test_a_publisher_cannot_update_the_stream(connect: Any, user: str) -> None:
    """STREAM.UPDATE would let any publisher shrink the stream (max_msgs=1 deletes all
    but the newest event, audited or not) or seal it (for good: every publish then
    fails, and the services go unready). Refused, and CREATE is no way round it."""
    router: Conn = await connect("router")
    await declared(router, "router")
    published = await publish_own(router, "router")
    before = (await router.js.stream_info(STREAM)).config
    conn: Conn = await connect(user)
    update = f"$JS.API.STREAM.UPDATE.{STREAM}"
    await refused(conn, conn.js.update_stream(before.evolve(max_msgs=1)), update)
    await refused(conn, conn.js.update_stream(before.evolve(sealed=True)), update)
    # Nor through a declaration that may update (the code before may_update=False).
    bigger = StreamPolicy(max_bytes=POLICY.max_bytes * 2)
    await refused(conn, ensure_stream(conn.js, STREAM, PREFIX, policy=bigger, may_update=True), update)
    # A create of an existing stream with other settings changes nothing.
    with pytest.raises(nats.js.errors.BadRequestError):
        await conn.js.add_stream(StreamConfig(name=STREAM, subjects=[f"{PREFIX}.>"], max_msgs=1))
    after = await router.js.stream_info(STREAM)
    assert after.config == before and not after.config.sealed and after.state.messages == published
    # And it still publishes.
    published += await publish_own(conn, user)
    assert await messages(router) == published


async def test_audit_updates_the_stream_and_so_may_ops(connect: Any) -> None:
    router: Conn = await connect("router")
    await declared(router, "router")
    published = await publish_own(router, "router")
    audit: Conn = await connect("audit")
    # Its settings' declaration and its consumer's (AuditConsumer.start) both reconcile.
    bigger = StreamPolicy(max_bytes=POLICY.max_bytes * 2)
    info = await settings("audit", bigger, duplicate_window=60.0).declare_stream(audit.js, STREAM, PREFIX)
    assert (info.config.max_bytes, info.config.duplicate_window) == (bigger.max_bytes, 60.0)
    biggest = StreamPolicy(max_bytes=bigger.max_bytes * 2)
    info = await ensure_stream(audit.js, STREAM, PREFIX, policy=biggest)
    assert (info.config.max_bytes, info.config.duplicate_window) == (biggest.max_bytes, DUPLICATE_WINDOW_S)
    assert audit.violations() == []
    # An operator edits the limits by hand.
    ops: Conn = await connect("ops")
    info = await ops.js.update_stream(info.config.evolve(max_bytes=POLICY.max_bytes * 8))
    assert info.config.max_bytes == POLICY.max_bytes * 8 and info.state.messages == published
    assert ops.violations() == []


@pytest.mark.parametrize("user", PUBLISHERS)
async def test_a_publisher_cannot_read_the_events(connect: Any, user: str) -> None:
    stt: Conn = await connect("stt")
    await declared(stt, "stt")
    conn: Conn = await connect(user)
    seen: list[str] = []

    async def heard(msg: Any) -> None:
        seen.append(msg.subject)

    await conn.nc.subscribe(f"{PREFIX}.>", cb=heard)
    await until(lambda: _has(conn, f'subscription to "{PREFIX}.>"'), timeout=2)
    await publish_own(stt, "stt")
    # Not through a consumer of its own, nor through audit's.
    await refused(
        conn,
        conn.js.add_consumer(STREAM, ConsumerConfig(durable_name="spy", ack_policy=AckPolicy.EXPLICIT)),
        f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.spy",
    )
    await refused(
        conn,
        conn.nc.request(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.audit", b'{"batch":1}', timeout=API_TIMEOUT),
        f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.audit",
    )
    await refused(
        conn,
        conn.nc.request(f"$JS.API.STREAM.MSG.GET.{STREAM}", b'{"seq":1}', timeout=API_TIMEOUT),
        f"$JS.API.STREAM.MSG.GET.{STREAM}",
    )
    assert seen == []


# ------------------------------------------------------------------ audit


async def test_audit_consumes_and_acks_every_event(connect: Any, tmp_path: Path) -> None:
    published = 0
    for user in PUBLISHERS:
        conn: Conn = await connect(user)
        await declared(conn, user)
        published += await publish_own(conn, user)
    audit: Conn = await connect("audit")
    keyring = Keyring.single(b"audit-test-key-0123456789abcdef")
    audit_log = await AuditLog.open(tmp_path / "audit", keyring, subject_prefix=PREFIX)
    try:
        for round_ in (1, 2):  # the second start deletes and re-creates the durable consumer
            consumer = AuditConsumer(
                audit.js,
                audit_log,
                stream=STREAM,
                subject_prefix=PREFIX,
                durable="audit",
                fetch_timeout=0.2,
                stream_policy=POLICY,
            )
            task = asyncio.create_task(consumer.run())
            try:
                await until(lambda count=published: _written(audit_log, count))
                # Acked: a work queue drops what its consumer acked.
                await until(lambda: _empty(audit))
                assert not task.done()
            finally:
                await consumer.stop()
                await task
            if round_ == 1:
                router: Conn = await connect("router")
                published += await publish_own(router, "router")
        assert audit_log.last_seq == published
        assert audit.violations() == []
    finally:
        audit_log.close()


async def _written(audit_log: AuditLog, count: int) -> bool:
    return audit_log.last_seq >= count


async def _empty(conn: Conn) -> bool:
    return await messages(conn) == 0


async def test_audit_cannot_publish_an_event(connect: Any) -> None:
    router: Conn = await connect("router")
    await declared(router, "router")
    audit: Conn = await connect("audit")
    publisher = EventPublisher(audit.nc, audit.js, STREAM, PREFIX, max_attempts=1, ack_timeout=API_TIMEOUT)
    for name in ("inference.completed", "budget.reset", "admin.key.created"):
        with pytest.raises(EventPublishError):
            await publisher.publish(name, events_pb2.InferenceCompleted(request_id="forged"), f"forged-{name}")
        await until(lambda name=name: _has(audit, f"{PREFIX}.{name}"), timeout=2)
    assert await messages(router) == 0
    # Nor someone else's consumer.
    await refused(
        audit,
        audit.js.add_consumer(STREAM, ConsumerConfig(durable_name="other", ack_policy=AckPolicy.EXPLICIT)),
        f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.other",
    )


# ------------------------------------------------------------------ the reload broadcast


class WholeFile:
    """What a replica reloads, reduced to the file's bytes: the NATS path under test is
    the real ConfigReloader and ReloadResponder (router and budget plug their own
    validation and swap in here; tests/test_reload_e2e.py runs those)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.running: bytes | None = None

    def parse(self, data: bytes) -> bytes:
        return data

    async def check(self, config: bytes) -> bool:
        return config != self.running

    async def apply(self, config: bytes) -> dict[str, Any]:
        self.running = config
        return {}


class TimedResponder(ReloadResponder):
    """A ReloadResponder that notes when it took up each request and when it answered."""

    def __init__(self, nc: NATS, reloader: ConfigReloader[Any], timeline: list[tuple[str, str, float, float]]) -> None:
        super().__init__(nc, PREFIX, reloader)
        self.service = reloader.service
        self.timeline = timeline

    async def answer(self, request: Mapping[str, Any]) -> dict[str, Any] | None:
        taken = time.monotonic()
        reply = await super().answer(request)
        self.timeline.append((self.service, str(request.get("op")), taken, time.monotonic()))
        return reply


async def loop_lag(lags: list[float], tick: float = 0.05) -> None:
    """How late each tick's wake-up came: an event loop blocked by anything shows here."""
    while True:
        planned = time.monotonic() + tick
        await asyncio.sleep(tick)
        lags.append(time.monotonic() - planned)


async def test_the_edge_asks_and_every_router_and_budget_replica_answers(connect: Any, tmp_path: Path) -> None:
    conns = {user: await connect(user) for user in (*RELOADERS, "edge")}
    await declared(conns["router"], "router")
    config = tmp_path / "hoosh.yaml"
    config.write_text("providers: []\n")
    responders = []
    timeline: list[tuple[str, str, float, float]] = []
    for user in RELOADERS:
        conn: Conn = conns[user]
        publisher = EventPublisher(conn.nc, conn.js, STREAM, PREFIX, max_attempts=1, ack_timeout=2.0)
        reloader = ConfigReloader(WholeFile(user), config, running_sha256=None, events=publisher, instance=f"{user}-0")
        responder = TimedResponder(conn.nc, reloader, timeline)
        await responder.start()
        responders.append(responder)
    edge: Conn = conns["edge"]
    lags: list[float] = []
    lag_task = asyncio.get_running_loop().create_task(loop_lag(lags))
    asked = time.monotonic()
    try:
        report = await coordinate_reload(edge.nc, PREFIX, reload_id="perm-1", gather_seconds=2, timeout_seconds=10)
    finally:
        lag_task.cancel()
    # Flaky under the full suite only (a replica's check answer missing from the window,
    # the apply then "came too late"): on failure, the connections' async errors (did the
    # server refuse a reply?), when each replica took up and answered each request
    # (seconds after the edge asked) and the event loop's longest lag.
    diagnosis = {
        "errors": {user: conn.errors for user, conn in conns.items()},
        "timeline": [(service, op, round(a - asked, 3), round(b - asked, 3)) for service, op, a, b in timeline],
        "longest_loop_lag": round(max(lags, default=0.0), 3),
    }
    assert report.status == "ok", (report, diagnosis)
    assert [(o.service, o.status) for o in report.services] == [("budget", "reloaded"), ("router", "reloaded")], (
        report,
        diagnosis,
    )
    # Each recorded what it did (hoosh.config.reload, through its own publisher).
    assert await messages(conns["router"]) == len(RELOADERS)
    for conn in conns.values():
        assert conn.violations() == []

    # Nobody else asks: a reload request from any other user is refused by the server.
    for user in ("router", "budget", "stt", "audit", "ops"):
        other: Conn = conns.get(user) or await connect(user)
        await other.nc.publish(RELOAD, b'{"op": "check"}', reply=other.nc.new_inbox())
        await other.nc.flush()
        await until(lambda other=other: _has(other, RELOAD), timeout=2)
    # Nobody else hears one (nor could pose as a replica).
    for user in ("stt", "audit", "edge", "ops"):
        other = conns.get(user) or await connect(user)
        await other.nc.subscribe(RELOAD)
        await until(lambda other=other: _has(other, f'subscription to "{RELOAD}"'), timeout=2)
    # A replica answers only the requests it received: not into anyone's inbox.
    router: Conn = conns["router"]
    forged = f"_INBOX_edge.{secrets.token_hex(8)}"
    await router.nc.publish(forged, b'{"status": "reloaded"}')
    await router.nc.flush()
    await until(lambda: _has(router, forged), timeout=2)
    # The edge publishes no event and reaches no JetStream API.
    publisher = EventPublisher(edge.nc, edge.js, STREAM, PREFIX, max_attempts=1, ack_timeout=API_TIMEOUT)
    with pytest.raises(EventPublishError):
        await publisher.publish("config.reload", events_pb2.ConfigReload(event_id="forged"), "forged-edge")
    await refused(edge, edge.js.stream_info(STREAM), f"$JS.API.STREAM.INFO.{STREAM}")
    # The broadcast still works after all that.
    config.write_text("providers: []\npools: []\n")
    report = await coordinate_reload(edge.nc, PREFIX, reload_id="perm-2", gather_seconds=2, timeout_seconds=10)
    assert report.status == "ok" and {o.status for o in report.services} == {"reloaded"}
    for responder in responders:
        await responder.stop()


# ------------------------------------------------------------------ inboxes

# The connections the services make, by their client name (each with nats_inbox_prefix).
SERVICE_CONNECTIONS = {"hoosh-router", "hoosh-budget", "hoosh-stt", "hoosh-audit", "hoosh-edge"}


def test_each_service_connects_with_its_own_users_inbox_prefix() -> None:
    assert nats_inbox_prefix("nats://router:pw@nats:4222") == "_INBOX_router"
    assert nats_inbox_prefix("router:pw@nats:4222") == "_INBOX_router"
    assert nats_inbox_prefix("nats://nats-1:4222, nats://audit:pw@nats-2:4222") == "_INBOX_audit"
    assert nats_inbox_prefix("nats://127.0.0.1:4222") == "_INBOX"  # a NATS without users
    assert nats_inbox_prefix("nats://a-token@nats:4222") == "_INBOX"  # a token never goes into a subject
    for user in ("a.b", "a*", "a%3E", "x" * 65):
        with pytest.raises(ValueError, match="inbox prefix"):
            nats_inbox_prefix(f"nats://{user}:pw@nats:4222")
    # Every connection a service makes passes it: with NATS's default _INBOX it would
    # receive none of its answers (the configuration lets no other inbox through).
    found: set[str] = set()
    for path in sorted((ROOT / "services").glob("*/src/*/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            names = [k.value.value for k in node.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)]
            if node.func.attr == "connect" and names and str(names[0]).startswith("hoosh-"):
                found.add(str(names[0]))
                prefix = [k.value for k in node.keywords if k.arg == "inbox_prefix"]
                assert prefix, f"{path}: {names[0]} connects to NATS without its user's inbox prefix"
    assert found == SERVICE_CONNECTIONS


async def test_no_service_reads_or_answers_the_messages_the_audit_pulls(connect: Any) -> None:
    """The audit's pulled messages arrive on its inbox, each with a $JS.ACK reply subject:
    whoever read them could answer it (allow_responses lets router and budget answer
    what they receive), +TERM or +ACK them for the audit (a work queue then drops them
    unaudited) or +NXT with its own inbox (the server then delivers the audit's events
    to it). No other user may subscribe to any inbox but its own, nor publish to
    $JS.ACK, nor name one as a reply; the audit still pulls and acks every event."""
    router: Conn = await connect("router")
    await declared(router, "router")
    published = await publish_own(router, "router")
    spies = {user: await connect(user) for user in ("budget", "stt", "edge", "ops")}
    spies["router"] = router
    seen: list[tuple[str, str, str]] = []
    for user, conn in spies.items():

        async def heard(msg: Any, user: str = user, conn: Conn = conn) -> None:
            seen.append((user, msg.subject, msg.reply))
            if msg.reply:  # what the attack did: answer it
                await conn.nc.publish(msg.reply, b"+TERM")

        for subject in ("_INBOX.>", "_INBOX_audit.>", ">", "$JS.ACK.>"):
            await conn.nc.subscribe(subject, cb=heard)
            await until(lambda conn=conn, subject=subject: _has(conn, f'subscription to "{subject}"'), timeout=2)

    audit: Conn = await connect("audit")
    sub = await audit.js.pull_subscribe(f"{PREFIX}.>", durable="audit", stream=STREAM)
    pulled = await sub.fetch(published, timeout=5)
    assert len(pulled) == published and all(m.reply.startswith(f"$JS.ACK.{STREAM}.audit.") for m in pulled)
    ack = pulled[0].reply
    for conn in spies.values():
        # Its reply subject, guessed or learnt: neither ack nor pull through it.
        await conn.nc.publish(ack, b"+TERM")
        await conn.nc.publish(ack, b'+NXT {"batch": 20}', reply=conn.nc.new_inbox())
        await until(lambda conn=conn: _has(conn, f'publish to "{ack}"'), timeout=2)
    # Nor may the edge aim the replicas' answers at it (a reload request's reply subject
    # must be one the edge may subscribe to: its own inbox).
    edge = spies["edge"]
    await edge.nc.publish(RELOAD, b'{"op": "check"}', reply=ack)
    await until(lambda: _has(edge, f'publish with reply of "{ack}"'), timeout=2)
    await asyncio.sleep(0.2)
    assert seen == []
    info = await audit.js.consumer_info(STREAM, "audit")
    assert (info.num_ack_pending, info.ack_floor.stream_seq) == (published, 0)
    assert await messages(audit) == published  # nothing acked or terminated for it
    for msg in pulled:
        await msg.ack_sync(timeout=2)
    await until(lambda: _empty(audit))
    assert audit.violations() == []


# ------------------------------------------------------------------ the edge's reload connection

EDGE_ADMIN_KEY = "nats-permissions-admin-key-0123456789abcdef"
PROMPT_S = admin_reload.CONNECT_TIMEOUT_SECONDS + 2  # an answer within the connect bound, and some


@contextlib.asynccontextmanager
async def edge_app(nats_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The edge app (lifespan run: its ReloadBus) pointed at ``nats_url``; the gRPC
    services and Redis at a closed port (a reload needs neither; the admin key is the
    bootstrap key, checked without Redis)."""
    closed = f"127.0.0.1:{free_port()}"
    settings = EdgeSettings(
        auth="keys",
        admin_key=EDGE_ADMIN_KEY,
        nats_url=nats_url,
        subject_prefix=PREFIX,
        router_addr=closed,
        budget_addr=closed,
        audit_addr=closed,
        stt_addr=closed,
        redis_url=f"redis://{closed}/0",
        edge_reload_gather_seconds=2,
        edge_reload_timeout_seconds=5,
    )
    clients = Clients.connect(settings)
    tenancy = Tenancy.connect(settings)
    app = create_app(settings, clients, tenancy)
    try:
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://edge") as client,
        ):
            yield client
    finally:
        await clients.close()
        await tenancy.close()


async def reload_via(edge: httpx.AsyncClient) -> tuple[int, dict[str, Any], float]:
    """POST /v1/admin/reload: (status, body, seconds); at most 20 s (it used to hang)."""
    started = time.monotonic()
    answer = await asyncio.wait_for(
        edge.post("/v1/admin/reload", headers={"Authorization": f"Bearer {EDGE_ADMIN_KEY}"}), timeout=20
    )
    return answer.status_code, answer.json(), time.monotonic() - started


def unavailable(status: int, body: dict[str, Any], seconds: float) -> bool:
    return status == 503 and body["error"]["code"] == "reload_unavailable" and seconds < PROMPT_S


@contextlib.asynccontextmanager
async def replica(server: OwnNats, tmp_path: Path) -> AsyncIterator[None]:
    """A router replica answering reloads (the real responder), as the router connects."""
    url = server.url("router")
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5, inbox_prefix=nats_inbox_prefix(url))
    config = tmp_path / "hoosh.yaml"
    config.write_text("providers: []\n")
    events = EventPublisher(nc, nc.jetstream(), STREAM, PREFIX, max_attempts=1, ack_timeout=2.0)
    await settings("router").declare_stream(nc.jetstream(), STREAM, PREFIX)
    reloader = ConfigReloader(WholeFile("router"), config, running_sha256=None, events=events, instance="router-0")
    responder = ReloadResponder(nc, PREFIX, reloader)
    await responder.start()
    try:
        yield
    finally:
        await responder.stop()
        await nc.close()


async def test_the_edge_starts_without_nats_and_reloads_once_it_is_there(tmp_path: Path) -> None:
    """No NATS yet (a closed port): the edge starts, and each reload answers 503
    reload_unavailable within the connect bound (it used to retry the connect forever,
    holding the bus's lock, so every later reload hung too); no client is left trying.
    NATS up: the next reload reaches the replica. NATS gone: 503 again, promptly; back:
    the next reload opens a new connection."""
    server = OwnNats(tmp_path / "nats-later", "compose", port=free_port())  # the edge needs the URL now
    async with edge_app(server.url("edge")) as edge:
        for _ in range(2):
            assert unavailable(*await reload_via(edge))
        server.start()
        try:
            await asyncio.sleep(2.5)  # longer than nats-py's pause between two tries
            assert "hoosh-edge" not in server.connection_names()
            async with replica(server, tmp_path):
                status, body, _ = await reload_via(edge)
                assert status == 200 and [(s["service"], s["status"]) for s in body["services"]] == [
                    ("router", "reloaded")
                ], body
                assert server.connection_names().count("hoosh-edge") == 1
            server.stop()
            assert unavailable(*await reload_via(edge))
            server.start()
            async with replica(server, tmp_path):
                status, body, _ = await reload_via(edge)
                assert status == 200 and body["status"] == "ok", body
        finally:
            server.stop()


async def test_a_wrong_edge_password_answers_503_at_once(server: OwnNats) -> None:
    """NATS refuses the edge's password: 503 reload_unavailable within the connect
    bound (it used to retry the refused login forever), and the refused client is
    closed, not left trying again in the background."""
    refused_logins = 'authentication error - User "edge"'
    async with edge_app(server.url("edge", "not-the-password")) as edge:
        for tries in (1, 2):
            assert unavailable(*await reload_via(edge))
            assert server.log_count(refused_logins) == tries
        await asyncio.sleep(2.5)  # longer than nats-py's pause between two tries
        assert server.log_count(refused_logins) == 2
        assert "hoosh-edge" not in server.connection_names()


# ------------------------------------------------------------------ the stream itself


async def test_no_user_can_delete_or_purge_the_stream(connect: Any) -> None:
    router: Conn = await connect("router")
    await declared(router, "router")
    published = await publish_own(router, "router")

    async def tries(user: str) -> None:
        conn: Conn = await connect(user)
        await refused(conn, conn.js.purge_stream(STREAM), f"$JS.API.STREAM.PURGE.{STREAM}")
        await refused(conn, conn.js.delete_stream(STREAM), f"$JS.API.STREAM.DELETE.{STREAM}")
        # (js.delete_msg waits 5 s for its answer: the same request, with our timeout)
        subject = f"$JS.API.STREAM.MSG.DELETE.{STREAM}"
        await refused(conn, conn.nc.request(subject, b'{"seq":1}', timeout=API_TIMEOUT), subject)

    await asyncio.gather(*(tries(user) for user in USERS))
    assert await messages(router) == published


async def test_ops_inspects_the_stream_but_neither_publishes_nor_consumes(connect: Any) -> None:
    router: Conn = await connect("router")
    await declared(router, "router")
    await publish_own(router, "router")
    ops: Conn = await connect("ops")
    assert (await ops.js.stream_info(STREAM)).state.messages == len(OWN_EVENTS["router"])
    assert (await ops.js.get_msg(STREAM, 1)).subject == f"{PREFIX}.inference.completed"
    publisher = EventPublisher(ops.nc, ops.js, STREAM, PREFIX, max_attempts=1, ack_timeout=API_TIMEOUT)
    with pytest.raises(EventPublishError):
        await publisher.publish("inference.completed", events_pb2.InferenceCompleted(request_id="o"), "ops-1")
    await refused(
        ops,
        ops.js.add_consumer(STREAM, ConsumerConfig(durable_name="ops", ack_policy=AckPolicy.EXPLICIT)),
        f"$JS.API.CONSUMER.DURABLE.CREATE.{STREAM}.ops",
    )


async def test_the_chart_config_serves_each_user(tmp_path: Path) -> None:
    """The chart's config as the chart renders it (passwords quoted through its env
    order) starts, lets every user in with its own password, and a publisher declares
    the stream and publishes its events there."""
    helm = OwnNats(tmp_path / "nats-helm", "helm")
    helm.start()
    try:
        for user in (*PUBLISHERS, "audit", "ops", "edge"):
            nc = await nats.connect(helm.url(user), allow_reconnect=False, connect_timeout=5)
            await nc.close()
        url = helm.url("router")
        errors: list[str] = []

        async def on_error(error: Exception) -> None:
            errors.append(str(error).lower())

        nc = await nats.connect(
            url, error_cb=on_error, allow_reconnect=False, connect_timeout=5, inbox_prefix=nats_inbox_prefix(url)
        )
        try:
            conn = Conn(nc, nc.jetstream(timeout=API_TIMEOUT), errors)
            await declared(conn, "router")
            published = await publish_own(conn, "router")
            assert await messages(conn) == published
            assert conn.violations() == []
        finally:
            await nc.close()
    finally:
        helm.stop()
