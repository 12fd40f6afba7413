"""The service as a real process: it loads the model, reports SERVING, answers,
serves /metrics on its own port, logs the generation joined to the caller's request id
and trace id, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
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

from .conftest import scrape, value

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_service_process_serves_after_loading_and_stops_on_sigterm() -> None:
    address = f"127.0.0.1:{free_port()}"
    metrics_port = free_port()
    env = {
        **os.environ,
        "HOOSH_INFERENCE_LISTEN": address,
        "HOOSH_INFERENCE_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
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
            ),
            metadata=(("x-request-id", "req-main-1"), ("traceparent", f"00-{TRACE_ID}-b7ad6b7169203331-01")),
        )
        assert reply.usage.completion_tokens > 0
        samples = await scrape(metrics_port)
        series = {"gen_ai_operation_name": "chat", "gen_ai_request_model": DEFAULT_MODEL_ID}
        assert value(samples, "gen_ai_server_request_duration_seconds_count", **series, error_type="") == 1
        assert value(samples, "hoosh_engine_generated_tokens_total", model=DEFAULT_MODEL_ID) == (
            reply.usage.completion_tokens
        )
        assert value(samples, "hoosh_engine_queue_depth", model=DEFAULT_MODEL_ID) == 0

        process.send_signal(signal.SIGTERM)
        assert process.stderr is not None
        logs = await asyncio.wait_for(process.stderr.read(), 60)
        assert await asyncio.wait_for(process.wait(), 60) == 0
        assert b'"model loaded"' in logs
        lines = [json.loads(line) for line in logs.splitlines() if line.startswith(b"{")]
        [finished] = [line for line in lines if line["msg"] == "generation finished"]
        assert (finished["request_id"], finished["trace_id"]) == ("req-main-1", TRACE_ID)
        assert finished["service"] == "local-inference"
    finally:
        await channel.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
