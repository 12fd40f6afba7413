"""The edge's gRPC channels and stubs: built once at start, closed at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass

import grpc
from hoosh.audit.v1 import audit_pb2_grpc
from hoosh.budget.v1 import budget_pb2_grpc
from hoosh.router.v1 import router_pb2_grpc
from hoosh.stt.v1 import stt_pb2_grpc
from hoosh_common import telemetry
from hoosh_common.grpc_server import configure_plane, internal_channel
from hoosh_common.health import HealthClient, health_client

from .config import Settings
from .tunnel import RouterTunnel

ROUTER_SERVICE = "hoosh.router.v1.RouterService"
BUDGET_SERVICE = "hoosh.budget.v1.BudgetService"
AUDIT_SERVICE = "hoosh.audit.v1.AuditService"
STT_SERVICE = "hoosh.stt.v1.SttService"


@dataclass(frozen=True, slots=True)
class HealthTarget:
    """A backend whose grpc.health.v1 status the readiness probe asks for."""

    stub: HealthClient
    service: str  # the fully qualified service name the backend registers


@dataclass(slots=True)
class Clients:
    """One channel per backend, shared by every request of this process."""

    router: router_pb2_grpc.RouterServiceAsyncStub
    budget: budget_pb2_grpc.BudgetServiceAsyncStub
    audit: audit_pb2_grpc.AuditServiceAsyncStub
    health: dict[str, HealthTarget]
    channels: tuple[grpc.aio.Channel, ...]
    stt: stt_pb2_grpc.SttServiceAsyncStub | None = None  # None: speech-to-text not configured
    tunnel: RouterTunnel | None = None  # None: every router call is its own unary call

    @classmethod
    def connect(cls, settings: Settings) -> Clients:
        """Open the channels (lazily connecting) to router, budget, audit and (when set) stt.

        Call it inside the running event loop that will use the channels.
        """
        # This process's token (and TLS) on every call; each edge worker connects once.
        configure_plane(settings.internal_plane("edge"))
        router = internal_channel(settings.router_addr)
        budget = internal_channel(settings.budget_addr)
        audit = internal_channel(settings.audit_addr)
        health = {
            "router": HealthTarget(health_client(router), ROUTER_SERVICE),
            "budget": HealthTarget(health_client(budget), BUDGET_SERVICE),
            "audit": HealthTarget(health_client(audit), AUDIT_SERVICE),
        }
        channels = [router, budget, audit]
        stt_stub = None
        if settings.stt_addr:
            stt = internal_channel(settings.stt_addr)
            stt_stub = stt_pb2_grpc.SttServiceStub(stt)
            health["stt"] = HealthTarget(health_client(stt), STT_SERVICE)
            channels.append(stt)
        # Spans on: unary calls, each with the router's server span from its interceptor.
        tunnel = (
            RouterTunnel(router, link_path=settings.router_link_socket)
            if settings.edge_router_tunnel and not telemetry.exporting()
            else None
        )
        return cls(
            router=router_pb2_grpc.RouterServiceStub(router),
            budget=budget_pb2_grpc.BudgetServiceStub(budget),
            audit=audit_pb2_grpc.AuditServiceStub(audit),
            health=health,
            channels=tuple(channels),
            stt=stt_stub,
            tunnel=tunnel,
        )

    async def close(self, grace: float | None = None) -> None:
        """Close every channel; in-flight calls get ``grace`` seconds (None: cancelled now)."""
        closing: list[Awaitable[None]] = [channel.close(grace) for channel in self.channels]
        if self.tunnel is not None:
            self.tunnel.close()  # its streams end once their calls are answered
            closing.append(self.tunnel.wait_for_link_calls(grace))
        await asyncio.gather(*closing)
        if self.tunnel is not None:
            self.tunnel.abort()  # the grace is over: link calls still open fail now too
