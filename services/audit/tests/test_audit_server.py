"""AuditService over a real in-process grpc.aio server: filters, cursor paging, and the
chain's state in every reply without reading the log again."""

from __future__ import annotations

import asyncio
import json
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import pytest
from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc
from hoosh_audit import log as log_module
from hoosh_audit.chain import GENESIS_MAC, NewEntry
from hoosh_audit.keys import Keyring
from hoosh_audit.log import AuditLog
from hoosh_audit.server import AuditServicer
from hoosh_common.grpc_server import internal_channel, new_server

from .helpers import rewrite_lines, segment_files, where

Stub: TypeAlias = Any  # audit_pb2_grpc.AuditServiceStub (the generated gRPC module is untyped)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def audit_log(log_dir: Path, keyring: Keyring, clock: Clock) -> AsyncIterator[AuditLog]:
    log = await AuditLog.open(log_dir, keyring, segment_max_bytes=64 << 10, clock_ms=clock)
    yield log
    log.close()


@pytest.fixture
async def stub(audit_log: AuditLog) -> AsyncIterator[Stub]:
    server = new_server()
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(audit_log), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = internal_channel(f"127.0.0.1:{port}")
    try:
        yield audit_pb2_grpc.AuditServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


async def fill(audit_log: AuditLog, n: int) -> None:
    await audit_log.append_batch(
        [
            NewEntry(
                event_id=f"req-{i % 50}",
                subject="hoosh.inference.completed",
                stream_seq=i,
                payload={"request_id": f"req-{i % 50}", "model": "m", "note": "ü"},
            )
            for i in range(1, n + 1)
        ]
    )


async def test_list_entries_defaults_to_the_last_100(stub: Stub, audit_log: AuditLog) -> None:
    await fill(audit_log, 120)
    response = await stub.ListEntries(audit_pb2.ListEntriesRequest())
    assert response.total == 120 and response.head_seq == 120
    assert response.chain_valid and response.verify_error == ""
    assert [e.seq for e in response.entries] == list(range(21, 121))
    last = response.entries[-1]
    assert (last.event_id, last.subject, last.stream_seq) == ("req-20", "hoosh.inference.completed", 120)
    assert json.loads(last.payload_json) == {"request_id": "req-20", "model": "m", "note": "ü"}
    assert last.prev_mac == response.entries[-2].mac
    assert len(last.mac) == 64 and last.timestamp_ms > 0
    assert last.signing_key_id == audit_log.keyring.current_id
    assert last.segment == "seg-000000000001.jsonl"
    assert response.next_cursor  # 20 older entries


async def test_list_entries_limit_and_event_filter(stub: Stub, audit_log: AuditLog) -> None:
    await fill(audit_log, 120)
    two = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=2))
    assert [e.seq for e in two.entries] == [119, 120]
    one_request = await stub.ListEntries(audit_pb2.ListEntriesRequest(event_id="req-7"))
    assert [e.seq for e in one_request.entries] == [7, 57, 107]
    assert one_request.total == 3 and one_request.next_cursor == ""
    none = await stub.ListEntries(audit_pb2.ListEntriesRequest(event_id="nobody"))
    assert (list(none.entries), none.total) == ([], 0)


async def test_list_entries_for_one_key(stub: Stub, audit_log: AuditLog) -> None:
    # Entries of two keys, one without a key (the edge ran open) and a budget reset by
    # key_1: only the asked key's come back, and total counts them.
    await audit_log.append_batch(
        [
            NewEntry(
                event_id=f"req-{i % 5}",
                subject="hoosh.inference.completed",
                stream_seq=i,
                payload={"request_id": f"req-{i % 5}", **({"key_id": f"key_{i % 3}"} if i % 3 else {})},
            )
            for i in range(1, 31)
        ]
    )
    await audit_log.append_batch(
        [NewEntry("reset:team:admin:1", "hoosh.budget.reset", 31, {"pool": "team", "key_id": "key_1"})]
    )
    mine = await stub.ListEntries(audit_pb2.ListEntriesRequest(key_id="key_1"))
    expected = [i for i in range(1, 31) if i % 3 == 1] + [31]
    assert [e.seq for e in mine.entries] == expected
    assert mine.total == len(expected) == 11
    assert all(json.loads(e.payload_json)["key_id"] == "key_1" for e in mine.entries)
    assert mine.chain_valid

    last_two = await stub.ListEntries(audit_pb2.ListEntriesRequest(key_id="key_2", limit=2))
    assert [e.seq for e in last_two.entries] == [26, 29]
    assert last_two.total == 10

    one_request = await stub.ListEntries(audit_pb2.ListEntriesRequest(key_id="key_1", event_id="req-2"))
    assert [e.seq for e in one_request.entries] == [7, 22]
    assert one_request.total == 2

    nobody = await stub.ListEntries(audit_pb2.ListEntriesRequest(key_id="key_9"))
    assert (list(nobody.entries), nobody.total) == ([], 0)
    everyone = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1000))
    assert everyone.total == 31 and len(everyone.entries) == 31


