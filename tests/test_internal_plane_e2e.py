"""The internal plane of a running stack, started as `hoosh up` starts it (mutual TLS
from a development CA, a token per calling service): every gRPC service refuses a
call without credentials, with the wrong ones, or from outside the CA; its callers
get through; the budget's pool administration is the edge's alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh.stt.v1 import stt_pb2, stt_pb2_grpc
from hoosh_common.devca import make_ca

from .conftest import RunningStack
from .scraping import _scrape

Call = Callable[[grpc.aio.Channel, tuple[tuple[str, str], ...]], Awaitable[Any]]

# One real method of each service, and the services that call it in hoosh's design.
CALLS: dict[str, tuple[Call, tuple[str, ...]]] = {
    "router": (
        lambda ch, md: router_pb2_grpc.RouterServiceStub(ch).ListModels(
            router_pb2.ListModelsRequest(), metadata=md, timeout=10
        ),
        ("edge",),
    ),
    "budget": (
        lambda ch, md: budget_pb2_grpc.BudgetServiceStub(ch).GetPool(
            budget_pb2.GetPoolRequest(pool="default"), metadata=md, timeout=10
        ),
        ("edge", "router"),
    ),
    "audit": (
        lambda ch, md: audit_pb2_grpc.AuditServiceStub(ch).ListEntries(
            audit_pb2.ListEntriesRequest(limit=1), metadata=md, timeout=10
        ),
        ("edge",),
    ),
    "stt": (
        lambda ch, md: stt_pb2_grpc.SttServiceStub(ch).ListModels(stt_pb2.ListModelsRequest(), metadata=md, timeout=10),
        ("edge",),
    ),
    "inference": (
        lambda ch, md: inference_pb2_grpc.InferenceServiceStub(ch).ListModels(
            inference_pb2.ListModelsRequest(), metadata=md, timeout=10
        ),
        ("router",),
    ),
}


def address(hoosh: RunningStack, service: str) -> str:
    assert hoosh.stack_config is not None
    return f"127.0.0.1:{getattr(hoosh.stack_config.ports, service)}"


async def code(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def foreign_credentials(tmp_path: Path, hoosh: RunningStack) -> grpc.ChannelCredentials:
    """A certificate from another CA, trusting the stack's CA (so only the client side fails)."""
    assert hoosh.stack_config is not None and hoosh.stack_config.tls_dir is not None
    theirs = make_ca(tmp_path / "foreign", services=["edge"])
    return grpc.ssl_channel_credentials(
        root_certificates=(hoosh.stack_config.tls_dir / "ca.pem").read_bytes(),
        private_key=(theirs / "edge-key.pem").read_bytes(),
        certificate_chain=(theirs / "edge.pem").read_bytes(),
    )


def test_no_call_between_hoosh_services_was_refused(hoosh: RunningStack) -> None:
    """Every internal call the services made so far (the router's warm-up and probes of
    the local worker, the edge's model lists, chats, pools, audits, transcriptions in
    the tests before this module) carried its caller's token: no service counted a
    refusal. Runs before this module's own refusals."""
    refused = {}
    for service in CALLS:
        assert hoosh.stack_config is not None
        port = getattr(hoosh.stack_config.ports, f"{service}_metrics")
        for (name, labels), count in _scrape(port).items():
            codes = dict(labels).get("grpc_code")
            if name == "grpc_server_handled_total" and codes in ("UNAUTHENTICATED", "PERMISSION_DENIED") and count:
                refused[(service, dict(labels)["grpc_method"], codes)] = count
    assert refused == {}
    # And the router's warm-up did reach the worker (it lists the local models at start).
    port = hoosh.stack_config.ports.inference_metrics
    assert any(
        name == "grpc_server_handled_total" and dict(labels).get("grpc_method") == "ListModels" and count
        for (name, labels), count in _scrape(port).items()
    )


@pytest.mark.parametrize("service", sorted(CALLS))
def test_every_service_refuses_calls_without_credentials(hoosh: RunningStack, service: str, tmp_path: Path) -> None:
    config = hoosh.stack_config
    assert config is not None and config.tls_dir is not None
    call, callers = CALLS[service]
    target = address(hoosh, service)
    others = [name for name in config.internal_tokens if name not in callers]

    async def check() -> None:
        # Plaintext: no TLS handshake, no service.
        async with grpc.aio.insecure_channel(target) as plain:
            assert await code(call(plain, hoosh.credentials(callers[0]))) == grpc.StatusCode.UNAVAILABLE
        # A certificate the stack's CA did not sign, with a valid token: refused in the handshake.
        async with grpc.aio.secure_channel(target, foreign_credentials(tmp_path, hoosh)) as foreign:
            assert await code(call(foreign, hoosh.credentials(callers[0]))) == grpc.StatusCode.UNAVAILABLE
        async with hoosh.channel(target) as channel:
            # Inside the CA but no token, a made-up one, or a calling service this one does not accept.
            assert await code(call(channel, ())) == grpc.StatusCode.UNAUTHENTICATED
            assert await code(call(channel, bearer("sk-hoosh-not-an-internal-token"))) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            for other in others:
                assert await code(call(channel, hoosh.credentials(other))) == grpc.StatusCode.UNAUTHENTICATED, other
            # Its callers get through.
            for caller in callers:
                assert await code(call(channel, hoosh.credentials(caller))) == grpc.StatusCode.OK, caller
            # The health service stays open to anyone inside the CA (probes).
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    asyncio.run(check())


def test_the_router_may_call_only_what_a_reservation_needs(hoosh: RunningStack) -> None:
    """The router holds a budget token for reservations. With it, every other method of
    the budget service (every one the proto declares, so a new one is covered) is
    refused before its request is read: no pool created, resized, reset or deleted, no
    usage reported, no costs read, no admin action recorded. The edge's token is
    refused none of them."""
    service = budget_pb2.DESCRIPTOR.services_by_name["BudgetService"]
    allowed = {"Reserve", "Commit", "Release", "Renew", "GetPool"}
    assert allowed < {method.name for method in service.methods}

    async def check() -> None:
        async with hoosh.channel(hoosh.budget_addr) as channel:
            for method in service.methods:
                request_class = getattr(budget_pb2, method.input_type.name, None)
                if request_class is None:  # defined in another proto (the admin action)
                    from hoosh.events.v1 import events_pb2

                    request_class = getattr(events_pb2, method.input_type.name)
                call = channel.unary_unary(
                    f"/{service.full_name}/{method.name}",
                    request_serializer=request_class.SerializeToString,
                    response_deserializer=lambda data: data,
                )
                as_router = await code(call(request_class(), metadata=hoosh.credentials("router"), timeout=10))
                if method.name in allowed:
                    assert as_router != grpc.StatusCode.PERMISSION_DENIED, method.name
                    assert as_router != grpc.StatusCode.UNAUTHENTICATED, method.name
                else:
                    assert as_router == grpc.StatusCode.PERMISSION_DENIED, method.name
                if method.name in ("GetPool", "ListPools", "GetCosts"):  # read-only: safe to call as the edge
                    as_edge = await code(call(request_class(), metadata=hoosh.credentials("edge"), timeout=10))
                    assert as_edge not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)

    asyncio.run(check())
