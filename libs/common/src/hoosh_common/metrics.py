"""Prometheus metrics shared by every hoosh service.

Each service defines its own instruments (in its ``metrics.py``) on the process-wide
registry and serves them with :func:`serve_metrics` on a port of its own
(``HOOSH_<SERVICE>_METRICS_LISTEN``). The scrape runs on prometheus_client's own
thread, never on the event loop; anything that must be read from Redis or another
async source is kept as a snapshot the service refreshes in its loop and a collector
reads (see :class:`SnapshotCollector`).

Label values come from configuration (routes, providers, pools) or from a bounded
set (:class:`BoundedLabel`): never request ids, never raw key ids beyond an
allowlist, never a client's unvalidated string.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .eventbus import EventPublisher

log = logging.getLogger(__name__)

# The GenAI semantic conventions' advisory buckets.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
# Internal hops (a gRPC call inside the cluster, a Redis script): sub-millisecond to seconds.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

OTHER = "_other"


def serve_metrics(listen: str, registry: CollectorRegistry = REGISTRY) -> int | None:
    """Serve ``/metrics`` on ``host:port`` (``""`` or ``off``: not served) from a daemon
    thread. Returns the bound port (``:0`` picks a free one)."""
    if not listen or listen.lower() == "off":
        return None
    host, _, port_text = listen.rpartition(":")
    server, _thread = start_http_server(int(port_text), addr=host.strip("[]") or "0.0.0.0", registry=registry)
    port = int(server.server_port)
    log.info("metrics listening", extra={"address": f"{host or '0.0.0.0'}:{port}"})
    return port


class BoundedLabel:
    """A label whose distinct values are capped: the first ``limit`` values seen pass
    through, later new ones become ``_other`` (one series, not one per value). For
    values that are already bounded by configuration but could grow large (pools)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OTHER


class KeyLabel:
    """Key ids as a label only for an operator's allowlist (``HOOSH_METRICS_KEY_IDS``);
    every other key is ``_other``."""

    def __init__(self, allowlist: Iterable[str] = ()) -> None:
        self.allowed = frozenset(key.strip() for key in allowlist if key.strip())

    def __call__(self, key_id: str) -> str:
        return key_id if key_id in self.allowed else OTHER


class SnapshotCollector(Collector):
    """Gauges built at scrape time from a function that reads in-memory state only
    (safe from the scrape thread: no I/O, no event loop). ``families`` returns the
    metric families; an exception is logged and yields nothing for that scrape."""

    def __init__(self, families: Callable[[], Iterable[GaugeMetricFamily]]) -> None:
        self._families = families

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            yield from self._families()
        except Exception:
            log.exception("metrics collector failed")


def register_collector(collector: Collector, registry: CollectorRegistry = REGISTRY) -> Collector:
    registry.register(collector)
    return collector


# -- gRPC server metrics (the names go-grpc-prometheus and py-grpc-prometheus use) --------

GRPC_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", ["grpc_type", "grpc_service", "grpc_method"]
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Time from the RPC's start to its end on the server (a stream: its whole life).",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=FAST_BUCKETS,
)

_HEALTH_SERVICE = "grpc.health.v1.Health"