@pytest.mark.parametrize(
    "request_",
    [
        audit_pb2.ListEntriesRequest(limit=-1),
        audit_pb2.ListEntriesRequest(since_ms=-5),
        audit_pb2.ListEntriesRequest(cursor="not a cursor"),
        audit_pb2.ListEntriesRequest(model="m" * 300),
    ],
    ids=["negative limit", "negative time", "bad cursor", "long filter"],
)
async def test_invalid_requests(stub: Stub, request_: audit_pb2.ListEntriesRequest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.ListEntries(request_)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_empty_log(stub: Stub) -> None:
    response = await stub.ListEntries(audit_pb2.ListEntriesRequest())
    assert (response.total, response.chain_valid, list(response.entries), response.next_cursor) == (0, True, [], "")
    verified = await stub.Verify(audit_pb2.VerifyRequest())
    assert (verified.valid, verified.entries, verified.first_bad_seq) == (True, 0, 0)


# -- filters and paging on a few thousand entries ------------------------------------------

KEYS = [f"key_{i}" for i in range(7)] + [""]
POOLS = ["org", "team-a", "team-b"]
MODELS = ["smollm2", "gpt-4o-mini", "claude"]
PROVIDERS = {"smollm2": "local", "gpt-4o-mini": "openai", "claude": "anthropic"}
KINDS = ["chat", "chat", "chat", "embedding", "transcription"]


def event(i: int, rng: random.Random) -> NewEntry:
    """One of a realistic mix: completions, failures, budget resets, admin actions."""
    roll = rng.random()
    key_id = rng.choice(KEYS)
    if roll < 0.05:
        pool = rng.choice(POOLS)
        return NewEntry(f"reset:{pool}:{i}", "hoosh.budget.reset", i, {"pool": pool, "reason": "period"})
    if roll < 0.08:
        action = rng.choice(["key.created", "key.revoked", "pool.resized"])
        admin = {"key_id": key_id, "request_id": f"adm-{i}", "outcome": rng.choice(["ok", "denied"])}
        return NewEntry(f"adm-{i}", f"hoosh.admin.{action}", i, admin)
    model = rng.choice(MODELS)
    payload: dict[str, Any] = {
        "request_id": f"req-{i}",
        "model": model,
        "provider": PROVIDERS[model],
        "pool": rng.choice(POOLS),
        "kind": rng.choice(KINDS),
    }
    if key_id:
        payload["key_id"] = key_id
    subject = "hoosh.inference.failed" if roll > 0.9 else "hoosh.inference.completed"
    return NewEntry(f"req-{i}", subject, i, payload)


def fields(entry: dict[str, Any]) -> dict[str, Any]:
    """What the index derives from an entry, computed here independently."""
    payload, name = entry["payload"], entry["subject"].removeprefix("hoosh.")
    inference = name.startswith("inference.")
    return {
        "ts_ms": entry["ts_ms"],
        "event_id": entry["event_id"],
        "key_id": payload.get("key_id", ""),
        "pool": payload.get("pool", ""),
        "model": payload.get("model", ""),
        "provider": payload.get("provider", ""),
        "kind": payload.get("kind", "") if inference else name,
        "outcome": name.removeprefix("inference.") if inference else payload.get("outcome", ""),
    }


async def page_through(stub: Stub, request: audit_pb2.ListEntriesRequest) -> list[int]:
    """Every page of a query, newest page first: the seqs, oldest first, checked on the way."""
    pages: list[list[int]] = []
    cursor = ""
    while True:
        request.cursor = cursor
        reply = await stub.ListEntries(request)
        seqs = [e.seq for e in reply.entries]
        assert seqs == sorted(seqs) and len(seqs) <= (request.limit or 100)
        assert reply.chain_valid, reply.verify_error
        pages.append(seqs)
        if not reply.next_cursor:
            break
        assert len(seqs) == (request.limit or 100)
        cursor = reply.next_cursor
    found = [seq for page in reversed(pages) for seq in page]
    assert found == sorted(set(found))  # no entry twice, none out of order
    return found


async def test_filters_and_paging_over_thousands_of_entries(stub: Stub, audit_log: AuditLog, clock: Clock) -> None:
    rng = random.Random(7)
    written: list[dict[str, Any]] = []
    for start in range(1, 3001, 100):
        written += await audit_log.append_batch([event(i, rng) for i in range(start, start + 100)])
        clock.now += 1_000
    assert len(segment_files(audit_log.directory)) > 3  # the pages cross segments
    rows = {e["seq"]: fields(e) for e in written}

    def expected(**want: Any) -> list[int]:
        since, until = want.pop("since_ms", 0), want.pop("until_ms", 0)
        if "request_id" in want:
            want["event_id"] = want.pop("request_id")
        return [
            seq
            for seq, row in rows.items()
            if all(row[k] == v for k, v in want.items())
            and (not since or row["ts_ms"] >= since)
            and (not until or row["ts_ms"] < until)
        ]

    t0 = written[0]["ts_ms"]
    cases: list[dict[str, Any]] = [
        {},
        {"key_id": "key_3"},
        {"pool": "team-b"},
        {"model": "claude"},
        {"provider": "openai"},
        {"kind": "embedding"},
        {"kind": "budget.reset"},
        {"kind": "admin.key.revoked"},
        {"outcome": "failed"},
        {"outcome": "denied"},
        {"request_id": "req-1234"},
        {"event_id": "req-77"},
        {"request_id": next(row["event_id"] for row in rows.values() if row["kind"] == "budget.reset")},
        {"since_ms": t0 + 10_000, "until_ms": t0 + 13_000},
        {"key_id": "key_1", "model": "smollm2", "outcome": "completed"},
        {"pool": "org", "kind": "chat", "since_ms": t0 + 25_000},
    ]
    for case in cases:
        want = expected(**dict(case))
        for limit in (0, 37):
            found = await page_through(stub, audit_pb2.ListEntriesRequest(limit=limit, **case))
            assert found == want, (case, limit)
        first = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1, **case))
        assert first.total == len(want), case

    # A cursor belongs to its filters.
    reply = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=5, pool="org"))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=5, pool="team-a", cursor=reply.next_cursor))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cursors_are_stable_under_concurrent_appends(stub: Stub, audit_log: AuditLog) -> None:
    rng = random.Random(3)
    for start in range(1, 2001, 100):
        await audit_log.append_batch([event(i, rng) for i in range(start, start + 100)])
    request = audit_pb2.ListEntriesRequest(limit=50, model="gpt-4o-mini")
    baseline = await page_through(stub, audit_pb2.ListEntriesRequest(limit=50, model="gpt-4o-mini"))

    found: list[list[int]] = []
    appender_seq = 2001

    async def append_more() -> None:
        nonlocal appender_seq
        for _ in range(20):
            await audit_log.append_batch([event(i, rng) for i in range(appender_seq, appender_seq + 25)])
            appender_seq += 25
            await asyncio.sleep(0)

    cursor = ""
    appender = asyncio.create_task(append_more())
    while True:
        request.cursor = cursor
        reply = await stub.ListEntries(request)
        found.append([e.seq for e in reply.entries])
        if not reply.next_cursor:
            break
        cursor = reply.next_cursor
    await appender
    pages = [seq for page in reversed(found) for seq in page]
    # The first page may include entries appended before it was read; every later page
    # continues exactly where the previous one ended: no gap, no repeat.
    assert pages[: len(baseline)] == baseline
    assert pages == sorted(set(pages))


