"""Per-provider requests-per-minute and tokens-per-minute limits in Redis, so they
hold across every router replica.

One Lua call per attempt checks and counts both limits with a sliding-window
counter: the previous minute's count weighted by how much of it still overlaps the
last 60 s, plus the current minute's count. Time comes from Redis (``TIME``), so
replicas with skewed clocks still agree. The TPM window is charged the request's
estimate (prompt bound + max_tokens) up front; once the real usage is known a
background correction replaces the estimate (off the response path).

Only providers with ``rpm`` or ``tpm`` configured ever touch Redis here.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import redis.asyncio as redis
from redis.exceptions import RedisError

from .config import ProviderConfig

log = logging.getLogger(__name__)

WINDOW_SECONDS = 60

# KEYS[1]: the provider's key base. ARGV: rpm (0 = none), tpm (0 = none), tokens, window seconds.
# Returns {allowed (0|1), retry_after_ms, window}.
ADMIT_SCRIPT = """
local base = KEYS[1]
local rpm, tpm, tokens, size = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = math.floor(now / size)
local elapsed = (now - window * size) / size
local cur = base .. ':' .. window
local c = redis.call('HMGET', cur, 'r', 't')
local p = redis.call('HMGET', base .. ':' .. (window - 1), 'r', 't')
local cr, ct = tonumber(c[1]) or 0, tonumber(c[2]) or 0
local pr, pt = tonumber(p[1]) or 0, tonumber(p[2]) or 0
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
redis.call('HINCRBY', cur, 'r', 1)
redis.call('HINCRBY', cur, 't', tokens)
redis.call('EXPIRE', cur, size * 2 + 5)
return {1, 0, window}
"""


@dataclass(slots=True, frozen=True)
class Admission:
    allowed: bool
    retry_after: int  # seconds, when not allowed
    window: int  # the window the tokens were charged to (for the correction)


class RateLimiter:
    def __init__(self, client: redis.Redis, key_prefix: str, window_seconds: int = WINDOW_SECONDS) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._window = window_seconds
        self._admit = client.register_script(ADMIT_SCRIPT)
        self._background: set[asyncio.Task[None]] = set()

    def key(self, provider: str) -> str:
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
                args=[provider.rpm or 0, provider.tpm or 0, max(0, tokens), self._window],
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
        key = f"{self.key(provider)}:{window}"
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hincrby(key, "t", delta)
                pipe.expire(key, self._window * 2 + 5)
                await pipe.execute()
        except (RedisError, OSError) as error:
            log.warning("rate-limit correction failed", extra={"provider": provider, "error": str(error)})

    async def drain(self) -> None:
        """Wait for pending corrections (shutdown, tests)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
