"""Per-key limits in Redis: requests per minute, tokens per minute, requests in flight.

One Lua call per admission checks and counts all three atomically, so they hold
across every replica. RPM and TPM are sliding-window counters: the previous minute's
count weighted by how much of it still overlaps the last 60 s, plus the current
minute's count. Concurrency is a sorted set of in-flight request ids scored by an
expiry, so a holder that died without finishing frees its slot after
``inflight_ttl_seconds``. TPM is charged the request's estimate up front; finish()
corrects the window the estimate went to by ``actual - estimated``.

Keys, one hash tag per key id (``P`` is ``key_prefix``):

- ``P{k:<key_id>}:w:<minute>``  hash: r (requests), t (tokens) of one minute window
- ``P{k:<key_id>}:inflight``    sorted set: request id -> expiry (ms)
- ``P{k:<key_id>}:admitted``    hash: request id -> the minute its estimate was charged to
- ``P{k:<key_id>}:a:<request id>``  string with a TTL of one window: an untracked (RPM-only)
  request already counted, so a retried admission does not count it twice

Time is the Redis clock unless a ``clock`` is given (then every replica should share
one source of time, as tests do).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from .errors import BudgetUnavailable, RateLimited
from .redis import RedisClient, guard

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60
MAX_TOKENS = 2**53 - 1  # counts stay where a Lua double is exact

# KEYS[1]: the key's in-flight set. ARGV: base, rpm, tpm, max_concurrency (0 = none),
# tokens, request id, now_ms ('' = Redis TIME), inflight_ttl_ms, window_seconds.
# Returns {1, window} when admitted, {0, limit, retry_after_ms} when not.
ADMIT = r"""
local base = ARGV[1]
local rpm, tpm, maxc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, id = tonumber(ARGV[5]), ARGV[6]
local ttl_ms, size = tonumber(ARGV[8]), tonumber(ARGV[9])
local now_ms = tonumber(ARGV[7])
if not now_ms then
  local t = redis.call('TIME')
  now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local inflight, admitted = KEYS[1], base .. 'admitted'
local tracked = maxc > 0 or tpm > 0

-- Slots of holders that never finished come back once their expiry passes.
local seen = base .. 'a:' .. id
if tracked then
  local dead = redis.call('ZRANGEBYSCORE', inflight, '-inf', now_ms)
  if #dead > 0 then
    redis.call('ZREMRANGEBYSCORE', inflight, '-inf', now_ms)
    redis.call('HDEL', admitted, unpack(dead))
  end
  -- A retried admission of the same request is not counted twice.
  if redis.call('ZSCORE', inflight, id) then
    return {1, tonumber(redis.call('HGET', admitted, id)) or -1}
  end
elseif redis.call('EXISTS', seen) == 1 then
  return {1, -1}  -- the same (RPM-only) request, admitted moments ago: a retry
end

if maxc > 0 and redis.call('ZCARD', inflight) >= maxc then
  return {0, 'concurrency', 1000}
end

local now = now_ms / 1000
local window = math.floor(now / size)
local elapsed = (now - window * size) / size
local cur = base .. 'w:' .. window
local c = redis.call('HMGET', cur, 'r', 't')
local p = redis.call('HMGET', base .. 'w:' .. (window - 1), 'r', 't')
local cr, ct = tonumber(c[1]) or 0, tonumber(c[2]) or 0
local pr, pt = tonumber(p[1]) or 0, tonumber(p[2]) or 0
local w = 1 - elapsed

-- Seconds until prev * weight + curr + need fits under limit.
local function wait_for(prev, curr, need, limit)
  if curr + need > limit then
    local after = 0
    if curr > 0 then after = math.max(0, 1 - (limit - need) / curr) end
    return (1 - elapsed + after) * size
  end
  return math.max(0, (1 - (limit - curr - need) / prev) - elapsed) * size
end

local wait, limit = 0, ''
if rpm > 0 and pr * w + cr + 1 > rpm then
  wait, limit = wait_for(pr, cr, 1, rpm), 'rpm'
end
if tpm > 0 then
  local need = math.min(tokens, tpm)  -- one request bigger than the whole TPM fits an empty window
  if pt * w + ct + need > tpm then
    local t_wait = wait_for(pt, ct, need, tpm)
    if t_wait > wait or limit == '' then wait, limit = t_wait, 'tpm' end
  end
end
if limit ~= '' then
  return {0, limit, math.max(1, math.ceil(wait * 1000))}
end

