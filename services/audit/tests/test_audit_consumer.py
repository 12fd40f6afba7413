"""Events from the real JetStream into the chain: exactly once, in order, acked after fsync."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import nats.js.errors
import pytest
from hoosh.chat.v1 import chat_pb2
from hoosh.events.v1 import events_pb2
from hoosh_audit.chain import AuditLog, verify
from hoosh_audit.consumer import AuditConsumer
from hoosh_common.eventbus import EventPublisher, ensure_stream

DEADLINE_S = 30.0


def completed(i: int) -> events_pb2.InferenceCompleted:
    return events_pb2.InferenceCompleted(
        request_id=f"req-{i}",
        model="smollm2-135m",
        provider="local",
        pool="default",
        usage=chat_pb2.Usage(prompt_tokens=10 + i, completion_tokens=5, total_tokens=15 + i),
        latency_ms=12,
        cost_usd=0.001 * i,
        kind="chat",
        timestamp_ms=1_700_000_000_000 + i,
    )


def failed(i: int) -> events_pb2.InferenceFailed:
    return events_pb2.InferenceFailed(
        request_id=f"req-{i}", model="gpt-x", provider="openai", error_code="upstream_error", http_status=502
    )


def read_entries(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_bytes().split(b"\n") if line]


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Poll (no timing assertion: the deadline only stops a hung test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while True:
        ok = condition()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def publisher(bus) -> EventPublisher:
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    return EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix)


class Running(NamedTuple):
    consumer: AuditConsumer
    log: AuditLog
    task: asyncio.Task[None]


@pytest.fixture
async def run_consumer(bus, key) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    """Start consumers in-process; every one still running is stopped at the end."""
    started: list[Running] = []

    async def start(path: Path, **options) -> Running:
        audit_log = await AuditLog.open(path, key)
        consumer = AuditConsumer(
            bus.js, audit_log, stream=bus.stream, subject_prefix=bus.prefix, durable="audit", **options
        )
        running = Running(consumer, audit_log, asyncio.create_task(consumer.run()))
        started.append(running)
        return running

    yield start
    for consumer, audit_log, task in started:
        await consumer.stop()
        with contextlib.suppress(Exception):
            await task
        audit_log.close()


async def test_every_published_event_is_recorded_once(publisher, run_consumer, log_path, key) -> None:
    n = 40
    for i in range(n):
        if i % 4 == 3:
            await publisher.publish("inference.failed", failed(i), f"req-{i}")
        else:
            await publisher.publish("inference.completed", completed(i), f"req-{i}")
    consumer, audit_log, _ = await run_consumer(log_path)

    await wait_until(lambda: audit_log.last_seq >= n, f"{n} entries")
    # Events published while running are recorded too.
    for i in range(n, n + 10):
        publisher.publish_background("inference.completed", completed(i), f"req-{i}")
    await publisher.drain()
    await wait_until(lambda: audit_log.last_seq >= n + 10, f"{n + 10} entries")
    await consumer.stop()

    entries = read_entries(log_path)
    assert [e["event_id"] for e in entries] == [f"req-{i}" for i in range(n + 10)]
    assert [e["stream_seq"] for e in entries] == list(range(1, n + 11))
    assert verify(log_path, key) == (True, n + 10, 0, "")
    first, fourth = entries[0], entries[3]
    assert first["subject"] == f"{publisher.subject_prefix}.inference.completed"
    assert first["payload"]["model"] == "smollm2-135m"
    assert first["payload"]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert first["payload"]["timestamp_ms"] == "1700000000000"  # int64 as JSON text, as protobuf maps it
    assert fourth["subject"] == f"{publisher.subject_prefix}.inference.failed"
    assert fourth["payload"]["http_status"] == 502
    assert consumer.stats.appended == n + 10
    assert consumer.stats.duplicates == consumer.stats.terminated == 0


async def test_the_same_event_id_twice_is_one_entry(publisher, run_consumer, log_path) -> None:
    first = await publisher.publish("inference.completed", completed(1), "req-1")
    again = await publisher.publish("inference.completed", completed(1), "req-1")
    assert again.duplicate and again.seq == first.seq
    await publisher.publish("inference.completed", completed(2), "req-2")
    _, audit_log, _ = await run_consumer(log_path)

    await wait_until(lambda: audit_log.last_seq >= 2, "the second event")
    assert [e["event_id"] for e in read_entries(log_path)] == ["req-1", "req-2"]


async def test_a_redelivered_message_is_acked_not_appended(bus, publisher, run_consumer, log_path, key) -> None:
    for i in range(5):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    first_batch: list[int] = []

    def lose_first_acks(msgs) -> bool:
        if first_batch:
            return True
        first_batch.extend(m.metadata.sequence.stream for m in msgs)
        return False  # written and fsynced, but the acks never reach the server

    consumer, audit_log, _ = await run_consumer(log_path, ack_wait=1.0)
    consumer.before_ack = lose_first_acks
    # The server redelivers after ack_wait; the consumer must recognise the copies.
    await wait_until(lambda: consumer.stats.duplicates >= len(first_batch) > 0, "the redelivery")
    await wait_until(lambda: audit_log.last_seq >= 5, "5 entries")
    await publisher.publish("inference.completed", completed(5), "req-5")
    await wait_until(lambda: audit_log.last_seq >= 6, "6 entries")
    await consumer.stop()

    assert [e["stream_seq"] for e in read_entries(log_path)] == [1, 2, 3, 4, 5, 6]
    assert verify(log_path, key).valid
    info = await bus.js.consumer_info(bus.stream, "audit")
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0


async def test_a_restart_after_a_crash_records_each_event_once(publisher, run_consumer, log_path, key) -> None:
    for i in range(8):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")

    def crash(msgs) -> bool:
        raise RuntimeError("crash between fsync and ack")

    crashed, crashed_log, task = await run_consumer(log_path)
    crashed.before_ack = crash
    with pytest.raises(RuntimeError, match="crash between fsync and ack"):
        await asyncio.wait_for(task, DEADLINE_S)
    written = crashed_log.last_seq
    assert written >= 1
    crashed_log.close()
    # Make it a crash in the middle of the write: only some lines reached the disk,
    # then half a line. None of the batch was acked (and ack_wait is still running).
    lines = log_path.read_bytes().split(b"\n")[:-1]
    kept = written // 2
    log_path.write_bytes(b"".join(line + b"\n" for line in lines[:kept]) + lines[kept][:30])

    # A new process on the same file and durable consumer name.
    consumer, audit_log, _ = await run_consumer(log_path)
    assert audit_log.last_seq == kept
    for i in range(8, 12):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    await wait_until(lambda: audit_log.last_seq >= 12, "12 entries")
    await consumer.stop()

    entries = read_entries(log_path)
    assert [e["event_id"] for e in entries] == [f"req-{i}" for i in range(12)]
    assert consumer.stats.appended == 12 - kept
    assert consumer.stats.duplicates == 0
    assert verify(log_path, key) == (True, 12, 0, "")


async def test_a_graceful_restart_continues_where_it_stopped(publisher, run_consumer, log_path, key) -> None:
    for i in range(3):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    first, first_log, _ = await run_consumer(log_path)
    await wait_until(lambda: first_log.last_seq >= 3, "3 entries")
    await first.stop()
    first_log.close()

    for i in range(3, 6):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    second, second_log, _ = await run_consumer(log_path)
    await wait_until(lambda: second_log.last_seq >= 6, "6 entries")
    await second.stop()

    assert [e["stream_seq"] for e in read_entries(log_path)] == [1, 2, 3, 4, 5, 6]
    assert second.stats.appended == 3
    assert verify(log_path, key) == (True, 6, 0, "")


async def test_undecodable_events_are_terminated_and_other_subjects_skipped(
    bus, publisher, run_consumer, log_path
) -> None:
    garbage = b"\xff\xff\xff\xff"
    with pytest.raises(Exception, match="Error parsing message"):
        events_pb2.InferenceCompleted.FromString(garbage)
    await bus.js.publish(f"{bus.prefix}.inference.completed", garbage, headers={"Nats-Msg-Id": "bad-1"})
    await bus.js.publish(f"{bus.prefix}.budget.reset", garbage, headers={"Nats-Msg-Id": "bad-2"})
    # Subjects audit has no decoder for: another consumer's events, not corrupt ones.
    await publisher.publish("inference.started", completed(2), "req-2")
    await publisher.publish("keys.changed", completed(3), "key-change-3")
    await publisher.publish("inference.completed", completed(4), "req-4")
    consumer, audit_log, _ = await run_consumer(log_path)

    await wait_until(
        lambda: audit_log.last_seq >= 1 and consumer.stats.terminated + consumer.stats.skipped >= 4, "the valid event"
    )
    assert [e["event_id"] for e in read_entries(log_path)] == ["req-4"]
    assert (consumer.stats.terminated, consumer.stats.skipped) == (2, 2)
    info = await bus.js.consumer_info(bus.stream, "audit")
    assert info.config.filter_subject == f"{bus.prefix}.>"
    assert info.num_ack_pending == 0  # terminated or acked: nothing left to redeliver
    assert info.num_redelivered == 0


def budget_reset(pool: str, start_ms: int) -> events_pb2.BudgetReset:
    return events_pb2.BudgetReset(
        event_id=f"reset:{pool}:{start_ms}",
        timestamp_ms=start_ms + 5,
        pool=pool,
        pool_chain=[pool, "org"],
        reason="period",
        period="minute",
        period_start_ms=start_ms,
        previous_period_start_ms=start_ms - 60_000,
        used=1234,
        capacity=5000,
    )


async def test_budget_reset_events_are_recorded_beside_inference_events(
    bus, publisher, run_consumer, log_path, key
) -> None:
    await publisher.publish("inference.completed", completed(0), "req-0")
    reset = budget_reset("team-a", 1_700_000_040_000)
    await publisher.publish("budget.reset", reset, reset.event_id)
    # The id is the Nats-Msg-Id header, whatever the payload says.
    admin = events_pb2.BudgetReset(pool="team-b", reason="admin", key_id="key_admin", pool_chain=["team-b"])
    await publisher.publish("budget.reset", admin, "reset:team-b:admin:1")
    consumer, audit_log, _ = await run_consumer(log_path)

    await wait_until(lambda: audit_log.last_seq >= 3, "3 entries")
    await consumer.stop()
    entries = read_entries(log_path)
    assert [(e["event_id"], e["subject"]) for e in entries] == [
        ("req-0", f"{bus.prefix}.inference.completed"),
        ("reset:team-a:1700000040000", f"{bus.prefix}.budget.reset"),
        ("reset:team-b:admin:1", f"{bus.prefix}.budget.reset"),
    ]
    period = entries[1]["payload"]
    assert (period["pool"], period["pool_chain"], period["reason"], period["period"]) == (
        "team-a",
        ["team-a", "org"],
        "period",
        "minute",
    )
    assert (period["used"], period["capacity"], period["period_start_ms"]) == ("1234", "5000", "1700000040000")
    assert entries[2]["payload"]["key_id"] == "key_admin"
    assert consumer.stats.terminated == consumer.stats.skipped == 0
    assert verify(log_path, key) == (True, 3, 0, "")


async def test_a_deleted_stream_is_declared_again(bus, publisher, run_consumer, log_path, key) -> None:
    await publisher.publish("inference.completed", completed(0), "req-0")
    _, audit_log, _ = await run_consumer(log_path, check_interval=0.2)
    await wait_until(lambda: audit_log.last_seq >= 1, "the first entry")

    await bus.js.delete_stream(bus.stream)

    async def stream_is_back() -> bool:
        try:
            await bus.js.stream_info(bus.stream)
        except nats.js.errors.NotFoundError:
            return False
        return True

    # The consumer notices, declares the stream again and consumes it from its start.
    await wait_until(stream_is_back, "the stream to be declared again")
    await publisher.publish("inference.completed", completed(1), "req-1")
    await wait_until(lambda: audit_log.last_seq >= 2, "the second entry")

    entries = read_entries(log_path)
    assert [(e["event_id"], e["stream_seq"]) for e in entries] == [("req-0", 1), ("req-1", 1)]
    assert verify(log_path, key).valid
