"""The STT service's side of the budget: the metering library's store in-process (no
gRPC hop), with its errors mapped to the STT service's (which carry the HTTP-facing
metadata).

A transcription's reservation is made by the caller's key (``owner``) with kind
``transcription``, in its pool and every ancestor at once. Settling it (commit or
release) is retried in the background while Redis is unreachable, until it lands or
the lease has run out (then the reservation's expiry policy has settled it): a
failed settlement is never just a log line.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from hoosh_metering import errors as metering
from hoosh_metering.pools import BudgetStore, EndResult, LedgerLine
from redis.exceptions import RedisError

from .errors import BudgetExhausted, InvalidRequest, PoolNotFound, Unavailable

log = logging.getLogger(__name__)

KIND = "transcription"
# Redis unreachable or too slow: worth another try (an end is idempotent by id).
TRANSIENT: tuple[type[Exception], ...] = (metering.BudgetUnavailable, RedisError)


class SttBudget:
    """Reserve, commit and release transcriptions in the pools of ``store``."""

    def __init__(
        self,
        store: BudgetStore,
        lease_seconds: int,
        *,
        retry_initial_seconds: float = 0.2,
        retry_max_seconds: float = 5.0,
    ) -> None:
        self._store = store
        self._lease_seconds = lease_seconds
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        # Strong references: the event loop keeps only weak ones to tasks.
        self._retries: set[asyncio.Task[None]] = set()

    @property
    def retrying(self) -> int:
        """Settlements still being retried in the background."""
        return len(self._retries)

    async def reserve(
        self, pool: str, tokens: int, reservation_id: str, *, owner: str, price_micros_per_mtok: int = 0
    ) -> tuple[str, ...]:
        """Reserve in ``pool`` and its ancestors; returns the chain (the pool first).
        ``price_micros_per_mtok``: the audio's price per million pool tokens, so money
        caps bound transcriptions too.

        Raises PoolNotFound / BudgetExhausted / InvalidRequest / Unavailable.
        """
        try:
            reservation = await self._store.reserve(
                pool,
                tokens,
                reservation_id,
                self._lease_seconds,
                owner=owner,
                kind=KIND,
                input_price_micros=price_micros_per_mtok,
            )
        except metering.PoolNotFound as error:
            raise PoolNotFound(f"Token pool '{pool}' does not exist", param="pool") from error
        except metering.BudgetExhausted as error:
            raise BudgetExhausted(error.message, retry_after=error.retry_after_seconds) from error
        except metering.InvalidArgument as error:
            raise InvalidRequest(error.message, param="pool") from error
        except TRANSIENT as error:
            # Nothing is admitted free: no reservation, no transcription.
            raise Unavailable("The token budget is unavailable; retry shortly.", code="budget_unavailable") from error
        except metering.BudgetError as error:
            raise Unavailable(error.message, code="budget_unavailable") from error
        return reservation.chain

    async def chain(self, pool: str) -> tuple[str, ...]:
        """``pool`` and its ancestors, or () when it cannot be known (for events only)."""
        try:
            return await self._store.chain(pool)
        except (metering.BudgetError, RedisError):
            return ()

    async def commit(
        self,
        reservation_id: str,
        used_tokens: int,
        *,
        pool: str,
        owner: str,
        usd_micros: int = 0,
        ledger: LedgerLine | None = None,
    ) -> None:
        """Charge the actual usage (and its cost, with its cost-ledger line); retried in the
        background while Redis is unreachable."""
        await self._settle(
            "commit",
            reservation_id,
            lambda: self._store.commit(
                reservation_id,
                used_tokens,
                pool=pool,
                owner=owner,
                kind=KIND,
                used_usd_micros=usd_micros,
                ledger=ledger,
            ),
        )

    async def release(self, reservation_id: str, *, pool: str, owner: str) -> None:
        """Give the reservation back; retried in the background while Redis is unreachable
        (an unreleased reservation would be charged whole under the ``commit`` expiry policy)."""
        await self._settle(
            "release",
            reservation_id,
            lambda: self._store.release(reservation_id, pool=pool, owner=owner, kind=KIND),
        )

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Give background retries ``grace_seconds``, then stop them (the lease and its
        expiry policy settle what is left)."""
        if self._retries:
            await asyncio.wait(set(self._retries), timeout=grace_seconds)
        for task in list(self._retries):
            log.error("budget settlement abandoned at shutdown; the lease expiry policy settles it")
            task.cancel()

    async def _settle(self, action: str, reservation_id: str, attempt: Callable[[], Awaitable[EndResult]]) -> None:
        try:
            result = await attempt()
        except TRANSIENT as error:
            log.warning(
                f"budget {action} failed; retrying in the background",
                extra={"reservation_id": reservation_id, "error": repr(error)},
            )
            self._retry_later(action, reservation_id, attempt)
            return
        except metering.BudgetError as error:  # NotOwner, InvalidArgument: no retry mends them
            log.error(f"budget {action} refused", extra={"reservation_id": reservation_id, "error": error.message})
            return
        if result.already_ended:
            log.warning(
                f"reservation had already ended at {action}",
                extra={"reservation_id": reservation_id, "state": result.state},
            )

    def _retry_later(self, action: str, reservation_id: str, attempt: Callable[[], Awaitable[EndResult]]) -> None:
        task = asyncio.get_running_loop().create_task(self._retry(action, reservation_id, attempt))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(self, action: str, reservation_id: str, attempt: Callable[[], Awaitable[EndResult]]) -> None:
        loop = asyncio.get_running_loop()
        # Past the lease, the reaper has settled it by the expiry policy: stop there.
        deadline = loop.time() + self._lease_seconds
        delay = self._retry_initial
        while loop.time() < deadline:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._retry_max)
            try:
                await attempt()
            except TRANSIENT:
                continue
            except metering.BudgetError as error:
                log.error(f"budget {action} refused", extra={"reservation_id": reservation_id, "error": error.message})
                return
            log.info(f"budget {action} landed after retrying", extra={"reservation_id": reservation_id})
            return
        log.error(
            f"budget {action} did not land before the lease ran out; the expiry policy settled it",
            extra={"reservation_id": reservation_id},
        )
