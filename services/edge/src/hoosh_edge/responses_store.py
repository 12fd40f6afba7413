"""Stored responses of the Responses API (``store: true``), in Redis, so that any edge
replica answers ``GET /v1/responses/{id}``, its input items and ``DELETE``, and continues
a conversation by ``previous_response_id``.

One key per response, ``<prefix><response id>``, holding one JSON document: the owner
(the key id that created it), the response object, this request's input items and, for
a completed or incomplete response (the only ones previous_response_id continues), the
whole conversation up to and including the response's output (so continuing it costs one
GET, whatever its length, and an earlier turn expiring does not break a later one). Keys
expire ``HOOSH_RESPONSES_TTL_SECONDS`` after they were written. A single key per response
works unchanged on Redis Cluster. Another key's response is indistinguishable from a
missing one (404), so ids cannot be probed.

A background response (``background: true``) is written ``queued`` at once and moves on
by compare-and-set (:meth:`ResponsesStore.replace`, WATCH/MULTI on its one key): to
``in_progress`` and then ``completed`` / ``incomplete`` / ``failed`` by the edge that runs
it, or to ``cancelled`` by whichever edge receives the cancel; the first of a finish and
a cancel wins and the other changes nothing. While it runs, a second small key,
``<prefix><response id>:run``, is its lease: the running edge renews it every poll
(``EXPIRE``, which also tells it the key is gone: cancelled or deleted elsewhere) and
deletes it when done; a cancel or a delete removes it. An active background response
whose lease has lapsed was left by an edge that died: the next read marks it ``failed``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from hoosh_metering.redis import RedisClient
from redis.exceptions import RedisError, WatchError

from .errors import ServiceUnavailableError

log = logging.getLogger(__name__)

STORE_UNAVAILABLE = "The response store (Redis) is unavailable; try again shortly."
_WATCH_RETRIES = 8


@dataclass(slots=True)
class StoredResponse:
    """One stored response: what its owner may read back and continue from."""

    owner: str
    response: dict[str, Any]
    input_items: list[dict[str, Any]] = field(default_factory=list)
    # Every item of the conversation up to and including this response's output, in order
    # (earlier inputs and outputs first): what a previous_response_id continues from.
    conversation: list[dict[str, Any]] = field(default_factory=list)

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "owner": self.owner,
                "response": self.response,
                "input_items": self.input_items,
                "conversation": self.conversation,
            }
        )

    @property
    def status(self) -> str:
        return str(self.response.get("status", ""))

    @classmethod
    def decode(cls, raw: bytes | str) -> StoredResponse:
        data = orjson.loads(raw)
        return cls(
            owner=str(data["owner"]),
            response=dict(data["response"]),
            input_items=list(data.get("input_items") or []),
            conversation=list(data.get("conversation") or []),
        )


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _unavailable(exc: RedisError) -> ServiceUnavailableError:
    log.warning("response store failed", extra={"detail": repr(exc)})
    return ServiceUnavailableError(STORE_UNAVAILABLE, code="store_unavailable")


class ResponsesStore:
    """Save, load and delete stored responses; every read checks the owner."""

    def __init__(self, redis: RedisClient, prefix: str, ttl_seconds: int) -> None:
        self._redis = redis
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds

    def key(self, response_id: str) -> str:
        return f"{self.prefix}{response_id}"

    def run_key(self, response_id: str) -> str:
        """The lease of a running background response (its edge renews it)."""
        return f"{self.prefix}{response_id}:run"

    async def save_running(self, stored: StoredResponse, lease_seconds: float) -> None:
        """Write a queued background response and its lease together. 503 when Redis cannot."""
        response_id = str(stored.response["id"])
        try:
            # Not a transaction (the two keys may sit in different cluster slots): the lease
            # first, so the record is never active without one.
            await self._redis.set(self.run_key(response_id), b"1", ex=_whole_seconds(lease_seconds))
            await self._redis.set(self.key(response_id), stored.encode(), ex=self.ttl_seconds)
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def renew_run(self, response_id: str, lease_seconds: float) -> bool:
        """Extend a run's lease; False when it is gone (cancelled, deleted, or lapsed)."""
        try:
            return bool(await self._redis.expire(self.run_key(response_id), _whole_seconds(lease_seconds)))
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def run_alive(self, response_id: str) -> bool:
        try:
            return bool(await self._redis.exists(self.run_key(response_id)))
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def end_run(self, response_id: str) -> None:
        """Drop a run's lease (it finished, was cancelled or deleted); errors only logged:
        a lease left behind lapses by itself."""
        try:
            await self._redis.delete(self.run_key(response_id))
        except RedisError as exc:
            log.warning("could not drop a background response's lease", extra={"detail": repr(exc)})

    async def save(self, stored: StoredResponse) -> None:
        """Write (or overwrite) a response with a fresh TTL. 503 when Redis cannot."""
        try:
            await self._redis.set(self.key(str(stored.response["id"])), stored.encode(), ex=self.ttl_seconds)
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def load(self, response_id: str, owner: str) -> StoredResponse | None:
        """The response if it exists, has not expired and belongs to ``owner``; else None."""
        stored = await self.peek(response_id)
        return stored if stored is not None and stored.owner == owner else None

    async def peek(self, response_id: str) -> StoredResponse | None:
        """The response whoever owns it (the edge's own use: never answered as is)."""
        try:
            raw = await self._redis.get(self.key(response_id))
        except RedisError as exc:
            raise _unavailable(exc) from exc
        return StoredResponse.decode(raw) if raw is not None else None

    async def delete(self, response_id: str, owner: str) -> bool:
        """Delete the owner's response; False when there is none (or it is another's)."""
        if await self.load(response_id, owner) is None:
            return False
        try:
            # Ids are never reused and the owner of an id never changes: no race to guard.
            # The lease goes too, so an edge running it stops at its next renewal.
            return bool(await self._redis.delete(self.key(response_id), self.run_key(response_id)))
        except RedisError as exc:
            raise _unavailable(exc) from exc

    async def replace(
        self, response_id: str, change: Callable[[StoredResponse], StoredResponse | None]
    ) -> StoredResponse | None:
        """Compare-and-set: read the response under WATCH, let ``change`` decide (the new
        record, or None to leave it as it is) and write it with a fresh TTL; a concurrent
        write makes it read and decide again. The record written, or None (none written:
        the response is gone, or ``change`` declined)."""
        key = self.key(response_id)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                for _ in range(_WATCH_RETRIES):
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        updated = change(StoredResponse.decode(raw)) if raw is not None else None
                        if updated is None:
                            return None
                        pipe.multi()  # type: ignore[no-untyped-call]
                        pipe.set(key, updated.encode(), ex=self.ttl_seconds)
                        await pipe.execute()
                        return updated
                    except WatchError:
                        await asyncio.sleep(random.uniform(0, 0.005))  # another write won: decide again
                    finally:
                        await pipe.reset()  # type: ignore[no-untyped-call]
        except RedisError as exc:
            raise _unavailable(exc) from exc
        raise ServiceUnavailableError(
            "The stored response kept changing under concurrent writes; try again.", code="store_unavailable"
        )
