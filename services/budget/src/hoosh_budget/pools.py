"""Named token pools in Redis: check, reserve, commit, release, leases.

Every operation is one Redis round trip: a Lua script (EVALSHA) that reads and
writes atomically, so concurrent replicas can never take a pool below zero and
every reservation ends exactly once. Lease clocks use Redis ``TIME`` so that
replicas with skewed clocks agree.

Keys, all under ``key_prefix``:

- ``pools``            set of pool names
- ``pool:<name>``      hash: capacity, used, reserved
- ``lease:<name>``     sorted set: reservation id -> lease expiry (ms since epoch)
- ``res:<id>``         hash: pool, tokens, state (active|committed|released|expired), expires

An ended reservation keeps its hash (state != active) for ``ended_retention_seconds``
so a late or repeated commit/release still answers ``already_ended`` with its pool.

This module has no gRPC imports: any service may use :class:`BudgetStore` in-process.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from hoosh_budget.errors import BudgetExhausted, InvalidAmount, InvalidArgument, PoolNotFound

log = logging.getLogger(__name__)

# Lua numbers are doubles: stay where every integer is exact.
MAX_TOKENS = 2**53 - 1
MAX_NAME_LENGTH = 256

EndState = Literal["committed", "released", "expired", "unknown"]
_ENDED_STATES: dict[str, EndState] = {"committed": "committed", "released": "released", "expired": "expired"}

# Shared Lua helpers, prepended to every script. ARGV[1] is always the key prefix.
_PRELUDE = r"""
local prefix = ARGV[1]
local pools_key = prefix .. 'pools'
local function int(x) return string.format('%d', x) end
local function pool_key(name) return prefix .. 'pool:' .. name end
local function lease_key(name) return prefix .. 'lease:' .. name end
local function res_key(id) return prefix .. 'res:' .. id end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- {name, capacity, used, reserved}, or false when the pool does not exist.
local function view(name)
  local v = redis.call('HMGET', pool_key(name), 'capacity', 'used', 'reserved')
  if not v[1] then return false end
  return {name, tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0}
end

