"""The audit log: an append-only JSON Lines file whose entries are chained by
HMAC-SHA256.

Each line is the canonical JSON (sorted keys, no spaces, UTF-8) of

    {"seq", "ts_ms", "event_id", "subject", "stream_seq", "payload", "prev", "mac"}

where ``mac = HMAC-SHA256(key, canonical JSON of the entry without "mac")`` and
``prev`` is the previous entry's mac (64 zeros for the first). Because the line must
be byte-for-byte the canonical form, any edited byte breaks either the JSON, the
canonical form, the mac, or the link to the next entry. Removing entries from the
end cannot be detected from the file alone (no chain can); compare ``seq``/``mac``
with a copy kept elsewhere for that.

No framework imports: the consumer and the gRPC servicer use this module, and so
does the offline ``verify`` command.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from hoosh_audit.errors import AuditLogCorrupt, AuditWriteError

log = logging.getLogger(__name__)

GENESIS_MAC = "0" * 64
ENTRY_KEYS = frozenset({"seq", "ts_ms", "event_id", "subject", "stream_seq", "payload", "prev", "mac"})
_READ_CHUNK = 1 << 16


@dataclass(frozen=True, slots=True)
class NewEntry:
    """What the caller supplies for one entry; the log adds seq, ts_ms, prev and mac."""

    event_id: str
    subject: str
    stream_seq: int
    payload: dict[str, Any]


class VerifyResult(NamedTuple):
    valid: bool
    count: int  # entries that verified (all of them when valid)
    first_bad_seq: int  # 0 when valid
    error: str  # "" when valid


def canonical(obj: dict[str, Any]) -> bytes:
    """The one serialization that is MACed and written."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def compute_mac(key: bytes, entry_without_mac: dict[str, Any]) -> str:
    return hmac.new(key, canonical(entry_without_mac), hashlib.sha256).hexdigest()


def _check_line(line: bytes, key: bytes, expected_seq: int, expected_prev: str) -> tuple[dict[str, Any], str]:
    """Parse and check one line; returns (entry, "") or ({}, reason)."""
    try:
        entry = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return {}, f"line is not valid JSON: {exc}"
    if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
        return {}, "entry does not have exactly the expected fields"
    if (
        type(entry["seq"]) is not int
        or type(entry["ts_ms"]) is not int
        or type(entry["stream_seq"]) is not int
        or not isinstance(entry["event_id"], str)
        or not isinstance(entry["subject"], str)
        or not isinstance(entry["payload"], dict)
        or not isinstance(entry["prev"], str)
        or not isinstance(entry["mac"], str)
    ):
        return {}, "entry field has the wrong type"
    if canonical(entry) != line:
        return {}, "line is not in canonical form (edited)"
    if entry["seq"] != expected_seq:
        return {}, f"sequence gap: expected seq {expected_seq}, found {entry['seq']}"
    if entry["prev"] != expected_prev:
        return {}, "prev does not match the previous entry's mac (chain broken)"
    body = {k: v for k, v in entry.items() if k != "mac"}
    if not hmac.compare_digest(compute_mac(key, body), entry["mac"]):
        return {}, "mac mismatch (entry edited or wrong key)"
    return entry, ""


def verify(path: str | os.PathLike[str], key: bytes, *, size: int | None = None) -> VerifyResult:
    """Walk the whole file and check every entry and link; read at most ``size`` bytes.

    A missing file is an empty, valid chain. A last line without its newline (a crash
    mid-write, not yet recovered by opening the log) makes the file invalid.
    """
    expected_prev = GENESIS_MAC
    count = 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return VerifyResult(True, 0, 0, "")
    with f:
        remaining = size
        buf = b""
        while True:
            want = _READ_CHUNK if remaining is None else min(_READ_CHUNK, remaining)
            chunk = f.read(want) if want > 0 else b""
            if remaining is not None:
                remaining -= len(chunk)
            if not chunk:
                break
            buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop()
            for line in lines:
                entry, error = _check_line(line, key, count + 1, expected_prev)
                if error:
                    return VerifyResult(False, count, count + 1, error)
                expected_prev = entry["mac"]
                count += 1
        if buf:
            return VerifyResult(False, count, count + 1, "last line is incomplete (no trailing newline)")
    return VerifyResult(True, count, 0, "")


