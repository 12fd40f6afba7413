"""Start every hoosh service as a process, wait until each is healthy, stop
them in reverse order. Used by `hoosh up`, the end-to-end tests and bench/."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import grpc
import httpx
from grpc_health.v1 import health_pb2
from hoosh_common.devca import make_ca, still_valid, tls_environment
from hoosh_common.events import DEFAULT_STREAM, SUBJECT_PREFIX
from hoosh_common.health import health_client

# The services that publish events: each signs them with a key of its own, and the
# audit is given all of them (an event signed by none is recorded as rejected).
PUBLISHERS = ("router", "stt", "budget")


# Who calls whom on the internal plane (each service's HOOSH_INTERNAL_CALLERS): the
# edge and the router call; every gRPC service knows its callers' tokens.
CALLERS: dict[str, tuple[str, ...]] = {
    "router": ("edge",),
    "budget": ("edge", "router"),
    "audit": ("edge",),
    "stt": ("edge",),
    "inference": ("router",),
}
CALLING = ("edge", "router")
# Variables a stack sets per service: never inherited from the caller's environment.
_PER_SERVICE = (
    "HOOSH_EVENTS_SIGNING_KEY",
    "HOOSH_EVENTS_SIGNING_KEY_ID",
    "HOOSH_AUDIT_PUBLISHER_KEYS",
    "HOOSH_INTERNAL_TOKEN",
    "HOOSH_INTERNAL_TOKEN_FILE",
    "HOOSH_INTERNAL_CALLERS",
    "HOOSH_INTERNAL_CALLERS_FILE",
    "HOOSH_GRPC_TLS_CERT",
    "HOOSH_GRPC_TLS_KEY",
    "HOOSH_GRPC_TLS_CA",
    "HOOSH_ROUTER_LINK_SOCKET",
)


def new_internal_tokens() -> dict[str, str]:
    """A fresh internal-plane token per calling service."""
    return {service: secrets.token_urlsafe(32) for service in CALLING}


def new_signing_keys() -> dict[str, str]:
    """A fresh event-signing key (hex, 32 bytes) per publishing service."""
    return {service: secrets.token_hex(32) for service in PUBLISHERS}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Ports:
    edge: int = 8088
    router: int = 50051
    budget: int = 50052
    inference: int = 50053
    audit: int = 50054
    stt: int = 50055
    # Each service's Prometheus /metrics.
    edge_metrics: int = 9460
    router_metrics: int = 9461
    budget_metrics: int = 9462
    inference_metrics: int = 9463
    audit_metrics: int = 9464
    stt_metrics: int = 9465

    @classmethod
    def free(cls) -> Ports:
        """Distinct free ports: each socket stays bound until all are chosen (one at a
        time, the kernel may hand the same port out twice: two services on one port)."""
        with contextlib.ExitStack() as held:
            ports = []
            for _ in range(len(fields(cls))):
                sock = held.enter_context(socket.socket())
                sock.bind(("127.0.0.1", 0))
                ports.append(int(sock.getsockname()[1]))
        return cls(*ports)


@dataclass
class StackConfig:
    state_dir: Path
    ports: Ports = field(default_factory=Ports)
    config_file: Path | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    nats_url: str = "nats://127.0.0.1:4222"
    nats_stream: str = DEFAULT_STREAM
    subject_prefix: str = SUBJECT_PREFIX
    budget_key_prefix: str = "hoosh:budget:"
    router_key_prefix: str = "hoosh:router:"
    audit_key: str = ""
    audit_consumer: str = "audit"
    # The edge's bootstrap admin key (HOOSH_ADMIN_KEY): a fresh one unless given.
    admin_key: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    # open: requests without a known key are served (the edge binds loopback only);
    # keys: every request needs a key.
    auth: Literal["open", "keys"] = "open"
    tenancy_key_prefix: str = "hoosh:tenancy:"
    with_inference: bool = True
    with_stt: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    # Each publishing service's event-signing key (hex), by service name: fresh ones
    # unless given (`hoosh up` keeps them in the state dir across restarts).
    signing_keys: dict[str, str] = field(default_factory=new_signing_keys)
    # More environment for one service only, by service name (after extra_env).
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    # The internal plane: each calling service's token (fresh unless given; empty: the
    # plane is open), and a directory for a development CA's certificates (None:
    # plaintext gRPC; Stack.start makes the certificates there unless still valid).
    internal_tokens: dict[str, str] = field(default_factory=new_internal_tokens)
    tls_dir: Path | None = None
    # True (`hoosh up`): each service in a session of its own, stdin /dev/null, so that
    # signals from the terminal (Ctrl-C, a hangup) reach the caller alone and it stops
    # them in order (Stack.stop). False (tests): they share the caller's process group,
    # so a test run killed as a group takes them along.
    own_session: bool = False
    # The router's local link (HOOSH_ROUTER_LINK_SOCKET): the stack's edge and router
    # share the tunnel's frames on a Unix socket instead of a gRPC stream. Only the
    # stack's own router and edge get it (an extra router must not take its socket).
    router_link: bool = True

    def router_link_socket(self) -> str:
        """The link's socket: in the state directory when its path is short enough for a
        Unix socket, else in a directory of this user's alone under /tmp."""
        path = str((self.state_dir / "router.sock").absolute())
        if len(os.fsencode(path)) <= 100:
            return path
        private = Path("/tmp") / f"hoosh-{hashlib.sha256(path.encode()).hexdigest()[:16]}"
        private.mkdir(mode=0o700, exist_ok=True)
        info = private.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            # Someone else's (made first, to listen in the router's place): not used.
            raise StackError(f"{private} is not a directory of this user's alone; remove it")
        return str(private / "router.sock")

    def publisher_keys(self) -> str:
        """HOOSH_AUDIT_PUBLISHER_KEYS: every publisher's key, under its service's name."""
        return ",".join(f"{service}={key}" for service, key in sorted(self.signing_keys.items()))

    def environment(self, service: str | None = None) -> dict[str, str]:
        """The environment of ``service``'s process: what every service shares, plus its
        own (a publisher's signing key, the audit's publisher keys, ``service_env``).

        Without a service (a process a caller starts beside the stack without saying
        which: tests' extra routers and edges), the shared environment plus the router's
        signing key and the audit's publisher keys, so that any service finds its
        settings there."""
        env = self._shared_environment()
        names = [service] if service is not None else ["audit", "router"]
        for name in names:
            if name in self.signing_keys:
                env["HOOSH_EVENTS_SIGNING_KEY"] = self.signing_keys[name]
                env["HOOSH_EVENTS_SIGNING_KEY_ID"] = name
            if name == "audit" and self.signing_keys:
                env["HOOSH_AUDIT_PUBLISHER_KEYS"] = self.publisher_keys()
        env.update(self.plane_environment(service or "router"))
        if self.router_link and service in ("router", "edge"):
            env["HOOSH_ROUTER_LINK_SOCKET"] = self.router_link_socket()
        if service is not None:
            env.update(self.service_env.get(service, {}))
        return env

    def credentials(self, service: str = "edge") -> tuple[tuple[str, str], ...]:
        """The metadata that lets a call through as ``service`` (tests and tools that
        call a service directly, as the edge or the router would)."""
        token = self.internal_tokens.get(service)
        return (("authorization", f"Bearer {token}"),) if token else ()

    def plane_environment(self, service: str) -> dict[str, str]:
        """``service``'s token, its callers' tokens and its TLS files."""
        env: dict[str, str] = {}
        if service in self.internal_tokens:
            env["HOOSH_INTERNAL_TOKEN"] = self.internal_tokens[service]
        callers = [name for name in CALLERS.get(service, ()) if name in self.internal_tokens]
        if callers:
            # Digests, not the tokens: a service never holds what lets another call as its caller.
            env["HOOSH_INTERNAL_CALLERS"] = ",".join(
                f"{name}=sha256:{hashlib.sha256(self.internal_tokens[name].encode()).hexdigest()}" for name in callers
            )
        if self.tls_dir is not None:
            env.update(tls_environment(self.tls_dir, service))
        return env

    def _shared_environment(self) -> dict[str, str]:
        ports = self.ports
        env = {
            "HOOSH_ENV": "development",
            "HOOSH_REDIS_URL": self.redis_url,
            "HOOSH_NATS_URL": self.nats_url,
            "HOOSH_NATS_STREAM": self.nats_stream,
            "HOOSH_SUBJECT_PREFIX": self.subject_prefix,
            "HOOSH_BUDGET_KEY_PREFIX": self.budget_key_prefix,
            "HOOSH_ROUTER_KEY_PREFIX": self.router_key_prefix,
            "HOOSH_AUDIT_HMAC_KEY": self.audit_key,
            "HOOSH_AUDIT_DIR": str(self.state_dir / "audit"),
            # Events NATS does not ack wait here (one directory per publishing service).
            "HOOSH_EVENTS_OUTBOX_DIR": str(self.state_dir / "outbox"),
            # A bounded stream that drops nothing audit has not written: an event
            # leaves it once audit has acked it; when full, new events wait in outboxes.
            "HOOSH_NATS_STREAM_RETENTION": "workqueue",
            "HOOSH_AUDIT_CONSUMER": self.audit_consumer,
            "HOOSH_AUTH": self.auth,
            "HOOSH_ADMIN_KEY": self.admin_key,
            "HOOSH_ADMIN_KEY_FILE": "",  # blank = unset: the key above is the one
            "HOOSH_TENANCY_KEY_PREFIX": self.tenancy_key_prefix,
            "HOOSH_EDGE_HOST": "127.0.0.1",
            "HOOSH_EDGE_PORT": str(ports.edge),
            "HOOSH_ROUTER_LISTEN": f"127.0.0.1:{ports.router}",
            "HOOSH_BUDGET_LISTEN": f"127.0.0.1:{ports.budget}",
            "HOOSH_INFERENCE_LISTEN": f"127.0.0.1:{ports.inference}",
            "HOOSH_AUDIT_LISTEN": f"127.0.0.1:{ports.audit}",
            "HOOSH_STT_LISTEN": f"127.0.0.1:{ports.stt}",
            "HOOSH_EDGE_METRICS_LISTEN": f"127.0.0.1:{ports.edge_metrics}",
            "HOOSH_ROUTER_METRICS_LISTEN": f"127.0.0.1:{ports.router_metrics}",
            "HOOSH_BUDGET_METRICS_LISTEN": f"127.0.0.1:{ports.budget_metrics}",
            "HOOSH_INFERENCE_METRICS_LISTEN": f"127.0.0.1:{ports.inference_metrics}",
            "HOOSH_AUDIT_METRICS_LISTEN": f"127.0.0.1:{ports.audit_metrics}",
            "HOOSH_STT_METRICS_LISTEN": f"127.0.0.1:{ports.stt_metrics}",
            "HOOSH_ROUTER_ADDR": f"127.0.0.1:{ports.router}",
            "HOOSH_BUDGET_ADDR": f"127.0.0.1:{ports.budget}",
            "HOOSH_INFERENCE_ADDR": f"127.0.0.1:{ports.inference}",
            "HOOSH_AUDIT_ADDR": f"127.0.0.1:{ports.audit}",
            # Empty: the edge turns /v1/audio/transcriptions off.
            "HOOSH_STT_ADDR": f"127.0.0.1:{ports.stt}" if self.with_stt else "",
        }
        if self.config_file is not None:
            env["HOOSH_CONFIG"] = str(self.config_file)
        env.update(self.extra_env)
        return env


