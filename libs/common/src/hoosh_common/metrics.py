"""Prometheus metrics shared by every hoosh service.

Each service defines its own instruments (in its ``metrics.py``) on the process-wide
registry and serves them with :func:`serve_metrics` on a port of its own
(``HOOSH_<SERVICE>_METRICS_LISTEN``). The scrape runs on a thread of that server,
never on the event loop; anything that must be read from Redis or another async source
is kept as a snapshot the service refreshes in its loop and a collector reads (see
:class:`SnapshotCollector`).

Label values come from configuration (routes, providers, pools) or from a bounded
set (:class:`BoundedLabel`): never request ids, never raw key ids beyond an
allowlist, never a client's unvalidated string.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import socket
import socketserver
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .internal_auth import CallerPolicy, Denial
from .telemetry import exporting

if TYPE_CHECKING:
    from .eventbus import EventPublisher

log = logging.getLogger(__name__)

# The GenAI semantic conventions' advisory buckets.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
# Internal hops (a gRPC call inside the cluster, a Redis script): sub-millisecond to seconds.
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

OTHER = "_other"


# The scrape endpoint: Prometheus scrapes every 15-60 s; anything that holds a
# connection longer than this, or more connections than this, is not a scraper.
SCRAPE_TIMEOUT_S = 10.0
MAX_SCRAPE_CONNECTIONS = 16


def serve_metrics(
    listen: str,
    registry: CollectorRegistry = REGISTRY,
    *,
    timeout_s: float = SCRAPE_TIMEOUT_S,
    max_connections: int = MAX_SCRAPE_CONNECTIONS,
) -> int | None:
    """Serve ``/metrics`` on ``host:port`` (``""`` or ``off``: not served) from a daemon
    thread. Returns the bound port (``:0`` picks a free one); a port that cannot be bound
    raises :class:`OSError` (a service fails fast). See :class:`MetricsServer`."""
    server = start_metrics_server(listen, registry, timeout_s=timeout_s, max_connections=max_connections)
    if server is None:
        return None
    log.info("metrics listening", extra={"address": f"{server.server_address[0]!s}:{server.server_port}"})
    return server.server_port


def start_metrics_server(
    listen: str,
    registry: CollectorRegistry = REGISTRY,
    *,
    timeout_s: float = SCRAPE_TIMEOUT_S,
    max_connections: int = MAX_SCRAPE_CONNECTIONS,
) -> MetricsServer | None:
    """:func:`serve_metrics`, returning the running server (``close()`` stops it) instead
    of its port."""
    listen = listen.strip()
    if not listen or listen.lower() == "off":
        return None
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    # The family the address asks for (an IPv6 host needs an AF_INET6 socket).
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server = MetricsServer(
        (str(sockaddr[0]), int(sockaddr[1])),
        make_wsgi_app(registry),
        family=family,
        timeout_s=timeout_s,
        max_connections=max_connections,
    )
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


class MetricsServer(ThreadingMixIn, WSGIServer):
    """The scrape server: a thread per connection (a scrape never waits on another, and
    never runs on the event loop), at most ``max_connections`` of them (one more is
    closed at once, without a thread), each held to ``timeout_s``: the whole request
    must arrive within it (a client that sends nothing, or trickles, is dropped) and
    each write of the response must progress within it. No line per request is logged.
    prometheus_client's own ``start_http_server`` has no timeout and no bound: idle
    half-open connections each kept a thread and a descriptor for good."""

    daemon_threads = True
    block_on_close = False  # close() does not wait for connection threads (each ends by its timeout)
    request_queue_size = 64  # the listen backlog: a burst of connections waits for accept()

    def __init__(
        self,
        address: tuple[str, int],
        app: Callable[..., Iterable[bytes]],
        *,
        family: socket.AddressFamily = socket.AF_INET,
        timeout_s: float = SCRAPE_TIMEOUT_S,
        max_connections: int = MAX_SCRAPE_CONNECTIONS,
    ) -> None:
        self.address_family = family
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _ScrapeHandler)  # binds: OSError if the port is taken
        self.set_app(app)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a DNS lookup at start, for a
        # name used only in the WSGI environ): the literal address does.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the bound: closed at once, no thread started
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr: a client that went away is not news.
        log.debug("metrics connection failed", exc_info=True)

    def close(self) -> None:
        """Stop accepting and close the listening socket."""
        self.shutdown()
        self.server_close()


class _DeadlineReader(io.RawIOBase):
    """The request's bytes, read against one deadline for the whole request: a timeout
    per read alone would let a client that sends a byte now and then hold a slot."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self.deadline: float | None = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("request not received in time")
            self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _LogStream:
    """wsgiref's stderr for the app's failures: one log record per traceback rather than
    raw text amid the JSON lines."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def write(self, text: str) -> int:
        self._parts.append(text)
        return len(text)

    def flush(self) -> None:
        if self._parts:
            text, self._parts = "".join(self._parts), []
            log.warning("metrics scrape failed", extra={"error": text.strip()})


class _ScrapeHandler(WSGIRequestHandler):
    server: MetricsServer

    def setup(self) -> None:
        # Each socket operation (StreamRequestHandler applies it). typeshed declares the
        # attribute a ClassVar, but setup() reads it from the instance.
        self.timeout = self.server.timeout_s  # type: ignore[misc]
        super().setup()
        self.rfile.close()  # the plain reader: replaced by one that holds the request to a deadline
        self._reader = _DeadlineReader(self.connection, time.monotonic() + self.server.timeout_s)
        self.rfile = io.BufferedReader(self._reader)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        # The request line and headers are in (a GET has no body): the response's writes
        # get the plain per-operation timeout.
        self._reader.deadline = None
        self.connection.settimeout(self.server.timeout_s)
        return parsed

    def handle(self) -> None:
        try:
            super().handle()
        except (TimeoutError, ConnectionError):
            pass  # too slow, or gone: dropped quietly (finish() closes the connection)

    def get_stderr(self) -> _LogStream:  # type: ignore[override]
        return _LogStream()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no line per request (or per malformed request) on stderr


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

    def __init__(self, families: Callable[[], Iterable[Metric]]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        try:
            yield from self._families()
        except Exception:
            log.exception("metrics collector failed")


def register_collector(collector: Collector, registry: CollectorRegistry = REGISTRY) -> Collector:
    registry.register(collector)
    return collector


# -- gRPC server metrics (the names go-grpc-prometheus and py-grpc-prometheus use) --------

# A call's whole life: FAST_BUCKETS for unary calls, then minutes for streams (a long
# generation, an hour of audio uploaded): past 30 s they would all land in +Inf.
GRPC_HANDLING_BUCKETS = (*FAST_BUCKETS, 60.0, 120.0, 300.0, 600.0)

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
    buckets=GRPC_HANDLING_BUCKETS,
)

_HEALTH_SERVICE = "grpc.health.v1.Health"
_CODE_NAMES = {status.value[0]: status.name for status in grpc.StatusCode}


def _status_name(code: object) -> str | None:
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # an int from the C core
        return _CODE_NAMES.get(code)
    return None


def _code_of(context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None, *, cut: bool = False) -> str:
    """The status the client got. ``error``: what the handler raised (None: it returned);
    ``cut``: the call ended while its handler was not running (gRPC's task was
    cancelled while it wrote a reply, the handler's generator left at its ``yield``)."""
    try:
        code = _status_name(context.code())
    except Exception:  # older grpcio: no code() on the aio context
        code = None
    if code is not None and code != "OK":
        return code  # abort() or set_code(): what was sent (grpc.aio's cancelled() is only this code)
    # gRPC cancels the handler at the deadline as it does for a client that went away;
    # time_remaining() tells them apart (0 once the deadline has passed).
    try:
        remaining = context.time_remaining()
    except Exception:
        remaining = None
    if remaining is not None and remaining <= 0:
        return "DEADLINE_EXCEEDED"
    if cut or isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    if error is not None:
        return "UNKNOWN"  # what gRPC sends for an exception that set no code
    return "OK"


class _MethodMetrics:
    __slots__ = (
        "_handled_by_code",
        "handled",
        "handling",
        "kind",
        "method",
        "service",
        "span_attributes",
        "span_name",
        "started",
    )

    def __init__(self, kind: str, full_method: str, span_attributes: Mapping[str, Any] | None = None) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        self.kind, self.service, self.method = kind, service, method
        self.started = GRPC_STARTED.labels(kind, service, method)
        self.handling = GRPC_HANDLING.labels(kind, service, method)
        self._handled_by_code: dict[str, Any] = {}
        self.span_name = f"{service}/{method}"
        self.span_attributes = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            **(span_attributes or {}),
        }

    def begin(self) -> float:
        self.started.inc()
        return time.perf_counter()

    def server_span(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> AbstractContextManager[Span | None]:
        """The call's SERVER span, child of the context the caller sent in ``metadata``,
        while spans are exported (nothing otherwise). hoosh's own: OpenTelemetry's gRPC
        interceptors cost about 0.4 ms per call on a 2-core machine even for calls not
        sampled; this is one span and one extraction."""
        if not exporting():
            return _NO_SPAN
        carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
        return _tracer.start_as_current_span(
            self.span_name,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=self.span_attributes,
            record_exception=False,
            set_status_on_exception=False,
        )

    def done(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        started: float,
        error: BaseException | None,
        *,
        cut: bool = False,
        span: Span | None = None,
    ) -> None:
        self.finish(_code_of(context, error, cut=cut), started, span=span)

    def finish(self, code: str, started: float, *, span: Span | None = None) -> None:
        """Count a call that ended with status ``code`` (its name)."""
        counter = self._handled_by_code.get(code)
        if counter is None:
            counter = self._handled_by_code[code] = GRPC_HANDLED.labels(self.kind, self.service, self.method, code)
        counter.inc()
        self.handling.observe(time.perf_counter() - started)
        if span is not None and span.is_recording():
            span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
            if code in _SERVER_ERRORS:
                span.set_status(StatusCode.ERROR, code)


_shared_method_metrics: dict[tuple[str, str], _MethodMetrics] = {}


def method_metrics(kind: str, full_method: str, span_attributes: Mapping[str, Any] | None = None) -> _MethodMetrics:
    """The gRPC server metrics of one method and kind, built once per process (their
    label children resolved once): the interceptor's, and those of calls that arrive
    some other way than as calls of their own (the router's Tunnel frames count as the
    Chat / Respond calls they stand for, kind "tunneled"). ``span_attributes`` are added
    to the calls' spans; only the first caller's count."""
    found = _shared_method_metrics.get((kind, full_method))
    if found is None:
        found = _shared_method_metrics[(kind, full_method)] = _MethodMetrics(kind, full_method, span_attributes)
    return found


# The codes that mean the server failed (a client's mistake, a refusal, is not an error of the span).
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})
_tracer = trace.get_tracer("hoosh.grpc")
_NO_SPAN: AbstractContextManager[None] = nullcontext()


