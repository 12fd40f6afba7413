"""hoosh tenancy: API key records (hashes only) in Redis, the in-memory key cache kept
current by change notifications, and the scope checks of a key."""

from hoosh_metering.pools import POOL_NAME

from .cache import KeyCache
from .errors import InvalidKeyRecord, KeyNotFound, TenancyError, TenancyUnavailable
from .keys import (
    ALL,
    ANONYMOUS,
    BOOTSTRAP_ADMIN,
    DEFAULT_POOL,
    KEY_PREFIX,
    KeyRecord,
    Scope,
    generate_key,
    hash_key,
    valid_model_id,
)
from .redis import DEFAULT_KEY_PREFIX, connect_redis
from .store import KeyStore

__all__ = [
    "ALL",
    "ANONYMOUS",
    "BOOTSTRAP_ADMIN",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_POOL",
    "KEY_PREFIX",
    "POOL_NAME",
    "InvalidKeyRecord",
    "KeyCache",
    "KeyNotFound",
    "KeyRecord",
    "KeyStore",
    "Scope",
    "TenancyError",
    "TenancyUnavailable",
    "connect_redis",
    "generate_key",
    "hash_key",
    "valid_model_id",
]
