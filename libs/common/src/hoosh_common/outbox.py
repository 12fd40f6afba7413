"""A bounded, crash-safe local outbox for events that NATS could not take.

``EventPublisher`` hands an event to the outbox only when JetStream did not ack it
(NATS away, the stream full or leaderless, the ack timed out after the quick
retries); the normal publish path never touches the disk. The publisher's drainer
then publishes the entries, oldest first, and removes each one only after its ack.

Layout of the directory (one per process: a volume of its own under Kubernetes,
e.g. a StatefulSet's ``volumeClaimTemplates``, so that a restarted pod finds it):

- ``<seq>-<count>.seg``: a segment of ``count`` entries, written together. ``seq``
  only grows, so the names sort in publish order. Each entry is one record:
  ``MAGIC | header length (u32) | data length (u32) | header (JSON: subject, event
  id, NATS headers, first attempt, maybe_stored) | data (the serialized event) |
  CRC32 of the record``.
- ``.tmp-<seq>``: a segment being written. Every write goes to a temp file, which
  is fsynced, renamed to its final name, and the directory is fsynced (once for all
  the segments of one write) before ``put`` returns. So a segment is either
  complete or absent; a temp file left by a crash was never reported as stored and
  is deleted when the outbox is opened. Entries that arrive while a write is on the
  disk form the next write, and a write waits ``linger`` (20 ms) for more to come
  unless a segment's worth waits already: one fsync pair per group, at most ~50 a
  second, not one per event (a file fsync plus a directory fsync cost ~0.9 ms of CPU
  on a VM disk; spread over a group, a few µs per event).
- When the drainer has published some entries of a segment but not all, the rest
  are written as ``<seq>-<fewer>.seg`` (temp, fsync, rename) before the old file is
  deleted; if a crash leaves both, the one with fewer entries is kept at open.
- ``rejected/``: entries JetStream refused for good (a bad request, a payload over
  the server's limit), and ``<seq>.damaged``: the bytes of a segment from the first
  record that does not check out. Kept, never deleted: an operator inspects them and
  may move a ``.seg`` back to have it published again.
- ``.lock``: an exclusive ``flock`` held while a process has the outbox open, so two
  processes never drain one directory (the kernel releases it when a process dies,
  even by SIGKILL).

Bounds: ``max_entries`` and ``max_bytes`` (the sum of the segment files). An entry
that does not fit is refused with ``OutboxFullError``: nothing is dropped to make
room. ``healthy`` turns false at ``high_water`` (90 % by default) of either bound
or after a failed write, which is the signal for a service to stop admitting
requests (503) while the remaining room absorbs the events of requests already in
flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import struct
import time
import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

log = logging.getLogger(__name__)

MAGIC = b"HOOSHOB1"
SEGMENT_SUFFIX = ".seg"
DAMAGED_SUFFIX = ".damaged"
TEMP_PREFIX = ".tmp-"
LOCK_NAME = ".lock"
REJECTED_DIR = "rejected"
_LENGTHS = struct.Struct(">II")
_CRC = struct.Struct(">I")
_FIXED = len(MAGIC) + _LENGTHS.size

DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_HIGH_WATER = 0.9
DEFAULT_LINGER = 0.02
MAX_SEGMENT_ENTRIES = 256
MAX_SEGMENT_BYTES = 1024 * 1024


class OutboxError(Exception):
    """Base of the outbox's errors."""


class OutboxFullError(OutboxError):
    """The entry does not fit within ``max_entries`` / ``max_bytes``."""


class OutboxWriteError(OutboxError):
    """The entry could not be made durable (a disk error); it is not in the outbox."""


class OutboxLockedError(OutboxError):
    """Another process holds the outbox directory."""


