"""Only events signed by a known publisher reach the chain as themselves: forgeries
published straight on the real JetStream (nats-py, no or a wrong signature) are
recorded as ``audit.rejected`` entries, acked and counted, and the chain verifies."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hoosh.events.v1 import events_pb2
from hoosh_audit import metrics
from hoosh_audit.consumer import AuditConsumer
from hoosh_audit.index import Filters
from hoosh_audit.keys import Keyring
from hoosh_audit.log import AuditLog
from hoosh_audit.verification import verify_log
from hoosh_common.eventbus import (
    MSG_ID_HEADER,
    OUTBOX_HEADER,
    REJECT_REASONS,
    SIGNATURE_HEADER,
    EventPublisher,
    EventSigner,
    EventVerifier,
    ensure_stream,
)

from .conftest import Bus
from .helpers import read_entries, wait_until

ROUTER_KEY = bytes.fromhex("a1" * 32)
ROUTER_KEY_2 = bytes.fromhex("b2" * 32)
BUDGET_KEY = bytes.fromhex("c3" * 32)


def completed(request_id: str, cost: float = 0.01) -> events_pb2.InferenceCompleted:
    return events_pb2.InferenceCompleted(request_id=request_id, model="m", pool="team", key_id="key_1", cost_usd=cost)


def rejected_counts() -> dict[str, float]:
    return {reason: metrics.EVENTS_REJECTED.labels(reason)._value.get() for reason in REJECT_REASONS}


@pytest.fixture
async def recording(bus: Bus, log_dir: Path, keyring: Keyring) -> AsyncIterator[tuple[AuditConsumer, AuditLog]]:
    """An audit consumer that knows the router's two keys (one rotated in) and budget's."""
    await ensure_stream(bus.js, bus.stream, bus.prefix, duplicate_window=0.5)
    audit_log = await AuditLog.open(log_dir, keyring, subject_prefix=bus.prefix)
    verifier = EventVerifier({"router": ROUTER_KEY, "router-2": ROUTER_KEY_2, "budget": BUDGET_KEY})
    consumer = AuditConsumer(
        bus.js,
        audit_log,
        stream=bus.stream,
        subject_prefix=bus.prefix,
        durable="audit",
        verifier=verifier,
        duplicate_window=0.5,
    )
    task = asyncio.create_task(consumer.run())
    yield consumer, audit_log
    await consumer.stop()
    with contextlib.suppress(Exception):
        await task
    audit_log.close()


def publisher(bus: Bus, key: bytes, key_id: str) -> EventPublisher:
    return EventPublisher(bus.nc, bus.js, bus.stream, bus.prefix, signer=EventSigner(key, key_id))


async def test_forgeries_are_recorded_as_rejected_and_genuine_events_as_themselves(
    bus: Bus, recording: tuple[AuditConsumer, AuditLog], log_dir: Path, keyring: Keyring
) -> None:
    consumer, audit_log = recording
    before = rejected_counts()
    subject = f"{bus.prefix}.inference.completed"
    router = publisher(bus, ROUTER_KEY, "router")
    genuine = await router.publish("inference.completed", completed("real-1"), "real-1")
    assert genuine is not None
    stored = await bus.js.get_msg(bus.stream, genuine.seq)
    forged = completed("forged", cost=0.0).SerializeToString()
    copied_signature = (stored.headers or {})[SIGNATURE_HEADER]

    # Straight on the subject with nats-py, as anyone who can publish there could.
    await bus.js.publish(subject, forged, headers={MSG_ID_HEADER: "forged-none"})
    await bus.js.publish(subject, forged, headers={MSG_ID_HEADER: "forged-garbage", SIGNATURE_HEADER: "v1:router:zz"})
    await bus.js.publish(
        subject, forged, headers={MSG_ID_HEADER: "forged-kid", SIGNATURE_HEADER: "v1:nobody:" + "0" * 64}
    )
    # A genuine signature copied onto another payload, and onto another subject.
    await bus.js.publish(subject, forged, headers={MSG_ID_HEADER: "real-1-copy", SIGNATURE_HEADER: copied_signature})
    await asyncio.sleep(0.6)  # past the duplicate window: the same message id is stored again
    await bus.js.publish(
        f"{bus.prefix}.admin.key.revoked",
        stored.data,
        headers={MSG_ID_HEADER: "real-1", SIGNATURE_HEADER: copied_signature},
    )
    # Signed with a key the audit does not hold, under a known id; a payload that is not even the event.
    wrong = EventSigner(bytes.fromhex("ee" * 32), "router")
    await bus.js.publish(
        subject,
        b"\xff not protobuf",
        headers={
            MSG_ID_HEADER: "forged-wrong",
            SIGNATURE_HEADER: wrong.sign(subject, "forged-wrong", b"\xff not protobuf"),
        },
    )
    # No message id at all.
    await bus.js.publish(subject, forged)
    # Not a subject audit records: skipped as before, signed or not.
    await bus.js.publish(f"{bus.prefix}.billing.tick", b"{}")
    # Genuine: the router after rotating its key, and the budget service.
    rotated = publisher(bus, ROUTER_KEY_2, "router-2")
    await rotated.publish("inference.completed", completed("real-2"), "real-2")
    reset = events_pb2.BudgetReset(event_id="reset-1", pool="team")
    await publisher(bus, BUDGET_KEY, "budget").publish("budget.reset", reset, "reset-1")

    await wait_until(lambda: audit_log.last_seq >= 10, "10 entries")
    await wait_until(lambda: consumer.stats.skipped >= 1, "the unrecorded subject skipped")
    entries = read_entries(log_dir)
    rejected_subject = f"{bus.prefix}.audit.rejected"
    assert [(e["subject"].removeprefix(f"{bus.prefix}."), e["event_id"]) for e in entries] == [
        ("inference.completed", "real-1"),
        ("audit.rejected", "rejected:forged-none"),
        ("audit.rejected", "rejected:forged-garbage"),
        ("audit.rejected", "rejected:forged-kid"),
        ("audit.rejected", "rejected:real-1-copy"),
        ("audit.rejected", "rejected:real-1"),
        ("audit.rejected", "rejected:forged-wrong"),
        ("audit.rejected", f"rejected:nats:{entries[7]['stream_seq']}"),
        ("inference.completed", "real-2"),
        ("budget.reset", "reset-1"),
    ]
    reasons = [e["payload"]["reason"] for e in entries if e["subject"] == rejected_subject]
    assert reasons == ["missing", "malformed", "unknown_key", "mismatch", "mismatch", "mismatch", "missing"]
    first = entries[1]["payload"]
    assert first == {
        "reason": "missing",
        "claimed_subject": subject,
        "msg_id": "forged-none",
        "claimed_key_id": "",
        "payload_sha256": hashlib.sha256(forged).hexdigest(),
        "payload_bytes": len(forged),
        "outcome": "rejected",
    }
    assert entries[3]["payload"]["claimed_key_id"] == "nobody"
    assert entries[5]["payload"]["claimed_subject"] == f"{bus.prefix}.admin.key.revoked"
    # Nothing of a forged payload is recorded as an event: no model, key or pool to filter on.
    assert all("model" not in e["payload"] and "key_id" not in e["payload"] for e in entries[1:8])
    assert entries[0]["payload"]["cost_usd"] == 0.01 and entries[8]["payload"]["request_id"] == "real-2"

    assert verify_log(log_dir, keyring).short() == (True, 10, 0, "")
    assert (await audit_log.integrity()).valid
    counted = rejected_counts()
    assert {reason: counted[reason] - before[reason] for reason in REJECT_REASONS} == {
        "missing": 2,
        "malformed": 1,
        "unknown_key": 1,
        "mismatch": 3,
    }
    assert consumer.stats.rejected == 7 and consumer.stats.terminated == 0
    # The query layer files them under their own kind; the event ids of genuine events stay theirs.
    page = await audit_log.query(Filters(kind="audit.rejected"), limit=100)
    assert page.total == 7
    assert [e["event_id"] for e in (await audit_log.query(Filters(event_id="real-1"), limit=10)).entries] == ["real-1"]
    assert (await audit_log.query(Filters(kind="audit.rejected", outcome="rejected"), limit=1)).total == 7
    assert (await audit_log.query(Filters(key_id="key_1"), limit=10)).total == 2  # what a user key would see

    async def all_acked() -> bool:  # rejections are acked like entries: nothing comes back
        info = await bus.js.consumer_info(bus.stream, "audit")
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    await wait_until(all_acked, "every message acked")


async def test_a_forgery_cannot_stand_in_for_an_event_still_in_an_outbox(
    bus: Bus, recording: tuple[AuditConsumer, AuditLog], log_dir: Path
) -> None:
    """A forgery with the id of an event still waiting in a publisher's outbox is recorded
    as rejected; the genuine event, drained later (past the duplicate window), still is."""
    _, audit_log = recording
    subject = f"{bus.prefix}.inference.completed"
    await bus.js.publish(subject, completed("req-9", cost=0.0).SerializeToString(), headers={MSG_ID_HEADER: "req-9"})
    await wait_until(lambda: audit_log.last_seq >= 1, "the forgery recorded")
    await asyncio.sleep(0.6)  # past the stream's duplicate window
    signer = EventSigner(ROUTER_KEY, "router")
    data = completed("req-9").SerializeToString()
    headers = {MSG_ID_HEADER: "req-9", SIGNATURE_HEADER: signer.sign(subject, "req-9", data), OUTBOX_HEADER: "1"}
    await bus.js.publish(subject, data, headers=headers)  # as the drainer sends it
    await wait_until(lambda: audit_log.last_seq >= 2, "the genuine event recorded")
    entries = read_entries(log_dir)
    assert [(e["event_id"], e["subject"].rsplit(".", 2)[-2:]) for e in entries] == [
        ("rejected:req-9", ["audit", "rejected"]),
        ("req-9", ["inference", "completed"]),
    ]
    # And a second drained copy of the genuine one is still recognised as a duplicate.
    await asyncio.sleep(0.6)
    await bus.js.publish(subject, data, headers=headers)
    await wait_until(lambda: recording[0].stats.duplicates >= 1, "the copy skipped")
    assert audit_log.last_seq == 2


def test_the_rejection_entry_is_valid_json_for_any_claim() -> None:
    """Whatever a forger puts in the headers, the entry is bounded and writable."""
    from hoosh_audit.chain import canonical
    from hoosh_audit.consumer import rejection
    from hoosh_common.eventbus import SignatureProblem

    headers: dict[str, Any] = {MSG_ID_HEADER: "\udcff" + "x" * 5000}
    event_id, payload = rejection("s" * 1000, headers, b"data", SignatureProblem("malformed", "k"), 7)
    assert len(payload["msg_id"]) == 256 and len(payload["claimed_subject"]) == 256
    assert event_id == "rejected:" + payload["msg_id"]
    json.loads(canonical(payload))
