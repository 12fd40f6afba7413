"""Backend health: passive failure counting, a circuit breaker per provider and a
background prober, shared by every router replica through Redis.

Redis holds one hash per provider, ``{prefix}health:{provider}``: ``state``
(closed | open), ``failures`` (consecutive), ``open_until_ms``, ``last_error`` and
``last_error_at_ms``. An open breaker whose ``open_until_ms`` has passed is
*half-open*: it lets one trial request (per replica) or a probe through; a success
closes it, a failure opens it for another cooldown.

The hot path never reads Redis: each replica keeps a snapshot, re-read every
``sync_interval_seconds`` and updated at once by its own writes. A failure is one
Lua call (count, maybe open); a success writes only when the snapshot shows
failures to clear. Redis trouble never fails a request: the board then keeps
counting locally. Every call touches one provider's hash (the Lua script declares
that one key), so the board runs unchanged on Redis Cluster.

A local-inference worker also speaks for itself: the board polls its status every
``sync_interval_seconds`` (``workers.poll_status``), and while it says it is
overloaded or out of memory it is unavailable as an open breaker is (the next
candidate serves), without counting as a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import redis.asyncio as redis
from hoosh.router.v1 import router_pb2
from redis.exceptions import RedisError

from . import workers
from .backends.base import Backend
from .config import HealthConfig, ProviderConfig
from .errors import RouterError

log = logging.getLogger(__name__)

KEY_TTL_MS = 7 * 24 * 3600 * 1000  # health hashes expire when nobody writes them for a week

# KEYS[1] the provider's hash. ARGV: now_ms, threshold, cooldown_ms, error text, ttl_ms.
# Returns {state, failures, open_until_ms}.
FAILURE_SCRIPT = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local threshold = tonumber(ARGV[2])
local cooldown = tonumber(ARGV[3])
local state = redis.call('HGET', key, 'state') or 'closed'
local open_until = tonumber(redis.call('HGET', key, 'open_until_ms') or '0') or 0
local failures = redis.call('HINCRBY', key, 'failures', 1)
redis.call('HSET', key, 'last_error', ARGV[4], 'last_error_at_ms', now)
if state == 'open' then
  if now >= open_until then
    open_until = now + cooldown
    redis.call('HSET', key, 'open_until_ms', open_until)
  end
elseif failures >= threshold then
  state = 'open'
  open_until = now + cooldown
  redis.call('HSET', key, 'state', 'open', 'open_until_ms', open_until)
end
redis.call('PEXPIRE', key, ARGV[5])
return {state, failures, open_until}
"""


@dataclass(slots=True)
class BreakerView:
    """One provider as this replica sees it."""

    state: str = "closed"  # as stored: closed | open
    failures: int = 0
    open_until: float = 0.0  # epoch seconds
    last_error: str = ""
    last_error_at: float = 0.0
    trial: bool = False  # a half-open trial of this replica is in flight
    latency_ms: float | None = None  # moving average, this replica's observations

    def effective_state(self, now: float) -> str:
        if self.state != "open":
            return "closed"
        return "half_open" if now >= self.open_until else "open"


@dataclass(slots=True, frozen=True)
class HealthReport:
    name: str
    type: str
    base_url: str
    state: str
    failures: int
    last_error: str
    last_error_at_ms: int
    open_until_ms: int
    latency_ms: float
    rpm: int
    tpm: int