@dataclass
class ServiceProcess:
    name: str
    module: str
    health: str  # gRPC service name, or "http" for the edge
    port: int
    metrics_port: int = 0
    process: subprocess.Popen[bytes] | None = None


class StackError(RuntimeError):
    pass


class Stack:
    """The hoosh services as child processes."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        ports = config.ports
        services = [
            ServiceProcess(
                "budget", "hoosh_budget", "hoosh.budget.v1.BudgetService", ports.budget, ports.budget_metrics
            ),
            ServiceProcess("audit", "hoosh_audit", "hoosh.audit.v1.AuditService", ports.audit, ports.audit_metrics),
        ]
        if config.with_inference:
            services.append(
                ServiceProcess(
                    "inference",
                    "hoosh_inference",
                    "hoosh.inference.v1.InferenceService",
                    ports.inference,
                    ports.inference_metrics,
                )
            )
        services.append(
            ServiceProcess(
                "router", "hoosh_router", "hoosh.router.v1.RouterService", ports.router, ports.router_metrics
            )
        )
        if config.with_stt:
            services.append(ServiceProcess("stt", "hoosh_stt", "hoosh.stt.v1.SttService", ports.stt, ports.stt_metrics))
        services.append(ServiceProcess("edge", "hoosh_edge", "http", ports.edge, ports.edge_metrics))
        self.services = services
        self.log_dir = config.state_dir / "logs"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.config.ports.edge}"

    def metrics_urls(self) -> dict[str, str]:
        """Each running service's Prometheus endpoint, by service name."""
        return {service.name: f"http://127.0.0.1:{service.metrics_port}/metrics" for service in self.services}

    async def start(self, timeout: float = 120.0) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # Signing keys from the caller's environment are not inherited: each service
        # gets exactly its own (or none) from environment(name).
        inherited = {name: value for name, value in os.environ.items() if name not in _PER_SERVICE}
        tls_dir = self.config.tls_dir
        if tls_dir is not None and not still_valid(tls_dir, [*CALLERS, *CALLING]):
            make_ca(tls_dir, services=sorted({*CALLERS, *CALLING}))
        try:
            for service in self.services:
                env = {**inherited, **self.config.environment(service.name)}
                log_file = open(self.log_dir / f"{service.name}.log", "ab")
                service.process = subprocess.Popen(
                    [sys.executable, "-m", service.module],
                    env=env,
                    stdin=subprocess.DEVNULL if self.config.own_session else None,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=self.config.own_session,
                )
                log_file.close()
                await self._wait_healthy(service, timeout)
        except BaseException:
            self.stop()
            raise

    async def _wait_healthy(self, service: ServiceProcess, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        address = f"127.0.0.1:{service.port}"
        while loop.time() < end:
            assert service.process is not None
            if service.process.poll() is not None:
                tail = (self.log_dir / f"{service.name}.log").read_text(errors="replace")[-3000:]
                raise StackError(f"{service.name} exited with {service.process.returncode}:\n{tail}")
            if await self._is_healthy(service, address):
                return
            await asyncio.sleep(0.2)
        raise StackError(f"{service.name} was not healthy within {timeout:.0f}s; see {self.log_dir}")

    def channel(self, address: str, *, as_service: str = "edge") -> grpc.aio.Channel:
        """A channel to one of the stack's gRPC services: with TLS on, presenting
        ``as_service``'s certificate (the token is a call's own metadata)."""
        tls_dir = self.config.tls_dir
        if tls_dir is None:
            return grpc.aio.insecure_channel(address)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(tls_dir / "ca.pem").read_bytes(),
            private_key=(tls_dir / f"{as_service}-key.pem").read_bytes(),
            certificate_chain=(tls_dir / f"{as_service}.pem").read_bytes(),
        )
        return grpc.aio.secure_channel(address, credentials)

    async def _is_healthy(self, service: ServiceProcess, address: str) -> bool:
        if service.health == "http":
            try:
                async with httpx.AsyncClient(timeout=1.0) as client:
                    response = await client.get(f"http://{address}/v1/health")
                return response.status_code == 200
            except httpx.HTTPError:
                return False
        async with self.channel(address) as channel:
            try:
                reply = await health_client(channel).Check(
                    health_pb2.HealthCheckRequest(service=service.health), timeout=1.0
                )
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def failed(self) -> ServiceProcess | None:
        """The first service whose process has exited, if any."""
        for service in self.services:
            if service.process is not None and service.process.poll() is not None:
                return service
        return None

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM in reverse start order (edge first, so no new work arrives), then wait."""
        for service in reversed(self.services):
            process = service.process
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
