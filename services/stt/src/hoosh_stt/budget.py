"""The STT service's side of the budget service: reserve, commit, release."""

from __future__ import annotations

import logging

import grpc
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc

from .errors import BudgetExhausted, InvalidRequest, PoolNotFound, Unavailable

log = logging.getLogger(__name__)


def _metadata_value(error: grpc.aio.AioRpcError, key: str) -> str | None:
    for name, value in error.trailing_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode()
    return None


class BudgetClient:
    def __init__(self, channel: grpc.aio.Channel, lease_seconds: int) -> None:
        self._stub = budget_pb2_grpc.BudgetServiceStub(channel)
        self._lease_seconds = lease_seconds

    async def reserve(self, pool: str, tokens: int, reservation_id: str) -> None:
        """Reserve or raise PoolNotFound / BudgetExhausted / InvalidRequest / Unavailable."""
        try:
            await self._stub.Reserve(
                budget_pb2.ReserveRequest(
                    pool=pool, tokens=tokens, reservation_id=reservation_id, lease_seconds=self._lease_seconds
                ),
                timeout=10,
            )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise PoolNotFound(f"Token pool '{pool}' does not exist", param="pool") from error
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                retry_after = _metadata_value(error, "retry-after")
                raise BudgetExhausted(
                    error.details() or f"Token budget exceeded for pool '{pool}'",
                    retry_after=int(retry_after) if retry_after and retry_after.isdigit() else None,
                ) from error
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequest(error.details() or "invalid budget request", param="pool") from error
            raise Unavailable(f"Budget service unavailable: {code.name}") from error

    async def commit(self, reservation_id: str, used_tokens: int) -> None:
        """Commit the actual usage; a failure is logged (the lease returns the tokens)."""
        try:
            reply = await self._stub.Commit(
                budget_pb2.CommitRequest(reservation_id=reservation_id, used_tokens=used_tokens), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            log.error("budget commit failed", extra={"reservation_id": reservation_id, "error": error.code().name})
            return
        if reply.already_ended:
            log.warning("reservation had already ended at commit", extra={"reservation_id": reservation_id})

    async def release(self, reservation_id: str) -> None:
        """Give the reservation back; a failure is logged (the lease expires anyway)."""
        try:
            await self._stub.Release(budget_pb2.ReleaseRequest(reservation_id=reservation_id), timeout=10)
        except grpc.aio.AioRpcError as error:
            log.error("budget release failed", extra={"reservation_id": reservation_id, "error": error.code().name})
