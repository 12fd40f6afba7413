"""Key records in Redis (hashes only) and the change notices every write publishes.

Layout under the prefix ``P`` (``HOOSH_TENANCY_KEY_PREFIX``, default ``hoosh:tenancy:``):

- ``P key:<sha256 hex>`` — the record as JSON (:class:`KeyRecord`);
- ``P ids`` — hash: key id -> sha256 hex (lookups by id, listing);
- ``P version`` — integer: bumped by every write (the caches' cheap "did anything change?");
- ``P changed`` — sorted set: sha256 hex -> the version of the record's latest write
  (what changed since a version, without reading every record);
- ``P changes`` — pub/sub channel: one JSON notice ``{"op", "id", "hash", "version"}`` per write.

Each write, its version bump and its notice go out in one MULTI/EXEC, so no write is
left unannounced or unversioned.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError, WatchError

from .errors import InvalidKeyRecord, KeyNotFound, TenancyUnavailable
from .keys import ALL, KeyRecord, Scope, generate_key, hash_key, new_key_id
from .redis import DEFAULT_KEY_PREFIX

log = logging.getLogger(__name__)

UPDATABLE_FIELDS = frozenset({"name", "team", "user", "pools", "models", "rpm", "tpm", "max_concurrency", "expires_at"})
_MGET_CHUNK = 500
_WATCH_RETRIES = 100
UNAVAILABLE_MESSAGE = "The key store (Redis) is unavailable."

# KEYS: version, changed. ARGV: key hash, channel, the notice's JSON without its closing
# brace. Bumps the version, records which record it changed, publishes the notice
# carrying that version (queued inside the write's MULTI: all or nothing).
_ANNOUNCE = r"""
local v = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], v, ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3] .. ',"version":' .. string.format('%d', v) .. '}')
return v
"""


def _invalid(exc: ValidationError) -> InvalidKeyRecord:
    first = exc.errors(include_url=False, include_input=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or "record"
    return InvalidKeyRecord(f"Invalid value for '{field}': {first['msg'].removeprefix('Value error, ')}.")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: bytes | str | None) -> int:
    return 0 if value is None else int(value)


def parse_record(raw: bytes | str) -> KeyRecord | None:
    """A stored record, or None (logged) when it does not parse."""
    try:
        return KeyRecord.model_validate_json(raw)
    except ValidationError:
        log.warning("unreadable key record in Redis; ignored")
        return None


class KeyStore:
    """CRUD of key records in Redis; every write publishes a change notice."""

    def __init__(
        self,
        redis: aioredis.Redis,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.prefix = key_prefix
        self.channel = f"{key_prefix}changes"
        self._ids = f"{key_prefix}ids"
        self._version = f"{key_prefix}version"
        self._changed = f"{key_prefix}changed"
        self._clock = clock

    def record_key(self, key_hash: str) -> str:
        return f"{self.prefix}key:{key_hash}"

    def _announce(self, pipe: Any, op: str, record: KeyRecord, key_hash: str) -> None:
        """Queue the version bump, the change record and the notice of one write."""
        notice = json.dumps({"op": op, "id": record.id, "hash": key_hash})
        pipe.eval(_ANNOUNCE, 2, self._version, self._changed, key_hash, self.channel, notice[:-1])

    # ---------------------------------------------------------------- writes

    async def create(
        self,
        *,
        name: str,
        scope: Scope = "user",
        team: str = "",
        user: str = "",
        pools: Sequence[str] = (),
        models: Sequence[str] = (ALL,),
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrency: int | None = None,
        expires_at: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """Store a new key; returns its record and the plain key (shown once, never stored)."""
        try:
            record = KeyRecord(
                id=new_key_id(),
                name=name,
                scope=scope,
                team=team,
                user=user,
                pools=tuple(pools),
                models=tuple(models),
                rpm=rpm,
                tpm=tpm,
                max_concurrency=max_concurrency,
                expires_at=expires_at,
                created_at=int(self._clock()),
            )
        except ValidationError as exc:
            raise _invalid(exc) from None
        key = generate_key()
        key_hash = hash_key(key)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self.record_key(key_hash), record.model_dump_json())
                pipe.hset(self._ids, record.id, key_hash)
                self._announce(pipe, "create", record, key_hash)
                await pipe.execute()
        except RedisError as exc:
            raise TenancyUnavailable(UNAVAILABLE_MESSAGE) from exc
        log.info("api key created", extra={"key_id": record.id, "scope": record.scope})
        return record, key

    async def update(self, key_id: str, **changes: Any) -> KeyRecord:
        """Change a key's name, owner labels, pools, models, limits or expiry (None clears
        a limit or the expiry). KeyNotFound; InvalidKeyRecord for a bad or unknown field."""
        unknown = set(changes) - UPDATABLE_FIELDS
        if unknown:
            raise InvalidKeyRecord(f"These fields cannot be changed: {', '.join(sorted(unknown))}.")

        def apply(record: KeyRecord) -> KeyRecord:
            try:
                return KeyRecord.model_validate({**record.model_dump(), **changes})
            except ValidationError as exc:
                raise _invalid(exc) from None

        return await self._modify(key_id, "update", apply)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key now (kept for listing and audit); revoking twice keeps the first time."""

        def apply(record: KeyRecord) -> KeyRecord:
            if record.revoked_at is not None:
                return record
            return KeyRecord.model_validate({**record.model_dump(), "revoked_at": int(self._clock())})

        record = await self._modify(key_id, "revoke", apply)
        log.info("api key revoked", extra={"key_id": key_id})
        return record

    async def _modify(self, key_id: str, op: str, apply: Callable[[KeyRecord], KeyRecord]) -> KeyRecord:
        """Read, change and write one record under WATCH (a concurrent write retries)."""
        try:
            key_hash = await self._hash_of(key_id)
            key = self.record_key(key_hash)
            async with self.redis.pipeline(transaction=True) as pipe:
                for _ in range(_WATCH_RETRIES):
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        current = parse_record(raw) if raw is not None else None
                        if current is None:
                            raise KeyNotFound(key_id)
                        updated = apply(current)
                        pipe.multi()  # type: ignore[no-untyped-call]
                        pipe.set(key, updated.model_dump_json())
                        self._announce(pipe, op, updated, key_hash)
                        await pipe.execute()
                        return updated
                    except WatchError:
                        await asyncio.sleep(random.uniform(0, 0.005))  # another write won; spread the retries
                        continue
                    finally:
                        await pipe.reset()  # type: ignore[no-untyped-call]
        except RedisError as exc:
            raise TenancyUnavailable(UNAVAILABLE_MESSAGE) from exc
        raise TenancyUnavailable("The key record kept changing under concurrent writes; try again.")

    # ---------------------------------------------------------------- reads

    async def _hash_of(self, key_id: str) -> str:
        key_hash = await self.redis.hget(self._ids, key_id)
        if key_hash is None:
            raise KeyNotFound(key_id)
        return key_hash.decode() if isinstance(key_hash, bytes) else str(key_hash)

    async def hash_of(self, key_id: str) -> str:
        """The SHA-256 hex a key id's record is stored under; KeyNotFound."""
        try:
            return await self._hash_of(key_id)
        except RedisError as exc:
            raise TenancyUnavailable(UNAVAILABLE_MESSAGE) from exc

    async def get(self, key_id: str) -> KeyRecord:
        """The record of ``key_id``; KeyNotFound."""
        try:
            key_hash = await self._hash_of(key_id)
            record = await self.by_hash(key_hash)
        except RedisError as exc:
            raise TenancyUnavailable(UNAVAILABLE_MESSAGE) from exc
        if record is None:
            raise KeyNotFound(key_id)
        return record

    async def by_hash(self, key_hash: str) -> KeyRecord | None:
        """The record stored for a key's SHA-256 hex digest, or None."""
        try:
            raw = await self.redis.get(self.record_key(key_hash))
        except RedisError as exc:
            raise TenancyUnavailable(UNAVAILABLE_MESSAGE) from exc
        return None if raw is None else parse_record(raw)

    async def all_by_hash(self) -> dict[str, KeyRecord]:
        """Every record, by hash."""
        return (await self.load_all())[1]

    async def load_all(self) -> tuple[int, dict[str, KeyRecord]]:
        """The version and every record, by hash (the cache's full reload).

        The version is read with the list of hashes, in one MULTI: every record read
        is at least that recent (a newer one is read again at the next version check,
        which is harmless)."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(self._version)
                pipe.hvals(self._ids)
                raw_version, raw_hashes = await pipe.execute()
            hashes = [_text(h) for h in raw_hashes]
            return _int(raw_version), {
                key_hash: record for key_hash, record in (await self._records(hashes)).items() if record is not None
            }
        except RedisError as exc:
            raise TenancyUnavailable(UNAVAILABLE_MESSAGE) from exc

    async def changed_since(self, version: int) -> tuple[int, builtins.list[str]]:
        """The current version and the hashes of the records written after ``version``
        (one round trip; nothing but the version when nothing changed)."""
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(self._version)
                pipe.zrangebyscore(self._changed, f"({version}", "+inf")
                raw_version, raw_hashes = await pipe.execute()
        except RedisError as exc:
            raise TenancyUnavailable(UNAVAILABLE_MESSAGE) from exc
        return _int(raw_version), [_text(h) for h in raw_hashes]

    async def by_hashes(self, hashes: Sequence[str]) -> dict[str, KeyRecord | None]:
        """The records stored for these hashes (None: no readable record)."""
        try:
            return await self._records(hashes)
        except RedisError as exc:
            raise TenancyUnavailable(UNAVAILABLE_MESSAGE) from exc

    async def _records(self, hashes: Sequence[str]) -> dict[str, KeyRecord | None]:
        out: dict[str, KeyRecord | None] = {}
        for start in range(0, len(hashes), _MGET_CHUNK):
            chunk = hashes[start : start + _MGET_CHUNK]
            raws = await self.redis.mget([self.record_key(h) for h in chunk])
            for key_hash, raw in zip(chunk, raws, strict=True):
                out[key_hash] = None if raw is None else parse_record(raw)
        return out

    async def list(self) -> builtins.list[KeyRecord]:
        """Every record, oldest first."""
        return sorted((await self.all_by_hash()).values(), key=lambda r: (r.created_at, r.id))
