"""Token pools in Redis, arranged as trees: check, reserve, commit, release, renew,
periods, USD caps, leases and the expiry policy.

Every operation on budgets is one Redis round trip: a Lua script (EVALSHA, see
``_lua.py``) that reads and writes atomically, so concurrent replicas can never take
any pool of a chain past its capacity and every reservation ends exactly once. Lease
clocks use Redis ``TIME`` so replicas with skewed clocks agree; period boundaries are
computed here, in each pool's time zone, and only ever move forward in Redis.

Keys (``P`` is ``key_prefix``, ``T`` the root of the pool's tree; see docs/tenancy.md):

- ``P pools``            hash: name -> JSON ``{"parent", "root", "period", "tz"}`` (the directory)
- ``P retired``          hash: name of a deleted non-root pool -> JSON ``{"root", "parent"}``,
                         so reservations left open in it still settle in its ancestors
- ``P changes``          pub/sub channel: a pool was created, changed or deleted
- ``P{T}:pool:<name>``   hash: capacity, parent, period, tz, cap_usd, used, reserved,
                         used_usd, reserved_usd, period_start, prev_used, prev_used_usd,
                         prev_period_start, announced_start, children, inc (incarnation)
- ``P{T}:seq``           counter: the tree's last pool incarnation
- ``P{T}:lease``         sorted set: reservation id -> lease expiry (ms, Redis clock)
- ``P{T}:res:<id>``      hash: chain, incs (each chain pool's incarnation), tokens, usd,
                         completion, state, expires, owner, kind, on_expiry, charged
- ``P{T}:report:<id>``   string with a TTL: a report() already counted (retries are no-ops)

Counters saturate at MAX_AMOUNT (2**53 - 1) and never go below 0, whatever is
committed or reported.

Every key one script touches carries the tag ``{T}``: the scripts run unchanged on a
Redis Cluster. The directory is read into memory by every store, so finding a pool's
tree costs no round trip; a script that finds the caller's picture out of date says
so, and the store reloads and tries again.

This module has no gRPC imports: any service may use :class:`BudgetStore` in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Final, Literal, TypeVar

from redis.commands.core import AsyncScript

from . import _lua
from .errors import (
    BudgetExhausted,
    BudgetUnavailable,
    InvalidAmount,
    InvalidArgument,
    NotOwner,
    PoolExists,
    PoolInUse,
    PoolNotFound,
)
from .periods import PeriodClock, validate_period
from .redis import RedisClient, guard

log = logging.getLogger(__name__)

# Lua numbers are doubles: stay where every integer is exact.
MAX_AMOUNT: Final = 2**53 - 1
_EPOCH_DAY = date(1970, 1, 1)
# The ledger's metric letters (see _lua.ledger) and the CostLine fields they add to.
_LEDGER_METRICS = {"r": "requests", "p": "prompt_tokens", "c": "completion_tokens", "u": "usd_micros"}
_COST_READERS = 4  # trees read at once by ``costs`` (each one pipelined round trip)
# Prices are micro-dollars per million tokens; this bound keeps the exact cost
# arithmetic of the scripts below 2**53 (about $9,007 per million tokens).
MAX_PRICE: Final = MAX_AMOUNT // 1_000_000
MAX_DEPTH: Final = 8
MAX_ID_LENGTH: Final = 256
POOL_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")

EndState = Literal["committed", "released", "expired", "unknown"]
ExpiryPolicy = Literal["commit", "release"]
RollReason = Literal["period", "admin"]
_ENDED_STATES: dict[str, EndState] = {"committed": "committed", "released": "released", "expired": "expired"}
_ATTEMPTS = 3  # tries of one call when the directory turns out stale
_ROOTS_AT_ONCE = 32  # trees reaped or rolled concurrently
_STATE_TREES_PER_BATCH = 64  # trees read by ``read_state`` in one pipelined round trip
_STATE_FIELDS = ("capacity", "used", "reserved", "parent", "period", "cap_usd", "used_usd", "reserved_usd", "inc")

R = TypeVar("R")


class _Unset:
    """The type of :data:`UNSET`: "leave this setting as it is"."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Final = _Unset()


