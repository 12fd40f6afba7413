"""AuditService over a real in-process grpc.aio server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from hoosh.audit.v1 import audit_pb2, audit_pb2_grpc
from hoosh_audit.chain import GENESIS_MAC, AuditLog, NewEntry
from hoosh_audit.server import AuditServicer
from hoosh_common.grpc_server import insecure_channel, new_server


@pytest.fixture
async def audit_log(log_path: Path, key: bytes) -> AsyncIterator[AuditLog]:
    log = await AuditLog.open(log_path, key)
    yield log
    log.close()


@pytest.fixture
async def stub(audit_log: AuditLog) -> AsyncIterator[audit_pb2_grpc.AuditServiceStub]:
    server = new_server()
    audit_pb2_grpc.add_AuditServiceServicer_to_server(AuditServicer(audit_log), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = insecure_channel(f"127.0.0.1:{port}")
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


async def test_list_entries_defaults_to_the_last_100(stub, audit_log) -> None:
    await fill(audit_log, 120)
    response = await stub.ListEntries(audit_pb2.ListEntriesRequest())
    assert response.total == 120
    assert response.chain_valid and response.verify_error == ""
    assert [e.seq for e in response.entries] == list(range(21, 121))
    last = response.entries[-1]
    assert (last.event_id, last.subject, last.stream_seq) == ("req-20", "hoosh.inference.completed", 120)
    assert json.loads(last.payload_json) == {"request_id": "req-20", "model": "m", "note": "ü"}
    assert last.prev_mac == response.entries[-2].mac
    assert len(last.mac) == 64 and last.timestamp_ms > 0


async def test_list_entries_limit_and_event_filter(stub, audit_log) -> None:
    await fill(audit_log, 120)
    two = await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=2))
    assert [e.seq for e in two.entries] == [119, 120]
    one_request = await stub.ListEntries(audit_pb2.ListEntriesRequest(event_id="req-7"))
    assert [e.seq for e in one_request.entries] == [7, 57, 107]
    assert one_request.total == 120
    none = await stub.ListEntries(audit_pb2.ListEntriesRequest(event_id="nobody"))
    assert list(none.entries) == []


async def test_list_entries_for_one_key(stub, audit_log) -> None:
    # Entries of two keys, one without a key (the edge ran open) and one whose payload is
    # not an event: only the asked key's come back, and total counts them.
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


async def test_negative_limit_is_invalid(stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=-1))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_empty_log(stub) -> None:
    response = await stub.ListEntries(audit_pb2.ListEntriesRequest())
    assert (response.total, response.chain_valid, list(response.entries)) == (0, True, [])
    verified = await stub.Verify(audit_pb2.VerifyRequest())
    assert (verified.valid, verified.entries, verified.first_bad_seq) == (True, 0, 0)


async def test_verify_reads_the_file_for_real(stub, audit_log, log_path: Path) -> None:
    await fill(audit_log, 5)
    verified = await stub.Verify(audit_pb2.VerifyRequest())
    assert (verified.valid, verified.entries, verified.first_bad_seq, verified.error) == (True, 5, 0, "")
    first = (await stub.ListEntries(audit_pb2.ListEntriesRequest(limit=5))).entries[0]
    assert first.prev_mac == GENESIS_MAC

    # Edit one byte of entry 3 behind the service's back.
    data = bytearray(log_path.read_bytes())
    third = data.index(b'"seq":3')
    data[third + 6] = ord("9")
    log_path.write_bytes(bytes(data))

    verified = await stub.Verify(audit_pb2.VerifyRequest())
    assert (verified.valid, verified.entries, verified.first_bad_seq) == (False, 2, 3)
    assert verified.error
    listed = await stub.ListEntries(audit_pb2.ListEntriesRequest())
    assert not listed.chain_valid
    assert listed.verify_error == verified.error
