"""Model -> candidate backends, and the strategies that order them per request.

Resolution (cached per model name; the name is validated first, see ``validate_model_id``):
  1. ``provider/model`` names a provider directly: that provider only (strategy ``direct``),
     when its ``models`` (``embedding_models``) list allows ``model`` (``["*"]`` allows any;
     an empty list none). A name the list does not allow resolves as a whole, as any
     other name (it may be a listed OpenRouter-style ``org/model``), else 404.
  2. An explicit route (``routes:`` in the catalogue) whose ``match`` equals the name,
     else the first whose pattern matches: its targets.
  3. Providers listing the name in ``models`` (``embedding_models`` for embeddings):
     exact names beat patterns.
Candidates are kept sorted by priority (lower first; ties keep config order).

Strategies, applied per request to the resolved candidates:
  - ``priority``: that order.
  - ``round-robin``: smooth weighted round-robin picks the first; the rest follow in
    priority order as fallbacks.
  - ``lowest-latency``: by the moving average of observed latency (unmeasured first,
    so each gets measured), ties by priority.
  - ``direct``: the first candidate only, no fallback.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from hoosh_common.model_ids import model_id_problem

from .backends.base import Backend
from .config import ProviderConfig, RouteConfig, Strategy
from .errors import InvalidRequest, ModelNotFound, RouterError

Kind = Literal["chat", "embedding"]


def validate_model_id(model: str) -> None:
    """InvalidRequest unless ``model`` is safe to put in an upstream URL or body
    (``hoosh_common.model_ids``: the same rule the edge applies)."""
    problem = model_id_problem(model)
    if problem is not None:
        raise InvalidRequest(problem, param="model")


@dataclass(slots=True, frozen=True)
class Route:
    provider: ProviderConfig
    backend: Backend
    upstream_model: str
    priority: int = 10
    weight: int = 1


@dataclass(slots=True)
class Resolution:
    """The candidates for one requested model name, with the strategy that orders them."""

    routes: list[Route]
    strategy: Strategy
    # The configured name the request matched, for metric labels (bounded by the
    # configuration): the model itself when it is listed exactly, else the pattern.
    label: str = ""
    # Smooth weighted round-robin state (current weights), one per route.
    _current: list[int] = field(default_factory=list)

    def pick_round_robin(self) -> int:
        if not self._current:
            self._current = [0] * len(self.routes)
        total = 0
        best = 0
        for index, route in enumerate(self.routes):
            self._current[index] += route.weight
            total += route.weight
            if self._current[index] > self._current[best]:
                best = index
        self._current[best] -= total
        return best


UNROUTED = "_unrouted"


def is_pattern(name: str) -> bool:
    return any(char in name for char in "*?[")


def _matches(model: str, patterns: list[str]) -> tuple[bool, bool]:
    """(exact match, pattern match) of a model name against a provider's list."""
    if model in patterns:
        return True, False
    return False, any(is_pattern(p) and fnmatch.fnmatchcase(model, p) for p in patterns)


def _matching_pattern(model: str, patterns: list[str]) -> str:
    """The configured name ``model`` matched in ``patterns``: itself, or the first pattern."""
    if model in patterns:
        return model
    return next((p for p in patterns if is_pattern(p) and fnmatch.fnmatchcase(model, p)), "")


LatencyOf = Callable[[str], float | None]


