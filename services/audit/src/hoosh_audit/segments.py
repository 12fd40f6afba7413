"""The files of an audit log directory.

    <dir>/seg-000000000001.jsonl   entries 1..k          (sealed)
    <dir>/seg-<k+1, 12 digits>.jsonl  entries k+1..       (sealed)
    <dir>/seg-<n, 12 digits>.jsonl  the head: appended to, fsynced per batch
    <dir>/audit.jsonl -> seg-<n>.jsonl   a convenience link to the head
    <dir>/index.sqlite3            the query index (rebuildable from the segments)

A segment is named after the sequence number of its first entry, so the names alone
say which entries a missing segment held. No framework imports.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SEGMENT_PATTERN = re.compile(r"seg-(\d{12})\.jsonl")
HEAD_LINK = "audit.jsonl"
_READ_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class SegmentFile:
    first_seq: int
    name: str
    path: Path


@dataclass(frozen=True, slots=True)
class FileSig:
    """What changes when a file is written, truncated or replaced (ctime cannot be set back)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileSig:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def segment_name(first_seq: int) -> str:
    return f"seg-{first_seq:012d}.jsonl"


def list_segments(directory: Path) -> list[SegmentFile]:
    """The segment files of ``directory``, by first sequence number (none if it is missing)."""
    found: list[SegmentFile] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        match = SEGMENT_PATTERN.fullmatch(name)
        if match:
            found.append(SegmentFile(int(match.group(1)), name, directory / name))
    found.sort(key=lambda s: s.first_seq)
    return found


def legacy_log(directory: Path) -> Path | None:
    """A single-file log from before segments: ``audit.jsonl`` as a regular file."""
    path = directory / HEAD_LINK
    if path.is_symlink() or not path.is_file():
        return None
    return path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def point_head_link(directory: Path, name: str) -> None:
    """Make ``audit.jsonl`` a link to the head segment ``name`` (atomically replaced)."""
    link = directory / HEAD_LINK
    try:
        if link.is_symlink() and os.readlink(link) == name:
            return
    except OSError:
        pass
    tmp = directory / f".{HEAD_LINK}.tmp"
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    os.symlink(name, tmp)
    os.replace(tmp, link)


def iter_lines(fd: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes, bool]]:
    """(offset, line without its newline, complete) for the bytes of ``fd`` in
    [start, end); the last item is incomplete when the bytes do not end in a newline."""
    pos = start
    buf = b""
    buf_at = start
    while end is None or pos < end:
        want = _READ_CHUNK if end is None else min(_READ_CHUNK, end - pos)
        chunk = os.pread(fd, want, pos)
        if not chunk:
            break
        pos += len(chunk)
        buf += chunk
        cut = 0
        while True:
            nl = buf.find(b"\n", cut)
            if nl < 0:
                break
            yield buf_at + cut, buf[cut:nl], True
            cut = nl + 1
        buf = buf[cut:]
        buf_at += cut
    if buf:
        yield buf_at, buf, False


def last_line(fd: int, end: int) -> tuple[int, bytes] | None:
    """The last complete line before ``end`` (which must follow a newline) and its offset."""
    if end <= 0:
        return None
    pos = end - 1  # the newline that ends it
    tail = b""
    while pos > 0:
        step = min(1 << 16, pos)
        chunk = os.pread(fd, step, pos - step)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            start = pos - step + nl + 1
            return start, chunk[nl + 1 :] + tail
        tail = chunk + tail
        pos -= step
    return 0, tail


def complete_size(fd: int) -> int:
    """The size of the file up to and including its last newline."""
    size = os.fstat(fd).st_size
    pos = size
    while pos > 0:
        step = min(1 << 16, pos)
        nl = os.pread(fd, step, pos - step).rfind(b"\n")
        if nl >= 0:
            return pos - step + nl + 1
        pos -= step
    return 0
