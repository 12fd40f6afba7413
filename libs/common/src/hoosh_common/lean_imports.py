"""Keeping libraries a service never uses out of its memory.

nats-py imports aiohttp at start, for its WebSocket transport (``ws://`` URLs) alone:
about 10 MiB resident (aiohttp, yarl, multidict, frozenlist and their C parts) in every
process that talks to NATS. The edge, the budget service, the audit and stt speak
``nats://`` and make no HTTP calls through aiohttp, so their ``__main__`` calls
:func:`skip_aiohttp_for_nats` before anything imports nats: nats-py then finds no
aiohttp (it imports it optionally) and the process never loads it. The router calls
providers through aiohttp and does not call it. In-process tests never call it either.
"""

from __future__ import annotations

import os
import sys


def skip_aiohttp_for_nats() -> None:
    """Make ``import aiohttp`` fail in this process (unless NATS is reached over WebSocket,
    ``HOOSH_NATS_URL=ws://...``, or aiohttp is already loaded). Call it first thing in a
    service's ``__main__``; tracing's aiohttp instrumentation is then skipped, as it is
    wherever aiohttp is not installed."""
    urls = os.environ.get("HOOSH_NATS_URL", "").lower()  # one URL, or several joined by commas
    if "ws://" in urls or "wss://" in urls or "aiohttp" in sys.modules:
        return
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # import raises ImportError
