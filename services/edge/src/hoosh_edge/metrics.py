"""The edge's Prometheus metrics: HTTP requests by route template, method and status,
their latency, streams' time to first token, requests in flight, auth refusals.

Served on the edge's own metrics port (``HOOSH_EDGE_METRICS_LISTEN``) by the main
process, and at ``GET /metrics`` on the API port for admin keys. With several uvicorn
workers the workers write to ``PROMETHEUS_MULTIPROC_DIR`` (set by ``__main__`` before
they start) and both places aggregate every worker's values.

The route label is the route's template (``/v1/admin/keys/{key_id}``), never the raw
path: an unknown path is ``_other``, so a scanner cannot grow the series.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from fastapi import FastAPI
from hoosh_common.metrics import DURATION_BUCKETS, OTHER, serve_metrics
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Served but not in the OpenAPI document.
UNDOCUMENTED_ROUTES = ("/metrics", "/docs", "/docs/oauth2-redirect", "/openapi.json")

REQUESTS = Counter(
    "hoosh_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
DURATION = Histogram(
    "hoosh_http_request_duration_seconds",
    "From the request's arrival to the end of its response (a stream: its last byte).",
    ["route", "method"],
    buckets=DURATION_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "hoosh_http_time_to_first_token_seconds",
    "Streamed responses: from the request's arrival to the first event sent.",
    ["route"],
    buckets=DURATION_BUCKETS,
)
IN_FLIGHT = Gauge("hoosh_http_requests_in_flight", "HTTP requests being served.", multiprocess_mode="livesum")
AUTH_FAILURES = Counter("hoosh_auth_failures_total", "Requests refused by authentication, by error code.", ["reason"])


class RouteLabels:
    """Path → route template. Static paths are one dictionary lookup; paths with
    parameters are matched against the templates' patterns (admin routes: rare)."""

    def __init__(self, templates: Iterable[str]) -> None:
        self._static: dict[str, str] = {}
        self._patterns: list[tuple[re.Pattern[str], str]] = []
        for template in templates:
            if "{" in template:
                pattern = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
                if template.endswith("}"):
                    # A last parameter may hold slashes (model ids such as provider/model).
                    pattern = pattern.removesuffix("[^/]+") + ".+"
                self._patterns.append((re.compile(f"^{pattern}$"), template))
            else:
                self._static[template] = template

    @classmethod
    def of_app(cls, app: FastAPI) -> RouteLabels:
        """Every documented path of the app (its OpenAPI document), plus the few routes
        the document leaves out."""
        return cls([*app.openapi().get("paths", {}), *UNDOCUMENTED_ROUTES])

    def __call__(self, path: str) -> str:
        template = self._static.get(path)
        if template is not None:
            return template
        for pattern, template in self._patterns:
            if pattern.match(path):
                return template
        return OTHER


# The methods a route can have; any other (PROPFIND, PURGE, ...) is one label value.
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


def http_method(method: str) -> str:
    """``method`` as a label: the standard ones, else ``_other`` (clients choose it)."""
    return method if method in _METHODS else OTHER


def edge_registry() -> CollectorRegistry:
    """Every metric of this edge: with several workers (multiprocess mode) a registry
    that reads all their files, else this process's own."""
    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    registry = CollectorRegistry()
    # prometheus_client leaves MultiProcessCollector.__init__ unannotated.
    prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def exposition() -> bytes:
    """The text format of every metric this edge has (all workers in multiprocess mode)."""
    return generate_latest(edge_registry())


def serve_edge_metrics(listen: str) -> int | None:
    """The metrics port, served by the main process (the one worker, or the supervisor
    reading every worker's files)."""
    return serve_metrics(listen, edge_registry())
