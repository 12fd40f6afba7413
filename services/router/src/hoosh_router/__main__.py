"""python -m hoosh_router: build Redis, metering (budget store or client, key limiter)
and the event publisher once, then the generation of the configured providers (backends,
routes, health board), then serve. SIGHUP, or the edge's reload request on NATS, reloads
the configuration (``reload.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import nats
from hoosh.router.v1 import router_pb2_grpc
from hoosh_common.eventbus import nats_inbox_prefix
from hoosh_common.grpc_server import configure_plane, internal_channel, new_server, serve
from hoosh_common.link import LinkServer, LinkWriter
from hoosh_common.logs import configure_logging
from hoosh_common.metrics import serve_metrics
from hoosh_common.reload import ConfigRefused, ConfigReloader, ReloadResponder, install_sighup
from hoosh_common.runtime import run
from hoosh_common.telemetry import configure_tracing
from hoosh_metering.client import BudgetServiceClient
from hoosh_metering.errors import BudgetError
from hoosh_metering.limits import KeyGate, KeyLimiter
from hoosh_metering.pools import BudgetStore
from hoosh_metering.redis import RedisClient, connect_redis
from pydantic import ValidationError

from .budget_client import BudgetBackend, RouterBudget
from .config import BUDGET_RPC_TIMEOUT_SECONDS, RouterSettings, read_catalogue
from .generations import Generations
from .ratelimit import RateLimiter
from .reload import CurrentBreakers, RouterConfig, Shared, build_generation
from .server import RouterServicer
from .tunnel import TunnelSession

# How long calls in flight may run once the router is told to stop (gRPC and link alike).
GRACE_SECONDS = 10.0

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
    plane = settings.internal_plane("router", callers=["edge"])
    configure_plane(plane)
    serve_metrics(settings.router_metrics_listen)
    # The local link (the Tunnel's frames on a Unix socket, for an edge on this host):
    # its path is taken first, so that a router that cannot have it stops before it
    # connects to anything; connections wait until the servicer is ready.
    link_server: LinkServer | None = None
    if settings.router_link_socket:
        link_server = LinkServer(settings.router_link_socket, _not_ready, plane.policy)
        try:
            link_server.bind()
        except (RuntimeError, OSError) as error:  # in use, not a socket, not writable
            sys.exit(f"hoosh-router: the local link: {error}")
    catalogue, config_sha256 = read_catalogue(settings.config)

    # One client for budget, key limits, health, provider limits and cache (one node or a
    # cluster); bounded so a burst cannot exhaust Redis, with socket timeouts so a slow
    # Redis fails fast: 503 budget_unavailable for budgets, local/off for the rest.
    redis_client = connect_redis(
        settings.redis_url,
        socket_timeout=settings.router_redis_timeout_seconds,
        socket_connect_timeout=settings.router_redis_timeout_seconds,
    )
    limiter = RateLimiter(redis_client, settings.router_key_prefix)

    nc = await nats.connect(
        settings.nats_url,
        name="hoosh-router",
        max_reconnect_attempts=-1,
        inbox_prefix=nats_inbox_prefix(settings.nats_url),
    )
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
    shared = Shared(settings, redis_client, limiter, publisher, budget, gate)

    # Providers, routes and policies: one generation, replaced whole by a reload.
    generations = Generations(await build_generation(catalogue, shared))
    breakers = CurrentBreakers(generations)
    breakers.register()
    reloader = ConfigReloader(
        RouterConfig(shared, generations, breakers),
        settings.config,
        running_sha256=config_sha256,
        events=publisher,
    )
    responder = ReloadResponder(nc, settings.subject_prefix, reloader)
    await responder.start()
    remove_sighup = install_sighup(reloader)

    server = new_server()
    servicer = RouterServicer(generations=generations)
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server)
    if link_server is not None:
        link_server.sessions = servicer.open_session
        await link_server.start()

    stopping_since = 0.0

    def before_stop() -> None:
        nonlocal stopping_since
        stopping_since = asyncio.get_running_loop().time()
        servicer.drain_tunnels()
        if link_server is not None:
            link_server.stop_listening()

    async def on_stop() -> None:
        if link_server is not None:
            # Its callers were told to move on; their open calls get the gRPC calls' grace.
            left = stopping_since + GRACE_SECONDS - asyncio.get_running_loop().time()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(left, 0.0)):
                    await link_server.wait_idle()
            link_server.abort()
        remove_sighup()
        await responder.stop()
        if starter is not None:
            starter.cancel()
        live = await generations.close()
        for generation in live:
            if generation.health is not None:
                await generation.health.stop()
        # Settlements still being retried get a bounded wait; leases settle the rest.
        for generation in live:
            if generation.recorder is not None:
                await generation.recorder.drain(settings.router_commit_drain_seconds)
        for generation in live:
            if generation.cache is not None:
                await generation.cache.drain()
        await limiter.drain()
        if store is not None:
            await store.close()
        await publisher.close(grace=5.0)  # no event is lost: what NATS does not take stays in the outbox
        await nc.drain()
        await budget_channel.close()
        await redis_client.aclose()
        closed: set[int] = set()
        for generation in live:
            for backend in generation.backends():
                if id(backend) not in closed:
                    closed.add(id(backend))
                    await backend.close()

    log.info("router starting", extra={"providers": [p.name for p in catalogue.providers]})
    # Not ready (no new work routed here) while events could not be kept; live all along.
    await serve(
        server,
        settings.router_listen,
        ["hoosh.router.v1.RouterService"],
        on_stop=on_stop,
        grace_seconds=GRACE_SECONDS,
        before_stop=before_stop,
        ready=lambda: publisher.healthy,
    )


def _not_ready(writer: LinkWriter) -> TunnelSession:
    raise RuntimeError("the router's link accepted a connection before its servicer was ready")


def cli() -> None:
    try:
        settings = RouterSettings()
    except ValidationError as exc:  # fail fast, before binding
        sys.exit(f"hoosh-router: bad settings: {exc}")
    try:
        read_catalogue(settings.config)  # fail fast on a bad config file, before binding
    except ConfigRefused as exc:
        sys.exit(f"hoosh-router: {exc.reason}")
    run(main(settings))


if __name__ == "__main__":
    cli()