-- reserved -= n, saturating at 0 (the seed's semantics; never negative).
local function unreserve(pool, n)
  if n <= 0 then return end
  local pk = pool_key(pool)
  local reserved = tonumber(redis.call('HGET', pk, 'reserved'))
  if not reserved then return end
  local take = math.min(reserved, n)
  if take > 0 then redis.call('HINCRBY', pk, 'reserved', int(-take)) end
end

-- Move an active reservation to a final state; it lingers ended_ttl seconds.
local function finish(id, pool, tokens, state, ended_ttl)
  local rk = res_key(id)
  unreserve(pool, tokens)
  redis.call('ZREM', lease_key(pool), id)
  redis.call('HSET', rk, 'state', state)
  redis.call('EXPIRE', rk, int(ended_ttl))
end

-- End up to `limit` expired leases of a pool, giving their tokens back.
local function reclaim(pool, now, ended_ttl, limit)
  local lk = lease_key(pool)
  local ids = redis.call('ZRANGEBYSCORE', lk, '-inf', int(now), 'LIMIT', 0, int(limit))
  if #ids == 0 then return 0 end
  local freed = 0
  for _, id in ipairs(ids) do
    local rk = res_key(id)
    local r = redis.call('HMGET', rk, 'pool', 'tokens', 'state')
    if r[3] == 'active' and r[1] == pool then
      freed = freed + tonumber(r[2])
      redis.call('HSET', rk, 'state', 'expired')
      redis.call('EXPIRE', rk, int(ended_ttl))
    end
  end
  redis.call('ZREM', lk, unpack(ids))
  unreserve(pool, freed)
  return #ids
end
"""

# ARGV: prefix, pool, tokens, id, lease_ms, ended_ttl, limit, default_retry
_RESERVE = (
    _PRELUDE
    + r"""
local pool, tokens, id = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local lease_ms, ended_ttl = tonumber(ARGV[5]), tonumber(ARGV[6])
local limit, default_retry = tonumber(ARGV[7]), tonumber(ARGV[8])
local now = now_ms()
if redis.call('EXISTS', pool_key(pool)) == 0 then return {'not_found'} end
reclaim(pool, now, ended_ttl, limit)

-- Idempotency: an active reservation with this id is returned as it is.
local rk = res_key(id)
local cur = redis.call('HMGET', rk, 'pool', 'tokens', 'state', 'expires')
if cur[3] == 'active' then
  local expires = tonumber(cur[4])
  if expires > now then
    return {'existing', view(cur[1]), tonumber(cur[2]), expires}
  end
  finish(id, cur[1], tonumber(cur[2]), 'expired', ended_ttl)
end

local v = view(pool)
local raw = v[2] - v[3] - v[4]
if raw >= tokens then
  local expires = now + lease_ms
  redis.call('HINCRBY', pool_key(pool), 'reserved', int(tokens))
  redis.call('DEL', rk)  -- an ended record reusing this id
  redis.call('HSET', rk, 'pool', pool, 'tokens', int(tokens), 'state', 'active', 'expires', int(expires))
  redis.call('ZADD', lease_key(pool), int(expires), id)
  v[4] = v[4] + tokens
  return {'ok', v, tokens, expires}
end

-- Not enough: when would the outstanding leases, expiring in order, cover it?
local retry = default_retry
if raw + v[4] >= tokens then
  local leases = redis.call('ZRANGE', lease_key(pool), 0, int(limit - 1), 'WITHSCORES')
  local freed = 0
  for i = 1, #leases, 2 do
    freed = freed + (tonumber(redis.call('HGET', res_key(leases[i]), 'tokens')) or 0)
    if raw + freed >= tokens then
      retry = math.max(1, math.ceil((tonumber(leases[i + 1]) - now) / 1000))
      break
    end
  end
end
return {'exhausted', v, math.max(0, raw), retry}
"""
)

# ARGV: prefix, id, used_tokens, mode (commit|release), ended_ttl
_END = (
    _PRELUDE
    + r"""
local id, used, mode, ended_ttl = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local now = now_ms()
local cur = redis.call('HMGET', res_key(id), 'pool', 'tokens', 'state', 'expires')
if not cur[1] then return {'unknown', false} end
local pool = cur[1]
if cur[3] ~= 'active' then return {cur[3], view(pool)} end
if tonumber(cur[4]) <= now then
  finish(id, pool, tonumber(cur[2]), 'expired', ended_ttl)
  return {'expired', view(pool)}
end
if mode == 'commit' then
  finish(id, pool, tonumber(cur[2]), 'committed', ended_ttl)
  -- Metering is honest: usage may exceed the reservation and even the capacity.
  if used > 0 and redis.call('EXISTS', pool_key(pool)) == 1 then
    redis.call('HINCRBY', pool_key(pool), 'used', int(used))
  end
else
  finish(id, pool, tonumber(cur[2]), 'released', ended_ttl)
end
return {'ok', view(pool)}
"""
)

# ARGV: prefix, pool, reserved, actual
_REPORT = (
    _PRELUDE
    + r"""
local pool, reserved, actual = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', pool_key(pool)) == 0 then return {'not_found'} end
unreserve(pool, reserved)
if actual > 0 then redis.call('HINCRBY', pool_key(pool), 'used', int(actual)) end
return {'ok', view(pool)}
"""
)

# ARGV: prefix, pool, ended_ttl, limit. Reclaims expired leases first so the view is current.
_VIEW = (
    _PRELUDE
    + r"""
local pool, ended_ttl, limit = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', pool_key(pool)) == 0 then return {'not_found'} end
reclaim(pool, now_ms(), ended_ttl, limit)
return {'ok', view(pool)}
"""
)

# ARGV: prefix, ended_ttl, limit
_LIST = (
    _PRELUDE
    + r"""
local ended_ttl, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local out = {}
for _, name in ipairs(redis.call('SMEMBERS', pools_key)) do
  if redis.call('EXISTS', pool_key(name)) == 1 then
    reclaim(name, now, ended_ttl, limit)
    out[#out + 1] = view(name)
  else
    redis.call('SREM', pools_key, name)
  end
end
return out
"""
)

# ARGV: prefix, pool, capacity, mode (set: always; nx: only when the pool is new)
_UPSERT = (
    _PRELUDE
    + r"""
local pool, capacity, mode = ARGV[2], ARGV[3], ARGV[4]
local pk = pool_key(pool)
if mode == 'nx' then
  redis.call('HSETNX', pk, 'capacity', capacity)
else
  redis.call('HSET', pk, 'capacity', capacity)
end
redis.call('HSETNX', pk, 'used', 0)
redis.call('HSETNX', pk, 'reserved', 0)
redis.call('SADD', pools_key, pool)
return view(pool)
"""
)

# ARGV: prefix, ended_ttl, limit. Returns how many expired leases were ended.
_REAP = (
    _PRELUDE
    + r"""
local ended_ttl, limit = tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local ended = 0
for _, name in ipairs(redis.call('SMEMBERS', pools_key)) do
  ended = ended + reclaim(name, now, ended_ttl, limit)
end
return ended
"""
)


@dataclass(frozen=True, slots=True)
class PoolView:
    """A pool's counters at one instant."""

    name: str
    capacity: int
    used: int
    reserved: int

    @property
    def available(self) -> int:
        """Tokens that can still be reserved: ``max(0, capacity - used - reserved)``."""
        return max(0, self.capacity - self.used - self.reserved)


@dataclass(frozen=True, slots=True)
class CheckResult:
    allowed: bool
    pool: PoolView


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted (or, with ``created=False``, an already existing) reservation."""

    reservation_id: str
    pool: PoolView
    tokens: int
    lease_expires_at_ms: int  # Redis clock, ms since the epoch
    created: bool


@dataclass(frozen=True, slots=True)
class EndResult:
    """The outcome of a commit or release.

    ``already_ended`` is true when this call changed nothing: the reservation was
    committed, released or expired before (``state`` says which; ``unknown`` when
    the id was never seen or its record is past retention, and then ``pool`` is None).
    """

    pool: PoolView | None
    already_ended: bool
    state: EndState


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _view(raw: Any) -> PoolView | None:
    if not raw:
        return None
    return PoolView(name=_str(raw[0]), capacity=int(raw[1]), used=int(raw[2]), reserved=int(raw[3]))


def _require_view(raw: Any, pool: str) -> PoolView:
    view = _view(raw)
    if view is None:  # the pool hash vanished: only an operator deleting keys does that
        raise PoolNotFound(pool)
    return view


def _check_name(value: str, what: str) -> None:
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME_LENGTH} characters")


def _check_amount(value: int, what: str) -> None:
    if value < 0:
        raise InvalidAmount(f"{what} must not be negative (got {value})")
    if value > MAX_TOKENS:
        raise InvalidAmount(f"{what} must be at most {MAX_TOKENS} (got {value})")


class BudgetStore:
    """Token pools in Redis; each method is one round trip (a Lua script via EVALSHA).

    Safe to share between coroutines and across replicas: Redis serialises the scripts.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        key_prefix: str,
        default_lease_seconds: int,
        *,
        default_retry_after_seconds: int = 60,
        ended_retention_seconds: int = 600,
        reclaim_batch: int = 256,
    ) -> None:
        if default_lease_seconds <= 0:
            raise ValueError("default_lease_seconds must be positive")
        self._redis = redis
        self.key_prefix = key_prefix
        self.default_lease_seconds = default_lease_seconds
        self.default_retry_after_seconds = default_retry_after_seconds
        self.ended_retention_seconds = ended_retention_seconds
        self.reclaim_batch = reclaim_batch
        # register_script runs EVALSHA and loads the script once on NOSCRIPT.
        self._reserve = redis.register_script(_RESERVE)
        self._end = redis.register_script(_END)
        self._report = redis.register_script(_REPORT)
        self._view = redis.register_script(_VIEW)
        self._list = redis.register_script(_LIST)
        self._upsert = redis.register_script(_UPSERT)
        self._reap = redis.register_script(_REAP)

    async def check(self, pool: str, tokens: int) -> CheckResult:
        """Whether ``tokens`` could be reserved in ``pool`` now (reserves nothing).

        Raises PoolNotFound, InvalidArgument, InvalidAmount.
        """
        _check_amount(tokens, "tokens")
        view = await self.get_pool(pool)
        return CheckResult(allowed=view.available >= tokens, pool=view)

    async def reserve(
        self, pool: str, tokens: int, reservation_id: str, lease_seconds: float | None = None
    ) -> Reservation:
        """Reserve ``tokens`` in ``pool`` under ``reservation_id`` for a lease.

        Expired leases of the pool are reclaimed first. Idempotent: if
        ``reservation_id`` is already active, that reservation is returned with
        ``created=False`` and nothing more is reserved. A lease of None or 0 uses the
        store's default. Raises PoolNotFound, BudgetExhausted, InvalidArgument,
        InvalidAmount.
        """
        _check_name(pool, "pool")
        _check_name(reservation_id, "reservation_id")
        _check_amount(tokens, "tokens")
        if lease_seconds is not None and lease_seconds < 0:
            raise InvalidAmount(f"lease_seconds must not be negative (got {lease_seconds})")
        lease_ms = int((lease_seconds or self.default_lease_seconds) * 1000)
        result = await self._reserve(
            args=[
                self.key_prefix,
                pool,
                tokens,
                reservation_id,
                max(1, lease_ms),
                self.ended_retention_seconds,
                self.reclaim_batch,
                self.default_retry_after_seconds,
            ]
        )
        status = _str(result[0])
        if status == "not_found":
            raise PoolNotFound(pool)
        if status == "exhausted":
            raise BudgetExhausted(pool, tokens, available=int(result[2]), retry_after_seconds=int(result[3]))
        return Reservation(
            reservation_id=reservation_id,
            pool=_require_view(result[1], pool),
            tokens=int(result[2]),
            lease_expires_at_ms=int(result[3]),
            created=status == "ok",
        )

    async def commit(self, reservation_id: str, used_tokens: int) -> EndResult:
        """End a reservation with its actual usage: ``reserved -= tokens; used += used_tokens``.

        Exactly once: a repeated commit or release, or one after the lease expired,
        changes nothing and answers ``already_ended=True``. Raises InvalidArgument,
        InvalidAmount.
        """
        _check_name(reservation_id, "reservation_id")
        _check_amount(used_tokens, "used_tokens")
        return await self._finish(reservation_id, used_tokens, "commit")

    async def release(self, reservation_id: str) -> EndResult:
        """End a reservation without usage (``reserved -= tokens``); exactly once, like commit."""
        _check_name(reservation_id, "reservation_id")
        return await self._finish(reservation_id, 0, "release")

    async def _finish(self, reservation_id: str, used_tokens: int, mode: str) -> EndResult:
        result = await self._end(
            args=[self.key_prefix, reservation_id, used_tokens, mode, self.ended_retention_seconds]
        )
        status = _str(result[0])
        view = _view(result[1])
        if status == "ok":
            return EndResult(pool=view, already_ended=False, state="committed" if mode == "commit" else "released")
        return EndResult(pool=view, already_ended=True, state=_ENDED_STATES.get(status, "unknown"))

    async def report(self, pool: str, reserved: int, actual: int) -> PoolView:
        """Untracked accounting (the seed's report): ``reserved -= reserved`` (saturating), ``used += actual``.

        Raises PoolNotFound, InvalidArgument, InvalidAmount.
        """
        _check_name(pool, "pool")
        _check_amount(reserved, "reserved")
        _check_amount(actual, "actual")
        result = await self._report(args=[self.key_prefix, pool, reserved, actual])
        if _str(result[0]) == "not_found":
            raise PoolNotFound(pool)
        return _require_view(result[1], pool)

    async def get_pool(self, pool: str) -> PoolView:
        """The pool's counters, after reclaiming its expired leases. Raises PoolNotFound."""
        _check_name(pool, "pool")
        result = await self._view(args=[self.key_prefix, pool, self.ended_retention_seconds, self.reclaim_batch])
        if _str(result[0]) == "not_found":
            raise PoolNotFound(pool)
        return _require_view(result[1], pool)

    async def list_pools(self) -> list[PoolView]:
        """Every pool, sorted by name, after reclaiming expired leases."""
        result = await self._list(args=[self.key_prefix, self.ended_retention_seconds, self.reclaim_batch])
        views = [view for raw in result if (view := _view(raw)) is not None]
        return sorted(views, key=lambda view: view.name)

    async def upsert_pool(self, pool: str, capacity: int) -> PoolView:
        """Create a pool, or change its capacity keeping used and reserved."""
        _check_name(pool, "pool")
        _check_amount(capacity, "capacity")
        return _require_view(await self._upsert(args=[self.key_prefix, pool, capacity, "set"]), pool)

    async def ensure_pool(self, pool: str, capacity: int) -> PoolView:
        """Create a pool with ``capacity`` unless it exists; an existing pool is left as it is."""
        _check_name(pool, "pool")
        _check_amount(capacity, "capacity")
        return _require_view(await self._upsert(args=[self.key_prefix, pool, capacity, "nx"]), pool)

    async def reap_expired(self) -> int:
        """End expired leases in every pool (up to ``reclaim_batch`` per pool); returns how many."""
        return int(await self._reap(args=[self.key_prefix, self.ended_retention_seconds, self.reclaim_batch]))


async def reap_forever(store: BudgetStore, interval_seconds: float) -> None:
    """Reclaim expired leases every ``interval_seconds`` until cancelled.

    Tokens of a dead holder come back even when no one reserves from that pool.
    A Redis outage is logged and retried on the next tick.
    """
    while True:
        try:
            ended = await store.reap_expired()
        except RedisError as exc:
            log.warning("lease reaper could not reach Redis", extra={"error": str(exc)})
        else:
            if ended:
                log.info("expired leases reclaimed", extra={"count": ended})
            if ended >= store.reclaim_batch:
                await asyncio.sleep(0)  # a full batch: more may be waiting
                continue
        await asyncio.sleep(interval_seconds)
