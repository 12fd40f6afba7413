"""The router sends no work to a local worker that says it is overloaded: the real
local-inference process (llama.cpp, the bundled SmolLM2) started with a tiny overload
bound (``HOOSH_INFERENCE_OVERLOAD_QUEUE=1``: overloaded from one waiting request), kept
busy by long generations sent to it directly; the router's health board polls its
GetStatus and, while it says so, requests for the model go to the next candidate (the
OpenAI stand-in), a request only it could serve is refused 503 with a generic reason
(the worker's own, its queue and GPU memory, are for logs and admins), and once the
worker drains it serves again. Its hardware reaches the router's GetHardware, its status
GetProviderHealth. A worker out of memory (the real engine and servicer in-process, told
of an engine OOM as the engine would raise it) is refused for the rest of its hold, and
Retry-After says so.

Everything real: the worker over gRPC, Redis, NATS, the budget library."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis
from hoosh.chat.v1 import chat_pb2
from hoosh.inference.v1 import inference_pb2, inference_pb2_grpc
from hoosh.router.v1 import router_pb2
from hoosh_cli.stack import free_port
from hoosh_inference.config import bundled_gguf
from hoosh_inference.errors import EngineFailure
from hoosh_inference.llama_engine import LlamaEngine
from hoosh_inference.load import LoadMonitor
from hoosh_inference.server import InferenceServicer
from hoosh_metering.limits import KeyGate, KeyLimiter
from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_router.backends.base import Backend
from hoosh_router.backends.factory import build_backend
from hoosh_router.budget_client import RouterBudget
from hoosh_router.chat import ChatService
from hoosh_router.config import Catalogue, ProviderConfig
from hoosh_router.dispatch import Dispatcher, RetryPolicy
from hoosh_router.errors import NoHealthyBackend
from hoosh_router.health import HealthBoard
from hoosh_router.ratelimit import RateLimiter
from hoosh_router.recording import Recorder
from hoosh_router.routing import ModelRouter
from hoosh_router.workers import workers_hardware

from bench.upstream import OpenAIUpstream

from .conftest import Bus
from .helpers import user

LOCAL_MODEL = "smollm2-135m-instruct"
SYNC_SECONDS = 0.1  # the board polls the worker's status this often


@dataclass
class Worker:
    address: str
    process: subprocess.Popen[bytes]
    log: Path


def start_worker(directory: Path, **env: str) -> Worker:
    """``python -m hoosh_inference`` on a free port, answering once its model is loaded."""
    port = free_port()
    environ = {
        **os.environ,
        "HOOSH_INFERENCE_LISTEN": f"127.0.0.1:{port}",
        "HOOSH_INFERENCE_METRICS_LISTEN": "",
        "HOOSH_INFERENCE_THREADS": "2",
        **env,
    }
    log = directory / "inference.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "hoosh_inference"], env=environ, stdout=out, stderr=out)
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            try:
                stub.ListModels(inference_pb2.ListModelsRequest(), timeout=2)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the local worker never answered"
                time.sleep(0.2)
    return Worker(address, process, log)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    running = start_worker(
        tmp_path_factory.mktemp("inference"), HOOSH_INFERENCE_OVERLOAD_QUEUE="1", HOOSH_INFERENCE_MAX_QUEUE="8"
    )
    try:
        yield running
    finally:
        running.process.terminate()
        running.process.wait(30)


@dataclass
class Rig:
    chat: ChatService
    health: HealthBoard
    store: BudgetStore
    recorder: Recorder
    entries: list[tuple[ProviderConfig, Backend]]


@contextlib.asynccontextmanager
async def router_over(
    redis_client: redis.Redis, prefix: str, bus: Bus, address: str, providers: list[dict[str, object]]
) -> AsyncIterator[Rig]:
    """The router's request path over these providers (local ones on the worker at
    ``address``); the health board running (it polls)."""
    catalogue = Catalogue.model_validate(
        {
            "providers": providers,
            "routing": {"retry": {"max_attempts": 1}},
            "health": {"failure_threshold": 100, "probe_interval_seconds": 0, "sync_interval_seconds": SYNC_SECONDS},
            "cache": {"enabled": False},
        }
    )
    entries = [(config, build_backend(config, address)) for config in catalogue.providers]
    for _, backend in entries:
        await backend.list_models()
    store = BudgetStore(redis_client, f"{prefix}budget:", 60)
    recorder = Recorder(RouterBudget(store, 60), bus.publisher, KeyGate(KeyLimiter(redis_client, f"{prefix}budget:")))
    board = HealthBoard(redis_client, prefix, entries, catalogue.health)
    await board.start()
    dispatcher = Dispatcher(
        ModelRouter(entries, catalogue.routes),
        board,
        RateLimiter(redis_client, prefix),
        RetryPolicy(catalogue.routing.retry),
        upstream_timeout=60,
        request_timeout=60,
    )
    try:
        yield Rig(ChatService(dispatcher, recorder), board, store, recorder, entries)
    finally:
        await board.stop()
        await recorder.drain(10)
        await store.close()
        for _, backend in entries:
            await backend.close()


@pytest.fixture
async def rig(
    redis_client: redis.Redis, prefix: str, bus: Bus, openai_up: OpenAIUpstream, worker: Worker
) -> AsyncIterator[Rig]:
    """Two candidates for the local model: the worker first (priority 1), the OpenAI
    stand-in next."""
    providers: list[dict[str, object]] = [
        {"name": "local", "type": "local", "models": [LOCAL_MODEL], "priority": 1},
        {"name": "cloud", "type": "openai", "base_url": openai_up.base_url, "models": [LOCAL_MODEL], "priority": 5},
    ]
    async with router_over(redis_client, prefix, bus, worker.address, providers) as running:
        yield running


def ask(model: str, pool: str) -> router_pb2.ChatRequest:
    request = router_pb2.ChatRequest(model=model, messages=[user("Say hi.")], pool=pool, include_usage=True)
    request.sampling.max_tokens = 4
    return request


def long_generation() -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        model=LOCAL_MODEL,
        messages=[chat_pb2.ChatMessage(role="user", text="Write a very long story about a dragon and a knight.")],
    )
    request.sampling.max_tokens = 400
    return request


async def until(condition: Callable[[], Awaitable[bool]], what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not await condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def busy(worker: Worker, streams: int = 6) -> AsyncIterator[inference_pb2_grpc.InferenceServiceStub]:
    """Long generations sent straight to the worker (one generating, the rest waiting),
    cancelled on the way out; yields a stub to the worker."""
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        calls = [stub.GenerateStream(long_generation()) for _ in range(streams)]
        readers = [asyncio.ensure_future(call.read()) for call in calls]
        try:
            yield stub
        finally:
            for call in calls:
                call.cancel()
            for reader in readers:
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await reader


async def test_an_overloaded_worker_gets_no_work_until_it_recovers(
    rig: Rig, worker: Worker, openai_up: OpenAIUpstream
) -> None:
    pool = f"p{uuid.uuid4().hex[:10]}"
    await rig.store.create_pool(PoolSpec(name=pool, capacity=1_000_000))

    async def served_by() -> str:
        return (await rig.chat.chat(ask(LOCAL_MODEL, pool), uuid.uuid4().hex)).provider

    assert await served_by() == "local"  # the first candidate, while it takes work

    async with busy(worker) as stub:

        async def overloaded() -> bool:
            return (await stub.GetStatus(inference_pb2.GetStatusRequest())).overloaded

        await until(overloaded, "the worker to say it is overloaded")
        await until(lambda: asyncio.sleep(0, rig.health.refusal("local") is not None), "the router to hear it")
        status = await stub.GetStatus(inference_pb2.GetStatusRequest())
        assert status.queue_depth >= status.overload_queue == 1

        before = openai_up.stats.requests
        assert await served_by() == "cloud"
        chunks = [chunk async for chunk in rig.chat.stream(ask(LOCAL_MODEL, pool), uuid.uuid4().hex)]
        assert chunks[0].provider == "cloud"
        assert openai_up.stats.requests == before + 2  # both went to the stand-in, neither to the worker

        # A request only the worker could serve is refused with a generic reason (no queue
        # depths or bounds: those are for logs and admins) and a retry hint.
        with pytest.raises(NoHealthyBackend) as refused:
            await rig.chat.chat(ask(f"local/{LOCAL_MODEL}", pool), uuid.uuid4().hex)
        message = refused.value.message
        assert message.endswith("the local model is overloaded; retry shortly"), message
        assert "waiting" not in message and "bound" not in message and "'local'" not in message
        assert refused.value.retry_after == 1
        assert refused.value.status == grpc.StatusCode.UNAVAILABLE

        # The details are the admin's: GetProviderHealth's workers carry them.
        (state,) = rig.health.worker_states()
        assert (state.address, list(state.providers), state.error) == (worker.address, ["local"], "")
        assert state.status.overloaded and "waiting" in state.status.reason and state.retry_after_seconds == 1
        assert state.polled_at_ms > 0

        # The hardware the router reports carries the worker's last status.
        report = await workers_hardware(rig.entries)
        (entry,) = report.workers
        assert (entry.address, list(entry.providers), entry.error) == (worker.address, ["local"], "")
        assert entry.status.overloaded and entry.hardware.cpu_count >= 1

    # Drained: the worker says so at the next poll and serves again.
    await until(lambda: asyncio.sleep(0, rig.health.refusal("local") is None), "the worker to recover")
    assert await served_by() == "local"
    assert rig.health.state_of("local") == "closed"  # refusing work was never counted as a failure


async def test_a_worker_that_does_not_answer_is_an_error_entry(worker: Worker) -> None:
    config = ProviderConfig(name="gone", type="local", models=[LOCAL_MODEL])
    backend = build_backend(config, f"127.0.0.1:{free_port()}")
    try:
        report = await workers_hardware([(config, backend)], wait_seconds=2)
    finally:
        await backend.close()
    (entry,) = report.workers
    assert entry.error.startswith("the worker did not answer") and not entry.HasField("hardware")


class OutOfMemoryError(RuntimeError):
    """torch.OutOfMemoryError as torch defines it (matched by class name and module)."""


OutOfMemoryError.__module__ = "torch"


def engine_out_of_memory() -> EngineFailure:
    """What an engine raises when CUDA runs out: EngineFailure from torch's error."""
    try:
        try:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except OutOfMemoryError as cause:
            raise EngineFailure("The local model failed while generating.") from cause
    except EngineFailure as failure:
        return failure


