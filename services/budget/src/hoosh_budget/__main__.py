"""``python -m hoosh_budget``: serve BudgetService until SIGTERM; SIGHUP (or the edge's
reload request on NATS) applies the pools of hoosh.yaml again (``reload.py``).

Besides the RPCs, the service runs three loops over the shared store: the lease
reaper (a dead holder's reservation is settled by the expiry policy), the period
ticker (pools roll into a new period on time, one ``budget.reset`` event each) and
the metrics snapshot (per pool gauges, read every few seconds; ``/metrics`` is served
on ``HOOSH_BUDGET_METRICS_LISTEN``).
"""

# ruff: noqa: E402  (the imports below come after skip_aiohttp_for_nats)

from __future__ import annotations

from hoosh_common.lean_imports import skip_aiohttp_for_nats

skip_aiohttp_for_nats()  # before anything imports nats: see hoosh_common.lean_imports

import asyncio
import contextlib
import logging
import sys
from collections.abc import Callable

import nats
import nats.errors
from hoosh_common.eventbus import EventPublisher, nats_inbox_prefix
from hoosh_common.grpc_server import configure_plane, new_server, serve
from hoosh_common.logs import configure_logging
from hoosh_common.metrics import serve_metrics
from hoosh_common.reload import ConfigReloader, ReloadResponder, file_sha256, install_sighup
from hoosh_common.runtime import run
from hoosh_common.telemetry import configure_tracing
from hoosh_metering.errors import BudgetError, BudgetUnavailable
from hoosh_metering.pools import BudgetStore, PoolSpec
from hoosh_metering.redis import connect_redis
from pydantic import ValidationError
from redis.exceptions import RedisError

from hoosh_budget.config import DEFAULT_POOL, BudgetSettings, ConfigError, configured_pools
from hoosh_budget.metrics import PoolMetrics, refresh_forever
from hoosh_budget.reaper import reap_forever
from hoosh_budget.reload import BudgetPools
from hoosh_budget.resets import ResetAnnouncer, tick_forever
from hoosh_budget.server import BUDGET_CALLERS, CALLER_LIMITS, SERVICE_NAME, BudgetServicer, add_to_server

log = logging.getLogger("hoosh_budget")


async def provision_pools(store: BudgetStore, settings: BudgetSettings, data: bytes | None = None) -> list[PoolSpec]:
    """Apply the configured pools (parents first); create ``default`` if nothing configures it.
    Returns the configured pools (``data``: the config file's bytes, already read).

    Configured settings win on every start; an unconfigured ``default`` keeps a
    capacity changed later through the API.
    """
    pools = configured_pools(settings, data)
    for spec in pools:
        await store.apply_pool(spec)
    names = {spec.name for spec in pools}
    if DEFAULT_POOL not in names:
        await store.ensure_pool(PoolSpec(DEFAULT_POOL, settings.budget_default_capacity))
    log.info("pools provisioned", extra={"pools": sorted({*names, DEFAULT_POOL})})
    return pools


def _read_config(settings: BudgetSettings) -> tuple[bytes | None, str | None]:
    """The config file's bytes and SHA-256 (None, None without one)."""
    if settings.config is None:
        return None, None
    try:
        data = settings.config.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read HOOSH_CONFIG {settings.config}: {exc.strerror or exc}") from exc
    return data, file_sha256(data)