async def test_admin_actions_are_listed_by_kind(stub: Stub, audit_log: AuditLog) -> None:
    await audit_log.append_batch(
        [
            NewEntry("adm-1", "hoosh.admin.key.created", 1, {"key_id": "key_new", "actor_key_id": "key_admin"}),
            NewEntry("adm-2", "hoosh.admin.pool.resized", 2, {"pool": "team-a", "outcome": "ok"}),
            NewEntry("nats:3", "hoosh.admin.config.reloaded", 3, {"data_base64": "AAE="}),
        ]
    )
    reply = await stub.ListEntries(audit_pb2.ListEntriesRequest(kind="admin.pool.resized"))
    assert [e.event_id for e in reply.entries] == ["adm-2"]
    reply = await stub.ListEntries(audit_pb2.ListEntriesRequest(pool="team-a", outcome="ok"))
    assert [e.event_id for e in reply.entries] == ["adm-2"]
    reply = await stub.ListEntries(audit_pb2.ListEntriesRequest(key_id="key_new"))
    assert [e.event_id for e in reply.entries] == ["adm-1"]


# -- the chain's state in each reply -------------------------------------------------------


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    names: list[str] = []
    real = log_module.scan_segment

    def recording(fd: int, name: str, *args: object, **kwargs: object) -> object:
        names.append(name)
        return real(fd, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(log_module, "scan_segment", recording)
    return names


async def test_queries_never_read_the_log_again(stub: Stub, audit_log: AuditLog, scans: list[str]) -> None:
    rng = random.Random(5)
    for start in range(1, 1501, 100):
        await audit_log.append_batch([event(i, rng) for i in range(start, start + 100)])
    assert len(segment_files(audit_log.directory)) > 2
    for _ in range(10):
        reply = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=20))
        assert reply.chain_valid
        await audit_log.append_batch([event(reply.head_seq + 1, rng)])
    assert scans == []


