"""python -m hoosh_router: build backends, Redis, budget client and event publisher
once, start the health board, then serve."""

from __future__ import annotations

import logging

import nats
import redis.asyncio as redis
from hoosh.router.v1 import router_pb2_grpc
from hoosh_budget.client import BudgetBackend, BudgetServiceClient
from hoosh_budget.pools import BudgetStore
from hoosh_common.eventbus import EventPublisher, ensure_stream
from hoosh_common.grpc_server import insecure_channel, new_server, serve
from hoosh_common.logs import configure_logging
from hoosh_common.runtime import run
from hoosh_common.telemetry import configure_tracing
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from .backends.base import Backend
from .backends.factory import build_backend
from .budget_client import RouterBudget
from .cache import ResponseCache
from .chat import ChatService
from .config import ProviderConfig, RouterSettings, load_catalogue
from .dispatch import Dispatcher, RetryPolicy
from .embeddings import EmbeddingService
from .health import HealthBoard
from .ratelimit import RateLimiter
from .recording import Recorder
from .routing import ModelRouter
from .server import RouterServicer

log = logging.getLogger("hoosh_router")


async def main() -> None:
    settings = RouterSettings()
    configure_logging("router")
    configure_tracing("router")
    catalogue = load_catalogue(settings.config)

    entries: list[tuple[ProviderConfig, Backend]] = [
        (provider, build_backend(provider, settings.inference_addr)) for provider in catalogue.providers
    ]
    routing = catalogue.routing
    router = ModelRouter(entries, catalogue.routes, strategy=routing.strategy)
    for _, backend in entries:
        await backend.list_models()  # warms context lengths of local models; failures are fine here

    # One pool for budget, health, limits and cache; bounded so a burst cannot exhaust Redis.
    # A Redis outage must fail fast (health, limits and cache then degrade to local/off),
    # not hold every request in redis-py's default multi-second reconnect backoff.
    redis_client = redis.Redis.from_pool(
        redis.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=64,
            timeout=5,
            socket_connect_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        )
    )
    health = HealthBoard(
        redis_client,
        settings.router_key_prefix,
        [(config, backend) for config, backend in entries if config.enabled],
        catalogue.health,
        latency_alpha=routing.latency_alpha,
    )
    router.set_latency_source(health.latency)
    limiter = RateLimiter(redis_client, settings.router_key_prefix)
    cache = ResponseCache(redis_client, settings.router_key_prefix, catalogue.cache)
    await health.start()

    nc = await nats.connect(settings.nats_url, name="hoosh-router", max_reconnect_attempts=-1)
    js = nc.jetstream()
    await ensure_stream(js, settings.nats_stream, settings.subject_prefix)
    publisher = EventPublisher(nc, js, settings.nats_stream, settings.subject_prefix)

    budget_channel = insecure_channel(settings.budget_addr)
    backend: BudgetBackend
    if settings.router_budget_mode == "redis":
        backend = BudgetStore(redis_client, settings.budget_key_prefix, settings.router_lease_seconds)
    else:
        backend = BudgetServiceClient(budget_channel)
    budget = RouterBudget(backend, settings.router_lease_seconds)
    recorder = Recorder(budget, publisher)
    dispatcher = Dispatcher(
        router,
        health,
        limiter,
        RetryPolicy(routing.retry),
        upstream_timeout=settings.router_upstream_timeout_seconds,
        request_timeout=routing.request_timeout_seconds or settings.router_upstream_timeout_seconds,
        fallback=routing.fallback,
    )
    chat = ChatService(dispatcher, recorder, cache)
    server = new_server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(
        RouterServicer(chat, router, embeddings=EmbeddingService(dispatcher, recorder), health=health, cache=cache),
        server,
    )

    async def on_stop() -> None:
        await health.stop()
        await cache.drain()
        await limiter.drain()
        await publisher.drain()  # no event is lost on shutdown
        await nc.drain()
        await budget_channel.close()
        await redis_client.aclose()
        for _, backend in entries:
            await backend.close()

    log.info("router starting", extra={"providers": [p.name for p in catalogue.providers]})
    await serve(server, settings.router_listen, ["hoosh.router.v1.RouterService"], on_stop=on_stop)


if __name__ == "__main__":
    run(main())