class HealthBoard:
    def __init__(
        self,
        client: redis.Redis | redis.RedisCluster,
        key_prefix: str,
        providers: list[tuple[ProviderConfig, Backend]],
        config: HealthConfig,
        *,
        latency_alpha: float = 0.3,
    ) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._providers = {provider.name: (provider, backend) for provider, backend in providers}
        self._config = config
        self._alpha = latency_alpha
        self._views = {name: BreakerView() for name in self._providers}
        self._failure = client.register_script(FAILURE_SCRIPT)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def key(self, name: str) -> str:
        return f"{self._prefix}health:{name}"

    def _threshold(self, name: str) -> int:
        override = self._providers[name][0].breaker.failure_threshold
        return override or self._config.failure_threshold

    def _cooldown(self, name: str) -> float:
        override = self._providers[name][0].breaker.cooldown_seconds
        return override or self._config.cooldown_seconds

    # -- the hot path (memory only) ---------------------------------------------------

    def view(self, name: str) -> BreakerView:
        return self._views[name]

    def carry(self, name: str, view: BreakerView) -> None:
        """Watch ``name`` through ``view``, that of the board this one replaces (live
        reload): its state, failures, last error, trial in flight and latency carry on."""
        if name in self._views:
            self._views[name] = view

    def state_of(self, name: str) -> str:
        return self._views[name].effective_state(time.time())

    def refusal(self, name: str) -> str | None:
        """Why the provider's worker takes no work now, in its words; None when it does."""
        entry = self._providers.get(name)
        return workers.refusal(entry[1]) if entry is not None else None

    def refusing(self, name: str) -> str | None:
        """What keeps the provider's worker from taking work ("overloaded", "out_of_memory"); None: nothing."""
        entry = self._providers.get(name)
        return workers.refusing(entry[1]) if entry is not None else None

    def why_unavailable(self, names: list[str]) -> str:
        """Why these providers are not called, in words a client may see: open circuits,
        and local models refusing work, said generically (the workers' own reasons, their
        queues and GPU memory, go to the log when they start refusing and to admin views:
        GetProviderHealth's workers, /v1/admin/status)."""
        kinds = {name: kind for name in names if (kind := self.refusing(name)) is not None}
        circuits = [name for name in names if name not in kinds]
        parts = [f"the circuit of {', '.join(circuits)} is open"] if circuits else []
        if "overloaded" in kinds.values():
            parts.append("the local model is overloaded; retry shortly")
        if "out_of_memory" in kinds.values():
            parts.append("the local model is temporarily unavailable")
        return "; ".join(parts) or "the circuit of every candidate is open"

    def available(self, name: str) -> bool:
        """Closed, or half-open with no trial of ours in flight; and not refusing work."""
        if self.refusal(name) is not None:
            return False
        view = self._views[name]
        if view.state != "open":
            return True
        return time.time() >= view.open_until and not view.trial

    def acquire(self, name: str) -> bool:
        """Claim the right to call ``name`` now (a half-open breaker admits one trial)."""
        if self.refusal(name) is not None:
            return False
        view = self._views[name]
        if view.state != "open":
            return True
        if time.time() < view.open_until or view.trial:
            return False
        view.trial = True
        return True

    def release(self, name: str) -> None:
        self._views[name].trial = False

    def latency(self, name: str) -> float | None:
        view = self._views.get(name)
        return view.latency_ms if view else None

    def retry_after(self, names: list[str]) -> int:
        """Seconds until the soonest of these providers may be called again (at least 1):
        an open breaker when it half-opens, a refusing worker when it said it would take
        work again (the rest of an out-of-memory hold; a second for a full queue); both
        for one provider: the later."""
        now = time.time()
        waits: list[float] = []
        for name in names:
            entry = self._providers.get(name)
            worker = workers.retry_after(entry[1]) if entry is not None else None
            view = self._views[name]
            breaker = view.open_until - now if view.state == "open" else None
            known = [wait for wait in (worker, breaker) if wait is not None]
            if known:
                waits.append(max(known))
        return max(1, int(min(waits) + 0.999)) if waits else 1

    # -- outcomes ---------------------------------------------------------------------

    async def record_success(self, name: str, latency_ms: float | None) -> None:
        view = self._views[name]
        if latency_ms is not None:
            previous = view.latency_ms
            view.latency_ms = latency_ms if previous is None else previous + self._alpha * (latency_ms - previous)
        if view.failures == 0 and view.state == "closed":
            return  # nothing to clear: no write on the healthy hot path
        was_open = view.state == "open"
        view.state, view.failures, view.open_until = "closed", 0, 0.0
        try:
            await self._redis.hset(self.key(name), mapping={"state": "closed", "failures": 0, "open_until_ms": 0})
        except (RedisError, OSError) as error:
            log.warning("health write failed", extra={"provider": name, "error": str(error)})
        if was_open:
            log.info("circuit closed", extra={"provider": name})

    async def record_failure(self, name: str, error: RouterError | str) -> None:
        view = self._views[name]
        message = (error.message if isinstance(error, RouterError) else error)[:300]
        now = time.time()
        threshold, cooldown = self._threshold(name), self._cooldown(name)
        was = view.state
        try:
            state, failures, open_until_ms = await self._failure(
                keys=[self.key(name)], args=[int(now * 1000), threshold, int(cooldown * 1000), message, KEY_TTL_MS]
            )
            view.state = state.decode() if isinstance(state, bytes) else str(state)
            view.failures = int(failures)
            view.open_until = int(open_until_ms) / 1000
        except (RedisError, OSError) as redis_error:
            log.warning("health write failed", extra={"provider": name, "error": str(redis_error)})
            view.failures += 1
            if view.state == "open":
                if now >= view.open_until:
                    view.open_until = now + cooldown
            elif view.failures >= threshold:
                view.state, view.open_until = "open", now + cooldown
        view.last_error, view.last_error_at = message, now
        if view.state == "open" and was != "open":
            log.warning("circuit opened", extra={"provider": name, "failures": view.failures, "error": message})

    # -- shared state ---------------------------------------------------------------------

    def _apply(self, name: str, fields: dict[bytes, bytes]) -> None:
        view = self._views[name]
        if not fields:
            view.state, view.failures, view.open_until = "closed", 0, 0.0
            return
        view.state = fields.get(b"state", b"closed").decode()
        view.failures = int(fields.get(b"failures", b"0"))
        view.open_until = int(fields.get(b"open_until_ms", b"0")) / 1000
        view.last_error = fields.get(b"last_error", b"").decode("utf-8", "replace")
        view.last_error_at = int(fields.get(b"last_error_at_ms", b"0")) / 1000

    async def sync(self) -> None:
        """Re-read every provider's shared state (one round trip)."""
        names = list(self._providers)
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self.key(name))
            results = await pipe.execute()
        for name, fields in zip(names, results, strict=True):
            self._apply(name, fields)

    async def _sync_loop(self) -> None:
        # Loops end on the flag as well as on cancellation: redis-py can turn a cancellation
        # inside a pipeline into a ConnectionError, which would swallow stop()'s cancel and
        # leave stop() waiting forever.
        while not self._stopping:
            await asyncio.sleep(self._config.sync_interval_seconds)
            try:
                await self.sync()
            except (RedisError, OSError) as error:
                task = asyncio.current_task()
                if self._stopping or (task is not None and task.cancelling()):
                    return
                log.warning("health sync failed", extra={"error": str(error)})

    async def probe_once(self) -> None:
        """Probe every provider that allows it, except breakers still cooling down."""
        now = time.time()
        names = [
            name
            for name, (config, _) in self._providers.items()
            if config.probe and not (self._views[name].state == "open" and now < self._views[name].open_until)
        ]
        await asyncio.gather(*(self._probe(name) for name in names))

    async def _probe(self, name: str) -> None:
        backend = self._providers[name][1]
        try:
            await asyncio.wait_for(backend.probe(), self._config.probe_timeout_seconds)
        except RouterError as error:
            await self.record_failure(name, f"probe: {error.message}")
            return
        except TimeoutError:
            await self.record_failure(name, "probe: timed out")
            return
        except Exception as error:  # a probe must never kill the prober
            log.warning("probe failed unexpectedly", extra={"provider": name, "error": repr(error)})
            return
        if self._views[name].state == "open":  # half-open: the probe is the trial
            await self.record_success(name, None)

    async def _probe_loop(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self._config.probe_interval_seconds)
            try:
                await self.probe_once()
            except (RedisError, OSError) as error:
                log.warning("probing failed", extra={"error": str(error)})

    def entries(self) -> list[tuple[ProviderConfig, Backend]]:
        """The providers this board watches, with their backends."""
        return list(self._providers.values())

    def worker_states(self) -> list[router_pb2.WorkerState]:
        """Each local worker as this replica last polled it (GetProviderHealth's workers)."""
        return workers.worker_states(self._providers.values())

    async def poll_workers(self) -> None:
        """Ask every local worker whether it takes work now (one round)."""
        await workers.poll_status(
            (backend for _, backend in self._providers.values()), self._config.sync_interval_seconds
        )

    async def _worker_loop(self) -> None:
        while not self._stopping:
            try:
                await self.poll_workers()
            except Exception as error:  # a poll must never kill the poller
                log.warning("worker status poll failed", extra={"error": repr(error)})
            await asyncio.sleep(self._config.sync_interval_seconds)

    async def start(self) -> None:
        """Read the shared state once, then keep it fresh and probe in the background."""
        try:
            await self.sync()
        except (RedisError, OSError) as error:
            log.warning("health sync failed at start", extra={"error": str(error)})
        self._tasks.append(asyncio.create_task(self._sync_loop(), name="health-sync"))
        if workers.local_backends(backend for _, backend in self._providers.values()):
            self._tasks.append(asyncio.create_task(self._worker_loop(), name="worker-status"))
        if self._config.probe_interval_seconds > 0:
            self._tasks.append(asyncio.create_task(self._probe_loop(), name="health-probe"))

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def report(self) -> list[HealthReport]:
        """Every provider's state, read fresh from Redis (not on the hot path)."""
        try:
            await self.sync()
        except (RedisError, OSError) as error:
            log.warning("health sync failed", extra={"error": str(error)})
        now = time.time()
        reports = []
        for name, (config, _) in self._providers.items():
            view = self._views[name]
            state = view.effective_state(now)
            reports.append(
                HealthReport(
                    name=name,
                    type=config.type,
                    base_url=config.base_url,
                    state=state,
                    failures=view.failures,
                    last_error=view.last_error,
                    last_error_at_ms=int(view.last_error_at * 1000),
                    open_until_ms=int(view.open_until * 1000) if view.state == "open" else 0,
                    latency_ms=round(view.latency_ms or 0.0, 3),
                    rpm=config.rpm or 0,
                    tpm=config.tpm or 0,
                )
            )
        return reports