async def fill_in_batches(audit_log: AuditLog, n: int) -> None:
    for start in range(1, n + 1, 100):
        await audit_log.append_batch(
            [NewEntry(f"req-{i}", "hoosh.inference.completed", i, {"model": "m"}) for i in range(start, start + 100)]
        )


async def test_a_byte_edited_behind_the_services_back_and_restored(stub: Stub, audit_log: AuditLog) -> None:
    await fill_in_batches(audit_log, 3000)
    assert len(segment_files(audit_log.directory)) > 2
    head = audit_log.directory / "audit.jsonl"
    original = head.read_bytes()
    assert (await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1))).chain_valid
    first_seq = json.loads(original.split(b"\n", 1)[0])["seq"]
    position = original.index(b'"model"') + 9  # in the head's first entry, far outside the page
    head.write_bytes(original[:position] + bytes([original[position] ^ 0x01]) + original[position + 1 :])
    reply = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1))
    assert not reply.chain_valid
    assert reply.first_bad_seq == first_seq and audit_log.head_segment in reply.verify_error
    head.write_bytes(original)
    assert (await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1))).chain_valid


async def test_a_sealed_segment_edited_deleted_or_added(stub: Stub, audit_log: AuditLog, tmp_path: Path) -> None:
    await fill_in_batches(audit_log, 3000)
    files = segment_files(audit_log.directory)
    path, line = where(audit_log.directory, 100)
    original = path.read_bytes()

    def drop(lines: list[bytes]) -> list[bytes]:
        return lines[:line] + lines[line + 1 :]

    rewrite_lines(path, drop)
    reply = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1))
    assert (reply.chain_valid, reply.first_bad_seq) == (False, 100)
    path.write_bytes(original)
    assert (await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1))).chain_valid

    victim = files[1]
    kept = tmp_path / victim.name
    os.rename(victim, kept)
    reply = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1))
    first, last = int(files[1].name[4:16]), int(files[2].name[4:16]) - 1
    assert not reply.chain_valid and f"entries {first}..{last} missing" in reply.verify_error
    verified = await stub.Verify(audit_pb2.VerifyRequest())
    assert (verified.valid, verified.missing_from, verified.missing_to) == (False, first, last)
    os.rename(kept, victim)
    assert (await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1))).chain_valid

    stray = audit_log.directory / "seg-000000900000.jsonl"
    stray.write_bytes(b"")
    reply = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1))
    assert not reply.chain_valid and "did not write" in reply.verify_error
    stray.unlink()
    assert (await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1))).chain_valid


async def test_the_head_cut_short_is_named(stub: Stub, audit_log: AuditLog) -> None:
    await fill(audit_log, 50)
    head = audit_log.directory / audit_log.head_segment
    rewrite_lines(head, lambda lines: lines[:-3])
    reply = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=1))
    assert not reply.chain_valid and "entries 48..50 missing" in reply.verify_error


async def test_a_page_entry_that_does_not_verify_is_named(stub: Stub, audit_log: AuditLog) -> None:
    await fill(audit_log, 10)
    page = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=10))
    assert page.entries[0].prev_mac == GENESIS_MAC
    verified = await stub.Verify(audit_pb2.VerifyRequest(full=True))
    assert (verified.valid, verified.entries) == (True, 10)

    head = audit_log.directory / audit_log.head_segment
    data = bytearray(head.read_bytes())
    third = data.index(b'"seq":3')
    data[third + 6] = ord("9")
    head.write_bytes(bytes(data))
    listed = await stub.ListEntries(audit_pb2.ListEntriesRequest())
    assert not listed.chain_valid and listed.first_bad_seq == 3
    verified = await stub.Verify(audit_pb2.VerifyRequest(full=True))
    assert (verified.valid, verified.entries, verified.first_bad_seq) == (False, 2, 3)
    assert verified.segment == audit_log.head_segment
