"""python -m hoosh_router: build backends, budget client and event publisher once, then serve."""

from __future__ import annotations

import logging

import nats
import redis.asyncio as aioredis
from hoosh.router.v1 import router_pb2_grpc
from hoosh_budget.pools import BudgetStore
from hoosh_common.eventbus import EventPublisher, ensure_stream
from hoosh_common.grpc_server import insecure_channel, new_server, serve
from hoosh_common.logs import configure_logging
from hoosh_common.runtime import run
from hoosh_common.telemetry import configure_tracing

from .backends.base import Backend
from .backends.local import LocalBackend
from .backends.openai_compat import OpenAICompatibleBackend
from .budget_client import Budget, BudgetClient, RedisBudget
from .chat import ChatService
from .config import RouterSettings, load_catalogue
from .routing import ModelRouter
from .server import RouterServicer

log = logging.getLogger("hoosh_router")


async def main() -> None:
    settings = RouterSettings()
    configure_logging("router")
    configure_tracing("router")
    catalogue = load_catalogue(settings.config)

    entries: list[tuple] = []
    for provider in catalogue.providers:
        backend: Backend
        if provider.type == "local":
            backend = LocalBackend(provider, settings.inference_addr)
        else:
            if not provider.base_url:
                raise SystemExit(f"provider '{provider.name}' needs a base_url")
            backend = OpenAICompatibleBackend(provider)
        entries.append((provider, backend))
    router = ModelRouter(entries)
    for _, backend in entries:
        await backend.list_models()  # warms context lengths of local models; failures are fine here

    nc = await nats.connect(settings.nats_url, name="hoosh-router", max_reconnect_attempts=-1)
    js = nc.jetstream()
    await ensure_stream(js, settings.nats_stream, settings.subject_prefix)
    publisher = EventPublisher(nc, js, settings.nats_stream, settings.subject_prefix)

    budget_channel = insecure_channel(settings.budget_addr)
    redis = aioredis.Redis.from_pool(
        aioredis.BlockingConnectionPool.from_url(settings.redis_url, max_connections=64, timeout=5)
    )
    budget: Budget
    if settings.router_budget_mode == "redis":
        budget = RedisBudget(
            BudgetStore(redis, settings.budget_key_prefix, settings.router_lease_seconds), settings.router_lease_seconds
        )
    else:
        budget = BudgetClient(budget_channel, settings.router_lease_seconds)
    chat = ChatService(
        router,
        budget,
        publisher,
        upstream_timeout=settings.router_upstream_timeout_seconds,
    )
    server = new_server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(chat, router), server)

    async def on_stop() -> None:
        await publisher.drain()  # no event is lost on shutdown
        await nc.drain()
        await budget_channel.close()
        await redis.aclose()
        for _, backend in entries:
            await backend.close()

    log.info("router starting", extra={"providers": [p.name for p in catalogue.providers]})
    await serve(server, settings.router_listen, ["hoosh.router.v1.RouterService"], on_stop=on_stop)


if __name__ == "__main__":
    run(main())
