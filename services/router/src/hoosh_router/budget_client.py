"""The router's side of metering (``hoosh_metering``): the key's own limits at
admission, one reservation across the pool chain, lease renewal for long calls,
and settlement that is never dropped. Metering errors become the router's.

The backend is the metering library in-process against Redis
(``hoosh_metering.pools.BudgetStore``, the hot path: one Lua round trip per step) or
the budget service over gRPC (``hoosh_metering.client.BudgetServiceClient``,
``HOOSH_ROUTER_BUDGET_MODE=grpc``); atomicity lives in the Lua scripts, so the two
mix freely. Key limits always run in-process (``hoosh_metering.limits.KeyLimiter``)
and cost nothing for a key without limits.

Redis unreachable or slow means 503 ``budget_unavailable`` at admission: nothing is
served free. After the upstream call, a commit or release that cannot reach Redis is
retried in the background with backoff until it lands (idempotent by reservation id)
or the lease runs out; from then on the reservation's expiry policy settles it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from hoosh_metering import errors as metering
from hoosh_metering.limits import KeyLimits
from hoosh_metering.pools import EndResult, LedgerLine, Reservation
from redis.exceptions import RedisError

from .errors import BudgetExhausted, BudgetUnavailable, InvalidRequest, PoolNotFound

log = logging.getLogger(__name__)

# What "the budget store could not be reached in time" looks like from here.
UNREACHABLE: tuple[type[BaseException], ...] = (metering.BudgetUnavailable, RedisError, OSError, TimeoutError)


class BudgetBackend(Protocol):
    """What the router needs of ``BudgetStore`` / ``BudgetServiceClient`` (same signatures)."""

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
    ) -> Reservation: ...

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
    ) -> EndResult: ...

    async def release(
        self, reservation_id: str, *, pool: str, owner: str | None = None, kind: str | None = None
    ) -> EndResult: ...

    async def renew(self, reservation_id: str, *, pool: str, lease_seconds: float | None = None) -> int | None: ...


SettleAction = Callable[[], Awaitable[EndResult]]


@dataclass(slots=True)
class Hold:
    """A reservation one request holds (or may hold: see ``RouterBudget.placeholder``)."""

    reservation_id: str
    pool: str
    owner: str
    kind: str
    lease_until: float  # time.monotonic() when the lease runs out; renewals push it
    chain: tuple[str, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0  # granted: what goes upstream as max_tokens
    tokens: int = 0  # prompt + granted completion
    confirmed: bool = False  # the store answered the reserve call
    # A user key sees only its own pools: an exhausted ancestor is named only to admins.
    reveal_ancestors: bool = False


class RouterBudget:
    def __init__(
        self,
        backend: BudgetBackend,
        lease_seconds: float,
        *,
        retry_base_seconds: float = 0.05,
        retry_max_seconds: float = 5.0,
    ) -> None:
        self._backend = backend
        self.lease_seconds = lease_seconds
        self._retry_base = retry_base_seconds
        self._retry_max = retry_max_seconds
        self._queue: dict[str, _Pending] = {}  # settlements to retry, oldest first
        self._worker: asyncio.Task[None] | None = None

    # -- admission ----------------------------------------------------------------------

    def placeholder(self, reservation_id: str, pool: str, owner: str, kind: str) -> Hold:
        """The hold of a reservation asked for but not (yet) confirmed: a request
        cancelled while its reserve call is in flight releases it through this."""
        return Hold(reservation_id, pool, owner, kind, time.monotonic() + self.lease_seconds)

    async def reserve(
        self,
        hold: Hold,
        prompt_tokens: int,
        *,
        completion_tokens: int = 0,
        min_completion_tokens: int | None = None,
        input_price_micros: int = 0,
        output_price_micros: int = 0,
    ) -> Hold:
        """Reserve ``prompt_tokens`` plus up to ``completion_tokens`` (at least
        ``min_completion_tokens``) in ``hold.pool`` and every ancestor, atomically; fills
        ``hold`` with what was granted. Raises PoolNotFound, BudgetExhausted,
        InvalidRequest or BudgetUnavailable."""
        started = time.monotonic()
        try:
            reservation = await self._backend.reserve(
                hold.pool,
                prompt_tokens,
                hold.reservation_id,
                self.lease_seconds,
                completion_tokens=completion_tokens,
                min_completion_tokens=min_completion_tokens,
                input_price_micros=input_price_micros,
                output_price_micros=output_price_micros,
                owner=hold.owner,
                kind=hold.kind,
            )
        except metering.PoolNotFound as error:
            raise PoolNotFound(f"Token pool '{hold.pool}' does not exist", param="pool") from error
        except metering.BudgetExhausted as error:
            message = error.message
            if error.pool != hold.pool and not hold.reveal_ancestors:
                unit = "micro-dollars" if error.reason == "usd" else "tokens"
                message = (
                    f"Budget exceeded: a pool above '{hold.pool}' cannot cover the {error.requested} {unit} "
                    "this request needs right now"
                )
            raise BudgetExhausted(message, retry_after=error.retry_after_seconds) from error
        except metering.InvalidArgument as error:
            raise InvalidRequest(error.message, param="pool") from error
        except metering.NotOwner as error:  # the request id names another holder's reservation
            raise InvalidRequest("This request id is already in use", param="request_id") from error
        except UNREACHABLE as error:
            raise BudgetUnavailable() from error
        hold.chain = reservation.chain or (hold.pool,)
        hold.prompt_tokens = prompt_tokens
        hold.completion_tokens = reservation.completion_tokens
        hold.tokens = reservation.tokens
        hold.lease_until = started + self.lease_seconds
        hold.confirmed = True
        return hold

    # -- leases -------------------------------------------------------------------------

    def keep_alive(self, hold: Hold) -> Renewal:
        """Renew ``hold``'s lease every third of it until the returned renewal is
        cancelled (a long call or stream must not see its reservation expire under it).
        Until the first third has passed it is one timer: a short call costs no task."""
        return Renewal(self, hold)

    async def _renew_forever(self, hold: Hold) -> None:
        """Renew now, then every third of the lease."""
        interval = self.lease_seconds / 3
        while True:
            sent = time.monotonic()
            try:
                expires = await self._backend.renew(
                    hold.reservation_id, pool=hold.pool, lease_seconds=self.lease_seconds
                )
            except UNREACHABLE as error:
                # Another try before the lease ends: the next tick may reach Redis.
                log.warning("lease renewal failed", extra={"reservation_id": hold.reservation_id, "error": repr(error)})
            except metering.BudgetError as error:
                log.error(
                    "lease renewal refused", extra={"reservation_id": hold.reservation_id, "error": error.message}
                )
                return
            else:
                if expires is None:
                    return  # it has ended already: nothing left to keep alive
                hold.lease_until = sent + self.lease_seconds
            await asyncio.sleep(interval)

    # -- settlement ---------------------------------------------------------------------

    async def commit(
        self, hold: Hold, used_tokens: int, *, usd_micros: int = 0, ledger: LedgerLine | None = None
    ) -> None:
        """Commit the real usage (and its cost-ledger line, in the same script): one try
        now, then retries in the background until it lands or the lease runs out. Never
        raises."""

        def action() -> Awaitable[EndResult]:
            return self._backend.commit(
                hold.reservation_id,
                used_tokens,
                pool=hold.pool,
                used_usd_micros=usd_micros,
                owner=hold.owner,
                kind=hold.kind,
                ledger=ledger,
            )

        await self._settle(hold, "commit", action)

    async def release(self, hold: Hold) -> None:
        """Give the reservation back, with the same retries as a commit (an unreleased
        reservation would otherwise be charged in full by the default expiry policy).

        A hold the store never confirmed (its reserve call failed on the way: Redis away
        or too slow) is released in the background only, so the 503 is not delayed by a
        second timeout; if the reserve did land, the release still finds it."""

        def action() -> Awaitable[EndResult]:
            return self._backend.release(hold.reservation_id, pool=hold.pool, owner=hold.owner, kind=hold.kind)

        if not hold.confirmed:
            self._enqueue(hold, "release", action, attempts=0)
            return
        await self._settle(hold, "release", action)

    async def _settle(self, hold: Hold, what: Literal["commit", "release"], action: SettleAction) -> None:
        try:
            result = await action()
        except UNREACHABLE as error:
            log.warning(
                f"budget {what} failed; retrying in the background",
                extra={"reservation_id": hold.reservation_id, "error": repr(error)},
            )
            self._enqueue(hold, what, action, attempts=1)
            return
        except metering.BudgetError as error:
            log.error(f"budget {what} refused", extra={"reservation_id": hold.reservation_id, "error": error.message})
            return
        self._check(hold, what, result)

    def _enqueue(self, hold: Hold, what: Literal["commit", "release"], action: SettleAction, *, attempts: int) -> None:
        self._queue[hold.reservation_id] = _Pending(hold, what, action, attempts)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._retry_queue(), name="budget-settlement-retries")

    async def _retry_queue(self) -> None:
        """One worker retries every pending settlement, so an outage costs one failed call
        per backoff step, not one per waiting request. Idempotent by reservation id: a
        settlement that landed although its reply was lost answers ``already_ended``."""
        delay = self._retry_base
        while self._queue:
            await asyncio.sleep(delay / 2 + random.random() * delay / 2)
            landed = False
            for reservation_id, item in list(self._queue.items()):
                if item.hold.lease_until <= time.monotonic():
                    del self._queue[reservation_id]
                    log.error(
                        f"budget {item.what} did not land before the lease ended; "
                        "the reservation's expiry policy settles it",
                        extra={"reservation_id": reservation_id, "pool": item.hold.pool, "attempts": item.attempts},
                    )
                    continue
                item.attempts += 1
                try:
                    result = await item.action()
                except UNREACHABLE:
                    # Still away. Move it to the back so that, on a cluster with one node
                    # down, the next round starts with another tree's settlement.
                    self._queue[reservation_id] = self._queue.pop(reservation_id)
                    break
                except metering.BudgetError as error:
                    del self._queue[reservation_id]
                    log.error(
                        f"budget {item.what} refused", extra={"reservation_id": reservation_id, "error": error.message}
                    )
                    continue
                del self._queue[reservation_id]
                landed = True
                log.info(
                    f"budget {item.what} landed", extra={"reservation_id": reservation_id, "attempts": item.attempts}
                )
                self._check(item.hold, item.what, result)
            delay = self._retry_base if landed else min(self._retry_max, delay * 2)

    @staticmethod
    def _check(hold: Hold, what: str, result: EndResult) -> None:
        if result.already_ended and result.state == "unknown" and what == "release":
            # A reserve that never landed (cancelled or failed on the way): nothing to give back.
            log.debug("released a reservation that was never made", extra={"reservation_id": hold.reservation_id})
        elif result.already_ended:
            log.warning(
                f"reservation had already ended at {what}",
                extra={"reservation_id": hold.reservation_id, "state": result.state},
            )

    @property
    def pending(self) -> int:
        """Settlements still being retried."""
        return len(self._queue)

    async def drain(self, wait_seconds: float) -> None:
        """Wait up to ``wait_seconds`` for settlements still being retried (shutdown);
        what is left then is settled by the leases' expiry policy."""
        worker = self._worker
        if worker is None or worker.done():
            return
        done, _ = await asyncio.wait({worker}, timeout=wait_seconds)
        if not done:
            log.error(
                "budget settlements still pending at shutdown; their leases' expiry policy settles them",
                extra={"pending": len(self._queue)},
            )
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)


class Renewal:
    """A hold's lease kept alive (``RouterBudget.keep_alive``) until ``cancel()``."""

    __slots__ = ("_budget", "_hold", "_task", "_timer")

    def __init__(self, budget: RouterBudget, hold: Hold) -> None:
        self._budget = budget
        self._hold = hold
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            budget.lease_seconds / 3, self._start
        )

    def _start(self) -> None:
        self._timer = None
        self._task = asyncio.ensure_future(self._budget._renew_forever(self._hold))

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()

    @property
    def renewing(self) -> bool:
        """A renewal task has started (the call outlasted a third of the lease)."""
        return self._task is not None


@dataclass(slots=True)
class _Pending:
    hold: Hold
    what: Literal["commit", "release"]
    action: SettleAction
    attempts: int  # calls made so far


def key_limits(rpm: int, tpm: int, max_concurrency: int) -> KeyLimits | None:
    """A caller's limits (0 = unlimited); None when it has none (no Redis call at all)."""
    if not (rpm or tpm or max_concurrency):
        return None
    return KeyLimits(rpm=rpm or None, tpm=tpm or None, max_concurrency=max_concurrency or None)
