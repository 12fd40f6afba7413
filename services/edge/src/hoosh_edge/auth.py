"""Who is asking: the bearer key -> the principal (a key record, the bootstrap admin,
or the anonymous user of open mode).

A warm request costs a SHA-256, a constant-time compare against the bootstrap admin
key's digest and a dict lookup in the key cache: no Redis round trip.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from hoosh_tenancy import ANONYMOUS, BOOTSTRAP_ADMIN, KEY_PREFIX, KeyCache, KeyRecord, KeyStore, connect_redis

from .config import Settings
from .errors import AuthenticationError, ServiceUnavailableError

_BEARER = b"bearer "
_KEY_PREFIX = KEY_PREFIX.encode()
_KEY_LENGTH = len(KEY_PREFIX) + 43  # generate_key(): the prefix + 43 url-safe base64 characters
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(slots=True)
class Tenancy:
    """The key store (admin routes) and key cache (auth) of one edge process."""

    redis: aioredis.Redis
    store: KeyStore
    cache: KeyCache

    @classmethod
    def connect(cls, settings: Settings) -> Tenancy:
        """Build the client, store and cache (nothing connects until :meth:`start`)."""
        redis = connect_redis(settings.key_store_redis_url)
        store = KeyStore(redis, settings.tenancy_key_prefix)
        return cls(redis=redis, store=store, cache=KeyCache(store))

    async def start(self, wait_seconds: float = 5.0) -> None:
        """Load the keys and subscribe to changes (not fatal when Redis is down: keys are
        then checked in Redis per request, and refused with 503 while it cannot answer)."""
        await self.cache.start(wait_seconds)

    async def close(self) -> None:
        await self.cache.close()
        await self.redis.aclose()


def _unauthorized(message: str) -> AuthenticationError:
    return AuthenticationError(message, headers=_CHALLENGE)


class Authenticator:
    """Turns an ``Authorization`` header into the principal of the request.

    ``keys`` mode: a missing, wrong, revoked or expired key is 401. ``open`` mode: a
    request without a known key is served as :data:`ANONYMOUS`; a known key is still
    checked (revoked or expired: 401) and scoped.
    """

    def __init__(self, *, open_mode: bool, admin_keys: Sequence[str], cache: KeyCache | None = None) -> None:
        self.open_mode = open_mode
        self._admin_digests = tuple(hashlib.sha256(key.encode()).digest() for key in admin_keys)
        self.cache = cache  # set once the app's tenancy is built (lifespan)

    async def principal(self, authorization: bytes | None) -> KeyRecord:
        """The principal, or AuthenticationError (401) / 503 when the key store cannot decide."""
        presented = b""
        if authorization is not None and authorization[:7].lower() == _BEARER:
            presented = authorization[7:].strip()
        if not presented:
            if self.open_mode:
                return ANONYMOUS
            if authorization:
                raise _unauthorized("Incorrect API key provided: use 'Authorization: Bearer <key>'.")
            raise _unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        digest = hashlib.sha256(presented).digest()
        is_admin = False
        for admin_digest in self._admin_digests:  # no early exit: the time says nothing
            is_admin |= hmac.compare_digest(digest, admin_digest)
        if is_admin:
            return BOOTSTRAP_ADMIN
        record = None
        # Only something shaped like a hoosh key can be one: anything else costs no lookup.
        if len(presented) == _KEY_LENGTH and presented.startswith(_KEY_PREFIX):
            cache = self.cache
            if cache is None:
                raise ServiceUnavailableError("The gateway is starting; try again shortly.")
            record = await cache.lookup(digest.hex())  # TenancyUnavailable -> 503
        if record is None:
            if self.open_mode:
                return ANONYMOUS
            raise _unauthorized("Incorrect API key provided.")
        if record.revoked_at is not None:
            raise _unauthorized("This API key has been revoked.")
        if record.expires_at is not None and time.time() >= record.expires_at:
            raise _unauthorized("This API key has expired.")
        return record
