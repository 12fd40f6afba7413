"""The entry format and the writer: appends, tamper detection, crash recovery."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hoosh_audit.chain import GENESIS_MAC, NewEntry, canonical, check_line, compute_mac, verify
from hoosh_audit.checkpoint import Checkpoint
from hoosh_audit.errors import AuditLogCorrupt
from hoosh_audit.keys import Keyring
from hoosh_audit.log import AuditLog
from hoosh_audit.verification import verify_log

from .helpers import entries, read_entries, segment_files


async def write_log(log_dir: Path, keyring: Keyring, n: int) -> Checkpoint:
    audit_log = await AuditLog.open(log_dir, keyring)
    await audit_log.append_batch(entries(n))
    checkpoint = audit_log.checkpoint()
    audit_log.close()
    assert checkpoint is not None
    return checkpoint


async def test_append_writes_a_linked_chain(log_dir: Path, log_path: Path, key: bytes, keyring: Keyring) -> None:
    audit_log = await AuditLog.open(log_dir, keyring)
    written = await audit_log.append_batch(entries(3))
    await audit_log.append_batch(entries(2, start=4))
    audit_log.close()

    assert [p.name for p in segment_files(log_dir)] == ["seg-000000000001.jsonl"]
    assert log_path.is_symlink() and log_path.resolve() == log_dir / "seg-000000000001.jsonl"
    lines = log_path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    found = [json.loads(line) for line in lines[:-1]]
    assert found[:3] == written
    assert [e["seq"] for e in found] == [1, 2, 3, 4, 5]
    assert [e["stream_seq"] for e in found] == [1, 2, 3, 4, 5]
    assert found[0]["prev"] == GENESIS_MAC
    assert {e["kid"] for e in found} == {keyring.current_id}
    for before, after in itertools.pairwise(found):
        assert after["prev"] == before["mac"]
        assert after["ts_ms"] >= before["ts_ms"]
    for line, entry in zip(lines[:-1], found, strict=True):
        assert canonical(entry) == line
        body = {k: v for k, v in entry.items() if k != "mac"}
        assert compute_mac(key, body) == entry["mac"]
    assert found[0]["payload"]["note"] == "été ✓"
    assert verify(log_path, key) == (True, 5, 0, "")
    assert verify(log_dir, key) == (True, 5, 0, "")


async def test_reopen_continues_the_chain(log_dir: Path, keyring: Keyring) -> None:
    first = await AuditLog.open(log_dir, keyring)
    await first.append_batch(entries(2))
    first.close()

    second = await AuditLog.open(log_dir, keyring)
    assert (second.last_seq, second.last_stream_seq) == (2, 2)
    await second.append_batch(entries(1, start=3))
    second.close()
    assert verify_log(log_dir, keyring).short() == (True, 3, 0, "")


async def test_every_flipped_byte_fails_verification(log_dir: Path, keyring: Keyring) -> None:
    checkpoint = await write_log(log_dir, keyring, 3)
    segment = segment_files(log_dir)[0]
    original = segment.read_bytes()
    assert verify_log(log_dir, keyring, checkpoint).valid

    for position in range(len(original)):
        for flip in (0x01, 0x20):
            tampered = bytearray(original)
            tampered[position] ^= flip
            segment.write_bytes(bytes(tampered))
            report = verify_log(log_dir, keyring, checkpoint)
            assert not report.valid, f"flip {flip:#x} at byte {position} went unnoticed"
            assert report.problem is not None and 1 <= report.problem.seq <= 3
            assert report.error


@pytest.mark.parametrize(
    ("edit", "bad_seq"),
    [
        pytest.param(lambda lines: [lines[0], lines[2], lines[3]], 2, id="line removed"),
        pytest.param(lambda lines: [lines[1], lines[0], lines[2], lines[3]], 1, id="lines swapped"),
        pytest.param(lambda lines: [lines[0], lines[0], lines[1], lines[2], lines[3]], 2, id="line repeated"),
        pytest.param(lambda lines: [lines[0].replace(b":", b": ", 1), *lines[1:]], 1, id="space added"),
        pytest.param(lambda lines: [lines[0], b"", *lines[1:]], 2, id="blank line"),
        pytest.param(lambda lines: lines[:3], 4, id="last line removed"),
    ],
)
async def test_structural_edits_fail_verification(log_dir: Path, keyring: Keyring, edit, bad_seq: int) -> None:
    checkpoint = await write_log(log_dir, keyring, 4)
    segment = segment_files(log_dir)[0]
    lines = segment.read_bytes().split(b"\n")[:-1]
    segment.write_bytes(b"\n".join(edit(lines)) + b"\n")
    report = verify_log(log_dir, keyring, checkpoint)
    assert not report.valid
    assert report.first_bad_seq == bad_seq, report.error


async def test_a_reordered_but_equal_entry_fails(log_dir: Path, keyring: Keyring) -> None:
    # The same JSON object with its members in another order: not the canonical bytes.
    checkpoint = await write_log(log_dir, keyring, 2)
    segment = segment_files(log_dir)[0]
    lines = segment.read_bytes().split(b"\n")[:-1]
    entry = json.loads(lines[0])
    mac = entry.pop("mac")
    moved = json.dumps({**entry, "mac": mac}, separators=(",", ":"), ensure_ascii=False).encode()
    assert json.loads(moved) == json.loads(lines[0]) and moved != lines[0]
    segment.write_bytes(moved + b"\n" + lines[1] + b"\n")
    report = verify_log(log_dir, keyring, checkpoint)
    assert (report.valid, report.first_bad_seq) == (False, 1)
    assert "canonical" in report.error


async def test_a_rewritten_entry_with_a_fresh_mac_needs_the_key(log_dir: Path, key: bytes, keyring: Keyring) -> None:
    await write_log(log_dir, keyring, 3)
    segment = segment_files(log_dir)[0]
    lines = segment.read_bytes().split(b"\n")[:-1]
    forged = json.loads(lines[1])
    forged["payload"]["cost_usd"] = 0.0
    body = {k: v for k, v in forged.items() if k != "mac"}
    forged["mac"] = compute_mac(b"attacker-key", body)
    segment.write_bytes(b"\n".join([lines[0], canonical(forged), lines[2]]) + b"\n")

    result = verify(log_dir, key)
    assert (result.valid, result.count, result.first_bad_seq) == (False, 1, 2)
    assert "mac" in result.error
    assert not verify(log_dir, b"another key").valid


def test_a_missing_directory_is_an_empty_valid_chain_without_a_checkpoint(tmp_path: Path, keyring: Keyring) -> None:
    assert verify_log(tmp_path / "nope", keyring).short() == (True, 0, 0, "")
    assert verify(tmp_path / "nope.jsonl", keyring) == (True, 0, 0, "")


async def test_partial_trailing_line_is_cut_off_on_open(log_dir: Path, keyring: Keyring) -> None:
    # The bytes a crash in the middle of a batch leaves: whole lines, then half of one.
    audit_log = await AuditLog.open(log_dir, keyring)
    await audit_log.append_batch(entries(2))
    checkpoint = audit_log.checkpoint()
    await audit_log.append_batch(entries(2, start=3))
    audit_log.close()
    segment = segment_files(log_dir)[0]
    lines = segment.read_bytes().split(b"\n")[:-1]
    segment.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:40])

    # Not acked, never checkpointed: a warning, not a broken chain.
    report = verify_log(log_dir, keyring, checkpoint)
    assert (report.valid, report.head_seq) == (True, 3)
    assert "half a line" in report.warnings[0]

    reopened = await AuditLog.open(log_dir, keyring, checkpoint=checkpoint)
    assert segment.read_bytes() == b"\n".join(lines[:3]) + b"\n"
    assert (reopened.last_seq, reopened.last_stream_seq, reopened.last_mac) == (3, 3, json.loads(lines[2])["mac"])
    await reopened.append_batch(entries(1, start=4))
    reopened.close()
    assert verify_log(log_dir, keyring).short() == (True, 4, 0, "")


async def test_a_partial_first_line_leaves_an_empty_log(log_dir: Path, keyring: Keyring) -> None:
    log_dir.mkdir(parents=True)
    segment = log_dir / "seg-000000000001.jsonl"
    segment.write_bytes(b'{"event_id":"req-1","mac":"ab')
    reopened = await AuditLog.open(log_dir, keyring)
    assert segment.read_bytes() == b""
    assert (reopened.last_seq, reopened.last_mac) == (0, GENESIS_MAC)
    await reopened.append_batch(entries(1))
    reopened.close()
    assert verify_log(log_dir, keyring).short() == (True, 1, 0, "")


async def test_unreadable_last_entry_refuses_to_open(log_dir: Path, keyring: Keyring) -> None:
    await write_log(log_dir, keyring, 1)
    segment = segment_files(log_dir)[0]
    segment.write_bytes(segment.read_bytes() + b"not json\n")
    with pytest.raises(AuditLogCorrupt, match="cannot be read"):
        await AuditLog.open(log_dir, keyring)


async def test_wrong_key_refuses_to_open(log_dir: Path, keyring: Keyring) -> None:
    await write_log(log_dir, keyring, 1)
    with pytest.raises(AuditLogCorrupt, match="HOOSH_AUDIT_HMAC_KEY"):
        await AuditLog.open(log_dir, Keyring.single(b"some other key"))
    # The same secret under another id is another key too.
    with pytest.raises(AuditLogCorrupt, match="unknown key id"):
        await AuditLog.open(log_dir, Keyring.single(keyring.current, "renamed"))


async def test_the_time_never_goes_back_along_the_log(log_dir: Path, keyring: Keyring) -> None:
    now = [5_000]
    audit_log = await AuditLog.open(log_dir, keyring, clock_ms=lambda: now[0])
    await audit_log.append_batch(entries(1))
    now[0] = 1_000  # the wall clock stepped back
    await audit_log.append_batch(entries(1, start=2))
    now[0] = 7_000
    await audit_log.append_batch(entries(1, start=3))
    audit_log.close()
    assert [e["ts_ms"] for e in read_entries(log_dir)] == [5_000, 5_000, 7_000]


def test_check_line_names_what_is_wrong(keyring: Keyring) -> None:
    from hoosh_audit.chain import seal

    entry, line = seal(keyring, seq=1, ts_ms=1, item=entries(1)[0], prev=GENESIS_MAC)
    assert canonical(entry) == line
    ok = dict(expected_seq=1, expected_prev=GENESIS_MAC, legacy_ok=False)
    assert check_line(line, keyring, **ok) == (entry, "")
    assert "sequence" in check_line(line, keyring, **{**ok, "expected_seq": 2})[1]
    assert "prev" in check_line(line, keyring, **{**ok, "expected_prev": "1" * 64})[1]
    assert "unknown key id" in check_line(line, Keyring.single(b"x" * 20, "other"), **ok)[1]
    assert "not valid JSON" in check_line(line[:-1], keyring, **ok)[1]


def test_a_failed_write_leaves_no_partial_batch(log_dir: Path, key: bytes, keyring: Keyring) -> None:
    # A real short write: the file-size limit (RLIMIT_FSIZE) stops the batch half-way.
    # It runs in a child process so the limit cannot touch pytest's own files.
    script = textwrap.dedent(
        """
        import resource, signal, sys
        from pathlib import Path
        from hoosh_audit.chain import NewEntry
        from hoosh_audit.errors import AuditWriteError
        from hoosh_audit.keys import Keyring
        from hoosh_audit.log import AuditLog

        directory, key = Path(sys.argv[1]), sys.argv[2].encode()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log = AuditLog(directory, Keyring.single(key))
        log.append_batch_sync([NewEntry("a", "s", 1, {"x": 1})])
        committed = log.committed_size
        segment = directory / log.head_segment
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
        assert segment.stat().st_size == committed
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        log.append_batch_sync(big)
        assert log.last_seq == 11
        log.close()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(log_dir), key.decode()], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert verify_log(log_dir, keyring).short() == (True, 11, 0, "")


async def test_appends_accept_new_entry_objects(log_dir: Path, keyring: Keyring) -> None:
    audit_log = await AuditLog.open(log_dir, keyring)
    written = await audit_log.append_batch([NewEntry("e", "hoosh.admin.key.created", 7, {"big": 2**80})])
    audit_log.close()
    assert written[0]["payload"] == {"big": 2**80}
    assert verify_log(log_dir, keyring).valid  # the standard parser takes what orjson refuses
