"""The grpc.health.v1 client, typed: the readiness probes' one call.

grpc_health's generated ``HealthStub`` sets its methods in ``__init__``, and its
typeshed stubs (types-grpcio-health-checking) declare none of them; on an aio channel
``Check`` is an awaitable unary-unary call, which is what :class:`HealthClient` says.
"""

from __future__ import annotations

from typing import Protocol, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


class HealthClient(Protocol):
    """grpc_health's ``HealthStub`` on a ``grpc.aio`` channel."""

    @property
    def Check(
        self,
    ) -> grpc.aio.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]: ...


def health_client(channel: grpc.aio.Channel) -> HealthClient:
    """A health stub on ``channel``."""
    return cast(HealthClient, health_pb2_grpc.HealthStub(channel))
