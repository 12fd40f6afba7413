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

# Set by skip_aiohttp_for_nats for the processes this one starts (the edge's uvicorn
# workers, spawned: they import the edge's package, whose __init__ calls it again).
INHERITED = "HOOSH_LEAN_IMPORTS"


def skip_aiohttp_for_nats() -> None:
    """Make ``import aiohttp`` fail in this process (unless NATS is reached over WebSocket,
    a ``ws://`` or ``wss://`` entry in ``HOOSH_NATS_URL``, or aiohttp is already loaded).
    Call it first thing in a service's ``__main__``; tracing's aiohttp instrumentation is
    then skipped, as it is wherever aiohttp is not installed."""
    # pydantic-settings reads the variable whatever its case; so does this.
    urls = " ".join(value for key, value in os.environ.items() if key.upper() == "HOOSH_NATS_URL").lower()
    if "ws://" in urls or "wss://" in urls or "aiohttp" in sys.modules:
        return
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # import raises ImportError
    os.environ[INHERITED] = "1"


def inherited() -> None:
    """In a package's ``__init__``: skip aiohttp if the process that started this one did."""
    if os.environ.get(INHERITED) == "1":
        skip_aiohttp_for_nats()