redis.call('HINCRBY', cur, 'r', 1)
if tokens > 0 then redis.call('HINCRBY', cur, 't', tokens) end
redis.call('EXPIRE', cur, size * 2 + 5)
if tracked then
  redis.call('ZADD', inflight, now_ms + ttl_ms, id)
  redis.call('HSET', admitted, id, window)
  local keep = math.ceil(ttl_ms / 1000) + 1
  redis.call('EXPIRE', inflight, keep)
  redis.call('EXPIRE', admitted, keep)
else
  redis.call('SET', seen, '1', 'EX', size)
end
return {1, window}
"""

# KEYS[1]: the key's in-flight set. ARGV: base, delta (actual - estimated), request id.
# Frees the slot; moves the TPM window the estimate went to by delta (within
# [0, 2**53 - 1]: never formatted past what a double holds exactly).
FINISH = r"""
local base, delta, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local admitted = base .. 'admitted'
local window = redis.call('HGET', admitted, id)
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', admitted, id)
if window and delta ~= 0 then
  local key = base .. 'w:' .. window
  if redis.call('EXISTS', key) == 1 then
    local t = (tonumber(redis.call('HGET', key, 't')) or 0) + delta
    if t < 0 then t = 0 end
    if t > 9007199254740991 then t = 9007199254740991 end
    redis.call('HSET', key, 't', string.format('%d', t))
  end
end
return 1
"""


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """A key's limits; None (or 0) means no limit of that kind."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None

    @property
    def any(self) -> bool:
        """Whether any limit is set (else admit and finish cost nothing)."""
        return bool(self.rpm or self.tpm or self.max_concurrency)

    @property
    def tracked(self) -> bool:
        """Whether requests must be tracked until they finish (concurrency, or a TPM correction)."""
        return bool(self.tpm or self.max_concurrency)


class KeyLimiter:
    """RPM, TPM and concurrency per API key, across replicas; one round trip per admission."""

    def __init__(
        self,
        redis: RedisClient,
        key_prefix: str,
        *,
        inflight_ttl_seconds: float = 900,
        clock: Callable[[], float] | None = None,
        window_seconds: int = WINDOW_SECONDS,
    ) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain braces: the key's hash tag follows it")
        if inflight_ttl_seconds <= 0:
            raise ValueError("inflight_ttl_seconds must be positive")
        self._redis = redis
        self.key_prefix = key_prefix
        self.inflight_ttl_seconds = inflight_ttl_seconds
        self.window_seconds = window_seconds
        self._clock = clock
        self._admit = redis.register_script(ADMIT)
        self._finish = redis.register_script(FINISH)

    def key_base(self, key_id: str) -> str:
        """Every limiter key of one API key starts so: ``<prefix>{k:<key_id>}:``."""
        return f"{self.key_prefix}{{k:{key_id}}}:"

    def _now_arg(self) -> int | str:
        return "" if self._clock is None else int(self._clock() * 1000)

    async def admit(self, key_id: str, request_id: str, limits: KeyLimits, tokens: int) -> None:
        """Count one request of ``tokens`` (estimated) against the key's limits, or refuse it.

        One round trip; none at all when ``limits`` sets nothing. Admitting the same
        ``request_id`` again while it is in flight (RPM only: within a window) counts
        it once, so the Redis client's retry after a lost reply cannot count a
        request twice. ``tokens`` counts at most 2**53 - 1. Raises RateLimited
        (with the limit that refused and when to retry) or BudgetUnavailable (Redis
        unreachable: nothing is admitted free).
        """
        if not limits.any:
            return
        base = self.key_base(key_id)
        result = await guard(
            self._admit(
                keys=[f"{base}inflight"],
                args=[
                    base,
                    limits.rpm or 0,
                    limits.tpm or 0,
                    limits.max_concurrency or 0,
                    min(max(0, tokens), MAX_TOKENS),
                    request_id,
                    self._now_arg(),
                    int(self.inflight_ttl_seconds * 1000),
                    self.window_seconds,
                ],
            )
        )
        if int(result[0]) == 1:
            return
        limit = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
        retry = max(1, math.ceil(int(result[2]) / 1000))
        raise RateLimited(limit if limit in ("rpm", "tpm") else "concurrency", retry)  # type: ignore[arg-type]

    async def finish(
        self, key_id: str, request_id: str, limits: KeyLimits, *, estimated_tokens: int, actual_tokens: int
    ) -> None:
        """The request ended: free its concurrency slot and correct TPM by ``actual - estimated``.

        Best effort (never raises): a slot not freed here frees itself after
        ``inflight_ttl_seconds``. No round trip when nothing is tracked for ``limits``.
        """
        if not limits.tracked:
            return
        base = self.key_base(key_id)
        delta = actual_tokens - estimated_tokens if limits.tpm else 0
        delta = max(-MAX_TOKENS, min(MAX_TOKENS, delta))
        try:
            await guard(self._finish(keys=[f"{base}inflight"], args=[base, delta, request_id]))
        except BudgetUnavailable as error:
            log.warning("key limit finish failed", extra={"key_id": key_id, "error": str(error)})


