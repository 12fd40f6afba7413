"""`hoosh audit verify`: the files, the key(s) and the last checkpoint are enough to
find every kind of damage, and the report names the place each time."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hoosh_audit.chain import canonical
from hoosh_audit.checkpoint import Checkpoint, CheckpointStore
from hoosh_audit.keys import Keyring, key_fingerprint
from hoosh_audit.log import AuditLog
from hoosh_audit.verification import verify_log

from .conftest import REDIS_URL
from .helpers import entries, rewrite_lines, segment_files, where

N = 45


@dataclass
class Log:
    dir: Path
    checkpoint: Checkpoint
    checkpoint_key: str
    key: bytes


def build(directory: Path, keyring: Keyring, n: int = N, *, start: int = 1) -> Checkpoint:
    audit_log = AuditLog(directory, keyring, segment_max_bytes=3000)
    for first in range(start, start + n, 4):
        audit_log.append_batch_sync(entries(min(4, start + n - first), start=first))
    checkpoint = audit_log.checkpoint()
    audit_log.close()
    assert checkpoint is not None
    return checkpoint


@pytest.fixture
async def written(log_dir: Path, key: bytes, keyring: Keyring, store: CheckpointStore) -> Log:
    checkpoint = await asyncio.to_thread(build, log_dir, keyring)
    await store.write(checkpoint)
    assert len(segment_files(log_dir)) >= 5
    return Log(log_dir, checkpoint, store.key, key)


def hoosh_verify(log: Log, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    """`hoosh audit verify` as a user runs it (a real process), checkpoint from Redis."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("HOOSH_")}
    environment.update(env if env is not None else {"HOOSH_AUDIT_HMAC_KEY": log.key.decode()})
    command = [sys.executable, "-m", "hoosh_cli", "audit", "verify", str(log.dir), *args]
    if not any(a.startswith("--checkpoint") or a == "--no-checkpoint" for a in args):
        command += ["--redis-url", REDIS_URL, "--checkpoint-key", log.checkpoint_key]
    # Outside the repository: a `hoosh up` there leaves .hoosh/audit.key, which the
    # command would take as the key when none is given.
    done = subprocess.run(command, env=environment, cwd=log.dir.parent, capture_output=True, text=True, check=False)
    report = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, report, done.stderr


async def run(log: Log, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any], str]:
    return await asyncio.to_thread(hoosh_verify, log, *args, env=env)


async def test_an_intact_log_verifies(written: Log) -> None:
    code, report, stderr = await run(written)
    assert code == 0, stderr
    assert report["valid"] is True
    assert (report["entries"], report["head_seq"], report["first_bad_seq"]) == (N, N, 0)
    assert report["checkpoint_checked"] is True
    assert report["checkpoint"]["seq"] == N
    assert report["segments"] == len(segment_files(written.dir))


async def test_one_flipped_byte_is_named(written: Log) -> None:
    path, line = where(written.dir, 17)
    data = bytearray(path.read_bytes())
    at = [i for i, b in enumerate(data) if b == ord("\n")][line - 1] + 1 if line else 0
    at = data.index(b'"model":"smol"', at) + 10
    data[at] ^= 0x01
    path.write_bytes(bytes(data))

    code, report, _ = await run(written)
    assert code == 1 and report["valid"] is False
    assert report["problem"]["segment"] == path.name
    assert (report["problem"]["seq"], report["problem"]["line"]) == (17, line + 1)
    assert "mac mismatch" in report["error"]


async def test_two_swapped_entries_are_named(written: Log) -> None:
    path, line = where(written.dir, 10)
    _, other = where(written.dir, 11)
    assert other == line + 1  # the same segment

    def swap(lines: list[bytes]) -> list[bytes]:
        lines[line], lines[line + 1] = lines[line + 1], lines[line]
        return lines

    rewrite_lines(path, swap)
    code, report, _ = await run(written)
    assert code == 1
    assert (report["problem"]["segment"], report["problem"]["seq"]) == (path.name, 10)
    assert "expected seq 10, found 11" in report["error"]