async def _stop(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def main(settings: BudgetSettings) -> None:
    redis = connect_redis(settings.redis_url, max_connections=settings.budget_redis_max_connections)
    store = BudgetStore(
        redis,
        settings.budget_key_prefix,
        settings.budget_lease_seconds,
        default_retry_after_seconds=settings.budget_retry_after_seconds,
        expiry_policy=settings.budget_expiry_policy,
    )
    nc = await nats.connect(
        settings.nats_url,
        name="hoosh-budget",
        max_reconnect_attempts=-1,
        inbox_prefix=nats_inbox_prefix(settings.nats_url),
    )
    reaper: asyncio.Task[None] | None = None
    ticker: asyncio.Task[None] | None = None
    refresher: asyncio.Task[None] | None = None
    pool_metrics: PoolMetrics | None = None
    publisher: EventPublisher | None = None
    responder: ReloadResponder | None = None
    remove_sighup: Callable[[], None] | None = None
    try:
        js = nc.jetstream()
        await settings.declare_stream(js, settings.nats_stream, settings.subject_prefix)
        # Few tries per publish: ResetPool waits on it, and the ticker retries what is left.
        publisher = settings.event_publisher(
            nc, js, settings.nats_stream, settings.subject_prefix, "budget", max_attempts=2, ack_timeout=2.0
        )
        await publisher.start()
        announcer = ResetAnnouncer(publisher)
        await store.start()
        data, config_sha256 = _read_config(settings)
        applied = await provision_pools(store, settings, data)
        # Pools from hoosh.yaml again on SIGHUP or the edge's reload request (reload.py).
        reloader = ConfigReloader(
            BudgetPools(store, settings, applied), settings.config, running_sha256=config_sha256, events=publisher
        )
        responder = ReloadResponder(nc, settings.subject_prefix, reloader)
        await responder.start()
        remove_sighup = install_sighup(reloader)
        reaper = asyncio.create_task(reap_forever(store, settings.budget_reap_interval_seconds), name="lease-reaper")
        ticker = asyncio.create_task(
            tick_forever(store, announcer, settings.budget_period_tick_seconds), name="period-ticker"
        )
        if settings.budget_metrics_listen.strip().lower() not in ("", "off"):  # not served: nothing read for it
            pool_metrics = PoolMetrics(
                store,
                max_pools=settings.metrics_max_pools,
                max_leases=settings.budget_metrics_max_leases,
                announcer=announcer,
            ).register()
            refresher = asyncio.create_task(
                refresh_forever(pool_metrics, settings.budget_metrics_interval_seconds), name="pool-metrics"
            )
        server = new_server()
        add_to_server(BudgetServicer(store, announcer, publisher), server)
        await serve(server, settings.budget_listen, [SERVICE_NAME])
    finally:
        if remove_sighup is not None:
            remove_sighup()
        if responder is not None:
            await responder.stop()
        await _stop(refresher)
        if pool_metrics is not None:
            pool_metrics.unregister()
        await _stop(ticker)
        await _stop(reaper)
        if publisher is not None:
            await publisher.close(grace=5.0)
        try:
            await nc.drain()
        except nats.errors.Error as exc:
            log.warning("NATS drain failed", extra={"error": repr(exc)})
        await store.close()
        await redis.aclose()


def cli() -> None:
    try:
        settings = BudgetSettings()
    except ValidationError as exc:
        sys.exit(f"hoosh-budget: bad settings: {exc}")
    configure_logging("budget", settings.log_level)
    configure_tracing("budget")
    configure_plane(settings.internal_plane("budget", callers=BUDGET_CALLERS, limits=CALLER_LIMITS))
    try:
        configured_pools(settings)  # fail fast on a bad config file, before binding
    except ConfigError as exc:
        sys.exit(f"hoosh-budget: {exc}")
    try:
        serve_metrics(settings.budget_metrics_listen)
    except (OSError, ValueError) as exc:  # port taken, or not host:port
        sys.exit(f"hoosh-budget: HOOSH_BUDGET_METRICS_LISTEN={settings.budget_metrics_listen!r}: {exc}")
    try:
        run(main(settings))
    except ConfigError as exc:  # the file changed between the check above and its use
        sys.exit(f"hoosh-budget: {exc}")
    except BudgetUnavailable as exc:
        sys.exit(f"hoosh-budget: cannot use Redis (HOOSH_REDIS_URL): {exc.message}")
    except BudgetError as exc:  # start-up only: a configured pool the store refuses (unknown parent, ...)
        sys.exit(f"hoosh-budget: cannot apply the configured pools: {exc.message}")
    except RedisError as exc:  # only start-up reaches here: the servicer handles errors per call
        sys.exit(f"hoosh-budget: cannot use Redis (HOOSH_REDIS_URL): {exc}")
    except (nats.errors.Error, OSError) as exc:
        sys.exit(f"hoosh-budget: cannot use NATS (HOOSH_NATS_URL): {exc!r}")


if __name__ == "__main__":
    cli()
