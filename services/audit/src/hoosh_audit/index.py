"""The query index: one SQLite row per entry, kept beside the segments.

The segments are the record; the index only says where each entry is (segment,
offset, length) and the fields queries filter on, so that a page of ``ListEntries``
costs the same at 10 thousand entries as at 10 million. It is rebuilt from the
segments whenever it is missing, unreadable, from another schema or does not match
the log. It also remembers, per sealed segment, the file signature (size, mtime,
ctime, inode) it had when it was last verified and how it ends, so that on start only
segments that changed on disk since are read again.

No framework imports; blocking (the service calls it from worker threads).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

from hoosh_audit.chain import canonical
from hoosh_audit.segments import FileSig

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1"
WRITER_CACHE_KIB = 32 << 10
FILTER_COLUMNS = ("event_id", "key_id", "pool", "model", "provider", "kind", "outcome")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS segments (
  first_seq INTEGER PRIMARY KEY, name TEXT NOT NULL, last_seq INTEGER NOT NULL,
  first_prev TEXT NOT NULL, last_mac TEXT NOT NULL,
  size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, ino INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
  seq INTEGER PRIMARY KEY, ts_ms INTEGER NOT NULL, seg INTEGER NOT NULL, off INTEGER NOT NULL, len INTEGER NOT NULL,
  event_id TEXT, key_id TEXT, pool TEXT, model TEXT, provider TEXT, kind TEXT, outcome TEXT
);
CREATE INDEX IF NOT EXISTS entries_ts ON entries(ts_ms, seq);
""" + "".join(
    f"CREATE INDEX IF NOT EXISTS entries_{c} ON entries({c}, seq) WHERE {c} IS NOT NULL;\n" for c in FILTER_COLUMNS
)

_INSERT = (
    "INSERT OR REPLACE INTO entries (seq, ts_ms, seg, off, len, "
    + ", ".join(FILTER_COLUMNS)
    + ") VALUES ("
    + ", ".join("?" * (5 + len(FILTER_COLUMNS)))
    + ")"
)

IndexRow = tuple[Any, ...]  # (seq, ts_ms, seg, off, len, *FILTER_COLUMNS)


class Location(NamedTuple):
    seq: int
    seg: int  # first seq of the segment (its name)
    off: int
    len: int


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    first_seq: int
    name: str
    last_seq: int
    first_prev: str
    last_mac: str
    sig: FileSig


@dataclass(frozen=True, slots=True)
class Filters:
    """What ``ListEntries`` can ask for; empty fields do not filter. Times are the
    entries' append times, in ms: ``since_ms`` <= ts_ms < ``until_ms``. A request id is
    the event id of the event it caused (its ``Nats-Msg-Id``): ``request_id`` and
    ``event_id`` look in the same column (one random-valued index, not two)."""

    since_ms: int = 0
    until_ms: int = 0
    event_id: str = ""
    request_id: str = ""
    key_id: str = ""
    pool: str = ""
    model: str = ""
    provider: str = ""
    kind: str = ""
    outcome: str = ""

    def equalities(self) -> list[tuple[str, str]]:
        found = [(c, getattr(self, c)) for c in FILTER_COLUMNS if getattr(self, c)]
        if self.request_id:
            found.append(("event_id", self.request_id))
        return found

    def fingerprint(self) -> str:
        return hashlib.sha256(canonical(asdict(self))).hexdigest()[:16]

    @property
    def empty(self) -> bool:
        return not self.since_ms and not self.until_ms and not self.equalities()


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def index_row(entry: dict[str, Any], seg: int, offset: int, length: int, subject_prefix: str) -> IndexRow:
    """The row of one entry: where it is and the fields queries filter on.

    ``kind`` is an
    inference event's kind (chat, embedding, transcription), else the subject without
    the prefix (budget.reset, admin.key.created). ``outcome`` is completed / failed for
    inference events, else the event's own ``outcome`` field.
    """
    payload = entry.get("payload")
    if not isinstance(payload, dict):
        payload = {}
    subject = str(entry.get("subject", ""))
    name = subject.removeprefix(subject_prefix + ".") if subject_prefix else subject
    if name in ("inference.completed", "inference.failed"):
        kind = _text(payload.get("kind"))
        outcome: str | None = name.removeprefix("inference.")
    else:
        kind = name or None
        outcome = _text(payload.get("outcome"))
    return (
        entry["seq"],
        entry["ts_ms"],
        seg,
        offset,
        length,
        _text(entry.get("event_id")),
        _text(payload.get("key_id")),
        _text(payload.get("pool")),
        _text(payload.get("model")),
        _text(payload.get("provider")),
        kind,
        outcome,
    )


