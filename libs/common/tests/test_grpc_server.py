"""serve()'s readiness: the named services follow ``ready``; the process stays live."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hoosh_cli.stack import free_port
from hoosh_common.grpc_server import new_server, serve

SERVICE = "hoosh.test.v1.Thing"


async def status(stub: health_pb2_grpc.HealthStub, name: str) -> int:
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
    return int(reply.status)


async def test_named_services_follow_readiness_and_the_process_stays_live() -> None:
    ready = True
    port = free_port()
    server = new_server()
    task = asyncio.create_task(
        serve(server, f"127.0.0.1:{port}", [SERVICE], ready=lambda: ready, ready_interval_seconds=0.05)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(100):  # until it listens
                with contextlib.suppress(grpc.aio.AioRpcError):
                    if await status(stub, SERVICE) == health_pb2.HealthCheckResponse.SERVING:
                        break
                await asyncio.sleep(0.05)
            ready = False
            for _ in range(100):
                if await status(stub, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.02)
            assert await status(stub, SERVICE) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await status(stub, "") == health_pb2.HealthCheckResponse.SERVING  # live
            ready = True
            for _ in range(100):
                if await status(stub, SERVICE) == health_pb2.HealthCheckResponse.SERVING:
                    break
                await asyncio.sleep(0.02)
            assert await status(stub, SERVICE) == health_pb2.HealthCheckResponse.SERVING
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop(0)
