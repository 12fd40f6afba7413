"""OpenTelemetry set-up from the standard OTEL_* variables, and W3C context
propagation across HTTP, gRPC metadata and NATS headers."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

log = logging.getLogger(__name__)
_exporting = False


def configure_tracing(service: str) -> None:
    """Install a tracer provider named after the service.

    Spans are exported over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set and
    the exporter package is installed; otherwise trace ids are still created and
    propagated so logs, events and audit entries can be correlated.
    """
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", f"hoosh-{service}")})
    global _exporting
    provider = TracerProvider(resource=resource)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning("OTEL endpoint set but opentelemetry-exporter-otlp-proto-grpc is not installed")
        else:
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            _exporting = True
    trace.set_tracer_provider(provider)


def domain_span(tracer: trace.Tracer, name: str, attributes: dict[str, str]) -> AbstractContextManager[object]:
    """A span when spans are exported; otherwise nothing. The propagated context (and so
    the trace id in logs, events and audit) is there either way; an unexported span
    would only cost CPU on the hot path."""
    if _exporting:
        return tracer.start_as_current_span(name, attributes=attributes)
    return nullcontext()


def inject_metadata() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata pairs."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def inject_headers(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context to a header dict (HTTP or NATS) and return it."""
    propagate.inject(headers)
    return headers


def extract_context(pairs: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> context.Context:
    """Read a trace context from gRPC metadata pairs or a header mapping."""
    if pairs is None:
        return context.get_current()
    carrier = dict(pairs.items() if isinstance(pairs, Mapping) else pairs)
    return propagate.extract(carrier)


def incoming_context(traceparent: str | None, tracestate: str | None = None) -> context.Context:
    """The context for a request that arrived with (or without) a W3C traceparent.

    When spans are exported the caller starts a real span under the extracted context.
    Otherwise this hop gets a non-recording span of its own (the caller's trace id, or
    a new one) so the trace id still reaches logs, gRPC metadata, events and audit
    without the cost of a recorded span."""
    carrier = {"traceparent": traceparent} if traceparent else {}
    if tracestate:
        carrier["tracestate"] = tracestate
    extracted = propagate.extract(carrier)
    if _exporting:
        return extracted
    parent = trace.get_current_span(extracted).get_span_context()
    span_context = SpanContext(
        trace_id=parent.trace_id if parent.is_valid else random.getrandbits(128),
        span_id=random.getrandbits(64),
        is_remote=False,
        trace_flags=parent.trace_flags if parent.is_valid else TraceFlags(TraceFlags.SAMPLED),
        trace_state=parent.trace_state if parent.is_valid else None,
    )
    return trace.set_span_in_context(NonRecordingSpan(span_context), extracted)


def current_trace_id() -> str:
    span_context = trace.get_current_span().get_span_context()
    return f"{span_context.trace_id:032x}" if span_context.is_valid else ""
