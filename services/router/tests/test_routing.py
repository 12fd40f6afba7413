"""Model resolution and the strategies that order candidates."""

from __future__ import annotations

from collections import Counter

import pytest
from hoosh_router.backends.base import Backend
from hoosh_router.config import Catalogue, ProviderConfig
from hoosh_router.errors import InvalidRequest, ModelNotFound
from hoosh_router.routing import ModelRouter


class NamedBackend:
    """Routing never calls a backend: it only needs something to hand out."""

    def __init__(self, name: str) -> None:
        self.name = name


def router_for(yaml_like: dict, latency: dict[str, float] | None = None) -> ModelRouter:
    catalogue = Catalogue.model_validate(yaml_like)
    entries: list[tuple[ProviderConfig, Backend]] = [
        (provider, NamedBackend(provider.name))  # type: ignore[misc]
        for provider in catalogue.providers
    ]
    return ModelRouter(
        entries,
        catalogue.routes,
        strategy=catalogue.routing.strategy,
        latency_of=(latency or {}).get,
    )


def names(router: ModelRouter, model: str, kind: str = "chat") -> list[str]:
    return [route.provider.name for route in router.order(router.resolve(model, kind))]  # type: ignore[arg-type]


PROVIDERS = [
    {"name": "a", "type": "openai", "models": ["gpt-*"], "priority": 5},
    {"name": "b", "type": "groq", "models": ["gpt-*", "llama-3"], "priority": 1},
    {"name": "c", "type": "anthropic", "models": ["claude-*"], "embedding_models": []},
    {"name": "d", "type": "gemini", "models": ["gemini-*"], "embedding_models": ["text-embedding-*"]},
    {"name": "off", "type": "openai", "models": ["gpt-*"], "enabled": False},
]


def test_patterns_sorted_by_priority_and_exact_beats_pattern() -> None:
    router = router_for({"providers": PROVIDERS})
    assert names(router, "gpt-4o") == ["b", "a"]  # priority 1 before 5; the disabled one is gone
    assert names(router, "llama-3") == ["b"]
    assert names(router, "claude-3-opus") == ["c"]


def test_provider_prefix_routes_directly_with_the_upstream_name() -> None:
    router = router_for({"providers": PROVIDERS})
    resolution = router.resolve("a/gpt-4o")
    assert resolution.strategy == "direct"
    assert [(r.provider.name, r.upstream_model) for r in router.order(resolution)] == [("a", "gpt-4o")]
    # A slash that does not name a provider is part of the model name (OpenRouter style).
    with pytest.raises(ModelNotFound):
        router.resolve("meta-llama/llama-3")


def test_provider_prefix_honours_the_providers_model_list() -> None:
    router = router_for(
        {
            "providers": [
                {"name": "slow", "type": "openai", "models": ["slow-*"], "embedding_models": ["emb-1"]},
                {"name": "none", "type": "openai", "models": []},
                {"name": "listed", "type": "openrouter", "models": ["slow/o1-pro-expensive"]},
            ]
        }
    )
    assert [r.upstream_model for r in router.resolve("slow/slow-fast").routes] == ["slow-fast"]
    with pytest.raises(ModelNotFound):
        router.resolve("slow/o1-mini")  # not on slow's list, and nobody lists the whole name
    with pytest.raises(ModelNotFound):
        router.resolve("none/gpt-4o")  # an empty list allows nothing through provider/model
    # A name a provider's list does not allow may still be another provider's listed name.
    resolution = router.resolve("slow/o1-pro-expensive")
    assert [(r.provider.name, r.upstream_model) for r in resolution.routes] == [("listed", "slow/o1-pro-expensive")]
    assert [r.upstream_model for r in router.resolve("slow/emb-1", "embedding").routes] == ["emb-1"]
    with pytest.raises(ModelNotFound):
        router.resolve("slow/emb-2", "embedding")
    anything = router_for({"providers": [{"name": "any", "type": "openai", "models": ["*"]}]})
    assert [(r.strategy) for r in [anything.resolve("any/whatever-1")]] == ["direct"]
    assert [r.upstream_model for r in anything.resolve("any/whatever-1").routes] == ["whatever-1"]


