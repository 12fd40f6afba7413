"""The router's side of the budget: reserve, commit, release, with budget errors
mapped to the router's. The backend is the budget library in-process against Redis
(the hot path: one Lua round trip per step) or the budget service over gRPC
(``HOOSH_ROUTER_BUDGET_MODE=grpc``); atomicity lives in the Lua scripts, so the two
can be mixed freely."""

from __future__ import annotations

import logging
from typing import Protocol

from hoosh_budget import errors as budget_errors
from hoosh_budget.client import BudgetBackend
from redis.exceptions import RedisError

from .errors import BudgetExhausted, InvalidRequest, PoolNotFound, UpstreamUnavailable

log = logging.getLogger(__name__)
UNREACHABLE = (RedisError, budget_errors.BudgetUnavailable)


class Budget(Protocol):
    """What the router needs of the budget: every reservation ends exactly once."""

    async def reserve(self, pool: str, tokens: int, reservation_id: str) -> None: ...

    async def commit(self, reservation_id: str, used_tokens: int) -> None: ...

    async def release(self, reservation_id: str) -> None: ...


class RouterBudget:
    def __init__(self, backend: BudgetBackend, lease_seconds: int) -> None:
        self._backend = backend
        self._lease_seconds = lease_seconds

    async def reserve(self, pool: str, tokens: int, reservation_id: str) -> None:
        """Reserve or raise PoolNotFound / BudgetExhausted / InvalidRequest / UpstreamUnavailable."""
        try:
            await self._backend.reserve(pool, tokens, reservation_id, self._lease_seconds)
        except budget_errors.PoolNotFound as error:
            raise PoolNotFound(f"Token pool '{pool}' does not exist", param="pool") from error
        except budget_errors.BudgetExhausted as error:
            raise BudgetExhausted(error.message, retry_after=error.retry_after_seconds) from error
        except budget_errors.InvalidArgument as error:
            raise InvalidRequest(error.message, param="pool") from error
        except UNREACHABLE as error:
            raise UpstreamUnavailable("Budget store unavailable") from error

    async def commit(self, reservation_id: str, used_tokens: int) -> None:
        """Commit the real usage. A failure is logged: the lease returns the tokens, and
        the usage is still in the event."""
        try:
            result = await self._backend.commit(reservation_id, used_tokens)
        except Exception as error:  # never let a failed commit swallow the completion event
            log.error("budget commit failed", extra={"reservation_id": reservation_id, "error": repr(error)})
            return
        if result.already_ended:
            log.warning("reservation had already ended at commit", extra={"reservation_id": reservation_id})

    async def release(self, reservation_id: str) -> None:
        """Give the reservation back; a failure is logged (the lease expires anyway)."""
        try:
            await self._backend.release(reservation_id)
        except UNREACHABLE as error:
            log.error("budget release failed", extra={"reservation_id": reservation_id, "error": str(error)})
