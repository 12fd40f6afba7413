"""Helpers shared by the audit tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from hoosh_audit.chain import NewEntry

DEADLINE_S = 30.0


def entries(n: int, start: int = 1, **payload: object) -> list[NewEntry]:
    """``n`` inference events with stream sequences ``start``..``start + n - 1``."""
    return [
        NewEntry(
            event_id=f"req-{i}",
            subject="hoosh.inference.completed",
            stream_seq=i,
            payload={"request_id": f"req-{i}", "model": "smol", "cost_usd": 0.25 * i, "note": "été ✓", **payload},
        )
        for i in range(start, start + n)
    ]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.jsonl"))


def read_lines(directory: Path) -> list[bytes]:
    """Every line of every segment, in order."""
    lines: list[bytes] = []
    for path in segment_files(directory):
        lines += path.read_bytes().split(b"\n")[:-1]
    return lines


def read_entries(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_lines(directory)]


def where(directory: Path, seq: int) -> tuple[Path, int]:
    """The segment holding entry ``seq`` and its line index there."""
    for path in segment_files(directory):
        for i, line in enumerate(path.read_bytes().split(b"\n")[:-1]):
            if json.loads(line)["seq"] == seq:
                return path, i
    raise AssertionError(f"no entry {seq}")


def rewrite_lines(path: Path, edit: Callable[[list[bytes]], list[bytes]]) -> None:
    lines = path.read_bytes().split(b"\n")[:-1]
    new = edit(lines)
    path.write_bytes(b"".join(line + b"\n" for line in new))


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Poll (no timing assertion: the deadline only stops a hung test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while True:
        ok = condition()
        if not isinstance(ok, bool):
            ok = await ok
        if ok:
            return
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)
