"""Verifying an audit log from its files, its keys and its last checkpoint.

``scan_segment`` walks one segment file (the service uses it for what it has to
re-read: the head at start, a file that changed on disk, an index rebuild);
``verify_log`` walks a whole directory and holds the end against the checkpoint, which
is all that ``hoosh audit verify`` needs. Every problem names its place: the segment,
the line and the sequence number, or the range of sequence numbers that is missing.
No framework imports.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from hoosh_audit.chain import GENESIS_MAC, check_line, parse_json
from hoosh_audit.checkpoint import Checkpoint
from hoosh_audit.keys import Keyring
from hoosh_audit.segments import HEAD_LINK, SEGMENT_PATTERN, iter_lines, legacy_log, list_segments, segment_name

# Called for every entry read: (entry, offset, length of the line without newline).
EntryHook = Callable[[dict[str, Any], int, int], None]


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with a log, and where."""

    error: str
    segment: str = ""
    seq: int = 0  # the first bad entry (its expected seq), or the first missing one
    line: int = 0  # 1-based line in the segment; 0 when not about one line
    missing_from: int = 0  # a range of entries that is gone (0 when none)
    missing_to: int = 0

    def describe(self) -> str:
        where = []
        if self.segment:
            where.append(self.segment)
        if self.line:
            where.append(f"line {self.line}")
        if self.missing_from:
            where.append(f"entries {self.missing_from}..{self.missing_to} missing")
        elif self.seq:
            where.append(f"seq {self.seq}")
        return f"{', '.join(where)}: {self.error}" if where else self.error

    def to_dict(self) -> dict[str, Any]:
        return {
            "segment": self.segment,
            "seq": self.seq,
            "line": self.line,
            "missing_from": self.missing_from,
            "missing_to": self.missing_to,
            "error": self.error,
        }


def missing(first: int, last: int, error: str, segment: str = "") -> Problem:
    return Problem(error=error, segment=segment, seq=first, missing_from=first, missing_to=last)


@dataclass(slots=True)
class SegmentScan:
    """What one walk through a segment found."""

    name: str
    first_seq: int
    count: int = 0  # entries that verified before the first problem
    entries: int = 0  # entries read (with keep_going, past problems too)
    last_seq: int = 0  # of the last entry read (first_seq - 1 when none)
    last_mac: str = ""
    first_prev: str = ""
    first_ts_ms: int | None = None
    last_ts_ms: int = 0
    last_stream_seq: int = 0
    has_kid: bool = False  # an entry with a key id was seen (older formats may no longer follow)
    end: int = 0  # offset after the last complete line
    partial: bool = False  # bytes after the last newline
    problem: Problem | None = None
    marks: dict[int, str] = field(default_factory=dict)  # seq -> mac for the seqs asked for


def scan_segment(
    fd: int,
    name: str,
    keyring: Keyring,
    *,
    first_seq: int,
    expected_prev: str | None,
    legacy_ok: bool,
    end: int | None = None,
    keep_going: bool = False,
    on_entry: EntryHook | None = None,
    mark: frozenset[int] = frozenset(),
) -> SegmentScan:
    """Verify the entries of one segment file, from its start to ``end``.

    The first entry must be ``first_seq`` and link to ``expected_prev`` (None: not
    checked). Stops at the first problem unless ``keep_going``, which reads on
    (resynchronising on each entry that parses) so that ``on_entry`` sees every
    readable entry. A last line without its newline is reported as ``partial``, not as
    a problem: it is a write in progress or a crash's leftover that opening the log
    cuts off; the caller decides.
    """
    scan = SegmentScan(name=name, first_seq=first_seq, last_seq=first_seq - 1, last_mac=expected_prev or "")
    expected_seq: int | None = first_seq
    prev = expected_prev
    line_no = 0
    for offset, line, complete in iter_lines(fd, 0, end):
        if not complete:
            scan.partial = True
            break
        line_no += 1
        entry, error = check_line(
            line, keyring, expected_seq=expected_seq, expected_prev=prev, legacy_ok=legacy_ok and not scan.has_kid
        )
        scan.end = offset + len(line) + 1
        if error and scan.problem is None:
            seq = expected_seq if expected_seq is not None else (entry or {}).get("seq", 0)
            scan.problem = Problem(error=error, segment=name, seq=int(seq or 0), line=line_no)
            if not keep_going:
                return scan
        if entry is None:
            expected_seq = None  # resynchronise on the next entry that parses
            prev = None
            continue
        if line_no == 1:
            scan.first_prev = entry["prev"]
        if scan.first_ts_ms is None:
            scan.first_ts_ms = entry["ts_ms"]
        if scan.problem is None:
            scan.count += 1
        scan.entries += 1
        scan.has_kid = scan.has_kid or "kid" in entry
        scan.last_seq = entry["seq"]
        scan.last_mac = entry["mac"]
        scan.last_ts_ms = entry["ts_ms"]
        scan.last_stream_seq = entry["stream_seq"]
        if entry["seq"] in mark:
            scan.marks[entry["seq"]] = entry["mac"]
        if on_entry is not None:
            on_entry(entry, offset, len(line))
        expected_seq = entry["seq"] + 1
        prev = entry["mac"]
    if line_no == 0 and expected_prev is not None:
        scan.first_prev = expected_prev
    return scan


