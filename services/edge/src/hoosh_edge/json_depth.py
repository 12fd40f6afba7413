"""How deeply a JSON text nests arrays and objects, measured on the bytes at C speed.

Free-form JSON fields (a tool's ``parameters`` schema, ``response_format``) can nest
without bound inside a body that is small enough to be accepted. orjson parses up to
1,024 levels but serializes only 254, and every later hop (the router, a provider) has
its own limit, so the edge refuses anything deeper than a fixed bound before a body is
validated, mapped or sent anywhere (nothing is reserved yet).

The check costs one C-level pass over an ordinary body (``bytes.translate`` keeping
only the brackets, under a microsecond for 1 KB): a body with no more opening brackets
than the bound cannot nest deeper than it. Only a body with more brackets is measured,
on its bracket skeleton (strings removed, then the innermost pairs stripped once per
level, each pass a C-level ``bytes.replace``).
"""

from __future__ import annotations

import re

DEFAULT_MAX_JSON_DEPTH = 64

# A JSON string (escapes included). Run only on text orjson has already parsed, so every
# quote it starts at opens a real, terminated string: the scan is linear.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_PARENS = bytes.maketrans(b"{[}]", b"(())")
_NOT_A_BRACKET = bytes(sorted(set(range(256)) - set(b"{}[]")))


def exceeds_depth(body: bytes, limit: int) -> bool:
    """Whether the JSON text ``body`` (already known to parse) nests arrays and objects
    more than ``limit`` levels deep (``{}`` is one level, ``{"a": []}`` two)."""
    if len(body.translate(None, _NOT_A_BRACKET)) <= 2 * limit:
        return False  # the common case: too few brackets (half of them openers) to be that deep
    return _depth_exceeds(body, limit)


def _depth_exceeds(body: bytes, limit: int) -> bool:
    skeleton = _STRING.sub(b"", body) if b'"' in body else body
    brackets = skeleton.translate(_PARENS, _NOT_A_BRACKET)
    if b"(" * (limit + 1) in brackets:
        return True  # a straight run of openers (the usual hostile shape): no passes needed
    # Each pass removes the innermost pairs, i.e. one level of every branch.
    for _ in range(limit):
        shorter = brackets.replace(b"()", b"")
        if not shorter:
            return False
        brackets = shorter
    return b"()" in brackets
