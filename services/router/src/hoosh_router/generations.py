"""The router's serving objects for one configuration (a generation), and the swap from
one to the next that a live reload makes (``reload.py`` builds them).

A request takes the current generation when it starts (``Generations.use``) and keeps it
to its end: its routes, backends, breakers, retry policy, prices and cache settings stay
those it started with, whatever reloads happen meanwhile. A swap is one assignment, so a
request sees either the old configuration or the new one, never a mix.

A replaced generation retires once its last request has ended, plus a grace period for
the endings that outlive a request (a stream the client left is read on for the
provider's usage for up to ``chat.DRAIN_SECONDS``): then its health board stops and the
backends no live generation uses any more are closed. A provider whose configuration did
not change keeps its backend (and its HTTP sessions) across the swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from .backends.base import Backend
from .cache import ResponseCache
from .chat import DRAIN_SECONDS, ChatService
from .config import Catalogue, ProviderConfig
from .embeddings import EmbeddingService
from .health import HealthBoard
from .recording import Recorder
from .routing import ModelRouter

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Generation:
    """Everything a request needs that the configuration decides."""

    chat: ChatService
    router: ModelRouter
    embeddings: EmbeddingService | None = None
    health: HealthBoard | None = None
    cache: ResponseCache | None = None
    # What reload.py built it from (absent for a generation assembled by hand, in tests).
    entries: list[tuple[ProviderConfig, Backend]] = field(default_factory=list)
    catalogue: Catalogue | None = None
    recorder: Recorder | None = None
    active: int = 0  # requests running on it
    retired: bool = False
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def backends(self) -> list[Backend]:
        return [backend for _, backend in self.entries]


class Generations:
    """The current generation and those still retiring."""

    def __init__(self, first: Generation, *, grace_seconds: float = DRAIN_SECONDS) -> None:
        self._current = first
        self._retiring: list[Generation] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._grace = grace_seconds

    @property
    def current(self) -> Generation:
        return self._current

    @property
    def live(self) -> list[Generation]:
        """The generations whose objects may still be in use: retiring ones, then the current."""
        return [*self._retiring, self._current]

    @contextlib.contextmanager
    def use(self) -> Iterator[Generation]:
        """The current generation, held for the block (one request)."""
        generation = self._current
        generation.active += 1
        try:
            yield generation
        finally:
            generation.active -= 1
            if generation.active == 0 and generation.retired:
                generation._idle.set()

    def swap(self, new: Generation) -> Generation:
        """Make ``new`` current (new requests use it from now on); the previous one retires
        in the background once its requests have ended. Returns the previous one."""
        old, self._current = self._current, new
        old.retired = True
        if old.active == 0:
            old._idle.set()
        self._retiring.append(old)
        task = asyncio.get_running_loop().create_task(self._retire(old), name="router-generation-retire")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return old

    async def _retire(self, old: Generation) -> None:
        await old._idle.wait()
        await asyncio.sleep(self._grace)
        self._retiring.remove(old)
        in_use = {id(backend) for generation in self.live for backend in generation.backends()}
        # Each step in its own try: one that fails must not leave the others undone (the
        # backends' sessions open).
        if old.health is not None and all(old.health is not g.health for g in self.live):
            try:
                await old.health.stop()
            except Exception as error:
                log.warning("stopping a replaced health board failed", extra={"error": repr(error)})
        if old.cache is not None:
            try:
                await old.cache.drain()
            except Exception as error:
                log.warning("draining a replaced response cache failed", extra={"error": repr(error)})
        closed = 0
        for backend in old.backends():
            if id(backend) not in in_use:
                in_use.add(id(backend))  # once, even if listed twice
                try:
                    await backend.close()
                except Exception as error:  # a close must not stop the others
                    log.warning("closing a replaced backend failed", extra={"error": repr(error)})
                closed += 1
        log.info("replaced configuration retired", extra={"backends_closed": closed})

    async def close(self) -> list[Generation]:
        """Shutdown: stop retiring in the background; the caller stops and closes what the
        returned live generations hold."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return self.live
