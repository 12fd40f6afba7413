"""The audit's metrics, spans and log lines, from events on the real JetStream: the
counters move by exactly what was written (scraped over HTTP and parsed with the
Prometheus text parser), the lag drains to 0, the write is a span of the request's
trace, and each written event logs one line joined by request id and trace id."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from hoosh.chat.v1 import chat_pb2
from hoosh.events.v1 import events_pb2
from hoosh_audit.consumer import WRITE_SPAN, AuditConsumer, trace_ids
from hoosh_audit.keys import Keyring
from hoosh_audit.log import AuditLog
from hoosh_common.eventbus import MSG_ID_HEADER, REQUEST_ID_HEADER, EventPublisher, ensure_stream
from hoosh_common.logs import JsonFormatter
from hoosh_common.metrics import serve_metrics
from hoosh_common.telemetry import capture_spans
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Bus
from .helpers import wait_until

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Running(NamedTuple):
    consumer: AuditConsumer
    log: AuditLog


StartConsumer = Callable[..., Awaitable[Running]]


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """The process-wide registry served once on a free port (as ``python -m hoosh_audit`` does)."""
    port = serve_metrics("127.0.0.1:0")
    assert port is not None
    return port


async def scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            return str(reply.read().decode("utf-8"))

    text = await asyncio.to_thread(get)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def written(samples: Samples, kind: str) -> float:
    return value(samples, "hoosh_audit_events_written_total", kind=kind)


@pytest.fixture
async def publisher(bus: Bus) -> EventPublisher:
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    return EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix)


@pytest.fixture
async def start_consumer(bus: Bus, keyring: Keyring, log_dir: Path) -> AsyncIterator[StartConsumer]:
    """A consumer on the test's stream; ``run=False`` declares it without running it."""
    started: list[tuple[AuditConsumer, AuditLog, asyncio.Task[None] | None]] = []

    async def start(*, run: bool = True) -> Running:
        audit_log = await AuditLog.open(log_dir, keyring, subject_prefix=bus.prefix)
        consumer = AuditConsumer(
            bus.js, audit_log, stream=bus.stream, subject_prefix=bus.prefix, durable="audit", stream_info_interval=0.1
        )
        task = asyncio.create_task(consumer.run()) if run else None
        started.append((consumer, audit_log, task))
        return Running(consumer, audit_log)

    yield start
    for consumer, audit_log, task in started:
        await consumer.stop()
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        audit_log.close()


def completed(i: int) -> events_pb2.InferenceCompleted:
    return events_pb2.InferenceCompleted(
        request_id=f"req-{i}",
        model="smollm2-135m",
        provider="local",
        usage=chat_pb2.Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15),
    )


async def publish_raw(bus: Bus, name: str, data: bytes, event_id: str, **headers: str) -> None:
    """An event as a producer in another process sends it (the headers given, as given)."""
    await bus.js.publish(
        f"{bus.prefix}.{name}",
        data,
        stream=bus.stream,
        headers={MSG_ID_HEADER: event_id, REQUEST_ID_HEADER: event_id, **headers},
    )


async def test_metrics_move_by_exactly_what_was_written_and_the_lag_drains(
    bus: Bus, publisher: EventPublisher, start_consumer: StartConsumer, metrics_port: int
) -> None:
    before = await scrape(metrics_port)
    for i in range(7):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    await publish_raw(bus, "other.thing", b"not audit's", "other-1")  # another consumer's subject
    for i in range(7, 10):
        failed = events_pb2.InferenceFailed(request_id=f"req-{i}", model="gpt-x", error_code="upstream_error")
        await publisher.publish("inference.failed", failed, f"req-{i}")
    await publish_raw(bus, "admin.key_created", json.dumps({"key_id": "k1"}).encode(), "admin-1")
    await publish_raw(bus, "other.thing", b"not audit's", "other-2")  # the stream's last event
    n, last = 11, 13

    # Declared, not consuming yet: the whole stream is the lag.
    consumer, audit_log = await start_consumer(run=False)
    await consumer.start()
    declared = await scrape(metrics_port)
    assert value(declared, "hoosh_audit_stream_last_seq") == last
    assert value(declared, "hoosh_audit_lag_events") == last

    task = asyncio.create_task(consumer.run())
    try:
        await wait_until(lambda: audit_log.last_seq >= n, f"{n} entries")

        async def drained() -> bool:
            samples = await scrape(metrics_port)
            return value(samples, "hoosh_audit_lag_events") == 0

        await wait_until(drained, "the lag back to 0")
        after = await scrape(metrics_port)
    finally:
        await consumer.stop()
        await task

    assert audit_log.last_seq == n
    assert written(after, "inference.completed") - written(before, "inference.completed") == 7
    assert written(after, "inference.failed") - written(before, "inference.failed") == 3
    assert written(after, "admin.key_created") - written(before, "admin.key_created") == 1

    def all_written(samples: Samples) -> float:
        return sum(v for (name, _), v in samples.items() if name == "hoosh_audit_events_written_total")

    assert all_written(after) - all_written(before) == n
    ignored = "hoosh_audit_events_ignored_total"
    assert value(after, ignored) - value(before, ignored) == 2
    assert value(after, "hoosh_audit_written_stream_seq") == last - 1
    assert value(after, "hoosh_audit_stream_last_seq") == last
    assert value(after, "hoosh_audit_lag_events") == 0
    assert value(after, "hoosh_audit_log_seq") == n
    batches = value(after, "hoosh_audit_batches_total") - value(before, "hoosh_audit_batches_total")
    timed = value(after, "hoosh_audit_batch_write_seconds_count") - value(
        before, "hoosh_audit_batch_write_seconds_count"
    )
    assert batches >= 1
    assert timed == batches  # one observation per batch


