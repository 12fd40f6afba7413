"""gRPC transport for BudgetService: translate messages, map errors to status codes."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import grpc
from hoosh.budget.v1 import budget_pb2, budget_pb2_grpc
from hoosh_common.grpc_errors import error_metadata
from redis.exceptions import RedisError

from hoosh_budget.errors import BudgetError, BudgetExhausted, InvalidArgument, PoolNotFound
from hoosh_budget.pools import BudgetStore, PoolView

log = logging.getLogger(__name__)

SERVICE_NAME = budget_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name

Context = grpc.aio.ServicerContext[Any, Any]


def pool_message(view: PoolView) -> budget_pb2.Pool:
    return budget_pb2.Pool(
        name=view.name,
        capacity=view.capacity,
        used=view.used,
        reserved=view.reserved,
        available=view.available,
    )


def _status_of(exc: BudgetError) -> tuple[grpc.StatusCode, str, str]:
    """(status, OpenAI error type, hoosh error code) for a domain error."""
    if isinstance(exc, BudgetExhausted):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "insufficient_quota", "budget_exhausted"
    if isinstance(exc, PoolNotFound):
        return grpc.StatusCode.NOT_FOUND, "invalid_request_error", "pool_not_found"
    if isinstance(exc, InvalidArgument):
        return grpc.StatusCode.INVALID_ARGUMENT, "invalid_request_error", "invalid_request"
    return grpc.StatusCode.INTERNAL, "api_error", "internal_error"


async def _abort(context: Context, exc: Exception) -> NoReturn:
    """End the call with the status (and trailing metadata) that ``exc`` stands for."""
    if isinstance(exc, BudgetError):
        status, error_type, error_code = _status_of(exc)
        message = exc.message
    else:  # RedisError: the store is unreachable; the caller may retry elsewhere or later
        log.error("budget store unavailable", extra={"error": str(exc)})
        status, error_type, error_code = grpc.StatusCode.UNAVAILABLE, "api_error", "budget_unavailable"
        message = "Token budget store is unavailable"
    retry_after = exc.retry_after_seconds if isinstance(exc, BudgetExhausted) else None
    await context.abort(status, message, trailing_metadata=error_metadata(error_type, error_code, None, retry_after))


class BudgetServicer(budget_pb2_grpc.BudgetServiceServicer):
    """hoosh.budget.v1.BudgetService over a shared :class:`BudgetStore`."""

    def __init__(self, store: BudgetStore) -> None:
        self._store = store

    async def Check(self, request: budget_pb2.CheckRequest, context: Context) -> budget_pb2.CheckResponse:
        try:
            result = await self._store.check(request.pool, request.tokens)
        except (BudgetError, RedisError) as exc:
            await _abort(context, exc)
        return budget_pb2.CheckResponse(allowed=result.allowed, pool=pool_message(result.pool))

    async def Reserve(self, request: budget_pb2.ReserveRequest, context: Context) -> budget_pb2.ReserveResponse:
        try:
            reservation = await self._store.reserve(
                request.pool, request.tokens, request.reservation_id, request.lease_seconds or None
            )
        except (BudgetError, RedisError) as exc:
            await _abort(context, exc)
        return budget_pb2.ReserveResponse(
            reservation_id=reservation.reservation_id, pool=pool_message(reservation.pool)
        )

    async def Commit(self, request: budget_pb2.CommitRequest, context: Context) -> budget_pb2.CommitResponse:
        try:
            result = await self._store.commit(request.reservation_id, request.used_tokens)
        except (BudgetError, RedisError) as exc:
            await _abort(context, exc)
        response = budget_pb2.CommitResponse(already_ended=result.already_ended)
        if result.pool is not None:
            response.pool.CopyFrom(pool_message(result.pool))
        return response

    async def Release(self, request: budget_pb2.ReleaseRequest, context: Context) -> budget_pb2.ReleaseResponse:
        try:
            result = await self._store.release(request.reservation_id)
        except (BudgetError, RedisError) as exc:
            await _abort(context, exc)
        response = budget_pb2.ReleaseResponse(already_ended=result.already_ended)
        if result.pool is not None:
            response.pool.CopyFrom(pool_message(result.pool))
        return response

    async def Report(self, request: budget_pb2.ReportRequest, context: Context) -> budget_pb2.ReportResponse:
        try:
            view = await self._store.report(request.pool, request.reserved, request.actual)
        except (BudgetError, RedisError) as exc:
            await _abort(context, exc)
        return budget_pb2.ReportResponse(pool=pool_message(view))

    async def GetPool(self, request: budget_pb2.GetPoolRequest, context: Context) -> budget_pb2.GetPoolResponse:
        try:
            view = await self._store.get_pool(request.pool)
        except (BudgetError, RedisError) as exc:
            await _abort(context, exc)
        return budget_pb2.GetPoolResponse(pool=pool_message(view))

    async def ListPools(self, request: budget_pb2.ListPoolsRequest, context: Context) -> budget_pb2.ListPoolsResponse:
        try:
            views = await self._store.list_pools()
        except (BudgetError, RedisError) as exc:
            await _abort(context, exc)
        return budget_pb2.ListPoolsResponse(pools=[pool_message(view) for view in views])

    async def UpsertPool(
        self, request: budget_pb2.UpsertPoolRequest, context: Context
    ) -> budget_pb2.UpsertPoolResponse:
        try:
            view = await self._store.upsert_pool(request.pool, request.capacity)
        except (BudgetError, RedisError) as exc:
            await _abort(context, exc)
        return budget_pb2.UpsertPoolResponse(pool=pool_message(view))


def add_to_server(servicer: BudgetServicer, server: grpc.aio.Server) -> None:
    budget_pb2_grpc.add_BudgetServiceServicer_to_server(servicer, server)
