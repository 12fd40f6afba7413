"""Who is asking: the bearer key -> the principal (a key record, the bootstrap admin,
or the anonymous user of open mode).

A warm request costs a SHA-256, a constant-time compare against the bootstrap admin
key's digest and a dict lookup in the key cache: no Redis round trip.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import time
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from hoosh_metering.limits import KeyGate, KeyLimiter
from hoosh_metering.redis import RedisClient
from hoosh_metering.redis import connect_redis as connect_budget_redis
from hoosh_tenancy import ANONYMOUS, BOOTSTRAP_ADMIN, KEY_PREFIX, KeyCache, KeyRecord, KeyStore, connect_redis

from .config import Settings
from .errors import AuthenticationError, ServiceUnavailableError

_BEARER = b"bearer "
_KEY_PREFIX = KEY_PREFIX.encode()
_KEY_LENGTH = len(KEY_PREFIX) + 43  # generate_key(): the prefix + 43 url-safe base64 characters
_CHALLENGE = {"WWW-Authenticate": "Bearer"}
_OPEN_ELSEWHERE = (
    "Missing API key: without a key this gateway serves only requests from its own machine; "
    "send 'Authorization: Bearer <key>'."
)


@dataclass(slots=True)
class Tenancy:
    """The key store (admin routes), key cache (auth) and key limits (the calls the edge
    answers itself) of one edge process."""

    redis: aioredis.Redis
    store: KeyStore
    cache: KeyCache
    limits_redis: RedisClient
    limits: KeyGate

    @classmethod
    def connect(cls, settings: Settings) -> Tenancy:
        """Build the clients, store, cache and limiter (nothing connects until used).

        The limiter counts in the budget's Redis (``HOOSH_REDIS_URL``, a cluster
        allowed) under the budget's prefix: the same windows the router counts in. The
        key records may live in another, single-node Redis (``HOOSH_TENANCY_REDIS_URL``)."""
        redis = connect_redis(settings.key_store_redis_url)
        store = KeyStore(redis, settings.tenancy_key_prefix)
        limits_redis = connect_budget_redis(settings.redis_url)
        limiter = KeyLimiter(limits_redis, settings.budget_key_prefix)
        return cls(redis=redis, store=store, cache=KeyCache(store), limits_redis=limits_redis, limits=KeyGate(limiter))

    async def start(self, wait_seconds: float = 5.0) -> None:
        """Load the keys and subscribe to changes (not fatal when Redis is down: keys are
        then checked in Redis per request, and refused with 503 while it cannot answer)."""
        await self.cache.start(wait_seconds)

    async def close(self) -> None:
        await self.cache.close()
        await self.limits.drain(0)  # finishes still waiting: the in-flight TTL frees those slots
        await self.redis.aclose()
        await self.limits_redis.aclose()


def is_loopback_client(client: tuple[str, int] | list[object] | None) -> bool:
    """Whether an ASGI ``scope["client"]`` is this machine: 127.0.0.0/8, ``::1`` or an
    IPv4-mapped 127.x. No client (a Unix socket, an unusual server) is not."""
    if not client:
        return False
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _unauthorized(message: str) -> AuthenticationError:
    return AuthenticationError(message, headers=_CHALLENGE)


class Authenticator:
    """Turns an ``Authorization`` header into the principal of the request.

    ``keys`` mode: a missing, wrong, revoked or expired key is 401. ``open`` mode: a
    request without a known key is served as :data:`ANONYMOUS` when it comes from this
    machine (the socket's peer is a loopback address, whatever the server binds), and
    is 401 otherwise; a known key is still checked (revoked or expired: 401) and scoped.
    """

    def __init__(self, *, open_mode: bool, admin_keys: Sequence[str], cache: KeyCache | None = None) -> None:
        self.open_mode = open_mode
        self._admin_digests = tuple(hashlib.sha256(key.encode()).digest() for key in admin_keys)
        self.cache = cache  # set once the app's tenancy is built (lifespan)

    async def principal(
        self, authorization: bytes | None, client: tuple[str, int] | list[object] | None = None
    ) -> KeyRecord:
        """The principal, or AuthenticationError (401) / 503 when the key store cannot decide.

        ``client``: the ASGI scope's client (the peer address), which decides whether
        open mode may serve the request anonymously."""
        presented = b""
        if authorization is not None and authorization[:7].lower() == _BEARER:
            presented = authorization[7:].strip()
        if not presented:
            if self.open_mode and is_loopback_client(client):
                return ANONYMOUS
            if self.open_mode:
                raise _unauthorized(_OPEN_ELSEWHERE)
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
            if self.open_mode and is_loopback_client(client):
                return ANONYMOUS
            raise _unauthorized("Incorrect API key provided.")
        if record.revoked_at is not None:
            raise _unauthorized("This API key has been revoked.")
        if record.expires_at is not None and time.time() >= record.expires_at:
            raise _unauthorized("This API key has expired.")
        return record
