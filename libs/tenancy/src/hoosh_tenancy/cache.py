"""Every key record in memory, kept current by the store's change notices.

A warm request is a dict lookup of the key's SHA-256: no Redis round trip. One
background task holds the pub/sub subscription: it applies each change notice as it
arrives (milliseconds), pings the subscription a few times a second, and loads every
record after each (re)subscription (a notice may have been missed meanwhile).

Missed notices: every write bumps the store's version (``P version``) and records which
record it changed (``P changed``), in the write's own transaction. Every second the
cache asks for the version and the records changed since the one it holds, in one
round trip: when nothing changed (the usual case) that is all, and otherwise only the
changed records are read. A notice carries its version, so a cache that heard every
notice has nothing to read at the check. A version that went backwards (a Redis that
lost its data) means a full reload.

Freshness: the records are trusted only while Redis was heard from within
``stale_after_seconds`` (1 s), by the subscription (a message or a pong) or by a
version check (which shows that nothing changed unseen), and no notice failed to apply.
Past that, a known key is looked up in Redis on every request (a revocation must not be
missed), and a Redis that cannot answer raises :class:`TenancyUnavailable` (the edge
answers 503) rather than admitting a key that may have been revoked.

Unknown keys: a hash not in memory may be a key created a few milliseconds ago on
another replica, so it is looked up in Redis, at most once at a time per hash, and
remembered as absent in a bounded negative cache (invalidated by change notices). The
lookups are rate-limited as a whole, so a flood of random keys cannot hammer Redis: past
the rate an unknown key is simply unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio.client import PubSub

from .errors import TenancyUnavailable
from .keys import KeyRecord, hash_key
from .store import KeyStore

log = logging.getLogger(__name__)

_RECONNECT_MIN_SECONDS = 0.05
_RECONNECT_MAX_SECONDS = 2.0


class KeyCache:
    """Key records by hash, in memory; see the module docstring for the guarantees."""

    def __init__(
        self,
        store: KeyStore,
        *,
        reload_seconds: float = 1.0,
        stale_after_seconds: float = 1.0,
        ping_seconds: float = 0.2,
        reconnect_after_seconds: float = 3.0,
        negative_ttl_seconds: float = 60.0,
        negative_max_entries: int = 10_000,
        miss_lookups_per_second: float = 50.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._reload_seconds = reload_seconds
        self._stale_after = stale_after_seconds
        self._ping_seconds = ping_seconds
        self._reconnect_after = reconnect_after_seconds
        self._negative_ttl = negative_ttl_seconds
        self._negative_max = negative_max_entries
        self._miss_rate = miss_lookups_per_second
        self._clock = clock

        self._records: dict[str, KeyRecord] = {}
        self._negative: dict[str, float] = {}  # hash -> monotonic expiry; insertion order = age
        self._inflight: dict[str, asyncio.Task[KeyRecord | None]] = {}
        self._miss_tokens = miss_lookups_per_second
        self._miss_tokens_at = time.monotonic()
        # Bumped by every applied notice and reload: a Redis lookup that started before
        # one may carry older data, so its result is not remembered.
        self._version = 0
        # The store's version the records reflect (every write up to it is applied);
        # None until the first full load.
        self._loaded_version: int | None = None
        self._synced = False  # a reload completed and no notice has failed to apply since
        self._last_heard = 0.0  # monotonic time of the latest message, pong or version check
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._ready: asyncio.Event | None = None
        self.redis_lookups = 0  # lookups made for requests (tests and metrics)

    # ---------------------------------------------------------------- lifecycle

    async def start(self, wait_seconds: float = 5.0) -> bool:
        """Subscribe and load every record in the background; wait up to ``wait_seconds``
        for the first load. False when it did not complete (keys are then checked in
        Redis until it does)."""
        if self._task is None:
            self._ready = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="hoosh-key-cache")
        assert self._ready is not None
        try:
            await asyncio.wait_for(self._ready.wait(), wait_seconds)
        except TimeoutError:
            log.warning("key cache not loaded yet (Redis unreachable?); keys are checked in Redis meanwhile")
            return False
        return True

    async def close(self) -> None:
        """Stop listening (the records stay readable but are no longer trusted)."""
        task, self._task = self._task, None
        self._synced = False
        self._closing = True
        # A cancel that lands as a socket read times out can be swallowed inside the
        # Redis client (asyncio.timeout on 3.11): cancel until the task is really done.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved (the listener only ends by cancellation)

    @property
    def fresh(self) -> bool:
        """Whether the in-memory records may be trusted now."""
        return self._synced and time.monotonic() - self._last_heard < self._stale_after

    def __len__(self) -> int:
        return len(self._records)

    # ---------------------------------------------------------------- lookups

    async def authenticate(self, presented_key: str | bytes) -> KeyRecord | None:
        """The record of a presented key when it is usable (known, not revoked, not
        expired); None otherwise. TenancyUnavailable when Redis must decide and cannot."""
        record = await self.lookup(hash_key(presented_key))
        return record if record is not None and record.usable(self._clock()) else None

    async def lookup(self, key_hash: str) -> KeyRecord | None:
        """The record stored for a key hash (revoked and expired ones included), or None."""
        record = self._records.get(key_hash)
        if record is not None:
            if self.fresh:
                return record
            return await self._fetch(key_hash)  # stale: Redis decides (TenancyUnavailable)
        return await self._lookup_unknown(key_hash)

    async def _lookup_unknown(self, key_hash: str) -> KeyRecord | None:
        expiry = self._negative.get(key_hash)
        if expiry is not None:
            if expiry > time.monotonic():
                return None
            del self._negative[key_hash]
        if key_hash not in self._inflight and not self._take_miss_token():
            return None  # over the lookup rate: unknown without asking Redis
        return await self._fetch(key_hash)

    def _take_miss_token(self) -> bool:
        now = time.monotonic()
        self._miss_tokens = min(self._miss_rate, self._miss_tokens + (now - self._miss_tokens_at) * self._miss_rate)
        self._miss_tokens_at = now
        if self._miss_tokens >= 1.0:
            self._miss_tokens -= 1.0
            return True
        return False

    async def _fetch(self, key_hash: str) -> KeyRecord | None:
        """One Redis lookup per hash at a time; concurrent callers share it."""
        task = self._inflight.get(key_hash)
        if task is None:
            task = asyncio.create_task(self._fetch_once(key_hash))
            self._inflight[key_hash] = task
            task.add_done_callback(self._fetched)
        # shield: one caller going away must not cancel the others' lookup
        return await asyncio.shield(task)

    def _fetched(self, task: asyncio.Task[KeyRecord | None]) -> None:
        for key_hash, pending in list(self._inflight.items()):
            if pending is task:
                del self._inflight[key_hash]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone away

    async def _fetch_once(self, key_hash: str) -> KeyRecord | None:
        version = self._version
        self.redis_lookups += 1
        record = await self._store.by_hash(key_hash)
        if version == self._version:
            if record is not None:
                self._records[key_hash] = record
            else:
                self._remember_absent(key_hash)
        return record

    def _remember_absent(self, key_hash: str) -> None:
        if len(self._negative) >= self._negative_max:
            self._negative.pop(next(iter(self._negative)))  # the oldest entry
        self._negative[key_hash] = time.monotonic() + self._negative_ttl

    # ---------------------------------------------------------------- the listener

    async def _run(self) -> None:
        delay = _RECONNECT_MIN_SECONDS
        while not self._closing:
            pubsub = self._store.redis.pubsub()
            try:
                await pubsub.subscribe(self._store.channel)
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "key change subscription lost; reconnecting",
                    extra={"error": type(exc).__name__, "detail": str(exc)[:200]},
                )
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_SECONDS)
            if self._synced:
                delay = _RECONNECT_MIN_SECONDS

    async def _listen(self, pubsub: PubSub) -> None:
        next_ping = 0.0
        heard_at = time.monotonic()  # this connection's latest message (the subscribe counts from now)
        next_reload = heard_at + self._reload_seconds
        while not self._closing:
            now = time.monotonic()
            if now - heard_at > self._reconnect_after:
                raise ConnectionError("the subscription stopped answering pings")
            if now >= next_ping:
                await pubsub.ping()
                next_ping = now + self._ping_seconds
            if now >= next_reload:
                await self._catch_up()
                next_reload = time.monotonic() + self._reload_seconds
            message: dict[str, Any] | None = await pubsub.get_message(timeout=self._ping_seconds)
            if message is None:
                continue
            kind = message["type"]
            if kind == "subscribe":
                # (Re)subscribed: notices may have been missed before it, so load everything.
                await self._reload()
                next_reload = time.monotonic() + self._reload_seconds
            elif kind == "message":
                await self._apply(message["data"])
            heard_at = self._last_heard = time.monotonic()

    async def _apply(self, data: bytes | str) -> None:
        try:
            notice = json.loads(data)
            key_hash = str(notice["hash"])
            version = notice.get("version")
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("unreadable key change notice; ignored")
            return
        try:
            await self.refresh(key_hash)
        except TenancyUnavailable:
            self._synced = False  # a change is known and not applied: trust nothing until a reload
            raise
        # Notices arrive in the order of their writes: the next version is now applied.
        # After a gap (a missed notice), the next version check reads what was missed.
        loaded = self._loaded_version
        if loaded is not None and isinstance(version, int) and version == loaded + 1:
            self._loaded_version = version

    async def refresh(self, key_hash: str) -> KeyRecord | None:
        """Read one record from Redis into memory now (a change notice, or this replica's
        own admin write, which then takes effect here before its notice comes back)."""
        self._version += 1
        self._negative.pop(key_hash, None)
        record = await self._store.by_hash(key_hash)
        if record is None:
            self._records.pop(key_hash, None)
        else:
            self._records[key_hash] = record
        return record

    async def _reload(self) -> None:
        """Load every record (the first load, and after each (re)subscription)."""
        version, records = await self._store.load_all()
        self._version += 1
        self._records = records
        self._loaded_version = version
        self._synced = True
        self._last_heard = time.monotonic()
        if self._ready is not None:
            self._ready.set()

    async def _catch_up(self) -> None:
        """The periodic check: one round trip for the store's version and what changed
        since ours; read only the changed records. Hearing from Redis that nothing
        changed unseen keeps the records fresh."""
        loaded = self._loaded_version
        if loaded is None:
            await self._reload()
            return
        version, changed = await self._store.changed_since(loaded)
        if version < loaded:
            log.warning("the key store's version went backwards (Redis replaced or emptied?); reloading every key")
            await self._reload()
            return
        if changed:
            self._version += 1
            for key_hash, record in (await self._store.by_hashes(changed)).items():
                self._negative.pop(key_hash, None)
                if record is None:
                    self._records.pop(key_hash, None)
                else:
                    self._records[key_hash] = record
        self._loaded_version = version
        self._last_heard = time.monotonic()
