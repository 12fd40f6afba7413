"""The HMAC chain: appends, offline verification, tamper detection, crash recovery."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hoosh_audit.chain import GENESIS_MAC, AuditLog, NewEntry, canonical, compute_mac, verify
from hoosh_audit.errors import AuditLogCorrupt


def _entries(n: int, start: int = 1) -> list[NewEntry]:
    return [
        NewEntry(
            event_id=f"req-{i}",
            subject="hoosh.inference.completed",
            stream_seq=i,
            payload={"request_id": f"req-{i}", "model": "smol", "cost_usd": 0.25 * i, "note": "été ✓"},
        )
        for i in range(start, start + n)
    ]


async def test_append_writes_a_linked_chain(log_path: Path, key: bytes) -> None:
    audit_log = await AuditLog.open(log_path, key)
    await audit_log.append_batch(_entries(3))
    await audit_log.append_batch(_entries(2, start=4))
    audit_log.close()

    lines = log_path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    entries = [json.loads(line) for line in lines[:-1]]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert [e["stream_seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0]["prev"] == GENESIS_MAC
    for before, after in itertools.pairwise(entries):
        assert after["prev"] == before["mac"]
    for line, entry in zip(lines[:-1], entries, strict=True):
        assert canonical(entry) == line
        body = {k: v for k, v in entry.items() if k != "mac"}
        assert compute_mac(key, body) == entry["mac"]
    assert entries[0]["payload"]["note"] == "été ✓"
    assert verify(log_path, key) == (True, 5, 0, "")


async def test_reopen_continues_the_chain(log_path: Path, key: bytes) -> None:
    first = await AuditLog.open(log_path, key)
    await first.append_batch(_entries(2))
    first.close()

    second = await AuditLog.open(log_path, key)
    assert (second.last_seq, second.last_stream_seq) == (2, 2)
    await second.append_batch(_entries(1, start=3))
    second.close()
    assert verify(log_path, key) == (True, 3, 0, "")


async def test_every_flipped_byte_fails_verification(log_path: Path, key: bytes) -> None:
    audit_log = await AuditLog.open(log_path, key)
    await audit_log.append_batch(_entries(3))
    audit_log.close()
    original = log_path.read_bytes()
    assert verify(log_path, key).valid

    for position in range(len(original)):
        for flip in (0x01, 0x20):
            tampered = bytearray(original)
            tampered[position] ^= flip
            log_path.write_bytes(bytes(tampered))
            result = verify(log_path, key)
            assert not result.valid, f"flip {flip:#x} at byte {position} went unnoticed"
            assert result.first_bad_seq >= 1
            assert result.error


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda lines: [lines[0], lines[2], lines[3]], id="line removed"),
        pytest.param(lambda lines: [lines[1], lines[0], lines[2], lines[3]], id="lines swapped"),
        pytest.param(lambda lines: [lines[0], lines[0], lines[1], lines[2], lines[3]], id="line repeated"),
        pytest.param(lambda lines: [lines[0].replace(b":", b": ", 1), *lines[1:]], id="space added"),
        pytest.param(lambda lines: [lines[0], b"", *lines[1:]], id="blank line"),
    ],
)
async def test_structural_edits_fail_verification(log_path: Path, key: bytes, edit) -> None:
    audit_log = await AuditLog.open(log_path, key)
    await audit_log.append_batch(_entries(4))
    audit_log.close()
    lines = log_path.read_bytes().split(b"\n")[:-1]
    log_path.write_bytes(b"\n".join(edit(lines)) + b"\n")
    assert not verify(log_path, key).valid


async def test_a_rewritten_entry_with_a_fresh_mac_needs_the_key(log_path: Path, key: bytes) -> None:
    audit_log = await AuditLog.open(log_path, key)
    await audit_log.append_batch(_entries(3))
    audit_log.close()
    lines = log_path.read_bytes().split(b"\n")[:-1]
    forged = json.loads(lines[1])
    forged["payload"]["cost_usd"] = 0.0
    body = {k: v for k, v in forged.items() if k != "mac"}
    forged["mac"] = compute_mac(b"attacker-key", body)
    log_path.write_bytes(b"\n".join([lines[0], canonical(forged), lines[2]]) + b"\n")

    result = verify(log_path, key)
    assert (result.valid, result.count, result.first_bad_seq) == (False, 1, 2)
    assert "mac" in result.error
    assert not verify(log_path, b"another key").valid


async def test_missing_file_is_an_empty_valid_chain(tmp_path: Path, key: bytes) -> None:
    assert verify(tmp_path / "nope.jsonl", key) == (True, 0, 0, "")


async def test_partial_trailing_line_is_truncated_on_open(tmp_path: Path, log_path: Path, key: bytes) -> None:
    # The bytes a crash in the middle of a batch leaves: whole lines, then half of one.
    full = await AuditLog.open(tmp_path / "full.jsonl", key)
    await full.append_batch(_entries(2))
    await full.append_batch(_entries(2, start=3))
    full.close()
    lines = (tmp_path / "full.jsonl").read_bytes().split(b"\n")[:-1]
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:40])

    result = verify(log_path, key)
    assert (result.valid, result.count, result.first_bad_seq) == (False, 3, 4)
    assert "incomplete" in result.error

    reopened = await AuditLog.open(log_path, key)
    assert log_path.read_bytes() == b"\n".join(lines[:3]) + b"\n"
    assert (reopened.last_seq, reopened.last_stream_seq, reopened.last_mac) == (3, 3, json.loads(lines[2])["mac"])
    await reopened.append_batch(_entries(1, start=4))
    reopened.close()
    assert verify(log_path, key) == (True, 4, 0, "")


async def test_a_partial_first_line_leaves_an_empty_log(log_path: Path, key: bytes) -> None:
    log_path.parent.mkdir(parents=True)
    log_path.write_bytes(b'{"event_id":"req-1","mac":"ab')
    reopened = await AuditLog.open(log_path, key)
    assert log_path.read_bytes() == b""
    assert (reopened.last_seq, reopened.last_mac) == (0, GENESIS_MAC)
    await reopened.append_batch(_entries(1))
    reopened.close()
    assert verify(log_path, key) == (True, 1, 0, "")


async def test_unreadable_last_entry_refuses_to_open(log_path: Path, key: bytes) -> None:
    audit_log = await AuditLog.open(log_path, key)
    await audit_log.append_batch(_entries(1))
    audit_log.close()
    log_path.write_bytes(log_path.read_bytes() + b"not json\n")
    with pytest.raises(AuditLogCorrupt, match="cannot be read"):
        await AuditLog.open(log_path, key)


async def test_wrong_key_refuses_to_open(log_path: Path, key: bytes) -> None:
    audit_log = await AuditLog.open(log_path, key)
    await audit_log.append_batch(_entries(1))
    audit_log.close()
    with pytest.raises(AuditLogCorrupt, match="HOOSH_AUDIT_HMAC_KEY"):
        await AuditLog.open(log_path, b"some other key")


async def test_recent_returns_the_last_entries_oldest_first(log_path: Path, key: bytes) -> None:
    audit_log = await AuditLog.open(log_path, key)
    await audit_log.append_batch(_entries(10))
    await audit_log.append_batch([NewEntry("req-3", "hoosh.inference.failed", 11, {"request_id": "req-3"})])

    assert [e["seq"] for e in await audit_log.recent(3)] == [9, 10, 11]
    assert [e["seq"] for e in await audit_log.recent(100)] == list(range(1, 12))
    assert [e["seq"] for e in await audit_log.recent(100, event_id="req-3")] == [3, 11]
    assert [e["seq"] for e in await audit_log.recent(1, event_id="req-3")] == [11]
    assert await audit_log.recent(5, event_id="unknown") == []
    assert await audit_log.recent(0) == []
    result = await audit_log.verify()
    assert result == (True, 11, 0, "")
    audit_log.close()


def test_a_failed_write_leaves_no_partial_batch(log_path: Path, key: bytes) -> None:
    # A real short write: the file-size limit (RLIMIT_FSIZE) stops the batch half-way.
    # It runs in a child process so the limit cannot touch pytest's own files.
    script = textwrap.dedent(
        """
        import resource, signal, sys
        from hoosh_audit.chain import AuditLog, NewEntry
        from hoosh_audit.errors import AuditWriteError

        path, key = sys.argv[1], sys.argv[2].encode()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log = AuditLog(path, key)
        log.append_batch_sync([NewEntry("a", "s", 1, {"x": 1})])
        committed = log.committed_size
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (committed + 300, hard))
        big = [NewEntry(f"b{i}", "s", 2 + i, {"pad": "x" * 100}) for i in range(10)]
        try:
            log.append_batch_sync(big)
        except AuditWriteError:
            pass
        else:
            sys.exit("the write should have failed")
        assert log.last_seq == 1, log.last_seq
        assert open(path, "rb").seek(0, 2) == committed
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        log.append_batch_sync(big)
        assert log.last_seq == 11
        log.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(log_path), key.decode()], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert verify(log_path, key) == (True, 11, 0, "")