def _code_of(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
    code = None
    try:
        code = context.code()
    except Exception:  # older grpcio: no code() on the aio context
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if code:  # an int from the C core
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    if error is None:
        return "OK"
    if type(error).__name__ in ("CancelledError", "GeneratorExit"):  # the client went away
        return "CANCELLED"
    return "UNKNOWN"


class _MethodMetrics:
    __slots__ = ("_handled_by_code", "handled", "handling", "kind", "method", "service", "started")

    def __init__(self, kind: str, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        self.kind, self.service, self.method = kind, service, method
        self.started = GRPC_STARTED.labels(kind, service, method)
        self.handling = GRPC_HANDLING.labels(kind, service, method)
        self._handled_by_code: dict[str, Any] = {}

    def done(self, context: grpc.aio.ServicerContext, started: float, error: BaseException | None) -> None:
        code = _code_of(context, error)
        counter = self._handled_by_code.get(code)
        if counter is None:
            counter = self._handled_by_code[code] = GRPC_HANDLED.labels(self.kind, self.service, self.method, code)
        counter.inc()
        self.handling.observe(time.perf_counter() - started)


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC but health checks. The wrapped handler is built once
    per method (the label children are resolved once too), so the cost per call is two
    counter increments and one histogram observation."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(f"/{_HEALTH_SERVICE}/"):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    if handler.unary_unary is not None:
        metrics = _MethodMetrics("unary", method)
        behaviour = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            metrics.started.inc()
            started = time.perf_counter()
            try:
                reply = await behaviour(request, context)
            except BaseException as error:
                metrics.done(context, started, error)
                raise
            metrics.done(context, started, None)
            return reply

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream is not None:
        metrics = _MethodMetrics("server_stream", method)
        streaming = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            metrics.started.inc()
            started = time.perf_counter()
            try:
                async for reply in streaming(request, context):
                    yield reply
            except BaseException as error:
                metrics.done(context, started, error)
                raise
            metrics.done(context, started, None)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary is not None:
        metrics = _MethodMetrics("client_stream", method)
        gathering = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            metrics.started.inc()
            started = time.perf_counter()
            try:
                reply = await gathering(requests, context)
            except BaseException as error:
                metrics.done(context, started, error)
                raise
            metrics.done(context, started, None)
            return reply

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, handler.request_deserializer, handler.response_serializer
        )
    metrics = _MethodMetrics("bidi_stream", method)
    both = handler.stream_stream

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        metrics.started.inc()
        started = time.perf_counter()
        try:
            async for reply in both(requests, context):
                yield reply
        except BaseException as error:
            metrics.done(context, started, error)
            raise
        metrics.done(context, started, None)

    return grpc.stream_stream_rpc_method_handler(
        stream_stream, handler.request_deserializer, handler.response_serializer
    )


# -- event publisher (router, stt, budget) ------------------------------------------------


def register_publisher_metrics(
    publisher: EventPublisher, service: str, registry: CollectorRegistry = REGISTRY
) -> Collector:
    """The publisher's state at scrape time: events in flight, the outbox's depth, and
    its counters since start (published, kept, drained, rejected, lost)."""

    def families() -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        labels = ["service"]
        values = [service]
        stats = publisher.stats
        pending = GaugeMetricFamily("hoosh_events_in_flight", "Events being published (not acked yet).", labels=labels)
        pending.add_metric(values, publisher.pending)
        yield pending
        healthy = GaugeMetricFamily(
            "hoosh_events_healthy", "1 while new work is taken (events can be kept), else 0.", labels=labels
        )
        healthy.add_metric(values, 1 if publisher.healthy else 0)
        yield healthy
        outbox = publisher.outbox
        if outbox is not None:
            depth = outbox.depth()
            for name, text, value in (
                ("hoosh_events_outbox_entries", "Events waiting in the outbox for NATS.", depth.entries),
                ("hoosh_events_outbox_bytes", "Bytes waiting in the outbox.", depth.bytes),
                ("hoosh_events_outbox_oldest_age_seconds", "Age of the oldest waiting event.", depth.oldest_age_s),
                ("hoosh_events_outbox_max_entries", "The outbox's bound on entries.", depth.max_entries),
            ):
                family = GaugeMetricFamily(name, text, labels=labels)
                family.add_metric(values, value)
                yield family
        for name, text, value in (
            ("hoosh_events_published", "Events JetStream acked on the direct path.", stats.published),
            ("hoosh_events_kept", "Events written to the outbox (NATS did not ack in time).", stats.kept),
            ("hoosh_events_drained", "Outbox events JetStream acked later.", stats.drained),
            ("hoosh_events_rejected", "Outbox events refused for good (moved aside).", stats.rejected),
            ("hoosh_events_lost", "Events dropped (memory overflow past its bound).", stats.lost),
        ):
            counter = CounterMetricFamily(name, text, labels=labels)
            counter.add_metric(values, value)
            yield counter

    return register_collector(SnapshotCollector(families), registry)