class _StreamCall:
    """One response-streaming call, counted once. The wrapper counts it as its generator
    ends; but when the call is cut while gRPC is writing a reply, the generator is left
    suspended at ``yield`` (finalized whenever the garbage collector gets to it), so the
    call's done callback counts it then."""

    __slots__ = ("counted", "metrics", "span", "started")

    def __init__(self, metrics: _MethodMetrics) -> None:
        self.metrics = metrics
        self.started = metrics.begin()
        self.counted = False
        self.span: Span | None = None

    def done(
        self, context: grpc.aio.ServicerContext[Any, Any], error: BaseException | None, *, cut: bool = False
    ) -> None:
        if not self.counted:
            self.counted = True
            self.metrics.done(context, self.started, error, cut=cut, span=self.span)

    def __call__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # the done callback
        self.done(context, None, cut=True)


class _Requests:
    """The request stream as the handler reads it, noting whether it reached its end."""

    __slots__ = ("_inner", "_iterator", "ended")

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._iterator: Any = None
        self.ended = False

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        if self._iterator is None:  # lazily: gRPC's reader starts its generator on first use
            self._iterator = self._inner.__aiter__()
        try:
            return await self._iterator.__anext__()
        except StopAsyncIteration:
            self.ended = True
            raise


async def _settle_request_end(context: grpc.aio.ServicerContext[Any, Any], requests: _Requests) -> None:
    """Raise CancelledError when the request stream ended because the client cancelled.

    grpc.aio ends the handler's request iterator the same way for a half-close and for a
    cancel (a failed read reads as end-of-stream), and ``context.cancelled()`` only
    reports a CANCELLED code the server set itself; a handler that returns as soon as its
    requests end would be counted OK. gRPC cancels the handler's task when the core
    reports the cancel (unless the reply is already on its way, which is why the
    handler's own return is too early to tell), and the core reports it before it
    completes a read asked after it: one more read (after a half-close: end-of-stream
    again, at once, ~30 us) lets the cancel land here. Only once the stream has ended:
    a read before would take a request. (A handler that reads with context.read()
    rather than the iterator is not covered.)"""
    if not requests.ended:
        return
    try:
        await context.read()
    except asyncio.CancelledError:
        raise
    except Exception:
        pass  # the server stopping, say: the handler's outcome stands


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC but health checks. Put it LAST among a server's
    interceptors (grpc.aio runs them in order, each one's continuation calling the next):
    then the handler it wraps is the servicer's own, the same object on every call, and
    the wrapped handler is built once per method (the label children resolved once too),
    so the cost per call is two counter increments and one histogram observation. An
    interceptor after it that builds a new handler per call (OpenTelemetry's does) would
    make it wrap on every call; the label children are still resolved once."""

    def __init__(self, policy: CallerPolicy | None = None) -> None:
        self._policy = policy
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}
        self._denials: dict[tuple[str, Denial], grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(f"/{_HEALTH_SERVICE}/"):
            return handler  # an unknown method (a name the client made up) is never cached
        if self._policy is not None:
            denial = self._policy.check(method, handler_call_details.invocation_metadata)
            if denial is not None:
                return self._denied(handler, method, denial)
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _wrap(handler, method, method_metrics)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _denied(
        self, handler: grpc.RpcMethodHandler[Any, Any], method: str, denial: Denial
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """A handler of the method's own kind that aborts with the denial, counted like
        any call; the request is never deserialized (an unknown caller's bytes are not
        parsed)."""
        denied = self._denials.get((method, denial))
        if denied is None:
            denied = _wrap(_denial_handler(handler, denial), method, method_metrics)
            self._denials[(method, denial)] = denied
        return denied


def _denial_handler(handler: grpc.RpcMethodHandler[Any, Any], denial: Denial) -> grpc.RpcMethodHandler[Any, Any]:
    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(denial.code, denial.message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort(denial.code, denial.message)
        yield  # never reached: makes this an async generator like the method's own handler

    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, None, serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, None, serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, None, serializer)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, None, serializer)


def _is_async(behaviour: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    method: str,
    metrics_for: Callable[[str, str], _MethodMetrics] = method_metrics,
) -> grpc.RpcMethodHandler[Any, Any]:
    behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    if behaviour is None or not _is_async(behaviour):
        return handler  # a sync handler runs on gRPC's thread pool: not wrapped (hoosh has none)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary_response(handler.unary_unary, metrics_for("unary", method), streaming_requests=False),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary_response(handler.stream_unary, metrics_for("client_stream", method), streaming_requests=True),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _stream_response(handler.unary_stream, metrics_for("server_stream", method), streaming_requests=False),
            handler.request_deserializer,
            handler.response_serializer,
        )
    if handler.stream_stream is None:
        return handler
    return grpc.stream_stream_rpc_method_handler(
        _stream_response(handler.stream_stream, metrics_for("bidi_stream", method), streaming_requests=True),
        handler.request_deserializer,
        handler.response_serializer,
    )


def _unary_response(
    behaviour: Callable[..., Awaitable[Any]], metrics: _MethodMetrics, *, streaming_requests: bool
) -> Callable[..., Awaitable[Any]]:
    """Unary and client-streaming calls (and a streaming one written with context.write()):
    the handler runs inside this coroutine, so a cancel reaches it here. Counted before
    the reply leaves: a caller that reads the metrics after its reply sees its call."""

    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = metrics.begin()
        requests = _Requests(request) if streaming_requests else None
        with metrics.server_span(context.invocation_metadata()) as span:
            try:
                reply = await behaviour(requests if requests is not None else request, context)
                if requests is not None:
                    await _settle_request_end(context, requests)
            except BaseException as error:
                metrics.done(context, started, error, span=span)
                raise
            metrics.done(context, started, None, span=span)
            return reply

    return call


def _stream_response(
    behaviour: Callable[..., Any], metrics: _MethodMetrics, *, streaming_requests: bool
) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(behaviour):  # the reader/writer API: it returns, gRPC sends the status
        return _unary_response(behaviour, metrics, streaming_requests=streaming_requests)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        call = _StreamCall(metrics)
        # types-grpcio types the callback as a type-check-only class, not as a callable.
        context.add_done_callback(call)  # type: ignore[arg-type]
        requests = _Requests(request) if streaming_requests else None
        with metrics.server_span(context.invocation_metadata()) as span:
            call.span = span
            try:
                async for reply in behaviour(requests if requests is not None else request, context):
                    yield reply
                if requests is not None:
                    await _settle_request_end(context, requests)
            except BaseException as error:
                call.done(context, error)
                raise
            call.done(context, None)

    return stream


# -- event publisher (router, stt, budget) ------------------------------------------------

_publisher_lock = threading.Lock()
# registry -> service -> that service's publisher collector there.
_publisher_collectors: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Collector]] = weakref.WeakKeyDictionary()


def register_publisher_metrics(
    publisher: EventPublisher, service: str, registry: CollectorRegistry = REGISTRY
) -> Collector:
    """The publisher's state at scrape time: events in flight, the outbox's depth, and
    its counters since start (published, kept, drained, rejected, lost). One collector
    per service and registry: a later publisher for the same service (built again in
    one process: a test, a restart in place) replaces the earlier one's collector,
    rather than failing as a duplicate."""

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
        depth = None
        if outbox is not None:
            try:
                depth = outbox.depth()
            except (IndexError, RuntimeError):  # read from this thread while the loop empties it
                depth = None
        if depth is not None:
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

    collector = SnapshotCollector(families)
    with _publisher_lock:
        registered = _publisher_collectors.setdefault(registry, {})
        previous = registered.pop(service, None)
        if previous is not None:
            try:
                registry.unregister(previous)
            except KeyError:  # unregistered by someone else meanwhile
                previous = None
        try:
            register_collector(collector, registry)
        except BaseException:
            if previous is not None:  # keep the working one rather than none
                register_collector(previous, registry)
                registered[service] = previous
            raise
        registered[service] = collector
    return collector
