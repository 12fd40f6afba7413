"""The audit log: segment files of HMAC-chained entries, their index, and what the
service knows about their integrity without reading them again.

Writing. One process appends batches to the head segment: every batch is written and
fsynced before ``append_batch`` returns (the consumer acks only then). Before a batch
that would take the head past its size, or once its first entry is older than the
maximum age, a new segment is started (created, directory fsynced) and the chain goes
on in it: its first entry links to the previous segment's last mac.

Opening. A half-written last line (a crash mid-batch: never acked, so it will be
redelivered) is cut off, the tail is loaded, and the log is verified only from the
last checkpoint it trusts: the segments from the one holding the checkpointed entry
(or the head, or the first entry the index lacks, whichever comes first) are read
and verified; older sealed segments are trusted when their file signature (size,
mtime, ctime, inode) is the one recorded when they were last verified, and read
again otherwise. A log that ends before the checkpoint raises ``LogBehindCheckpoint``.

Integrity while running. The service produced every entry since it opened the log,
so its state is verified by construction. ``integrity()`` costs a few ``stat`` calls:
a segment whose signature changed behind the service's back (edited, cut, replaced,
deleted), or a new file among the segments, is read again and the result kept until
the file changes again. Pages read for queries are checked entry by entry (MAC, seq,
links between neighbours), which is cheap for one page.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hoosh_common.events import SUBJECT_PREFIX

from hoosh_audit import metrics
from hoosh_audit.chain import GENESIS_MAC, NewEntry, check_line, seal
from hoosh_audit.checkpoint import Checkpoint
from hoosh_audit.errors import AuditLogCorrupt, AuditWriteError, CheckpointError, LogBehindCheckpoint
from hoosh_audit.index import AuditIndex, Filters, IndexRow, Location, SegmentRecord, index_row
from hoosh_audit.keys import Keyring
from hoosh_audit.segments import (
    HEAD_LINK,
    FileSig,
    SegmentFile,
    complete_size,
    fsync_dir,
    last_line,
    legacy_log,
    list_segments,
    point_head_link,
    segment_name,
)
from hoosh_audit.verification import Problem, SegmentScan, VerifyReport, missing, scan_segment, verify_log

log = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite3"
DEFAULT_SEGMENT_MAX_BYTES = 64 << 20
DEFAULT_SEGMENT_MAX_AGE_S = 86_400.0
_INDEX_CHUNK = 20_000


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class SegmentState:
    """What the service knows about one segment."""

    first_seq: int
    name: str
    last_seq: int  # first_seq - 1 while empty
    first_prev: str  # the prev of its first entry (the previous segment's last mac)
    last_mac: str
    sig: FileSig
    problem: Problem | None = None

    @property
    def empty(self) -> bool:
        return self.last_seq < self.first_seq


@dataclass(frozen=True, slots=True)
class Integrity:
    """The chain's state as the service knows it, without reading the log again."""

    valid: bool
    head_seq: int
    problem: Problem | None
    checkpoint_seq: int  # the last checkpoint this process stored (0: none yet)

    @property
    def error(self) -> str:
        return self.problem.describe() if self.problem else ""


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[dict[str, Any]]  # oldest first
    segments: list[str]  # each entry's segment
    more: bool  # older matches exist
    oldest_seq: int  # the lowest seq the page covers (0 when empty): the next page ends before it
    total: int  # matches in the whole log
    problem: Problem | None  # an entry of this page that does not verify


class _RowSink:
    """Index rows gathered while reading segments, written in chunks."""

    def __init__(self, index: AuditIndex) -> None:
        self._index = index
        self.rows: list[IndexRow] = []

    def add(self, row: IndexRow) -> None:
        self.rows.append(row)
        if len(self.rows) >= _INDEX_CHUNK:
            self.flush("")

    def flush(self, last_mac: str) -> None:
        rows, self.rows = self.rows, []
        if rows:
            self._index.add(rows, last_mac)
        elif last_mac:
            self._index.set_last_mac(last_mac)