class CorruptEntryError(OutboxError):
    """A record whose bytes do not check out (bad magic, lengths or CRC)."""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One event waiting to be published.

    ``headers`` are the NATS headers of the first try (``Nats-Msg-Id`` = the event
    id, the trace context, the request id), so a later publish is the same message.
    ``maybe_stored`` is true when an earlier try timed out waiting for its ack (or
    was cut short): JetStream may hold the event already, and only its duplicate
    window (from ``first_attempt_ms``) or the consumer's own check by event id keeps
    it single.
    """

    subject: str
    event_id: str
    data: bytes
    headers: dict[str, str]
    first_attempt_ms: int
    maybe_stored: bool = False

    def encode(self) -> bytes:
        """The entry as one self-checking record."""
        header = orjson.dumps(
            {
                "subject": self.subject,
                "event_id": self.event_id,
                "headers": self.headers,
                "first_attempt_ms": self.first_attempt_ms,
                "maybe_stored": self.maybe_stored,
            }
        )
        body = MAGIC + _LENGTHS.pack(len(header), len(self.data)) + header + self.data
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, blob: bytes) -> OutboxEntry:
        """Parse exactly one record; raises ``CorruptEntryError``."""
        entry, end = cls._decode_at(blob, 0)
        if end != len(blob):
            raise CorruptEntryError("trailing bytes after the record")
        return entry

    @classmethod
    def decode_many(cls, blob: bytes) -> tuple[list[OutboxEntry], int, str | None]:
        """Parse consecutive records: the entries, the offset where parsing stopped
        (``len(blob)`` when all checked out) and why it stopped early."""
        entries: list[OutboxEntry] = []
        offset = 0
        while offset < len(blob):
            try:
                entry, offset_after = cls._decode_at(blob, offset)
            except CorruptEntryError as exc:
                return entries, offset, str(exc)
            entries.append(entry)
            offset = offset_after
        return entries, offset, None

    @classmethod
    def _decode_at(cls, blob: bytes, start: int) -> tuple[OutboxEntry, int]:
        if len(blob) - start < _FIXED + _CRC.size or blob[start : start + len(MAGIC)] != MAGIC:
            raise CorruptEntryError("bad magic or too short")
        header_len, data_len = _LENGTHS.unpack_from(blob, start + len(MAGIC))
        end = start + _FIXED + header_len + data_len
        if end + _CRC.size > len(blob):
            raise CorruptEntryError("record runs past the end of the file")
        (crc,) = _CRC.unpack_from(blob, end)
        if zlib.crc32(blob[start:end]) != crc:
            raise CorruptEntryError("CRC mismatch")
        header_start = start + _FIXED
        try:
            header = orjson.loads(blob[header_start : header_start + header_len])
            entry = cls(
                subject=str(header["subject"]),
                event_id=str(header["event_id"]),
                data=blob[header_start + header_len : end],
                headers={str(k): str(v) for k, v in dict(header["headers"]).items()},
                first_attempt_ms=int(header["first_attempt_ms"]),
                maybe_stored=bool(header.get("maybe_stored", False)),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptEntryError(f"bad header: {exc!r}") from exc
        return entry, end + _CRC.size


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment file as the index knows it (its bytes stay on disk)."""

    seq: int
    count: int
    size: int
    stored_at: float  # wall clock (time.time()) when it became durable

    @property
    def name(self) -> str:
        return segment_name(self.seq, self.count)


@dataclass(frozen=True, slots=True)
class SegmentContent:
    """A segment's entries as read back; ``damaged`` says why its bytes from
    ``damaged_at`` on could not be read (those bytes are set aside on settle)."""

    segment: Segment
    entries: list[OutboxEntry]
    damaged: str | None = None
    damaged_at: int = 0


@dataclass(frozen=True, slots=True)
class OutboxDepth:
    """What health endpoints report: how much waits, and whether there is room."""

    entries: int
    bytes: int
    oldest_age_s: float
    max_entries: int
    max_bytes: int
    rejected: int
    full: bool
    healthy: bool
    write_failed: bool

    def as_dict(self) -> dict[str, int | float | bool]:
        return {
            "entries": self.entries,
            "bytes": self.bytes,
            "oldest_age_s": round(self.oldest_age_s, 3),
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
            "rejected": self.rejected,
            "full": self.full,
            "healthy": self.healthy,
            "write_failed": self.write_failed,
        }


@dataclass(slots=True)
class _Write:
    record: bytes
    done: asyncio.Future[None]
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.record)


def segment_name(seq: int, count: int) -> str:
    return f"{seq:020d}-{count:06d}{SEGMENT_SUFFIX}"


def parse_segment_name(name: str) -> tuple[int, int] | None:
    """(seq, count) from a segment's file name, or None for another file."""
    if not name.endswith(SEGMENT_SUFFIX):
        return None
    seq, _, count = name[: -len(SEGMENT_SUFFIX)].partition("-")
    if not (seq.isdigit() and count.isdigit()):
        return None
    return int(seq), int(count)


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(directory: Path, temp_name: str, final_name: str, chunks: Sequence[bytes]) -> None:
    """Temp file, write, fsync, rename (the caller fsyncs the directory)."""
    temp = directory / temp_name
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, directory / final_name)


