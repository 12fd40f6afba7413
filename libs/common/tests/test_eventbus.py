"""EventPublisher and ensure_stream against the real JetStream at 127.0.0.1:4222."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import nats
import nats.js.errors
import pytest
from hoosh.events.v1 import events_pb2
from hoosh_common import events
from hoosh_common.eventbus import EventPublisher, EventPublishError, ensure_stream
from hoosh_common.logs import request_id_var
from nats.aio.client import Client as NATS
from nats.js.api import StorageType, StreamConfig
from nats.js.client import JetStreamContext
from opentelemetry.sdk.trace import TracerProvider

NATS_URL = "nats://127.0.0.1:4222"


@dataclass
class Bus:
    nc: NATS
    js: JetStreamContext
    stream: str
    prefix: str
    extra_streams: list[str] = field(default_factory=list)  # deleted after the test too


@pytest.fixture
async def bus() -> AsyncIterator[Bus]:
    nc = await nats.connect(NATS_URL)
    suffix = uuid.uuid4().hex[:12]
    b = Bus(nc=nc, js=nc.jetstream(), stream=f"TEST_BUS_{suffix}", prefix=f"testbus{suffix}")
    try:
        yield b
    finally:
        for name in [b.stream, *b.extra_streams]:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await b.js.delete_stream(name)
        await nc.close()


def event(request_id: str) -> events_pb2.InferenceCompleted:
    return events_pb2.InferenceCompleted(request_id=request_id, model="m", cost_usd=0.5)


async def test_ensure_stream_creates_once_and_is_idempotent(bus: Bus) -> None:
    created = await ensure_stream(bus.js, bus.stream, bus.prefix)
    again = await ensure_stream(bus.js, bus.stream, bus.prefix)
    for info in (created, again):
        assert info.config.subjects == [f"{bus.prefix}.>"]
        assert info.config.storage == StorageType.FILE
        assert info.config.duplicate_window == 120.0
    assert again.created == created.created


async def test_ensure_stream_updates_a_stream_with_other_settings(bus: Bus) -> None:
    await bus.js.add_stream(
        StreamConfig(
            name=bus.stream,
            subjects=[f"{bus.prefix}.old"],
            storage=StorageType.FILE,
            duplicate_window=10,
            max_msgs=1000,
        )
    )
    info = await ensure_stream(bus.js, bus.stream, bus.prefix)
    assert info.config.subjects == [f"{bus.prefix}.>"]
    assert info.config.duplicate_window == 120.0
    assert info.config.max_msgs == 1000  # the operator's other settings are kept
    stored = await bus.js.stream_info(bus.stream)
    assert stored.config.duplicate_window == 120.0


async def test_ensure_stream_reports_a_real_conflict(bus: Bus) -> None:
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    other = f"{bus.stream}_OTHER"
    bus.extra_streams.append(other)
    with pytest.raises(nats.js.errors.BadRequestError):
        await ensure_stream(bus.js, other, bus.prefix)  # the same subjects: overlap


async def test_publish_stores_the_event_with_its_headers(bus: Bus) -> None:
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    publisher = EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix)
    tracer = TracerProvider().get_tracer("test")
    token = request_id_var.set("req-from-context")
    try:
        with tracer.start_as_current_span("publish") as span:
            ack = await publisher.publish(events.SUBJECT_COMPLETED, event("req-1"), "req-1", headers={"x-extra": "yes"})
            trace_id = f"{span.get_span_context().trace_id:032x}"
    finally:
        request_id_var.reset(token)
    assert (ack.stream, ack.seq, ack.duplicate) == (bus.stream, 1, None)

    stored = await bus.js.get_msg(bus.stream, ack.seq)
    assert stored.subject == f"{bus.prefix}.inference.completed"
    assert events_pb2.InferenceCompleted.FromString(stored.data) == event("req-1")
    headers = stored.headers or {}
    assert headers["Nats-Msg-Id"] == "req-1"
    assert headers["hoosh-request-id"] == "req-from-context"
    assert headers["x-extra"] == "yes"
    assert headers["traceparent"].split("-")[1] == trace_id


async def test_the_same_event_id_is_stored_once(bus: Bus) -> None:
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    publisher = EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix)
    first = await publisher.publish(events.SUBJECT_FAILED, events_pb2.InferenceFailed(request_id="r"), "r")
    second = await publisher.publish(events.SUBJECT_FAILED, events_pb2.InferenceFailed(request_id="r"), "r")
    assert second.duplicate and second.seq == first.seq
    assert (await bus.js.stream_info(bus.stream)).state.messages == 1
    stored = await bus.js.get_msg(bus.stream, first.seq)
    assert (stored.headers or {})["hoosh-request-id"] == "r"  # no request id in context: the event id


async def test_background_publishes_are_all_stored_after_drain(bus: Bus) -> None:
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    publisher = EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix)
    message = event("unused")
    tasks = []
    for i in range(50):
        message.request_id = f"req-{i}"
        tasks.append(publisher.publish_background(events.SUBJECT_COMPLETED, message, f"req-{i}"))
    message.request_id = "mutated after scheduling"  # serialized at call time: no effect
    await publisher.drain()

    assert publisher.pending == 0
    assert all(t.done() and t.result() is not None for t in tasks)
    assert (await bus.js.stream_info(bus.stream)).state.messages == 50
    last = await bus.js.get_msg(bus.stream, 50)
    assert events_pb2.InferenceCompleted.FromString(last.data).request_id == "req-49"


async def test_transient_failures_are_retried_then_reported(bus: Bus) -> None:
    # No stream listens on this prefix: every try gets "no responders".
    publisher = EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix, max_attempts=3, backoff_max=0.05)
    with pytest.raises(EventPublishError) as error:
        await publisher.publish(events.SUBJECT_COMPLETED, event("r"), "r")
    assert error.value.attempts == 3
    assert error.value.event_id == "r"


async def test_a_refused_publish_is_not_retried(bus: Bus) -> None:
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    # The subject belongs to bus.stream, but this publisher expects another stream.
    publisher = EventPublisher(bus.nc, bus.js, "SOME_OTHER_STREAM", bus.prefix, max_attempts=3)
    with pytest.raises(EventPublishError) as error:
        await publisher.publish(events.SUBJECT_COMPLETED, event("r"), "r")
    assert error.value.attempts == 1
    assert (await bus.js.stream_info(bus.stream)).state.messages == 0


async def test_a_failed_background_publish_is_logged(bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    publisher = EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix, max_attempts=2, backoff_max=0.05)
    with caplog.at_level(logging.ERROR, logger="hoosh_common.eventbus"):
        task = publisher.publish_background(events.SUBJECT_COMPLETED, event("lost"), "lost")
        await publisher.drain()
    assert task.result() is None
    assert publisher.pending == 0
    records = [r for r in caplog.records if r.getMessage() == "event lost: publish failed"]
    assert len(records) == 1 and records[0].event_id == "lost"  # type: ignore[attr-defined]


async def test_an_event_id_is_required(bus: Bus) -> None:
    publisher = EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix)
    with pytest.raises(ValueError, match="event_id"):
        await publisher.publish(events.SUBJECT_COMPLETED, event("r"), "")
    with pytest.raises(ValueError, match="event_id"):
        publisher.publish_background(events.SUBJECT_COMPLETED, event("r"), "")