@pytest.mark.parametrize(
    "model",
    [
        "gpt 4o",
        "gpt-4o?x=1",
        "a/../b",
        "../secret",
        "a//b",
        "./m",
        "m/",
        "m%2F..",
        "m\\n",
        "é",
        "x" * 257,
    ],
)
def test_model_ids_are_validated_before_any_url(model: str) -> None:
    router = router_for({"providers": [{"name": "any", "type": "openai", "models": ["*"]}]})
    with pytest.raises(InvalidRequest) as invalid:
        router.resolve(model)
    assert invalid.value.param == "model"


@pytest.mark.parametrize(
    "model", ["gpt-4o", "meta-llama/Llama-3.1-8B", "claude-3-5-sonnet@20240620", "ft:gpt-4o:org:x", "a+b", "x" * 256]
)
def test_real_model_ids_pass(model: str) -> None:
    router = router_for({"providers": [{"name": "any", "type": "openai", "models": ["*"]}]})
    assert router.resolve(model).routes


def test_unknown_models_and_embeddings_of_chat_models() -> None:
    router = router_for({"providers": PROVIDERS})
    with pytest.raises(ModelNotFound):
        router.resolve("nope")
    with pytest.raises(InvalidRequest, match="does not support embeddings"):
        router.resolve("claude-3-opus", "embedding")
    assert names(router, "text-embedding-004", "embedding") == ["d"]


def test_explicit_routes_rename_and_order_targets() -> None:
    router = router_for(
        {
            "providers": PROVIDERS,
            "routes": [
                {
                    "match": "smart",
                    "targets": [
                        {"provider": "c", "model": "claude-sonnet", "priority": 2},
                        {"provider": "a", "model": "gpt-4o", "priority": 1},
                        {"provider": "off"},
                    ],
                },
                {"match": "gpt-*", "strategy": "direct", "targets": [{"provider": "a"}, {"provider": "b"}]},
            ],
        }
    )
    routes = router.order(router.resolve("smart"))
    assert [(r.provider.name, r.upstream_model) for r in routes] == [("a", "gpt-4o"), ("c", "claude-sonnet")]
    # Targets without a priority take their provider's (b: 1, a: 5); "direct" keeps only the best.
    assert names(router, "gpt-4o") == ["b"]
    assert ("smart", router.resolve("smart").routes[0].provider) in router.exact_models()


def test_an_unknown_target_provider_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown provider"):
        Catalogue.model_validate({"providers": PROVIDERS, "routes": [{"match": "x", "targets": [{"provider": "zz"}]}]})


def test_round_robin_follows_weights_and_keeps_fallbacks() -> None:
    router = router_for(
        {
            "providers": [
                {"name": "heavy", "type": "openai", "models": ["m"], "weight": 3},
                {"name": "light", "type": "openai", "models": ["m"], "weight": 1},
            ],
            "routing": {"strategy": "round-robin"},
        }
    )
    orders = [names(router, "m") for _ in range(8)]
    assert Counter(order[0] for order in orders) == {"heavy": 6, "light": 2}
    assert all(sorted(order) == ["heavy", "light"] for order in orders)  # the other is the fallback
    assert orders[:4] != [orders[0]] * 4  # interleaved, not in blocks


def test_lowest_latency_measures_unknowns_first() -> None:
    latency = {"fast": 20.0, "slow": 300.0}
    router = router_for(
        {
            "providers": [
                {"name": "slow", "type": "openai", "models": ["m"], "priority": 1},
                {"name": "fast", "type": "openai", "models": ["m"], "priority": 2},
                {"name": "new", "type": "openai", "models": ["m"], "priority": 3},
            ],
            "routing": {"strategy": "lowest-latency"},
        },
        latency,
    )
    assert names(router, "m") == ["new", "fast", "slow"]
    latency["new"] = 100.0
    assert names(router, "m") == ["fast", "new", "slow"]


def test_priority_strategy_with_equal_priorities_keeps_config_order() -> None:
    router = router_for(
        {
            "providers": [
                {"name": "first", "type": "openai", "models": ["m"]},
                {"name": "second", "type": "openai", "models": ["m"]},
            ]
        }
    )
    assert names(router, "m") == ["first", "second"]
