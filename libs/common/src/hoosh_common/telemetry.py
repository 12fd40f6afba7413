"""OpenTelemetry set-up from the standard OTEL_* variables, and W3C context
propagation across HTTP, gRPC metadata and NATS headers."""

from __future__ import annotations

import atexit
import logging
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from . import internal_auth

log = logging.getLogger(__name__)
_exporting = False
_messaging_tracer = trace.get_tracer("hoosh.events")


def _exporter_names() -> list[str]:
    """Which span exporters the standard variables ask for. ``OTEL_TRACES_EXPORTER``
    (``otlp``, ``console``, ``none``, comma-separated) wins; unset, spans leave over OTLP
    only when an endpoint is configured (a gateway must not try localhost:4317 by
    default). ``OTEL_SDK_DISABLED=true`` turns everything off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if names:
        return [name.strip() for name in names.split(",") if name.strip() and name.strip() != "none"]
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ["otlp"]
    return []


def _span_exporter(name: str) -> SpanExporter:
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (otlp, console or none)")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (grpc or http/protobuf)")


def configure_tracing(service: str) -> bool:
    """Install a tracer provider named after the service, from the standard ``OTEL_*``
    variables (exporter, endpoint, protocol, headers, sampler, resource attributes).

    Exporting: every span processor batches off the request path; Redis and aiohttp are
    instrumented; every gRPC call is a SERVER span (the interceptor
    :func:`hoosh_common.grpc_server.new_server` installs) and every HTTP request at the
    edge one (its middleware), both under the caller's context. Not exporting: no
    instrumentation at all; trace ids are still created and propagated (HTTP, gRPC
    metadata, NATS headers) so logs, events and audit entries join up. Returns whether
    spans are exported."""
    global _exporting
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", f"hoosh-{service}")})
    provider = TracerProvider(resource=resource)
    names = _exporter_names()
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_span_exporter(name)))
    trace.set_tracer_provider(provider)
    _exporting = bool(names)
    if _exporting:
        _instrument_libraries()
        atexit.register(provider.shutdown)  # flush what is batched on a clean exit
        log.info("exporting spans", extra={"exporters": names})
    return _exporting


def _instrument_libraries() -> None:
    """Redis and aiohttp spans (each only if that library is importable here)."""
    try:
        from opentelemetry.instrumentation.redis import RedisInstrumentor

        if not RedisInstrumentor().is_instrumented_by_opentelemetry:
            RedisInstrumentor().instrument()
    except ImportError:
        pass
    try:
        from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor

        if not AioHttpClientInstrumentor().is_instrumented_by_opentelemetry:
            AioHttpClientInstrumentor().instrument()
    except ImportError:
        pass


def exporting() -> bool:
    """Whether spans are exported (set once by :func:`configure_tracing`)."""
    return _exporting


def inject_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata pairs, for every call (exporting or
    not: no client interceptor adds it)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def request_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    """What every internal gRPC call carries: the request id (``x-request-id``; none when
    empty) and the trace context, so the callee's spans and log lines join the request's,
    and this process's internal token (``internal_auth.present_token``), without which
    the callee refuses the call."""
    pairs = (*inject_metadata(), *internal_auth.outgoing_metadata())
    return (("x-request-id", request_id), *pairs) if request_id else pairs


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context to a header dict (HTTP or NATS) and return it."""
    propagate.inject(headers)
    return headers


def extract_context(pairs: Mapping[str, str] | Iterable[tuple[str, str | bytes]] | None) -> context.Context:
    """Read a trace context from gRPC metadata pairs (binary ``-bin`` values are no
    trace context: left out) or a header mapping. While exporting, a gRPC server
    interceptor has already started this call's server span from that metadata: the
    current context (that span) is the one to continue."""
    if pairs is None or _exporting:
        return context.get_current()
    if isinstance(pairs, Mapping):
        return propagate.extract(dict(pairs))
    return propagate.extract({key: value for key, value in pairs if isinstance(value, str)})


def context_from_headers(headers: Mapping[str, str] | None) -> context.Context:
    """The trace context a message carried (NATS headers): always read from the
    message, exporting or not (no instrumentation stands between NATS and us)."""
    return propagate.extract(dict(headers or {}))


def incoming_context(traceparent: str | None, tracestate: str | None = None) -> context.Context:
    """The context for a request that arrived with (or without) a W3C traceparent.

    When spans are exported the caller starts a real span under the extracted context.
    Otherwise this hop gets a non-recording span of its own (the caller's trace id, or
    a new one) so the trace id still reaches logs, gRPC metadata, events and audit
    without the cost of a recorded span."""
    carrier = {"traceparent": traceparent} if traceparent else {}
    if tracestate:
        carrier["tracestate"] = tracestate
    if _exporting:
        # The edge's middleware starts the server span from these same headers.
        return context.get_current()
    extracted = propagate.extract(carrier)
    parent = trace.get_current_span(extracted).get_span_context()
    span_context = SpanContext(
        trace_id=parent.trace_id if parent.is_valid else random.getrandbits(128),
        span_id=random.getrandbits(64),
        is_remote=False,
        trace_flags=parent.trace_flags if parent.is_valid else TraceFlags(TraceFlags.SAMPLED),
        trace_state=parent.trace_state if parent.is_valid else None,
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context), extracted)


def producer_span(subject: str, event_id: str) -> AbstractContextManager[object]:
    """The span of publishing one event (kind PRODUCER, messaging conventions) while
    spans are exported; nothing otherwise. Its context is what the event's headers carry,
    so the consumer's span (audit's write) is its child."""
    if not _exporting:
        return nullcontext()
    return _messaging_tracer.start_as_current_span(
        f"publish {subject}",
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
            "messaging.message.id": event_id,
        },
    )


def current_trace_id() -> str:
    span_context = trace.get_current_span().get_span_context()
    return f"{span_context.trace_id:032x}" if span_context.is_valid else ""


@contextmanager
def capture_spans() -> Iterator[InMemorySpanExporter]:
    """For tests inside one process: export every span ended in the block to memory,
    exactly as if the ``OTEL_*`` variables had asked for an exporter (gRPC servers and
    channels created in the block get their tracing interceptors; spans are recorded
    instead of skipped). Library instrumentation (Redis, aiohttp) is not installed."""
    global _exporting
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(resource=Resource.create({"service.name": "hoosh-test"}))
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    was_exporting, _exporting = _exporting, True
    try:
        yield exporter
    finally:
        _exporting = was_exporting
        processor.shutdown()  # it stays registered but exports nothing more