async def test_the_write_is_a_span_of_the_request_trace(
    bus: Bus, publisher: EventPublisher, start_consumer: StartConsumer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hoosh_audit.consumer")
    with capture_spans() as exporter:
        # From another process: only the traceparent header links the write to its trace.
        await publish_raw(
            bus, "inference.completed", completed(1).SerializeToString(), "req-1", traceparent=TRACEPARENT
        )
        # From this process's publisher, under a request's span: the producer span is the parent.
        with trace.get_tracer("test").start_as_current_span("request") as request_span:
            await publisher.publish("inference.completed", completed(2), "req-2")
        _, audit_log = await start_consumer()
        await wait_until(lambda: audit_log.last_seq >= 2, "2 entries")

        def writes() -> list[ReadableSpan]:
            return [s for s in exporter.get_finished_spans() if s.name == WRITE_SPAN]

        await wait_until(lambda: len(writes()) == 2, "2 write spans")
        spans = exporter.get_finished_spans()

    remote, local = sorted(writes(), key=lambda s: dict(s.attributes or {})["hoosh.audit.seq"])
    assert remote.context is not None and remote.parent is not None
    assert format(remote.context.trace_id, "032x") == TRACE_ID
    assert format(remote.parent.span_id, "016x") == PARENT_SPAN_ID
    assert remote.kind == SpanKind.CONSUMER
    assert dict(remote.attributes or {}) == {
        "messaging.system": "nats",
        "messaging.operation.type": "process",
        "messaging.destination.name": f"{bus.prefix}.inference.completed",
        "messaging.message.id": "req-1",
        "hoosh.request_id": "req-1",
        "hoosh.audit.seq": 1,
    }

    producer = next(s for s in spans if s.name == f"publish {bus.prefix}.inference.completed")
    assert local.context is not None and local.parent is not None and producer.context is not None
    assert local.context.trace_id == request_span.get_span_context().trace_id
    assert local.parent.span_id == producer.context.span_id
    assert dict(local.attributes or {})["hoosh.audit.seq"] == 2

    # The log line of each write names the write's span.
    lines = {r.seq: r for r in caplog.records if r.getMessage() == "audit entry written"}  # type: ignore[attr-defined]
    assert lines[1].trace_id == TRACE_ID  # type: ignore[attr-defined]
    assert lines[1].span_id == format(remote.context.span_id, "016x")  # type: ignore[attr-defined]
    assert lines[2].span_id == format(local.context.span_id, "016x")  # type: ignore[attr-defined]


async def test_each_written_event_logs_its_request_id_and_trace_id(
    bus: Bus, start_consumer: StartConsumer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hoosh_audit.consumer")
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    await publish_raw(bus, "inference.completed", completed(1).SerializeToString(), "req-1", traceparent=TRACEPARENT)
    await publish_raw(bus, "inference.completed", completed(2).SerializeToString(), "req-2")  # no trace context
    await start_consumer()

    def lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "audit entry written"]

    await wait_until(lambda: len(lines()) == 2, "2 log lines")
    formatter = JsonFormatter("audit")
    traced, untraced = (json.loads(formatter.format(r)) for r in lines())
    subject = f"{bus.prefix}.inference.completed"
    # Spans are not exported: the ids are the producer's, as its headers carried them.
    assert {k: traced[k] for k in ("msg", "request_id", "trace_id", "span_id", "subject", "seq", "stream_seq")} == {
        "msg": "audit entry written",
        "request_id": "req-1",
        "trace_id": TRACE_ID,
        "span_id": PARENT_SPAN_ID,
        "subject": subject,
        "seq": 1,
        "stream_seq": 1,
    }
    assert traced["service"] == "audit" and traced["level"] == "info"
    assert (untraced["request_id"], untraced["seq"], untraced["subject"]) == ("req-2", 2, subject)
    assert "trace_id" not in untraced


@pytest.mark.parametrize(
    ("header", "ids"),
    [
        (TRACEPARENT, (TRACE_ID, PARENT_SPAN_ID)),
        (f"{TRACEPARENT}-future", (TRACE_ID, PARENT_SPAN_ID)),  # a later version's extra fields
        (f"{TRACEPARENT}0", None),
        (TRACEPARENT.upper(), None),  # W3C: lowercase hex only
        (f"ff-{TRACE_ID}-{PARENT_SPAN_ID}-01", None),
        (f"00-{'0' * 32}-{PARENT_SPAN_ID}-01", None),
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),
        (f"00-{TRACE_ID[:-1]}_-{PARENT_SPAN_ID}-01", None),
        ("", None),
        (None, None),
    ],
)
def test_trace_ids_read_only_a_valid_traceparent(header: str | None, ids: tuple[str, str] | None) -> None:
    assert trace_ids(header) == ids
