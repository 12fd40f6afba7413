"""Segments: rotation by size and time, the chain across them, recovery, the index,
and what the writer verifies when it opens the log."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from hoosh_audit import log as log_module
from hoosh_audit.chain import GENESIS_MAC, canonical, compute_mac
from hoosh_audit.errors import LogBehindCheckpoint
from hoosh_audit.index import Filters
from hoosh_audit.keys import Keyring
from hoosh_audit.log import AuditLog
from hoosh_audit.verification import verify_log

from .helpers import entries, read_entries, segment_files, where


def open_log(log_dir: Path, keyring: Keyring, **options: object) -> AuditLog:
    return AuditLog(log_dir, keyring, segment_max_bytes=3000, **options)  # about 7 entries a segment


def fill(audit_log: AuditLog, n: int, batch: int = 3) -> None:
    start = audit_log.last_seq + 1
    for first in range(start, start + n, batch):
        audit_log.append_batch_sync(entries(min(batch, start + n - first), start=first))


@pytest.fixture
def scanned(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The segments the log reads through (instrumentation of the log's own scan)."""
    names: list[str] = []
    real = log_module.scan_segment

    def recording(fd: int, name: str, *args: object, **kwargs: object) -> object:
        names.append(name)
        return real(fd, name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(log_module, "scan_segment", recording)
    return names


def test_segments_rotate_by_size_and_the_chain_goes_on(log_dir: Path, log_path: Path, keyring: Keyring) -> None:
    audit_log = open_log(log_dir, keyring)
    fill(audit_log, 40)
    assert audit_log.integrity_sync().valid
    audit_log.close()

    files = segment_files(log_dir)
    assert len(files) >= 5
    previous_mac = GENESIS_MAC
    expected_seq = 1
    for path in files:
        assert path.stat().st_size <= 3000
        found = [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]
        assert path.name == f"seg-{found[0]['seq']:012d}.jsonl"  # named after its first entry
        assert found[0]["prev"] == previous_mac  # linked to the previous segment's last mac
        assert [e["seq"] for e in found] == list(range(expected_seq, expected_seq + len(found)))
        previous_mac, expected_seq = found[-1]["mac"], found[-1]["seq"] + 1
    assert expected_seq == 41
    assert log_path.resolve() == files[-1]
    report = verify_log(log_dir, keyring)
    assert (report.valid, report.entries, report.segments, report.head_segment) == (
        True,
        40,
        len(files),
        files[-1].name,
    )


def test_segments_rotate_by_age(log_dir: Path, keyring: Keyring) -> None:
    now = [1_000_000]
    audit_log = AuditLog(log_dir, keyring, segment_max_age_s=60, clock_ms=lambda: now[0])
    audit_log.append_batch_sync(entries(2))
    now[0] += 59_000
    audit_log.append_batch_sync(entries(2, start=3))  # the head's first entry is 59 s old: no rotation
    assert [p.name for p in segment_files(log_dir)] == ["seg-000000000001.jsonl"]
    now[0] += 1_000
    audit_log.append_batch_sync(entries(2, start=5))  # 60 s: a new segment first
    audit_log.close()
    assert [p.name for p in segment_files(log_dir)] == ["seg-000000000001.jsonl", "seg-000000000005.jsonl"]

    # The age survives a restart: it is the first entry's time.
    reopened = AuditLog(log_dir, keyring, segment_max_age_s=60, clock_ms=lambda: now[0])
    now[0] += 60_000
    reopened.append_batch_sync(entries(1, start=7))
    reopened.close()
    assert [p.name for p in segment_files(log_dir)][-1] == "seg-000000000007.jsonl"
    assert verify_log(log_dir, keyring).short() == (True, 7, 0, "")


def test_a_crash_right_after_a_new_segment_was_created(log_dir: Path, keyring: Keyring) -> None:
    audit_log = open_log(log_dir, keyring)
    fill(audit_log, 5)
    audit_log.close()
    # The rotation's first step made it to disk, the batch never did.
    (log_dir / "seg-000000000006.jsonl").touch()
    reopened = open_log(log_dir, keyring)
    assert (reopened.last_seq, reopened.head_segment) == (5, "seg-000000000006.jsonl")
    fill(reopened, 3)
    reopened.close()
    assert [e["seq"] for e in read_entries(log_dir)] == list(range(1, 9))
    assert verify_log(log_dir, keyring).short() == (True, 8, 0, "")


def test_a_log_from_before_segments_is_moved_into_the_first_one(
    log_dir: Path, log_path: Path, key: bytes, keyring: Keyring
) -> None:
    # The old format: no key id, one audit.jsonl.
    log_dir.mkdir()
    prev, lines = GENESIS_MAC, []
    for i in range(1, 4):
        entry = {"seq": i, "ts_ms": 1000 + i, "event_id": f"old-{i}", "subject": "hoosh.inference.completed"}
        entry |= {"stream_seq": i, "payload": {"i": i}, "prev": prev}
        entry["mac"] = prev = compute_mac(key, entry)
        lines.append(canonical(entry))
    log_path.write_bytes(b"\n".join(lines) + b"\n")

    audit_log = open_log(log_dir, keyring)
    assert audit_log.last_seq == 3
    fill(audit_log, 10)
    audit_log.close()
    assert log_path.is_symlink()
    assert (log_dir / "seg-000000000001.jsonl").read_bytes().startswith(b"\n".join(lines))
    found = read_entries(log_dir)
    assert ["kid" in e for e in found] == [False] * 3 + [True] * 10
    assert verify_log(log_dir, keyring).short() == (True, 13, 0, "")


def test_an_entry_without_a_key_id_after_one_with_it_fails(log_dir: Path, key: bytes, keyring: Keyring) -> None:
    audit_log = open_log(log_dir, keyring)
    fill(audit_log, 3)
    audit_log.close()
    segment = segment_files(log_dir)[0]
    lines = segment.read_bytes().split(b"\n")[:-1]
    downgraded = json.loads(lines[2])
    del downgraded["kid"]
    del downgraded["mac"]
    downgraded["mac"] = compute_mac(key, downgraded)
    segment.write_bytes(b"\n".join([*lines[:2], canonical(downgraded)]) + b"\n")
    report = verify_log(log_dir, keyring)
    assert (report.valid, report.first_bad_seq) == (False, 3)
    assert "no key id" in report.error


@pytest.mark.parametrize("damage", ["deleted", "garbage", "other schema"])
def test_a_missing_or_broken_index_is_rebuilt(log_dir: Path, keyring: Keyring, damage: str) -> None:
    audit_log = open_log(log_dir, keyring)
    fill(audit_log, 30)
    audit_log.close()
    index = log_dir / "index.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(f"{index}{suffix}").unlink(missing_ok=True)
    if damage == "deleted":
        index.unlink()
    elif damage == "garbage":
        index.write_bytes(b"this is not a database" * 100)
    else:
        with sqlite3.connect(index) as db:
            db.execute("UPDATE meta SET v = '0' WHERE k = 'version'")

    reopened = open_log(log_dir, keyring)
    page = reopened.query_sync(Filters(), limit=1000)
    assert [e["seq"] for e in page.entries] == list(range(1, 31))
    assert page.problem is None and page.total == 30
    reopened.close()


def test_an_index_behind_the_log_catches_up(log_dir: Path, keyring: Keyring) -> None:
    audit_log = open_log(log_dir, keyring)
    fill(audit_log, 30)
    audit_log.close()
    with sqlite3.connect(log_dir / "index.sqlite3") as db:
        db.execute("DELETE FROM entries WHERE seq > 12")  # e.g. a crash before the index write
        last_mac = next(e["mac"] for e in read_entries(log_dir) if e["seq"] == 12)
        db.execute("UPDATE meta SET v = ? WHERE k = 'last_mac'", (last_mac,))
    reopened = open_log(log_dir, keyring)
    assert [e["seq"] for e in reopened.query_sync(Filters(), limit=1000).entries] == list(range(1, 31))
    reopened.close()


def test_an_index_that_does_not_match_the_log_is_rebuilt(log_dir: Path, keyring: Keyring) -> None:
    audit_log = open_log(log_dir, keyring)
    fill(audit_log, 10)
    audit_log.close()
    with sqlite3.connect(log_dir / "index.sqlite3") as db:
        db.execute("UPDATE meta SET v = ? WHERE k = 'last_mac'", ("f" * 64,))
    reopened = open_log(log_dir, keyring)
    assert [e["seq"] for e in reopened.query_sync(Filters(), limit=100).entries] == list(range(1, 11))
    reopened.close()


def test_opening_reads_only_from_the_checkpoint(log_dir: Path, keyring: Keyring, scanned: list[str]) -> None:
    audit_log = open_log(log_dir, keyring)
    fill(audit_log, 40)
    checkpoint = audit_log.checkpoint()
    fill(audit_log, 2)  # written after the checkpoint (a crash before it was stored)
    audit_log.close()
    files = [p.name for p in segment_files(log_dir)]
    assert checkpoint is not None and checkpoint.segment in files[-2:]

    scanned.clear()
    reopened = open_log(log_dir, keyring, checkpoint=checkpoint)
    assert scanned == files[files.index(checkpoint.segment) :]  # from the checkpoint's segment on
    assert reopened.integrity_sync().valid
    reopened.close()

    # A sealed segment changed on disk since it was verified is read again: here only
    # its times changed, so it still verifies.
    os.utime(log_dir / files[1], ns=(1, 1))
    scanned.clear()
    reopened = open_log(log_dir, keyring, checkpoint=checkpoint)
    assert scanned[0] == files[1] and files[0] not in scanned
    assert reopened.integrity_sync().valid
    reopened.close()

    # Without a checkpoint (first start, Redis away) everything is read.
    scanned.clear()
    open_log(log_dir, keyring).close()
    assert scanned == files


def test_a_segment_edited_while_the_service_was_down_is_found_on_open(log_dir: Path, keyring: Keyring) -> None:
    audit_log = open_log(log_dir, keyring)
    fill(audit_log, 40)
    checkpoint = audit_log.checkpoint()
    audit_log.close()
    path, _line = where(log_dir, 10)
    data = path.read_bytes().replace(b'"cost_usd":2.5', b'"cost_usd":0.5')
    path.write_bytes(data)

    reopened = open_log(log_dir, keyring, checkpoint=checkpoint)
    integrity = reopened.integrity_sync()
    assert (integrity.valid, integrity.problem and integrity.problem.seq) == (False, 10)
    assert integrity.problem is not None and integrity.problem.segment == path.name
    fill(reopened, 2)  # still records
    assert reopened.last_seq == 42
    reopened.close()


def test_a_log_behind_its_checkpoint_refuses_to_open(log_dir: Path, keyring: Keyring) -> None:
    audit_log = open_log(log_dir, keyring)
    fill(audit_log, 40)
    checkpoint = audit_log.checkpoint()
    audit_log.close()
    head = segment_files(log_dir)[-1]
    lines = head.read_bytes().split(b"\n")[:-1]
    head.write_bytes(b"".join(line + b"\n" for line in lines[:-3]))

    with pytest.raises(LogBehindCheckpoint, match=r"entries 38\.\.40 are missing") as caught:
        open_log(log_dir, keyring, checkpoint=checkpoint)
    assert (caught.value.missing_from, caught.value.missing_to) == (38, 40)


def test_the_head_deleted_while_open_goes_on_in_a_new_segment(log_dir: Path, keyring: Keyring) -> None:
    audit_log = open_log(log_dir, keyring)
    fill(audit_log, 9)
    head = log_dir / audit_log.head_segment
    first, last = json.loads(head.read_bytes().split(b"\n")[0])["seq"], audit_log.last_seq
    head.unlink()
    fill(audit_log, 3)
    assert audit_log.head_segment == f"seg-{last + 1:012d}.jsonl"
    integrity = audit_log.integrity_sync()
    assert integrity.problem is not None
    assert (integrity.problem.missing_from, integrity.problem.missing_to) == (first, last)
    audit_log.close()
    report = verify_log(log_dir, keyring)
    assert report.problem is not None
    assert (report.problem.missing_from, report.problem.missing_to) == (first, last)