class ModelRouter:
    """Resolves a requested model name to ordered candidate routes."""

    def __init__(
        self,
        entries: list[tuple[ProviderConfig, Backend]],
        routes: list[RouteConfig] | None = None,
        *,
        strategy: Strategy = "priority",
        latency_of: LatencyOf | None = None,
    ) -> None:
        self._entries = [(config, backend) for config, backend in entries if config.enabled]
        self._by_name = {config.name: (config, backend) for config, backend in self._entries}
        self._routes = [route for route in routes or [] if route.targets]
        self._strategy = strategy
        self._latency_of = latency_of or (lambda name: None)
        self._cache: dict[tuple[str, Kind], Resolution] = {}

    @property
    def entries(self) -> list[tuple[ProviderConfig, Backend]]:
        return self._entries

    def set_latency_source(self, latency_of: LatencyOf) -> None:
        self._latency_of = latency_of

    # -- resolution -----------------------------------------------------------------

    def resolve(self, model: str, kind: Kind = "chat") -> Resolution:
        """The candidates for ``model`` (ModelNotFound when none; for embeddings of a chat
        model, InvalidRequest "does not support embeddings")."""
        key = (model, kind)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        validate_model_id(model)
        resolution = self._resolve(model, kind)
        if not resolution.routes:
            if kind == "embedding" and self._resolve(model, "chat").routes:
                raise InvalidRequest(f"The model '{model}' does not support embeddings", param="model")
            raise ModelNotFound(f"The model '{model}' does not exist or is not served by this gateway.", param="model")
        if len(self._cache) < 10_000:
            self._cache[key] = resolution
        return resolution

    def metric_label(self, model: str, kind: Kind = "chat") -> str:
        """``model`` as a metric label: the configured name or pattern it matches (see
        ``Resolution.label``), ``_unrouted`` when nothing matches. Never the client's own
        string unless the configuration lists that exact string."""
        try:
            return self.resolve(model, kind).label or UNROUTED
        except RouterError:
            return UNROUTED

    def _route(self, config: ProviderConfig, backend: Backend, model: str) -> Route:
        return Route(config, backend, model, config.priority, config.weight)

    def _resolve(self, model: str, kind: Kind) -> Resolution:
        provider_name, _, rest = model.partition("/")
        if rest and provider_name in self._by_name:
            config, backend = self._by_name[provider_name]
            listed = config.embedding_models if kind == "embedding" else config.models
            matched = _matching_pattern(rest, listed)
            if matched:
                return Resolution([self._route(config, backend, rest)], "direct", f"{provider_name}/{matched}")
        explicit = self._explicit(model, kind)
        if explicit is not None:
            return explicit
        exact: list[Route] = []
        patterned: list[Route] = []
        pattern = ""
        for config, backend in self._entries:
            names = config.embedding_models if kind == "embedding" else config.models
            is_exact, is_pattern = _matches(model, names)
            if is_exact:
                exact.append(self._route(config, backend, model))
            elif is_pattern:
                patterned.append(self._route(config, backend, model))
                pattern = pattern or _matching_pattern(model, names)
        routes = exact or patterned
        routes.sort(key=lambda route: route.priority)
        return Resolution(routes, self._strategy, model if exact else pattern)

    def _explicit(self, model: str, kind: Kind) -> Resolution | None:
        candidates = [route for route in self._routes if route.kind == kind]
        chosen = next((route for route in candidates if route.match == model), None)
        if chosen is None:
            chosen = next(
                (r for r in candidates if is_pattern(r.match) and fnmatch.fnmatchcase(model, r.match)),
                None,
            )
        if chosen is None:
            return None
        routes = []
        for target in chosen.targets:
            if target.provider not in self._by_name:
                continue  # a disabled provider
            config, backend = self._by_name[target.provider]
            routes.append(
                Route(
                    config,
                    backend,
                    target.model or model,
                    config.priority if target.priority is None else target.priority,
                    config.weight if target.weight is None else target.weight,
                )
            )
        routes.sort(key=lambda route: route.priority)
        return Resolution(routes, chosen.strategy or self._strategy, chosen.match)

    # -- strategies -----------------------------------------------------------------

    def order(self, resolution: Resolution) -> list[Route]:
        """The candidates of one request, best first, per the resolution's strategy."""
        routes = resolution.routes
        strategy = resolution.strategy
        if strategy == "direct" or len(routes) == 1:
            return routes[:1]
        if strategy == "round-robin":
            first = resolution.pick_round_robin()
            return [routes[first], *routes[:first], *routes[first + 1 :]]
        if strategy == "lowest-latency":
            latency_of = self._latency_of

            def key(item: tuple[int, Route]) -> tuple[float, int]:
                latency = latency_of(item[1].provider.name)
                return (latency if latency is not None else -1.0, item[0])

            return [route for _, route in sorted(enumerate(routes), key=key)]
        return routes

    # -- listing --------------------------------------------------------------------

    def exact_models(self, kind: Kind = "chat") -> list[tuple[str, ProviderConfig]]:
        names: list[tuple[str, ProviderConfig]] = []
        for config, _ in self._entries:
            listed = config.embedding_models if kind == "embedding" else config.models
            names.extend((name, config) for name in listed if not is_pattern(name))
        for route in self._routes:
            if route.kind != kind or is_pattern(route.match):
                continue
            resolution = self._explicit(route.match, kind)
            if resolution is not None and resolution.routes:  # listed under its first candidate
                names.append((route.match, resolution.routes[0].provider))
        return names

    def matches_patterns(self, config: ProviderConfig, model: str, kind: Kind = "chat") -> bool:
        listed = config.embedding_models if kind == "embedding" else config.models
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in listed)