class VerifyResult(NamedTuple):
    """The short form older callers use."""

    valid: bool
    count: int  # type: ignore[assignment]  # entries that verified (a name older callers use)
    first_bad_seq: int  # 0 when valid
    error: str  # "" when valid


@dataclass(slots=True)
class VerifyReport:
    valid: bool
    directory: str
    entries: int = 0  # entries that verified
    segments: int = 0
    head_seq: int = 0
    head_mac: str = GENESIS_MAC
    head_segment: str = ""
    problem: Problem | None = None
    checkpoint: Checkpoint | None = None
    checkpoint_checked: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def first_bad_seq(self) -> int:
        return self.problem.seq if self.problem else 0

    @property
    def error(self) -> str:
        return self.problem.describe() if self.problem else ""

    def short(self) -> VerifyResult:
        return VerifyResult(self.valid, self.entries, self.first_bad_seq, self.error)

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "valid": self.valid,
            "entries": self.entries,
            "segments": self.segments,
            "head_seq": self.head_seq,
            "head_segment": self.head_segment,
            "first_bad_seq": self.first_bad_seq,
            "error": self.error,
            "problem": self.problem.to_dict() if self.problem else None,
            "checkpoint": self.checkpoint.to_dict() if self.checkpoint else None,
            "checkpoint_checked": self.checkpoint_checked,
            "warnings": self.warnings,
        }


def _segment_files(directory: Path, report: VerifyReport) -> list[tuple[int, str, Path]]:
    files = [(s.first_seq, s.name, s.path) for s in list_segments(directory)]
    legacy = legacy_log(directory)
    if legacy is not None:
        if files:
            report.warnings.append(f"{HEAD_LINK} is a regular file beside segment files: it was not verified")
        else:
            files = [(1, HEAD_LINK, legacy)]
    try:
        for name in os.listdir(directory):
            if name.startswith("seg-") and not SEGMENT_PATTERN.fullmatch(name):
                report.warnings.append(f"{name} is not a segment name (seg-<12 digits>.jsonl): not verified")
    except FileNotFoundError:
        report.warnings.append(f"{directory} does not exist")
    return files