class KeyGate:
    """The life of one call against its key's limits, for every service that admits
    calls (router, stt, the edge's token routes): admit, then finish exactly once.

    ``admit`` is one Redis round trip for a key with limits and none otherwise.
    ``finish`` frees the call's slot and corrects TPM to what the call really charged;
    it is best effort, runs in a task of its own (a caller cancelled mid-way still frees
    its slot) and is a no-op when nothing is tracked for the key. An admission whose
    reply never came (Redis too slow, the call cancelled) may or may not have taken a
    slot: finish it with ``unconfirmed=True`` and it is repeated after
    ``unconfirmed_repeats`` seconds, since the limiter's finish cannot say whether it
    landed. A slot the script did take then comes back once Redis answers again rather
    than after the in-flight TTL; repeats are harmless (finishing an id that was never
    admitted changes nothing and the TPM correction applies once).
    """

    def __init__(
        self, limiter: KeyLimiter | None, *, unconfirmed_repeats: tuple[float, ...] = (1.0, 4.0, 25.0)
    ) -> None:
        self.limiter = limiter
        self._repeats = unconfirmed_repeats
        self._pending: set[asyncio.Task[None]] = set()
        self._repeating: set[asyncio.Task[None]] = set()

    async def admit(self, key_id: str, request_id: str, limits: KeyLimits, tokens: int) -> None:
        """Raises RateLimited or BudgetUnavailable (then the call still ends with
        ``finish(..., unconfirmed=True)``: the script may have run)."""
        if self.limiter is not None:
            await self.limiter.admit(key_id, request_id, limits, tokens)

    def finish_later(
        self,
        key_id: str,
        request_id: str,
        limits: KeyLimits,
        *,
        estimated: int,
        actual: int,
        unconfirmed: bool = False,
    ) -> asyncio.Task[None] | None:
        """Free the call's slot and keep ``actual`` of the ``estimated`` tokens in TPM, in
        the background; the task, or None when there is nothing to finish."""
        if self.limiter is None or not limits.tracked:
            return None
        task = asyncio.create_task(self._finish(key_id, request_id, limits, estimated, actual, unconfirmed))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def finish(
        self,
        key_id: str,
        request_id: str,
        limits: KeyLimits,
        *,
        estimated: int,
        actual: int,
        unconfirmed: bool = False,
    ) -> None:
        """As :meth:`finish_later`, and wait for it (shielded: a cancellation of the caller
        does not stop it)."""
        task = self.finish_later(
            key_id, request_id, limits, estimated=estimated, actual=actual, unconfirmed=unconfirmed
        )
        if task is not None:
            await asyncio.shield(task)

    async def drain(self, wait_seconds: float | None = None) -> None:
        """Wait (at most ``wait_seconds``) for finishes under way, cancel the rest; the
        repeats of unconfirmed ones still waiting are dropped (the in-flight TTL frees
        those slots)."""
        if self._pending:
            _, left = await asyncio.wait(set(self._pending), timeout=wait_seconds)
            for task in left:
                task.cancel()
            if left:
                await asyncio.gather(*left, return_exceptions=True)
        repeating = list(self._repeating)
        for task in repeating:
            task.cancel()
        if repeating:
            await asyncio.gather(*repeating, return_exceptions=True)

    async def _finish(
        self, key_id: str, request_id: str, limits: KeyLimits, estimated: int, actual: int, unconfirmed: bool
    ) -> None:
        await self._finish_once(key_id, request_id, limits, estimated, actual)
        if unconfirmed and self._repeats:
            later = asyncio.create_task(self._repeat(key_id, request_id, limits, estimated, actual))
            self._repeating.add(later)
            later.add_done_callback(self._repeating.discard)

    async def _repeat(self, key_id: str, request_id: str, limits: KeyLimits, estimated: int, actual: int) -> None:
        for delay in self._repeats:
            await asyncio.sleep(delay)
            await self._finish_once(key_id, request_id, limits, estimated, actual)

    async def _finish_once(self, key_id: str, request_id: str, limits: KeyLimits, estimated: int, actual: int) -> None:
        assert self.limiter is not None
        try:
            await self.limiter.finish(key_id, request_id, limits, estimated_tokens=estimated, actual_tokens=actual)
        except Exception as error:  # best effort: the in-flight entry has a TTL
            log.warning("key limit finish failed", extra={"key_id": key_id, "error": repr(error)})
