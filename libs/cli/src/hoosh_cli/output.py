"""What the commands print: JSON for scripts (``--json``), rich tables for people.

Nothing the edge sends is trusted to be printable. Every value from it is drawn as a
rich ``Text`` (never parsed as markup: a ``[bracket]`` or ``[link=...]`` in a key's
name stays those characters) with terminal control removed (terminal.py: escape
sequences, OSC strings, C0 and C1 control characters). JSON keeps every character,
with the control ones written as JSON escapes (ESC as ``\\u001b``). Consoles never interpret
markup or highlight either. Off a terminal, tables are laid out 160 columns wide
(``$COLUMNS`` overrides), so a pipe or a file gets whole rows rather than an 80-column
squeeze.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .terminal import clean

PIPE_WIDTH = 160

# Words that are good, doubtful or bad wherever they appear (states, statuses).
GOOD = {"ok", "SERVING", "closed", "reloaded", "valid", "yes", "completed", "active", "fits"}
WARN = {"degraded", "half_open", "partial", "backlog", "unchanged", "not_configured", "expired"}
BAD = {
    "unavailable",
    "unreachable",
    "open",
    "NOT_SERVING",
    "UNREACHABLE",
    "SERVICE_UNKNOWN",
    "UNKNOWN",
    "refused",
    "failed",
    "invalid",
    "unhealthy",
    "revoked",
    "no",
}


def _console(file: IO[str]) -> Console:
    width = None
    if not file.isatty() and "COLUMNS" not in os.environ:
        width = PIPE_WIDTH
    return Console(file=file, markup=False, highlight=False, emoji=False, width=width)


def console() -> Console:
    """The console of stdout (what the command answers)."""
    return _console(sys.stdout)


def err_console() -> Console:
    """The console of stderr (progress and notes, never the answer)."""
    return _console(sys.stderr)


# JSON escapes C0 control characters itself; DEL and C1 it writes as they are.
_JSON_CONTROL = {code: f"\\u{code:04x}" for code in range(0x7F, 0xA0)}


def dumps(value: Any, indent: int | None = None) -> str:
    """``value`` as JSON with every control character escaped (safe on a terminal)."""
    return json.dumps(value, indent=indent, ensure_ascii=False).translate(_JSON_CONTROL)


def emit_json(value: Any) -> None:
    """``value`` as indented JSON on stdout."""
    sys.stdout.write(dumps(value, indent=2) + "\n")
    sys.stdout.flush()


def emit_json_line(value: Any) -> None:
    """``value`` as one line of JSON on stdout (a stream of entries)."""
    sys.stdout.write(dumps(value) + "\n")
    sys.stdout.flush()


def table(title: str | None, *columns: str, right: Iterable[str] = (), whole: Iterable[str] = ()) -> Table:
    """An empty table with these columns (those in ``right`` right-aligned; those in
    ``whole`` never wrapped: ids and times a reader copies; the others fold if narrow)."""
    aligned, kept = set(right), set(whole)
    grid = Table(title=_title(title), box=box.SIMPLE_HEAD, title_justify="left", title_style="bold")
    for column in columns:
        grid.add_column(
            text(column),
            justify="right" if column in aligned else "left",
            overflow="fold",
            no_wrap=column in kept,
            min_width=len(column) if column in kept else None,
        )
    return grid


def fields_table(title: str | None, rows: Iterable[tuple[str, Any]]) -> Table:
    """A two-column table of (field, value)."""
    grid = Table(title=_title(title), box=box.SIMPLE, show_header=False, title_justify="left", title_style="bold")
    grid.add_column("field", style="bold")
    grid.add_column("value", overflow="fold")
    for name, value in rows:
        grid.add_row(name, value if isinstance(value, Text) else text(value))
    return grid


def _title(title: str | None) -> Text | None:
    return None if title is None else Text(clean(title))


def plain(value: Any) -> str:
    """A value as one printable line: '-' for None or empty, yes/no for booleans, lists
    comma-separated, terminal control removed."""
    if value is None or value == "" or value == [] or value == ():
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return clean(", ".join(str(item) for item in value))
    return clean(str(value))


def text(value: Any, style: str = "") -> Text:
    """A value to print (a cell, a line): ``plain`` as rich Text, never read as markup."""
    return Text(plain(value), style=style)


def lines(value: str, style: str = "") -> Text:
    """Multi-line text from the edge (a payload, a transcript): its newlines and tabs
    kept, terminal control removed, never read as markup."""
    return Text(clean(value, multiline=True), style=style)


def state(value: Any) -> Text:
    """A state word, coloured by what it means."""
    word = plain(value)
    style = "green" if word in GOOD else "yellow" if word in WARN else "red" if word in BAD else ""
    return Text(word, style=style)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def size(value: Any) -> Text:
    """Bytes for people: 1.5 GiB (anything that is not a number: as it is)."""
    if not _numeric(value):
        return text(value)
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(amount) < 1024 or unit == "TiB":
            return Text(f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}")
        amount /= 1024
    return Text(f"{amount:.1f} TiB")  # pragma: no cover - the loop returns


def when_ms(value: Any) -> Text:
    """Unix milliseconds as UTC: 2026-05-10 12:00:01 (not a time: as it is)."""
    if not value:
        return Text("-")
    if not _numeric(value):
        return text(value)
    try:
        return Text(datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S"))
    except (OverflowError, OSError, ValueError):
        return text(value)


def when_s(value: Any) -> Text:
    """Unix seconds as UTC."""
    if not value:
        return Text("-")
    return when_ms(value * 1000) if _numeric(value) else text(value)


def number(value: Any, digits: int = 0) -> Text:
    """1,234 (or 1,234.5 with ``digits``); anything that is not a number: as it is."""
    if not _numeric(value):
        return text(value)
    try:
        return Text(f"{value:,.{digits}f}" if digits else f"{value:,}")
    except (OverflowError, ValueError):
        return text(value)
