"""The router's side of the budget service: reserve, commit, release."""

from __future__ import annotations

import logging
from typing import Protocol

import grpc
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh_budget import errors as budget_errors
from hoosh_budget.pools import BudgetStore
from redis.exceptions import RedisError

from .errors import BudgetExhausted, InvalidRequest, PoolNotFound, UpstreamUnavailable

log = logging.getLogger(__name__)


def _metadata_value(error: grpc.aio.AioRpcError, key: str) -> str | None:
    for name, value in error.trailing_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else value.decode()
    return None


class Budget(Protocol):
    """What the router needs of the budget: every reservation ends exactly once."""

    async def reserve(self, pool: str, tokens: int, reservation_id: str) -> None: ...

    async def commit(self, reservation_id: str, used_tokens: int) -> None: ...

    async def release(self, reservation_id: str) -> None: ...


class BudgetClient:
    """The budget service over gRPC (HOOSH_ROUTER_BUDGET_MODE=grpc)."""

    def __init__(self, channel: grpc.aio.Channel, lease_seconds: int) -> None:
        self._stub = budget_pb2_grpc.BudgetServiceStub(channel)
        self._lease_seconds = lease_seconds

    async def reserve(self, pool: str, tokens: int, reservation_id: str) -> None:
        """Reserve or raise PoolNotFound / BudgetExhausted / UpstreamUnavailable."""
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
            raise UpstreamUnavailable(f"Budget service unavailable: {code.name}") from error

    async def commit(self, reservation_id: str, used_tokens: int) -> None:
        try:
            reply = await self._stub.Commit(
                budget_pb2.CommitRequest(reservation_id=reservation_id, used_tokens=used_tokens), timeout=10
            )
        except grpc.aio.AioRpcError as error:
            # The lease will expire and return the tokens; the usage is still in the event.
            log.error("budget commit failed", extra={"reservation_id": reservation_id, "error": error.code().name})
            return
        if reply.already_ended:
            log.warning("reservation had already ended at commit", extra={"reservation_id": reservation_id})

    async def release(self, reservation_id: str) -> None:
        try:
            await self._stub.Release(budget_pb2.ReleaseRequest(reservation_id=reservation_id), timeout=10)
        except grpc.aio.AioRpcError as error:
            log.error("budget release failed", extra={"reservation_id": reservation_id, "error": error.code().name})


class RedisBudget:
    """The budget library in-process, against the same Redis keys and Lua scripts as
    the budget service: one Redis round trip per step instead of a gRPC hop plus one.
    Atomicity lives in the Lua scripts, so the two paths can be mixed freely."""

    def __init__(self, store: BudgetStore, lease_seconds: int) -> None:
        self._store = store
        self._lease_seconds = lease_seconds

    async def reserve(self, pool: str, tokens: int, reservation_id: str) -> None:
        try:
            await self._store.reserve(pool, tokens, reservation_id, self._lease_seconds)
        except budget_errors.PoolNotFound as error:
            raise PoolNotFound(f"Token pool '{pool}' does not exist", param="pool") from error
        except budget_errors.BudgetExhausted as error:
            raise BudgetExhausted(error.message, retry_after=error.retry_after_seconds) from error
        except budget_errors.InvalidArgument as error:
            raise InvalidRequest(error.message, param="pool") from error
        except RedisError as error:
            raise UpstreamUnavailable("Budget store unavailable") from error

    async def commit(self, reservation_id: str, used_tokens: int) -> None:
        try:
            result = await self._store.commit(reservation_id, used_tokens)
        except RedisError as error:
            log.error("budget commit failed", extra={"reservation_id": reservation_id, "error": str(error)})
            return
        if result.already_ended:
            log.warning("reservation had already ended at commit", extra={"reservation_id": reservation_id})

    async def release(self, reservation_id: str) -> None:
        try:
            await self._store.release(reservation_id)
        except RedisError as error:
            log.error("budget release failed", extra={"reservation_id": reservation_id, "error": str(error)})
