"""python -m hoosh_router: build backends, Redis, metering (budget store or client,
key limiter) and event publisher once, start the health board, then serve."""

from __future__ import annotations

import asyncio
import logging
import sys

import nats
from hoosh.router.v1 import router_pb2_grpc
from hoosh_common.grpc_server import configure_plane, internal_channel, new_server, serve
from hoosh_common.logs import configure_logging
from hoosh_common.metrics import serve_metrics
from hoosh_common.runtime import run
from hoosh_common.telemetry import configure_tracing
from hoosh_metering.client import BudgetServiceClient
from hoosh_metering.errors import BudgetError
from hoosh_metering.limits import KeyGate, KeyLimiter
from hoosh_metering.pools import BudgetStore
from hoosh_metering.redis import RedisClient, connect_redis
from pydantic import ValidationError

from . import metrics
from .backends.base import Backend
from .backends.factory import build_backend
from .budget_client import BudgetBackend, RouterBudget
from .cache import ResponseCache
from .chat import ChatService
from .config import BUDGET_RPC_TIMEOUT_SECONDS, ProviderConfig, RouterSettings, load_catalogue
from .dispatch import Dispatcher, RetryPolicy
from .embeddings import EmbeddingService
from .health import HealthBoard
from .ratelimit import RateLimiter
from .recording import Recorder
from .routing import ModelRouter
from .server import RouterServicer

log = logging.getLogger("hoosh_router")


async def _start_store(store: BudgetStore) -> None:
    """Load the pool directory and listen for its changes, retrying while Redis is away
    (requests meanwhile get 503 budget_unavailable; the store also loads lazily)."""
    while True:
        try:
            await store.start()
            return
        except BudgetError as error:
            log.warning("budget store not started yet; retrying", extra={"error": error.message})
            await asyncio.sleep(2)


def budget_store(settings: RouterSettings, redis_client: RedisClient) -> BudgetStore:
    """The budget library in-process, as the budget service would run it: the same key
    prefix and the same expiry policy (HOOSH_BUDGET_EXPIRY_POLICY)."""
    return BudgetStore(
        redis_client,
        settings.budget_key_prefix,
        settings.router_lease_seconds,
        expiry_policy=settings.budget_expiry_policy,
    )


async def main(settings: RouterSettings | None = None) -> None:
    settings = settings or RouterSettings()
    configure_logging("router")
    configure_tracing("router")
    # Before any channel or server: the edge alone calls the router.
    configure_plane(settings.internal_plane("router", callers=["edge"]))
    serve_metrics(settings.router_metrics_listen)
    catalogue = load_catalogue(settings.config)

    entries: list[tuple[ProviderConfig, Backend]] = [
        (provider, build_backend(provider, settings.inference_addr)) for provider in catalogue.providers
    ]
    routing = catalogue.routing
    router = ModelRouter(entries, catalogue.routes, strategy=routing.strategy)
    for _, backend in entries:
        await backend.list_models()  # warms context lengths of local models; failures are fine here

    # One client for budget, key limits, health, provider limits and cache (one node or a
    # cluster); bounded so a burst cannot exhaust Redis, with socket timeouts so a slow
    # Redis fails fast: 503 budget_unavailable for budgets, local/off for the rest.
    redis_client = connect_redis(
        settings.redis_url,
        socket_timeout=settings.router_redis_timeout_seconds,
        socket_connect_timeout=settings.router_redis_timeout_seconds,
    )
    health = HealthBoard(
        redis_client,
        settings.router_key_prefix,
        [(config, backend) for config, backend in entries if config.enabled],
        catalogue.health,
        latency_alpha=routing.latency_alpha,
    )
    router.set_latency_source(health.latency)
    metrics.register_state(health, [config.name for config, _ in entries if config.enabled])
    limiter = RateLimiter(redis_client, settings.router_key_prefix)
    cache = ResponseCache(redis_client, settings.router_key_prefix, catalogue.cache)
    await health.start()

    nc = await nats.connect(settings.nats_url, name="hoosh-router", max_reconnect_attempts=-1)
    js = nc.jetstream()
    await settings.declare_stream(js, settings.nats_stream, settings.subject_prefix)
    publisher = settings.event_publisher(nc, js, settings.nats_stream, settings.subject_prefix, "router")
    await publisher.start()  # drains what an earlier process left in the outbox

    budget_channel = internal_channel(settings.budget_addr)
    budget_backend: BudgetBackend
    store: BudgetStore | None = None
    starter: asyncio.Task[None] | None = None
    if settings.router_budget_mode == "redis":
        store = budget_store(settings, redis_client)
        budget_backend = store
        starter = asyncio.create_task(_start_store(store), name="budget-directory")
    else:
        budget_backend = BudgetServiceClient(budget_channel, timeout=BUDGET_RPC_TIMEOUT_SECONDS)
    budget = RouterBudget(budget_backend, settings.router_lease_seconds)
    gate = KeyGate(KeyLimiter(redis_client, settings.budget_key_prefix))
    recorder = Recorder(budget, publisher, gate, catalogue.providers)
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
        if starter is not None:
            starter.cancel()
        await health.stop()
        # Settlements still being retried get a bounded wait; leases settle the rest.
        await recorder.drain(settings.router_commit_drain_seconds)
        await cache.drain()
        await limiter.drain()
        if store is not None:
            await store.close()
        await publisher.close(grace=5.0)  # no event is lost: what NATS does not take stays in the outbox
        await nc.drain()
        await budget_channel.close()
        await redis_client.aclose()
        for _, backend in entries:
            await backend.close()

    log.info("router starting", extra={"providers": [p.name for p in catalogue.providers]})
    # Not ready (no new work routed here) while events could not be kept; live all along.
    await serve(
        server,
        settings.router_listen,
        ["hoosh.router.v1.RouterService"],
        on_stop=on_stop,
        ready=lambda: publisher.healthy,
    )


def cli() -> None:
    try:
        settings = RouterSettings()
    except ValidationError as exc:  # fail fast, before binding
        sys.exit(f"hoosh-router: bad settings: {exc}")
    run(main(settings))


if __name__ == "__main__":
    cli()
