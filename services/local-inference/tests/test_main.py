"""The service as a real process: it loads the model, reports SERVING, answers,
and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hoosh.chat.v1 import chat_pb2
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh_inference.config import DEFAULT_MODEL_ID
from hoosh_inference.server import SERVICE_NAME


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_service_process_serves_after_loading_and_stops_on_sigterm() -> None:
    address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "HOOSH_INFERENCE_LISTEN": address,
        "HOOSH_INFERENCE_ENGINE": "llama.cpp",
        "HOOSH_INFERENCE_THREADS": "1",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hoosh_inference", env=env, stderr=asyncio.subprocess.PIPE
    )
    channel = grpc.aio.insecure_channel(address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        status = None
        for _ in range(600):  # bounded, so a broken start fails instead of hanging
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1)
                status = reply.status
                break
            except grpc.aio.AioRpcError:
                assert process.returncode is None, "the service exited during start-up"
                await asyncio.sleep(0.05)
        assert status == health_pb2.HealthCheckResponse.SERVING

        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        models = await stub.ListModels(inference_pb2.ListModelsRequest())
        assert [m.id for m in models.models] == [DEFAULT_MODEL_ID]
        reply = await stub.Generate(
            inference_pb2.GenerateRequest(
                model=DEFAULT_MODEL_ID,
                messages=[chat_pb2.ChatMessage(role="user", text="Hello!")],
                sampling=chat_pb2.SamplingParams(max_tokens=4, temperature=0),
            )
        )
        assert reply.usage.completion_tokens > 0

        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        logs = await asyncio.wait_for(process.stderr.read(), 60)
        assert await asyncio.wait_for(process.wait(), 60) == 0
        assert b'"model loaded"' in logs
    finally:
        await channel.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
