"""The internal plane on a real grpc.aio server and client (loopback): callers known by
their tokens, methods reserved to some callers, health open, unknown callers refused
before their request is parsed, and mutual TLS from a development CA (certificates
renewed in place are picked up by new connections)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hoosh_cli.stack import free_port
from hoosh_common import grpc_server, internal_auth
from hoosh_common.devca import make_ca, still_valid
from hoosh_common.internal_auth import CallerPolicy, parse_callers
from hoosh_common.internal_plane import InternalPlane, InternalPlaneSettings, TlsFiles
from hoosh_common.telemetry import request_metadata
from prometheus_client import REGISTRY

SERVICE = "hoosh.test.v1.Guarded"
EDGE_TOKEN = "edge-token-0123456789abcdef"
ROUTER_TOKEN = "router-token-0123456789abcdef"
ADMIN = f"/{SERVICE}/Admin"


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"ok:" + request


async def ticks(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield b"tick"


async def gather(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    return str(len([r async for r in requests])).encode()


def policy() -> CallerPolicy:
    callers = parse_callers(f"edge={EDGE_TOKEN},router=sha256:{hashlib.sha256(ROUTER_TOKEN.encode()).hexdigest()}")
    # The router may call everything but Admin (an allow-list); the edge everything.
    router_methods = frozenset(f"/{SERVICE}/{name}" for name in ("Unary", "Ticks", "Gather"))
    return CallerPolicy(callers, {"router": router_methods})


async def start(server: grpc.aio.Server, port_of: str = "127.0.0.1:0", *, tls: TlsFiles | None = None) -> int:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Admin": grpc.unary_unary_rpc_method_handler(unary),
        "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
        "Gather": grpc.stream_unary_rpc_method_handler(gather),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(port_of, tls.server_credentials()) if tls else server.add_insecure_port(port_of)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return port


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def handled(method: str, code: str) -> float:
    labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": method, "grpc_code": code}
    return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_known_callers_pass_and_everyone_else_is_refused() -> None:
    server = grpc_server.new_server(policy=policy())
    port = await start(server)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/Unary")
            assert await call(b"hi", metadata=bearer(EDGE_TOKEN)) == b"ok:hi"
            assert await call(b"hi", metadata=bearer(ROUTER_TOKEN)) == b"ok:hi"  # known by its digest
            before = handled("Unary", "UNAUTHENTICATED")
            assert await code_of(call(b"hi")) == grpc.StatusCode.UNAUTHENTICATED
            assert await code_of(call(b"hi", metadata=bearer("not-a-known-token-at-all"))) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            assert await code_of(call(b"hi", metadata=(("authorization", EDGE_TOKEN),))) == (
                grpc.StatusCode.UNAUTHENTICATED  # no "Bearer ": not a credential
            )
            assert await code_of(call(b"hi", metadata=(("authorization", f"Basic {EDGE_TOKEN}"),))) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
            # Refusals are counted like calls, once the handler has ended: abort() sends
            # the status first, so the last count may land a moment after it arrived.
            for _ in range(100):
                if handled("Unary", "UNAUTHENTICATED") - before >= 4:
                    break
                await asyncio.sleep(0.01)
            assert handled("Unary", "UNAUTHENTICATED") - before == 4

            admin = channel.unary_unary(ADMIN)
            assert await admin(b"x", metadata=bearer(EDGE_TOKEN)) == b"ok:x"
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await admin(b"x", metadata=bearer(ROUTER_TOKEN))
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "router may not call Admin" in (denied.value.details() or "")

            # Streaming methods of either direction are refused the same way.
            ticks_call = channel.unary_stream(f"/{SERVICE}/Ticks")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                _ = [reply async for reply in ticks_call(b"")]
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert [reply async for reply in ticks_call(b"", metadata=bearer(EDGE_TOKEN))] == [b"tick"] * 3
            gather_call = channel.stream_unary(f"/{SERVICE}/Gather")
            assert await code_of(gather_call(iter([b"a", b"b"]))) == grpc.StatusCode.UNAUTHENTICATED
            assert await gather_call(iter([b"a", b"b"]), metadata=bearer(EDGE_TOKEN)) == b"2"

            # Health stays open: kubelet's probes carry no metadata.
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(0)


async def test_an_unknown_callers_request_is_never_parsed() -> None:
    """A request that cannot even be deserialized is refused as UNAUTHENTICATED, not
    answered with a parse error: the bytes of someone without a token are not read."""
    parsed: list[bytes] = []

    def deserialize(data: bytes) -> bytes:
        parsed.append(data)
        return data

    server = grpc_server.new_server(policy=policy())
    handler = grpc.unary_unary_rpc_method_handler(unary, request_deserializer=deserialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Unary": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/Unary")
            assert await code_of(call(b"\xff" * 1000)) == grpc.StatusCode.UNAUTHENTICATED
            assert parsed == []
            assert await call(b"fine", metadata=bearer(EDGE_TOKEN)) == b"ok:fine"
            assert parsed == [b"fine"]
    finally:
        await server.stop(0)


async def test_request_metadata_carries_this_process_token() -> None:
    server = grpc_server.new_server(policy=policy())
    port = await start(server)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(f"/{SERVICE}/Unary")
            assert await code_of(call(b"x", metadata=request_metadata("req-1"))) == grpc.StatusCode.UNAUTHENTICATED
            internal_auth.present_token(EDGE_TOKEN)
            try:
                assert await call(b"x", metadata=request_metadata("req-1")) == b"ok:x"
            finally:
                internal_auth.present_token(None)
    finally:
        await server.stop(0)


def test_callers_list_is_checked() -> None:
    assert set(parse_callers(f" edge={EDGE_TOKEN} , router={ROUTER_TOKEN},").values()) == {"edge", "router"}
    # An old and a new token for one caller while rotating.
    assert list(parse_callers(f"edge={EDGE_TOKEN},edge={ROUTER_TOKEN}").values()) == ["edge", "edge"]
    for bad in (
        "edge",  # no token
        "edge=short",  # too short to be a credential
        f"Edge={EDGE_TOKEN}",  # identities are lowercase
        "edge=sha256:abc",  # not a digest
        f"edge={EDGE_TOKEN},router={EDGE_TOKEN}",  # two callers, one token
        "edge=$(HOOSH_INTERNAL_TOKEN_EDGE_UNDEFINED)",  # a Kubernetes reference left unexpanded
    ):
        with pytest.raises(ValueError):
            parse_callers(bad)
    with pytest.raises(ValueError):
        internal_auth.present_token("spaces in it are no token")


class ServingSettings(InternalPlaneSettings):
    env: str = "production"


class CallingSettings(InternalPlaneSettings):
    serves_grpc = False
    calls_internal = True
    env: str = "production"


def test_production_refuses_an_open_plane(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HOOSH_INTERNAL_TOKEN", "HOOSH_INTERNAL_CALLERS", "HOOSH_INTERNAL_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOOSH_INTERNAL_PLAINTEXT", "allow")  # TLS is tested below
    with pytest.raises(ValueError, match="HOOSH_INTERNAL_CALLERS is required"):
        ServingSettings()
    with pytest.raises(ValueError, match="HOOSH_INTERNAL_TOKEN is required"):
        CallingSettings()
    monkeypatch.setenv("HOOSH_INTERNAL_CALLERS", f"edge={EDGE_TOKEN}")
    plane = ServingSettings().internal_plane("router", callers=["edge"])
    assert plane.policy is not None and plane.policy.identities == {"edge"}
    token_file = tmp_path / "token"
    token_file.write_text(EDGE_TOKEN + "\n")
    monkeypatch.setenv("HOOSH_INTERNAL_TOKEN_FILE", str(token_file))
    assert CallingSettings().token() == EDGE_TOKEN
    monkeypatch.setenv("HOOSH_INTERNAL_TOKEN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="cannot read"):
        CallingSettings()
    # Placeholder tokens (as in .env.example) pass in development only.
    monkeypatch.delenv("HOOSH_INTERNAL_TOKEN_FILE")
    for placeholder in ("dev-internal-edge-token-change-me", "x" * 32, "sk-hoosh-changeme-0123456789"):
        monkeypatch.setenv("HOOSH_INTERNAL_CALLERS", f"edge={placeholder}")
        with pytest.raises(ValueError, match="placeholder"):
            ServingSettings()
    monkeypatch.setenv("HOOSH_INTERNAL_CALLERS", f"edge={EDGE_TOKEN}")
    # Production without certificates needs the explicit mesh opt-out.
    monkeypatch.delenv("HOOSH_INTERNAL_PLAINTEXT")
    with pytest.raises(ValueError, match="needs mutual TLS"):
        ServingSettings()
    ca = make_ca(tmp_path / "ca", services=["router"])
    monkeypatch.setenv("HOOSH_GRPC_TLS_CERT", str(ca / "router.pem"))
    monkeypatch.setenv("HOOSH_GRPC_TLS_KEY", str(ca / "router-key.pem"))
    monkeypatch.setenv("HOOSH_GRPC_TLS_CA", str(ca / "ca.pem"))
    assert ServingSettings().internal_plane("router", callers=["edge"]).tls is not None
    for name in ("HOOSH_GRPC_TLS_KEY", "HOOSH_GRPC_TLS_CA"):
        monkeypatch.delenv(name)
    # TLS files go together, and must be PEM.
    monkeypatch.setenv("HOOSH_GRPC_TLS_CERT", str(token_file))
    with pytest.raises(ValueError, match="go together"):
        ServingSettings()
    monkeypatch.setenv("HOOSH_GRPC_TLS_KEY", str(token_file))
    monkeypatch.setenv("HOOSH_GRPC_TLS_CA", str(token_file))
    with pytest.raises(ValueError, match="not a PEM file"):
        ServingSettings()


def tls_files(directory: Path, service: str) -> TlsFiles:
    return TlsFiles(directory / f"{service}.pem", directory / f"{service}-key.pem", directory / "ca.pem")


def client_credentials(directory: Path, service: str, ca_directory: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=((ca_directory or directory) / "ca.pem").read_bytes(),
        private_key=(directory / f"{service}-key.pem").read_bytes(),
        certificate_chain=(directory / f"{service}.pem").read_bytes(),
    )


async def tls_code(port: int, credentials: grpc.ChannelCredentials | None, host: str = "localhost") -> grpc.StatusCode:
    target = f"{host}:{port}"
    channel = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
    async with channel:
        return await code_of(channel.unary_unary(f"/{SERVICE}/Unary")(b"x", metadata=bearer(EDGE_TOKEN), timeout=5))


async def test_mutual_tls_needs_a_certificate_from_the_ca(tmp_path: Path) -> None:
    ours, theirs = make_ca(tmp_path / "ours", services=["router", "edge"]), make_ca(tmp_path / "theirs")
    assert still_valid(ours, ["router", "edge"]) and not still_valid(ours, ["stt"])
    mixed = tmp_path / "mixed"
    shutil.copytree(ours, mixed)
    shutil.copy(theirs / "edge.pem", mixed / "edge.pem")  # another CA's certificate
    assert not still_valid(mixed, ["edge"])
    shutil.copy(ours / "edge.pem", mixed / "edge.pem")
    shutil.copy(ours / "router-key.pem", mixed / "edge-key.pem")  # a key that is not the certificate's
    assert not still_valid(mixed, ["edge"])
    server = grpc_server.new_server(policy=policy())
    port = await start(server, tls=tls_files(ours, "router"))
    try:
        assert await tls_code(port, client_credentials(ours, "edge")) == grpc.StatusCode.OK
        assert await tls_code(port, client_credentials(ours, "edge"), host="127.0.0.1") == grpc.StatusCode.OK
        assert await tls_code(port, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
        # A client certificate from another CA, and no client certificate at all.
        assert await tls_code(port, client_credentials(theirs, "edge", ca_directory=ours)) == (
            grpc.StatusCode.UNAVAILABLE
        )
        no_cert = grpc.ssl_channel_credentials(root_certificates=(ours / "ca.pem").read_bytes())
        assert await tls_code(port, no_cert) == grpc.StatusCode.UNAVAILABLE
        # A server whose certificate another CA signed is not trusted by the client.
        assert await tls_code(port, client_credentials(theirs, "edge")) == grpc.StatusCode.UNAVAILABLE

        # Renewed in place (cert-manager swaps the files): new connections use the new ones.
        for name in ("ca.pem", "router.pem", "router-key.pem"):
            shutil.copy(theirs / name, ours / name)
        assert await tls_code(port, client_credentials(theirs, "edge")) == grpc.StatusCode.OK
        assert await tls_code(port, client_credentials(ours, "edge", ca_directory=theirs)) == (
            grpc.StatusCode.UNAVAILABLE  # the old CA's client certificate no longer passes
        )
    finally:
        await server.stop(0)


async def test_serve_keeps_a_plaintext_health_port_beside_tls(tmp_path: Path) -> None:
    """With TLS on, serve() adds a health-only plaintext port for kubelet's probes; the
    service's own methods are not reachable there."""
    directory = make_ca(tmp_path / "ca", services=["router", "edge"])
    health_port, port = free_port(), free_port()
    previous = grpc_server._plane
    grpc_server.configure_plane(
        InternalPlane(
            service="router",
            policy=policy(),
            tls=tls_files(directory, "router"),
            health_listen=f"127.0.0.1:{health_port}",
        )
    )
    try:
        server = grpc_server.new_server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}),)
        )
        serving = asyncio.create_task(grpc_server.serve(server, f"127.0.0.1:{port}", [SERVICE]))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as plain:
            for _ in range(100):
                try:
                    reply = await health_pb2_grpc.HealthStub(plain).Check(
                        health_pb2.HealthCheckRequest(service=SERVICE), timeout=1
                    )
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            assert await code_of(plain.unary_unary(f"/{SERVICE}/Unary")(b"x", metadata=bearer(EDGE_TOKEN))) == (
                grpc.StatusCode.UNIMPLEMENTED
            )
        assert await tls_code(port, client_credentials(directory, "edge")) == grpc.StatusCode.OK
        assert await tls_code(port, None) == grpc.StatusCode.UNAVAILABLE
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        await server.stop(0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as plain:  # closed with the server
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(), timeout=1)
    finally:
        grpc_server.configure_plane(previous)
