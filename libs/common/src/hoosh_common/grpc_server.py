"""Run a grpc.aio server with the standard health service and a graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .metrics import GrpcMetricsInterceptor

log = logging.getLogger(__name__)

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


def new_server() -> grpc.aio.Server:
    """A server that counts and times every RPC (``grpc_server_*`` metrics) and, while
    spans are exported, makes each call a SERVER span under the caller's context (from
    its metadata). Call :func:`hoosh_common.telemetry.configure_tracing` first."""
    return grpc.aio.server(options=SERVER_OPTIONS, interceptors=[GrpcMetricsInterceptor()])


def insecure_channel(address: str) -> grpc.aio.Channel:
    """One long-lived channel per peer; callers build it once and reuse it. Callers put
    the trace context in each call's metadata (``telemetry.request_metadata``): no client
    interceptor, whose machinery alone costs a few hundred microseconds per call."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


async def serve(
    server: grpc.aio.Server,
    address: str,
    service_names: list[str],
    *,
    grace_seconds: float = 10.0,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    ready: Callable[[], bool] | None = None,
    ready_interval_seconds: float = 1.0,
) -> None:
    """Bind, mark every service SERVING, and run until SIGTERM/SIGINT.

    ``ready``: polled every ``ready_interval_seconds``; while it is false the named
    services are NOT_SERVING (readiness: no new work routed here) and the overall ""
    stays SERVING (liveness: the process is fine; its outbox, say, is draining). The
    grace period is shorter than Kubernetes' default termination grace (30 s).
    """
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind gRPC server to {address}")
    await server.start()
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
    await stop.wait()
    if watcher is not None:
        watcher.cancel()
    log.info("stopping gRPC server", extra={"grace_seconds": grace_seconds})
    for name in [*service_names, ""]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(grace_seconds)
    if on_stop is not None:
        await on_stop()


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
