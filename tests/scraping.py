"""Reading a service's Prometheus ``/metrics`` in tests: over HTTP, through
prometheus_client's own text parser, one sample per (name, labels)."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest
from hoosh_common.metrics import serve_metrics
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """The process-wide registry served on a free port (once: a daemon thread)."""
    port = serve_metrics("127.0.0.1:0")
    assert port is not None
    return port


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(port: int) -> Samples:
    """Every sample of ``/metrics`` by (name, labels), fetched off the event loop."""
    return await asyncio.to_thread(_scrape, port)


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)