def cost_micros(tokens: int, price_micros_per_mtok: int) -> int:
    """What ``tokens`` cost at ``price_micros_per_mtok`` micro-dollars per million tokens, rounded up."""
    return -(-tokens * price_micros_per_mtok // 1_000_000)


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What a pool should be: its cap in tokens, parent, period and optional money cap."""

    name: str
    capacity: int
    parent: str | None = None
    period: str = "none"
    timezone: str = "UTC"
    cap_usd_micros: int | None = None


@dataclass(frozen=True, slots=True)
class PoolView:
    """A pool's settings and counters at one instant.

    ``period_start_ms``/``period_end_ms`` are the calendar bounds of the current
    period (0 for "none"); ``chain`` is this pool, then its ancestors up to the root.
    """

    name: str
    capacity: int
    used: int
    reserved: int
    parent: str | None = None
    period: str = "none"
    timezone: str = "UTC"
    cap_usd_micros: int | None = None
    used_usd_micros: int = 0
    reserved_usd_micros: int = 0
    period_start_ms: int = 0
    period_end_ms: int = 0
    chain: tuple[str, ...] = ()

    @property
    def available(self) -> int:
        """Tokens that can still be reserved in this pool alone: ``max(0, capacity - used - reserved)``."""
        return max(0, self.capacity - self.used - self.reserved)

    @property
    def available_usd_micros(self) -> int | None:
        """Micro-dollars left under the money cap (None without one)."""
        if self.cap_usd_micros is None:
            return None
        return max(0, self.cap_usd_micros - self.used_usd_micros - self.reserved_usd_micros)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Whether ``tokens`` fit now; ``available`` is the least available along the chain."""

    allowed: bool
    pool: PoolView
    available: int


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted (or, with ``created=False``, an already existing) reservation.

    ``tokens`` is all that is reserved (prompt + ``completion_tokens``, the completion
    granted, which the caller sends upstream as ``max_tokens``); ``usd_micros`` its
    price reserved against the money caps.
    """

    reservation_id: str
    pool: PoolView
    chain: tuple[str, ...]
    tokens: int
    completion_tokens: int
    usd_micros: int
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


@dataclass(frozen=True, slots=True)
class LedgerLine:
    """What a commit records in the cost ledger beside the pool counters: which provider
    and model served it and how its tokens split (the pool, key and day come from the
    reservation and the Redis clock)."""

    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class CostLine:
    """One ledger line: a UTC day's charges of one (provider, model, pool, key)."""

    day: str  # YYYY-MM-DD (UTC)
    provider: str
    model: str
    pool: str
    key_id: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd_micros: int = 0


@dataclass(frozen=True, slots=True)
class PeriodRoll:
    """A pool's usage started again at 0: at a period boundary, or by an admin reset.

    ``used``/``used_usd_micros`` are what the ended span used; it ran from
    ``previous_period_start_ms`` to ``period_start_ms`` (for "admin", the instant of
    the reset, Redis clock).
    """

    pool: str
    chain: tuple[str, ...]
    period: str
    reason: RollReason
    period_start_ms: int
    previous_period_start_ms: int
    used: int
    used_usd_micros: int
    capacity: int


@dataclass(frozen=True, slots=True)
class PoolState:
    """A pool's counters exactly as Redis holds them at one read (for metrics).

    Nothing is settled or rolled by reading: a lease past its expiry still counts as
    reserved (and open) until the reaper or a call settles it, and a period past its
    end still shows its usage until the ticker rolls it (both within a second or so
    of the service's loops). ``open_reservations`` counts the open reservations that
    hold tokens in this pool: its own and those of every pool below it, as
    ``reserved`` does.
    """

    name: str
    root: str
    parent: str | None
    period: str
    capacity: int
    used: int
    reserved: int
    cap_usd_micros: int | None
    used_usd_micros: int
    reserved_usd_micros: int
    open_reservations: int


@dataclass(frozen=True, slots=True)
class TreeState:
    """One pool tree as read by :meth:`BudgetStore.read_state`.

    ``open_reservations`` is the size of the tree's lease set (exact). When it holds
    more than the read's ``max_leases``, only the leases that expire first are read
    for the per-pool counts, and ``complete`` is False.
    """

    root: str
    pools: tuple[PoolState, ...]
    open_reservations: int
    complete: bool = True


@dataclass(frozen=True, slots=True)
class StoreState:
    """Every tree that could be read, and the roots of those that could not."""

    trees: tuple[TreeState, ...]
    unreachable: tuple[str, ...] = ()

    @property
    def pools(self) -> list[PoolState]:
        return [pool for tree in self.trees for pool in tree.pools]


@dataclass(frozen=True, slots=True)
class _Entry:
    parent: str | None
    root: str
    period: str
    timezone: str


@dataclass(slots=True)
class _Directory:
    entries: dict[str, _Entry] = field(default_factory=dict)
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # root -> the distinct (period, time zone) pairs of its tree's pools with a period
    periods: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    version: int = 0
    loaded_at: float = -math.inf


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_pool_name(value: str, what: str = "pool") -> None:
    if not isinstance(value, str) or not POOL_NAME.fullmatch(value):
        raise InvalidArgument(f"{what} must be 1-64 characters of A-Z a-z 0-9 . _ - (got {value!r})")


def _ledger_name(value: str) -> str:
    """A provider or model name as a ledger line holds it: whitespace (the line is packed
    with spaces, fields with tabs) as ``_``, at most 256 characters; '' means unknown.
    Never a reason to refuse the charge itself."""
    cleaned = "".join("_" if ch.isspace() else ch for ch in str(value)[:256])
    return cleaned


def _check_id(value: str, what: str = "reservation_id") -> None:
    if not value:
        raise InvalidArgument(f"{what} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_ID_LENGTH} characters")


def _check_amount(value: int, what: str, maximum: int = MAX_AMOUNT) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidAmount(f"{what} must be an integer (got {value!r})")
    if value < 0:
        raise InvalidAmount(f"{what} must not be negative (got {value})")
    if value > maximum:
        raise InvalidAmount(f"{what} must be at most {maximum} (got {value})")


class BudgetStore:
    """Pool trees in Redis; each budget operation is one round trip (a Lua script via EVALSHA).

    Safe to share between coroutines and across replicas: Redis serialises the
    scripts. ``clock`` (seconds since the epoch) only decides which calendar period
    is current; leases use the Redis clock.
    """

    def __init__(
        self,
        redis: RedisClient,
        key_prefix: str,
        default_lease_seconds: float,
        *,
        default_retry_after_seconds: int = 60,
        ended_retention_seconds: int = 600,
        reclaim_batch: int = 256,
        expiry_policy: ExpiryPolicy = "commit",
        directory_refresh_seconds: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if default_lease_seconds <= 0:
            raise ValueError("default_lease_seconds must be positive")
        if expiry_policy not in ("commit", "release"):
            raise ValueError(f"expiry_policy must be 'commit' or 'release' (got {expiry_policy!r})")
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError("key_prefix must not contain braces: the pool tree's hash tag follows it")
        self._redis = redis
        self.key_prefix = key_prefix
        self.default_lease_seconds = default_lease_seconds
        self.default_retry_after_seconds = default_retry_after_seconds
        self.ended_retention_seconds = ended_retention_seconds
        self.reclaim_batch = reclaim_batch
        self.expiry_policy: ExpiryPolicy = expiry_policy
        self.directory_refresh_seconds = directory_refresh_seconds
        self._clock = clock
        self._periods = PeriodClock()
        self._directory_key = f"{key_prefix}pools"
        self._retired_key = f"{key_prefix}retired"
        self._retired_roots_key = f"{key_prefix}retired_roots"
        self.changes_channel = f"{key_prefix}changes"
        self._dir = _Directory()
        self._dir_lock = asyncio.Lock()
        self._listener: asyncio.Task[None] | None = None
        self._closing = False
        # register_script runs EVALSHA and loads the script once on NOSCRIPT.
        self._lua_reserve = redis.register_script(_lua.RESERVE)
        self._lua_end = redis.register_script(_lua.END)
        self._lua_renew = redis.register_script(_lua.RENEW)
        self._lua_report = redis.register_script(_lua.REPORT)
        self._lua_view_chain = redis.register_script(_lua.VIEW_CHAIN)
        self._lua_view_tree = redis.register_script(_lua.VIEW_TREE)
        self._lua_reap = redis.register_script(_lua.REAP)
        self._lua_roll = redis.register_script(_lua.ROLL)
        self._lua_reset = redis.register_script(_lua.RESET)
        self._lua_define = redis.register_script(_lua.DEFINE)
        self._lua_delete = redis.register_script(_lua.DELETE)

    # -- keys -----------------------------------------------------------------

    def tree_base(self, root: str) -> str:
        """The key base of a tree: ``<prefix>{<root>}:`` (every key of the tree starts so)."""
        return f"{self.key_prefix}{{{root}}}:"

    def pool_key(self, name: str, root: str) -> str:
        """The Redis hash of a pool (for operators and tests reading raw counters)."""
        return f"{self.tree_base(root)}pool:{name}"

    def _lease_key(self, root: str) -> str:
        return f"{self.tree_base(root)}lease"

    # -- the directory ----------------------------------------------------------

    async def start(self) -> None:
        """Load the directory and listen for change notices (methods also load it lazily).

        Without start(), the directory is reloaded on a miss and when older than
        ``directory_refresh_seconds``; with it, a listener reloads within moments of
        any change on any replica.
        """
        await self._reload()
        if self._listener is None:
            self._closing = False
            self._listener = asyncio.create_task(self._listen(), name="hoosh-metering-directory")

    async def close(self) -> None:
        """Stop listening for changes. The Redis client is the caller's to close.

        redis-py's ``get_message`` can swallow a cancellation now and then, so the
        listener also checks a closing flag, and the cancel is repeated until it ends."""
        listener = self._listener
        if listener is None:
            return
        self._closing = True
        for _ in range(50):
            listener.cancel()
            done, _ = await asyncio.wait({listener}, timeout=0.2)
            if done:
                break
        else:
            log.error("pool directory listener did not stop")
        with contextlib.suppress(asyncio.CancelledError, Exception):
            if listener.done():
                listener.result()
        self._listener = None

    async def _listen(self) -> None:
        while not self._closing:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(self.changes_channel)
                await self._reload()  # a change may have landed before the subscription
                while not self._closing:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=self.directory_refresh_seconds
                    )
                    if message is not None:
                        # A burst of changes costs one reload.
                        while await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.01) is not None:
                            pass
                        await self._reload()
                    elif time.monotonic() - self._dir.loaded_at >= self.directory_refresh_seconds:
                        await self._reload()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis away: keep serving from memory, try again soon
                log.warning("pool directory listener interrupted", extra={"error": str(error)})
                await asyncio.sleep(1.0)
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                except Exception as error:  # a dead connection may refuse a clean close
                    log.debug("pubsub close failed", extra={"error": str(error)})

    async def _reload(self, seen_version: int | None = None) -> None:
        """Read the directory; concurrent reloads after one miss coalesce into one."""
        async with self._dir_lock:
            if seen_version is not None and self._dir.version != seen_version:
                return  # another coroutine reloaded while this one waited
            raw = await guard(self._redis.hgetall(self._directory_key))
            entries: dict[str, _Entry] = {}
            for key, value in raw.items():
                try:
                    data = json.loads(_str(value))
                    entries[_str(key)] = _Entry(
                        parent=data.get("parent") or None,
                        root=str(data["root"]),
                        period=str(data.get("period") or "none"),
                        timezone=str(data.get("tz") or "UTC"),
                    )
                except (ValueError, KeyError, TypeError):
                    log.warning("unreadable pool directory entry", extra={"pool": _str(key)})
            chains: dict[str, tuple[str, ...]] = {}
            for name in entries:
                chain = [name]
                while (parent := entries[chain[-1]].parent) is not None and len(chain) <= MAX_DEPTH:
                    if parent not in entries:
                        break
                    chain.append(parent)
                chains[name] = tuple(chain)
            periods: dict[str, set[tuple[str, str]]] = {}
            for entry in entries.values():
                if entry.period != "none":
                    periods.setdefault(entry.root, set()).add((entry.period, entry.timezone))
            self._dir = _Directory(
                entries,
                chains,
                {root: tuple(sorted(pairs)) for root, pairs in periods.items()},
                self._dir.version + 1,
                time.monotonic(),
            )

    async def _fresh(self) -> _Directory:
        if self._listener is None and time.monotonic() - self._dir.loaded_at >= self.directory_refresh_seconds:
            await self._reload(self._dir.version)
        return self._dir

    async def _entry(self, pool: str, *, reload: bool = False) -> tuple[_Entry, tuple[str, ...]]:
        """The pool's directory entry and chain; one reload on a miss. Raises PoolNotFound."""
        directory = await self._fresh()
        if reload or pool not in directory.entries:
            await self._reload(directory.version)
            directory = self._dir
        entry = directory.entries.get(pool)
        if entry is None:
            raise PoolNotFound(pool)
        return entry, directory.chains[pool]

    async def chain(self, pool: str) -> tuple[str, ...]:
        """The pool, then its ancestors up to the root (from memory). Raises PoolNotFound."""
        _check_pool_name(pool)
        return (await self._entry(pool))[1]

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _chain_args(self, names: Iterable[str], now_ms: int) -> list[Any]:
        """The scripts' chain argument: ``name period tz start`` per known pool, joined by ``;``."""
        entries = self._dir.entries
        parts: list[str] = []
        for name in names:
            entry = entries.get(name)
            if entry is not None:
                start = self._periods.bounds(entry.period, entry.timezone, now_ms)[0]
                parts.append(f"{name} {entry.period} {entry.timezone} {start}")
        return [";".join(parts)]

    def _starts_arg(self, root: str, now_ms: int | None = None) -> str:
        """The scripts' starts argument: ``period tz start`` per distinct pair of the tree, joined by ``;``."""
        pairs = self._dir.periods.get(root)
        if not pairs:
            return ""
        now = self._now_ms() if now_ms is None else now_ms
        return ";".join(
            f"{period} {timezone} {self._periods.bounds(period, timezone, now)[0]}" for period, timezone in pairs
        )

    def _view(self, raw: Any, now_ms: int | None = None) -> PoolView | None:
        if not raw:
            return None
        name, period, timezone = _str(raw[0]), _str(raw[5]), _str(raw[6])
        cap = _str(raw[7])
        try:
            start, end = self._periods.bounds(period, timezone, self._now_ms() if now_ms is None else now_ms)
        except InvalidArgument:
            start, end = 0, 0
        return PoolView(
            name=name,
            capacity=int(raw[1]),
            used=int(raw[2]),
            reserved=int(raw[3]),
            parent=_str(raw[4]) or None,
            period=period,
            timezone=timezone,
            cap_usd_micros=int(cap) if cap else None,
            used_usd_micros=int(raw[8]),
            reserved_usd_micros=int(raw[9]),
            period_start_ms=start,
            period_end_ms=end,
            chain=self._dir.chains.get(name, (name,)),
        )

    def _require_view(self, raw: Any, pool: str) -> PoolView:
        view = self._view(raw)
        if view is None:  # the pool vanished between directory and script: deleted meanwhile
            raise PoolNotFound(pool)
        return view

    async def _run_chain(self, script: AsyncScript, pool: str, build: Callable[[str, list[Any]], list[Any]]) -> Any:
        """Run a chain script for ``pool``; reload the directory and retry when it was stale."""
        reload = False
        for _ in range(_ATTEMPTS):
            entry, chain = await self._entry(pool, reload=reload)
            now = self._now_ms()
            result = await guard(
                script(keys=[self._lease_key(entry.root)], args=build(entry.root, self._chain_args(chain, now)))
            )
            status = _str(result[0])
            if status not in ("stale", "not_found"):
                return result
            reload = True
        if status == "not_found":
            raise PoolNotFound(pool)
        raise BudgetUnavailable(f"Pool directory for '{pool}' keeps changing; try again")

    # -- budgets ----------------------------------------------------------------

    async def check(self, pool: str, tokens: int) -> CheckResult:
        """Whether ``tokens`` could be reserved in ``pool`` and every ancestor now (reserves nothing).

        Expired leases of the tree are settled and periods rolled first.
        ``available`` is the least available along the chain. Raises PoolNotFound,
        InvalidArgument, InvalidAmount, BudgetUnavailable.
        """
        _check_pool_name(pool)
        _check_amount(tokens, "tokens")
        views = await self._chain_views(pool)
        available = min(view.available for view in views)
        return CheckResult(allowed=available >= tokens, pool=views[0], available=available)

    async def _chain_views(self, pool: str) -> list[PoolView]:
        result = await self._run_chain(
            self._lua_view_chain,
            pool,
            lambda root, chain: [
                self.tree_base(root),
                self.ended_retention_seconds,
                self.reclaim_batch,
                *chain,
                self._starts_arg(root),
            ],
        )
        now = self._now_ms()
        views = [self._view(raw, now) for raw in result[1:]]
        if not views or any(view is None for view in views):
            raise PoolNotFound(pool)
        return [view for view in views if view is not None]

    async def reserve(
        self,
        pool: str,
        tokens: int,
        reservation_id: str,
        lease_seconds: float | None = None,
        *,
        completion_tokens: int = 0,
        min_completion_tokens: int | None = None,
        input_price_micros: int = 0,
        output_price_micros: int = 0,
        owner: str = "",
        kind: str = "manual",
        on_expiry: ExpiryPolicy | None = None,
    ) -> Reservation:
        """Reserve ``tokens`` (the prompt) plus up to ``completion_tokens`` in ``pool`` and every ancestor.

        All or none, in one atomic script: expired leases of the tree are settled
        (by each reservation's ``on_expiry``), periods rolled, then the completion is
        clamped to what every pool of the chain affords in tokens and, with prices
        (micro-dollars per million tokens), under every money cap. Fewer than
        ``min_completion_tokens`` (None: ``completion_tokens``, no clamp) raises
        BudgetExhausted naming the tightest pool. Idempotent: an active reservation
        with this id is returned as it is (``created=False``); NotOwner if it was
        made by another ``owner``. A lease of None or 0 uses the store's default;
        ``on_expiry`` None uses the store's policy. A ``kind="manual"`` reservation
        (self-reported usage, /v1/tokens/report) must reserve something: its commit
        is capped at what it reserved, so ``tokens + completion_tokens == 0`` raises
        InvalidAmount. Raises PoolNotFound, BudgetExhausted, NotOwner,
        InvalidArgument, InvalidAmount, BudgetUnavailable.
        """
        _check_pool_name(pool)
        _check_id(reservation_id)
        _check_amount(tokens, "tokens")
        _check_amount(completion_tokens, "completion_tokens")
        minimum = completion_tokens if min_completion_tokens is None else min_completion_tokens
        _check_amount(minimum, "min_completion_tokens")
        if minimum > completion_tokens:
            raise InvalidArgument(
                f"min_completion_tokens ({minimum}) must not exceed completion_tokens ({completion_tokens})"
            )
        if tokens + completion_tokens > MAX_AMOUNT:
            raise InvalidAmount(f"tokens + completion_tokens must be at most {MAX_AMOUNT}")
        if kind == "manual" and tokens + completion_tokens == 0:
            raise InvalidAmount("nothing to reserve: a manual reservation needs tokens + completion_tokens > 0")
        _check_amount(input_price_micros, "input_price_micros", MAX_PRICE)
        _check_amount(output_price_micros, "output_price_micros", MAX_PRICE)
        if lease_seconds is not None and lease_seconds < 0:
            raise InvalidAmount(f"lease_seconds must not be negative (got {lease_seconds})")
        policy = on_expiry or self.expiry_policy
        if policy not in ("commit", "release"):
            raise InvalidArgument(f"on_expiry must be 'commit' or 'release' (got {policy!r})")
        lease_ms = max(1, int((lease_seconds or self.default_lease_seconds) * 1000))
        result = await self._run_chain(
            self._lua_reserve,
            pool,
            lambda root, chain: [
                self.tree_base(root),
                reservation_id,
                owner,
                kind,
                policy,
                f"{tokens} {completion_tokens} {minimum} {lease_ms} {self.ended_retention_seconds} "
                f"{self.reclaim_batch} {self.default_retry_after_seconds} {input_price_micros} {output_price_micros}",
                *chain,
                self._starts_arg(root),
            ],
        )
        status = _str(result[0])
        if status == "not_owner":
            raise NotOwner(reservation_id)
        if status == "exhausted":
            tight, reason = _str(result[1]), _str(result[2])
            retry = int(result[5])
            if not int(result[6]):  # no lease would cover it: maybe the period's end will
                entry = self._dir.entries.get(tight)
                if entry is not None and entry.period != "none":
                    now = self._now_ms()
                    end = self._periods.bounds(entry.period, entry.timezone, now)[1]
                    retry = max(1, min(retry, math.ceil((end - now) / 1000)))
            raise BudgetExhausted(
                tight,
                int(result[3]),
                available=int(result[4]),
                retry_after_seconds=retry,
                reason="usd" if reason == "usd" else "tokens",
            )
        chain = tuple(_str(result[5]).split(","))
        return Reservation(
            reservation_id=reservation_id,
            pool=self._require_view(result[1], pool),
            chain=chain,
            tokens=int(result[2]),
            completion_tokens=int(result[6]),
            usd_micros=int(result[4]),
            lease_expires_at_ms=int(result[3]),
            created=status == "ok",
        )

    async def commit(
        self,
        reservation_id: str,
        used_tokens: int,
        *,
        pool: str,
        used_usd_micros: int = 0,
        owner: str | None = None,
        kind: str | None = None,
        ledger: LedgerLine | None = None,
    ) -> EndResult:
        """End a reservation with its actual usage, in every pool of its chain.

        ``reserved -= tokens; used += used_tokens`` (and the same in micro-dollars),
        after rolling the periods, so the usage lands in the period in which it ends.
        Metered kinds (chat, embedding, transcription, ...) are charged what they
        used, even past the reservation; a ``kind="manual"`` reservation (usage its
        holder reports itself) is charged at most what it reserved: ``used_tokens``
        is capped at its tokens and ``used_usd_micros`` at its micro-dollars. Every
        counter saturates at MAX_AMOUNT. ``pool`` is the pool it was reserved in (it
        locates the tree; the pool may have been deleted since: the reservation then
        settles in the ancestors that remain, and in no pool created again under a
        deleted pool's name). Exactly once: a repeated commit or release, or one
        after the lease expired (then settled by its policy), changes nothing and
        answers ``already_ended=True``; so does an id or pool that is not known
        (``state="unknown"``). ``owner``/``kind``, when given, must match the
        reservation's (NotOwner). The same script adds the charge to the cost ledger
        (see ``costs``): ``ledger`` names the provider and model and splits the tokens;
        without it the charge is recorded as prompt tokens of provider and model ''.
        Raises InvalidArgument, InvalidAmount, NotOwner, BudgetUnavailable.
        """
        _check_id(reservation_id)
        _check_amount(used_tokens, "used_tokens")
        _check_amount(used_usd_micros, "used_usd_micros")
        line = ""
        if ledger is not None:
            prompt = min(max(int(ledger.prompt_tokens), 0), MAX_AMOUNT)
            completion = min(max(int(ledger.completion_tokens), 0), MAX_AMOUNT)
            line = f"{_ledger_name(ledger.provider)} {_ledger_name(ledger.model)} {prompt} {completion}"
        return await self._finish(reservation_id, pool, "commit", used_tokens, used_usd_micros, owner, kind, line)

    async def release(
        self, reservation_id: str, *, pool: str, owner: str | None = None, kind: str | None = None
    ) -> EndResult:
        """End a reservation without usage (``reserved -= tokens`` along its chain); exactly once, like commit."""
        _check_id(reservation_id)
        return await self._finish(reservation_id, pool, "release", 0, 0, owner, kind)

    async def _finish(
        self,
        reservation_id: str,
        pool: str,
        mode: Literal["commit", "release"],
        used: int,
        used_usd: int,
        owner: str | None,
        kind: str | None,
        line: str = "",
    ) -> EndResult:
        _check_pool_name(pool)
        root: str | None = None
        names: tuple[str, ...] = ()
        try:
            entry, names = await self._entry(pool)
            root = entry.root
        except PoolNotFound:
            pass
        result = None
        if root is not None:
            result = await self._end(reservation_id, root, names, mode, used, used_usd, owner, kind, line)
        if result is None or (result.state == "unknown" and result.pool is None):
            # The pool was deleted (and maybe created again in another tree): its
            # open reservations still settle in the ancestors that remain.
            retired = await self._retired(pool)
            if retired is not None and retired[0] != root:
                parent = retired[1]
                names = self._dir.chains.get(parent, ()) if parent else ()
                return await self._end(reservation_id, retired[0], names, mode, used, used_usd, owner, kind, line)
        return result or EndResult(pool=None, already_ended=True, state="unknown")

    async def _retired(self, pool: str) -> tuple[str, str | None] | None:
        """(root, parent) of the tree a deleted pool of this name was in, if one was."""
        raw = await guard(self._redis.hget(self._retired_key, pool))
        if raw is None:
            return None
        try:
            data = json.loads(_str(raw))
            return str(data["root"]), data.get("parent") or None
        except (ValueError, KeyError, TypeError):
            return None

    async def _end(
        self,
        reservation_id: str,
        root: str,
        names: tuple[str, ...],
        mode: Literal["commit", "release"],
        used: int,
        used_usd: int,
        owner: str | None,
        kind: str | None,
        line: str = "",
    ) -> EndResult:
        """Run END in ``root``'s tree with ``names`` as the caller's picture of the chain."""
        for _ in range(_ATTEMPTS):
            now = self._now_ms()
            result = await guard(
                self._lua_end(
                    keys=[self._lease_key(root)],
                    args=[
                        self.tree_base(root),
                        reservation_id,
                        mode,
                        f"{used} {used_usd} {self.ended_retention_seconds}",
                        "0" if owner is None else "1",
                        owner or "",
                        "0" if kind is None else "1",
                        kind or "",
                        *self._chain_args(names, now),
                        line,
                    ],
                )
            )
            status = _str(result[0])
            if status == "chain":  # it was reserved along another chain of this tree
                names = tuple(_str(result[1]).split(","))
                continue
            if status == "stale":
                await self._reload(self._dir.version)
                continue
            if status == "not_owner":
                raise NotOwner(reservation_id)
            view = self._view(result[1])
            if status == "ok":
                return EndResult(pool=view, already_ended=False, state="committed" if mode == "commit" else "released")
            return EndResult(pool=view, already_ended=True, state=_ENDED_STATES.get(status, "unknown"))
        raise BudgetUnavailable(f"Pool directory for tree '{root}' keeps changing; try again")

    async def renew(self, reservation_id: str, *, pool: str, lease_seconds: float | None = None) -> int | None:
        """Extend an active reservation's lease to ``now + lease_seconds`` (never shortens it).

        Returns the new expiry (ms, Redis clock), or None when the reservation is not
        active (ended, expired now and settled by its policy, or unknown). Raises
        InvalidArgument, InvalidAmount, BudgetUnavailable.
        """
        _check_id(reservation_id)
        _check_pool_name(pool)
        if lease_seconds is not None and lease_seconds < 0:
            raise InvalidAmount(f"lease_seconds must not be negative (got {lease_seconds})")
        try:
            entry, _ = await self._entry(pool)
        except PoolNotFound:
            return None
        lease_ms = max(1, int((lease_seconds or self.default_lease_seconds) * 1000))
        result = await guard(
            self._lua_renew(
                keys=[self._lease_key(entry.root)],
                args=[
                    self.tree_base(entry.root),
                    reservation_id,
                    lease_ms,
                    self.ended_retention_seconds,
                    self._starts_arg(entry.root),
                ],
            )
        )
        return int(result[1]) if _str(result[0]) == "ok" else None

    async def report(self, pool: str, actual: int, *, usd_micros: int = 0, report_id: str | None = None) -> PoolView:
        """Untracked usage: ``used += actual`` (and ``used_usd += usd_micros``) in the pool and every ancestor.

        For usage that had no reservation (admin only); reservations end with commit
        or release. The counters saturate at MAX_AMOUNT. Counted once per
        ``report_id`` within ``ended_retention_seconds`` (a repeated report is a
        no-op that returns the pool as it is); without one, the call gets its own,
        so a retry of this call by the Redis client cannot count twice. Raises
        PoolNotFound, InvalidArgument, InvalidAmount, BudgetUnavailable.
        """
        _check_pool_name(pool)
        _check_amount(actual, "actual")
        _check_amount(usd_micros, "usd_micros")
        if report_id is None:
            report_id = uuid.uuid4().hex
        else:
            _check_id(report_id, "report_id")
        ttl = max(1, self.ended_retention_seconds)
        result = await self._run_chain(
            self._lua_report,
            pool,
            lambda root, chain: [self.tree_base(root), actual, usd_micros, *chain, report_id, ttl],
        )
        return self._require_view(result[1], pool)

    # -- pools ------------------------------------------------------------------

    async def get_pool(self, pool: str) -> PoolView:
        """The pool's settings and counters, after settling expired leases and rolling periods.

        Raises PoolNotFound, BudgetUnavailable.
        """
        _check_pool_name(pool)
        return (await self._chain_views(pool))[0]

    async def list_pools(self, names: Iterable[str] | None = None) -> list[PoolView]:
        """Every pool (or those of ``names`` that exist), sorted by name; current as get_pool's."""
        directory = await self._fresh()
        wanted = sorted(directory.entries) if names is None else sorted(set(names))
        if names is not None and any(name not in directory.entries for name in wanted):
            await self._reload(directory.version)
            directory = self._dir
        by_root: dict[str, list[str]] = {}
        for name in wanted:
            entry = directory.entries.get(name)
            if entry is not None:
                by_root.setdefault(entry.root, []).append(name)
        now = self._now_ms()
        results = await asyncio.gather(
            *(
                guard(
                    self._lua_view_tree(
                        keys=[self._lease_key(root)],
                        args=[
                            self.tree_base(root),
                            self.ended_retention_seconds,
                            self.reclaim_batch,
                            *self._chain_args(members, now),
                            self._starts_arg(root, now),
                        ],
                    )
                )
                for root, members in by_root.items()
            )
        )
        views = [view for result in results for raw in result if (view := self._view(raw, now)) is not None]
        return sorted(views, key=lambda view: view.name)

    # -- the cost ledger ----------------------------------------------------------

    async def costs(
        self, first_day: date, last_day: date, *, pools: Iterable[str] | None = None, key_id: str | None = None
    ) -> list[CostLine]:
        """The ledger's lines for UTC days ``first_day`` through ``last_day`` (at most 400
        days, kept as long): every tree's (those of the pools that exist and of pools
        deleted since), or with ``pools`` only the trees those pools are in; with
        ``pools`` / ``key_id`` only their lines. Each line is exact: the commits' own
        counters, written in the same script as the charge. One pipelined read per tree,
        a few trees at a time, so a long range never takes every Redis connection.
        Raises InvalidArgument, BudgetUnavailable."""
        if last_day < first_day:
            raise InvalidArgument("the range ends before it starts")
        if (last_day - first_day).days >= 400:
            raise InvalidArgument("a cost query spans at most 400 days")
        directory = await self._fresh()
        wanted = set(pools) if pools is not None else None
        if wanted is not None:
            roots = {directory.entries[name].root for name in wanted if name in directory.entries}
            retired_names = [name for name in wanted if name not in directory.entries]
            if retired_names:
                for raw in await guard(self._redis.hmget(self._retired_key, retired_names)):
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        roots.add(str(json.loads(_str(raw))["root"]))
                for name in retired_names:  # a deleted root: its tree is named after it
                    if await guard(self._redis.sismember(self._retired_roots_key, name)):
                        roots.add(name)
        else:
            roots = {entry.root for entry in directory.entries.values()}
            retired, retired_roots = await asyncio.gather(
                guard(self._redis.hvals(self._retired_key)), guard(self._redis.smembers(self._retired_roots_key))
            )
            roots.update(_str(root) for root in retired_roots)
            for raw in retired:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    roots.add(str(json.loads(_str(raw))["root"]))
        first = (first_day - _EPOCH_DAY).days
        days = list(range(first, (last_day - _EPOCH_DAY).days + 1))
        readers = asyncio.Semaphore(_COST_READERS)

        async def read_tree(root: str) -> list[dict[Any, Any]]:
            async with readers:
                # One tree's keys share its hash tag: one pipelined round trip (one slot).
                pipe = self._redis.pipeline(transaction=False)
                for day in days:
                    pipe.hgetall(f"{self.tree_base(root)}costs:{day}")
                result: list[dict[Any, Any]] = await guard(pipe.execute())
                return result

        ordered = sorted(roots)
        per_tree = await asyncio.gather(*(read_tree(root) for root in ordered))
        lines: dict[tuple[int, str, str, str, str], CostLine] = {}
        for hashes in per_tree:
            for day, fields in zip(days, hashes, strict=True):
                for raw_field, raw_value in fields.items():
                    parts = _str(raw_field).split("\t")
                    if len(parts) != 5 or parts[4] not in _LEDGER_METRICS:
                        continue
                    provider, model, pool, line_key, metric = parts
                    if (wanted is not None and pool not in wanted) or (key_id is not None and line_key != key_id):
                        continue
                    line = lines.get((day, provider, model, pool, line_key))
                    if line is None:
                        line = lines[(day, provider, model, pool, line_key)] = CostLine(
                            (_EPOCH_DAY + timedelta(days=day)).isoformat(), provider, model, pool, line_key
                        )
                    setattr(line, _LEDGER_METRICS[metric], getattr(line, _LEDGER_METRICS[metric]) + int(raw_value))
        return sorted(lines.values(), key=lambda line: (line.day, line.provider, line.model, line.pool, line.key_id))

    async def _define(
        self, spec: PoolSpec, mode: str, *, capacity: int | None, cap_usd_micros: int | _Unset | None
    ) -> tuple[str, PoolView]:
        """Run DEFINE for ``spec`` in its tree; keep the directory in step. Returns (status, view).

        ``capacity`` None keeps the stored one; ``cap_usd_micros`` UNSET keeps the
        stored money cap and None removes it.
        """
        parent_chain: tuple[str, ...] = ()
        root = spec.name
        if spec.parent is not None:
            try:
                parent_entry, parent_chain = await self._entry(spec.parent)
            except PoolNotFound:
                raise PoolNotFound(spec.parent) from None
            root = parent_entry.root
            if len(parent_chain) + 1 > MAX_DEPTH:
                raise InvalidArgument(f"pool '{spec.name}' would be deeper than {MAX_DEPTH} levels")
            if spec.name in parent_chain:
                raise InvalidArgument(f"pool '{spec.name}' cannot be its own ancestor")
        existing = self._dir.entries.get(spec.name)
        if existing is None:
            await self._reload(self._dir.version)
            existing = self._dir.entries.get(spec.name)
        if existing is not None and existing.root != root:
            if await guard(self._redis.exists(self.pool_key(spec.name, existing.root))):
                if mode == "create":
                    raise PoolExists(spec.name)
                if mode == "ensure":  # it exists: left as it is, wherever it is
                    return "unchanged", await self.get_pool(spec.name)
                if mode == "apply":
                    raise InvalidArgument(f"pool '{spec.name}' has parent '{existing.parent}'; a parent is fixed")
                root = existing.root  # upsert/update of an existing pool elsewhere: follow it
            # else: a dangling entry left by an interrupted create or delete; replaced below
        claimed = False
        entry = _Entry(spec.parent, root, spec.period, spec.timezone)
        if existing is None and mode != "update":
            # Claim the name first so two replicas cannot create it in two trees.
            claimed = bool(await guard(self._redis.hsetnx(self._directory_key, spec.name, self._entry_json(entry))))
            if not claimed:
                await self._reload(self._dir.version)
                return await self._define(spec, mode, capacity=capacity, cap_usd_micros=cap_usd_micros)
        now = self._now_ms()
        start = self._periods.bounds(spec.period, spec.timezone, now)[0]
        cap = "" if isinstance(cap_usd_micros, _Unset) else ("-" if cap_usd_micros is None else cap_usd_micros)
        result = await guard(
            self._lua_define(
                keys=[self.pool_key(spec.name, root)],
                args=[
                    self.tree_base(root),
                    spec.name,
                    mode,
                    spec.parent or "",
                    "" if capacity is None else capacity,
                    spec.period,
                    spec.timezone,
                    cap,
                    start,
                ],
            )
        )
        status = _str(result[0])
        if status in ("no_parent", "not_found"):
            if claimed:
                await guard(self._redis.hdel(self._directory_key, spec.name))
            raise PoolNotFound(spec.parent if status == "no_parent" and spec.parent else spec.name)
        if status == "exists":
            raise PoolExists(spec.name)
        if status == "parent_differs":
            raise InvalidArgument(f"pool '{spec.name}' has another parent; a parent is fixed at creation")
        view = self._require_view(result[1], spec.name)
        stored = _Entry(view.parent, root, view.period, view.timezone)
        if status in ("created", "updated") and self._dir.entries.get(spec.name) != stored:
            await guard(self._redis.hset(self._directory_key, spec.name, self._entry_json(stored)))
            await self._announce_change(spec.name)
        elif claimed:
            await self._announce_change(spec.name)
        return status, self._view(result[1]) or view

    @staticmethod
    def _entry_json(entry: _Entry) -> str:
        return json.dumps(
            {"parent": entry.parent, "root": entry.root, "period": entry.period, "tz": entry.timezone},
            separators=(",", ":"),
        )

    async def _announce_change(self, pool: str) -> None:
        await self._reload()
        await guard(self._redis.publish(self.changes_channel, pool))

    def _validate_spec(self, spec: PoolSpec) -> None:
        _check_pool_name(spec.name)
        if spec.parent is not None:
            _check_pool_name(spec.parent, "parent")
            if spec.parent == spec.name:
                raise InvalidArgument("a pool cannot be its own parent")
        _check_amount(spec.capacity, "capacity")
        validate_period(spec.period, spec.timezone)
        if spec.cap_usd_micros is not None:
            _check_amount(spec.cap_usd_micros, "cap_usd_micros")

    async def create_pool(self, spec: PoolSpec) -> PoolView:
        """Create a pool under ``spec.parent`` (None: a new root).

        Raises PoolExists, PoolNotFound (the parent), InvalidArgument (name, period,
        time zone, depth > 8), InvalidAmount, BudgetUnavailable.
        """
        self._validate_spec(spec)
        return (await self._define(spec, "create", capacity=spec.capacity, cap_usd_micros=spec.cap_usd_micros))[1]

    async def upsert_pool(self, name: str, capacity: int) -> PoolView:
        """The seed's call: set an existing pool's capacity (keeping all else), or create a root pool."""
        _check_pool_name(name)
        _check_amount(capacity, "capacity")
        try:
            entry, _ = await self._entry(name)
        except PoolNotFound:
            return (await self._define(PoolSpec(name, capacity), "upsert", capacity=capacity, cap_usd_micros=None))[1]
        spec = PoolSpec(name, capacity, entry.parent, entry.period, entry.timezone)
        return (await self._define(spec, "upsert", capacity=capacity, cap_usd_micros=UNSET))[1]

    async def ensure_pool(self, spec: PoolSpec) -> PoolView:
        """Create the pool unless it exists; an existing pool is left as it is."""
        self._validate_spec(spec)
        return (await self._define(spec, "ensure", capacity=spec.capacity, cap_usd_micros=spec.cap_usd_micros))[1]

    async def apply_pool(self, spec: PoolSpec) -> PoolView:
        """Create the pool, or update its capacity, period, time zone and money cap to match ``spec``.

        For pools from configuration at start. Counters are kept. A different parent
        than the existing pool's raises InvalidArgument (a parent is fixed).
        """
        self._validate_spec(spec)
        return (await self._define(spec, "apply", capacity=spec.capacity, cap_usd_micros=spec.cap_usd_micros))[1]

    async def update_pool(
        self,
        name: str,
        *,
        capacity: int | None = None,
        period: str | None = None,
        timezone: str | None = None,
        cap_usd_micros: int | _Unset | None = UNSET,
    ) -> PoolView:
        """Change the given settings (None / UNSET: keep); ``cap_usd_micros=None`` removes the money cap.

        Counters are kept. A new period or time zone counts from its current period
        on, with the usage so far (a settings change grants no fresh budget; use
        reset_pool for that). Raises PoolNotFound, InvalidArgument, InvalidAmount,
        BudgetUnavailable.
        """
        _check_pool_name(name)
        if capacity is not None:
            _check_amount(capacity, "capacity")
        if isinstance(cap_usd_micros, int):
            _check_amount(cap_usd_micros, "cap_usd_micros")
        entry, _ = await self._entry(name)
        new_period = entry.period if period is None else period
        new_timezone = entry.timezone if timezone is None else timezone
        validate_period(new_period, new_timezone)
        spec = PoolSpec(name, capacity or 0, entry.parent, new_period, new_timezone)
        return (await self._define(spec, "update", capacity=capacity, cap_usd_micros=cap_usd_micros))[1]

    async def delete_pool(self, name: str) -> None:
        """Delete a pool: its state and its directory entry.

        Reservations open in it are still settled (commit, release or expiry) in its
        ancestors, never in a pool created later under the same name: that is a new
        pool (a new incarnation), untouched by the old reservations. Deleting a root
        (the last pool of its tree) drops the tree's open reservations. Raises
        PoolInUse while it has children, PoolNotFound, BudgetUnavailable.
        """
        _check_pool_name(name)
        entry, _ = await self._entry(name)
        result = await guard(
            self._lua_delete(keys=[self.pool_key(name, entry.root)], args=[self.tree_base(entry.root), name])
        )
        status = _str(result[0])
        if status == "in_use":
            raise PoolInUse(name, int(result[1]))
        if status == "ok" and entry.parent is not None:
            # Where its open reservations live, once the directory forgets it.
            retired = json.dumps({"root": entry.root, "parent": entry.parent}, separators=(",", ":"))
            await guard(self._redis.hset(self._retired_key, name, retired))
        elif status == "ok":
            # A whole tree is gone; its cost ledger stays readable (``costs``) until it expires.
            await guard(self._redis.sadd(self._retired_roots_key, entry.root))
        await guard(self._redis.hdel(self._directory_key, name))
        await self._announce_change(name)
        if status == "not_found":
            raise PoolNotFound(name)

    async def reset_pool(self, name: str) -> PeriodRoll:
        """Start the pool's usage again at 0 now (reserved tokens stay reserved).

        Returns the roll with reason "admin" for the caller to announce; roll_periods
        will not return it. Raises PoolNotFound, BudgetUnavailable.
        """
        _check_pool_name(name)
        entry, chain = await self._entry(name)
        result = await guard(
            self._lua_reset(keys=[self.pool_key(name, entry.root)], args=[self.tree_base(entry.root), name])
        )
        if _str(result[0]) == "not_found":
            raise PoolNotFound(name)
        return PeriodRoll(
            pool=name,
            chain=chain,
            period=_str(result[2]),
            reason="admin",
            period_start_ms=int(result[3]),
            previous_period_start_ms=int(result[4]),
            used=int(result[5]),
            used_usd_micros=int(result[6]),
            capacity=int(result[7]),
        )

    async def roll_periods(self) -> list[PeriodRoll]:
        """Roll every pool whose period has moved on, and return each roll not yet announced.

        A roll made by any call on any replica (a reserve may roll first) is returned
        exactly once across every caller: the script marks it announced atomically.
        (A reply lost to a timeout after the script ran loses that announcement.) A
        tree that cannot be reached is skipped until the next call; BudgetUnavailable
        only when none could be reached.
        """
        directory = await self._fresh()
        by_root: dict[str, list[str]] = {}
        for name, entry in directory.entries.items():
            if entry.period != "none":
                by_root.setdefault(entry.root, []).append(name)
        now = self._now_ms()

        async def roll(root: str) -> list[Any]:
            result = await guard(
                self._lua_roll(
                    keys=[self._lease_key(root)], args=[self.tree_base(root), *self._chain_args(by_root[root], now)]
                )
            )
            return list(result)

        rolls: list[PeriodRoll] = []
        for raw in [raw for result in await self._each_root(sorted(by_root), roll) for raw in result]:
            name = _str(raw[0])
            rolls.append(
                PeriodRoll(
                    pool=name,
                    chain=directory.chains.get(name, (name,)),
                    period=_str(raw[1]),
                    reason="period",
                    period_start_ms=int(raw[2]),
                    previous_period_start_ms=int(raw[3]),
                    used=int(raw[4]),
                    used_usd_micros=int(raw[5]),
                    capacity=int(raw[6]),
                )
            )
        return rolls

    async def reap_expired(self) -> int:
        """Settle expired leases in every tree (up to ``reclaim_batch`` per tree) by their policy; returns how many.

        Each pool of an expired reservation's chain rolls into its current period
        first, so the charge lands in the period in which the lease is settled.
        Raises BudgetUnavailable only when no tree could be reached.
        """
        directory = await self._fresh()

        async def reap(root: str) -> int:
            return int(
                await guard(
                    self._lua_reap(
                        keys=[self._lease_key(root)],
                        args=[
                            self.tree_base(root),
                            self.ended_retention_seconds,
                            self.reclaim_batch,
                            self._starts_arg(root),
                        ],
                    )
                )
            )

        return sum(await self._each_root(sorted({entry.root for entry in directory.entries.values()}), reap))

    # -- reading state (metrics) -------------------------------------------------

    async def read_state(
        self, *, trees_per_batch: int = _STATE_TREES_PER_BATCH, max_leases: int = 10_000
    ) -> StoreState:
        """Every pool's counters and open reservations, read only: no lease settled, no
        period rolled, no script run (see :class:`PoolState`).

        Cheap for Redis: the pools come from the in-memory directory (no key scan);
        ``trees_per_batch`` trees are read in one pipelined round trip (pool hashes,
        lease set size, up to ``max_leases`` lease ids each), and one more round trip
        reads those reservations' chains. A batch that cannot be read is reported in
        ``unreachable`` (the others are kept); BudgetUnavailable only when nothing
        could be read.
        """
        if trees_per_batch <= 0 or max_leases < 0:
            raise ValueError("trees_per_batch must be positive and max_leases not negative")
        directory = await self._fresh()
        by_root: dict[str, list[str]] = {}
        for name, entry in directory.entries.items():
            by_root.setdefault(entry.root, []).append(name)
        roots = sorted(by_root)
        trees: list[TreeState] = []
        unreachable: list[str] = []
        failure: BudgetUnavailable | None = None
        for at in range(0, len(roots), trees_per_batch):
            batch = roots[at : at + trees_per_batch]
            try:
                trees.extend(await self._read_trees({root: sorted(by_root[root]) for root in batch}, max_leases))
            except BudgetUnavailable as exc:
                failure = failure or exc
                unreachable.extend(batch)
                log.warning("pool trees unreadable", extra={"roots": len(batch), "error": exc.message})
        if failure is not None and not trees:
            raise failure
        return StoreState(tuple(trees), tuple(unreachable))

    async def _read_trees(self, members: dict[str, list[str]], max_leases: int) -> list[TreeState]:
        """Read ``members`` (root -> pool names): two pipelined round trips in all.
        Every key of one tree shares its hash tag; a cluster pipeline groups them by node."""
        pipe = self._redis.pipeline(transaction=False)
        for root, names in members.items():
            for name in names:
                pipe.hmget(self.pool_key(name, root), list(_STATE_FIELDS))
            pipe.zcard(self._lease_key(root))
            if max_leases:
                pipe.zrange(self._lease_key(root), 0, max_leases - 1)
        replies: list[Any] = await guard(pipe.execute())
        at = 0
        # root -> (name -> [fields], lease count, lease ids)
        read: dict[str, tuple[dict[str, list[Any]], int, list[str]]] = {}
        for root, names in members.items():
            fields = {name: reply for name, reply in zip(names, replies[at : at + len(names)], strict=True)}
            at += len(names)
            count = int(replies[at])
            at += 1
            ids: list[str] = []
            if max_leases:
                ids = [_str(lease) for lease in replies[at]]
                at += 1
            read[root] = ({name: raw for name, raw in fields.items() if raw[0] is not None}, count, ids)
        records: list[Any] = []
        if any(ids for _, _, ids in read.values()):
            pipe = self._redis.pipeline(transaction=False)
            for root, (_, _, ids) in read.items():
                for lease in ids:
                    pipe.hmget(f"{self.tree_base(root)}res:{lease}", ["chain", "state", "incs"])
            records = await guard(pipe.execute())
        trees: list[TreeState] = []
        at = 0
        for root, (fields, count, ids) in read.items():
            incarnations = {name: int(raw[8] or 0) for name, raw in fields.items()}
            holding = dict.fromkeys(fields, 0)
            for chain_raw, state, incs_raw in records[at : at + len(ids)]:
                # Counted where settling it would: each pool of its chain still of the same incarnation.
                if chain_raw is None or _str(state or b"") != "active":
                    continue
                incs = [int(inc) for inc in _str(incs_raw).split(",")] if incs_raw else None
                for i, name in enumerate(_str(chain_raw).split(",")):
                    if name in holding and (incs is None or (i < len(incs) and incs[i] == incarnations[name])):
                        holding[name] += 1
            at += len(ids)
            pools = tuple(
                PoolState(
                    name=name,
                    root=root,
                    parent=_str(raw[3] or b"") or None,
                    period=_str(raw[4] or b"none"),
                    capacity=int(raw[0]),
                    used=int(raw[1] or 0),
                    reserved=int(raw[2] or 0),
                    cap_usd_micros=int(raw[5]) if raw[5] else None,
                    used_usd_micros=int(raw[6] or 0),
                    reserved_usd_micros=int(raw[7] or 0),
                    open_reservations=holding[name],
                )
                for name, raw in fields.items()
            )
            trees.append(TreeState(root, pools, count, complete=len(ids) >= count))
        return trees

    async def _each_root(self, roots: list[str], call: Callable[[str], Awaitable[R]]) -> list[R]:
        """``call`` for every tree, a few at a time. A tree that cannot be reached is
        skipped (and tried on the next tick) so the others' results are not lost;
        BudgetUnavailable only when none could be reached."""
        results: list[R] = []
        failures: list[BudgetUnavailable] = []
        for at in range(0, len(roots), _ROOTS_AT_ONCE):
            chunk = roots[at : at + _ROOTS_AT_ONCE]
            for root, outcome in zip(
                chunk, await asyncio.gather(*(call(root) for root in chunk), return_exceptions=True), strict=True
            ):
                if isinstance(outcome, BudgetUnavailable):
                    failures.append(outcome)
                    log.warning("pool tree unreachable", extra={"root": root, "error": outcome.message})
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    results.append(outcome)
        if failures and not results:
            raise failures[0]
        return results


async def reap_forever(store: BudgetStore, interval_seconds: float) -> None:
    """Settle expired leases every ``interval_seconds`` until cancelled.

    Tokens of a dead holder are settled even when no one reserves from that tree.
    A Redis outage is logged and retried on the next tick.
    """
    while True:
        try:
            ended = await store.reap_expired()
        except BudgetUnavailable as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # a cancel turned into a connection error
                raise asyncio.CancelledError from exc
            log.warning("lease reaper could not reach Redis", extra={"error": str(exc)})
        else:
            if ended:
                log.info("expired leases settled", extra={"count": ended})
            if ended >= store.reclaim_batch:
                await asyncio.sleep(0)  # a full batch: more may be waiting
                continue
        await asyncio.sleep(interval_seconds)