def verify_log(
    directory: str | os.PathLike[str],
    keyring: Keyring,
    checkpoint: Checkpoint | None = None,
    *,
    on_entry: Callable[[str, dict[str, Any], int, int], None] | None = None,
) -> VerifyReport:
    """Verify every segment of ``directory`` in order, the links between them, and the
    end of the log against ``checkpoint`` (when given).

    Names the first problem: an entry that does not verify (segment, line, seq), a
    range of entries that is missing (a deleted or emptied segment, a cut tail: the log
    ends before the checkpoint), or a checkpoint that does not verify or does not match
    the log. Without a checkpoint a cut tail or a deleted log cannot be seen.
    """
    root = Path(directory)
    report = VerifyReport(valid=False, directory=str(root), checkpoint=checkpoint)
    files = _segment_files(root, report)
    report.segments = len(files)

    def fail(problem: Problem) -> VerifyReport:
        report.problem = problem
        report.valid = False
        return report

    if checkpoint is not None:
        sig_error = checkpoint.signature_error(keyring)
        if sig_error:
            return fail(Problem(error=sig_error, segment=checkpoint.segment, seq=checkpoint.seq))
    expected_seq, prev, has_kid = 1, GENESIS_MAC, False
    checkpoint_mac: str | None = None
    checkpoint_segment = ""
    for index, (first_seq, name, path) in enumerate(files):
        last = index == len(files) - 1
        if first_seq > expected_seq:
            after = f"after {files[index - 1][1]}" if index else "at the start of the log"
            return fail(
                missing(expected_seq, first_seq - 1, f"entries are missing {after} (a segment deleted or cut short)")
            )
        if first_seq < expected_seq:
            return fail(
                Problem(
                    error=f"segment starts at seq {first_seq}, but seq {expected_seq - 1} came before it",
                    segment=name,
                    seq=first_seq,
                    line=1,
                )
            )
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return fail(Problem(error=f"cannot read the segment: {exc.strerror}", segment=name, seq=first_seq))
        hook: EntryHook | None = functools.partial(on_entry, name) if on_entry is not None else None
        try:
            mark = frozenset({checkpoint.seq}) if checkpoint is not None else frozenset()
            scan = scan_segment(
                fd,
                name,
                keyring,
                first_seq=first_seq,
                expected_prev=prev,
                legacy_ok=not has_kid,
                on_entry=hook,
                mark=mark,
            )
        finally:
            os.close(fd)
        report.entries += scan.count
        if scan.problem is not None:
            return fail(scan.problem)
        if scan.partial:
            if not last:
                return fail(
                    Problem(
                        error="the segment ends in half a line (cut short)",
                        segment=name,
                        seq=scan.last_seq + 1,
                        line=scan.entries + 1,
                    )
                )
            report.warnings.append(
                f"{name} ends in half a line after seq {scan.last_seq}: a write in progress, or a crash's "
                "leftover that the service cuts off when it opens the log"
            )
        if scan.entries == 0 and not last:
            next_first = files[index + 1][0]
            return fail(missing(first_seq, next_first - 1, "the segment is empty (its entries were removed)", name))
        if checkpoint is not None and checkpoint.seq in scan.marks:
            checkpoint_mac, checkpoint_segment = scan.marks[checkpoint.seq], name
        expected_seq, prev = scan.last_seq + 1, scan.last_mac
        has_kid = has_kid or scan.has_kid
        if scan.entries:
            report.head_segment = name
    report.head_seq, report.head_mac = expected_seq - 1, prev
    if checkpoint is not None:
        report.checkpoint_checked = True
        if checkpoint.seq > report.head_seq:
            where = "the log is empty" if report.head_seq == 0 else f"the log ends at seq {report.head_seq}"
            return fail(
                missing(
                    report.head_seq + 1,
                    checkpoint.seq,
                    f"{where}, but the checkpoint of {checkpoint.ts_ms} ms says seq {checkpoint.seq} "
                    f"in {checkpoint.segment} (the tail was cut off, or segments or the log deleted)",
                    checkpoint.segment,
                )
            )
        if checkpoint_mac != checkpoint.mac:
            return fail(
                Problem(
                    error="the entry does not match the checkpoint's mac (the log was rewritten from here)",
                    segment=checkpoint_segment,
                    seq=checkpoint.seq,
                )
            )
        if checkpoint_segment != checkpoint.segment and not (
            checkpoint_segment == HEAD_LINK and checkpoint.segment == segment_name(1)
        ):
            return fail(
                Problem(
                    error=f"the checkpoint puts this entry in {checkpoint.segment}, the log in {checkpoint_segment}",
                    segment=checkpoint_segment,
                    seq=checkpoint.seq,
                )
            )
    report.valid = True
    return report


def verify_path(path: str | os.PathLike[str], keyring: Keyring, checkpoint: Checkpoint | None = None) -> VerifyResult:
    """``verify_log`` for a directory, its ``audit.jsonl`` link, or one pre-segment file."""
    target = Path(path)
    if target.is_dir():
        return verify_log(target, keyring, checkpoint).short()
    if target.name == HEAD_LINK and (target.is_symlink() or not target.exists()):
        return verify_log(target.parent, keyring, checkpoint).short()
    # One file on its own: a log from before segments (or a copied segment that starts at 1).
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return VerifyResult(True, 0, 0, "")
    try:
        scan = scan_segment(fd, target.name, keyring, first_seq=1, expected_prev=GENESIS_MAC, legacy_ok=True)
    finally:
        os.close(fd)
    if scan.problem is not None:
        return VerifyResult(False, scan.count, scan.problem.seq, scan.problem.describe())
    if scan.partial:
        return VerifyResult(False, scan.count, scan.last_seq + 1, "last line is incomplete (no trailing newline)")
    return VerifyResult(True, scan.count, 0, "")


def first_entry(fd: int) -> dict[str, Any] | None:
    """The first entry of a segment, parsed but not verified (None when empty/unreadable)."""
    for _, line, complete in iter_lines(fd):
        if not complete:
            return None
        try:
            value = parse_json(line)
        except (UnicodeDecodeError, ValueError):
            return None
        return value if isinstance(value, dict) else None
    return None