async def test_the_last_three_entries_cut_off_are_named(written: Log) -> None:
    head = segment_files(written.dir)[-1]
    rewrite_lines(head, lambda lines: lines[:-3])
    assert await asyncio.to_thread(
        lambda: verify_log(written.dir, Keyring.single(written.key)).valid
    )  # alone it looks fine

    code, report, _ = await run(written)
    assert code == 1
    problem = report["problem"]
    assert (problem["missing_from"], problem["missing_to"], problem["seq"]) == (N - 2, N, N - 2)
    assert "the checkpoint" in problem["error"]
    assert f"entries {N - 2}..{N} missing" in report["error"]


async def test_one_deleted_segment_is_named(written: Log) -> None:
    files = segment_files(written.dir)
    victim = files[2]
    first = int(victim.name[4:16])
    last = int(files[3].name[4:16]) - 1
    victim.unlink()

    code, report, _ = await run(written)
    assert code == 1
    problem = report["problem"]
    assert (problem["missing_from"], problem["missing_to"]) == (first, last)
    assert files[1].name in problem["error"]


async def test_the_deleted_head_segment_is_named(written: Log) -> None:
    files = segment_files(written.dir)
    first = int(files[-1].name[4:16])
    files[-1].unlink()
    code, report, _ = await run(written)
    assert code == 1
    assert (report["problem"]["missing_from"], report["problem"]["missing_to"]) == (first, N)


async def test_an_entry_spliced_in_from_another_log_with_the_same_key_is_named(
    written: Log, tmp_path: Path, keyring: Keyring
) -> None:
    # Another log, same key, same events: entry 12 is valid on its own (MAC, seq, key id)
    # and differs only in what it links to. Only the prev link gives it away.
    other_dir = tmp_path / "other"
    await asyncio.to_thread(build, other_dir, keyring, 12)
    other_path, other_line = where(other_dir, 12)
    stranger = other_path.read_bytes().split(b"\n")[other_line]
    path, line = where(written.dir, 12)
    original = path.read_bytes().split(b"\n")[line]
    assert stranger != original and json.loads(stranger)["seq"] == 12

    def splice(lines: list[bytes]) -> list[bytes]:
        lines[line] = stranger
        return lines

    rewrite_lines(path, splice)
    code, report, _ = await run(written)
    assert code == 1
    assert (report["problem"]["segment"], report["problem"]["seq"]) == (path.name, 12)
    assert "prev does not match" in report["error"]


async def test_a_whole_deleted_log_is_named(written: Log) -> None:
    shutil.rmtree(written.dir)
    code, report, _ = await run(written)
    assert code == 1
    assert (report["problem"]["missing_from"], report["problem"]["missing_to"]) == (1, N)
    assert "the log is empty" in report["error"]


async def test_the_checkpoint_from_a_file_or_as_json(written: Log, tmp_path: Path) -> None:
    saved = tmp_path / "checkpoint.json"
    saved.write_text(written.checkpoint.to_json())
    assert (await run(written, "--checkpoint", str(saved)))[0] == 0
    assert (await run(written, "--checkpoint", written.checkpoint.to_json()))[0] == 0

    head = segment_files(written.dir)[-1]
    rewrite_lines(head, lambda lines: lines[:-1])
    code, report, _ = await run(written, "--checkpoint", str(saved))
    assert code == 1 and report["problem"]["missing_from"] == N
    # Without a checkpoint the cut is invisible: which is why it is required unless waived.
    code, report, _ = await run(written, "--no-checkpoint")
    assert code == 0 and report["checkpoint_checked"] is False
    assert "cannot be detected" in report["warnings"][-1]


