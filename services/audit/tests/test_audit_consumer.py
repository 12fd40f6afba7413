"""Events from the real JetStream into the chain: exactly once, in order, acked after fsync."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import nats
import nats.js.errors
import pytest
from hoosh.chat.v1 import chat_pb2
from hoosh.events.v1 import events_pb2
from hoosh_audit.checkpoint import CheckpointStore, CheckpointWriter
from hoosh_audit.consumer import AuditConsumer, decode
from hoosh_audit.keys import Keyring
from hoosh_audit.log import AuditLog
from hoosh_audit.verification import verify_log
from hoosh_common.eventbus import EventPublisher, StreamPolicy, ensure_stream

from .conftest import NATS_URL, Bus
from .helpers import DEADLINE_S, read_entries, segment_files, wait_until


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


@pytest.fixture
async def publisher(bus: Bus) -> EventPublisher:
    await ensure_stream(bus.js, bus.stream, bus.prefix)
    return EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix)


class Running(NamedTuple):
    consumer: AuditConsumer
    log: AuditLog
    task: asyncio.Task[None]


StartConsumer = Callable[..., Awaitable[Running]]


@pytest.fixture
async def run_consumer(bus: Bus, keyring: Keyring) -> AsyncIterator[StartConsumer]:
    """Start consumers in-process; every one still running is stopped at the end."""
    started: list[Running] = []

    async def start(directory: Path, *, segment_max_bytes: int = 64 << 20, **options: Any) -> Running:
        audit_log = await AuditLog.open(
            directory, keyring, segment_max_bytes=segment_max_bytes, subject_prefix=bus.prefix
        )
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


async def test_every_published_event_is_recorded_once(
    publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path, keyring: Keyring
) -> None:
    n = 40
    for i in range(n):
        if i % 4 == 3:
            await publisher.publish("inference.failed", failed(i), f"req-{i}")
        else:
            await publisher.publish("inference.completed", completed(i), f"req-{i}")
    consumer, audit_log, _ = await run_consumer(log_dir)

    await wait_until(lambda: audit_log.last_seq >= n, f"{n} entries")
    # Events published while running are recorded too.
    for i in range(n, n + 10):
        publisher.publish_background("inference.completed", completed(i), f"req-{i}")
    await publisher.drain()
    await wait_until(lambda: audit_log.last_seq >= n + 10, f"{n + 10} entries")
    await consumer.stop()

    entries = read_entries(log_dir)
    assert [e["event_id"] for e in entries] == [f"req-{i}" for i in range(n + 10)]
    assert [e["stream_seq"] for e in entries] == list(range(1, n + 11))
    assert verify_log(log_dir, keyring).short() == (True, n + 10, 0, "")
    first, fourth = entries[0], entries[3]
    assert first["subject"] == f"{publisher.subject_prefix}.inference.completed"
    assert first["payload"]["model"] == "smollm2-135m"
    assert first["payload"]["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert first["payload"]["timestamp_ms"] == "1700000000000"  # int64 as JSON text, as protobuf maps it
    assert fourth["subject"] == f"{publisher.subject_prefix}.inference.failed"
    assert fourth["payload"]["http_status"] == 502
    assert consumer.stats.appended == n + 10
    assert consumer.stats.duplicates == consumer.stats.terminated == 0


async def test_the_same_event_id_twice_is_one_entry(
    publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path
) -> None:
    first = await publisher.publish("inference.completed", completed(1), "req-1")
    again = await publisher.publish("inference.completed", completed(1), "req-1")
    assert again.duplicate and again.seq == first.seq
    await publisher.publish("inference.completed", completed(2), "req-2")
    _, audit_log, _ = await run_consumer(log_dir)

    await wait_until(lambda: audit_log.last_seq >= 2, "the second event")
    assert [e["event_id"] for e in read_entries(log_dir)] == ["req-1", "req-2"]


async def test_a_redelivered_message_is_acked_not_appended(
    bus: Bus, publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path, keyring: Keyring
) -> None:
    for i in range(5):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    first_batch: list[int] = []

    def lose_first_acks(msgs: list[Any]) -> bool:
        if first_batch:
            return True
        first_batch.extend(m.metadata.sequence.stream for m in msgs)
        return False  # written and fsynced, but the acks never reach the server

    consumer, audit_log, _ = await run_consumer(log_dir, ack_wait=1.0, before_ack=lose_first_acks)
    # The server redelivers after ack_wait; the consumer must recognise the copies.
    await wait_until(lambda: consumer.stats.duplicates >= len(first_batch) > 0, "the redelivery")
    await wait_until(lambda: audit_log.last_seq >= 5, "5 entries")
    await publisher.publish("inference.completed", completed(5), "req-5")
    await wait_until(lambda: audit_log.last_seq >= 6, "6 entries")
    await consumer.stop()

    assert [e["stream_seq"] for e in read_entries(log_dir)] == [1, 2, 3, 4, 5, 6]
    assert verify_log(log_dir, keyring).valid
    info = await bus.js.consumer_info(bus.stream, "audit")
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0


@pytest.mark.parametrize("segment_max_bytes", [64 << 20, 1500], ids=["one segment", "many segments"])
async def test_a_restart_after_a_crash_records_each_event_once(
    publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path, keyring: Keyring, segment_max_bytes: int
) -> None:
    for i in range(30):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    batches = 0

    def crash_on_the_third_batch(msgs: list[Any]) -> bool:
        nonlocal batches
        batches += 1
        if batches == 3:
            raise RuntimeError("crash between fsync and ack")
        return True

    _crashed, crashed_log, task = await run_consumer(
        log_dir, segment_max_bytes=segment_max_bytes, batch_size=8, before_ack=crash_on_the_third_batch
    )
    with pytest.raises(RuntimeError, match="crash between fsync and ack"):
        await asyncio.wait_for(task, DEADLINE_S)
    written = crashed_log.last_seq
    assert written >= 3  # (usually 24) three batches durable, the third never acked
    crashed_log.close()
    # Make it a crash in the middle of the write: only some lines of the head reached
    # the disk, then half a line. None of that batch was acked.
    head = segment_files(log_dir)[-1]
    lines = head.read_bytes().split(b"\n")[:-1]
    kept = len(lines) // 2
    head.write_bytes(b"".join(line + b"\n" for line in lines[:kept]) + lines[kept][:30])
    survived = written - (len(lines) - kept)

    # A new process on the same directory and durable consumer name.
    consumer, audit_log, _ = await run_consumer(log_dir, segment_max_bytes=segment_max_bytes)
    assert audit_log.last_seq == survived
    for i in range(30, 34):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    await wait_until(lambda: audit_log.last_seq >= 34, "34 entries")
    await consumer.stop()

    entries = read_entries(log_dir)
    assert [e["event_id"] for e in entries] == [f"req-{i}" for i in range(34)]
    assert consumer.stats.appended == 34 - survived
    assert consumer.stats.duplicates == 0
    assert verify_log(log_dir, keyring).short() == (True, 34, 0, "")
    if segment_max_bytes < 64 << 20:
        assert len(segment_files(log_dir)) > 3


async def test_a_graceful_restart_continues_where_it_stopped(
    publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path, keyring: Keyring
) -> None:
    for i in range(3):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    first, first_log, _ = await run_consumer(log_dir)
    await wait_until(lambda: first_log.last_seq >= 3, "3 entries")
    await first.stop()
    first_log.close()

    for i in range(3, 6):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    second, second_log, _ = await run_consumer(log_dir)
    await wait_until(lambda: second_log.last_seq >= 6, "6 entries")
    await second.stop()

    assert [e["stream_seq"] for e in read_entries(log_dir)] == [1, 2, 3, 4, 5, 6]
    assert second.stats.appended == 3
    assert verify_log(log_dir, keyring).short() == (True, 6, 0, "")


async def test_undecodable_events_are_terminated_and_other_subjects_skipped(
    bus: Bus, publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path
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
    consumer, audit_log, _ = await run_consumer(log_dir)

    await wait_until(
        lambda: audit_log.last_seq >= 1 and consumer.stats.terminated + consumer.stats.skipped >= 4, "the valid event"
    )
    assert [e["event_id"] for e in read_entries(log_dir)] == ["req-4"]
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
    bus: Bus, publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path, keyring: Keyring
) -> None:
    await publisher.publish("inference.completed", completed(0), "req-0")
    reset = budget_reset("team-a", 1_700_000_040_000)
    await publisher.publish("budget.reset", reset, reset.event_id)
    # The id is the Nats-Msg-Id header, whatever the payload says.
    admin = events_pb2.BudgetReset(pool="team-b", reason="admin", key_id="key_admin", pool_chain=["team-b"])
    await publisher.publish("budget.reset", admin, "reset:team-b:admin:1")
    consumer, audit_log, _ = await run_consumer(log_dir)

    await wait_until(lambda: audit_log.last_seq >= 3, "3 entries")
    await consumer.stop()
    entries = read_entries(log_dir)
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
    assert verify_log(log_dir, keyring).short() == (True, 3, 0, "")


async def test_admin_actions_are_recorded_whatever_their_payload(
    bus: Bus, publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path, keyring: Keyring
) -> None:
    js, p = bus.js, bus.prefix
    created = {"action": "key.created", "key_id": "key_42", "actor_key_id": "key_admin", "name": "ci-bot"}
    await js.publish(f"{p}.admin.key.created", json.dumps(created).encode(), headers={"Nats-Msg-Id": "adm-1"})
    await js.publish(f"{p}.admin.pool.resized", json.dumps({"pool": "team-a", "request_id": "adm-2"}).encode())
    await js.publish(f"{p}.admin.config.reloaded", b'["hoosh.yaml", 3]')
    await js.publish(f"{p}.admin.tokens.reported", b"\x00\x01binary", headers={"Nats-Msg-Id": "adm-4"})
    await js.publish(f"{p}.admin.key.revoked", b'{"nan": NaN}', headers={"Nats-Msg-Id": "adm-5"})
    await publisher.publish("inference.completed", completed(6), "req-6")
    consumer, audit_log, _ = await run_consumer(log_dir)

    await wait_until(lambda: audit_log.last_seq >= 6, "6 entries")
    await consumer.stop()
    entries = read_entries(log_dir)
    assert [(e["event_id"], e["subject"].removeprefix(p + ".")) for e in entries] == [
        ("adm-1", "admin.key.created"),
        ("adm-2", "admin.pool.resized"),  # no header: the payload's request id
        ("nats:3", "admin.config.reloaded"),  # no id at all: the stream sequence
        ("adm-4", "admin.tokens.reported"),
        ("adm-5", "admin.key.revoked"),
        ("req-6", "inference.completed"),
    ]
    assert entries[0]["payload"] == created
    assert entries[2]["payload"] == {"data_json": ["hoosh.yaml", 3]}
    assert base64.b64decode(entries[3]["payload"]["data_base64"]) == b"\x00\x01binary"
    assert base64.b64decode(entries[4]["payload"]["data_base64"]) == b'{"nan": NaN}'  # not JSON
    assert (consumer.stats.terminated, consumer.stats.skipped) == (0, 0)
    assert verify_log(log_dir, keyring).valid


def test_hooshs_own_admin_action_is_decoded_from_its_proto() -> None:
    action = events_pb2.AdminAction(
        event_id="req-9", action="key.revoked", actor_key_id="key_admin", target="key_7", details_json="{}"
    )
    event_id, payload = decode("p.admin.key.revoked", "p", action.SerializeToString(), None, 3) or ("", {})
    assert event_id == "req-9"
    assert (payload["action"], payload["actor_key_id"], payload["target"]) == ("key.revoked", "key_admin", "key_7")


async def test_an_event_republished_from_an_outbox_is_recorded_once(
    bus: Bus, publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path, keyring: Keyring
) -> None:
    """Past JetStream's duplicate window a drained outbox may publish an event the
    stream already holds: the audit knows it by its id and records it once."""
    consumer, audit_log, _ = await run_consumer(log_dir)
    await publisher.publish("inference.completed", completed(1), "req-1")
    await wait_until(lambda: audit_log.last_seq >= 1, "1 entry")
    # As JetStream sees a copy once its window has passed: no Nats-Msg-Id it remembers
    # (here none: the event id then comes from the payload), marked as an outbox copy.
    data = completed(1).SerializeToString()
    await bus.js.publish(f"{bus.prefix}.inference.completed", data, headers={"hoosh-outbox": "1"})
    await publisher.publish("inference.completed", completed(2), "req-2")
    await wait_until(lambda: consumer.stats.duplicates >= 1 and audit_log.last_seq >= 2, "req-2 after the copy")
    await consumer.stop()
    assert [e["event_id"] for e in read_entries(log_dir)] == ["req-1", "req-2"]
    assert verify_log(log_dir, keyring).valid


def test_decode_of_an_admin_action() -> None:
    assert decode("p.admin.key.updated", "p", b'{"event_id": "e1", "x": 1}', None, 9) == (
        "e1",
        {"event_id": "e1", "x": 1},
    )
    assert decode("p.admin.x", "p", b"\xff", {"Nats-Msg-Id": "m"}, 9) == ("m", {"data_base64": "/w=="})
    assert decode("p.admins", "p", b"{}", None, 9) is None  # not under admin.>
    assert decode("q.admin.x", "p", b"{}", None, 9) is None  # another prefix


async def test_a_checkpoint_follows_every_batch(
    publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path, store: CheckpointStore
) -> None:
    writer_box: list[CheckpointWriter] = []
    consumer, audit_log, _ = await run_consumer(log_dir, on_durable=lambda: writer_box[0].notify())
    writer = CheckpointWriter(store, audit_log)
    writer_box.append(writer)
    writer_task = asyncio.create_task(writer.run())
    try:
        for i in range(12):
            await publisher.publish("inference.completed", completed(i), f"req-{i}")

        async def checkpointed(n: int) -> bool:
            found = await store.read()
            return found is not None and found.seq == n

        await wait_until(lambda: checkpointed(12), "the checkpoint of 12 entries")
        await publisher.publish("inference.completed", completed(12), "req-12")
        await wait_until(lambda: checkpointed(13), "the checkpoint of 13 entries")
    finally:
        await consumer.stop()
        await writer.stop()
        await writer_task
    stored = await store.read()
    assert stored is not None and stored.mac == audit_log.last_mac


# -- fsync before ack ------------------------------------------------------------------------


class FsyncRecorder:
    """Instrumentation of the OS call (not a mock): every os.fsync is delayed a little,
    then really done, and recorded with the file it made durable and its size then."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls: list[tuple[float, str, int]] = []  # (done at, path, size)
        self._lock = threading.Lock()
        self._real = os.fsync

    def __call__(self, fd: int) -> None:
        time.sleep(self.delay)  # an ack sent before the fsync would arrive in this window
        self._real(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        size = os.fstat(fd).st_size
        with self._lock:
            self.calls.append((time.monotonic(), path, size))


async def test_no_event_is_acked_before_its_entry_and_segment_are_fsynced(
    bus: Bus, publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Watch the acks as the server gets them, on a second connection ($JS.ACK.<stream>...).
    watcher = await nats.connect(NATS_URL)
    acks: dict[int, float] = {}

    async def on_ack(msg: Any) -> None:
        tokens = msg.subject.split(".")
        stream_at = tokens.index(bus.stream)
        if msg.data in (b"", b"+ACK"):
            acks.setdefault(int(tokens[stream_at + 3]), time.monotonic())

    await watcher.subscribe("$JS.ACK.>", cb=on_ack)
    await watcher.flush()
    recorder = FsyncRecorder(delay=0.05)
    monkeypatch.setattr(os, "fsync", recorder)
    try:
        for i in range(40):
            await publisher.publish("inference.completed", completed(i), f"req-{i}")
        consumer, _audit_log, _ = await run_consumer(log_dir, segment_max_bytes=2500, batch_size=6)
        await wait_until(lambda: len(acks) >= 40, "40 acks")
        await consumer.stop()
    finally:
        monkeypatch.undo()
        await watcher.close()

    # Where each entry ends (its segment, the size that holds it) and when it was acked.
    segments = segment_files(log_dir)
    assert len(segments) > 3
    previous_done = 0.0  # the previous segment's last fsync: this one was created after it
    for segment in segments:
        offset = 0
        first_ack: float | None = None
        for line in segment.read_bytes().split(b"\n")[:-1]:
            offset += len(line) + 1
            entry = json.loads(line)
            acked = acks[entry["stream_seq"]]
            durable = [done for done, path, size in recorder.calls if path == str(segment) and size >= offset]
            assert durable, f"entry {entry['seq']} was acked but its segment was never fsynced past it"
            assert min(durable) < acked, f"entry {entry['seq']} was acked before the fsync that made it durable"
            first_ack = acked if first_ack is None else min(first_ack, acked)
        # The segment's directory entry was made durable after it was created and before
        # any of its entries was acked.
        assert first_ack is not None
        created = [
            done for done, path, _ in recorder.calls if path == str(log_dir) and previous_done < done < first_ack
        ]
        assert created, f"{segment.name}: no fsync of the directory between its creation and its first ack"
        previous_done = max(done for done, path, _ in recorder.calls if path == str(segment))


async def test_a_deleted_stream_is_declared_again(
    bus: Bus, publisher: EventPublisher, run_consumer: StartConsumer, log_dir: Path, keyring: Keyring
) -> None:
    await publisher.publish("inference.completed", completed(0), "req-0")
    _, audit_log, _ = await run_consumer(log_dir, check_interval=0.2)
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

    entries = read_entries(log_dir)
    assert [(e["event_id"], e["stream_seq"]) for e in entries] == [("req-0", 1), ("req-1", 1)]
    assert verify_log(log_dir, keyring).valid


async def test_on_a_work_queue_stream_recorded_events_leave_it_and_a_restart_resumes(
    bus: Bus, run_consumer: StartConsumer, log_dir: Path, keyring: Keyring
) -> None:
    """With bounded work-queue retention an event leaves the stream once audit has
    written and acked it; a restarted consumer (which cannot start at a sequence on a
    work queue) takes what is left, recording nothing twice."""
    policy = StreamPolicy(retention="workqueue", max_bytes=16 << 20)
    await ensure_stream(bus.js, bus.stream, bus.prefix, policy=policy)
    publisher = EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix)
    for i in range(10):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    consumer, audit_log, _ = await run_consumer(log_dir, stream_policy=policy)
    await wait_until(lambda: audit_log.last_seq >= 10, "10 entries")

    async def left_in_stream() -> int:
        return int((await bus.js.stream_info(bus.stream)).state.messages)

    for _ in range(100):
        if await left_in_stream() == 0:
            break
        await asyncio.sleep(0.05)
    assert await left_in_stream() == 0  # acked: gone from the stream
    await consumer.stop()
    audit_log.close()
    for i in range(10, 15):
        await publisher.publish("inference.completed", completed(i), f"req-{i}")
    _, reopened, _ = await run_consumer(log_dir, stream_policy=policy)
    await wait_until(lambda: reopened.last_seq >= 15, "15 entries")
    assert [e["event_id"] for e in read_entries(log_dir)] == [f"req-{i}" for i in range(15)]
    assert verify_log(log_dir, keyring).valid
