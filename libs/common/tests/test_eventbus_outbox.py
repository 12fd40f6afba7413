"""EventPublisher with an outbox, and bounded streams, against the real JetStream at
127.0.0.1:4222. A stream-less prefix makes NATS refuse every publish (no responders),
which is how these tests take NATS "away" without stopping the shared server; the
tests in tests/test_outbox_*.py stop a server of their own."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.js.errors
import pytest
from hoosh.events.v1 import events_pb2
from hoosh_common import events
from hoosh_common.eventbus import (
    OUTBOX_HEADER,
    EventPublisher,
    EventsUnavailableError,
    StreamPolicy,
    ensure_stream,
)
from hoosh_common.eventbus_settings import EventBusSettings
from hoosh_common.logs import request_id_var
from hoosh_common.outbox import REJECTED_DIR, Outbox
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, RetentionPolicy
from nats.js.client import JetStreamContext
from opentelemetry.sdk.trace import TracerProvider
from pydantic import ValidationError
from pydantic_settings import SettingsConfigDict

NATS_URL = "nats://127.0.0.1:4222"


@dataclass
class Bus:
    nc: NATS
    js: JetStreamContext
    stream: str
    prefix: str
    tmp: Path
    publishers: list[EventPublisher] = field(default_factory=list)

    def publisher(self, outbox: Outbox | None = None, **kwargs: float | int) -> EventPublisher:
        options: dict[str, float | int] = {"max_attempts": 2, "backoff_max": 0.02, "drain_backoff_max": 0.1}
        options.update(kwargs)
        publisher = EventPublisher(
            self.nc,
            self.js,
            self.stream,
            self.prefix,
            outbox=outbox or Outbox(self.tmp / "outbox"),
            **options,  # type: ignore[arg-type]
        )
        self.publishers.append(publisher)
        return publisher


@pytest.fixture
async def bus(tmp_path: Path) -> AsyncIterator[Bus]:
    nc = await nats.connect(NATS_URL)
    suffix = uuid.uuid4().hex[:12]
    b = Bus(nc=nc, js=nc.jetstream(), stream=f"TEST_OUTBOX_{suffix}", prefix=f"testoutbox{suffix}", tmp=tmp_path)
    try:
        yield b
    finally:
        for publisher in b.publishers:
            await publisher.close(grace=0)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await b.js.delete_stream(b.stream)
        await nc.close()


def event(request_id: str) -> events_pb2.InferenceCompleted:
    return events_pb2.InferenceCompleted(request_id=request_id, model="m")


async def wait_for(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def stored_ids(bus: Bus) -> list[str]:
    info = await bus.js.stream_info(bus.stream)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await bus.js.get_msg(bus.stream, seq)
        ids.append((msg.headers or {})["Nats-Msg-Id"])
    return ids


async def test_an_event_nats_refuses_waits_in_the_outbox_then_is_published_once(bus: Bus) -> None:
    publisher = bus.publisher()
    await publisher.start()
    tracer = TracerProvider().get_tracer("test")
    token = request_id_var.set("req-ctx")
    try:
        with tracer.start_as_current_span("publish") as span:
            task = publisher.publish_background(events.SUBJECT_COMPLETED, event("e0"), "e0", headers={"x": "y"})
            trace_id = f"{span.get_span_context().trace_id:032x}"
    finally:
        request_id_var.reset(token)
    assert await task is None  # no stream: kept, not lost
    assert publisher.stats.kept == 1
    depth = publisher.health()["outbox"]
    assert isinstance(depth, dict) and depth["entries"] == 1 and depth["bytes"] > 0
    assert len(list((bus.tmp / "outbox").glob("*.seg"))) == 1

    # While it waits, later events queue behind it without trying NATS.
    for i in range(1, 5):
        assert await publisher.publish_background(events.SUBJECT_COMPLETED, event(f"e{i}"), f"e{i}") is None
    assert publisher.stats.kept == 5

    await ensure_stream(bus.js, bus.stream, bus.prefix)  # NATS "comes back"
    await wait_for(lambda: publisher.outbox is not None and publisher.outbox.count == 0)
    assert await stored_ids(bus) == [f"e{i}" for i in range(5)]  # in order, once each
    assert not list((bus.tmp / "outbox").glob("*.seg"))
    first = await bus.js.get_msg(bus.stream, 1)
    headers = first.headers or {}
    assert (headers["hoosh-request-id"], headers["x"], headers["hoosh-outbox"]) == ("req-ctx", "y", "1")
    assert headers["traceparent"].split("-")[1] == trace_id
    assert events_pb2.InferenceCompleted.FromString(first.data) == event("e0")

    # Back to the direct path: no disk.
    ack = await publisher.publish_background(events.SUBJECT_COMPLETED, event("e5"), "e5")
    assert ack is not None and ack.seq == 6
    assert "hoosh-outbox" not in ((await bus.js.get_msg(bus.stream, 6)).headers or {})
    assert publisher.stats.kept == 5 and publisher.stats.drained == 5


async def test_a_new_publisher_drains_what_an_earlier_one_left(bus: Bus) -> None:
    first = bus.publisher()
    await first.start()
    for i in range(3):
        assert await first.publish(events.SUBJECT_COMPLETED, event(f"e{i}"), f"e{i}") is None
    await first.close()
    assert len(list((bus.tmp / "outbox").glob("*.seg"))) == 3

    await ensure_stream(bus.js, bus.stream, bus.prefix)
    second = bus.publisher()
    await second.start()
    await wait_for(lambda: second.outbox is not None and second.outbox.count == 0)
    assert await stored_ids(bus) == ["e0", "e1", "e2"]


async def test_a_full_outbox_refuses_and_drops_nothing(bus: Bus, caplog: pytest.LogCaptureFixture) -> None:
    publisher = bus.publisher(Outbox(bus.tmp / "outbox", max_entries=4, high_water=0.75))
    await publisher.start()
    for i in range(3):
        assert await publisher.publish(events.SUBJECT_COMPLETED, event(f"e{i}"), f"e{i}") is None
    assert not publisher.healthy  # 3 of 4: past the high-water mark, refuse new work
    assert await publisher.publish(events.SUBJECT_COMPLETED, event("e3"), "e3") is None
    with pytest.raises(EventsUnavailableError) as refused:
        await publisher.publish(events.SUBJECT_COMPLETED, event("refused"), "refused")
    assert refused.value.event_id == "refused"
    health = publisher.health()
    assert health["healthy"] is False
    assert isinstance(health["outbox"], dict) and health["outbox"]["full"] is True
    assert health["outbox"]["entries"] == 4

    # A background publish cannot refuse the request it belongs to: it waits in memory.
    with caplog.at_level(logging.ERROR, logger="hoosh_common.eventbus"):
        assert await publisher.publish_background(events.SUBJECT_COMPLETED, event("e4"), "e4") is None
        assert await publisher.publish_background(events.SUBJECT_COMPLETED, event("e5"), "e5") is None
    assert publisher.health()["overflow"] == 2 and publisher.stats.lost == 0
    assert any("outbox has no room" in r.getMessage() for r in caplog.records)

    await ensure_stream(bus.js, bus.stream, bus.prefix)
    await wait_for(lambda: publisher.outbox is not None and publisher.outbox.count == 0 and publisher.healthy)
    assert await stored_ids(bus) == ["e0", "e1", "e2", "e3", "e4", "e5"]  # the refused one is the caller's
    assert publisher.health()["overflow"] == 0


async def test_a_full_stream_refuses_new_events_into_the_outbox_until_audit_frees_room(bus: Bus) -> None:
    policy = StreamPolicy(retention="workqueue", max_msgs=3, max_bytes=1_000_000)
    await ensure_stream(bus.js, bus.stream, bus.prefix, policy=policy)
    publisher = bus.publisher()
    await publisher.start()
    for i in range(5):
        await publisher.publish(events.SUBJECT_COMPLETED, event(f"e{i}"), f"e{i}")
    assert publisher.stats.kept == 2  # the stream took 3, discard=new refused the rest
    assert (await bus.js.stream_info(bus.stream)).state.messages == 3

    # The audit-like consumer acks what it recorded: the work queue frees room.
    await bus.js.add_consumer(
        bus.stream,
        ConsumerConfig(durable_name="audit", ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL),
    )
    sub = await bus.js.pull_subscribe_bind(durable="audit", stream=bus.stream)
    seen: list[str] = []
    while len(seen) < 5:
        for msg in await sub.fetch(5, timeout=5):
            seen.append((msg.headers or {})["Nats-Msg-Id"])
            await msg.ack_sync()
    await sub.unsubscribe()
    assert seen == [f"e{i}" for i in range(5)]  # nothing dropped, nothing doubled, in order
    await wait_for(lambda: publisher.outbox is not None and publisher.outbox.count == 0)


async def test_an_event_refused_for_good_is_kept_in_rejected(bus: Bus) -> None:
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    # The subject belongs to bus.stream, but this publisher expects another stream.
    publisher = EventPublisher(
        bus.nc,
        bus.js,
        "SOME_OTHER_STREAM",
        bus.prefix,
        outbox=Outbox(bus.tmp / "outbox"),
        drain_backoff_max=0.1,
    )
    bus.publishers.append(publisher)
    await publisher.start()
    assert await publisher.publish_background(events.SUBJECT_COMPLETED, event("bad"), "bad") is None
    await wait_for(lambda: publisher.stats.rejected == 1)
    assert len(list((bus.tmp / "outbox" / REJECTED_DIR).glob("*.seg"))) == 1
    assert publisher.outbox is not None and publisher.outbox.depth().rejected == 1
    assert (await bus.js.stream_info(bus.stream)).state.messages == 0


async def test_a_damaged_segment_is_set_aside_and_the_rest_drain(bus: Bus) -> None:
    first = bus.publisher()
    await first.start()
    for i in range(3):
        await first.publish(events.SUBJECT_COMPLETED, event(f"e{i}"), f"e{i}")  # one segment each
    await first.close()
    files = sorted((bus.tmp / "outbox").glob("*.seg"))
    assert len(files) == 3
    files[1].write_bytes(files[1].read_bytes()[:-3] + b"bad")  # bit rot

    await ensure_stream(bus.js, bus.stream, bus.prefix)
    second = bus.publisher()
    await second.start()
    await wait_for(lambda: second.outbox is not None and second.outbox.count == 0)
    assert await stored_ids(bus) == ["e0", "e2"]
    assert second.stats.rejected == 1
    assert len(list((bus.tmp / "outbox" / REJECTED_DIR).glob("*.damaged"))) == 1


async def test_close_moves_publishes_still_retrying_to_the_outbox(bus: Bus) -> None:
    # Retries that outlast the shutdown grace: close() keeps those events on disk. A
    # subscriber that never acks makes each try wait for its ack, so close() lands mid-try
    # whatever the machine's load (no stream at all would end tries at once, between them).
    await bus.nc.subscribe(f"{bus.prefix}.>")
    publisher = bus.publisher(max_attempts=50, backoff_initial=0.2, backoff_max=0.5, ack_timeout=30)
    await publisher.start()
    publisher.publish_background(events.SUBJECT_COMPLETED, event("in-flight"), "in-flight")
    await asyncio.sleep(0.1)
    assert publisher.pending == 1 and publisher.outbox is not None and publisher.outbox.count == 0
    await publisher.close(grace=0.1)
    assert publisher.pending == 0

    reopened = Outbox(bus.tmp / "outbox")
    await reopened.open()
    try:
        [content] = await reopened.read(reopened.head(10))
        assert [e.event_id for e in content.entries] == ["in-flight"]
        assert content.entries[0].maybe_stored  # cut mid-try: JetStream may hold it
    finally:
        await reopened.close()


async def test_without_an_outbox_the_publisher_is_unchanged(bus: Bus) -> None:
    publisher = EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix, max_attempts=1)
    await publisher.start()  # no-op
    assert publisher.healthy and publisher.health()["outbox"] is None
    assert await publisher.publish_background(events.SUBJECT_COMPLETED, event("lost"), "lost") is None
    await publisher.close()


# -- stream bounds ---------------------------------------------------------------------


async def test_ensure_stream_applies_a_bounded_work_queue_policy(bus: Bus) -> None:
    policy = StreamPolicy(max_bytes=10_000_000, max_msgs=100_000)
    created = await ensure_stream(bus.js, bus.stream, bus.prefix, policy=policy)
    config = created.config
    assert config.retention == RetentionPolicy.WORK_QUEUE
    assert config.discard == DiscardPolicy.NEW
    assert (config.max_bytes, config.max_msgs, config.max_age) == (10_000_000, 100_000, 0)
    again = await ensure_stream(bus.js, bus.stream, bus.prefix, policy=policy)
    assert again.created == created.created
    # Without a policy the bounds are left alone (processes that do not manage them).
    untouched = await ensure_stream(bus.js, bus.stream, bus.prefix)
    assert untouched.config.max_bytes == 10_000_000
    grown = await ensure_stream(bus.js, bus.stream, bus.prefix, policy=StreamPolicy(max_bytes=20_000_000))
    assert (grown.config.max_bytes, grown.config.max_msgs) == (20_000_000, -1)
    # An audit consumer that starts mid-stream is refused by a work queue: it delivers ALL.
    with pytest.raises(nats.js.errors.BadRequestError):
        await bus.js.add_consumer(
            bus.stream,
            ConsumerConfig(
                durable_name="mid", deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=5,
                ack_policy=AckPolicy.EXPLICIT,
            ),
        )  # fmt: skip


async def test_ensure_stream_bounds_a_limits_stream_and_never_changes_retention(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    await ensure_stream(bus.js, bus.stream, bus.prefix)  # today's unbounded stream
    limits = StreamPolicy(retention="limits", max_bytes=50_000_000, max_age=7 * 86400)
    info = await ensure_stream(bus.js, bus.stream, bus.prefix, policy=limits)
    assert info.config.retention == RetentionPolicy.LIMITS
    assert (info.config.discard, info.config.max_bytes, info.config.max_age) == (DiscardPolicy.NEW, 50_000_000, 604800)

    with caplog.at_level(logging.ERROR, logger="hoosh_common.eventbus"):
        info = await ensure_stream(bus.js, bus.stream, bus.prefix, policy=StreamPolicy(max_bytes=1000))
    assert info.config.retention == RetentionPolicy.LIMITS and info.config.max_bytes == 50_000_000
    assert any("another retention" in r.getMessage() for r in caplog.records)


def test_a_stream_policy_must_bound_without_dropping_unaudited_events() -> None:
    with pytest.raises(ValueError, match="max_age"):
        StreamPolicy(retention="limits", max_bytes=1000)  # would fill and never free room
    with pytest.raises(ValueError, match="max_bytes"):
        StreamPolicy(max_bytes=0)
    with pytest.raises(ValueError, match="replicas"):
        StreamPolicy(replicas=7)


async def test_close_gives_the_drainer_its_grace_to_empty_the_outbox(bus: Bus) -> None:
    publisher = bus.publisher(drain_backoff_max=1.0)
    await publisher.start()
    for i in range(3):
        await publisher.publish(events.SUBJECT_COMPLETED, event(f"e{i}"), f"e{i}")
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    await publisher.close(grace=5)
    assert not list((bus.tmp / "outbox").glob("*.seg"))
    assert await stored_ids(bus) == ["e0", "e1", "e2"]


# -- settings ----------------------------------------------------------------------------


class ServiceSettings(EventBusSettings):
    model_config = SettingsConfigDict(env_prefix="HOOSH_", extra="ignore")

    nats_url: str = "nats://127.0.0.1:4222"


def test_services_read_the_shared_event_bus_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOSH_EVENTS_OUTBOX_DIR", str(tmp_path))
    monkeypatch.setenv("HOOSH_EVENTS_OUTBOX_MAX_ENTRIES", "500")
    monkeypatch.setenv("HOOSH_NATS_STREAM_RETENTION", "workqueue")
    monkeypatch.setenv("HOOSH_NATS_STREAM_REPLICAS", "3")
    settings = ServiceSettings()
    outbox = settings.event_outbox("router")
    assert outbox is not None and outbox.directory == tmp_path / "router" and outbox.max_entries == 500
    assert settings.stream_policy() == StreamPolicy(retention="workqueue", replicas=3)

    monkeypatch.delenv("HOOSH_EVENTS_OUTBOX_DIR")
    monkeypatch.delenv("HOOSH_NATS_STREAM_RETENTION")
    unmanaged = ServiceSettings()
    assert unmanaged.event_outbox("router") is None and unmanaged.stream_policy() is None

    monkeypatch.setenv("HOOSH_NATS_STREAM_RETENTION", "limits")  # without a max age: refused at start
    with pytest.raises(ValidationError, match="max_age"):
        ServiceSettings()


async def test_a_publisher_nobody_started_opens_its_outbox_when_it_first_needs_it(bus: Bus) -> None:
    publisher = bus.publisher()  # start() forgotten
    assert await publisher.publish_background(events.SUBJECT_COMPLETED, event("e0"), "e0") is None
    assert await publisher.publish_background(events.SUBJECT_COMPLETED, event("e1"), "e1") is None
    await wait_for(lambda: publisher.outbox is not None and publisher.outbox.is_open)
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    await wait_for(lambda: publisher.outbox is not None and publisher.outbox.count == 0 and publisher.healthy)
    assert await stored_ids(bus) == ["e0", "e1"]


async def test_a_failing_disk_keeps_events_in_memory_and_reports_unhealthy(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher = bus.publisher()
    await publisher.start()
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "simulated disk error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert await publisher.publish_background(events.SUBJECT_COMPLETED, event("e0"), "e0") is None
    assert publisher.health()["overflow"] == 1 and not publisher.healthy
    with pytest.raises(EventsUnavailableError):  # the awaited form refuses instead
        await publisher.publish(events.SUBJECT_COMPLETED, event("refused"), "refused")

    monkeypatch.setattr(os, "fsync", real_fsync)
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    await wait_for(
        lambda: publisher.health()["overflow"] == 0 and publisher.outbox is not None and not publisher.outbox.count
    )
    assert await stored_ids(bus) == ["e0"] and publisher.stats.lost == 0


async def test_background_publishes_wait_for_their_tick_and_then_are_all_stored(bus: Bus) -> None:
    # The answer that made an event leaves before its publish: a background publish
    # goes out at the next tick, batch_delay after the first one waiting.
    publisher = bus.publisher(batch_delay=0.5)
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    tasks = [publisher.publish_background(events.SUBJECT_COMPLETED, event(f"t-{n}"), f"t-{n}") for n in range(3)]
    await asyncio.sleep(0.1)
    assert (await bus.js.stream_info(bus.stream)).state.messages == 0  # the tick is not due yet
    acks = await asyncio.gather(*tasks)
    assert all(ack is not None and not ack.duplicate for ack in acks)
    assert await stored_ids(bus) == ["t-0", "t-1", "t-2"]


async def test_a_publish_still_waiting_for_its_tick_at_shutdown_is_kept_in_the_outbox(bus: Bus) -> None:
    publisher = bus.publisher(batch_delay=60)
    await publisher.start()
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    publisher.publish_background(events.SUBJECT_COMPLETED, event("waiting"), "waiting")
    await asyncio.sleep(0.05)
    await publisher.close(grace=0.5)
    assert publisher.stats.kept == 1  # cut short before its tick: kept, not lost

    # close() gives the drainer its grace: the kept event went out from the outbox
    # (marked as such), or it is still there for the next process.
    info = await bus.js.stream_info(bus.stream)
    if info.state.messages:
        msg = await bus.js.get_msg(bus.stream, info.state.last_seq)
        assert (msg.headers or {}).get(OUTBOX_HEADER) and msg.headers["Nats-Msg-Id"] == "waiting"
        return
    reopened = Outbox(bus.tmp / "outbox")
    await reopened.open()
    try:
        [content] = await reopened.read(reopened.head(10))
        assert [e.event_id for e in content.entries] == ["waiting"]
        assert not content.entries[0].maybe_stored  # never sent: JetStream cannot hold it
    finally:
        await reopened.close()
