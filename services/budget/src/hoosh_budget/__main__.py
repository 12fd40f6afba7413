"""``python -m hoosh_budget``: serve BudgetService until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import redis.asyncio as aioredis
from hoosh_common.grpc_server import new_server, serve
from hoosh_common.logs import configure_logging
from hoosh_common.runtime import run
from hoosh_common.telemetry import configure_tracing
from pydantic import ValidationError
from redis.exceptions import RedisError

from hoosh_budget.config import DEFAULT_POOL, BudgetSettings, ConfigError, configured_pools
from hoosh_budget.pools import BudgetStore, reap_forever
from hoosh_budget.server import SERVICE_NAME, BudgetServicer, add_to_server

log = logging.getLogger("hoosh_budget")


async def provision_pools(store: BudgetStore, settings: BudgetSettings) -> None:
    """Upsert the configured pools; create ``default`` if nothing configures it.

    Configured capacities win on every start; an unconfigured ``default`` keeps a
    capacity changed later through UpsertPool.
    """
    pools = configured_pools(settings)
    for name, capacity in pools.items():
        await store.upsert_pool(name, capacity)
    if DEFAULT_POOL not in pools:
        await store.ensure_pool(DEFAULT_POOL, settings.budget_default_capacity)
    log.info("pools provisioned", extra={"pools": sorted({*pools, DEFAULT_POOL})})


async def main(settings: BudgetSettings) -> None:
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.budget_redis_max_connections, timeout=5
    )
    redis = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
    store = BudgetStore(
        redis,
        settings.budget_key_prefix,
        settings.budget_lease_seconds,
        default_retry_after_seconds=settings.budget_retry_after_seconds,
    )
    reaper: asyncio.Task[None] | None = None
    try:
        await provision_pools(store, settings)
        reaper = asyncio.create_task(reap_forever(store, settings.budget_reap_interval_seconds))
        server = new_server()
        add_to_server(BudgetServicer(store), server)
        await serve(server, settings.budget_listen, [SERVICE_NAME])
    finally:
        if reaper is not None:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
        await redis.aclose()


def cli() -> None:
    try:
        settings = BudgetSettings()
    except ValidationError as exc:
        sys.exit(f"hoosh-budget: bad settings: {exc}")
    configure_logging("budget", settings.log_level)
    configure_tracing("budget")
    try:
        configured_pools(settings)  # fail fast on a bad config file, before binding
    except ConfigError as exc:
        sys.exit(f"hoosh-budget: {exc}")
    try:
        run(main(settings))
    except RedisError as exc:  # only start-up reaches here: the servicer handles errors per call
        sys.exit(f"hoosh-budget: cannot use Redis (HOOSH_REDIS_URL): {exc}")


if __name__ == "__main__":
    cli()
