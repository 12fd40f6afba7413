"""Run the local-inference service: read settings, load the model once, serve.

The gRPC port is bound (and health turns SERVING) only after the model has
loaded, so a probe never routes traffic to a worker that cannot answer yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from hoosh.inference.v1 import inference_pb2_grpc
from hoosh_common.grpc_server import configure_plane, new_server, serve
from hoosh_common.logs import configure_logging
from hoosh_common.metrics import serve_metrics
from hoosh_common.runtime import run
from hoosh_common.telemetry import configure_tracing
from pydantic import ValidationError

from . import hardware
from .config import InferencePlaneSettings, InferenceSettings
from .engine import Engine
from .load import LoadMonitor
from .server import SERVICE_NAME, InferenceServicer

SERVICE = "local-inference"
log = logging.getLogger("hoosh_inference")


async def build_engine(settings: InferenceSettings, info: hardware.HostFacts) -> Engine:
    """Load the model with the engine the settings and the hardware call for."""
    choice = hardware.choose_engine(
        settings.engine,
        has_gpu=bool(info.gpus),
        vllm_available=hardware.vllm_installed(),
        vllm_model=settings.vllm_model,
    )
    log.info(
        "loading model",
        extra={"engine": choice, "model_id": settings.model_id, "gpus": [gpu.name for gpu in info.gpus]},
    )
    if choice == "vllm":
        from .vllm_engine import VllmEngine

        return await VllmEngine.start(
            model_id=settings.model_id,
            model=settings.vllm_model,
            max_model_len=settings.vllm_max_model_len,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            max_in_flight=settings.max_queue,
        )
    from .llama_engine import LlamaEngine

    return await asyncio.to_thread(
        LlamaEngine,
        model_id=settings.model_id,
        model_path=settings.gguf_path(),
        n_ctx=settings.n_ctx,
        n_threads=settings.threads or info.cpu_count,
        max_queue=settings.max_queue,
    )


async def amain(settings: InferenceSettings) -> None:
    info = await asyncio.to_thread(hardware.probe)
    engine = await build_engine(settings, info)
    load = LoadMonitor(
        engine,
        overload_queue=settings.overload_queue or settings.max_queue,
        # No GPU at start, none later: nothing to sample.
        gpu_memory_floor_bytes=settings.gpu_memory_floor_bytes if info.gpus else 0,
        oom_hold_seconds=settings.oom_hold_seconds,
    )
    sampler = asyncio.create_task(load.run(settings.status_sample_seconds), name="gpu-memory-sampler")
    server = new_server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(engine, load=load), server)

    async def on_stop() -> None:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await engine.close()

    await serve(server, settings.listen, [SERVICE_NAME], on_stop=on_stop)


def main() -> None:
    try:
        settings = InferenceSettings()
        plane = InferencePlaneSettings()
    except ValidationError as exc:
        configure_logging(SERVICE)
        log.error("invalid settings", extra={"errors": exc.errors(include_url=False, include_input=False)})
        raise SystemExit(2) from None
    configure_logging(SERVICE, settings.log_level)
    configure_tracing(SERVICE)  # before any gRPC server is built: new_server() reads it
    configure_plane(plane.internal_plane(SERVICE, callers=["router"]))
    try:
        # Bound before the model loads: a taken port fails at once, not minutes later.
        serve_metrics(settings.metrics_listen)
    except (OSError, ValueError) as exc:
        log.error("cannot serve metrics", extra={"address": settings.metrics_listen, "error": str(exc)})
        raise SystemExit(2) from None
    run(amain(settings))


if __name__ == "__main__":
    main()
