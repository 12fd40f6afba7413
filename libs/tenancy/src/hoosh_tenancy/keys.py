"""API keys: the record (what Redis holds, never the key), key generation and hashing,
and the scope checks the edge runs on every request.

A record's checks are precomputed when it is built (the pool set, the exact model
names, the glob patterns) and glob results are memoized per record, so the hot path
does set lookups, not pattern matching. A changed record is a new object: its memo
starts empty.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from fnmatch import fnmatchcase
from typing import Any, Literal

from hoosh.tenancy.v1 import tenancy_pb2
from hoosh_common.model_ids import model_id_problem
from hoosh_metering.pools import POOL_NAME  # the metering's rule: pool names sit inside Redis hash tags
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Scope = Literal["admin", "user"]

KEY_PREFIX = "sk-hoosh-"
ALL = "*"  # in ``pools``: every pool; in ``models``: every model
DEFAULT_POOL = "default"

# Model ids reach URLs and logs: a closed alphabet, bounded length.
# The same alphabet plus fnmatch's wildcards and character classes.
MODEL_PATTERN = re.compile(r"[A-Za-z0-9._:/@+*?\[\]!-]{1,256}")
_WILDCARDS = frozenset("*?[")

MAX_POOLS = 64
MAX_MODELS = 256
_MODEL_MEMO_SIZE = 1024


def generate_key() -> str:
    """A new API key: ``sk-hoosh-`` + 256 random bits (43 url-safe base64 characters)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str | bytes) -> str:
    """The SHA-256 hex digest Redis stores in place of the key."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def new_key_id() -> str:
    """A record id (``key_`` + 96 random bits): safe to log, show and put in events."""
    return "key_" + secrets.token_hex(12)


def valid_model_id(model: str) -> bool:
    """Whether ``model`` uses only ``[A-Za-z0-9._:/@+-]``, is 1-256 characters long and has
    no empty, ``.`` or ``..`` segment between slashes (an id may end up in a URL path)."""
    return model_id_problem(model) is None


class KeyRecord(BaseModel):
    """One API key as Redis holds it (the key itself is only ever shown at creation)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(description="The key's id (key_...): safe to log, shown in events and audit entries")
    name: str = Field(min_length=1, max_length=128, description="A label for people")
    scope: Scope = Field(
        default="user", description="admin: manages keys and pools, sees everything; user: its own pools and models"
    )
    team: str = Field(default="", max_length=128, description="Owner label: the team")
    user: str = Field(default="", max_length=128, description="Owner label: the person or service")
    pools: tuple[str, ...] = Field(
        default=(),
        max_length=MAX_POOLS,
        description="Pools it may charge; the first is its default; '*' = every pool. "
        "A user key without pools gets ['default']",
    )
    models: tuple[str, ...] = Field(
        default=(ALL,),
        min_length=1,
        max_length=MAX_MODELS,
        description="Models it may use: exact ids or glob patterns (fnmatch, case-sensitive, matched against the "
        "requested id as given, 'provider/model' included); ['*'] = every model",
    )
    rpm: int | None = Field(default=None, ge=1, description="Requests per minute; null = no limit of its own")
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute; null = no limit of its own")
    max_concurrency: int | None = Field(default=None, ge=1, description="Requests in flight; null = no limit")
    expires_at: int | None = Field(default=None, ge=0, description="Unix seconds after which it is refused")
    created_at: int = Field(default=0, ge=0, description="Unix seconds")
    revoked_at: int | None = Field(default=None, ge=0, description="Unix seconds; null while it is valid")

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, pools: tuple[str, ...]) -> tuple[str, ...]:
        for pool in pools:
            if pool != ALL and not POOL_NAME.fullmatch(pool):
                raise ValueError(f"pool '{pool[:80]}' is not a pool name ([A-Za-z0-9._-], 1-64 characters) or '*'")
        return tuple(dict.fromkeys(pools))  # duplicates dropped, order kept (the first is the default)

    @field_validator("models")
    @classmethod
    def _model_patterns(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        for model in models:
            if not MODEL_PATTERN.fullmatch(model):
                raise ValueError(
                    f"model '{model[:80]}' is not a model id or glob pattern ([A-Za-z0-9._:/@+-] and * ? [ ] !, "
                    "1-256 characters)"
                )
        return tuple(dict.fromkeys(models))

    @model_validator(mode="before")
    @classmethod
    def _user_keys_have_a_pool(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("scope", "user") == "user" and not data.get("pools"):
            data = {**data, "pools": (DEFAULT_POOL,)}
        return data

    def model_post_init(self, context: object, /) -> None:
        # Kept in the instance __dict__ (not a pydantic private attribute, whose every read
        # goes through BaseModel.__getattr__): the hot path reads it on each request.
        # Serialization, repr and equality look at the fields only.
        self.__dict__["_checks"] = _Checks(self)

    def __eq__(self, other: object) -> bool:
        # The fields only: the precomputed checks are not part of a record's value.
        return isinstance(other, KeyRecord) and all(
            getattr(self, name) == getattr(other, name) for name in type(self).model_fields
        )

    __hash__ = None  # type: ignore[assignment]  # equality by value, records are not set members

    # ---------------------------------------------------------------- checks

    @property
    def is_admin(self) -> bool:
        return self.scope == "admin"

    @property
    def all_pools(self) -> bool:
        """Whether it may charge any pool (admin, or ``'*'`` among its pools)."""
        checks: _Checks = self.__dict__["_checks"]
        return checks.all_pools

    @property
    def default_pool(self) -> str:
        """The pool a request without one is charged to: the first named pool, else ``default``."""
        for pool in self.pools:
            if pool != ALL:
                return pool
        return DEFAULT_POOL

    def allows_pool(self, pool: str) -> bool:
        checks: _Checks = self.__dict__["_checks"]
        return checks.all_pools or pool in checks.pools

    def allows_model(self, model: str) -> bool:
        """Whether ``model`` (as requested, ``provider/model`` included) matches one of its ids or patterns."""
        checks: _Checks = self.__dict__["_checks"]
        if checks.all_models or model in checks.exact_models:
            return True
        memo = checks.memo
        allowed = memo.get(model)
        if allowed is None:
            allowed = any(fnmatchcase(model, pattern) for pattern in checks.patterns)
            if len(memo) >= _MODEL_MEMO_SIZE:
                memo.clear()  # bounded: a client cycling through ids cannot grow it
            memo[model] = allowed
        return allowed

    def usable(self, now: float) -> bool:
        """Not revoked and not expired at ``now`` (Unix seconds)."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def caller(self) -> tenancy_pb2.Caller:
        """The principal as internal services receive it (built once per record; do not mutate)."""
        checks: _Checks = self.__dict__["_checks"]
        if checks.caller is None:
            checks.caller = tenancy_pb2.Caller(
                key_id=self.id,
                key_name=self.name,
                team=self.team,
                user=self.user,
                admin=self.is_admin,
                rpm=self.rpm or 0,
                tpm=self.tpm or 0,
                max_concurrency=self.max_concurrency or 0,
            )
        return checks.caller


class _Checks:
    """A record's scope checks, precomputed once per record."""

    __slots__ = ("all_models", "all_pools", "caller", "exact_models", "memo", "patterns", "pools")

    def __init__(self, record: KeyRecord) -> None:
        admin = record.scope == "admin"
        self.all_pools = admin or ALL in record.pools
        self.pools = frozenset(record.pools)
        self.all_models = admin or ALL in record.models
        self.exact_models = frozenset(m for m in record.models if not _WILDCARDS.intersection(m))
        self.patterns = tuple(m for m in record.models if _WILDCARDS.intersection(m))
        self.memo: dict[str, bool] = {}
        self.caller: tenancy_pb2.Caller | None = None


# The edge's built-in principals (never stored).
BOOTSTRAP_ADMIN = KeyRecord(id="admin", name="bootstrap admin", scope="admin")
ANONYMOUS = KeyRecord(id="", name="anonymous", scope="user", pools=(ALL,), models=(ALL,))