class AuditIndex:
    """The SQLite index file. One writer at a time (the log's lock); any thread reads
    through its own connection."""

    def __init__(self, path: Path, subject_prefix: str) -> None:
        self.path = path
        self.subject_prefix = subject_prefix
        self._readers = threading.local()
        self._all_readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}  # filter fingerprint -> (count, up to seq)
        self._counts_lock = threading.Lock()
        self.rebuilt = False
        try:
            self._db = self._connect()
            ok = self._usable()
        except sqlite3.DatabaseError as exc:
            log.warning("the audit index cannot be read; rebuilding it", extra={"error": repr(exc)})
            ok = False
        if not ok:
            self._recreate()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # rebuildable: a lost last transaction is caught up
        # The event-id index takes inserts all over its range: keep more of it in memory.
        db.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        return db

    def _usable(self) -> bool:
        tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            self._db.executescript(_SCHEMA)
            self._set_meta(version=SCHEMA_VERSION, subject_prefix=self.subject_prefix, last_mac="")
            return True
        meta = dict(self._db.execute("SELECT k, v FROM meta").fetchall()) if "meta" in tables else {}
        if meta.get("version") != SCHEMA_VERSION or meta.get("subject_prefix") != self.subject_prefix:
            log.warning("the audit index is from another schema or subject prefix; rebuilding it")
            return False
        self._db.executescript(_SCHEMA)
        return True

    def _recreate(self) -> None:
        try:
            self._db.close()
        except (AttributeError, sqlite3.Error):
            pass
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        self._db = self._connect()
        self._db.executescript(_SCHEMA)
        self._set_meta(version=SCHEMA_VERSION, subject_prefix=self.subject_prefix, last_mac="")
        self.rebuilt = True
        with self._counts_lock:
            self._counts.clear()

    def reset(self) -> None:
        """Drop everything (the index does not match the log); the caller re-indexes."""
        log.warning("the audit index does not match the log; rebuilding it", extra={"file": str(self.path)})
        self._drop_readers()
        self._recreate()

    def _set_meta(self, **values: str) -> None:
        self._db.executemany("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", list(values.items()))

    # -- writing (under the log's lock) ------------------------------------------------

    @property
    def last_seq(self) -> int:
        row = self._db.execute("SELECT max(seq) FROM entries").fetchone()
        return int(row[0] or 0)

    @property
    def last_mac(self) -> str:
        row = self._db.execute("SELECT v FROM meta WHERE k = 'last_mac'").fetchone()
        return str(row[0]) if row else ""

    def add(self, rows: Sequence[IndexRow], last_mac: str) -> None:
        """Insert rows (in seq order) and remember the last one's mac, in one transaction."""
        if not rows:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(_INSERT, rows)
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('last_mac', ?)", (last_mac,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def set_last_mac(self, last_mac: str) -> None:
        self._set_meta(last_mac=last_mac)

    def delete_range(self, first_seq: int, last_seq: int) -> None:
        self._db.execute("DELETE FROM entries WHERE seq BETWEEN ? AND ?", (first_seq, last_seq))
        with self._counts_lock:
            self._counts.clear()

    def location(self, seq: int) -> Location | None:
        row = self._db.execute("SELECT seq, seg, off, len FROM entries WHERE seq = ?", (seq,)).fetchone()
        return Location(*row) if row else None

    def segment_records(self) -> dict[int, SegmentRecord]:
        rows = self._db.execute(
            "SELECT first_seq, name, last_seq, first_prev, last_mac, size, mtime_ns, ctime_ns, ino FROM segments"
        ).fetchall()
        return {r[0]: SegmentRecord(r[0], r[1], r[2], r[3], r[4], FileSig(r[5], r[6], r[7], r[8])) for r in rows}

    def put_segment(self, record: SegmentRecord) -> None:
        sig = record.sig
        self._db.execute(
            "INSERT OR REPLACE INTO segments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.first_seq,
                record.name,
                record.last_seq,
                record.first_prev,
                record.last_mac,
                sig.size,
                sig.mtime_ns,
                sig.ctime_ns,
                sig.ino,
            ),
        )

    def drop_segment(self, first_seq: int) -> None:
        self._db.execute("DELETE FROM segments WHERE first_seq = ?", (first_seq,))

    # -- reading (any thread) -----------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._readers, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA query_only=1")
            self._readers.db = db
            with self._readers_lock:
                self._all_readers.append(db)
        return db

    def _drop_readers(self) -> None:
        with self._readers_lock:
            readers, self._all_readers = self._all_readers, []
        for db in readers:
            try:
                db.close()
            except sqlite3.Error:
                pass
        self._readers = threading.local()

    def _bounds(self, db: sqlite3.Connection, filters: Filters, head_seq: int) -> tuple[int, int]:
        """The seq range an entry must be in to match the time range (ts_ms never goes
        down along the log, so a time range is a seq range)."""
        lo, hi = 1, head_seq
        if filters.since_ms:
            row = db.execute(
                "SELECT seq FROM entries WHERE ts_ms >= ? ORDER BY ts_ms, seq LIMIT 1", (filters.since_ms,)
            ).fetchone()
            lo = int(row[0]) if row else head_seq + 1
        if filters.until_ms:
            row = db.execute(
                "SELECT seq FROM entries WHERE ts_ms < ? ORDER BY ts_ms DESC, seq DESC LIMIT 1", (filters.until_ms,)
            ).fetchone()
            hi = min(hi, int(row[0])) if row else 0
        return lo, hi

    @staticmethod
    def _where(filters: Filters) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        args: list[Any] = []
        for column, value in filters.equalities():
            clauses.append(f"{column} = ?")
            args.append(value)
        if filters.since_ms:
            clauses.append("ts_ms >= ?")
            args.append(filters.since_ms)
        if filters.until_ms:
            clauses.append("ts_ms < ?")
            args.append(filters.until_ms)
        return "".join(f" AND {c}" for c in clauses), args

    def page(self, filters: Filters, *, before: int, limit: int, head_seq: int) -> list[Location]:
        """Up to ``limit`` matching entries with seq < ``before`` (and <= ``head_seq``),
        newest first."""
        db = self._reader()
        lo, hi = self._bounds(db, filters, head_seq)
        hi = min(hi, before - 1)
        if hi < lo:
            return []
        where, args = self._where(filters)
        rows = db.execute(
            f"SELECT seq, seg, off, len FROM entries WHERE seq BETWEEN ? AND ?{where} ORDER BY seq DESC LIMIT ?",
            [lo, hi, *args, limit],
        ).fetchall()
        return [Location(*row) for row in rows]

    def count(self, filters: Filters, *, head_seq: int) -> int:
        """How many entries up to ``head_seq`` match; incremental per filter set (the last
        count is kept, so paging through one query counts its matches once)."""
        if filters.empty:
            return head_seq
        key = filters.fingerprint()
        with self._counts_lock:
            known, upto = self._counts.get(key, (0, 0))
        if upto > head_seq:
            known, upto = 0, 0
        db = self._reader()
        lo, hi = self._bounds(db, filters, head_seq)
        lo = max(lo, upto + 1)
        if hi >= lo:
            where, args = self._where(filters)
            row = db.execute(f"SELECT count(*) FROM entries WHERE seq BETWEEN ? AND ?{where}", [lo, hi, *args])
            known += int(row.fetchone()[0])
        with self._counts_lock:
            if len(self._counts) > 1024:
                self._counts.clear()
            self._counts[key] = (known, head_seq)
        return known

    def close(self) -> None:
        self._drop_readers()
        try:
            self._db.close()
        except sqlite3.Error:
            pass
