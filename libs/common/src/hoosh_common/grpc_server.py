"""Run a grpc.aio server with the standard health service and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import internal_auth
from .internal_auth import CallerPolicy
from .internal_plane import InternalPlane
from .metrics import GrpcMetricsInterceptor

log = logging.getLogger(__name__)

# This process's internal plane (token, callers, TLS): one per process, set once at
# start by the service's __main__ (configure_plane). Unset: plaintext, open, no token.
_plane = InternalPlane(service="")

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
]

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
]


def configure_plane(plane: InternalPlane) -> None:
    """Apply this process's internal plane: the token every internal call it makes
    presents, the caller policy of the servers it builds, TLS on its ports and channels.
    Call once at start, before building channels and servers."""
    global _plane
    _plane = plane
    internal_auth.present_token(plane.token)
    log.info(
        "internal plane",
        extra={
            "service": plane.service,
            "tls": plane.tls is not None,
            "presents_token": plane.token is not None,
            "callers": sorted(plane.policy.identities) if plane.policy is not None else None,
        },
    )


def new_server(*, policy: CallerPolicy | None = None) -> grpc.aio.Server:
    """A server that refuses calls from anyone but its callers (``policy``, else the
    configured plane's; neither: open), counts and times every RPC
    (``grpc_server_*`` metrics) and, while spans are exported, makes each call a SERVER
    span under the caller's context (from its metadata). Call
    :func:`hoosh_common.telemetry.configure_tracing` first."""
    chosen = policy if policy is not None else _plane.policy
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=[GrpcMetricsInterceptor(policy=chosen)])


def internal_channel(address: str) -> grpc.aio.Channel:
    """One long-lived channel per peer; callers build it once and reuse it. Mutual TLS
    when the plane has certificates, plaintext otherwise. Callers put the trace context
    and this process's token in each call's metadata (``telemetry.request_metadata``):
    no client interceptor, whose machinery alone costs a few hundred microseconds per
    call."""
    if _plane.tls is not None:
        return grpc.aio.secure_channel(address, _plane.tls.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def add_port(server: grpc.aio.Server, address: str) -> int:
    """Bind ``address`` with the plane's TLS (or plaintext); the bound port (0: failed)."""
    if _plane.tls is not None:
        return server.add_secure_port(address, _plane.tls.server_credentials())
    return server.add_insecure_port(address)


async def serve(
    server: grpc.aio.Server,
    address: str,
    service_names: list[str],
    *,
    grace_seconds: float = 10.0,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    before_stop: Callable[[], None] | None = None,
    ready: Callable[[], bool] | None = None,
    ready_interval_seconds: float = 1.0,
) -> None:
    """Bind, mark every service SERVING, and run until SIGTERM/SIGINT.

    ``ready``: polled every ``ready_interval_seconds``; while it is false the named
    services are NOT_SERVING (readiness: no new work routed here) and the overall ""
    stays SERVING (liveness: the process is fine; its outbox, say, is draining). The
    grace period is shorter than Kubernetes' default termination grace (30 s).
    ``before_stop`` runs when the signal comes, before the server stops taking calls
    (the router asks its tunnels' callers to move on); ``on_stop`` once it has stopped.
    """
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = add_port(server, address)
    if port == 0:
        raise RuntimeError(f"could not bind gRPC server to {address}")
    await server.start()
    # With TLS on, kubelet's gRPC probes (plaintext only) get a port with the health
    # service alone: nothing but SERVING/NOT_SERVING is reachable without a certificate.
    health_server = await _serve_plain_health(health_servicer)
    for name in [*service_names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC server listening", extra={"address": address, "services": service_names})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = None
    if ready is not None:
        watcher = asyncio.create_task(_watch_readiness(health_servicer, service_names, ready, ready_interval_seconds))
    try:
        await stop.wait()
        if watcher is not None:
            watcher.cancel()
        log.info("stopping gRPC server", extra={"grace_seconds": grace_seconds})
        for name in [*service_names, ""]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if before_stop is not None:
            try:
                before_stop()
            except Exception:  # stopping goes on regardless
                log.exception("before_stop failed")
        await server.stop(grace_seconds)
    finally:
        if health_server is not None:  # last: the probes see NOT_SERVING while the server drains
            await health_server.stop(0)
    if on_stop is not None:
        await on_stop()


async def _serve_plain_health(health_servicer: health.aio.HealthServicer) -> grpc.aio.Server | None:
    listen = _plane.health_listen.strip()
    if not listen or _plane.tls is None:
        return None
    health_server = grpc.aio.server(options=SERVER_OPTIONS)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
    if health_server.add_insecure_port(listen) == 0:
        raise RuntimeError(f"could not bind the gRPC health port to {listen}")
    await health_server.start()
    log.info("gRPC health listening (plaintext, health only)", extra={"address": listen})
    return health_server


async def _watch_readiness(
    health_servicer: health.aio.HealthServicer, service_names: list[str], ready: Callable[[], bool], interval: float
) -> None:
    serving = True
    while True:
        await asyncio.sleep(interval)
        try:
            now = bool(ready())
        except Exception:
            log.exception("readiness check failed")
            now = False
        if now != serving:
            serving = now
            status = health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in service_names:
                await health_servicer.set(name, status)
            log.warning("readiness changed", extra={"ready": now, "services": service_names})
