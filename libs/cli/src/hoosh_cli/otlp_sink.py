"""A small OTLP/gRPC trace receiver in this process: what the services export when
``OTEL_EXPORTER_OTLP_ENDPOINT`` points at it. The end-to-end tests read whole traces
from it; the benchmark uses it as the collector when it measures exporting on.

It speaks the real protocol (``opentelemetry.proto.collector.trace.v1.TraceService``)
on a loopback port, so the services run exactly as they would against a Collector.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SPAN_KINDS = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "internal",
    trace_pb2.Span.SPAN_KIND_SERVER: "server",
    trace_pb2.Span.SPAN_KIND_CLIENT: "client",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "producer",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "consumer",
}


def _value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return {item.key: _value(item.value) for item in value.kvlist_value.values}
    return getattr(value, which) if which else None


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    status_error: bool = False


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every exported span; ``start()`` returns the endpoint to export to."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep  # False: count only (the benchmark)
        self.spans: list[ReceivedSpan] = []
        self.received = 0
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received: list[ReceivedSpan] = []
        count = 0
        for resource_spans in request.resource_spans:
            service = ""
            for attribute in resource_spans.resource.attributes:
                if attribute.key == "service.name":
                    service = attribute.value.string_value
            for scope_spans in resource_spans.scope_spans:
                count += len(scope_spans.spans)
                if not self.keep:
                    continue
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            kind=SPAN_KINDS.get(span.kind, "unspecified"),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                            attributes={item.key: _value(item.value) for item in span.attributes},
                            status_error=span.status.code == trace_pb2.Status.STATUS_CODE_ERROR,
                        )
                    )
        with self._lock:
            self.received += count
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self, host: str = "127.0.0.1") -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        # opentelemetry-proto's generated gRPC module is unannotated (and has no stubs).
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port(f"{host}:0")
        server.start()
        self._server = server
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(
        self, trace_id: str, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 20.0
    ) -> list[ReceivedSpan]:
        """The trace's spans once ``done(spans)`` holds (or whatever arrived by the timeout)."""
        deadline = time.monotonic() + timeout
        spans = self.trace(trace_id)
        while not done(spans) and time.monotonic() < deadline:
            time.sleep(0.1)
            spans = self.trace(trace_id)
        return spans
