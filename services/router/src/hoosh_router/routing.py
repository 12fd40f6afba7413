"""Model -> backend resolution from the provider catalogue."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from .backends.base import Backend
from .config import ProviderConfig
from .errors import ModelNotFound


@dataclass(slots=True, frozen=True)
class Route:
    provider: ProviderConfig
    backend: Backend
    upstream_model: str


def _is_pattern(name: str) -> bool:
    return any(char in name for char in "*?[")


class ModelRouter:
    """Resolves a requested model name to candidate routes, best first.

    Order of precedence: `provider/model` names a provider directly; otherwise exact
    names beat patterns; ties go to the lower `priority` number, then config order.
    """

    def __init__(self, entries: list[tuple[ProviderConfig, Backend]]) -> None:
        self._entries = [(config, backend) for config, backend in entries if config.enabled]
        self._by_name = {config.name: (config, backend) for config, backend in self._entries}
        self._cache: dict[str, list[Route]] = {}

    @property
    def entries(self) -> list[tuple[ProviderConfig, Backend]]:
        return self._entries

    def resolve(self, model: str) -> list[Route]:
        cached = self._cache.get(model)
        if cached is not None:
            return cached
        routes = self._resolve(model)
        if not routes:
            raise ModelNotFound(f"The model '{model}' does not exist or is not served by this gateway.", param="model")
        if len(self._cache) < 10_000:
            self._cache[model] = routes
        return routes

    def _resolve(self, model: str) -> list[Route]:
        provider_name, _, rest = model.partition("/")
        if rest and provider_name in self._by_name:
            config, backend = self._by_name[provider_name]
            return [Route(config, backend, rest)]
        exact = [(c, b) for c, b in self._entries if model in c.models]
        matches = exact or [
            (c, b) for c, b in self._entries if any(_is_pattern(p) and fnmatch.fnmatchcase(model, p) for p in c.models)
        ]
        matches.sort(key=lambda entry: entry[0].priority)
        return [Route(config, backend, model) for config, backend in matches]

    def exact_models(self) -> list[tuple[str, ProviderConfig]]:
        return [(name, config) for config, _ in self._entries for name in config.models if not _is_pattern(name)]

    def matches_patterns(self, config: ProviderConfig, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in config.models)