def _iter_lines_backwards(fd: int, end: int) -> Iterator[bytes]:
    """Complete lines of the file before offset ``end``, last first (without newlines)."""
    pos = end
    tail = b""
    while pos > 0:
        step = min(_READ_CHUNK, pos)
        pos -= step
        chunk = os.pread(fd, step, pos)
        parts = (chunk + tail).split(b"\n")
        tail = parts[0]
        for line in reversed(parts[1:]):
            if line:
                yield line
    if tail:
        yield tail


class AuditLog:
    """The writer (and reader) of one audit file.

    Opening recovers from a crash: a trailing partial line is truncated (its events were
    never acked and will be redelivered) and the last seq, mac and stream sequence are
    loaded. The constructor does blocking I/O; use ``await AuditLog.open(...)`` from
    async code. One process writes a file; concurrent readers (``recent``, ``verify``)
    see only committed (fsynced) entries.
    """

    def __init__(self, path: str | os.PathLike[str], key: bytes) -> None:
        if not key:
            raise ValueError("the HMAC key must not be empty")
        self.path = Path(path)
        self._key = key
        self._lock = threading.Lock()  # guards the tail state and the fd between threads
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            if created:
                self._fsync_dir()
            self._size = 0
            self._seq = 0
            self._mac = GENESIS_MAC
            self._stream_seq = 0
            self._dirty = False  # bytes past _size may exist after a failed write
            self._recover()
        except BaseException:
            os.close(self._fd)
            raise

    @classmethod
    async def open(cls, path: str | os.PathLike[str], key: bytes) -> AuditLog:
        """Open (and recover) the log without blocking the event loop."""
        return await asyncio.to_thread(cls, path, key)

    # -- state -----------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """Number of committed entries (seq of the last one)."""
        return self._seq

    @property
    def last_mac(self) -> str:
        return self._mac

    @property
    def last_stream_seq(self) -> int:
        """JetStream sequence of the last committed entry (0 when empty)."""
        return self._stream_seq

    @property
    def committed_size(self) -> int:
        return self._size

    # -- recovery --------------------------------------------------------------------

    def _fsync_dir(self) -> None:
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _recover(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        # Find the end of the last complete line.
        end = 0
        pos = size
        while pos > 0:
            step = min(_READ_CHUNK, pos)
            pos -= step
            nl = os.pread(self._fd, step, pos).rfind(b"\n")
            if nl >= 0:
                end = pos + nl + 1
                break
        if end != size:
            log.warning(
                "truncating a partial last line left by a crash",
                extra={"file": str(self.path), "bytes": size - end},
            )
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        self._size = end
        if end == 0:
            return
        last = next(_iter_lines_backwards(self._fd, end), b"")
        try:
            entry = json.loads(last.decode("utf-8"))
            body = {k: v for k, v in entry.items() if k != "mac"}
            mac_ok = hmac.compare_digest(compute_mac(self._key, body), entry["mac"])
            seq, mac, stream_seq = int(entry["seq"]), str(entry["mac"]), int(entry["stream_seq"])
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AuditLogCorrupt(
                f"{self.path}: the last entry cannot be read ({exc}); run `python -m hoosh_audit verify`"
            ) from exc
        if not mac_ok:
            raise AuditLogCorrupt(
                f"{self.path}: the last entry's mac does not match: wrong HOOSH_AUDIT_HMAC_KEY, "
                "or the file was edited (run `python -m hoosh_audit verify`)"
            )
        self._seq, self._mac, self._stream_seq = seq, mac, stream_seq

    # -- writing ---------------------------------------------------------------------

    def append_batch_sync(self, entries: Sequence[NewEntry]) -> list[dict[str, Any]]:
        """Append, flush and fsync every entry; return them as written. Blocking.

        Either the whole batch is durable when this returns, or it raises
        ``AuditWriteError`` and the file is cut back to its last committed size, so a
        retry never leaves a partial batch in the chain.
        """
        if not entries:
            return []
        with self._lock:
            if self._dirty:
                self._rollback()
            ts_ms = time.time_ns() // 1_000_000
            seq, prev = self._seq, self._mac
            written: list[dict[str, Any]] = []
            lines: list[bytes] = []
            for item in entries:
                seq += 1
                entry: dict[str, Any] = {
                    "seq": seq,
                    "ts_ms": ts_ms,
                    "event_id": item.event_id,
                    "subject": item.subject,
                    "stream_seq": item.stream_seq,
                    "payload": item.payload,
                    "prev": prev,
                }
                entry["mac"] = prev = compute_mac(self._key, entry)
                lines.append(canonical(entry))
                written.append(entry)
            data = b"\n".join(lines) + b"\n"
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self._fd, view)
                    view = view[n:]
                os.fsync(self._fd)
            except OSError as exc:
                self._dirty = True
                try:
                    self._rollback()
                except OSError:
                    log.exception("could not cut the audit file back after a failed write")
                raise AuditWriteError(f"writing {len(entries)} audit entries failed: {exc}") from exc
            self._size += len(data)
            self._seq, self._mac = seq, prev
            self._stream_seq = entries[-1].stream_seq
            return written

    def _rollback(self) -> None:
        # Cut back to the last committed byte; after a failed fsync the page cache may
        # hold pages the kernel will never write, so the batch is written again whole.
        os.ftruncate(self._fd, self._size)
        os.fsync(self._fd)
        self._dirty = False

    async def append_batch(self, entries: Sequence[NewEntry]) -> list[dict[str, Any]]:
        """``append_batch_sync`` off the event loop: returns once the batch is fsynced."""
        return await asyncio.to_thread(self.append_batch_sync, entries)

    # -- reading ---------------------------------------------------------------------

    def recent_sync(self, limit: int, event_id: str | None = None) -> list[dict[str, Any]]:
        """The last ``limit`` committed entries (only ``event_id``'s when given), oldest
        first. Unreadable lines are skipped here; ``verify`` reports them."""
        found, _ = self._scan(limit, event_id, None, count_all=False)
        return found

    async def recent(self, limit: int, event_id: str | None = None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.recent_sync, limit, event_id)

    def matching_sync(
        self, limit: int, *, key_id: str, event_id: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """The last ``limit`` committed entries whose event carries ``key_id`` (and is
        ``event_id``'s when given), oldest first, and how many entries match in all.

        Reads the whole file to count (as ``verify`` does)."""
        return self._scan(limit, event_id, key_id, count_all=True)

    async def matching(
        self, limit: int, *, key_id: str, event_id: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        return await asyncio.to_thread(self.matching_sync, limit, key_id=key_id, event_id=event_id)

    def _scan(
        self, limit: int, event_id: str | None, key_id: str | None, *, count_all: bool
    ) -> tuple[list[dict[str, Any]], int]:
        """Walk the committed entries last first: the first ``limit`` matches (returned
        oldest first) and the number of matches (all of them with ``count_all``)."""
        if limit <= 0 and not count_all:
            return [], 0
        with self._lock:
            end = self._size
        found: list[dict[str, Any]] = []
        matches = 0
        for line in _iter_lines_backwards(self._fd, end):
            try:
                entry = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if not isinstance(entry, dict):
                continue
            if event_id is not None and entry.get("event_id") != event_id:
                continue
            if key_id is not None:
                payload = entry.get("payload")
                if not isinstance(payload, dict) or payload.get("key_id") != key_id:
                    continue
            matches += 1
            if len(found) < limit:
                found.append(entry)
                if len(found) >= limit and not count_all:
                    break
        found.reverse()
        return found, matches

    def verify_sync(self) -> VerifyResult:
        """Verify the committed part of the file (a write in progress is not seen)."""
        with self._lock:
            end = self._size
        return verify(self.path, self._key, size=end)

    async def verify(self) -> VerifyResult:
        return await asyncio.to_thread(self.verify_sync)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
