"""ListEntries paging: opaque cursors that stay valid while entries are appended.

A cursor says "entries older than seq N, for these filters": new entries only ever
get higher sequence numbers, so appends never shift a page. It carries a fingerprint
of the filters, so a cursor used with other filters is refused rather than silently
paging a different query. No framework imports.
"""

from __future__ import annotations

import base64
import binascii
import json

from hoosh_audit.errors import BadCursor
from hoosh_audit.index import Filters

_VERSION = 1


def encode_cursor(before: int, filters: Filters) -> str:
    raw = json.dumps({"v": _VERSION, "b": before, "f": filters.fingerprint()}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, filters: Filters) -> int:
    """The seq the next page ends before; ``BadCursor`` for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        raise BadCursor("the cursor is not one this service issued") from None
    if (
        not isinstance(value, dict)
        or value.get("v") != _VERSION
        or type(value.get("b")) is not int
        or value["b"] < 1
        or not isinstance(value.get("f"), str)
    ):
        raise BadCursor("the cursor is not one this service issued")
    if value["f"] != filters.fingerprint():
        raise BadCursor("the cursor belongs to a query with other filters")
    return int(value["b"])
