"""register_publisher_metrics: a second publisher for the same service in one process
replaces the first one's collector instead of failing as a duplicate."""

from __future__ import annotations

from typing import Any, cast

from hoosh_common.eventbus import EventPublisher
from hoosh_common.eventbus_settings import EventBusSettings
from hoosh_common.metrics import register_publisher_metrics
from prometheus_client import REGISTRY, CollectorRegistry
from pydantic_settings import SettingsConfigDict

# Building a publisher connects nothing: these stand in for the NATS client and context.
NO_NATS = cast(Any, None)


def publisher(published: int) -> EventPublisher:
    built = EventPublisher(NO_NATS, NO_NATS, "EVENTS", "hoosh")
    built.stats.published = published
    return built


def published(registry: CollectorRegistry, service: str) -> float | None:
    return registry.get_sample_value("hoosh_events_published_total", {"service": service})


def test_the_latest_publisher_of_a_service_replaces_the_previous_one() -> None:
    registry = CollectorRegistry()
    first = register_publisher_metrics(publisher(3), "router", registry)
    assert published(registry, "router") == 3
    second = register_publisher_metrics(publisher(7), "router", registry)  # no duplicate-timeseries error
    assert second is not first
    assert published(registry, "router") == 7
    other = register_publisher_metrics(publisher(1), "stt", registry)  # another service: alongside
    assert published(registry, "router") == 7 and published(registry, "stt") == 1
    registry.unregister(other)
    register_publisher_metrics(publisher(2), "stt", registry)  # its old collector already gone: fine
    assert published(registry, "stt") == 2
    # Only the latest collector per service is left in the registry.
    samples = [
        sample
        for family in registry.collect()
        if family.name == "hoosh_events_published"
        for sample in family.samples
        if sample.name == "hoosh_events_published_total"
    ]
    assert sorted((s.labels["service"], s.value) for s in samples) == [("router", 7), ("stt", 2)]


def test_the_same_service_in_another_registry_is_separate() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    register_publisher_metrics(publisher(4), "budget", one)
    register_publisher_metrics(publisher(5), "budget", two)
    assert published(one, "budget") == 4 and published(two, "budget") == 5


class Settings(EventBusSettings):
    model_config = SettingsConfigDict(env_prefix="HOOSH_TEST_PUBLISHER_", extra="ignore")


def test_event_publisher_can_be_built_twice_for_a_service_in_one_process() -> None:
    """As a test suite (or a restart in place) does, on the process-wide registry."""
    settings = Settings()
    service = "test-publisher-metrics"
    for events in (2, 9):
        built = settings.event_publisher(NO_NATS, NO_NATS, "EVENTS", "hoosh", service)
        built.stats.published = events
        assert REGISTRY.get_sample_value("hoosh_events_published_total", {"service": service}) == events