async def test_a_forged_checkpoint_is_refused(written: Log) -> None:
    forged = json.loads(written.checkpoint.to_json())
    forged["seq"] = 3  # hide the tail
    code, report, _ = await run(written, "--checkpoint", json.dumps(forged))
    assert code == 1 and "signature does not match" in report["error"]


async def test_no_checkpoint_in_redis_is_an_error_unless_waived(written: Log) -> None:
    code, _, stderr = await run(
        written, "--redis-url", REDIS_URL, "--checkpoint-key", written.checkpoint_key + ":nothing-here"
    )
    assert code == 2 and "no checkpoint" in stderr
    code, _, stderr = await run(written, env={})
    assert code == 2 and "no key" in stderr


async def test_python_m_hoosh_audit_verify_still_works(written: Log) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOSH_")}
    env["HOOSH_AUDIT_HMAC_KEY"] = written.key.decode()
    env["HOOSH_REDIS_URL"] = REDIS_URL
    command = [sys.executable, "-m", "hoosh_audit", "verify", "--file", str(written.dir / "audit.jsonl")]
    done = await asyncio.to_thread(
        subprocess.run,
        [*command, "--checkpoint-key", written.checkpoint_key],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["entries"] == N


# -- key rotation -------------------------------------------------------------------------


async def test_entries_of_the_old_and_the_new_key_verify(log_dir: Path, store: CheckpointStore) -> None:
    old, new = b"old-key-0123456789abcdef", b"new-key-0123456789abcdef"
    await asyncio.to_thread(build, log_dir, Keyring({"2024": old}, "2024"), 10)
    rotated = Keyring({"2024": old, "2025": new}, "2025")
    checkpoint = await asyncio.to_thread(build, log_dir, rotated, 10, start=11)
    assert checkpoint.kid == "2025"
    await store.write(checkpoint)
    kids = [json.loads(line)["kid"] for path in segment_files(log_dir) for line in path.read_bytes().splitlines()]
    assert kids == ["2024"] * 10 + ["2025"] * 10

    log = Log(log_dir, checkpoint, store.key, new)
    keys = {"HOOSH_AUDIT_HMAC_KEYS": json.dumps({"2024": old.decode(), "2025": new.decode()})}
    code, report, stderr = await run(log, env=keys)
    assert code == 0, stderr
    assert report["entries"] == 20

    # Only the new key: the first old entry is signed by an unknown key id.
    code, report, _ = await run(log, env={"HOOSH_AUDIT_HMAC_KEYS": json.dumps({"2025": new.decode()})})
    assert code == 1
    assert report["problem"]["seq"] == 1 and "unknown key id '2024'" in report["error"]

    # The service opens it with both keys and goes on signing with the new one.
    audit_log = await AuditLog.open(log_dir, rotated, checkpoint=checkpoint)
    assert (await audit_log.integrity()).valid
    audit_log.close()


async def test_an_entry_with_an_unknown_key_id_fails(written: Log, keyring: Keyring) -> None:
    path, line = where(written.dir, 20)

    def resign(lines: list[bytes]) -> list[bytes]:
        entry = json.loads(lines[line])
        entry["kid"] = "nobody"
        del entry["mac"]
        import hashlib
        import hmac

        entry["mac"] = hmac.new(b"a key nobody configured", canonical(entry), hashlib.sha256).hexdigest()
        lines[line] = canonical(entry)
        return lines

    rewrite_lines(path, resign)
    code, report, _ = await run(written)
    assert code == 1
    assert (report["problem"]["segment"], report["problem"]["seq"]) == (path.name, 20)
    assert "unknown key id 'nobody'" in report["error"]


async def test_keys_from_a_file_and_fingerprint_ids(written: Log, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps([written.key.decode()]))  # no ids: fingerprints
    assert key_fingerprint(written.key) == written.checkpoint.kid
    code, report, stderr = await run(written, "--keys-file", str(keys_file), env={})
    assert code == 0, stderr
    assert report["valid"] is True
