"""Building a generation from the catalogue (at start and on every reload), and the
router's part of live reload (``hoosh_common.reload``): providers, routes, routing,
health and cache policies and prices, swapped atomically (``generations.py``).

Kept across a reload: the Redis client, the provider rate limiter (its windows live in
Redis), the budget and key limits, the event publisher, and the backend (with its HTTP
sessions or gRPC channel) of every provider whose entry did not change. Such a provider
also keeps its breaker: the new health board watches it through the very view the old
board has (``HealthBoard.carry``: state, failure count, last error, a half-open trial in
flight, latency), so a reload closes no open breaker — even while Redis, where breakers
are shared, cannot be read — and a trial still running on the old generation is the one
trial of this replica until it ends. A provider whose entry changed starts from the
shared state in Redis, with its observed latency carried over.

The file is parsed off the event loop (``ConfigReloader`` runs ``RouterConfig.parse`` in
a worker thread, once per file), with libyaml's loader where PyYAML has it.

Secrets are ``$VAR`` references resolved from this process's environment when the file
is read: a reload sees the environment the process started with (a new provider key
needs a restart, or a reference to a variable already set).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, cast

from hoosh_common.eventbus import EventPublisher
from hoosh_metering.limits import KeyGate
from hoosh_metering.redis import RedisClient
from prometheus_client import REGISTRY, CollectorRegistry

from . import metrics
from .backends.base import Backend
from .backends.factory import build_backend
from .budget_client import RouterBudget
from .cache import ResponseCache
from .chat import ChatService
from .config import Catalogue, ProviderConfig, RouterSettings, parse_catalogue
from .dispatch import Dispatcher, RetryPolicy
from .embeddings import EmbeddingService
from .generations import Generation, Generations
from .health import BreakerView, HealthBoard
from .ratelimit import RateLimiter
from .recording import Recorder
from .routing import ModelRouter

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Shared:
    """What every generation uses, built once at start."""

    settings: RouterSettings
    redis: RedisClient
    limiter: RateLimiter
    publisher: EventPublisher
    budget: RouterBudget
    gate: KeyGate


async def build_generation(catalogue: Catalogue, shared: Shared, *, previous: Generation | None = None) -> Generation:
    """The serving objects for ``catalogue`` (its health board started). A provider whose
    entry equals its entry in ``previous`` keeps its backend; the others get new ones."""
    settings = shared.settings
    kept = {config.name: (config, backend) for config, backend in previous.entries} if previous else {}
    entries: list[tuple[ProviderConfig, Backend]] = []
    fresh: list[Backend] = []
    health: HealthBoard | None = None
    try:
        for provider in catalogue.providers:
            same = kept.get(provider.name)
            if same is not None and same[0].model_dump() == provider.model_dump():
                entries.append(same)
            else:
                backend = build_backend(provider, settings.inference_addr)
                fresh.append(backend)
                entries.append((provider, backend))
        # Warms the context lengths of local models; a failure here is fine (as at start).
        await asyncio.gather(*(backend.list_models() for backend in fresh))
        routing = catalogue.routing
        router = ModelRouter(entries, catalogue.routes, strategy=routing.strategy)
        enabled = [(config, backend) for config, backend in entries if config.enabled]
        health = HealthBoard(
            shared.redis, settings.router_key_prefix, enabled, catalogue.health, latency_alpha=routing.latency_alpha
        )
        if previous is not None and previous.health is not None:
            _carry_health(previous.health, health, enabled, kept)
        router.set_latency_source(health.latency)
        await health.start()
    except BaseException:
        if health is not None:
            await health.stop()
        for backend in fresh:
            with contextlib.suppress(Exception):
                await backend.close()
        raise
    cache = ResponseCache(shared.redis, settings.router_key_prefix, catalogue.cache)
    recorder = Recorder(shared.budget, shared.publisher, shared.gate, catalogue.providers)
    dispatcher = Dispatcher(
        router,
        health,
        shared.limiter,
        RetryPolicy(routing.retry),
        upstream_timeout=settings.router_upstream_timeout_seconds,
        request_timeout=routing.request_timeout_seconds or settings.router_upstream_timeout_seconds,
        fallback=routing.fallback,
    )
    return Generation(
        chat=ChatService(dispatcher, recorder, cache),
        router=router,
        embeddings=EmbeddingService(dispatcher, recorder),
        health=health,
        cache=cache,
        entries=entries,
        catalogue=catalogue,
        recorder=recorder,
    )


def _carry_health(
    old: HealthBoard,
    new: HealthBoard,
    enabled: list[tuple[ProviderConfig, Backend]],
    kept: dict[str, tuple[ProviderConfig, Backend]],
) -> None:
    """A provider that kept its backend keeps its breaker view (one per replica across
    generations: in-flight requests of the old generation go on updating it); one that
    changed keeps only its observed latency."""
    for config, backend in enabled:
        same = kept.get(config.name)
        try:
            view = old.view(config.name)
        except KeyError:  # not watched before (it was disabled)
            continue
        if same is not None and same[1] is backend:
            new.carry(config.name, view)
        elif view.latency_ms is not None:
            new.view(config.name).latency_ms = view.latency_ms


def changes(old: Catalogue | None, new: Catalogue) -> dict[str, Any]:
    """What a reload changes, for its audit event and log line: provider names and
    counts (never a key or a URL's credentials)."""
    before = {p.name: p.model_dump() for p in old.providers} if old else {}
    after = {p.name: p.model_dump() for p in new.providers}
    found: dict[str, Any] = {
        "providers": {
            "added": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after)),
            "changed": sorted(name for name in set(before) & set(after) if before[name] != after[name]),
        },
        "routes": len(new.routes),
    }
    for section in ("routes", "routing", "health", "cache"):
        if old is None or getattr(old, section) != getattr(new, section):
            found.setdefault("sections_changed", []).append(section)
    return found


class CurrentBreakers:
    """The current generation's breakers, for the breaker gauges (``metrics.register_state``
    reads them at scrape time, from the metrics thread): a provider a swap just removed
    reads as closed rather than failing the scrape."""

    def __init__(self, generations: Generations) -> None:
        self._generations = generations
        self.names: list[str] = []
        self.refresh()

    def refresh(self) -> None:
        generation = self._generations.current
        self.names[:] = [config.name for config, _ in generation.router.entries]

    def view(self, name: str) -> BreakerView:
        health = self._generations.current.health
        try:
            return health.view(name) if health is not None else BreakerView()
        except KeyError:
            return BreakerView()

    def register(self, registry: CollectorRegistry = REGISTRY) -> None:
        # register_state calls only view() on what it is given.
        metrics.register_state(cast(HealthBoard, self), self.names, registry)


class RouterConfig:
    """The router's ``ConfigTarget``: the catalogue, validated by the parser the router
    starts with, swapped in as a new generation."""

    service = "router"

    def __init__(self, shared: Shared, generations: Generations, breakers: CurrentBreakers | None = None) -> None:
        self._shared = shared
        self._generations = generations
        self._breakers = breakers

    def parse(self, data: bytes) -> Catalogue:
        """In a worker thread (``ConfigReloader``): YAML and validation never block the loop."""
        return parse_catalogue(data, str(self._shared.settings.config))

    async def check(self, config: Catalogue) -> bool:
        running = self._generations.current.catalogue
        return running is None or running != config

    async def apply(self, config: Catalogue) -> dict[str, Any]:
        current = self._generations.current
        new = await build_generation(config, self._shared, previous=current)
        self._generations.swap(new)
        if self._breakers is not None:
            self._breakers.refresh()
        return changes(current.catalogue, config)