@dataclass
class HeldWorker:
    address: str
    load: LoadMonitor


@pytest.fixture
async def held_worker() -> AsyncIterator[HeldWorker]:
    """The real engine and servicer in-process, with a 30 s out-of-memory hold."""
    path = bundled_gguf()
    assert path is not None
    engine = await asyncio.to_thread(
        LlamaEngine, model_id=LOCAL_MODEL, model_path=path, n_ctx=512, n_threads=1, max_queue=4
    )
    load = LoadMonitor(engine, overload_queue=4, oom_hold_seconds=30)
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(engine, load=load), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield HeldWorker(f"127.0.0.1:{port}", load)
    finally:
        await server.stop(None)
        await engine.close()


async def test_a_worker_out_of_memory_is_refused_for_the_rest_of_its_hold(
    redis_client: redis.Redis, prefix: str, bus: Bus, held_worker: HeldWorker
) -> None:
    providers: list[dict[str, object]] = [{"name": "local", "type": "local", "models": [LOCAL_MODEL]}]
    async with router_over(redis_client, prefix, bus, held_worker.address, providers) as rig:
        pool = f"p{uuid.uuid4().hex[:10]}"
        await rig.store.create_pool(PoolSpec(name=pool, capacity=1_000_000))
        assert (await rig.chat.chat(ask(LOCAL_MODEL, pool), uuid.uuid4().hex)).provider == "local"

        held_worker.load.record_failure(engine_out_of_memory())
        await until(lambda: asyncio.sleep(0, rig.health.refusing("local") == "out_of_memory"), "the router to hear it")
        with pytest.raises(NoHealthyBackend) as refused:
            await rig.chat.chat(ask(LOCAL_MODEL, pool), uuid.uuid4().hex)
        message = refused.value.message
        assert message.endswith("the local model is temporarily unavailable"), message
        assert "memory" not in message and "OutOfMemoryError" not in message
        # Retry-After: the rest of the 30 s hold, not "1".
        assert 25 <= (refused.value.retry_after or 0) <= 30, refused.value.retry_after

        (state,) = rig.health.worker_states()
        assert state.status.out_of_memory and "ran out of memory" in state.status.reason
        assert 25 <= state.retry_after_seconds <= 30
        assert rig.health.state_of("local") == "closed"  # refusing work is no failure
