"""Per-provider requests-per-minute and tokens-per-minute limits in Redis, so they
hold across every router replica.

One Lua call per attempt checks and counts both limits with a sliding-window
counter: the previous window's count weighted by how much of it still overlaps the
last window's length, plus the current window's count. Time comes from Redis
(``TIME``) unless a clock is given to the constructor, so replicas with skewed clocks
still agree. The TPM window is charged the request's estimate (prompt bound +
max_tokens) up front; once the real usage is known a background correction replaces
the estimate (off the response path).

Each provider's counters live in ONE hash, ``{prefix}rl:{provider}``, with fields
``r:<window>`` and ``t:<window>`` (older windows' fields are deleted as it goes), so
every call touches one key and runs unchanged on Redis Cluster.

Only providers with ``rpm`` or ``tpm`` configured ever touch Redis here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError

from .config import ProviderConfig

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60

# KEYS[1]: the provider's hash. ARGV: rpm (0 = none), tpm (0 = none), tokens, window
# seconds, now in seconds (empty: Redis TIME). Returns {allowed (0|1), retry_after_ms, window}.
ADMIT_SCRIPT = """
local key = KEYS[1]
local rpm, tpm, tokens, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local now = tonumber(ARGV[5])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local window = math.floor(now / size)
local elapsed = (now - window * size) / size
local c = redis.call('HMGET', key, 'r:' .. window, 't:' .. window, 'r:' .. (window - 1), 't:' .. (window - 1))
local cr, ct = tonumber(c[1]) or 0, tonumber(c[2]) or 0
local pr, pt = tonumber(c[3]) or 0, tonumber(c[4]) or 0
local w = 1 - elapsed

-- Seconds until prev * weight + cur + need fits under limit.
local function wait_for(prev, curr, need, limit)
  if curr + need > limit then
    local after = 0
    if curr > 0 then after = math.max(0, 1 - (limit - need) / curr) end
    return (1 - elapsed + after) * size
  end
  return math.max(0, (1 - (limit - curr - need) / prev) - elapsed) * size
end

local wait = 0
if rpm > 0 and pr * w + cr + 1 > rpm then
  wait = math.max(wait, wait_for(pr, cr, 1, rpm))
end
if tpm > 0 then
  local need = math.min(tokens, tpm)
  if pt * w + ct + need > tpm then
    wait = math.max(wait, wait_for(pt, ct, need, tpm))
  end
end
if wait > 0 then
  return {0, math.ceil(wait * 1000), window}
end
redis.call('HINCRBY', key, 'r:' .. window, 1)
redis.call('HINCRBY', key, 't:' .. window, tokens)
redis.call('HDEL', key, 'r:' .. (window - 2), 't:' .. (window - 2), 'r:' .. (window - 3), 't:' .. (window - 3))
redis.call('EXPIRE', key, size * 2 + 5)
return {1, 0, window}
"""

# Seconds since the epoch; the default (None) is the Redis server's clock.
Clock = Callable[[], float]


@dataclass(slots=True, frozen=True)
class Admission:
    allowed: bool
    retry_after: int  # seconds, when not allowed
    window: int  # the window the tokens were charged to (for the correction)


class RateLimiter:
    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster,
        key_prefix: str,
        window_seconds: int = WINDOW_SECONDS,
        *,
        clock: Clock | None = None,
    ) -> None:
        """``clock``: where "now" comes from; None (the default) reads Redis' own clock
        inside the script, which every replica shares."""
        self._redis = client
        self._prefix = key_prefix
        self._window = window_seconds
        self._clock = clock
        self._admit = client.register_script(ADMIT_SCRIPT)
        self._background: set[asyncio.Task[None]] = set()

    def key(self, provider: str) -> str:
        """The provider's counter hash (fields ``r:<window>``, ``t:<window>``)."""
        return f"{self._prefix}rl:{provider}"

    @staticmethod
    def applies(provider: ProviderConfig) -> bool:
        return bool(provider.rpm or provider.tpm)

    async def admit(self, provider: ProviderConfig, tokens: int) -> Admission:
        """Check and count one request of ``tokens`` (estimated) against the provider's limits.

        Redis trouble admits the request (a limiter outage must not stop traffic).
        """
        try:
            allowed, retry_ms, window = await self._admit(
                keys=[self.key(provider.name)],
                args=[
                    provider.rpm or 0,
                    provider.tpm or 0,
                    max(0, tokens),
                    self._window,
                    repr(self._clock()) if self._clock is not None else "",
                ],
            )
        except (RedisError, OSError) as error:
            log.warning("rate limiter unavailable; admitting", extra={"provider": provider.name, "error": str(error)})
            return Admission(True, 0, -1)
        return Admission(bool(allowed), max(1, (int(retry_ms) + 999) // 1000) if not allowed else 0, int(window))

    def correct(self, provider: ProviderConfig, admission: Admission, estimated: int, actual: int) -> None:
        """Replace the estimate charged to the TPM window with the real usage, in the background."""
        if not provider.tpm or admission.window < 0 or actual == estimated:
            return
        task = asyncio.create_task(self._correct(provider.name, admission.window, actual - estimated))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _correct(self, provider: str, window: int, delta: int) -> None:
        key = self.key(provider)
        try:
            # One key: a plain pipeline is one round trip, on a cluster too.
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.hincrby(key, f"t:{window}", delta)
                pipe.expire(key, self._window * 2 + 5)
                await pipe.execute()
        except (RedisError, OSError) as error:
            log.warning("rate-limit correction failed", extra={"provider": provider, "error": str(error)})

    async def drain(self) -> None:
        """Wait for pending corrections (shutdown, tests)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
