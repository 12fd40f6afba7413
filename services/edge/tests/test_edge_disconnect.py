"""A client disconnect cancels the upstream gRPC call.

The call is a real server-streaming RPC (grpc.health.v1 Watch, which never ends on its
own) on an in-process grpc.aio server; ``receive`` is an ASGI receive channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hoosh_edge.serving_chat import DisconnectWatch


@pytest.fixture
async def health_stub() -> AsyncIterator[health_pb2_grpc.HealthStub]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("svc", health_pb2.HealthCheckResponse.SERVING)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield health_pb2_grpc.HealthStub(channel)
    await channel.close()
    await server.stop(None)


class AsgiReceive:
    """An ASGI receive channel: blocks until the test disconnects the client."""

    def __init__(self) -> None:
        self._gone = asyncio.Event()

    def disconnect(self) -> None:
        self._gone.set()

    async def __call__(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}


async def test_disconnect_cancels_the_call(health_stub: health_pb2_grpc.HealthStub) -> None:
    call = health_stub.Watch(health_pb2.HealthCheckRequest(service="svc"))
    first = await call.read()
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    receive = AsgiReceive()
    watch = DisconnectWatch(receive, call)
    pending_read = asyncio.ensure_future(call.read())
    await asyncio.sleep(0.05)
    assert not call.done()
    receive.disconnect()
    with pytest.raises(asyncio.CancelledError):
        await pending_read
    assert watch.fired
    assert call.cancelled()
    watch.stop()


async def test_stopped_watch_leaves_the_call_alone(health_stub: health_pb2_grpc.HealthStub) -> None:
    call = health_stub.Watch(health_pb2.HealthCheckRequest(service="svc"))
    await call.read()
    receive = AsgiReceive()
    watch = DisconnectWatch(receive, call)
    watch.stop()
    await asyncio.sleep(0)
    receive.disconnect()
    await asyncio.sleep(0.05)
    assert not watch.fired
    assert not call.done()
    call.cancel()