class AuditLog:
    """The writer and reader of one audit directory (one writing process per directory).

    The constructor does blocking I/O; use ``await AuditLog.open(...)`` from async code.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keyring: Keyring,
        *,
        checkpoint: Checkpoint | None = None,
        segment_max_bytes: int = DEFAULT_SEGMENT_MAX_BYTES,
        segment_max_age_s: float = DEFAULT_SEGMENT_MAX_AGE_S,
        subject_prefix: str = SUBJECT_PREFIX,
        clock_ms: Callable[[], int] = _now_ms,
    ) -> None:
        self.directory = Path(directory)
        self.keyring = keyring
        self._max_bytes = segment_max_bytes
        self._max_age_ms = int(segment_max_age_s * 1000)
        self._clock_ms = clock_ms
        self._prefix = subject_prefix
        self._lock = threading.Lock()  # the tail, the head fd, index writes
        self._check_lock = threading.Lock()  # one integrity check at a time
        self._fd = -1
        self._index: AuditIndex | None = None
        self._segments: list[SegmentState] = []
        self._size = 0  # committed bytes of the head
        self._seq = 0
        self._mac = GENESIS_MAC
        self._stream_seq = 0
        self._last_ts = 0
        self._tail_segment = ""
        self._tail: tuple[int, str, str] = (0, GENESIS_MAC, "")
        self._head_first_ts: int | None = None
        self._dirty = False
        self._indexed_seq = 0
        self._index_lagging = False
        self._dir_mtime = 0
        self._link_problems: list[Problem] = []
        self._stray_problems: list[Problem] = []
        self._checkpoint_problem: Problem | None = None
        self._checkpoint_seq = 0
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            self._open(checkpoint)
        except BaseException:
            self._close_files()
            raise

    @classmethod
    async def open(cls, directory: str | os.PathLike[str], keyring: Keyring, **options: Any) -> AuditLog:
        """Open (recover, verify from the checkpoint, catch the index up) off the event loop."""
        return await asyncio.to_thread(lambda: cls(directory, keyring, **options))

    # -- state ---------------------------------------------------------------------------

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
        """Committed bytes of the head segment."""
        return self._size

    @property
    def head_segment(self) -> str:
        return self._segments[-1].name

    @property
    def segment_names(self) -> list[str]:
        with self._lock:
            return [s.name for s in self._segments]

    # -- opening -------------------------------------------------------------------------

    def _open(self, checkpoint: Checkpoint | None) -> None:
        legacy = legacy_log(self.directory)
        if legacy is not None:
            if list_segments(self.directory):
                raise AuditLogCorrupt(
                    f"{legacy} is a regular file beside segment files; move one of them away "
                    "(a log from before segments is renamed to seg-000000000001.jsonl on start)"
                )
            target = self.directory / segment_name(1)
            log.info("moving a log from before segments into the first segment", extra={"file": str(target)})
            os.rename(legacy, target)
            fsync_dir(self.directory)
        files = list_segments(self.directory)
        if not files:
            path = self.directory / segment_name(1)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            fsync_dir(self.directory)
            files = [SegmentFile(1, path.name, path)]
        if checkpoint is not None:
            error = checkpoint.signature_error(self.keyring)
            if error:
                raise CheckpointError(error)

        head = files[-1]
        self._fd = os.open(head.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        size = os.fstat(self._fd).st_size
        end = complete_size(self._fd)
        if end != size:
            log.warning(
                "cutting off a partial last line left by a crash", extra={"file": str(head.path), "bytes": size - end}
            )
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        self._size = end
        self._load_tail(files)
        if checkpoint is not None and checkpoint.seq > self._seq:
            where = "the log is empty" if self._seq == 0 else f"the log ends at seq {self._seq}"
            raise LogBehindCheckpoint(
                f"{self.directory}: {where}, but the checkpoint says seq {checkpoint.seq} "
                f"(in {checkpoint.segment}, written at {checkpoint.ts_ms} ms): entries {self._seq + 1}.."
                f"{checkpoint.seq} are missing. Restore them from a backup, or accept the loss "
                "(HOOSH_AUDIT_ACCEPT_CHECKPOINT_LOSS=true moves the checkpoint aside and starts from the files)",
                missing_from=self._seq + 1,
                missing_to=checkpoint.seq,
            )
        if head.first_seq != self._seq + 1 and self._size == 0:
            raise AuditLogCorrupt(
                f"{head.path}: the head segment is empty and named for seq {head.first_seq}, "
                f"but the log ends at seq {self._seq} (run `hoosh audit verify`)"
            )
        self._index = AuditIndex(self.directory / INDEX_FILE, self._prefix)
        self._verify_on_open(files, checkpoint)
        try:
            point_head_link(self.directory, self._segments[-1].name)
        except OSError as exc:
            log.warning("could not point audit.jsonl at the head segment", extra={"error": repr(exc)})
        self._dir_mtime = os.stat(self.directory).st_mtime_ns

    def _load_tail(self, files: list[SegmentFile]) -> None:
        """The last entry of the log (in the head, or before an empty head in the
        previous segment): its MAC must verify, or the log cannot be continued."""
        found: tuple[int, bytes] | None = last_line(self._fd, self._size)
        where = files[-1]
        if found is None and len(files) > 1:
            where = files[-2]
            fd = os.open(where.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                found = last_line(fd, complete_size(fd))
            finally:
                os.close(fd)
        self._tail_segment = where.name
        if found is None:
            return
        entry, error = check_line(
            found[1], self.keyring, expected_seq=None, expected_prev=None, legacy_ok=where.first_seq == 1
        )
        if entry is None:
            raise AuditLogCorrupt(f"{where.path}: the last entry cannot be read ({error}); run `hoosh audit verify`")
        if error.startswith("signed by an unknown key id"):
            raise AuditLogCorrupt(
                f"{where.path}: the last entry is {error}: wrong HOOSH_AUDIT_HMAC_KEY, or add the key that "
                "signed it to HOOSH_AUDIT_HMAC_KEYS"
            )
        if error:
            raise AuditLogCorrupt(
                f"{where.path}: the last entry does not verify ({error}): wrong HOOSH_AUDIT_HMAC_KEY, "
                "or the file was edited (run `hoosh audit verify`)"
            )
        self._seq, self._mac = entry["seq"], entry["mac"]
        self._stream_seq, self._last_ts = entry["stream_seq"], entry["ts_ms"]
        self._tail = (self._seq, self._mac, where.name)

    def _verify_on_open(self, files: list[SegmentFile], checkpoint: Checkpoint | None) -> None:
        index = self._index
        assert index is not None
        indexed = index.last_seq
        if indexed and (indexed > self._seq or self._mac_at(index.location(indexed)) != index.last_mac):
            index.reset()
            indexed = 0
        records = {} if index.rebuilt or not indexed else index.segment_records()
        anchor = checkpoint.seq if checkpoint is not None else 1
        start_seq = max(1, min(anchor, files[-1].first_seq, indexed + 1))
        start = max(i for i, f in enumerate(files) if f.first_seq <= start_seq or i == 0)
        sink = _RowSink(index)
        states: list[SegmentState] = []
        mark = frozenset({checkpoint.seq}) if checkpoint is not None else frozenset()
        checkpoint_seen = False
        for i, f in enumerate(files):
            is_head = i == len(files) - 1
            sig = FileSig.of(os.fstat(self._fd) if is_head else os.stat(f.path))
            record = records.get(f.first_seq)
            if i < start and record is not None and record.name == f.name and record.sig == sig:
                states.append(
                    SegmentState(f.first_seq, f.name, record.last_seq, record.first_prev, record.last_mac, sig)
                )
                continue
            # Read it: after the trust point, or changed on disk since it was verified.
            reindex = i < start or (record is not None and record.sig != sig)
            if reindex:
                index.delete_range(f.first_seq, 2**62 if is_head else files[i + 1].first_seq - 1)
            hook = self._index_hook(sink, f.first_seq, 0 if reindex else indexed)
            scan = self._scan(
                f, fd=self._fd if is_head else None, end=self._size if is_head else None, hook=hook, mark=mark
            )
            fallback = states[-1].last_mac if states else GENESIS_MAC
            state = SegmentState(
                f.first_seq,
                f.name,
                scan.last_seq,
                scan.first_prev or fallback,
                scan.last_mac or fallback,
                sig,
                scan.problem,
            )
            if scan.partial and not is_head and state.problem is None:
                state.problem = Problem("the segment ends in half a line", f.name, scan.last_seq + 1, scan.entries + 1)
            if checkpoint is not None and checkpoint.seq in scan.marks:
                checkpoint_seen = True
                if scan.marks[checkpoint.seq] != checkpoint.mac or checkpoint.segment != f.name:
                    self._checkpoint_problem = Problem(
                        "the entry does not match the checkpoint (the log was rewritten from here)",
                        f.name,
                        checkpoint.seq,
                    )
            if is_head:
                self._head_first_ts = scan.first_ts_ms
            if not is_head and state.problem is None:
                index.put_segment(
                    SegmentRecord(f.first_seq, f.name, state.last_seq, state.first_prev, state.last_mac, sig)
                )
            states.append(state)
            if scan.problem is not None:
                log.error("the audit log does not verify", extra={"problem": scan.problem.describe()})
        if checkpoint is not None and not checkpoint_seen and self._checkpoint_problem is None:
            self._checkpoint_problem = Problem(
                "the checkpointed entry is not in the log", checkpoint.segment, checkpoint.seq
            )
        sink.flush(self._mac)
        self._segments = states
        self._indexed_seq = index.last_seq
        self._link_problems = self._links(states)
        for problem in self._link_problems:
            log.error("the audit log does not verify", extra={"problem": problem.describe()})
        if index.rebuilt:
            log.info("audit index rebuilt", extra={"entries": self._indexed_seq})

    def _scan(
        self,
        f: SegmentFile | SegmentState,
        *,
        fd: int | None,
        end: int | None,
        hook: Callable[[dict[str, Any], int, int], None] | None = None,
        mark: frozenset[int] = frozenset(),
        expected_prev: str | None = None,
    ) -> SegmentScan:
        own = fd is None
        if fd is None:
            fd = os.open(self.directory / f.name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return scan_segment(
                fd,
                f.name,
                self.keyring,
                first_seq=f.first_seq,
                expected_prev=expected_prev,
                legacy_ok=f.first_seq == 1,
                end=end,
                keep_going=True,
                on_entry=hook,
                mark=mark,
            )
        finally:
            if own:
                os.close(fd)

    def _index_hook(self, sink: _RowSink, seg: int, after: int) -> Callable[[dict[str, Any], int, int], None]:
        """A scan hook that indexes the entries after seq ``after``."""
        prefix = self._prefix

        def hook(entry: dict[str, Any], offset: int, length: int) -> None:
            if entry["seq"] > after:
                sink.add(index_row(entry, seg, offset, length, prefix))

        return hook

    @staticmethod
    def _links(states: Sequence[SegmentState]) -> list[Problem]:
        """Segments must follow each other: no seq missing or repeated, each first entry
        linked to the previous segment's last mac."""
        problems: list[Problem] = []
        expected, prev = 1, GENESIS_MAC
        for i, s in enumerate(states):
            if s.first_seq > expected:
                after = f"after {states[i - 1].name}" if i else "at the start of the log"
                problems.append(
                    missing(expected, s.first_seq - 1, f"entries are missing {after} (a segment deleted or cut short)")
                )
            elif s.first_seq < expected:
                problems.append(
                    Problem(
                        f"the segment starts at seq {s.first_seq}, after seq {expected - 1}", s.name, s.first_seq, 1
                    )
                )
            elif not s.empty and s.first_prev != prev:
                problems.append(
                    Problem("the first entry does not link to the previous segment's last mac", s.name, s.first_seq, 1)
                )
            if not s.empty:
                expected, prev = s.last_seq + 1, s.last_mac
        return problems

    def _mac_at(self, location: Location | None) -> str | None:
        if location is None:
            return None
        fds: dict[str, int] = {}
        try:
            entry, _ = self._read_at(location, fds)
        finally:
            for fd in fds.values():
                os.close(fd)
        return entry["mac"] if entry is not None and entry["seq"] == location.seq else None

    # -- writing -------------------------------------------------------------------------

    def append_batch_sync(self, entries: Sequence[NewEntry]) -> list[dict[str, Any]]:
        """Append, flush and fsync every entry; return them as written. Blocking.

        Either the whole batch is durable when this returns, or it raises
        ``AuditWriteError`` and the head is cut back to its last committed size, so a
        retry never leaves a partial batch in the chain. The index is updated after the
        fsync; an index failure is logged and caught up later, never an error here.
        """
        if not entries:
            return []
        started = time.perf_counter()
        with self._lock:
            if self._fd < 0:
                raise AuditWriteError("the audit log is closed")
            if self._dirty:
                self._rollback()
            self._check_head_path()
            now = self._clock_ms()
            ts_ms = max(now, self._last_ts)  # never backwards: a time range is a seq range
            seq, prev = self._seq, self._mac
            written: list[dict[str, Any]] = []
            lines: list[bytes] = []
            for item in entries:
                seq += 1
                entry, line = seal(self.keyring, seq=seq, ts_ms=ts_ms, item=item, prev=prev)
                prev = entry["mac"]
                written.append(entry)
                lines.append(line)
            data = b"\n".join(lines) + b"\n"
            if self._size > 0 and (
                self._size + len(data) > self._max_bytes
                or (self._head_first_ts is not None and now - self._head_first_ts >= self._max_age_ms)
            ):
                self._rotate()
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
                    log.exception("could not cut the audit segment back after a failed write")
                raise AuditWriteError(f"writing {len(entries)} audit entries failed: {exc}") from exc
            head = self._segments[-1]
            offset = self._size
            rows: list[IndexRow] = []
            for entry, line in zip(written, lines, strict=True):
                rows.append(index_row(entry, head.first_seq, offset, len(line), self._prefix))
                offset += len(line) + 1
            if head.empty:
                head.first_prev = written[0]["prev"]
                self._head_first_ts = ts_ms
            self._size += len(data)
            self._seq, self._mac = seq, prev
            self._stream_seq = entries[-1].stream_seq
            self._last_ts = ts_ms
            self._tail_segment = head.name
            self._tail = (seq, prev, head.name)
            head.last_seq, head.last_mac = seq, prev
            head.sig = FileSig.of(os.fstat(self._fd))
            # Durable here; the index update after it is not part of the write's time.
            metrics.BATCH_WRITE_SECONDS.observe(time.perf_counter() - started)
            metrics.BATCHES.inc()
            self._index_rows(rows)
            return written

    def _rollback(self) -> None:
        # Cut back to the last committed byte; after a failed fsync the page cache may
        # hold pages the kernel will never write, so the batch is written again whole.
        os.ftruncate(self._fd, self._size)
        os.fsync(self._fd)
        self._dirty = False

    def _rotate(self) -> None:
        """Seal the head and start the next segment (durably created before any entry)."""
        old = self._segments[-1]
        old.sig = FileSig.of(os.fstat(self._fd))
        self._start_segment(self._seq + 1)
        if old.problem is None and self._index is not None:
            try:
                self._index.put_segment(
                    SegmentRecord(old.first_seq, old.name, old.last_seq, old.first_prev, old.last_mac, old.sig)
                )
            except sqlite3.Error:
                log.exception("could not record the sealed segment in the index")
        log.info("audit segment sealed", extra={"segment": old.name, "next": self._segments[-1].name})

    def _start_segment(self, first_seq: int) -> None:
        name = segment_name(first_seq)
        path = self.directory / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuditWriteError(f"cannot start the audit segment {name}: {exc}") from exc
        try:
            fsync_dir(self.directory)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise AuditWriteError(f"cannot make the audit segment {name} durable: {exc}") from exc
        os.close(self._fd)
        self._fd = fd
        self._size = 0
        self._head_first_ts = None
        state = SegmentState(first_seq, name, first_seq - 1, self._mac, self._mac, FileSig.of(os.fstat(fd)))
        if self._segments and self._segments[-1].first_seq == first_seq:
            self._segments[-1] = state  # an empty head that was deleted: started again
        else:
            self._segments.append(state)
        try:
            point_head_link(self.directory, name)
        except OSError as exc:
            log.warning("could not point audit.jsonl at the head segment", extra={"error": repr(exc)})
        self._dir_mtime = os.stat(self.directory).st_mtime_ns

    def _check_head_path(self) -> None:
        """The head file must still be the one we write: if it was deleted or replaced,
        what we append would be lost. Record the loss and go on in a new segment."""
        head = self._segments[-1]
        try:
            ino = os.stat(self.directory / head.name).st_ino
        except FileNotFoundError:
            ino = -1
        if ino == os.fstat(self._fd).st_ino:
            return
        log.error("the head audit segment was deleted or replaced while open", extra={"segment": head.name})
        if not head.empty:
            head.problem = missing(
                head.first_seq, head.last_seq, "the segment was deleted or replaced while it was written", head.name
            )
        self._start_segment(self._seq + 1 if not head.empty else head.first_seq)

    def _index_rows(self, rows: list[IndexRow]) -> None:
        index = self._index
        if index is None or not rows:
            return
        try:
            if self._index_lagging or self._indexed_seq != rows[0][0] - 1:
                self._catch_up_index()
            index.add(rows, self._mac)
            self._indexed_seq = rows[-1][0]
            self._index_lagging = False
        except sqlite3.Error:
            self._index_lagging = True
            log.exception("could not update the audit index; queries miss the newest entries until it catches up")

    def _catch_up_index(self) -> None:
        """Index what the index lacks, reading it back from the segments."""
        index = self._index
        assert index is not None
        indexed = index.last_seq
        sink = _RowSink(index)
        for s in self._segments:
            if s.empty or s.last_seq <= indexed:
                continue
            is_head = s is self._segments[-1]
            hook = self._index_hook(sink, s.first_seq, indexed)
            self._scan(s, fd=self._fd if is_head else None, end=self._size if is_head else None, hook=hook)
        sink.flush(self._mac)
        self._indexed_seq = index.last_seq

    async def append_batch(self, entries: Sequence[NewEntry]) -> list[dict[str, Any]]:
        """``append_batch_sync`` off the event loop: returns once the batch is fsynced."""
        return await asyncio.to_thread(self.append_batch_sync, entries)

    # -- checkpoints ---------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint | None:
        """The head, signed with the current key (None while the log is empty). Does not
        wait for a batch being written (the event loop calls it)."""
        seq, mac, segment = self._tail  # one tuple, replaced whole after each batch
        if seq == 0:
            return None
        return Checkpoint.sign(self.keyring, seq=seq, mac=mac, segment=segment, ts_ms=self._clock_ms())

    def checkpoint_written(self, checkpoint: Checkpoint) -> None:
        self._checkpoint_seq = max(self._checkpoint_seq, checkpoint.seq)

    def checkpoint_refused(self, reason: str) -> None:
        self._checkpoint_problem = Problem(reason, seq=self._seq)

    # -- integrity -----------------------------------------------------------------------

    def integrity_sync(self) -> Integrity:
        """The chain's state: a few ``stat`` calls; only files that changed behind the
        service's back (or are known bad) are read again. Blocking."""
        with self._check_lock:
            with self._lock:
                if self._fd < 0:
                    return Integrity(False, self._seq, Problem("the audit log is closed"), self._checkpoint_seq)
                states = list(self._segments)
                head = states[-1]
                head_now = FileSig.of(os.fstat(self._fd))
                head_recorded = head.sig
                head_seq, head_mac, committed = self._seq, self._mac, self._size
                try:
                    path_ino = os.stat(self.directory / head.name).st_ino
                except FileNotFoundError:
                    path_ino = -1
                dir_mtime = os.stat(self.directory).st_mtime_ns
                if dir_mtime != self._dir_mtime:
                    self._dir_mtime = dir_mtime
                    known = {s.name for s in states}
                    self._stray_problems = [
                        Problem("a segment file this log did not write", f.name, f.first_seq, 1)
                        for f in list_segments(self.directory)
                        if f.name not in known
                    ]
                head_read_fd = os.dup(self._fd) if (head_now != head_recorded or head.problem) else -1
            for s in states[:-1]:
                self._recheck_sealed(s)
            if head_read_fd >= 0:
                try:
                    self._recheck_head(head, head_read_fd, head_now, head_recorded, head_seq, head_mac, committed)
                finally:
                    os.close(head_read_fd)
            if path_ino != head_now.ino and head.problem is None:
                head.problem = Problem("the head segment file was deleted or replaced", head.name, head.first_seq)
            problems = [s.problem for s in states if s.problem is not None]
            problems += self._link_problems + self._stray_problems
            if self._checkpoint_problem is not None:
                problems.append(self._checkpoint_problem)
            first = min(problems, key=lambda p: p.seq) if problems else None
            return Integrity(first is None, head_seq, first, self._checkpoint_seq)

    async def integrity(self) -> Integrity:
        return await asyncio.to_thread(self.integrity_sync)

    def _recheck_sealed(self, s: SegmentState) -> None:
        try:
            sig = FileSig.of(os.stat(self.directory / s.name))
        except FileNotFoundError:
            if not s.empty:
                s.problem = missing(s.first_seq, s.last_seq, "the segment file was deleted", s.name)
            return
        if sig == s.sig and s.problem is None:
            return
        try:
            scan = self._scan(s, fd=None, end=None, expected_prev=s.first_prev if not s.empty else None)
        except FileNotFoundError:
            s.problem = missing(s.first_seq, s.last_seq, "the segment file was deleted", s.name)
            return
        problem = scan.problem or self._end_problem(s, scan, s.last_seq, s.last_mac, partial_ok=False)
        with self._lock:
            s.problem = problem
            s.sig = sig
        if problem is None:
            log.info("a changed audit segment verifies again", extra={"segment": s.name})
        else:
            log.error("an audit segment changed on disk", extra={"problem": problem.describe()})

    def _recheck_head(
        self,
        head: SegmentState,
        fd: int,
        now: FileSig,
        recorded: FileSig,
        head_seq: int,
        head_mac: str,
        committed: int,
    ) -> None:
        scan = scan_segment(
            fd,
            head.name,
            self.keyring,
            first_seq=head.first_seq,
            expected_prev=head.first_prev,
            legacy_ok=head.first_seq == 1,
            end=committed,
        )
        problem = scan.problem or self._end_problem(head, scan, head_seq, head_mac, partial_ok=False)
        if problem is None and now.size > committed:
            problem = Problem("bytes after the last entry this log wrote", head.name, head_seq + 1)
        with self._lock:
            head.problem = problem
            if head.sig == recorded:
                head.sig = now
        if problem is not None:
            log.error("the head audit segment changed on disk", extra={"problem": problem.describe()})

    @staticmethod
    def _end_problem(
        s: SegmentState, scan: SegmentScan, last_seq: int, last_mac: str, *, partial_ok: bool
    ) -> Problem | None:
        """A segment that verifies must still end where it ended."""
        if scan.partial and not partial_ok:
            return Problem("the segment ends in half a line (cut short)", s.name, scan.last_seq + 1)
        if scan.last_seq < last_seq:
            return missing(scan.last_seq + 1, last_seq, "entries were cut from the end of the segment", s.name)
        if scan.last_seq > last_seq:
            return Problem("entries after the last one this log wrote here", s.name, last_seq + 1)
        if scan.last_seq >= s.first_seq and scan.last_mac != last_mac:
            return Problem("the last entry is not the one this log wrote", s.name, last_seq)
        return None

    # -- reading -------------------------------------------------------------------------

    def _read_at(self, location: Location, fds: dict[str, int]) -> tuple[dict[str, Any] | None, str]:
        """The entry the index puts at ``location``, checked (not its link). ``fds``
        holds the segments this read opened (the caller closes them)."""
        name = segment_name(location.seg)
        fd = fds.get(name)
        if fd is None:
            try:
                fd = fds[name] = os.open(self.directory / name, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None, "the segment file is missing"
        data = os.pread(fd, location.len + 1, location.off)
        if data[location.len :] != b"\n":
            return None, "the entry is not where the index says (the segment changed)"
        return check_line(
            data[: location.len],
            self.keyring,
            expected_seq=location.seq,
            expected_prev=None,
            legacy_ok=location.seg == 1,
        )

    def query_sync(self, filters: Filters, *, before: int = 0, limit: int = 100) -> Page:
        """Up to ``limit`` matching entries with seq < ``before`` (0: from the newest),
        oldest first, each checked (MAC, seq, links between neighbours). Blocking."""
        index = self._index
        assert index is not None
        head = self._indexed_seq
        locations = index.page(filters, before=before or head + 1, limit=limit + 1, head_seq=head)
        more = len(locations) > limit
        locations = locations[:limit]
        locations.reverse()
        entries: list[dict[str, Any]] = []
        segments: list[str] = []
        problem: Problem | None = None
        previous: dict[str, Any] | None = None
        fds: dict[str, int] = {}
        try:
            read = [(location, *self._read_at(location, fds)) for location in locations]
        finally:
            for fd in fds.values():
                os.close(fd)
        for location, entry, error in read:
            name = segment_name(location.seg)
            if not error and previous is not None and entry is not None:
                if entry["seq"] == previous["seq"] + 1 and entry["prev"] != previous["mac"]:
                    error = "prev does not match the previous entry's mac (chain broken)"
            if error and problem is None:
                problem = Problem(error, name, location.seq)
            if entry is not None:
                entries.append(entry)
                segments.append(name)
            previous = entry
        total = index.count(filters, head_seq=head)
        oldest = locations[0].seq if locations else 0
        return Page(entries, segments, more, oldest, total, problem)

    def has_event_sync(self, event_id: str) -> bool:
        """Whether an entry with this event id is in the log (as far as it is indexed)."""
        index = self._index
        assert index is not None
        head = self._indexed_seq
        return bool(index.page(Filters(event_id=event_id), before=head + 1, limit=1, head_seq=head))

    async def has_event(self, event_id: str) -> bool:
        return await asyncio.to_thread(self.has_event_sync, event_id)

    async def query(self, filters: Filters, *, before: int = 0, limit: int = 100) -> Page:
        return await asyncio.to_thread(self.query_sync, filters, before=before, limit=limit)

    def verify_full_sync(self) -> VerifyReport:
        """Read and verify every segment again, and hold the end against this log's head
        (concurrent appends only add entries after it). Blocking, and slow on a large log."""
        return verify_log(self.directory, self.keyring, self.checkpoint())

    async def verify_full(self) -> VerifyReport:
        return await asyncio.to_thread(self.verify_full_sync)

    # -- closing -------------------------------------------------------------------------

    def _close_files(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._index is not None:
            self._index.close()
            self._index = None

    def close(self) -> None:
        with self._lock:
            self._close_files()


__all__ = ["HEAD_LINK", "AuditLog", "Integrity", "Page", "SegmentState"]
