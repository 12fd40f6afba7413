"""The STT service's side of the budget: the budget service's own gRPC client, with
its errors mapped to the STT service's (which carry the HTTP-facing metadata)."""

from __future__ import annotations

import logging

import grpc
from hoosh_budget import errors as budget_errors
from hoosh_budget.client import BudgetServiceClient

from .errors import BudgetExhausted, InvalidRequest, PoolNotFound, Unavailable

log = logging.getLogger(__name__)


class BudgetClient:
    def __init__(self, channel: grpc.aio.Channel, lease_seconds: int) -> None:
        self._client = BudgetServiceClient(channel)
        self._lease_seconds = lease_seconds

    async def reserve(self, pool: str, tokens: int, reservation_id: str) -> None:
        """Reserve or raise PoolNotFound / BudgetExhausted / InvalidRequest / Unavailable."""
        try:
            await self._client.reserve(pool, tokens, reservation_id, self._lease_seconds)
        except budget_errors.PoolNotFound as error:
            raise PoolNotFound(f"Token pool '{pool}' does not exist", param="pool") from error
        except budget_errors.BudgetExhausted as error:
            raise BudgetExhausted(error.message, retry_after=error.retry_after_seconds) from error
        except budget_errors.InvalidArgument as error:
            raise InvalidRequest(error.message, param="pool") from error
        except budget_errors.BudgetUnavailable as error:
            raise Unavailable(error.message) from error

    async def commit(self, reservation_id: str, used_tokens: int) -> None:
        """Commit the actual usage; a failure is logged (the lease returns the tokens)."""
        try:
            result = await self._client.commit(reservation_id, used_tokens)
        except Exception as error:  # never let a failed commit swallow the completion event
            log.error("budget commit failed", extra={"reservation_id": reservation_id, "error": repr(error)})
            return
        if result.already_ended:
            log.warning("reservation had already ended at commit", extra={"reservation_id": reservation_id})

    async def release(self, reservation_id: str) -> None:
        """Give the reservation back; a failure is logged (the lease expires anyway)."""
        try:
            await self._client.release(reservation_id)
        except budget_errors.BudgetUnavailable as error:
            log.error("budget release failed", extra={"reservation_id": reservation_id, "error": error.message})