class Outbox:
    """A directory of events waiting for NATS: bounded, fsynced, one owner at a time.

    ``open()`` takes the lock, deletes temp files a crash left, and indexes the
    segments an earlier process left (they are drained first). ``put`` returns once
    the entry is durable; ``head``/``read``/``settle`` serve the drainer; ``depth()``
    serves health. Entry bytes live only on disk: memory holds an index of
    (sequence, count, size, time) per segment.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        high_water: float = DEFAULT_HIGH_WATER,
        lock_timeout: float = 10.0,
        linger: float = DEFAULT_LINGER,
    ) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be >= 1")
        if not 0 < high_water <= 1:
            raise ValueError("high_water must be in (0, 1]")
        self.directory = Path(directory)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._high_water = high_water
        self._lock_timeout = lock_timeout
        if linger < 0:
            raise ValueError("linger must be >= 0")
        self._linger = linger
        self._lock_fd: int | None = None
        self._index: deque[Segment] = deque()
        self._entries = 0  # durable entries
        self._bytes = 0  # durable bytes
        self._queued: list[_Write] = []
        self._queued_bytes = 0
        self._writing = 0  # entries in the write that runs now
        self._writing_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._next_seq = 1
        self._rejected = 0
        self._write_failed = False

    # -- lifecycle -------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._lock_fd is not None

    async def open(self) -> None:
        """Create the directory if needed, take its lock, clean up and index it.

        Raises ``OutboxLockedError`` when another live process holds it after
        ``lock_timeout`` seconds (e.g. the previous pod still shutting down).
        """
        if self.is_open:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._lock_timeout
        while True:
            try:
                self._lock_fd = await asyncio.to_thread(self._lock)
                break
            except BlockingIOError:
                if loop.time() >= deadline:
                    raise OutboxLockedError(f"outbox {self.directory} is held by another process") from None
                await asyncio.sleep(0.1)
        try:
            segments, rejected, max_seq = await asyncio.to_thread(self._scan)
        except BaseException:
            self._unlock()
            raise
        self._index = deque(segments)
        self._entries = sum(s.count for s in segments)
        self._bytes = sum(s.size for s in segments)
        self._next_seq = max_seq + 1  # also past rejected ones: one moved back sorts first
        self._rejected = rejected
        if segments:
            log.warning(
                "outbox holds events from an earlier run; they are published first",
                extra={"outbox": str(self.directory), "entries": self._entries, "bytes": self._bytes},
            )

    async def close(self) -> None:
        """Finish the writes in progress, then release the lock."""
        await self.flush()
        self._unlock()

    def _lock(self) -> int:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _scan(self) -> tuple[list[Segment], int, int]:
        by_seq: dict[int, Segment] = {}
        changed = False
        max_seq = 0
        for path in self.directory.iterdir():
            if path.name.startswith(TEMP_PREFIX):
                # Never renamed, so never reported as stored: a crash mid-write.
                path.unlink(missing_ok=True)
                changed = True
                log.warning("outbox: removed a half-written segment", extra={"file": str(path)})
                continue
            parsed = parse_segment_name(path.name)
            if parsed is None:
                continue
            seq, count = parsed
            segment = Segment(seq=seq, count=count, size=path.stat().st_size, stored_at=path.stat().st_mtime)
            other = by_seq.get(seq)
            if other is not None:
                # A crash between writing what was left of a segment and deleting the
                # old one: the smaller is that remainder.
                stale, segment = (other, segment) if segment.count < other.count else (segment, other)
                (self.directory / stale.name).unlink(missing_ok=True)
                changed = True
            by_seq[seq] = segment
            max_seq = max(max_seq, seq)
        if changed:
            _fsync_dir(self.directory)
        rejected = 0
        rejected_dir = self.directory / REJECTED_DIR
        if rejected_dir.is_dir():
            for path in rejected_dir.iterdir():
                parsed = parse_segment_name(path.name)
                if parsed is not None:
                    rejected += parsed[1]
                    max_seq = max(max_seq, parsed[0])
                elif path.name.endswith(DAMAGED_SUFFIX):
                    rejected += 1
        return sorted(by_seq.values(), key=lambda s: s.seq), rejected, max_seq

    # -- writing ---------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Entries stored or being stored (what a new event would queue behind)."""
        return self._entries + len(self._queued) + self._writing

    @property
    def total_bytes(self) -> int:
        return self._bytes + self._queued_bytes + self._writing_bytes

    @property
    def full(self) -> bool:
        return self.count >= self.max_entries or self.total_bytes >= self.max_bytes

    @property
    def write_failed(self) -> bool:
        """The last write failed (a disk error); cleared by the next one that succeeds."""
        return self._write_failed

    @property
    def healthy(self) -> bool:
        """Room left below the high-water mark, and the last write succeeded."""
        return (
            not self._write_failed
            and self.count < self.max_entries * self._high_water
            and self.total_bytes < self.max_bytes * self._high_water
        )

    def put_nowait(self, entry: OutboxEntry) -> asyncio.Future[None]:
        """Queue ``entry`` for writing and return a future that resolves once it is
        durable (or fails with ``OutboxWriteError``).

        Raises ``OutboxFullError`` at once when it does not fit. The write goes on
        even if the caller stops waiting (a cancelled publish still lands here), and
        ``close()`` waits for it. Entries are stored in the order of these calls.
        """
        if not self.is_open:
            raise OutboxError("the outbox is not open")
        record = entry.encode()
        if self.count + 1 > self.max_entries or self.total_bytes + len(record) > self.max_bytes:
            raise OutboxFullError(
                f"outbox {self.directory} is full ({self.count} entries, {self.total_bytes} bytes; "
                f"limits {self.max_entries} entries, {self.max_bytes} bytes)"
            )
        write = _Write(record, asyncio.get_running_loop().create_future())
        # Retrieve a failure nobody awaits (a cancelled publish): no "never retrieved" noise.
        write.done.add_done_callback(_consume)
        self._queued.append(write)
        self._queued_bytes += write.size
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="outbox-writer")
        return write.done

    async def put(self, entry: OutboxEntry) -> None:
        """Store ``entry`` durably; raises ``OutboxFullError`` or ``OutboxWriteError``."""
        await asyncio.shield(self.put_nowait(entry))

    async def flush(self) -> None:
        """Wait until every queued write has finished (stored or failed)."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    async def _write_loop(self) -> None:
        # Group commit: whatever queued while one write was on the disk goes in the
        # next, as few segments as the size caps allow, with one directory fsync.
        while self._queued:
            if self._linger > 0 and len(self._queued) < MAX_SEGMENT_ENTRIES:
                await asyncio.sleep(self._linger)
            batch, self._queued = self._queued, []
            self._writing, self._writing_bytes = len(batch), sum(w.size for w in batch)
            self._queued_bytes -= self._writing_bytes
            groups = self._group(batch)
            first_seq = self._next_seq
            self._next_seq += len(groups)
            try:
                stored = await asyncio.to_thread(self._write_segments, first_seq, groups)
            except OSError as exc:
                self._write_failed = True
                log.error(
                    "outbox write failed",
                    extra={"outbox": str(self.directory), "entries": len(batch), "error": repr(exc)},
                )
                for write in batch:
                    if not write.done.done():
                        write.done.set_exception(OutboxWriteError(f"outbox write failed: {exc!r}"))
                continue
            finally:
                self._writing, self._writing_bytes = 0, 0
            self._write_failed = False
            for segment in stored:
                self._index.append(segment)
                self._entries += segment.count
                self._bytes += segment.size
            for write in batch:
                if not write.done.done():
                    write.done.set_result(None)

    @staticmethod
    def _group(batch: list[_Write]) -> list[list[_Write]]:
        groups: list[list[_Write]] = [[]]
        size = 0
        for write in batch:
            if groups[-1] and (len(groups[-1]) >= MAX_SEGMENT_ENTRIES or size + write.size > MAX_SEGMENT_BYTES):
                groups.append([])
                size = 0
            groups[-1].append(write)
            size += write.size
        return groups

    def _write_segments(self, first_seq: int, groups: list[list[_Write]]) -> list[Segment]:
        stored: list[Segment] = []
        try:
            for offset, group in enumerate(groups):
                seq = first_seq + offset
                segment = Segment(seq=seq, count=len(group), size=sum(w.size for w in group), stored_at=time.time())
                _write_durable(self.directory, f"{TEMP_PREFIX}{seq}", segment.name, [w.record for w in group])
                stored.append(segment)
            _fsync_dir(self.directory)
        except OSError:
            # All or nothing: none of them is reported stored, so none may stay behind
            # to be published next to the caller's own handling of the failure.
            for segment in stored:
                with contextlib.suppress(OSError):
                    (self.directory / segment.name).unlink()
            for offset in range(len(groups)):
                with contextlib.suppress(OSError):
                    (self.directory / f"{TEMP_PREFIX}{first_seq + offset}").unlink()
            raise
        return stored

    # -- draining --------------------------------------------------------------------

    def head(self, max_entries: int) -> list[Segment]:
        """The oldest durable segments, oldest first: at least one (if any), and more
        while their entries add up to at most ``max_entries``."""
        out: list[Segment] = []
        total = 0
        for segment in self._index:
            if out and total + segment.count > max_entries:
                break
            out.append(segment)
            total += segment.count
        return out

    async def read(self, segments: Iterable[Segment]) -> list[SegmentContent]:
        """Load the segments' entries (a damaged tail is reported, not raised)."""
        return await asyncio.to_thread(self._read_many, list(segments))

    def _read_many(self, segments: list[Segment]) -> list[SegmentContent]:
        out: list[SegmentContent] = []
        for segment in segments:
            try:
                blob = (self.directory / segment.name).read_bytes()
            except FileNotFoundError as exc:
                out.append(SegmentContent(segment, [], damaged=f"segment file vanished: {exc!r}"))
                continue
            entries, stopped_at, why = OutboxEntry.decode_many(blob)
            out.append(SegmentContent(segment, entries, damaged=why, damaged_at=stopped_at))
        return out

    async def settle(
        self, content: SegmentContent, remaining: Sequence[OutboxEntry], rejected: Sequence[OutboxEntry] = ()
    ) -> None:
        """Record the drainer's outcome for one segment: ``remaining`` (not yet
        published, in order) stay; ``rejected`` and a damaged tail move to
        ``rejected/``; everything else was acked and goes. A no-op when nothing
        changed."""
        segment = content.segment
        if content.damaged is None and not rejected and len(remaining) == segment.count:
            return
        records = [entry.encode() for entry in remaining]
        set_aside_seq = self._next_seq  # a fresh name in rejected/, never one already used
        self._next_seq += 1
        new = await asyncio.to_thread(self._settle, content, records, [e.encode() for e in rejected], set_aside_seq)
        for i, current in enumerate(self._index):
            if current.seq == segment.seq:
                if new is None:
                    del self._index[i]
                else:
                    self._index[i] = new
                break
        self._entries += (new.count if new else 0) - segment.count
        self._bytes += (new.size if new else 0) - segment.size
        set_aside = len(rejected) + (1 if content.damaged is not None else 0)
        if set_aside:
            self._rejected += set_aside
            log.error(
                "outbox entries set aside in rejected/ for an operator",
                extra={
                    "outbox": str(self.directory),
                    "segment": segment.seq,
                    "refused": [e.event_id for e in rejected][:20],
                    "damaged": content.damaged,
                },
            )

    def _settle(
        self, content: SegmentContent, records: list[bytes], rejected: list[bytes], set_aside_seq: int
    ) -> Segment | None:
        segment = content.segment
        source = self.directory / segment.name
        if rejected or content.damaged is not None:
            rejected_dir = self.directory / REJECTED_DIR
            rejected_dir.mkdir(exist_ok=True)
            temp = f"{TEMP_PREFIX}{set_aside_seq}"
            if rejected:
                _write_durable(rejected_dir, temp, segment_name(set_aside_seq, len(rejected)), rejected)
            if content.damaged is not None and source.exists():
                tail = source.read_bytes()[content.damaged_at :]
                _write_durable(rejected_dir, temp, f"{set_aside_seq:020d}{DAMAGED_SUFFIX}", [tail])
            _fsync_dir(rejected_dir)
        new: Segment | None = None
        if records:
            new = Segment(
                seq=segment.seq, count=len(records), size=sum(len(r) for r in records), stored_at=segment.stored_at
            )
            if new.name != segment.name or content.damaged is not None:
                _write_durable(self.directory, f"{TEMP_PREFIX}{segment.seq}", new.name, records)
        if new is None or new.name != segment.name:
            # Without the directory fsync a crash could bring acked entries back: they
            # would be published again, which the Nats-Msg-Id (or the consumer's check
            # by event id) absorbs.
            source.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        return new

    # -- health ----------------------------------------------------------------------

    def depth(self) -> OutboxDepth:
        """Entries, bytes and the oldest entry's age, with the bounds and health."""
        oldest = self._index[0].stored_at if self._index else None
        return OutboxDepth(
            entries=self.count,
            bytes=self.total_bytes,
            oldest_age_s=max(0.0, time.time() - oldest) if oldest is not None else 0.0,
            max_entries=self.max_entries,
            max_bytes=self.max_bytes,
            rejected=self._rejected,
            full=self.full,
            healthy=self.healthy,
            write_failed=self._write_failed,
        )
