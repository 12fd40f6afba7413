"""The outbox on its own: durable writes, bounds, crash leftovers, the lock."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hoosh_common.outbox import (
    MAX_SEGMENT_ENTRIES,
    REJECTED_DIR,
    TEMP_PREFIX,
    CorruptEntryError,
    Outbox,
    OutboxEntry,
    OutboxFullError,
    OutboxLockedError,
    OutboxWriteError,
    segment_name,
)


def entry(event_id: str, size: int = 10) -> OutboxEntry:
    return OutboxEntry(
        subject="test.inference.completed",
        event_id=event_id,
        data=b"x" * size,
        headers={"Nats-Msg-Id": event_id, "hoosh-request-id": event_id},
        first_attempt_ms=1_700_000_000_000,
    )


def segment_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".seg"))


async def event_ids(box: Outbox) -> list[str]:
    return [e.event_id for content in await box.read(box.head(1_000_000)) for e in content.entries]


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    box = Outbox(tmp_path / "outbox", max_entries=10_000, max_bytes=10_000_000)
    await box.open()
    try:
        yield box
    finally:
        await box.close()


def test_records_round_trip_and_a_damaged_one_is_refused() -> None:
    original = OutboxEntry(
        subject="s.x", event_id="e1", data=b"\x00\x01payload", headers={"a": "b"}, first_attempt_ms=5, maybe_stored=True
    )
    blob = original.encode()
    assert OutboxEntry.decode(blob) == original
    for damaged in (blob[:-1], blob[:10], b"NOTMAGIC" + blob[8:], blob[:20] + bytes([blob[20] ^ 1]) + blob[21:]):
        with pytest.raises(CorruptEntryError):
            OutboxEntry.decode(damaged)
    second = entry("e2").encode()
    entries, stopped, why = OutboxEntry.decode_many(blob + second + second[:-1])
    assert [e.event_id for e in entries] == ["e1", "e2"]
    assert stopped == len(blob) + len(second) and why is not None


async def test_put_is_durable_file_then_directory(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync: Callable[[int], None] = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    await outbox.put(entry("e1"))
    assert synced == ["file", "dir"]  # the segment's bytes, then its name
    assert segment_files(outbox.directory) == [segment_name(1, 1)]
    assert not [p for p in outbox.directory.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert (await outbox.read(outbox.head(10)))[0].entries == [entry("e1")]


async def test_entries_queued_together_share_a_segment_and_its_fsyncs(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs = 0
    real_fsync: Callable[[int], None] = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    n = MAX_SEGMENT_ENTRIES + 10
    futures = [outbox.put_nowait(entry(f"e{i}")) for i in range(n)]
    for future in futures:
        await future
    assert segment_files(outbox.directory) == [segment_name(1, MAX_SEGMENT_ENTRIES), segment_name(2, 10)]
    assert fsyncs == 3  # two segments, one directory
    assert await event_ids(outbox) == [f"e{i}" for i in range(n)]  # in put order
    assert outbox.count == n


async def test_reopening_finds_entries_in_order_and_removes_half_written_ones(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    first = Outbox(directory)
    await first.open()
    for i in range(3):
        await first.put(entry(f"e{i}"))
    await first.close()
    (directory / f"{TEMP_PREFIX}99").write_bytes(b"HOOSHOB1 half a segment")  # a crash mid-write

    second = Outbox(directory)
    await second.open()
    try:
        assert not (directory / f"{TEMP_PREFIX}99").exists()
        assert await event_ids(second) == ["e0", "e1", "e2"]
        depth = second.depth()
        on_disk = sum((directory / name).stat().st_size for name in segment_files(directory))
        assert (depth.entries, depth.bytes) == (3, on_disk)
        await second.put(entry("e3"))
        assert segment_files(directory)[-1] == segment_name(4, 1)  # numbering goes on
        for content in await second.read(second.head(2)):
            await second.settle(content, remaining=[])  # e0 and e1 acked
        assert await event_ids(second) == ["e2", "e3"]
        assert len(segment_files(directory)) == 2 and second.count == 2
    finally:
        await second.close()


async def test_a_partly_published_segment_keeps_the_rest_and_survives_a_crash_mid_settle(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    box = Outbox(directory)
    await box.open()
    futures = [box.put_nowait(entry(f"e{i}")) for i in range(4)]
    for future in futures:
        await future
    [content] = await box.read(box.head(10))
    await box.settle(content, remaining=content.entries[2:])  # e0, e1 acked
    assert segment_files(directory) == [segment_name(1, 2)]
    assert await event_ids(box) == ["e2", "e3"] and box.count == 2
    await box.close()

    # A crash after the remainder was renamed in but before the old file went.
    (directory / segment_name(1, 4)).write_bytes(b"".join(entry(f"e{i}").encode() for i in range(4)))
    again = Outbox(directory)
    await again.open()
    try:
        assert segment_files(directory) == [segment_name(1, 2)]
        assert await event_ids(again) == ["e2", "e3"]
    finally:
        await again.close()


async def test_one_process_at_a_time(tmp_path: Path) -> None:
    owner = Outbox(tmp_path / "outbox")
    await owner.open()
    try:
        with pytest.raises(OutboxLockedError):
            await Outbox(tmp_path / "outbox", lock_timeout=0.2).open()
    finally:
        await owner.close()
    successor = Outbox(tmp_path / "outbox", lock_timeout=0.2)
    await successor.open()
    await successor.close()


async def test_full_refuses_and_reports_it(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox", max_entries=4, max_bytes=10_000, high_water=0.5)
    await box.open()
    try:
        await box.put(entry("e0"))
        assert box.healthy
        await box.put(entry("e1"))
        assert not box.healthy and not box.full  # past the high-water mark: refuse new work
        await box.put(entry("e2"))
        await box.put(entry("e3"))
        with pytest.raises(OutboxFullError):
            box.put_nowait(entry("e4"))
        depth = box.depth()
        assert (depth.entries, depth.full, depth.healthy) == (4, True, False)
        assert await event_ids(box) == ["e0", "e1", "e2", "e3"]  # nothing was dropped to make room
        [content] = await box.read(box.head(1))
        await box.settle(content, remaining=[])
        assert not box.full
    finally:
        await box.close()

    by_bytes = Outbox(tmp_path / "bytes", max_entries=100, max_bytes=500)
    await by_bytes.open()
    try:
        await by_bytes.put(entry("big", size=150))
        with pytest.raises(OutboxFullError):
            await by_bytes.put(entry("bigger", size=150))
    finally:
        await by_bytes.close()


async def test_a_disk_error_leaves_nothing_behind_and_marks_unhealthy(
    outbox: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync: Callable[[int], None] = os.fsync

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "simulated disk error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutboxWriteError):
        await outbox.put(entry("e1"))
    assert outbox.write_failed and not outbox.healthy
    assert outbox.count == 0 and not segment_files(outbox.directory)
    assert not list(outbox.directory.glob(f"{TEMP_PREFIX}*"))
    monkeypatch.setattr(os, "fsync", real_fsync)
    await outbox.put(entry("e2"))
    assert not outbox.write_failed and outbox.healthy


async def test_refused_and_damaged_entries_are_kept_and_counted(tmp_path: Path) -> None:
    directory = tmp_path / "outbox"
    box = Outbox(directory)
    await box.open()
    futures = [box.put_nowait(entry(f"e{i}")) for i in range(3)]
    for future in futures:
        await future
    [content] = await box.read(box.head(10))
    await box.settle(content, remaining=[content.entries[2]], rejected=[content.entries[0]])  # e1 acked
    assert await event_ids(box) == ["e2"] and box.depth().rejected == 1
    await box.close()
    [kept] = sorted((directory / REJECTED_DIR).glob("*.seg"))
    assert OutboxEntry.decode(kept.read_bytes()).event_id == "e0"

    # Bit rot in the middle of a segment: what reads back is published, the rest set aside.
    [name] = segment_files(directory)
    path = directory / name
    good = path.read_bytes()
    path.write_bytes(entry("e3").encode() + good[:-2] + b"!!")
    (directory / name).rename(directory / segment_name(int(name.split("-")[0]), 2))
    again = Outbox(directory)
    await again.open()
    try:
        assert again.depth().rejected == 1
        [content] = await again.read(again.head(10))
        assert [e.event_id for e in content.entries] == ["e3"] and content.damaged is not None
        await again.settle(content, remaining=[])
        assert again.count == 0 and again.depth().rejected == 2
        assert len(list((directory / REJECTED_DIR).glob("*.damaged"))) == 1
        await again.put(entry("next"))
        assert int(segment_files(directory)[-1].split("-")[0]) > int(kept.name.split("-")[0])
    finally:
        await again.close()
