"""The budget service over gRPC, for other services: the same calls and the same
errors as the in-process :class:`hoosh_budget.pools.BudgetStore`, so a caller can
use either behind one interface."""

from __future__ import annotations

from typing import Protocol

import grpc
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh_common.grpc_errors import RETRY_AFTER, metadata_dict

from .errors import BudgetExhausted, BudgetUnavailable, InvalidArgument, PoolNotFound
from .pools import EndResult, PoolView


def _end_result(pool: budget_pb2.Pool, already_ended: bool, state: str) -> EndResult:
    view = PoolView(pool.name, pool.capacity, pool.used, pool.reserved) if pool.name else None
    return EndResult(pool=view, already_ended=already_ended, state="unknown" if already_ended else state)  # type: ignore[arg-type]


class BudgetBackend(Protocol):
    """What callers need of a budget: BudgetStore (in-process, Redis) or BudgetServiceClient."""

    async def reserve(
        self, pool: str, tokens: int, reservation_id: str, lease_seconds: float | None = None
    ) -> object: ...

    async def commit(self, reservation_id: str, used_tokens: int) -> EndResult: ...

    async def release(self, reservation_id: str) -> EndResult: ...


class BudgetServiceClient:
    """Reserve, commit and release through ``hoosh.budget.v1.BudgetService``."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 10.0) -> None:
        self._stub = budget_pb2_grpc.BudgetServiceStub(channel)
        self._timeout = timeout

    async def reserve(self, pool: str, tokens: int, reservation_id: str, lease_seconds: float | None = None) -> None:
        """Raises PoolNotFound, BudgetExhausted, InvalidArgument or BudgetUnavailable."""
        request = budget_pb2.ReserveRequest(
            pool=pool, tokens=tokens, reservation_id=reservation_id, lease_seconds=int(lease_seconds or 0)
        )
        try:
            await self._stub.Reserve(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:
                raise PoolNotFound(pool) from error
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                retry_after = metadata_dict(error.trailing_metadata()).get(RETRY_AFTER)
                raise BudgetExhausted(
                    pool,
                    tokens,
                    available=-1,
                    retry_after_seconds=int(retry_after) if retry_after and retry_after.isdigit() else 60,
                    message=error.details() or None,
                ) from error
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(error.details() or "invalid budget request") from error
            raise BudgetUnavailable(f"Budget service unavailable: {code.name}") from error

    async def commit(self, reservation_id: str, used_tokens: int) -> EndResult:
        """Commit the actual usage (``already_ended`` when it had ended before)."""
        request = budget_pb2.CommitRequest(reservation_id=reservation_id, used_tokens=used_tokens)
        try:
            reply = await self._stub.Commit(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise BudgetUnavailable(f"budget commit failed: {error.code().name}") from error
        return _end_result(reply.pool, reply.already_ended, "committed")

    async def release(self, reservation_id: str) -> EndResult:
        """Give the reservation back (``already_ended`` when it had ended before)."""
        request = budget_pb2.ReleaseRequest(reservation_id=reservation_id)
        try:
            reply = await self._stub.Release(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as error:
            raise BudgetUnavailable(f"budget release failed: {error.code().name}") from error
        return _end_result(reply.pool, reply.already_ended, "released")
